"""Benchmark: MP-PCA denoising, dmriflow vs dipy vs MRtrix3 (and Gibbs removal).

One phantom block, generated here: 96x96x60 voxels (2.5 mm), 6 b0 + 3 shells
x 30 directions = 96 volumes, Rician noise at SNR 20, with its brain mask
and its noise-free series. Every tool denoises the brain (5x5x5 patches,
MRtrix3's choice for <= 125 volumes) in its own child process, in the same
run, from the same uncompressed NIfTI. "compute s" is the call itself
(imports and file reading excluded; for MRtrix3 the whole command, its file
I/O included), "process s" the child's whole life, "peak GB" the child's
``ru_maxrss`` (everything: input, output, libraries; importing torch alone
is ~0.4 GB), "CPU s" the CPU time of the call (for MRtrix3 the command's
user + system time): on a shared machine the CPU-time ratio is steadier than
the wall-time one:

* dmriflow ``mppca``: Exp2 every voxel (what dwidenoise does), Exp2 stride 2
  (the pipeline's default), Exp1/"veraart" every voxel (what dipy does).
* dipy ``mppca`` (patch_radius 2, Exp1), with OPENBLAS_NUM_THREADS=1: with
  its default two OpenBLAS threads it ran ~40x slower on the shared 2-core
  machine this was written on (tiny per-patch BLAS calls); we give it its
  best setting.
* MRtrix3 ``dwidenoise -extent 5 -mask -nthreads 2`` (Exp2, float32).

Agreement: dmriflow "veraart" vs dipy (relative Frobenius difference in the
mask); dmriflow Exp2 vs dwidenoise (correlation, relative difference, median
noise-map ratio). Quality: RMSE against the noise-free block / RMSE of the
noisy block, and the median noise map / true sigma.

Gibbs removal on the first ``--gibbs-volumes`` volumes: dmriflow's default
engine ("kellner": mrdegibbs' discretisation) and its dipy-equal one ("fast")
vs dipy's ``gibbs_removal`` vs ``mrdegibbs -nthreads 2``.

Run: ``.venv/bin/python bench/denoise.py [--shape 96 96 60]``. Ends with one
line of key=value figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import nibabel as nib
import numpy as np

SNR = 20.0
N_B0 = 6
SHELLS = (1000, 2000, 3000)
N_DIRS = 30
PATCH_RADIUS = 2
#: Gibbs rows: the default engine (the original method's discretisation, as
#: mrdegibbs) and the dipy-equal one.
G_OURS = "dmriflow degibbs (kellner)"
G_DIPY_EQUAL = "dmriflow degibbs (fast, =dipy)"

CHILD = r"""
import json, sys, time, os
import numpy as np, nibabel as nib
tool, cfg, src, mask_path, out = sys.argv[1], json.loads(sys.argv[2]), *sys.argv[3:6]
if tool.startswith("ours"):            # imports (torch ~1 s) before the clock
    import torch
    from dmriflow.interfaces.parallel import available_threads
    from dmriflow.interfaces.preprocess import degibbs, mppca
    workers = available_threads()     # what mppca/degibbs use by default
else:
    workers = None
    from dipy.denoise.gibbs import gibbs_removal
    from dipy.denoise.localpca import mppca
data = np.asarray(nib.load(src).get_fdata(dtype=np.float32))
mask = np.asarray(nib.load(mask_path).dataobj) > 0
t, c = time.perf_counter(), time.process_time()
if tool == "ours":
    den, sigma = mppca(data, mask, **cfg)
elif tool == "dipy":
    with np.errstate(invalid="ignore"):
        den, sigma = mppca(data, mask=mask, return_sigma=True, **cfg)
elif tool == "ours_gibbs":
    den, sigma = degibbs(data, **cfg), None
elif tool == "dipy_gibbs":
    den, sigma = gibbs_removal(data, inplace=True, **cfg), None
seconds, cpu = time.perf_counter() - t, time.process_time() - c
np.save(out + "_den.npy", np.asarray(den, dtype=np.float32))
if sigma is not None:
    np.save(out + "_sigma.npy", np.asarray(sigma, dtype=np.float32))
print(json.dumps({"seconds": seconds, "cpu": cpu, "workers": workers}))
"""


#: Spawns the measured command and reports its rusage: a child forked from
#: this (large) process would inherit our RSS as its high-water mark.
LAUNCHER = ("import os, subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[1:])\n"
            "_, status, usage = os.wait4(p.pid, 0)\n"
            "print('MAXRSS_KB', usage.ru_maxrss, file=sys.stderr)\n"
            "print('CPU_S', usage.ru_utime + usage.ru_stime, file=sys.stderr)\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def timed(cmd, env=None) -> tuple[float, float, str, float]:
    """Run ``cmd`` as a grandchild; (wall s, its peak RSS in GB, its stdout, its
    CPU s: user + system, all threads; fairer than wall on a shared machine)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *map(str, cmd)],
                          capture_output=True, env=env)
    wall = time.perf_counter() - t
    err = proc.stderr.decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} failed: {err[-2000:]}")
    kb = [int(line.split()[1]) for line in err.splitlines() if line.startswith("MAXRSS_KB")]
    cpu = [float(line.split()[1]) for line in err.splitlines() if line.startswith("CPU_S")]
    return wall, kb[-1] / 2**20, proc.stdout.decode(), cpu[-1]


def make_block(shape, seed=0):
    from dmriflow.interfaces.sim.phantom import hcp_scheme, simulate_subject
    scheme = hcp_scheme(n_b0=N_B0, shells=SHELLS, n_dirs=N_DIRS, seed=seed)
    subj = simulate_subject(tuple(shape), seed=seed, snr=SNR, scheme=scheme,
                            keep_noise_free=True)
    return subj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(96, 96, 60))
    ap.add_argument("--gibbs-volumes", type=int, default=8)
    ap.add_argument("--skip-stride1", action="store_true",
                    help="skip the slow every-voxel runs (dmriflow and dipy)")
    ap.add_argument("--skip-dipy", action="store_true",
                    help="skip dipy's every-voxel MP-PCA (the slowest run) and the Exp1 run "
                         "compared with it")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    subj = make_block(args.shape)
    data, mask, clean = subj.dwi, subj.mask, subj.noise_free
    n_vol = data.shape[3]
    print(f"block {tuple(data.shape)} float32 ({data.nbytes / 2**30:.2f} GB), "
          f"{int(mask.sum())} brain voxels, {n_vol} volumes, Rician SNR {SNR:g} "
          f"(sigma {subj.sigma:.1f}); generated in {time.perf_counter() - t0:.1f} s; "
          f"{os.cpu_count()} CPUs", flush=True)
    have_mrtrix = shutil.which("dwidenoise") is not None
    have_mrdegibbs = shutil.which("mrdegibbs") is not None
    tmp = tempfile.mkdtemp(prefix="dmriflow-bench-denoise-")
    py = sys.executable
    one_blas = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1"}
    rows, res, workers = {}, {}, {}
    try:
        src = os.path.join(tmp, "dwi.nii")
        msk = os.path.join(tmp, "mask.nii")
        nib.save(nib.Nifti1Image(data, subj.affine), src)
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), subj.affine), msk)
        child = os.path.join(tmp, "child.py")
        with open(child, "w") as fh:
            fh.write(CHILD)

        def py_case(name, tool, cfg, env=None):
            out = os.path.join(tmp, name.replace(" ", "_"))
            wall, peak, stdout, cpu = timed([py, child, tool, json.dumps(cfg), src, msk, out],
                                            env)
            got = json.loads(stdout.strip().splitlines()[-1])
            rows[name] = (got["seconds"], wall, peak, got["cpu"])
            workers[name] = got["workers"]
            secs = got["seconds"]
            den = np.load(out + "_den.npy")
            sig = np.load(out + "_sigma.npy") if os.path.exists(out + "_sigma.npy") else None
            res[name] = (den, sig)
            print(f"  {name}: {secs:.1f} s", flush=True)

        cases = [("dmriflow exp2 stride 2", "ours",
                  {"patch_radius": PATCH_RADIUS, "stride": 2, "estimator": "exp2"})]
        if not args.skip_stride1:
            cases += [("dmriflow exp2 stride 1", "ours",
                       {"patch_radius": PATCH_RADIUS, "stride": 1, "estimator": "exp2"})]
        if not (args.skip_stride1 or args.skip_dipy):
            cases += [("dmriflow veraart stride 1", "ours",
                       {"patch_radius": PATCH_RADIUS, "stride": 1, "estimator": "veraart"}),
                      ("dipy mppca (1 BLAS thread)", "dipy", {"patch_radius": PATCH_RADIUS})]
        for name, tool, cfg in cases:
            py_case(name, tool, cfg, one_blas if tool == "dipy" else None)
        if have_mrtrix:
            name = "MRtrix3 dwidenoise -nthreads 2"
            out, noise = os.path.join(tmp, "mr_den.nii"), os.path.join(tmp, "mr_noise.nii")
            wall, peak, _, cpu = timed(["dwidenoise", "-quiet", "-force", "-nthreads", "2",
                                   "-extent", str(2 * PATCH_RADIUS + 1), "-mask", msk,
                                   "-noise", noise, src, out])
            rows[name] = (wall, wall, peak, cpu)
            res[name] = (np.asarray(nib.load(out).get_fdata(dtype=np.float32)),
                         np.asarray(nib.load(noise).get_fdata(dtype=np.float32)))
            print(f"  {name}: {wall:.1f} s", flush=True)

        # Gibbs removal on a few volumes
        g_rows = {}
        gsrc = os.path.join(tmp, "gibbs_in.nii")
        gdata = np.ascontiguousarray(data[..., :args.gibbs_volumes])
        nib.save(nib.Nifti1Image(gdata, subj.affine), gsrc)
        for i, (name, tool, cfg, env) in enumerate((
                (G_OURS, "ours_gibbs", {"slice_axis": 2, "engine": "kellner"}, None),
                (G_DIPY_EQUAL, "ours_gibbs", {"slice_axis": 2, "engine": "fast"}, None),
                ("dipy gibbs_removal (1 BLAS thread)", "dipy_gibbs", {"slice_axis": 2},
                 one_blas))):
            out = os.path.join(tmp, f"gibbs{i}")
            wall, peak, stdout, _ = timed([py, child, tool, json.dumps(cfg), gsrc, msk, out],
                                          env)
            got = json.loads(stdout.strip().splitlines()[-1])
            g_rows[name] = (got["seconds"], wall, peak, np.load(out + "_den.npy"), got["cpu"])
        if have_mrdegibbs:
            out = os.path.join(tmp, "mr_gibbs.nii")
            wall, peak, _, cpu = timed(["mrdegibbs", "-quiet", "-force", "-nthreads", "2",
                                        gsrc, out])
            g_rows["MRtrix3 mrdegibbs -nthreads 2"] = (
                wall, wall, peak, np.asarray(nib.load(out).get_fdata(dtype=np.float32)), cpu)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    m = mask
    noisy_rmse = float(np.sqrt(np.mean((data[m] - clean[m]) ** 2)))

    def quality(name):
        den, sig = res[name]
        q = float(np.sqrt(np.mean((den[m] - clean[m]) ** 2))) / noisy_rmse
        s = float(np.median(sig[m])) / subj.sigma if sig is not None else float("nan")
        return q, s

    def rel(a, b):
        return float(np.linalg.norm(res[a][0][m] - res[b][0][m]) / np.linalg.norm(res[b][0][m]))

    notes = {}
    ours1, ours2, ver = ("dmriflow exp2 stride 1", "dmriflow exp2 stride 2",
                         "dmriflow veraart stride 1")
    dipy_name, mr_name = "dipy mppca (1 BLAS thread)", "MRtrix3 dwidenoise -nthreads 2"
    if dipy_name in res:
        notes[ver] = f"vs dipy: rel diff {rel(ver, dipy_name):.1e}"
    if mr_name in res:
        for name in (ours1, ours2):
            if name in res:
                a, b = res[name], res[mr_name]
                corr = float(np.corrcoef(a[0][m].ravel(), b[0][m].ravel())[0, 1])
                ratio = float(np.median(a[1][m] / b[1][m]))
                notes[name] = (f"vs MRtrix3: corr {corr:.5f}, rel diff {rel(name, mr_name):.3f},"
                               f" sigma ratio {ratio:.3f}")
    print(f"\n{'MP-PCA, 5x5x5 patches':36s} {'compute s':>9s} {'process s':>9s} "
          f"{'CPU s':>7s} {'peak GB':>8s} {'RMSE ratio':>10s} {'sigma/true':>10s}  agreement")
    for name, (secs, wall, peak, cpu) in rows.items():
        q, s = quality(name)
        print(f"{name:36s} {secs:9.2f} {wall:9.2f} {cpu:7.1f} {peak:8.2f} {q:10.3f} {s:10.3f}  "
              f"{notes.get(name, '')}")
    print("(RMSE ratio: RMSE vs the noise-free block / RMSE of the noisy block, in the mask)")
    ours_workers = workers.get(ours1, workers.get(ours2))
    print(f"dmriflow workers: {ours_workers} (OMP_NUM_THREADS / CPU affinity; MRtrix3 gets "
          f"-nthreads 2{'' if ours_workers == 2 else ': NOT like for like'})")

    ref_g = g_rows["dipy gibbs_removal (1 BLAS thread)"][3]
    gm = np.broadcast_to(m[..., None], ref_g.shape)
    gclean = clean[..., :args.gibbs_volumes]
    g_noisy_rmse = float(np.sqrt(np.mean((gdata[gm] - gclean[gm]) ** 2)))
    print(f"\n{'Gibbs removal, ' + str(args.gibbs_volumes) + ' volumes':36s} {'compute s':>9s} "
          f"{'process s':>9s} {'CPU s':>7s} {'peak GB':>8s} {'RMSE ratio':>10s}  vs dipy: "
          f"max |diff| / max, "
          f"voxels > 1e-5 max, corr of corrections")
    g_quality = {}
    for name, (secs, wall, peak, out, cpu) in g_rows.items():
        diff = np.abs(out - ref_g)
        scale = float(np.abs(ref_g).max())
        corr = float(np.corrcoef((out - gdata)[gm], (ref_g - gdata)[gm])[0, 1])
        g_quality[name] = float(np.sqrt(np.mean((out[gm] - gclean[gm]) ** 2))) / g_noisy_rmse
        print(f"{name:36s} {secs:9.2f} {wall:9.2f} {cpu:7.1f} {peak:8.2f} "
              f"{g_quality[name]:10.4f}  "
              f"{float(diff.max()) / scale:.1e}, {float(np.mean(diff > 1e-5 * scale)):.1e}, "
              f"{corr:.3f}")
    print("(RMSE ratio: RMSE vs the noise-free block / the input's, in the mask; the "
          "phantom has no ringing, so ~1 is right)")

    def t(name):
        return rows[name][0] if name in rows else float("nan")

    def pk(name):
        return rows[name][2] if name in rows else float("nan")

    gt = {k: v[0] for k, v in g_rows.items()}
    g_ours = gt[G_OURS]
    g_cpu = {k: v[4] for k, v in g_rows.items()}
    g_mr = "MRtrix3 mrdegibbs -nthreads 2"

    def cpu(name):
        return rows[name][3] if name in rows else float("nan")

    print(f"denoise_speedup_vs_dipy={t(dipy_name) / t(ver):.2f} "
          f"denoise_speedup_vs_mrtrix={t(mr_name) / t(ours1):.2f} "
          f"denoise_cpu_ratio_vs_mrtrix={cpu(mr_name) / cpu(ours1):.2f} "
          f"denoise_speedup_vs_dipy_stride2={t(dipy_name) / t(ours2):.2f} "
          f"denoise_speedup_vs_mrtrix_stride2={t(mr_name) / t(ours2):.2f} "
          f"ours_workers={ours_workers} ours_s={t(ours1):.2f} ours_stride2_s={t(ours2):.2f} ours_veraart_s={t(ver):.2f} "
          f"dipy_s={t(dipy_name):.2f} mrtrix_s={t(mr_name):.2f} "
          f"ours_peak_gb={pk(ours1):.2f} ours_stride2_peak_gb={pk(ours2):.2f} "
          f"dipy_peak_gb={pk(dipy_name):.2f} mrtrix_peak_gb={pk(mr_name):.2f} "
          f"rmse_ratio_ours={quality(ours1)[0] if ours1 in res else float('nan'):.3f} "
          f"rmse_ratio_ours_stride2={quality(ours2)[0]:.3f} "
          f"rmse_ratio_mrtrix={quality(mr_name)[0] if mr_name in res else float('nan'):.3f} "
          f"rel_diff_vs_dipy={rel(ver, dipy_name) if dipy_name in res else float('nan'):.1e} "
          f"degibbs_speedup_vs_dipy={gt['dipy gibbs_removal (1 BLAS thread)'] / g_ours:.2f} "
          f"degibbs_speedup_vs_mrtrix="
          f"{gt.get('MRtrix3 mrdegibbs -nthreads 2', float('nan')) / g_ours:.2f} "
          f"degibbs_cpu_ratio_vs_mrtrix="
          f"{g_cpu.get(g_mr, float('nan')) / g_cpu[G_OURS]:.2f} "
          f"degibbs_s={g_ours:.2f} mrdegibbs_s={gt.get(g_mr, float('nan')):.2f} "
          f"degibbs_rmse_ratio={g_quality[G_OURS]:.4f} "
          f"degibbs_dipy_equal_s={gt[G_DIPY_EQUAL]:.2f} "
          f"mrdegibbs_rmse_ratio="
          f"{g_quality.get('MRtrix3 mrdegibbs -nthreads 2', float('nan')):.4f} "
          f"voxels={int(m.sum())} volumes={n_vol} "
          f"load_start={load_start:.2f} load_end={os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
