"""Image-gradient group: the cohort's tests table and angle figure (a cohort step).

Runs when the subjects' image-gradient step does; its Pydra task is
:data:`dmriflow.pipelines.image_gradient.ImageGradientGroup`.
"""

from __future__ import annotations

from .. import stepfiles
from .base import CohortStep, register


def enabled(options: dict) -> bool:
    return options[stepfiles.IMAGE_GRADIENT_STEP].image_gradient


STEP = register(CohortStep("image_gradient_group", "ImageGradientGroup", enabled=enabled,
                           commands=("run", "demo")))
