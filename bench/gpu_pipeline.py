"""Benchmark: the GPU path of DTI, SH/RISH and MP-PCA on one HCP-size subject.

A synthetic subject (default 145 x 174 x 145 x 288 float32, 4.2 GB: 18 b0 +
90 directions at b=1000/2000/3000, ellipsoid brain mask, Rician noise at
b0-SNR 25; ``bench/memory.py``'s scheme and ``bench/synthetic.py``'s tissues)
is generated in host memory, so no stage reads or writes a file. Each stage
calls what the pipeline's node calls, with the device named:

* ``dti``: ``dti.fit_dwi(dwi, volumes=<dti_shells>, n_iter=3, device=D)``
  (the tensor node's volumes and WLS passes; rows go to the device chunk by
  chunk, the eigen-decomposition runs on the host);
* ``sh_rish``: ``sh.fit_shells(dwi, coefficients=False, device=D)`` + every
  shell's RISH maps (the RISH node; the projection runs on the device);
* ``mppca``: ``preprocess.mppca(..., device=D)`` (automatic patch radius and
  stride 2, the pipeline's defaults; z-slabs copied to the device one at a
  time, batched float32 ``eigh`` there) on a ``--mppca-slices`` z-slab crop,
  then on the whole subject if the crop's rate says it fits the time left
  (else the crop's figure, extrapolated by mask voxels, is stated as such);
  the CPU path (float32 LAPACK per patch, all cores) on the same crop for
  the ratio. Each is one run (after a warm-up on the check crop).

Stage times exclude file I/O but include the host<->device copies the
library makes; ``h2d_s`` is one copy of the mask rows to the device, for
scale. Each stage runs once to warm up (CUDA context, kernels), then
``--repeats`` times; the median is reported, with ``torch.cuda.synchronize``
around each run and the peak device memory (``max_memory_allocated``).

Correctness: a ``--check-slices`` z-slab of the subject is refitted on the
CPU's default path (numpy) and compared with the device's maps there. The
tolerances are float32 rounding bounds, derived, not tuned: MD to the fit's
own float32 eigenvalue resolution (``TensorModel.min_eigenvalue``) and FA to
that times FA's Lipschitz constant over |lambda|, at the 99.9th percentile
of voxels; each RISH value to its own bound from
the float32 matrix-product error ``gamma_N |rows| |W|`` propagated through
the b0 normalisation and the squares. MP-PCA: on a small crop (``--mppca-check``
voxels square in x, y, patch size + 2 slices) the device's series and noise
map against the CPU path's, per voxel within
``preprocess.mppca_device_tolerance`` (the float32 eigen-decomposition
bound: Weyl for eigenvalues, Davis-Kahan for the kept subspace) wherever every
patch was split alike by the two runs (``mppca_compare_paths`` records the
splits); a patch split differently where that bound says it cannot be fails
the check too. A wrong device answer exits non-zero.

bf16: tried only for the SH projection (a plain matrix product; the tensor
fit's log-domain solve and MP-PCA's eigenvalue split need float32): the
projection is run on device-resident rows in float32 and bfloat16, and
bf16 is reported as usable only if its coefficients stay inside the float32
bound (they cannot: bf16 keeps 8 bits, u = 2^-9). The whole run stops
after ``HARD_LIMIT_S`` (8 minutes).

Run (GPU): ``.venv/bin/python bench/gpu_pipeline.py``; CPU dry run:
``.venv/bin/python bench/gpu_pipeline.py --device cpu --shape 32 32 20 64``
(the device side then runs the torch code paths on the CPU; also what runs
by default where torch sees no GPU, as in ``make bench``). Ends with one
line of key=value figures.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import nibabel as nib
import numpy as np
import synthetic  # bench/synthetic.py (this folder is on sys.path when run as a script)
from memory import HCP_SHAPE, SNR, ellipsoid, gradients  # bench/memory.py

from dmriflow.interfaces import dti, sh
from dmriflow.interfaces.gradients import GradientTable
from dmriflow.interfaces.io import DWI
from dmriflow.interfaces.preprocess import (_radius3, mppca, mppca_compare_paths,
                                            mppca_device_tolerance)

#: the whole run stops here (the device check's budget)
HARD_LIMIT_S = 480
#: the CPU dry run's subject
DRY_SHAPE = (32, 32, 20, 64)
#: float32 unit roundoff
U32 = float(np.finfo(np.float32).eps) / 2
#: bfloat16 unit roundoff (8 significand bits)
U_BF16 = 2.0 ** -9
#: share of check voxels allowed beyond the FA/MD bound (ill-conditioned fits)
CHECK_QUANTILE = 0.999
#: |grad FA| <= sqrt(3/2) * 2 / |lambda|, times sqrt(3) for a shift d in each eigenvalue
FA_LIPSCHITZ = 2 * np.sqrt(1.5) * np.sqrt(3)
#: share of check voxels whose failed flag may differ (fits on the threshold)
FAILED_MISMATCH = 1e-3
#: MP-PCA stride (preprocess_dwi's default)
MPPCA_STRIDE = 2
#: seconds kept back for the report after the whole-subject MP-PCA, and the
#: safety factor on its predicted time
MPPCA_RESERVE_S = 20
MPPCA_SAFETY = 1.5


def make_subject(shape, seed: int) -> DWI:
    """The synthetic subject as an in-memory, F-ordered DWI (as a NIfTI loads)."""
    rng = np.random.default_rng(seed)
    grid, n_vol = tuple(shape[:3]), int(shape[3])
    bvals, bvecs = gradients(n_vol)
    mask = ellipsoid(grid)
    inside = np.flatnonzero(mask.ravel(order="F"))
    params, s0 = synthetic.tissue_tensors(inside.size, rng)
    sigma = np.float32(synthetic.S0_MEAN / SNR)
    data = np.zeros(grid + (n_vol,), np.float32, order="F")
    flat = data.reshape(-1, n_vol, order="F")          # a view: F order
    for k in range(n_vol):
        S = synthetic.signal(params, s0, bvals[k], bvecs[k])
        re = S + sigma * rng.standard_normal(inside.size, dtype=np.float32)
        im = sigma * rng.standard_normal(inside.size, dtype=np.float32)
        flat[inside, k] = np.hypot(re, im)
    return DWI(data=data, gtab=GradientTable(bvals, bvecs), mask=mask, affine=np.eye(4),
               header=nib.Nifti1Header(), paths={})


def slab(dwi: DWI, z0: int, z1: int) -> DWI:
    """The subject cut to slices [z0, z1) (a copy, F order)."""
    return DWI(data=np.asfortranarray(dwi.data[:, :, z0:z1]), gtab=dwi.gtab,
               mask=dwi.mask[:, :, z0:z1].copy(), affine=dwi.affine, header=dwi.header,
               paths={})


class Timer:
    """Median seconds of ``repeats`` runs after one warm-up, synchronised."""

    def __init__(self, torch, device: str, repeats: int):
        self.torch, self.cuda, self.repeats = torch, device.startswith("cuda"), repeats

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def __call__(self, fn):
        fn()                                            # warm-up, not counted
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        times, result = [], None
        for _ in range(self.repeats):
            self.sync()
            t = time.perf_counter()
            result = fn()
            self.sync()
            times.append(time.perf_counter() - t)
        peak = self.torch.cuda.max_memory_allocated() / 1e9 if self.cuda else float("nan")
        return float(np.median(times)), peak, result


def dti_kwargs(device: str) -> dict:
    """The device side: CUDA, or on a CPU dry run the torch backend (the code path CUDA uses)."""
    if device.startswith("cuda"):
        return {"device": device}
    return {"device": "cpu", "backend": "torch"}


def check_dti(dev_fit, ref_fit, mask_sub, z0, z1, gtab_dti) -> tuple[dict, bool]:
    """FA/MD of the device fit on the slab vs the CPU reference, per voxel over
    the fit's own float32 eigenvalue resolution d (``min_eigenvalue``): |dMD| <= d,
    |dFA| <= FA_LIPSCHITZ d / |lambda|; True when beyond it (99.9th percentile)."""
    model = dti.TensorModel(gtab_dti)
    failed_d = np.asarray(dev_fit.failed)[:, :, z0:z1][mask_sub]
    failed_r = np.asarray(ref_fit.failed)[mask_sub]
    ok = ~(failed_d | failed_r)
    ev = np.asarray(ref_fit.evals)[mask_sub][ok].astype(np.float64)
    res = model.min_eigenvalue(np.asarray(ref_fit.s0)[mask_sub][ok], np.abs(ev).max(axis=1))
    out = {"failed_mismatch": float(np.mean(failed_d != failed_r)) if failed_d.size else 0.0}
    scale = {"fa": FA_LIPSCHITZ * res / np.linalg.norm(ev, axis=1).clip(1e-30), "md": res}
    for name in ("fa", "md"):
        d = np.asarray(getattr(dev_fit, name))[:, :, z0:z1][mask_sub][ok].astype(np.float64)
        r = np.asarray(getattr(ref_fit, name))[mask_sub][ok].astype(np.float64)
        ratio = np.abs(d - r) / scale[name]
        out[f"{name}_q"] = float(np.quantile(ratio, CHECK_QUANTILE)) if ratio.size else 0.0
        out[f"{name}_max"] = float(ratio.max()) if ratio.size else 0.0
    bad = out["fa_q"] > 1 or out["md_q"] > 1 or out["failed_mismatch"] > FAILED_MISMATCH
    return out, bad


def rish_bound(rows: np.ndarray, model: sh.SHModel, c_ref: np.ndarray) -> np.ndarray:
    """Per voxel and order: bound on |R_l(float32 device) - R_l(exact)|.

    ``rows @ W`` in float32 errs by at most gamma_N |rows| |W| per column; the
    coefficients are divided by the mean-b0 column (its own error adds
    |c| d_s0 / s0), then squared and summed over m (2 |c| d + d^2, plus the
    sum's own rounding)."""
    W = model.projection()
    n = rows.shape[1]
    gamma = n * U32 / (1 - n * U32)
    raw = rows.astype(np.float64) @ W
    d = gamma * (np.abs(rows.astype(np.float64)) @ np.abs(W))
    k = model.n_coef
    s0 = raw[:, k:k + 1]
    dc = (d[:, :k] + np.abs(raw[:, :k]) * d[:, k:k + 1] / s0) / s0 + U32 * np.abs(c_ref)
    starts = sh.order_starts(model.lmax)
    per = 2 * np.abs(c_ref) * dc + dc ** 2
    bound = np.add.reduceat(per, starts, axis=1)
    r = np.add.reduceat(c_ref.astype(np.float64) ** 2, starts, axis=1)
    return bound + 2 * k * U32 * r


def check_rish(dev_fits, sub: DWI, z0, z1) -> dict:
    """Device RISH on the slab vs the CPU path, each value within its float32 bound.

    A reference-side rounding of the same size is allowed (both sides are float32)."""
    ref = sh.fit_shells(sub, coefficients=True)         # CPU default path
    rows = sub.data[sub.mask]
    worst, bad = 0.0, False
    for b, fit in ref.items():
        ok = fit.mask[sub.mask]
        c_ref = fit.coeffs[sub.mask][ok]
        bound = 2 * rish_bound(rows[ok], fit.model, c_ref)
        r_dev = dev_fits[b].rish()[:, :, z0:z1][sub.mask][ok]
        r_ref = fit.rish()[sub.mask][ok]
        ratio = np.abs(r_dev.astype(np.float64) - r_ref) / np.maximum(bound, 1e-300)
        worst = max(worst, float(ratio.max()) if ratio.size else 0.0)
        bad |= bool((ratio > 1).any())
    return {"rish_err_over_bound": worst}, bad


def mppca_kwargs() -> dict:
    """The pipeline's MP-PCA settings."""
    return {"patch_radius": None, "stride": MPPCA_STRIDE, "outside": "keep"}


def check_mppca(dwi: DWI, device: str, side: int) -> tuple[dict, bool]:
    """Device MP-PCA vs the CPU path on a centred crop (``side`` x ``side``
    voxels, patch size + 2 slices), per voxel within the derived float32
    bound; True when beyond it."""
    X, Y, Z, N = dwi.data.shape
    size_z = 2 * int(_radius3(None, (X, Y, Z), N)[2]) + 1
    lo = [max(0, (e - w) // 2) for e, w in ((X, side), (Y, side), (Z, size_z + 2))]
    sl = (slice(lo[0], lo[0] + side), slice(lo[1], lo[1] + side), slice(lo[2], lo[2] + size_z + 2))
    data, mask = np.ascontiguousarray(dwi.data[sl]), dwi.mask[sl]
    ref, s_ref, den, s, same = mppca_compare_paths(data, mask, device, **mppca_kwargs())
    den_tol, s_tol, clear, unexpected = mppca_device_tolerance(
        data, mask, ref, s_ref, patch_radius=None, stride=MPPCA_STRIDE, same_split=same)
    err = np.abs(den.astype(np.float64) - ref).max(axis=-1)[clear] / den_tol[clear]
    s_err = np.abs(s.astype(np.float64) - s_ref)[clear] / s_tol[clear]
    out = {"mppca_err_over_bound": float(err.max()) if err.size else 0.0,
           "mppca_sigma_err_over_bound": float(s_err.max()) if s_err.size else 0.0,
           "mppca_clear": float(clear.sum() / max(1, mask.sum())),
           "mppca_check_voxels": int(mask.sum()), "mppca_split_differs": int((~same).sum()),
           "mppca_split_unexpected": unexpected, "mppca_patches": int(same.size)}
    # for scale, over every mask voxel (flipped splits included): in units of the noise
    noise = float(np.median(s_ref[mask])) if mask.any() else 1.0
    diff = np.abs(den.astype(np.float64) - ref).max(axis=-1)[mask] / max(noise, 1e-30)
    out["mppca_max_diff_sigma"] = float(diff.max()) if diff.size else 0.0
    out["mppca_share_over_1e-3_sigma"] = float(np.mean(diff > 1e-3)) if diff.size else 0.0
    bad = out["mppca_err_over_bound"] > 1 or out["mppca_sigma_err_over_bound"] > 1 \
        or unexpected > 0 or not clear.any()
    return out, bad


def run_mppca(torch, device: str, dwi: DWI, z0: int, z1: int) -> tuple[float, float]:
    """One device MP-PCA of slices [z0, z1): (seconds, peak device GB)."""
    cuda = device.startswith("cuda")
    part = dwi if (z0, z1) == (0, dwi.data.shape[2]) else slab(dwi, z0, z1)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    mppca(part.data, part.mask, device=device, **mppca_kwargs())
    if cuda:
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    return sec, (torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan"))


def bf16_projection(torch, device: str, dwi: DWI, timer: Timer) -> dict:
    """SH projection of all shells on device-resident rows, float32 vs bfloat16."""
    models = [sh.SHModel(dwi.gtab, shell=b) for b in dwi.gtab.shells]
    W = np.concatenate([m.projection()[:, :m.n_coef] for m in models]
                       + [models[0].projection()[:, -1:]], axis=1)
    rows = np.ascontiguousarray(dwi.masked())
    t = time.perf_counter()
    x = torch.from_numpy(rows).to(device)
    timer.sync()
    h2d = time.perf_counter() - t
    w = torch.from_numpy(W.astype(np.float32)).to(device)
    t32, _, y32 = timer(lambda: x @ w)
    xb, wb = x.bfloat16(), w.bfloat16()
    t16, _, y16 = timer(lambda: xb @ wb)
    n = rows.shape[1]
    bound = n * U32 * (torch.abs(x) @ torch.abs(w))     # float32 product error bound
    ratio = float((torch.abs(y16.float() - y32) / bound.clamp_min(1e-30)).max())
    return {"h2d_s": h2d, "sh_resident_fp32_s": t32, "sh_resident_bf16_s": t16,
            "bf16_err_over_fp32_bound": ratio, "bf16_usable": ratio <= 1.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None,
                    help="cuda[:k], or cpu for a dry run (default: cuda when torch sees one)")
    ap.add_argument("--shape", type=int, nargs=4, default=None,
                    help=f"X Y Z N (default {HCP_SHAPE} on a GPU, {DRY_SHAPE} on the CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check-slices", type=int, default=4)
    ap.add_argument("--mppca-slices", type=int, default=10)
    ap.add_argument("--mppca-check", type=int, default=32,
                    help="side (voxels) of the MP-PCA check crop")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    def out_of_time(*_):
        print(f"gpu_pipeline: stopped at the {HARD_LIMIT_S} s limit", flush=True)
        os._exit(124)
    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(HARD_LIMIT_S)
    t_start = time.perf_counter()

    import torch
    if args.device is None:          # `make bench` on a machine without a GPU: the dry path
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shape is None:
        args.shape = list(HCP_SHAPE if args.device.startswith("cuda") else DRY_SHAPE)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for the dry path")
        return 2
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, device {args.device} ({name}), "
          f"float32 matmul precision {torch.get_float32_matmul_precision()}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)

    t = time.perf_counter()
    dwi = make_subject(args.shape, args.seed)
    gen_s = time.perf_counter() - t
    n_mask = int(dwi.mask.sum())
    print(f"subject {tuple(args.shape)} float32 {dwi.data.nbytes / 1e9:.2f} GB, "
          f"{n_mask} mask voxels, generated in {gen_s:.1f} s (not timed)", flush=True)
    timer = Timer(torch, args.device, args.repeats)
    rows = {}

    vols = np.flatnonzero(dwi.gtab.select_shells(dti.dti_shells(dwi.gtab)))
    kw = dti_kwargs(args.device)
    s, peak, dev_tensor = timer(lambda: dti.fit_dwi(
        dwi, volumes=vols, n_iter=dti.DEFAULT_WLS_ITERATIONS, **kw))
    rows["dti"] = (s, peak, f"{vols.size} volumes, WLS x{dti.DEFAULT_WLS_ITERATIONS}, {kw}")

    s, peak, dev_sh = timer(lambda: sh.fit_shells(dwi, coefficients=False,
                                                  device=args.device))
    for fit in dev_sh.values():
        fit.rish()
    rows["sh_rish"] = (s, peak, f"shells {[f'{b:g}' for b in dev_sh]}, lmax "
                                f"{[f.lmax for f in dev_sh.values()]}")

    Z = args.shape[2]
    bf = bf16_projection(torch, args.device, dwi, timer)

    # correctness on a slab: device maps vs the CPU default path
    zc0 = max(0, Z // 2 - args.check_slices // 2)
    zc1 = min(Z, zc0 + args.check_slices)
    sub = slab(dwi, zc0, zc1)
    ref_tensor = dti.fit_dwi(sub, volumes=vols, n_iter=dti.DEFAULT_WLS_ITERATIONS)
    chk_dti, bad_dti = check_dti(dev_tensor, ref_tensor, sub.mask, zc0, zc1,
                                 dwi.gtab.select(vols))
    chk_rish, bad_rish = check_rish(dev_sh, sub, zc0, zc1)

    print(f"dti {rows['dti'][0]:.3f} s, sh_rish {rows['sh_rish'][0]:.3f} s, check "
          f"{'FAIL' if bad_dti or bad_rish else 'pass'}; MP-PCA next", flush=True)
    # last: the slowest stage. The check first (it also warms the device path up)
    chk_mp, bad_mp = check_mppca(dwi, args.device, args.mppca_check)
    z0 = max(0, Z // 2 - args.mppca_slices // 2)
    z1 = min(Z, z0 + args.mppca_slices)
    crop = slab(dwi, z0, z1)
    n_crop = int(crop.mask.sum())
    t = time.perf_counter()
    mppca(crop.data, crop.mask, **mppca_kwargs())
    cpu_s = time.perf_counter() - t
    del crop
    crop_s, crop_peak = run_mppca(torch, args.device, dwi, z0, z1)
    rows["mppca CPU path (crop)"] = (cpu_s, float("nan"), f"{z1 - z0}-slice crop, {n_crop} mask "
                                     f"voxels, LAPACK, all cores, one run")
    rows["mppca device (crop)"] = (crop_s, crop_peak, f"same crop, one run, "
                                   f"{cpu_s / crop_s:.2f}x the CPU path")
    predicted = crop_s * n_mask / max(1, n_crop)
    left = HARD_LIMIT_S - (time.perf_counter() - t_start) - MPPCA_RESERVE_S
    if MPPCA_SAFETY * predicted <= left:
        print(f"MP-PCA: crop {crop_s:.1f} s, whole subject predicted {predicted:.0f} s: "
              f"running it", flush=True)
        mp_s, mp_peak = run_mppca(torch, args.device, dwi, 0, Z)
        mp_scope = "subject"
        rows["mppca device (subject)"] = (mp_s, mp_peak, f"whole subject, {n_mask} mask voxels, "
                                          f"one run")
    else:
        mp_s, mp_peak, mp_scope = predicted, crop_peak, "extrapolated"
        rows["mppca device (extrapolated)"] = (
            mp_s, float("nan"), f"NOT run: {MPPCA_SAFETY}x the crop's rate x {n_mask} mask "
                                f"voxels exceeds the {left:.0f} s left")

    print(f"\n{'stage':34s} {'median s':>9s} {'peak GPU GB':>12s}  notes")
    for k, (sec, pk, note) in rows.items():
        print(f"{k:34s} {sec:9.3f} {pk:12.2f}  {note}")
    print(f"{'dti + sh_rish':34s} {rows['dti'][0] + rows['sh_rish'][0]:9.3f} "
          f"{'':12s}  target <= 1 s on a GPU")
    print(f"\nresident SH projection (rows moved once, {bf['h2d_s']:.3f} s): float32 "
          f"{bf['sh_resident_fp32_s']:.4f} s, bf16 {bf['sh_resident_bf16_s']:.4f} s; bf16 error "
          f"{bf['bf16_err_over_fp32_bound']:.1f}x the float32 bound -> bf16 "
          f"{'usable' if bf['bf16_usable'] else 'NOT used (accuracy does not hold)'}")
    print(f"check on slices {zc0}-{zc1 - 1} vs the CPU path (error / float32 bound, must be "
          f"<= 1): FA q{CHECK_QUANTILE} {chk_dti['fa_q']:.2e} (max {chk_dti['fa_max']:.2e}), "
          f"MD q{CHECK_QUANTILE} {chk_dti['md_q']:.2e} (max {chk_dti['md_max']:.2e}); "
          f"failed-flag mismatch {chk_dti['failed_mismatch']:.1e}; "
          f"RISH max {chk_rish['rish_err_over_bound']:.2e}")
    print(f"MP-PCA check on a {args.mppca_check}x{args.mppca_check} crop "
          f"({chk_mp['mppca_check_voxels']} mask voxels) vs the CPU path: "
          f"{chk_mp['mppca_split_differs']} of {chk_mp['mppca_patches']} patches split "
          f"differently ({chk_mp['mppca_split_unexpected']} where the float32 bound says they "
          f"cannot be), {chk_mp['mppca_clear']:.0%} of the voxels in patches split alike: "
          f"series {chk_mp['mppca_err_over_bound']:.2e}, sigma "
          f"{chk_mp['mppca_sigma_err_over_bound']:.2e} of the float32 bound; over all its mask "
          f"voxels max |difference| {chk_mp['mppca_max_diff_sigma']:.2e} sigma, "
          f"{chk_mp['mppca_share_over_1e-3_sigma']:.1%} of them > 1e-3 sigma")
    ok = not (bad_dti or bad_rish or bad_mp)
    total = time.perf_counter() - t_start
    print(f"device={args.device} shape={'x'.join(map(str, args.shape))} "
          f"dti_s={rows['dti'][0]:.4f} sh_rish_s={rows['sh_rish'][0]:.4f} "
          f"dti_rish_s={rows['dti'][0] + rows['sh_rish'][0]:.4f} "
          f"mppca_cpu_crop_s={cpu_s:.3f} mppca_dev_crop_s={crop_s:.3f} "
          f"mppca_dev_s={mp_s:.2f} mppca_scope={mp_scope} mppca_peak_gpu_gb={mp_peak:.2f} "
          f"mppca_check={chk_mp['mppca_err_over_bound']:.2e} "
          f"peak_gpu_gb={max(rows['dti'][1], rows['sh_rish'][1]):.2f} "
          f"bf16_usable={int(bf['bf16_usable'])} check={'pass' if ok else 'FAIL'} "
          f"total_s={total:.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
