"""File-level helpers of the per-subject steps (no engine).

The step modules (``interfaces/steps/``), and through them the generated
Pydra tasks and Nipype interfaces, call these functions, so both engines run
the same code and write the same files. A
*series* is the dict ``{"dwi", "bval", "bvec", "mask"}`` of paths a step
works on; every function writes into ``out_dir`` and returns plain JSON types
(paths as strings).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from . import codec, io, parallel, qc
from . import image_gradient as ig
from .dti import DEFAULT_WLS_ITERATIONS, DTI_MAX_BVAL, dti_shells, fit_dwi
from .gradients import read_bvecs
from .harmonize import HarmonizationArtefact, applied_artefacts, apply_harmonization
from .orientation import apply_to_bvecs, candidate_by_label, check_dwi
from .preprocess import (MASK_FOV_FRACTION_RANGE, MASK_MIN_LARGEST_COMPONENT, brain_mask,
                         mask_qc)
from .sh import fit_shells
from .errors import InputError

#: The files of a DWI series, as a step hands them on.
SERIES_KEYS = ("dwi", "bval", "bvec", "mask")
#: Tensor maps written per subject.
TENSOR_PARAMS = ("fa", "md", "ad", "rd", "s0", "v1")
#: MAD -> standard deviation for Gaussian noise.
MAD_TO_SD = 1.4826
#: b0 volumes needed to estimate the noise from their differences.
MIN_B0_FOR_NOISE = 2
#: A subject whose tensor fit fails in more than this fraction of its brain
#: mask is flagged (a healthy fit fails in a handful of noisy edge voxels; a
#: 7T phantom whose signal model broke failed in half the mask).
MAX_FAILED_FRACTION = 0.01
#: A subject whose mean b0 SNR is below this is flagged: below about 5 the
#: Rician noise floor biases FA and MD (Jones and Basser 2004).
MIN_B0_SNR = 5.0
#: Series in the HCP minimal-preprocessing layout (``T1w/Diffusion``) were
#: eddy-corrected and resampled: denoising and Gibbs removal assume raw data.
INTERPOLATED_LAYOUT = ("T1w", "Diffusion")
INTERPOLATED_WARNING = ("denoise/degibbs on interpolated data (HCP minimally preprocessed, "
                        "T1w/Diffusion): both assume raw, unresampled images")
#: File name of a b-vector table with the gradient check's winner applied.
FIXED_BVEC = "dwi_gradfix.bvec"


# ----------------------------------------------------------------------------
# Numerics: a b0 noise / SNR estimate
# ----------------------------------------------------------------------------
def b0_noise(data: np.ndarray, gtab, mask: np.ndarray, volumes=None, rows_index=None) -> dict:
    """Noise sigma and b0 SNR of a series, from differences of its b0 volumes.

    ``noise_sigma`` = 1.4826 * MAD(b0[k+1] - b0[k]) / sqrt(2), pooled over
    consecutive b0 pairs and the mask voxels (the difference of two noisy
    copies of the same signal has variance 2 sigma^2; the MAD keeps edges and
    the odd motion outlier from inflating it). ``b0_snr`` = mean b0 in the
    mask / ``noise_sigma``. Motion between b0s, or preprocessing that
    correlates them, biases sigma up (SNR down). Both are NaN with fewer than
    two b0 volumes. ``volumes``: use only these (the kept ones; no copy).
    ``data`` is the 4D grid, or with ``rows_index`` a series held as mask rows
    (the C-order voxel of each row, as :func:`qc.volume_outliers` takes): both
    give the same bits.
    """
    idx = np.flatnonzero(gtab.b0s_mask)
    if volumes is not None:
        idx = np.intersect1d(idx, volumes)
    if idx.size < MIN_B0_FOR_NOISE or not mask.any():
        return {"noise_sigma": float("nan"), "b0_snr": float("nan"), "n_b0_pairs": 0}
    # each b0's mask voxels read once (a series held as mask rows: its b0
    # columns, no copy); the medians do not depend on the order of the
    # differences, so they are taken in row order into one buffer, in place;
    # the mean b0 is io.mean_b0_map's (float64, volume order) on the mask
    # voxels, its float32 values put in the grid's voxel order only for the
    # final mean (whose pairwise sum depends on the order): the same bits as on the grid
    if rows_index is None:
        b0 = [data[..., k][mask] for k in idx]
    else:
        b0 = [np.asarray(data[:, k]) for k in idx]
    n = b0[0].size
    diffs = np.empty((idx.size - 1) * n, dtype=b0[0].dtype)
    for j, (a, b) in enumerate(zip(b0[:-1], b0[1:])):
        np.subtract(b, a, out=diffs[j * n:(j + 1) * n])
    centre = np.median(diffs, overwrite_input=True)      # diffs is ours: partition in place
    dev = np.abs(np.subtract(diffs, centre, out=diffs), out=diffs)
    sigma = MAD_TO_SD * float(np.median(dev, overwrite_input=True)) / float(np.sqrt(2.0))
    acc = np.zeros(n, dtype=np.float64)
    for values in b0:
        acc += values
    mean_map = (acc / idx.size).astype(np.float32)
    if rows_index is not None:
        mean_map = mean_map[np.argsort(rows_index)]
    mean_b0 = float(mean_map.mean())
    return {"noise_sigma": sigma, "b0_snr": mean_b0 / sigma if sigma > 0 else float("inf"),
            "n_b0_pairs": int(idx.size - 1)}


# ----------------------------------------------------------------------------
# Series in and out
# ----------------------------------------------------------------------------
def _opt(path) -> str | None:
    return None if path is None else os.fspath(path)


def load_subject(dwi, bval, bvec, mask=None, data_path=None) -> io.DWI:
    """Validated DWI; a median-Otsu mask from the mean b0 when none is given.

    ``data_path``: the voxels' uncompressed copy (:func:`io.decode_dwi`)."""
    data = io.load_dwi(dwi, bval, bvec, mask, data_path=data_path)
    if mask is None:
        mean_b0 = io.mean_b0_map(data.data, data.gtab)
        data.mask = brain_mask(mean_b0) & (mean_b0 > 0)
        if not data.mask.any():
            raise InputError(dwi, "automatic brain mask is empty")
    return data


def read_series(series: dict) -> io.DWI:
    """Load the DWI of a series dict (all four files are required). Validate's
    copy of a compressed input is memory-mapped instead: its mask rows (key
    ``"rows"``) or its uncompressed image (key ``"copy"``); ``"dwi"`` stays
    the input, which every message names.

    Volumes listed under ``series["exclude"]`` (outliers found by Validate)
    are left out, so every later step fits the same kept volumes.
    """
    if series.get("rows"):
        data = io.open_dwi_rows(series["dwi"], series["bval"], series["bvec"], series["mask"],
                                series["rows"])
    else:
        data = io.load_dwi(series["dwi"], series["bval"], series["bvec"], series["mask"],
                           data_path=series.get("copy"))
    exclude = series.get("exclude") or []
    if exclude:
        data = data.select_volumes(np.setdiff1d(np.arange(len(data.gtab)), exclude))
    return data


def write_series(data: io.DWI, out_dir, mask: str) -> dict:
    """Write a DWI's data and gradients (FSL text files) as a new series in ``out_dir``."""
    out_dir = Path(out_dir)
    bval = " ".join(f"{b:g}" for b in data.gtab.bvals) + "\n"
    bvec = "\n".join(" ".join(f"{v:.8f}" for v in row) for row in data.gtab.bvecs.T) + "\n"
    return {"dwi": str(io.save_nifti(data.data, data.affine, out_dir / "dwi.nii.gz",
                                     data.header).resolve()),
            "bval": str(io.write_text(bval, out_dir / "dwi.bval").resolve()),
            "bvec": str(io.write_text(bvec, out_dir / "dwi.bvec").resolve()),
            "mask": mask}


def with_series(record: dict, series: dict, step: str, extra: dict | None = None) -> dict:
    """The record with a new current series, written by ``step`` (added to its history)."""
    history = list(record.get("history", [])) + [{"step": step, **(extra or {})}]
    return {**record, "series": series, "history": history}


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------
def validate_subject(subject: str, dwi, bval, bvec, mask=None, sidecar=None,
                     out_dir=".", exclude_outliers: bool = True,
                     fix_gradients: bool = False, rows_only: bool = False) -> dict:
    """Read every input once, check it; the subject's record.

    The DWI is read in one pass (sha256, gzip CRC32 and length checked) and
    handed on as the series later steps memory-map instead of inflating the
    input again: with ``rows_only`` (the fits are its only readers), a given
    mask and values float32 holds exactly (float32 or unscaled 8/16-bit
    integers, :func:`io.rows_readable`), only the mask rows as float32
    (``out_dir/dwi_rows.npy``, see
    :func:`io.load_dwi_rows`; series key ``"rows"``); else the whole image
    uncompressed (``out_dir/dwi.nii``, :func:`io.decode_dwi`; key ``"copy"``;
    none for an uncompressed input).

    The record holds the census row, the inputs' sha256, QC figures (mask
    volume, b0 noise and SNR, see :func:`b0_noise`), the input QC (see
    :func:`input_qc`: degenerate acquisitions fail here, outlier volumes are
    excluded unless ``exclude_outliers`` is off, the gradient-orientation
    check, applied when ``fix_gradients``), its flags, and the series later
    steps work on; a mask computed here is written to ``out_dir/mask.nii.gz``.
    """
    mask, sidecar = _opt(mask), _opt(sidecar)
    img = io.load_image(dwi, "DWI")  # a bad header fails before the whole file is read
    if rows_only and mask is not None and io.rows_readable(img) and \
            codec.is_gzip(os.fspath(dwi)):
        data, read = io.load_dwi_rows(dwi, bval, bvec, mask, out_dir)
        copy, sha, codec_name = str(Path(out_dir, io.ROWS_NAME).resolve()), read.sha256, read.codec

        def noise(kept):
            return b0_noise(data.rows, data.gtab, data.mask, kept,
                            rows_index=data.masked_index())
        series_extra = {"rows": copy}
    else:
        decoded = io.decode_dwi(dwi, out_dir)
        try:
            data = load_subject(dwi, bval, bvec, mask,
                                data_path=decoded.path if decoded.copied else None)
        except Exception:
            if decoded.copied:   # a refused input leaves no 4 GB copy behind
                Path(decoded.path).unlink(missing_ok=True)
            raise
        copy = str(Path(decoded.path).resolve()) if decoded.copied else ""
        sha, codec_name = decoded.sha256, decoded.codec

        def noise(kept):
            return b0_noise(data.data, data.gtab, data.mask, kept)
        series_extra = {"copy": copy} if copy else {}
    warnings: list[str] = []
    census = io.census_row(os.fspath(dwi), os.fspath(bval), os.fspath(bvec), sidecar,
                           gtab=data.gtab, shape=data.shape, zooms=data.header.get_zooms(),
                           warnings=warnings)
    known = {"dwi": sha}
    hashes = {k: {"path": p, "sha256": known.get(k) or io.file_sha256(p)}
              for k, p in {**data.paths, "sidecar": sidecar}.items() if p}
    mask_path = mask or str(io.save_nifti(data.mask.astype(np.uint8), data.affine,
                                          Path(out_dir) / "mask.nii.gz").resolve())
    n_vox = int(data.mask.sum())
    series = {"dwi": os.fspath(dwi), "bval": os.fspath(bval), "bvec": os.fspath(bvec),
              "mask": mask_path, **series_extra}
    try:   # the b0 noise and mask figures in a second thread beside the orientation check
        checks = input_qc(data, subject, out_dir, exclude_outliers, fix_gradients,
                          beside=lambda kept: (noise(kept),
                                               mask_figures(data.mask, data.zooms)))
    except Exception:
        if copy:   # a refused input leaves no copy behind
            Path(copy).unlink(missing_ok=True)
        raise
    b0_figures, (mask_row, mask_flags) = checks["beside"]
    qc = {"mask_volume_ml": n_vox * float(np.prod(data.zooms)) / 1000.0, **mask_row,
          **b0_figures, **checks["row"]}
    flags = checks["flags"] + mask_flags + _snr_flags(qc)
    if checks["exclude"]:
        series["exclude"] = checks["exclude"]
    if checks["bvec"]:
        series["bvec"] = checks["bvec"]
    return {"subject": subject, "status": "ok", "census": census, "inputs": hashes,
            "series": series, "sidecar": sidecar, "history": [], "qc": qc,
            "qc_flags": flags, "warnings": warnings, "input_qc": checks["details"],
            "provenance": checks["provenance"], "interpolated": is_interpolated(dwi),
            "mask_source": "given" if mask is not None else "median_otsu",
            "mask_voxels": n_vox,
            "read": {"codec": codec_name, "copy": copy,
                     "decoded_bytes": os.path.getsize(copy) if copy else 0}}


def is_interpolated(dwi) -> bool:
    """Whether a series lies in the HCP minimal-preprocessing layout (resampled data)."""
    return tuple(Path(os.fspath(dwi)).parent.parts[-2:]) == INTERPOLATED_LAYOUT


def processing_chain(record: dict) -> list[dict]:
    """Every step the subject's series went through, in order, for the sidecars:
    volume exclusions and gradient fixes (Validate), then preprocessing and
    harmonization (with the reports and artefact ids they recorded)."""
    chain = [dict(p) for p in record.get("provenance", [])]
    for h in record.get("history", []):
        entry = {"step": h["step"]}
        if h["step"] == "preprocess":
            entry.update({k: h[k] for k in ("denoise", "degibbs", "warning") if k in h})
        if h["step"] == "motion":
            entry.update({k: h[k] for k in ("model", "iterations", "excluded_volumes",
                                            "motion_fd_mean", "motion_fd_max") if k in h})
        if h["step"] == "harmonize":
            entry.update({k: h[k] for k in ("content_id",) if k in h})
        chain.append(entry)
    return chain


def input_qc(data: io.DWI, subject: str, out_dir, exclude_outliers: bool = True,
             fix_gradients: bool = False, beside=None) -> dict:
    """Degenerate acquisitions (InputError), outlier volumes and gradient orientation.

    Returns ``kept`` (volume indices the fits use), ``exclude``, ``bvec`` (a
    fixed b-vector file, or ""), ``row`` (table fields), ``flags``,
    ``details`` (for the sidecars) and ``provenance`` (steps applied).
    ``beside``: ``beside(kept)`` runs in a second thread while the orientation
    check runs (:func:`parallel.beside`); its result under ``"beside"``.
    """
    bvec_path = data.paths["bvec"]
    try:
        qc.check_gradients(data.gtab)
    except qc.DegenerateAcquisition as exc:
        raise InputError(bvec_path, f"degenerate acquisition: {exc}") from None
    try:
        qc.check_identical_volumes(gtab=data.gtab, **_qc_voxels(data))
    except qc.DegenerateAcquisition as exc:
        raise InputError(data.paths["dwi"], f"degenerate acquisition: {exc}") from None
    outliers = qc.volume_outliers(gtab=data.gtab, **_qc_voxels(data))
    exclude = sorted(outliers) if exclude_outliers else []
    kept = np.setdiff1d(np.arange(len(data.gtab)), exclude)
    try:
        qc.check_gradients(data.gtab, kept)
    except qc.DegenerateAcquisition as exc:
        raise InputError(data.paths["dwi"], f"degenerate acquisition after excluding the "
                                            f"outlier volume(s) {_volume_text(outliers)}: "
                                            f"{exc}") from None
    flags, provenance = [], []
    fraction = len(outliers) / len(data.gtab)
    if outliers:
        flags.append(f"{len(outliers)} outlier volume(s)"
                     + (" excluded" if exclude_outliers else " (kept)"))
        if fraction > qc.MAX_EXCLUDED_FRACTION:
            flags.append(f"outlier volumes {fraction:.0%} > {qc.MAX_EXCLUDED_FRACTION:.0%}")
    if exclude:
        provenance.append({"step": "volume_exclusion", "volumes": exclude,
                           "reasons": {str(k): outliers[k] for k in exclude}})
    def orientation():
        return check_dwi(data, rng_seed=subject_seed(subject), volumes=kept)

    orient, side = (orientation(), None) if beside is None else \
        parallel.beside(orientation, lambda: beside(kept))
    if orient.flag:
        flags.append(orient.flag)
    bvec = ""
    if fix_gradients and orient.fixable:
        fixed = apply_to_bvecs(read_bvecs(bvec_path, len(data.gtab)),
                               candidate_by_label(orient.best))
        text = "\n".join(" ".join(f"{v:.8f}" for v in row) for row in fixed.T) + "\n"
        bvec = str(io.write_text(text, Path(out_dir) / FIXED_BVEC).resolve())
        provenance.append({"step": "gradient_fix", "transform": orient.best,
                           "z": round(orient.z, 2), "gain": round(orient.gain, 4)})
        flags[-1] += " (fixed)"
    row = {"gradient_check": orient.verdict if orient.verdict != "flipped" else orient.best,
           "gradient_check_z": round(orient.z, 2),
           "outlier_volumes": _volume_text(outliers), "n_outlier_volumes": len(outliers)}
    details = {"outlier_volumes": {str(k): v for k, v in outliers.items()},
               "outliers_excluded": bool(exclude_outliers), "qc_policy": qc.qc_policy(),
               "gradient_check": orient.as_record()}
    return {"kept": kept, "exclude": [int(k) for k in exclude], "bvec": bvec, "row": row,
            "flags": flags, "details": details, "provenance": provenance, "beside": side}


def _qc_voxels(data: io.DWI) -> dict:
    """What the volume checks read: the grid (4D data and mask) or, for a series
    held as mask rows, the rows, the mask and each row's voxel (C-order index)."""
    if data.data is None:
        return {"data": data.rows, "mask": data.mask, "rows_index": data.masked_index()}
    return {"data": data.data, "mask": data.mask}


def _volume_text(outliers: dict) -> str:
    """"3: all zero; 7: signal dropout in slice(s) 12 (-64% vs its shell)"."""
    return "; ".join(f"{k}: {why}" for k, why in outliers.items())


def mask_figures(mask: np.ndarray, zooms) -> tuple[dict, list[str]]:
    """Mask QC (:func:`preprocess.mask_qc`) as row fields, and its absolute flags.

    Flagged: an empty mask, a field-of-view fraction outside its range, a
    fragmented mask. The volume is not flagged absolutely (partial-coverage
    slabs and phantoms are small by design); the report judges it within the
    protocol group.
    """
    m = mask_qc(mask, zooms)
    words = {"empty": "mask empty",
             "fov_fraction_low": f"mask {m['fov_fraction']:.1%} of the field of view < "
                                 f"{MASK_FOV_FRACTION_RANGE[0]:.0%}",
             "fov_fraction_high": f"mask {m['fov_fraction']:.1%} of the field of view > "
                                  f"{MASK_FOV_FRACTION_RANGE[1]:.0%}",
             "fragmented": f"mask fragmented (largest component "
                           f"{m['largest_component_fraction']:.1%} < "
                           f"{MASK_MIN_LARGEST_COMPONENT:.0%})"}
    row = {"mask_fov_fraction": round(m["fov_fraction"], 4),
           "mask_largest_component_fraction": round(m["largest_component_fraction"], 4)}
    return row, [words[f] for f in m["flags"] if f in words]


def _snr_flags(qc: dict) -> list[str]:
    """Absolute SNR flag (independent of the cohort)."""
    flags = []
    snr = qc.get("b0_snr", float("nan"))
    if np.isfinite(snr) and snr < MIN_B0_SNR:
        flags.append(f"b0 SNR {snr:.1f} < {MIN_B0_SNR:g}")
    return flags


def write_tensor_maps(series: dict, out_dir, fit_method: str = "WLS",
                      max_bval: float = DTI_MAX_BVAL,
                      n_iter: int = DEFAULT_WLS_ITERATIONS) -> dict:
    """DTI maps (FA, MD, AD, RD, S0, V1) of the b0s and shells up to ``max_bval``.

    FA statistics are over the mask voxels whose fit succeeded (a failed
    voxel's maps are 0, not a measurement); ``failed_fraction`` above
    ``MAX_FAILED_FRACTION`` flags the subject.
    """
    data = read_series(series)
    shells = dti_shells(data.gtab, max_bval)
    # the kept volumes are gathered chunk by chunk in the fit's workers (no
    # copy of them: 431 MB and 0.3-0.6 s for an HCP subject's 108 of 288)
    fit = fit_dwi(data, volumes=data.gtab.select_shells(shells), fit_method=fit_method,
                  n_iter=n_iter)
    maps = {}
    for name in TENSOR_PARAMS:
        arr = np.asarray(getattr(fit, name), dtype=np.float32)
        maps[name] = str(io.save_nifti(arr, data.affine, Path(out_dir) / f"{name}.nii.gz",
                                       data.header).resolve())
    failed = np.asarray(fit.failed)[data.mask]
    fa = np.asarray(fit.fa)[data.mask][~failed]
    fraction = float(failed.mean()) if failed.size else 0.0
    flags = [f"tensor fit failed in {fraction:.1%} of the mask > {MAX_FAILED_FRACTION:.0%}"] \
        if fraction > MAX_FAILED_FRACTION else []
    return {"maps": maps, "median_fa": float(np.median(fa)) if fa.size else float("nan"),
            "failed_voxels": int(np.count_nonzero(failed)),
            "failed_fraction": round(fraction, 6), "qc_flags": flags,
            "parameters": {"fit_method": fit_method,
                           "n_iter": int(n_iter) if fit_method == "WLS" else 0,
                           "max_bval": max_bval, "shells_used": shells,
                           "volumes_excluded": list(series.get("exclude") or [])}}


def write_rish_maps(series: dict, out_dir, lmax: int = 0) -> dict:
    """Per-shell SH fit of the b0-normalised signal; RISH maps l = 0..L as files.

    ``maps[shell][order]`` is a path (shell as ``"1000"``, order as ``"2"``);
    ``lmax`` 0 fits as many orders as each shell's directions allow.
    """
    data = read_series(series)
    fits = fit_shells(data, lmax=lmax or None, coefficients=False)
    maps, orders = {}, {}
    for shell, fit in fits.items():
        rish = np.asarray(fit.rish(), dtype=np.float32)
        key = f"{shell:g}"
        orders[key] = int(fit.lmax)
        maps[key] = {}
        for i, order in enumerate(range(0, fit.lmax + 1, 2)):
            path = Path(out_dir) / f"rish_b{key}_l{order}.nii.gz"
            maps[key][str(order)] = str(io.save_nifti(rish[..., i], data.affine, path,
                                                      data.header).resolve())
    return {"maps": maps, "parameters": {"lmax": orders, "normalisation": "mean b0"}}


def harmonize_series(series: dict, artefact, out_dir, subject: str,
                     sidecar=None) -> tuple[dict, dict]:
    """Apply a stored harmonization artefact to a series: (new series, history entry).

    Refuses data whose JSON ``sidecar`` says this artefact was already
    applied. The harmonised series is written to ``out_dir`` (same mask).
    """
    art = HarmonizationArtefact.load(artefact)
    meta = json.loads(Path(sidecar).read_text()) if sidecar else None
    data = read_series(series)
    data.data, info = apply_harmonization(data, None, art, applied=applied_artefacts(meta),
                                          subject=subject, inplace=True)
    entry = {"artefact": str(Path(artefact).resolve()), "content_id": art.content_id,
             "applied": applied_artefacts(meta) + [art.content_id], "info": jsonable(info)}
    return write_series(data, out_dir, series["mask"]), entry


def jsonable(obj):
    """Plain JSON types only (numpy scalars and arrays become lists/numbers)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist")
                                 else str(o)))


# ----------------------------------------------------------------------------
# Image gradient (SCIENCE.md section 7): options, timing and one subject's files
# ----------------------------------------------------------------------------
#: Step name of the image-gradient step (node marker, failure records, sidecars).
IMAGE_GRADIENT_STEP = "image_gradient"
#: Estimators the pipeline runs on one magnitude series. C needs two
#: diffusion times of the same subject and P the phase of complex data: both
#: are study estimators (bench/image_gradient_study.py, interfaces API).
PIPELINE_ESTIMATORS = ("B", "A")
STUDY_ONLY = {"C": "compares two series of the same subject at two diffusion times",
              "P": "fits the phase of complex data, and dmriflow reads magnitude series"}
DEFAULT_ESTIMATORS = ("B",)
#: Sidecar keys read for the sequence timing, in seconds like every BIDS time.
#: BIDS 1.9 has EchoTime but no field for the gradient timing: dmriflow reads
#: these two keys (write them into the DWI JSON sidecar), else the CLI options.
SIDECAR_TIMING_KEYS = {"Delta": "DiffusionGradientSeparation",
                       "delta": "DiffusionGradientDuration", "TE": "EchoTime"}
#: BIDS entities of the step's derivatives.
MODEL_ENTITY = "model-imagegradient"
#: Angle histogram bins (deg) stored per subject and summed for the figure.
HISTOGRAM_BIN_DEG = 2.0


def parse_estimators(text) -> tuple[str, ...]:
    """``"B,A"`` or a sequence -> validated estimator names (order kept)."""
    names = [n.strip().upper() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise ValueError("no image-gradient estimator given (choose from "
                         f"{', '.join(PIPELINE_ESTIMATORS)})")
    for name in names:
        if name in STUDY_ONLY:
            raise ValueError(f"estimator {name} {STUDY_ONLY[name]}: it is not a pipeline step; "
                             f"use the study API (docs/image_gradient.md)")
    unknown = [n for n in names if n not in PIPELINE_ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown image-gradient estimator(s) {unknown}; choose from "
                         f"{', '.join(PIPELINE_ESTIMATORS)}")
    return tuple(dict.fromkeys(names))


def entity_label(name: str) -> str:
    """A BIDS label (alphanumeric) for an estimator or control name."""
    return re.sub(r"[^A-Za-z0-9]", "", name)


def histogram_edges() -> np.ndarray:
    """Edges (deg) of the acute-angle histogram bins, 0 to 90."""
    return np.arange(0.0, 90.0 + HISTOGRAM_BIN_DEG / 2, HISTOGRAM_BIN_DEG)


def angle_histograms(angles: dict[str, np.ndarray], kind: str = "3d") -> list[dict]:
    """Tidy histogram rows (name, kind, bin_lo, bin_hi, count) of acute angles
    (deg) per estimator/control; NaN angles are left out."""
    edges = histogram_edges()
    rows = []
    for name, values in angles.items():
        v = np.asarray(values, dtype=np.float64).ravel()
        counts, _ = np.histogram(v[np.isfinite(v)], bins=edges)
        rows += [{"name": name, "kind": kind, "bin_lo": float(lo), "bin_hi": float(hi),
                  "count": int(c)} for lo, hi, c in zip(edges[:-1], edges[1:], counts)]
    return rows


def subject_seed(subject: str) -> int:
    """Seed of a subject's random controls (shuffle, surrogate noise,
    perpendicular axis): stable across runs and machines."""
    return zlib.crc32(subject.encode())


def subject_products(data, timing, estimators, out_dir, subject: str,
                     max_voxels: int = 0) -> dict:
    """Evaluate one subject and write its files; return the product record.

    ``data``: an :class:`io.DWI`; ``timing``: a SequenceTiming. Maps (in
    ``out_dir``): per method (estimators, nulls, controls) the acute angle
    (``param-angle``, deg) and the angle in the plane perpendicular to V1
    (``param-angle2d``); per estimator its axis (``param-axis``, FSL image
    frame) and quality; the gold-standard gradient (``desc-goldstandard``,
    1/mm). Tables: the tidy per-subject rows (``desc-summary``) and angle
    histograms (``desc-histogram``). ``row``: mean/median angle of every
    method over all evaluated voxels, for the subject table.
    """
    out = Path(out_dir)
    ev = ig.evaluate_subject(data, timing, tuple(estimators), subject=subject,
                             rng=subject_seed(subject), max_voxels=max_voxels or None)
    maps = {}

    def save(entities: str, array, name: str) -> None:
        maps[f"{MODEL_ENTITY}_{entities}"] = str(io.save_nifti(
            np.asarray(array, dtype=np.float32), data.affine, out / f"{name}.nii.gz",
            data.header).resolve())

    save("desc-goldstandard_param-gradient", ev.gold.gradient, "gold_gradient")
    for method in ev.angles:
        label = entity_label(method)
        save(f"desc-{label}_param-angle", ev.angles[method], f"angle_{label}")
        save(f"desc-{label}_param-angle2d", ev.angles_2d[method], f"angle2d_{label}")
    for name in estimators:
        fit = ev.fits[name]
        save(f"desc-{entity_label(name)}_param-axis", fit.axis, f"axis_{name}")
        save(f"desc-{entity_label(name)}_param-quality", fit.quality, f"quality_{name}")
    summary = io.write_text(ev.rows.to_csv(sep="\t", index=False, na_rep="n/a"),
                            out / "summary.tsv")
    hist = angle_histograms({m: a[ev.mask] for m, a in ev.angles.items()}, "3d")
    hist += angle_histograms({m: a[ev.mask] for m, a in ev.angles_2d.items()}, "2d")
    histogram = io.write_text(pd.DataFrame(hist).to_csv(sep="\t", index=False),
                              out / "histogram.tsv")
    overall = ev.rows[ev.rows["stratum"] == "all"]
    row = {"imagegradient_voxels": int(ev.mask.sum())}
    for r in overall.itertuples():
        row[f"imagegradient_{r.method}_mean_deg"] = round(float(r.mean), 4)
        row[f"imagegradient_{r.method}_median_deg"] = round(float(r.median), 4)
    params = {**ev.parameters, "estimators": list(estimators),
              "seed": subject_seed(subject), "quality": {n: ev.fits[n].quality_name
                                                         for n in estimators},
              "chance_deg": dict(ig.CHANCE)}
    return {"subject": subject, "status": "ok", "step": IMAGE_GRADIENT_STEP, "maps": maps,
            "tables": {f"{MODEL_ENTITY}_desc-summary": str(summary.resolve()),
                       f"{MODEL_ENTITY}_desc-histogram": str(histogram.resolve())},
            "parameters": params, "row": row}
