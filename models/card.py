"""Checkpoints as safetensors weights plus a JSON model card; acquisition matching.

A checkpoint is a folder holding two files:

* ``model.safetensors`` - the network's state dict (tensors only; safetensors
  cannot carry code, so loading it never runs anything),
* ``card.json`` - the :class:`ModelCard`: name and version, the architecture's
  registered name and constructor kwargs, the acquisition the model expects
  (:class:`Acquisition`), the signal normalisation, a description of the
  training data, a metrics table and the sha256 of the weights file.

Loading reads the card, checks that the weights file it names is a plain
``*.safetensors`` file in the same folder whose sha256 matches, builds the
network from the card through the :data:`ARCHITECTURES` registry and loads the
tensors. Nothing is ever unpickled: no ``torch.load``, no other file in the
folder is opened. :func:`check_acquisition` refuses data whose acquisition
does not match the card (out-of-distribution input) with an
:class:`~dmriflow.interfaces.errors.InputError` naming the file.

Usage (any model)::

    @register("my-net")
    class MyNet(torch.nn.Module): ...

    card = ModelCard(name="my-model", version="1", architecture="my-net",
                     kwargs={"width": 16}, acquisition=Acquisition(shells=[1000.0],
                     min_directions={"1000": 30}, voxel_size_mm=[2.5, 2.5, 2.5]))
    save_checkpoint(net, card, "ckpt/")
    net, card = load_checkpoint("ckpt/", device="cpu")
    check_acquisition(card, gtab, dwi_path, zooms=(2.5, 2.5, 2.5), field_strength=3.0)
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save

from dmriflow.interfaces import __version__ as DMRIFLOW_VERSION
from dmriflow.interfaces import io
from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.gradients import GradientTable

#: File names inside a checkpoint folder.
CARD_FILE = "card.json"
WEIGHTS_FILE = "model.safetensors"
#: The only weights format accepted (no pickle-based .pt/.pth/.pkl/.bin).
WEIGHTS_SUFFIX = ".safetensors"
#: Version of the card layout written by :func:`save_checkpoint`.
CARD_SCHEMA = 1
#: Voxel sizes match when each axis agrees within this fraction of the card's.
VOXEL_SIZE_RELATIVE_TOLERANCE = 0.05
#: Field strengths match within this (T), when both card and data state one.
FIELD_STRENGTH_TOLERANCE_T = 0.25

#: Registered architectures: name -> class (or factory) taking the card's kwargs.
ARCHITECTURES: dict[str, Callable[..., torch.nn.Module]] = {}


def register(name: str):
    """Class decorator: make an ``nn.Module`` buildable from a card by ``name``."""
    def deco(cls):
        if name in ARCHITECTURES and ARCHITECTURES[name] is not cls:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHITECTURES[name] = cls
        cls.architecture = name
        return cls
    return deco


def build(architecture: str, kwargs: dict) -> torch.nn.Module:
    """A fresh network of a registered architecture (random weights)."""
    failed = {} if architecture in ARCHITECTURES else _import_known_architectures(architecture)
    if architecture not in ARCHITECTURES:
        why = "".join(f"; {m} not importable ({e})" for m, e in failed.items())
        raise ValueError(f"unknown architecture {architecture!r}; known: "
                         f"{sorted(ARCHITECTURES)}{why}")
    return ARCHITECTURES[architecture](**kwargs)


#: Modules that register architectures; imported on demand by :func:`build`.
ARCHITECTURE_MODULES = ("dmriflow.models.directions", "dmriflow.models.ldm",
                        "dmriflow.models.experiments.dti6")


def _import_known_architectures(wanted: str) -> dict[str, str]:
    """Import the model modules (they register themselves) until ``wanted`` is
    registered; return the import failures.

    A family whose optional dependency is missing (e.g. MONAI) must not stop
    the others from loading, and a light family need not import a heavy one.
    """
    failed = {}
    for mod in ARCHITECTURE_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            failed[mod] = str(exc)
        if wanted in ARCHITECTURES:
            break
    return failed


def select_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------
# The card
# ----------------------------------------------------------------------------
@dataclass
class Acquisition:
    """What a model's input data must look like.

    ``shells``: nominal diffusion-weighted shells (s/mm^2) the model reads -
    each must be present. ``min_directions``: per shell (key ``f"{b:g}"``) the
    fewest directions it needs. ``voxel_size_mm``: matched per axis within
    :data:`VOXEL_SIZE_RELATIVE_TOLERANCE` (None: any). ``field_strength_t``:
    matched within :data:`FIELD_STRENGTH_TOLERANCE_T` when the data state one
    (None: any). ``min_b0``: fewest b0 volumes (normalisation needs one).
    ``ranges``: quantities measured on the input and the range the model was
    trained on, ``{name: {"min", "max", "action": "refuse"|"flag",
    "trained": [lo, hi]}}`` (e.g. ``cube_voxel_mm``, ``snr``,
    ``ensemble_disagreement``; ``measured_on`` names what ``trained`` was
    measured on when it is not the training data, other keys are the
    quantity's own record); see :func:`range_problems`.
    """

    shells: list[float]
    min_directions: dict[str, int] = field(default_factory=dict)
    voxel_size_mm: list[float] | None = None
    field_strength_t: float | None = None
    min_b0: int = 1
    ranges: dict = field(default_factory=dict)

    def describe(self) -> str:
        vox = "any" if self.voxel_size_mm is None else \
            "x".join(f"{v:g}" for v in self.voxel_size_mm) + " mm"
        dirs = ", ".join(f"b={k}: >= {v}" for k, v in self.min_directions.items())
        return (f"shells {[f'{b:g}' for b in self.shells]} ({dirs}), voxel {vox}, "
                f"field {self.field_strength_t if self.field_strength_t else 'any'} T, "
                f">= {self.min_b0} b0")


@dataclass
class ModelCard:
    """Everything needed to rebuild, trust and apply a checkpoint.

    ``metrics`` is a table: a list of rows (dicts of plain values), e.g.
    ``{"split": "held-out", "method": "network", "dwi_rmse": 0.03}``.
    ``extra`` holds model-specific plain data (e.g. target directions).
    ``weights_sha256`` is filled in by :func:`save_checkpoint`.
    """

    name: str
    version: str
    architecture: str
    kwargs: dict
    acquisition: Acquisition
    normalisation: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    weights_file: str = WEIGHTS_FILE
    weights_sha256: str = ""
    dmriflow_version: str = DMRIFLOW_VERSION
    schema: int = CARD_SCHEMA

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, path=None) -> "ModelCard":
        """Validate and build; unknown or missing keys are an InputError."""
        if not isinstance(d, dict):
            raise InputError(path, "model card is not a JSON object")
        names = {f.name for f in fields(cls)}
        unknown, missing = set(d) - names, {"name", "version", "architecture", "kwargs",
                                            "acquisition"} - set(d)
        if unknown or missing:
            raise InputError(path, f"model card has unknown keys {sorted(unknown)} / misses "
                                   f"{sorted(missing)}")
        if d.get("schema", CARD_SCHEMA) > CARD_SCHEMA:
            raise InputError(path, f"model card schema {d['schema']} is newer than this "
                                   f"dmriflow reads ({CARD_SCHEMA})")
        acq = d["acquisition"]
        try:
            acq = Acquisition(**acq)
        except TypeError as exc:
            raise InputError(path, f"model card acquisition is invalid ({exc})") from None
        if not isinstance(d["kwargs"], dict):
            raise InputError(path, "model card kwargs must be an object")
        return cls(**{**d, "acquisition": acq})


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_card(path) -> ModelCard:
    """The card of a checkpoint folder (or of the ``card.json`` path itself)."""
    path = Path(path)
    card_path = path / CARD_FILE if path.is_dir() else path
    if card_path.name != CARD_FILE:
        raise InputError(path, f"not a dmriflow checkpoint: give the folder holding "
                               f"{CARD_FILE} and {WEIGHTS_FILE} (pickled .pt/.pth/.pkl files "
                               f"are never loaded)")
    if not card_path.is_file():
        raise InputError(card_path, "model card not found")
    try:
        d = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(card_path, f"cannot read the model card as JSON ({exc})") from None
    return ModelCard.from_dict(d, card_path)


def _weights_path(folder: Path, card: ModelCard) -> Path:
    name = card.weights_file
    if Path(name).name != name or not name.endswith(WEIGHTS_SUFFIX):
        raise InputError(folder / CARD_FILE, f"weights file {name!r} must be a "
                                             f"{WEIGHTS_SUFFIX} file in the checkpoint folder")
    return folder / name


def read_weights(folder, card: ModelCard, device="cpu") -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, after checking the file's sha256 against the card."""
    return read_verified(_weights_path(Path(folder), card), card.weights_sha256, device)


def read_verified(path, sha256: str, device="cpu") -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file whose sha256 must equal ``sha256``.

    The file is read once into memory, hashed, and parsed from those same
    bytes by safetensors (so what was checked is what is loaded).
    """
    path = Path(path)
    if path.suffix != WEIGHTS_SUFFIX:
        raise InputError(path, f"only {WEIGHTS_SUFFIX} files are loaded")
    if not path.is_file():
        raise InputError(path, "weights file not found")
    if not sha256:
        raise InputError(path, "no sha256 is recorded for the weights")
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if digest != sha256:
        raise InputError(path, f"weights sha256 {digest[:12]}... does not match the model "
                               f"card ({sha256[:12]}...): file changed or tampered with")
    try:
        tensors = st_load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise InputError(path, f"cannot parse safetensors weights ({exc})") from None
    return {k: v.to(device) for k, v in tensors.items()}


def write_weights(tensors: dict[str, torch.Tensor], path) -> str:
    """Write tensors as safetensors atomically; return the file's sha256."""
    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    io.atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return sha256_bytes(data)


def save_checkpoint(model: torch.nn.Module, card: ModelCard, folder) -> Path:
    """Write ``model``'s weights and ``card`` (with the weights' sha256) to ``folder``.

    ``card.architecture``/``card.kwargs`` must rebuild ``model``; this is
    checked by building one and comparing the state-dict keys and shapes.
    """
    folder = Path(folder)
    state = model.state_dict()
    probe = build(card.architecture, card.kwargs).state_dict()
    if {k: tuple(v.shape) for k, v in probe.items()} != \
            {k: tuple(v.shape) for k, v in state.items()}:
        raise ValueError(f"card architecture {card.architecture!r} with kwargs {card.kwargs} "
                         f"does not rebuild this model's parameters")
    card.weights_file = WEIGHTS_FILE
    card.weights_sha256 = write_weights(state, folder / WEIGHTS_FILE)
    io.write_json(card.to_dict(), folder / CARD_FILE)
    return folder


def write_card(card: ModelCard, folder) -> Path:
    """Rewrite the card of an existing checkpoint (e.g. a range measured after
    training); its weights file must still be the one the card names."""
    folder = Path(folder)
    read_weights(folder, card)
    return io.write_json(card.to_dict(), folder / CARD_FILE)


def load_checkpoint(folder, device=None) -> tuple[torch.nn.Module, ModelCard]:
    """Rebuild the network from the card and load its verified weights (eval mode).

    ``folder``: a checkpoint folder (or its ``card.json``). Any other path
    (e.g. a pickled ``.pt`` file) is refused.
    """
    path = Path(folder)
    card = load_card(path)
    folder = path if path.is_dir() else path.parent
    tensors = read_weights(folder, card)
    try:
        model = build(card.architecture, card.kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(folder / CARD_FILE, f"cannot build the network ({exc})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise InputError(folder / WEIGHTS_FILE, f"weights do not fit the architecture "
                                                f"({str(exc).splitlines()[0]})") from None
    return model.to(select_device(device)).eval(), card


# ----------------------------------------------------------------------------
# Acquisition matching
# ----------------------------------------------------------------------------
def _census_facts(row: dict) -> tuple[dict[float, int], int, list[float] | None, float | None]:
    shells = [float(b) for b in str(row["shells"]).split()]
    dirs = [int(n) for n in str(row["directions"]).split()]
    vox = row.get("voxel_size_mm")
    zooms = None if vox in (None, "") else [float(v) for v in str(vox).split("x")]
    field_t = row.get("field_strength_t")
    field_t = None if field_t is None or (isinstance(field_t, float) and np.isnan(field_t)) \
        else float(field_t)
    return dict(zip(shells, dirs)), int(row.get("n_b0", 0)), zooms, field_t


def acquisition_mismatches(acq: Acquisition, per_shell: dict[float, int], n_b0: int,
                           zooms=None, field_strength=None) -> list[str]:
    """Human-readable reasons why data do not match ``acq`` (empty: match)."""
    problems = []
    for b in acq.shells:
        key = f"{float(b):g}"
        have = per_shell.get(float(b), 0)
        need = int(acq.min_directions.get(key, 1))
        if have == 0:
            problems.append(f"no b={key} shell (data shells: "
                            f"{[f'{s:g}' for s in sorted(per_shell)]})")
        elif have < need:
            problems.append(f"b={key} has {have} directions, the model needs >= {need}")
    if n_b0 < acq.min_b0:
        problems.append(f"{n_b0} b0 volume(s), the model needs >= {acq.min_b0}")
    if acq.voxel_size_mm is not None and zooms is not None:
        want = np.asarray(acq.voxel_size_mm, dtype=float)
        have = np.asarray(list(zooms)[:3], dtype=float)
        if np.any(np.abs(have - want) > VOXEL_SIZE_RELATIVE_TOLERANCE * want):
            problems.append(f"voxel size {'x'.join(f'{z:.3g}' for z in have)} mm, the model "
                            f"was trained at {'x'.join(f'{z:g}' for z in want)} mm")
    if acq.field_strength_t is not None and field_strength is not None:
        if abs(float(field_strength) - acq.field_strength_t) > FIELD_STRENGTH_TOLERANCE_T:
            problems.append(f"field strength {float(field_strength):g} T, the model was "
                            f"trained at {acq.field_strength_t:g} T")
    return problems


#: Actions a card's range can ask for.
RANGE_ACTIONS = ("refuse", "flag")


def range_problems(acq: Acquisition, values: dict) -> dict[str, list[str]]:
    """``{"refuse": [...], "flag": [...]}``: each measured value outside its
    range in ``acq.ranges``, worded with the value and the range. A quantity
    the card has no range for, or that was not measured (None), is not
    checked."""
    out = {"refuse": [], "flag": []}
    for name, rng in (acq.ranges or {}).items():
        v = values.get(name)
        if v is None:
            continue
        lo, hi = float(rng.get("min", -np.inf)), float(rng.get("max", np.inf))
        action = rng.get("action", "refuse")
        if action not in RANGE_ACTIONS:
            raise ValueError(f"range {name!r}: action must be one of {RANGE_ACTIONS}")
        if not lo <= float(v) <= hi:
            trained = rng.get("trained")
            seen = "" if trained is None else (f"; {rng.get('measured_on', 'training data')} "
                                               f"{float(trained[0]):.4g}-{float(trained[1]):.4g}")
            out[action].append(f"{name} {float(v):.4g} is outside the model's range "
                               f"{lo:.4g}-{hi:.4g}{seen}")
    return out


def check_ranges(card: ModelCard, values: dict, path) -> list[str]:
    """Refuse (InputError naming ``path``, the model, every value and range) an
    input outside a "refuse" range of the card; return the "flag" messages
    (the caller reports them next to the result)."""
    problems = range_problems(card.acquisition, values)
    if problems["refuse"]:
        raise InputError(path, f"input is outside the training range of model {card.name} "
                               f"{card.version}: " + "; ".join(problems["refuse"]))
    return problems["flag"]


def check_acquisition(card: ModelCard, data, path, zooms=None, field_strength=None) -> None:
    """Refuse data whose acquisition does not match the card (InputError naming ``path``).

    ``data``: a :class:`GradientTable` (then pass ``zooms`` and, when known,
    ``field_strength``) or a census row (dict with ``shells``, ``directions``,
    ``n_b0``, ``voxel_size_mm``, ``field_strength_t``, as written by the
    pipeline's census).
    """
    if isinstance(data, GradientTable):
        per_shell, n_b0 = data.directions_per_shell(), int(data.b0s_mask.sum())
    elif isinstance(data, dict):
        per_shell, n_b0, c_zooms, c_field = _census_facts(data)
        zooms = c_zooms if zooms is None else zooms
        field_strength = c_field if field_strength is None else field_strength
    else:
        raise TypeError(f"expected a GradientTable or a census row, got {type(data).__name__}")
    problems = acquisition_mismatches(card.acquisition, per_shell, n_b0, zooms, field_strength)
    if problems:
        raise InputError(path, f"acquisition does not match model {card.name} "
                               f"{card.version} ({card.acquisition.describe()}): "
                               + "; ".join(problems))


def metrics_rows(card: ModelCard) -> list[dict]:
    """The card's metrics table with the model's name and version in front."""
    return [{"model": card.name, "version": card.version, **row} for row in card.metrics]

