"""Image-gradient studies at full size: the fibre-continuity phantom cohort and
the real two-TE pair (SCIENCE.md section 7, docs/image_gradient.md).

Phantom: subjects whose signal has no gradient physics and whose b0 gradient
is perpendicular to the fibre in half of the voxels, SNR 20, under several
acquisition schemes; per scheme the cohort tests of every estimator, null and
fibre-only control; then B against the fibre-only controls across SNR.
Real data: the MDT pair (TE 60 / 91 ms, Delta 26.5 /
42 ms, 2 slices): T2 map and the in-plane study. Prints tables and
key=value lines.

Usage: python bench/image_gradient_study.py [--subjects 20] [--shape 32 32 24]
       [--schemes hcp,b3000,b1000] [--estimators B,P] [--max-voxels 0]
       [--sweep-subjects 8] [--skip-phantom] [--skip-real]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dmriflow.interfaces import image_gradient as ig
from dmriflow.interfaces.studies import image_gradient as study
from dmriflow.interfaces.sim import phantom

#: Acquisition schemes of the phantom study (b0 count, shells, directions).
SCHEMES = {
    "hcp": dict(n_b0=18, shells=(1000, 2000, 3000), n_dirs=90),
    "b3000": dict(n_b0=6, shells=(3000,), n_dirs=60),
    "b1000": dict(n_b0=6, shells=(1000,), n_dirs=30),
}
#: SNR points of the sweep (inf: noise-free).
SWEEP_SNR = (float("inf"), 100.0, 50.0, 20.0, 10.0)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _fmt_p(p: float) -> str:
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def phantom_study(args) -> None:
    for name in args.schemes.split(","):
        scheme = phantom.hcp_scheme(seed=1, jitter=False, **SCHEMES[name])
        t = time.perf_counter()
        res = study.continuity_study(args.subjects, tuple(args.shape), scheme=scheme,
                                     seed=args.seed, estimators=tuple(args.estimators.split(",")),
                                     max_voxels=args.max_voxels or None)
        seconds = time.perf_counter() - t
        tests = res.tests[res.tests["stratum"] == "all"]
        rows = res.rows[res.rows["stratum"] == "all"]
        print(f"\n== phantom scheme {name}: {args.subjects} subjects of {tuple(args.shape)}, "
              f"{len(scheme)} volumes, SNR {phantom.CONTINUITY_SNR:g}, {seconds:.0f} s; "
              f"truth: gradient-fibre angle {res.truth['grad_fibre_continuity'].mean():.1f} "
              f"(continuity half) / {res.truth['grad_fibre_random'].mean():.1f} (other half)")
        print(f"{'method':<16}{'kind':<10}{'mean':>7}{'sd':>6}{'p':>9}{'median':>8}{'p':>9}"
              f"{'2D':>7}{'p':>9}{'-e3':>7}{'p':>9}{'-perp':>7}{'p':>9}")
        for method, grp in tests.groupby("method", sort=False):
            g = grp.set_index(["statistic", "test"])
            line = f"{method:<16}{grp['kind'].iloc[0]:<10}"
            for stat in ("mean", "median", "mean_2d"):
                r = g.loc[(stat, "chance")]
                line += (f"{r['mean']:>7.2f}{r['sd']:>6.2f}" if stat == "mean"
                         else f"{r['mean']:>8.2f}" if stat == "median" else f"{r['mean']:>7.2f}")
                line += f"{_fmt_p(r['p']):>9}"
            for ctrl in (ig.FIBRE_E3, ig.FIBRE_PERP):
                key = ("mean", f"vs_{ctrl}")
                line += (f"{g.loc[key, 'mean']:>7.2f}{_fmt_p(g.loc[key, 'p']):>9}"
                         if key in g.index else f"{'':>16}")
            print(line)
        wide = rows.pivot(index="subject", columns="method", values="mean")
        kv = [f"continuity_{name}_subjects={args.subjects}", f"continuity_{name}_s={seconds:.0f}"]
        for est in args.estimators.split(","):
            d = ig.paired_test(wide[est], wide[est + ig.SURROGATE_SUFFIX])
            print(f"{est} - {est}{ig.SURROGATE_SUFFIX}: {d['mean']:+.2f} deg (p {_fmt_p(d['p'])})")
            kv.append(f"continuity_{name}_{est}_minus_surrogate={d['mean']:.2f}")
        for method in wide.columns:
            r = tests[(tests["method"] == method) & (tests["statistic"] == "mean")
                      & (tests["test"] == "chance")].iloc[0]
            kv.append(f"continuity_{name}_{method}_mean={r['mean']:.2f}")
            kv.append(f"continuity_{name}_{method}_p={r['p']:.2g}")
        print(" ".join(kv))


def snr_sweep(args) -> None:
    """B against the fibre-only controls across SNR (no nulls: fast)."""
    print(f"\n== SNR sweep: {args.sweep_subjects} subjects of (24, 24, 16) per point, "
          f"mean of per-subject mean acute angles (deg)")
    print(f"{'scheme':<8}{'SNR':>6}{'B':>8}{'fibre_e3':>10}{'fibre_perp':>11}{'B-e3':>7}")
    kv = []
    for name in args.schemes.split(","):
        scheme = phantom.hcp_scheme(seed=1, jitter=False, **SCHEMES[name])
        for snr in SWEEP_SNR:
            res = study.continuity_study(args.sweep_subjects, (24, 24, 16), scheme=scheme,
                                         snr=snr, seed=args.seed, shuffle=False,
                                         surrogate=False)
            m = res.rows[res.rows["stratum"] == "all"].groupby("method")["mean"].mean()
            print(f"{name:<8}{snr:>6g}{m['B']:>8.2f}{m[ig.FIBRE_E3]:>10.2f}"
                  f"{m[ig.FIBRE_PERP]:>11.2f}{m['B'] - m[ig.FIBRE_E3]:>7.2f}")
            kv.append(f"sweep_{name}_snr{snr:g}_B={m['B']:.2f}")
    print(" ".join(kv))


def real_study(args) -> None:
    t = time.perf_counter()
    res = study.real_pair_study(args.data, seed=args.seed)
    seconds = time.perf_counter() - t
    s = res.t2_summary
    print(f"\n== real pair (MDT, TE 60/91 ms, Delta 26.5/42 ms), {res.parameters['n_voxels']} "
          f"voxels on {res.parameters['n_slices']} slices, in-plane gold standards, "
          f"{seconds:.0f} s")
    print(f"T2 (ms) in the joint mask: median {s['median_ms']:.1f}, IQR {s['p25_ms']:.1f}-"
          f"{s['p75_ms']:.1f}, 5-95% {s['p5_ms']:.1f}-{s['p95_ms']:.1f}; undefined (no decay) "
          f"{s['undefined_voxels']} of {s['n_voxels'] + s['undefined_voxels']}")
    t = res.table
    allv = t[t["stratum"] == "all"].copy()
    allv["excess"] = allv["mean"] - allv["shuffle_mean"]
    cols = ["gold", "method", "kind", "mean", "median", "mean_2d", "median_2d", "shuffle_mean",
            "excess", "p_shuffle"]
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(allv[~allv["method"].str.endswith(ig.SHUFFLE_SUFFIX)][cols]
              .round({c: 2 for c in cols[3:-1]}).round({"p_shuffle": 3}).to_string(index=False))
        strata = t[(t["gold"] == "lnb0_te60") & t["method"].isin(["B_te60", "fibre_e3", "C"])]
        print("\nFA strata (gold lnb0_te60):")
        print(strata[["method", "stratum", "n_voxels", "mean", "median", "mean_2d"]]
              .round(2).to_string(index=False))
    kv = [f"real_t2_median_ms={s['median_ms']:.1f}",
          f"real_t2_iqr_ms={s['p25_ms']:.1f}-{s['p75_ms']:.1f}",
          f"real_voxels={res.parameters['n_voxels']}", f"real_s={seconds:.0f}"]
    for r in allv[(allv["gold"] == "lnb0_te60") & (allv["kind"] != "null")].itertuples():
        kv.append(f"real_{r.method}_mean={r.mean:.2f} real_{r.method}_excess={r.excess:.2f} "
                  f"real_{r.method}_p_shuffle={r.p_shuffle:.3f}")
    print(" ".join(kv))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--shape", type=int, nargs=3, default=[32, 32, 24])
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--estimators", default="B,P",
                    help="one-series estimators (B, A, P: P on the phase of the noise)")
    ap.add_argument("--max-voxels", type=int, default=0,
                    help="evaluate a random subset per subject (0: all; A is ~25 ms per "
                         "voxel and fit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=os.fspath(SHARED_DATA))
    ap.add_argument("--skip-phantom", action="store_true")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--sweep-subjects", type=int, default=8,
                    help="subjects per point of the SNR sweep (0: no sweep)")
    args = ap.parse_args()
    np.seterr(all="ignore")
    if not args.skip_phantom:
        phantom_study(args)
        if args.sweep_subjects:
            snr_sweep(args)
    if not args.skip_real:
        real_study(args)


if __name__ == "__main__":
    main()
