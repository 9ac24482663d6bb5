"""Ground truth of the synthetic head phantom (dmriflow.interfaces.sim.phantom).

The DTI checks use dmriflow's own ``interfaces.dti.TensorModel`` (WLS).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dmriflow.interfaces.sim import phantom as P
from dmriflow.interfaces.dti import TensorModel
from dmriflow.interfaces.gradients import GradientTable, fsl_to_world, min_pair_angle, read_gradients
from dmriflow.interfaces.io import load_dwi, load_image, read_array
from dmriflow.interfaces.sh import SHModel

SNR = 30.0


# ----------------------------------------------------------------------------
# Fixtures (module scope: each simulation of the default grid costs ~1 s)
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scheme() -> GradientTable:
    return P.hcp_scheme()


@pytest.fixture(scope="module")
def exact_scheme() -> GradientTable:
    """b0 = 0 and exact shells, so b0 volumes carry no diffusion weighting."""
    return P.hcp_scheme(jitter=False)


@pytest.fixture(scope="module")
def clean(exact_scheme) -> P.PhantomSubject:
    return P.simulate_subject(seed=3, snr=None, scheme=exact_scheme)


@pytest.fixture(scope="module")
def noisy(scheme) -> P.PhantomSubject:
    return P.simulate_subject(seed=5, snr=SNR, scheme=scheme, keep_noise_free=True)


def single_fibre_wm(truth: dict) -> np.ndarray:
    """Pure white matter holding one fibre population (>= 99 % of the voxel)."""
    return ((truth["label"] == P.LABELS["wm"]) & (truth["fractions"][..., 2] > 0.99)
            & (truth["peak_fractions"][..., 0] > 0.99))


def angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sign-free angle between unit vectors (..., 3)."""
    norm = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    c = np.abs(np.sum(a * b, axis=-1)) / np.where(norm > 0, norm, np.nan)
    return np.degrees(np.arccos(np.clip(c, 0.0, 1.0)))


def dti_b1000(subject: P.PhantomSubject, data: np.ndarray, mask: np.ndarray):
    idx = subject.gtab.select_shells([1000.0])
    return TensorModel(subject.gtab.select(idx), fit_method="WLS").fit(data[..., idx], mask)


# ----------------------------------------------------------------------------
# Gradient scheme
# ----------------------------------------------------------------------------
def test_hcp_scheme_classifies_like_hcp(scheme):
    gt = GradientTable(scheme.bvals, scheme.bvecs)      # re-classified from raw values
    assert len(gt) == 288
    assert int(gt.b0s_mask.sum()) == 18
    assert gt.shells == [1000.0, 2000.0, 3000.0]
    assert gt.directions_per_shell() == {1000.0: 90, 2000.0: 90, 3000.0: 90}
    # stored like HCP: b0 = 5, shells jittered around nominal - 10
    assert np.all(gt.bvals[gt.b0s_mask] == 5.0)
    for b in gt.shells:
        vals = gt.bvals[gt.shell_indices(b)]
        assert len(np.unique(vals)) > 1
        assert np.all(np.abs(vals - b) <= 20) and abs(np.median(vals) - (b - 10)) <= 5
    # b0s interleaved through the series (HCP: one every 16 volumes)
    np.testing.assert_array_equal(np.flatnonzero(gt.b0s_mask), np.arange(0, 288, 16))
    # shells interleaved too: each third of the series holds every shell
    for part in np.array_split(np.flatnonzero(~gt.b0s_mask), 3):
        assert set(gt.shell_of[part]) == {1000.0, 2000.0, 3000.0}
    # unit b-vectors on DW volumes, zero on b0
    norms = np.linalg.norm(gt.bvecs, axis=1)
    np.testing.assert_allclose(norms[~gt.b0s_mask], 1.0, atol=1e-12)
    assert np.all(norms[gt.b0s_mask] == 0)


def test_hcp_scheme_directions_well_spread_and_distinct(scheme):
    """90 antipodal pairs cover the sphere at ~16 deg spacing (hexagonal
    packing bound); electrostatic repulsion reaches >14 deg, random points
    ~1-2 deg. Each shell has its own set."""
    sets = [scheme.bvecs[scheme.shell_indices(b)] for b in scheme.shells]
    for v in sets:
        assert min_pair_angle(v) > 13.0
        # no hemisphere bias: the mean dyadic is isotropic
        np.testing.assert_allclose(v.T @ v / len(v), np.eye(3) / 3, atol=0.02)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert np.median(angle_deg(sets[a][:, None], sets[b][None]).min(axis=1)) > 2.0
    np.testing.assert_array_equal(P.hcp_scheme(seed=0).bvecs, scheme.bvecs)
    assert not np.array_equal(P.hcp_scheme(seed=1).bvecs, scheme.bvecs)
    small = P.hcp_scheme(n_b0=2, shells=(1000, 2000), n_dirs=(30, 64), jitter=False)
    assert small.directions_per_shell() == {1000.0: 30, 2000.0: 64}
    assert set(small.bvals) == {0.0, 1000.0, 2000.0}


# ----------------------------------------------------------------------------
# Noise-free truth
# ----------------------------------------------------------------------------
def test_b0_equals_pd_times_t2_weighting(clean):
    t = clean.truth
    b0 = clean.dwi[..., clean.gtab.b0s_mask]
    np.testing.assert_allclose(b0, np.repeat(t["s0"][..., None], b0.shape[-1], -1),
                               rtol=1e-6, atol=1e-3)
    inside = t["pd"] > 0
    np.testing.assert_allclose(t["s0"][inside],
                               t["pd"][inside] * np.exp(-clean.te / t["t2"][inside]), rtol=1e-4)
    assert np.all(t["s0"][~inside] == 0) and np.all(clean.dwi[~inside] == 0)
    lab = t["label"]
    med = {k: float(np.median(t["t2"][lab == v])) for k, v in P.LABELS.items() if v}
    assert 60 < med["wm"] < 80 and 75 < med["gm"] < 100 and med["csf"] > 1000
    # T2 varies smoothly in space inside a tissue, not only between tissues
    wm_t2 = t["t2"][single_fibre_wm(t)]
    assert wm_t2.std() / wm_t2.mean() > 0.01


def test_te_weighting_follows_t2(exact_scheme):
    """Changing TE rescales the b0 of pure-tissue voxels by exp(-dTE/T2)."""
    a = P.simulate_subject(shape=(20, 24, 20), voxel_size=5.0, seed=4, snr=None,
                           scheme=exact_scheme, te=60.0)
    b = P.simulate_subject(shape=(20, 24, 20), voxel_size=5.0, seed=4, snr=None,
                           scheme=exact_scheme, te=90.0)
    pure = (a.truth["fractions"].max(axis=-1) > 0.999) & a.mask
    assert pure.sum() > 200
    np.testing.assert_allclose(b.truth["s0"][pure] / a.truth["s0"][pure],
                               np.exp(-30.0 / a.truth["t2"][pure]), rtol=1e-5)
    np.testing.assert_allclose(a.truth["pd"], b.truth["pd"])


def test_labels_mask_and_fractions_consistent(clean):
    t = clean.truth
    np.testing.assert_array_equal(clean.mask, t["label"] > 0)
    frac = t["fractions"]
    np.testing.assert_array_equal(t["label"][clean.mask], 1 + np.argmax(frac[clean.mask], -1))
    assert np.all(frac.sum(-1) <= 1 + 1e-6) and np.all(frac.sum(-1)[clean.mask] >= 0.5 - 1e-6)
    assert np.all(frac.sum(-1)[~clean.mask] <= 0.5 + 1e-6)
    # fibres only in white matter; population fractions add up to the WM fraction
    assert np.all(t["nfib"][frac[..., 2] < P.NFIB_MIN_FRACTION] == 0)
    assert np.all(t["peak_fractions"].sum(-1) <= frac[..., 2] + 1e-5)
    counts = np.bincount(t["label"].ravel(), minlength=4)
    assert counts[1] > 1000 and counts[2] > 3000 and counts[3] > 3000
    # nested head: background outside CSF rim outside grey outside white (centre line)
    line = t["label"][:, t["label"].shape[1] // 2, t["label"].shape[2] // 2]
    first = {v: int(np.argmax(line == v)) for v in (1, 2, 3)}
    assert line[0] == 0 and first[1] < first[2] < first[3]
    # FA/MD ranges of the tissues (low-b mean tensor)
    lab = t["label"]
    assert np.all(t["fa"][lab == 1] < 0.05) and np.allclose(np.median(t["md"][lab == 1]), 3e-3)
    assert 0.7 < np.median(t["fa"][(t["bundle"] > 0) & single_fibre_wm(t)]) < 0.9
    assert 0.35 < np.median(t["fa"][(t["bundle"] == 0) & single_fibre_wm(t)]) < 0.55


def test_crossings_designed_angles(clean):
    """Two-population voxels exist with the designed 90 and 60 deg crossings."""
    t = clean.truth
    two = (t["nfib"] == 2) & (t["peak_fractions"][..., 1] > 0.3)
    ang = angle_deg(t["peaks"][..., 0, :], t["peaks"][..., 1, :])[two]
    assert np.sum(ang > 80) >= 10           # cc/cst and slf_left/cst_left, ~90 deg
    assert np.sum(np.abs(ang - 60) < 6) >= 3  # slf_right/cst_right
    # in a 90-deg crossing the mean tensor is flattened: FA well below single fibres
    single = np.median(t["fa"][single_fibre_wm(t) & (t["bundle"] > 0)])
    assert np.median(t["fa"][two][ang > 80]) < single - 0.2


def test_v1_follows_bundles(clean):
    """Fibre orientation follows the bundle: in straight bundles (cst) and the
    arched slf, the long axis of the bundle's voxel cloud (world mm) is along
    the truth V1 mapped back to the world frame (FSL frame, x flipped: a wrong
    flip would tilt the CSTs by ~20 deg and fail)."""
    t = clean.truth
    ijk = np.indices(t["label"].shape).reshape(3, -1).T
    xyz = ijk @ clean.affine[:3, :3].T + clean.affine[:3, 3]
    for name, tol in (("cst_left", 5.0), ("cst_right", 5.0), ("slf_left", 8.0),
                      ("slf_right", 8.0)):
        k = P.BUNDLES.index(name) + 1
        sel = ((t["bundle"] == k) & (t["peak_fractions"][..., 0] > 0.9)).ravel()
        pts = xyz[sel] - xyz[sel].mean(axis=0)
        axis = np.linalg.eigh(pts.T @ pts)[1][:, -1]
        v1 = fsl_to_world(t["v1"].reshape(-1, 3)[sel], clean.affine)
        v1 *= np.sign(v1 @ axis)[:, None]
        assert angle_deg(axis, v1.mean(axis=0)) < tol, name
    # continuity: stepping one voxel along V1 inside a bundle changes V1 by little
    core = single_fibre_wm(t) & (t["bundle"] > 0)
    idx = np.argwhere(core)
    step = fsl_to_world(t["v1"][core], clean.affine) / np.diag(clean.affine)[:3]
    nxt = np.rint(idx + step / np.abs(step).max(axis=1, keepdims=True)).astype(int)
    ok = core[tuple(nxt.T)]
    assert ok.mean() > 0.5
    assert np.percentile(angle_deg(t["v1"][core][ok], t["v1"][tuple(nxt[ok].T)]), 95) < 10


def test_noise_free_dti_recovers_truth(clean, exact_scheme):
    """Truth = the low-b (first cumulant) mean tensor. A DTI fit at b deviates
    from it by a series in b (ln S = -b D + b^2/2 Var - ...), so fits at b = 50,
    100, 200 Richardson-extrapolated to b=0 ((8 f(50) - 6 f(100) + f(200)) / 3,
    exact for a quadratic) must hit the truth to O(b^3) in every brain voxel,
    partial volume with CSF included (measured: < 5e-4, against first-order
    deviations up to 0.04 at b=100). At b=1000 the known kurtosis bias in pure
    white matter is FA +0.02..0.1 and MD -1..-10 % (radial diffusivity
    underestimated); V1 is exact."""
    t = clean.truth
    sel = single_fibre_wm(t)
    assert sel.sum() > 2000
    mask = clean.mask
    dw = exact_scheme.select_shells([1000.0])
    fits = {}
    for b in (50.5, 101.0, 202.0):                    # b > B0_THRESHOLD = 50
        gt = GradientTable(np.where(exact_scheme.bvals[dw] > 0, b, 0.0), exact_scheme.bvecs[dw])
        s = P.simulate_subject(seed=3, snr=None, scheme=gt)
        fits[b] = TensorModel(gt).fit(s.dwi, mask)
    for name in ("fa", "md"):
        f1, f2, f4 = (getattr(fits[b], name)[mask].astype(np.float64) for b in sorted(fits))
        scale = 1.0 if name == "fa" else t["md"][mask]
        err = np.abs((8 * f1 - 6 * f2 + f4) / 3 - t[name][mask]) / scale
        assert err.max() < 1.5e-3, (name, err.max())
        first = np.abs(f2 - t[name][mask]) / scale      # the b-dependence is real
        assert first.max() > 10 * err.max()
    fit = dti_b1000(clean, clean.dwi, clean.mask)
    dfa = fit.fa[sel] - t["fa"][sel]
    dmd = (fit.md[sel] - t["md"][sel]) / t["md"][sel]
    assert 0.02 < dfa.min() and dfa.max() < 0.1
    assert -0.10 < dmd.min() and dmd.max() < -0.01
    assert angle_deg(fit.v1[sel], t["v1"][sel]).max() < 0.5


def test_reproducible_and_seed_dependent(clean, exact_scheme):
    again = P.simulate_subject(seed=3, snr=None, scheme=exact_scheme)
    np.testing.assert_array_equal(again.dwi, clean.dwi)
    for k in clean.truth:
        np.testing.assert_array_equal(again.truth[k], clean.truth[k])
    other = P.simulate_subject(seed=4, snr=None, scheme=exact_scheme)
    m = clean.mask & other.mask
    assert (clean.mask != other.mask).sum() > 100             # anatomy moved
    assert np.mean(np.abs(clean.truth["fa"][m] - other.truth["fa"][m])) > 0.02
    assert abs(np.median(clean.truth["t2"][clean.truth["label"] == 3])
               - np.median(other.truth["t2"][other.truth["label"] == 3])) > 0.1
    # noise: same seed same noise, anatomy independent of SNR
    n1 = P.simulate_subject(shape=(16, 20, 16), seed=9, snr=20, scheme=exact_scheme)
    n2 = P.simulate_subject(shape=(16, 20, 16), seed=9, snr=20, scheme=exact_scheme)
    n3 = P.simulate_subject(shape=(16, 20, 16), seed=9, snr=10, scheme=exact_scheme)
    np.testing.assert_array_equal(n1.dwi, n2.dwi)
    np.testing.assert_array_equal(n1.truth["fa"], n3.truth["fa"])
    assert not np.array_equal(n1.dwi, n3.dwi)


def test_scales_to_any_grid(exact_scheme):
    """The anatomy is tied to the FOV: other grids give the same tissue volumes."""
    ref = P.simulate_subject(shape=(20, 24, 20), voxel_size=5.0, seed=2, snr=None,
                             scheme=exact_scheme)
    odd = P.simulate_subject(shape=(33, 39, 31), voxel_size=(100 / 33, 120 / 39, 100 / 31),
                             seed=2, snr=None, scheme=exact_scheme)
    for s in (ref, odd):
        assert s.dwi.shape == s.mask.shape + (len(exact_scheme),) and s.dwi.dtype == np.float32
        assert np.linalg.det(s.affine[:3, :3]) > 0
    for i in range(3):
        vol = [s.truth["fractions"][..., i].sum() * np.prod(s.voxel_size) for s in (ref, odd)]
        assert abs(vol[0] / vol[1] - 1) < 0.05


# ----------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------
def test_snr_definition(noisy):
    """sigma = mean WM b0 / SNR. At b0 in WM the signal is 30 sigma, where the
    Rician is Gaussian to O(1/SNR^2): noisy - clean has sd sigma (+-0.5 % for
    >1e5 samples) and mean sigma/(2 SNR). In the background the magnitude is
    Rayleigh: mean sigma sqrt(pi/2)."""
    t = noisy.truth
    wm = t["label"] == 3
    assert noisy.sigma == pytest.approx(t["s0"][wm].mean() / SNR, rel=1e-6)
    diff = (noisy.dwi - noisy.noise_free)[wm][:, noisy.gtab.b0s_mask].astype(np.float64)
    assert diff.std() / noisy.sigma == pytest.approx(1.0, abs=0.01)
    assert abs(diff.mean() / noisy.sigma) < 0.03
    bg = noisy.dwi[t["fractions"].sum(-1) == 0]
    assert bg.mean() / noisy.sigma == pytest.approx(np.sqrt(np.pi / 2), rel=0.01)
    assert np.all(noisy.dwi >= 0)


def test_dti_on_noisy_phantom_within_noise_tolerance(noisy):
    """Acceptance: dmriflow DTI (WLS, b0 + b=1000) on the phantom at SNR 30.

    Tolerance from error propagation, per voxel: with noise-free signals S_i
    and Rician noise sigma (Gaussian at these SNRs), log-signals have variance
    sigma^2 / S_i^2, so the WLS estimate (weights S_i^2) has covariance
    Cov = sigma^2 (X^T diag(S^2) X)^-1; sigma_FA^2 = J Cov J^T with J the FA
    gradient w.r.t. the six tensor elements, sigma_MD^2 = (1/9) 1^T Cov 1. For
    SNR 30, 18 b0 + 90 directions this gives sigma_FA ~0.016 and sigma_MD
    ~1.4 % in white matter. The error against the truth is the noise term plus
    the deterministic b=1000 kurtosis bias (noise-free fit minus truth, bounded
    in test_noise_free_dti_recovers_truth), so the standardised noise error
    z = (fit - truth - bias) / sigma must be ~N(0, 1): mean 0 +- 0.1 and sd
    1 +- 0.1 over ~5000 voxels (sampling error ~0.015; a noise level off by 15 % or
    an FA offset of 0.3 sigma ~0.005 fails), at most 1 % of voxels beyond
    3 sigma (Gaussian: 0.27 %; FA is mildly non-linear, measured 0.2-0.5 % over
    16 seeds) and none beyond 6 sigma (measured max 4.7). V1 errors scale as
    sigma / (lambda1 - lambda2): measured medians ~0.7 deg in bundles (FA 0.8)
    and ~1.3 deg overall (background FA 0.45) over 16 seeds; require < 1.5 and
    < 2.5 deg.
    """
    t = noisy.truth
    sel = single_fibre_wm(t)
    fit = dti_b1000(noisy, noisy.dwi, sel)
    ref = dti_b1000(noisy, noisy.noise_free, sel)
    assert fit.n_failed == 0
    idx = noisy.gtab.select_shells([1000.0])
    X = noisy.gtab.select(idx).bmatrix_design()
    S = noisy.noise_free[..., idx][sel].astype(np.float64)
    cov = noisy.sigma ** 2 * np.linalg.inv(np.einsum("ni,ij,ik->njk", S ** 2, X, X))[:, :6, :6]
    D = ref.quadratic_form[sel].astype(np.float64)

    def fa_of(tensors):
        ev = np.linalg.eigvalsh(tensors)
        return np.sqrt(1.5 * ((ev - ev.mean(-1, keepdims=True)) ** 2).sum(-1) / (ev ** 2).sum(-1))

    jac = np.empty((D.shape[0], 6))
    for k, (i, j) in enumerate(((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))):
        e = np.zeros((3, 3))
        e[i, j] = e[j, i] = 1e-7
        jac[:, k] = (fa_of(D + e) - fa_of(D - e)) / 2e-7
    sd_fa = np.sqrt(np.einsum("ni,nij,nj->n", jac, cov, jac))
    ones = np.array([1, 1, 1, 0, 0, 0]) / 3.0
    sd_md = np.sqrt(np.einsum("i,nij,j->n", ones, cov, ones))
    assert 0.005 < np.median(sd_fa) < 0.03 and 0.005 < np.median(sd_md / t["md"][sel]) < 0.03
    for name, sd in (("fa", sd_fa), ("md", sd_md)):
        err = getattr(fit, name)[sel].astype(np.float64) - t[name][sel]
        bias = getattr(ref, name)[sel].astype(np.float64) - t[name][sel]
        z = (err - bias) / sd
        assert abs(z.std() - 1) < 0.1 and abs(z.mean()) < 0.1, (name, z.mean(), z.std())
        assert np.mean(np.abs(z) > 3) < 0.01 and np.abs(z).max() < 6, (name, np.abs(z).max())
    ang = angle_deg(fit.v1[sel], t["v1"][sel])
    assert np.median(ang[t["bundle"][sel] > 0]) < 1.5 and np.median(ang) < 2.5


# ----------------------------------------------------------------------------
# Site effects
# ----------------------------------------------------------------------------
def test_site_rish_scaling(exact_scheme):
    """RISH of the b0-normalised noise-free signal scales by s_l^2; b0 untouched."""
    scales = {0: 1.0, 2: 1.3, 4: 0.8}
    kw = dict(shape=(24, 28, 24), voxel_size=100 / 24, seed=11, snr=None, scheme=exact_scheme)
    ref = P.simulate_subject(**kw)
    site = P.simulate_subject(site=P.SiteEffect(name="B", rish_scale=scales), **kw)
    g = exact_scheme
    np.testing.assert_array_equal(site.dwi[..., g.b0s_mask], ref.dwi[..., g.b0s_mask])
    for k in ("fa", "md", "s0", "label"):
        np.testing.assert_array_equal(site.truth[k], ref.truth[k])
    mask = ref.mask
    wm = ref.truth["label"][mask] == 3
    for shell in (1000.0, 2000.0):
        model = SHModel(g, lmax=8, shell=shell)
        r_ref = model.fit(ref.dwi, mask).rish()[mask].astype(np.float64)
        r_site = model.fit(site.dwi, mask).rish()[mask].astype(np.float64)
        assert np.median(r_ref[wm, 1] / r_ref[wm, 0]) > 1e-2   # l = 2, 4 are not vacuous
        assert np.median(r_ref[wm, 2] / r_ref[wm, 0]) > 1e-4
        # exact (up to float32 storage) wherever no scaled signal went below 0 and
        # was clipped: all voxels at b=1000, ~85 % of the WM voxels at b=2000
        exact = np.all(site.dwi[mask][:, g.shell_indices(shell)] > 0, axis=1)
        assert exact.all() if shell == 1000.0 else exact[wm].mean() > 0.5
        for order, s in ((0, 1.0), (2, 1.3), (4, 0.8), (6, 1.0), (8, 1.0)):
            a, b = r_site[exact, order // 2], r_ref[exact, order // 2]
            np.testing.assert_allclose(a, s * s * b, rtol=1e-3, atol=1e-5 * r_ref[:, 0].max())
    assert site.params["rish_clipped_fraction"]["1000"] == 0.0
    assert 0.0 < site.params["rish_clipped_fraction"]["3000"] < 0.1
    with pytest.raises(ValueError, match="orders"):
        P.simulate_subject(site=P.SiteEffect(rish_scale={3: 1.1}), **kw)


def test_site_resolution_snr_te(exact_scheme):
    """A site at 2x finer voxels simulates the same FOV; its SNR/TE override."""
    base = dict(shape=(20, 24, 20), voxel_size=5.0, seed=7, scheme=exact_scheme)
    ref = P.simulate_subject(snr=None, **base)
    site = P.SiteEffect(name="7T", voxel_size=2.5, snr=15.0, te=71.2, field_strength=7.0,
                        t2_scale=0.8)
    s = P.simulate_subject(snr=None, site=site, **base)
    assert s.dwi.shape[:3] == (40, 48, 40) and s.voxel_size == (2.5, 2.5, 2.5)
    np.testing.assert_allclose(np.array(s.dwi.shape[:3]) * 2.5, np.array(ref.dwi.shape[:3]) * 5.0)
    assert s.snr == 15.0 and s.te == 71.2 and s.field_strength == 7.0 and s.site == "7T"
    assert s.sidecar()["EchoTime"] == pytest.approx(0.0712)
    assert s.sigma == pytest.approx(s.truth["s0"][s.truth["label"] == 3].mean() / 15.0)
    wm_vol = [x.truth["fractions"][..., 2].sum() * np.prod(x.voxel_size) for x in (ref, s)]
    assert abs(wm_vol[1] / wm_vol[0] - 1) < 0.05
    t2 = [np.median(x.truth["t2"][x.truth["label"] == 3]) for x in (ref, s)]
    assert t2[1] / t2[0] == pytest.approx(0.8, rel=0.02)


# ----------------------------------------------------------------------------
# Writing cohorts
# ----------------------------------------------------------------------------
def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _truth_files(label: str) -> set[str]:
    base = f"derivatives/truth/sub-{label}"
    return ({f"{base}/sub-{label}_param-{p}.nii.gz" for p in P.TRUTH_PARAMS}
            | {f"{base}/dwi/sub-{label}_desc-brain_mask.nii.gz",
               f"{base}/sub-{label}_desc-simulation.json"})


SMALL = dict(shape=(16, 20, 16), voxel_size=6.25, seed=21, snr=25.0)


def _check_subject(dwi, truth_dir: Path, label: str, seed: int, scheme) -> None:
    expected = P.simulate_subject(shape=SMALL["shape"], voxel_size=SMALL["voxel_size"], seed=seed,
                                  snr=SMALL["snr"], scheme=scheme)
    assert dwi.data.shape == expected.dwi.shape
    np.testing.assert_allclose(dwi.data, expected.dwi, atol=0.5)   # int16 rounding in BIDS
    np.testing.assert_array_equal(dwi.mask, expected.mask)
    np.testing.assert_allclose(dwi.affine, expected.affine)
    assert dwi.gtab.shells == [1000.0, 2000.0, 3000.0] and int(dwi.gtab.b0s_mask.sum()) == 18
    np.testing.assert_allclose(dwi.gtab.bvals, scheme.bvals)
    np.testing.assert_allclose(dwi.gtab.bvecs, scheme.bvecs, atol=1e-6)
    assert dwi.zooms == (6.25, 6.25, 6.25)
    for p in P.TRUTH_PARAMS:
        arr = read_array(load_image(truth_dir / f"sub-{label}_param-{p}.nii.gz"))
        np.testing.assert_allclose(arr, expected.truth[p], rtol=1e-6, atol=1e-9)


def test_write_cohort_hcp(tmp_path, scheme):
    ids = P.write_cohort(tmp_path, 2, layout="hcp", **SMALL)
    assert ids == ["900001", "900002"]
    expected = {"derivatives/truth/dataset_description.json",
                "derivatives/truth/participants.tsv"}
    for sid in ids:
        d = f"{sid}/T1w/Diffusion"
        expected |= {f"{d}/data.nii.gz", f"{d}/bvals", f"{d}/bvecs",
                     f"{d}/nodif_brain_mask.nii.gz", f"{d}/data.json"} | _truth_files(sid)
    assert _tree(tmp_path) == expected
    for i, sid in enumerate(ids):
        d = tmp_path / sid / "T1w" / "Diffusion"
        dwi = load_dwi(d / "data.nii.gz", d / "bvals", d / "bvecs", d / "nodif_brain_mask.nii.gz")
        hdr = load_image(d / "data.nii.gz").header
        assert hdr.get_data_dtype() == np.float32 and hdr["qform_code"] == hdr["sform_code"] == 1
        assert len((d / "bvecs").read_text().splitlines()) == 3        # FSL: 3 rows x N
        assert (d / "bvals").read_text().split()[0] == "5"              # HCP's stored b0
        meta = json.loads((d / "data.json").read_text())
        assert meta["MagneticFieldStrength"] == 3.0 and meta["EchoTime"] == pytest.approx(0.0895)
        assert meta["Manufacturer"] == "dmriflow-phantom"
        _check_subject(dwi, tmp_path / "derivatives/truth" / f"sub-{sid}", sid,
                       P.cohort_subject_seed(SMALL["seed"], i), scheme)
    from dmriflow.pipelines.inputs import census, discover
    subjects = discover(tmp_path)
    assert [s.label for s in subjects] == ids and all(s.mask and s.sidecar for s in subjects)
    row = census(subjects).iloc[0]
    assert row["field_strength_t"] == 3.0 and row["echo_time_ms"] == 89.5


def test_write_cohort_bids(tmp_path, scheme):
    site = P.SiteEffect(name="siteB", field_strength=7.0, te=71.2)
    ids = P.write_cohort(tmp_path, 2, layout="bids", site=site, **SMALL)
    assert ids == ["sub-01", "sub-02"]
    expected = {"dataset_description.json", "participants.tsv",
                "derivatives/truth/dataset_description.json",
                "derivatives/truth/participants.tsv"}
    for sid in ids:
        lbl = sid[4:]
        expected |= {f"{sid}/dwi/{sid}_dwi.{ext}" for ext in ("nii.gz", "bval", "bvec", "json")}
        expected |= _truth_files(lbl)
    assert _tree(tmp_path) == expected
    desc = json.loads((tmp_path / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] and desc["DatasetType"] == "raw"
    rows = (tmp_path / "participants.tsv").read_text().splitlines()
    assert rows[0].split("\t")[0] == "participant_id"
    assert [r.split("\t")[0] for r in rows[1:]] == ids and all("siteB" in r for r in rows[1:])
    for i, sid in enumerate(ids):
        d = tmp_path / sid / "dwi"
        truth = tmp_path / "derivatives" / "truth" / sid
        gt = read_gradients(d / f"{sid}_dwi.bval", d / f"{sid}_dwi.bvec")
        assert gt.shells == [1000.0, 2000.0, 3000.0]
        dwi = load_dwi(d / f"{sid}_dwi.nii.gz", d / f"{sid}_dwi.bval", d / f"{sid}_dwi.bvec",
                       truth / "dwi" / f"{sid}_desc-brain_mask.nii.gz")
        meta = json.loads((d / f"{sid}_dwi.json").read_text())
        assert meta["MagneticFieldStrength"] == 7.0 and meta["EchoTime"] == pytest.approx(0.0712)
        assert meta["Manufacturer"] == "dmriflow-phantom"
        expected_subject = P.simulate_subject(
            shape=SMALL["shape"], voxel_size=SMALL["voxel_size"],
            seed=P.cohort_subject_seed(SMALL["seed"], i), snr=SMALL["snr"], scheme=scheme, site=site)
        np.testing.assert_allclose(dwi.data, expected_subject.dwi, atol=0.5)
        np.testing.assert_array_equal(dwi.mask, expected_subject.mask)
    from dmriflow.pipelines.inputs import discover
    subjects = discover(tmp_path)
    assert [s.key for s in subjects] == ids and all(s.mask for s in subjects)
