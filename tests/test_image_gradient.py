"""Image gradient from the diffusion signal: gold standard, estimators, controls, statistics.

Ground truth throughout: analytic images (linear and exponential in space)
on straight, flipped and oblique affines for the finite-difference gold
standard; signals generated from each estimator's own forward model for the
estimators; uniformly random axes for the chance values; hand-computed
t statistics for the test wrappers; a synthetic subject whose phase carries
a known gradient for the subject and cohort functions.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage, stats

from dmriflow.interfaces import image_gradient as ig
from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.gradients import GradientTable, fsl_to_world, world_to_fsl
from dmriflow.interfaces.io import DWI
from dmriflow.interfaces.sim.phantom import hcp_scheme

T = ig.HCP_TIMING
#: A second diffusion time for C (ms): the long-Delta series.
T_LONG = ig.SequenceTiming(80.0, 10.6, 120.0)
S0 = 1000.0
#: Eigenvalues (mm^2/s) of the white-matter-like test tensors.
EVALS = np.array([1.7e-3, 0.4e-3, 0.3e-3])


@pytest.fixture(scope="module")
def gtab():
    """Three shells (b = 1000/2000/3000) x 30 directions + 6 b0 = 96 volumes."""
    return hcp_scheme(n_b0=6, n_dirs=30, jitter=False)


def _tensors(n, rng, evals=EVALS):
    Q = np.linalg.qr(rng.standard_normal((n, 3, 3)))[0]
    return np.einsum("nij,j,nkj->nik", Q, evals, Q)


def _axes(n, rng, size=1.0):
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True) * size


def _rician(S, sigma, rng):
    return np.abs(S + sigma * (rng.standard_normal(S.shape) + 1j * rng.standard_normal(S.shape)))


# ----------------------------------------------------------------------------
# Gold standard
# ----------------------------------------------------------------------------
def _rotation(a, b, c):
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


AFFINES = {
    "straight_ras": np.diag([2.0, 2.5, 3.0, 1.0]),                       # det > 0: x flipped
    "flipped_las": np.diag([-2.0, 2.5, 3.0, 1.0]),                       # det < 0
    "oblique": np.vstack([np.column_stack([_rotation(0.3, -0.2, 0.5) @ np.diag([2.0, 2.5, 1.5]),
                                           [10.0, -20.0, 5.0]]), [0, 0, 0, 1]]),
    "oblique_flipped": np.vstack([np.column_stack([_rotation(-0.4, 0.1, 1.1)
                                                   @ np.diag([-1.25, 1.25, 1.5]),
                                                   [0.0, 3.0, -7.0]]), [0, 0, 0, 1]]),
}
SHEARED = np.array([[2.0, 0.4, 0.0, 1.0], [0.0, 2.5, 0.3, 2.0], [0.2, 0.0, 3.0, 3.0],
                    [0, 0, 0, 1]])
W_WORLD = np.array([0.05, -0.12, 0.08])     # 1/mm
GRID = (9, 10, 11)


def _world_coords(affine):
    ijk = np.indices(GRID, dtype=np.float64).reshape(3, -1).T
    return (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(GRID + (3,))


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_gold_standard_recovers_analytic_gradients(name):
    affine = AFFINES[name]
    x = _world_coords(affine)
    mask = np.ones(GRID, bool)
    linear = 50.0 + x @ W_WORLD * 10.0                  # I = c + 10 w.x, positive
    expo = np.exp(1.0 + x @ W_WORLD)                    # ln I = 1 + w.x
    inner = ig.evaluation_mask(mask)
    # index-space differences -> world frame: A^-T (exact for linear images)
    world = ig.index_to_frame(ig.central_differences(linear), affine, "world")
    np.testing.assert_allclose(world[inner], np.broadcast_to(10 * W_WORLD, world[inner].shape),
                               atol=1e-10)
    # FSL (b-vector) frame: the same vector through the gradients helpers
    fsl = ig.index_to_frame(ig.central_differences(linear), affine, "fsl")
    np.testing.assert_allclose(fsl[inner], np.broadcast_to(world_to_fsl(10 * W_WORLD, affine),
                                                           fsl[inner].shape), atol=1e-10)
    np.testing.assert_allclose(fsl_to_world(fsl[inner], affine), world[inner], atol=1e-10)
    # g = grad ln I: I linear -> grad I / I exact; I exponential -> FD of ln I exact
    gs = ig.gold_standard(linear, affine, mask, frame="world", log=False)
    np.testing.assert_allclose(gs.gradient[inner], (10 * W_WORLD / linear[inner, None]),
                               rtol=1e-5)
    gl = ig.gold_standard(expo, affine, mask, frame="world", log=True)
    np.testing.assert_allclose(gl.gradient[inner], np.broadcast_to(W_WORLD, (inner.sum(), 3)),
                               rtol=1e-5, atol=1e-7)
    gf = ig.gold_standard(expo, affine, mask, frame="fsl", log=True)
    np.testing.assert_allclose(gf.gradient[inner], np.broadcast_to(
        world_to_fsl(W_WORLD, affine), (inner.sum(), 3)), rtol=1e-5, atol=1e-7)
    assert np.all(np.isnan(gf.gradient[~inner]))
    # linear form on an exponential image: same axis, O(h^2) magnitude error
    assert np.nanmax(ig.acute_angle(ig.gold_standard(expo, affine, mask, frame="fsl").gradient,
                                    gf.gradient)) < 0.5


def test_world_frame_uses_the_inverse_transpose_on_sheared_affines():
    x = (np.indices(GRID, dtype=np.float64).reshape(3, -1).T @ SHEARED[:3, :3].T).reshape(
        GRID + (3,))
    img = 5.0 + x @ W_WORLD
    inner = ig.evaluation_mask(np.ones(GRID, bool))
    world = ig.index_to_frame(ig.central_differences(img), SHEARED, "world")
    np.testing.assert_allclose(world[inner], np.broadcast_to(W_WORLD, (inner.sum(), 3)),
                               atol=1e-12)
    wrong = ig.central_differences(img)[inner] @ SHEARED[:3, :3].T      # the affine itself
    assert np.abs(wrong - W_WORLD).max() > 0.01


def test_evaluation_mask_is_the_six_neighbour_erosion():
    rng = np.random.default_rng(3)
    mask = ndimage.binary_dilation(rng.random((14, 15, 16)) > 0.6, iterations=1)
    mask[0, 5, 5] = True                                 # touches the array border
    expected = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1),
                                      border_value=0)
    np.testing.assert_array_equal(ig.evaluation_mask(mask), expected)
    assert 0 < expected.sum() < mask.sum()


def test_gold_standard_exclusions():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    x = _world_coords(affine)
    img = np.exp(2.0 + x @ np.array([0.0, 0.0, 0.05]))
    img[:, :5] = 100.0                                   # flat half: |g| = 0
    md = np.full(GRID, 0.8e-3)
    md[:, :, :3] = 3e-3                                  # "CSF" slab
    mask = np.ones(GRID, bool)
    gs = ig.gold_standard(img, affine, mask, log=True, md=md,
                          csf_md_threshold=ig.CSF_MD_THRESHOLD,
                          min_relative_gradient=ig.MIN_RELATIVE_GRADIENT)
    inner = ig.evaluation_mask(mask)
    csf = inner & (md > ig.CSF_MD_THRESHOLD)
    assert gs.excluded["csf"] == csf.sum()
    flat = inner & ~csf & (np.indices(GRID)[1] < 4)     # both neighbours in the flat half
    assert gs.excluded["small_gradient"] == flat.sum()
    assert gs.mask.sum() == inner.sum() - csf.sum() - flat.sum()
    with pytest.raises(ValueError, match="md"):
        ig.gold_standard(img, affine, mask, csf_md_threshold=1e-3)


# ----------------------------------------------------------------------------
# Estimators: own forward models
# ----------------------------------------------------------------------------
def test_b_recovers_g_given_the_gradient_free_tensor(gtab):
    rng = np.random.default_rng(0)
    n = 300
    D, g = _tensors(n, rng), _axes(n, rng, 1.0)
    S = ig.published_signal(S0, D, g, gtab, T)
    model = ig.PublishedModel(gtab, T)
    axis, grad, q = model.fit_rows(S, tensor=(np.full(n, S0), D))
    assert np.max(ig.acute_angle(axis, g)) < 1.0
    np.testing.assert_allclose(np.linalg.norm(grad, axis=1), 1.0, rtol=1e-2)   # float32 signals
    assert np.min(q) > 0.95                              # M is rank 1 (to float32)
    # noise: the error grows as the SNR drops
    med = [np.median(ig.acute_angle(model.fit_rows(_rician(S, S0 / snr, rng),
                                                   tensor=(np.full(n, S0), D))[0], g))
           for snr in (1e6, 1e5, 2e4)]
    assert med[0] < med[1] < med[2] and med[0] < 10.0


def test_b_self_fitted_tensor_absorbs_the_first_order_term(gtab):
    """With the tensor fitted to the same magnitudes (the published recipe),
    the (D g)^2 term is absorbed by D: at |g| = 1/mm B sees only float
    round-off (chance-level angles), at |g| = 40/mm the residual
    nonlinearity still points at g (SCIENCE.md section 7)."""
    rng = np.random.default_rng(1)
    n = 400
    D = _tensors(n, rng)
    model = ig.PublishedModel(gtab, T)
    g1 = _axes(n, rng, 1.0)
    a1 = ig.acute_angle(model.fit_rows(ig.published_signal(S0, D, g1, gtab, T))[0], g1)
    assert np.nanmedian(a1) > 45.0
    g40 = _axes(n, rng, 40.0)
    a40 = ig.acute_angle(model.fit_rows(ig.published_signal(S0, D, g40, gtab, T))[0], g40)
    assert np.nanmedian(a40) < 20.0


def test_b_is_rotation_equivariant(gtab):
    rng = np.random.default_rng(2)
    n = 50
    D, g = _tensors(n, rng), _axes(n, rng, 1.0)
    R = _rotation(0.4, -0.7, 1.3)
    rot = GradientTable(gtab.bvals, gtab.bvecs @ R.T)
    model, model_r = ig.PublishedModel(gtab, T), ig.PublishedModel(rot, T)
    S = _rician(ig.published_signal(S0, D, g, gtab, T), S0 / 3e4, rng)
    ax = model.fit_rows(S, tensor=(np.full(n, S0), D))[0]
    ax_r = model_r.fit_rows(S, tensor=(np.full(n, S0), R @ D @ R.T))[0]
    assert np.max(ig.acute_angle(ax_r, ax @ R.T)) < 0.5          # float32 rounding


@pytest.mark.parametrize("size", [1.0, 30.0])
def test_a_recovers_g_from_its_forward_model(gtab, size):
    rng = np.random.default_rng(4)
    n = 60
    D, g = _tensors(n, rng), _axes(n, rng, size)
    S = np.exp(ig.nonlinear_log_signal(S0, D, g, gtab, T))
    axis, grad, q = ig.NonlinearModel(gtab, T).fit_rows(S)
    assert np.max(ig.acute_angle(axis, g)) < 1.0
    np.testing.assert_allclose(np.linalg.norm(grad, axis=1), size, rtol=1e-2)
    assert np.min(q) > 0.99


def test_a_error_grows_with_noise(gtab):
    rng = np.random.default_rng(5)
    n = 60
    D, g = _tensors(n, rng), _axes(n, rng, 30.0)
    S = np.exp(ig.nonlinear_log_signal(S0, D, g, gtab, T))
    model = ig.NonlinearModel(gtab, T)
    med = [np.median(ig.acute_angle(model.fit_rows(_rician(S, S0 / snr, rng))[0], g))
           for snr in (1e5, 1e4, 1e3)]
    assert med[0] < med[1] < med[2] and med[0] < 2.0


def test_c_recovers_g_from_two_diffusion_times(gtab):
    rng = np.random.default_rng(6)
    n = 300
    D, g = _tensors(n, rng), _axes(n, rng, 20.0)
    Ds, Dl = ig.two_time_tensors(D, g, [T.gradient_time, T_LONG.gradient_time])
    assert np.linalg.eigvalsh(Dl).min() > 0
    Ss, Sl = ig.tensor_signal(S0, Ds, gtab), ig.tensor_signal(700.0, Dl, gtab)
    model = ig.TwoTimeModel(gtab, T, gtab, T_LONG, max_bval=None)
    axis, grad, q = model.fit_rows(Ss, Sl)
    assert np.percentile(ig.acute_angle(axis, g), 99) < 1.0
    np.testing.assert_allclose(np.median(np.linalg.norm(grad, axis=1)), 20.0, rtol=0.02)
    # the order of the two series does not matter
    swapped = ig.TwoTimeModel(gtab, T_LONG, gtab, T, max_bval=None).fit_rows(Sl, Ss)[0]
    assert np.nanmax(ig.acute_angle(swapped, axis)) < 0.1
    # noise: the error grows
    med = [np.median(ig.acute_angle(model.fit_rows(_rician(Ss, S0 / snr, rng),
                                                   _rician(Sl, S0 / snr, rng))[0], g))
           for snr in (3e4, 3e3, 300)]
    assert med[0] < med[1] < med[2]
    with pytest.raises(ValueError, match="different diffusion times"):
        ig.TwoTimeModel(gtab, T, gtab, T)


def test_p_recovers_signed_g_from_the_phase(gtab):
    rng = np.random.default_rng(7)
    n = 300
    D, g = _tensors(n, rng), _axes(n, rng, 1.0)
    S = ig.phase_signal(S0, D, g, gtab, T, phase0=rng.uniform(-np.pi, np.pi, n))
    axis, grad, q = ig.PhaseModel(gtab, T).fit_rows(S)
    assert np.max(ig.acute_angle(axis, g)) < 1.0
    assert np.all(np.sum(axis * g, axis=1) > 0)         # sign resolved
    np.testing.assert_allclose(grad, g, atol=1e-3)
    assert np.min(q) > 0.999
    sigma = [S0 / snr for snr in (1e5, 1e4, 1e3)]
    med = []
    for s in sigma:
        noisy = S + s * (rng.standard_normal(S.shape) + 1j * rng.standard_normal(S.shape))
        med.append(np.median(ig.acute_angle(ig.PhaseModel(gtab, T).fit_rows(noisy)[0], g)))
    assert med[0] < med[1] < med[2] and med[0] < 2.0


def test_models_on_grids_and_masks(gtab):
    """fit(data, mask) on a 4D grid (C and F order) equals fit_rows on the
    masked voxels; outside the mask everything is NaN."""
    rng = np.random.default_rng(8)
    grid = (4, 5, 3)
    n = int(np.prod(grid))
    D, g = _tensors(n, rng), _axes(n, rng, 1.0)
    S = ig.phase_signal(S0, D, g, gtab, T).reshape(grid + (-1,))
    mask = rng.random(grid) > 0.3
    model = ig.PhaseModel(gtab, T, chunk_size=7)
    for data in (S, np.asfortranarray(S)):
        fit = model.fit(data, mask)
        ref = model.fit_rows(S[mask])[0]
        np.testing.assert_allclose(fit.axis[mask], ref, atol=1e-4)
        assert np.isnan(fit.axis[~mask]).all() and fit.n_failed == 0
    # magnitude + phase, combined chunk by chunk, equals the complex series
    split = model.fit(np.abs(S).astype(np.float32), mask, phase=np.angle(S).astype(np.float32))
    np.testing.assert_allclose(split.axis[mask], model.fit(S, mask).axis[mask], atol=1e-4)
    with pytest.raises(ValueError, match="complex"):
        model.fit(np.abs(S), mask)
    with pytest.raises(ValueError, match="magnitude"):
        model.fit(S, mask, phase=np.angle(S))
    with pytest.raises(ValueError, match="magnitude"):
        ig.PublishedModel(gtab, T).fit(S, mask)
    with pytest.raises(ValueError, match="volumes"):
        model.fit(S[..., :-1], mask)


# ----------------------------------------------------------------------------
# Controls
# ----------------------------------------------------------------------------
def test_perpendicular_random_axis_is_uniform_in_the_plane():
    rng = np.random.default_rng(9)
    n = 20000
    v1 = _axes(n, rng)
    perp = ig.perpendicular_random_axis(v1, rng)
    assert np.abs(np.sum(perp * v1, axis=1)).max() < 1e-5
    # the 2D angle to any fixed in-plane reference is uniform on [0, 90]
    ref = np.cross(v1, _axes(n, rng))
    ang = ig.plane_angle(perp, ref, v1)
    se = 90 / math.sqrt(12 * n)
    assert abs(ang.mean() - ig.CHANCE_2D_DEG) < 4 * se
    assert stats.kstest(ang / 90.0, "uniform").pvalue > 1e-3
    again = ig.perpendicular_random_axis(v1, np.random.default_rng(9 + 0))
    assert not np.allclose(again, perp)                  # different stream, different axes


def test_shuffle_axes_permutes_within_the_mask():
    rng = np.random.default_rng(10)
    axes = ig.unit(rng.standard_normal((6, 7, 8, 3)))
    mask = rng.random((6, 7, 8)) > 0.5
    axes[0, 0, 0] = np.nan
    mask[0, 0, 0] = True
    out = ig.shuffle_axes(axes, mask, rng)
    inside = mask & np.isfinite(axes).all(-1)
    assert np.isnan(out[~inside]).all()
    key = lambda a: np.sort(a.view([("", a.dtype)] * 3).ravel())  # noqa: E731
    np.testing.assert_array_equal(key(np.ascontiguousarray(out[inside])),
                                  key(np.ascontiguousarray(axes[inside])))
    assert np.mean(np.all(out[inside] == axes[inside], axis=1)) < 0.05


def test_fa_strata_partition_the_mask():
    rng = np.random.default_rng(11)
    fa = rng.random((10, 10, 10))
    fa[0, 0, 0] = 1.0
    mask = rng.random((10, 10, 10)) > 0.2
    strata = ig.fa_strata(fa, mask)
    bins = [v for k, v in strata.items() if k != "all"]
    assert len(bins) == len(ig.FA_STRATA_EDGES) - 1
    np.testing.assert_array_equal(np.sum(bins, axis=0), mask.astype(int))
    assert strata["fa0.6-1.0"][0, 0, 0] == mask[0, 0, 0]


def test_estimate_sigma(gtab):
    rng = np.random.default_rng(12)
    n, sigma = 4000, 20.0
    D = _tensors(n, rng)
    S = ig.tensor_signal(S0, D, gtab)
    noisy = _rician(S, sigma, rng).astype(np.float32)
    assert ig.estimate_sigma(noisy, gtab) == pytest.approx(sigma, rel=0.03)
    cplx = S + sigma * (rng.standard_normal(S.shape) + 1j * rng.standard_normal(S.shape))
    assert ig.estimate_sigma(cplx, gtab) == pytest.approx(sigma, rel=0.03)
    one_b0 = np.concatenate([[0], np.flatnonzero(~gtab.b0s_mask)])
    # one b0 only: the tensor-fit residual (Rician bias at high b inflates it a little)
    est = ig.estimate_sigma(noisy[:, one_b0], gtab.select(one_b0))
    assert est == pytest.approx(sigma, rel=0.15)


def test_surrogate_null_removes_the_gradient(gtab):
    """P recovers g from the phase; its surrogate (the same voxels simulated
    from their gradient-free tensors with matched noise) is at chance."""
    rng = np.random.default_rng(13)
    n = 4000
    D, g = _tensors(n, rng), _axes(n, rng, 1.0)
    S = ig.phase_signal(S0, D, g, gtab, T)
    sigma = S0 / 2e4
    S = S + sigma * (rng.standard_normal(S.shape) + 1j * rng.standard_normal(S.shape))
    data = S.reshape(40, 100, -1)
    model = ig.PhaseModel(gtab, T)
    fit = model.fit(data, None)
    assert np.median(ig.acute_angle(fit.axis.reshape(-1, 3), g)) < 10.0
    sur = model.fit_surrogate(data, None, ig.estimate_sigma(data, gtab), rng)
    ang = ig.acute_angle(sur.axis.reshape(-1, 3), g)
    se = np.std(ang) / math.sqrt(n)
    assert abs(np.mean(ang) - ig.CHANCE_MEAN_DEG) < 4 * se
    assert sur.estimator == "P_surrogate"


# ----------------------------------------------------------------------------
# Angles and statistics
# ----------------------------------------------------------------------------
def test_random_axes_give_the_chance_values():
    rng = np.random.default_rng(14)
    n = 40000
    gold = _axes(n, rng)
    ang = ig.acute_angle(_axes(n, rng), gold).astype(np.float64)
    # chance density sin(theta) on [0, 90]: mean 1 rad, median 60 deg
    se_mean = ang.std() / math.sqrt(n)
    assert abs(ang.mean() - ig.CHANCE_MEAN_DEG) < 4 * se_mean
    se_median = 1 / (2 * math.sin(math.radians(60)) * math.sqrt(n)) * 180 / math.pi
    assert abs(np.median(ang) - ig.CHANCE_MEDIAN_DEG) < 4 * se_median
    edges = np.linspace(0, 90, 19)
    counts, _ = np.histogram(ang, edges)
    expected = n * (np.cos(np.radians(edges[:-1])) - np.cos(np.radians(edges[1:])))
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # a wrong density (uniform angle) is rejected by the same test
    uni = rng.uniform(0, 90, n)
    assert stats.chisquare(np.histogram(uni, edges)[0], expected).pvalue < 1e-10
    # sign-free: flipping either axis changes nothing
    v = _axes(100, rng)
    np.testing.assert_array_equal(ig.acute_angle(v, gold[:100]), ig.acute_angle(-v, gold[:100]))
    assert ig.CHANCE_MEAN_DEG == pytest.approx(57.2958, abs=1e-4)


def test_t_test_wrappers_match_hand_computation_and_scipy():
    x = np.array([51.0, 52.5, 50.2, 53.1, 49.8, 52.0, np.nan])
    v = x[np.isfinite(x)]
    t = (v.mean() - 57.2958) / (v.std(ddof=1) / math.sqrt(v.size))
    p = 2 * stats.t.sf(abs(t), v.size - 1)
    r = ig.one_sample_test(x, 57.2958)
    assert r["n"] == 6 and r["t"] == pytest.approx(t, rel=1e-12) and r["p"] == pytest.approx(p)
    ref = stats.ttest_1samp(v, 57.2958)
    assert r["t"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue)
    a, b = np.array([50.0, 51, 49, 52, 48]), np.array([55.0, 55, 54, 57, 56])
    d = a - b
    td = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    rp = ig.paired_test(a, b)
    assert rp["t"] == pytest.approx(td) and rp["p"] == pytest.approx(
        2 * stats.t.sf(abs(td), d.size - 1))
    assert rp["mean"] == pytest.approx(d.mean())


# ----------------------------------------------------------------------------
# Subject and cohort
# ----------------------------------------------------------------------------
def _subject(seed, gtab, shape=(12, 13, 10), snr=3e4):
    """A subject whose b0 image I has a known g = grad ln I that turns across
    the volume, and whose phase carries exactly that g (P's forward model),
    in the FSL frame of its bvecs. ln I = A (sin(x/L) + sin(y/L) + sin(z/L)):
    one wavelength on all axes, so central differences scale every component
    by the same sinc factor and the gold-standard axis is exact."""
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -10.0 + rng.uniform(-3, 3, 3)
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    amp, wavelength = 1.0, 4.0
    lnI = np.log(S0) + amp * np.sin(xyz / wavelength).sum(axis=1)
    w = amp / wavelength * np.cos(xyz / wavelength)               # world-frame grad ln I
    g_fsl = world_to_fsl(w, affine)
    n = ijk.shape[0]
    D = _tensors(n, rng, evals=np.array([1.5e-3, 0.5e-3, 0.4e-3]))
    S = ig.phase_signal(np.exp(lnI), D, g_fsl, gtab, T)
    sigma = S0 / snr
    S = S + sigma * (rng.standard_normal(S.shape) + 1j * rng.standard_normal(S.shape))
    data = np.abs(S).astype(np.float32).reshape(shape + (-1,))
    phase = np.angle(S).astype(np.float32).reshape(shape + (-1,))
    mask = np.zeros(shape, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_zooms((2.0, 2.0, 2.0, 1.0))
    dwi = DWI(data=data, gtab=gtab, mask=mask, affine=affine, header=hdr,
              paths={"dwi": f"sub-{seed}.nii.gz"})
    return dwi, phase, g_fsl.reshape(shape + (3,))


def test_evaluate_subject_and_cohort_tests(gtab):
    rows = []
    for seed in range(4):
        dwi, phase, g_true = _subject(seed, gtab)
        ev = ig.evaluate_subject(dwi, T, estimators=("B", "P"), subject=f"sub-{seed}",
                                 rng=seed, phase=phase)
        m = ev.mask
        assert m.sum() == ig.evaluation_mask(dwi.mask).sum()
        # the gold standard is the true g up to the O(h^2) finite-difference error
        assert np.nanmedian(ig.acute_angle(ev.gold.gradient[m], g_true[m])) < 3.0
        for name, amap in ev.angles.items():
            assert np.isnan(amap[~m]).all(), name
            assert np.isfinite(amap[m]).mean() > 0.99, name
        assert set(ev.angles) == {"B", "B_shuffle", "B_surrogate", "P", "P_shuffle",
                                  "P_surrogate", ig.FIBRE_E3, ig.FIBRE_PERP}
        p = ev.rows[(ev.rows.method == "P") & (ev.rows.stratum == "all")].iloc[0]
        assert p["median"] < 10.0 and p["n_voxels"] == m.sum()
        assert ev.kinds["P_surrogate"] == "null" and ev.kinds[ig.FIBRE_E3] == "control"
        strata = ev.rows[(ev.rows.method == "P") & (ev.rows.stratum != "all")]
        assert strata["n_voxels"].sum() == m.sum()
        rows.append(ev.rows)
    import pandas as pd
    table = ig.cohort_tests(pd.concat(rows, ignore_index=True))
    sel = (table.stratum == "all") & (table.statistic == "mean") & (table.test == "chance")
    byname = table[sel].set_index("method")
    assert byname.loc["P", "mean"] < 15.0 and byname.loc["P", "p"] < 1e-4
    assert byname.loc["P", "n_subjects"] == 4
    # nulls and fibre controls sit beside the estimators, near chance
    for null in ("P_shuffle", "P_surrogate", ig.FIBRE_PERP):
        assert abs(byname.loc[null, "mean"] - ig.CHANCE_MEAN_DEG) < 6.0, null
    paired = table[(table.method == "P") & (table.test == "vs_fibre_e3")
                   & (table.stratum == "all") & (table.statistic == "mean")]
    assert len(paired) == 1 and paired["mean"].iloc[0] < -30.0
    # controls are not paired against themselves
    assert table[(table.method == ig.FIBRE_E3) & (table.test != "chance")].empty


def test_evaluate_subject_bad_input(gtab):
    dwi, phase, _ = _subject(0, gtab, shape=(6, 6, 6))
    with pytest.raises(ValueError, match="phase"):
        ig.evaluate_subject(dwi, T, estimators=("P",))
    with pytest.raises(ValueError, match="second"):
        ig.evaluate_subject(dwi, T, estimators=("C",))
    with pytest.raises(ValueError, match="unknown"):
        ig.evaluate_subject(dwi, T, estimators=("Z",))
    dwi.mask[:] = False
    dwi.mask[2, 2, 2] = True
    with pytest.raises(InputError, match="no voxel left"):
        ig.evaluate_subject(dwi, T, surrogate=False)


def test_timing_from_mdt_protocol(shared_data, tmp_path):
    t60 = ig.SequenceTiming.from_prtcl(shared_data / "mdt_te60_b1k_b2k" / "b1k_b2k.prtcl")
    assert (t60.Delta, t60.delta, t60.TE) == pytest.approx((26.5, 16.2, 60.0))
    assert t60.diffusion_time == pytest.approx((26.5 - 16.2 / 3) / 1000)
    bad = tmp_path / "mixed.prtcl"
    bad.write_text("#gx,gy,gz,Delta,delta,TE,b,TR\n0 0 0 0.04 0.01 0.09 0 7\n"
                   "1 0 0 0.05 0.01 0.09 1e9 7\n")
    with pytest.raises(InputError, match="Delta varies"):
        ig.SequenceTiming.from_prtcl(bad)
    with pytest.raises(ValueError, match="invalid timing"):
        ig.SequenceTiming(-1.0, 10.0)


def test_threads_and_chunks_do_not_change_results(gtab):
    """Worker threads and chunk sizes change the schedule only: fits and
    surrogates (per-chunk generators seeded in chunk order) are identical."""
    rng = np.random.default_rng(15)
    n = 600
    D, g = _tensors(n, rng), _axes(n, rng, 1.0)
    S = _rician(ig.published_signal(S0, D, g, gtab, T), S0 / 50, rng).astype(np.float32)
    data = S.reshape(20, 30, -1)
    one = ig.PublishedModel(gtab, T, chunk_size=64, n_threads=1)
    two = ig.PublishedModel(gtab, T, chunk_size=64, n_threads=2)
    np.testing.assert_array_equal(one.fit(data).axis, two.fit(data).axis)
    s1 = one.fit_surrogate(data, None, 20.0, np.random.default_rng(1))
    s2 = two.fit_surrogate(data, None, 20.0, np.random.default_rng(1))
    np.testing.assert_array_equal(s1.axis, s2.axis)
    big = ig.PublishedModel(gtab, T, chunk_size=4096, n_threads=1).fit(data)
    # float32 tensor fits round differently per chunk: axes agree closely
    diff = ig.acute_angle(big.axis, one.fit(data).axis)
    assert np.percentile(diff, 95) < 0.1


def test_evaluate_subject_with_a_and_c(gtab):
    """A (on a seeded voxel subset) and C (two series at two diffusion times)
    run through the subject function with their nulls; the C series carry
    D(t) = D - 2 a^2 t (D g)(D g)^T with a large g so C finds it."""
    dwi, _, _ = _subject(5, gtab, shape=(8, 8, 7))
    rng = np.random.default_rng(5)
    grid = dwi.mask.shape
    n = int(np.prod(grid))
    D, g = _tensors(n, rng), _axes(n, rng, 20.0)
    series = []
    for timing in (T, T_LONG):
        Dt = ig.two_time_tensors(D, g, [timing.gradient_time])[0]
        S = ig.rician(ig.tensor_signal(dwi.data[..., gtab.b0s_mask].mean(-1).ravel(), Dt, gtab),
                      S0 / 1e6, rng)
        series.append(S.reshape(grid + (-1,)))
    short = DWI(data=series[0], gtab=gtab, mask=dwi.mask, affine=dwi.affine,
                header=dwi.header, paths=dwi.paths)
    long_ = DWI(data=series[1], gtab=gtab, mask=dwi.mask, affine=dwi.affine,
                header=dwi.header, paths=dwi.paths)
    ev = ig.evaluate_subject(short, T, estimators=("A", "C"), rng=0, second=long_,
                             second_timing=T_LONG, max_voxels=40,
                             model_kw={"C": {"max_bval": None}})
    assert ev.mask.sum() == 40
    for name in ("A", "A_shuffle", "A_surrogate", "C", "C_shuffle", "C_surrogate"):
        assert np.isfinite(ev.angles[name][ev.mask]).all(), name
    c_axis = ev.fits["C"].axis[ev.mask]
    assert np.median(ig.acute_angle(c_axis, g.reshape(grid + (3,))[ev.mask])) < 2.0
    assert set(ev.rows.method) == set(ev.angles)
    assert (ev.rows.groupby("method").size() == len(ig.FA_STRATA_EDGES)).all()


def test_real_oblique_data_gold_standard_and_subject(shared_data):
    """Philips data (oblique affine, det < 0): the gold standard equals an
    independent central-difference computation (numpy.gradient in mm per
    voxel axis), the world-frame gradient is the FSL-frame one mapped by
    gradients.fsl_to_world (no shear), and the subject function runs on real
    data with every control. The timing is nominal (the set records only
    TE); B's axis does not depend on it."""
    from dmriflow.interfaces.io import load_dwi, mean_b0_map
    from dmriflow.interfaces.preprocess import brain_mask
    d = shared_data / "philips_ingenia_b1000"
    stem = "DTI_Biobank_2mm_MB3S2_EPI_701"
    dwi = load_dwi(d / f"{stem}.nii.gz", d / f"{stem}.bval", d / f"{stem}.bvec")
    b0 = mean_b0_map(dwi.data, dwi.gtab)
    dwi.mask = brain_mask(b0)
    gs = ig.gold_standard(b0, dwi.affine, dwi.mask, frame="fsl")
    zooms = ig.voxel_sizes(dwi.affine)
    with np.errstate(divide="ignore", invalid="ignore"):      # background b0 = 0
        ref = np.stack(np.gradient(b0.astype(np.float64), *zooms), axis=-1) / b0[..., None]
    assert np.linalg.det(dwi.affine[:3, :3]) < 0                    # no x flip here
    m = gs.mask
    assert m.sum() > 10000
    np.testing.assert_allclose(gs.gradient[m], ref[m], rtol=1e-4, atol=1e-6)
    gw = ig.gold_standard(b0, dwi.affine, dwi.mask, frame="world")
    np.testing.assert_allclose(gw.gradient[m], fsl_to_world(gs.gradient[m], dwi.affine),
                               rtol=1e-4, atol=1e-6)
    ev = ig.evaluate_subject(dwi, ig.SequenceTiming(35.0, 15.0, 69.0), ("B",),
                             subject="philips", rng=0, exclude_csf=True)
    assert ev.parameters["gold_excluded"]["csf"] > 0
    rows = ev.rows.set_index(["method", "stratum"])
    n = rows.loc[("B", "all"), "n_voxels"]
    assert n == ev.mask.sum() and n > 5000
    for method in ("B", "B_shuffle", "B_surrogate", ig.FIBRE_E3, ig.FIBRE_PERP):
        assert 0.0 < rows.loc[(method, "all"), "mean"] < 90.0, method
    # the random perpendicular axis makes the 2D angle uniform whatever the
    # data: mean 45 within 4 standard errors
    se = 90 / math.sqrt(12 * n)
    assert abs(rows.loc[(ig.FIBRE_PERP, "all"), "mean_2d"] - ig.CHANCE_2D_DEG) < 4 * se


def test_axis_is_sign_free_for_b_a_c_and_signed_for_p(gtab):
    """B, A and C see g only through even terms: g and -g give the same data
    and the same axis. P's phase is odd in g: -g flips the estimate."""
    rng = np.random.default_rng(16)
    n = 40
    D, g = _tensors(n, rng), _axes(n, rng, 30.0)
    for forward, model in ((ig.published_signal, ig.PublishedModel(gtab, T)),
                           (lambda *a: np.exp(ig.nonlinear_log_signal(*a)),
                            ig.NonlinearModel(gtab, T))):
        plus, minus = forward(S0, D, g, gtab, T), forward(S0, D, -g, gtab, T)
        np.testing.assert_array_equal(plus, minus)
        np.testing.assert_array_equal(model.fit_rows(plus)[0], model.fit_rows(minus)[0])
    ts = [T.gradient_time, T_LONG.gradient_time]
    for a, b in zip(ig.two_time_tensors(D, g, ts), ig.two_time_tensors(D, -g, ts)):
        np.testing.assert_array_equal(a, b)
    p = ig.PhaseModel(gtab, T)
    ax_plus = p.fit_rows(ig.phase_signal(S0, D, g / 30, gtab, T))[0]
    ax_minus = p.fit_rows(ig.phase_signal(S0, D, -g / 30, gtab, T))[0]
    np.testing.assert_allclose(ax_minus, -ax_plus, atol=1e-6)
    assert np.all(np.sum(ax_plus * g, axis=1) > 0)


def test_degenerate_voxels_are_flagged_not_fatal(gtab):
    """All-zero voxels (background) and an isotropic-zero tensor make no
    estimator stop: they come back failed (NaN axis), the others fitted."""
    rng = np.random.default_rng(17)
    n = 30
    D, g = _tensors(n, rng), _axes(n, rng, 30.0)
    S = ig.phase_signal(S0, D, g, gtab, T)
    S[:3] = 0.0
    grid = (5, 6)
    mag = np.abs(S).reshape(grid + (-1,))
    for model, data in ((ig.PublishedModel(gtab, T), mag), (ig.NonlinearModel(gtab, T), mag),
                        (ig.PhaseModel(gtab, T), S.reshape(grid + (-1,)))):
        fit = model.fit(data)
        failed = fit.failed.reshape(-1)
        assert failed[:3].all() and not failed[3:].any(), model.name
        assert np.isnan(fit.axis.reshape(-1, 3)[:3]).all()
    c = ig.TwoTimeModel(gtab, T, gtab, T_LONG, max_bval=None).fit(mag, mag)
    assert c.failed.reshape(-1)[:3].all()


def test_cohort_tests_on_known_rows():
    """The group table equals scipy's tests on hand-made per-subject rows;
    a subject missing from a control drops out of that paired test only."""
    import pandas as pd
    rng = np.random.default_rng(18)
    subjects = [f"sub-{i}" for i in range(6)]
    rows = []
    for method, kind, centre in (("B", "estimator", 52.0), ("B_shuffle", "null", 57.3),
                                 (ig.FIBRE_E3, "control", 50.0),
                                 (ig.FIBRE_PERP, "control", 57.0)):
        for s in subjects:
            if method == ig.FIBRE_PERP and s == "sub-5":
                continue
            rows.append({"subject": s, "method": method, "kind": kind, "stratum": "all",
                         "n_voxels": 100, "mean": centre + rng.normal(), "median":
                         centre + 1 + rng.normal(), "mean_2d": 44 + rng.normal(),
                         "median_2d": 44.0})
    rows = pd.DataFrame(rows, columns=list(ig.ROW_COLUMNS))
    table = ig.cohort_tests(rows)
    b = rows[rows.method == "B"].set_index("subject")
    for stat in ("mean", "median", "mean_2d"):
        r = table[(table.method == "B") & (table.statistic == stat) & (table.test == "chance")]
        ref = stats.ttest_1samp(b[stat], ig.CHANCE[stat])
        assert r["t"].item() == pytest.approx(ref.statistic)
        assert r["p"].item() == pytest.approx(ref.pvalue)
        assert r["n_subjects"].item() == 6 and r["mean"].item() == pytest.approx(b[stat].mean())
        assert r["cohen_d"].item() == pytest.approx(
            (b[stat].mean() - ig.CHANCE[stat]) / b[stat].std(ddof=1))
    e3 = rows[rows.method == ig.FIBRE_E3].set_index("subject")
    r = table[(table.method == "B") & (table.statistic == "mean") & (table.test == "vs_fibre_e3")]
    ref = stats.ttest_rel(b["mean"], e3.loc[b.index, "mean"])
    assert r["t"].item() == pytest.approx(ref.statistic) and r["p"].item() == pytest.approx(
        ref.pvalue)
    r = table[(table.method == "B") & (table.statistic == "mean") & (table.test == "vs_fibre_perp")]
    assert r["n_subjects"].item() == 5
    # controls: tests against chance only; every method appears for every statistic
    ctrl = table[table.method.isin([ig.FIBRE_E3, ig.FIBRE_PERP])]
    assert set(ctrl.test) == {"chance"}
    assert len(table[table.test == "chance"]) == 4 * 3
    assert len(table) == 4 * 3 + 2 * 3 * 2


def test_gold_standard_from_fitted_s0(gtab):
    """gold_image="s0": the fitted tensor S0 gives the same gradient as the
    mean b0 on data whose b0 is that S0 (noise aside); controls only."""
    dwi, _, g_true = _subject(6, gtab, shape=(9, 9, 8))
    ev = ig.evaluate_subject(dwi, T, (), gold_image="s0", rng=1)
    m = ev.mask
    assert np.median(ig.acute_angle(ev.gold.gradient[m], g_true[m])) < 3.0
    assert set(ev.angles) == {ig.FIBRE_E3, ig.FIBRE_PERP}
    assert ev.parameters["gold_image"] == "s0"
    with pytest.raises(ValueError, match="gold_image"):
        ig.evaluate_subject(dwi, T, (), gold_image="t2")


def test_phase_model_equals_the_exact_finite_pulse_phase(gtab):
    """P's forward model with a = phase_coefficient gives exactly the phase
    of the Monte Carlo simulator's closed form for HCP's finite pulses (the
    first-order phase scales with Delta |q|, not sqrt(b t_d))."""
    from dmriflow.interfaces.sim import montecarlo as mc
    seq = mc.Sequence.pgse(T.delta / 1000, T.Delta / 1000, T.TE / 1000)
    D = _tensors(1, np.random.default_rng(5))[0]
    grad_r2 = np.array([30.0, -50.0, 20.0])              # 1/(s mm): |g| ~ 5/mm
    g = mc.image_log_gradient(seq, grad_R2=grad_r2)
    exact = mc.linear_field_phase(seq, seq.qvectors(gtab.bvals, gtab.bvecs), D,
                                  grad_R2=grad_r2)
    model = np.angle(ig.phase_signal(1.0, D, g, gtab, T,
                                     coupling=mc.phase_coefficient(seq, "R2")))[0]
    assert np.abs(exact).max() > 0.05                    # a phase worth comparing
    np.testing.assert_allclose(model, exact, rtol=1e-6, atol=1e-12)
