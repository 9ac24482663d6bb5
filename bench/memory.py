"""Benchmark: peak memory of the DTI step on a full HCP-size subject.

A synthetic subject of HCP size (145 x 174 x 145 x 288 float32, 4.2 GB:
18 b0 + 90 directions at b=1000/2000/3000) is written to a temporary
directory as an uncompressed .nii with bvals, bvecs and a brain-like
ellipsoid mask. Writing goes volume by volume (NIfTI stores volume k as one
contiguous block), so generating it needs only one volume plus the
per-voxel tensors in memory.

A fresh subprocess then runs what the pipeline's tensor node runs:
``io.load_dwi`` + ``dti.fit_dwi`` + all exported maps, and reports its peak
resident set size (``VmHWM`` from /proc/self/status; ``ru_maxrss`` as a
check), per phase (the peak is reset between phases through
/proc/self/clear_refs where the kernel allows it) and split into anonymous
memory and mapped file pages. Target: peak <= 1.5 x the input's float32 size.

Run: ``.venv/bin/python bench/memory.py [--shape X Y Z N] [--keep DIR]``.
Ends with one line of key=value figures (GB = 1e9 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
import synthetic  # bench/synthetic.py (this folder is on sys.path when run as a script)

from dmriflow.interfaces.gradients import spiral_directions as directions

HCP_SHAPE = (145, 174, 145, 288)
N_B0 = 18
SHELLS = (1000.0, 2000.0, 3000.0)
SNR = 25.0
#: fewest directions per shell of a scaled scheme (an SH fit of order 4 needs 15)
MIN_SHELL_DIRS = 15
S0_MEAN = synthetic.S0_MEAN
#: ellipsoid semi-axes as fractions of the grid (HCP brain masks hold
#: ~0.9-1.2 M voxels of the 3.66 M)
MASK_AXES = (0.40, 0.42, 0.40)

CHILD = r"""
import json, os, resource, sys, time
def status():
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out
def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
from dmriflow.interfaces.io import load_dwi
from dmriflow.interfaces.dti import fit_dwi
d = sys.argv[1]
rep = {"baseline": status()}
reset_peak()
t = time.perf_counter()
dwi = load_dwi(os.path.join(d, "dwi.nii"), os.path.join(d, "bvals"), os.path.join(d, "bvecs"),
               os.path.join(d, "mask.nii"))
rep["load_s"] = time.perf_counter() - t
rep["after_load"] = status()
rep["data_type"] = type(dwi.data).__name__
rep["mask_voxels"] = int(dwi.mask.sum())
rep["peak_reset"] = reset_peak()
t = time.perf_counter()
fit = fit_dwi(dwi)
maps = fit.maps()
rep["fit_s"] = time.perf_counter() - t
rep["failed"] = fit.n_failed
rep["median_fa"] = float(__import__("numpy").median(fit.fa[dwi.mask]))
rep["after_fit"] = status()
rep["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("REPORT " + json.dumps(rep))
"""


def gradients(n_vol: int):
    """HCP's scheme scaled to ``n_vol`` volumes (288: HCP's 18 b0 + 3 x 90): b0s in
    HCP's share, plus what does not split evenly, the rest in equal shells,
    interleaved as acquired."""
    n_dir = (n_vol - n_vol * N_B0 // HCP_SHAPE[3]) // len(SHELLS)
    n_b0 = n_vol - n_dir * len(SHELLS)
    if n_dir < MIN_SHELL_DIRS or n_b0 < 1:
        raise SystemExit(f"{n_vol} volumes: too few for b0s + {len(SHELLS)} shells of "
                         f"{MIN_SHELL_DIRS} directions")
    d = directions(n_dir)
    bvals = np.r_[np.full(n_b0, 5.0), np.repeat(SHELLS, n_dir)]
    bvecs = np.r_[np.zeros((n_b0, 3)), np.tile(d, (len(SHELLS), 1))]
    order = np.random.default_rng(7).permutation(n_vol)     # b0s interleaved
    return bvals[order], bvecs[order]


def ellipsoid(shape) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    r2 = sum(((g - (n - 1) / 2) / (a * n)) ** 2 for g, n, a in zip(grids, shape, MASK_AXES))
    return r2 <= 1.0


def write_subject(d: str, shape, rng) -> dict:
    """Write dwi.nii (volume by volume), mask.nii, bvals, bvecs; return sizes."""
    grid, n_vol = tuple(shape[:3]), shape[3]
    bvals, bvecs = gradients(n_vol)
    np.savetxt(os.path.join(d, "bvals"), bvals[None], fmt="%g")
    np.savetxt(os.path.join(d, "bvecs"), bvecs.T, fmt="%.8f")
    affine = np.diag([-1.25, 1.25, 1.25, 1.0])
    affine[:3, 3] = [90.0, -126.0, -72.0]
    mask = ellipsoid(grid)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), os.path.join(d, "mask.nii"))
    inside = np.flatnonzero(mask.ravel(order="F"))     # F order: as a volume is stored
    m = inside.size
    params, s0 = synthetic.tissue_tensors(m, rng)
    sigma = np.float32(S0_MEAN / SNR)
    vol = np.zeros(int(np.prod(grid)), np.float32)
    t = time.perf_counter()
    with open(os.path.join(d, "dwi.nii"), "wb") as fh:
        fh.write(synthetic.float32_header(shape, affine))
        for k in range(n_vol):
            S = synthetic.signal(params, s0, bvals[k], bvecs[k])
            re = S + sigma * rng.standard_normal(m, dtype=np.float32)
            im = sigma * rng.standard_normal(m, dtype=np.float32)
            vol[inside] = np.hypot(re, im)
            fh.write(vol.data)                          # F order == flat order here
    return {"write_s": time.perf_counter() - t, "mask_voxels": m,
            "input_bytes": int(np.prod(shape)) * 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=4, default=HCP_SHAPE)
    ap.add_argument("--keep", help="write the subject here and keep it (default: temporary)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_mem_") as tmp:
        d = args.keep or tmp
        os.makedirs(d, exist_ok=True)
        t = time.perf_counter()
        info = write_subject(d, args.shape, np.random.default_rng(0))
        gen_rss = _own_peak()
        print(f"subject {tuple(args.shape)} float32 = {info['input_bytes'] / 1e9:.2f} GB, "
              f"{info['mask_voxels']} mask voxels; written in {time.perf_counter() - t:.1f} s "
              f"(generator peak RSS {gen_rss / 1e9:.2f} GB)")
        proc = subprocess.run([sys.executable, "-c", CHILD, d], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"child failed with exit code {proc.returncode}")
        rep = json.loads(proc.stdout.split("REPORT ", 1)[1])
    gb = 1e9
    inp = info["input_bytes"]
    load, fitp = rep["after_load"], rep["after_fit"]
    peak = max(rep["ru_maxrss"], load["VmHWM"], fitp["VmHWM"])
    print(f"data as loaded by io.load_dwi: {rep['data_type']}")
    print(f"{'phase':<26}{'peak GB':>9}{'RSS GB':>9}{'anon GB':>9}{'file GB':>9}{'s':>8}")
    print(f"{'baseline (imports)':<26}{'':>9}{rep['baseline']['VmRSS'] / gb:>9.2f}"
          f"{rep['baseline']['RssAnon'] / gb:>9.2f}{rep['baseline']['RssFile'] / gb:>9.2f}")
    print(f"{'load_dwi':<26}{load['VmHWM'] / gb:>9.2f}{load['VmRSS'] / gb:>9.2f}"
          f"{load['RssAnon'] / gb:>9.2f}{load['RssFile'] / gb:>9.2f}{rep['load_s']:>8.1f}")
    label = "fit_dwi + maps" + ("" if rep["peak_reset"] else " (cumul.)")
    print(f"{label:<26}{fitp['VmHWM'] / gb:>9.2f}{fitp['VmRSS'] / gb:>9.2f}"
          f"{fitp['RssAnon'] / gb:>9.2f}{fitp['RssFile'] / gb:>9.2f}{rep['fit_s']:>8.1f}")
    print(f"ru_maxrss (whole child): {rep['ru_maxrss'] / gb:.2f} GB; failed voxels "
          f"{rep['failed']}; median FA {rep['median_fa']:.3f}")
    print(f"dti_peak_rss_gb={peak / gb:.2f} input_gb={inp / gb:.2f} rss_ratio={peak / inp:.2f} "
          f"load_s={rep['load_s']:.1f} fit_s={rep['fit_s']:.1f} mask_voxels={rep['mask_voxels']}")


def _own_peak() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
