"""Applying trained models to a subject: batched, device-aware, refusing OOD data.

The numerics side of the inference step (no pydra here; the Pydra step is
``pipelines/inference.py``). :func:`run_volume` runs a fully convolutional
network over a whole volume in slabs along the last axis, each with
``halo`` voxels of context on both sides, so memory stays bounded and the
result equals one pass over the whole volume. Device: CUDA when available,
else the CPU; bf16 autocast on CUDA only, so CPU results are deterministic.

:func:`synthesize_directions` applies a direction-synthesis checkpoint
(:mod:`dmriflow.models.directions`) to one subject after checking its
acquisition against the model card; :func:`generate_7t_like` a 3T->7T latent
diffusion checkpoint (:mod:`dmriflow.models.ldm`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dmriflow.interfaces.dti import TensorModel

#: Slab thickness (voxels along the last axis) per forward pass, excluding the halo.
SLAB = 32
#: torch threads for CPU inference: pipeline nodes already run in parallel
#: workers, and an oversubscribed pool is many times slower (models.train).
CPU_THREADS = 1
#: Inference model kinds offered by the pipeline (``dmriflow run --inference``).
DIRECTIONS = "directions"
THREE_T_TO_7T = "3t7t"


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_volume(model: torch.nn.Module, volume: np.ndarray, halo: int, slab: int = SLAB,
               device=None, threads: int = CPU_THREADS) -> np.ndarray:
    """``model`` applied to ``volume`` (C, X, Y, Z); output (C', X, Y, Z) float32.

    Slabs of ``slab`` voxels along Z are run with up to ``halo`` voxels of
    neighbours on each side (none beyond the volume, where the network pads
    as in a whole-volume pass), so with ``halo`` >= the network's receptive
    radius each output voxel equals that of a single whole-volume pass.
    ``threads``: torch threads on the CPU (see :data:`CPU_THREADS`).
    """
    from dmriflow.models.card import select_device
    from dmriflow.models.train import torch_threads
    device = select_device(device)
    model = model.to(device).eval()
    n_z = volume.shape[-1]
    out = None
    threads_ctx = torch_threads(threads) if device.type == "cpu" else contextlib.nullcontext()
    with torch.no_grad(), _autocast(device), threads_ctx:
        for z0 in range(0, n_z, slab):
            z1 = min(z0 + slab, n_z)
            lo, hi = max(z0 - halo, 0), min(z1 + halo, n_z)
            chunk = np.ascontiguousarray(volume[..., lo:hi], dtype=np.float32)
            res = model(torch.from_numpy(chunk)[None].to(device))[0].float().cpu().numpy()
            if out is None:
                out = np.zeros(res.shape[:-1] + (n_z,), dtype=np.float32)
            out[..., z0:z1] = res[..., z0 - lo:z1 - lo]
    return out


# ----------------------------------------------------------------------------
# What an inference kind returns, and the registry of kinds
# ----------------------------------------------------------------------------
@dataclass
class InferenceOutput:
    """Arrays and tables one model produced for one subject (no files yet).

    ``maps``: BIDS entities -> array on the subject's grid (3D or 4D);
    ``tables``: entities -> pandas DataFrame; ``row``: scalars for the
    subject's row of the cohort table; ``parameters``: for the sidecars.
    """

    maps: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)
    row: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)


#: Inference kinds: name -> fn(model, card, dwi, path, census, device) -> InferenceOutput.
KINDS: dict = {}
#: Folder of each kind's shipped checkpoint, relative to dmriflow.models.
SHIPPED = {}


def register_kind(name: str, shipped: str | None = None):
    """Make an inference kind available to ``dmriflow run --inference NAME``."""
    def deco(fn):
        KINDS[name] = fn
        if shipped is not None:
            SHIPPED[name] = shipped
        return fn
    return deco


def default_checkpoint(kind: str) -> Path:
    """The checkpoint folder shipped with the package for ``kind``."""
    import dmriflow.models
    if kind not in SHIPPED:
        raise ValueError(f"no checkpoint is shipped for inference kind {kind!r}: pass one")
    return Path(dmriflow.models.__file__).parent / "checkpoints" / SHIPPED[kind]


def run_inference(kind: str, checkpoint, dwi, path, census: dict | None = None,
                  device=None) -> tuple[InferenceOutput, object]:
    """Load ``checkpoint`` (default: the shipped one), check the subject's
    acquisition against its card, and apply it. Returns (output, card)."""
    from dmriflow.models.card import check_acquisition, load_checkpoint
    if kind not in KINDS:
        raise ValueError(f"unknown inference kind {kind!r}; known: {sorted(KINDS)}")
    model, card = load_checkpoint(checkpoint or default_checkpoint(kind), device=device)
    facts = dict(census or {})
    check_acquisition(card, dwi.gtab, path, zooms=dwi.zooms,
                      field_strength=_field(facts.get("field_strength_t")))
    out = KINDS[kind](model, card, dwi, path, census=facts, device=device)
    out.parameters = {"model": card.name, "model_version": card.version,
                      "weights_sha256": card.weights_sha256, **out.parameters}
    return out, card


def _field(value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(v) else v


# ----------------------------------------------------------------------------
# Direction synthesis on one subject
# ----------------------------------------------------------------------------
#: Seed of the target direction set synthesised for subjects with few directions.
SYNTHESIS_SEED = 0


@register_kind(DIRECTIONS, shipped="directions")
def synthesize_directions(model, card, dwi, path, census=None, device=None) -> InferenceOutput:
    """Synthesise extra b=1000 directions for one subject.

    With at least twice the model's input count on the shell (e.g. HCP's 90),
    a well-spread subset of ``n_input`` directions is the input and the
    others are predicted and compared with the acquired ones (held-out mode:
    DWI and FA RMSE in the row, next to the DTI-prediction baseline). With
    fewer, all acquired directions are the input and the card's
    ``n_synthesised`` electrostatic directions are added (upsampling mode).
    Output: b0s + inputs + synthesised directions as a 4D series, its
    gradient table and its FA.
    """
    from dmriflow.interfaces.gradients import electrostatic_directions
    from dmriflow.models import directions as dm
    from dmriflow.models.data import split_dwi
    shell = card.acquisition.shells[0]
    n_input = int(card.training.get("n_input", card.acquisition.min_directions[f"{shell:g}"]))
    n_shell = dwi.gtab.directions_per_shell()[shell]
    holdout = n_shell >= 2 * n_input
    if holdout:
        sample = split_dwi(dwi, path, shell=shell, n_input=n_input)
        targets = sample.target_bvecs
    else:
        sample = split_dwi(dwi, path, shell=shell, n_input=None)
        targets = electrostatic_directions(int(card.extra.get("n_synthesised", 60)),
                                           seed=SYNTHESIS_SEED)
    pred = dm.predict_network(model, sample, bvecs=targets, device=device)
    series = sample.series(pred)
    gtab = type(dwi.gtab)(np.r_[np.zeros(sample.b0.shape[-1]),
                                np.full(len(sample.input_bvecs) + len(targets), shell)],
                          np.r_[np.zeros((sample.b0.shape[-1], 3)), sample.input_bvecs, targets])
    fa = np.asarray(TensorModel(gtab).fit(series, sample.mask).fa, dtype=np.float32)
    row = {"inference_mode": "held-out" if holdout else "upsampling",
           "inference_inputs": len(sample.input_bvecs), "inference_synthesised": len(targets)}
    if holdout:
        full = np.asarray(TensorModel(gtab).fit(sample.series(sample.targets), sample.mask).fa)
        m = sample.mask

        def rmse(a, b):
            return round(float(np.sqrt(np.mean((a[m] - b[m]) ** 2))), 5)
        row.update(inference_dwi_rmse=rmse(pred, sample.targets),
                   inference_dwi_rmse_dti=rmse(dm.dti_prediction(sample), sample.targets),
                   inference_fa_rmse=rmse(fa, full))
    n_b0 = sample.b0.shape[-1]
    acquired = np.r_[np.ones(n_b0 + len(sample.input_bvecs), bool), np.zeros(len(targets), bool)]
    table = pd.DataFrame({"volume": np.arange(len(gtab)), "bval": gtab.bvals,
                          "x": gtab.bvecs[:, 0], "y": gtab.bvecs[:, 1], "z": gtab.bvecs[:, 2],
                          "acquired": acquired})
    return InferenceOutput(
        maps={"model-directions_desc-synthesized": series,
              "model-directions_param-fa": fa},
        tables={"model-directions_desc-synthesized_gradients": table},
        row=row, parameters={"mode": row["inference_mode"], "shell": shell,
                             "n_input": len(sample.input_bvecs),
                             "n_synthesised": len(targets), "bvec_frame": "fsl-image"})


# ----------------------------------------------------------------------------
# 3T -> 7T-like DWIs (latent diffusion on RISH maps)
# ----------------------------------------------------------------------------
@register_kind(THREE_T_TO_7T, shipped="ldm_3t7t")
def generate_7t_like(model, card, dwi, path, census=None, device=None) -> InferenceOutput:
    """7T-like b0 + b=1000 series of a 3T subject, its FA and lambda maps
    (:func:`dmriflow.models.ldm.cohort.inference_output`)."""
    from dmriflow.models.ldm.cohort import inference_output
    return inference_output(model, card, dwi)
