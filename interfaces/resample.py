"""Several images through one dipy SyN map at once, with dipy's bits.

dipy's ``warp_3d`` (linear) computes, for every output voxel, where it lands
in the source image (the displacement field interpolated there, then two
affines) and interpolates the image there; warping ``n`` images through the
same map repeats the first part ``n`` times, over the whole output grid. The
harmonization warps 16 images per subject and direction (the mask and five
RISH orders of three shells to the template; the scale maps back), about
0.4 s each on an HCP grid.

:func:`warp_many` computes the positions once and interpolates all images
there, at chosen output voxels only (a subject's mask voxels) and, on the
rest, only where a source voxel that is not +0.0 is within reach (elsewhere
dipy writes +0.0). It reproduces dipy's arithmetic operation by operation -
positions in double, each interpolation's eight corner terms formed in
double and summed into a float32 in dipy's corner order (``warp_3d``,
``_interpolate_vector_3d``, ``_interpolate_scalar_3d`` of dipy 1.12) - so
the results are the same bits (tested against dipy's own warp).
"""

from __future__ import annotations

import numpy as np

F32, F64 = np.float32, np.float64

#: Fewest images warped in one pass; fewer go through dipy one by one. The
#: positions cost about what dipy takes for 1-3 images (HCP grid, a smooth
#: synthetic SyN map, CPU s, 1 / 2 / 3 images: to the whole template grid
#: dipy 0.95 / 0.75 / 1.12, one pass 1.23 / 1.35 / 1.41; at a subject's mask
#: voxels dipy 0.36 / 0.74 / 1.11, one pass 0.48 / 0.67 / 0.90; a loaded
#: machine). The harmonization warps 16 at a time.
MIN_IMAGES = 4
#: Output voxels handled per block (their temporaries stay in cache).
BLOCK_VOXELS = 32768
#: Source voxels per block of the transposing copy into one row per voxel.
TRANSPOSE_BLOCK = 4096
#: dipy's corner order (k, i, j offsets) in its trilinear interpolation: the
#: float32 sum is formed in this order, so the order fixes its last bits.
CORNERS = ((0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0),
           (1, 0, 0), (1, 0, 1), (1, 1, 1), (1, 1, 0))


def warp_parameters(dmap, forward: bool, image_world2grid, out_shape, out_grid2world) -> dict:
    """What dipy's ``DiffeomorphicMap.transform`` (``forward``) or
    ``transform_inverse`` hands ``warp_3d`` for these grids: the field and
    the three index/displacement affines, computed by dipy itself (its warp
    function is swapped for one that records its arguments, on this map
    object only, for one call on a 1-voxel image)."""
    got = {}

    def record(image, field, affine_idx_in=None, affine_idx_out=None, affine_disp=None,
               out_shape=None):
        got.update(field=field, affine_idx_in=affine_idx_in, affine_idx_out=affine_idx_out,
                   affine_disp=affine_disp)
        return np.zeros((1, 1, 1), F32)

    dmap._get_warping_function = lambda interpolation, **kw: record
    try:
        warp = dmap.transform if forward else dmap.transform_inverse
        warp(np.zeros((1, 1, 1), F32), interpolation="linear",
             image_world2grid=image_world2grid, out_shape=tuple(int(n) for n in out_shape),
             out_grid2world=out_grid2world)
    finally:
        del dmap._get_warping_function
    if any(got[k] is None for k in ("affine_idx_in", "affine_idx_out", "affine_disp")):
        raise ValueError("dipy's warp left an affine out: not the composition this module "
                         "reproduces")
    return {**got, "out_shape": tuple(int(n) for n in out_shape)}


def _affine_row(aff, r: int, x, y, z, h: float):
    """Row ``r`` of ``aff`` times (x, y, z, h), summed in C's order as dipy's
    ``_apply_affine_3d_x*`` does."""
    return aff[r, 0] * x + aff[r, 1] * y + aff[r, 2] * z + h * aff[r, 3]


class CornerPlan:
    """dipy's trilinear interpolation on a grid of ``shape`` at positions
    (dk, di, dj) (double): per corner, in :data:`CORNERS` order, the row of
    each position's corner in a :func:`voxel_rows` source (its last row where
    dipy skips the corner) and its weight, formed as dipy forms it."""

    def __init__(self, dk, di, dj, shape):
        ns, nr, nc = shape
        inside = (-1 < dk) & (dk < ns) & (-1 < di) & (di < nr) & (-1 < dj) & (dj < nc)
        # <int>floor(x), then x - (double)int: -0.0 - 0 stays -0.0, as in dipy
        kk, ii, jj = (np.floor(x).astype(np.intp) for x in (dk, di, dj))
        cgamma, calpha, cbeta = dk - kk, di - ii, dj - jj
        gamma, alpha, beta = (1 - cgamma, cgamma), (1 - calpha, calpha), (1 - cbeta, cbeta)
        k_ok = (inside & (kk >= 0), inside & (kk + 1 < ns))
        i_ok = (ii >= 0, ii + 1 < nr)
        j_ok = (jj >= 0, jj + 1 < nc)
        base = (kk * nr + ii) * nc + jj
        skip = ns * nr * nc
        self.corners = []
        for c, (a, b, d) in enumerate(CORNERS):
            used = k_ok[a] & i_ok[b] & j_ok[d]
            if c == 0:
                self.first_used = used
            self.corners.append((np.where(used, base + (a * nr + b) * nc + d, skip),
                                 (alpha[b] * beta[d]) * gamma[a]))

    def interpolate(self, source: np.ndarray) -> np.ndarray:
        """(positions, m) float32 from a :func:`voxel_rows` source: each term
        in double, summed into float32 corner by corner (dipy's ``out[0] +=``
        on a float32). A skipped corner reads the last row, -0.0, and adding
        -0.0 changes nothing; where the first corner is skipped dipy writes 0."""
        out = None
        for c, (rows, weight) in enumerate(self.corners):
            term = source[rows] * weight[:, None]
            if c == 0:
                out = np.where(self.first_used[:, None], term, 0.0).astype(F32)
            else:
                np.add(out, term, out=out, casting="same_kind")
        return out


def voxel_rows(images) -> np.ndarray:
    """(voxels + 1, n) float32: row v holds voxel v (C order) of each image,
    the last row -0.0 (what :class:`CornerPlan` reads for a skipped corner).
    Copied in blocks of :data:`TRANSPOSE_BLOCK` voxels (a cache-friendly
    transpose: 0.13 s for 16 HCP-grid images against 0.65-0.9 s in one go)."""
    flat = [np.asarray(im, F32).reshape(-1) for im in images]
    n = flat[0].size
    out = np.empty((n + 1, len(flat)), F32)
    for a in range(0, n, TRANSPOSE_BLOCK):
        b = min(a + TRANSPOSE_BLOCK, n)
        for c, im in enumerate(flat):
            out[a:b, c] = im[a:b]
    out[n] = -0.0
    return out


def reach(images) -> np.ndarray:
    """(ns + 1, nr + 1, nc + 1) bool: at [k + 1, i + 1, j + 1], whether any of
    the 8 corners of the cell from (k, i, j) (k, i, j >= -1) holds a value
    other than +0.0 in any image. Where it does not, dipy's interpolation
    gives +0.0 (positive weights times +0.0, and -0.0 terms, sum to +0.0)."""
    shape = images[0].shape
    pad = np.zeros(tuple(n + 2 for n in shape), bool)
    inner = pad[1:-1, 1:-1, 1:-1]
    for im in images:
        inner |= (im != 0) | np.signbit(im)     # NaN != 0: kept
    ns, nr, nc = shape
    out = np.zeros((ns + 1, nr + 1, nc + 1), bool)
    for a in (0, 1):
        for b in (0, 1):
            for d in (0, 1):
                out |= pad[a:a + ns + 1, b:b + nr + 1, d:d + nc + 1]
    return out


def _positions(params: dict, at: np.ndarray, field_rows: np.ndarray):
    """Where output voxels ``at`` (C-order flat indices) land on the source
    grid: dipy's ``warp_3d`` up to its final interpolation (double)."""
    a_in, a_out, a_disp = (params[k] for k in ("affine_idx_in", "affine_idx_out",
                                                "affine_disp"))
    k, i, j = (x.astype(F64) for x in np.unravel_index(at, params["out_shape"]))
    plan = CornerPlan(_affine_row(a_in, 0, k, i, j, 1.0), _affine_row(a_in, 1, k, i, j, 1.0),
                      _affine_row(a_in, 2, k, i, j, 1.0), params["field"].shape[:3])
    disp = plan.interpolate(field_rows).astype(F64)   # dipy's float32 tmp[3]
    dkk, dii, djj = disp[:, 0], disp[:, 1], disp[:, 2]
    return (_affine_row(a_disp, 0, dkk, dii, djj, 0.0) + _affine_row(a_out, 0, k, i, j, 1.0),
            _affine_row(a_disp, 1, dkk, dii, djj, 0.0) + _affine_row(a_out, 1, k, i, j, 1.0),
            _affine_row(a_disp, 2, dkk, dii, djj, 0.0) + _affine_row(a_out, 2, k, i, j, 1.0))


def warp_many(images, params: dict, at: np.ndarray | None = None) -> np.ndarray:
    """``images`` (3D, one source grid) warped as dipy's linear ``warp_3d``
    with ``params`` (:func:`warp_parameters`) would, each: (len(at), n)
    float32, at output voxels ``at`` (C-order flat indices; None: all)."""
    if at is None:
        at = np.arange(int(np.prod(params["out_shape"])))
    images = [np.asarray(im, F32) for im in images]
    shape = images[0].shape
    if any(im.shape != shape for im in images):
        raise ValueError("images of different shapes")
    field = params["field"]
    field_rows = np.empty((field[..., 0].size + 1, 3), F32)
    field_rows[:-1] = field.reshape(-1, 3)
    field_rows[-1] = -0.0
    within = reach(images)
    source = voxel_rows(images)
    out = np.zeros((at.size, len(images)), F32)
    for a in range(0, at.size, BLOCK_VOXELS):
        dk, di, dj = _positions(params, at[a:a + BLOCK_VOXELS], field_rows)
        idx = np.flatnonzero((-1 < dk) & (dk < shape[0]) & (-1 < di) & (di < shape[1])
                             & (-1 < dj) & (dj < shape[2]))
        idx = idx[within[tuple(np.floor(x[idx]).astype(np.intp) + 1 for x in (dk, di, dj))]]
        if idx.size:
            out[a + idx] = CornerPlan(dk[idx], di[idx], dj[idx], shape).interpolate(source)
    return out
