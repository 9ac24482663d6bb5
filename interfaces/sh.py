"""Spherical harmonics (SH) of the diffusion signal, per shell, and RISH features.

Numerics only (no pydra). DIPY reconst style: :class:`SHModel` is built from
the acquisition, ``SHModel.fit(data, mask)`` returns an :class:`SHFit` with
``coeffs``, ``rish()`` and ``predict()``. :func:`fit_shells` fits every shell
of a :class:`~dmriflow.interfaces.io.DWI` in chunks of mask voxels.

Basis convention (MRtrix3's, = dipy ``tournier07`` with ``legacy=False``)
--------------------------------------------------------------------------
Real, symmetric (even ``l`` only), orthonormal on the unit sphere
(``integral Y_lm Y_l'm' dOmega = delta_ll' delta_mm'``), so coefficients from
:func:`sh_basis` compare one-to-one with ``amp2sh`` output.

* Index ordering: ``l = 0, 2, ..., lmax``; within each ``l``, ``m = -l..l``;
  coefficient ``(l, m)`` sits at index ``l (l + 1) / 2 + m``; there are
  ``(lmax + 1)(lmax + 2) / 2`` coefficients (1, 6, 15, 28, 45 for lmax
  0, 2, 4, 6, 8).
* With ``N_lm = sqrt((2l+1)/(4 pi) (l-m)!/(l+m)!)`` and ``P_l^m`` the
  associated Legendre function *without* the Condon-Shortley phase::

      Y_l0  = N_l0 P_l(cos theta)
      Y_lm  = sqrt(2) (-1)^m N_lm P_l^m(cos theta) cos(m phi)        m > 0
      Y_lm  = sqrt(2) (-1)^m N_l|m| P_l^|m|(cos theta) sin(|m| phi)  m < 0

  i.e. ``sqrt(2) Re(Y_l^m)`` for m > 0 and ``sqrt(2) Im(Y_l^|m|)`` for m < 0
  with the complex ``Y_l^m`` *including* the Condon-Shortley phase (scipy's).
* Angles: ``theta = arccos(z)`` (polar, from +z), ``phi = atan2(y, x)``
  (azimuth, from +x towards +y) of the unit b-vector ``(x, y, z)`` as stored
  in the gradient table, i.e. in the **FSL image frame** (voxel axes, x
  flipped for a positive affine determinant; see
  :mod:`dmriflow.interfaces.gradients`). MRtrix3 evaluates the same functions
  on *scanner-frame* (RAS+) directions, so its coefficients equal ours
  computed on ``gtab.to_world(affine)``; RISH features are identical in
  either frame (they are rotation invariant).

RISH feature of order l: ``R_l = sum_m c_lm^2`` (no 1/(4 pi); MRtrix3's
``sh2power -spectrum`` reports ``R_l / (4 pi)``).

Normalisation: the shell signal is divided by the voxel's mean b0. MRtrix3
3.0.3 ``amp2sh -normalise`` divides by ``(1 + sum b0) / n_b0`` instead (its
sum starts at 1), so its coefficients are ours times ``s0 / (s0 + 1/n_b0)``:
~1e-4 relative at brain b0 levels, more where b0 is small. The tests and the
benchmark undo that factor and then agree with it to ~1e-7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .gradients import ZERO_NORM, GradientTable
from .io import DWI

#: Highest SH order fitted by default: order 8 is the RISH range of the
#: harmonisation literature; higher orders of a b<=3000 signal are mostly noise.
MAX_SH_ORDER = 8
#: Bytes of float32 signal rows per chunk of mask voxels in :func:`fit_shells`
#: and :meth:`SHModel.fit` (unless ``chunk_size`` is given): ~14,500 voxels of
#: an HCP series (288 volumes), ~43,700 of a 96-volume one: per-chunk Python
#: overhead is negligible and the working memory stays bounded (rows plus
#: their coefficients, tens of MB) whatever the volume count.
CHUNK_BYTES = 16 * 2**20
#: Default Laplace-Beltrami weight (plain least squares, as ``amp2sh``).
DEFAULT_LB_LAMBDA = 0.0


# ----------------------------------------------------------------------------
# Basis
# ----------------------------------------------------------------------------
def n_coeffs(lmax: int) -> int:
    """Number of coefficients of the even real basis up to order ``lmax``."""
    lmax = check_lmax(lmax)
    return (lmax + 1) * (lmax + 2) // 2


def max_order_for(n_dirs: int, cap: int = MAX_SH_ORDER) -> int:
    """Largest even order L with ``n_coeffs(L) <= n_dirs``, at most ``cap``.

    The same rule as ``amp2sh``'s default lmax (least squares needs at least
    as many directions as coefficients): 30 dirs -> 6 (28 coefficients),
    90 -> 8 (45, capped), 12 -> 2 (15 > 12), 5 -> 0.
    """
    n_dirs = int(n_dirs)
    if n_dirs < 1:
        raise ValueError(f"need at least one direction to fit SH, got {n_dirs}")
    cap = check_lmax(cap)
    lmax = 0
    while lmax + 2 <= cap and n_coeffs(lmax + 2) <= n_dirs:
        lmax += 2
    return lmax


def sh_indices(lmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(l, m) of each coefficient, in storage order (int arrays)."""
    lmax = check_lmax(lmax)
    ls = np.concatenate([np.full(2 * l + 1, l) for l in range(0, lmax + 1, 2)])
    ms = np.concatenate([np.arange(-l, l + 1) for l in range(0, lmax + 1, 2)])
    return ls, ms


def order_of_coeff(lmax: int) -> np.ndarray:
    """SH order l of each coefficient (``(n_coef,)`` int), e.g. 0,2,2,2,2,2,4..."""
    return sh_indices(lmax)[0]


def check_lmax(lmax) -> int:
    if int(lmax) != lmax or lmax < 0 or lmax % 2:
        raise ValueError(f"SH order must be a non-negative even integer, got {lmax!r}")
    return int(lmax)


def _unit_directions(bvecs) -> np.ndarray:
    v = np.asarray(bvecs, dtype=np.float64).reshape(-1, 3)
    norms = np.linalg.norm(v, axis=1)
    bad = np.flatnonzero(norms < ZERO_NORM)
    if bad.size:
        raise ValueError(f"zero-length direction(s) at index {bad[:8].tolist()}: "
                         f"SH need diffusion-weighted directions only (drop b0 volumes)")
    return v / norms[:, None]


def sh_basis(bvecs, lmax: int) -> np.ndarray:
    """``(N, n_coef)`` float64 basis matrix at the directions ``bvecs`` (N, 3).

    Directions are normalised to unit length; see the module docstring for
    the convention. Computed with the stable normalised Legendre recursion
    (no factorials), accurate to ~1e-14 for any order used here.
    """
    lmax = check_lmax(lmax)
    v = _unit_directions(bvecs)
    x, y, z = v.T
    cos_t = np.clip(z, -1.0, 1.0)
    sin_t = np.hypot(x, y)
    phi = np.arctan2(y, x)
    out = np.empty((v.shape[0], n_coeffs(lmax)))
    # pbar[l][m] = N_lm P_l^m(cos theta) (no Condon-Shortley phase), by columns m.
    p_mm = np.full_like(cos_t, math.sqrt(1.0 / (4.0 * math.pi)))
    for m in range(0, lmax + 1):
        if m > 0:
            p_mm = p_mm * math.sqrt((2.0 * m + 1.0) / (2.0 * m)) * sin_t
        p_prev2, p_prev = None, p_mm
        col = {m: p_mm}
        if m + 1 <= lmax:
            p_next = math.sqrt(2.0 * m + 3.0) * cos_t * p_mm
            col[m + 1] = p_next
            p_prev2, p_prev = p_mm, p_next
        for l in range(m + 2, lmax + 1):
            a = math.sqrt((4.0 * l * l - 1.0) / (l * l - m * m))
            b = math.sqrt(((l - 1.0) ** 2 - m * m) / (4.0 * (l - 1.0) ** 2 - 1.0))
            p_l = a * (cos_t * p_prev - b * p_prev2)
            col[l] = p_l
            p_prev2, p_prev = p_prev, p_l
        if m == 0:
            for l in range(0, lmax + 1, 2):
                out[:, l * (l + 1) // 2] = col[l]
            continue
        sign = -1.0 if m % 2 else 1.0
        cos_m, sin_m = np.cos(m * phi), np.sin(m * phi)
        for l in range(m + (m % 2), lmax + 1, 2):      # even l >= m
            centre = l * (l + 1) // 2
            scaled = math.sqrt(2.0) * sign * col[l]
            out[:, centre + m] = scaled * cos_m
            out[:, centre - m] = scaled * sin_m
    return out


def lb_penalty(lmax: int) -> np.ndarray:
    """Diagonal of the Laplace-Beltrami penalty, ``l^2 (l + 1)^2`` per coefficient
    (dipy's ``smooth`` convention, so ``lb_lambda`` equals dipy's ``smooth``)."""
    ls = order_of_coeff(lmax).astype(np.float64)
    return (ls * (ls + 1.0)) ** 2


def sh_pinv(basis: np.ndarray, lmax: int, lb_lambda: float = DEFAULT_LB_LAMBDA) -> np.ndarray:
    """``(n_coef, N)`` regularised pseudo-inverse ``(B^T B + lambda L)^-1 B^T``.

    Raises when the directions cannot determine the coefficients (fewer
    directions than coefficients, or a degenerate direction set) without
    regularisation.
    """
    basis = np.asarray(basis, dtype=np.float64)
    n, k = basis.shape
    if lb_lambda < 0:
        raise ValueError(f"lb_lambda must be >= 0, got {lb_lambda}")
    if lb_lambda == 0 and np.linalg.matrix_rank(basis) < k:
        raise ValueError(f"{n} directions cannot determine the {k} SH coefficients of order "
                         f"{lmax} (rank {np.linalg.matrix_rank(basis)}); lower lmax "
                         f"(max_order_for({n}) = {max_order_for(n)}) or regularise")
    gram = basis.T @ basis + lb_lambda * np.diag(lb_penalty(lmax))
    return np.linalg.solve(gram, basis.T)


# ----------------------------------------------------------------------------
# RISH and per-order scaling
# ----------------------------------------------------------------------------
def order_starts(lmax: int) -> np.ndarray:
    """Index of the first coefficient of each even order (for reduceat)."""
    return np.array([n_coeffs(l - 2) if l else 0 for l in range(0, lmax + 1, 2)])


def _rish_rows(c: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(n, n_coef) -> (n, n_orders) float32 sums of squares per order."""
    return np.add.reduceat(np.square(c, dtype=np.float32), starts, axis=1)


def _lmax_of(n_coef: int) -> int:
    lmax = int(round((math.sqrt(8 * n_coef + 1) - 3) / 2))
    if n_coeffs(lmax) != n_coef:
        raise ValueError(f"{n_coef} is not the coefficient count of an even SH series")
    return lmax


def _check_coeffs(coeffs: np.ndarray, lmax: int | None) -> int:
    found = _lmax_of(coeffs.shape[-1])
    if lmax is not None and check_lmax(lmax) != found:
        raise ValueError(f"coefficients have {coeffs.shape[-1]} terms (lmax {found}), "
                         f"not lmax {lmax}")
    return found


def chunk_voxels(n_values: int, chunk_size: int | None) -> int:
    """Voxels per chunk: ``chunk_size`` or CHUNK_BYTES worth of float32 rows."""
    if chunk_size is None:
        return max(1024, CHUNK_BYTES // (4 * max(1, n_values)))
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return int(chunk_size)


def rish(coeffs: np.ndarray, lmax: int | None = None,
         chunk_size: int | None = None) -> np.ndarray:
    """RISH features ``R_l = sum_m c_lm^2``, shape ``(..., lmax/2 + 1)`` float32.

    Rotation invariant and, for an orthonormal basis, independent of the
    direction count. Works through the voxels in chunks (no full-size
    temporary of squared coefficients).
    """
    coeffs = np.asarray(coeffs)
    lmax = _check_coeffs(coeffs, lmax)
    starts = order_starts(lmax)
    flat = coeffs.reshape(-1, coeffs.shape[-1])
    out = np.empty((flat.shape[0], starts.size), dtype=np.float32)
    chunk_size = chunk_voxels(flat.shape[1], chunk_size)
    for i in range(0, flat.shape[0], chunk_size):
        out[i:i + chunk_size] = _rish_rows(flat[i:i + chunk_size], starts)
    return out.reshape(coeffs.shape[:-1] + (starts.size,))


def scale_by_order(coeffs: np.ndarray, lmax: int | None, scales) -> np.ndarray:
    """``c'_lm = s_l c_lm`` (RISH harmonisation); returns a new float32 array.

    ``scales`` holds one factor per even order, shape ``(lmax/2 + 1,)`` or a
    voxel-wise map ``(..., lmax/2 + 1)`` broadcastable against ``coeffs``.
    RISH of the result is ``s_l^2 R_l``.
    """
    coeffs = np.asarray(coeffs)
    lmax = _check_coeffs(coeffs, lmax)
    scales = np.asarray(scales, dtype=np.float32)
    if scales.shape[-1] != lmax // 2 + 1:
        raise ValueError(f"need {lmax // 2 + 1} scales (orders 0..{lmax}), got "
                         f"shape {scales.shape}")
    per_coeff = np.take(scales, order_of_coeff(lmax) // 2, axis=-1)
    return (coeffs.astype(np.float32, copy=False) * per_coeff).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------
# Model and fit
# ----------------------------------------------------------------------------
class _Projector:
    """rows (n, N) float32 -> rows @ W (n, M) float32, numpy or torch."""

    def __init__(self, weights: np.ndarray, device=None):
        self.weights = np.ascontiguousarray(weights, dtype=np.float32)
        self.device = device
        if device is not None:
            import torch  # torch takes seconds to import: only for a device
            self._torch = torch
            self._w = torch.from_numpy(self.weights).to(device)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = rows.astype(np.float32, copy=False)
        if self.device is None:
            return rows @ self.weights
        torch = self._torch
        return (torch.from_numpy(np.ascontiguousarray(rows)).to(self._w.device)
                @ self._w).cpu().numpy()


def _normalise_coeffs(out: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Split projected rows into (coeffs / s0, s0), in place; coefficients of
    voxels whose mean b0 is not positive are set to 0."""
    s0 = out[:, k]
    inv = np.zeros_like(s0)
    np.divide(1.0, s0, out=inv, where=s0 > 0)
    coeffs = out[:, :k]
    coeffs *= inv[:, None]
    return coeffs, s0


@dataclass
class SHFit:
    """SH coefficients (float32, ``(..., n_coef)``) of one shell.

    ``s0`` is the mean b0 that divided the signal (None when not normalised);
    ``mask`` marks the fitted voxels (mask voxels with a positive mean b0 when
    normalised); coefficients elsewhere are 0.
    """

    model: "SHModel"
    coeffs: np.ndarray | None       # None: fitted for the RISH maps only
    mask: np.ndarray | None = None
    s0: np.ndarray | None = None
    _rish: np.ndarray | None = field(default=None, repr=False)

    @property
    def lmax(self) -> int:
        return self.model.lmax

    @property
    def shape(self) -> tuple:
        return (self.coeffs if self.coeffs is not None else self._rish).shape[:-1]

    def rish(self) -> np.ndarray:
        """RISH features ``(..., lmax/2 + 1)`` float32 (computed once)."""
        if self._rish is None:
            self._rish = rish(self.coeffs, self.lmax)
        return self._rish

    def predict(self, bvecs=None, s0=None) -> np.ndarray:
        """Signal on ``bvecs`` (N, 3) (default: the fitted directions), float32.

        Normalised signal when the fit was normalised; pass ``s0`` (an array
        broadcastable to the voxel shape, or ``True`` for the fit's own mean
        b0) to get the un-normalised DWI.
        """
        basis = self.model.basis if bvecs is None else sh_basis(bvecs, self.lmax)
        signal = self.coeffs @ basis.T.astype(np.float32)
        if s0 is True:
            if self.s0 is None:
                raise ValueError("this fit was not normalised; it has no s0")
            s0 = self.s0
        if s0 is not None and s0 is not False:
            signal *= np.asarray(s0, dtype=np.float32)[..., None]
        return signal


class SHModel:
    """Least-squares SH fit of one shell, optionally Laplace-Beltrami regularised.

    ``gtab_or_bvecs``: either a :class:`GradientTable` (data then have
    ``len(gtab)`` volumes; the model uses the volumes of ``shell``, needed
    when there are several, and with ``normalise`` (default) divides them by
    the voxel's mean b0), or directions ``(N, 3)`` (data are amplitudes on
    them, not normalised).
    ``lmax`` defaults to :func:`max_order_for` the direction count.
    The pseudo-inverse is computed once (float64) and applied in float32.
    """

    def __init__(self, gtab_or_bvecs, lmax: int | None = None,
                 lb_lambda: float = DEFAULT_LB_LAMBDA, normalise: bool | None = None,
                 shell: float | None = None):
        if isinstance(gtab_or_bvecs, GradientTable):
            gtab = gtab_or_bvecs
            shells = gtab.shells
            if shell is None:
                if len(shells) != 1:
                    raise ValueError(f"the gradient table has shells {shells}: name one "
                                     f"(shell=...) or use fit_shells")
                shell = shells[0]
            self.n_volumes = len(gtab)
            self.dw_index = gtab.shell_indices(shell)
            self.b0_index = np.flatnonzero(gtab.b0s_mask)
            self.normalise = True if normalise is None else bool(normalise)
            if self.normalise and self.b0_index.size == 0:
                raise ValueError("cannot normalise: the gradient table has no b0 volume")
            self.bval = float(shell)
            bvecs = gtab.bvecs[self.dw_index]
        else:
            if normalise or shell is not None:
                raise ValueError("normalise/shell need a GradientTable")
            bvecs = np.asarray(gtab_or_bvecs, dtype=np.float64).reshape(-1, 3)
            self.n_volumes = bvecs.shape[0]
            self.dw_index = np.arange(self.n_volumes)
            self.b0_index = np.empty(0, dtype=int)
            self.normalise = False
            self.bval = None
        self.bvecs = _unit_directions(bvecs)
        self.lmax = max_order_for(len(self.bvecs)) if lmax is None else check_lmax(lmax)
        self.lb_lambda = float(lb_lambda)
        self.basis = sh_basis(self.bvecs, self.lmax)
        self.pinv = sh_pinv(self.basis, self.lmax, self.lb_lambda)

    @property
    def n_coef(self) -> int:
        return n_coeffs(self.lmax)

    def projection(self) -> np.ndarray:
        """(n_volumes, n_coef [+1]) matrix: row data @ it = coefficients of the
        raw signal (and, when normalising, the mean b0 as the last column)."""
        w = np.zeros((self.n_volumes, self.n_coef + self.normalise))
        w[self.dw_index, :self.n_coef] = self.pinv.T
        if self.normalise:
            w[self.b0_index, self.n_coef] = 1.0 / self.b0_index.size
        return w

    def fit(self, data, mask=None, chunk_size: int | None = None, device=None) -> SHFit:
        """Fit ``data`` (..., n_volumes) inside ``mask`` (...); float32 result.

        One matrix product per chunk of mask voxels; ``device`` (e.g.
        ``"cuda"``) runs the products through torch.
        """
        data = np.asarray(data)
        if data.shape[-1] != self.n_volumes:
            raise ValueError(f"data have {data.shape[-1]} volumes, the model expects "
                             f"{self.n_volumes}")
        vshape = data.shape[:-1]
        grid = vshape if vshape else (1,)
        data = data.reshape(grid + (self.n_volumes,))
        if mask is None:
            mask = np.ones(grid, dtype=bool)
        else:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != vshape:
                raise ValueError(f"mask shape {mask.shape} != data voxel shape {vshape}")
            mask = mask.reshape(grid)
        flat, idx = _mask_rows(data, mask)
        c_idx = np.flatnonzero(mask.ravel())
        k = self.n_coef
        chunk_size = chunk_voxels(self.n_volumes, chunk_size)
        project = _Projector(self.projection(), device)
        coeffs = np.zeros((flat.shape[0], k), dtype=np.float32)
        s0 = np.zeros(flat.shape[0], dtype=np.float32) if self.normalise else None
        for i in range(0, idx.size, chunk_size):
            out = project(flat[idx[i:i + chunk_size]])
            rows = c_idx[i:i + chunk_size]
            if self.normalise:
                out, s0[rows] = _normalise_coeffs(out, k)
            coeffs[rows] = out
        fitted = np.zeros(flat.shape[0], dtype=bool)
        fitted[c_idx] = True
        if s0 is not None:
            fitted &= s0 > 0
            s0 = s0.reshape(vshape)
        return SHFit(self, coeffs.reshape(vshape + (k,)), fitted.reshape(vshape), s0)


def _mask_rows(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n_vox, N) view of ``data`` in its storage order (no copy for C- or
    F-contiguous arrays) and the row of each mask voxel, listed in the order
    of ``data[mask]`` (C order), so ``flat[idx]`` equals ``data[mask]``."""
    n = data.shape[-1]
    if data.flags.f_contiguous and not data.flags.c_contiguous:
        flat = data.reshape(-1, n, order="F")
        idx = np.ravel_multi_index(np.nonzero(mask), mask.shape, order="F")
    else:
        flat = data.reshape(-1, n)
        idx = np.flatnonzero(mask.ravel())
    return flat, idx


# ----------------------------------------------------------------------------
# All shells of a DWI
# ----------------------------------------------------------------------------
def fit_shells(dwi: DWI, lmax: int | dict | None = None, normalise: bool = True,
               lb_lambda: float = DEFAULT_LB_LAMBDA,
               chunk_size: int | None = None, device=None,
               coefficients: bool = True) -> dict[float, SHFit]:
    """SH fit + RISH of every diffusion-weighted shell of ``dwi``, in its mask.

    Per shell (``dwi.gtab.shells``) the signal is divided by the voxel's mean
    b0 (when ``normalise``; voxels whose mean b0 is <= 0 get zero
    coefficients and are left out of ``fit.mask``) and fitted up to ``lmax``
    (an int for all shells, a ``{shell: lmax}`` dict, or None for
    :func:`max_order_for` each shell's direction count).

    The mask voxels are read in chunks through ``dwi.masked_views(chunk)``
    (chunk: ``chunk_size`` voxels, default CHUNK_BYTES of rows; views of a
    series held as mask rows, whose F layout the matrix product reads as it
    is, with the same bits) and all shells (and the mean b0) come out of ONE
    float32 matrix product per chunk, scattered into full-grid float32 maps:
    per shell ``coeffs`` (X, Y, Z, n_coef) and RISH (X, Y, Z, lmax/2 + 1); the
    mean b0 map is shared by all shells as ``fit.s0``. ``coefficients=False``
    keeps only the RISH maps (``fit.coeffs`` None): the full-grid coefficient
    arrays are 2 GB for an HCP subject, and filling them was half of the RISH
    step's time. Those maps are then in the voxel order of the rows (F for
    NIfTI data and mask rows, the same values): each chunk lands in
    consecutive memory and each order's map is written to a file without a
    transposition. With coefficients every map is C-ordered.
    """
    gtab = dwi.gtab
    shells = gtab.shells
    if not shells:
        raise ValueError(f"{dwi.paths.get('dwi', 'DWI')}: no diffusion-weighted shell")
    if normalise and not gtab.b0s_mask.any():
        raise ValueError(f"{dwi.paths.get('dwi', 'DWI')}: cannot normalise without b0 volumes")
    models = {b: SHModel(gtab, lmax.get(b) if isinstance(lmax, dict) else lmax,
                         lb_lambda, normalise=normalise, shell=b) for b in shells}
    # One projection for everything: each shell's pseudo-inverse in its own
    # rows/columns, then (normalising) one column averaging the b0 volumes.
    blocks = [m.projection()[:, :m.n_coef] for m in models.values()]
    if normalise:
        blocks.append(next(iter(models.values())).projection()[:, -1:])
    project = _Projector(np.concatenate(blocks, axis=1), device)
    edges = np.cumsum([0] + [m.n_coef for m in models.values()])
    starts = {b: order_starts(m.lmax) for b, m in models.items()}

    vshape = tuple(dwi.mask.shape)
    n_vox = int(np.prod(vshape))
    order = "C" if coefficients else dwi.voxel_order
    voxels = dwi.masked_index(order)  # the voxel of each row dwi.masked() yields

    def grid(n: int) -> tuple[np.ndarray, np.ndarray]:
        """A zero (X, Y, Z, n) map in ``order`` and its (voxels, n) view."""
        full = np.zeros(vshape + (n,), dtype=np.float32, order=order)
        return full, full.reshape(-1, n, order=order)

    coeffs = {b: grid(m.n_coef) if coefficients else None for b, m in models.items()}
    rishes = {b: grid(s.size) for b, s in starts.items()}
    s0 = np.zeros(n_vox, dtype=np.float32) if normalise else None
    start = 0
    for rows in dwi.masked_views(chunk_voxels(len(gtab), chunk_size)):
        out = project(rows)
        where = voxels[start:start + rows.shape[0]]
        start += rows.shape[0]
        if normalise:
            out, s0_rows = _normalise_coeffs(out, int(edges[-1]))
            s0[where] = s0_rows
        for j, b in enumerate(models):
            c = out[:, edges[j]:edges[j + 1]]
            if coefficients:
                coeffs[b][1][where] = c
            rishes[b][1][where] = _rish_rows(c, starts[b])
    if start != voxels.size:  # dwi.masked and this function must see the same voxels
        raise RuntimeError(f"dwi.masked yielded {start} voxels, the mask has {voxels.size}")
    fitted = np.zeros(n_vox, dtype=bool)
    fitted[voxels] = True
    if normalise:
        fitted &= s0 > 0
        s0 = s0.reshape(vshape, order=order)
    fitted = fitted.reshape(vshape, order=order)
    return {b: SHFit(m, None if coeffs[b] is None else coeffs[b][0], fitted, s0, rishes[b][0])
            for b, m in models.items()}
