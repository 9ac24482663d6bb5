"""RISH features of one shell on the model's cubic grid, and DWIs rebuilt from them.

Numerics only (numpy; no pydra, no torch). The 3T->7T model works on RISH
maps of orders 0, 2, 4 of the b=1000 shell (SCIENCE.md section 4) on a cube of
``grid^3`` voxels covering the subject's field of view (96^3 in the
published setting; the shipped checkpoint uses a smaller grid). Both members
of a pair go through the same steps:

1. resample the b0 volumes and the shell onto the cube (trilinear,
   :func:`dmriflow.interfaces.preprocess.grid_for` / ``resample_to_grid``);
2. fit the b0-normalised shell with SH up to order 4 (:mod:`interfaces.sh`);
   RISH ``R_l = sum_m c_lm^2``;
3. fit the tensor (b0 + shell) for FA (:mod:`interfaces.dti`).

:func:`reconstruct` scales a subject's SH coefficients per order by lambda
maps (``sh.scale_by_order``) and rebuilds the shell's DWIs with the mean b0,
the step that turns predicted 7T RISH into 7T-like DWIs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmriflow.interfaces import sh
from dmriflow.interfaces.dti import TensorModel
from dmriflow.interfaces.gradients import GradientTable, match_shell
from dmriflow.interfaces.preprocess import grid_for, resample_to_grid

#: SH order of the fit: RISH orders 0, 2, 4 are the model's channels.
LMAX = 4
ORDERS = tuple(range(0, LMAX + 1, 2))
N_ORDERS = len(ORDERS)
#: The shell the model reads (s/mm^2).
SHELL_B = 1000.0


@dataclass
class ShellFeatures:
    """One subject's shell on the model grid.

    ``rish`` (G, G, G, 3) float32; ``coeffs`` (G, G, G, 15) SH coefficients of
    the b0-normalised signal; ``s0`` mean b0; ``fa``; ``mask``; ``affine`` of
    the cube; ``gtab`` the b0 + shell table the coefficients came from;
    ``sharpness`` the cube's measured sharpness (:func:`sharpness`; None with
    fewer than 2 b0 volumes).
    """

    rish: np.ndarray
    coeffs: np.ndarray
    s0: np.ndarray
    fa: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    gtab: GradientTable
    sharpness: float | None = None


def shell_volumes(gtab: GradientTable, shell: float = SHELL_B) -> tuple[np.ndarray, float]:
    """Indices of the b0 volumes plus the shell nearest ``shell`` (within the
    shell gap), and that shell's nominal b-value."""
    near = match_shell(shell, gtab.shells)
    if near is None:
        raise ValueError(f"no shell near b={shell:g} (shells: {gtab.shells})")
    if not gtab.b0s_mask.any():
        raise ValueError("no b0 volume: the shell cannot be normalised")
    return gtab.select_shells([near]), near


#: Spatial-frequency bands (cycles per cube voxel, radial) of :func:`sharpness`:
#: the low band holds the anatomy's coarse contrast, the high band what a
#: 1.2-1.9x coarser point-spread function attenuates (measured: train family
#: -2.26 to -1.90 over resolution 1.75-1.29, test family -1.87 to -1.55).
SHARPNESS_LOW_BAND = (0.02, 0.12)
SHARPNESS_HIGH_BAND = (0.15, 0.25)


def sharpness(b0_a: np.ndarray, b0_b: np.ndarray, mask: np.ndarray) -> float:
    """Effective resolution of a series measured from its data:
    ``log(E_high / E_low)``, the spectral energy of the masked mean b0 in
    :data:`SHARPNESS_HIGH_BAND` over that in :data:`SHARPNESS_LOW_BAND`.

    ``b0_a`` and ``b0_b`` are means of two disjoint sets of b0 repeats; the
    energy is their cross-spectrum ``Re(F_a conj(F_b))``, whose expectation
    has no noise term (the repeats' noise is independent). Measured: SNR 15
    instead of 35 moves it < 0.01, a 1.8x instead of 1.2x blur -0.3; at
    SNR 5 it reads ~0.09 lower (Rician bias of the b0, not removed by the
    cross-spectrum; an auto-spectrum reads the same to 0.01 at these SNRs,
    the masked brain edge dominating the high band). Higher = sharper.
    """
    m = np.asarray(mask, dtype=np.float64)
    fa = np.fft.fftn(np.asarray(b0_a, np.float64) * m)
    fb = np.fft.fftn(np.asarray(b0_b, np.float64) * m)
    cross = np.real(fa * np.conj(fb))
    k = np.sqrt(sum(g ** 2 for g in np.meshgrid(*[np.fft.fftfreq(n) for n in m.shape],
                                                 indexing="ij")))
    low = cross[(k > SHARPNESS_LOW_BAND[0]) & (k <= SHARPNESS_LOW_BAND[1])].sum()
    high = cross[(k > SHARPNESS_HIGH_BAND[0]) & (k <= SHARPNESS_HIGH_BAND[1])].sum()
    if not low > 0:
        raise ValueError("no low-frequency signal in the mask: no sharpness estimate")
    # noise can make the high-band cross-energy of a very blurred series <= 0
    return float(np.log(max(high, 1e-6 * low) / low))


def cube_grid(affine: np.ndarray, shape, grid: int) -> tuple[np.ndarray, tuple]:
    """Affine and shape of the ``grid^3`` isotropic cube over the FOV."""
    return grid_for(affine, shape, shape_out=int(grid))


def shell_features(data: np.ndarray, gtab: GradientTable, mask: np.ndarray,
                   affine: np.ndarray, grid: int, shell: float = SHELL_B) -> ShellFeatures:
    """RISH, SH coefficients, mean b0 and FA of one shell on the model cube."""
    idx, b = shell_volumes(gtab, shell)
    sub = gtab.select(idx)
    cube_affine, cube_shape = cube_grid(affine, data.shape, grid)
    d = resample_to_grid(np.asarray(data)[..., idx], affine, cube_affine, cube_shape, order=1)
    m = resample_to_grid(np.asarray(mask, dtype=bool), affine, cube_affine, cube_shape)
    fit = sh.SHModel(sub, LMAX, shell=b).fit(d, m)
    fa = TensorModel(sub).fit(d, fit.mask).fa
    b0 = d[..., sub.b0s_mask]
    n = b0.shape[-1]
    sharp = (sharpness(b0[..., :n // 2].mean(-1), b0[..., n // 2:].mean(-1), fit.mask)
             if n >= 2 and fit.mask.any() else None)
    return ShellFeatures(rish=fit.rish(), coeffs=fit.coeffs, s0=fit.s0, fa=np.nan_to_num(fa),
                         mask=fit.mask, affine=cube_affine, gtab=sub, sharpness=sharp)


def reconstruct(f: ShellFeatures, lam: np.ndarray) -> np.ndarray:
    """DWIs (G, G, G, N) of ``f.gtab`` with the shell rebuilt from SH scaled by
    ``lam`` (G, G, G, 3) per order, times the mean b0; b0 volumes = mean b0."""
    scaled = sh.scale_by_order(f.coeffs, LMAX, lam)
    dw = ~f.gtab.b0s_mask
    basis = sh.sh_basis(f.gtab.bvecs[dw], LMAX).astype(np.float32)
    out = np.empty(f.mask.shape + (len(f.gtab),), dtype=np.float32)
    out[..., ~dw] = f.s0[..., None]
    out[..., dw] = np.maximum(scaled @ basis.T, 0.0) * f.s0[..., None]
    out[~f.mask] = 0.0
    return out


def fa_of(f: ShellFeatures, lam: np.ndarray) -> np.ndarray:
    """FA of the DWIs rebuilt with ``lam`` (0 outside the mask)."""
    return np.nan_to_num(TensorModel(f.gtab).fit(reconstruct(f, lam), f.mask).fa)
