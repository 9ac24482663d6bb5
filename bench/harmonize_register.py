"""Benchmark: harmonization fit registration, serial vs one node per subject.

Times ``harmonize.register_fa`` (the default affine + SyN) of phantom FA maps
(truth FA in the brain mask, seeds 200..) to the first subject's FA, on a
given grid, one registration at a time. The fit registers
``N_ref - 1 + N_ref`` times for the 2-round template and ``N_ref + N_tar``
times to the final template. Serial fit (before): all of them one after
another. Per-subject nodes (now): three waves (template round 1, round 2,
final), each ``ceil(subjects / workers)`` registrations deep. Printed per
subject of the cohort; the node figure is an estimate from the measured
registration time (scheduling and the combine node not included).

Run: ``.venv/bin/python bench/harmonize_register.py [--shape X Y Z]
[--voxel MM] [--per-site N] [--workers W] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from dmriflow.interfaces import harmonize as H
from dmriflow.interfaces.sim import phantom


def fa_map(shape, voxel: float, seed: int, anatomy: str = "geometric"):
    """A phantom subject's masked truth FA and affine (one-direction scheme: cheap)."""
    s = phantom.simulate_subject(shape, seed=seed, snr=None, voxel_size=voxel,
                                 scheme=phantom.hcp_scheme(n_b0=1, shells=(1000,), n_dirs=6),
                                 anatomy=anatomy)
    return np.where(s.mask, s.truth["fa"], 0).astype(np.float32), s.affine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(58, 70, 58))
    ap.add_argument("--voxel", type=float, default=2.5)
    ap.add_argument("--per-site", type=int, default=10)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    opts = ap.parse_args()
    static, static_affine = fa_map(opts.shape, opts.voxel, 200)
    times = []
    for k in range(opts.repeats):
        moving, moving_affine = fa_map(opts.shape, opts.voxel, 201 + k)
        t0 = time.perf_counter()
        H.register_fa(moving, moving_affine, static, static_affine)
        times.append(time.perf_counter() - t0)
    t_reg = float(np.median(times))
    n = opts.per_site
    n_sub = 2 * n
    serial = t_reg * ((2 * n - 1) + n_sub) / n_sub
    waves = (math.ceil((n - 1) / opts.workers) + math.ceil(n / opts.workers)
             + math.ceil(n_sub / opts.workers))
    nodes = t_reg * waves / n_sub
    print(f"registration_s={t_reg:.1f} shape={'x'.join(map(str, opts.shape))} "
          f"voxel_mm={opts.voxel} n_subjects={n_sub} workers={opts.workers} "
          f"fit_registration_s_per_subject_serial={serial:.1f} "
          f"fit_registration_s_per_subject_nodes_est={nodes:.1f}")


if __name__ == "__main__":
    main()
