"""Monte Carlo spin random walk against the analytic results of
interfaces/sim/montecarlo.py (derivations in its docstring, SCIENCE.md s.7).

Tolerances come from the simulation itself: ``simulate`` returns the Monte
Carlo standard error (SE) of every ratio S(q)/S(0) - real and imaginary
part, magnitude and phase - by the delta method over walkers, and each check
allows 4 SE (a correct simulator fails one such check with probability
~6e-5; seeds are fixed, so the outcome is deterministic). Where a check
could pass trivially, the test also shows that the effect is many SE away
from the wrong answer (zero, a = 1 instead of 1/2, the narrow-pulse b, ...).
The SE calibration itself is tested (z-scores over independent seeds).

Walker counts: 2e4 .. 3e5 per case, 6-20 steps (affine fields are exact for
any number of steps; the curvature case uses more). The whole file runs in
~15-25 s on the project's loaded 2-core machine.
"""

from __future__ import annotations

import numpy as np
import pytest

from dmriflow.interfaces.sim import montecarlo as mc

#: allowed deviation in Monte Carlo standard errors
K_SE = 4.0
#: HCP 3T timing (s)
HCP = dict(delta=0.0106, Delta=0.0431, TE=0.0895)
#: an anisotropic tensor (mm^2/s): eigenvalues 1.7/0.5/0.3e-3, rotated
_R = np.linalg.qr(np.random.default_rng(7).normal(size=(3, 3)))[0]
D_ANISO = _R @ np.diag([1.7e-3, 0.5e-3, 0.3e-3]) @ _R.T


def directions():
    """Gradient directions: the tensor's axes and three oblique ones."""
    obl = np.array([[1, 1, 0], [1, -1, 1], [0, 1, 2]], dtype=float)
    return np.r_[_R.T, obl / np.linalg.norm(obl, axis=1, keepdims=True)]


def scheme(seq, bvals=(500, 1000, 2000)):
    dirs = directions()
    b = np.repeat(bvals, len(dirs))
    return seq.qvectors(np.r_[0.0, b], np.r_[np.zeros((1, 3)), np.tile(dirs, (len(bvals), 1))])


def assert_within(value, expected, se, k=K_SE, what=""):
    value, expected, se = (np.asarray(a, dtype=float) for a in (value, expected, se))
    z = np.abs(value - expected) / se
    assert np.all(z <= k), f"{what}: max |z| = {z.max():.2f} (> {k}); values {value} expected {expected}"


# ----------------------------------------------------------------------------
# (1) free Gaussian diffusion
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("narrow,antithetic", [(True, False), (False, True)])
def test_free_diffusion_attenuation(narrow, antithetic):
    seq = mc.Sequence.pgse(**HCP, narrow=narrow)
    q = scheme(seq)
    res = mc.simulate(seq, q, mc.Compartment(D_ANISO), n_walkers=100_000, n_steps=6, seed=1,
                      antithetic=antithetic)
    E = mc.free_attenuation(seq, q, D_ANISO)
    # b = |q|^2 t_d with t_d = Delta (narrow) or Delta - delta/3, and E = exp(-b u^T D u)
    b = np.r_[0.0, np.repeat([500, 1000, 2000], 6)]
    assert np.allclose(res.bvals, b)
    dw = slice(1, None)
    assert_within(res.magnitude[0, dw], E[dw], res.se_magnitude[0, dw], what="|S(q)|/|S(0)|")
    if antithetic:     # mirrored pairs: the sine terms cancel exactly
        assert np.all(res.ratio[0].imag == 0.0)
    else:
        assert_within(res.ratio[0, dw].imag, 0.0, res.se_imag[0, dw], what="no phase without fields")
    # the anisotropy is resolved: the directions' attenuations differ by >> SE
    spread = np.ptp(res.magnitude[0, 1:7]) / res.se_magnitude[0, 1:7].max()
    assert spread > 50


def test_standard_errors_are_calibrated():
    """z-scores (error / reported SE) over independent seeds have SD ~1: the
    magnitude and the phase under an R2 gradient, with mirrored pairs."""
    seq = mc.Sequence.pgse(**HCP, narrow=True)
    q = seq.qvectors([1000.0, 2000.0], [[1, 0, 0], [0, 1, 0]])
    g = np.array([10.0, 5.0, 0.0])
    R2 = mc.PolynomialField(20.0, -g / seq.TE)
    E = mc.free_attenuation(seq, q, D_ANISO)
    phi = mc.linear_field_phase(seq, q, D_ANISO, grad_R2=-g / seq.TE)
    z_mag, z_phase = [], []
    for seed in range(30):
        r = mc.simulate(seq, q, mc.Compartment(D_ANISO), R2=R2, n_walkers=3000, n_steps=4,
                        seed=seed)
        z_mag.append((r.magnitude[0] - E) / r.se_magnitude[0])
        z_phase.append((r.phase[0] - phi) / r.se_phase[0])
    for z in (np.ravel(z_mag), np.ravel(z_phase)):
        # 60 z-scores: SD within ~[0.75, 1.3] (chi-square 99.9 % range), mean ~0
        assert 0.7 < z.std() < 1.35
        assert abs(z.mean()) < 4 / np.sqrt(z.size)


# ----------------------------------------------------------------------------
# (2) linear R2 field: phase -1/2 q^T (2 Delta D) g, magnitude unchanged
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("narrow,voxel", [(True, None), (False, None), (False, 1.25)])
def test_linear_r2_phase(narrow, voxel):
    seq = mc.Sequence.pgse(**HCP, narrow=narrow)
    q = scheme(seq)
    g = np.array([12.0, -6.0, 8.0])                      # grad ln I, 1/mm (|g| = 15.6)
    if voxel is not None:
        g = g / 4                                        # keep exp(g.y) moderate over the voxel
    grad_r2 = -g / seq.TE                                # g = -TE grad R2
    R2 = mc.PolynomialField(20.0, grad_r2, origin=[0.3, -0.2, 0.1])
    res = mc.simulate(seq, q, mc.Compartment(D_ANISO), R2=R2, centre=[0.5, 0.2, -0.4],
                      voxel_size=voxel, n_walkers=300_000, n_steps=6, seed=2)
    a = mc.phase_coefficient(seq, "R2")
    assert a == pytest.approx(0.5, abs=1e-12)            # lobes symmetric about TE/2
    x = q @ (2 * seq.Delta * D_ANISO @ g)                # q^T (2 Delta D) g
    phi = mc.linear_field_phase(seq, q, D_ANISO, grad_R2=grad_r2)
    assert np.allclose(phi, -a * x, rtol=1e-12, atol=1e-15)
    dw = slice(1, None)
    assert_within(res.phase[0, dw], phi[dw], res.se_phase[0, dw], what="phase")
    # slope: a estimated at the largest-|x| point, and a = 1 rejected
    k = 1 + np.argmax(np.abs(x[dw]) / res.se_phase[0, dw])
    a_hat, a_se = -res.phase[0, k] / x[k], res.se_phase[0, k] / abs(x[k])
    assert abs(a_hat - 0.5) < K_SE * a_se
    if voxel is None:      # (the voxel's weight spread exp(g.y) costs precision)
        assert abs(a_hat - 1.0) > 2 * K_SE * a_se
    # the magnitude carries nothing: |S(q)|/|S(0)| = E(q)
    E = mc.free_attenuation(seq, q, D_ANISO)
    assert_within(res.magnitude[0, dw], E[dw], res.se_magnitude[0, dw], what="magnitude")


def test_asymmetric_lobes_change_the_coupling():
    """a = t_c / TE (mean lobe centre over TE) when the lobes are not
    symmetric about the refocusing pulse."""
    seq = mc.Sequence.pgse(0.008, 0.050, 0.100, first_centre=0.040)
    a = mc.phase_coefficient(seq, "R2")
    assert a == pytest.approx((0.040 + 0.090) / 2 / 0.100, abs=1e-12)
    q = seq.qvectors([1000.0, 1000.0], _R.T[:2])
    g = 20.0 * _R.T[0] - 10.0 * _R.T[1]
    res = mc.simulate(seq, q, mc.Compartment(D_ANISO), R2=mc.PolynomialField(15.0, -g / seq.TE),
                      n_walkers=300_000, n_steps=8, seed=3)
    x = q @ (2 * seq.Delta * D_ANISO @ g)
    assert_within(res.phase[0], -a * x, res.se_phase[0], what="asymmetric phase")
    assert np.max(np.abs(res.phase[0] + 0.5 * x) / res.se_phase[0]) > 2 * K_SE


# ----------------------------------------------------------------------------
# (3) proton density: linear (non-equilibrium) and log-linear
# ----------------------------------------------------------------------------
def test_linear_density_gradient():
    """rho = rho0 + grad_rho . x: S/S0 = E (1 - i q^T (2 Delta D) g), so the
    phase has a = 1 and |S|/|S0| = E sqrt(1 + x^2) (the published relation,
    coefficient 1/2 in ln|S|)."""
    seq = mc.Sequence.pgse(**HCP)
    q = scheme(seq, bvals=(1000, 2000))
    g = 25.0 * _R.T[0]                                   # grad rho / rho0, 1/mm, along the fibre
    rho = mc.PolynomialField(2.0, 2.0 * g)
    res = mc.simulate(seq, q, mc.Compartment(D_ANISO), rho=rho, R2=20.0,
                      n_walkers=300_000, n_steps=6, seed=4)
    pred = mc.linear_density_signal(seq, q, D_ANISO, g)
    dw = slice(1, None)
    assert_within(res.ratio[0, dw].real, pred.real[dw], res.se_real[0, dw], what="real part")
    assert_within(res.ratio[0, dw].imag, pred.imag[dw], res.se_imag[0, dw], what="imaginary part")
    x = q @ (2 * seq.Delta * D_ANISO @ g)
    E = mc.free_attenuation(seq, q, D_ANISO)
    assert np.allclose(np.abs(pred), E * np.sqrt(1 + x ** 2))
    # the magnitude gain sqrt(1 + x^2) is resolved (> 2 x 4 SE) where largest
    k = 1 + np.argmax((np.abs(pred[dw]) - E[dw]) / res.se_magnitude[0, dw])
    assert (res.magnitude[0, k] - E[k]) > 2 * K_SE * res.se_magnitude[0, k]
    assert_within(res.phase[0, k], -np.arctan(x[k]), res.se_phase[0, k], what="phase a=1")


def test_log_linear_density_is_pure_phase():
    """rho = exp(p.x) (any callable is a field): a = 1, magnitude = E."""
    seq = mc.Sequence.pgse(**HCP, narrow=True)
    q = scheme(seq)
    p = np.array([-5.0, 7.0, 3.0])
    res = mc.simulate(seq, q, mc.Compartment(D_ANISO), rho=lambda x: np.exp(x @ p),
                      n_walkers=100_000, n_steps=6, seed=5)
    assert mc.phase_coefficient(seq, "rho") == pytest.approx(1.0)
    phi = mc.linear_field_phase(seq, q, D_ANISO, grad_log_rho=p)
    assert np.allclose(phi, -(q @ (2 * seq.Delta * D_ANISO @ p)))
    dw = slice(1, None)
    assert_within(res.phase[0, dw], phi[dw], res.se_phase[0, dw], what="phase")
    E = mc.free_attenuation(seq, q, D_ANISO)
    assert_within(res.magnitude[0, dw], E[dw], res.se_magnitude[0, dw], what="magnitude")


# ----------------------------------------------------------------------------
# (4) R2 curvature: second-order magnitude term
# ----------------------------------------------------------------------------
def test_r2_curvature_magnitude_term():
    """Quadratic R2 with its minimum at the readout point: |S|/|S0| =
    E (1 + 2 q^T D Hbar D q), Hbar = int H Phi^2 dt (first order), checked
    against the walk and against the exact Gaussian (Riccati) reference."""
    seq = mc.Sequence.pgse(0.0, 0.040, 0.080, narrow=True)
    D = np.diag([2.0e-3, 1.0e-3, 1.5e-3])
    H = np.array([[5000.0, 1000.0, 0.0], [1000.0, 3000.0, 0.0], [0.0, 0.0, 0.0]])  # 1/(s mm^2)
    dirs = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0] / np.sqrt(2)])
    q = seq.qvectors(np.r_[0.0, 500.0 * np.ones(4)], np.r_[np.zeros((1, 3)), dirs])
    R2 = mc.PolynomialField(10.0, hessian=H)
    # (mirrored pairs would be identical here - even field, even cosine - so
    # independent walkers give twice the samples)
    res = mc.simulate(seq, q, mc.Compartment(D), R2=R2, n_walkers=300_000, n_steps=16, seed=6,
                      antithetic=False)
    E = mc.free_attenuation(seq, q, D)
    c = mc.curvature_term(seq, q, D, hess_R2=H)
    # closed form for narrow pulses: int Phi^2 = Delta^2 t1 + Delta^3/3
    t1 = seq.centres[0]
    assert np.allclose(c, 2 * np.einsum("ni,ij,nj->n", q, D @ H @ D, q)
                       * (seq.Delta ** 2 * t1 + seq.Delta ** 3 / 3))
    exact, _ = mc.gaussian_reference(seq, q, D, R2=R2)
    dw = slice(1, None)
    se = res.se_magnitude[0, dw] / E[dw]
    # first order is accurate here: its distance from the exact answer < 1 SE
    assert np.all(np.abs(np.abs(exact[dw]) / E[dw] - 1 - c[dw]) < se)
    # the effect is resolved (x axis: > 8 SE) and z (no curvature) shows none
    assert c[1] > 8 * se[0] and c[3] == pytest.approx(0.0, abs=1e-15)
    assert_within(res.magnitude[0, dw] / E[dw] - 1, c[dw], se, what="curvature term")


# ----------------------------------------------------------------------------
# (5) stimulated echo with an R1 field during the mixing time
# ----------------------------------------------------------------------------
def test_stimulated_echo_r1_gradient():
    seq = mc.Sequence.ste(0.005, 0.200, 0.040, 0.180)
    D = np.diag([1.2e-3, 0.6e-3, 0.8e-3])
    q = seq.qvectors([0.0, 500.0, 500.0, 1000.0, 1000.0],
                     [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]])
    g = np.array([-4.0, 3.0, 2.0])                       # = -TM grad R1
    R1 = mc.PolynomialField(1.0, -g / seq.TM)
    res = mc.simulate(seq, q, mc.Compartment(D), R1=R1, R2=25.0, n_walkers=300_000, n_steps=10,
                      seed=7)
    assert np.allclose(mc.image_log_gradient(seq, grad_R1=-g / seq.TM), g)
    a = mc.phase_coefficient(seq, "R1")
    assert a == pytest.approx(0.5, abs=1e-12)
    phi = mc.linear_field_phase(seq, q, D, grad_R1=-g / seq.TM)
    assert np.allclose(phi, -a * q @ (2 * seq.Delta * D @ g))
    dw = slice(1, None)
    assert_within(res.phase[0, dw], phi[dw], res.se_phase[0, dw], what="STE phase")
    assert np.max(np.abs(phi[dw]) / res.se_phase[0, dw]) > 10
    E = mc.free_attenuation(seq, q, D)
    assert_within(res.magnitude[0, dw], E[dw], res.se_magnitude[0, dw], what="STE magnitude")
    # b=0 value: 1/2 exp(-TE R2 - TM R1) and the diffusion-averaged R1 gradient term
    ratio, log_i = mc.gaussian_reference(seq, q, D, R1=R1, R2=25.0)
    assert np.allclose(ratio, E * np.exp(1j * phi), rtol=1e-7, atol=1e-10)
    assert_within(res.b0[0], np.exp(log_i), res.se_b0[0], what="STE b0")
    # (the R1 gradient seen by diffusing spins raises I by exp(Var/2) ~ 0.2 %)
    assert np.exp(log_i) == pytest.approx(0.5 * np.exp(-0.040 * 25.0 - 0.180 * 1.0), rel=1e-2)


# ----------------------------------------------------------------------------
# (6) finite and narrow pulses
# ----------------------------------------------------------------------------
def test_finite_pulse_narrow_limit():
    D = D_ANISO
    narrow = mc.Sequence.pgse(0.0005, 0.030, 0.060, narrow=True)
    short = mc.Sequence.pgse(0.0005, 0.030, 0.060)
    wide = mc.Sequence.pgse(0.020, 0.030, 0.060)
    dirs = directions()[:3]
    q = narrow.qvectors(np.full(3, 2000.0), dirs)        # the same q for all three
    runs = {name: mc.simulate(s, q, mc.Compartment(D), n_walkers=100_000, n_steps=12, seed=8 + i,
                              antithetic=False)
            for i, (name, s) in enumerate((("narrow", narrow), ("short", short), ("wide", wide)))}
    se = np.hypot(runs["narrow"].se_magnitude[0], runs["short"].se_magnitude[0])
    assert_within(runs["short"].magnitude[0], runs["narrow"].magnitude[0], se, what="narrow limit")
    # finite lobes: b = q^2 (Delta - delta/3), resolved from the narrow-pulse b
    E_wide = mc.free_attenuation(wide, q, D)
    E_narrow = mc.free_attenuation(narrow, q, D)
    w = runs["wide"]
    assert_within(w.magnitude[0], E_wide, w.se_magnitude[0], what="finite pulse b")
    assert np.all(np.abs(w.magnitude[0] - E_narrow) > 3 * K_SE * w.se_magnitude[0])


# ----------------------------------------------------------------------------
# (7) reproducibility
# ----------------------------------------------------------------------------
def test_seed_reproducibility():
    seq = mc.Sequence.pgse(**HCP)
    q = scheme(seq)
    kw = dict(R2=mc.PolynomialField(20.0, [50.0, 0, 0]), n_walkers=5000, n_steps=6, chunk=2048)
    a = mc.simulate(seq, q, mc.Compartment(D_ANISO), seed=11, **kw)
    b = mc.simulate(seq, q, mc.Compartment(D_ANISO), seed=np.random.default_rng(11), **kw)
    c = mc.simulate(seq, q, mc.Compartment(D_ANISO), seed=12, **kw)
    assert np.array_equal(a.signal, b.signal) and np.array_equal(a.b0, b.b0)
    assert not np.allclose(a.signal, c.signal)


# ----------------------------------------------------------------------------
# (8) compartments; voxel maps
# ----------------------------------------------------------------------------
def test_two_compartments_weighted_sum():
    seq = mc.Sequence.pgse(**HCP)
    q = scheme(seq, bvals=(1000, 3000))
    D_fast = 2.5e-3
    comps = [mc.Compartment(D_ANISO, 0.7, R2=14.0), mc.Compartment(D_fast, 0.3, R2=5.0)]
    res = mc.simulate(seq, q, comps, n_walkers=150_000, n_steps=6, seed=13)
    w = np.array([0.7 * np.exp(-seq.TE * 14.0), 0.3 * np.exp(-seq.TE * 5.0)])
    assert res.b0[0] == pytest.approx(w.sum(), rel=1e-12)  # constant R2: exact weights
    pred = (w[0] * mc.free_attenuation(seq, q, D_ANISO)
            + w[1] * mc.free_attenuation(seq, q, D_fast)) / w.sum()
    dw = slice(1, None)
    assert_within(res.magnitude[0, dw], pred[dw], res.se_magnitude[0, dw], what="two compartments")
    # not the single-compartment answer of either
    E1 = mc.free_attenuation(seq, q, D_ANISO)
    assert np.max(np.abs(res.magnitude[0, dw] - E1[dw]) / res.se_magnitude[0, dw]) > 20


def test_grid_field_matches_affine_field():
    """Trilinear interpolation reproduces an affine map exactly, so a voxel
    map of an affine R2 gives the same walk weights as the analytic field."""
    seq = mc.Sequence.pgse(**HCP)
    q = scheme(seq)
    affine_field = mc.PolynomialField(20.0, [30.0, -20.0, 10.0], origin=[1.0, 2.0, 3.0])
    affine = np.diag([0.05, 0.05, 0.05, 1.0])
    affine[:3, 3] = -1.0                                  # grid covers [-1, 1] mm
    ijk = np.stack(np.meshgrid(*[np.arange(41)] * 3, indexing="ij"), axis=-1)
    grid = mc.GridField(affine_field(ijk * 0.05 - 1.0), affine)
    kw = dict(n_walkers=20_000, n_steps=6, centre=[0.1, -0.2, 0.3], voxel_size=0.5)
    a = mc.simulate(seq, q, mc.Compartment(D_ANISO), R2=affine_field, seed=14, **kw)
    b = mc.simulate(seq, q, mc.Compartment(D_ANISO), R2=grid, seed=14, **kw)
    assert np.allclose(a.signal, b.signal, rtol=1e-9, atol=1e-12)


def test_voxel_batch_and_bad_parameters():
    seq = mc.Sequence.pgse(**HCP)
    q = scheme(seq)
    res = mc.simulate(seq, q, mc.Compartment(1e-3), R2=mc.PolynomialField(20.0, [5.0, 0, 0]),
                      centre=[[0, 0, 0], [1.0, 0, 0]], n_walkers=4000, n_steps=6, seed=15)
    assert res.signal.shape == (2, len(q)) and res.b0.shape == (2,)
    # I = exp(-TE R2(y)) x common factor: the ratio of the two voxels is exp(-TE * 5)
    assert res.b0[1] / res.b0[0] == pytest.approx(np.exp(-seq.TE * 5.0), rel=0.05)
    with pytest.raises(ValueError, match="do not fit"):
        mc.Sequence.pgse(0.02, 0.08, 0.09)
    with pytest.raises(ValueError, match="delta > 0"):
        mc.Sequence.pgse(0.0, 0.04, 0.09)
    with pytest.raises(ValueError, match="too few"):
        mc.simulate(seq, q, mc.Compartment(1e-3), n_walkers=1)
    with pytest.raises(ValueError, match="positive semi-definite"):
        mc.Compartment(np.diag([1e-3, -1e-3, 1e-3]))
    with pytest.raises(ValueError, match="mixing time"):
        mc.phase_coefficient(seq, "R1")


def test_gaussian_reference_matches_closed_forms():
    """The Riccati reference reproduces E exp(i phi) for affine fields
    (R2 and log rho at once, finite lobes) - two independent derivations."""
    seq = mc.Sequence.pgse(**HCP)
    q = scheme(seq, bvals=(1000, 3000))
    gr2, p = np.array([40.0, -10.0, 5.0]), np.array([2.0, 1.0, -3.0])
    ratio, _ = mc.gaussian_reference(seq, q, D_ANISO, R2=mc.PolynomialField(18.0, gr2),
                                     log_rho=mc.PolynomialField(0.0, p))
    pred = mc.free_attenuation(seq, q, D_ANISO) * np.exp(
        1j * mc.linear_field_phase(seq, q, D_ANISO, grad_R2=gr2, grad_log_rho=p))
    assert np.allclose(ratio, pred, rtol=1e-7, atol=1e-12)


def test_curvature_term_stimulated_echo_r1_window():
    """The first-order curvature term restricted to the mixing time (R1
    Hessian) agrees with the exact Riccati reference for a small Hessian;
    an R2 Hessian of the same size (acting outside the mixing time) gives a
    different, also matching, term."""
    seq = mc.Sequence.ste(0.005, 0.200, 0.040, 0.180)
    D = np.diag([1.5e-3, 0.8e-3, 1.0e-3])
    q = seq.qvectors([500.0, 500.0, 1000.0], [[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    H = np.diag([4.0, 2.0, 0.0])
    E = mc.free_attenuation(seq, q, D)
    for kw_ref, kw_c in (({"R1": mc.PolynomialField(1.0, hessian=H)}, {"hess_R1": H}),
                         ({"R2": mc.PolynomialField(20.0, hessian=H)}, {"hess_R2": H})):
        exact, _ = mc.gaussian_reference(seq, q, D, **kw_ref)
        c = mc.curvature_term(seq, q, D, **kw_c)
        assert np.all(c > 0)
        assert np.allclose(np.abs(exact) / E - 1, c, rtol=0.02)
    c1 = mc.curvature_term(seq, q, D, hess_R1=H)
    c2 = mc.curvature_term(seq, q, D, hess_R2=H)
    assert np.all(c1 > 2 * c2)     # the same Hessian weighs more over the long mixing time
