"""Cohort throughput and memory: the whole pipeline with the cf worker.

Default mode: N synthetic phantom subjects (realistic-but-small grid,
48 x 58 x 48 at 2.5 mm, 6 b0 + 3 shells x 30 directions) run through the
CPU pipeline (validate, tensor, RISH, export) with the cf worker at 1 and 2
processes, each from an empty cache. Reports subjects per hour and memory.

``--hcp``: one HCP-size subject (145 x 174 x 145, 288 volumes: 18 b0 + 90
directions at b=1000/2000/3000; 4.2 GB float32, written volume by volume by
bench/memory.py's writer as uncompressed NIfTI in a BIDS layout) through the
whole CPU pipeline with two cf workers (``--preprocess`` adds MP-PCA and
Gibbs removal). Reports wall time and peak memory. Needs ~16 GB free.

Memory, per run (each run in a fresh child process, so its figures are its
own): ``worker_peak_rss_gb`` is the largest kernel high-water mark (VmHWM,
/proc/PID/status) of any worker process, read every 0.2 s (VmHWM only
grows, so sampling misses at most a peak reached in a worker's last 0.2 s);
``children_maxrss_gb`` is getrusage(RUSAGE_CHILDREN).ru_maxrss after the
workers exited (the kernel's exact figure for the largest worker);
``tree_peak_rss_gb`` is the largest sampled sum of VmRSS over the submitter
and its workers (what the run needed at once; shared pages counted in each
process); ``submitter_peak_rss_gb`` the submitter's own VmHWM.

Usage: nice -n 10 .venv/bin/python bench/cohort.py [--subjects 8] [--procs 1 2]
       nice -n 10 .venv/bin/python bench/cohort.py --hcp [--preprocess]
Prints key=value rows (GB = 1e9 bytes); ``load_avg_1min`` (at the end of the
run) says how busy the machine was, which matters on a shared one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SMALL_SHAPE = (48, 58, 48)
SMALL_SCHEME = dict(n_b0=6, shells=(1000, 2000, 3000), n_dirs=30, seed=0)
HCP_SHAPE = (145, 174, 145, 288)
#: Seconds between /proc samples of the process tree.
SAMPLE_S = 0.2
#: Free memory (GB, MemAvailable) the HCP mode waits for before starting.
HCP_NEEDS_GB = 16.0
GB = 1e9


# ----------------------------------------------------------------------------
# /proc sampling of a process tree
# ----------------------------------------------------------------------------
def _status_kb(pid: int, keys=("VmHWM", "VmRSS")) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


class TreeSampler(threading.Thread):
    """Samples VmHWM/VmRSS of this process's descendants every SAMPLE_S."""

    def __init__(self):
        super().__init__(daemon=True)
        self.worker_hwm: dict[int, int] = {}
        self.tree_peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._halt.is_set():
            total = _status_kb(me).get("VmRSS", 0)
            for pid in _descendants(me):
                st = _status_kb(pid)
                if st:
                    self.worker_hwm[pid] = max(self.worker_hwm.get(pid, 0), st.get("VmHWM", 0))
                    total += st.get("VmRSS", 0)
            self.tree_peak = max(self.tree_peak, total)
            self._halt.wait(SAMPLE_S)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# ----------------------------------------------------------------------------
# One run (child process)
# ----------------------------------------------------------------------------
def child(input_dir: str, output_dir: str, n_procs: int, preprocess: bool) -> dict:
    """Run the cohort with cf/n_procs in this process; measure time and memory."""
    from dmriflow.pipelines.execution import RunConfig, run_cohort
    from dmriflow.pipelines.inputs import discover
    subjects = discover(input_dir)
    cfg = RunConfig(worker="cf", n_procs=n_procs, cache_dir=str(Path(output_dir, "cache")),
                    quiet=True, denoise=preprocess, degibbs=preprocess)
    sampler = TreeSampler()
    sampler.start()
    t = time.perf_counter()
    result = run_cohort(subjects, output_dir, cfg)
    wall = time.perf_counter() - t
    sampler.stop()
    return {"wall_s": wall, "subjects": len(subjects),
            "done": sum(r["status"] == "done" for r in result.rows),
            "worker_peak_rss": max(sampler.worker_hwm.values(), default=0),
            "workers_seen": len(sampler.worker_hwm),
            "tree_peak_rss": sampler.tree_peak,
            "children_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "submitter_peak_rss": _status_kb(os.getpid())["VmHWM"],
            "median_fa": [r.get("median_fa") for r in result.rows],
            "load": os.getloadavg()[0]}


def measure(input_dir: Path, output_dir: Path, n_procs: int, preprocess: bool = False) -> dict:
    """:func:`child` in a fresh interpreter, so its rusage covers only its workers."""
    cmd = [sys.executable, __file__, "--child", str(input_dir), str(output_dir), str(n_procs)]
    cmd += ["--preprocess"] if preprocess else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"run with {n_procs} process(es) failed ({proc.returncode})")
    return json.loads(proc.stdout.split("REPORT ", 1)[1])


def _row(prefix: str, rep: dict, **extra) -> str:
    per_hour = 3600.0 * rep["done"] / rep["wall_s"]
    fields = {**extra, "subjects": rep["subjects"], "done": rep["done"],
              "wall_s": f"{rep['wall_s']:.1f}", "subjects_per_hour": f"{per_hour:.0f}",
              "worker_peak_rss_gb": f"{rep['worker_peak_rss'] / GB:.2f}",
              "children_maxrss_gb": f"{rep['children_maxrss'] / GB:.2f}",
              "tree_peak_rss_gb": f"{rep['tree_peak_rss'] / GB:.2f}",
              "submitter_peak_rss_gb": f"{rep['submitter_peak_rss'] / GB:.2f}",
              "workers_seen": rep["workers_seen"], "load_avg_1min": f"{rep['load']:.1f}"}
    return " ".join(f"{prefix}_{k}={v}" for k, v in fields.items())


# ----------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------
def cohort_mode(args, tmp: Path) -> None:
    from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
    t = time.perf_counter()
    write_cohort(tmp / "in", args.subjects, shape=tuple(args.shape), seed=0,
                 scheme=hcp_scheme(**SMALL_SCHEME), n_jobs=2)
    n_vol = SMALL_SCHEME["n_b0"] + len(SMALL_SCHEME["shells"]) * SMALL_SCHEME["n_dirs"]
    print(f"{args.subjects} subjects {tuple(args.shape)} x {n_vol} volumes written in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    reports = {}
    for n in args.procs:
        reports[n] = rep = measure(tmp / "in", tmp / f"out{n}", n)
        print(_row("cohort", rep, n_procs=n, shape="x".join(map(str, args.shape)),
                   volumes=n_vol), flush=True)
        shutil.rmtree(tmp / f"out{n}")
    if len(reports) > 1:
        first, last = min(reports), max(reports)
        assert reports[first]["median_fa"] == reports[last]["median_fa"], "results differ"
        print(f"cohort_speedup_{last}_vs_{first}_procs="
              f"{reports[first]['wall_s'] / reports[last]['wall_s']:.2f}")


def _mem_available_gb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB
    return 0.0


def hcp_mode(args, tmp: Path) -> None:
    sys.path.insert(0, str(BENCH_DIR))
    import numpy as np
    from memory import write_subject    # bench/memory.py: the HCP-size writer
    free = _mem_available_gb()
    if free < HCP_NEEDS_GB:
        raise SystemExit(f"only {free:.1f} GB available, the HCP run needs ~{HCP_NEEDS_GB:g}: "
                         f"retry when the machine is quieter")
    raw = tmp / "raw"
    raw.mkdir()
    t = time.perf_counter()
    info = write_subject(str(raw), HCP_SHAPE, np.random.default_rng(0))
    dwi = tmp / "in" / "sub-hcp" / "dwi"
    mask = tmp / "in" / "derivatives" / "masks" / "sub-hcp" / "dwi"
    dwi.mkdir(parents=True)
    mask.mkdir(parents=True)
    (tmp / "in" / "dataset_description.json").write_text(
        json.dumps({"Name": "bench", "BIDSVersion": "1.9.0"}))
    for src, dst in (("dwi.nii", dwi / "sub-hcp_dwi.nii"), ("bvals", dwi / "sub-hcp_dwi.bval"),
                     ("bvecs", dwi / "sub-hcp_dwi.bvec"),
                     ("mask.nii", mask / "sub-hcp_desc-brain_mask.nii")):
        os.replace(raw / src, dst)
    print(f"HCP subject {HCP_SHAPE} float32 {info['input_bytes'] / GB:.2f} GB, "
          f"{info['mask_voxels']} mask voxels, written in {time.perf_counter() - t:.0f} s; "
          f"{free:.1f} GB available", flush=True)
    rep = measure(tmp / "in", tmp / "out", 2, preprocess=args.preprocess)
    steps = "validate+" + ("preprocess+" if args.preprocess else "") + "tensor+rish+export"
    print(_row("hcp", rep, n_procs=2, steps=steps,
               input_gb=f"{info['input_bytes'] / GB:.2f}", mask_voxels=info["mask_voxels"]))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        rep = child(sys.argv[2], sys.argv[3], int(sys.argv[4]), "--preprocess" in sys.argv)
        print("REPORT " + json.dumps(rep))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--shape", type=int, nargs=3, default=list(SMALL_SHAPE))
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--hcp", action="store_true", help="one full HCP-size subject instead")
    ap.add_argument("--preprocess", action="store_true",
                    help="--hcp: also MP-PCA denoising and Gibbs removal")
    ap.add_argument("--tmp", help="scratch folder (default: system temporary folder)")
    args = ap.parse_args()
    if args.tmp:
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dmriflow-bench-cohort-", dir=args.tmp) as tmp:
        (hcp_mode if args.hcp else cohort_mode)(args, Path(tmp))


if __name__ == "__main__":
    main()
