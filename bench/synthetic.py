"""The synthetic HCP-size subject the memory and end-to-end benches write.

Per mask voxel a tensor of white matter, grey matter or CSF (random
orientation), S0 around S0_MEAN; the benches stream it volume by volume, so
no 4D array is ever held.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

S0_MEAN = 1000.0
#: tissue mix (white matter, grey matter, CSF) and eigenvalue ranges (mm^2/s)
TISSUE_P = (0.45, 0.40, 0.15)
EVAL_LO = np.array([[1.4, 0.25, 0.2], [0.85, 0.7, 0.6], [2.8, 2.7, 2.6]]) * 1e-3
EVAL_HI = np.array([[1.9, 0.5, 0.45], [1.05, 0.85, 0.75], [3.1, 3.0, 2.9]]) * 1e-3
#: voxels per block of the float64 rotation work
BLOCK = 100_000
#: the NIfTI-1 data offset both benches write
VOX_OFFSET = 352


def tissue_tensors(m: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(m, 6) float32 tensor parameters [Dxx Dyy Dzz 2Dxy 2Dxz 2Dyz] and (m,) S0."""
    kind = rng.choice(3, size=m, p=list(TISSUE_P))
    ev = rng.uniform(EVAL_LO[kind], EVAL_HI[kind]).astype(np.float32)
    params = np.empty((m, 6), np.float32)
    for s in range(0, m, BLOCK):                         # float64 only per block
        e = slice(s, min(s + BLOCK, m))
        q, _ = np.linalg.qr(rng.normal(size=(e.stop - s, 3, 3)))
        D = np.einsum("nij,nj,nkj->nik", q, ev[e], q)
        params[e] = np.stack([D[:, 0, 0], D[:, 1, 1], D[:, 2, 2],
                              2 * D[:, 0, 1], 2 * D[:, 0, 2], 2 * D[:, 1, 2]], 1)
    s0 = rng.normal(S0_MEAN, 0.15 * S0_MEAN, m).clip(300).astype(np.float32)
    return params, s0


def signal(params: np.ndarray, s0: np.ndarray, bval: float, bvec: np.ndarray) -> np.ndarray:
    """Noise-free signal of every voxel for one volume (float32)."""
    g = bvec
    quad = np.array([g[0] ** 2, g[1] ** 2, g[2] ** 2, g[0] * g[1], g[0] * g[2],
                     g[1] * g[2]], np.float32)
    return s0 * np.exp(-np.float32(bval) * (params @ quad))


def float32_header(shape, affine) -> bytes:
    """A NIfTI-1 header for float32 data of ``shape`` at VOX_OFFSET, padded to it."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape(tuple(shape))
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    hdr["vox_offset"] = VOX_OFFSET
    return hdr.binaryblock + b"\0" * (VOX_OFFSET - len(hdr.binaryblock))
