"""Spatial image gradient from the diffusion signal (SCIENCE.md section 7).

Numerics only (numpy/scipy/pandas; no pydra). Every equation is written out
in ``docs/image_gradient_methods.md``.

API
---
Acquisition timing
    ``SequenceTiming(Delta, delta, TE)`` in ms (``.diffusion_time`` in s =
    Delta - delta/3), ``HCP_TIMING``, ``SequenceTiming.from_prtcl(path)``.
Gold standard
    ``gold_standard(image, affine, mask, frame="fsl", log=False, md=None,
    csf_md_threshold=None, min_relative_gradient=None) -> GoldStandard``:
    central differences of the mean b0 in index space over the voxel size,
    in the b-vector (FSL image) frame or the world frame (inverse transpose
    of the affine: the gradient is a covector); evaluated in the mask eroded
    so that all 6 neighbours are inside. ``evaluation_mask``,
    ``central_differences``, ``index_to_frame``.
Estimators (DIPY reconst style, all vectorised over voxels, chunked)
    ``PublishedModel`` (B), ``NonlinearModel`` (A), ``PhaseModel`` (P):
    ``Model(gtab, timing).fit(data, mask) -> GradientFit`` with ``.axis``
    (..., 3 unit, NaN outside/failed), ``.gradient`` (1/mm), ``.quality``;
    ``TwoTimeModel`` (C): ``Model(gtab1, timing1, gtab2, timing2)
    .fit(data1, data2, mask)``. ``make_model(name, ...)``; forward models
    ``published_signal``, ``nonlinear_log_signal``, ``phase_signal``,
    ``two_time_tensors`` and the gradient-free ``tensor_signal`` generate
    synthetic data for tests and studies; ``rician`` adds noise.
Controls
    ``tensor_maps`` (FA, MD, V1 and the fibre-only axis E3 = DTI third
    eigenvector; method name ``FIBRE_E3``), ``perpendicular_random_axis``
    (random axis perpendicular to V1, seeded; ``FIBRE_PERP``), ``shuffle_axes`` (voxel-
    shuffle null), ``Model.fit_surrogate`` (each voxel simulated from its
    fitted gradient-free tensor with Rician noise of ``estimate_sigma``),
    ``fa_strata`` (``FA_STRATA_EDGES``).
Angles and statistics
    ``acute_angle`` (deg, sign-free), ``plane_angle`` (2D, in the plane
    perpendicular to V1), ``masked_map`` (either, as a map on the mask),
    chance values ``CHANCE_MEAN_DEG``,
    ``CHANCE_MEDIAN_DEG``, ``CHANCE_2D_DEG``; ``one_sample_test``,
    ``paired_test``; ``summarise_angles``.
Subject and cohort
    ``evaluate_subject(dwi, timing, estimators=("B",), ...) ->
    SubjectEvaluation`` (angle maps, 2D angle maps, axes, tidy ``rows``
    DataFrame); ``cohort_tests(rows) -> DataFrame`` (one-sample tests
    against chance and paired tests against the fibre-only controls).

Units: b in s/mm^2, D in mm^2/s, times in s inside the formulas, q in 1/mm
(|q| = sqrt(b / t_d)), g = grad ln I in 1/mm. Vectors are in the frame of
the b-vectors (FSL image frame) unless a function says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np

from .dti import (DTI_MAX_BVAL, MIN_SIGNAL, TensorModel, design_matrix, dti_shells,
                  fractional_anisotropy, mean_diffusivity)
from .errors import InputError
from .gradients import GradientTable, check_readable_file
from .io import mean_b0_map, storage_rows
from .parallel import available_threads, map_chunks

# ----------------------------------------------------------------------------
# Named constants
# ----------------------------------------------------------------------------
#: Chance values of the acute angle between a fixed axis and a uniformly
#: random one: density sin(theta) on [0, 90 deg], mean 1 rad, median 60 deg
#: (cos 60 = 1/2); 2D angle in a plane: uniform on [0, 90], mean 45.
CHANCE_MEAN_DEG = 180.0 / math.pi
CHANCE_MEDIAN_DEG = 60.0
CHANCE_2D_DEG = 45.0
#: Chance value of each per-subject statistic.
CHANCE = {"mean": CHANCE_MEAN_DEG, "median": CHANCE_MEDIAN_DEG,
          "mean_2d": CHANCE_2D_DEG, "median_2d": CHANCE_2D_DEG}
#: FA strata (bin edges; the last bin includes FA = 1).
FA_STRATA_EDGES = (0.0, 0.2, 0.4, 0.6, 1.0)
#: Mean diffusivity (mm^2/s) above which a voxel counts as CSF-dominated
#: (CSF ~3e-3, grey and white matter 0.7-0.9e-3); optional exclusion.
CSF_MD_THRESHOLD = 1.5e-3
#: Suggested floor for |grad I| / I (1/mm): below it the gold-standard
#: direction is dominated by noise (b0 SNR ~30 over 2 voxels of 1.25 mm gives
#: a noise gradient of ~1e-2 /mm); optional exclusion.
MIN_RELATIVE_GRADIENT = 0.02
#: Coupling a in phi(q) = -a q^T (2 Delta D) g: 1/2 for a relaxation (R2)
#: gradient in a symmetric spin echo (our derivation, reproduced by the Monte
#: Carlo simulator); the published magnitude relation
#: |S|^2 = E^2 (I^2 + (grad I^T 2 Delta D q)^2) corresponds to a = 1.
SPIN_ECHO_COUPLING = 0.5
PUBLISHED_COUPLING = 1.0
#: HCP 3T diffusion timing (ms): Delta, delta, TE.
HCP_DELTA_MS, HCP_SMALL_DELTA_MS, HCP_TE_MS = 43.1, 10.6, 89.5
#: Voxels per chunk of the batched estimators (one chunk per worker at a
#: time): B's and P's (chunk, N) work arrays are 4.7 MB each in float32 for
#: N = 288, and A's per-voxel projections (chunk, 7, N) float64 use its own,
#: smaller default chunk.
CHUNK_VOXELS = 4096
#: Nonlinear fit (A): Levenberg-Marquardt iterations per start, initial
#: damping, and the gradient magnitude (1/mm) of the fixed starts when the
#: published estimate gives none.
LM_ITERATIONS = 60
LM_DAMPING = 1e-3
START_GRADIENT = 1.0
#: A voxel's LM run has settled when its damping exceeds LM_MAX_DAMPING, an
#: accepted step lowers the cost by less than LM_TOLERANCE (relative), or a
#: step moves w by less than LM_STEP_TOLERANCE (relative); the iterations
#: stop early when every voxel of the chunk has settled.
LM_MAX_DAMPING = 1e10
LM_TOLERANCE = 1e-7
LM_STEP_TOLERANCE = 1e-9
#: Fixed start axes of A besides the published estimate: the 6 axes of an
#: icosahedron (directions through opposite vertices), orientation-neutral.
_PHI = (1 + 5 ** 0.5) / 2
START_AXES = np.array([[0, 1, _PHI], [0, -1, _PHI], [1, _PHI, 0], [-1, _PHI, 0],
                       [_PHI, 0, 1], [-_PHI, 0, 1]], dtype=np.float64) / math.sqrt(1 + _PHI ** 2)
#: A fitted S0 at or below this (signal units) means no signal: the
#: tensor fit clips signals at dti.MIN_SIGNAL, so an empty (background)
#: voxel fits S0 = MIN_SIGNAL; such voxels are reported failed.
NO_SIGNAL_S0 = 10 * MIN_SIGNAL
#: Relative ridge added to the batched normal equations so that a degenerate
#: voxel yields a (flagged) answer instead of stopping the batch.
RIDGE = 1e-10
#: Estimator names (SCIENCE.md): B published, A nonlinear, C two diffusion
#: times, P phase.
ESTIMATORS = ("B", "A", "C", "P")
#: Images the gold standard can be computed from (evaluate_subject).
GOLD_IMAGES = ("mean_b0", "s0")
#: Control names in the subject tables.
FIBRE_E3, FIBRE_PERP = "fibre_e3", "fibre_perp"
SHUFFLE_SUFFIX, SURROGATE_SUFFIX = "_shuffle", "_surrogate"


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SequenceTiming:
    """Pulsed-gradient spin-echo timing in ms: separation Delta, duration
    delta, echo time TE (optional). ``diffusion_time`` (s) = Delta - delta/3, so that
    b = |q|^2 t_d and the displacement covariance is 2 t_d D."""

    Delta: float
    delta: float
    TE: float | None = None

    def __post_init__(self):
        if not (self.Delta > 0 and self.delta >= 0 and self.Delta > self.delta / 3):
            raise ValueError(f"invalid timing Delta={self.Delta} ms, delta={self.delta} ms")

    @property
    def diffusion_time(self) -> float:
        """Effective diffusion time t_d = Delta - delta/3, in seconds."""
        return (self.Delta - self.delta / 3.0) / 1000.0

    @property
    def gradient_time(self) -> float:
        """Delta^2 / t_d (s): the time in the second-order magnitude term
        ln|S| ~ -b u^T D u + 2 a^2 b (Delta^2 / t_d) (u^T D g)^2 (= t_d for
        narrow pulses); estimator C's apparent tensors change with it."""
        return (self.Delta / 1000.0) ** 2 / self.diffusion_time

    def encoding_length(self, bvals) -> np.ndarray:
        """Delta |q| = Delta sqrt(b / t_d) (s/mm) per volume: the first-order
        phase is a q^T (2 Delta D) g = 2 a Delta |q| u^T D g. The pulse
        separation Delta, not t_d, multiplies q here (exact for finite
        pulses; checked against the Monte Carlo simulator's
        ``linear_field_phase``); both agree in the narrow-pulse limit."""
        bvals = np.clip(np.asarray(bvals, dtype=np.float64), 0.0, None)
        return self.Delta / 1000.0 * np.sqrt(bvals / self.diffusion_time)

    @classmethod
    def from_prtcl(cls, path) -> "SequenceTiming":
        """Timing from an MDT ``.prtcl`` protocol (columns gx gy gz Delta delta
        TE b TR, SI units); all volumes must share Delta, delta and TE."""
        check_readable_file(path, "protocol")
        try:
            with open(path, encoding="ascii") as fh:
                header = fh.readline().lstrip("#").strip().split(",")
            table = np.loadtxt(path, comments="#", ndmin=2)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise InputError(path, f"cannot read protocol table ({exc})") from None
        cols = {name.strip(): i for i, name in enumerate(header)}
        missing = [c for c in ("Delta", "delta", "TE") if c not in cols]
        if missing or table.shape[1] != len(header):
            raise InputError(path, f"protocol header must name Delta, delta and TE columns "
                                   f"(found {header})")
        values = {}
        for c in ("Delta", "delta", "TE"):
            col = table[:, cols[c]]
            if not np.allclose(col, col[0], rtol=1e-6, atol=1e-9):
                raise InputError(path, f"protocol column {c} varies across volumes "
                                       f"({col.min():g}..{col.max():g} s); one timing is expected")
            values[c] = float(col[0]) * 1000.0
        try:
            return cls(values["Delta"], values["delta"], values["TE"])
        except ValueError as exc:
            raise InputError(path, str(exc)) from None


HCP_TIMING = SequenceTiming(HCP_DELTA_MS, HCP_SMALL_DELTA_MS, HCP_TE_MS)


# ----------------------------------------------------------------------------
# Gold standard: finite differences of the b0 image
# ----------------------------------------------------------------------------
def evaluation_mask(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` whose 6 face neighbours are all inside ``mask`` (and
    inside the array), so every central difference uses brain voxels only."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {mask.shape}")
    out = np.zeros_like(mask)
    core = mask[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for shift in (0, 2):
            sl = [slice(1, -1)] * 3
            sl[axis] = slice(shift, mask.shape[axis] - 2 + shift)
            core &= mask[tuple(sl)]
    out[1:-1, 1:-1, 1:-1] = core
    return out


def central_differences(image: np.ndarray) -> np.ndarray:
    """dI/di_k (X, Y, Z, 3) float64 per voxel index: (I[i+1] - I[i-1]) / 2 along
    each axis; NaN on the outermost slices where a neighbour is missing."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 3:
        raise ValueError(f"image must be 3D, got shape {img.shape}")
    grad = np.full(img.shape + (3,), np.nan)
    for k in range(3):
        if img.shape[k] < 3:
            continue
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        mid = [slice(None)] * 3
        hi[k], lo[k], mid[k] = slice(2, None), slice(None, -2), slice(1, -1)
        grad[tuple(mid) + (k,)] = 0.5 * (img[tuple(hi)] - img[tuple(lo)])
    return grad


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths (mm): the column norms of the affine's 3x3 part."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def index_to_frame(grad_index: np.ndarray, affine: np.ndarray, frame: str = "fsl") -> np.ndarray:
    """Index-space gradient (..., 3) -> spatial gradient (1/mm) in ``frame``.

    ``"fsl"``: the b-vector frame: divide by the voxel size per axis and flip
    x when det(affine) > 0 (FSL convention). ``"world"``: scanner frame,
    A^-T (dI/di) with A the affine's 3x3 part (a gradient is a covector: the
    inverse transpose, not the affine itself, maps it). For an affine without
    shear the two agree through :func:`gradients.fsl_to_world`.
    """
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    if frame == "fsl":
        scale = 1.0 / voxel_sizes(affine)
        if np.linalg.det(a) > 0:
            scale[0] = -scale[0]
        return grad_index * scale
    if frame == "world":
        return grad_index @ np.linalg.inv(a)        # row-vector form of A^-T v, (..., 3)
    raise ValueError(f"frame must be 'fsl' or 'world', not {frame!r}")


@dataclass
class GoldStandard:
    """Finite-difference image gradient and the voxels where it is evaluated.

    ``gradient`` (X, Y, Z, 3) float32 is g = grad ln I (1/mm) in ``frame``
    (NaN where undefined), ``image`` the image it came from, ``mask`` the
    evaluation mask (eroded brain mask minus exclusions), ``relative`` =
    |grad I| / I = |g| (1/mm), ``excluded`` counts of voxels removed by each rule.
    """

    gradient: np.ndarray
    image: np.ndarray
    mask: np.ndarray
    frame: str
    log: bool
    excluded: dict = field(default_factory=dict)

    @cached_property
    def relative(self) -> np.ndarray:
        return np.linalg.norm(self.gradient, axis=-1).astype(np.float32)

    @cached_property
    def axis(self) -> np.ndarray:
        """Unit gradient axis (X, Y, Z, 3); NaN where |g| = 0 or undefined."""
        return unit(self.gradient)


def gold_standard(image: np.ndarray, affine: np.ndarray, mask: np.ndarray, *, frame: str = "fsl",
                  log: bool = False, md: np.ndarray | None = None,
                  csf_md_threshold: float | None = None,
                  min_relative_gradient: float | None = None) -> GoldStandard:
    """Gold-standard gradient g = grad ln I of the (mean b0) ``image``.

    ``log=False``: central differences of I divided by I (exact for an image
    linear in space); ``log=True``: central differences of ln I (exact for an
    image exponential in space). Both give the same axis up to O(h^2).
    Evaluation mask: ``evaluation_mask(mask)`` and I > 0 at the voxel and its
    neighbours; optionally minus voxels with ``md > csf_md_threshold`` and
    with |g| < ``min_relative_gradient`` (1/mm).
    """
    img = np.asarray(image, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if img.shape != mask.shape:
        raise ValueError(f"image {img.shape} and mask {mask.shape} differ")
    positive = mask & (img > 0)
    evaluate = evaluation_mask(positive)
    excluded = {"border_or_nonpositive": int(mask.sum() - evaluate.sum())}
    with np.errstate(invalid="ignore", divide="ignore"):
        if log:
            lnI = np.where(positive, np.log(np.where(positive, img, 1.0)), np.nan)
            grad = index_to_frame(central_differences(lnI), affine, frame)
            del lnI
        else:
            grad = index_to_frame(central_differences(img), affine, frame)
            grad /= img[..., None]
    grad[~evaluate] = np.nan
    grad = grad.astype(np.float32)
    if csf_md_threshold is not None:
        if md is None:
            raise ValueError("csf_md_threshold needs the mean-diffusivity map md")
        csf = evaluate & ~(np.asarray(md) <= csf_md_threshold)
        excluded["csf"] = int(csf.sum())
        evaluate &= ~csf
    if min_relative_gradient is not None:
        small = evaluate & ~(np.linalg.norm(grad, axis=-1) >= min_relative_gradient)
        excluded["small_gradient"] = int(small.sum())
        evaluate &= ~small
    return GoldStandard(gradient=grad, image=img.astype(np.float32),
                        mask=evaluate, frame=frame, log=log, excluded=excluded)


# ----------------------------------------------------------------------------
# Small vector helpers
# ----------------------------------------------------------------------------
def unit(v: np.ndarray) -> np.ndarray:
    """v / |v| along the last axis (float32); NaN where |v| is 0 or not finite."""
    v = np.asarray(v, dtype=np.float64)
    n = np.sqrt(_dot(v, v))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = v / n[..., None]
    out[~((n > 0) & np.isfinite(n))] = np.nan
    return out.astype(np.float32)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot products along the last axis (einsum: no (..., 3) temporaries)."""
    return np.einsum("...i,...i->...", a, b)


def _sym(p6: np.ndarray) -> np.ndarray:
    """(n, 6) [xx yy zz xy xz yz] -> (n, 3, 3) symmetric."""
    xx, yy, zz, xy, xz, yz = (p6[:, k] for k in range(6))
    return np.stack([np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1),
                     np.stack([xz, yz, zz], -1)], -2)


def _solve_multi(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Batched A^-1 B for (n, k, k) A and (n, k, m) B, exact (no ridge: used
    for projections whose residuals must vanish to round-off); NaN where a
    system is not finite or singular."""
    out = np.full(B.shape, np.nan)
    ok = np.isfinite(A).all(axis=(1, 2)) & np.isfinite(B).all(axis=(1, 2))
    ok[ok] = np.linalg.cond(A[ok]) < 1e12
    if ok.any():
        out[ok] = np.linalg.solve(A[ok], B[ok])
    return out


def _outer6(U: np.ndarray) -> np.ndarray:
    """(M, 6) rows [ux^2, uy^2, uz^2, 2 ux uy, 2 ux uz, 2 uy uz]: u^T N u = row . N6
    for N6 = [Nxx Nyy Nzz Nxy Nxz Nyz]."""
    return np.stack([U[:, 0] ** 2, U[:, 1] ** 2, U[:, 2] ** 2, 2 * U[:, 0] * U[:, 1],
                     2 * U[:, 0] * U[:, 2], 2 * U[:, 1] * U[:, 2]], axis=1)


#: (k, l) of the packed upper triangle of a 6x6 normal matrix.
_TRIU6 = tuple(zip(*np.triu_indices(6)))


def _unpack21(p: np.ndarray) -> np.ndarray:
    """(n, 21) packed upper triangles -> (n, 6, 6) symmetric."""
    out = np.empty(p.shape[:1] + (6, 6))
    for m, (k, l) in enumerate(_TRIU6):
        out[:, k, l] = out[:, l, k] = p[:, m]
    return out


def _inv_sym3(D: np.ndarray) -> np.ndarray:
    """Inverse of symmetric (n, 3, 3) matrices by the adjugate (vectorised);
    NaN/inf rows where singular."""
    a, b, c = D[:, 0, 0], D[:, 1, 1], D[:, 2, 2]
    d, e, f = D[:, 0, 1], D[:, 0, 2], D[:, 1, 2]
    A00, A11, A22 = b * c - f * f, a * c - e * e, a * b - d * d
    A01, A02, A12 = e * f - d * c, d * f - e * b, d * e - a * f
    det = a * A00 + d * A01 + e * A02
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = 1.0 / det
    return np.stack([np.stack([A00, A01, A02], -1), np.stack([A01, A11, A12], -1),
                     np.stack([A02, A12, A22], -1)], -2) * inv[:, None, None]


def _quadratic(D: np.ndarray, U: np.ndarray) -> np.ndarray:
    """u_m^T D_n u_m (n, M) for tensors (n, 3, 3) and unit vectors (M, 3)."""
    p = np.stack([D[:, 0, 0], D[:, 1, 1], D[:, 2, 2], 2 * D[:, 0, 1], 2 * D[:, 0, 2],
                  2 * D[:, 1, 2]], axis=1)
    uu = np.stack([U[:, 0] ** 2, U[:, 1] ** 2, U[:, 2] ** 2, U[:, 0] * U[:, 1],
                   U[:, 0] * U[:, 2], U[:, 1] * U[:, 2]], axis=1)
    return p @ uu.T


def _bilinear(D: np.ndarray, g: np.ndarray, U: np.ndarray) -> np.ndarray:
    """u_m^T D_n g_n (n, M): (D g) . u, one small matmul."""
    return np.matmul(D, g[:, :, None])[..., 0] @ U.T


def _principal(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (n, 3) descending and the eigenvector of the largest (n, 3)
    of symmetric (n, 3, 3); NaN rows where M is not finite."""
    ok = np.isfinite(M).all(axis=(1, 2))
    vals = np.full(M.shape[:1] + (3,), np.nan)
    vec = np.full(M.shape[:1] + (3,), np.nan)
    if ok.any():
        w, v = np.linalg.eigh(M[ok])
        vals[ok] = w[:, ::-1]
        vec[ok] = v[:, :, -1]
    return vals, vec


def _rank_one_fraction(vals: np.ndarray) -> np.ndarray:
    """lambda_1 / sum |lambda|: 1 for a positive rank-1 matrix (the models'
    prediction), about 1/3 or less for a noise-dominated one."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return vals[:, 0] / np.abs(vals).sum(axis=1)


def _solve_ridge(A: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Batched solve of (n, k, k) systems with a relative ridge (see RIDGE);
    non-finite systems give NaN."""
    n, k = A.shape[:2]
    out = np.full((n, k), np.nan)
    ok = np.isfinite(A).all(axis=(1, 2)) & np.isfinite(rhs).all(axis=1)
    if ok.any():
        Ak = A[ok]
        tr = np.trace(Ak, axis1=1, axis2=2) / k
        Ak = Ak + (RIDGE * np.where(tr > 0, tr, 1.0))[:, None, None] * np.eye(k)
        out[ok] = np.linalg.solve(Ak, rhs[ok][..., None])[..., 0]
    return out


# ----------------------------------------------------------------------------
# Chunked access to voxels
# ----------------------------------------------------------------------------
def _voxel_index(data: np.ndarray, mask: np.ndarray | None) -> tuple:
    """(flat view (V, N) of ``data`` in storage order, row of each mask voxel
    in that view, the same voxels as C-order flat indices, grid)."""
    data = np.asanyarray(data)
    grid = data.shape[:-1]
    if mask is None:
        mask = np.ones(grid, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != grid:
        raise ValueError(f"mask shape {mask.shape} differs from the data grid {grid}")
    flat, rows, order = storage_rows(data, mask)
    if order == "C":
        cidx = rows
    else:
        cidx = np.ravel_multi_index(np.unravel_index(rows, grid, order="F"), grid)
    return flat, rows, cidx, grid


def _rows_of(data: np.ndarray, cidx: np.ndarray) -> np.ndarray:
    """Rows (n, N) of ``data`` for C-order flat voxel indices (any storage)."""
    grid = data.shape[:-1]
    flat, order = (data.reshape(-1, data.shape[-1]), "C") if (
        data.flags.c_contiguous or not data.flags.f_contiguous) else (
        data.reshape(-1, data.shape[-1], order="F"), "F")
    if order == "C":
        return flat[cidx]
    return flat[np.ravel_multi_index(np.unravel_index(cidx, grid), grid, order="F")]


# ----------------------------------------------------------------------------
# Estimator results
# ----------------------------------------------------------------------------
@dataclass
class GradientFit:
    """Per-voxel estimate on the data grid.

    ``axis`` (..., 3) float32 unit axis (NaN outside the mask and where the
    fit failed; sign meaningful only for P), ``gradient`` (..., 3) the
    estimated g (1/mm) where the model gives a magnitude, ``quality`` (...)
    the estimator's quality figure (``quality_name`` says which), ``failed``.
    """

    axis: np.ndarray
    gradient: np.ndarray
    quality: np.ndarray
    failed: np.ndarray
    mask: np.ndarray
    estimator: str
    quality_name: str

    @property
    def n_failed(self) -> int:
        return int(np.count_nonzero(self.failed & self.mask))


def _empty_fit(grid, mask, name, qname) -> GradientFit:
    return GradientFit(axis=np.full(grid + (3,), np.nan, np.float32),
                       gradient=np.full(grid + (3,), np.nan, np.float32),
                       quality=np.full(grid, np.nan, np.float32),
                       failed=np.zeros(grid, bool), mask=mask, estimator=name,
                       quality_name=qname)


def _store(fit: GradientFit, cidx: np.ndarray, axis: np.ndarray, grad: np.ndarray,
           quality: np.ndarray) -> None:
    ax = unit(axis)
    bad = ~np.isfinite(ax).all(axis=1)
    fit.axis.reshape(-1, 3)[cidx] = ax
    fit.gradient.reshape(-1, 3)[cidx] = grad
    fit.quality.reshape(-1)[cidx] = quality
    fit.failed.reshape(-1)[cidx] = bad


def _run_chunks(data, data2, mask, name: str, quality_name: str, chunk: int, n_threads: int,
                per_chunk, rng: np.random.Generator | None = None) -> GradientFit:
    """Apply ``per_chunk(rows, rows2, chunk_rng) -> (axis, gradient, quality)``
    to the mask voxels of ``data`` (and the same voxels of ``data2``) chunk
    by chunk, on ``n_threads`` worker threads (single-threaded BLAS each;
    chunks write disjoint voxels), and collect a :class:`GradientFit`.
    Each chunk gets its own generator seeded from ``rng`` in chunk order,
    so results do not depend on the thread schedule."""
    flat, rows, cidx, grid = _voxel_index(data, mask)
    out = _empty_fit(grid, np.asarray(mask, bool) if mask is not None
                     else np.ones(grid, bool), name, quality_name)
    starts = list(range(0, rows.size, chunk))
    seeds = rng.integers(0, 2 ** 63, size=len(starts)) if rng is not None else [None] * len(starts)

    def work(k):
        sel = slice(starts[k], starts[k] + chunk)
        r2 = None if data2 is None else _rows_of(data2, cidx[sel])
        chunk_rng = None if seeds[k] is None else np.random.default_rng(int(seeds[k]))
        with np.errstate(all="ignore"):
            _store(out, cidx[sel], *per_chunk(flat[rows[sel]], r2, chunk_rng))

    map_chunks(work, range(len(starts)), n_threads)
    return out


class _TensorPart:
    """The gradient-free tensor fit an estimator builds on (dti.TensorModel
    on the chosen volumes), with S0 and D per row in float64, mm^2/s."""

    def __init__(self, gtab: GradientTable, max_bval: float | None):
        self.gtab = gtab
        if max_bval is None:
            self.volumes = np.arange(len(gtab))
        else:
            self.volumes = gtab.select_shells(dti_shells(gtab, max_bval), keep_b0=True)
        self.model = TensorModel(gtab.select(self.volumes), fit_method="WLS", n_threads=1)
        self.max_bval = max_bval

    def fit_rows(self, mag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(S0 (n,), D (n, 3, 3) mm^2/s); NaN for voxels whose fit is not
        finite or has no signal (S0 <= ``NO_SIGNAL_S0``). A tensor that is not
        positive definite (noise) is kept: every method is then evaluated on
        the same voxels, and the estimators only need D to be invertible."""
        params = self.model.fit_params(np.ascontiguousarray(mag[:, self.volumes],
                                                            dtype=np.float32))
        p = params.astype(np.float64)
        D = _sym(p[:6].T) * 1e-3                       # um^2/ms -> mm^2/s
        with np.errstate(over="ignore"):
            s0 = np.exp(p[6])
        ok = np.isfinite(p).all(axis=0) & np.isfinite(s0) & (s0 > NO_SIGNAL_S0)
        s0[~ok] = np.nan
        D[~ok] = np.nan
        return s0, D

    def predict(self, s0: np.ndarray, D: np.ndarray) -> np.ndarray:
        """Noise-free gradient-free signal (n, N) of the own gradient table."""
        return tensor_signal(s0, D, self.gtab)


def tensor_signal(s0, D, gtab: GradientTable) -> np.ndarray:
    """Gradient-free (Gaussian) signal S0 exp(-b u^T D u), (n, N) float64, for
    ``s0`` (n,) and tensors ``D`` (n, 3, 3) in mm^2/s."""
    s0, D, _ = _as_batch(s0, D, np.zeros(3))
    return s0[:, None] * np.exp(-gtab.bvals[None, :] * _quadratic(D, gtab.bvecs))


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator,
           complex_output: bool = False) -> np.ndarray:
    """Real ``signal`` plus complex Gaussian noise of SD ``sigma`` per channel,
    float32: the magnitude (Rician) or, with ``complex_output``, the complex
    value (complex64)."""
    f32 = np.float32
    re = rng.standard_normal(signal.shape, dtype=f32)
    re *= f32(sigma)
    re += signal
    im = rng.standard_normal(signal.shape, dtype=f32)
    im *= f32(sigma)
    if complex_output:
        return re + 1j * im
    return np.hypot(re, im, out=re)


class _Model:
    """Common part of the one-series estimators: chunked fit and surrogate."""

    name = ""
    quality_name = ""
    complex_input = False

    def __init__(self, gtab: GradientTable, timing: SequenceTiming, coupling: float,
                 max_bval: float | None, chunk_size: int, n_threads: int | None = None):
        if not isinstance(timing, SequenceTiming):
            raise TypeError("timing must be a SequenceTiming")
        self.n_threads = available_threads() if n_threads is None else max(1, int(n_threads))
        self.gtab = gtab
        self.timing = timing
        self.coupling = float(coupling)
        self.chunk_size = int(chunk_size)
        self.tensor = _TensorPart(gtab, max_bval)
        dw = ~gtab.b0s_mask
        if dw.sum() < 6:
            raise ValueError("the gradient table needs >= 6 diffusion-weighted volumes")
        self.dw = np.flatnonzero(dw)
        # c_q = 2 a Delta |q| (s/mm), so that a q^T (2 Delta D) g = c_q u_q^T D g
        self.c = 2.0 * self.coupling * timing.encoding_length(gtab.bvals)

    @property
    def parameters(self) -> dict:
        return {"estimator": self.name, "coupling": self.coupling,
                "Delta_ms": self.timing.Delta, "delta_ms": self.timing.delta,
                "TE_ms": self.timing.TE, "diffusion_time_s": self.timing.diffusion_time,
                "tensor_max_bval": self.tensor.max_bval, "quality": self.quality_name}

    def _check(self, data, magnitude_ok: bool = False):
        data = np.asanyarray(data)
        if data.shape[-1] != len(self.gtab):
            raise ValueError(f"data has {data.shape[-1]} volumes, the gradient table "
                             f"{len(self.gtab)}")
        if np.iscomplexobj(data) and not self.complex_input:
            raise ValueError(f"estimator {self.name} works on magnitude data")
        if self.complex_input and not np.iscomplexobj(data) and not magnitude_ok:
            raise ValueError(f"estimator {self.name} needs complex data (magnitude and phase)")
        return data

    def fit(self, data, mask=None) -> GradientFit:
        """Fit every voxel of ``data`` (..., N) where ``mask`` is True."""
        data = self._check(data)
        return _run_chunks(data, None, mask, self.name, self.quality_name, self.chunk_size,
                           self.n_threads, lambda r, _, __: self.fit_rows(r))

    def fit_surrogate(self, data, mask, sigma: float, rng: np.random.Generator) -> GradientFit:
        """The surrogate null: each voxel's signal is replaced by its fitted
        gradient-free tensor prediction plus noise of SD ``sigma`` (Rician
        magnitude; complex Gaussian for P), then re-fitted. Only |data| is
        used, so P accepts the magnitude series here."""
        data = self._check(data, magnitude_ok=True)

        def per_chunk(rows, _, chunk_rng):
            s0, D = self.tensor.fit_rows(np.abs(rows))
            sim = rician(self.tensor.predict(s0, D), sigma, chunk_rng, self.complex_input)
            return self.fit_rows(sim)
        return _run_chunks(data, None, mask, self.name + SURROGATE_SUFFIX, self.quality_name,
                           self.chunk_size, self.n_threads, per_chunk, rng)

    def fit_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(axis (n, 3), gradient (n, 3) in 1/mm, quality (n,)) of rows (n, N)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------
# B: published, linearised
# ----------------------------------------------------------------------------
def published_signal(s0, D, g, gtab: GradientTable, timing: SequenceTiming,
                     coupling: float = PUBLISHED_COUPLING) -> np.ndarray:
    """Forward model of B (the published relation), magnitude (n, N):
    |S_q| = S0 E_q sqrt(1 + (a v_q . g)^2), E_q = exp(-b u^T D u),
    v_q = 2 Delta D q (q = sqrt(b / t_d) u), with ``s0`` (n,), ``D`` (n, 3, 3)
    mm^2/s, ``g`` (n, 3) 1/mm."""
    s0, D, g = _as_batch(s0, D, g)
    E = np.exp(-gtab.bvals * _quadratic(D, gtab.bvecs))
    x = 2.0 * coupling * timing.encoding_length(gtab.bvals) * _bilinear(D, g, gtab.bvecs)
    return s0[:, None] * E * np.sqrt(1.0 + x * x)


def _as_batch(s0, D, g):
    D = np.asarray(D, dtype=np.float64).reshape(-1, 3, 3)
    g = np.asarray(g, dtype=np.float64).reshape(-1, 3)
    s0 = np.broadcast_to(np.asarray(s0, dtype=np.float64).reshape(-1), (D.shape[0],))
    return s0, D, g


class PublishedModel(_Model):
    """Estimator B, the published linearised relation.

    A tensor (S0, D) is fitted (WLS, all shells by default, as published);
    per voxel r_q = |S_q|^2 / S0^2 - E_q^2 is regressed on v_q v_q^T with
    v_q = a 2 Delta D q E_q (diffusion-weighted volumes; 6 unknowns of a
    symmetric M, ordinary least squares). Model: M = g g^T; the axis is the
    eigenvector of the largest eigenvalue, |g| = sqrt(lambda_1).
    ``quality`` = lambda_1 / sum|lambda| (1 for an exactly rank-1 positive M).
    ``fit_rows(rows, tensor=(s0, D))`` uses a given tensor instead.
    """

    name = "B"
    quality_name = "rank1_fraction"

    def __init__(self, gtab: GradientTable, timing: SequenceTiming,
                 coupling: float = PUBLISHED_COUPLING, max_bval: float | None = None,
                 chunk_size: int = CHUNK_VOXELS, n_threads: int | None = None):
        super().__init__(gtab, timing, coupling, max_bval, chunk_size, n_threads)
        f32 = np.float32
        u6 = _outer6(gtab.bvecs)                             # (N, 6): u^T N u = u6 . N6
        self._scale = self.c[self.dw].max()
        # alpha_q = c_q / max c on diffusion-weighted volumes, 0 on b0s (they
        # carry no information on M); all volumes are used so that no column
        # gather of the rows is needed
        alpha = np.where(gtab.b0s_mask, 0.0, self.c / self._scale)
        self._alpha = alpha.astype(f32)
        self._u6 = u6.astype(f32)
        self._p21 = np.stack([u6[:, k] * u6[:, l] for k, l in _TRIU6], axis=1).astype(f32)
        # -b u u^T in the packed order of D6 = [xx yy zz xy xz yz] (um^2/ms)
        self._bu6 = (-(gtab.bvals * 1e-3)[:, None] * u6).T.astype(f32)     # (6, N)

    def fit_rows(self, rows, tensor=None):
        """(axis, gradient, quality) of rows (n, N); ``tensor`` = (s0, D in
        mm^2/s) replaces the fitted gradient-free tensor.

        Computed through N = D M D (an invertible linear map of the 6
        unknowns, so the least-squares solution is the same): then
        r_q = (c_q E_q)^2 u_q^T N u_q has a fixed basis u_q u_q^T, and the
        normal equations of all voxels come from two matrix products. The
        (n, N) element-wise work and those products run in float32 (the
        signals are float32; at |g| = 1/mm and b = 3000 the effect is ~1e-3
        of E^2, float32 rounding ~1e-7), the 6x6 solves and the
        eigen-decompositions in float64."""
        f32 = np.float32
        mag = np.abs(rows).astype(f32)
        if tensor is None:
            s0, D = self.tensor.fit_rows(mag)
        else:
            s0, D, _ = _as_batch(tensor[0], tensor[1], np.zeros(3))
        Dp = D * 1e3                                            # um^2/ms: O(1)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            d6 = np.stack([Dp[:, 0, 0], Dp[:, 1, 1], Dp[:, 2, 2], Dp[:, 0, 1], Dp[:, 0, 2],
                           Dp[:, 1, 2]], axis=1).astype(f32)
            E = d6 @ self._bu6
            np.exp(E, out=E)                                     # (n, N)
            r = mag
            r *= (1.0 / s0).astype(f32)[:, None]
            r *= r
            r -= E * E                                           # |S|^2 / S0^2 - E^2
            a2 = E
            a2 *= self._alpha
            a2 *= a2                                             # (alpha E)^2
            r *= a2
            XtX = _unpack21((a2 * a2) @ self._p21)               # (n, 6, 6) float64
            Xtr = (r @ self._u6).astype(np.float64)              # (n, 6)
            n6 = _solve_ridge(XtX, Xtr) / (self._scale * 1e-3) ** 2
            Dinv = _inv_sym3(Dp)
            M = Dinv @ _sym(n6) @ Dinv
        vals, vec = _principal(M)
        mag_g = np.sqrt(np.clip(vals[:, 0], 0.0, None))
        return vec, vec * mag_g[:, None], _rank_one_fraction(vals)


# ----------------------------------------------------------------------------
# A: nonlinear least squares on ln|S|
# ----------------------------------------------------------------------------
def nonlinear_log_signal(s0, D, g, gtab: GradientTable, timing: SequenceTiming,
                         coupling: float = PUBLISHED_COUPLING) -> np.ndarray:
    """Forward model of A, ln|S| (n, N): ln S0 - b u^T D u
    + 1/2 ln(1 + (2 a Delta |q| u^T D g)^2) (the log of the published
    relation; 2 a Delta |q| u^T D g = a q^T (2 Delta D) g)."""
    return np.log(published_signal(s0, D, g, gtab, timing, coupling))


class NonlinearModel(_Model):
    """Estimator A: ln|S_q| = ln S0 - b u^T D u + 1/2 ln(1 + x_q^2),
    x_q = 2 a Delta |q| u_q^T D g, all 10 parameters (ln S0, D, g) by
    weighted nonlinear least squares (weights = squared gradient-free tensor
    prediction relative to S0, as WLS DTI), from several starts.

    Solved by variable projection: with w = D g the model is linear in
    (D, ln S0) for fixed w, so those are eliminated in closed form (per-voxel
    weighted projection onto the tensor design) and damped Gauss-Newton
    (Levenberg-Marquardt, batched over voxels) runs on w alone (3 unknowns);
    then g = D^-1 w. Starts: B's estimate on the same tensor (w = D g_B) and
    the 6 icosahedral axes ``START_AXES`` at the same |w| (from
    ``START_GRADIENT`` where B gives none); the lowest cost wins.
    ``quality`` = 1 - RSS_A / RSS_tensor (weighted; 0 = g explains nothing).
    """

    name = "A"
    quality_name = "rss_reduction"

    def __init__(self, gtab: GradientTable, timing: SequenceTiming,
                 coupling: float = PUBLISHED_COUPLING, max_bval: float | None = None,
                 n_iter: int = LM_ITERATIONS, start_axes: np.ndarray = START_AXES,
                 chunk_size: int = 1024, n_threads: int | None = None):
        super().__init__(gtab, timing, coupling, max_bval, chunk_size, n_threads)
        self.n_iter = int(n_iter)
        self.start_axes = np.asarray(start_axes, dtype=np.float64).reshape(-1, 3)
        self._X = design_matrix(gtab)                    # (N, 7): d6 (um^2/ms), ln S0
        self._cu = (self.c * 1e-3)[:, None] * gtab.bvecs  # x = cu . w, w in um^2/ms/mm
        cu, X = self._cu, self._X
        # fixed right factor of X^T W dh: X_k cu_j, (N, 7 x 3)
        self._xcu = (X[:, :, None] * cu[:, None, :]).reshape(X.shape[0], -1)
        self._published = PublishedModel(gtab, timing, coupling, max_bval, chunk_size, 1)

    def _h(self, w):
        """x = cu . w (n, N), h = 1/2 ln(1 + x^2) and s = dh/dx = x / (1 + x^2)."""
        x = w @ self._cu.T
        return 0.5 * np.log1p(x * x), x / (1.0 + x * x)

    def _project(self, v, wt, Minv):
        """Weighted residual of v (n, N) after the tensor design:
        v - X (X^T W X)^-1 X^T W v, per voxel, through plain matrix products."""
        coef = (Minv @ ((wt * v) @ self._X)[..., None])[..., 0]
        return v - coef @ self._X.T

    def _levenberg_marquardt(self, w, y, wt, Minv):
        """Per-voxel damped Gauss-Newton on w; returns (w, cost).

        The residual is r = P (y - h(w)), P the weighted projection off the
        tensor design, and its Jacobian J = P dh with dh = s cu (s per volume,
        cu fixed): X^T W dh is one plain product with the fixed X_k cu_j, and
        the projection one product with X^T, so no per-voxel (N, 7) matrices
        are formed. Each iteration works on the voxels that have not settled."""
        def residual(w_, y_, wt_, Minv_):
            h, sl = self._h(w_)
            return self._project(y_ - h, wt_, Minv_), sl

        w = w.copy()
        lam = np.full(w.shape[0], LM_DAMPING)
        r, _ = residual(w, y, wt, Minv)
        cost = np.sum(wt * r * r, axis=1)
        act = np.flatnonzero(cost > 0)
        n_x = self._X.shape[1]
        for _ in range(self.n_iter):
            if act.size == 0:
                break
            wa, ya, wta, Ma, la, ca = w[act], y[act], wt[act], Minv[act], lam[act], cost[act]
            r, sl = residual(wa, ya, wta, Ma)
            G = ((wta * sl) @ self._xcu).reshape(-1, n_x, 3)     # X^T W dh
            # projected Jacobian J = dh - X (X^T W X)^-1 X^T W dh, as (n, 3, N)
            # (explicit: the difference form of J^T W J loses precision where
            # the g-term is nearly absorbed by the tensor)
            XG = (Ma @ G).transpose(0, 2, 1).reshape(-1, n_x) @ self._X.T
            Jt = sl[:, None, :] * self._cu.T[None] - XG.reshape(-1, 3, XG.shape[-1])
            JtW = Jt * wta[:, None, :]
            A = np.einsum("nim,njm->nij", JtW, Jt, optimize=True)
            rhs = np.einsum("nim,nm->ni", JtW, r)
            diag = np.diagonal(A, axis1=1, axis2=2)
            step = _solve_ridge(A + la[:, None, None] * np.eye(3) * diag[:, None, :], rhs)
            trial = wa + np.nan_to_num(step)
            rt, _ = residual(trial, ya, wta, Ma)
            new = np.sum(wta * rt * rt, axis=1)
            better = np.isfinite(new) & (new < ca)
            moved = np.linalg.norm(trial - wa, axis=1)
            tiny = moved <= LM_STEP_TOLERANCE * np.linalg.norm(wa, axis=1)
            settled = (la > LM_MAX_DAMPING) | tiny | (better & (ca - new <= LM_TOLERANCE * ca))
            w[act] = np.where(better[:, None], trial, wa)
            cost[act] = np.where(better, new, ca)
            lam[act] = np.where(better, la * 0.3, la * 10.0)
            act = act[~settled & (cost[act] > 0)]
        return w, cost

    def fit_rows(self, rows):
        mag = np.abs(rows).astype(np.float64)
        y = np.log(np.maximum(mag, MIN_SIGNAL))
        s0, D = self.tensor.fit_rows(mag)
        n = mag.shape[0]
        X = self._X
        with np.errstate(all="ignore"):
            wt = (self.tensor.predict(s0, D) / s0[:, None]) ** 2
            ok = np.isfinite(wt).all(axis=1)
            wt = np.where(ok[:, None], wt, 1.0)
            XtWX = np.einsum("nm,mk,ml->nkl", wt, X, X, optimize=True)
            Minv = _solve_multi(XtWX, np.broadcast_to(np.eye(X.shape[1]), XtWX.shape))
            ok &= np.isfinite(Minv).all(axis=(1, 2))
            Minv[~ok] = 0.0
            cost_tensor = np.sum(wt * self._project(y, wt, Minv) ** 2, axis=1)
            _, gB, _ = self._published.fit_rows(mag, tensor=(s0, D))
            wB = np.einsum("nij,nj->ni", D * 1e3, gB)
            size = np.linalg.norm(wB, axis=1)
            fallback = np.linalg.norm(D * 1e3, axis=(1, 2)) / math.sqrt(3) * START_GRADIENT
            size = np.where(np.isfinite(size) & (size > 0), size, fallback)
            axB = unit(wB).astype(np.float64)
            axB = np.where(np.isfinite(axB).all(axis=1, keepdims=True), axB, self.start_axes[0])
            best = np.full(n, np.inf)
            best_w = np.full((n, 3), np.nan)
            for axis in [axB] + [np.broadcast_to(a, (n, 3)) for a in self.start_axes]:
                w, cost = self._levenberg_marquardt(np.nan_to_num(axis * size[:, None]),
                                                    y, wt, Minv)
                pick = ok & (cost < best)
                best = np.where(pick, cost, best)
                best_w[pick] = w[pick]
            # the eliminated linear part at the optimum: D, then g = D^-1 w
            v = y - self._h(np.nan_to_num(best_w))[0]
            p = (Minv @ ((wt * v) @ X)[..., None])[..., 0]
            g = (_inv_sym3(_sym(p[:, :6])) @ best_w[..., None])[..., 0]
            g[~ok] = np.nan
            quality = 1.0 - best / cost_tensor
        return g, g, quality


# ----------------------------------------------------------------------------
# P: phase of complex data
# ----------------------------------------------------------------------------
def phase_signal(s0, D, g, gtab: GradientTable, timing: SequenceTiming,
                 coupling: float = SPIN_ECHO_COUPLING, phase0=0.0) -> np.ndarray:
    """Forward model of P, complex (n, N): S0 E_q exp(i (phase0 + phi_q)),
    phi_q = -a q^T (2 Delta D) g = -2 a Delta |q| u^T D g (exact for Gaussian
    diffusion and ln I affine in space; SCIENCE.md section 7)."""
    s0, D, g = _as_batch(s0, D, g)
    uDu = _quadratic(D, gtab.bvecs)
    c = 2.0 * coupling * timing.encoding_length(gtab.bvals)
    phi = -c * _bilinear(D, g, gtab.bvecs)
    phase0 = np.broadcast_to(np.asarray(phase0, dtype=np.float64).reshape(-1, 1), phi.shape)
    return s0[:, None] * np.exp(-gtab.bvals * uDu) * np.exp(1j * (phase0 + phi))


class PhaseModel(_Model):
    """Estimator P for complex data: phi_q = arg(S_q conj(S_b0)) (phase
    relative to the complex mean of the b0 volumes, which removes the
    background phase) is fitted by weighted least squares as
    phi_q = X_q g, X_q = -2 a Delta |q| (D u_q)^T, weights = predicted
    |S_q|^2 (phase variance ~ sigma^2 / |S|^2); D from a tensor fit of |S|.
    First order and sign-resolved: ``gradient`` is g itself (1/mm).
    ``quality`` = weighted R^2 = 1 - RSS / sum w phi^2.
    """

    name = "P"
    quality_name = "weighted_r2"
    complex_input = True

    def __init__(self, gtab: GradientTable, timing: SequenceTiming,
                 coupling: float = SPIN_ECHO_COUPLING, max_bval: float | None = None,
                 chunk_size: int = CHUNK_VOXELS, n_threads: int | None = None):
        super().__init__(gtab, timing, coupling, max_bval, chunk_size, n_threads)
        self.b0 = np.flatnonzero(gtab.b0s_mask)
        if self.b0.size == 0:
            raise ValueError("estimator P needs b0 volumes (phase reference)")
        u, c2 = gtab.bvecs[self.dw], self.c[self.dw] ** 2
        # c^2 u_i u_j as [xx yy zz xy xz yz] (the order of _sym)
        self._uu = np.stack([u[:, 0] ** 2, u[:, 1] ** 2, u[:, 2] ** 2, u[:, 0] * u[:, 1],
                             u[:, 0] * u[:, 2], u[:, 1] * u[:, 2]], axis=1) * c2[:, None]

    def fit(self, data, mask=None, phase=None) -> GradientFit:
        """Fit complex ``data`` (..., N), or magnitude ``data`` with its
        ``phase`` (radians, same shape; combined chunk by chunk, so no complex
        copy of the series is made)."""
        if phase is None:
            return super().fit(data, mask)
        data, phase = np.asanyarray(data), np.asanyarray(phase)
        if np.iscomplexobj(data) or phase.shape != data.shape:
            raise ValueError(f"with phase=, data must be the real magnitude of the same shape "
                             f"(data {data.shape}, phase {phase.shape})")
        if data.shape[-1] != len(self.gtab):
            raise ValueError(f"data has {data.shape[-1]} volumes, the gradient table "
                             f"{len(self.gtab)}")
        return _run_chunks(data, phase, mask, self.name, self.quality_name, self.chunk_size,
                           self.n_threads,
                           lambda m, ph, _: self.fit_rows(m * np.exp(1j * ph.astype(np.float32))))

    def fit_rows(self, rows):
        """(axis, gradient, quality) of complex rows (n, N). Solved for
        w = D g (phi_q = -c_q u_q . w: a fixed design, normal equations of all
        voxels from two matrix products), then g = D^-1 w (the same weighted
        least-squares solution)."""
        rows = np.asarray(rows)
        s0, D = self.tensor.fit_rows(np.abs(rows))
        dw = self.dw
        ref = rows[:, self.b0].astype(np.complex128).mean(axis=1)
        phi = np.angle(rows[:, dw] * np.conj(ref)[:, None])
        c = self.c[dw]
        with np.errstate(all="ignore"):
            E = np.exp(-self.gtab.bvals[dw] * _quadratic(D, self.gtab.bvecs[dw]))
            wt = np.where(np.isfinite(E), E * E, 0.0)              # |S|^2 / S0^2
            A = _sym(wt @ self._uu)
            wc = wt * c
            rhs = -(wc * phi) @ self.gtab.bvecs[dw]
            w = _solve_ridge(A, rhs)
            rss0 = np.sum(wt * phi * phi, axis=1)
            rss = rss0 - 2 * np.sum(w * rhs, axis=1) + np.einsum("ni,nij,nj->n", w, A, w)
            g = (_inv_sym3(D) @ w[..., None])[..., 0]
            quality = 1.0 - rss / rss0
        return g, g, quality


# ----------------------------------------------------------------------------
# C: two diffusion times
# ----------------------------------------------------------------------------
def two_time_tensors(D, g, times: Sequence[float],
                     coupling: float = SPIN_ECHO_COUPLING) -> list[np.ndarray]:
    """Forward model of C: the apparent tensor at gradient time t (s;
    ``SequenceTiming.gradient_time`` = Delta^2 / t_d),
    D(t) = D - 2 a^2 t (D g)(D g)^T (second-order expansion of the published
    relation: ln|S| ~ -b u^T D u + 2 a^2 b t (u^T D g)^2), for each t."""
    D = np.asarray(D, dtype=np.float64).reshape(-1, 3, 3)
    g = np.asarray(g, dtype=np.float64).reshape(-1, 3)
    w = np.einsum("nij,nj->ni", D, g)
    ww = w[:, :, None] * w[:, None, :]
    return [D - 2.0 * coupling ** 2 * t * ww for t in times]


class TwoTimeModel:
    """Estimator C from two series of the same voxels at gradient times
    t = Delta^2 / t_d, t1 != t2: D(t_short) - D(t_long) = 2 a^2 (t_long - t_short) w w^T with
    w = D g; v = eigenvector of the largest eigenvalue of that difference,
    and g = D(t_short)^-1 w / (1 + 2 a^2 t_short w^T D(t_short)^-1 w)
    (Sherman-Morrison: exactly D^-1 w), |w| = sqrt(lambda_1 / (2 a^2 dt)).
    Tensors: WLS on the b0s and shells up to ``max_bval`` of each series.
    ``quality`` = lambda_1 / sum|lambda| of the difference.
    """

    name = "C"
    quality_name = "rank1_fraction"

    def __init__(self, gtab1: GradientTable, timing1: SequenceTiming, gtab2: GradientTable,
                 timing2: SequenceTiming, coupling: float = SPIN_ECHO_COUPLING,
                 max_bval: float | None = DTI_MAX_BVAL, chunk_size: int = CHUNK_VOXELS,
                 n_threads: int | None = None):
        t1, t2 = timing1.gradient_time, timing2.gradient_time
        if not abs(t1 - t2) > 1e-6:
            raise ValueError(f"estimator C needs two different diffusion times (got {t1:g} "
                             f"and {t2:g} s)")
        self.gtabs = (gtab1, gtab2)
        self.timings = (timing1, timing2)
        self.coupling = float(coupling)
        self.chunk_size = int(chunk_size)
        self.n_threads = available_threads() if n_threads is None else max(1, int(n_threads))
        self.tensors = (_TensorPart(gtab1, max_bval), _TensorPart(gtab2, max_bval))
        self.max_bval = max_bval

    @property
    def parameters(self) -> dict:
        return {"estimator": self.name, "coupling": self.coupling,
                "diffusion_times_s": [t.diffusion_time for t in self.timings],
                "gradient_times_s": [t.gradient_time for t in self.timings],
                "tensor_max_bval": self.max_bval, "quality": self.quality_name}

    def _check(self, data1, data2, mask):
        data1, data2 = np.asanyarray(data1), np.asanyarray(data2)
        for d, gt, k in ((data1, self.gtabs[0], 1), (data2, self.gtabs[1], 2)):
            if d.shape[-1] != len(gt):
                raise ValueError(f"series {k} has {d.shape[-1]} volumes, its gradient table "
                                 f"{len(gt)}")
        if data1.shape[:-1] != data2.shape[:-1]:
            raise ValueError(f"the two series are on different grids {data1.shape[:-1]} "
                             f"and {data2.shape[:-1]}")
        return data1, data2

    def fit_tensors(self, D1, D2):
        """(axis, gradient, quality) from the two fitted tensors (n, 3, 3)."""
        t1, t2 = (t.gradient_time for t in self.timings)
        short, long_ = (D1, D2) if t1 < t2 else (D2, D1)
        ts, dt = min(t1, t2), abs(t2 - t1)
        c = 2.0 * self.coupling ** 2
        vals, v = _principal(short - long_)
        with np.errstate(all="ignore"):
            w = v * np.sqrt(np.clip(vals[:, 0], 0.0, None) / (c * dt))[:, None]
            inv = _inv_sym3(short)                       # NaN/inf rows where singular
            y = (inv @ w[..., None])[..., 0]
            g = y / (1.0 + c * ts * np.sum(w * y, axis=1))[:, None]
            # the axis D^-1 v also where lambda_1 <= 0 (then |g| = 0)
            axis = (inv @ v[..., None])[..., 0]
        return axis, g, _rank_one_fraction(vals)

    def fit_rows(self, rows1, rows2):
        _, D1 = self.tensors[0].fit_rows(np.abs(rows1))
        _, D2 = self.tensors[1].fit_rows(np.abs(rows2))
        return self.fit_tensors(D1, D2)

    def _run(self, data1, data2, mask, name, per_chunk, rng=None):
        data1, data2 = self._check(data1, data2, mask)
        return _run_chunks(data1, data2, mask, name, self.quality_name, self.chunk_size,
                           self.n_threads, per_chunk, rng)

    def fit(self, data1, data2, mask=None) -> GradientFit:
        """Fit the voxels of ``mask`` in the series ``data1`` (gtab1, timing1)
        and ``data2`` (gtab2, timing2), both (..., N_k) on one grid."""
        return self._run(data1, data2, mask, self.name, lambda r1, r2, _: self.fit_rows(r1, r2))

    def fit_surrogate(self, data1, data2, mask, sigma: Sequence[float],
                      rng: np.random.Generator) -> GradientFit:
        """Surrogate null: both series simulated from ONE gradient-free tensor
        per voxel (the mean of the two fits; each series keeps its own S0)
        with Rician noise ``sigma[k]``, then re-fitted."""
        def per_chunk(r1, r2, chunk_rng):
            s01, D1 = self.tensors[0].fit_rows(np.abs(r1))
            s02, D2 = self.tensors[1].fit_rows(np.abs(r2))
            D = 0.5 * (D1 + D2)
            sim1 = rician(self.tensors[0].predict(s01, D), sigma[0], chunk_rng)
            sim2 = rician(self.tensors[1].predict(s02, D), sigma[1], chunk_rng)
            return self.fit_rows(sim1, sim2)
        return self._run(data1, data2, mask, self.name + SURROGATE_SUFFIX, per_chunk, rng)


def make_model(name: str, gtab: GradientTable, timing: SequenceTiming, *,
               second: tuple[GradientTable, SequenceTiming] | None = None, **kw):
    """The estimator ``name`` (one of ``ESTIMATORS``) for an acquisition; C
    needs ``second`` = (gtab, timing) of the series at the other Delta."""
    if name == "B":
        return PublishedModel(gtab, timing, **kw)
    if name == "A":
        return NonlinearModel(gtab, timing, **kw)
    if name == "P":
        return PhaseModel(gtab, timing, **kw)
    if name == "C":
        if second is None:
            raise ValueError("estimator C needs a second series (gtab, timing) at another Delta")
        return TwoTimeModel(gtab, timing, second[0], second[1], **kw)
    raise ValueError(f"unknown estimator {name!r}; choose from {ESTIMATORS}")


# ----------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------
def estimate_sigma(data, gtab: GradientTable, mask=None, chunk: int = 65536) -> float:
    """Noise SD per real channel, pooled over ``mask``.

    With >= 2 b0 volumes: sqrt of the mean over voxels of the sample variance
    of the b0 repeats (complex data: half the variance of the complex values);
    at b0 SNR the Rician bias is negligible, physiological fluctuation
    inflates it slightly. Otherwise: the residual SD of a WLS tensor fit to
    all volumes (RSS / (N - 7)).
    """
    data = np.asanyarray(data)
    flat, rows, _, _ = _voxel_index(data, mask)
    b0 = np.flatnonzero(gtab.b0s_mask)
    acc, n = 0.0, 0
    tensor = None if b0.size >= 2 else _TensorPart(gtab, None)
    for i in range(0, rows.size, chunk):
        r = flat[rows[i:i + chunk]]
        if tensor is None:
            x = r[:, b0].astype(np.complex128 if np.iscomplexobj(r) else np.float64)
            var = np.var(x, axis=1, ddof=1) if not np.iscomplexobj(x) else \
                0.5 * (np.var(x.real, axis=1, ddof=1) + np.var(x.imag, axis=1, ddof=1))
        else:
            mag = np.abs(r).astype(np.float64)
            s0, D = tensor.fit_rows(mag)
            var = np.sum((mag - tensor.predict(s0, D)) ** 2, axis=1) / (mag.shape[1] - 7)
        var = var[np.isfinite(var)]
        acc += float(var.sum())
        n += var.size
    if n == 0:
        raise ValueError("no voxel to estimate the noise from")
    return math.sqrt(acc / n)


# ----------------------------------------------------------------------------
# Controls
# ----------------------------------------------------------------------------
def perpendicular_random_axis(v1: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random unit axis (..., 3) in the plane perpendicular to each V1
    (uniform in that plane: an isotropic Gaussian vector minus its V1 part)."""
    n = unit(v1).astype(np.float64)
    r = rng.standard_normal(n.shape)
    r -= np.sum(r * n, axis=-1, keepdims=True) * n
    return unit(r)


def shuffle_axes(axes: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Voxel-shuffle null: the finite axes inside ``mask`` permuted across
    those voxels (NaN elsewhere), breaking any voxel-wise correspondence."""
    axes = np.asarray(axes)
    out = np.full(axes.shape, np.nan, np.float32)
    idx = np.flatnonzero(np.asarray(mask, bool).ravel() & np.isfinite(axes.reshape(-1, 3)).all(1))
    out.reshape(-1, 3)[idx] = axes.reshape(-1, 3)[idx[rng.permutation(idx.size)]]
    return out


def fa_strata(fa: np.ndarray, mask: np.ndarray,
              edges: Sequence[float] = FA_STRATA_EDGES) -> dict[str, np.ndarray]:
    """``{"all": mask, "fa0.0-0.2": ..., ...}`` bin masks (the last bin
    includes its upper edge)."""
    fa = np.asarray(fa)
    mask = np.asarray(mask, bool)
    out = {"all": mask.copy()}
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        last = k == len(edges) - 2
        sel = mask & (fa >= lo) & ((fa <= hi) if last else (fa < hi))
        out[f"fa{lo:.1f}-{hi:.1f}"] = sel
    return out


@dataclass
class TensorMaps:
    """Gradient-free tensor maps used by the controls and strata (mask only):
    FA, MD (mm^2/s), V1 and E3 (first and third eigenvectors, b-vector frame)
    and the fitted S0 (an alternative gold-standard image)."""

    fa: np.ndarray
    md: np.ndarray
    v1: np.ndarray
    e3: np.ndarray
    s0: np.ndarray | None = None


def tensor_maps(data, gtab: GradientTable, mask, max_bval: float | None = DTI_MAX_BVAL,
                chunk: int = 65536) -> TensorMaps:
    """WLS tensor on the b0s and shells up to ``max_bval``, chunk by chunk
    (no copy of the selected volumes of the 4D array)."""
    data = np.asanyarray(data)
    flat, rows, cidx, grid = _voxel_index(data, mask)
    tensor = _TensorPart(gtab, max_bval)
    fa = np.full(grid, np.nan, np.float32)
    s0 = np.full(grid, np.nan, np.float32)
    md = np.full(grid, np.nan, np.float32)
    v1 = np.full(grid + (3,), np.nan, np.float32)
    e3 = np.full(grid + (3,), np.nan, np.float32)
    for i in range(0, rows.size, chunk):
        c = cidx[i:i + chunk]
        s0_c, D = tensor.fit_rows(np.abs(flat[rows[i:i + chunk]]))
        ok = np.isfinite(D).all(axis=(1, 2))
        vals = np.full((D.shape[0], 3), np.nan)
        vecs = np.full((D.shape[0], 3, 3), np.nan)
        if ok.any():
            w, v = np.linalg.eigh(D[ok])
            vals[ok], vecs[ok] = w[:, ::-1], v[:, :, ::-1]
        fa.reshape(-1)[c] = np.where(ok, fractional_anisotropy(vals), np.nan)
        md.reshape(-1)[c] = mean_diffusivity(vals)
        s0.reshape(-1)[c] = s0_c
        v1.reshape(-1, 3)[c] = vecs[:, :, 0]
        e3.reshape(-1, 3)[c] = vecs[:, :, 2]
    return TensorMaps(fa=fa, md=md, v1=v1, e3=e3, s0=s0)


# ----------------------------------------------------------------------------
# Angles and statistics
# ----------------------------------------------------------------------------
def acute_angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Acute angle (deg, 0..90) between the axes a and b (..., 3), sign-free;
    NaN where either is zero or not finite."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        nn = _dot(a, a) * _dot(b, b)
        c = np.abs(_dot(a, b)) / np.sqrt(nn)
        out = np.degrees(np.arccos(np.minimum(c, 1.0)))
    out[~((nn > 0) & np.isfinite(nn))] = np.nan
    return out.astype(np.float32)


def plane_angle(a: np.ndarray, b: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Acute angle (deg, 0..90) between a and b projected onto the plane
    perpendicular to ``normal`` (V1): the 2D angle, chance 45 deg."""
    n = unit(normal).astype(np.float64)
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    pa = a - _dot(a, n)[..., None] * n
    pb = b - _dot(b, n)[..., None] * n
    return acute_angle(pa, pb)


def masked_map(fn, mask, *maps) -> np.ndarray:
    """``fn`` (e.g. :func:`acute_angle`, :func:`plane_angle`) applied to the
    mask voxels of (X, Y, Z, 3) maps; a float32 (X, Y, Z) map, NaN elsewhere."""
    out = np.full(mask.shape, np.nan, np.float32)
    out[mask] = fn(*(m[mask] for m in maps))
    return out



def one_sample_test(values, chance: float) -> dict:
    """Two-tailed one-sample t-test of ``values`` (finite ones) against
    ``chance`` (scipy.stats.ttest_1samp)."""
    from scipy import stats  # scipy.stats takes seconds to import: cohort tests only
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    res = stats.ttest_1samp(v, chance) if v.size >= 2 else None
    return {"n": int(v.size), "mean": float(v.mean()) if v.size else np.nan,
            "sd": float(v.std(ddof=1)) if v.size >= 2 else np.nan,
            "t": float(res.statistic) if res is not None else np.nan,
            "p": float(res.pvalue) if res is not None else np.nan}


def paired_test(a, b) -> dict:
    """Two-tailed paired t-test of a - b over pairs where both are finite
    (scipy.stats.ttest_rel)."""
    from scipy import stats  # scipy.stats takes seconds to import: cohort tests only
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    res = stats.ttest_rel(a, b) if a.size >= 2 else None
    d = a - b
    return {"n": int(a.size), "mean": float(d.mean()) if d.size else np.nan,
            "sd": float(d.std(ddof=1)) if d.size >= 2 else np.nan,
            "t": float(res.statistic) if res is not None else np.nan,
            "p": float(res.pvalue) if res is not None else np.nan}


#: Columns of the per-subject table.
ROW_COLUMNS = ("subject", "method", "kind", "stratum", "n_voxels", "mean", "median",
               "mean_2d", "median_2d")


def summarise_angles(angles: dict, angles_2d: dict, strata: dict, kinds: dict,
                     subject: str = ""):
    """Tidy per-subject rows (pandas): one per method x stratum with the
    voxel count and the mean and median of the acute and of the 2D angle."""
    import pandas as pd  # pandas: a second to import, for the tables only
    rows = []
    for method, amap in angles.items():
        a2 = angles_2d.get(method)
        for stratum, sel in strata.items():
            v = amap[sel]
            keep = np.isfinite(v)
            v = v[keep].astype(np.float64)
            w = a2[sel][keep].astype(np.float64) if a2 is not None else np.empty(0)
            w = w[np.isfinite(w)]
            rows.append({"subject": subject, "method": method, "kind": kinds.get(method, ""),
                         "stratum": stratum, "n_voxels": int(v.size),
                         "mean": float(v.mean()) if v.size else np.nan,
                         "median": float(np.median(v)) if v.size else np.nan,
                         "mean_2d": float(w.mean()) if w.size else np.nan,
                         "median_2d": float(np.median(w)) if w.size else np.nan})
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


def cohort_tests(rows, statistics: Sequence[str] = ("mean", "median", "mean_2d"),
                 controls: Sequence[str] = (FIBRE_E3, FIBRE_PERP)):
    """Group table from per-subject rows (``summarise_angles`` of many subjects).

    For every method (estimators, nulls and controls side by side) x stratum
    x statistic: a two-tailed one-sample t-test across subjects against the
    chance value (``CHANCE``), and for every non-control method a paired
    t-test against each fibre-only control (same subjects). Columns: method,
    kind, stratum, statistic, test ("chance" or "vs_<control>"), reference
    (chance value or control name), n_subjects, mean (of the statistic, or of
    the paired difference), sd, t, p, cohen_d (effect size: (mean - chance)
    / sd, or mean difference / sd of the differences).
    """
    import pandas as pd  # pandas: a second to import, for the tables only
    out = []
    key = ["method", "stratum"]
    for (method, stratum), grp in rows.groupby(key, sort=False):
        kind = grp["kind"].iloc[0]
        for stat in statistics:
            r = one_sample_test(grp[stat].to_numpy(), CHANCE[stat])
            out.append({"method": method, "kind": kind, "stratum": stratum, "statistic": stat,
                        "test": "chance", "reference": f"{CHANCE[stat]:.4f}",
                        "n_subjects": r["n"], "mean": r["mean"], "sd": r["sd"],
                        "t": r["t"], "p": r["p"],
                        "cohen_d": _effect(r["mean"] - CHANCE[stat], r["sd"])})
            if method in controls:
                continue
            for ctrl in controls:
                cg = rows[(rows["method"] == ctrl) & (rows["stratum"] == stratum)]
                if cg.empty:
                    continue
                both = grp.merge(cg, on="subject", suffixes=("", "_ctrl"))
                r = paired_test(both[stat].to_numpy(), both[stat + "_ctrl"].to_numpy())
                out.append({"method": method, "kind": kind, "stratum": stratum,
                            "statistic": stat, "test": f"vs_{ctrl}", "reference": ctrl,
                            "n_subjects": r["n"], "mean": r["mean"], "sd": r["sd"],
                            "t": r["t"], "p": r["p"], "cohen_d": _effect(r["mean"], r["sd"])})
    return pd.DataFrame(out, columns=["method", "kind", "stratum", "statistic", "test",
                                      "reference", "n_subjects", "mean", "sd", "t", "p",
                                      "cohen_d"])


def _effect(diff: float, sd: float) -> float:
    """Cohen's d = diff / sd (NaN when sd is 0 or undefined)."""
    return float(diff / sd) if np.isfinite(sd) and sd > 0 else float("nan")


# ----------------------------------------------------------------------------
# One subject
# ----------------------------------------------------------------------------
@dataclass
class SubjectEvaluation:
    """Everything :func:`evaluate_subject` computed for one subject.

    ``angles`` / ``angles_2d``: method -> (X, Y, Z) float32 acute / 2D angle
    maps in degrees (NaN outside ``mask``); ``axes``: method -> (X, Y, Z, 3)
    axes compared with the gold standard; ``fits``: estimator -> GradientFit
    (surrogates under ``<name>_surrogate``); ``rows``: the tidy table
    (``ROW_COLUMNS``); ``strata``: stratum -> mask; ``kinds``: method ->
    "estimator" / "null" / "control".
    """

    subject: str
    gold: GoldStandard
    tensor: TensorMaps
    mask: np.ndarray
    angles: dict
    angles_2d: dict
    axes: dict
    fits: dict
    strata: dict
    kinds: dict
    rows: object
    sigma: float
    parameters: dict


def evaluate_subject(dwi, timing: SequenceTiming, estimators: Sequence[str] = ("B",), *,
                     subject: str = "", rng: int | np.random.Generator | None = 0,
                     phase: np.ndarray | None = None, second=None,
                     second_timing: SequenceTiming | None = None,
                     log_gold: bool = False, gold_image: str = "mean_b0",
                     exclude_csf: bool = False,
                     min_relative_gradient: float | None = None,
                     shuffle: bool = True, surrogate: bool = True,
                     max_voxels: int | None = None, sigma: float | None = None,
                     fa_edges: Sequence[float] = FA_STRATA_EDGES,
                     model_kw: dict | None = None) -> SubjectEvaluation:
    """Gold standard, estimators, controls and strata for one subject.

    ``dwi``: an :class:`io.DWI` (magnitude, FSL-frame b-vectors, brain mask).
    ``gold_image``: "mean_b0" (the published protocol) or "s0" (the fitted
    tensor S0: less noisy, same contrast).
    ``phase`` (radians, the shape of ``dwi.data``) enables P; ``second`` (a
    DWI of the same grid at another Delta, ``second_timing``) enables C.
    Evaluation voxels: the gold-standard mask (eroded brain mask, optional
    CSF (MD > ``CSF_MD_THRESHOLD``) and small-|g| exclusions) where the
    tensor fit succeeded; ``max_voxels`` draws a seeded random subset (for
    the slow A). Every estimator gets its voxel-shuffle and surrogate nulls;
    the fibre-only controls are the DTI third eigenvector and a seeded random
    axis perpendicular to V1. ``model_kw``: estimator name -> keyword args.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimator(s) {unknown}; choose from {ESTIMATORS}")
    if "P" in estimators and phase is None:
        raise ValueError("estimator P needs the phase of the series (phase=...)")
    if "C" in estimators and (second is None or second_timing is None):
        raise ValueError("estimator C needs second=DWI and second_timing=SequenceTiming")
    if phase is not None and np.shape(phase) != dwi.data.shape:
        raise ValueError(f"phase shape {np.shape(phase)} differs from the DWI {dwi.data.shape}")
    if second is not None and second.data.shape[:3] != dwi.data.shape[:3]:
        raise ValueError(f"second series grid {second.data.shape[:3]} differs from "
                         f"{dwi.data.shape[:3]}")
    model_kw = dict(model_kw or {})
    tmaps = tensor_maps(dwi.data, dwi.gtab, dwi.mask)
    if gold_image not in GOLD_IMAGES:
        raise ValueError(f"gold_image must be one of {GOLD_IMAGES}, not {gold_image!r}")
    image = mean_b0_map(dwi.data, dwi.gtab) if gold_image == "mean_b0" else \
        np.where(dwi.mask, np.nan_to_num(tmaps.s0), 0.0)
    gold = gold_standard(image, dwi.affine, dwi.mask, frame="fsl",
                         log=log_gold, md=tmaps.md,
                         csf_md_threshold=CSF_MD_THRESHOLD if exclude_csf else None,
                         min_relative_gradient=min_relative_gradient)
    mask = gold.mask & np.isfinite(tmaps.fa) & np.isfinite(tmaps.v1).all(-1)
    if max_voxels is not None and mask.sum() > max_voxels:
        idx = np.flatnonzero(mask.ravel())
        keep = np.sort(rng.choice(idx, size=int(max_voxels), replace=False))
        mask = np.zeros_like(mask)
        mask.ravel()[keep] = True
    if not mask.any():
        raise InputError(dwi.paths.get("dwi"), "no voxel left to evaluate (mask eroded to "
                                               "nothing or all voxels excluded)")
    if sigma is None:
        sigma = estimate_sigma(dwi.data, dwi.gtab, dwi.mask)
    axes, fits, kinds = {}, {}, {}
    for name in estimators:
        kw = model_kw.get(name, {})
        if name == "C":
            model = make_model("C", dwi.gtab, timing, second=(second.gtab, second_timing), **kw)
            fit = model.fit(dwi.data, second.data, mask)
        elif name == "P":
            model = make_model("P", dwi.gtab, timing, **kw)
            fit = model.fit(dwi.data, mask, phase=phase)
        else:
            model = make_model(name, dwi.gtab, timing, **kw)
            fit = model.fit(dwi.data, mask)
        fits[name] = fit
        axes[name], kinds[name] = fit.axis, "estimator"
        if shuffle:
            axes[name + SHUFFLE_SUFFIX] = shuffle_axes(fit.axis, mask, rng)
            kinds[name + SHUFFLE_SUFFIX] = "null"
        if surrogate:
            if name == "C":
                s2 = estimate_sigma(second.data, second.gtab, second.mask)
                sfit = model.fit_surrogate(dwi.data, second.data, mask, (sigma, s2), rng)
            elif name == "P":
                sfit = model.fit_surrogate(dwi.data, mask, sigma, rng)
            else:
                sfit = model.fit_surrogate(dwi.data, mask, sigma, rng)
            fits[sfit.estimator] = sfit
            axes[sfit.estimator], kinds[sfit.estimator] = sfit.axis, "null"
    axes[FIBRE_E3], kinds[FIBRE_E3] = tmaps.e3, "control"
    perp = np.full(mask.shape + (3,), np.nan, np.float32)
    perp[mask] = perpendicular_random_axis(tmaps.v1[mask], rng)
    axes[FIBRE_PERP], kinds[FIBRE_PERP] = perp, "control"
    angles = {k: masked_map(acute_angle, mask, a, gold.gradient) for k, a in axes.items()}
    angles_2d = {k: masked_map(plane_angle, mask, a, gold.gradient, tmaps.v1)
                 for k, a in axes.items()}
    strata = fa_strata(tmaps.fa, mask, fa_edges)
    rows = summarise_angles(angles, angles_2d, strata, kinds, subject)
    params = {"estimators": list(estimators), "sigma": sigma, "log_gold": log_gold,
              "gold_image": gold_image,
              "exclude_csf": exclude_csf, "csf_md_threshold": CSF_MD_THRESHOLD,
              "min_relative_gradient": min_relative_gradient, "max_voxels": max_voxels,
              "fa_edges": list(fa_edges), "gold_excluded": gold.excluded,
              "n_voxels": int(mask.sum()), "frame": "fsl-image",
              "timing": {"Delta_ms": timing.Delta, "delta_ms": timing.delta, "TE_ms": timing.TE}}
    return SubjectEvaluation(subject=subject, gold=gold, tensor=tmaps, mask=mask,
                             angles=angles, angles_2d=angles_2d, axes=axes, fits=fits,
                             strata=strata, kinds=kinds, rows=rows, sigma=float(sigma),
                             parameters=params)
