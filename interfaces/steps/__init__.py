"""The registered steps: one module each (see :mod:`.base` and docs/architecture.md).

Importing this package registers every step in :data:`REGISTRY`, in the
order a subject goes through them. To add a step, write its module and add
its name to :data:`STEP_MODULES` (the one registration line).
"""

from __future__ import annotations

import importlib

from .base import REGISTRY, Derivative, Product, Schema, Step, option  # noqa: F401

#: Step modules, in the order a subject goes through them.
STEP_MODULES = ("validate", "preprocess", "harmonize", "inference", "tensor", "rish",
                "image_gradient", "snr")

for _name in STEP_MODULES:
    importlib.import_module(f"{__name__}.{_name}")


def enabled_steps(options: dict) -> list[Step]:
    """The steps a run with ``options`` ({step name: Options}) goes through."""
    return [s for s in REGISTRY.values() if s.enabled(options[s.name])]


def default_options() -> dict:
    """``{step name: Options()}`` with every default."""
    return {name: step.Options() for name, step in REGISTRY.items()}


def option_owner() -> dict[str, str]:
    """``{option name: step name}`` over the registry (each name is declared once)."""
    from .base import options_of
    return {f.name: s.name for s in REGISTRY.values() for f, _ in options_of(s.Options)}
