"""Benchmark: per-patch eigenvalue cost of MP-PCA's noise split, all eigenvalues
(``ssterf``, what :func:`dmriflow.interfaces.preprocess.mppca` does) vs only the
ones the Exp2 criterion reads (``sstebz`` bisection: the top few and the smallest).

The criterion (``_classify``) scans c from the top down: margin_c needs the
eigenvalue L_c, the mean of the c+1 smallest (= the trace minus the ones above
c) and L_0. So one patch needs its top keep+1 eigenvalues and L_0, the trace
coming free from the tridiagonal's diagonal. This times, on the Gram matrices
(96 x 96) of random in-mask patches of ``bench/denoise.py``'s block, after the
same ``ssytrd`` reduction:

* ``ssterf``: all 96 eigenvalues (tridiagonal QR);
* ``sstebz`` top k + L_0, for fixed k (a patch keeping >= k components would
  need a second call, not counted here);
* ``sstebz`` oracle: exactly each patch's top keep+1 plus L_0 (keep from the
  ``ssterf`` split): a lower bound for any top-k retry scheme, one patch at a time;
* the compiled split ``mppca_split.mp_split`` (what mppca runs): the same
  bisection, with Sturm counts vectorised across ``SPLIT_LANES`` patches (numba), its split
  compared with ``ssterf``'s;

each with two absolute tolerances: eps |T| (float32 precision of the largest
eigenvalue: the eigenvalues' own error from ``ssytrd`` is ~r eps |T|, so no
coarser than that) and r eps |T| (that error itself). Rows alternate in each
round, load1 printed per round. It also reports, per tolerance, the patches
whose keep count from the oracle's bisection eigenvalues (criterion from the
trace) differs from the ``ssterf`` split.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/denoise_eigs.py [--patches 2000]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _chars(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8).copy()


def grams(n_patches: int, seed: int = 0):
    """(B, 96, 96) float32 Gram matrices of random in-mask 5x5x5 patches of the
    bench block (demeaned as mppca does), and (n, N)."""
    from denoise import PATCH_RADIUS, make_block

    from dmriflow.interfaces.preprocess import _gram, _patch_starts, _radius3
    import torch
    subj = make_block((96, 96, 60))
    data, mask = subj.dwi.astype(np.float32), subj.mask
    N = data.shape[3]
    pr = _radius3(PATCH_RADIUS, mask.shape, N)
    size = 2 * pr + 1
    n = int(np.prod(size))
    starts = _patch_starts(mask, pr, size, 1)
    rng = np.random.default_rng(seed)
    sel = starts[np.sort(rng.choice(len(starts), min(n_patches, len(starts)), replace=False))]
    P = np.stack([data[x:x + size[0], y:y + size[1], z:z + size[2]].reshape(n, N)
                  for x, y, z in sel])
    A = torch.from_numpy(P - P.mean(axis=1, keepdims=True))
    return _gram(A, n, N).numpy(), n, N


def partial_keep(W, k, L0, trace, n: int, N: int):
    """Exp2 keep count from the top ``k`` eigenvalues ``W`` (B, >= k, ascending in
    the last k columns), L_0 and the trace (all / q, float64), scanning c from
    the top down; -1 where the crossing is not among the top k. Assumes every
    eigenvalue is usable (m = r: N <= n - 1, as the bench's 96 volumes, 125 voxels)."""
    B, r = W.shape[0], N
    q, m = max(N, n), r
    keep = np.full(B, -1)
    above = np.zeros(B)
    for j in range(int(k.max())):
        c = m - 1 - j
        Lc = W[:, r - 1 - j]
        var = (trace - above) / (c + 1)
        gam = (c + 1) / (q - (m - c - 1))
        noise = (j < k) & (keep < 0) & (4 * np.sqrt(gam) * var - (Lc - L0) >= 0)
        keep[noise] = j
        above += Lc
    return keep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    from dmriflow.interfaces.preprocess import _classify, _lapack, _lapack_tridiagonal
    C, n, N = grams(args.patches)
    B, r = C.shape[0], C.shape[1]
    q = max(N, n)
    d, e, tau, L = _lapack_tridiagonal(C.copy())
    _, keep = _classify(torch.from_numpy(L) / q, n, N, "exp2")
    keep = keep.numpy()
    trace = d.astype(np.float64).sum(axis=1)
    sterf, stebz = _lapack("ssterf", 4), _lapack("sstebz", 18)
    eps = float(np.finfo(np.float32).eps)
    tnorm = np.abs(L).max(axis=1)
    rng_i, order_b = _chars("I"), _chars("B")
    info = np.zeros(B, np.int32)
    found = np.zeros((B, r), np.float32)
    wk, iwk = np.empty(4 * r, np.float32), np.empty(3 * r, np.int32)
    iblock, isplit = np.empty(r, np.int32), np.empty(r, np.int32)
    m_out, nsplit = np.zeros(1, np.int32), np.zeros(1, np.int32)
    vlu = np.zeros(2, np.float32)
    ints = np.array([r], np.int32)

    def t_sterf():
        LL, ee = d.copy(), e.copy()
        t = time.perf_counter()
        for b in range(B):
            sterf(ints.ctypes.data, LL.ctypes.data + 4 * b * r, ee.ctypes.data + 4 * b * r,
                  info.ctypes.data + 4 * b)
        return (time.perf_counter() - t) / B * 1e6

    def t_stebz(il, iu, abstol):
        """Eigenvalues il[b]..iu[b] (1-based, ascending) of each tridiagonal, at the
        start of row b of ``found`` (a whole row: sstebz may use up to r entries of
        its output as workspace); us a patch."""
        lim = np.ascontiguousarray(np.stack([il, iu], axis=1), dtype=np.int32)
        tol = np.ascontiguousarray(abstol, dtype=np.float32)
        t = time.perf_counter()
        for b in range(B):
            stebz(rng_i.ctypes.data, order_b.ctypes.data, ints.ctypes.data, vlu.ctypes.data,
                  vlu.ctypes.data + 4, lim.ctypes.data + 8 * b, lim.ctypes.data + 8 * b + 4,
                  tol.ctypes.data + 4 * b, d.ctypes.data + 4 * b * r, e.ctypes.data + 4 * b * r,
                  m_out.ctypes.data, nsplit.ctypes.data, found.ctypes.data + 4 * b * r,
                  iblock.ctypes.data, isplit.ctypes.data, wk.ctypes.data, iwk.ctypes.data,
                  info.ctypes.data + 4 * b)
        if info.any():
            raise RuntimeError(f"sstebz info {info[info != 0][:3]}")
        return (time.perf_counter() - t) / B * 1e6

    ones = np.ones(B, np.int32)
    print(f"{B} patches, Gram {r}x{r}; exp2 keep counts 0..: {np.bincount(keep).tolist()}; "
          f"top/L_0 median {np.median(L[:, -1] / np.maximum(L[:, 0], 1e-30)):.0f}", flush=True)
    flips = {}
    from dmriflow.interfaces.mppca_split import compile_split, mp_split
    compile_split()

    def t_split():
        t = time.perf_counter()
        got = mp_split(d, e, n, N, "exp2")[2]
        us = (time.perf_counter() - t) / B * 1e6
        flips["compiled split"] = (int((got != keep).sum()), int((got < 0).sum()))
        return us

    for rnd in range(args.rounds):
        row = [f"load1 {os.getloadavg()[0]:.2f}", f"ssterf all {t_sterf():.0f}",
               f"compiled split {t_split():.0f}"]
        for name, tol in (("eps|T|", eps * tnorm), ("r eps|T|", r * eps * tnorm)):
            small = t_stebz(ones, ones, tol)
            L0 = found[:, 0].astype(np.float64)
            for k in (8, 12):
                us = t_stebz(np.full(B, r - k + 1), np.full(B, r), tol)
                row.append(f"stebz[{name}] top{k}+L0 {us + small:.0f}")
            kk = keep + 1
            us = t_stebz(r - kk + 1, np.full(B, r), tol)
            row.append(f"stebz[{name}] oracle {us + small:.0f}")
            if rnd == 0:
                # the top kk[b] eigenvalues into the last kk[b] columns of W
                cols = np.arange(r)[None, :]
                src = np.clip(cols - (r - kk)[:, None], 0, r - 1)
                W = np.where(cols >= (r - kk)[:, None],
                             np.take_along_axis(found, src, axis=1), 0.0)
                got = partial_keep(W / q, kk, L0 / q, trace / q, n, N)
                flips[name] = (int((got != keep).sum()),
                               float(np.abs(W[:, -1] - L[:, -1]).max() / (eps * tnorm.max())),
                               float(np.abs(L0 - L[:, 0]).max() / (eps * tnorm.max())))
        print(" | ".join(row) + " (us a patch)", flush=True)
    nf, undecided = flips.pop("compiled split")
    print(f"compiled split: keep differs from ssterf's in {nf} of {B} patches "
          f"({undecided} left to ssterf: crossing below its top eigenvalues)")
    for name, (nf, err, err0) in flips.items():
        print(f"abstol {name}: keep differs from ssterf's in {nf} of {B} patches "
              f"(oracle eigenvalues, criterion from the float64 trace); vs ssterf: top "
              f"eigenvalue {err:.1f}, L_0 {err0:.1f} x eps |T|max")
    return 0


if __name__ == "__main__":
    sys.exit(main())
