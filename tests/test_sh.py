"""Spherical harmonics and RISH (interfaces/sh.py).

Ground truth: analytic quadrature, band-limited test functions (exactly
representable up to order 8, so every identity holds to float32 precision),
tensor mixtures (realistic, tolerance from the measured aliasing), Gaussian /
Rician noise of known sigma. Cross-tool: dipy's bases and ``sf_to_sh``, and
MRtrix3 ``amp2sh`` / ``sh2power`` on the real MDT data.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dmriflow.interfaces import sh
from dmriflow.interfaces.gradients import GradientTable
from dmriflow.interfaces.io import DWI, load_dwi
from dmriflow.interfaces.gradients import spiral_directions as fibonacci_hemisphere

MDT = "mdt_te60_b1k_b2k"


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def gauss_sphere(n_theta: int = 24, n_phi: int = 48):
    """Product Gauss-Legendre x uniform quadrature: exact for polynomials of
    degree < 2 n_theta in cos(theta) and < n_phi in phi."""
    x, w = np.polynomial.legendre.leggauss(n_theta)
    phi = 2 * math.pi * np.arange(n_phi) / n_phi
    ct, ph = np.meshgrid(x, phi, indexing="ij")
    st = np.sqrt(1 - ct ** 2)
    dirs = np.column_stack([(st * np.cos(ph)).ravel(), (st * np.sin(ph)).ravel(), ct.ravel()])
    weights = np.repeat(w, n_phi) * (2 * math.pi / n_phi)
    return dirs, weights


def band_limited(g: np.ndarray, rot: np.ndarray | None = None) -> np.ndarray:
    """Even polynomial of degree 8 on the sphere (exact in the order-8 basis),
    with energy at every order 0..8; ``rot`` rotates the function."""
    if rot is not None:
        g = g @ rot            # f_R(g) = f(R^T g)
    u = np.array([[0.3, 0.5, 0.81], [-0.7, 0.2, 0.1], [0.1, -0.9, 0.4]])
    u /= np.linalg.norm(u, axis=1)[:, None]
    p = g @ u.T
    return 0.4 + 0.9 * p[:, 0] ** 8 + 0.5 * p[:, 1] ** 6 - 0.3 * p[:, 2] ** 4 + 0.2 * p[:, 0] ** 2


def tensor_mixture(g: np.ndarray, b: float, rot: np.ndarray | None = None) -> np.ndarray:
    """Two crossing prolate tensors (60/40, 70 degrees), optionally rotated."""
    d1 = np.diag([1.7e-3, 0.3e-3, 0.3e-3])
    r2 = Rotation.from_euler("z", 70, degrees=True).as_matrix()
    out = 0.0
    for f, d in ((0.6, d1), (0.4, r2 @ d1 @ r2.T)):
        if rot is not None:
            d = rot @ d @ rot.T
        out = out + f * np.exp(-b * np.einsum("ni,ij,nj->n", g, d, g))
    return out


def rish_close(a, b, rtol):
    """Per-order relative difference ``|a_l - b_l| / b_l`` below ``rtol[l]``."""
    rel = np.abs(np.asarray(a, float) - b) / np.asarray(b, float)
    assert np.all(rel <= rtol), f"RISH rel. diff {rel} > {rtol}"


# ----------------------------------------------------------------------------
# basis
# ----------------------------------------------------------------------------
def test_counts_and_indices():
    assert [sh.n_coeffs(L) for L in (0, 2, 4, 6, 8)] == [1, 6, 15, 28, 45]
    ls, ms = sh.sh_indices(4)
    assert ls.tolist() == [0] + [2] * 5 + [4] * 9
    assert ms.tolist() == [0, -2, -1, 0, 1, 2, -4, -3, -2, -1, 0, 1, 2, 3, 4]
    # MRtrix3 index formula l(l+1)/2 + m
    for k, (l, m) in enumerate(zip(*sh.sh_indices(8))):
        assert k == l * (l + 1) // 2 + m
    assert np.array_equal(sh.order_of_coeff(8), sh.sh_indices(8)[0])
    for bad in (-2, 3, 2.5):
        with pytest.raises(ValueError):
            sh.n_coeffs(bad)


def test_max_order_for_rule():
    """Largest even L with n_coeffs(L) <= n_dirs, capped at MAX_SH_ORDER = 8:
    least squares needs at least as many directions as coefficients (the
    same rule as amp2sh's default, checked below against amp2sh itself).
    Hence 12 -> 2 (order 4 needs 15), 5 -> 0 (order 2 needs 6)."""
    expect = {1: 0, 5: 0, 6: 2, 12: 2, 14: 2, 15: 4, 27: 4, 28: 6, 30: 6, 44: 6, 45: 8,
              60: 8, 90: 8, 1000: 8}
    assert {n: sh.max_order_for(n) for n in expect} == expect
    assert sh.MAX_SH_ORDER == 8
    assert sh.max_order_for(91, cap=12) == 12 and sh.max_order_for(90, cap=12) == 10
    with pytest.raises(ValueError):
        sh.max_order_for(0)


@pytest.mark.parametrize("lmax", [2, 8, 12])
def test_basis_orthonormal_by_quadrature(lmax):
    dirs, w = gauss_sphere()
    basis = sh.sh_basis(dirs, lmax)
    gram = basis.T @ (w[:, None] * basis)
    assert np.abs(gram - np.eye(sh.n_coeffs(lmax))).max() < 1e-12


def test_basis_equals_dipy_tournier_and_descoteaux():
    from dipy.reconst.shm import real_sh_descoteaux, real_sh_tournier
    rng = np.random.default_rng(1)
    v = rng.normal(size=(300, 3))
    v /= np.linalg.norm(v, axis=1)[:, None]
    theta, phi = np.arccos(v[:, 2]), np.arctan2(v[:, 1], v[:, 0])
    ours = sh.sh_basis(v * 3.0, 10)          # non-unit input is normalised
    tour, m, l = real_sh_tournier(10, theta, phi, legacy=False)
    assert np.array_equal(m, sh.sh_indices(10)[1]) and np.array_equal(l, sh.order_of_coeff(10))
    assert np.abs(ours - tour).max() < 1e-12
    # Descoteaux (dipy's default, non-legacy) = ours with m -> -m and a
    # (-1)^m sign on m < 0: an orthogonal map within each order, so same RISH.
    desc, _, _ = real_sh_descoteaux(10, theta, phi, legacy=False)
    ls, ms = sh.sh_indices(10)
    swap = ls * (ls + 1) // 2 - ms
    sign = np.where((ms < 0) & (ms % 2 == 1), -1.0, 1.0)
    assert np.abs(desc - sign * ours[:, swap]).max() < 1e-12
    with pytest.raises(ValueError, match="zero-length"):
        sh.sh_basis(np.zeros((2, 3)), 2)


def test_model_equals_dipy_sf_to_sh_with_lb_regulariser():
    from dipy.core.sphere import Sphere
    from dipy.reconst.shm import sf_to_sh
    g = fibonacci_hemisphere(64)
    sig = tensor_mixture(g, 2000.0)[None] * np.array([[1.0], [0.5]])
    for lam in (0.0, 0.006):
        ours = sh.SHModel(g, 8, lb_lambda=lam).fit(sig).coeffs
        ref = sf_to_sh(sig, Sphere(xyz=g), sh_order_max=8, basis_type="tournier07",
                       legacy=False, smooth=lam)
        assert np.abs(ours - ref).max() < 1e-6 * np.abs(ref).max()
    # the regulariser damps high orders only
    r0 = sh.SHModel(g, 8).fit(sig).rish()
    r1 = sh.SHModel(g, 8, lb_lambda=0.006).fit(sig).rish()
    assert np.all(r1[:, 4] < 0.9 * r0[:, 4]) and np.allclose(r1[:, 0], r0[:, 0], rtol=5e-3)


def test_too_few_directions_is_an_error():
    with pytest.raises(ValueError, match="cannot determine"):
        sh.SHModel(fibonacci_hemisphere(20), 6)
    sh.SHModel(fibonacci_hemisphere(20), 6, lb_lambda=0.01)  # regularised: allowed


# ----------------------------------------------------------------------------
# RISH: rotation invariance, direction-count independence, scaling
# ----------------------------------------------------------------------------
def test_rish_rotation_invariant_band_limited():
    """Exactly representable functions: RISH agree to float32 precision over
    random rotations (of the function or of the directions) and 60 vs 90 dirs."""
    g90, g60 = fibonacci_hemisphere(90), fibonacci_hemisphere(60)
    m90, m60 = sh.SHModel(g90, 8), sh.SHModel(g60, 8)
    # (a) a degree-8 polynomial (independent of our basis): reference = its fit
    ref = m90.fit(band_limited(g90)).rish()
    assert ref.shape == (5,) and np.all(ref > 1e-5 * ref.sum())   # every order present
    rtol = np.array([1e-5, 1e-5, 1e-5, 1e-5, 5e-5])                  # float32 fit
    # (b) a random order-8 SH series, rotated by evaluating at R^T g:
    #     ground truth RISH = sum of its squared coefficients per order
    c_true = np.random.default_rng(5).normal(size=45) * np.repeat([3, 1, 1, 1, 1],
                                                                   [1, 5, 9, 13, 17])
    series = lambda g, rot: sh.sh_basis(g @ rot, 8) @ c_true
    r_true = sh.rish(c_true, 8)
    for seed in range(10):
        rot = Rotation.random(random_state=seed).as_matrix()
        g_rot = g90 @ rot.T
        for r in (m90.fit(band_limited(g90, rot)).rish(),                # function rotated
                  sh.SHModel(g_rot, 8).fit(band_limited(g_rot)).rish(),  # directions rotated
                  m60.fit(band_limited(g60, rot)).rish()):               # 60 directions
            rish_close(r, ref, rtol)
        rish_close(m90.fit(series(g90, rot)).rish(), r_true, 1e-5)
        rish_close(m60.fit(series(g60, rot)).rish(), r_true, 1e-5)
    # sensitivity: a non-orthonormal basis (MRtrix 0.2 legacy, no sqrt 2)
    # breaks the invariance by far more than the tolerance
    from dipy.reconst.shm import real_sh_tournier

    def legacy_rish(f_vals, g):
        b, _, _ = real_sh_tournier(8, np.arccos(g[:, 2]), np.arctan2(g[:, 1], g[:, 0]))
        return sh.rish(np.linalg.lstsq(b, f_vals, rcond=None)[0], 8)
    rot = Rotation.random(random_state=3).as_matrix()
    with pytest.warns(PendingDeprecationWarning):
        r0, r1 = legacy_rish(band_limited(g90), g90), legacy_rish(band_limited(g90, rot), g90)
    assert np.max(np.abs(r1 - r0)[1:] / r0[1:]) > 100 * rtol.max()


def test_rish_rotation_invariant_tensor_mixture():
    """Real signals are not band-limited: orders > 8 alias, measured at
    b=1000 / 90 dirs as <= 0.02 %, 0.2 %, 2.4 % spread for l = 4, 6, 8."""
    g90, g60 = fibonacci_hemisphere(90), fibonacci_hemisphere(60)
    m90, m60 = sh.SHModel(g90, 8), sh.SHModel(g60, 8)
    ref = m90.fit(tensor_mixture(g90, 1000.0)).rish()
    rtol = np.array([1e-5, 1e-4, 1e-3, 1e-2, 6e-2])
    for seed in range(8):
        rot = Rotation.random(random_state=100 + seed).as_matrix()
        rish_close(m90.fit(tensor_mixture(g90, 1000.0, rot)).rish(), ref, rtol)
        rish_close(m60.fit(tensor_mixture(g60, 1000.0, rot)).rish(), ref, 2 * rtol)


def test_scale_by_order():
    rng = np.random.default_rng(2)
    c = rng.normal(size=(4, 3, 45)).astype(np.float32)
    s = np.array([1.0, 0.5, 2.0, 0.0, 3.0], dtype=np.float32)
    out = sh.scale_by_order(c, 8, s)
    assert out.dtype == np.float32 and out.shape == c.shape
    np.testing.assert_allclose(sh.rish(out, 8), s ** 2 * sh.rish(c, 8), rtol=1e-5)
    # voxel-wise scale maps (harmonisation's lambda_l maps)
    smap = rng.uniform(0.5, 2.0, size=(4, 3, 5))
    np.testing.assert_allclose(sh.rish(sh.scale_by_order(c, 8, smap)), smap ** 2 * sh.rish(c),
                               rtol=1e-5)
    assert np.array_equal(sh.scale_by_order(c, 8, np.ones(5)), c)
    np.testing.assert_array_equal(sh.rish(c, 8, chunk_size=5), sh.rish(c, 8))
    with pytest.raises(ValueError):
        sh.scale_by_order(c, 8, np.ones(4))
    with pytest.raises(ValueError):
        sh.rish(c, 6)


def test_rish_definition_by_hand():
    c = np.arange(15, dtype=np.float32)
    r = sh.rish(c, 4)
    assert r.tolist() == [0.0, float(sum(k * k for k in range(1, 6))),
                          float(sum(k * k for k in range(6, 15)))]


# ----------------------------------------------------------------------------
# noise
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("rician", [False, True])
def test_fit_residual_and_error_at_noise_level(rician):
    """Least squares with N = 90 dirs, K = 45 coefficients: E[residual MS] =
    sigma^2 (N - K)/N; E[error MS of the fitted signal] = sigma^2 K/N at the
    samples and sigma^2 tr((B^T B)^-1)/(4 pi) averaged over the sphere."""
    n_vox, sigma = 20000, 0.02
    g = fibonacci_hemisphere(90)
    model = sh.SHModel(g, 8)
    n, k = model.basis.shape
    rng = np.random.default_rng(7)
    clean = np.outer(rng.uniform(0.5, 1.0, n_vox), band_limited(g)).astype(np.float32)
    noisy = clean + sigma * rng.standard_normal(clean.shape)
    if rician:   # SNR >= 20 here, so Rician ~ Gaussian; looser bounds
        noisy = np.hypot(noisy, sigma * rng.standard_normal(clean.shape))
    fit = model.fit(noisy.astype(np.float32))
    tol = 0.05 if rician else 0.02
    resid_rms = np.sqrt(np.mean((fit.predict() - noisy) ** 2))
    assert abs(resid_rms / (sigma * math.sqrt((n - k) / n)) - 1) < tol
    err_rms = np.sqrt(np.mean((fit.predict() - clean) ** 2))
    assert abs(err_rms / (sigma * math.sqrt(k / n)) - 1) < tol + (0.04 if rician else 0)
    assert err_rms < sigma
    dense, w = gauss_sphere()
    true_c = np.linalg.lstsq(model.basis, band_limited(g), rcond=None)[0]
    scale = clean[:, 0] / band_limited(g)[0]
    err_sphere = fit.coeffs - scale[:, None] * true_c[None]
    ms_sphere = np.mean(np.sum(err_sphere ** 2, axis=1)) / (4 * math.pi)
    expect = sigma ** 2 * np.trace(np.linalg.inv(model.basis.T @ model.basis)) / (4 * math.pi)
    assert abs(ms_sphere / expect - 1) < 2 * tol + (0.08 if rician else 0)
    # predict() on other directions = the basis there (quadrature check)
    np.testing.assert_allclose(fit.predict(dense[:50])[:3],
                               fit.coeffs[:3] @ sh.sh_basis(dense[:50], 8).T, rtol=1e-5,
                               atol=1e-6)


# ----------------------------------------------------------------------------
# SHModel / fit_shells mechanics
# ----------------------------------------------------------------------------
def _synthetic_dwi(order="C") -> DWI:
    """Voxel-varying signals (random S0, random mix of two fibre
    configurations), one mask voxel with a zero b0, in C or F storage."""
    g1, g2 = fibonacci_hemisphere(30), fibonacci_hemisphere(60)
    bvals = np.r_[[0.0] * 3, [1000.0] * 30, [5.0], [2000.0] * 60]
    bvecs = np.r_[np.zeros((3, 3)), g1, np.zeros((1, 3)), g2]
    gtab = GradientTable(bvals, bvecs)
    rng = np.random.default_rng(3)
    shape = (7, 6, 5)
    s0 = rng.uniform(200, 1000, size=shape + (1,))
    frac = rng.uniform(size=shape + (1,))
    rot = Rotation.from_euler("xyz", [40, 10, 70], degrees=True).as_matrix()
    sig = np.empty(shape + (len(bvals),), dtype=np.float32, order=order)
    sig[...] = s0
    for sel, g, b in ((slice(3, 33), g1, 1000.0), (slice(34, None), g2, 2000.0)):
        sig[..., sel] *= frac * tensor_mixture(g, b) + (1 - frac) * tensor_mixture(g, b, rot)
    mask = rng.uniform(size=shape) > 0.3
    sig[1, 1, 1, bvals < 50] = 0.0
    mask[1, 1, 1] = True
    return DWI(sig, gtab, mask, np.eye(4), nib.Nifti1Header(), {"dwi": "synthetic"})


#: C- and F-ordered inputs take different float32 summation orders; coefficients
#: of this size (l=0 ~ 1.8) agree to a few float32 ulps.
COEFF_ATOL = 1e-6


def test_fit_shells_memory_order_and_guard():
    c_dwi, f_dwi = _synthetic_dwi("C"), _synthetic_dwi("F")
    assert f_dwi.data.flags.f_contiguous and not f_dwi.data.flags.c_contiguous
    with np.errstate(all="raise"):   # the zero-b0 voxel must not divide by zero
        fc = sh.fit_shells(c_dwi, chunk_size=17)
        ff = sh.fit_shells(f_dwi, chunk_size=50)
    assert list(fc) == [1000.0, 2000.0]
    assert fc[1000.0].lmax == 6 and fc[2000.0].lmax == 8
    gtab, data, mask = c_dwi.gtab, c_dwi.data, c_dwi.mask
    mean_b0 = data[..., gtab.b0s_mask].mean(-1)
    for b in fc:
        n_coef = sh.n_coeffs(fc[b].lmax)
        assert fc[b].coeffs.dtype == np.float32 and fc[b].coeffs.shape == (7, 6, 5, n_coef)
        assert fc[b].rish().shape == (7, 6, 5, fc[b].lmax // 2 + 1)
        np.testing.assert_allclose(ff[b].coeffs, fc[b].coeffs, rtol=0, atol=COEFF_ATOL)
        # RISH_l sums the squares of 2l+1 coefficients that agree to COEFF_ATOL, so
        # they agree to 2 COEFF_ATOL sqrt((2l+1) RISH_l) + (2l+1) COEFF_ATOL^2. A
        # relative tolerance cannot hold: the high orders are ~3e-5 of l=0 and sit
        # at float32 resolution (a 1.6e-5 relative difference with OpenBLAS's
        # Haswell kernel, 7 of 840 values, 1.5e-9 absolute).
        n_l = 2 * np.arange(0, fc[b].lmax + 1, 2) + 1
        bound = 2 * COEFF_ATOL * np.sqrt(n_l * fc[b].rish()) + n_l * COEFF_ATOL**2
        assert np.all(np.abs(ff[b].rish() - fc[b].rish()) <= bound)
        # stored RISH = RISH of the stored coefficients
        np.testing.assert_allclose(fc[b].rish(), sh.rish(fc[b].coeffs), rtol=1e-6)
        fitted = fc[b].mask
        assert not fitted[1, 1, 1] and fitted.sum() == mask.sum() - 1
        assert np.all(fc[b].coeffs[~fitted] == 0)
        # voxel by voxel = a float64 least-squares fit of data[v] / mean b0
        idx = gtab.shell_indices(b)
        basis = sh.sh_basis(gtab.bvecs[idx], fc[b].lmax)
        y = data[fitted][:, idx].astype(np.float64) / mean_b0[fitted][:, None]
        expect = np.linalg.lstsq(basis, y.T, rcond=None)[0].T
        np.testing.assert_allclose(fc[b].coeffs[fitted], expect, rtol=0, atol=2e-6)
        # same as SHModel(gtab, shell=b).fit(data, mask), both storage orders
        for dwi in (c_dwi, f_dwi):
            m = sh.SHModel(dwi.gtab, shell=b).fit(dwi.data, dwi.mask, chunk_size=23)
            np.testing.assert_allclose(m.coeffs, fc[b].coeffs, rtol=0, atol=COEFF_ATOL)
            np.testing.assert_array_equal(m.mask, fitted)
        # predict(s0=True) gives back the DWI on the shell (noise-free, smooth signal)
        pred = fc[b].predict(s0=True)[fitted]
        assert np.abs(pred - data[fitted][:, idx]).max() < 2e-3 * data.max()
    np.testing.assert_allclose(fc[1000.0].s0[mask], mean_b0[mask], rtol=1e-5, atol=1e-3)
    # lmax per shell, raw (un-normalised) fit, torch path
    raw = sh.fit_shells(c_dwi, lmax={1000.0: 4, 2000.0: 6}, normalise=False, device="cpu")
    assert raw[1000.0].lmax == 4 and raw[2000.0].lmax == 6 and raw[1000.0].s0 is None
    m = sh.SHModel(gtab, 4, shell=1000.0, normalise=False).fit(data, mask)
    np.testing.assert_allclose(raw[1000.0].coeffs, m.coeffs, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="shells"):
        sh.SHModel(gtab)


def test_rish_of_mask_rows_equals_rish_of_copied_rows():
    """RISH (and the mean b0 and fitted mask) of a series held as mask rows,
    projected straight from F-ordered views of the rows, equal bit for bit
    those of the same series read from an F-ordered grid (whose chunks are
    copied into C order first: the former path), with noise so that float32
    rounding depends on the sum order; the RISH-only maps come back F-ordered
    (one contiguous volume per order, as a NIfTI file stores it), the
    coefficients C-ordered as before."""
    grid_dwi = _synthetic_dwi("F")
    rng = np.random.default_rng(8)
    grid_dwi.data *= rng.uniform(0.9, 1.1, size=grid_dwi.data.shape).astype(np.float32)
    mask = grid_dwi.mask
    rows = grid_dwi.data.reshape(-1, len(grid_dwi.gtab), order="F")[
        np.flatnonzero(mask.ravel(order="F"))]
    rows_dwi = DWI(None, grid_dwi.gtab, mask, np.eye(4), nib.Nifti1Header(), {},
                   rows=np.asfortranarray(rows))
    for coefficients in (False, True):
        old = sh.fit_shells(grid_dwi, chunk_size=17, coefficients=coefficients)
        new = sh.fit_shells(rows_dwi, chunk_size=17, coefficients=coefficients)
        for b in old:
            for name in ("rish", "s0", "mask") + (("coeffs",) if coefficients else ()):
                ref, got = (getattr(f, name) for f in (old[b], new[b]))
                ref, got = (a() if callable(a) else a for a in (ref, got))
                assert got.shape == ref.shape and got.dtype == ref.dtype, name
                assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(ref).tobytes()
            rish = new[b].rish()
            assert rish.flags.f_contiguous != coefficients
            assert np.all(rish[~new[b].mask] == 0) and np.all(rish[new[b].mask][:, 0] > 0)
    # the data see the sum order: the same products summed in another order differ
    w = sh.SHModel(grid_dwi.gtab, shell=1000.0).projection().astype(np.float32)
    perm = rng.permutation(w.shape[0])
    assert (np.ascontiguousarray(rows) @ w).tobytes() != \
        (np.ascontiguousarray(rows[:, perm]) @ w[perm]).tobytes()


# ----------------------------------------------------------------------------
# MRtrix3 on real data
# ----------------------------------------------------------------------------
def _need_mrtrix():
    if shutil.which("amp2sh") is None:
        if os.environ.get("CI"):
            pytest.fail("MRtrix3 (amp2sh) is required in CI")
        pytest.skip("MRtrix3 amp2sh not installed")


def _mrtrix(*args):
    subprocess.run([*args, "-quiet", "-force", "-nthreads", "2"], check=True)


@pytest.fixture(scope="module")
def mdt(shared_data):
    d = shared_data / MDT
    return d, load_dwi(d / "b1k_b2k_example_slices_24_38.nii.gz", d / "b1k_b2k.bval",
                       d / "b1k_b2k.bvec", d / "b1k_b2k_example_slices_24_38_mask.nii.gz")


def _amp2sh(tmp_path, name, dwi_path, grad_args, *extra):
    out = tmp_path / f"{name}.nii"
    _mrtrix("amp2sh", *grad_args, *extra, str(dwi_path), str(out))
    return np.asarray(nib.load(out).get_fdata(dtype=np.float32))


def _mrtrix_normalise_correction(dwi: DWI, s0: np.ndarray) -> np.ndarray:
    """amp2sh -normalise divides by (1 + sum b0) / n_b0 (it starts its sum at
    1), not by the mean b0; this factor turns our coefficients into its."""
    n_b0 = int(dwi.gtab.b0s_mask.sum())
    return s0 / (s0 + 1.0 / n_b0)


@pytest.mark.mrtrix
def test_against_amp2sh_real_data(mdt, tmp_path):
    _need_mrtrix()
    d, dwi = mdt
    img = d / "b1k_b2k_example_slices_24_38.nii.gz"
    fsl = ["-fslgrad", str(d / "b1k_b2k.bvec"), str(d / "b1k_b2k.bval")]
    ours = sh.fit_shells(dwi)
    raw = sh.fit_shells(dwi, normalise=False)
    mask = ours[1000.0].mask
    assert mask.sum() == dwi.mask.sum() - np.sum(dwi.mask & (ours[1000.0].s0 <= 0))
    # MRtrix gradient table in OUR frame (FSL image axes): coefficients compare 1:1
    grad = tmp_path / "grad_fslframe.b"
    np.savetxt(grad, np.column_stack([dwi.gtab.bvecs, dwi.gtab.bvals]), fmt="%.10f")
    corr = _mrtrix_normalise_correction(dwi, ours[1000.0].s0)[mask][:, None]
    for b, lmax in ((1000.0, 6), (2000.0, 8)):
        shells = ["-shells", f"0,{b:g}"]
        ref_raw = _amp2sh(tmp_path, f"raw{b:g}", img, ["-grad", str(grad)], *shells)
        assert ref_raw.shape[-1] == sh.n_coeffs(lmax) == ours[b].coeffs.shape[-1]
        a, r = raw[b].coeffs[dwi.mask], ref_raw[dwi.mask]
        assert np.linalg.norm(a - r) / np.linalg.norm(r) < 1e-5
        ref = _amp2sh(tmp_path, f"norm{b:g}", img, ["-grad", str(grad)], *shells, "-normalise")
        a, r = ours[b].coeffs[mask] * corr, ref[mask]
        assert np.linalg.norm(a - r) / np.linalg.norm(r) < 1e-5
        assert np.abs(a - r).max() < 1e-4 * np.abs(r).max()
    # with -fslgrad MRtrix works in the scanner frame: = ours on to_world vectors
    ref_world = _amp2sh(tmp_path, "world", img, fsl, "-shells", "0,1000", "-normalise")
    world = GradientTable(dwi.gtab.bvals, dwi.gtab.to_world(dwi.affine))
    ours_w = sh.SHModel(world, shell=1000.0).fit(dwi.data, dwi.mask)
    a, r = ours_w.coeffs[mask] * corr, ref_world[mask]
    assert np.linalg.norm(a - r) / np.linalg.norm(r) < 1e-5
    # ... the two frames differ (a flip), so coefficients differ, RISH do not
    assert np.linalg.norm(ours[1000.0].coeffs[mask] * corr - r) / np.linalg.norm(r) > 0.05
    rish_ref = sh.rish(ref_world[mask] / corr)
    rish_ours = ours[1000.0].rish()[mask]
    rel = np.linalg.norm(rish_ours - rish_ref, axis=0) / np.linalg.norm(rish_ref, axis=0)
    assert np.all(rel < 1e-5), rel
    # MRtrix's own power spectrum: sh2power -spectrum = R_l / (4 pi)
    _mrtrix("sh2power", "-spectrum", str(tmp_path / "world.nii"), str(tmp_path / "pw.nii"))
    power = np.asarray(nib.load(tmp_path / "pw.nii").get_fdata(dtype=np.float32))[mask]
    rel = np.linalg.norm(sh.rish(ref_world[mask]) / (4 * math.pi) - power) / np.linalg.norm(power)
    assert rel < 1e-5


@pytest.mark.mrtrix
def test_default_lmax_matches_amp2sh(shared_data, tmp_path):
    """amp2sh's default order on real shells of 3..24 and 12 directions."""
    _need_mrtrix()
    d = shared_data / "mdt_te91_multishell"
    bvals = np.loadtxt(d / "multishell_b6k_max.bval")
    img = d / "multishell_b6k_max_example_slices_24_38.nii.gz"
    fsl = ["-fslgrad", str(d / "multishell_b6k_max.bvec"), str(d / "multishell_b6k_max.bval")]
    for b in (750, 1500, 3000, 6000):
        n_dirs = int(np.sum(np.abs(bvals - b) < 100))
        out = _amp2sh(tmp_path, f"ms{b}", img, fsl, "-shells", f"0,{b}")
        assert out.shape[-1] == sh.n_coeffs(sh.max_order_for(n_dirs)), (b, n_dirs)
    p = shared_data / "philips_ingenia_b1000"
    out = _amp2sh(tmp_path, "philips", p / "DTI_Biobank_2mm_MB3S2_EPI_701.nii.gz",
                  ["-fslgrad", str(p / "DTI_Biobank_2mm_MB3S2_EPI_701.bvec"),
                   str(p / "DTI_Biobank_2mm_MB3S2_EPI_701.bval")])
    assert out.shape[-1] == sh.n_coeffs(sh.max_order_for(12)) == 6
