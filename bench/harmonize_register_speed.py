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
[--voxel MM] [--anatomy geometric brain] [--pairs N] [--first K] [--settings NAMES]``.

Measured 2026-12-04 (2 cores shared with a CI run, nice 19, OMP_NUM_THREADS=1;
wall times move with the load, compare rows of one run). Default grid, 3
pairs, all settings in one run (rows trimmed of ``voxel_mm``/``pairs``)::

  geometric setting=today              wall_s=6.0 rel_today=0.000 corr=0.8966 load1=1.83
  geometric setting=today_jitter       wall_s=5.2 rel_today=0.339 corr=0.8955
  geometric setting=syn_half           wall_s=4.9 rel_today=0.070 corr=0.8943
  geometric setting=syn_fewer          wall_s=5.2 rel_today=0.460 corr=0.8535
  geometric setting=aff_half_syn_half  wall_s=2.8 rel_today=0.241 corr=0.8924
  geometric setting=aff_fewer_syn_half wall_s=2.5 rel_today=0.188 corr=0.8917
  geometric setting=affine_only        wall_s=4.5 rel_today=0.984 corr=0.7307
  brain setting=today              wall_s=6.2 rel_today=0.000 corr=0.9874 truth_mm=0.43 truth_p95_mm=1.03 truth_mm_pairs=0.40,0.43,0.46 load1=2.50
  brain setting=today_jitter       wall_s=8.3 rel_today=0.353 corr=0.9862 truth_mm=0.46 truth_p95_mm=1.10 truth_mm_pairs=0.41,0.47,0.46
  brain setting=syn_half           wall_s=5.3 rel_today=0.578 corr=0.9817 truth_mm=0.64 truth_p95_mm=1.31 truth_mm_pairs=0.60,0.64,0.68
  brain setting=syn_fewer          wall_s=5.5 rel_today=0.250 corr=0.9868 truth_mm=0.53 truth_p95_mm=1.21 truth_mm_pairs=0.50,0.53,0.55
  brain setting=aff_half_syn_half  wall_s=2.8 rel_today=0.539 corr=0.9813 truth_mm=0.64 truth_p95_mm=1.33 truth_mm_pairs=0.60,0.64,0.68
  brain setting=aff_fewer_syn_half wall_s=2.7 rel_today=0.539 corr=0.9814 truth_mm=0.64 truth_p95_mm=1.33 truth_mm_pairs=0.60,0.64,0.68
  brain setting=affine_only        wall_s=4.9 rel_today=1.997 corr=0.9220 truth_mm=1.78 truth_p95_mm=3.08 truth_mm_pairs=1.80,1.63,1.78

Second run, default grid, 3 pairs (``--settings today,today_jitter,aff_half,aff_fewer``)::

  geometric setting=today        wall_s=6.2 rel_today=0.000 corr=0.8966 load1=2.48
  geometric setting=today_jitter wall_s=5.1 rel_today=0.339 corr=0.8955
  geometric setting=aff_half     wall_s=3.8 rel_today=0.216 corr=0.8928
  geometric setting=aff_fewer    wall_s=3.6 rel_today=0.164 corr=0.8937
  brain setting=today        wall_s=6.8 rel_today=0.000 corr=0.9874 truth_mm=0.43 truth_p95_mm=1.03 truth_mm_pairs=0.40,0.43,0.46 load1=2.30
  brain setting=today_jitter wall_s=8.0 rel_today=0.353 corr=0.9862 truth_mm=0.46 truth_p95_mm=1.10 truth_mm_pairs=0.41,0.47,0.46
  brain setting=aff_half     wall_s=3.9 rel_today=0.113 corr=0.9876 truth_mm=0.43 truth_p95_mm=1.02 truth_mm_pairs=0.40,0.43,0.46
  brain setting=aff_fewer    wall_s=3.8 rel_today=0.113 corr=0.9875 truth_mm=0.43 truth_p95_mm=1.02 truth_mm_pairs=0.40,0.43,0.46

HCP-size grid (``--shape 145 174 145 --voxel 1.25 --anatomy brain --pairs 1``,
then ``--first 2``; peak RSS 1.6 GB)::

  first=1 setting=today             wall_s=49.2 rel_today=0.000 corr=0.9983 truth_mm=0.40 truth_p95_mm=1.12 load1=1.21
  first=1 setting=today_jitter      wall_s=58.9 rel_today=0.448 corr=0.9971 truth_mm=0.39 truth_p95_mm=1.08
  first=1 setting=aff_half          wall_s=39.8 rel_today=0.020 corr=0.9983 truth_mm=0.40 truth_p95_mm=1.12
  first=1 setting=aff_fewer         wall_s=38.0 rel_today=0.020 corr=0.9983 truth_mm=0.40 truth_p95_mm=1.12
  first=1 setting=syn_half          wall_s=26.4 rel_today=0.286 corr=0.9976 truth_mm=0.44 truth_p95_mm=1.21
  first=1 setting=aff_half_syn_half wall_s=18.5 rel_today=0.288 corr=0.9976 truth_mm=0.44 truth_p95_mm=1.20
  first=2 setting=today             wall_s=62.4 rel_today=0.000 corr=0.9978 truth_mm=0.42 truth_p95_mm=1.12 load1=3.15
  first=2 setting=today_jitter      wall_s=61.0 rel_today=0.574 corr=0.9964 truth_mm=0.39 truth_p95_mm=1.03
  first=2 setting=aff_half          wall_s=43.6 rel_today=0.008 corr=0.9978 truth_mm=0.42 truth_p95_mm=1.11
  first=2 setting=aff_half_syn_half wall_s=19.9 rel_today=0.296 corr=0.9972 truth_mm=0.45 truth_p95_mm=1.18

Reading: skipping the affine's finest level (``aff_half``) changes nothing
measurable (truth error equal pair by pair, ``rel_today`` 0.01-0.22, below
the jitter's 0.34-0.57) and takes 0.70-0.81x of today's time at HCP size, 0.57-0.61x at
2.5 mm. Stopping SyN at half resolution too (``aff_half_syn_half``) is 2.7-
3.1x faster at HCP size, its image difference stays below the jitter's
(0.29-0.30 vs 0.45-0.57), but its truth error is higher by 0.03-0.04 mm
(p95 +0.06-0.08 mm; the jitter moved it by -0.01 and -0.03 mm): a small
systematic loss. At 2.5 mm the half level is 5 mm and the loss is 0.21 mm:
the setting only suits fine (HCP-like) grids. Fewer SyN iterations
(``syn_fewer``) lose accuracy without saving time; affine only is 4x worse.

Two more HCP-size pairs, 2026-12-04 (``--first 3``, then ``--first 4``, one at
a time, nice 10, OMP_NUM_THREADS=1; the machine shared with 5 other jobs,
load ~6-9: wall times are inflated and not comparable between rows here)::

  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=3 setting=today wall_s=228.0 rel_today=0.000 corr=0.9984 truth_mm=0.37 truth_p95_mm=1.00 truth_mm_pairs=0.37 load1=5.80
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=3 setting=today_jitter wall_s=251.0 rel_today=0.525 corr=0.9970 truth_mm=0.44 truth_p95_mm=1.16 truth_mm_pairs=0.44 load1=5.80
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=3 setting=aff_half wall_s=231.3 rel_today=0.115 corr=0.9984 truth_mm=0.36 truth_p95_mm=0.93 truth_mm_pairs=0.36 load1=5.80
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=3 setting=aff_half_syn_half wall_s=65.8 rel_today=0.379 corr=0.9977 truth_mm=0.38 truth_p95_mm=0.98 truth_mm_pairs=0.38 load1=5.80
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=4 setting=today wall_s=374.4 rel_today=0.000 corr=0.9983 truth_mm=0.35 truth_p95_mm=1.01 truth_mm_pairs=0.35 load1=5.96
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=4 setting=today_jitter wall_s=351.5 rel_today=0.635 corr=0.9972 truth_mm=0.38 truth_p95_mm=1.05 truth_mm_pairs=0.38 load1=5.96
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=4 setting=aff_half wall_s=168.0 rel_today=0.016 corr=0.9983 truth_mm=0.35 truth_p95_mm=1.01 truth_mm_pairs=0.35 load1=5.96
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=4 setting=aff_half_syn_half wall_s=69.8 rel_today=0.397 corr=0.9975 truth_mm=0.39 truth_p95_mm=1.07 truth_mm_pairs=0.39 load1=5.96

Over the four HCP pairs ``aff_half_syn_half`` changes the mean truth error
by +0.04, +0.03, +0.01, +0.04 mm (p95 +0.08, +0.06, -0.02, +0.06 mm); the
jitter moved it by -0.01, -0.03, +0.07, +0.03 mm; its ``rel_today``
(0.29-0.40) stays below the jitter's (0.45-0.64) in every pair; ``aff_half``
is equal or better than today in every pair. The SyN half level's loss is
+0.03 mm (1/40 voxel) on average, within the size of today's own variation
but always of one sign; end to end (``bench/harmonize.py --pipeline`` on a
1.25 mm grid, held-out subject) it raised the harmonised RISH's error against
the truth by more than today's jitter did. So ``harmonize.registration_levels``
skips only the affine's finest level, on grids of at most 1.25 mm
(``AFFINE_HALF_LEVEL_MAX_MM`` = 2.5); SyN keeps its full pyramid
(``SYN_HALF_LEVEL_MAX_MM`` = 0), as coarser grids keep both.

Session 7, the registration grid (``grid2*``: both FA maps block-averaged to
2.5 mm, registered there, the transform mapped back to the 1.25 mm grids;
``cpu_s`` = process CPU seconds, the machine shared with other jobs, nice
10, OMP_NUM_THREADS=1; ``--first 1`` with today, aff_half, grid2,
grid2_syn10, grid2_syn20, then ``--first 2``, then ``--first 3``; the first
run had no cpu_s column yet)::

  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=1 setting=today wall_s=74.5 rel_today=0.000 corr=0.9983 truth_mm=0.40 truth_p95_mm=1.12 truth_mm_pairs=0.40 load1=4.71
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=1 setting=aff_half wall_s=59.3 rel_today=0.020 corr=0.9983 truth_mm=0.40 truth_p95_mm=1.12 truth_mm_pairs=0.40 load1=4.71
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=1 setting=grid2 wall_s=26.3 rel_today=0.348 corr=0.9976 truth_mm=0.39 truth_p95_mm=0.96 truth_mm_pairs=0.39 load1=4.71
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=1 setting=grid2_syn10 wall_s=29.2 rel_today=0.429 corr=0.9973 truth_mm=0.37 truth_p95_mm=0.88 truth_mm_pairs=0.37 load1=4.71
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=1 setting=grid2_syn20 wall_s=32.3 rel_today=0.416 corr=0.9974 truth_mm=0.37 truth_p95_mm=0.86 truth_mm_pairs=0.37 load1=4.71
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=2 setting=today wall_s=89.2 cpu_s=59.7 rel_today=0.000 corr=0.9978 truth_mm=0.42 truth_p95_mm=1.12 truth_mm_pairs=0.42 load1=3.87
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=2 setting=aff_half wall_s=56.5 cpu_s=38.4 rel_today=0.008 corr=0.9978 truth_mm=0.42 truth_p95_mm=1.11 truth_mm_pairs=0.42 load1=3.87
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=2 setting=grid2 wall_s=23.9 cpu_s=16.6 rel_today=0.466 corr=0.9967 truth_mm=0.46 truth_p95_mm=1.14 truth_mm_pairs=0.46 load1=3.87
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=2 setting=grid2_syn10 wall_s=27.5 cpu_s=18.8 rel_today=0.465 corr=0.9967 truth_mm=0.43 truth_p95_mm=1.06 truth_mm_pairs=0.43 load1=3.87
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=3 setting=today wall_s=133.0 cpu_s=46.8 rel_today=0.000 corr=0.9984 truth_mm=0.37 truth_p95_mm=1.00 truth_mm_pairs=0.37 load1=5.14
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=3 setting=aff_half wall_s=164.7 cpu_s=44.4 rel_today=0.115 corr=0.9984 truth_mm=0.36 truth_p95_mm=0.93 truth_mm_pairs=0.36 load1=5.14
  anatomy=brain grid=145x174x145 voxel_mm=1.25 pairs=1 first=3 setting=grid2_syn10 wall_s=65.6 cpu_s=18.7 rel_today=0.505 corr=0.9970 truth_mm=0.42 truth_p95_mm=1.01 truth_mm_pairs=0.42 load1=5.14

Against ``aff_half`` (the rule until then) ``grid2_syn10`` moves the truth
error by -0.03, +0.01, +0.06 mm (p95 -0.24, -0.05, +0.08 mm) at 0.42-0.49x
its CPU (18.7-18.8 s against 38.4-44.4 s); today's own jitter moved it by
-0.01, -0.03, +0.07 mm in the same pairs (rows above). ``grid2`` (5 SyN
iterations on the coarse grid) lost 0.04 mm in pair 2: the grid option is
``grid2_syn10`` (``REGISTRATION_GRID_MM`` = 2.5, ``GRID_SYN_LEVEL_ITERS``).
``rel_today`` (0.43-0.51) is at the jitter's size (0.45-0.53), not below it
as the affine half level's was. It is not the default: end to end on a
half-size brain at 1.25 mm (``bench/harmonize.py --pipeline --shape 56 68
56 --grid-mm 2.5``) the held-out harmonised RISH lost more than today's
jitter (docs/harmonization.md, *Speed*).
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
#: coarse -> fine, registration grid mm). A 0 at the finest level skips it:
#: dipy upsamples the field (SyN) or keeps the transform (affine) from the
#: half-resolution level. Grid 0: the images' own grids; 2.5: both images
#: block-averaged to 2.5 mm voxels (HCP: 2x), registered there with the
#: pyramids of that grid (None: ``registration_levels`` of it), the
#: transform mapped back to the full grids (``register_fa(grid_mm=...)``).
SETTINGS = {
    "today": ("syn", H.AFFINE_LEVEL_ITERS, H.SYN_LEVEL_ITERS, 0.0),
    "today_jitter": ("syn", H.AFFINE_LEVEL_ITERS, H.SYN_LEVEL_ITERS, 0.0),
    "aff_half": ("syn", (100, 50, 0), H.SYN_LEVEL_ITERS, 0.0),
    "aff_fewer": ("syn", (50, 25, 0), H.SYN_LEVEL_ITERS, 0.0),
    "syn_half": ("syn", H.AFFINE_LEVEL_ITERS, (10, 10, 0), 0.0),
    "syn_fewer": ("syn", H.AFFINE_LEVEL_ITERS, (5, 5, 2), 0.0),
    "aff_half_syn_half": ("syn", (100, 50, 0), (10, 10, 0), 0.0),
    "aff_fewer_syn_half": ("syn", (50, 25, 0), (10, 10, 0), 0.0),
    "affine_only": ("affine", H.AFFINE_LEVEL_ITERS, H.SYN_LEVEL_ITERS, 0.0),
    "grid2": ("syn", None, H.SYN_LEVEL_ITERS, 2.5),
    "grid2_syn10": ("syn", None, H.GRID_SYN_LEVEL_ITERS, 2.5),
    "grid2_syn20": ("syn", None, (10, 10, 20), 2.5),
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
    kind, aff_iters, syn_iters, grid_mm = SETTINGS[name]
    if name == "today_jitter":
        rng = np.random.default_rng(JITTER_SEED)
        moving = np.where(moving > 0, moving + rng.normal(0.0, JITTER_FA_SD, moving.shape),
                          0).astype(np.float32)
    t0, c0 = time.perf_counter(), time.process_time()
    tr = H.register_fa(moving, moving_affine, static, static_affine, kind,
                       affine_level_iters=aff_iters, syn_level_iters=syn_iters,
                       grid_mm=grid_mm)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    warped = tr.to_template(moving)
    ref = today_warped if today_warped is not None else warped
    resid = np.sqrt(np.mean((ref[mask] - static[mask]) ** 2))
    row = {"wall_s": wall, "cpu_s": cpu,
           "rel_today": float(np.sqrt(np.mean((warped[mask] - ref[mask]) ** 2)) / resid),
           "corr": float(np.corrcoef(warped[mask], static[mask])[0, 1]), "warped": warped}
    if coords_moving is not None:
        mapped = np.stack([tr.to_template(coords_moving[..., i].astype(np.float32))
                           for i in range(3)], axis=-1)
        d = np.linalg.norm(mapped[mask] - coords_static[mask], axis=1)
        row["truth_mm"] = float(d.mean())
        row["truth_p95_mm"] = float(np.percentile(d, 95))
    return row


def run_anatomy(anatomy: str, shape, voxel: float, pairs: int, names, first: int = 1) -> None:
    """All settings on ``pairs`` moving subjects of one anatomy; prints one row per setting."""
    static, static_affine = fa_map(shape, voxel, STATIC_SEED, anatomy)
    mask = static > 0
    truth = anatomy == "brain"
    c_static = template_coords(shape, static_affine, voxel, STATIC_SEED) if truth else None
    rows = {n: [] for n in names}
    for k in range(pairs):
        seed = STATIC_SEED + first + k
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
        print(f"anatomy={anatomy} grid={grid} voxel_mm={voxel} pairs={pairs} first={first} "
              f"setting={n} "
              f"wall_s={med['wall_s']:.1f} cpu_s={med['cpu_s']:.1f} rel_today={med['rel_today']:.3f} "
              f"corr={med['corr']:.4f}{extra}"
              + (f" truth_mm_pairs={per_pair}" if truth else "") + f" load1={load:.2f}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(58, 70, 58))
    ap.add_argument("--voxel", type=float, default=2.5)
    ap.add_argument("--anatomy", nargs="+", default=["geometric", "brain"])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--first", type=int, default=1,
                    help="first moving subject (seed STATIC_SEED + FIRST)")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    opts = ap.parse_args()
    names = [n for n in opts.settings.split(",") if n]
    unknown = set(names) - set(SETTINGS)
    if unknown:
        ap.error(f"unknown settings {sorted(unknown)} ({', '.join(SETTINGS)})")
    names = ["today"] + [n for n in names if n != "today"]
    for anatomy in opts.anatomy:
        run_anatomy(anatomy, tuple(opts.shape), opts.voxel, opts.pairs, names, opts.first)


if __name__ == "__main__":
    main()
