"""Validate: read and check every input once; start the subject's record."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import stepfiles
from .base import Step, option, register


@dataclass
class Options:
    exclude_outliers: bool = option(
        True, "fit all volumes: outlier volumes (all zero, slice dropout, intensity outliers) "
              "are then only flagged, not excluded", flag="--keep-outlier-volumes", invert=True)
    fix_gradients: bool = option(
        False, "apply the gradient check's winning axis flip/permutation to the b-vectors "
               "(recorded in every sidecar); without it a wrong table is only flagged")


def _path(value):
    return None if value is None else os.fspath(value)


def run(subject, options: Options, out_dir, rows_only: bool = False) -> dict:
    """The subject's record (census, input hashes, QC, the series later steps
    read); ``subject`` has ``key`` and the paths ``dwi``, ``bval``, ``bvec``,
    ``mask``, ``sidecar``. ``rows_only``: only the mask rows are kept for the
    fits (no later step reads the whole grid)."""
    return stepfiles.validate_subject(subject.key, _path(subject.dwi), _path(subject.bval),
                                      _path(subject.bvec), _path(subject.mask),
                                      _path(subject.sidecar), out_dir,
                                      exclude_outliers=options.exclude_outliers,
                                      fix_gradients=options.fix_gradients, rows_only=rows_only)


STEP = register(Step("validate", "Validate", "source", Options, run))
