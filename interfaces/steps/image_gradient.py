"""Image gradient: estimates from the diffusion signal, their controls and
angles to the finite-difference gold standard (docs/image_gradient.md)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import io, stepfiles
from ..errors import InputError
from ..image_gradient import SequenceTiming
from .base import (Product, Schema, Step, derivatives_from_text, flag_of, options_of, option,
                   register)

#: The Options field (ms) of each timing field of :func:`stepfiles.resolve_timing`.
TIMING_FIELDS = {"Delta": "gradient_separation", "delta": "gradient_duration",
                 "TE": "echo_time"}


@dataclass
class Options:
    image_gradient: bool = option(
        False, "estimate the image gradient from the diffusion signal per subject, with its "
               "controls; group table and figure in OUTPUT/dmriflow/group")
    image_gradient_estimators: str = option(
        "B", "one-series estimators (default: %(default)s); C (two diffusion times) and P "
             "(phase) are study-only", metavar="B[,A]")
    image_gradient_max_voxels: int = option(
        0, "evaluate a seeded random subset of N voxels per subject (0: all; A costs ~25 ms "
           "per voxel and fit with 288 volumes)", metavar="N")
    gradient_separation: float | None = option(
        None, "Delta (ms); overrides the sidecar's DiffusionGradientSeparation (s)",
        units="ms", metavar="MS")
    gradient_duration: float | None = option(
        None, "delta (ms); overrides the sidecar's DiffusionGradientDuration (s)",
        units="ms", metavar="MS")
    echo_time: float | None = option(
        None, "TE (ms, recorded); overrides the sidecar's EchoTime (s)", units="ms",
        metavar="MS")

    def __post_init__(self):
        if not isinstance(self.image_gradient_estimators, str):     # a sequence of names
            self.image_gradient_estimators = ",".join(self.image_gradient_estimators)
        if self.image_gradient:
            stepfiles.parse_estimators(self.image_gradient_estimators)

    @property
    def timing(self) -> dict:
        """The command-line timing overrides (ms) that are given."""
        return {k: getattr(self, f) for k, f in TIMING_FIELDS.items()
                if getattr(self, f) is not None}


#: The flag of each timing field, for the message naming what is missing.
TIMING_FLAGS = {k: flag_of(f, info) for f, info in options_of(Options)
                for k, name in TIMING_FIELDS.items() if f.name == name}


def enabled(options: Options) -> bool:
    return options.image_gradient


def resolve_timing(overrides: dict | None, sidecar: str | None, dwi: str):
    """The subject's :class:`SequenceTiming` (ms): each field from the command
    line when given there, else from the DWI's JSON sidecar (seconds), else
    an :class:`InputError` naming the sidecar (or the DWI when it has none)
    and the option of each missing field. TE is optional (recorded only)."""
    meta = io.read_sidecar(sidecar) if sidecar else {}
    values, source = {}, {}
    for name, key in stepfiles.SIDECAR_TIMING_KEYS.items():
        given = (overrides or {}).get(name)
        if given is not None:
            values[name], source[name] = float(given), "command line"
        elif meta.get(key) is not None:
            try:
                values[name] = float(meta[key]) * 1000.0
            except (TypeError, ValueError):
                raise InputError(sidecar, f"{key} must be a number in seconds, "
                                          f"got {meta[key]!r}") from None
            source[name] = "sidecar"
    missing = [n for n in ("Delta", "delta") if n not in values]
    if missing:
        keys = " and ".join(stepfiles.SIDECAR_TIMING_KEYS[n] for n in missing)
        opts = " and ".join(TIMING_FLAGS[n] for n in missing)
        raise InputError(sidecar or dwi,
                         f"the image-gradient step needs the diffusion timing: no {keys} "
                         f"(seconds) in the JSON sidecar and no {opts} (ms) on the command "
                         f"line")
    try:
        return SequenceTiming(values["Delta"], values["delta"],
                              values.get("TE", float("nan"))), source
    except ValueError as exc:
        raise InputError(sidecar or dwi, f"{exc} (from {source})") from None


def run(record: dict, options: Options, out_dir) -> Product:
    """Every estimator, null and control of one subject: angle maps, axes,
    quality, the gold standard, tidy rows and histograms."""
    seq, source = resolve_timing(options.timing, record.get("sidecar"), record["series"]["dwi"])
    out = stepfiles.subject_products(stepfiles.read_series(record["series"]), seq,
                                     stepfiles.parse_estimators(options.image_gradient_estimators),
                                     out_dir, record["subject"], options.image_gradient_max_voxels)
    return Product(stepfiles.IMAGE_GRADIENT_STEP, maps=derivatives_from_text(out["maps"]),
                   tables=derivatives_from_text(out["tables"]), row=out["row"],
                   parameters={**out["parameters"], "timing_source": source})


STEP = register(Step(stepfiles.IMAGE_GRADIENT_STEP, "ImageGradient", "product", Options, run,
                     enabled=enabled, grid=True, commands=("run",),
                     example={"image_gradient": True, "image_gradient_max_voxels": 40,
                              "gradient_separation": 43.1, "gradient_duration": 10.6},
                     schema=Schema(map_entities=frozenset({"model", "desc", "param"}),
                                   table_entities=frozenset({"model", "desc"}),
                                   row=frozenset({"imagegradient_voxels"}),
                                   parameters=frozenset({"estimators", "seed",
                                                         "timing_source"}))))
