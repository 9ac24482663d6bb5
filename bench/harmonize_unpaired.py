"""Benchmark: RISH harmonization on unpaired vs paired two-site studies.

For each design (``unpaired``: different persons per site; ``paired``: the
same persons at both sites) a harmonization is fitted on ``--n-fit`` persons
per site (:mod:`dmriflow.interfaces.sim.unpaired`: own anatomy + non-linear
warp per person, site B at 3 mm / SNR 20 with a per-order, per-shell SH
scaling, half of each site's persons with lower anisotropy in the cc) and
evaluated on ``--n-held-out`` other persons scanned at both sites.

Prints every row before/after, the two designs side by side: the site effect
(held-out, Cohen's d target - reference, Welch p, relative difference of the
means), the group effect at the target site (held-out and in-sample) and at
the reference site, FA correlation with the truth, and fit/apply time per
subject. ``--fit-cohort`` adds the evaluation ``dmriflow harmonize fit``
reports (site effect before/after on the fit cohort's own persons, no
truth) with each white-matter definition: the engine's (reference-defined
in template space), each scan's own FA mask (the engine's before), and the
truth's label. Run: ``.venv/bin/python bench/harmonize_unpaired.py [--seed N] [--site-mean median]
[--contrast rish-l2] [--template-iterations 1] [--fit-cohort]``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

from dmriflow.interfaces import harmonize as H
from dmriflow.interfaces.sim import unpaired as U

DESIGNS = ("unpaired", "paired")


def _shell(b: float) -> str:
    return "-" if math.isnan(b) else f"{b:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-fit", type=int, default=12, help="fitting persons per site")
    ap.add_argument("--n-held-out", type=int, default=12, help="held-out persons")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--registration", default="syn")
    ap.add_argument("--site-mean", default="mean", help="site-mean estimator (mean or median)")
    ap.add_argument("--anatomy", default="geometric", choices=("geometric", "brain"),
                    help="the persons' anatomy (brain: MNI152 2009 template, own warp each)")
    ap.add_argument("--shape", type=int, nargs=3, default=list(U.STUDY_SHAPE),
                    help="reference-site grid (voxels of 2.5 mm)")
    ap.add_argument("--target-voxel", type=float, default=U.SITE_B.voxel_mm,
                    help="site B's voxel size (mm)")
    ap.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    ap.add_argument("--contrast", default=H.DEFAULT_REGISTRATION_CONTRAST,
                    choices=H.REGISTRATION_CONTRASTS, help="registration contrast")
    ap.add_argument("--template-iterations", type=int, default=H.TEMPLATE_ITERATIONS,
                    help="template rounds (default %(default)s)")
    ap.add_argument("--fit-cohort", action="store_true",
                    help="also the fit cohort's evaluation per white-matter definition")
    opts = ap.parse_args()
    designs = tuple(opts.designs)
    sites = (U.SITE_A, replace(U.SITE_B, voxel_mm=opts.target_voxel))
    res = {d: U.validate(d, opts.n_fit, opts.n_held_out, opts.seed, sites,
                         anatomy=opts.anatomy, shape=opts.shape,
                         registration=opts.registration, site_mean=opts.site_mean,
                         registration_contrast=opts.contrast,
                         template_iterations=opts.template_iterations,
                         fit_cohort=opts.fit_cohort)
           for d in designs}
    print(f"fit {opts.n_fit} persons per site, held-out {opts.n_held_out} persons at both "
          f"sites, seed {opts.seed}, registration {opts.registration} through {opts.contrast}, "
          f"site mean "
          f"{opts.site_mean}, anatomy {opts.anatomy}, grid {' x '.join(map(str, opts.shape))}, "
          f"site B voxel {opts.target_voxel:g} mm, template rounds {opts.template_iterations}")
    head = " | ".join(f"{d:^40s}" for d in designs)
    print(f"{'table':16s} {'metric':14s} {'shell':>5s} | {head}")
    print(f"{'':37s} | " + " | ".join(
        f"{'d before':>8s} {'d after':>8s} {'p after':>8s} {'rel/ratio':>12s}" for _ in designs))
    for table in ("site", "group", "group_fit", "group_reference"):
        for i, row in enumerate(res[designs[0]][table]):
            cells = []
            for d in designs:
                r = res[d][table][i]
                extra = (f"{100 * r['rel_before']:+5.1f}>{100 * r['rel_after']:+5.1f}%"
                         if table == "site" else f"x{r['ratio']:.3f}")
                cells.append(f"{r['d_before']:8.2f} {r['d_after']:8.2f} {r['p_after']:8.2g} "
                             f"{extra:>12s}")
            print(f"{table:16s} {row['metric']:14s} {_shell(row['shell']):>5s} | "
                  + " | ".join(cells))
    for d in designs:
        c = res[d]["fa_corr"]
        print(f"{d}: FA correlation with the truth (held-out target scans) min before "
              f"{min(x['before'] for x in c):.3f} after {min(x['after'] for x in c):.3f}; "
              f"mean before {sum(x['before'] for x in c) / len(c):.3f} after "
              f"{sum(x['after'] for x in c) / len(c):.3f}")
    for d in designs:
        for mask, table in res[d]["fit_cohort"].items():
            print(f"{d} fit cohort, wm_mask {mask}: " + "; ".join(
                f"{r.metric} {_shell(r.shell)} {r.d_before:.2f}>{r.d_after:.2f}"
                for r in table.itertuples()) + f" | max |d| before "
                f"{table['d_before'].abs().max():.2f} after {table['d_after'].abs().max():.2f}")
    print(" ".join(f"harm_{d}_fit_s_per_subject={res[d]['fit_s_per_subject']:.2f} "
                   f"harm_{d}_apply_s_per_subject={res[d]['apply_s_per_subject']:.2f}"
                   for d in designs))


if __name__ == "__main__":
    main()
