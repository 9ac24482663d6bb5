"""Diffusion tensor fitting (DTI), DIPY reconst style: ``TensorModel`` / ``TensorFit``.

Model: ln S = ln S0 - b g^T D g (SCIENCE.md section 1). Fitted on the log of
the signals, clipped below at ``MIN_SIGNAL``: ordinary least squares (OLS),
then weighted least squares (WLS) with weights = OLS-predicted signal squared,
as dipy's ``TensorModel(fit_method="WLS")`` and MRtrix3's ``dwi2tensor`` do;
``n_iter > 1`` re-weights with each new prediction (iterated WLS).

How it is computed (for speed and a bounded memory):

* Voxels are fitted in chunks of rows (n, N), float32 throughout; the 4D
  array is never copied (a chunk costs its own rows only) and never
  converted to float64. Chunks go to one worker thread per core.
* The design X (N, 7) is replaced once by an orthonormal basis Z = X R^-1
  (QR). The normal equations Z^T W Z then stay well conditioned in float32
  (X^T W X with b in s/mm^2 would not), and OLS is a plain projection
  L @ Z (Z's pseudo-inverse is Z^T).
* WLS normal equations for all voxels of a chunk come from ONE matmul of the
  weights (n, N) with the precomputed products of the design rows
  (N, 28 = upper triangle of 7x7), the right-hand sides from a second one;
  the 7x7 systems are solved by a Cholesky factorisation written out
  element-wise over the chunk (structure of arrays), which is far faster
  than a batched LAPACK call per 7x7 matrix.
* Eigen-decomposition of the 3x3 tensors is closed form and vectorised
  (trigonometric root of the isolated eigenvalue, its eigenvector by cross
  products, the other two from the exact 2x2 problem in the orthogonal
  plane), accurate in float32 even for cylindrically symmetric tensors.

All maps are in mm^2/s (diffusivities) and in the b-vector frame of the
gradient table (FSL image frame, see :mod:`dmriflow.interfaces.gradients`),
so V1 is an image-frame vector, as FSL's dtifit and dipy report it.
"""

from __future__ import annotations

import glob
import os
import sys
import threading
from contextlib import contextmanager
from functools import cached_property

import numpy as np

from .gradients import GradientTable
from .parallel import available_threads, map_chunks, single_threaded_blas

#: Signals below this (in the data's units) are clipped before the log, so that
#: zeros and negative values (background, noise floor after some
#: reconstructions) give a finite log-signal. Same value as dipy's
#: MIN_POSITIVE_SIGNAL.
MIN_SIGNAL = 1e-4
#: Inside the solver b is in ms/um^2 (b / 1000) and D in um^2/ms, so all design
#: entries and tensor elements are O(1) in float32.
B_UNIT = 1000.0
#: WLS weights are exp(2 (ln S_pred - ln S0_pred)), i.e. relative to the b0
#: weight (<= 1 for a positive definite prediction). The exponent is capped
#: here so that a grossly non-positive-definite OLS start cannot overflow
#: float32; such voxels end up reported as failed.
LOG_WEIGHT_CAP = 40.0
_LOG_MIN_SIGNAL = np.float32(np.log(np.float32(MIN_SIGNAL)))
#: Voxels per chunk handed to one CPU worker: the 7x7 solves and the
#: eigen-decomposition run element-wise over a whole chunk, so a long chunk
#: amortises the per-operation overhead (and the GIL between workers).
CHUNK_CPU = 16384
#: Rows per block inside a CPU chunk for the (rows, N) work (log, weights, the
#: two big matmuls): a 2048 x 288 float32 block is 2.4 MB, so the block's
#: log-signals and weights stay in cache between the steps that use them.
#: Measured on a 2-core AMD EPYC (1 MiB L2 per core, 32 MiB L3): 1024-4096
#: are equally fast; smaller blocks pay Python overhead, larger fall out of cache.
BLOCK_CPU = 2048
#: Voxels per chunk on a CUDA device (enough work per kernel launch; no blocks).
CHUNK_CUDA = 131072
#: A Cholesky pivot below this times the largest diagonal element marks a
#: singular (degenerate) weighted system; the voxel is then reported failed.
PIVOT_TOLERANCE = 1e-7
#: Positive definite means a smallest eigenvalue above the float32 resolution of
#: the fit, not merely above 0: a voxel without diffusion contrast (no signal at
#: all, or a constant one) has a true tensor of 0, whose fitted eigenvalues are
#: rounding noise of either sign, so the BLAS kernel would decide whether it
#: "succeeds". One rounding of every log-signal moves a tensor element by at most
#: eps32 * ||pinv(X)_D||_inf * max|ln S|; the float32 sums of the WLS passes and
#: the Cholesky solve add more: on constant-signal voxels (1e-6 .. 1e7) the
#: eigenvalues reached 4.4x that bound with OpenBLAS's Haswell, SkylakeX and
#: generic kernels. This many single-rounding bounds keep a 3.6x margin; for an
#: HCP-like b=1000 scheme, S0 = 1000 and a largest eigenvalue of 1.7e-3 mm^2/s
#: the floor is 5e-8 mm^2/s, 2000x below the smallest diffusivity of any
#: tissue (~1e-4 mm^2/s).
PD_ROUNDING_BOUNDS = 16
#: Deviatoric size p below this times |mean diffusivity| counts as an exactly
#: isotropic tensor (eigenvectors are then the image axes).
ISOTROPY_TOLERANCE = 1e-7

FIT_METHODS = ("WLS", "OLS")
#: WLS passes of the pipeline's tensor fit: MRtrix3's ``dwi2tensor`` default
#: iterates the reweighting, and 3 passes here match it to a median |dFA|
#: below 1e-3 on the shared real data (tests/test_dti.py); 1 is dipy's WLS.
DEFAULT_WLS_ITERATIONS = 3
#: Tensors are fitted to the b0s and the shells up to this b (s/mm^2) by
#: default: above it the signal's kurtosis biases DTI (HCP's b=3000 shell
#: inflates white-matter FA). If no shell is that low, the lowest is used.
DTI_MAX_BVAL = 1500.0
#: (i, j) of the upper triangle of the 7x7 normal matrix, row-major packed.
_TRIU = tuple(zip(*np.triu_indices(7)))
_PACK = {**{(i, j): k for k, (i, j) in enumerate(_TRIU)},
         **{(j, i): k for k, (i, j) in enumerate(_TRIU)}}


# ----------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------
class _NumpyOps:
    """Array operations of the fitting kernel, numpy flavour (CPU).

    Why numpy on the CPU: measured on this project's 2-core AMD EPYC for
    200k voxels x 288 volumes (bench/dti.py block, fit + FA), the same kernel
    takes 0.13 s with numpy (one worker thread per core, single-threaded
    OpenBLAS each; 0.23 s with one worker) against 0.29 s with torch 2.13
    (MKL, 2 intra-op threads): numpy's AVX-512 float32 log/exp run ~3x faster
    than torch's (0.44 vs 1.26 ms per 4096 x 288 block, one thread), and
    log/exp are a third of the work. The identical kernel runs through torch
    (``_TorchOps``) on CUDA, or on the CPU with ``backend="torch"``.
    """

    name = "numpy"
    device = "cpu"

    def empty(self, shape):
        return np.empty(shape, dtype=np.float32)

    def asarray(self, a):
        return np.asarray(a, dtype=np.float32)

    def to_numpy(self, a):
        return a

    # numpy's maximum/minimum (NaN-propagating) cost as much as the log
    # itself; a min/max reduction is 4x cheaper, so clip only when needed.
    def log_clipped(self, src, out):
        np.log(src, out=out)
        if not out.min() >= _LOG_MIN_SIGNAL:     # zeros, negatives, NaN: redo clipped
            np.maximum(src, np.float32(MIN_SIGNAL), out=out)
            np.log(out, out=out)

    def exp_capped_(self, x):
        if not x.max() <= LOG_WEIGHT_CAP:
            np.minimum(x, np.float32(LOG_WEIGHT_CAP), out=x)
        np.exp(x, out=x)

    def matmul(self, a, b, out):
        return np.matmul(a, b, out=out)

    def copy(self, a):
        return a.copy()

    def contiguous(self, a):
        return np.ascontiguousarray(a)

    def sqrt(self, a):
        return np.sqrt(a)

    def where(self, c, a, b):
        return np.where(c, a, b)

    def stack(self, arrays):
        return np.stack(arrays)

    def nan(self):
        return np.float32(np.nan)


class _TorchOps:
    """The same operations on torch tensors (CUDA, or CPU when asked)."""

    name = "torch"

    def __init__(self, device):
        import torch  # torch takes seconds to import: only the torch backend needs it
        self.torch = torch
        self.device = torch.device(device)

    def empty(self, shape):
        return self.torch.empty(shape, dtype=self.torch.float32, device=self.device)

    def asarray(self, a):
        t = self.torch
        if isinstance(a, t.Tensor):
            return a.to(device=self.device, dtype=t.float32)
        a = np.asarray(a)
        if a.dtype != np.float32 or not a.flags.writeable:
            # only a chunk: conversion of its rows, never the whole 4D array
            a = np.array(a, dtype=np.float32)
        return t.from_numpy(a).to(self.device, non_blocking=True)

    def to_numpy(self, a):
        return a.detach().cpu().numpy()

    def log_clipped(self, src, out):
        self.torch.clamp(src, min=MIN_SIGNAL, out=out)
        out.log_()

    def exp_capped_(self, x):
        x.clamp_(max=LOG_WEIGHT_CAP).exp_()

    def matmul(self, a, b, out):
        return self.torch.matmul(a, b, out=out)

    def copy(self, a):
        return a.clone()

    def contiguous(self, a):
        return a.contiguous()

    def sqrt(self, a):
        return self.torch.sqrt(a)

    def where(self, c, a, b):
        return self.torch.where(c, a, b)

    def stack(self, arrays):
        return self.torch.stack(arrays)

    def nan(self):
        return float("nan")


def _cuda_available() -> bool:
    """Whether torch sees a CUDA device. Without an NVIDIA driver on the machine
    the answer is no, and we do not pay torch's import (~2 s) to learn it."""
    if "torch" not in sys.modules and not (
            os.path.exists("/proc/driver/nvidia/version") or glob.glob("/dev/nvidia[0-9]*")):
        return False
    try:
        import torch  # torch takes seconds to import: only when it may be used
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def _resolve_backend(device, backend):
    """(ops, n_workers, chunk, block) for the requested device/backend.

    ``device=None`` picks CUDA when torch sees one, else the CPU. On the CPU
    the numpy kernel is used unless ``backend="torch"``.
    """
    if backend not in (None, "numpy", "torch"):
        raise ValueError(f"backend must be 'numpy' or 'torch', not {backend!r}")
    dev = None if device is None else str(device)
    if dev is None or dev.startswith("cuda"):
        cuda = _cuda_available()
        if dev is not None and not cuda:
            raise RuntimeError(f"device={device!r} requested but torch sees no CUDA device")
        if cuda and backend != "numpy":
            return _TorchOps(dev or "cuda"), 1, CHUNK_CUDA, CHUNK_CUDA
        dev = "cpu"
    if dev != "cpu":
        raise ValueError(f"device must be None, 'cpu' or 'cuda[:k]', not {device!r}")
    if backend == "torch":
        return _TorchOps("cpu"), 1, CHUNK_CPU, BLOCK_CPU
    return _NumpyOps(), available_threads(), CHUNK_CPU, BLOCK_CPU


# ----------------------------------------------------------------------------
# The fitting kernel (backend-agnostic)
# ----------------------------------------------------------------------------
def _cholesky_solve(A, rhs, ops):
    """Solve 7x7 SPD systems for all voxels of a chunk.

    ``A`` (28, n) holds the packed upper triangles, ``rhs`` (7, n). Element-
    wise Cholesky over the voxel axis; a non-positive (or negligible) pivot
    gives NaN, which the caller reports as a failed fit.
    """
    K = 7
    L = [[None] * K for _ in range(K)]
    inv = [None] * K
    scale = A[_PACK[0, 0]]
    for j in range(1, K):
        scale = ops.where(A[_PACK[j, j]] > scale, A[_PACK[j, j]], scale)
    floor = scale * PIVOT_TOLERANCE
    for j in range(K):
        s = ops.copy(A[_PACK[j, j]])
        for k in range(j):
            s -= L[j][k] * L[j][k]
        s = ops.where(s > floor, s, ops.nan())
        d = ops.sqrt(s)
        inv[j] = 1.0 / d
        for i in range(j + 1, K):
            t = ops.copy(A[_PACK[i, j]])
            for k in range(j):
                t -= L[i][k] * L[j][k]
            t *= inv[j]
            L[i][j] = t
    y = [None] * K
    for i in range(K):
        s = ops.copy(rhs[i])
        for k in range(i):
            s -= L[i][k] * y[k]
        s *= inv[i]
        y[i] = s
    x = [None] * K
    for i in reversed(range(K)):
        s = y[i]
        for k in range(i + 1, K):
            s -= L[k][i] * x[k]
        s *= inv[i]
        x[i] = s
    return ops.stack(x)


class _Kernel:
    """Design-derived constants on one backend, and the per-chunk fit."""

    def __init__(self, design: np.ndarray, ops, block: int):
        # design: (N, 7) float64 with b in units of B_UNIT.
        Q, R = np.linalg.qr(design)
        self.ops = ops
        self.block = block
        f32 = lambda a: ops.asarray(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        # Z zero-padded to 8 columns for the two (rows, N) @ (N, 7) products:
        # OpenBLAS runs (2048 x 288) @ (288 x 8) ~20 % faster than @ (288 x 7).
        self.Z8 = f32(np.pad(Q, ((0, 0), (0, 1))))                   # (N, 8)
        self.ZT = f32(Q.T)                                           # (7, N)
        self.O = f32(np.stack([Q[:, i] * Q[:, j] for i, j in _TRIU], axis=1))  # (N, 28)
        Rinv = np.linalg.inv(R)
        self.Rinv = f32(Rinv)                                        # beta = Rinv @ gamma
        self.lnS0_col = f32(Rinv[6][:, None])                        # ln S0 = gamma @ col
        self.ones_row = f32(R[:, 6][None, :])                        # 1 = Z @ ones_row.T
        self.n_vol = design.shape[0]

    def buffers(self, rows: int):
        """Work buffers of one worker for chunks of up to ``rows`` voxels."""
        ops, N = self.ops, self.n_vol
        return {"L": ops.empty((rows, N)), "W": ops.empty((min(rows, self.block), N)),
                "A": ops.empty((rows, 28)), "R": ops.empty((rows, 8)),
                "G": ops.empty((rows, 8))}

    def _weights_block(self, gamma_b, Lb, W, A_b, R_b):
        """Normal equations of one block: A_b = sum_i w_i z_i z_i^T (packed),
        R_b = sum_i w_i z_i ln S_i, with w_i = (S_pred,i / S0_pred)^2."""
        ops = self.ops
        shift = ops.matmul(gamma_b, self.lnS0_col, None)            # (nb, 1) ln S0_pred
        g = gamma_b - shift * self.ones_row
        g *= 2.0
        ops.matmul(g, self.ZT, W)                                   # 2 (ln S_pred - ln S0)
        ops.exp_capped_(W)
        ops.matmul(W, self.O, A_b)
        W *= Lb
        ops.matmul(W, self.Z8, R_b)                                 # (nb, 8), last col 0

    def fit(self, rows, buf, method: str, n_iter: int):
        """rows (n, N) -> parameters (7, n): Dxx Dyy Dzz Dxy Dxz Dyz [um^2/ms], ln S0.

        The chunk is walked in cache-sized blocks of ``self.block`` rows for
        the (n, N)-sized work (log, weights, the two matmuls); the 7x7 solves
        run once over the whole chunk (fewer, longer element-wise ops).
        """
        ops = self.ops
        n, B = rows.shape[0], self.block
        L, G, A, R = buf["L"][:n], buf["G"][:n], buf["A"][:n], buf["R"][:n]
        blocks = [(s, min(s + B, n)) for s in range(0, n, B)]
        gamma = G[:, :7]                                            # (n, 7) OLS
        for s, e in blocks:
            Lb = L[s:e]
            ops.log_clipped(rows[s:e], Lb)
            ops.matmul(Lb, self.Z8, G[s:e])
            if method == "WLS":
                self._weights_block(gamma[s:e], Lb, buf["W"][:e - s], A[s:e], R[s:e])
        if method == "OLS":
            return ops.matmul(self.Rinv, gamma.T, None)
        for it in range(n_iter):
            if it > 0:
                for s, e in blocks:
                    self._weights_block(gamma[s:e], L[s:e], buf["W"][:e - s], A[s:e], R[s:e])
            gamma_soa = _cholesky_solve(ops.contiguous(A.T), ops.contiguous(R[:, :7].T), ops)
            gamma = gamma_soa.T
        return ops.matmul(self.Rinv, gamma_soa, None)


# ----------------------------------------------------------------------------
# Closed-form symmetric 3x3 eigen-decomposition (vectorised, float32)
# ----------------------------------------------------------------------------
def eig_sym3(a00, a11, a22, a01, a02, a12):
    """Eigenvalues (n, 3) descending and eigenvectors (n, 3, 3) (columns).

    Vectorised over voxels (each argument is an (n,) array). The isolated
    eigenvalue (the largest when the deviatoric determinant is >= 0, else the
    smallest) comes from the trigonometric formula, its eigenvector from the
    largest cross product of two rows of A - lambda I, its value refined by the
    Rayleigh quotient; the other two are the exact eigenpairs of the 2x2
    restriction of A to the orthogonal plane. This avoids the sqrt(eps) loss
    of the plain trigonometric method near a double eigenvalue (typical
    cylindrical white-matter tensors) and is ~10x faster than a batched
    ``np.linalg.eigh`` on 3x3 matrices.
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return _eig_sym3(*(np.asarray(a, dtype=np.float32) for a in (a00, a11, a22, a01, a02, a12)))


def _eig_sym3(a00, a11, a22, a01, a02, a12):
    f32 = np.float32
    q = (a00 + a11 + a22) * f32(1 / 3)
    b00, b11, b22 = a00 - q, a11 - q, a22 - q
    p2 = b00 * b00 + b11 * b11 + b22 * b22 + f32(2) * (a01 * a01 + a02 * a02 + a12 * a12)
    p = np.sqrt(p2 * f32(1 / 6))
    iso = ~(p > np.abs(q) * f32(ISOTROPY_TOLERANCE))
    ip = f32(1) / np.where(iso, f32(1), p)
    c00, c11, c22, c01, c02, c12 = b00 * ip, b11 * ip, b22 * ip, a01 * ip, a02 * ip, a12 * ip
    half_det = f32(0.5) * (c00 * (c11 * c22 - c12 * c12) - c01 * (c01 * c22 - c12 * c02)
                           + c02 * (c01 * c12 - c11 * c02))
    np.clip(half_det, f32(-1), f32(1), out=half_det)
    angle = np.arccos(half_det) * f32(1 / 3)
    top = half_det >= 0                    # isolated eigenvalue is the largest
    beta = np.where(top, f32(2) * np.cos(angle),
                    f32(2) * np.cos(angle + f32(2 * np.pi / 3)))
    lam = q + p * beta
    # eigenvector of the isolated eigenvalue: cross products of rows of A - lam I
    r0 = (a00 - lam, a01, a02)
    r1 = (a01, a11 - lam, a12)
    r2 = (a02, a12, a22 - lam)
    best, best_n = None, None
    for ra, rb in ((r0, r1), (r0, r2), (r1, r2)):
        c = (ra[1] * rb[2] - ra[2] * rb[1], ra[2] * rb[0] - ra[0] * rb[2],
             ra[0] * rb[1] - ra[1] * rb[0])
        n2 = c[0] * c[0] + c[1] * c[1] + c[2] * c[2]
        if best is None:
            best, best_n = c, n2
        else:
            pick = n2 > best_n
            best = tuple(np.where(pick, ci, bi) for ci, bi in zip(c, best))
            best_n = np.where(pick, n2, best_n)
    degenerate = iso | ~(best_n > 0)
    inv_n = f32(1) / np.sqrt(np.where(degenerate, f32(1), best_n))
    u0 = np.where(degenerate, f32(1), best[0] * inv_n)
    u1 = np.where(degenerate, f32(0), best[1] * inv_n)
    u2 = np.where(degenerate, f32(0), best[2] * inv_n)
    Au = (a00 * u0 + a01 * u1 + a02 * u2, a01 * u0 + a11 * u1 + a12 * u2,
          a02 * u0 + a12 * u1 + a22 * u2)
    lam_iso = u0 * Au[0] + u1 * Au[1] + u2 * Au[2]     # Rayleigh quotient
    # orthonormal basis (v, w) of the plane perpendicular to u
    big0 = np.abs(u0) > np.abs(u1)
    inv0 = f32(1) / np.sqrt(np.where(big0, u0 * u0 + u2 * u2, u1 * u1 + u2 * u2))
    zero = np.zeros_like(u0)
    v0 = np.where(big0, -u2 * inv0, zero)
    v1 = np.where(big0, zero, u2 * inv0)
    v2 = np.where(big0, u0 * inv0, -u1 * inv0)
    w0, w1, w2 = u1 * v2 - u2 * v1, u2 * v0 - u0 * v2, u0 * v1 - u1 * v0
    Av = (a00 * v0 + a01 * v1 + a02 * v2, a01 * v0 + a11 * v1 + a12 * v2,
          a02 * v0 + a12 * v1 + a22 * v2)
    Aw = (a00 * w0 + a01 * w1 + a02 * w2, a01 * w0 + a11 * w1 + a12 * w2,
          a02 * w0 + a12 * w1 + a22 * w2)
    m00 = v0 * Av[0] + v1 * Av[1] + v2 * Av[2]
    m11 = w0 * Aw[0] + w1 * Aw[1] + w2 * Aw[2]
    m01 = v0 * Aw[0] + v1 * Aw[1] + v2 * Aw[2]
    mean, hd = f32(0.5) * (m00 + m11), f32(0.5) * (m00 - m11)
    rad = np.hypot(hd, m01)
    theta = f32(0.5) * np.arctan2(m01, hd)
    ct, st = np.cos(theta), np.sin(theta)
    lam_a, lam_b = mean + rad, mean - rad           # lam_a >= lam_b
    xa = (ct * v0 + st * w0, ct * v1 + st * w1, ct * v2 + st * w2)
    xb = (ct * w0 - st * v0, ct * w1 - st * v1, ct * w2 - st * v2)
    u = (u0, u1, u2)
    # assemble descending: top -> (iso, a, b), else (a, b, iso)
    l1 = np.where(top, lam_iso, lam_a)
    l2 = np.where(top, lam_a, lam_b)
    l3 = np.where(top, lam_b, lam_iso)
    e1 = [np.where(top, ui, ai) for ui, ai in zip(u, xa)]
    e2 = [np.where(top, ai, bi) for ai, bi in zip(xa, xb)]
    e3 = [np.where(top, bi, ui) for bi, ui in zip(xb, u)]
    vals, vecs = [l1, l2, l3], [e1, e2, e3]
    # rounding can swap near-equal eigenvalues: a 3-element sorting network
    # (skipped when nothing is out of order, the usual case)
    if np.any(l2 > l1) or np.any(l3 > l2):
        for i, j in ((0, 1), (1, 2), (0, 1)):
            swap = vals[j] > vals[i]
            vals[i], vals[j] = np.where(swap, vals[j], vals[i]), np.where(swap, vals[i], vals[j])
            vecs[i], vecs[j] = ([np.where(swap, b, a) for a, b in zip(vecs[i], vecs[j])],
                                [np.where(swap, a, b) for a, b in zip(vecs[i], vecs[j])])
    evals = np.stack(vals, axis=-1)
    # evecs[n, component, k]: column k is the k-th eigenvector
    evecs = np.stack([np.stack(v, axis=-1) for v in vecs], axis=-1)
    return evals, evecs


# ----------------------------------------------------------------------------
# Model and fit
# ----------------------------------------------------------------------------
def design_matrix(gtab: GradientTable) -> np.ndarray:
    """(N, 7) design in solver units: ln S = X @ [Dxx Dyy Dzz Dxy Dxz Dyz (um^2/ms), ln S0]."""
    X = gtab.bmatrix_design().astype(np.float64)
    X[:, :6] /= B_UNIT
    return X


class TensorModel:
    """Diffusion tensor model for one acquisition.

    Parameters
    ----------
    gtab : GradientTable
        b-values (s/mm^2) and unit b-vectors (FSL image frame).
    fit_method : "WLS" (default) or "OLS"
        WLS: OLS on log-signals, then weighted LS with weights = predicted
        signal squared (dipy's WLS, MRtrix3's IWLS step).
    n_iter : int
        Number of WLS passes (1 = dipy's WLS; each further pass re-weights
        with the previous WLS prediction). Ignored for OLS.
    chunk_size : int, optional
        Voxels per chunk (default ``CHUNK_CPU``, or ``CHUNK_CUDA`` on a GPU).
    device : None, "cpu" or "cuda[:k]"
        None: CUDA when torch sees one, else the CPU.
    backend : None, "numpy" or "torch"
        CPU only: which array library runs the kernel (default numpy, the
        faster one here); the torch code path is the one used on CUDA.
    n_threads : int, optional
        CPU worker threads of the numpy kernel (default:
        ``available_threads()``). The torch backend on the CPU runs one worker
        with ``available_threads()`` intra-op threads instead.
    """

    def __init__(self, gtab: GradientTable, fit_method: str = "WLS", n_iter: int = 1,
                 chunk_size: int | None = None, device=None, backend: str | None = None,
                 n_threads: int | None = None):
        method = str(fit_method).upper()
        if method not in FIT_METHODS:
            raise ValueError(f"fit_method must be one of {FIT_METHODS}, not {fit_method!r}")
        if int(n_iter) < 1:
            raise ValueError(f"n_iter must be >= 1, not {n_iter!r}")
        self.gtab = gtab
        self.fit_method = method
        self.n_iter = int(n_iter)
        X = design_matrix(gtab)
        sv = np.linalg.svd(X, compute_uv=False)
        if X.shape[0] < 7 or sv[-1] <= sv[0] * 1e-8:
            raise ValueError(f"gradient table ({X.shape[0]} volumes) cannot determine a tensor: "
                             f"it needs a b0 and >= 6 non-coplanar directions with b > 0")
        self._design = X
        #: smallest eigenvalue accepted, per unit of max|ln S| (solver units)
        self._eig_resolution = (PD_ROUNDING_BOUNDS * float(np.finfo(np.float32).eps)
                                * float(np.abs(np.linalg.pinv(X)[:6]).sum(axis=1).max()))
        self._b_max = float((-X[:, :3].sum(axis=1)).max())  # strongest b (ms/um^2)
        self._ops, workers, default_chunk, block = _resolve_backend(device, backend)
        self.device = self._ops.device
        self.backend = self._ops.name
        self.n_threads = workers if n_threads is None else max(1, int(n_threads))
        self.chunk_size = int(chunk_size or default_chunk)
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self._kernel = _Kernel(X, self._ops, min(block, self.chunk_size))

    @property
    def parameters(self) -> dict:
        """The settings that define a fit (for sidecars)."""
        return {"model": "tensor", "fit_method": self.fit_method,
                "n_iter": self.n_iter if self.fit_method == "WLS" else 0,
                "min_signal": MIN_SIGNAL, "diffusivity_unit": "mm^2/s",
                "vector_frame": "fsl-image"}

    # -- public ---------------------------------------------------------------
    def min_eigenvalue(self, s0, largest_eval):
        """The smallest eigenvalue (mm^2/s) that counts as positive for a voxel
        with this S0 and largest eigenvalue (mm^2/s): below it the fit cannot
        tell the eigenvalue from 0 in float32 (see PD_ROUNDING_BOUNDS)."""
        with np.errstate(divide="ignore"):
            ln_s0 = np.log(np.asarray(s0, dtype=np.float64))
        floor = _eigen_floor(ln_s0, np.asarray(largest_eval) * B_UNIT, self._eig_resolution,
                             self._b_max)
        return floor / B_UNIT

    def fit(self, data, mask=None) -> "TensorFit":
        """Fit every voxel of ``data`` (..., N) where ``mask`` (...) is True."""
        data = np.asanyarray(data)
        if data.shape[-1] != len(self.gtab):
            raise ValueError(f"data has {data.shape[-1]} volumes, the gradient table "
                             f"{len(self.gtab)}")
        grid = data.shape[:-1]
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != grid:
                raise ValueError(f"mask shape {mask.shape} differs from the data grid {grid}")
        chunk = self.chunk_size
        N = data.shape[-1]
        if data.flags.c_contiguous or data.ndim == 1:
            flat, order = data.reshape(-1, N), "C"
        elif data.flags.f_contiguous:
            flat, order = data.reshape(-1, N, order="F"), "F"   # a view: voxels are rows
        else:
            flat, order = None, "C"
        nvox = int(np.prod(grid, dtype=np.int64))
        if mask is None:
            idx = np.arange(nvox)
        else:
            idx = np.flatnonzero(mask.ravel(order=order))
        if flat is not None and mask is None:
            chunks = (flat[i:i + chunk] for i in range(0, nvox, chunk))
        elif flat is not None:
            chunks = (flat[idx[i:i + chunk]] for i in range(0, idx.size, chunk))
        else:  # arbitrary strides: gather by coordinates, chunk by chunk
            coords = np.unravel_index(idx, grid)
            chunks = (data[tuple(c[i:i + chunk] for c in coords)]
                      for i in range(0, idx.size, chunk))
        return self._fit_chunks(chunks, idx, grid, mask, order=order)

    def fit_params(self, rows) -> np.ndarray:
        """Raw parameters (7, n) of the rows (n, N): [Dxx Dyy Dzz Dxy Dxz Dyz] in
        um^2/ms and ln S0 (solver units, no eigen-decomposition)."""
        ops = self._ops
        rows = np.asarray(rows)
        buf = self._kernel.buffers(rows.shape[0])
        with self._threads_context(), self._blas_context(), np.errstate(all="ignore"):
            out = self._kernel.fit(ops.asarray(rows) if ops.name == "torch" else rows,
                                   buf, self.fit_method, self.n_iter)
        return ops.to_numpy(out)

    # -- engine ---------------------------------------------------------------
    @contextmanager
    def _blas_context(self):
        """Single-threaded BLAS in the calling thread (numpy kernel): parallelism
        comes from one worker per core. OpenBLAS's own threads are no help for
        these skinny products: with 2 threads, (2048 x 288) @ (288 x 28) took
        5.8 ms instead of 0.47 ms on the 2-core test machine."""
        if self.backend != "numpy":
            yield
            return
        with single_threaded_blas():
            yield

    @contextmanager
    def _threads_context(self):
        """torch on the CPU: intra-op threads = the cores this process may use."""
        prev = None
        if self.backend == "torch" and str(self.device) == "cpu":
            import torch  # torch takes seconds to import: only the torch backend needs it
            prev = torch.get_num_threads()
            torch.set_num_threads(available_threads())
        try:
            yield
        finally:
            if prev is not None:
                import torch  # torch takes seconds to import: only the torch backend needs it
                torch.set_num_threads(prev)

    def _fit_chunks(self, chunks, index: np.ndarray, grid: tuple, mask,
                    check_first=None, prepare=None, order: str = "C") -> "TensorFit":
        """Fit an iterator of row chunks whose voxels are ``index`` (flat indices
        into ``grid`` in ``order``, in the same order). The results stay rows
        (one per fitted voxel) until a map is asked for (:class:`TensorFit`).
        ``prepare``: applied to each chunk in the worker that fits it (a copy
        into the kernel's C-ordered rows, made in parallel)."""
        n_rows = index.size
        out = (np.empty((n_rows, 3), np.float32), np.empty((n_rows, 3, 3), np.float32),
               np.empty(n_rows, np.float32), np.empty(n_rows, bool))
        ops, kernel = self._ops, self._kernel
        n_workers = self.n_threads if ops.name == "numpy" else 1
        n_workers = min(n_workers, max(1, -(-n_rows // self.chunk_size)))
        local = threading.local()          # each worker's kernel buffers

        def fit_chunk(item):
            start, rows = item
            if prepare is not None:
                rows = prepare(rows)
            with np.errstate(all="ignore"):
                if start == 0 and check_first is not None:
                    check_first(rows)
                n = rows.shape[0]
                if n > getattr(local, "cap", 0):
                    local.buf, local.cap = kernel.buffers(n), n
                src = ops.asarray(rows) if ops.name == "torch" else rows
                params = ops.to_numpy(kernel.fit(src, local.buf, self.fit_method, self.n_iter))
                _store(params, slice(start, start + n), out, self._eig_resolution, self._b_max)
            return n

        with self._threads_context():
            fitted = sum(map_chunks(fit_chunk, _numbered(chunks), n_workers,
                                    single_blas=ops.name == "numpy"))
        if fitted != n_rows:
            raise RuntimeError(f"fitted {fitted} voxels, expected {n_rows}")
        return TensorFit.from_rows(*out, index=index, grid=grid, order=order, mask=mask)


def _numbered(chunks):
    """(offset of the chunk's first row, rows) for consecutive row chunks."""
    start = 0
    for rows in chunks:
        yield start, rows
        start += rows.shape[0]


def _eigen_floor(ln_s0, largest_eval, eig_resolution: float, b_max: float):
    """Smallest resolvable eigenvalue (solver units): the resolution times the
    largest |ln S| the fit saw, |ln S0| + b_max * largest |eigenvalue|."""
    return eig_resolution * (np.abs(ln_s0) + b_max * largest_eval)


def _store(params: np.ndarray, where: slice, out, eig_resolution: float,
           b_max: float) -> None:
    """Eigen-decompose one chunk's parameters (7, n) into its rows ``where`` of
    ``out`` (evals, evecs, s0, failed).

    A voxel fails when anything is non-finite or its smallest eigenvalue is
    not above the fit's float32 resolution (see PD_ROUNDING_BOUNDS).
    """
    evals_o, evecs_o, s0_o, failed_o = out
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        evals, evecs = _eig_sym3(params[0], params[1], params[2],
                                 params[3], params[4], params[5])
        s0 = np.exp(params[6])
        floor = _eigen_floor(params[6], np.abs(evals).max(axis=1), eig_resolution, b_max)
        bad = ~(np.isfinite(params).all(axis=0) & np.isfinite(evals).all(axis=1)
                & np.isfinite(evecs).all(axis=(1, 2)) & np.isfinite(s0)
                & (evals[:, 2] > floor))
    evals *= np.float32(1 / B_UNIT)
    if bad.any():
        evals[bad] = 0
        evecs[bad] = 0
        s0[bad] = 0
    evals_o[where] = evals
    evecs_o[where] = evecs
    s0_o[where] = s0
    failed_o[where] = bad


# ----------------------------------------------------------------------------
# Scalar measures of eigenvalues (dipy.reconst.dti's free functions)
# ----------------------------------------------------------------------------
# The one implementation of each measure: TensorFit, the phantom's ground
# truth, the image-gradient tensor and the experiments all call these. They
# keep the dtype of ``evals`` (..., 3) and its eigenvalue order must be
# descending for ``axial_diffusivity`` and ``radial_diffusivity``.
def fractional_anisotropy(evals) -> np.ndarray:
    """FA = sqrt(((l1-l2)^2 + (l2-l3)^2 + (l3-l1)^2) / (2 (l1^2 + l2^2 + l3^2))),
    0 where all eigenvalues are 0 or any is not finite."""
    ev = np.asarray(evals)
    l1, l2, l3 = ev[..., 0], ev[..., 1], ev[..., 2]
    num = (l1 - l2) ** 2 + (l2 - l3) ** 2 + (l3 - l1) ** 2
    den = l1 * l1 + l2 * l2 + l3 * l3
    with np.errstate(invalid="ignore", divide="ignore"):
        fa = np.asarray(np.sqrt(np.float32(0.5) * num / den))
    fa[~(den > 0)] = 0
    return fa


def mean_diffusivity(evals) -> np.ndarray:
    """MD, the mean eigenvalue."""
    return np.asarray(evals).mean(axis=-1)


def axial_diffusivity(evals) -> np.ndarray:
    """AD, the largest eigenvalue (``evals`` descending)."""
    return np.ascontiguousarray(np.asarray(evals)[..., 0])


def radial_diffusivity(evals) -> np.ndarray:
    """RD, the mean of the two smaller eigenvalues (``evals`` descending)."""
    ev = np.asarray(evals)
    return (ev[..., 1] + ev[..., 2]) * ev.dtype.type(0.5)


def _evals_measure(measure, doc: str) -> cached_property:
    """A map of :class:`TensorFit` computed on first access: ``measure(evals)``,
    on the fitted rows only when the fit holds rows (then placed on the grid)."""
    def compute(self) -> np.ndarray:
        if self._rows is not None:
            return self._on_grid(measure(self._rows[0]))
        return measure(self.evals)
    compute.__doc__ = doc
    return cached_property(compute)


def _rows_on_grid(name: str, doc: str) -> cached_property:
    """A parameter of a :class:`TensorFit` held as rows, placed on the grid on
    first access (:meth:`TensorFit._on_grid`)."""
    def compute(self) -> np.ndarray:
        return self._on_grid(self._rows[_ROW_FIELDS.index(name)])
    compute.__doc__ = doc
    return cached_property(compute)


#: The per-voxel results of :meth:`TensorModel._fit_chunks`, in this order.
_ROW_FIELDS = ("evals", "evecs", "s0", "failed")


class TensorFit:
    """Fitted tensors on a voxel grid; maps are computed on first access.

    ``evals`` (..., 3) descending in mm^2/s, ``evecs`` (..., 3, 3) with the
    eigenvectors as columns (dipy's convention), ``s0`` (...). ``failed``
    marks voxels whose fit was non-finite or not positive definite; their
    parameters, and so all their maps, are 0, as are voxels outside the mask.

    A fit made by :class:`TensorModel` holds its results as rows of the
    fitted voxels (:meth:`from_rows`): each map is computed on those rows and
    placed on the grid once, when first asked for (an HCP mask is 28 % of its
    grid, and the 3x3 eigenvectors are 9 values a voxel that the exported
    maps never need on the grid).
    """

    _rows = None

    def __init__(self, evals, evecs, s0, failed, mask=None):
        self.evals = evals
        self.evecs = evecs
        self.s0 = s0
        self.failed = failed
        self.mask = mask
        self._grid = tuple(np.shape(evals)[:-1])

    @classmethod
    def from_rows(cls, evals, evecs, s0, failed, index, grid: tuple, order: str = "C",
                  mask=None) -> "TensorFit":
        """A fit held as rows (n, ...) of the voxels ``index`` (flat indices into
        ``grid`` in ``order``). Maps come back in that memory order (values
        are the same either way): F for the F-ordered rows of NIfTI data, so
        each row lands next to the previous one and the map is written to a
        NIfTI file without a transposition."""
        fit = cls.__new__(cls)
        fit._rows = (evals, evecs, s0, failed)
        fit._index, fit._grid, fit._order = index, tuple(grid), order
        fit.mask = mask
        return fit

    def _on_grid(self, rows: np.ndarray) -> np.ndarray:
        """Values of the fitted rows (n, ...) on the grid (zeros elsewhere)."""
        tail = rows.shape[1:]
        out = np.zeros(self._grid + tail, rows.dtype, order=self._order)
        out.reshape((-1,) + tail, order=self._order)[self._index] = rows
        return out

    evals = _rows_on_grid("evals", "Eigenvalues (..., 3), descending (mm^2/s).")
    evecs = _rows_on_grid("evecs", "Eigenvectors (..., 3, 3) as columns.")
    s0 = _rows_on_grid("s0", "Fitted S0 (...), the data's units.")
    failed = _rows_on_grid("failed", "Voxels whose fit failed (...), bool.")

    @property
    def shape(self) -> tuple:
        return self._grid

    @property
    def n_failed(self) -> int:
        return int(np.count_nonzero(self.failed))

    md = _evals_measure(mean_diffusivity, "Mean diffusivity (mm^2/s).")
    ad = _evals_measure(axial_diffusivity, "Axial diffusivity, the largest eigenvalue (mm^2/s).")
    rd = _evals_measure(radial_diffusivity,
                        "Radial diffusivity, mean of the two smaller eigenvalues (mm^2/s).")
    fa = _evals_measure(fractional_anisotropy,
                        "Fractional anisotropy in [0, 1] (0 where the fit failed or outside).")

    @cached_property
    def v1(self) -> np.ndarray:
        """Principal eigenvector (..., 3), b-vector (FSL image) frame; sign arbitrary."""
        if self._rows is not None:
            return self._on_grid(np.ascontiguousarray(self._rows[1][:, :, 0]))
        return np.ascontiguousarray(self.evecs[..., :, 0])

    @cached_property
    def color_fa(self) -> np.ndarray:
        """FA-weighted |V1| (..., 3) (RGB), as dipy's ``color_fa``."""
        return np.clip(self.fa, 0, 1)[..., None] * np.abs(self.v1)

    @property
    def quadratic_form(self) -> np.ndarray:
        """The tensors D (..., 3, 3) in mm^2/s."""
        return np.einsum("...ik,...k,...jk->...ij", self.evecs, self.evals, self.evecs)

    def lower_triangular(self) -> np.ndarray:
        """(..., 6): Dxx, Dxy, Dyy, Dxz, Dyz, Dzz (dipy's order), mm^2/s."""
        D = self.quadratic_form
        return np.stack([D[..., 0, 0], D[..., 0, 1], D[..., 1, 1],
                         D[..., 0, 2], D[..., 1, 2], D[..., 2, 2]], axis=-1)

    def maps(self) -> dict:
        """The exported scalar/vector maps by BIDS ``param-`` name."""
        return {"fa": self.fa, "md": self.md, "ad": self.ad, "rd": self.rd,
                "v1": self.v1, "s0": self.s0}

    def predict(self, gtab: GradientTable, s0=None, chunk: int = 65536) -> np.ndarray:
        """Signals (..., len(gtab)) float32 predicted for ``gtab``:
        S0 exp(-b g^T D g), with this fit's S0 unless ``s0`` is given."""
        X = design_matrix(gtab).astype(np.float32)           # (N', 7), solver units
        D = self.quadratic_form.reshape(-1, 3, 3) * np.float32(B_UNIT)
        s0 = self.s0 if s0 is None else np.broadcast_to(np.asarray(s0, np.float32), self.shape)
        s0 = np.asarray(s0, dtype=np.float32).reshape(-1)
        params = np.stack([D[:, 0, 0], D[:, 1, 1], D[:, 2, 2],
                           D[:, 0, 1], D[:, 0, 2], D[:, 1, 2]], axis=0)  # (6, V)
        out = np.empty((params.shape[1], X.shape[0]), np.float32)
        for i in range(0, params.shape[1], chunk):
            blk = out[i:i + chunk]
            np.matmul(params[:, i:i + chunk].T, X[:, :6].T, out=blk)
            np.exp(blk, out=blk)
            blk *= s0[i:i + chunk, None]
        return out.reshape(self.shape + (X.shape[0],))


def dti_shells(gtab, max_bval: float = DTI_MAX_BVAL) -> list[float]:
    """The shells a tensor is fitted to: those up to ``max_bval``, else the lowest."""
    return [b for b in gtab.shells if b <= max_bval] or gtab.shells[:1]


def fit_dwi(dwi, volumes=None, **model_kw) -> TensorFit:
    """Fit the tensor to a validated :class:`~dmriflow.interfaces.io.DWI` in its mask.

    Rows come from ``dwi.masked_views(chunk)`` (no copy of the 4D array or of
    the mask rows); the maps come back on the full 3D grid, float32, zeros
    outside the mask, in the memory order of the rows (F for NIfTI data and
    mask rows). ``volumes``: fit only these volumes, picked chunk by chunk (a
    subset without copying the series, unlike ``dwi.select_volumes``).
    """
    grid = tuple(dwi.mask.shape)
    order = dwi.voxel_order
    index = dwi.masked_index(order)     # the voxel of each row DWI.masked yields
    if volumes is not None:
        volumes = np.asarray(volumes)
        if np.array_equal(volumes, np.arange(len(dwi.gtab))):
            volumes = None
    if volumes is not None:
        model = TensorModel(dwi.gtab.select(volumes), **model_kw)
        if dwi.data is None:
            # mask rows: the chunk's kept columns gathered straight from the
            # F-ordered rows into C order, in the worker that fits them. Not
            # np.take: it copies the whole chunk to C order first (HCP subject,
            # 108 of 288 volumes: 0.8 s against 0.26 s; the same values)
            return model._fit_chunks(dwi.masked_views(model.chunk_size), index, grid, dwi.mask,
                                     prepare=lambda rows: np.ascontiguousarray(rows[:, volumes]),
                                     order=order)
        # np.take, not chunk[:, volumes]: that is not C-contiguous, and the
        # kernel's elementwise log on it was 20x slower (HCP subject, OLS: 9.7
        # s against 0.5 s; the same bits)
        rows = (np.take(chunk, volumes, axis=1) for chunk in dwi.masked(model.chunk_size))
        return model._fit_chunks(rows, index, grid, dwi.mask, order=order)
    model = TensorModel(dwi.gtab, **model_kw)

    def check_first(rows):
        # guard the ordering contract above (io.DWI.masked) at the cost of one voxel
        if index.size and not np.array_equal(rows[0], dwi.voxel(int(np.ravel_multi_index(
                np.unravel_index(index[0], grid, order=order), grid)))):
            raise RuntimeError("DWI.masked() returned voxels in an unexpected order")

    # mask rows: views, each copied into the kernel's C order by the worker
    # that fits it (io.DWI.masked would copy them while the workers wait)
    prepare = np.ascontiguousarray if dwi.data is None else None
    return model._fit_chunks(dwi.masked_views(model.chunk_size), index, grid, dwi.mask,
                             check_first=check_first, prepare=prepare, order=order)
