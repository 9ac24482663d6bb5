"""The 3T->7T model on real folders: paired cohorts, training to a checkpoint, inference.

* :func:`write_paired_cohort` writes simulated pairs (:mod:`dmriflow.models.degrade`)
  as a BIDS dataset with two sessions per subject, ``ses-3T`` and ``ses-7T``
  (``MagneticFieldStrength`` in the sidecars, brain masks under
  ``derivatives/phantom``);
* :func:`train_on_sessions` (``dmriflow train 3t7t INPUT CHECKPOINT``) pairs
  the sessions of a BIDS dataset by field strength, featurises them on the
  model cube, trains :class:`~dmriflow.models.ldm.model.LatentDiffusion3T7T`
  and writes a checkpoint (safetensors + model card);
* :func:`generate_7t_like` (inference kind ``3t7t``, served through
  :func:`dmriflow.interfaces.inference.synthesize_7t_like`) applies a checkpoint to
  one 3T subject: lambda maps on the cube (the shipped RISH-space diffusion
  model's posterior mean, :mod:`.rishdiff`, or the latent model's predicted
  7T RISH -> :func:`harmonize.scale_maps`; :data:`PREDICTORS`) ->
  :func:`dmriflow.interfaces.harmonize.apply_harmonization` with those maps
  as a one-subject artefact (world-coordinate identity transform from the
  cube to the subject grid), i.e. the SH coefficients of orders 0/2/4 of the
  b=1000 shell are scaled per order and the DWIs rebuilt.

No pydra here.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmriflow.interfaces import harmonize, io
from dmriflow.interfaces.dti import TensorModel
from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.gradients import format_bvals, format_bvecs
from dmriflow.models import card as cards
from dmriflow.models import degrade
from dmriflow.models.ldm import diffusion, features, rishdiff
from dmriflow.models.ldm.model import Budget, LatentDiffusion3T7T, fit

#: Model name and version written into the card by :func:`train_on_cohort`.
MODEL_NAME = "ldm-3t7t"
MODEL_VERSION = "0.1"
#: Default grid of a cohort-trained model (the published one is 96).
DEFAULT_GRID = 32
#: Default passes of each training stage over its maps (``--epochs``).
DEFAULT_EPOCHS = 40.0
#: A session whose sidecar lacks MagneticFieldStrength: field from its name ("ses-7T").
_SESSION_FIELD = re.compile(r"(\d+(?:p\d+)?)T$", re.IGNORECASE)


# ----------------------------------------------------------------------------
# Paired cohorts on disk
# ----------------------------------------------------------------------------
def write_paired_cohort(out_dir, n_subjects: int, sim_size: int = 24, family: str = "train",
                        seed: int = 0, sessions_3t_only: int = 0) -> list[str]:
    """Simulated pairs as BIDS (``sub-XX/ses-{3T,7T}/dwi``); the last
    ``sessions_3t_only`` subjects get no 7T session. Returns the labels."""
    out = Path(out_dir)
    labels = []
    for i in range(int(n_subjects)):
        label = f"{i + 1:02d}"
        p = degrade.simulate_pair(seed * 1000 + i, sim_size=sim_size, family=family)
        sessions = [("3T", p.dwi3, p.gtab3, degrade.FIELD_3T, degrade.TE_3T_MS, p.sigma3)]
        if i < n_subjects - sessions_3t_only:
            sessions.append(("7T", p.dwi7, p.gtab7, degrade.FIELD_7T, degrade.TE_7T_MS, p.sigma7))
        for ses, data, gtab, field_t, te, sigma in sessions:
            base = out / f"sub-{label}" / f"ses-{ses}" / "dwi" / f"sub-{label}_ses-{ses}"
            io.save_nifti(data, p.affine, f"{base}_dwi.nii.gz")
            io.write_text(format_bvals(gtab.bvals), f"{base}_dwi.bval")
            io.write_text(format_bvecs(gtab.bvecs), f"{base}_dwi.bvec")
            io.write_json({"MagneticFieldStrength": field_t, "EchoTime": te / 1000.0,
                           "PhantomSimulation": {"NoiseSigma": sigma, "Pair": True,
                                                 "Degradation": p.degradation.describe()
                                                 if ses == "3T" else None}},
                          f"{base}_dwi.json")
            mask = (out / "derivatives" / "phantom" / f"sub-{label}" / f"ses-{ses}" / "dwi"
                    / f"sub-{label}_ses-{ses}_desc-brain_mask.nii.gz")
            io.save_nifti(p.mask.astype(np.uint8), p.affine, mask)
        labels.append(label)
    io.write_json({"Name": "dmriflow simulated 3T/7T pairs", "BIDSVersion": "1.9.0",
                   "DatasetType": "raw"}, out / "dataset_description.json")
    return labels


def session_field(sidecar: dict, session: str | None) -> float | None:
    """Field strength (T) of a session: ``MagneticFieldStrength`` of its sidecar,
    else a session name ending in it (``ses-7T``, ``ses-1p5T``), else None."""
    value = (sidecar or {}).get("MagneticFieldStrength")
    if value is not None:
        return float(value)
    m = _SESSION_FIELD.search(session or "")
    return float(m.group(1).replace("p", ".")) if m else None


def pair_by_field(sessions) -> tuple[list, list]:
    """``sessions``: (label, field_t, item, path). Returns (3T-only items,
    [(3T item, 7T item)]) paired by label; other fields are an InputError."""
    by_label: dict[str, dict] = {}
    for label, field_t, item, path in sessions:
        if field_t is None:
            raise InputError(path, "no MagneticFieldStrength in the sidecar and no field in "
                                   "the session name (ses-3T/ses-7T)")
        kind = ("3" if abs(field_t - degrade.FIELD_3T) < 1 else
                "7" if abs(field_t - degrade.FIELD_7T) < 1 else None)
        if kind is None:
            raise InputError(path, f"field strength {field_t:g} T is neither 3 T nor 7 T")
        if kind in by_label.setdefault(label, {}):
            raise InputError(path, f"subject {label} has two {kind}T sessions")
        by_label[label][kind] = item
    only3 = [d["3"] for d in by_label.values() if "3" in d and "7" not in d]
    pairs = [(d["3"], d["7"]) for d in by_label.values() if "3" in d and "7" in d]
    return only3, pairs


def _features(dwi, grid: int) -> features.ShellFeatures:
    try:
        return features.shell_features(dwi.data, dwi.gtab, dwi.mask, dwi.affine, grid)
    except ValueError as exc:
        raise InputError(dwi.paths.get("dwi"), str(exc)) from None


def _steps(epochs: float, n: int, batch: int) -> int:
    return max(1, math.ceil(epochs * n / batch))


def train_on_sessions(sessions, checkpoint, load, epochs: float = DEFAULT_EPOCHS,
                      grid: int = DEFAULT_GRID, seed: int = 0, source: str = "",
                      log=print) -> cards.ModelCard:
    """Train on 3T and 7T sessions and write ``checkpoint`` (``dmriflow train 3t7t``).

    ``sessions``: (label, field_t, item, path) per subject-session;
    ``load(item)`` returns its validated DWI (loaded one at a time). Sessions
    are paired by label (:func:`pair_by_field`); each stage runs ``epochs``
    passes over its maps (3T autoencoder: every 3T session; the rest: the
    pairs). Needs at least two pairs.
    """
    only3, pairs = pair_by_field(sessions)
    if len(pairs) < 2:
        raise InputError(source or None, f"{len(pairs)} subject(s) with both a 3T and a 7T "
                                         f"session; training needs at least 2")
    t0 = time.perf_counter()
    f_only3 = [_features(load(s), grid) for s in only3]
    f_pairs, snrs = [], []
    for a, b in pairs:
        dwi3 = load(a)
        f_pairs.append((_features(dwi3, grid), _features(load(b), grid)))
        snrs.append(input_snr(dwi3))
    b = Budget(seed=seed)
    n3 = len(f_only3) + len(f_pairs)
    b.vq3_steps = _steps(epochs, n3, b.vq_batch)
    b.vq7_steps = _steps(epochs, len(f_pairs), b.vq_batch)
    b.diffusion_steps = _steps(epochs, len(f_pairs), b.diffusion_batch)
    b.sr_steps = _steps(epochs, len(f_pairs), b.sr_batch)
    model = LatentDiffusion3T7T(grid=grid)
    report = fit(model, [(f.rish, f.mask) for f in f_only3],
                 [(f3.rish, f7.rish, f3.mask | f7.mask) for f3, f7 in f_pairs], b,
                 log=lambda s: log(s) if s.endswith(" s") else None)
    n_dirs = min(int(np.sum(~f3.gtab.b0s_mask)) for f3, _ in f_pairs)
    card = cards.ModelCard(
        name=MODEL_NAME, version=MODEL_VERSION, architecture="ldm-3t7t",
        kwargs={"grid": int(grid)},
        acquisition=cards.Acquisition(
            shells=[features.SHELL_B], min_directions={f"{features.SHELL_B:g}": min(n_dirs, 30)},
            field_strength_t=degrade.FIELD_3T,
            ranges=rishdiff.training_ranges(
                [rishdiff.cube_voxel_mm(f3.affine) for f3, _ in f_pairs], snrs)),
        normalisation={"input": "RISH orders 0/2/4 of the b0-normalised b=1000 shell on a "
                                f"{grid}^3 cube; sqrt(R_l) / amp_scale_l",
                       "amp_scale": model.amp_scale.tolist(),
                       "latent_scale": float(model.latent_scale)},
        training={"data": str(source),
                  "subjects": sorted({label for label, *_ in sessions}),
                  "n_pairs": len(f_pairs), "n_3t_only": len(f_only3), "epochs": epochs,
                  "budget": b.__dict__, "seconds": time.perf_counter() - t0,
                  "stages": {k: v.get("seconds") for k, v in report.items()
                             if isinstance(v, dict) and k != "budget"}},
        extra={"guidance": diffusion.GUIDANCE, "ddim_steps": diffusion.DDIM_STEPS,
               "label": "7T", "field_strength_target_t": degrade.FIELD_7T})
    cards.save_checkpoint(model, card, checkpoint)
    return card


# ----------------------------------------------------------------------------
# Inference on one subject
# ----------------------------------------------------------------------------
def input_snr(dwi) -> float | None:
    """Estimated SNR of a series (:func:`rishdiff.snr_of`); None with < 2 b0s."""
    if int(dwi.gtab.b0s_mask.sum()) < 2 or not np.asarray(dwi.mask).any():
        return None
    return rishdiff.snr_of(dwi.data, dwi.gtab, dwi.mask)


def check_input_range(card: cards.ModelCard, dwi, grid: int) -> list[str]:
    """Refuse a subject outside the card's training ranges (the cube voxel size
    its field of view gives on the model grid); return the flags (e.g. SNR)."""
    cube_affine, _ = features.cube_grid(dwi.affine, dwi.data.shape, grid)
    return cards.check_ranges(card, {"cube_voxel_mm": rishdiff.cube_voxel_mm(cube_affine),
                                     "snr": input_snr(dwi)}, dwi.paths.get("dwi"))


#: The checkpoint whose card holds the 3T->7T kind's ensemble-disagreement
#: range (the shipped RISH-space model's, measured on its calibration pairs);
#: the ensemble members it names are found relative to its parent folder.
GUARD_CHECKPOINT = Path(cards.__file__).resolve().parent / "checkpoints" / "rish_3t7t"


def ensemble_guard(dwi, f3: features.ShellFeatures | None = None,
                   guard=GUARD_CHECKPOINT) -> tuple[float | None, list[str]]:
    """The CNN ensemble's disagreement on one 3T series (b0s + the b=1000
    shell) and the flag when it is outside the range in ``guard``'s card
    (:func:`rishdiff.ensemble_disagreement`). (None, []) when the card has no
    such range or the series has no noise estimate (< 2 b0s). ``f3``: the
    series' shell features when the caller has them; used when on the
    members' grid (else computed on it)."""
    guard = Path(guard)
    entry = cards.load_card(guard).acquisition.ranges.get(rishdiff.DISAGREEMENT)
    if entry is None or input_snr(dwi) is None:
        return None, []
    members = rishdiff.guard_members(entry, guard.parent)
    if f3 is None or f3.mask.shape != (members[0].grid,) * 3:
        f3 = features.shell_features(dwi.data, dwi.gtab, dwi.mask, dwi.affine, members[0].grid)
    value = rishdiff.ensemble_disagreement(members, f3, rishdiff.noise_sigma(
        dwi.data, dwi.gtab, dwi.mask), entry)
    acq = cards.Acquisition(shells=[], ranges={rishdiff.DISAGREEMENT: entry})
    return value, cards.range_problems(acq, {rishdiff.DISAGREEMENT: value})["flag"]


@dataclass
class CubePrediction:
    """One model's per-order lambda maps on the cube (G, G, G, 3) for one 3T
    subject, the RISH floor ``tau`` they were computed with, the RISH they
    deliver, the calibrated SD of ``log lambda`` (None: the model gives none)
    and the model's own sidecar entries."""

    lam: np.ndarray
    tau: np.ndarray
    rish: np.ndarray
    scale_range: tuple
    info: dict
    spread: np.ndarray | None = None


def latent_prediction(model: LatentDiffusion3T7T, card: cards.ModelCard, sub,
                      f3: features.ShellFeatures, seed: int) -> CubePrediction:
    """The latent model: predicted 7T RISH (guided DDIM) -> lambda maps
    (:func:`harmonize.scale_maps`, RISH harmonisation's clip range)."""
    guidance = float(card.extra.get("guidance", diffusion.GUIDANCE))
    steps = int(card.extra.get("ddim_steps", diffusion.DDIM_STEPS))
    pred = model.predict(f3.rish, f3.mask, guidance, steps, seed=seed)
    lam, taus, stats = harmonize.scale_maps(pred, f3.rish, f3.mask, f3.affine)
    return CubePrediction(lam, taus, pred, harmonize.SCALE_RANGE,
                          {"guidance": guidance, "ddim_steps": steps,
                           "scale_clipped_fraction": stats["clipped_fraction"]})


#: Nominal level of the interval whose half-width (in SDs) the sidecar records.
INTERVAL_LEVEL = rishdiff.CALIBRATION_LEVEL


def rish_prediction(model: rishdiff.RishDiffusion3T7T, card: cards.ModelCard, sub,
                    f3: features.ShellFeatures, seed: int) -> CubePrediction:
    """The RISH-space diffusion model as ``dmriflow evaluate 3t7t`` scores it
    (method ``shipped``): K samples (:func:`rishdiff.sampling`), posterior-mean
    lambda, per-voxel SD of ``log lambda`` times the card's spread scale."""
    k, steps = rishdiff.sampling(card)
    sigma = rishdiff.noise_sigma(sub.data, sub.gtab, sub.mask)
    fit = model.fit_subject(f3, sigma, samples=k, steps=steps, seed=seed)
    lo, hi = (np.log(v) for v in rishdiff.SCALE_RANGE)
    y = fit.samples[:, f3.mask]
    clipped = float(np.mean((y <= lo + 1e-6) | (y >= hi - 1e-6))) if y.size else 0.0
    return CubePrediction(
        fit.lam, rishdiff.taus(f3.rish, f3.mask), fit.rish(), rishdiff.SCALE_RANGE,
        {"samples": k, "sample_steps": steps,
         "spread_scale": [round(float(c), 6) for c in fit.scale],
         "interval_level": INTERVAL_LEVEL,
         "interval_z": round(rishdiff.interval_z(INTERVAL_LEVEL, k), 6),
         "scale_clipped_fraction": clipped}, spread=fit.spread)


#: The models the ``3t7t`` inference kind applies: card architecture -> (the
#: BIDS ``model`` entity of their outputs, the cube predictor).
PREDICTORS = {LatentDiffusion3T7T.architecture: ("model-ldm3t7t", latent_prediction),
              rishdiff.RishDiffusion3T7T.architecture: ("model-rish3t7t", rish_prediction)}


def generate_7t_like(model, card: cards.ModelCard, dwi, seed: int = 0):
    """7T-like b0 + b=1000 series of one 3T subject: (data, gtab, extra) with
    FA, the lambda maps (and the SD of log lambda, when the model gives one)
    on the subject grid, the cube's delivered RISH and the sidecar entries.
    The model (either of :data:`PREDICTORS`, by the card's architecture)
    gives lambda maps on its cube; they rescale the subject's own SH
    coefficients through :func:`harmonize.apply_harmonization`. A subject
    outside the card's training ranges is refused (InputError)."""
    if card.architecture not in PREDICTORS:
        raise ValueError(f"model {card.name!r}: architecture {card.architecture!r} is not a "
                         f"3T->7T model; known: {sorted(PREDICTORS)}")
    entity, predict = PREDICTORS[card.architecture]
    idx, shell = features.shell_volumes(dwi.gtab)
    sub = dwi.select_volumes(idx)
    flags = check_input_range(card, sub, model.grid)
    t0 = time.perf_counter()
    f3 = features.shell_features(sub.data, sub.gtab, sub.mask, sub.affine, model.grid)
    t_guard = time.perf_counter()
    disagreement, guard_flags = ensemble_guard(sub, f3)
    # the timings below are the model's: without the guard's ensemble passes
    t0 += time.perf_counter() - t_guard
    flags += cards.range_problems(card.acquisition, {rishdiff.SHARPNESS: f3.sharpness})["flag"]
    pred = predict(model, card, sub, f3, seed)
    t_pred = time.perf_counter()
    artefact = harmonize.HarmonizationArtefact(
        template_fa=f3.fa, template_affine=f3.affine, template_mask=f3.mask,
        scale_maps={shell: pred.lam}, shells=[shell], lmax=features.LMAX,
        tau=harmonize.TAU_FRACTION, tau_values={shell: pred.tau}, smoothing_fwhm_mm=0.0,
        scale_range=pred.scale_range, registration="affine",
        reference_site="7T (predicted)", target_site="3T", subjects=[],
        pipeline_version=io.pipeline_version(),
        parameters={"model": card.name, "model_version": card.version})
    # the cube and the subject grid share world coordinates: an identity affine map
    to_subject = harmonize.Transform("affine", np.eye(4), f3.fa.shape, f3.affine,
                                     sub.mask.shape, sub.affine)
    data, info = harmonize.apply_harmonization(sub, None, artefact, transform=to_subject,
                                               subject=str(dwi.paths.get("dwi", "subject")))
    fa = np.nan_to_num(TensorModel(sub.gtab).fit(data, sub.mask).fa).astype(np.float32)
    lam_native = harmonize.warp_scale_maps(artefact, to_subject)[shell]
    spread = None if pred.spread is None else np.stack(
        [np.maximum(to_subject.to_subject(pred.spread[..., k]), 0.0)
         for k in range(pred.spread.shape[-1])], axis=-1).astype(np.float32)
    info.update(pred.info)
    info.update(seconds_prediction=t_pred - t0, seconds_total=time.perf_counter() - t0,
                grid=model.grid, seed=seed, shell=shell, architecture=card.architecture,
                range_flags="; ".join(flags + guard_flags),
                ensemble_disagreement=None if disagreement is None else round(disagreement, 5))
    return data, sub.gtab, {"fa": fa, "lambda": lam_native, "loglambda_sd": spread,
                            "rish_cube": pred.rish, "mask": sub.mask, "entity": entity,
                            "info": info}
