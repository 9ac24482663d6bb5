"""Applying trained models to a subject: the inference kinds, refusing OOD data.

The numerics side of the inference step (no pydra here; the Pydra step is
``pipelines/inference.py``). :func:`run_inference` loads a checkpoint, checks
the subject's acquisition against its model card and applies one kind:
:func:`synthesize_directions` a direction-synthesis checkpoint
(:mod:`dmriflow.models.directions`), :func:`synthesize_7t_like` a 3T->7T
checkpoint (:mod:`dmriflow.models.ldm`: the shipped RISH-space diffusion
model, or a latent diffusion one). A checkpoint whose architecture the kind
does not apply is refused, naming it (:func:`check_model_kind`). The networks run
slab-wise over the volume (:func:`dmriflow.models.volume.run_volume`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import dmriflow.models
from dmriflow.interfaces.dti import TensorModel
from dmriflow.interfaces.gradients import electrostatic_directions
from dmriflow.models import directions as dm
from dmriflow.interfaces.errors import InputError
from dmriflow.models.card import (CARD_FILE, check_acquisition, check_ranges, load_card,
                                  load_checkpoint)
from dmriflow.models.data import split_dwi
from dmriflow.models.train import torch_threads
from dmriflow.models.volume import CPU_THREADS

#: Inference model kinds offered by the pipeline (``dmriflow run --inference``).
DIRECTIONS = "directions"
THREE_T_TO_7T = "3t7t"


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


#: Card architectures each kind applies: name -> fn() -> architecture names
#: (a function: a kind's model modules are imported only when it is used).
ARCHITECTURES = {}


def register_kind(name: str, shipped: str | None = None, architectures=None):
    """Make an inference kind available to ``dmriflow run --inference NAME``;
    ``architectures``: fn() -> the card architectures it applies (None: any)."""
    def deco(fn):
        KINDS[name] = fn
        if shipped is not None:
            SHIPPED[name] = shipped
        if architectures is not None:
            ARCHITECTURES[name] = architectures
        return fn
    return deco


def check_model_kind(kind: str, checkpoint) -> None:
    """Refuse a checkpoint whose card's architecture ``kind`` does not apply
    (an InputError naming the checkpoint's card), before its weights load."""
    card = load_card(checkpoint)
    known = ARCHITECTURES[kind]() if kind in ARCHITECTURES else (card.architecture,)
    if card.architecture not in known:
        folder = Path(checkpoint)
        raise InputError(folder / CARD_FILE if folder.is_dir() else folder,
                         f"model {card.name!r} has architecture {card.architecture!r}, which "
                         f"--inference {kind} does not apply (it applies {', '.join(known)})")


def default_checkpoint(kind: str) -> Path:
    """The checkpoint folder shipped with the package for ``kind``."""
    if kind not in SHIPPED:
        raise ValueError(f"no checkpoint is shipped for inference kind {kind!r}: pass one")
    return Path(dmriflow.models.__file__).parent / "checkpoints" / SHIPPED[kind]


def run_inference(kind: str, checkpoint, dwi, path, census: dict | None = None,
                  device=None) -> tuple[InferenceOutput, object]:
    """Load ``checkpoint`` (default: the shipped one), check the subject's
    acquisition against its card, and apply it. Returns (output, card)."""
    if kind not in KINDS:
        raise ValueError(f"unknown inference kind {kind!r}; known: {sorted(KINDS)}")
    checkpoint = checkpoint or default_checkpoint(kind)
    check_model_kind(kind, checkpoint)
    model, card = load_checkpoint(checkpoint, device=device)
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


@register_kind(DIRECTIONS, shipped="directions", architectures=lambda: (dm.ARCHITECTURE,))
def synthesize_directions(model, card, dwi, path, census=None, device=None) -> InferenceOutput:
    """Synthesise extra b=1000 directions for one subject.

    The network is fed exactly as many inputs as it was trained with
    (``n_input`` of the card): a well-spread, deterministic subset of the
    acquired directions (:func:`dmriflow.models.data.spread_subset`; their
    volumes are recorded as ``input_volumes``). With at least twice that
    many on the shell (e.g. HCP's 90) the others are predicted and compared
    with the acquired ones (held-out mode: DWI and FA RMSE in the row, next
    to the DTI-prediction baseline). With fewer (upsampling mode), the other
    acquired directions are kept as acquired and the card's
    ``n_synthesised`` electrostatic directions are added. Output: b0s +
    acquired (+ predicted) directions as a 4D series, its gradient table and
    its FA; the estimated SNR (:func:`dmriflow.models.directions.input_snr`)
    in the row, and in the sidecar's ``range_flags`` when it is outside the
    card's training range.
    """
    shell = card.acquisition.shells[0]
    n_input = int(card.training.get("n_input", card.acquisition.min_directions[f"{shell:g}"]))
    n_shell = dwi.gtab.directions_per_shell()[shell]
    holdout = n_shell >= 2 * n_input
    sample = split_dwi(dwi, path, shell=shell, n_input=n_input if n_shell > n_input else None)
    if len(sample.input_bvecs) > n_input:
        raise ValueError(f"{path}: {len(sample.input_bvecs)} inputs, the model was trained "
                         f"with {n_input}")
    if holdout:
        targets = sample.target_bvecs
        kept, kept_bvecs = sample.targets[..., :0], sample.target_bvecs[:0]
    else:
        targets = electrostatic_directions(int(card.extra.get("n_synthesised", 60)),
                                           seed=SYNTHESIS_SEED)
        kept, kept_bvecs = sample.targets, sample.target_bvecs   # acquired, not fed
    flags = check_ranges(card, {"snr": dm.input_snr(sample)}, path)
    pred = dm.predict_network(model, sample, bvecs=targets, device=device)
    series = sample.series(np.concatenate([kept, pred], axis=-1))
    n_b0 = sample.b0.shape[-1]
    n_acquired = n_b0 + len(sample.input_bvecs) + len(kept_bvecs)
    gtab = type(dwi.gtab)(np.r_[np.zeros(n_b0), np.full(series.shape[-1] - n_b0, shell)],
                          np.r_[np.zeros((n_b0, 3)), sample.input_bvecs, kept_bvecs, targets])
    fa = np.asarray(TensorModel(gtab).fit(series, sample.mask).fa, dtype=np.float32)
    row = {"inference_mode": "held-out" if holdout else "upsampling",
           "inference_inputs": len(sample.input_bvecs), "inference_synthesised": len(targets),
           "inference_snr": round(dm.input_snr(sample), 2)}
    if holdout:
        full = np.asarray(TensorModel(gtab).fit(sample.series(sample.targets), sample.mask).fa)
        m = sample.mask

        def rmse(a, b):
            return round(float(np.sqrt(np.mean((a[m] - b[m]) ** 2))), 5)
        row.update(inference_dwi_rmse=rmse(pred, sample.targets),
                   inference_dwi_rmse_dti=rmse(dm.dti_prediction(sample), sample.targets),
                   inference_fa_rmse=rmse(fa, full))
    acquired = np.arange(len(gtab)) < n_acquired
    table = pd.DataFrame({"volume": np.arange(len(gtab)), "bval": gtab.bvals,
                          "x": gtab.bvecs[:, 0], "y": gtab.bvecs[:, 1], "z": gtab.bvecs[:, 2],
                          "acquired": acquired})
    return InferenceOutput(
        maps={"model-directions_desc-synthesized": series,
              "model-directions_param-fa": fa},
        tables={"model-directions_desc-synthesized_gradients": table},
        row=row, parameters={"mode": row["inference_mode"], "shell": shell,
                             "n_input": len(sample.input_bvecs),
                             "input_volumes": [int(v) for v in sample.input_volumes],
                             "n_synthesised": len(targets), "bvec_frame": "fsl-image",
                             "range_flags": "; ".join(flags)})


# ----------------------------------------------------------------------------
# 3T -> 7T-like DWIs (RISH-space diffusion, or the latent model, on RISH maps)
# ----------------------------------------------------------------------------
#: Entities (after the model's) of the per-voxel uncertainty map of ``3t7t``.
UNCERTAINTY = "desc-sd_param-loglambda"
UNCERTAINTY_TEXT = (
    "desc-sd_param-loglambda: per voxel and order (l = 0, 2, 4), the SD of log lambda over the "
    "model's K samples times the card's spread_scale (calibrated so that the interval_level "
    "intervals cover that share of the truth on the validation pairs); the interval of "
    "lambda_l is exp(mean_k log lambda_k +- interval_z x SD); 0 outside the mask")


def _three_t_architectures() -> tuple:
    # models.ldm imports MONAI (seconds): loaded only when this kind is used
    from dmriflow.models.ldm.cohort import PREDICTORS
    return tuple(PREDICTORS)


@register_kind(THREE_T_TO_7T, shipped="rish_3t7t", architectures=_three_t_architectures)
def synthesize_7t_like(model, card, dwi, path=None, census=None, device=None,
                       seed: int = 0) -> InferenceOutput:
    """7T-like b0 + b=1000 series of a 3T subject
    (:func:`dmriflow.models.ldm.cohort.generate_7t_like`; the shipped model is
    the RISH-space diffusion one, a latent-model checkpoint runs the same way):
    the series, its FA and the lambda maps, the calibrated SD of log lambda
    when the model gives one, the series' gradient table, the median lambda
    (and SD) per order in the mask and the shipped CNN ensemble's disagreement
    for the cohort table; values outside the card's ranges (SNR, the
    disagreement) are listed in the sidecar's ``range_flags``."""
    from dmriflow.models.ldm.cohort import generate_7t_like
    from dmriflow.models.ldm.features import ORDERS
    if next(model.buffers()).device.type == "cpu":
        with torch_threads(CPU_THREADS):
            data, gtab, extra = generate_7t_like(model, card, dwi, seed=seed)
    else:
        data, gtab, extra = generate_7t_like(model, card, dwi, seed=seed)
    info, entity, mask = extra["info"], extra["entity"], extra["mask"]
    lam = extra["lambda"][mask]
    row = {f"inference_lambda_l{o}_median": round(float(np.median(lam[:, k])), 5)
           for k, o in enumerate(ORDERS)}
    maps = {f"{entity}_desc-7tlike": data, f"{entity}_param-fa": extra["fa"],
            f"{entity}_param-lambda": extra["lambda"]}
    if extra["loglambda_sd"] is not None:
        maps[f"{entity}_{UNCERTAINTY}"] = extra["loglambda_sd"]
        sd = extra["loglambda_sd"][mask]
        row.update({f"inference_loglambda_sd_l{o}_median": round(float(np.median(sd[:, k])), 5)
                    for k, o in enumerate(ORDERS)})
    row["inference_seconds"] = round(info["seconds_total"], 2)
    row["inference_ensemble_disagreement"] = info["ensemble_disagreement"]
    table = pd.DataFrame({"volume": np.arange(len(gtab)), "bval": gtab.bvals,
                          "x": gtab.bvecs[:, 0], "y": gtab.bvecs[:, 1], "z": gtab.bvecs[:, 2]})
    model_keys = ("guidance", "ddim_steps", "samples", "sample_steps", "spread_scale",
                  "interval_level", "interval_z")
    params = {k: info[k] for k in ("architecture", "shell", "lmax", "grid", "seed",
                                   "keep_residual", "negative_clipped_fraction",
                                   "scale_clipped_fraction", "artefact_content_id",
                                   "range_flags", "ensemble_disagreement") + model_keys
              if k in info}
    if extra["loglambda_sd"] is not None:
        params["uncertainty"] = UNCERTAINTY_TEXT
    params["bvec_frame"] = "fsl-image"
    return InferenceOutput(maps=maps, tables={f"{entity}_desc-7tlike_gradients": table},
                           row=row, parameters=params)

