"""MP-PCA's split from bisection of only the eigenvalues it reads
(interfaces/mppca_split.py) against the full spectrum."""

import os

import numpy as np
import pytest
import torch
from scipy.linalg import eigvalsh_tridiagonal

from dmriflow.interfaces import mppca_split as ms
from dmriflow.interfaces import preprocess as pp
from dmriflow.interfaces.sim.phantom import hcp_scheme, simulate_subject

U32 = float(np.finfo(np.float32).eps)
U64 = float(np.finfo(np.float64).eps)
#: What the split promises of each bisected eigenvalue: within a quarter of
#: float32's unit roundoff of itself (the interval's midpoint: half of that).
REL = U32 / 4


def _floor(tnorm):
    """Bisection's absolute floor, plus as much again for the float64 reference."""
    return 2 * ms.BISECT_FLOOR_ULPS * U64 * tnorm


def _tridiagonals(n_signal, r=96, seed=0):
    """Gram-like float32 matrices (a noise bulk 0.5-2 and ``n_signal[b]``
    eigenvalues 1e3-2e4 above it), reduced by LAPACK ``ssytrd`` as mppca
    does: d, e (B, r)."""
    rng = np.random.default_rng(seed)
    B = len(n_signal)
    lam = rng.uniform(0.5, 2.0, (B, r))
    for b, k in enumerate(n_signal):
        lam[b, :k] = rng.uniform(1e3, 2e4, k)
    Q = np.linalg.qr(rng.normal(size=(B, r, r)))[0]
    C = np.ascontiguousarray(((Q * lam[:, None, :]) @ Q.transpose(0, 2, 1)).astype(np.float32))
    d, e, _ = pp._lapack_sytrd(C)
    return d, e


def _exact(d, e):
    """float64 eigenvalues (ascending) of each float32 tridiagonal."""
    r = d.shape[1]
    return np.stack([eigvalsh_tridiagonal(d[b].astype(np.float64), e[b, :r - 1].astype(np.float64))
                     for b in range(d.shape[0])])


@pytest.mark.parametrize("estimator", ["exp2", "veraart"])
@pytest.mark.parametrize("n,N", [(125, 96), (27, 30)])
def test_split_equals_the_full_spectrum_split(estimator, n, N):
    """Keep counts equal, and noise variances agree to bisection's resolution,
    with the criterion on all float64 eigenvalues of the same tridiagonals,
    for 0-10 signal components, a group of patches that is not a multiple of
    the lanes (70), and more volumes than patch voxels (27 voxels, 30
    volumes: the smallest eigenvalue is not usable). Measured: var within
    3.7e-5 relative (0.074 of the tolerance). Fails on var / c instead of
    / (c + 1), and on L_0 taken from eigenvalue 0 where it is not usable."""
    r = min(n, N)
    d, e = _tridiagonals(np.arange(70) % 11, r=r, seed=1)
    L, var, keep = ms.mp_split(d, e, n, N, estimator)
    exact = _exact(d, e)
    v64, k64 = pp._classify(torch.from_numpy(exact / max(N, n)), n, N, estimator)
    assert np.array_equal(keep, k64.numpy())
    tnorm = np.abs(exact).max(axis=1)
    # the scan's variance: the trace less at most SCAN_MAX + 1 bisected values,
    # over c + 1 >= m - SCAN_MAX noise eigenvalues, then rounded to float32
    m, q = min(r, n - 1), max(N, n)
    tol = ((ms.SCAN_MAX + 1) * REL * tnorm / ((m - ms.SCAN_MAX) * q)
           + U32 * v64.numpy())
    assert np.all(np.abs(var - v64.numpy()) <= tol)
    for b in range(len(keep)):                      # the kept ones, for sstein
        k = keep[b]
        got = L[b, r - k:].astype(np.float64)
        assert np.all(np.abs(got - exact[b, r - k:]) <= (REL + U32 / 2)
                      * np.abs(exact[b, r - k:]) + _floor(tnorm[b]))


def test_compiled_split_is_the_exact_split_of_each_tridiagonal():
    """Every patch of the phantom at SNR 100 (8551, stride 1, both
    estimators): the split mppca computes (compiled bisection,
    :mod:`.mppca_split`) is the split of the float64 eigenvalues of the same
    float32 tridiagonal, as ``ssterf``'s was (on bench/denoise.py's block
    0 of 147063 patches changed). High SNR makes the noise eigenvalues small
    against |T| (median top / smallest ~2e5): the first version, bisecting
    to an absolute eps32 |T|, flips 2 patches here and fails (27 of the
    bench's 147063)."""
    scheme = hcp_scheme(n_b0=6, shells=(1000, 2000), n_dirs=30, jitter=False)
    clean = simulate_subject((30, 36, 30), seed=3, snr=None, scheme=scheme, voxel_size=3.2)
    sigma = float(clean.dwi[..., scheme.b0s_mask].mean(-1)[clean.mask].mean() / 100)
    data = (clean.dwi + np.random.default_rng(7).normal(0.0, sigma, clean.dwi.shape)
            ).astype(np.float32)
    N, pr = data.shape[3], np.full(3, 2)
    size, n = 2 * pr + 1, 125
    starts = pp._patch_starts(clean.mask, pr, size, 1)
    P = torch.from_numpy(np.stack([data[x:x + 5, y:y + 5, z:z + 5].reshape(n, N)
                                   for x, y, z in starts]))
    C = pp._gram(P - P.mean(dim=1, keepdim=True), n, N).numpy()
    d, e, _ = pp._lapack_sytrd(C)
    exact = _exact(d, e)
    for estimator in ("exp2", "veraart"):
        keep = pp._split(d, e, n, N, estimator, torch)[2].numpy()
        want = pp._classify(torch.from_numpy(exact / max(N, n)), n, N, estimator)[1].numpy()
        assert np.array_equal(keep, want)


def test_deep_crossings_and_non_finite_patches_go_to_the_full_solver():
    """A patch keeping more components than the scan reads (``SCAN_MAX``) or
    with a non-finite tridiagonal is undecided (-1); ``_split`` then gives
    exactly the full solver's split and eigenvalues for it (``ssterf`` +
    ``_classify``)."""
    counts = np.array([ms.SCAN_MAX + 3, 2, ms.SCAN_MAX, 0])
    d, e = _tridiagonals(counts, seed=2)
    d[3, 5] = np.nan
    n, N = 125, 96
    keep = ms.mp_split(d, e, n, N, "exp2")[2]
    assert keep.tolist() == [-1, 2, -1, -1]
    d[3, 5] = 1.0                                   # finite again: scanned
    L, var, keep = pp._split(d, e, n, N, "exp2", torch)
    full = pp._lapack_sterf(d, e)
    v_full, k_full = pp._classify(torch.from_numpy(full) / max(N, n), n, N, "exp2")
    assert keep.tolist() == [ms.SCAN_MAX + 3, 2, ms.SCAN_MAX, 0] == k_full.tolist()
    for b in (0, 2):                                # the full solver's own rows
        assert np.array_equal(L[b], full[b]) and var[b] == v_full[b]


def test_bisection_resolution_is_relative():
    """Each scanned eigenvalue (3 signal ones ~1e4, then the first noise one
    ~1-2, which decides the split) is within REL / 2 of itself (plus the
    float64 floor) of the float64 one. The first version bisected to an
    absolute 0.13 eps32 |T|, ~1e4 times coarser on the noise eigenvalue, and
    flipped 27 of 147063 bench patches; it fails here, and so does a
    tolerance 8x coarser."""
    d, e = _tridiagonals(np.full(40, 3), seed=3)
    top = np.zeros((40, ms.SCAN_MAX))
    ms._scan(d, e, 125, 96, True, 0.0, top, np.zeros(40), np.zeros(40, np.int64))
    exact = _exact(d, e)
    want = exact[:, :-5:-1]
    tnorm = np.abs(exact).max(axis=1, keepdims=True)
    assert np.all(np.abs(top[:, :4] - want) <= REL / 2 * np.abs(want) + _floor(tnorm))


def test_kernels_compile_where_numba_cannot_cache():
    """Where numba finds nowhere to write its cache (a read-only install and
    no writable home; forced here with numba's own locator setting) the
    kernels compile in the process instead of failing the import, and give
    the same split."""
    import subprocess
    import sys
    code = ("import numpy as np; from dmriflow.interfaces import mppca_split as ms; "
            "assert type(ms._scan._cache).__name__ == 'NullCache'; "
            "d = np.array([[3, 2, 1, 1]], np.float32); e = np.array([[1, 0.1, 0.1, 0]], np.float32); "
            "print(ms.mp_split(d, e, 5, 4, 'exp2')[2].tolist())")
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "numba.core.caching._IPythonCacheLocator"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    d = np.array([[3, 2, 1, 1]], np.float32)
    e = np.array([[1, 0.1, 0.1, 0]], np.float32)
    assert out.strip() == str(ms.mp_split(d, e, 5, 4, "exp2")[2].tolist())


def test_a_patch_splits_alike_alone_and_in_a_pass():
    """Each patch's eigenvalues, variance and keep count are the same bytes
    whether it is bisected alone or in a pass with other patches (each lane
    stops halving when it is narrow), so mppca's output does not depend on
    how patches fall into passes or batches. Fails when a pass halves every
    lane until the slowest is narrow (the first version)."""
    d, e = _tridiagonals(np.arange(40) % 9, seed=4)
    together = ms.mp_split(d, e, 125, 96, "exp2")
    for b in range(len(d)):
        alone = ms.mp_split(d[b:b + 1], e[b:b + 1], 125, 96, "exp2")
        for x, y in zip(together, alone):
            assert np.array_equal(x[b:b + 1], y)
