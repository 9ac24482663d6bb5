"""Metrics of the 3T->7T comparison: NMSE and 3D SSIM on RISH L0/L2/L4 and FA.

Definitions (written into every results table, see :data:`DEFINITIONS`):

* ``NMSE = sum_mask (pred - gt)^2 / sum_mask gt^2`` (lower is better; 0 for
  a perfect prediction, 1 for predicting zeros);
* ``SSIM``: Wang et al.'s structural similarity with a Gaussian window
  (sigma 1.5 voxels, truncated to 11^3), ``C1 = (0.01 L)^2``,
  ``C2 = (0.03 L)^2`` with ``L`` the ground truth's range, computed on the
  masked images (0 outside the mask) cropped to the mask's bounding box
  (reflective borders) and averaged over that box (1 for identical images).

Numerics only (numpy/scipy).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

#: SSIM window and constants.
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
SSIM_K1, SSIM_K2 = 0.01, 0.03
#: Metric columns of the tables: RISH orders then FA.
MAPS = ("L0", "L2", "L4", "FA")
DEFINITIONS = (
    "NMSE = sum_mask (pred - gt)^2 / sum_mask gt^2 (lower is better). "
    "SSIM: Gaussian window sigma 1.5 voxels truncated to 11^3, C1 = (0.01 L)^2, "
    "C2 = (0.03 L)^2, L = range of the ground truth, on the masked maps cropped to the "
    "mask's bounding box, averaged over the box (higher is better, 1 = identical). "
    "RISH L0/L2/L4 of the b=1000 shell; FA of a tensor fit to the DWIs rebuilt from the "
    "3T SH coefficients scaled by the method's lambda maps; ground truth = the 7T member.")


def nmse(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """``||pred - gt||^2 / ||gt||^2`` over the mask."""
    m = np.asarray(mask, dtype=bool)
    p = np.asarray(pred, dtype=np.float64)[m]
    g = np.asarray(gt, dtype=np.float64)[m]
    den = float(np.sum(g * g))
    if den == 0:
        raise ValueError("NMSE is undefined: the ground truth is zero in the mask")
    return float(np.sum((p - g) ** 2) / den)


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    idx = np.argwhere(np.asarray(mask, dtype=bool))
    if idx.size == 0:
        raise ValueError("empty mask")
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def ssim_map(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """Local SSIM of two equally shaped images (Gaussian window, reflective borders)."""
    if not data_range > 0:
        raise ValueError(f"SSIM needs a positive data range, got {data_range}")
    truncate = (SSIM_WINDOW // 2) / SSIM_SIGMA

    def g(a):
        return gaussian_filter(a, SSIM_SIGMA, truncate=truncate, mode="reflect")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mx, my = g(x), g(y)
    vx, vy, cxy = g(x * x) - mx * mx, g(y * y) - my * my, g(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim3d(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray,
           data_range: float | None = None) -> float:
    """Mean SSIM over the mask's bounding box of the masked images."""
    m = np.asarray(mask, dtype=bool)
    box = bounding_box(m)
    p = np.where(m, pred, 0.0)[box]
    g = np.where(m, gt, 0.0)[box]
    if data_range is None:
        data_range = float(g.max() - g.min())
    return float(ssim_map(p, g, data_range).mean())


def subject_metrics(rish_pred: np.ndarray, rish_gt: np.ndarray, fa_pred: np.ndarray,
                    fa_gt: np.ndarray, mask: np.ndarray) -> dict:
    """NMSE and SSIM of the RISH orders 0/2/4 and of FA for one subject."""
    out = {}
    maps = [(f"L{2 * k}", rish_pred[..., k], rish_gt[..., k]) for k in range(3)]
    maps.append(("FA", fa_pred, fa_gt))
    for name, p, g in maps:
        out[f"nmse_{name}"] = nmse(p, g, mask)
        out[f"ssim_{name}"] = ssim3d(p, g, mask)
    return out


def summarise_metrics(rows: list[dict]) -> dict:
    """Mean and sample sd of every metric over subjects: {metric: (mean, sd)}."""
    keys = [k for k in rows[0] if k.startswith(("nmse_", "ssim_"))]
    return {k: (float(np.mean([r[k] for r in rows])),
                float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0)
            for k in keys}


def markdown_table(results: dict[str, dict], n_subjects: int) -> str:
    """Methods x (NMSE, SSIM) x maps, ``mean +- sd``, with the definitions below."""
    head = ("| method | " + " | ".join(f"NMSE {m}" for m in MAPS) + " | "
            + " | ".join(f"SSIM {m}" for m in MAPS) + " |")
    lines = [head, "|" + "---|" * (1 + 2 * len(MAPS))]
    for method, s in results.items():
        cells = [f"{s[f'nmse_{m}'][0]:.3f} +- {s[f'nmse_{m}'][1]:.3f}" for m in MAPS]
        cells += [f"{s[f'ssim_{m}'][0]:.3f} +- {s[f'ssim_{m}'][1]:.3f}" for m in MAPS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"mean +- sd over {n_subjects} held-out subjects. {DEFINITIONS}")
    return "\n".join(lines)
