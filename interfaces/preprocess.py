"""Preprocessing steps. For now: a brain mask when none is given."""

from __future__ import annotations

import numpy as np

#: median_otsu settings on the mean b0: median filter radius and passes.
MEDIAN_RADIUS = 2
MEDIAN_PASSES = 2


def brain_mask(mean_b0: np.ndarray) -> np.ndarray:
    """Brain mask from the mean b0 by dipy's median-Otsu (hole-free, dilated once)."""
    from dipy.segment.mask import median_otsu
    _, mask = median_otsu(np.asarray(mean_b0, dtype=np.float32),
                          median_radius=MEDIAN_RADIUS, numpass=MEDIAN_PASSES, dilate=1)
    return mask.astype(bool)
