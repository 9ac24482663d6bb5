"""End to end: one HCP-size subject through `dmriflow run` vs the MRtrix3 script.

Generates one subject in the HCP layout (default 145 x 174 x 145 x 288
float32 = 4.2 GB; ``--shape`` for a quick run) as ``data.nii.gz`` written by
zlib at gzip's default level 6, as FSL/HCP files are: signal in a brain
ellipsoid (the mask), a Rician noise floor in a slightly larger head, zeros
outside (about the 3.5:1 ratio of a real HCP file). Then, in one run on the
same machine with the same threads (2):

* ``dmriflow run IN OUT --worker cf --n-procs 2`` (validate + DTI + RISH +
  export), progress lines timestamped to split read / fit / write;
* the MRtrix3 script of the same work, every command ``-nthreads 2``::

      mrconvert data.nii.gz -fslgrad bvecs bvals dwi.mif
      dwiextract dwi.mif -shells 0,1000 - | dwi2tensor - -mask mask tensor.mif
      tensor2metric tensor.mif -fa -adc -ad -rd -vec (each .nii.gz)
      for each shell: dwiextract dwi.mif -shells 0,b - | amp2sh - sh_b.mif; sh2power

* the floor: decompression alone (inflate data.nii.gz with CRC and sha256,
  the bytes discarded; ISA-L and zlib, one thread).

Peak RSS of every process (VmHWM polled from /proc every POLL_S for the whole
process tree; ``RUSAGE_CHILDREN`` as a check of the largest one). Targets
(issue 14): dmriflow >= 4x the script; largest process <= 1.5x the input's
float32 size. Ends with one line of key=value figures (GB = 1e9 bytes).

Run: ``nice .venv/bin/python bench/e2e.py [--shape X Y Z N] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import synthetic  # bench/synthetic.py (this folder is on sys.path when run as a script)

HCP_SHAPE = (145, 174, 145, 288)
N_B0 = 18
SHELLS = (1000.0, 2000.0, 3000.0)
B0_STORED = 5.0              # HCP stores its b0 volumes at b=5
SNR = 25.0
S0_MEAN = synthetic.S0_MEAN
#: brain (mask) and head ellipsoid semi-axes as fractions of the grid
BRAIN_AXES = (0.40, 0.42, 0.40)
HEAD_AXES = (0.46, 0.48, 0.46)
#: gzip level of the generated input (gzip's and FSL's default)
INPUT_LEVEL = 6
THREADS = 2
POLL_S = 0.1
SUBJECT = "100307"
TARGET_SPEEDUP = 4.0
TARGET_RSS_RATIO = 1.5


# ----------------------------------------------------------------------------
# The subject
# ----------------------------------------------------------------------------
def gradients(n_vol: int, rng) -> tuple[np.ndarray, np.ndarray]:
    from dmriflow.interfaces.gradients import spiral_directions
    n_dir = (n_vol - N_B0) // len(SHELLS)
    if N_B0 + n_dir * len(SHELLS) != n_vol:
        raise SystemExit(f"{n_vol} volumes is not {N_B0} b0 + {len(SHELLS)} equal shells")
    d = spiral_directions(n_dir)
    bvals = np.r_[np.full(N_B0, B0_STORED), np.repeat(SHELLS, n_dir)]
    bvecs = np.r_[np.zeros((N_B0, 3)), np.tile(d, (len(SHELLS), 1))]
    order = rng.permutation(n_vol)
    return bvals[order], bvecs[order]


def ellipsoid(grid, axes) -> np.ndarray:
    g = np.ogrid[tuple(slice(0, n) for n in grid)]
    return sum(((x - (n - 1) / 2) / (a * n)) ** 2 for x, n, a in zip(g, grid, axes)) <= 1.0


def write_subject(root: Path, shape, seed: int = 0) -> dict:
    """HCP layout: <root>/<id>/T1w/Diffusion/{data.nii.gz, bvals, bvecs,
    nodif_brain_mask.nii.gz}; written volume by volume through one zlib
    stream (memory: one volume plus the per-voxel tensors)."""
    rng = np.random.default_rng(seed)
    d = root / SUBJECT / "T1w" / "Diffusion"
    d.mkdir(parents=True, exist_ok=True)
    grid, n_vol = tuple(shape[:3]), shape[3]
    bvals, bvecs = gradients(n_vol, rng)
    np.savetxt(d / "bvals", bvals[None], fmt="%g")
    np.savetxt(d / "bvecs", bvecs.T, fmt="%.8f")
    affine = np.diag([-1.25, 1.25, 1.25, 1.0])
    affine[:3, 3] = [90.0, -126.0, -72.0]
    brain, head = ellipsoid(grid, BRAIN_AXES), ellipsoid(grid, HEAD_AXES)
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), d / "nodif_brain_mask.nii.gz")
    inside = np.flatnonzero(brain.ravel(order="F"))
    rim = np.flatnonzero((head & ~brain).ravel(order="F"))   # noise floor only
    m = inside.size
    params, s0 = synthetic.tissue_tensors(m, rng)
    sigma = np.float32(S0_MEAN / SNR)
    vol = np.zeros(int(np.prod(grid)), np.float32)
    t = time.perf_counter()
    comp = zlib.compressobj(INPUT_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    with open(d / "data.nii.gz", "wb") as fh:
        fh.write(comp.compress(synthetic.float32_header(shape, affine)))
        for k in range(n_vol):
            S = synthetic.signal(params, s0, bvals[k], bvecs[k])
            vol[inside] = np.hypot(S + sigma * rng.standard_normal(m, dtype=np.float32),
                                   sigma * rng.standard_normal(m, dtype=np.float32))
            vol[rim] = sigma * np.hypot(rng.standard_normal(rim.size, dtype=np.float32),
                                        rng.standard_normal(rim.size, dtype=np.float32))
            fh.write(comp.compress(vol.data))
        fh.write(comp.flush())
    return {"write_s": time.perf_counter() - t, "mask_voxels": m,
            "input_bytes": int(np.prod(shape)) * 4}


def subject_dir(root: Path) -> Path:
    return root / SUBJECT / "T1w" / "Diffusion"


# ----------------------------------------------------------------------------
# Running and watching processes
# ----------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _hwm(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            text = fh.read()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    m = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
    return (cmd, int(m.group(1)) * 1024) if m else None


def run_watched(cmd, *, shell: bool = False, cwd=None, env=None) -> dict:
    """Run ``cmd``; its wall time, output and the peak RSS of each process of
    its tree (polled), keyed by pid with the command line."""
    peaks: dict[int, tuple[str, int]] = {}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=shell, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    import threading
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        for pid in _tree(proc.pid):
            got = _hwm(pid)
            if got and got[1] >= peaks.get(pid, ("", 0))[1]:
                peaks[pid] = got
        time.sleep(POLL_S)
    reader.join()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write("".join(lines[-40:]))
        raise SystemExit(f"{cmd!r} failed with exit code {proc.returncode}")
    return {"wall_s": wall, "peaks": peaks, "output": "".join(lines)}


def peak_of(runs) -> tuple[int, str]:
    best = (0, "")
    for r in runs:
        for cmd, rss in r["peaks"].values():
            if rss > best[0]:
                best = (rss, cmd)
    return best


# ----------------------------------------------------------------------------
# The three measurements
# ----------------------------------------------------------------------------
def floor(d: Path) -> dict:
    """Decompression alone: inflate data.nii.gz (CRC and length checked, sha256
    of the file) and discard the bytes, per codec, one thread."""
    from dmriflow.interfaces import codec
    out = {}
    for name in codec.CODECS:
        t = time.perf_counter()
        codec.inflate(d / "data.nii.gz", lambda b: None, name)
        out[name] = time.perf_counter() - t
    return out


def mrtrix_script(d: Path, work: Path, shells) -> list[tuple[str, str]]:
    n = f"-nthreads {THREADS} -quiet -force"
    steps = [("read", f"mrconvert {n} {d}/data.nii.gz -fslgrad {d}/bvecs {d}/bvals "
                      f"{work}/dwi.mif"),
             ("fit", f"dwiextract {n} {work}/dwi.mif -shells 0,1000 - | "
                     f"dwi2tensor {n} - -mask {d}/nodif_brain_mask.nii.gz {work}/tensor.mif"),
             ("fit", f"tensor2metric {n} {work}/tensor.mif -fa {work}/fa.nii.gz "
                     f"-adc {work}/md.nii.gz -ad {work}/ad.nii.gz -rd {work}/rd.nii.gz "
                     f"-vec {work}/v1.nii.gz")]
    for b in shells:
        steps.append(("fit", f"dwiextract {n} {work}/dwi.mif -shells {b:g} - | "
                             f"amp2sh {n} - {work}/sh_b{b:g}.mif"))
        steps.append(("fit", f"sh2power {n} {work}/sh_b{b:g}.mif {work}/power_b{b:g}.nii.gz"))
    return steps


def node_times(output: str, start: float) -> dict:
    """Seconds from the run's start at which each node kind finished (progress lines)."""
    t0 = time.localtime(start)
    base = t0.tm_hour * 3600 + t0.tm_min * 60 + t0.tm_sec + (start % 1)
    done = {}
    for m in re.finditer(r"\[dmriflow (\d\d):(\d\d):(\d\d)\] (\w+)", output):
        h, mi, s, node = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
        done[node] = max(0.0, h * 3600 + mi * 60 + s - base)
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=4, default=HCP_SHAPE)
    ap.add_argument("--keep", help="write the subject here and keep it (reused when there)")
    args = ap.parse_args()
    for tool in ("mrconvert", "dwiextract", "dwi2tensor", "tensor2metric", "amp2sh", "sh2power"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not on PATH: the MRtrix3 peer is required")
    dmriflow = str(Path(sys.executable).with_name("dmriflow"))
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        tmp = Path(tmp)
        root = Path(args.keep) if args.keep else tmp / "in"
        d = subject_dir(root)
        input_bytes = int(np.prod(args.shape)) * 4
        if not (d / "data.nii.gz").exists() or nib.load(d / "data.nii.gz").shape != \
                tuple(args.shape):
            t = time.perf_counter()
            info = write_subject(root, args.shape)
            print(f"generated {tuple(args.shape)} in {time.perf_counter() - t:.0f} s, "
                  f"{info['mask_voxels']} mask voxels")
        gz = (d / "data.nii.gz").stat().st_size
        print(f"input: {input_bytes / 1e9:.2f} GB float32, data.nii.gz {gz / 1e9:.2f} GB "
              f"(level {INPUT_LEVEL}); load average {os.getloadavg()[0]:.2f}")
        shells = sorted({float(b) for b in np.loadtxt(d / "bvals").ravel() if b > 50})

        fl = floor(d)
        print("floor (inflate + CRC + sha256, bytes discarded, 1 thread): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in fl.items()))

        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
        start = time.time()
        ours = run_watched([dmriflow, "run", str(root), str(tmp / "out"), "--worker", "cf",
                            "--n-procs", str(THREADS)], env=env)
        nodes = node_times(ours["output"], start)
        shutil.rmtree(tmp / "out")

        work = tmp / "mrtrix"
        work.mkdir()
        theirs = {"read": 0.0, "fit": 0.0}
        mr_runs = []
        for phase, cmd in mrtrix_script(d, work, shells):
            r = run_watched(cmd, shell=True)
            theirs[phase] += r["wall_s"]
            mr_runs.append(r)
        mr_wall = sum(r["wall_s"] for r in mr_runs)
        shutil.rmtree(work)
    children_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024

    ratio = mr_wall / ours["wall_s"]
    our_peak = peak_of([ours])[0]
    mr_peak = peak_of(mr_runs)[0]
    print(f"\n{'':<34}{'wall s':>8}{'peak RSS GB':>13}{'x input':>9}")
    print(f"{'dmriflow run (cf, 2 procs)':<34}{ours['wall_s']:>8.1f}{our_peak / 1e9:>13.2f}"
          f"{our_peak / input_bytes:>9.2f}")
    print(f"{'MRtrix3 script (-nthreads 2)':<34}{mr_wall:>8.1f}{mr_peak / 1e9:>13.2f}"
          f"{mr_peak / input_bytes:>9.2f}")
    print("\ndmriflow processes (peak RSS GB):")
    for cmd, rss in sorted(ours["peaks"].values(), key=lambda x: -x[1]):
        print(f"  {rss / 1e9:6.2f}  {cmd[:100]}")
    print("MRtrix3 commands (wall s, peak RSS GB of the largest process):")
    for (phase, cmd), r in zip(mrtrix_script(Path("D"), Path("W"), shells), mr_runs):
        rss = max(v[1] for v in r["peaks"].values()) if r["peaks"] else 0
        print(f"  {r['wall_s']:6.1f} {rss / 1e9:6.2f}  {cmd.split(' -nthreads')[0]} ...")
    order = [("Validate", "read"), ("FitTensor", "fit"), ("FitRish", "fit"), ("Export", "write")]
    print("dmriflow node finish times (s from start, 1 s resolution): "
          + ", ".join(f"{n} {nodes[n]:.0f}" for n, _ in order if n in nodes))
    read_s = nodes.get("Validate", float("nan"))
    fit_s = max(nodes.get("FitTensor", 0), nodes.get("FitRish", 0)) - read_s
    write_s = nodes.get("Export", float("nan")) - read_s - fit_s
    rest_s = ours["wall_s"] - nodes.get("Export", float("nan"))
    print(f"split: read {read_s:.0f} s (floor {min(fl.values()):.1f} s), fit {fit_s:.0f} s, "
          f"export {write_s:.0f} s, engine start/finish + report {rest_s:.0f} s; "
          f"MRtrix3 read {theirs['read']:.1f} s, fit+write {theirs['fit']:.1f} s")
    print(f"RUSAGE_CHILDREN max RSS (largest child of this bench): {children_max / 1e9:.2f} GB")
    print(f"e2e_dmriflow_s={ours['wall_s']:.1f} e2e_mrtrix_s={mr_wall:.1f} e2e_ratio={ratio:.2f} "
          f"e2e_target_ratio={TARGET_SPEEDUP} dmriflow_peak_rss_gb={our_peak / 1e9:.2f} "
          f"rss_ratio={our_peak / input_bytes:.2f} rss_target={TARGET_RSS_RATIO} "
          f"mrtrix_peak_rss_gb={mr_peak / 1e9:.2f} floor_isal_s={fl.get('isal', float('nan')):.1f} "
          f"floor_zlib_s={fl['zlib']:.1f} input_gb={input_bytes / 1e9:.2f} "
          f"gz_gb={gz / 1e9:.2f}")


if __name__ == "__main__":
    main()
