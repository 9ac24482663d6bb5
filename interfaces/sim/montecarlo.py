"""Monte Carlo spin random walk in one voxel (or a few): the ground truth for
the image-gradient estimators (SCIENCE.md section 7).

Numerics only (numpy/scipy, no pydra). ``docs/montecarlo.md`` shows the
checks and the measured accuracy and speed.

Units (used everywhere in this module)
--------------------------------------
lengths mm; times s; D mm^2/s; b s/mm^2; q = gamma G delta in rad/mm;
R1, R2 1/s; gradients of ln I (g) 1/mm; proton density rho in arbitrary
units (signals are in the same units, per unit volume).

What is simulated
-----------------
Spins diffuse freely (Gaussian steps with a general tensor D per
compartment; several compartments with volume fractions, no exchange).
The voxel is localised by the imaging gradients at READOUT: walkers are
placed at their readout positions y (the voxel centre, or uniform in a box
of ``voxel_size``) and their paths are generated backwards in time, which
samples exactly the paths of the spins that are in the voxel at the echo
(Brownian motion is time-reversible; the spins' start positions are uniform
in space). Each walker carries the weight

    w = rho(x(0)) * exp(-int R(x(t), t) dt)

with R = R2 while the magnetisation is transverse and R = R1 during the
mixing time of a stimulated echo (SCIENCE.md), and the phase

    B = int F(t) . dx(t),   F(t) = the wave vector (F = q between narrow pulses;
                                   ramps 0 -> q -> 0 over finite lobes),

i.e. B = q . (x(t2) - x(t1)) for narrow pulses and q . (mean position in
lobe 2 - mean position in lobe 1) for finite ones. The voxel signal is
S(q) = sum_c f_c mean_c(w exp(iB)); I = S(0) is the b=0 image value of the
same voxel. b = |q|^2 t_d with t_d = Delta (narrow) or Delta - delta/3
(rectangular finite lobes); the same for the stimulated echo (crusher and
imaging gradients ignored).

Step integrals are exact: per step of length dt the path's increment xi
(covariance 2 D dt) and the deviation eta of its time integral from the
trapezoid (Brownian bridge, covariance 2 D dt^3 / 12) are both drawn, so the
step mean position xbar = (x_a + x_b)/2 + eta/dt gives int x dt = xbar dt
exactly. Phases and relaxation integrals use xbar: for affine fields the
simulation is exact in distribution for any number of steps (only sampling
error remains); curved fields (quadratic, voxel maps) converge with steps,
and to first order in the curvature the step error does not depend on q.

Analytic results (derived here, checked by tests/test_montecarlo.py)
--------------------------------------------------------------------
Let the fields be expanded about the readout point y: ln rho = ln rho(y) +
p.X (+ ...), R(t) = R(y,t) + r(t).X (+ 1/2 X^T H(t) X), X = x - y, and let
Rcum(t) = int_0^t r, beta(t) = p - Rcum(t). Then g = grad ln I = beta(T)
(T = echo time, TE + TM for STE), and for Gaussian diffusion with affine
R and ln rho, exactly:

    S(q)/S(0) = E(q) exp(i phi(q)),   E = exp(-int F^T D F dt) = exp(-b u^T D u),
    phi(q) = -2 int beta(t)^T D F(t) dt   ( = -a q^T (2 Delta D) g ).

(The walk's increments dx are Gaussian; w exp(iB) = exp(A + iB) with A, B
linear in dx, so E[.] = exp(Var A/2 - Var B/2 + i Cov(A, B)).) Hence
* R2 gradient, spin echo: beta(t) = g t/TE, a = t_c/TE with t_c the mean of
  the lobe centres: a = 1/2 for lobes symmetric about TE/2, narrow or finite
  (``phase_coefficient``).
* R1 gradient during the STE mixing time [tau, tau + TM]: beta(t) =
  g clip((t - tau)/TM, 0, 1), a = 1/2 for lobes symmetric about the middle of
  the mixing time.
* ln rho gradient (a non-equilibrium density gradient: walkers start with
  density rho and diffuse freely): beta = g for all t, a = 1.
The magnitude ratio |S(q)|/|S(0)| = E(q) carries nothing of g.

Linear (not log-linear) proton density, rho(x) = rho0 + grad_rho.X: the
weight is linear in the path, rho(x(0)) = rho0 - grad_rho . int dx, and
E[(rho0 - p.X) e^{iB}] = E(q)(rho0 - i Cov(p.X, B)), so exactly

    S(q)/S(0) = E(q) (1 - i q^T (2 Delta D) g),    g = grad_rho / rho0,

(``linear_density_signal``): first order phase phi = -atan(q^T 2 Delta D g),
a = 1, and magnitude |S|/|S(0)| = E(q) sqrt(1 + (q^T 2 Delta D g)^2), i.e.
ln|S| = ln S0 - b u^T D u + 1/2 ln(1 + (q^T 2 Delta D g)^2) - the
coefficient 1/2 of the published relation |S|^2 = E^2 (I^2 + (grad I^T
2 Delta D q)^2), which this model satisfies exactly.

Curvature: for R = R(y) + 1/2 X^T H(t) X (r = 0 at y), to first order in H

    |S(q)|/|S(0)| = E(q) (1 + c(q)),   c(q) = 2 q^T D [int H(t) Phi(t)^2 dt] D q,

with Phi(t) = int_t^T f (f = F/|q|, the normalised wave-vector profile)
(``curvature_term``): an even, q^T M q term, i.e. indistinguishable from a
change of D at one diffusion time. The exact answer for quadratic fields
(any order in H) is ``gaussian_reference``: the Feynman-Kac solution
u = exp(-X^T A X/2 + b.X + c) of du/dt = div(D grad u) - V u with
A' = -2 A D A + H, b' = -2 A D b + j, c' = b^T D b - tr(D A) - R(y,t),
j = -r(t) - i dF/dt, u(0) = rho, integrated over the sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence as SequenceType, runtime_checkable

import numpy as np
from scipy import ndimage
from scipy.integrate import solve_ivp

from .. import image_gradient as ig
from ..parallel import single_threaded_blas

# ----------------------------------------------------------------------------
# Named constants
# ----------------------------------------------------------------------------
#: Proton gyromagnetic ratio, rad/(s T).
GAMMA_PROTON = 267.52218744e6
#: A stimulated echo refocuses half of the magnetisation.
STE_ECHO_FRACTION = 0.5
#: Default number of time steps per walk (distributed over the sequence's
#: segments, at least one per segment). Affine fields need only one per
#: segment (the step integrals are exact); curved fields need more.
DEFAULT_STEPS = 64
#: Walkers x volumes per chunk: bounds the (walkers, volumes) float64 phase
#: arrays to ~16 MB each.
CHUNK_ELEMENTS = 2_000_000
#: Smallest and largest chunk of walkers: chunks of a few thousand walkers
#: keep the per-step (walkers, 3) arrays in cache (measured 2.5x faster
#: than one 400k-walker chunk on this project's machine).
MIN_CHUNK, MAX_CHUNK = 1024, 8192
#: Relative tolerance on a tensor's symmetry and on negative eigenvalues.
TENSOR_TOL = 1e-9
#: Integration tolerances of the exact Gaussian reference (Riccati ODE).
REFERENCE_RTOL, REFERENCE_ATOL = 1e-10, 1e-13
#: Gauss-Legendre nodes per segment for the closed-form time integrals:
#: exact for the piecewise polynomials (degree <= 5) that occur.
_GL_X, _GL_W = np.polynomial.legendre.leggauss(3)


def wavenumber(G: float, delta: float) -> float:
    """q = gamma G delta in rad/mm, for G in mT/m and delta in s."""
    return GAMMA_PROTON * (G * 1e-3) * delta * 1e-3


# ----------------------------------------------------------------------------
# Sequences
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Sequence:
    """Diffusion encoding timing, in seconds.

    ``kind`` "pgse": 90 - lobe - 180 (at TE/2) - lobe - echo at TE.
    ``kind`` "ste": 90 - lobe - 90 (TE/2) - mixing TM - 90 - lobe - echo at
    TE + TM; R1 acts during the mixing time, R2 otherwise.
    ``narrow``: instantaneous pulses at the lobe centres (q still = gamma G
    delta). ``first_centre``: centre of the first lobe; by default the lobes
    are symmetric about the refocusing pulse (PGSE) or the middle of the
    mixing time (STE), so their centres are Delta apart.
    """

    kind: str
    delta: float
    Delta: float
    TE: float
    TM: float = 0.0
    narrow: bool = False
    first_centre: float | None = None

    def __post_init__(self):
        if self.kind not in ("pgse", "ste"):
            raise ValueError(f"sequence kind must be 'pgse' or 'ste', not {self.kind!r}")
        if self.kind == "pgse" and self.TM != 0.0:
            raise ValueError("a PGSE sequence has no mixing time (TM must be 0)")
        if not (self.delta >= 0 and self.Delta > 0 and self.TE > 0 and self.TM >= 0):
            raise ValueError(f"invalid timing {self}")
        if not self.narrow and self.delta <= 0:
            raise ValueError("finite lobes need delta > 0 (use narrow=True for ideal pulses)")
        half = 0.0 if self.narrow else self.delta / 2
        c1, c2 = self.centres
        tau = self.TE / 2
        if not (c1 - half >= 0 and c1 + half <= tau + 1e-12
                and c2 - half >= tau + self.TM - 1e-12 and c2 + half <= self.duration + 1e-12):
            raise ValueError(
                f"lobes [{c1 - half:.4g}, {c1 + half:.4g}] and [{c2 - half:.4g}, {c2 + half:.4g}] s "
                f"do not fit before and after the {'mixing time' if self.kind == 'ste' else '180'}"
                f" (TE={self.TE}, TM={self.TM}, Delta={self.Delta}, delta={self.delta})")

    @classmethod
    def pgse(cls, delta: float, Delta: float, TE: float, narrow: bool = False,
             first_centre: float | None = None) -> "Sequence":
        return cls("pgse", delta, Delta, TE, 0.0, narrow, first_centre)

    @classmethod
    def ste(cls, delta: float, Delta: float, TE: float, TM: float, narrow: bool = False,
            first_centre: float | None = None) -> "Sequence":
        return cls("ste", delta, Delta, TE, TM, narrow, first_centre)

    @property
    def duration(self) -> float:
        """Time from excitation to the echo (TE, or TE + TM for STE)."""
        return self.TE + self.TM

    @property
    def centres(self) -> tuple[float, float]:
        """Centres of the two lobes (narrow: the pulse times)."""
        c1 = (self.TE / 2 + self.TM / 2 - self.Delta / 2 if self.first_centre is None
              else float(self.first_centre))
        return c1, c1 + self.Delta

    @property
    def mixing(self) -> tuple[float, float]:
        """The R1 window (empty for PGSE)."""
        return self.TE / 2, self.TE / 2 + self.TM

    @property
    def diffusion_time(self) -> float:
        """t_d with b = |q|^2 t_d: Delta (narrow) or Delta - delta/3."""
        return self.Delta if self.narrow else self.Delta - self.delta / 3

    @property
    def echo_fraction(self) -> float:
        return STE_ECHO_FRACTION if self.kind == "ste" else 1.0

    @property
    def lobes(self) -> list[tuple[float, float, int]]:
        """(start, end, sign) of each lobe; F ramps up in the first (sign -1 in
        the phase as minus the mean position) and down in the second."""
        (c1, c2), h = self.centres, self.delta / 2
        return [(c1 - h, c1 + h, -1), (c2 - h, c2 + h, +1)]

    def breakpoints(self) -> np.ndarray:
        pts = [0.0, self.duration, *self.mixing, *self.centres]
        if not self.narrow:
            pts += [t for a, b, _ in self.lobes for t in (a, b)]
        pts = np.unique(np.round(np.asarray(pts, dtype=np.float64), 15))
        return pts[(pts >= 0) & (pts <= self.duration)]

    def time_grid(self, n_steps: int = DEFAULT_STEPS) -> np.ndarray:
        """Step edges: every breakpoint, each segment split evenly, about
        ``n_steps`` steps in all and at least one per segment."""
        bp = self.breakpoints()
        edges = [bp[:1]]
        for a, b in zip(bp[:-1], bp[1:]):
            n = max(1, int(round(n_steps * (b - a) / self.duration)))
            edges.append(np.linspace(a, b, n + 1)[1:])
        return np.concatenate(edges)

    def profile(self, t: np.ndarray) -> np.ndarray:
        """f(t) = F(t)/|q|: 0 before the first lobe, 1 between the lobes (up to
        the start of the second), linear ramps over finite lobes."""
        t = np.asarray(t, dtype=np.float64)
        c1, c2 = self.centres
        if self.narrow:
            return ((t >= c1) & (t < c2)).astype(np.float64)
        (a1, b1, _), (a2, b2, _) = self.lobes
        up = np.clip((t - a1) / self.delta, 0.0, 1.0) if self.delta > 0 else (t >= c1) * 1.0
        down = np.clip((b2 - t) / self.delta, 0.0, 1.0) if self.delta > 0 else (t < c2) * 1.0
        return np.minimum(up, down)

    def b_value(self, q) -> np.ndarray:
        """b = |q|^2 t_d (s/mm^2) for wave numbers or wave vectors q (rad/mm)."""
        q = np.asarray(q, dtype=np.float64)
        q2 = q * q if q.ndim < 2 else np.sum(q * q, axis=-1)
        return q2 * self.diffusion_time

    def qvectors(self, bvals, bvecs) -> np.ndarray:
        """Wave vectors (n, 3) rad/mm for b-values and unit directions."""
        bvals = np.asarray(bvals, dtype=np.float64)
        bvecs = np.asarray(bvecs, dtype=np.float64).reshape(-1, 3)
        norm = np.linalg.norm(bvecs, axis=1, keepdims=True)
        u = np.divide(bvecs, norm, out=np.zeros_like(bvecs), where=norm > 0)
        return u * np.sqrt(np.clip(bvals, 0, None) / self.diffusion_time)[:, None]


# ----------------------------------------------------------------------------
# Spatial fields (rho, R2, R1)
# ----------------------------------------------------------------------------
@runtime_checkable
class Field(Protocol):
    """A scalar map of position: ``field(x)`` for x of shape (..., 3) in mm."""

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class PolynomialField:
    """value + gradient.(x - origin) + 1/2 (x - origin)^T hessian (x - origin):
    constant, affine or quadratic."""

    value: float = 0.0
    gradient: np.ndarray = field(default_factory=lambda: np.zeros(3))
    hessian: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def __post_init__(self):
        object.__setattr__(self, "value", float(self.value))
        for name, shape in (("gradient", (3,)), ("hessian", (3, 3)), ("origin", (3,))):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"PolynomialField.{name} must have shape {shape}, not {arr.shape}")
            object.__setattr__(self, name, arr)
        if not np.allclose(self.hessian, self.hessian.T):
            raise ValueError("PolynomialField.hessian must be symmetric")

    @property
    def is_constant(self) -> bool:
        return not (self.gradient.any() or self.hessian.any())

    def __call__(self, x: np.ndarray) -> np.ndarray:
        d = np.asarray(x, dtype=np.float64) - self.origin
        out = self.value + d @ self.gradient
        if self.hessian.any():
            out = out + 0.5 * np.sum((d @ self.hessian) * d, axis=-1)
        return out

    def gradient_at(self, y) -> np.ndarray:
        return self.gradient + self.hessian @ (np.asarray(y, dtype=np.float64) - self.origin)


@dataclass(frozen=True)
class GridField:
    """A voxel map with trilinear interpolation. ``affine`` maps voxel
    indices to mm (as in NIfTI); outside the grid the edge values are held."""

    values: np.ndarray
    affine: np.ndarray

    def __post_init__(self):
        v = np.asarray(self.values, dtype=np.float64)
        a = np.asarray(self.affine, dtype=np.float64)
        if v.ndim != 3 or a.shape != (4, 4):
            raise ValueError("GridField needs a 3D array and a 4x4 affine")
        object.__setattr__(self, "values", v)
        object.__setattr__(self, "affine", a)
        object.__setattr__(self, "_inverse", np.linalg.inv(a))

    is_constant = False

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        inv = self._inverse
        idx = x @ inv[:3, :3].T + inv[:3, 3]
        flat = idx.reshape(-1, 3).T
        out = ndimage.map_coordinates(self.values, flat, order=1, mode="nearest", prefilter=False)
        return out.reshape(x.shape[:-1])


def as_field(f) -> Field:
    """A number becomes a constant field; a Field is returned as is."""
    if f is None:
        return None
    if isinstance(f, (int, float, np.floating, np.integer)):
        return PolynomialField(float(f))
    if not callable(f):
        raise TypeError(f"not a field: {f!r}")
    return f


def _is_constant(f) -> bool:
    return bool(getattr(f, "is_constant", False))


# ----------------------------------------------------------------------------
# Tissue
# ----------------------------------------------------------------------------
def as_tensor(D) -> np.ndarray:
    """A diffusion tensor (3, 3) from a number (isotropic) or a symmetric
    positive semi-definite 3x3 matrix, mm^2/s."""
    D = np.asarray(D, dtype=np.float64)
    if D.ndim == 0:
        D = float(D) * np.eye(3)
    if D.shape != (3, 3):
        raise ValueError(f"diffusion tensor must be a number or 3x3, not shape {D.shape}")
    scale = max(np.abs(D).max(), 1e-30)
    if not np.allclose(D, D.T, atol=TENSOR_TOL * scale):
        raise ValueError("diffusion tensor must be symmetric")
    if np.linalg.eigvalsh(D).min() < -TENSOR_TOL * scale:
        raise ValueError("diffusion tensor must be positive semi-definite")
    return 0.5 * (D + D.T)


def _sqrt_tensor(D: np.ndarray) -> np.ndarray:
    """L with L L^T = D (symmetric square root; works for singular D)."""
    w, v = np.linalg.eigh(D)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


@dataclass(frozen=True)
class Compartment:
    """One non-exchanging compartment: volume fraction, diffusion tensor and,
    optionally, its own R2/R1 fields (default: the voxel's)."""

    D: np.ndarray
    fraction: float = 1.0
    R2: object = None
    R1: object = None

    def __post_init__(self):
        object.__setattr__(self, "D", as_tensor(self.D))
        if not self.fraction > 0:
            raise ValueError(f"compartment fraction must be > 0, not {self.fraction}")
        object.__setattr__(self, "R2", as_field(self.R2))
        object.__setattr__(self, "R1", as_field(self.R1))


# ----------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------
#: Sums over sampling units (a walker, or an antithetic pair averaged) of
#: W = weight, A = w cos B, C = w sin B and their products.
_MOMENTS = ("W", "WW", "A", "C", "AA", "CC", "AC", "WA", "WC")


@dataclass
class MCSignal:
    """Simulated voxel signals. ``signal`` (n_voxels, n_q) complex and ``b0``
    (n_voxels,) = I, per unit volume in the units of rho; ``ratio`` =
    S(q)/I; standard errors of the ratio's real and imaginary parts,
    magnitude and phase (delta method over walkers, per compartment)."""

    qvecs: np.ndarray
    bvals: np.ndarray
    signal: np.ndarray
    b0: np.ndarray
    se_b0: np.ndarray
    se_real: np.ndarray
    se_imag: np.ndarray
    se_magnitude: np.ndarray
    se_phase: np.ndarray
    n_walkers: int
    n_steps: int

    @property
    def ratio(self) -> np.ndarray:
        return self.signal / self.b0[:, None]

    @property
    def magnitude(self) -> np.ndarray:
        return np.abs(self.ratio)

    @property
    def phase(self) -> np.ndarray:
        return np.angle(self.ratio)


def _standard_errors(per_comp: list[tuple[float, int, dict]]) -> dict:
    """Delta-method standard errors of R = S/S0 from per-compartment
    moments (fraction f, sampling units n, sums ``_MOMENTS``)."""
    S0 = sum(f * m["W"] / n for f, n, m in per_comp)
    S = sum(f * (m["A"] + 1j * m["C"]) / n for f, n, m in per_comp)
    R = S / S0
    mag = np.abs(R)
    ur = np.divide(R.real, mag, out=np.ones_like(mag), where=mag > 0)
    ui = np.divide(R.imag, mag, out=np.zeros_like(mag), where=mag > 0)

    def var(alpha, beta, gamma):
        # X = alpha A + beta C + gamma W per unit; Var(part of R) = sum f^2 Var_c(X)/n / S0^2
        total = 0.0
        for f, n, m in per_comp:
            e = {k: v / n for k, v in m.items()}
            ex = alpha * e["A"] + beta * e["C"] + gamma * e["W"]
            ex2 = (alpha ** 2 * e["AA"] + beta ** 2 * e["CC"] + 2 * alpha * beta * e["AC"]
                   + 2 * alpha * gamma * e["WA"] + 2 * beta * gamma * e["WC"]
                   + gamma ** 2 * e["WW"])
            total = total + f * f * np.clip(ex2 - ex * ex, 0, None) / n
        return total / S0 ** 2

    zero = np.zeros_like(mag)
    se_phase = np.sqrt(var(-ui, ur, zero))
    se_phase = np.divide(se_phase, mag, out=np.full_like(mag, np.inf), where=mag > 0)
    var_b0 = sum(f * f * max(m["WW"] / n - (m["W"] / n) ** 2, 0.0) / n for f, n, m in per_comp)
    return {"signal": S, "b0": S0, "se_b0": math.sqrt(var_b0),
            "se_real": np.sqrt(var(1.0 + zero, zero, -R.real)),
            "se_imag": np.sqrt(var(zero, 1.0 + zero, -R.imag)),
            "se_magnitude": np.sqrt(var(ur, ui, -mag)), "se_phase": se_phase}


# ----------------------------------------------------------------------------
# The walk
# ----------------------------------------------------------------------------
def _walk_chunk(rng, n, y, voxel_size, L, seq, grid, rho, R2, R1, antithetic):
    """One chunk of walkers of one compartment: weights w (n,) and phase
    moment vectors m (n, 3) with B = q . m. ``antithetic``: walker n/2 + i
    is walker i mirrored through the voxel centre (n even)."""
    h = n // 2 if antithetic else n

    def draw(shape_fn):
        z = shape_fn((h, 3))
        return np.concatenate([z, -z]) if antithetic else z

    x = np.empty((n, 3))
    x[:] = y
    if voxel_size is not None:
        x += draw(lambda shape: rng.random(shape) - 0.5) * voxel_size
    m = np.zeros((n, 3))
    logw = np.zeros(n)
    const_logw = 0.0
    c1, c2 = seq.centres
    mix0, mix1 = seq.mixing
    lobes = [] if seq.narrow else seq.lobes
    events = {}
    if seq.narrow:
        for t, s in ((c1, -1.0), (c2, +1.0)):
            events[int(np.argmin(np.abs(grid - t)))] = s
    K = len(grid) - 1
    if K in events:
        m += events[K] * x
    for k in range(K - 1, -1, -1):                       # backwards from the echo
        t0, t1 = grid[k], grid[k + 1]
        dt = t1 - t0
        mid = 0.5 * (t0 + t1)
        rate = R1 if (seq.kind == "ste" and mix0 <= mid <= mix1) else R2
        sign = 0.0
        for a, b, s in lobes:
            if a <= mid <= b:
                sign = s
        xi = draw(rng.standard_normal) @ (L.T * math.sqrt(2 * dt))
        need_mean = sign != 0.0 or not _is_constant(rate)
        if need_mean:
            eta = draw(rng.standard_normal) @ (L.T * math.sqrt(2 * dt ** 3 / 12))
            xbar = x - 0.5 * xi + eta / dt               # mean position over the step
            if sign != 0.0:
                m += (sign * dt / seq.delta) * xbar
        if _is_constant(rate):
            const_logw -= rate.value * dt
        else:
            logw -= rate(xbar) * dt
        x -= xi
        if k in events:
            m += events[k] * x
    w = np.asarray(rho(x), dtype=np.float64) * np.exp(logw + const_logw) * seq.echo_fraction
    return np.broadcast_to(w, (n,)).copy(), m


def simulate(sequence: Sequence, qvecs, compartments: Compartment | SequenceType[Compartment], *,
             rho=1.0, R2=0.0, R1=0.0, centre=(0.0, 0.0, 0.0), voxel_size=None,
             n_walkers: int = 100_000, n_steps: int = DEFAULT_STEPS,
             seed: int | np.random.Generator | None = None, chunk: int | None = None,
             antithetic: bool = True) -> MCSignal:
    """Simulate the complex voxel signal for wave vectors ``qvecs`` (n_q, 3)
    rad/mm (``Sequence.qvectors`` turns b-values and directions into them).

    ``rho``, ``R2``, ``R1``: numbers or Fields (``PolynomialField``,
    ``GridField`` or any callable of positions); a compartment's own R2/R1
    replace the voxel's. ``centre``: (3,) or (n_voxels, 3) readout
    positions; ``voxel_size`` None reads every walker at the centre,
    otherwise uniform in a box of that size (mm, number or 3 values).
    ``n_walkers`` in all per voxel, split over compartments in proportion to
    their fractions. ``seed``: a numpy Generator or seed; the same seed,
    walkers and chunk give identical results. Walkers are processed in
    chunks of ``chunk`` (default: CHUNK_ELEMENTS / n_q) to bound memory.
    ``antithetic`` (default): walkers come in pairs mirrored through the
    readout point (increments negated), so the sampled mean displacement is
    exactly zero; without it, that sampling noise is a phase linear in q -
    exactly what a gradient looks like. A pair counts as one sample in the
    standard errors.
    """
    comps = [compartments] if isinstance(compartments, Compartment) else list(compartments)
    if not comps:
        raise ValueError("at least one compartment is needed")
    if n_walkers < 2 * len(comps):
        raise ValueError(f"n_walkers={n_walkers} is too few for {len(comps)} compartment(s)")
    qvecs = np.atleast_2d(np.asarray(qvecs, dtype=np.float64))
    if qvecs.shape[-1] != 3:
        raise ValueError(f"qvecs must have shape (n, 3), not {qvecs.shape}")
    centres = np.atleast_2d(np.asarray(centre, dtype=np.float64))
    if voxel_size is not None:
        voxel_size = np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,))
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    rho, R2, R1 = as_field(rho), as_field(R2), as_field(R1)
    grid = sequence.time_grid(n_steps)
    n_q = len(qvecs)
    chunk = int(chunk or min(MAX_CHUNK, max(MIN_CHUNK, CHUNK_ELEMENTS // max(n_q, 1))))
    pair = 2 if antithetic else 1
    chunk = max(pair, chunk - chunk % pair)
    ftot = sum(c.fraction for c in comps)
    counts = [pair * max(1, int(round(n_walkers * c.fraction / ftot / pair))) for c in comps]

    out = {k: [] for k in ("signal", "b0", "se_b0", "se_real", "se_imag", "se_magnitude", "se_phase")}
    with single_threaded_blas():   # tiny (n, 3) products: threads only contend
        for y in centres:
            _simulate_voxel(rng, y, comps, counts, chunk, voxel_size, sequence, grid, rho, R2, R1,
                            qvecs, antithetic, out)
    arr = {k: np.asarray(v) for k, v in out.items()}
    return MCSignal(qvecs=qvecs, bvals=sequence.b_value(qvecs), n_walkers=int(sum(counts)),
                    n_steps=len(grid) - 1, **arr)


def _simulate_voxel(rng, y, comps, counts, chunk, voxel_size, sequence, grid, rho, R2, R1,
                    qvecs, antithetic, out) -> None:
    """All compartments of one voxel read at y; appends to ``out``."""
    n_q = len(qvecs)
    per_comp = []
    for comp, n_c in zip(comps, counts):
        L = _sqrt_tensor(comp.D)
        r2 = comp.R2 if comp.R2 is not None else R2
        r1 = comp.R1 if comp.R1 is not None else R1
        mom = {k: (0.0 if k in ("W", "WW") else np.zeros(n_q)) for k in _MOMENTS}
        done = units = 0
        while done < n_c:
            n = min(chunk, n_c - done)
            w, m = _walk_chunk(rng, n, y, voxel_size, L, sequence, grid, rho, r2, r1, antithetic)
            if antithetic:
                # a pair is one sampling unit; its mirror has m -> -m, so
                # cos is shared and sin changes sign: one trig evaluation per pair
                h = n // 2
                ph = m[:h] @ qvecs.T
                w, dw = 0.5 * (w[:h] + w[h:]), 0.5 * (w[:h] - w[h:])
                A, C = w[:, None] * np.cos(ph), dw[:, None] * np.sin(ph)
            else:
                ph = m @ qvecs.T
                A, C = w[:, None] * np.cos(ph), w[:, None] * np.sin(ph)
            mom["W"] += w.sum()
            mom["WW"] += w @ w
            mom["A"] += A.sum(axis=0)
            mom["C"] += C.sum(axis=0)
            mom["AA"] += np.einsum("ij,ij->j", A, A)
            mom["CC"] += np.einsum("ij,ij->j", C, C)
            mom["AC"] += np.einsum("ij,ij->j", A, C)
            mom["WA"] += w @ A
            mom["WC"] += w @ C
            done += n
            units += len(w)
        per_comp.append((comp.fraction, units, mom))
    res = _standard_errors(per_comp)
    for k in out:
        out[k].append(res[k])


# ----------------------------------------------------------------------------
# Analytic results
# ----------------------------------------------------------------------------
def _integrate(seq: Sequence, fun) -> np.ndarray:
    """int_0^T fun(t) dt, exact for piecewise polynomials of degree <= 5
    between the sequence's breakpoints (3-point Gauss-Legendre per segment).
    ``fun`` maps times (k,) to values (k, ...)."""
    bp = seq.breakpoints()
    total = 0.0
    for a, b in zip(bp[:-1], bp[1:]):
        t = 0.5 * (a + b) + 0.5 * (b - a) * _GL_X
        vals = np.asarray(fun(t))
        total = total + 0.5 * (b - a) * np.tensordot(_GL_W, vals, axes=(0, 0))
    return total


def free_attenuation(sequence: Sequence, qvecs, D) -> np.ndarray:
    """E(q) = exp(-t_d q^T D q) for free Gaussian diffusion."""
    q = np.atleast_2d(np.asarray(qvecs, dtype=np.float64))
    D = as_tensor(D)
    return np.exp(-sequence.diffusion_time * np.einsum("ni,ij,nj->n", q, D, q))


def _relax_fraction(seq: Sequence, source: str, t: np.ndarray) -> np.ndarray:
    """Rcum(t)/Rcum(T) for a gradient of R2 or R1 (fraction of the weight's
    gradient accumulated by time t); 1 for a (log) density gradient."""
    t = np.asarray(t, dtype=np.float64)
    T = seq.duration
    m0, m1 = seq.mixing
    if source == "rho":
        return np.ones_like(t)
    if source == "R1":
        if seq.kind != "ste" or seq.TM <= 0:
            raise ValueError("R1 acts only during the mixing time of a stimulated echo")
        return np.clip((t - m0) / seq.TM, 0.0, 1.0)
    if source == "R2":
        transverse = np.clip(t, 0, m0) + np.clip(t - m1, 0, None)
        return transverse / (T - seq.TM)
    raise ValueError(f"source must be 'R2', 'R1' or 'rho', not {source!r}")


def phase_coefficient(sequence: Sequence, source: str = "R2") -> float:
    """a in phi(q) = -a q^T (2 Delta D) g when g = grad ln I comes from a
    gradient of ``source`` ('R2', 'R1' - STE mixing time - or 'rho', log-
    linear density): a = int beta(t)/beta(T) f(t) dt / Delta."""
    val = _integrate(sequence, lambda t: _relax_fraction(sequence, source, t)
                     * sequence.profile(t))
    return float(val / sequence.Delta)


def linear_field_phase(sequence: Sequence, qvecs, D, grad_R2=(0, 0, 0), grad_R1=(0, 0, 0),
                       grad_log_rho=(0, 0, 0)) -> np.ndarray:
    """Exact phase phi(q) = -2 int beta(t)^T D F(t) dt for affine R2, R1 and
    ln rho (gradients in 1/(s mm), 1/(s mm), 1/mm)."""
    q = np.atleast_2d(np.asarray(qvecs, dtype=np.float64))
    D = as_tensor(D)
    g_r2 = -np.asarray(grad_R2, dtype=np.float64) * (sequence.duration - sequence.TM)
    g_r1 = -np.asarray(grad_R1, dtype=np.float64) * sequence.TM
    g_rho = np.asarray(grad_log_rho, dtype=np.float64)
    total = np.zeros(3)
    for g, src in ((g_r2, "R2"), (g_r1, "R1"), (g_rho, "rho")):
        if np.any(g):
            total = total + phase_coefficient(sequence, src) * g
    return -2 * sequence.Delta * q @ (D @ total)


def image_log_gradient(sequence: Sequence, grad_R2=(0, 0, 0), grad_R1=(0, 0, 0),
                       grad_log_rho=(0, 0, 0)) -> np.ndarray:
    """g = grad ln I (1/mm) for affine fields: grad ln rho - TE grad R2 -
    TM grad R1."""
    return (np.asarray(grad_log_rho, dtype=np.float64)
            - (sequence.duration - sequence.TM) * np.asarray(grad_R2, dtype=np.float64)
            - sequence.TM * np.asarray(grad_R1, dtype=np.float64))


def linear_density_signal(sequence: Sequence, qvecs, D, g) -> np.ndarray:
    """S(q)/S(0) = E(q) (1 - i q^T (2 Delta D) g) for a LINEAR proton density
    with g = grad rho / rho at the voxel centre (exact; see module notes)."""
    q = np.atleast_2d(np.asarray(qvecs, dtype=np.float64))
    D = as_tensor(D)
    x = 2 * sequence.Delta * q @ (D @ np.asarray(g, dtype=np.float64))
    return free_attenuation(sequence, q, D) * (1 - 1j * x)


def curvature_term(sequence: Sequence, qvecs, D, hess_R2=None, hess_R1=None) -> np.ndarray:
    """c(q) in |S(q)|/|S(0)| = E(q)(1 + c(q)), first order in the Hessians
    (1/(s mm^2)) of R2 / R1 when their gradients vanish at the readout
    point: c = 2 q^T D [int H(t) Phi(t)^2 dt] D q, Phi(t) = int_t^T f."""
    q = np.atleast_2d(np.asarray(qvecs, dtype=np.float64))
    D = as_tensor(D)
    H2 = np.zeros((3, 3)) if hess_R2 is None else np.asarray(hess_R2, dtype=np.float64)
    H1 = np.zeros((3, 3)) if hess_R1 is None else np.asarray(hess_R1, dtype=np.float64)
    m0, m1 = sequence.mixing
    T = sequence.duration

    def Phi(t):
        return np.array([_integrate_between(sequence, s, T) for s in np.atleast_1d(t)])

    def integrand(t):
        in_mix = (sequence.kind == "ste") & (t > m0) & (t < m1)
        return (np.where(in_mix, 0.0, 1.0) * Phi(t) ** 2)[:, None, None] * H2 \
            + (np.where(in_mix, 1.0, 0.0) * Phi(t) ** 2)[:, None, None] * H1

    Hbar = _integrate(sequence, integrand)
    M = 2 * D @ Hbar @ D
    return np.einsum("ni,ij,nj->n", q, M, q)


def _integrate_between(seq: Sequence, a: float, b: float) -> float:
    """int_a^b f(t) dt (f piecewise linear: exact with Gauss-Legendre)."""
    bp = seq.breakpoints()
    pts = np.unique(np.r_[a, b, bp[(bp > a) & (bp < b)]])
    total = 0.0
    for u, v in zip(pts[:-1], pts[1:]):
        t = 0.5 * (u + v) + 0.5 * (v - u) * _GL_X
        total += 0.5 * (v - u) * float(_GL_W @ seq.profile(t))
    return total


def _poly(f, y):
    """(value, gradient, Hessian) of a PolynomialField (or number) at y."""
    f = as_field(0.0 if f is None else f)
    if not isinstance(f, PolynomialField):
        raise TypeError("gaussian_reference needs PolynomialField (or constant) fields")
    return float(f(y)), f.gradient_at(y), f.hessian


def gaussian_reference(sequence: Sequence, qvecs, D, *, R2=0.0, R1=0.0, log_rho=0.0,
                       point=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, float]:
    """Exact S(q)/S(0) (complex, (n_q,)) and ln S(0) for one Gaussian
    compartment read at ``point``, with R2, R1 and ln rho polynomial fields
    (at most quadratic): the Feynman-Kac / Riccati solution in the module
    notes, integrated segment by segment (narrow pulses: jumps of b)."""
    D = as_tensor(D)
    y = np.asarray(point, dtype=np.float64)
    r2, r1, lr = _poly(R2, y), _poly(R1, y), _poly(log_rho, y)
    m0, m1 = sequence.mixing
    q_all = np.atleast_2d(np.asarray(qvecs, dtype=np.float64))
    bp = sequence.breakpoints()
    c1, c2 = sequence.centres
    lobes = [] if sequence.narrow else sequence.lobes

    def rates(t):
        return r1 if (sequence.kind == "ste" and m0 < t < m1) else r2

    def solve(q):
        A = -lr[2].copy()
        b = lr[1].astype(np.complex128)
        c = complex(lr[0])
        for a_, b_ in zip(bp[:-1], bp[1:]):
            if sequence.narrow:
                for tc, jump in ((c1, -1j), (c2, +1j)):
                    if abs(a_ - tc) < 1e-15:
                        b = b + jump * q
            mid = 0.5 * (a_ + b_)
            R0, rg, H = rates(mid)
            Fp = np.zeros(3)
            for la, lb, s in lobes:
                if la <= mid <= lb:
                    Fp = -s * q / sequence.delta           # dF/dt: + in lobe 1, - in lobe 2
            j = -rg - 1j * Fp

            def rhs(_t, z):
                Am = z[:9].reshape(3, 3)
                bv = z[9:12] + 1j * z[12:15]
                dA = -2 * Am @ D @ Am + H
                db = -2 * Am @ D @ bv + j
                dc = bv @ D @ bv - np.trace(D @ Am) - R0
                return np.r_[dA.ravel(), db.real, db.imag, dc.real, dc.imag]

            z0 = np.r_[A.ravel(), b.real, b.imag, c.real, c.imag]
            sol = solve_ivp(rhs, (a_, b_), z0, method="DOP853", rtol=REFERENCE_RTOL,
                            atol=REFERENCE_ATOL)
            z = sol.y[:, -1]
            A = z[:9].reshape(3, 3)
            b = z[9:12] + 1j * z[12:15]
            c = complex(z[15], z[16])
        if sequence.narrow and abs(bp[-1] - c2) < 1e-15:
            b = b + 1j * q
        return c

    c0 = solve(np.zeros(3))
    ratios = np.array([np.exp(solve(q) - c0) for q in q_all])
    return ratios, float(c0.real + math.log(sequence.echo_fraction))


# ----------------------------------------------------------------------------
# Voxels for the image-gradient studies
# ----------------------------------------------------------------------------
#: Baseline relaxation rates of the study voxels (1/s): white matter at 3T.
STUDY_R2, STUDY_R1 = 1.0 / 0.070, 1.0 / 0.850
#: Sources of the image gradient g that ``gradient_voxels`` can simulate.
GRADIENT_SOURCES = ("R2", "R1", "log_rho", "rho")


def gradient_voxels(sequence: Sequence, bvals, bvecs, tensors, gradients, *, source: str = "R2",
                    n_walkers: int = 10_000, n_steps: int = 6,
                    seed: int | np.random.Generator | None = None) -> np.ndarray:
    """Noise-free complex signals S(q)/I (n_voxels, n_volumes) of one-
    compartment Gaussian voxels whose b=0 image has grad ln I = ``gradients``
    (n, 3, 1/mm) at the readout point, each with its own tensor (n, 3, 3):

    * "R2": affine R2 = STUDY_R2 - g.x/TE (spin echo; exact physics: the
      gradient is a pure phase, a = 1/2);
    * "R1": affine R1 during the mixing time (stimulated echo; g = -TM grad R1);
    * "log_rho": rho = exp(g.x) (pure phase, a = 1);
    * "rho": linear rho = 1 + g.x, the non-equilibrium density gradient whose
      magnitude follows the published relation (``linear_density_signal``).
    Affine fields make the walk exact for any ``n_steps``.
    """
    if source not in GRADIENT_SOURCES:
        raise ValueError(f"source must be one of {GRADIENT_SOURCES}, not {source!r}")
    tensors = np.asarray(tensors, dtype=np.float64).reshape(-1, 3, 3)
    gradients = np.asarray(gradients, dtype=np.float64).reshape(-1, 3)
    if len(tensors) != len(gradients):
        raise ValueError("one tensor per gradient is needed")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    q = sequence.qvectors(bvals, bvecs)
    out = np.empty((len(tensors), len(q)), dtype=np.complex128)
    T2_time = sequence.duration - sequence.TM
    for i, (D, g) in enumerate(zip(tensors, gradients)):
        fields = {"R2": STUDY_R2, "R1": STUDY_R1, "rho": 1.0}
        if source == "R2":
            fields["R2"] = PolynomialField(STUDY_R2, -g / T2_time)
        elif source == "R1":
            fields["R1"] = PolynomialField(STUDY_R1, -g / sequence.TM)
        elif source == "rho":
            fields["rho"] = PolynomialField(1.0, g)
        else:
            fields["rho"] = lambda x, g=g: np.exp(x @ g)
        res = simulate(sequence, q, Compartment(D), n_walkers=n_walkers, n_steps=n_steps,
                       seed=rng, **fields)
        out[i] = res.ratio[0]
    return out


#: Eigenvalue ranges (mm^2/s) of the study voxels' tensors: white-matter-like
#: (FA ~0.5-0.8, MD ~0.6-1.0e-3), random orientation.
STUDY_EIGENVALUES = ((1.2e-3, 1.8e-3), (0.3e-3, 0.7e-3), (0.2e-3, 0.5e-3))
#: Signal scale of the study voxels (b=0 image value).
STUDY_S0 = 1000.0


def random_axes(n: int, rng: np.random.Generator) -> np.ndarray:
    """n unit vectors uniform on the sphere."""
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def random_tensors(n: int, rng: np.random.Generator,
                   eigenvalues=STUDY_EIGENVALUES) -> np.ndarray:
    """n tensors (n, 3, 3) with eigenvalues uniform in the given ranges and
    uniformly random orientation."""
    ev = np.column_stack([rng.uniform(lo, hi, n) for lo, hi in eigenvalues])
    q, r = np.linalg.qr(rng.standard_normal((n, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]   # Haar-uniform rotations
    return np.einsum("nij,nj,nkj->nik", q, ev, q)


@dataclass
class GradientStudy:
    """Result of ``gradient_study``: true axes, tensors, the estimators' fits
    and acute angles (deg) to the true axis per voxel."""

    axes: np.ndarray
    tensors: np.ndarray
    fits: dict
    angles: dict

    def mean_angle(self, name: str) -> float:
        return float(np.nanmean(self.angles[name]))


def gradient_study(n_voxels: int, gtab, sequence: Sequence, *, source: str = "R2",
                   g_norm: float = 20.0, snr: float = 50.0, estimators=("P", "B", "A"),
                   n_walkers: int = 4000, seed: int = 0) -> GradientStudy:
    """Monte Carlo voxels (``gradient_voxels``) with random tensors and random
    gradient axes of size ``g_norm`` (1/mm), complex Gaussian noise of SD
    STUDY_S0/snr (magnitude Rician), fitted by the image-gradient estimators
    (interfaces/image_gradient.py; P gets the complex data, the others the
    magnitude) at the sequence's timing."""

    rng = np.random.default_rng(seed)
    tensors = random_tensors(n_voxels, rng)
    axes = random_axes(n_voxels, rng)
    clean = STUDY_S0 * gradient_voxels(sequence, gtab.bvals, gtab.bvecs, tensors, g_norm * axes,
                                       source=source, n_walkers=n_walkers, seed=rng)
    background = np.exp(2j * np.pi * rng.random((n_voxels, 1)))   # P must remove it
    noise = ig.rician(np.zeros(clean.shape), STUDY_S0 / snr, rng, complex_output=True)
    data = clean * background + noise
    timing = ig.SequenceTiming(sequence.Delta * 1e3, sequence.delta * 1e3, sequence.TE * 1e3)
    fits, angles = {}, {}
    for name in estimators:
        model = ig.make_model(name, gtab, timing)
        fits[name] = model.fit(data if model.complex_input else np.abs(data).astype(np.float32))
        angles[name] = ig.acute_angle(fits[name].axis, axes).astype(np.float64)
    return GradientStudy(axes=axes, tensors=tensors, fits=fits, angles=angles)
