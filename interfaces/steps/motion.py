"""Motion: head-motion (and eddy-current) correction with b-vector rotation.

Model-based registration (:mod:`dmriflow.interfaces.motion`): b0s to their
mean, each diffusion volume to its leave-one-out tensor prediction, the data
resampled once, b-vectors rotated. Hands on the corrected series (exported
as ``desc-moco`` with its rotated b-vectors) and the per-volume motion table
``desc-motion_timeseries.tsv`` (fMRIPrep's confound columns); the subject's
row gets the mean and max framewise displacement and the number of volumes
above the threshold, which ``--motion-exclude`` also drops. Off by default:
HCP minimally preprocessed series are already corrected. A raw input series
(:func:`is_raw_series`) run with it off gets :data:`UNCORRECTED_WARNING`
(Export adds it to the row's ``warnings`` and logs it once, naming the subject).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import io, stepfiles
from ..bids_names import parse_name
from ..errors import InputError
from ..motion import DEFAULT_ITERATIONS, FD_RADIUS_MM, MODELS, PARAMETER_NAMES, correct_motion
from .base import Step, option, register

NAME = "motion"
#: Entities and suffix of the motion table (BIDS derivatives, as fMRIPrep's confounds).
TABLE_ENTITIES, TABLE_SUFFIX = {"desc": "motion"}, "timeseries"
#: Power et al. 2012's framewise-displacement threshold (mm).
DEFAULT_FD_THRESHOLD_MM = 0.5
#: Volumes a corrected series must keep after exclusion (a tensor needs 7).
MIN_KEPT_VOLUMES = 7


@dataclass
class Options:
    motion_correction: bool = option(False, "head-motion correction with b-vector rotation "
                                            "(raw data only: HCP minimally preprocessed series "
                                            "are already corrected)")
    motion_model: str = option("rigid", "registration of each volume: rigid (head motion) or "
                                        "affine (plus eddy-current scale and shear)",
                               choices=MODELS)
    motion_iterations: int = option(DEFAULT_ITERATIONS, "model-fit / registration passes")
    motion_fd_threshold: float = option(DEFAULT_FD_THRESHOLD_MM, "framewise displacement above "
                                        "which a volume is counted (and, with "
                                        "--motion-exclude, dropped)", units="mm")
    motion_exclude: bool = option(False, "drop volumes whose framewise displacement exceeds "
                                         "--motion-fd-threshold")


def enabled(options: Options) -> bool:
    return options.motion_correction


#: Entities of an input series that say it was already processed (fMRIPrep /
#: QSIPrep derivatives: ``desc-preproc``, ``space-T1w``).
PROCESSED_ENTITIES = ("desc", "space")
#: The warning of a raw series run without motion correction (the subject is named
#: where it is logged).
UNCORRECTED_WARNING = ("raw series fitted without head-motion correction "
                       "(--motion-correction is off)")


def _derivative_dataset(dwi: Path) -> bool:
    """Whether a folder above ``dwi`` holds a BIDS derivative dataset description."""
    for folder in dwi.parents:
        desc = folder / "dataset_description.json"
        if desc.is_file():
            try:
                return json.loads(desc.read_text()).get("DatasetType") == "derivative"
            except (OSError, ValueError, AttributeError):
                return False
    return False


def is_raw_series(dwi) -> bool:
    """Whether an input series is raw scanner data that motion correction applies to:
    not in the HCP minimal-preprocessing layout (already eddy-corrected), not a
    processed BIDS derivative (``desc-``/``space-`` entities, a ``derivatives``
    folder, or a dataset whose description says ``DatasetType: derivative``)."""
    path = Path(dwi)
    if stepfiles.is_interpolated(path) or "derivatives" in path.parts:
        return False
    try:
        entities = parse_name(path)[0]
    except ValueError:
        entities = {}
    if any(k in entities for k in PROCESSED_ENTITIES):
        return False
    return not _derivative_dataset(path)


def uncorrected_warning(record: dict, options: Options) -> str | None:
    """The warning for a raw input series when motion correction is off, else None."""
    if enabled(options) or record.get("status") != "ok":
        return None
    dwi = record.get("inputs", {}).get("dwi", {}).get("path")
    return UNCORRECTED_WARNING if dwi and is_raw_series(dwi) else None


def motion_table(parameters, fd) -> pd.DataFrame:
    """fMRIPrep-style confounds: trans (mm), rot (rad), framewise_displacement
    (mm, NaN for the first volume, written as n/a)."""
    table = pd.DataFrame(np.asarray(parameters), columns=list(PARAMETER_NAMES))
    table["framewise_displacement"] = np.concatenate([[np.nan], np.asarray(fd)[1:]])
    return table


def run(record: dict, options: Options, out_dir) -> dict:
    """The record with the corrected series, its motion table and FD summary."""
    if not enabled(options):
        return record
    dwi = stepfiles.read_series(record["series"])
    result = correct_motion(dwi.data, dwi.gtab, dwi.affine, dwi.mask, model=options.motion_model,
                            iterations=options.motion_iterations)
    over = np.flatnonzero(result.fd > options.motion_fd_threshold)
    dwi.data, dwi.gtab = result.data, result.gtab
    excluded = []
    if options.motion_exclude and over.size:
        keep = np.setdiff1d(np.arange(len(dwi.gtab)), over)
        if keep.size < MIN_KEPT_VOLUMES or not dwi.gtab.b0s_mask[keep].any():
            raise InputError(record["series"]["dwi"], f"excluding the {over.size} volume(s) "
                             f"with framewise displacement > {options.motion_fd_threshold:g} mm "
                             f"leaves too few volumes (or no b0)")
        dwi, excluded = dwi.select_volumes(keep), over.tolist()
    out = Path(out_dir)
    table = io.write_text(motion_table(result.parameters, result.fd)
                          .to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.6g"),
                          out / "motion.tsv")
    summary = {"motion_fd_mean": float(result.fd[1:].mean()) if result.fd.size > 1 else 0.0,
               "motion_fd_max": float(result.fd.max()),
               "motion_volumes_over_threshold": int(over.size)}
    extra = {**result.info, "fd_threshold_mm": options.motion_fd_threshold,
             "fd_radius_mm": FD_RADIUS_MM, "excluded_volumes": excluded, **summary}
    new = stepfiles.with_series(record, stepfiles.write_series(dwi, out_dir,
                                                               record["series"]["mask"]),
                                NAME, extra)
    new["qc"] = {**record.get("qc", {}), **summary}
    new["tables"] = list(record.get("tables", [])) + [
        {"entities": TABLE_ENTITIES, "suffix": TABLE_SUFFIX, "path": str(table.resolve()),
         "parameters": {"Columns": list(PARAMETER_NAMES) + ["framewise_displacement"],
                        "Units": {"trans": "mm", "rot": "rad", "framewise_displacement": "mm"},
                        "FramewiseDisplacementThreshold": options.motion_fd_threshold}}]
    return new


STEP = register(Step(NAME, "MotionCorrect", "series", Options, run, enabled=enabled, grid=True,
                     example={"motion_correction": True, "motion_iterations": 1}))
