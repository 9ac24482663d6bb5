"""Gradient tables: reading bvals/bvecs, b0 policy, shells, bvec conventions.

Frame convention
----------------
On disk (FSL ``bvals``/``bvecs`` and BIDS ``.bval``/``.bvec``, identical
formats) b-vectors are in the *FSL image frame*: the voxel axes of the image,
with the x component flipped when the determinant of the affine's 3x3 part is
positive (radiological storage). dmriflow keeps b-vectors in that frame
internally, so tensor eigenvectors (V1) and SH coefficients are expressed in
it, exactly as FSL and dipy do when given the same files. ``to_world`` maps
them to the scanner (RAS+ world) frame used by MRtrix3.

b-values are in s/mm^2. One b0 threshold and one shell tolerance, below,
are used everywhere and written into every sidecar.
"""

from __future__ import annotations

import codecs
import math
import os
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from .errors import InputError

#: b-values at or below this (s/mm^2) are b0 volumes. HCP stores b0 as 5,
#: Philips writes b~0 volumes at small non-zero b (0.001 ... 10).
B0_THRESHOLD = 50.0
#: Sorted diffusion-weighted b-values further apart than this (s/mm^2) start a
#: new shell. HCP's 990/1985/2990 jitter is ~+-20; dense multi-shell
#: protocols step by >= 250.
SHELL_GAP = 100.0
#: Shells are named by their median b rounded to this step (s/mm^2), so the
#: HCP shells 990/1985/2990 are named 1000/2000/3000.
SHELL_ROUNDING = 50.0
#: A diffusion-weighted b-vector whose norm differs from 1 by more than this
#: is an error (scanner rounding stays well below); smaller deviations are
#: renormalised.
BVEC_NORM_TOLERANCE = 0.1
#: Below this norm a b-vector counts as zero.
ZERO_NORM = 1e-6


def gradient_policy() -> dict:
    """The named constants, as written into sidecars."""
    return {
        "b0_threshold": B0_THRESHOLD,
        "shell_gap": SHELL_GAP,
        "shell_rounding": SHELL_ROUNDING,
        "bvec_norm_tolerance": BVEC_NORM_TOLERANCE,
        "bvec_frame": "fsl-image",
    }


def check_readable_file(path: str | os.PathLike, what: str) -> None:
    """InputError unless ``path`` is an existing, readable regular file."""
    if not os.path.exists(path):
        raise InputError(path, f"{what} file does not exist")
    if os.path.isdir(path):
        raise InputError(path, f"is a directory, not a {what} file")
    if not os.path.isfile(path):
        raise InputError(path, f"is not a regular file (expected a {what} file)")
    if not os.access(path, os.R_OK):
        raise InputError(path, f"{what} file is not readable (permission denied)")


def _read_numeric_table(path: str | os.PathLike, what: str) -> np.ndarray:
    check_readable_file(path, what)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw.startswith(codecs.BOM_UTF8):  # files saved by some Windows editors
            raw = raw[len(codecs.BOM_UTF8):]
        text = raw.decode("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read {what} file as text ({exc})") from None
    rows = [r.replace(",", " ").split() for r in text.splitlines() if r.strip()]
    if not rows:
        raise InputError(path, f"{what} file is empty")
    if len({len(r) for r in rows}) != 1:
        raise InputError(path, f"{what} file has rows of different lengths "
                               f"({sorted({len(r) for r in rows})})")
    try:
        arr = np.array(rows, dtype=np.float64)
    except ValueError:
        bad = next((t for r in rows for t in r if not _is_float(t)), "?")
        raise InputError(path, f"{what} file holds a non-numeric value {bad!r}") from None
    if not np.all(np.isfinite(arr)):
        raise InputError(path, f"{what} file holds NaN or Inf values")
    return arr


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def read_bvals(path: str | os.PathLike) -> np.ndarray:
    """Read an FSL/BIDS bval file (one row, or one column) as float64 (N,)."""
    arr = _read_numeric_table(path, "bval")
    if arr.ndim == 2 and 1 not in arr.shape:
        raise InputError(path, f"bval file must hold one row of values, found a "
                               f"{arr.shape[0]}x{arr.shape[1]} table")
    bvals = arr.ravel()
    negative = np.flatnonzero(bvals < 0)
    if negative.size:
        raise InputError(path, f"bval file holds negative b-values (volume(s) "
                               f"{_list(negative)})")
    return bvals


def read_bvecs(path: str | os.PathLike, n_volumes: int | None = None) -> np.ndarray:
    """Read an FSL/BIDS bvec file and return it as (N, 3).

    The standard layout is 3 rows x N columns; an N x 3 file (a common
    mix-up) is detected and transposed. When both readings are possible
    (N == 3) the standard 3xN one is used.
    """
    arr = _read_numeric_table(path, "bvec")
    rows, cols = arr.shape
    if rows == 3 and (n_volumes is None or cols == n_volumes):
        return arr.T.copy()
    if cols == 3 and (n_volumes is None or rows == n_volumes):
        return arr.copy()
    if n_volumes is not None and 3 in (rows, cols):
        n_found = cols if rows == 3 else rows
        raise InputError(path, f"bvec file has {n_found} vectors but {n_volumes} "
                               f"volumes are expected")
    raise InputError(path, f"bvec file must be 3xN (or Nx3), found {rows}x{cols}")


def format_bvals(bvals: np.ndarray) -> str:
    """FSL layout: one row of b-values."""
    return " ".join(f"{b:g}" for b in bvals) + "\n"


def format_bvecs(bvecs: np.ndarray) -> str:
    """FSL layout: 3 rows x N columns."""
    return "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in np.asarray(bvecs).T)


def cluster_shells(bvals: np.ndarray) -> np.ndarray:
    """Nominal shell b-value for each volume (0 for b0 volumes).

    Diffusion-weighted b-values are sorted and split wherever consecutive
    values differ by more than ``SHELL_GAP``; each cluster is named by its
    median rounded to ``SHELL_ROUNDING``.
    """
    bvals = np.asarray(bvals, dtype=np.float64)
    nominal = np.zeros_like(bvals)
    dw = np.flatnonzero(bvals > B0_THRESHOLD)
    if dw.size == 0:
        return nominal
    order = dw[np.argsort(bvals[dw], kind="stable")]
    sorted_b = bvals[order]
    breaks = np.flatnonzero(np.diff(sorted_b) > SHELL_GAP) + 1
    for members in np.split(order, breaks):
        nominal[members] = SHELL_ROUNDING * np.round(np.median(bvals[members]) / SHELL_ROUNDING)
    return nominal


def match_shell(b: float, shells: Iterable[float], tolerance: float = SHELL_GAP) -> float | None:
    """The shell of ``shells`` nearest ``b`` and closer than ``tolerance``
    (s/mm^2; default the shell gap), or None: how a requested or stored
    b-value finds the series' shell (the first of equally near ones)."""
    best = None
    for c in shells:
        c = float(c)
        if abs(c - float(b)) < tolerance and (best is None or abs(c - b) < abs(best - b)):
            best = c
    return best


@dataclass(frozen=True)
class GradientTable:
    """b-values (s/mm^2) and unit b-vectors (FSL image frame), one per volume.

    Attributes derived from the constants: ``b0s_mask`` (b <= B0_THRESHOLD),
    ``shell_of`` (nominal shell per volume, 0 for b0) and ``shells``.
    """

    bvals: np.ndarray
    bvecs: np.ndarray
    source: str = ""
    shell_of: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        bvals = np.asarray(self.bvals, dtype=np.float64).ravel()
        bvecs = np.asarray(self.bvecs, dtype=np.float64).reshape(-1, 3)
        if bvals.shape[0] != bvecs.shape[0]:
            raise InputError(self.source or None,
                             f"{bvals.shape[0]} b-values but {bvecs.shape[0]} b-vectors")
        object.__setattr__(self, "bvals", bvals)
        object.__setattr__(self, "bvecs", bvecs)
        object.__setattr__(self, "shell_of", cluster_shells(bvals))

    def __len__(self) -> int:
        return self.bvals.shape[0]

    @property
    def b0s_mask(self) -> np.ndarray:
        return self.bvals <= B0_THRESHOLD

    @property
    def shells(self) -> list[float]:
        """Nominal b-values of the diffusion-weighted shells, ascending."""
        return sorted(float(b) for b in np.unique(self.shell_of[~self.b0s_mask]))

    def directions_per_shell(self) -> dict[float, int]:
        return {b: int(np.sum(self.shell_of == b)) for b in self.shells}

    def shell_indices(self, shell: float) -> np.ndarray:
        """Volume indices of one shell (by nominal b-value)."""
        idx = np.flatnonzero(self.shell_of == shell)
        if idx.size == 0:
            raise ValueError(f"no shell at b={shell:g}; shells are {self.shells}")
        return idx

    def select(self, indices: np.ndarray) -> "GradientTable":
        """A table of a subset of volumes (e.g. b0s plus one shell)."""
        return GradientTable(self.bvals[indices], self.bvecs[indices], self.source)

    def select_shells(self, shells: list[float], keep_b0: bool = True) -> np.ndarray:
        """Indices of the b0 volumes (optionally) and of the given shells."""
        keep = np.isin(self.shell_of, shells) & ~self.b0s_mask
        if keep_b0:
            keep |= self.b0s_mask
        return np.flatnonzero(keep)

    def bmatrix_design(self) -> np.ndarray:
        """(N, 7) design for ln S = X @ [Dxx, Dyy, Dzz, Dxy, Dxz, Dyz, ln S0]."""
        g, b = self.bvecs, self.bvals
        return np.column_stack([
            -b * g[:, 0] ** 2, -b * g[:, 1] ** 2, -b * g[:, 2] ** 2,
            -2 * b * g[:, 0] * g[:, 1], -2 * b * g[:, 0] * g[:, 2],
            -2 * b * g[:, 1] * g[:, 2], np.ones_like(b),
        ])

    def to_world(self, affine: np.ndarray) -> np.ndarray:
        """b-vectors in the scanner (RAS+) frame for an image with ``affine``."""
        return fsl_to_world(self.bvecs, affine)

    def to_dipy(self):
        # dipy takes seconds to import: conversion only
        from dipy.core.gradients import gradient_table
        return gradient_table(self.bvals, bvecs=self.bvecs, b0_threshold=B0_THRESHOLD)


def _orientation(affine: np.ndarray) -> np.ndarray:
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    return m / np.linalg.norm(m, axis=0)


def fsl_to_world(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """FSL image-frame vectors (N, 3) -> world-frame unit vectors (N, 3)."""
    v = np.array(bvecs, dtype=np.float64).reshape(-1, 3)
    if np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]) > 0:
        v[:, 0] = -v[:, 0]
    return v @ _orientation(affine).T


def world_to_fsl(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`fsl_to_world`."""
    v = np.asarray(bvecs, dtype=np.float64).reshape(-1, 3)
    v = v @ np.linalg.inv(_orientation(affine)).T
    if np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]) > 0:
        v[:, 0] = -v[:, 0]
    return v


def check_and_normalise(bvals: np.ndarray, bvecs: np.ndarray, bvec_path) -> np.ndarray:
    """Unit b-vectors for diffusion-weighted volumes; b0 vectors set to 0.

    Zero-norm or far-from-unit vectors on diffusion-weighted volumes are an
    error naming ``bvec_path`` and the offending volumes.
    """
    bvecs = np.array(bvecs, dtype=np.float64)
    dw = bvals > B0_THRESHOLD
    norms = np.linalg.norm(bvecs, axis=1)
    zero = np.flatnonzero(dw & (norms < ZERO_NORM))
    if zero.size:
        raise InputError(bvec_path, f"zero-norm b-vector on diffusion-weighted volume(s) "
                                    f"{_list(zero)} (b-values {_list(bvals[zero], 'g')} s/mm^2, "
                                    f"above the b0 threshold {B0_THRESHOLD:g})")
    off = np.flatnonzero(dw & (np.abs(norms - 1.0) > BVEC_NORM_TOLERANCE))
    if off.size:
        raise InputError(bvec_path, f"b-vector norm far from 1 on diffusion-weighted "
                                    f"volume(s) {_list(off)} (norms {_list(norms[off], '.3f')}); "
                                    f"expected unit vectors")
    out = np.zeros_like(bvecs)
    out[dw] = bvecs[dw] / norms[dw, None]
    return out


def _list(values, fmt: str = "d", limit: int = 8) -> str:
    items = [format(v, fmt) for v in list(values)[:limit]]
    return ", ".join(items) + (", ..." if len(values) > limit else "")


def read_gradients(bval_path, bvec_path, n_volumes: int | None = None) -> GradientTable:
    """Validated gradient table from an FSL/BIDS bval + bvec pair.

    Checks: readable numeric files, one b-value per volume (when
    ``n_volumes`` is given), 3xN or Nx3 b-vectors of the same count,
    unit b-vectors on diffusion-weighted volumes, at least one b0 volume.
    """
    bvals = read_bvals(bval_path)
    if n_volumes is not None and bvals.size != n_volumes:
        raise InputError(bval_path, f"bval file has {bvals.size} values but the image has "
                                    f"{n_volumes} volumes")
    bvecs = read_bvecs(bvec_path, n_volumes=bvals.size)
    bvecs = check_and_normalise(bvals, bvecs, bvec_path)
    if not np.any(bvals <= B0_THRESHOLD):
        raise InputError(bval_path, f"no b0 volume (no b-value <= {B0_THRESHOLD:g} s/mm^2)")
    return GradientTable(bvals, bvecs, source=os.fspath(bvec_path))


# ----------------------------------------------------------------------------
# Direction sets
# ----------------------------------------------------------------------------
def spiral_directions(n: int) -> np.ndarray:
    """``n`` well-spread unit vectors on the z >= 0 hemisphere (golden spiral).

    Deterministic and instant: for benchmarks and tests that need a fixed,
    reasonably uniform set without the electrostatic optimisation.
    """
    i = np.arange(n) + 0.5
    z = 1.0 - i / n
    r = np.sqrt(1.0 - z * z)
    phi = math.pi * (1.0 + math.sqrt(5.0)) * i
    return np.column_stack([r * np.cos(phi), r * np.sin(phi), z])


def electrostatic_directions(n: int, seed: int | np.random.Generator = 0,
                             iterations: int = 200) -> np.ndarray:
    """``n`` unit vectors spread evenly as antipodal pairs (N, 3).

    Minimises the electrostatic energy of the ``2n`` charges ``+-x_i``
    (Jones et al. 1999) by projected gradient steps from a random start.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if n < 2:
        return x
    spacing = math.sqrt(4.0 * math.pi / (2 * n))
    eye = np.eye(n, dtype=bool)
    for it in range(iterations):
        diff = x[:, None, :] - x[None, :, :]
        summ = x[:, None, :] + x[None, :, :]
        d1 = np.einsum("ijk,ijk->ij", diff, diff)
        d2 = np.einsum("ijk,ijk->ij", summ, summ)
        d1[eye] = np.inf
        d2[eye] = np.inf
        force = (np.einsum("ijk,ij->ik", diff, d1 ** -1.5)
                 + np.einsum("ijk,ij->ik", summ, d2 ** -1.5))
        force -= np.sum(force * x, axis=1, keepdims=True) * x
        step = spacing * (0.3 * (1.0 - it / iterations) + 0.01)
        x += step * force / np.linalg.norm(force, axis=1).max()
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def min_pair_angle(bvecs: np.ndarray) -> float:
    """Smallest angle (deg) between two directions, sign-free."""
    v = np.asarray(bvecs, dtype=np.float64)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    c = np.abs(v @ v.T)
    np.fill_diagonal(c, 0.0)
    return float(np.degrees(np.arccos(np.clip(c.max(), 0.0, 1.0))))
