"""Engine overhead: a 100-subject tiny cohort, first run and cached rerun.

Target: the cached rerun (nothing recomputed) within 2 s on 2 cores.
Usage: python bench/engine.py [--subjects 100] [--n-procs 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dmriflow.interfaces.phantom import hcp_scheme, write_cohort
from dmriflow.pipelines.execution import RunConfig, run_cohort
from dmriflow.pipelines.inputs import discover

TINY_SHAPE = (8, 10, 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=100)
    ap.add_argument("--n-procs", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dmriflow-bench-engine-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        write_cohort(tmp / "in", args.subjects, shape=TINY_SHAPE, seed=0,
                     scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=15, seed=0))
        t_sim = time.perf_counter() - t
        subjects = discover(tmp / "in")
        cfg = RunConfig(worker="cf", n_procs=args.n_procs, cache_dir=str(tmp / "cache"),
                        quiet=True)
        t = time.perf_counter()
        first = run_cohort(subjects, tmp / "out", cfg)
        t_first = time.perf_counter() - t
        n_nodes = len(list((tmp / "cache").glob("*/_result.pklz")))
        t = time.perf_counter()
        again = run_cohort(subjects, tmp / "out", cfg)
        t_rerun = time.perf_counter() - t
        n_nodes_after = len(list((tmp / "cache").glob("*/_result.pklz")))
    done = sum(r["status"] == "done" for r in again.rows)
    print(f"{'subjects':>10} {'nodes':>7} {'simulate_s':>11} {'first_s':>8} {'rerun_s':>8}")
    print(f"{args.subjects:>10} {n_nodes:>7} {t_sim:>11.1f} {t_first:>8.1f} {t_rerun:>8.2f}")
    assert len(first.rows) == args.subjects and n_nodes_after == n_nodes
    print(f"engine_subjects={args.subjects} engine_nodes={n_nodes} engine_first_run_s={t_first:.1f} "
          f"engine_per_node_ms={1000 * t_first / n_nodes:.0f} engine_cached_rerun_s={t_rerun:.2f} "
          f"engine_done={done} engine_new_nodes_on_rerun={n_nodes_after - n_nodes}")


if __name__ == "__main__":
    main()
