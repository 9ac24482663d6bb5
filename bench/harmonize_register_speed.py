"""Benchmark: cheaper settings of the harmonization fit's dipy registration vs today's SyN.

Registers phantom FA maps (truth FA in the brain mask; moving seeds 201..,
static seed 200) with ``harmonize.register_fa`` under several settings of the
same dipy pipeline (centre of mass -> translation -> rigid -> affine by
mutual information, then SyN by cross-correlation) and reports per setting
the wall time and the accuracy, as the median over the pairs:

* ``rel_today``: RMS (in the static mask) of the warped moving FA minus
  today's warped moving FA, over today's residual RMS (warped - static FA).
  0 for today's setting itself.
* ``corr``: correlation of the warped moving FA with the static FA (mask).
* ``truth_mm`` (``anatomy="brain"`` only; that phantom has a known warp):
  mean distance (world mm, static mask) between the template (MNI) point of
  each static voxel and the template point the registration maps there from
  the moving subject (the moving subject's template coordinates resampled by
  the transform). ``truth_p95_mm``: its 95th percentile.

Today's SyN's own variation is ``today_jitter``: today's settings on a
moving FA with small Gaussian noise (``JITTER_FA_SD`` in the mask, seeded),
i.e. how far today's result moves for an input change that should not
matter. A cheaper setting "holds accuracy" when its ``rel_today`` is within
``today_jitter``'s and its ``truth_mm`` is within ``today_jitter``'s
``truth_mm`` (pair by pair, the rows give medians).

dipy's SyN already computes in float32 (``dipy.align.floating``); its
affine mutual-information metric casts to float64 internally, so a float32
setting is not reachable without changing dipy and is not a row here.

Run: ``.venv/bin/python bench/harmonize_register_speed.py [--shape X Y Z]
[--voxel MM] [--anatomy geometric brain] [--pairs N] [--settings NAMES]``.

Measured 2026-12-04, see the end of this docstring (2 shared cores, nice 19,
OMP_NUM_THREADS=1; load average printed with the rows).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harmonize_register import fa_map  # noqa: E402

from dmriflow.interfaces import harmonize as H  # noqa: E402
from dmriflow.interfaces.sim import brain, phantom  # noqa: E402

#: Static subject's seed; moving subjects are STATIC_SEED + 1 ...
STATIC_SEED = 200
#: FA noise (SD) added to the moving map for today's own-variation row: about
#: the FA error of a DTI fit at a b0 SNR of ~50.
JITTER_FA_SD = 0.02
JITTER_SEED = 7
#: name -> (kind, affine level iterations coarse -> fine, SyN level iterations
#: coarse -> fine). A 0 at the finest level skips it: dipy upsamples the field
#: (SyN) or keeps the transform (affine) from the half-resolution level.
SETTINGS = {
    "today": ("syn", H.AFFINE_LEVEL_ITERS, H.SYN_LEVEL_ITERS),
    "today_jitter": ("syn", H.AFFINE_LEVEL_ITERS, H.SYN_LEVEL_ITERS),
    "syn_half": ("syn", H.AFFINE_LEVEL_ITERS, (10, 10, 0)),
    "syn_fewer": ("syn", H.AFFINE_LEVEL_ITERS, (5, 5, 2)),
    "aff_half_syn_half": ("syn", (100, 50, 0), (10, 10, 0)),
    "aff_fewer_syn_half": ("syn", (50, 25, 0), (10, 10, 0)),
    "affine_only": ("affine", H.AFFINE_LEVEL_ITERS, H.SYN_LEVEL_ITERS),
}


def template_coords(shape, affine, voxel: float, seed: int) -> np.ndarray:
    """Brain phantom: each voxel's template (MNI) point, world mm, (X, Y, Z, 3).

    The phantom's per-person map (affine + warp, :func:`brain.to_template`)
    scaled back to world mm by the anatomy scale, so distances are in the
    subject's mm."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    xyz = ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    fov = np.asarray(shape, dtype=np.float64) * voxel
    m, _ = brain.to_template(xyz, fov, phantom.subject_parameters(seed), seed)
    return (m * brain.anatomy_scale(fov)).reshape(tuple(shape) + (3,))


def measure(name, moving, moving_affine, static, static_affine, mask, today_warped,
            coords_moving, coords_static) -> dict:
    """One registration under a setting: wall time and accuracy figures."""
    kind, aff_iters, syn_iters = SETTINGS[name]
    if name == "today_jitter":
        rng = np.random.default_rng(JITTER_SEED)
        moving = np.where(moving > 0, moving + rng.normal(0.0, JITTER_FA_SD, moving.shape),
                          0).astype(np.float32)
    t0 = time.perf_counter()
    tr = H.register_fa(moving, moving_affine, static, static_affine, kind,
                       affine_level_iters=aff_iters, syn_level_iters=syn_iters)
    wall = time.perf_counter() - t0
    warped = tr.to_template(moving)
    ref = today_warped if today_warped is not None else warped
    resid = np.sqrt(np.mean((ref[mask] - static[mask]) ** 2))
    row = {"wall_s": wall,
           "rel_today": float(np.sqrt(np.mean((warped[mask] - ref[mask]) ** 2)) / resid),
           "corr": float(np.corrcoef(warped[mask], static[mask])[0, 1]), "warped": warped}
    if coords_moving is not None:
        mapped = np.stack([tr.to_template(coords_moving[..., i].astype(np.float32))
                           for i in range(3)], axis=-1)
        d = np.linalg.norm(mapped[mask] - coords_static[mask], axis=1)
        row["truth_mm"] = float(d.mean())
        row["truth_p95_mm"] = float(np.percentile(d, 95))
    return row


def run_anatomy(anatomy: str, shape, voxel: float, pairs: int, names) -> None:
    """All settings on ``pairs`` moving subjects of one anatomy; prints one row per setting."""
    static, static_affine = fa_map(shape, voxel, STATIC_SEED, anatomy)
    mask = static > 0
    truth = anatomy == "brain"
    c_static = template_coords(shape, static_affine, voxel, STATIC_SEED) if truth else None
    rows = {n: [] for n in names}
    for k in range(pairs):
        seed = STATIC_SEED + 1 + k
        moving, moving_affine = fa_map(shape, voxel, seed, anatomy)
        c_moving = template_coords(shape, moving_affine, voxel, seed) if truth else None
        today = None
        for n in names:    # today first: the others are compared with its result
            r = measure(n, moving, moving_affine, static, static_affine, mask,
                        None if n == "today" else today, c_moving, c_static)
            if n == "today":
                today = r["warped"]
            r.pop("warped")
            rows[n].append(r)
    load = os.getloadavg()[0]
    grid = "x".join(map(str, shape))
    for n in names:
        med = {key: float(np.median([r[key] for r in rows[n]])) for key in rows[n][0]}
        extra = (f" truth_mm={med['truth_mm']:.2f} truth_p95_mm={med['truth_p95_mm']:.2f}"
                 if truth else "")
        per_pair = ",".join(f"{r['truth_mm']:.2f}" for r in rows[n]) if truth else ""
        print(f"anatomy={anatomy} grid={grid} voxel_mm={voxel} pairs={pairs} setting={n} "
              f"wall_s={med['wall_s']:.1f} rel_today={med['rel_today']:.3f} "
              f"corr={med['corr']:.4f}{extra}"
              + (f" truth_mm_pairs={per_pair}" if truth else "") + f" load1={load:.2f}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(58, 70, 58))
    ap.add_argument("--voxel", type=float, default=2.5)
    ap.add_argument("--anatomy", nargs="+", default=["geometric", "brain"])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    opts = ap.parse_args()
    names = [n for n in opts.settings.split(",") if n]
    unknown = set(names) - set(SETTINGS)
    if unknown:
        ap.error(f"unknown settings {sorted(unknown)} ({', '.join(SETTINGS)})")
    names = ["today"] + [n for n in names if n != "today"]
    for anatomy in opts.anatomy:
        run_anatomy(anatomy, tuple(opts.shape), opts.voxel, opts.pairs, names)


if __name__ == "__main__":
    main()
