"""Phantom head motion: known per-volume rigid transforms (and eddy-like
affine distortions) applied to a clean simulated subject.

The head moves in the scanner; the gradients stay in the scanner frame. A
volume simulated with gradient ``g`` (head frame) is what the scanner
measures when the head is rotated by ``R`` and the gradient applied is
``R g``, so the moved series stores ``R g`` (the b-vectors a scanner would
write) and the correction must rotate it back to ``g``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..gradients import GradientTable, fsl_to_world, world_to_fsl
from ..motion import resample_series, rigid_matrix
from .phantom import LABELS, PhantomSubject

#: Default motion amplitude: translations (mm) and rotations (rad) drawn
#: uniformly within +- these (a few mm / degrees: a restless adult).
DEFAULT_MAX_TRANSLATION_MM = 2.0
DEFAULT_MAX_ROTATION_RAD = np.deg2rad(2.0)
#: Eddy-like distortion along the phase-encoding axis, per unit b/1000:
#: scale and shears of y (fractions) and translation (mm), +- these.
DEFAULT_EDDY_SCALE = 0.01
DEFAULT_EDDY_SHEAR = 0.01
DEFAULT_EDDY_SHIFT_MM = 1.0
#: Phase-encoding axis (world y, anterior-posterior).
PE_AXIS = 1


@dataclass
class MovedSeries:
    """A moved (noisy) series with its stored b-vectors and the true motion."""
    dwi: np.ndarray            # (X, Y, Z, N) float32
    gtab: GradientTable        # b-vectors as the scanner writes them (rotated with the head)
    affine: np.ndarray
    transforms: np.ndarray     # (N, 4, 4) true reference world -> volume world
    parameters: np.ndarray     # (N, 6) true trans (mm), rot (rad); zeros = no motion
    sigma: float


def random_motion(n_volumes: int, seed: int = 0,
                  max_translation: float = DEFAULT_MAX_TRANSLATION_MM,
                  max_rotation: float = DEFAULT_MAX_ROTATION_RAD,
                  still: tuple = (0,)) -> np.ndarray:
    """(N, 6) uniform random rigid parameters; volumes in ``still`` do not move."""
    rng = np.random.default_rng(seed)
    p = np.column_stack([rng.uniform(-max_translation, max_translation, (n_volumes, 3)),
                         rng.uniform(-max_rotation, max_rotation, (n_volumes, 3))])
    p[list(still)] = 0.0
    return p


def eddy_matrices(bvals, seed: int = 0, scale: float = DEFAULT_EDDY_SCALE,
                  shear: float = DEFAULT_EDDY_SHEAR,
                  shift: float = DEFAULT_EDDY_SHIFT_MM) -> np.ndarray:
    """(N, 4, 4) eddy-like affines: the PE coordinate scaled, sheared and shifted
    in proportion to b/1000 (identity for the b0s)."""
    rng = np.random.default_rng(seed + 1)
    out = np.tile(np.eye(4), (len(bvals), 1, 1))
    for k, b in enumerate(np.asarray(bvals, dtype=np.float64) / 1000.0):
        row = rng.uniform(-1, 1, 4) * np.array([shear, scale, shear, shift]) * b
        out[k, PE_AXIS, :4] += row
    return out


def move_subject(subject: PhantomSubject, parameters, eddy=None, snr: float | None = None,
                 seed: int = 0) -> MovedSeries:
    """The subject's noise-free series moved by ``parameters`` (N, 6) and, with
    ``eddy`` (N, 4, 4), distorted in the scanner frame after the motion; Rician
    noise at ``snr`` (default: the subject's) is added after moving.

    ``subject`` must hold its noise-free series (``keep_noise_free=True`` or
    ``snr=None``). Rotation is about the world origin (the phantom's head centre).
    """
    clean = subject.noise_free if subject.noise_free is not None else subject.dwi
    if subject.noise_free is None and subject.sigma > 0:
        raise ValueError("move_subject needs the noise-free series (keep_noise_free=True)")
    params = np.asarray(parameters, dtype=np.float64)
    transforms = np.stack([rigid_matrix(p) for p in params])
    if eddy is not None:
        transforms = np.asarray(eddy) @ transforms
    # the volume at y shows the head at T^-1 y
    moved = resample_series(clean, np.linalg.inv(transforms), subject.affine)
    world = fsl_to_world(subject.gtab.bvecs, subject.affine)
    stored = np.stack([rigid_matrix(p)[:3, :3] @ g for p, g in zip(params, world)])
    bvecs = world_to_fsl(stored, subject.affine)
    bvecs[subject.gtab.b0s_mask] = subject.gtab.bvecs[subject.gtab.b0s_mask]
    wm = subject.truth["label"] == LABELS["wm"]
    sigma = subject.sigma if snr is None else float(subject.truth["s0"][wm].mean() / snr)
    if sigma > 0:
        rng = np.random.default_rng(seed + 7)
        re = moved + rng.standard_normal(moved.shape, dtype=np.float32) * np.float32(sigma)
        im = rng.standard_normal(moved.shape, dtype=np.float32) * np.float32(sigma)
        moved = np.hypot(re, im).astype(np.float32)
    return MovedSeries(moved, GradientTable(subject.gtab.bvals.copy(), bvecs,
                                            source="dmriflow.sim.motion"),
                       subject.affine, transforms, params, sigma)
