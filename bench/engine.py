"""Engine overhead: a tiny cohort, first run and cached rerun, per node.

Targets: the cached rerun (nothing recomputed) of 1000 tiny subjects within
5 s on 2 cores (issue 14); 100 subjects within 2 s. Per node: the first
run's process-seconds per node, the work of a step's own function (one
subject's validate, tensor and RISH run in-process, no engine, divided by
three), and the difference, the engine's share (submission, hashing,
pickling, worker round trips); and the cached rerun's time per node. The
cached rerun is timed ``--reruns`` times in-process (``run_cohort``) and as
users meet it, ``dmriflow run`` again on the finished cohort (a new process:
start-up and imports included); min and median of each (the machine is shared).

Usage: python bench/engine.py [--subjects 1000] [--n-procs 2] [--reruns 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
from dmriflow.pipelines.execution import RunConfig, run_cohort
from dmriflow.pipelines.inputs import discover

TINY_SHAPE = (8, 10, 8)
TARGET_RERUN_S = {100: 2.0, 1000: 5.0}
#: Per-subject steps whose functions are timed in-process (export writes the status).
STEPS = ("validate", "tensor", "rish")


def step_seconds(subject, work: Path) -> float:
    """Seconds one subject's validate + tensor + RISH functions take in-process
    (no engine): the work a node does, to subtract from the per-node time."""
    from dmriflow.interfaces import stepfiles
    t = time.perf_counter()
    rec = stepfiles.validate_subject(subject.key, subject.dwi, subject.bval, subject.bvec,
                                     subject.mask, subject.sidecar, work / "v", rows_only=True)
    stepfiles.write_tensor_maps(rec["series"], work / "t")
    stepfiles.write_rish_maps(rec["series"], work / "r")
    return time.perf_counter() - t


def cli_seconds(tmp: Path, n_procs: int) -> float:
    """Seconds of ``dmriflow run`` on the finished cohort, in a new process."""
    cmd = [str(Path(sys.executable).with_name("dmriflow")), "run", str(tmp / "in"),
           str(tmp / "out"), "--worker", "cf", "--n-procs", str(n_procs), "--cache-dir",
           str(tmp / "cache"), "--quiet"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=100)
    ap.add_argument("--n-procs", type=int, default=2)
    ap.add_argument("--reruns", type=int, default=3, help="cached reruns timed (each way)")
    args = ap.parse_args()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dmriflow-bench-engine-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        write_cohort(tmp / "in", args.subjects, shape=TINY_SHAPE, seed=0,
                     scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=15, seed=0))
        t_sim = time.perf_counter() - t
        subjects = discover(tmp / "in")
        work_s = min(step_seconds(subjects[0], tmp / f"w{i}") for i in range(3))
        cfg = RunConfig(worker="cf", n_procs=args.n_procs, cache_dir=str(tmp / "cache"),
                        quiet=True)
        t = time.perf_counter()
        first = run_cohort(subjects, tmp / "out", cfg)
        t_first = time.perf_counter() - t
        n_nodes = len(list((tmp / "cache").glob("*/_result.pklz")))
        reruns, cli_reruns = [], []
        for _ in range(args.reruns):     # interleaved: in-process, then the command line
            t = time.perf_counter()
            again = run_cohort(subjects, tmp / "out", cfg)
            reruns.append(time.perf_counter() - t)
            cli_reruns.append(cli_seconds(tmp, args.n_procs))
        n_nodes_after = len(list((tmp / "cache").glob("*/_result.pklz")))
    t_rerun = min(reruns)
    done = sum(r["status"] == "done" for r in again.rows)
    per_node = t_first * args.n_procs / n_nodes             # process-seconds per node
    work_per_node = work_s / len(STEPS)
    print(f"{'subjects':>10} {'nodes':>7} {'simulate_s':>11} {'first_s':>8} {'rerun_s':>8} "
          f"{'ms/node':>8} {'work ms':>8} {'engine ms':>10} {'rerun ms/node':>14}")
    print(f"{args.subjects:>10} {n_nodes:>7} {t_sim:>11.1f} {t_first:>8.1f} {t_rerun:>8.2f} "
          f"{1000 * per_node:>8.0f} {1000 * work_per_node:>8.1f} "
          f"{1000 * (per_node - work_per_node):>10.0f} {1000 * t_rerun / n_nodes:>14.2f}")
    print(f"(ms/node: first-run process-seconds per node, {args.n_procs} processes; work: a "
          f"step's own function in-process; engine = the difference; load average "
          f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)")
    assert len(first.rows) == args.subjects and n_nodes_after == n_nodes
    target = TARGET_RERUN_S.get(args.subjects)
    print(f"cached rerun, {args.reruns} times: in-process min {min(reruns):.2f} s median "
          f"{statistics.median(reruns):.2f} s; command line min {min(cli_reruns):.2f} s median "
          f"{statistics.median(cli_reruns):.2f} s (target {target} s)")
    print(f"engine_subjects={args.subjects} engine_nodes={n_nodes} engine_first_run_s={t_first:.1f} "
          f"engine_per_node_ms={1000 * per_node:.0f} "
          f"engine_overhead_per_node_ms={1000 * (per_node - work_per_node):.0f} "
          f"engine_cached_rerun_s={t_rerun:.2f} "
          f"engine_cached_rerun_median_s={statistics.median(reruns):.2f} "
          f"engine_cli_rerun_s={min(cli_reruns):.2f} "
          f"engine_cli_rerun_median_s={statistics.median(cli_reruns):.2f} "
          f"engine_rerun_per_node_ms={1000 * t_rerun / n_nodes:.2f} "
          f"engine_rerun_target_s={target} engine_done={done} "
          f"engine_new_nodes_on_rerun={n_nodes_after - n_nodes}")


if __name__ == "__main__":
    main()
