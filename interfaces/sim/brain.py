"""Realistic brain anatomy for the phantom (``simulate_subject(anatomy="brain")``).

Numerics only. The tissue maps are the MNI152 2009a (symmetric, non-linear)
grey- and white-matter probability maps that nilearn's wheel ships as package
data (``nilearn/datasets/data/mni_icbm152_{gm,wm}_tal_nlin_sym_09a_converted
.nii.gz``): read from the installed package with nibabel, never fetched and
without importing nilearn. The ICBM 2009 templates (McConnell Brain Imaging
Centre, Fonov et al. 2009/2011) may be used, copied and modified with their
copyright notice; nothing of them is stored in this project.

Template (built once per process, :func:`template`, on a ``TEMPLATE_STEP_MM``
grid block-averaged from the 1 mm maps)
--------------------------------------------------------------------------
* brain envelope: grey + white matter above ``ENVELOPE_THRESHOLD``, closed and
  filled (the ventricles inside); an outer CSF rim of ``CSF_RIM_MM``; CSF =
  envelope + rim - grey - white (ventricles, sulci, subarachnoid space).
* white-matter fibre orientation from the white-matter map's structure: the
  structure tensor ``G_rho * (grad w grad w^T)`` of the white-matter
  probability ``w``; fibres run along the eigenvector of its smallest
  eigenvalue (the direction in which white matter varies least: along gyral
  stalks, the internal capsule, the corona radiata). The callosal body
  (``CC_BOX_MM`` at the midline) is set left-right, where the structure is a
  sheet and the smallest direction is ambiguous. Its *tubeness*
  ``(mu2 - mu3) / mu1`` sets the coherent share of the white matter
  (``COHERENT_SHARE``; the callosal body fully coherent), the rest is the
  dispersed background population (:data:`phantom.BACKGROUND_TISSUE`).
* grey matter: weakly anisotropic along the cortical normal (the eigenvector
  of the largest eigenvalue, radial to the cortex), ``GM_ANISOTROPY``.
* ``bundle``: 1 (``cc``, as the geometric phantom's index) in the callosal body.

Per person: the phantom's affine (``subject_parameters``: rotation, scale,
shear, translation) and a smooth non-linear warp in template space
(:mod:`.warp`, strain <= ``WARP_MAX_STRAIN``, so invertible); fibre vectors
are pushed forward through the map's Jacobian, cortical normals pulled back.
The head (brain + rim) is scaled to fit ``BRAIN_FILL`` of the field of view,
at most life size (``params["anatomy_scale"]``): a small grid holds a small
brain, as the geometric phantom's head follows the field of view.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import warp

# ----------------------------------------------------------------------------
# Named constants
# ----------------------------------------------------------------------------
#: The installed package shipping the template and the files used.
TEMPLATE_PACKAGE = "nilearn"
TEMPLATE_SUBDIR = ("datasets", "data")
TEMPLATE_FILES = {"gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                  "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
#: Working grid of the template (mm; block average of the 1 mm maps).
TEMPLATE_STEP_MM = 2
#: Brain envelope: grey + white probability above this, closed (mm) and filled.
ENVELOPE_THRESHOLD = 0.3
ENVELOPE_CLOSING_MM = 6
#: Outer CSF rim (subarachnoid space) around the envelope (mm).
CSF_RIM_MM = 2
#: Structure tensor: derivative and integration Gaussian sigmas (mm).
STRUCTURE_GRADIENT_MM = 2.0
STRUCTURE_INTEGRATION_MM = 4.0
#: Coherent share of the white matter: lo + (hi - lo) * tubeness.
COHERENT_SHARE = (0.5, 1.0)
#: Callosal body (MNI mm, x / y / z ranges): left-right fibres, fully coherent,
#: truth ``bundle`` 1 ("cc").
CC_BOX_MM = ((-10.0, 10.0), (-36.0, 30.0), (4.0, 30.0))
CC_MIN_WM = 0.5
#: Grey matter: d_par = d_gm (1 + 2k), d_perp = d_gm (1 - k) along the
#: cortical normal (MD unchanged, FA = 3k / sqrt(3 + 6k^2) = 0.25 at k = 0.15:
#: cortical FA of high-resolution in-vivo DTI is ~0.1-0.3; partial volume with
#: CSF brings the grey-matter label's median to ~0.12).
GM_ANISOTROPY = 0.15
#: Head (brain + rim) bounding box as a share of the field of view per axis;
#: the scale never exceeds life size.
BRAIN_FILL = 0.92
MAX_SCALE = 1.0
#: Per-person warp in template (MNI mm) space.
WARP_MODES = 6
WARP_WAVELENGTH_MM = (40.0, 100.0)
WARP_RMS_MM = 3.0
WARP_MAX_STRAIN = 0.5
WARP_STREAM = 23
#: A sampled white-matter share below this holds no fibre population.
MIN_WM = 1e-4


def template_dir() -> Path:
    """Folder of the template files in the installed ``nilearn`` (not imported)."""
    spec = importlib.util.find_spec(TEMPLATE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the brain phantom needs the {TEMPLATE_PACKAGE} package "
                          f"(its wheel ships the MNI152 2009 maps): pip install nilearn")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*TEMPLATE_SUBDIR)


@dataclass(frozen=True)
class Template:
    """The brain template on its working grid (``affine``: voxel -> MNI mm)."""

    fractions: np.ndarray     # (X, Y, Z, 3): CSF, GM, WM
    fibre: np.ndarray         # (X, Y, Z, 3) unit, MNI axes
    normal: np.ndarray        # (X, Y, Z, 3) unit cortical normal
    coherent: np.ndarray      # (X, Y, Z) coherent share of the white matter
    bundle: np.ndarray        # (X, Y, Z) uint8
    affine: np.ndarray
    centre: np.ndarray        # MNI mm of the head's bounding-box centre
    extent: np.ndarray        # mm of the head's bounding box


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    shape = tuple((n // k) * k for n in a.shape)
    a = a[:shape[0], :shape[1], :shape[2]]
    return a.reshape(shape[0] // k, k, shape[1] // k, k, shape[2] // k, k).mean(axis=(1, 3, 5))


def _structure(wm: np.ndarray, step: float, where: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smallest / largest eigenvectors and tubeness of the structure tensor of
    ``wm`` at the voxels ``where`` (elsewhere 0)."""
    from scipy import ndimage
    g = [ndimage.gaussian_filter(wm, STRUCTURE_GRADIENT_MM / step, order=o)
         for o in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
    rho = STRUCTURE_INTEGRATION_MM / step
    st = np.empty((int(where.sum()), 3, 3), dtype=np.float64)
    for i in range(3):
        for j in range(i, 3):
            st[:, i, j] = st[:, j, i] = ndimage.gaussian_filter(g[i] * g[j], rho)[where]
    evals, evecs = np.linalg.eigh(st)                 # ascending
    small, large = np.zeros(wm.shape + (3,)), np.zeros(wm.shape + (3,))
    tube = np.zeros(wm.shape)
    small[where], large[where] = evecs[..., 0], evecs[..., 2]
    tube[where] = (evals[:, 1] - evals[:, 0]) / np.maximum(evals[:, 2], 1e-12)
    return small, large, np.clip(tube, 0.0, 1.0)


@lru_cache(maxsize=1)
def template() -> Template:
    """Load and prepare the template (about a second; cached per process)."""
    import nibabel as nib
    from scipy import ndimage
    folder = template_dir()
    imgs = {k: nib.load(folder / f) for k, f in TEMPLATE_FILES.items()}
    k = TEMPLATE_STEP_MM
    maps = {n: _block_mean(np.asarray(img.dataobj, dtype=np.float32), k)
            for n, img in imgs.items()}
    top = max(float(m.max()) for m in maps.values())
    gm, wm = (np.clip(maps[n] / top, 0.0, 1.0) for n in ("gm", "wm"))
    total = gm + wm
    over = total > 1.0
    gm[over], wm[over] = gm[over] / total[over], wm[over] / total[over]
    affine = imgs["gm"].affine @ np.diag([k, k, k, 1.0])
    affine[:3, 3] += imgs["gm"].affine[:3, :3] @ np.full(3, (k - 1) / 2.0)
    step = float(k * abs(imgs["gm"].affine[0, 0]))
    close = max(1, int(round(ENVELOPE_CLOSING_MM / step)))
    env = ndimage.binary_closing(total > ENVELOPE_THRESHOLD, iterations=close)
    env = ndimage.binary_fill_holes(env)
    rim = ndimage.binary_dilation(env, iterations=max(1, int(round(CSF_RIM_MM / step))))
    head = ndimage.gaussian_filter(rim.astype(np.float32), 0.5)   # a smooth outer edge
    head = np.maximum(head, total)
    csf = np.clip(head - gm - wm, 0.0, 1.0)
    fibre, normal, tube = _structure(wm.astype(np.float64), step, head > 0)
    ijk = np.indices(wm.shape, dtype=np.float64).reshape(3, -1).T
    mni = (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(wm.shape + (3,))
    in_cc = np.all([(mni[..., a] >= lo) & (mni[..., a] <= hi)
                    for a, (lo, hi) in enumerate(CC_BOX_MM)], axis=0) & (wm >= CC_MIN_WM)
    fibre[in_cc] = np.sign(affine[0, 0]) * np.array([1.0, 0.0, 0.0])
    lo, hi = COHERENT_SHARE
    coherent = np.where(in_cc, 1.0, lo + (hi - lo) * tube)
    # voxel axes -> MNI axes (the template affine is diagonal up to signs)
    axes = np.sign(np.diag(affine[:3, :3]))
    fibre, normal = fibre * axes, normal * axes
    idx = np.argwhere(head > 0.5)
    lo_mm = idx.min(axis=0) @ affine[:3, :3].T + affine[:3, 3]
    hi_mm = idx.max(axis=0) @ affine[:3, :3].T + affine[:3, 3]
    return Template(
        fractions=np.stack([csf, gm, wm], axis=-1).astype(np.float32),
        fibre=fibre.astype(np.float32), normal=normal.astype(np.float32),
        coherent=coherent.astype(np.float32), bundle=in_cc.astype(np.uint8), affine=affine,
        centre=(lo_mm + hi_mm) / 2.0, extent=np.abs(hi_mm - lo_mm) + step)


def person_warp(seed: int) -> warp.Warp:
    """The person's non-linear deformation of template space."""
    return warp.random_warp(seed, WARP_STREAM, WARP_MODES, WARP_WAVELENGTH_MM, WARP_RMS_MM,
                            WARP_MAX_STRAIN)


def anatomy_scale(fov: np.ndarray) -> float:
    """Template mm -> world mm: the head fills ``BRAIN_FILL`` of the field of view."""
    return float(min(MAX_SCALE, np.min(BRAIN_FILL * np.asarray(fov) / template().extent)))


@lru_cache(maxsize=4)
def _smoothed_fractions(sigma_vox: float) -> np.ndarray:
    """Template fractions box-averaged (Gaussian of the box's SD) to a voxel size."""
    from scipy import ndimage
    f = template().fractions
    if sigma_vox <= 0.0:
        return f
    return np.stack([ndimage.gaussian_filter(f[..., i], sigma_vox) for i in range(3)], axis=-1)


def to_template(x: np.ndarray, fov: np.ndarray, prm: dict, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """MNI mm (n, 3) of world points ``x`` and the map's Jacobian d(mni)/dx (n, 3, 3)."""
    tpl = template()
    s = anatomy_scale(fov)
    a_inv = np.linalg.inv(prm["A"])
    m0 = (x - prm["t"]) @ a_inv.T / s + tpl.centre
    w = person_warp(seed)
    grad = w.gradient(m0)
    jac = (np.eye(3) + grad) @ (a_inv / s)
    return m0 + w.displacement(m0), jac


def anatomy(x: np.ndarray, fov: np.ndarray, voxel: np.ndarray, prm: dict, seed: int) -> dict:
    """Tissue fractions, fibre populations (coherent, dispersed), cortical normals
    and the callosal label at world points ``x`` (n, 3 mm): the phantom's
    anatomy dict (``head``, ``fractions``, ``weights``, ``dirs``, plus
    ``gm_dirs`` and ``bundle``)."""
    from scipy import ndimage
    tpl = template()
    m, jac = to_template(x, fov, prm, seed)
    step = abs(tpl.affine[0, 0])
    vox_tpl = float(np.mean(voxel)) / anatomy_scale(fov) / step   # voxel in template voxels
    sigma = round(max(vox_tpl ** 2 - 1.0, 0.0) ** 0.5 / 12 ** 0.5, 2)
    ijk = ((m - tpl.affine[:3, 3]) @ np.linalg.inv(tpl.affine[:3, :3]).T).T
    smooth = _smoothed_fractions(sigma)
    frac = np.stack([ndimage.map_coordinates(smooth[..., i], ijk, order=1, mode="constant")
                     for i in range(3)], axis=1).astype(np.float64)
    frac = np.clip(frac, 0.0, 1.0)
    head = np.clip(frac.sum(axis=1), 0.0, 1.0)
    frac *= (head / np.maximum(frac.sum(axis=1), 1e-12))[:, None]

    def nearest(a):
        return ndimage.map_coordinates(a, ijk, order=0, mode="nearest")

    fib = np.stack([nearest(tpl.fibre[..., i]) for i in range(3)], axis=1).astype(np.float64)
    nrm = np.stack([nearest(tpl.normal[..., i]) for i in range(3)], axis=1).astype(np.float64)
    coherent = np.clip(ndimage.map_coordinates(tpl.coherent, ijk, order=1, mode="nearest"), 0, 1)
    # fibres (vectors) pushed forward: dx = J^-1 dm; normals (covectors) pulled back: J^T n
    v = np.linalg.solve(jac, fib[:, :, None])[:, :, 0]
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    nrm = np.einsum("nba,nb->na", jac, nrm)
    nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-12)
    has_wm = frac[:, 2] > MIN_WM
    weights = np.stack([coherent, 1.0 - coherent], axis=1) * has_wm[:, None]
    bundle = (nearest(tpl.bundle.astype(np.float32)) > 0.5) & has_wm
    u = (x - prm["t"]) @ np.linalg.inv(prm["A"]).T / (np.asarray(fov) / 2.0)
    return {"head": head, "fractions": frac, "weights": weights,
            "dirs": np.repeat(v[:, None, :], 2, axis=1), "gm_dirs": nrm,
            "bundle": bundle.astype(np.uint8), "u": u}
