"""Preprocess: MP-PCA denoising and/or Gibbs-ringing removal.

Both assume raw, uninterpolated data: leave them off for HCP's minimally
preprocessed series (already eddy-corrected and resampled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import io, stepfiles
from ..preprocess import preprocess_dwi, report_for_sidecar
from .base import Step, option, register

#: Entities of the MP-PCA noise map a denoising run exports.
SIGMA_ENTITIES = {"model": "mppca", "param": "sigma"}


@dataclass
class Options:
    denoise: bool = option(False, "MP-PCA denoising (raw data only: not for HCP minimally "
                                  "preprocessed series)")
    degibbs: bool = option(False, "Gibbs-ringing removal (raw data only)")


def enabled(options: Options) -> bool:
    return options.denoise or options.degibbs


def run(record: dict, options: Options, out_dir) -> dict:
    """The record with the preprocessed series (unchanged when both are off)."""
    if not enabled(options):
        return record
    out, report = preprocess_dwi(stepfiles.read_series(record["series"]),
                                 denoise=options.denoise, degibbs=options.degibbs)
    extra = {"report": report_for_sidecar(report), "denoise": options.denoise,
             "degibbs": options.degibbs}
    warnings = list(record.get("warnings", []))
    if record.get("interpolated"):
        extra["warning"] = stepfiles.INTERPOLATED_WARNING
        warnings.append(stepfiles.INTERPOLATED_WARNING)
    new = stepfiles.with_series(record, stepfiles.write_series(out, out_dir,
                                                               record["series"]["mask"]),
                                "preprocess", extra)
    new["warnings"] = warnings
    if "noise_sigma" in report["maps"]:
        path = io.save_nifti(report["maps"]["noise_sigma"], out.affine,
                             Path(out_dir) / "noise_sigma.nii.gz", out.header)
        new["maps"] = list(record.get("maps", [])) + [
            {"entities": SIGMA_ENTITIES, "path": str(path.resolve())}]
    return new


STEP = register(Step("preprocess", "Preprocess", "series", Options, run, enabled=enabled,
                     example={"denoise": True}))
