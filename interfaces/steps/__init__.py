"""The registered steps: one module each (see :mod:`.base` and docs/architecture.md).

Importing this package registers every step in :data:`REGISTRY`, in the
order a subject goes through them, and every cohort step in
:data:`COHORT_REGISTRY`. To add a step, write its module and add its name to
:data:`STEP_MODULES` (the one registration line).
"""

from __future__ import annotations

import importlib

from .base import (COHORT_REGISTRY, REGISTRY, CohortStep, Derivative,  # noqa: F401
                   Product, Schema, Step, option, options_of)

#: Step modules, in the order a subject goes through them, then the cohort steps.
STEP_MODULES = ("validate", "preprocess", "motion", "harmonize", "inference", "tensor", "rish",
                "image_gradient", "snr", "group_table", "image_gradient_group",
                "harmonization_fit")

for _name in STEP_MODULES:
    importlib.import_module(f"{__name__}.{_name}")


def enabled_steps(options: dict) -> list[Step]:
    """The steps a run with ``options`` ({step name: Options}) goes through."""
    return [s for s in REGISTRY.values() if s.enabled(options[s.name])]


def default_options() -> dict:
    """``{step name: Options()}`` with every default."""
    return {name: step.Options() for name, step in REGISTRY.items()}


def option_owner(registry: dict = REGISTRY) -> dict[str, str]:
    """``{option name: step name}`` over a registry (each name is declared once)."""
    return {f.name: s.name for s in registry.values() for f, _ in options_of(s.Options)}


def cohort_steps(options: dict, command: str = "run") -> list[CohortStep]:
    """The cohort steps of ``command`` that a run with ``options`` goes through."""
    return [s for s in COHORT_REGISTRY.values() if command in s.commands and s.enabled(options)]


def fit_reads(name: str) -> bool:
    """Whether ``harmonize fit`` goes through subject step ``name``. The fit reads
    each series as acquired: its source and series steps, not the ``harmonize``
    step (no artefact is applied) and no product step (the fit computes its own
    features, so product options would change nothing)."""
    step = REGISTRY[name]
    return step.kind in ("source", "series") and name != "harmonize"
