"""Head-motion and eddy-current correction of a diffusion series, with b-vector rotation.

Model-based registration, as eddymotion/SHORELine do: a diffusion volume
cannot be registered well to a b0 (its contrast differs), so each one is
registered to a *prediction of itself* from the other volumes of its shell.

1. The b0 volumes are registered rigidly to their mean.
2. Per shell, a log-linear tensor (OLS) is fitted to the mean b0 and the
   shell's volumes; the leave-one-out prediction of volume i comes in closed
   form from the hat matrix, ``y_i - r_i / (1 - h_ii)`` (the fit without
   volume i, at no extra cost).
3. Each diffusion volume is registered (rigid, or affine for eddy currents)
   to its prediction with dipy's mutual-information registration, on a
   downsampled grid first; volumes run in parallel (:func:`parallel.map_chunks`).
   A first pass registers each volume to its shell's mean instead (robust
   while the volumes are still misaligned). After each pass the shell's mean
   is registered to the mean b0 and the shell moved as one (eddy's
   separation of offset and movement: volumes registered to each other
   leave their common position free).
4. Repeated ``iterations`` times: the model is refitted to the series
   resampled with the current transforms (and rotated b-vectors); each
   registration starts from the previous transform of the *original* volume,
   so the transforms are never composed with an interpolated image.
5. The transforms are expressed relative to the first b0 (the reference
   frame: its parameters are 0), the original data are resampled once (cubic
   spline), and each b-vector is rotated by the inverse of its volume's head
   rotation.

A transform ``T`` (4x4, world mm) maps a point of the reference head to
where it lies in the volume: ``x_k = T_k x``. Its rotation is the head's
rotation; the gradient, fixed in the scanner, is ``R_k^T g`` in the head
frame. Parameters follow fMRIPrep's confounds: translations in mm,
rotations in radians (``R = Rz Ry Rx``), framewise displacement as Power et
al. 2012 (50 mm head radius).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .gradients import GradientTable, fsl_to_world, world_to_fsl
from .parallel import map_chunks

#: Registration models: rigid (head motion) or affine (plus eddy-current
#: scale and shear).
MODELS = ("rigid", "affine")
#: Model-fit / registration passes (SHORELine uses a few; the second pass
#: refits the model on realigned data and gains most of what is left).
DEFAULT_ITERATIONS = 2
#: Framewise-displacement head radius (mm), Power et al. 2012.
FD_RADIUS_MM = 50.0
#: Multi-resolution schedule of dipy's registration: iterations per level,
#: smoothing sigmas (voxels) and shrink factors, coarse to fine.
LEVEL_ITERS = (100, 30)
SIGMAS = (1.0, 0.0)
FACTORS = (2, 1)
#: Mutual-information histogram bins (dipy's default 32).
MI_BINS = 32
#: Signals are clipped to this before the log of the tensor fit.
MIN_SIGNAL = 1e-3
#: Leverage above this (a volume the fit cannot predict from the others)
#: falls back to the fitted value rather than dividing by ~0.
MAX_LEVERAGE = 0.99
#: Spline order of the one final resampling (cubic).
SPLINE_ORDER = 3
#: Column names of the motion table (fMRIPrep confounds).
PARAMETER_NAMES = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")


@dataclass
class MotionResult:
    """Corrected data, rotated gradients and the per-volume transforms."""
    data: np.ndarray          # (X, Y, Z, N) float32, resampled once
    gtab: GradientTable       # b-vectors rotated into the reference head frame
    transforms: np.ndarray    # (N, 4, 4) reference world -> volume world
    parameters: np.ndarray    # (N, 6) trans (mm), rot (rad)
    fd: np.ndarray            # (N,) framewise displacement (mm), 0 for the first volume
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------
# Transforms and parameters
# ----------------------------------------------------------------------------
def rotation_matrix(angles) -> np.ndarray:
    """R = Rz Ry Rx of angles (rot_x, rot_y, rot_z) in radians."""
    ax, ay, az = angles
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid_matrix(params) -> np.ndarray:
    """4x4 transform of (trans_x, trans_y, trans_z, rot_x, rot_y, rot_z)."""
    out = np.eye(4)
    out[:3, :3] = rotation_matrix(params[3:6])
    out[:3, 3] = params[:3]
    return out


def rotation_part(matrix) -> np.ndarray:
    """The rotation nearest the 3x3 part of a transform (polar decomposition)."""
    u, _, vt = np.linalg.svd(np.asarray(matrix)[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:
        r = u @ np.diag([1, 1, -1]) @ vt
    return r


def rigid_parameters(matrix) -> np.ndarray:
    """(trans_x, trans_y, trans_z, rot_x, rot_y, rot_z) of a transform (its rotation part)."""
    r = rotation_part(matrix)
    ry = -np.arcsin(np.clip(r[2, 0], -1.0, 1.0))
    rx = np.arctan2(r[2, 1], r[2, 2])
    rz = np.arctan2(r[1, 0], r[0, 0])
    return np.array([*np.asarray(matrix)[:3, 3], rx, ry, rz])


def framewise_displacement(parameters, radius: float = FD_RADIUS_MM) -> np.ndarray:
    """Power et al. FD (mm): sum of |d trans| + radius * sum of |d rot|; 0 for the first."""
    p = np.asarray(parameters, dtype=np.float64)
    d = np.abs(np.diff(p, axis=0))
    return np.concatenate([[0.0], d[:, :3].sum(axis=1) + radius * d[:, 3:].sum(axis=1)])


def rotate_bvecs(gtab: GradientTable, transforms, affine) -> GradientTable:
    """b-vectors (FSL image frame) expressed in the reference head frame: R_k^T g_k."""
    world = fsl_to_world(gtab.bvecs, affine)
    rotated = np.stack([rotation_part(t).T @ g for t, g in zip(transforms, world)])
    bvecs = world_to_fsl(rotated, affine)
    bvecs[gtab.b0s_mask] = gtab.bvecs[gtab.b0s_mask]
    return GradientTable(gtab.bvals.copy(), bvecs, source=gtab.source)


def resample_volume(volume, transform, affine, order: int = SPLINE_ORDER) -> np.ndarray:
    """``volume`` seen from the reference head: out(x) = volume(T x), on the same grid."""
    aff = np.asarray(affine, dtype=np.float64)
    vox = np.linalg.inv(aff) @ np.asarray(transform) @ aff
    from scipy import ndimage  # lazy: 0.3-0.4 s off every dmriflow command's start-up
    out = ndimage.affine_transform(np.asarray(volume, np.float32), vox[:3, :3], vox[:3, 3],
                                   order=order, mode="constant", cval=0.0)
    return np.maximum(out, 0.0, out=out)


def resample_series(data, transforms, affine, order: int = SPLINE_ORDER,
                    n_threads: int | None = None) -> np.ndarray:
    """Every volume resampled by its transform (one interpolation each), float32."""
    vols = map_chunks(lambda k: resample_volume(data[..., k], transforms[k], affine, order),
                      range(data.shape[-1]), n_threads)
    return np.stack(vols, axis=-1).astype(np.float32)


# ----------------------------------------------------------------------------
# Model-based predictions
# ----------------------------------------------------------------------------
def _log_design(bvals, bvecs) -> np.ndarray:
    """(N, 7) log-linear tensor design: ln S = ln S0 - b g^T D g."""
    g = np.asarray(bvecs, dtype=np.float64)
    b = np.asarray(bvals, dtype=np.float64)[:, None] / 1000.0
    return np.column_stack([np.ones(len(g)), -b * g[:, [0]] ** 2, -b * g[:, [1]] ** 2,
                            -b * g[:, [2]] ** 2, -2 * b * g[:, [0]] * g[:, [1]],
                            -2 * b * g[:, [0]] * g[:, [2]], -2 * b * g[:, [1]] * g[:, [2]]])


def loo_predictions(mean_b0, shell_data, bvals, bvecs, region) -> np.ndarray:
    """Leave-one-out tensor predictions (X, Y, Z, n) of a shell's volumes.

    A log-linear OLS tensor is fitted to the mean b0 and the shell's ``n``
    volumes in ``region``; the prediction of volume i without it is
    ``y_i - r_i / (1 - h_ii)`` (exact for a linear least-squares fit),
    capped at the voxel's largest signal. Zero outside ``region``.
    """
    X = _log_design(np.concatenate([[0.0], bvals]), np.vstack([[0, 0, 0], bvecs]))
    hat = X @ np.linalg.pinv(X)
    lev = np.minimum(np.diag(hat), MAX_LEVERAGE)
    y = np.log(np.maximum(np.column_stack([mean_b0[region], shell_data[region]]), MIN_SIGNAL))
    resid = y - y @ hat.T
    loo = y - resid / (1.0 - lev)
    out = np.zeros(shell_data.shape, np.float32)
    out[region] = np.exp(np.minimum(loo[:, 1:], y.max(axis=1, keepdims=True)))
    return out


def predictions(data, gtab: GradientTable, region) -> np.ndarray:
    """Leave-one-out predictions of every diffusion volume, shell by shell (b0s: 0)."""
    out = np.zeros(data.shape, np.float32)
    b0 = np.flatnonzero(gtab.b0s_mask)
    mean_b0 = data[..., b0].mean(axis=-1)
    for shell in gtab.shells:
        idx = gtab.shell_indices(shell)
        out[..., idx] = loo_predictions(mean_b0, data[..., idx], gtab.bvals[idx],
                                        gtab.bvecs[idx], region)
    return out


def shell_means(data, gtab: GradientTable) -> np.ndarray:
    """Every diffusion volume's target of the first pass: the mean of its shell."""
    out = np.zeros(data.shape, np.float32)
    for shell in gtab.shells:
        idx = gtab.shell_indices(shell)
        out[..., idx] = data[..., idx].mean(axis=-1, keepdims=True)
    return out


# ----------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------
def register_volume(static, moving, affine, model: str = "rigid", starting=None,
                    static_mask=None) -> np.ndarray:
    """4x4 transform (reference world -> volume world) that best aligns ``moving``
    to ``static`` (mutual information; dipy's multi-resolution optimiser)."""
    # dipy.align takes 0.5 s to import, and every `dmriflow` command imports this
    # module through the step registry: only a registration needs it
    from dipy.align.imaffine import AffineRegistration, MutualInformationMetric
    from dipy.align.transforms import AffineTransform3D, RigidTransform3D
    metric = MutualInformationMetric(nbins=MI_BINS, sampling_proportion=None)
    reg = AffineRegistration(metric=metric, level_iters=list(LEVEL_ITERS), sigmas=list(SIGMAS),
                             factors=list(FACTORS), verbosity=0)
    start = np.eye(4) if starting is None else np.asarray(starting)
    kw = dict(static_grid2world=affine, moving_grid2world=affine, static_mask=static_mask)
    rigid = reg.optimize(static, moving, RigidTransform3D(), None, starting_affine=start, **kw)
    if model == "rigid":
        return np.asarray(rigid.affine)
    return np.asarray(reg.optimize(static, moving, AffineTransform3D(), None,
                                   starting_affine=rigid.affine, **kw).affine)


def _register_all(pairs, affine, model, n_threads) -> list:
    """``[register_volume(static, moving, ...)]`` of (static, moving, start, mask) tuples, in parallel."""
    return map_chunks(lambda p: register_volume(p[0], p[1], affine, model, p[2], p[3]),
                      pairs, n_threads)


def _anchor_shells(data, gtab, transforms, affine, static_mask, n_threads) -> np.ndarray:
    """Each shell's transforms moved together so that the shell's mean aligns with
    the mean b0 (eddy's separation of offset and movement): registering diffusion
    volumes to each other leaves their common position free."""
    b0 = np.flatnonzero(gtab.b0s_mask)
    ref = resample_series(data[..., b0], transforms[b0], affine, 1, n_threads).mean(-1)
    out = transforms.copy()
    for shell in gtab.shells:
        idx = gtab.shell_indices(shell)
        mean = resample_series(data[..., idx], transforms[idx], affine, 1, n_threads).mean(-1)
        offset = register_volume(ref, mean, affine, "rigid", static_mask=static_mask)
        out[idx] = transforms[idx] @ offset
    return out


def correct_motion(data, gtab: GradientTable, affine, mask=None, model: str = "rigid",
                   iterations: int = DEFAULT_ITERATIONS,
                   n_threads: int | None = None) -> MotionResult:
    """Model-based motion (and, with ``model="affine"``, eddy-current) correction.

    ``data`` (X, Y, Z, N); ``mask``: the brain (default: the whole grid), used
    for the model fit and, dilated, as the registration's sampling region.
    Needs at least one b0 and, per shell, 6 non-coplanar directions.
    """
    if model not in MODELS:
        raise ValueError(f"motion model must be one of {MODELS}, got {model!r}")
    data = np.asarray(data, dtype=np.float32)
    n = data.shape[-1]
    b0 = np.flatnonzero(gtab.b0s_mask)
    if b0.size == 0:
        raise ValueError("motion correction needs at least one b0 volume")
    mask = np.ones(data.shape[:3], bool) if mask is None else np.asarray(mask, bool)
    from scipy import ndimage  # lazy (see resample_volume)
    region = ndimage.binary_dilation(mask, iterations=2)
    static_mask = region.astype(np.int32)
    transforms = np.tile(np.eye(4), (n, 1, 1))

    # 1. b0s to their mean (twice: the second mean is of aligned b0s)
    for _ in range(2 if b0.size > 1 else 0):
        ref = resample_series(data[..., b0], transforms[b0], affine, 1, n_threads).mean(-1)
        found = _register_all([(ref, data[..., k], transforms[k], static_mask) for k in b0],
                              affine, "rigid", n_threads)
        transforms[b0] = np.asarray(found)
    dw = np.flatnonzero(~gtab.b0s_mask)

    # 2-4. diffusion volumes to their shell's mean (a robust start: the model
    #      of unaligned volumes is poor at the head's edge), then to their
    #      leave-one-out predictions
    for it in range(iterations + 1):
        aligned = resample_series(data, transforms, affine, 1, n_threads)
        pred = shell_means(aligned, gtab) if it == 0 else \
            predictions(aligned, rotate_bvecs(gtab, transforms, affine), mask)
        found = _register_all([(pred[..., k], data[..., k], transforms[k], static_mask)
                               for k in dw], affine, model, n_threads)
        transforms[dw] = np.asarray(found)
        transforms = _anchor_shells(data, gtab, transforms, affine, static_mask, n_threads)

    # 5. the first b0's frame is the reference (its parameters are 0); one
    #    resampling of the original data; rotated b-vectors
    transforms = transforms @ np.linalg.inv(transforms[b0[0]])
    corrected = resample_series(data, transforms, affine, SPLINE_ORDER, n_threads)
    params = np.stack([rigid_parameters(t) for t in transforms])
    return MotionResult(corrected, rotate_bvecs(gtab, transforms, affine), transforms, params,
                        framewise_displacement(params),
                        {"model": model, "iterations": int(iterations),
                         "prediction": "leave-one-out log-linear tensor per shell",
                         "registration": "dipy AffineRegistration, mutual information",
                         "interpolation": f"spline order {SPLINE_ORDER}, once"})
