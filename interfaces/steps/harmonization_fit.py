"""Harmonization fit: a RISH artefact mapping a target site onto a reference
(a cohort step of ``dmriflow harmonize fit``).

Its engine face is :data:`dmriflow.pipelines.harmonization.FitHarmonization`,
run by :func:`dmriflow.pipelines.execution.run_harmonization_fit`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import check_choice
from ..harmonize_choices import (DEFAULT_REGISTRATION_CONTRAST, ENGINE_REGISTRATION_CONTRASTS,
                                 ENGINE_RESOLUTION_MATCH, LIBRARY_ONLY_CONTRASTS,
                                 REGISTRATIONS, RESOLUTION_MATCH_OFF)
from .base import CohortStep, option, register

#: The command that runs the fit (and shows its options).
COMMAND = "harmonize fit"


@dataclass
class Options:
    reference: str = option("", "reference site (group) name", required=True)
    target: str = option("", "target site (group) name", required=True)
    site_column: str = option("protocol", "'protocol' (census protocol groups, default) or a "
                                          "column of --site-table")
    site_table: str | None = option(None, "participants-style TSV with participant_id and the "
                                          "site column (default: INPUT/participants.tsv)")
    shells: list[float] | None = option(None, "shells to harmonise (default: all shells every "
                                              "subject has)", nargs="+")
    harmonization_lmax: int | None = option(None, "highest SH order harmonised (default: as "
                                                   "the directions allow, <= 8)")
    registration: str = option("syn", "registration of each subject to the template",
                               choices=REGISTRATIONS)
    smoothing_fwhm: float = option(0.0, "scale-map smoothing (mm)", units="mm")
    registration_contrast: str = option(
        DEFAULT_REGISTRATION_CONTRAST, "image each subject is registered through: FA, or "
        "sqrt(RISH l2) / sqrt(RISH l0) of the lowest shell or their mean (rish-l0l2), which a "
        "per-order site scaling only rescales", choices=ENGINE_REGISTRATION_CONTRASTS)
    match_resolution: str = option(
        RESOLUTION_MATCH_OFF, "register a subject whose voxels are coarser than the "
        "template's to the template blurred to its resolution, by this rule of the blur's "
        "width (off: the template as it is); recorded in the artefact, which apply follows",
        choices=ENGINE_RESOLUTION_MATCH)

    def __post_init__(self):
        check_choice("registration", self.registration, REGISTRATIONS)
        if self.registration_contrast in LIBRARY_ONLY_CONTRASTS:
            raise ValueError(f"registration_contrast {self.registration_contrast!r} is not run "
                             f"by the engine: "
                             f"{LIBRARY_ONLY_CONTRASTS[self.registration_contrast]}")
        check_choice("registration_contrast", self.registration_contrast,
                     ENGINE_REGISTRATION_CONTRASTS)
        check_choice("match_resolution", self.match_resolution, ENGINE_RESOLUTION_MATCH)
        if self.smoothing_fwhm < 0:
            raise ValueError("smoothing_fwhm must be >= 0")


STEP = register(CohortStep("harmonization_fit", "FitHarmonization", Options,
                           commands=(COMMAND,)))
