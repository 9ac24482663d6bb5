"""MP-PCA's noise split from only the eigenvalues it reads, compiled (numba).

The Marchenko-Pastur criterion of :func:`dmriflow.interfaces.preprocess._classify`
scans c from the top down and needs, per patch, its largest keep + 1
eigenvalues, L_0 (the smallest usable one) and the trace. Here they come
from bisection with Sturm counts on each patch's tridiagonal form (LAPACK
``ssytrd``'s d, e), ``SPLIT_LANES`` patches at a time so that every step of a
count is one vector operation across patches: the division chain of a single
count cannot be vectorised, across patches it can. Against all eigenvalues by
tridiagonal QR (``ssterf``), which one patch at a time cannot speed up, this
is ~3x less time on the 96 x 96 Grams of ``bench/denoise.py`` (31-34 against
93 us a patch, one thread: typically 3-6 eigenvalues a patch instead of 96).

Counts run in float64 on the float32 tridiagonal, each eigenvalue to
``BISECT_REL`` of itself (a quarter of float32's unit roundoff): the split
reads small eigenvalues (L_0 and those at the crossing, ~|T| / 27000 in the
median bench patch), which tridiagonal QR gets to nearly their own float32
precision; an absolute resolution of eps32 |T| was not enough and flipped
27 of 147063 bench patches away from the float32 tridiagonal's exact split.
Their error against the Gram's is the reduction's own (gamma_r |C|). A patch
whose crossing is not among its top ``SCAN_MAX`` eigenvalues, or whose values
are not finite, is returned as undecided (keep -1) for the full solver.

Compiling takes 1.5-3 s; the machine code is cached beside this module
(``__pycache__``, as Python's bytecode: files only this package's own kernels
write; ``make env`` makes them) and loads in ~0.2 s. Where the package folder
is not writable (the container's user) numba caches in the user's cache
folder (``XDG_CACHE_HOME``) at first use.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .mp_law import mp_edge, mp_gamma

#: Patches per compiled pass: the counts' vector width. A pass runs until its
#: slowest patch has its crossing and every interval is narrow, so fewer lanes
#: waste less; too few leave the vector units idle. On 4000 Grams of
#: ``bench/denoise.py`` (one thread, us a patch): 4 lanes 45.4, 8 31.1, 12
#: 31.7, 16 30.8-32.4, 32 38.0-40.7, 64 42.2-42.3, 128 44.7.
SPLIT_LANES = 16
#: Each eigenvalue is bisected until its interval is within this fraction of
#: its magnitude (for all the pass's patches): a quarter of float32's unit
#: roundoff, so it is as exact as the float32 value ``ssterf`` would return.
BISECT_REL = float(np.finfo(np.float32).eps) / 4
#: ... or below this many float64 units of |T| (the float64 Sturm count's own
#: resolution; an eigenvalue at 0).
BISECT_FLOOR_ULPS = 4
#: A cap that is never reached: 2.1 |T| halved 64 times is below the floor.
BISECT_MAX_STEPS = 64
#: Top eigenvalues scanned before a patch is handed to the full solver.
#: ``bench/denoise.py``'s patches keep 0-8 components (4000 sampled).
SCAN_MAX = 16

_gamma = njit(inline="always")(mp_gamma)


def _kernel(fn):
    """``fn`` compiled without the GIL, its machine code cached where numba
    can write (beside this module, else the user's cache folder); where
    neither is writable (a read-only install, no writable home) compiled
    anew in each process instead of failing."""
    try:
        return njit(nogil=True, cache=True)(fn)
    except RuntimeError:                  # numba: "no locator available"
        return njit(nogil=True)(fn)


@njit(inline="always")
def _pivot(q, pivmin):
    """A Sturm count's pivot, kept away from zero (LAPACK's pivmin rule)."""
    return -pivmin if abs(q) < pivmin else q


@njit(inline="always")
def _wide(a, b, floor):
    """Is [a, b] wider than ``BISECT_REL`` of its ends, plus ``floor``?"""
    return b - a > BISECT_REL * max(abs(a), abs(b)) + floor


@_kernel
def _bisect(D, E2, lo, hi, floor, pivmin, idx, a, b, x, qv, cnt, wide):
    """Per lane: eigenvalue number ``idx`` (0 = smallest) of the tridiagonal
    (D, E2 = e^2), by halving [lo, hi] until its interval is within
    ``BISECT_REL`` of the eigenvalue or below its ``floor``; into a, b. A
    lane stops halving when it is narrow, whatever the others in the pass:
    a patch's result does not depend on which patches share its pass."""
    r, L = D.shape
    n_wide = 0
    for l in range(L):
        a[l] = lo[l]
        b[l] = hi[l]
        wide[l] = _wide(a[l], b[l], floor[l])
        n_wide += wide[l]
    for _ in range(BISECT_MAX_STEPS):
        if n_wide == 0:
            break
        for l in range(L):
            x[l] = 0.5 * (a[l] + b[l])
            q = _pivot(D[0, l] - x[l], pivmin[l])
            qv[l] = q
            cnt[l] = 1 if q < 0.0 else 0
        for k in range(1, r):
            for l in range(L):
                q = _pivot(D[k, l] - x[l] - E2[k - 1, l] / qv[l], pivmin[l])
                qv[l] = q
                cnt[l] += 1 if q < 0.0 else 0
        n_wide = 0
        for l in range(L):
            if wide[l]:
                if cnt[l] > idx:
                    b[l] = x[l]
                else:
                    a[l] = x[l]
                wide[l] = _wide(a[l], b[l], floor[l])
                n_wide += wide[l]


@_kernel
def _count_below(D, E2, x, pivmin, l):
    """Number of eigenvalues of lane ``l``'s tridiagonal below ``x``."""
    r = D.shape[0]
    q = _pivot(D[0, l] - x, pivmin)
    c = 1 if q < 0.0 else 0
    for k in range(1, r):
        q = _pivot(D[k, l] - x - E2[k - 1, l] / q, pivmin)
        c += 1 if q < 0.0 else 0
    return c


@_kernel
def _scan(d, e, n, N, exp2, edge, top, var_out, keep_out):
    """Fill ``top`` (B, SCAN_MAX: eigenvalues, largest first), ``var_out`` and
    ``keep_out`` (-1: undecided) for each tridiagonal (d, e) (B, r) float32."""
    B, r = d.shape
    q = max(N, n)
    m = min(r, n - 1)                     # demeaning removes one dimension
    L = SPLIT_LANES
    eps = np.float64(np.finfo(np.float32).eps)
    eps64 = np.finfo(np.float64).eps
    tiny = np.finfo(np.float64).tiny
    D = np.empty((r, L))
    E2 = np.empty((r, L))
    lo, hi, pivmin, floor = np.empty(L), np.empty(L), np.empty(L), np.empty(L)
    a, b, x, qv = np.empty(L), np.empty(L), np.empty(L), np.empty(L)
    cnt = np.empty(L, np.int64)
    trace, above, L0 = np.empty(L), np.empty(L), np.empty(L)
    done, wide = np.empty(L, np.bool_), np.empty(L, np.bool_)
    for b0 in range(0, B, L):
        nl = min(L, B - b0)
        for l in range(L):
            p = b0 + l if l < nl else b0          # padding lanes repeat a patch
            lo[l], hi[l], trace[l], above[l] = np.inf, -np.inf, 0.0, 0.0
            emax = 1.0
            for k in range(r):
                dk = np.float64(d[p, k])
                ek = np.float64(e[p, k]) if k < r - 1 else 0.0
                D[k, l] = dk
                E2[k, l] = ek * ek
                emax = max(emax, ek * ek)
                off = abs(ek) + (abs(np.float64(e[p, k - 1])) if k > 0 else 0.0)
                lo[l] = min(lo[l], dk - off)
                hi[l] = max(hi[l], dk + off)
                trace[l] += dk
            tnorm = max(abs(lo[l]), abs(hi[l]))
            floor[l] = BISECT_FLOOR_ULPS * eps64 * tnorm
            tol = eps * tnorm                 # Gershgorin's bounds, widened
            lo[l] -= 2.0 * tol
            hi[l] += 2.0 * tol
            pivmin[l] = tiny * emax
            done[l] = l >= nl or not (math.isfinite(lo[l]) and math.isfinite(hi[l]))
            if l < nl:
                keep_out[b0 + l] = -1
        # the eigenvalues below the usable ones leave the trace; then L_0
        for idx in range(r - m + 1):
            _bisect(D, E2, lo, hi, floor, pivmin, idx, a, b, x, qv, cnt, wide)
            for l in range(L):
                ev = 0.5 * (a[l] + b[l])
                if idx < r - m:
                    trace[l] -= ev
                else:
                    L0[l] = ev
        for s in range(min(SCAN_MAX, m)):
            c = m - 1 - s                     # the c + 1 smallest usable are noise?
            _bisect(D, E2, lo, hi, floor, pivmin, r - 1 - s, a, b, x, qv, cnt, wide)
            gam = _gamma(c, m, q, exp2)
            alldone = True
            for l in range(L):
                ev = 0.5 * (a[l] + b[l])
                if not done[l]:               # (a patch's own values only)
                    top[b0 + l, s] = ev
                    var = (trace[l] - above[l]) / (c + 1) / q
                    if 4.0 * math.sqrt(gam) * var - (ev - L0[l]) / q >= 0.0:
                        done[l] = True
                        keep = s
                        if not exp2:          # all eigenvalues above the MP edge
                            keep = r - _count_below(D, E2, edge * var * q, pivmin[l], l)
                        if keep <= s + 1:     # else its vectors' values are unknown
                            keep_out[b0 + l] = keep
                            var_out[b0 + l] = var
                above[l] += ev
                alldone = alldone and done[l]
            if alldone:
                break


def mp_split(d: np.ndarray, e: np.ndarray, n: int, N: int, estimator: str):
    """The MP split of each patch from its tridiagonal (d, e) (B, r) float32.

    Returns L (B, r) float32 with the top eigenvalues found in its last columns
    (ascending, as ``ssterf`` gives them; zeros before), var (B,) float32 and
    keep (B,) int64, -1 where the split needs the full spectrum."""
    B, r = d.shape
    top = np.zeros((B, SCAN_MAX))
    var = np.zeros(B)
    keep = np.empty(B, np.int64)                 # _scan sets every entry
    exp2 = estimator != "veraart"
    _scan(np.ascontiguousarray(d), np.ascontiguousarray(e), int(n), int(N), exp2,
          mp_edge(n, N), top, var, keep)
    k = min(SCAN_MAX, r)
    L = np.zeros((B, r), np.float32)
    L[:, r - k:] = top[:, k - 1::-1]
    return L, var.astype(np.float32), keep


def compile_split() -> None:
    """Compile the kernels (once per process) before worker threads call them."""
    d = np.ones((1, 3), np.float32)
    mp_split(d, d, 4, 3, "exp2")
