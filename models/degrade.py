"""Paired "3T-like" / "7T" data from a higher-quality source, for the 3T->7T model.

Numerics only (numpy/scipy, no pydra, no torch). No paired 3T/7T data exist
offline (SCIENCE.md section 4), so pairs are simulated:

* the **"7T"** member is the phantom (:func:`dmriflow.interfaces.sim.phantom.simulate_subject`)
  at the 7T echo time, with 7T-shortened T2, a 64-direction b=1000 shell and a
  high SNR, on the simulation grid;
* the **"3T-like"** member starts from the SAME anatomy (same seed) simulated
  noise-free at the 3T echo time with 3T T2 and a 90-direction shell (the
  TE/T2 contrast change: compartment-exact, so partial-volume voxels change
  their diffusion weighting, not only their intensity), and is then degraded
  by :func:`degrade`: small misregistration, coarser resolution, a smooth
  bias field and Rician noise.

The three original degradation *families*: ``"train"`` (Gaussian point-spread function
+ decimation, polynomial bias), ``"test"`` (k-space truncation, i.e. a
sinc PSF with Gibbs ringing, a Gaussian-bump bias and a noise range that
extends below the training range) and ``"calib"`` (a box PSF - block
averaging over the coarser voxel - with its own ranges; see
:data:`FAMILIES`). Training randomises within its family; the held-out
evaluation uses the test one, so a model that merely memorises the training
degradation is not rewarded; the calibration family is a *third* shift that
the uncertainty can be calibrated on without looking at the test family.
A fourth, ``"train-mixed"``, is the train family with the PSF drawn per pair
between the Gaussian and an *apodised* k-space truncation (a Tukey k-space
filter, as vendor reconstructions apply; never the test family's rectangular
one): training over PSF types rather than widening for one.

What this can and cannot show: a learned model recovering the 7T member
from the 3T-like one proves it learns a *known* mapping under a shifted
degradation and ranks it against baselines on identical data. It cannot
prove fidelity to real 3T->7T differences (field-dependent relaxation of
individual compartments, susceptibility, vendor reconstruction), which a
synthetic degradation does not contain.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage

from dmriflow.interfaces.gradients import GradientTable, electrostatic_directions
from dmriflow.interfaces.sim import phantom

# ----------------------------------------------------------------------------
# Named constants (acquisitions as in the HCP 3T/7T data of SCIENCE.md s. 4)
# ----------------------------------------------------------------------------
#: Echo times (ms) of the HCP 3T and 7T diffusion protocols.
TE_3T_MS = 89.5
TE_7T_MS = 71.2
#: Field strengths (T) written into the pair's metadata and model cards.
FIELD_3T = 3.0
FIELD_7T = 7.0
#: Tissue T2 at 7T relative to 3T (white matter ~70 -> ~50 ms in the literature).
T2_SCALE_7T = 0.72
#: b-value (s/mm^2) of the single shell used (the paper uses b=1000 only).
SHELL_B = 1000.0
#: Directions per shell: HCP 3T 90, 7T 64; b0 volumes per series.
DIRS_3T = 90
DIRS_7T = 64
N_B0 = 6
#: SNR of the "7T" member (mean white-matter b0 / sigma): the high-quality source.
SNR_7T = 60.0
#: Degradation families and their parameter ranges (uniform draws).
#: resolution: 3T voxel size / source voxel size; snr: of the 3T-like output
#: (reference b0 / sigma); bias: peak relative amplitude of the smooth
#: multiplicative field; shift_vox / rotation_deg: misregistration per axis.
#: ``"calib"`` exists only to calibrate the uncertainty under a shift (never to
#: train or to report): a PSF type neither of the others has (``"box"``), the
#: training family's resolution range (the shift is the PSF's shape, not its
#: width), an SNR range from inside the training one to below it (12-30: lower
#: SNR than trained is the usual direction of a deployment shift, and the
#: calibration must see some), a stronger polynomial bias (0-0.3; the features
#: are b0-normalised, so the bias matters through the noise floor only) and a
#: misregistration between the other two families'.
#: ``"train-mixed"``: the train family's ranges and bias with ``psf`` a tuple,
#: one of which is drawn per pair (after every other draw, so a seed keeps the
#: train family's resolution, SNR, bias and motion); ``taper`` is the range the
#: apodised PSF's Tukey fraction is drawn from (:data:`KSPACE_TAPER`).
KSPACE_TAPER = (0.5, 1.0)
FAMILIES = {
    "train": {"resolution": (1.2, 1.8), "snr": (15.0, 35.0), "bias": (0.0, 0.2),
              "shift_vox": 0.5, "rotation_deg": 1.5, "psf": "gaussian", "bias_model": "polynomial"},
    "test": {"resolution": (1.3, 1.9), "snr": (10.0, 25.0), "bias": (0.1, 0.3),
             "shift_vox": 0.7, "rotation_deg": 2.0, "psf": "kspace", "bias_model": "bump"},
    "calib": {"resolution": (1.2, 1.8), "snr": (12.0, 30.0), "bias": (0.0, 0.3),
              "shift_vox": 0.6, "rotation_deg": 1.75, "psf": "box", "bias_model": "polynomial"},
    "train-mixed": {"resolution": (1.2, 1.8), "snr": (15.0, 35.0), "bias": (0.0, 0.2),
                    "shift_vox": 0.5, "rotation_deg": 1.5, "psf": ("gaussian", "kspace-apodised"),
                    "taper": KSPACE_TAPER, "bias_model": "polynomial"},
}
#: Point-spread functions: ``gaussian`` (:func:`blur_decimate`), ``kspace``
#: (:func:`kspace_truncate`, rectangular), ``kspace-apodised`` (the same with a
#: Tukey k-space filter of fraction ``Degradation.taper``), ``box``
#: (:func:`box_decimate`), ``none``.
PSFS = ("gaussian", "kspace", "kspace-apodised", "box", "none")
#: The PSF whose k-space filter is tapered: its ``taper`` must be in (0, 1]
#: (0 would be the test family's rectangular truncation); every other PSF has 0.
APODISED = "kspace-apodised"
BIAS_MODELS = ("polynomial", "bump", "none")
#: Gaussian FWHM (in output voxels) of a point-spread function one voxel wide:
#: blurring to a voxel ``f`` times larger adds ``sqrt(f^2 - 1)`` voxels of FWHM.
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
#: Second entropy word of a pair's random stream (``SeedSequence([seed, tag])``).
PAIR_SEED_TAG = 7037
#: Width of the Gaussian bump bias field, as a fraction of the field of view.
BUMP_WIDTH = 0.35
#: Why KSPACE_TAPER is 0.5-1.0: a Tukey window of fraction ``a`` is flat over
#: the inner ``1 - a`` of the kept band and falls as a raised cosine to 0 at
#: its edge (``a = 1``: Hann). Vendor reconstructions apply such k-space
#: filters (Hann/Hamming/Fermi-like) to suppress Gibbs ringing; the range
#: starts at 0.5 so that every draw is clearly apodised (its first sidelobe
#: and its sharpness well apart from the rectangular window's), which keeps
#: the test family's rectangular truncation (``a = 0``) out of training.


@dataclass(frozen=True)
class Degradation:
    """One draw of the 3T-like degradation (see the module docstring)."""

    family: str = "train"
    psf: str = "gaussian"
    resolution: float = 1.5
    snr: float = 25.0
    bias_model: str = "polynomial"
    bias: float = 0.1
    bias_coeffs: tuple = ()
    shift_vox: tuple = (0.0, 0.0, 0.0)
    rotation_deg: tuple = (0.0, 0.0, 0.0)
    taper: float = 0.0

    def __post_init__(self):
        if self.psf not in PSFS:
            raise ValueError(f"psf must be one of {PSFS}, got {self.psf!r}")
        if (self.psf == APODISED) != (0.0 < self.taper <= 1.0) or not 0.0 <= self.taper <= 1.0:
            raise ValueError(f"taper must be in (0, 1] for psf {APODISED!r} and 0 otherwise, "
                             f"got {self.taper} with psf {self.psf!r}")
        if self.bias_model not in BIAS_MODELS:
            raise ValueError(f"bias_model must be one of {BIAS_MODELS}, got {self.bias_model!r}")
        if self.resolution < 1.0:
            raise ValueError(f"resolution factor must be >= 1 (coarser), got {self.resolution}")
        if not self.snr > 0:
            raise ValueError(f"snr must be positive (inf = no noise), got {self.snr}")

    def describe(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def sample_degradation(family: str, rng: np.random.Generator) -> Degradation:
    """A random :class:`Degradation` from one family's ranges."""
    if family not in FAMILIES:
        raise ValueError(f"unknown degradation family {family!r} ({', '.join(FAMILIES)})")
    f = FAMILIES[family]
    n_coeffs = 9 if f["bias_model"] == "polynomial" else 4   # bump: centre (3) + sign
    spec = Degradation(
        family=family, psf="none", resolution=float(rng.uniform(*f["resolution"])),
        snr=float(rng.uniform(*f["snr"])), bias_model=f["bias_model"],
        bias=float(rng.uniform(*f["bias"])),
        bias_coeffs=tuple(float(c) for c in rng.uniform(-1, 1, n_coeffs)),
        shift_vox=tuple(float(s) for s in rng.uniform(-1, 1, 3) * f["shift_vox"]),
        rotation_deg=tuple(float(a) for a in rng.uniform(-1, 1, 3) * f["rotation_deg"]))
    # PSF drawn last: a family with one PSF draws nothing more (its streams unchanged)
    psf = f["psf"] if isinstance(f["psf"], str) else str(f["psf"][rng.integers(len(f["psf"]))])
    taper = float(rng.uniform(*f["taper"])) if psf == APODISED else 0.0
    return replace(spec, psf=psf, taper=taper)


# ----------------------------------------------------------------------------
# The degradation steps (each on a 3D volume or a 4D series, volume by volume)
# ----------------------------------------------------------------------------
def _volumes(data: np.ndarray, fn) -> np.ndarray:
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 3:
        return fn(data).astype(np.float32, copy=False)
    out = np.empty_like(data)
    for k in range(data.shape[3]):
        out[..., k] = fn(data[..., k])
    return out


def misregister(data: np.ndarray, shift_vox, rotation_deg) -> np.ndarray:
    """Rigid motion about the grid centre (trilinear): a small misregistration."""
    rot = phantom._rotation(np.radians(np.asarray(rotation_deg, dtype=np.float64)))
    centre = (np.asarray(data.shape[:3]) - 1) / 2.0
    offset = centre - rot @ (centre + np.asarray(shift_vox, dtype=np.float64))
    return _volumes(data, lambda v: ndimage.affine_transform(
        v, rot, offset=offset, order=1, mode="nearest", output=np.float32))


def _decimated(data: np.ndarray, factor: float, blur) -> np.ndarray:
    """``blur`` (a 3D volume -> volume) sampled on a grid ``factor`` times
    coarser and interpolated back (trilinear) to the input grid."""
    shape = np.asarray(data.shape[:3])
    coarse = np.maximum(np.round(shape / factor), 2).astype(int)

    def one(v):
        low = ndimage.zoom(blur(v), coarse / shape, order=1, mode="nearest", grid_mode=True)
        return ndimage.zoom(low, shape / np.asarray(low.shape), order=1, mode="nearest",
                            grid_mode=True)
    return _volumes(data, one)


def blur_decimate(data: np.ndarray, factor: float) -> np.ndarray:
    """Gaussian PSF of a voxel ``factor`` times larger, sampled on that coarser
    grid and interpolated back (trilinear) to the input grid."""
    if factor <= 1.0:
        return np.asarray(data, dtype=np.float32).copy()
    sigma = math.sqrt(factor ** 2 - 1.0) * FWHM_TO_SIGMA
    return _decimated(data, factor, lambda v: ndimage.gaussian_filter(v, sigma, mode="nearest"))


def box_kernel(width: float) -> np.ndarray:
    """1D box of ``width`` voxels (may be fractional) centred on a voxel: each
    tap is the overlap of its voxel with ``[-width/2, width/2]``; sums to 1."""
    half = width / 2.0
    n = int(math.ceil(half - 0.5))
    j = np.arange(-n, n + 1, dtype=np.float64)
    w = np.clip(np.minimum(j + 0.5, half) - np.maximum(j - 0.5, -half), 0.0, None)
    return w / w.sum()


def box_decimate(data: np.ndarray, factor: float) -> np.ndarray:
    """Box PSF: the average over a voxel ``factor`` times larger (a block
    average, sharp-edged, with a sinc-shaped transfer function that neither
    the Gaussian nor the k-space truncation has), sampled on that coarser grid
    and interpolated back (trilinear) to the input grid."""
    if factor <= 1.0:
        return np.asarray(data, dtype=np.float32).copy()
    k = box_kernel(factor)

    def blur(v):
        for axis in range(3):
            v = ndimage.convolve1d(v, k, axis=axis, mode="nearest")
        return v
    return _decimated(data, factor, blur)


def kspace_window(n: int, factor: float, taper: float = 0.0) -> np.ndarray:
    """1D k-space filter over ``np.fft.fftfreq(n)``: the band ``|f| <= fc``,
    ``fc = 0.5 / factor``, kept; with ``taper`` a > 0 a Tukey window - 1 for
    ``|f| <= (1 - a) fc``, then ``cos^2`` falling to 0 at ``fc`` (a = 1: Hann)."""
    f = np.abs(np.fft.fftfreq(n))
    fc = 0.5 / max(factor, 1.0)
    w = (f <= fc).astype(np.float64)
    if taper > 0:
        edge = (1.0 - taper) * fc
        ramp = (f > edge) & (f <= fc)
        w[ramp] = np.cos(0.5 * np.pi * (f[ramp] - edge) / (taper * fc)) ** 2
    return w


def kspace_truncate(data: np.ndarray, factor: float, taper: float = 0.0) -> np.ndarray:
    """Keep the central ``1/factor`` of k-space along each axis (zero-filled
    reconstruction on the input grid): a sinc PSF ``factor`` voxels wide,
    with Gibbs ringing at edges; ``taper`` > 0: the band apodised by a
    separable Tukey filter (:func:`kspace_window`; applied at ``factor`` 1
    too, as a reconstruction filter is), a wider PSF with little ringing."""
    if factor <= 1.0 and taper == 0:
        return np.asarray(data, dtype=np.float32).copy()
    w = [kspace_window(n, factor, taper) for n in data.shape[:3]]
    if taper == 0:
        w = [a > 0 for a in w]          # the rectangular band as a mask (exactly as before)
    window = w[0][:, None, None] * w[1][None, :, None] * w[2][None, None, :]
    return _volumes(data, lambda v: np.fft.ifftn(np.fft.fftn(v) * window).real)


def bias_field(shape, model: str, amplitude: float, coeffs) -> np.ndarray:
    """Smooth positive multiplicative field (float32), ``1 +- amplitude`` at most.

    ``polynomial``: a random combination of the 9 first- and second-order
    terms of normalised coordinates, scaled to a peak deviation ``amplitude``;
    ``bump``: ``1 + amplitude * sign * exp(-|x - c|^2 / (2 w^2))`` with centre
    ``c`` inside the central half of the field of view and width BUMP_WIDTH.
    """
    if model == "none" or amplitude == 0:
        return np.ones(shape, dtype=np.float32)
    u = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*u, indexing="ij")
    c = np.asarray(coeffs, dtype=np.float64)
    if model == "polynomial":
        terms = np.stack([x, y, z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3,
                          x * y, x * z, y * z])
        f = np.tensordot(c[:9], terms, axes=1)
        f /= max(np.abs(f).max(), 1e-12)
    elif model == "bump":
        centre = 0.5 * c[:3]
        r2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
        f = np.sign(c[3] if c[3] != 0 else 1.0) * np.exp(-r2 / (2 * (2 * BUMP_WIDTH) ** 2))
    else:
        raise ValueError(f"bias model must be one of {BIAS_MODELS}, got {model!r}")
    return (1.0 + amplitude * f).astype(np.float32)


def add_rician(data: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``|S + sigma (n1 + i n2)|``: magnitude of complex Gaussian noise."""
    data = np.asarray(data, dtype=np.float32)
    if sigma <= 0:
        return data.copy()
    re = data + np.float32(sigma) * rng.standard_normal(data.shape, dtype=np.float32)
    im = np.float32(sigma) * rng.standard_normal(data.shape, dtype=np.float32)
    return np.hypot(re, im)


def reference_b0(data: np.ndarray, gtab: GradientTable, mask: np.ndarray) -> float:
    """Signal level that defines the SNR: the median mean-b0 in the mask's
    brighter half (white matter and grey matter, not CSF-dominated dark rims)."""
    b0 = data[..., gtab.b0s_mask].mean(axis=-1)[mask]
    if b0.size == 0:
        raise ValueError("the mask is empty: no signal level to define the SNR")
    return float(np.median(b0[b0 >= np.median(b0)]))


def degrade(data: np.ndarray, gtab: GradientTable, mask: np.ndarray, spec: Degradation,
            rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Degrade a (noise-free or high-SNR) series (X, Y, Z, N) into a 3T-like one.

    Order: misregistration -> resolution loss (``spec.psf``) -> bias field ->
    Rician noise with ``sigma = reference_b0 / spec.snr``, the reference taken
    from the input before degradation. Same grid in and out. Returns the
    float32 series and sigma.
    """
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 4 or data.shape[3] != len(gtab):
        raise ValueError(f"need a 4D series with {len(gtab)} volumes, got {data.shape}")
    sigma = 0.0 if math.isinf(spec.snr) else reference_b0(data, gtab, mask) / spec.snr
    out = data
    if any(spec.shift_vox) or any(spec.rotation_deg):
        out = misregister(out, spec.shift_vox, spec.rotation_deg)
    if spec.psf == "gaussian":
        out = blur_decimate(out, spec.resolution)
    elif spec.psf in ("kspace", APODISED):
        out = kspace_truncate(out, spec.resolution, spec.taper)
    elif spec.psf == "box":
        out = box_decimate(out, spec.resolution)
    np.maximum(out, 0.0, out=out)
    out = out * bias_field(out.shape[:3], spec.bias_model, spec.bias, spec.bias_coeffs)[..., None]
    return add_rician(out, sigma, rng), float(sigma)


# ----------------------------------------------------------------------------
# Paired subjects
# ----------------------------------------------------------------------------
def single_shell_scheme(n_dirs: int, n_b0: int = N_B0, bval: float = SHELL_B,
                        seed: int = 0) -> GradientTable:
    """b0 volumes first, then one shell of electrostatically spread directions."""
    dirs = electrostatic_directions(n_dirs, seed)
    return GradientTable(np.r_[np.zeros(n_b0), np.full(n_dirs, float(bval))],
                         np.r_[np.zeros((n_b0, 3)), dirs],
                         source=f"dmriflow.degrade b{bval:g}x{n_dirs}")


@dataclass
class PairedSubject:
    """A 3T-like / 7T pair of one anatomy on one grid (float32 series)."""

    subject: str
    dwi3: np.ndarray
    gtab3: GradientTable
    dwi7: np.ndarray
    gtab7: GradientTable
    mask: np.ndarray
    affine: np.ndarray
    degradation: Degradation
    sigma3: float
    sigma7: float

    def dwi_3t(self, name: str | None = None):
        """The 3T member as a loaded series (:class:`~dmriflow.interfaces.io.DWI`,
        ``paths["dwi"]`` = ``name``): what an inference run on it would see."""
        import nibabel as nib

        from dmriflow.interfaces.io import DWI
        header = nib.Nifti1Header()
        header.set_data_shape(self.dwi3.shape)
        header.set_zooms(tuple(abs(np.diag(self.affine)[:3])) + (1.0,))
        return DWI(self.dwi3.astype(np.float32), self.gtab3, self.mask, self.affine, header,
                   {"dwi": name or f"sub-{self.subject}_dwi.nii.gz"})


#: The phantom's default grid aspect (x, y, z); pairs are simulated with this
#: aspect so that the longest axis has ``sim_size`` voxels.
_ASPECT = np.asarray(phantom.DEFAULT_SHAPE, dtype=np.float64) / max(phantom.DEFAULT_SHAPE)


def simulate_pair(seed: int, sim_size: int = 32, family: str = "train",
                  degradation: Degradation | None = None,
                  voxel_mm: float = phantom.DEFAULT_VOXEL_MM * 1.25,
                  scheme3: GradientTable | None = None,
                  scheme7: GradientTable | None = None) -> PairedSubject:
    """One paired subject: the 7T member and its 3T-like degradation.

    The grid has ``sim_size`` voxels along its longest axis (the phantom's
    aspect) of ``voxel_mm``; ``degradation`` defaults to a draw from
    ``family`` seeded by ``seed`` (so a seed fixes the whole pair).
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), PAIR_SEED_TAG]))
    spec = degradation if degradation is not None else sample_degradation(family, rng)
    shape = tuple(int(n) for n in np.maximum(np.round(_ASPECT * sim_size), 4))
    g3 = scheme3 if scheme3 is not None else single_shell_scheme(DIRS_3T, seed=3)
    g7 = scheme7 if scheme7 is not None else single_shell_scheme(DIRS_7T, seed=7)
    site7 = phantom.SiteEffect(name="7T", field_strength=FIELD_7T, t2_scale=T2_SCALE_7T)
    s7 = phantom.simulate_subject(shape, seed=seed, snr=SNR_7T, scheme=g7, te=TE_7T_MS,
                                  site=site7, voxel_size=voxel_mm)
    site3 = phantom.SiteEffect(name="3T", field_strength=FIELD_3T, t2_scale=1.0)
    s3 = phantom.simulate_subject(shape, seed=seed, snr=None, scheme=g3, te=TE_3T_MS,
                                  site=site3, voxel_size=voxel_mm)
    dwi3, sigma3 = degrade(s3.dwi, g3, s3.mask, spec, rng)
    return PairedSubject(f"{seed:04d}", dwi3, g3, s7.dwi, g7, s7.mask, s7.affine, spec,
                         sigma3, s7.sigma)
