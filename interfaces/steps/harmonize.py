"""Harmonize: apply a stored RISH harmonization artefact to the series."""

from __future__ import annotations

from dataclasses import dataclass

from .. import stepfiles
from .base import Step, option, register


@dataclass
class Options:
    harmonization: str = option("", "apply a stored harmonization artefact (folder) before "
                                    "the fits", metavar="ARTEFACT")


def enabled(options: Options) -> bool:
    return bool(options.harmonization)


def run(record: dict, options: Options, out_dir) -> dict:
    """The record with the harmonised series (unchanged without an artefact).
    Refuses data whose sidecar says this artefact was already applied."""
    if not options.harmonization:
        return record
    series, entry = stepfiles.harmonize_series(record["series"], options.harmonization,
                                               out_dir, record["subject"], record.get("sidecar"))
    return stepfiles.with_series(record, series, "harmonize", entry)


STEP = register(Step("harmonize", "Harmonize", "series", Options, run, enabled=enabled,
                     commands=("run",)))
