"""RISH harmonization across sites: registration, fit, artefact, apply, evaluation.

Numerics and artefact file I/O only (no pydra). Method (SCIENCE.md section 3,
Mirzaalian 2016, Cetin Karayumak 2019):

1. Every subject's FA map is registered to an FA template (dipy: centre of
   mass -> translation -> rigid -> affine with mutual information, then SyN
   with a cross-correlation metric). The template is the mean of the
   reference site's FA maps (see :func:`build_template`) or a given FA map.
2. Per-shell RISH maps (orders 0..L, :mod:`dmriflow.interfaces.sh`) are
   warped to the template and averaged per site: ``E_ref[R_l]``,
   ``E_tar[R_l]``.
3. Scale maps ``lambda_l = sqrt(E_ref / (E_tar + tau_l))`` (clipped,
   optionally smoothed) form a :class:`HarmonizationArtefact`, stored as
   NIfTI + JSON with the content hashes of every input.
4. :func:`apply_harmonization` warps the scale maps into a target subject,
   scales its SH coefficients per order (``c'_lm = lambda_l c_lm``) and
   rebuilds the DWIs; b0 volumes and voxels outside the mask are untouched.
5. :func:`evaluate_harmonization` measures the site effect (Welch t-test, Cohen's d) on
   white-matter means of FA, MD and RISH before vs after, and how well each
   subject's anatomy is preserved.

Space conventions: a :class:`Transform` maps subject <-> template in world
(scanner mm) coordinates, so subjects may have other grids and voxel sizes
than the template. ``registration="identity"`` skips registration for data
already on the template grid (the same subject scanned twice, tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from . import codec, resample, sh
from .dti import DTI_MAX_BVAL, dti_shells
from .errors import InputError, check_choice
from .harmonize_choices import (DEFAULT_REGISTRATION_CONTRAST, REGISTRATION_CONTRASTS,
                                REGISTRATIONS)
from .gradients import SHELL_GAP, GradientTable, match_shell
from .io import (DWI, atomic_write, copy_file, file_sha256, pipeline_version, save_nifti,
                 storage_rows, write_json)

# ----------------------------------------------------------------------------
# Named constants
# ----------------------------------------------------------------------------
#: Fewest subjects per site for a fit: a site mean of fewer subjects is
#: dominated by one subject's anatomy and noise (the literature recommends ~15-20
#: matched pairs; 3 is the floor below which we refuse).
MIN_SUBJECTS_PER_SITE = 3
#: ``tau_l = TAU_FRACTION * median(E_tar[R_l])`` over the template mask, per
#: shell and order: keeps lambda finite where the target's RISH vanishes
#: (isotropic voxels at high orders) and biases lambda^2 by at most 0.1 %
#: where E_tar is at least its median (most white matter). (1 % biased the
#: phantom's white-matter lambda_0 by 0.5 %: R_0 there is near the median.)
TAU_FRACTION = 0.001
#: Scale maps are clipped to this range: a site effect beyond a factor 4 in
#: SH amplitude is not a site effect but a failure (empty target voxel, bad
#: registration). The clipped share is reported.
SCALE_RANGE = (0.25, 4.0)
#: Default Gaussian smoothing of the scale maps (FWHM, mm). 0 = none; the
#: site means are already smoothed by the inter-subject misregistration.
DEFAULT_SMOOTHING_FWHM_MM = 0.0
#: A template voxel is in the template mask when at least this share of each
#: site's warped brain masks covers it (site means elsewhere are unreliable).
MASK_COVERAGE = 0.5
#: Tissue-guided pooling of the site means (``tissue_pool_fwhm_mm`` of
#: :func:`fit_harmonization`; 0 = off, the default): each site mean is
#: averaged per tissue class with a Gaussian of this FWHM (normalised
#: convolution with the class's template weights), so the scale map loses
#: the few fitting subjects' anatomy and sampling noise without mixing
#: tissues across their edges (a plain Gaussian does: MD d -1.99 at 10 mm).
#: Off by default: it lowers the brain study's residual (10 mm: largest |d|
#: 0.76 -> 0.57) but raises the geometric phantom's (0.41 -> 1.05, RISH l0
#: and MD; significant overcorrection), whose thin white matter is mostly
#: edge, where the per-voxel ratio carries edge-specific corrections that
#: pooling averages away (with site B at 2.5 mm too: 0.32 -> 0.72)
#: (docs/harmonization-studies.md, seventeenth session).
DEFAULT_TISSUE_POOL_FWHM_MM = 0.0
#: Soft white-matter weight from the template FA: 0 below the first value,
#: 1 above the second, linear between (centred on ``WM_FA_THRESHOLD``, the
#: evaluation's white-matter definition).
TISSUE_POOL_FA_RAMP = (0.2, 0.4)
#: Soft CSF weight of the non-white-matter share from the reference site's
#: apparent diffusivity (mm^2/s; ``-ln(mean signal) / b`` of its mean RISH
#: l0 at the lowest shell): 0 below the first value (tissue, <= ~1e-3), 1
#: above the second (free water, ~3e-3).
TISSUE_POOL_MD_RAMP = (1.5e-3, 2.5e-3)
#: Template = mean of the reference site's FA after this many rounds of
#: registration: round 1 registers everyone to the first reference subject,
#: round 2 (one rebuild) to the round-1 mean, which removes most of the first
#: subject's intensity bias (its shape stays the template's shape).
TEMPLATE_ITERATIONS = 2
#: Site-mean estimators of the RISH maps in template space: "mean" (the
#: mask-normalised mean, one subject in memory at a time) or "median" (the
#: voxel-wise median of each subject's mask-normalised value where its warped
#: mask covers >= half the voxel: every subject's maps are kept in memory,
#: n x template voxels x orders x shells float32). docs/harmonization.md has
#: the measured comparison; the mean is the default.
SITE_MEANS = ("mean", "median")
#: How the ratio of the site means is formed (docs/harmonization.md, "The
#: one-signed residual on brains" has the measured comparison; "ratio" is the
#: default):
#: "ratio": ``E_ref / E_tar`` of every subject's maps warped to the template
#: (linear interpolation); "nearest": the same, the target's maps warped by
#: nearest neighbour (a coarser target is not blurred by upsampling);
#: "matched": the reference mean resampled through every target subject's
#: grid and back (the target's interpolation chain), over ``E_tar``;
#: "native-log": ``exp`` of the mean over target subjects of
#: ``log(E_ref on the subject's grid / its own RISH)``, the ratio formed on the
#: subject's grid before any resampling of its data. "matched" and
#: "native-log" need the "mean" site mean.
SCALE_ESTIMATORS = ("ratio", "nearest", "matched", "native-log")
#: The SH orders whose RISH each RISH contrast averages the (unit-median)
#: square roots of.
RISH_CONTRAST_ORDERS = {"rish-l2": (2,), "rish-l0": (0,), "rish-l0l2": (0, 2)}
#: The contrast whose target subjects register through the FA of their DWI
#: after the global site scaling (:func:`site_scaling_factors`,
#: :func:`site_scaled_fa`); its reference subjects and template use FA.
SITE_SCALED_CONTRAST = "fa-sitescaled"
#: The registration contrasts whose image is the masked FA, so their template
#: is an FA map (:func:`registration_image`; the tissue weights need it).
FA_TEMPLATE_CONTRASTS = ("fa", SITE_SCALED_CONTRAST)
#: The contrast of the mean b0 image (:func:`mean_b0`), which features hold
#: only when asked (``subject_features(..., b0=True)``).
B0_CONTRAST = "b0"
#: The contrast of artefacts written before the contrast was recorded.
LEGACY_REGISTRATION_CONTRAST = "fa"
#: Affine stages (dipy ``AffineRegistration``): iterations per pyramid level
#: (coarse -> fine), smoothing sigmas (voxels) and shrink factors. Small
#: counts suffice: the stages refine each other from a centre-of-mass start.
#: Checked on 24x28x22 phantoms (a known 14 deg / 9 mm motion recovered to
#: < 1.5 mm, tests) and HCP-size phantom FA (FA correlation 0.91 -> 0.95
#: affine, 0.99 with SyN; ~30 s affine + ~30 s SyN per subject).
AFFINE_LEVEL_ITERS = (100, 50, 10)
AFFINE_SIGMAS = (3.0, 1.0, 0.0)
AFFINE_FACTORS = (4, 2, 1)
#: Mutual-information histogram bins, and the number of voxels it samples:
#: grids up to this size are used densely, larger ones through dipy's regular
#: (deterministic) sampling of this many points. Measured on HCP-size FA
#: (3.66 M voxels, proportion 0.2): the affine stage takes 42 s instead of
#: 147 s and lands within 0.25 mm of the dense result. 300 000 (proportion
#: 0.08, s18-b): on an HCP-size brain phantom pair (finest level skipped,
#: rigid -> affine) the affine CPU fell from 6.5 to 4.0 s and the SyN that
#: follows landed on the same map (truth error 0.420 mm against 0.419).
MI_BINS = 32
MI_SAMPLES = 300_000
#: SyN iterations per level (coarse -> fine) and the cross-correlation
#: metric's window radius and smoothing of its gradient. Levels whose grid is
#: smaller than the CC window are dropped (small phantoms).
SYN_LEVEL_ITERS = (10, 10, 5)
#: The CC window radius is set in mm and converted to template voxels
#: (:func:`cc_radius_for`): 4 voxels at HCP's 1.25 mm as before, 2 at 2.5 mm.
#: A fixed 4 voxels at 2.5 mm (a 22 mm window) left the unpaired study's
#: white-matter edges misregistered: held-out RISH l0 +1.75 % after
#: harmonization (d 0.47), +2.8 % at b=3000; 2 voxels: +1.5 % and +1.5 %,
#: FA correlation with the truth 0.945 -> 0.952 (docs/harmonization.md).
CC_RADIUS_MM = 5.0
CC_RADIUS = 4                    # voxels at 1.25 mm; kept for callers that set it
CC_SIGMA_DIFF = 2.0
#: Fine template grids stop a pyramid at half resolution (its finest level's
#: iterations set to 0: dipy keeps the half-level affine, upsamples the SyN
#: field) where the half level's largest voxel side (2 x the template's) is at
#: most this many mm (:func:`registration_levels`; bench/harmonize_register_speed.py).
#: Affine: skipping the full level left the brain phantom's truth error equal
#: pair by pair at 1.25 mm (0.70-0.81x the time); at 2.5 mm it held on 58x70x58
#: brains but a small grid's known motion lost (FA corr 0.967 < 0.97): not there.
AFFINE_HALF_LEVEL_MAX_MM = 2.5
#: SyN: none (0). A 2.5 mm half level (HCP) was 2.7-3.1x faster at +0.01-0.04 mm
#: truth error, but held-out harmonised RISH lost more than today's jitter.
SYN_HALF_LEVEL_MAX_MM = 0.0
#: Registration grid (:func:`registration_grid_factor`): both images are
#: block-averaged by the largest integer factor whose coarse voxel (factor x
#: the image's largest voxel side) is at most this many mm, registered there
#: (pyramids and CC window of that grid), and the transform is mapped back to
#: the full grids (the SyN fields stay on the coarse grid; dipy interpolates
#: them). 0 (default): the images' own grids. 2.5: HCP's 1.25 mm is
#: registered at 2.5 mm, 2.5 mm grids on their own. Measured with 2.5 on
#: HCP-size brain phantoms (bench/harmonize_register_speed.py,
#: ``grid2_syn10``): truth error 0.37 / 0.43 / 0.42 mm against the full
#: grid's 0.40 / 0.42 / 0.36 (pairs 1-3; today's own jitter moved it -0.01 /
#: -0.03 / +0.07), at 0.42-0.49x its CPU; HCP fit 108.2 s per subject against
#: 116.6. Not the default: on a half-size brain at 1.25 mm (bench/harmonize.py
#: --pipeline --shape 56 68 56) the held-out harmonised RISH l0 error rose
#: from +0.37 / +0.31 / +0.31 % to +0.42 / +0.52 / +0.60 % (jitter +0.38 /
#: +0.32 / +0.32), as the SyN half level's did (docs/harmonization.md, Speed).
REGISTRATION_GRID_MM = 0.0
#: SyN iterations per level on a coarsened registration grid (factor > 1),
#: unless given: its finest level (the coarse grid itself) gets 10, not 5 as
#: on a full grid; 5 left pair 2's truth error at 0.46 mm instead of 0.43.
GRID_SYN_LEVEL_ITERS = (10, 10, 10)
#: SyN's displacement-field inversion (dipy ``inv_iter``, ``inv_tol``; four
#: inversions per iteration, ~25 % of a registration's CPU at HCP size): the
#: fixed-point iteration stops when the mean inversion residual is below
#: ``SYN_INV_TOL`` (dipy's default 1e-3) or after ``SYN_INV_ITER`` steps. Each
#: call starts from the previous inverse and converges in a few steps: 20 and
#: 5 steps gave identical results, so the tolerance decides. 1e-2 (s18-b):
#: the inversions' CPU 9.1 -> 7.0 s on an HCP-size brain phantom pair, truth
#: error 0.398 -> 0.318 mm (3e-3: 0.365). With the skipped affine level and
#: ``MI_SAMPLES`` (bench/harmonize_register_speed.py, 3 HCP-size pairs):
#: truth error 0.398 / 0.419 / 0.356 -> 0.323 / 0.393 / 0.380 mm (today's own
#: jitter: 0.397 / 0.421 / 0.400), warped FA moved 0.05-0.11 of today's
#: residual (jitter 0.45-0.57). 2.5 mm study grids feel only this tolerance
#: (no skipped level there; MI dense below ``MI_SAMPLES`` voxels).
SYN_INV_ITER = 20
SYN_INV_TOL = 1e-2
#: Shells of an artefact and a subject match when their nominal b-values are
#: closer than the gradient module's shell gap.
SHELL_TOLERANCE = SHELL_GAP
#: White matter for the evaluation: FA at or above this (in the brain mask,
#: measured before harmonization).
WM_FA_THRESHOLD = 0.3
#: RISH orders reported by :func:`evaluate_harmonization`.
EVAL_ORDERS = (0, 2, 4)
#: The evaluation's white matter on a subject's grid: the template-space one
#: (:func:`template_wm_mask`) resampled linearly as a 0/1 map, kept where at
#: least this (:func:`subject_wm_mask`): its boundary sits at the same world
#: position whatever the subject's grid, where nearest neighbour would move it
#: by up to half a template voxel with the grid's offset.
EVAL_MASK_MIN_FRACTION = 0.5
#: How the evaluation's white-matter masks were defined (the site table's
#: ``wm_mask`` column): "reference-template", once in template space from the
#: reference site (:func:`template_wm_mask`, :func:`subject_wm_mask`), the
#: same anatomy for every subject; "own-fa", each subject's own FA >=
#: ``WM_FA_THRESHOLD`` (a noisier site's FA moves its own mask, which then
#: counts as site effect).
EVAL_MASK_REFERENCE = "reference-template"
EVAL_MASK_OWN = "own-fa"
EVAL_MASKS = {
    EVAL_MASK_REFERENCE: f"white matter defined once in template space from the reference "
                          f"site (its subjects' mean FA, each warped through its registration, "
                          f">= {WM_FA_THRESHOLD:g} within the template mask), brought to each "
                          f"subject's grid through its registration (linear, kept where >= "
                          f"{EVAL_MASK_MIN_FRACTION:g}) and intersected with its brain mask",
    EVAL_MASK_OWN: f"each subject's own white matter: FA >= {WM_FA_THRESHOLD:g} in its brain mask, "
              f"before harmonization"}
#: Artefact folder layout and format.
ARTEFACT_FORMAT = "dmriflow-rish-harmonization"
#: Version 2 records the registration contrast; version 1 artefacts (no
#: contrast: FA) are still read. The content id hashes the same layout in
#: both (``CONTENT_ID_LAYOUT``), so version 1 ids stay valid.
ARTEFACT_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
CONTENT_ID_LAYOUT = 1
ARTEFACT_JSON = "artefact.json"
#: Sidecar key under which applied artefact content ids are listed (oldest first).
SIDECAR_KEY = "RISHHarmonizationApplied"

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
#: Resolution-matched registration (``register_fa(..., match_resolution=rule)``,
#: off by default): a subject whose voxels are coarser than the template's is
#: registered to the template blurred to its resolution, so both sides of the
#: metrics see the same partial volume. The blur is a Gaussian on the template
#: grid whose covariance is the difference of the two voxels' point-spread
#: covariances, ``k^2 (M_m M_m^T - M_s M_s^T)`` in world mm (``M``: an
#: affine's voxel edge vectors; per template axis, negative parts clipped to 0),
#: ``k`` per rule: "box" 1/sqrt(12), the SD of a voxel-wide box (the phantoms'
#: partial-volume model, ``sim.brain.anatomy``); "fwhm" ``FWHM_TO_SIGMA``, a
#: Gaussian of FWHM sqrt(v_m^2 - v_s^2); "box-linear" 1/2: the box's variance
#: v^2/12 plus trilinear resampling's mean variance v^2/6 (weights 1 - t, t at
#: offsets -t v, (1 - t) v add t (1 - t) v^2, 1/6 v^2 on average over t), which
#: the moving image undergoes into the template grid at its voxel size and the
#: reference scans did into the template at theirs.
#: docs/harmonization-studies.md has the rows.
#: The rules' names are ``harmonize_choices.RESOLUTION_MATCH_RULE_NAMES`` (the
#: command line's choices), in this order.
RESOLUTION_MATCH_RULES = {"box": 1.0 / math.sqrt(12.0), "box-linear": 0.5,
                          "fwhm": FWHM_TO_SIGMA}


class HarmonizationError(ValueError):
    """A harmonization cannot be fitted or applied; the message names the site,
    subject or artefact and the problem."""


# ----------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------
def _as_affine(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {a.shape}")
    return a


def _voxel_mm(affine) -> np.ndarray:
    """Voxel side lengths (mm) of a 4x4 voxel-to-world affine."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _same_grid(shape_a, affine_a, shape_b, affine_b, atol: float = 1e-3) -> bool:
    return (tuple(shape_a) == tuple(shape_b)
            and np.allclose(affine_a, affine_b, atol=atol))


#: Geometry of a dipy ``DiffeomorphicMap`` kept with a SyN transform (with its
#: two fields this rebuilds the map exactly; dipy returns SyN results as an
#: inverted map, so ``is_inverse`` and its own ``prealign`` must be kept).
_SYN_GEOMETRY = ("disp_shape", "disp_grid2world", "domain_shape", "domain_grid2world",
                 "codomain_shape", "codomain_grid2world", "prealign", "is_inverse")


@dataclass
class Transform:
    """Subject <-> template mapping: the affine stage's matrix plus, for SyN,
    dipy's forward/backward displacement fields (float32, ``(X, Y, Z, 3)``,
    mm, on the template grid) and map geometry. All parts are plain arrays:
    :meth:`save` writes NIfTI + JSON, never a pickle.

    ``prealign`` maps template world points to subject world points (dipy's
    ``AffineMap`` convention). :meth:`to_template` resamples a subject-grid
    image on the template grid, :meth:`to_subject` a template-grid image on
    the subject grid.
    """

    kind: str
    prealign: np.ndarray
    template_shape: tuple
    template_affine: np.ndarray
    subject_shape: tuple
    subject_affine: np.ndarray
    forward: np.ndarray | None = None
    backward: np.ndarray | None = None
    syn_geometry: dict | None = None
    _cache: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        check_choice("transform kind", self.kind, REGISTRATIONS)
        self.prealign = _as_affine(self.prealign)
        self.template_affine = _as_affine(self.template_affine)
        self.subject_affine = _as_affine(self.subject_affine)
        self.template_shape = tuple(int(n) for n in self.template_shape)
        self.subject_shape = tuple(int(n) for n in self.subject_shape)
        if self.kind == "syn":
            if self.forward is None or self.backward is None or not self.syn_geometry:
                raise ValueError("a SyN transform needs forward and backward fields and the "
                                 "map geometry")
            for name in ("forward", "backward"):
                f = np.asarray(getattr(self, name), dtype=np.float32)
                if f.ndim != 4 or f.shape[3] != 3:
                    raise ValueError(f"{name} field must be (X, Y, Z, 3), got {f.shape}")
                setattr(self, name, np.ascontiguousarray(f))
            if self.forward.shape != self.backward.shape:
                raise ValueError(f"forward {self.forward.shape} and backward "
                                 f"{self.backward.shape} fields differ in shape")
            g = dict(self.syn_geometry)
            missing = [k for k in _SYN_GEOMETRY if k not in g]
            if missing:
                raise ValueError(f"SyN geometry lacks {', '.join(missing)}")
            for k in ("disp_grid2world", "domain_grid2world", "codomain_grid2world",
                      "prealign"):
                g[k] = None if g[k] is None else _as_affine(g[k])
            for k in ("disp_shape", "domain_shape", "codomain_shape"):
                g[k] = None if g[k] is None else tuple(int(n) for n in g[k])
            g["is_inverse"] = bool(g["is_inverse"])
            if g["disp_shape"] != self.forward.shape[:3]:
                raise ValueError(f"fields of shape {self.forward.shape[:3]} but displacement "
                                 f"grid {g['disp_shape']}")
            self.syn_geometry = g
        if self.kind == "identity" and not _same_grid(self.template_shape, self.template_affine,
                                                      self.subject_shape, self.subject_affine):
            raise HarmonizationError(
                f"registration 'identity' needs the subject on the template grid: subject "
                f"grid {self.subject_shape} differs from template grid {self.template_shape} "
                f"or their affines differ; register instead (registration='syn')")

    @classmethod
    def identity(cls, shape, affine) -> "Transform":
        return cls("identity", np.eye(4), shape, affine, shape, affine)

    def _map(self):
        if self._cache is None:
            if self.kind == "syn":
                from dipy.align.imwarp import DiffeomorphicMap
                g = self.syn_geometry
                m = DiffeomorphicMap(3, g["disp_shape"], disp_grid2world=g["disp_grid2world"],
                                     domain_shape=g["domain_shape"],
                                     domain_grid2world=g["domain_grid2world"],
                                     codomain_shape=g["codomain_shape"],
                                     codomain_grid2world=g["codomain_grid2world"],
                                     prealign=g["prealign"])
                m.forward, m.backward, m.is_inverse = self.forward, self.backward, g["is_inverse"]
            elif self.kind == "affine":
                from dipy.align.imaffine import AffineMap
                m = AffineMap(self.prealign, domain_grid_shape=self.template_shape,
                              domain_grid2world=self.template_affine,
                              codomain_grid_shape=self.subject_shape,
                              codomain_grid2world=self.subject_affine)
            else:
                m = None
            self._cache = m
        return self._cache

    def on_grids(self, template_shape, template_affine, subject_shape,
                 subject_affine) -> "Transform":
        """The same mapping between other template and subject grids (the same
        spaces, e.g. the full grids of a registration on coarse ones): the
        affine is in world mm and the SyN fields keep their own grid."""
        g = None
        if self.syn_geometry is not None:    # dipy's inverted map: domain = subject
            grids = [(tuple(template_shape), _as_affine(template_affine)),
                     (tuple(subject_shape), _as_affine(subject_affine))]
            if self.syn_geometry["is_inverse"]:
                grids.reverse()
            g = {**self.syn_geometry, "domain_shape": grids[0][0],
                 "domain_grid2world": grids[0][1], "codomain_shape": grids[1][0],
                 "codomain_grid2world": grids[1][1]}
        return Transform(self.kind, self.prealign, template_shape, template_affine,
                         subject_shape, subject_affine, forward=self.forward,
                         backward=self.backward, syn_geometry=g)

    def to_template(self, image: np.ndarray, interpolation: str = "linear") -> np.ndarray:
        """A subject-grid 3D image resampled on the template grid (float32)."""
        return self._resample(image, interpolation, to_subject=False)

    def to_subject(self, image: np.ndarray, interpolation: str = "linear") -> np.ndarray:
        """A template-grid 3D image resampled on the subject grid (float32);
        samples outside the template's field of view are 0."""
        return self._resample(image, interpolation, to_subject=True)

    def to_template_many(self, images: Sequence[np.ndarray],
                         interpolation: str = "linear") -> np.ndarray:
        """Subject-grid 3D images on the template grid, (X, Y, Z, n) float32:
        the bits of :meth:`to_template` of each, for SyN in one pass
        (:func:`~dmriflow.interfaces.resample.warp_many`)."""
        out = self._resample_many(images, interpolation, to_subject=False, at=None)
        return out.reshape(tuple(self.template_shape) + (len(images),))

    def to_subject_many(self, images: Sequence[np.ndarray], at: np.ndarray | None = None,
                        interpolation: str = "linear") -> np.ndarray:
        """Template-grid 3D images on the subject grid, (X, Y, Z, n) float32, or
        at its voxels ``at`` only (C-order flat indices; (len(at), n)): the
        bits of :meth:`to_subject` of each, for SyN in one pass."""
        out = self._resample_many(images, interpolation, to_subject=True, at=at)
        return out if at is not None else \
            out.reshape(tuple(self.subject_shape) + (len(images),))

    def _resample_many(self, images, interpolation: str, to_subject: bool, at) -> np.ndarray:
        """(voxels of the destination or ``at``, n) float32 of :meth:`_resample`
        of each image; SyN with linear interpolation through
        :func:`~dmriflow.interfaces.resample.warp_many` (the positions once,
        dipy's bits), anything else image by image."""
        images = [np.asarray(im) for im in images]
        src = self.template_shape if to_subject else self.subject_shape
        for im in images:
            if im.shape != src:
                raise ValueError(f"image shape {im.shape} != "
                                 f"{'template' if to_subject else 'subject'} grid {src}")
        if self.kind != "syn" or interpolation != "linear" or \
                len(images) < resample.MIN_IMAGES:
            cols = [self._resample(im, interpolation, to_subject).reshape(-1) for im in images]
            return np.stack([c if at is None else c[at] for c in cols], axis=1)
        (src_affine, dst_shape, dst_affine) = (
            (self.template_affine, self.subject_shape, self.subject_affine) if to_subject
            else (self.subject_affine, self.template_shape, self.template_affine))
        params = resample.warp_parameters(self._map(), not to_subject,
                                          np.linalg.inv(src_affine), dst_shape, dst_affine)
        return resample.warp_many(images, params, at)

    def _resample(self, image: np.ndarray, interpolation: str, to_subject: bool) -> np.ndarray:
        """One direction of the transform: the map's inverse towards the subject."""
        subject = ("subject", self.subject_shape, self.subject_affine)
        template = ("template", self.template_shape, self.template_affine)
        (src_name, src_shape, src_affine), (_, dst_shape, dst_affine) = (
            (template, subject) if to_subject else (subject, template))
        image = np.asarray(image)
        if image.shape != src_shape:
            raise ValueError(f"image shape {image.shape} != {src_name} grid {src_shape}")
        if self.kind == "identity":
            return image.astype(np.float32, copy=True)
        kw = {}
        if self.kind == "syn":   # sample explicitly: source image -> destination grid
            kw = dict(image_world2grid=np.linalg.inv(src_affine),
                      out_shape=dst_shape, out_grid2world=dst_affine)
        m = self._map()
        transform = m.transform_inverse if to_subject else m.transform
        return np.asarray(transform(image.astype(np.float32, copy=False),
                                    interpolation=interpolation, **kw), dtype=np.float32)

    def describe(self) -> dict:
        """JSON-ready parameters (the fields are referenced, not included)."""
        g = None
        if self.syn_geometry is not None:
            g = {k: (v.tolist() if isinstance(v, np.ndarray) else
                     list(v) if isinstance(v, tuple) else v)
                 for k, v in self.syn_geometry.items()}
        return {"kind": self.kind, "prealign": self.prealign.tolist(),
                "template_shape": list(self.template_shape),
                "template_affine": self.template_affine.tolist(),
                "subject_shape": list(self.subject_shape),
                "subject_affine": self.subject_affine.tolist(), "syn_geometry": g}

    def save(self, prefix) -> list[Path]:
        """Write ``<prefix>.json`` (+ ``_forward``/``_backward.nii.gz`` for SyN),
        each atomically; the JSON lists the fields' sha256."""
        prefix = Path(prefix)
        meta = self.describe()
        written = []
        if self.kind == "syn":
            meta["fields"] = {}
            aff = self.syn_geometry["disp_grid2world"]
            for name in ("forward", "backward"):
                p = save_nifti(getattr(self, name), np.eye(4) if aff is None else aff,
                               _field_file(prefix, name))
                meta["fields"][name] = {"file": p.name, "sha256": file_sha256(p)}
                written.append(p)
        written.append(write_json(meta, prefix.parent / f"{prefix.name}.json"))
        return written

    @classmethod
    def load(cls, prefix) -> "Transform":
        """Read a transform written by :meth:`save`, checking the fields' hashes."""
        prefix = Path(prefix)
        meta_path = prefix.parent / f"{prefix.name}.json"
        meta = _read_json(meta_path, "transform")
        try:
            kw = {k: meta[k] for k in ("kind", "prealign", "template_shape", "template_affine",
                                       "subject_shape", "subject_affine", "syn_geometry")}
        except KeyError as exc:
            raise InputError(meta_path, f"transform JSON lacks the key {exc}") from None
        if meta["kind"] == "syn":
            for name in ("forward", "backward"):
                entry = (meta.get("fields") or {}).get(name)
                if not entry:
                    raise InputError(meta_path, f"SyN transform lists no {name} field")
                kw[name] = read_checked_nifti(prefix.parent / entry["file"], entry["sha256"],
                                              f"{name} displacement field")
        try:
            return cls(**kw)
        except (ValueError, TypeError) as exc:
            raise InputError(meta_path, f"invalid transform ({exc})") from None


def _field_file(prefix: Path, name: str) -> Path:
    """Where :meth:`Transform.save` writes the ``name`` ("forward"/"backward") field."""
    return prefix.parent / f"{prefix.name}_{name}.nii.gz"


@dataclass(frozen=True)
class SavedTransform:
    """A transform as :meth:`Transform.save` wrote it, kept as its files: an
    artefact stores it (:meth:`save`) by copying them, the SyN fields
    checked against the sha256 its JSON lists, instead of decoding and
    re-encoding two HCP-size fields (the same bytes: the encoding is
    deterministic). :meth:`load` gives the :class:`Transform`."""

    prefix: Path

    @property
    def meta(self) -> dict:
        return _read_json(self.prefix.parent / f"{self.prefix.name}.json", "transform")

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def load(self) -> Transform:
        return Transform.load(self.prefix)

    def save(self, prefix) -> list[Path]:
        """:meth:`Transform.save`'s files under ``prefix``, copied."""
        prefix, meta, written = Path(prefix), self.meta, []
        for name, entry in sorted((meta.get("fields") or {}).items(), reverse=True):
            src = self.prefix.parent / entry["file"]       # forward, then backward
            p = copy_file(src, _field_file(prefix, name))
            if file_sha256(p) != entry["sha256"]:
                p.unlink()
                raise InputError(src, f"{name} displacement field changed since it was "
                                      f"written (sha256 mismatch)")
            meta["fields"][name] = {"file": p.name, "sha256": entry["sha256"]}
            written.append(p)
        written.append(write_json(meta, prefix.parent / f"{prefix.name}.json"))
        return written


def _syn_levels(shape, level_iters: Sequence[int], radius: int) -> list[int]:
    """Drop the coarsest SyN levels whose grid is smaller than the CC window."""
    iters = [int(i) for i in level_iters]
    while len(iters) > 1 and min(shape) // 2 ** (len(iters) - 1) < 2 * radius + 1:
        iters = iters[1:]
    return iters


def cc_radius_for(affine) -> int:
    """The SyN cross-correlation window radius (voxels) for a template grid:
    ``CC_RADIUS_MM`` over its mean voxel size, at least 1."""
    zooms = _voxel_mm(_as_affine(affine))
    return max(1, int(math.floor(CC_RADIUS_MM / float(zooms.mean()) + 0.5)))


def _half_level_kept(iters: Sequence[int], half_level_mm: float, bound_mm: float) -> tuple:
    """``iters`` with the finest level skipped (0) if the half level is at most ``bound_mm``."""
    iters = tuple(int(i) for i in iters)
    if len(iters) > 1 and half_level_mm <= bound_mm + 1e-6:
        return iters[:-1] + (0,)
    return iters


def registration_levels(static_affine, affine_level_iters: Sequence[int] | None = None,
                        syn_level_iters: Sequence[int] | None = None) -> dict:
    """The pyramids :func:`register_fa` uses on a template grid.

    Given iterations are kept as they are; a default (None) is
    ``AFFINE_LEVEL_ITERS``/``SYN_LEVEL_ITERS`` with the finest level skipped
    where the grid is fine enough (``AFFINE_HALF_LEVEL_MAX_MM``,
    ``SYN_HALF_LEVEL_MAX_MM``). Returns ``{"affine_level_iters": [...],
    "syn_level_iters": [...]}``."""
    zooms = _voxel_mm(_as_affine(static_affine))
    half_mm = 2.0 * float(zooms.max())
    aff = (_half_level_kept(AFFINE_LEVEL_ITERS, half_mm, AFFINE_HALF_LEVEL_MAX_MM)
           if affine_level_iters is None else tuple(int(i) for i in affine_level_iters))
    syn = (_half_level_kept(SYN_LEVEL_ITERS, half_mm, SYN_HALF_LEVEL_MAX_MM)
           if syn_level_iters is None else tuple(int(i) for i in syn_level_iters))
    return {"affine_level_iters": list(aff), "syn_level_iters": list(syn)}


def registration_grid_factor(affine, grid_mm: float | None = None) -> int:
    """The block size (voxels, >= 1) that brings an image's largest voxel side
    to at most ``grid_mm`` (default ``REGISTRATION_GRID_MM``); 1 = its own grid."""
    grid_mm = REGISTRATION_GRID_MM if grid_mm is None else float(grid_mm)
    zooms = _voxel_mm(_as_affine(affine))
    return max(1, int(math.floor(grid_mm / float(zooms.max()) + 1e-6)))


def block_mean(image: np.ndarray, affine, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """``image`` averaged over blocks of ``factor``^3 voxels (edges padded by
    replication) and the coarse grid's affine: coarse voxel j is centred on
    the mean of its fine voxels, ``factor * j + (factor - 1) / 2``."""
    image = np.asarray(image, dtype=np.float32)
    f = int(factor)
    pad = [(0, (-n) % f) for n in image.shape]
    padded = np.pad(image, pad, mode="edge")
    c = [n // f for n in padded.shape]
    coarse = padded.reshape(c[0], f, c[1], f, c[2], f).mean(axis=(1, 3, 5), dtype=np.float64)
    return coarse.astype(np.float32), block_grid_affine(affine, f)


def block_grid_affine(affine, factor: int) -> np.ndarray:
    """The affine of the grid of ``factor``^3 blocks (:func:`block_mean`)."""
    scale = np.diag([float(factor)] * 3 + [1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return _as_affine(affine) @ scale


def registration_grids(static_affine, moving_affine=None, grid_mm: float | None = None,
                       syn_level_iters=None) -> tuple[int, int, Sequence[int] | None]:
    """The block factors of the moving and the static (template) image's
    registration grids (:func:`registration_grid_factor`; the moving one is
    the static one's when not given) and the SyN iterations to run there:
    the given ones, else ``GRID_SYN_LEVEL_ITERS`` when either grid is
    coarsened (None on full grids: :func:`registration_levels` decides).
    What :func:`register_fa` does and :func:`registration_record` records."""
    static = registration_grid_factor(static_affine, grid_mm)
    moving = static if moving_affine is None else registration_grid_factor(moving_affine,
                                                                           grid_mm)
    if syn_level_iters is None and max(moving, static) > 1:
        syn_level_iters = GRID_SYN_LEVEL_ITERS
    return moving, static, syn_level_iters


def registration_record(static_affine, options: dict | None = None) -> dict:
    """What :func:`register_fa` with ``options`` does on a template grid, for
    the artefact: the registration grid's factor and voxel, and the pyramids
    and CC window on that grid."""
    opts = dict(options or {})
    _, factor, syn_level_iters = registration_grids(static_affine, None, opts.get("grid_mm"),
                                                    opts.get("syn_level_iters"))
    grid_affine = block_grid_affine(static_affine, factor)
    zooms = _voxel_mm(grid_affine)
    return {**registration_levels(grid_affine, opts.get("affine_level_iters"), syn_level_iters),
            "cc_radius": int(opts.get("cc_radius") or cc_radius_for(grid_affine)),
            "grid_factor": factor, "grid_voxel_mm": [round(float(z), 6) for z in zooms],
            "mi_bins": MI_BINS, "mi_samples": MI_SAMPLES,
            "affine_zero_levels": "skipped",
            "syn_inv_iter": SYN_INV_ITER, "syn_inv_tol": SYN_INV_TOL,
            # recorded only when on: default artefacts are unchanged
            **({"match_resolution": opts["match_resolution"]}
               if opts.get("match_resolution") else {})}


def _mi_metric(level_iters: Sequence[int], sampling: float | None):
    """dipy's mutual-information metric (``MI_BINS``, ``sampling``) for an
    ``AffineRegistration`` with ``level_iters`` (coarse -> fine) that skips the
    levels with 0 iterations.

    dipy runs L-BFGS-B with ``maxfun=0`` on such a level, which still makes
    one iteration (3-4 metric evaluations) and moves the transform: on an HCP
    grid's finest level, 0.73 M sampled points per evaluation, 11 evaluations
    over the three stages, ~20 % of the affine stage's CPU, and a 0.4 mm
    translation change in the translation stage (bench/harmonize_register_speed.py).
    Here the metric does no work on such a level and reports a flat minimum
    (distance 0, gradient 0), so the optimizer stops at its start (identity
    parameters) and the transform of the level above is kept, as
    ``AFFINE_HALF_LEVEL_MAX_MM`` means. dipy sets the metric up once per level,
    coarse to fine, in every ``optimize`` call: the set-up count gives the level."""
    from dipy.align.imaffine import MutualInformationMetric

    iters = [int(i) for i in level_iters]

    class LevelSkippingMI(MutualInformationMetric):
        setups = 0
        skipping = False

        def setup(self, transform, static, moving, **kwargs):
            self.skipping = iters[self.setups % len(iters)] == 0
            self.setups += 1
            if not self.skipping:
                super().setup(transform, static, moving, **kwargs)

        def distance_and_gradient(self, params):
            if self.skipping:
                return 0.0, np.zeros_like(params)
            return super().distance_and_gradient(params)

    return LevelSkippingMI(nbins=MI_BINS, sampling_proportion=sampling)


def resolution_match_sigma(moving_affine, static_affine, rule: str | float = "box"
                           ) -> np.ndarray:
    """Per static-grid axis, the Gaussian SD (static voxels, >= 0) that blurs
    an image on ``static_affine``'s grid to the resolution of
    ``moving_affine``'s voxels (``RESOLUTION_MATCH_RULES``; a positive number
    is the factor ``k`` itself, for studies): 0 on axes where the moving
    voxels are not coarser."""
    if isinstance(rule, (int, float)) and not isinstance(rule, bool) and rule > 0:
        k = float(rule)
    else:
        check_choice("match_resolution", rule, tuple(RESOLUTION_MATCH_RULES))
        k = RESOLUTION_MATCH_RULES[rule]
    m = _as_affine(moving_affine)[:3, :3]
    s = _as_affine(static_affine)[:3, :3]
    s_inv = np.linalg.inv(s)
    cov = k * k * (s_inv @ (m @ m.T - s @ s.T) @ s_inv.T)
    return np.sqrt(np.maximum(np.diag(cov), 0.0))


def discrete_gaussian_kernel(sigma: float) -> np.ndarray:
    """The discrete analogue of a Gaussian of SD ``sigma`` (voxels):
    ``exp(-t) I_n(t)`` with ``t = sigma^2`` (Lindeberg), whose variance is
    exactly ``t`` also below a voxel, where a sampled Gaussian loses almost
    all of it (SD 0.19 voxels: 1e-6 instead of 0.037), float64, sums to 1,
    odd length (radius ``ceil(4 sigma) + 1``)."""
    from scipy.special import ive
    radius = int(math.ceil(4.0 * sigma)) + 1
    k = ive(np.abs(np.arange(-radius, radius + 1)), sigma * sigma)
    return k / k.sum()


def resolution_matched(static: np.ndarray, static_affine, moving_affine,
                       rule: str | float | None) -> np.ndarray:
    """``static`` blurred to ``moving_affine``'s resolution
    (:func:`resolution_match_sigma`, a :func:`discrete_gaussian_kernel` per
    axis, edges replicated), float32; itself where ``rule`` is None or the
    moving voxels are not coarser."""
    static = np.asarray(static, dtype=np.float32)
    if rule is None:
        return static
    sigma = resolution_match_sigma(moving_affine, static_affine, rule)
    if not np.any(sigma > 0):
        return static
    return discrete_gaussian_blur(static, sigma)


def discrete_gaussian_blur(image: np.ndarray, sigma) -> np.ndarray:
    """``image`` (3D) blurred by a :func:`discrete_gaussian_kernel` of SD
    ``sigma[axis]`` voxels along each axis where it is > 0 (separable, in
    float64, edges replicated), float32."""
    from scipy import ndimage
    out = np.asarray(image, dtype=np.float64)
    for axis, sd in enumerate(sigma):
        if sd > 0:
            out = ndimage.correlate1d(out, discrete_gaussian_kernel(float(sd)), axis=axis,
                                      mode="nearest")
    return out.astype(np.float32)


def register_fa(moving_fa: np.ndarray, moving_affine, static_fa: np.ndarray, static_affine,
                kind: str = "syn", *, affine_level_iters: Sequence[int] | None = None,
                syn_level_iters: Sequence[int] | None = None,
                cc_radius: int | None = None, cc_sigma_diff: float = CC_SIGMA_DIFF,
                grid_mm: float | None = None,
                match_resolution: str | float | None = None) -> Transform:
    """Register a subject FA map (moving) to the template FA (static).

    ``kind="syn"``: centre of mass -> translation -> rigid -> affine (mutual
    information, ``AFFINE_*`` pyramid), then symmetric diffeomorphic (SyN,
    cross-correlation; window ``cc_radius`` voxels, default
    :func:`cc_radius_for` the template) from that prealignment. ``"affine"``
    stops after the affine stage; ``"identity"`` checks that both are on one
    grid. Level iterations: :func:`registration_levels` (None: by the
    template's voxel size). ``grid_mm`` (default ``REGISTRATION_GRID_MM``):
    register on coarser grids (:func:`registration_grid_factor`,
    :func:`block_mean`; levels and CC window by the coarse template grid);
    the transform returned maps the full grids. ``match_resolution`` (a rule
    of ``RESOLUTION_MATCH_RULES``; None, the default: off): both stages see
    the static image blurred to the moving image's voxels where those are
    coarser (:func:`resolution_matched`, on the registration grid).
    """
    check_choice("registration", kind, REGISTRATIONS)
    moving_affine, static_affine = _as_affine(moving_affine), _as_affine(static_affine)
    moving = np.asarray(moving_fa, dtype=np.float32)
    static = np.asarray(static_fa, dtype=np.float32)
    if moving.ndim != 3 or static.ndim != 3:
        raise ValueError(f"FA maps must be 3D, got {moving.shape} and {static.shape}")
    if kind == "identity":
        return Transform("identity", np.eye(4), static.shape, static_affine, moving.shape,
                         moving_affine)
    *factors, grid_syn_iters = registration_grids(static_affine, moving_affine, grid_mm,
                                                  syn_level_iters)
    if max(factors) > 1:
        coarse = register_fa(*block_mean(moving, moving_affine, factors[0]),
                             *block_mean(static, static_affine, factors[1]), kind,
                             affine_level_iters=affine_level_iters,
                             syn_level_iters=grid_syn_iters, cc_radius=cc_radius,
                             cc_sigma_diff=cc_sigma_diff, grid_mm=0.0,
                             match_resolution=match_resolution)
        return coarse.on_grids(static.shape, static_affine, moving.shape, moving_affine)
    static = resolution_matched(static, static_affine, moving_affine, match_resolution)
    from dipy.align.imaffine import AffineRegistration, transform_centers_of_mass
    from dipy.align.transforms import (AffineTransform3D, RigidTransform3D,
                                       TranslationTransform3D)
    levels = registration_levels(static_affine, affine_level_iters, syn_level_iters)
    affine_level_iters, syn_level_iters = levels["affine_level_iters"], levels["syn_level_iters"]
    prealign = transform_centers_of_mass(static, static_affine, moving, moving_affine).affine
    n = len(affine_level_iters)
    sampling = MI_SAMPLES / static.size if static.size > MI_SAMPLES else None
    reg = AffineRegistration(metric=_mi_metric(affine_level_iters, sampling),
                             level_iters=list(affine_level_iters),
                             sigmas=list(AFFINE_SIGMAS[-n:]), factors=list(AFFINE_FACTORS[-n:]),
                             verbosity=0)
    for stage in (TranslationTransform3D(), RigidTransform3D(), AffineTransform3D()):
        prealign = reg.optimize(static, moving, stage, None, static_grid2world=static_affine,
                                moving_grid2world=moving_affine,
                                starting_affine=prealign).affine
    if kind == "affine":
        return Transform("affine", prealign, static.shape, static_affine, moving.shape,
                         moving_affine)
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric
    radius = cc_radius_for(static_affine) if cc_radius is None else int(cc_radius)
    iters = _syn_levels(static.shape, syn_level_iters, radius)
    radius = min(radius, max(1, (min(static.shape) // 2 ** (len(iters) - 1) - 1) // 2))
    sdr = SymmetricDiffeomorphicRegistration(CCMetric(3, sigma_diff=cc_sigma_diff, radius=radius),
                                             level_iters=iters, inv_iter=SYN_INV_ITER,
                                             inv_tol=SYN_INV_TOL)
    logger = logging.getLogger("dipy")
    level = logger.level
    logger.setLevel(logging.WARNING)      # dipy logs every pyramid level at INFO
    try:
        mapping = sdr.optimize(static, moving, static_grid2world=static_affine,
                               moving_grid2world=moving_affine, prealign=prealign)
    finally:
        logger.setLevel(level)
    geometry = {k: getattr(mapping, k) for k in _SYN_GEOMETRY}
    return Transform("syn", prealign, static.shape, static_affine, moving.shape, moving_affine,
                     forward=np.asarray(mapping.forward, dtype=np.float32),
                     backward=np.asarray(mapping.backward, dtype=np.float32),
                     syn_geometry=geometry)


# ----------------------------------------------------------------------------
# Subject inputs
# ----------------------------------------------------------------------------
@dataclass
class SubjectFeatures:
    """What the fit needs of one subject: FA (3D) and its affine, the brain
    mask, per-shell RISH maps ``{shell: (X, Y, Z, lmax/2 + 1)}`` float32, an
    id, and the content hash(es) of the files they came from (``sha256``: a
    string or ``{name: sha256}``; None = a hash of the arrays themselves)."""

    subject: str
    fa: np.ndarray
    affine: np.ndarray
    mask: np.ndarray
    rish: dict
    sha256: str | dict | None = None
    #: ``(sigma / S0)^2`` per voxel and ``{shell: per-order gain}`` of the RISH
    #: noise floor (:func:`relative_noise_variance`, :func:`rish_noise_gain`;
    #: None: not estimated, e.g. fewer than ``NOISE_MIN_B0`` b0 volumes).
    noise_var: np.ndarray | None = None
    noise_gain: dict | None = None
    #: The mean of the b0 volumes (X, Y, Z) float32, 0 outside the mask
    #: (:func:`mean_b0`; None: not computed), for ``B0_CONTRAST``.
    b0: np.ndarray | None = None

    def content_hash(self):
        """The given ``sha256``, else sha256 over the arrays (FA, mask, affine, RISH)."""
        if self.sha256:
            return self.sha256
        h = hashlib.sha256()
        for a in (self.fa, self.mask, self.affine):
            h.update(np.ascontiguousarray(a).tobytes())
        for b in sorted(self.rish):
            h.update(f"{float(b):g}".encode())
            h.update(np.ascontiguousarray(self.rish[b], dtype=np.float32).tobytes())
        if self.noise_var is not None:
            h.update(np.ascontiguousarray(self.noise_var, dtype=np.float32).tobytes())
        if self.b0 is not None:
            h.update(b"b0")
            h.update(np.ascontiguousarray(self.b0, dtype=np.float32).tobytes())
        return h.hexdigest()


#: A subject input: the features, or a zero-argument callable returning them
#: (loaded when needed and released after, so a cohort is never all in memory).
SubjectInput = SubjectFeatures | Callable[[], SubjectFeatures]


def dti_tensor(dwi: DWI, max_bval: float = DTI_MAX_BVAL):
    """The tensor fit (:class:`~dmriflow.interfaces.dti.TensorFit`: FA, MD ...
    float32, 0 outside the mask) to the b0s and shells up to ``max_bval``."""
    from . import dti
    shells = dti_shells(dwi.gtab, max_bval)
    return dti.fit_dwi(dwi, volumes=dwi.gtab.select_shells(shells))   # no copy of the series


def dti_fa(dwi: DWI, max_bval: float = DTI_MAX_BVAL) -> np.ndarray:
    """FA (float32, 0 outside the mask) from the b0s and shells up to ``max_bval``."""
    return dti_tensor(dwi, max_bval).fa


def rish_maps(dwi: DWI, lmax: int, shells: Sequence[float] | None = None,
              chunk_size: int | None = None) -> dict:
    """Per-shell RISH maps {shell: (X, Y, Z, lmax/2 + 1)} float32 of a DWI.

    The same numbers as ``sh.fit_shells(dwi, lmax)[b].rish()`` (b0-normalised
    least-squares fit, 0 outside the mask or where the mean b0 <= 0), but
    the SH coefficients are never stored: one float32 product per chunk of
    mask voxels gives all shells' coefficients, which are squared and summed
    per order at once (an HCP subject at lmax 8: 0.2 GB of RISH maps instead
    of 2 GB of coefficients).
    """
    gtab = dwi.gtab
    shells = gtab.shells if shells is None else _select_shells(dwi, shells)
    if not gtab.b0s_mask.any():
        raise HarmonizationError(f"{dwi.paths.get('dwi', 'DWI')}: no b0 volume to normalise")
    models = [sh.SHModel(gtab, lmax, shell=b) for b in shells]
    k = sh.n_coeffs(lmax)
    weights = np.concatenate([m.projection()[:, :k] for m in models]
                             + [models[0].projection()[:, -1:]], axis=1).astype(np.float32)
    starts = sh.order_starts(lmax)
    n_vox = int(np.prod(dwi.mask.shape))
    out = {b: np.zeros((n_vox, starts.size), dtype=np.float32) for b in shells}
    where_all = dwi.masked_index()
    if chunk_size is None:
        chunk_size = sh.chunk_voxels(len(gtab), None)
    pos = 0
    for rows in dwi.masked(int(chunk_size)):
        proj = rows @ weights
        s0 = proj[:, -1]
        inv = np.zeros_like(s0)
        np.divide(1.0, s0, out=inv, where=s0 > 0)
        where = where_all[pos:pos + rows.shape[0]]
        pos += rows.shape[0]
        for j, b in enumerate(shells):
            c = proj[:, j * k:(j + 1) * k] * inv[:, None]
            out[b][where] = np.add.reduceat(np.square(c), starts, axis=1)
    return {b: r.reshape(dwi.mask.shape + (starts.size,)) for b, r in out.items()}


#: Noise floor of RISH (issue 17, item 3: noise-aware scale maps). Noise of
#: variance ``sigma^2`` per DWI adds, through the SH least-squares fit of a
#: shell (pseudo-inverse ``P``), ``(sigma / S0)^2 * sum over order-l rows of
#: |P_j|^2`` to the expected b0-normalised ``R_l`` (:func:`rish_noise_gain`):
#: with ~N uniform directions about ``(2l + 1) 4 pi / N`` per unit relative
#: variance, the same for every order's coefficient, so it is the larger
#: share of l4 and of high b. Removed from the site means, a site's RISH is
#: not "corrected" for its noise level. A debiased site mean is kept at
#: least this share of the measured one (a voxel whose noise estimate
#: exceeds its RISH keeps a small positive value, so ratios stay defined).
NOISE_FLOOR_MIN_FRACTION = 0.05
#: Fewest b0 volumes the noise estimate needs (their spread per voxel).
NOISE_MIN_B0 = 2


def rish_noise_gain(gtab: GradientTable, lmax: int, shells: Sequence[float]) -> dict:
    """``{shell: (lmax/2 + 1,) float64}``: the expected noise term of each
    order's b0-normalised RISH per unit relative noise variance
    ``(sigma / S0)^2`` - the summed squared norms of that order's rows of the
    shell's SH pseudo-inverse (the same fit as :func:`rish_maps`)."""
    starts = sh.order_starts(lmax)
    return {b: np.add.reduceat(np.square(sh.SHModel(gtab, lmax, shell=b).pinv).sum(axis=1),
                               starts) for b in shells}


def relative_noise_variance(dwi: DWI) -> tuple[np.ndarray, float]:
    """``((sigma / S0)^2`` per mask voxel (X, Y, Z) float32, 0 elsewhere; ``sigma``).

    ``sigma``: the subject's noise standard deviation, the square root of the
    mean over the mask of each voxel's unbiased variance across the b0
    volumes (one sigma per subject: a spatially uniform noise level; the b0s
    must be motion-corrected). ``S0``: the voxel's mean b0, the RISH
    normalisation. Raises HarmonizationError with fewer than
    ``NOISE_MIN_B0`` b0 volumes."""
    b0 = np.flatnonzero(dwi.gtab.b0s_mask)
    if b0.size < NOISE_MIN_B0:
        raise HarmonizationError(f"{dwi.paths.get('dwi', 'DWI')}: the RISH noise floor needs "
                                 f">= {NOISE_MIN_B0} b0 volumes, has {b0.size}")
    s0 = np.zeros(int(np.prod(dwi.mask.shape)), dtype=np.float64)
    where_all, pos, var_sum, n = dwi.masked_index(), 0, 0.0, 0
    for rows in dwi.masked(sh.chunk_voxels(len(dwi.gtab), None)):
        v = rows[:, b0].astype(np.float64)
        s0[where_all[pos:pos + rows.shape[0]]] = v.mean(axis=1)
        pos += rows.shape[0]
        var_sum += float(v.var(axis=1, ddof=1).sum())
        n += rows.shape[0]
    sigma2 = var_sum / max(n, 1)
    rel = np.zeros_like(s0)
    np.divide(sigma2, np.square(s0), out=rel, where=s0 > 0)
    return rel.reshape(dwi.mask.shape).astype(np.float32), math.sqrt(sigma2)


def noise_term(noise_var: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """The expected noise share of RISH (X, Y, Z, orders): ``noise_var * gain``
    (:func:`relative_noise_variance`, :func:`rish_noise_gain`)."""
    return (np.asarray(noise_var, dtype=np.float32)[..., None]
            * np.asarray(gain, dtype=np.float32))


def debiased_rish(rish: np.ndarray, noise: np.ndarray,
                  min_fraction: float = NOISE_FLOOR_MIN_FRACTION) -> np.ndarray:
    """RISH less its expected noise share ``noise`` (:func:`noise_term`), at
    least ``min_fraction`` of the measured. Applied to means (site means of
    RISH and of the noise share): clipping single noisy voxels would bias
    their mean upwards where the noise is most of the signal (l4)."""
    r = np.asarray(rish, dtype=np.float32)
    return np.maximum(r - noise, np.float32(min_fraction) * r)


def mean_b0(dwi: DWI) -> np.ndarray:
    """The mean of ``dwi``'s b0 volumes per mask voxel (X, Y, Z) float32, 0
    elsewhere: the T2-weighted image ``B0_CONTRAST`` registers through (the
    RISH maps' normalisation, :func:`rish_maps`)."""
    b0 = np.flatnonzero(dwi.gtab.b0s_mask)
    if b0.size == 0:
        raise HarmonizationError(f"{dwi.paths.get('dwi', 'DWI')}: no b0 volume")
    out = np.zeros(int(np.prod(dwi.mask.shape)), dtype=np.float32)
    where_all, pos = dwi.masked_index(), 0
    for rows in dwi.masked(sh.chunk_voxels(len(dwi.gtab), None)):
        out[where_all[pos:pos + rows.shape[0]]] = rows[:, b0].mean(axis=1, dtype=np.float64)
        pos += rows.shape[0]
    return out.reshape(dwi.mask.shape)


def subject_features(dwi: DWI, subject: str, lmax: int, *, shells: Sequence[float] | None = None,
                     fa: np.ndarray | None = None, sha256=None,
                     noise_floor: bool = False, b0: bool = False) -> SubjectFeatures:
    """FA (DTI on b <= DTI_MAX_BVAL unless given) and per-shell RISH of one DWI.

    ``sha256`` defaults to the hashes of the DWI's files when it was loaded
    from disk (``dwi.paths``). FA comes first, so its volume selection is
    freed before the RISH maps are computed (:func:`rish_maps`).
    ``noise_floor``: also estimate the RISH noise floor (``noise_var``,
    ``noise_gain``; one more pass over the b0 volumes) for
    ``fit_harmonization(noise_floor=True)``; needs ``NOISE_MIN_B0`` b0s.
    ``b0``: also the mean b0 image (:func:`mean_b0`), for ``B0_CONTRAST``.
    """
    names = _select_shells(dwi, shells) if shells else None
    if fa is None:
        fa = dti_fa(dwi)
    rish = rish_maps(dwi, lmax, names)
    noise_var = noise_gain = None
    if noise_floor:
        noise_var = relative_noise_variance(dwi)[0]
        noise_gain = rish_noise_gain(dwi.gtab, lmax, list(rish))
    mean = mean_b0(dwi) if b0 else None
    if sha256 is None and dwi.paths:
        sha256 = {k: file_sha256(p) for k, p in sorted(dwi.paths.items())
                  if p and os.path.isfile(p)} or None
    return SubjectFeatures(subject, np.asarray(fa, dtype=np.float32), dwi.affine, dwi.mask,
                           rish, sha256, noise_var, noise_gain, mean)


def _select_shells(dwi: DWI, shells: Sequence[float]) -> list[float]:
    """The DWI's shell names for ``shells`` (error naming any missing one)."""
    names = [match_shell(b, dwi.gtab.shells) for b in shells]
    missing = [b for b, n in zip(shells, names) if n is None]
    if missing:
        raise HarmonizationError(f"{dwi.paths.get('dwi', 'DWI')}: no shell near b="
                                 f"{', '.join(f'{b:g}' for b in missing)} (shells "
                                 f"{dwi.gtab.shells})")
    return names


def _load(item: SubjectInput) -> SubjectFeatures:
    out = item() if callable(item) and not isinstance(item, SubjectFeatures) else item
    if not isinstance(out, SubjectFeatures):
        raise TypeError(f"a subject input must be SubjectFeatures or a callable returning "
                        f"them, got {type(out).__name__}")
    return out


def _check_subject(f: SubjectFeatures, site: str, shells: Sequence[float], lmax: int) -> dict:
    """Validate one subject; return {artefact shell: RISH array} (float32)."""
    who = f"site {site!r}, subject {f.subject!r}"
    fa = np.asarray(f.fa)
    if fa.ndim != 3:
        raise HarmonizationError(f"{who}: FA must be 3D, got shape {fa.shape}")
    if np.asarray(f.mask).shape != fa.shape:
        raise HarmonizationError(f"{who}: mask shape {np.asarray(f.mask).shape} != FA shape "
                                 f"{fa.shape}")
    n_orders = lmax // 2 + 1
    out = {}
    by_b = {float(b): v for b, v in f.rish.items()}
    for b in shells:
        key = match_shell(b, by_b)
        if key is None:
            raise HarmonizationError(f"{who}: no RISH maps for shell b={b:g} (has shells "
                                     f"{sorted(by_b)}); shells must match between sites")
        r = np.asarray(by_b[key])
        if r.shape[:3] != fa.shape or r.ndim != 4:
            raise HarmonizationError(f"{who}: RISH maps of shell b={b:g} have shape {r.shape}, "
                                     f"expected {fa.shape} + (orders,)")
        if r.shape[3] != n_orders:
            raise HarmonizationError(f"{who}: RISH maps of shell b={b:g} hold orders "
                                     f"0..{2 * (r.shape[3] - 1)} (lmax {2 * (r.shape[3] - 1)}), "
                                     f"the harmonization uses lmax {lmax}; fit all subjects "
                                     f"with the same lmax")
        out[b] = r.astype(np.float32, copy=False)
    return out


# ----------------------------------------------------------------------------
# Template
# ----------------------------------------------------------------------------
def build_template(reference: Sequence[SubjectInput], *, iterations: int = TEMPLATE_ITERATIONS,
                   registration: str = "syn", registration_options: dict | None = None,
                   contrast: str = DEFAULT_REGISTRATION_CONTRAST,
                   shells: Sequence[float] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Template from the reference site: (image float32, affine, info), in the
    registration ``contrast`` (:func:`registration_image` of ``shells``).

    Round 1 registers every reference subject to the first one and averages
    the warped FA maps; each further round registers all of them to the
    previous mean. The template keeps the first subject's grid and space (its
    shape: no shape averaging of the deformations), so the first reference
    subject should be a typical one.
    """
    opts = dict(registration_options or {})
    if iterations < 1:
        raise ValueError(f"template iterations must be >= 1, got {iterations}")
    image = _contrast_of(contrast, shells)
    first = _load(reference[0])
    tpl = image(first)
    tpl_affine, first_id = _as_affine(first.affine), first.subject
    del first
    for it in range(iterations):
        def register(f, fa, tpl=tpl):
            return register_fa(fa, f.affine, tpl, tpl_affine, registration, **opts)
        tpl = template_mean(reference, tpl.shape, register, first_round=it == 0, image=image)
    info = {"source": "reference-site mean", "iterations": int(iterations),
            "first_subject": first_id, "registration": registration}
    return tpl, tpl_affine, info


def masked_fa(f: SubjectFeatures, fa: np.ndarray | None = None) -> np.ndarray:
    """A subject's FA (or ``fa`` on its grid, e.g. :func:`site_scaled_fa`'s),
    0 outside its brain mask, float32."""
    return np.where(np.asarray(f.mask, dtype=bool), f.fa if fa is None else fa,
                    0).astype(np.float32)


def check_registration_contrast(contrast: str) -> str:
    """``contrast`` if it is one of ``REGISTRATION_CONTRASTS``, else ValueError."""
    check_choice("registration_contrast", contrast, REGISTRATION_CONTRASTS)
    return contrast


def registration_image(f: SubjectFeatures, contrast: str = DEFAULT_REGISTRATION_CONTRAST,
                       shells: Sequence[float] | None = None) -> np.ndarray:
    """The image a subject is registered through (``REGISTRATION_CONTRASTS``),
    0 outside its brain mask, float32.

    The RISH contrasts use the lowest of ``shells`` (None: of the subject's
    RISH shells), the best-SNR shell. A RISH image is divided by its
    median over the mask's non-zero voxels: a site's constant factor then
    cancels exactly, also in dipy's absolute thresholds (its cross-correlation
    skips windows whose variance product is below 1e-5, which a scaled
    small-valued image crosses elsewhere).
    ``SITE_SCALED_CONTRAST``: FA, the image of the reference site and the
    template; a target subject registers through :func:`site_scaled_fa` of
    its DWI instead, which features do not hold (:func:`fit_harmonization`
    and :func:`apply_harmonization` do that).
    ``B0_CONTRAST``: the mean b0 (``f.b0``) over its median in the mask, so a
    site's global intensity (receive gain) cancels as for the RISH images.
    """
    mask = np.asarray(f.mask, dtype=bool)
    if check_registration_contrast(contrast) in FA_TEMPLATE_CONTRASTS:
        return masked_fa(f)
    if contrast == B0_CONTRAST:
        if f.b0 is None:
            raise HarmonizationError(f"subject {f.subject!r}: contrast {B0_CONTRAST!r} needs the "
                                     f"mean b0 image (subject_features(..., b0=True))")
        return _unit_median(np.asarray(f.b0, dtype=np.float32), mask)
    by_b = {float(b): v for b, v in f.rish.items()}
    want = min(float(b) for b in (shells or by_b))
    key = match_shell(want, by_b)
    if key is None:
        raise HarmonizationError(f"subject {f.subject!r}: no RISH maps for shell b={want:g} "
                                 f"to register through (has {sorted(by_b)})")
    rish = np.asarray(by_b[key], dtype=np.float32)
    orders = RISH_CONTRAST_ORDERS[contrast]
    if rish.shape[-1] <= max(orders) // 2:
        raise HarmonizationError(f"contrast {contrast!r} needs RISH order {max(orders)} "
                                 f"(lmax >= {max(orders)})")
    images = [_unit_median(np.sqrt(np.maximum(rish[..., o // 2], 0)), mask) for o in orders]
    return (sum(images) / np.float32(len(images))).astype(np.float32)


def _unit_median(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``img`` in ``mask`` (0 outside) over its median there (non-zero voxels), float32."""
    out = np.where(mask, img, 0).astype(np.float32)
    inside = out > 0
    if inside.any():
        out /= np.float32(np.median(out[inside]))
    return out


def _contrast_of(contrast: str, shells: Sequence[float] | None) -> Callable:
    """``features -> registration image`` for one contrast and shell list."""
    check_registration_contrast(contrast)
    return lambda f: registration_image(f, contrast, shells)


def template_mean(reference: Sequence[SubjectInput], shape, register: Callable,
                  first_round: bool = False, image: Callable = masked_fa) -> np.ndarray:
    """One template round: the mean of the reference subjects' registration
    images (``image(features)``, default FA) warped to the template grid
    ``shape``. ``register(features, image)`` returns the subject's
    :class:`Transform` (computed, or registered earlier by a per-subject
    node); in the first round the first subject is the template."""
    total = np.zeros(tuple(shape), dtype=np.float32)
    for k, item in enumerate(reference):
        f = _load(item)
        fa = image(f)
        if first_round and k == 0:
            total += fa
            continue
        total += register(f, fa).to_template(fa)
    return total / np.float32(len(reference))


# ----------------------------------------------------------------------------
# Scale maps
# ----------------------------------------------------------------------------
def _nearest_fill_index(mask: np.ndarray) -> tuple:
    """Index arrays that map every voxel to its nearest mask voxel."""
    from scipy import ndimage
    idx = ndimage.distance_transform_edt(~mask, return_distances=False, return_indices=True)
    return tuple(idx.astype(np.int32))


def _smooth_in_mask(vol: np.ndarray, mask: np.ndarray, sigma_vox) -> np.ndarray:
    """Normalised Gaussian smoothing inside ``mask`` (no leakage from outside)."""
    from scipy import ndimage
    w = mask.astype(np.float32)
    num = ndimage.gaussian_filter(np.where(mask, vol, 0).astype(np.float32), sigma_vox)
    den = ndimage.gaussian_filter(w, sigma_vox)
    out = vol.copy()
    ok = mask & (den > 1e-6)
    out[ok] = num[ok] / den[ok]
    return out


def scale_maps(e_ref: np.ndarray, e_tar: np.ndarray, mask: np.ndarray, affine, *,
               tau: float = TAU_FRACTION, smoothing_fwhm_mm: float = DEFAULT_SMOOTHING_FWHM_MM,
               scale_range: tuple[float, float] = SCALE_RANGE, fill_index=None
               ) -> tuple[np.ndarray, np.ndarray, dict]:
    """``lambda_l = sqrt(E_ref / (E_tar + tau_l))`` for one shell.

    ``e_ref``/``e_tar``: (X, Y, Z, n_orders) site means; ``tau_l = tau *
    median(E_tar[..., l] in mask)``. Values are clipped to ``scale_range``,
    smoothed in the mask (Gaussian, ``smoothing_fwhm_mm``), clipped again, and
    outside the mask copied from the nearest mask voxel (so a subject whose
    brain reaches slightly past the template mask gets its neighbours'
    scales). Returns (lambda float32, tau_l per order, stats).
    """
    lo, hi = float(scale_range[0]), float(scale_range[1])
    if not 0 < lo <= 1 <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= 1 <= high, got {scale_range}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if not mask.any():
        raise HarmonizationError("the template mask is empty: the sites' brain masks do not "
                                 "overlap in template space (registration failed?)")
    if fill_index is None:
        fill_index = _nearest_fill_index(mask)
    zooms = _voxel_mm(affine)
    lam = np.ones(e_ref.shape, dtype=np.float32)
    taus, clipped = [], 0
    for k in range(e_ref.shape[3]):
        r, t = e_ref[..., k][mask], e_tar[..., k][mask]
        tau_k = float(tau * np.median(t))
        taus.append(tau_k)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.sqrt(np.maximum(r, 0) / (np.maximum(t, 0) + tau_k))
        v = np.where(np.isfinite(v), v, hi)       # E_tar + tau == 0: as large as allowed
        clipped += int(np.count_nonzero((v < lo) | (v > hi)))
        vol = np.ones(mask.shape, dtype=np.float32)
        vol[mask] = np.clip(v, lo, hi)
        if smoothing_fwhm_mm and smoothing_fwhm_mm > 0:
            vol = np.clip(_smooth_in_mask(vol, mask, smoothing_fwhm_mm * FWHM_TO_SIGMA / zooms),
                          lo, hi)
        lam[..., k] = vol[fill_index]
    stats = {"clipped_fraction": clipped / (mask.sum() * e_ref.shape[3])}
    return lam, np.array(taus), stats


def _ramp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 below ``lo``, 1 above ``hi``, linear between (float32)."""
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def tissue_weights(template_fa: np.ndarray, e_ref_l0: np.ndarray, b: float,
                   mask: np.ndarray) -> np.ndarray:
    """Soft tissue classes (X, Y, Z, 3): white matter, grey matter, CSF,
    summing to 1 in ``mask`` (0 outside).

    White matter from the template FA (``TISSUE_POOL_FA_RAMP``); of the rest,
    CSF from the apparent diffusivity of the reference site's mean RISH l0 at
    b-value ``b`` (``R_0 = 4 pi S^2`` for the b0-normalised mean signal S;
    ``TISSUE_POOL_MD_RAMP``). Both come from the template and the reference
    site only, so both sites are pooled over the same tissue.
    """
    mean_signal = np.sqrt(np.maximum(e_ref_l0, 0) / (4 * np.pi))
    with np.errstate(divide="ignore"):
        adc = np.where(mean_signal > 0, -np.log(np.maximum(mean_signal, 1e-12)) / b, np.inf)
    wm = _ramp(template_fa, *TISSUE_POOL_FA_RAMP)
    csf = (1 - wm) * _ramp(np.minimum(adc, 1.0), *TISSUE_POOL_MD_RAMP)
    w = np.stack([wm, 1 - wm - csf, csf], axis=-1)
    return np.where(mask[..., None], w, 0).astype(np.float32)


def tissue_pooled_ratio(e_ref: np.ndarray, e_tar: np.ndarray, weights: np.ndarray,
                        mask: np.ndarray, affine, fwhm_mm: float, tau: float = TAU_FRACTION
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``lambda_l^2`` of one shell from site means pooled within tissues.

    Per tissue class k (``weights[..., k]``, :func:`tissue_weights`) both site
    means are averaged by normalised convolution, ``G * (w_k E) / G * (w_k)``
    (Gaussian ``fwhm_mm``, inside ``mask``), and their ratio
    ``r_k = E_ref,k / (E_tar,k + tau_l)`` is formed; a voxel's
    ``lambda_l^2 = sum_k w_k r_k``: a partial-volume voxel gets its tissues'
    ratios in its own proportions, each from that tissue only. ``tau_l`` as
    :func:`scale_maps` (``tau`` x the median of ``E_tar`` in the mask).
    Returns (lambda^2 float32 (X, Y, Z, orders), tau_l per order).
    """
    from scipy import ndimage
    sigma = fwhm_mm * FWHM_TO_SIGMA / _voxel_mm(affine)
    w = np.where(mask[..., None], weights, 0).astype(np.float32)
    dens = [ndimage.gaussian_filter(w[..., c], sigma) for c in range(w.shape[3])]
    out = np.zeros(e_ref.shape, dtype=np.float32)
    taus = []
    for k in range(e_ref.shape[3]):
        tau_k = float(tau * np.median(e_tar[..., k][mask]))
        taus.append(tau_k)
        acc = np.zeros(mask.shape, dtype=np.float64)
        for c, den in enumerate(dens):
            wc = w[..., c]
            num_r = ndimage.gaussian_filter(wc * np.maximum(e_ref[..., k], 0), sigma)
            num_t = ndimage.gaussian_filter(wc * np.maximum(e_tar[..., k], 0), sigma)
            ok = (wc > 0) & (den > 0)
            # r_k = (G*(w E_ref) / G*w) / (G*(w E_tar) / G*w + tau), on the voxels ok only
            d = num_t[ok].astype(np.float64) + tau_k * den[ok]
            acc[ok] += wc[ok] * np.divide(num_r[ok], d, out=np.full(d.shape, np.inf),
                                          where=d > 0)
        out[..., k] = np.where(mask, acc, 0)
    return out, np.array(taus)


# ----------------------------------------------------------------------------
# Artefact
# ----------------------------------------------------------------------------
def _shell_key(b: float) -> str:
    return f"{float(b):g}"


def _content_id(template_affine, template_shape, shells, lmax, maps: dict,
                site_factors: dict | None = None,
                match_resolution: str | float | None = None) -> str:
    """sha256 of the scale maps and the grid/shell/order layout they live on
    (and of the global site factors, when the contrast has them, and the
    resolution-matching rule, when on: apply registers through them)."""
    h = hashlib.sha256()
    head = {"format": ARTEFACT_FORMAT, "version": CONTENT_ID_LAYOUT,
            "shells": [_shell_key(b) for b in shells], "lmax": int(lmax),
            "shape": [int(n) for n in template_shape],
            "affine": np.round(np.asarray(template_affine, np.float64), 6).tolist()}
    if site_factors:
        head["site_factors"] = _factors_record(site_factors)
    if match_resolution:
        head["match_resolution"] = match_resolution
    h.update(json.dumps(head, sort_keys=True).encode())
    for b in shells:
        m = np.ascontiguousarray(maps[b], dtype=np.float32)
        h.update(f"{_shell_key(b)}:{m.shape}".encode())
        h.update(m.tobytes())
    return h.hexdigest()


def _factors_record(site_factors: Mapping) -> dict:
    """``{shell key: [g_l0, g_l2, ...]}`` (JSON, and the content id's input)."""
    return {_shell_key(b): [float(v) for v in g] for b, g in sorted(site_factors.items())}


@dataclass
class HarmonizationArtefact:
    """A fitted RISH harmonization: template, scale maps and provenance.

    ``scale_maps[shell]``: (X, Y, Z, lmax/2 + 1) float32 on the template grid
    (order l at index l/2). ``tau``: the relative tau, ``tau_values[shell]``
    the absolute tau per order. ``subjects``: one dict per input (site,
    subject, sha256, transform parameters). ``transforms``: the subjects'
    :class:`Transform` keyed by (site, subject), when kept. ``content_id``
    (sha256 of the scale maps and their layout) is computed when empty.
    ``registration_contrast``: the image subjects are registered through
    (``REGISTRATION_CONTRASTS``); ``template_fa`` holds the template in it.
    ``site_factors``: ``{shell: (lmax/2 + 1,) float64}`` global SH factors
    per order (:func:`site_scaling_factors`) a target subject is scaled by
    before registration, for ``SITE_SCALED_CONTRAST`` only (empty otherwise).
    """

    template_fa: np.ndarray
    template_affine: np.ndarray
    template_mask: np.ndarray
    scale_maps: dict
    shells: list
    lmax: int
    tau: float
    tau_values: dict
    smoothing_fwhm_mm: float
    scale_range: tuple
    registration: str
    reference_site: str
    target_site: str
    subjects: list
    pipeline_version: str
    parameters: dict = field(default_factory=dict)
    transforms: dict = field(default_factory=dict, repr=False)
    content_id: str = ""
    registration_contrast: str = LEGACY_REGISTRATION_CONTRAST
    site_factors: dict = field(default_factory=dict)
    #: True only from :meth:`load` with the writer's fingerprint: the content id
    #: is the one its verified JSON states (not recomputed from the maps).
    verified: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self):
        check_registration_contrast(self.registration_contrast)
        self.shells = [float(b) for b in self.shells]
        self.scale_maps = {float(b): np.asarray(m, dtype=np.float32)
                           for b, m in self.scale_maps.items()}
        self.template_fa = np.asarray(self.template_fa, dtype=np.float32)
        self.template_mask = np.asarray(self.template_mask, dtype=bool)
        self.template_affine = _as_affine(self.template_affine)
        if sorted(self.scale_maps) != sorted(self.shells):
            raise ValueError(f"scale maps for shells {sorted(self.scale_maps)} but shells "
                             f"{self.shells}")
        want = self.template_fa.shape + (self.lmax // 2 + 1,)
        for b, m in self.scale_maps.items():
            if m.shape != want:
                raise ValueError(f"scale map of shell b={b:g} has shape {m.shape}, "
                                 f"expected {want}")
        if self.template_mask.shape != self.template_fa.shape:
            raise ValueError("template mask and FA differ in shape")
        self.site_factors = {float(b): np.asarray(g, dtype=np.float64)
                             for b, g in (self.site_factors or {}).items()}
        if (self.registration_contrast == SITE_SCALED_CONTRAST) != bool(self.site_factors):
            raise ValueError(f"site factors are recorded for contrast "
                             f"{SITE_SCALED_CONTRAST!r} only (contrast "
                             f"{self.registration_contrast!r}, "
                             f"{len(self.site_factors)} shell(s) of factors)")
        for b, g in self.site_factors.items():
            if g.shape != (self.lmax // 2 + 1,) or not np.all(np.isfinite(g) & (g > 0)):
                raise ValueError(f"site factors of shell b={b:g} must be lmax/2 + 1 positive "
                                 f"values, got {g.tolist()}")
        if self.site_factors and sorted(self.site_factors) != sorted(self.shells):
            raise ValueError(f"site factors for shells {sorted(self.site_factors)} but shells "
                             f"{self.shells}")
        if self.verified and self.content_id:
            return
        cid = self.compute_content_id()
        if not self.content_id:
            self.content_id = cid
        elif self.content_id != cid:
            raise ValueError(f"content id {self.content_id[:12]}... does not match the scale "
                             f"maps ({cid[:12]}...)")

    def compute_content_id(self) -> str:
        return _content_id(self.template_affine, self.template_fa.shape, self.shells,
                           self.lmax, self.scale_maps, self.site_factors,
                           self.match_resolution)

    @property
    def match_resolution(self) -> str | float | None:
        """The fit's resolution-matching rule (``register_fa(match_resolution=)``,
        its registration options as recorded), None when off."""
        return (self.parameters.get("registration_options") or {}).get("match_resolution")

    def scale_map(self, shell: float, order: int) -> np.ndarray:
        """lambda_l of one shell and order (3D view)."""
        key = match_shell(shell, self.shells)
        if key is None:
            raise KeyError(f"no shell near b={shell:g} in the artefact (shells {self.shells})")
        if order % 2 or not 0 <= order <= self.lmax:
            raise KeyError(f"order {order} not in the even orders 0..{self.lmax}")
        return self.scale_maps[key][..., order // 2]

    # -- files ---------------------------------------------------------------
    def _describe(self, files: dict) -> dict:
        return {
            "format": ARTEFACT_FORMAT, "format_version": ARTEFACT_FORMAT_VERSION,
            "content_id": self.content_id, "pipeline_version": self.pipeline_version,
            "reference_site": self.reference_site, "target_site": self.target_site,
            "shells": self.shells, "lmax": int(self.lmax), "tau": float(self.tau),
            "tau_values": {_shell_key(b): [float(v) for v in t]
                           for b, t in self.tau_values.items()},
            "smoothing_fwhm_mm": float(self.smoothing_fwhm_mm),
            "scale_range": [float(v) for v in self.scale_range],
            "registration": self.registration,
            "registration_contrast": self.registration_contrast,
            **({"site_factors": _factors_record(self.site_factors)} if self.site_factors else {}),
            "template_affine": self.template_affine.tolist(),
            "template_shape": list(self.template_fa.shape),
            "subjects": self.subjects, "parameters": self.parameters, "files": files,
        }

    def save(self, directory, overwrite: bool = False) -> Path:
        """Write the artefact folder (NIfTI + JSON) atomically and return it.

        Files go to a temporary sibling folder that is renamed into place
        when complete; ``artefact.json`` lists every file with its sha256.
        An existing folder is replaced only with ``overwrite``.
        """
        directory = Path(directory)
        if directory.exists() and not overwrite:
            raise FileExistsError(f"{directory}: exists (pass overwrite=True to replace it)")

        def fill(tmp):
            tmp = Path(tmp)
            files = {}

            def put(name, data, what):
                p = save_nifti(data, self.template_affine, tmp / name)
                files[what] = {"file": name, "sha256": file_sha256(p)}

            put("template_fa.nii.gz", self.template_fa, "template_fa")
            put("template_mask.nii.gz", self.template_mask.astype(np.uint8), "template_mask")
            for b in self.shells:
                put(f"scale_b{_shell_key(b)}.nii.gz", self.scale_maps[b], f"scale_{_shell_key(b)}")
            subjects = []
            for s in self.subjects:
                s = dict(s)
                t = self.transforms.get((s["site"], s["subject"]))
                if t is not None:
                    prefix = f"transforms/{s['site_index']}-{s['index']:04d}"
                    (tmp / "transforms").mkdir(exist_ok=True)
                    written = t.save(tmp / prefix)
                    s["transform_file"] = f"{prefix}.json"
                    s["transform_files_sha256"] = {p.name: file_sha256(p) for p in written}
                subjects.append(s)
            meta = self._describe(files)
            meta["subjects"] = subjects
            write_json(meta, tmp / ARTEFACT_JSON)

        return atomic_write(directory, fill, folder=True)

    @classmethod
    def load(cls, directory, transforms: bool = False,
             fingerprint: str | None = None) -> "HarmonizationArtefact":
        """Read and validate an artefact folder (never unpickles anything).

        Checks the format, every file's sha256, data types and shapes, and
        recomputes the content id from the scale maps. ``transforms`` also
        loads the fit subjects' transforms. ``fingerprint``: the sha256 of
        ``artefact.json`` as its writer handed it on (:func:`artefact_fingerprint`
        when the fit saved it); the JSON must match it, and then the content
        id it states is taken, not recomputed (every file is still checked
        against the sha256 the JSON lists: a tampered or half-written file is
        refused either way). At HCP size the recomputation is about half of a
        load (the maps are transposed from NIfTI's F order to hash them).
        """
        directory = Path(directory)
        meta_path = directory / ARTEFACT_JSON
        meta = _read_json(meta_path, "artefact", sha256=fingerprint)
        if meta.get("format") != ARTEFACT_FORMAT:
            raise InputError(meta_path, f"not a {ARTEFACT_FORMAT} artefact "
                                        f"(format {meta.get('format')!r})")
        if meta.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise InputError(meta_path, f"artefact format version {meta.get('format_version')}"
                                        f" is not supported (expected one of "
                                        f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))})")
        need = ("content_id", "shells", "lmax", "files", "template_affine", "subjects",
                "reference_site", "target_site", "tau", "tau_values", "registration")
        missing = [k for k in need if k not in meta]
        if missing:
            raise InputError(meta_path, f"artefact JSON lacks {', '.join(missing)}")
        files = meta["files"]

        def get(what, dtype):
            entry = files.get(what)
            if not entry:
                raise InputError(meta_path, f"artefact lists no {what} file")
            return read_checked_nifti(directory / entry["file"], entry["sha256"], what, dtype)

        shells = [float(b) for b in meta["shells"]]
        maps = {b: get(f"scale_{_shell_key(b)}", np.float32) for b in shells}
        fa = get("template_fa", np.float32)
        mask = get("template_mask", np.uint8).astype(bool)
        trans = {}
        if transforms:
            for s in meta["subjects"]:
                if s.get("transform_file"):
                    trans[(s["site"], s["subject"])] = Transform.load(
                        directory / s["transform_file"][:-len(".json")])
        try:
            return cls(template_fa=fa, template_affine=np.asarray(meta["template_affine"]),
                       template_mask=mask, scale_maps=maps, shells=shells,
                       lmax=int(meta["lmax"]), tau=float(meta["tau"]),
                       tau_values={float(b): np.asarray(v) for b, v in
                                   meta["tau_values"].items()},
                       smoothing_fwhm_mm=float(meta.get("smoothing_fwhm_mm", 0.0)),
                       scale_range=tuple(meta.get("scale_range", SCALE_RANGE)),
                       registration=meta["registration"],
                       reference_site=meta["reference_site"], target_site=meta["target_site"],
                       subjects=meta["subjects"], pipeline_version=meta.get("pipeline_version", ""),
                       parameters=meta.get("parameters", {}), transforms=trans,
                       content_id=meta["content_id"],
                       registration_contrast=meta.get("registration_contrast",
                                                      LEGACY_REGISTRATION_CONTRAST),
                       site_factors={float(b): g for b, g in
                                     meta.get("site_factors", {}).items()},
                       verified=fingerprint is not None)
        except ValueError as exc:
            raise InputError(meta_path, f"invalid artefact ({exc})") from None


def artefact_fingerprint(directory) -> str | None:
    """sha256 of an artefact folder's ``artefact.json``, which lists the sha256 of
    every file :meth:`HarmonizationArtefact.load` reads (and checks): the
    artefact's content, wherever the folder is. None when it cannot be read
    (applying it then fails each subject with the reason)."""
    try:
        return hashlib.sha256((Path(directory) / ARTEFACT_JSON).read_bytes()).hexdigest()
    except OSError:
        return None


def _read_json(path: Path, what: str, sha256: str | None = None) -> dict:
    """A JSON object file; with ``sha256``, only if its bytes have that hash."""
    if not path.is_file():
        raise InputError(path, f"{what} JSON not found")
    try:
        raw = path.read_bytes()
        if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
            raise InputError(path, f"{what} JSON changed since it was written (sha256 mismatch "
                                   f"with the fingerprint handed on)")
        meta = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read the {what} JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise InputError(path, f"{what} JSON is not an object")
    return meta


def read_checked_nifti(path: Path, sha256: str, what: str, dtype=np.float32) -> np.ndarray:
    """A NIfTI's stored array (exact dtype, no scaling) after checking its sha256
    (:func:`read_checked_image` without the affine)."""
    return read_checked_image(path, sha256, what, dtype)[0]


def read_checked_image(path: Path, sha256: str, what: str,
                       dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI's stored array (exact dtype, no scaling) and its affine, after
    checking the file's sha256.

    The file is read once: a ``.nii.gz`` through :func:`codec.inflate` (ISA-L
    where installed: the file's sha256, the inflated bytes and every gzip
    member's CRC32 in one pass) instead of hashing the file and then
    inflating it again with Python's gzip (at HCP size 2-3x the time); an
    uncompressed ``.nii`` is hashed in memory. Either way the array is
    parsed in place (:func:`_nifti_array`)."""
    if not path.is_file():
        raise InputError(path, f"{what} file is missing")
    if not codec.is_gzip(path):
        raw = bytearray(path.read_bytes())
        found = hashlib.sha256(raw).hexdigest()
    else:
        raw = bytearray()
        try:
            found = codec.inflate(path, raw.extend).sha256
        except codec.CorruptGzipError as exc:
            found = None
            if file_sha256(path) == sha256:        # written damaged: say so
                raise InputError(path, f"{what} is not a valid gzip file: {exc}") from None
    if found != sha256:
        raise InputError(path, f"{what} file changed since it was written (sha256 mismatch)")
    return _nifti_array(raw, path, what, dtype)


#: Bytes of a NIfTI-1 header (``sizeof_hdr``); the data start at ``vox_offset`` >= 352.
NIFTI1_HEADER_BYTES = 348


def _nifti_array(raw: bytearray, path: Path, what: str,
                 dtype) -> tuple[np.ndarray, np.ndarray]:
    """The stored array of an inflated single-file NIfTI-1 ``raw``, a view of
    its bytes (no copy), and the header's affine (nibabel's ``img.affine``).
    ``Nifti1Image.from_bytes`` held two more copies while it parsed
    (``bytes(raw)``, then the array nibabel reads into)."""
    import nibabel as nib
    try:
        hdr = nib.Nifti1Header(bytes(raw[:NIFTI1_HEADER_BYTES]))
        shape, stored = hdr.get_data_shape(), hdr.get_data_dtype()
        offset = int(hdr.get_data_offset())
        affine = hdr.get_best_affine()
    except Exception as exc:  # noqa: BLE001 - nibabel's header errors vary
        raise InputError(path, f"{what} is not a NIfTI-1 file ({exc})") from None
    if stored != np.dtype(dtype):
        raise InputError(path, f"{what} is stored as {stored}, expected {np.dtype(dtype)}")
    if hdr.get_slope_inter() not in ((None, None), (1.0, 0.0)):   # dmriflow writes none
        raise InputError(path, f"{what} is stored with a scale factor, expected raw "
                               f"{np.dtype(dtype)}")
    size = int(np.prod(shape, dtype=np.int64)) * stored.itemsize
    if offset < NIFTI1_HEADER_BYTES or len(raw) < offset + size:
        raise InputError(path, f"{what} holds {len(raw)} bytes, its header needs "
                               f"{offset + size}")
    return np.ndarray(shape, np.dtype(dtype), buffer=raw, offset=offset, order="F"), affine


# ----------------------------------------------------------------------------
# Fit
# ----------------------------------------------------------------------------
#: Estimators that form a term on each target subject's own grid.
NATIVE_ESTIMATORS = ("matched", "native-log")
#: Template voxels covered by less than this much warped mask have no site mean.
_MIN_COVER = 1e-3
#: Rounds of re-registering the target subjects through their harmonised FA
#: and refitting (0: registered through the scanned FA only). The site effect
#: changes FA, so target scans registered through their own FA land slightly
#: off the same anatomy scanned at the reference site (docs/harmonization.md).
DEFAULT_REFIT_ROUNDS = 0


def _site_mean(total: np.ndarray, cover: np.ndarray) -> np.ndarray:
    """Mask-normalised site mean: ``total / cover`` per voxel (0 where uncovered)."""
    out = np.zeros_like(total)
    np.divide(total, cover[..., None], out=out, where=cover[..., None] > _MIN_COVER)
    return out


def _native_term(t: Transform, mask: np.ndarray, rish: np.ndarray, e_ref: np.ndarray,
                 estimator: str) -> np.ndarray:
    """One target subject's term of a :data:`NATIVE_ESTIMATORS` estimate,
    (X, Y, Z, orders) on the template grid, summed over subjects and divided
    by the target's mask cover like the site means.

    The reference mean ``e_ref`` is pulled onto the subject's grid; "matched"
    pushes it back in the subject's mask (the reference passes through the
    target's resampling chain); "native-log" pushes ``log(e_ref / (R + tau))``
    formed there (``tau`` = ``TAU_FRACTION`` x the subject's median R; 0 where
    either side is not positive).
    """
    out = np.empty(t.template_shape + (rish.shape[3],), dtype=np.float32)
    for k in range(rish.shape[3]):
        pulled = t.to_subject(e_ref[..., k])
        if estimator == "matched":
            val = np.where(mask, pulled, 0)
        else:
            r = rish[..., k]
            tau = TAU_FRACTION * float(np.median(r[mask]))
            ok = mask & (pulled > 0) & (r + tau > 0)
            val = np.zeros(r.shape, dtype=np.float32)
            val[ok] = np.log(pulled[ok] / (r[ok] + tau))
        out[..., k] = t.to_template(val)
    return out


def _noise_terms(f: SubjectFeatures, shells: Sequence[float], site: str) -> dict:
    """``{shell: noise share of RISH}`` of one subject (:func:`noise_term`)."""
    if f.noise_var is None or not f.noise_gain:
        raise HarmonizationError(f"site {site!r}, subject {f.subject!r}: no noise estimate "
                                 f"for the RISH noise floor (needs >= {NOISE_MIN_B0} b0 "
                                 f"volumes)")
    gains = {float(b): g for b, g in f.noise_gain.items()}
    return {b: noise_term(f.noise_var, gains[match_shell(b, gains)]) for b in shells}


def check_site_sizes(sizes: Mapping[str, int], min_subjects: int = MIN_SUBJECTS_PER_SITE):
    """Raise unless every site ``{name: number of subjects}`` has enough subjects."""
    for site, n in sizes.items():
        if n < min_subjects:
            raise HarmonizationError(f"site {site!r} has {n} subject(s); at least "
                                     f"{min_subjects} per site are needed to estimate its "
                                     f"mean RISH maps")


def site_scaling_factors(reference: Sequence[SubjectInput], target: Sequence[SubjectInput],
                         shells: Sequence[float], lmax: int, site_mean: str = "mean") -> dict:
    """The global site scaling of ``SITE_SCALED_CONTRAST``: ``{shell: (lmax/2
    + 1,) float64}``, per order ``g = sqrt(reference site mean / target site
    mean)`` of each subject's mean RISH over its own brain mask.

    A whole-brain scalar needs no registration, so the factors carry no
    misregistration; a per-order site scaling ``s_l`` of the SH multiplies
    every voxel's RISH_l by ``s_l^2``, so any such mean by the same, and
    ``g`` = ``1 / s_l`` for equal anatomy. The per-subject mean over the
    mask (a median would be as exact under that model): it uses every
    voxel, so it varies least with noise, and needs no choice of tissue.
    Across subjects ``site_mean`` ("mean" or "median", as the fit's site
    means). Measured RISH: its noise floor (largest at l4) and the sites'
    partial-volume difference are in the factors.
    """
    reduce = np.median if site_mean == "median" else np.mean
    means = []
    for site, items in (("reference", reference), ("target", target)):
        per = []
        for item in items:
            f = _load(item)
            rish = _check_subject(f, site, shells, lmax)
            mask = np.asarray(f.mask, dtype=bool)
            if not mask.any():
                raise HarmonizationError(f"site {site!r}, subject {f.subject!r}: empty mask")
            per.append({b: rish[b][mask].mean(axis=0, dtype=np.float64) for b in shells})
            del f, rish
        means.append({b: reduce([p[b] for p in per], axis=0) for b in shells})
    out = {}
    for b in shells:
        ref, tar = means[0][b], means[1][b]
        if not np.all((ref > 0) & (tar > 0)):
            raise HarmonizationError(f"shell b={b:g}: a site's mean RISH is not positive "
                                     f"(reference {ref.tolist()}, target {tar.tolist()})")
        out[b] = np.sqrt(ref / tar)
    return out


def fit_harmonization(reference: Sequence[SubjectInput], target: Sequence[SubjectInput],
                      shells: Sequence[float], lmax: int, *, tau: float = TAU_FRACTION,
                      smoothing_fwhm_mm: float = DEFAULT_SMOOTHING_FWHM_MM,
                      scale_range: tuple[float, float] = SCALE_RANGE,
                      reference_site: str = "reference", target_site: str = "target",
                      registration: str = "syn", template=None,
                      template_iterations: int = TEMPLATE_ITERATIONS,
                      min_subjects: int = MIN_SUBJECTS_PER_SITE, keep_transforms: bool = True,
                      registration_options: dict | None = None, template_info: dict | None = None,
                      registered: Mapping[str, Callable[[], Transform]] | None = None,
                      site_mean: str = "mean", scale_estimator: str = "ratio",
                      refit_rounds: int = DEFAULT_REFIT_ROUNDS,
                      harmonised_fa: Mapping[str, Callable] | None = None,
                      registration_contrast: str = DEFAULT_REGISTRATION_CONTRAST,
                      noise_floor: bool = False,
                      site_scaled_fa: Mapping[str, Callable] | None = None,
                      tissue_pool_fwhm_mm: float = DEFAULT_TISSUE_POOL_FWHM_MM
                      ) -> HarmonizationArtefact:
    """Fit scale maps that map the target site's RISH onto the reference's.

    ``reference``/``target``: per-subject :class:`SubjectFeatures` (or
    callables returning them, loaded one at a time). ``shells``: nominal
    b-values to harmonise (matched within ``SHELL_TOLERANCE``); ``lmax``: the
    order every subject's RISH maps were fitted with. ``tau``: relative (see
    ``TAU_FRACTION``). ``template``: ``(fa, affine)`` to use instead of
    building one from the reference site. ``registration``: "syn",
    "affine" or "identity" (all subjects already on one grid).
    ``keep_transforms``: keep each subject's transform in the artefact
    (2 x 3 float32 fields on the template grid: ~90 MB per HCP-size subject;
    turn off for large cohorts, the affine parameters are always kept).
    ``registered``: ``{subject: callable returning its Transform}`` to the
    given ``template``, registered beforehand (the engine registers each
    subject as its own node); ``template_info`` then describes that template.
    ``site_mean``: one of ``SITE_MEANS`` (the site-mean estimator);
    ``scale_estimator``: one of ``SCALE_ESTIMATORS`` (how the ratio is formed).
    ``refit_rounds``: after the fit, re-register each target subject through
    its harmonised FA and fit again (from the original RISH), this many
    times; ``harmonised_fa[subject](artefact, transform)`` returns that FA on
    the subject's grid (e.g. :func:`harmonised_fa` of its DWI).
    :func:`apply_harmonization` repeats the same rounds.
    ``registration_contrast``: the image every subject is registered through
    and the template is built from (``REGISTRATION_CONTRASTS``; a given
    ``template``/``registered`` must be in it); recorded in the artefact.
    ``noise_floor``: each site mean of RISH less the mean of its subjects'
    expected noise shares (:func:`noise_term`, :func:`debiased_rish`; the
    features need ``noise_var``/``noise_gain``), so the scale maps carry the
    sites' signal, not their noise levels ("mean" site mean, "ratio" or
    "nearest" estimator).
    ``site_scaled_fa``: for ``SITE_SCALED_CONTRAST`` (unless ``registered``),
    ``{target subject: callable(factors) -> FA}`` on the subject's grid of
    its DWI scaled by the global factors (e.g. :func:`site_scaled_fa` of its
    DWI); the factors (:func:`site_scaling_factors`, one more pass over the
    subjects) are recorded in the artefact.
    ``tissue_pool_fwhm_mm``: > 0 pools both site means within soft tissue
    classes of the template (:func:`tissue_weights`,
    :func:`tissue_pooled_ratio`) with a Gaussian of this FWHM before the
    ratio; needs an FA template and the "ratio" or "nearest" estimator;
    recorded in the artefact's parameters when on.

    Memory: one subject at a time plus float32 sums on the template grid.
    """
    if refit_rounds:
        return _refit(reference, target, shells, lmax, refit_rounds, harmonised_fa,
                      dict(tau=tau, smoothing_fwhm_mm=smoothing_fwhm_mm, scale_range=scale_range,
                           reference_site=reference_site, target_site=target_site,
                           registration=registration, template=template,
                           template_iterations=template_iterations, min_subjects=min_subjects,
                           keep_transforms=keep_transforms,
                           registration_options=registration_options,
                           template_info=template_info, registered=registered,
                           site_mean=site_mean, scale_estimator=scale_estimator,
                           registration_contrast=registration_contrast,
                           noise_floor=noise_floor, tissue_pool_fwhm_mm=tissue_pool_fwhm_mm))
    lmax = sh.check_lmax(lmax)
    check_choice("registration", registration, REGISTRATIONS)
    shells = _check_fit_options(shells, reference_site, target_site, site_mean,
                                scale_estimator, noise_floor, tissue_pool_fwhm_mm,
                                registration_contrast)
    check_site_sizes({reference_site: len(reference), target_site: len(target)}, min_subjects)
    opts = dict(registration_options or {})
    image = _contrast_of(registration_contrast, shells)
    factors = {}
    if registration_contrast == SITE_SCALED_CONTRAST:
        if registered is None and site_scaled_fa is None:
            raise ValueError(f"registration_contrast {SITE_SCALED_CONTRAST!r} registers the "
                             f"target subjects through the FA of their site-scaled DWI: it "
                             f"needs site_scaled_fa {{target subject: callable(factors)}}")
        factors = site_scaling_factors(reference, target, shells, lmax, site_mean)
    if template is None:
        tpl_fa, tpl_affine, tpl_info = build_template(
            reference, iterations=template_iterations, registration=registration,
            registration_options=opts, contrast=registration_contrast, shells=shells)
    else:
        tpl_fa, tpl_affine, tpl_info = _given_template(template, template_info)
    if registered is not None and template is None:
        raise ValueError("precomputed transforms need the template they map to")
    sums = _SiteSums(tpl_fa.shape, shells, lmax, (reference_site, target_site),
                     noise_floor=noise_floor, median=site_mean == "median")
    transforms = {}
    native = ({b: np.zeros(tpl_fa.shape + (lmax // 2 + 1,), dtype=np.float32) for b in shells}
              if scale_estimator in NATIVE_ESTIMATORS else {})
    e_ref = None                 # "matched"/"native-log": the reference mean, once complete
    for s_idx, (site, items) in enumerate(((reference_site, reference), (target_site, target))):
        for i, item in enumerate(items):
            f = _load(item)
            sums.check_new(site, f.subject)
            # checked before the registration (a bad subject fails early), used after it
            rish = _check_subject(f, site, shells, lmax)
            noise = _noise_terms(f, shells, site) if noise_floor else {}
            if registered is not None:
                t = registered[f.subject]()
            else:
                img = (image(f) if s_idx == 0 or not factors
                       else masked_fa(f, site_scaled_fa[f.subject](factors)))
                t = register_fa(img, f.affine, tpl_fa, tpl_affine, registration, **opts)
            interp = "nearest" if s_idx == 1 and scale_estimator == "nearest" else "linear"
            sums.add(site, _warped_terms(f, t, rish, noise, lmax, interpolation=interp))
            if s_idx == 1 and scale_estimator in NATIVE_ESTIMATORS:
                if e_ref is None:            # the reference site came first: its mean is complete
                    e_ref = {b: _site_mean(sums.sums[reference_site][b],
                                           sums.counts[reference_site]) for b in shells}
                mask = np.asarray(f.mask, dtype=bool)
                for b in shells:
                    native[b] += _native_term(t, mask, rish[b], e_ref[b], scale_estimator)
            if keep_transforms and t.kind != "identity":
                transforms[(site, f.subject)] = t
            del f, rish, noise, t
    return _artefact_from_sums(
        sums, native, tpl_fa, tpl_affine, tpl_info, shells, lmax, tau=tau,
        smoothing_fwhm_mm=smoothing_fwhm_mm, scale_range=scale_range, registration=registration,
        site_mean=site_mean, scale_estimator=scale_estimator, noise_floor=noise_floor,
        min_subjects=min_subjects, registration_options=opts, transforms=transforms,
        registration_contrast=registration_contrast, site_factors=factors,
        tissue_pool_fwhm_mm=tissue_pool_fwhm_mm)


def _check_fit_options(shells, reference_site: str, target_site: str, site_mean: str,
                       scale_estimator: str, noise_floor: bool,
                       tissue_pool_fwhm_mm: float = DEFAULT_TISSUE_POOL_FWHM_MM,
                       registration_contrast: str = DEFAULT_REGISTRATION_CONTRAST
                       ) -> list[float]:
    """The fit's option checks (shared by :func:`fit_harmonization` and
    :func:`fit_from_terms`); returns the shells as floats."""
    shells = [float(b) for b in shells]
    if not shells:
        raise HarmonizationError("no shell to harmonise")
    if reference_site == target_site:
        raise HarmonizationError(f"reference and target site are both named {reference_site!r}")
    if site_mean not in SITE_MEANS:
        raise ValueError(f"unknown site_mean {site_mean!r} ({', '.join(SITE_MEANS)})")
    if scale_estimator not in SCALE_ESTIMATORS:
        raise ValueError(f"unknown scale_estimator {scale_estimator!r} "
                         f"({', '.join(SCALE_ESTIMATORS)})")
    if scale_estimator in NATIVE_ESTIMATORS and site_mean != "mean":
        raise ValueError(f"scale_estimator {scale_estimator!r} needs site_mean 'mean'")
    if noise_floor and (scale_estimator in NATIVE_ESTIMATORS or site_mean != "mean"):
        raise ValueError("noise_floor removes the noise share from the site means: it needs "
                         "site_mean 'mean' and scale_estimator 'ratio' or 'nearest'")
    if not tissue_pool_fwhm_mm >= 0:
        raise ValueError(f"tissue_pool_fwhm_mm must be >= 0, got {tissue_pool_fwhm_mm}")
    if tissue_pool_fwhm_mm > 0 and scale_estimator in NATIVE_ESTIMATORS:
        raise ValueError("tissue_pool_fwhm_mm pools the site means: it needs scale_estimator "
                         "'ratio' or 'nearest'")
    if tissue_pool_fwhm_mm > 0 and registration_contrast not in FA_TEMPLATE_CONTRASTS:
        raise ValueError(f"tissue_pool_fwhm_mm weighs tissues by the template FA: it needs a "
                         f"registration contrast with an FA template "
                         f"({', '.join(FA_TEMPLATE_CONTRASTS)}), got {registration_contrast!r}")
    return shells


def _given_template(template, template_info: dict | None) -> tuple:
    """``(fa, affine, info)`` of a template given as ``(fa, affine)``."""
    tpl_fa, tpl_affine = np.asarray(template[0], dtype=np.float32), _as_affine(template[1])
    if tpl_fa.ndim != 3:
        raise ValueError(f"template FA must be 3D, got {tpl_fa.shape}")
    return tpl_fa, tpl_affine, dict(template_info or {"source": "given"})


@dataclass
class SubjectTerms:
    """One subject's share of its site's sums on the template grid: the warped
    mask ``cover`` (X, Y, Z) and the warped masked RISH ``{shell: (X, Y, Z,
    orders)}`` (``noise``: its noise shares, with ``noise_floor``), all
    float32, and its entry in the artefact's subject list (``record``). The
    engine computes these in one node per subject and sums them in a final
    one (:func:`fit_from_terms`), in the order the serial fit adds them."""

    cover: np.ndarray
    warped: dict
    record: dict
    noise: dict = field(default_factory=dict)

    #: File names of :meth:`save` (the shell's key goes in ``{}``).
    COVER_FILE = "cover.npy"
    WARPED_FILE = "warped_b{}.npy"
    NOISE_FILE = "noise_b{}.npy"
    #: Every file :meth:`save` may write, as glob patterns.
    FILE_PATTERNS = (COVER_FILE, WARPED_FILE.format("*"), NOISE_FILE.format("*"))

    def save(self, folder) -> dict:
        """Write the arrays as ``.npy`` (uncompressed: the final node reads each
        once) and return ``{"cover", "warped", "noise", "record"}`` with paths."""
        folder = Path(folder)

        def put(name, arr):
            return str(atomic_write(folder / name, lambda tmp: _save_npy(tmp, arr)).resolve())

        return {"cover": put(self.COVER_FILE, self.cover),
                "warped": {_shell_key(b): put(self.WARPED_FILE.format(_shell_key(b)), w)
                           for b, w in self.warped.items()},
                "noise": {_shell_key(b): put(self.NOISE_FILE.format(_shell_key(b)), w)
                          for b, w in self.noise.items()},
                "record": self.record}

    @classmethod
    def load(cls, saved: dict) -> "SubjectTerms":
        """The terms :meth:`save` wrote (never unpickles)."""
        def get(p):
            return np.load(p, allow_pickle=False)
        return cls(cover=get(saved["cover"]),
                   warped={float(b): get(p) for b, p in saved["warped"].items()},
                   record=dict(saved["record"]),
                   noise={float(b): get(p) for b, p in saved.get("noise", {}).items()})


def _save_npy(path, arr) -> None:
    with open(path, "wb") as fh:
        np.save(fh, np.asarray(arr), allow_pickle=False)


def subject_terms(f: SubjectFeatures, t: Transform, shells: Sequence[float], lmax: int,
                  site: str, *, interpolation: str = "linear",
                  noise_floor: bool = False) -> SubjectTerms:
    """One subject's :class:`SubjectTerms` through its transform ``t`` to the
    template (``interpolation`` of the RISH and the mask)."""
    return _warped_terms(f, t, _check_subject(f, site, shells, lmax),
                         _noise_terms(f, shells, site) if noise_floor else {}, lmax,
                         interpolation=interpolation)


def _warped_terms(f: SubjectFeatures, t: Transform, rish: dict, noise: dict, lmax: int, *,
                  interpolation: str = "linear") -> SubjectTerms:
    """:func:`subject_terms` from the subject's checked RISH ``{shell: maps}``
    (:func:`_check_subject`) and noise shares (:func:`_noise_terms`; empty:
    no noise floor), computed once by the caller."""
    mask = np.asarray(f.mask, dtype=bool)
    n_orders = lmax // 2 + 1
    # RISH is 0 outside the subject mask: sum/count is the mask-normalised
    # interpolation of the site mean. All maps in one pass through t (the
    # bits of warping each alone: Transform.to_template_many).
    maps = [(key, float(b), m) for key, part in (("warped", rish), ("noise", noise))
            for b, m in part.items()]
    warped = t.to_template_many([mask.astype(np.float32)] + [
        np.where(mask, m[..., k], 0) for _, _, m in maps for k in range(n_orders)],
        interpolation)
    out = {"warped": {}, "noise": {}}
    for j, (key, b, _) in enumerate(maps):
        out[key][b] = np.ascontiguousarray(warped[..., 1 + j * n_orders:1 + (j + 1) * n_orders])
    cover = np.clip(warped[..., 0], 0, 1)
    del warped
    return SubjectTerms(
        cover=cover, warped=out["warped"], noise=out["noise"],
        record={"subject": f.subject, "sha256": f.content_hash(), "grid": list(mask.shape),
                "affine": np.asarray(f.affine).tolist(), "prealign": t.prealign.tolist(),
                "registration": t.kind})


class _SiteSums:
    """Per-site float32 sums of the subjects' :class:`SubjectTerms`, added in
    order (the order fixes the sums' last bits), and the artefact's subject list."""

    def __init__(self, grid, shells, lmax: int, sites, *, noise_floor: bool = False,
                 median: bool = False):
        n_orders = lmax // 2 + 1
        self.shells, self.sites, self.median = list(shells), list(sites), median

        def zeros():
            return {b: np.zeros(tuple(grid) + (n_orders,), dtype=np.float32) for b in shells}

        self.sums = {s: zeros() for s in sites}
        self.counts = {s: np.zeros(grid, dtype=np.float32) for s in sites}
        self.noise = {s: zeros() if noise_floor else {} for s in sites}
        self.stacks = {s: {b: [] for b in shells} for s in sites}   # "median": per subject
        self.seen = {s: [] for s in sites}
        self.subjects = []

    def check_new(self, site: str, subject: str) -> None:
        if subject in self.seen[site]:
            raise HarmonizationError(f"site {site!r}: subject {subject!r} is listed twice")

    def add(self, site: str, terms: SubjectTerms) -> None:
        self.check_new(site, terms.record["subject"])
        s_idx = self.sites.index(site)
        self.subjects.append({"site": site, "site_index": "ref" if s_idx == 0 else "tar",
                              "index": len(self.seen[site]), **terms.record})
        self.seen[site].append(terms.record["subject"])
        self.counts[site] += terms.cover
        for b in self.shells:
            warped = terms.warped[b]
            self.sums[site][b] += warped
            if self.noise[site]:
                self.noise[site][b] += terms.noise[b]
            if self.median:
                value = np.full(warped.shape, np.nan, dtype=np.float32)
                inside = terms.cover >= 0.5
                value[inside] = warped[inside] / terms.cover[inside][:, None]
                self.stacks[site][b].append(value)

    def site_mean(self, site: str, b: float, site_mean: str) -> np.ndarray:
        """The site's mean RISH of shell ``b`` (freeing its sums)."""
        m = _site_mean(self.sums[site][b], self.counts[site])
        if site_mean == "median":
            with warnings.catch_warnings():       # all-NaN voxels: the mean stays
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(np.stack(self.stacks[site][b]), axis=0)
            m = np.where(np.isfinite(med), med, m).astype(np.float32)
            self.stacks[site][b] = None
        if self.noise[site]:
            m = debiased_rish(m, _site_mean(self.noise[site][b], self.counts[site]))
            self.noise[site][b] = None
        self.sums[site][b] = None                      # free as we go
        return m


def _artefact_from_sums(sums: _SiteSums, native: dict, tpl_fa, tpl_affine, tpl_info: dict,
                        shells, lmax: int, *, tau: float, smoothing_fwhm_mm: float,
                        scale_range, registration: str, site_mean: str, scale_estimator: str,
                        noise_floor: bool, min_subjects: int, registration_options: dict,
                        transforms: dict, registration_contrast: str,
                        site_factors: dict | None = None,
                        tissue_pool_fwhm_mm: float = DEFAULT_TISSUE_POOL_FWHM_MM
                        ) -> HarmonizationArtefact:
    """The scale maps and the artefact from the completed site sums."""
    reference_site, target_site = sums.sites
    n_ref, n_tar = len(sums.seen[reference_site]), len(sums.seen[target_site])
    tpl_mask = ((sums.counts[reference_site] >= MASK_COVERAGE * n_ref)
                & (sums.counts[target_site] >= MASK_COVERAGE * n_tar))
    if not tpl_mask.any():
        raise HarmonizationError("the template mask is empty: the two sites' warped brain "
                                 "masks do not overlap (registration failed?)")
    fill = _nearest_fill_index(tpl_mask)
    maps, taus, stats = {}, {}, {}
    if tissue_pool_fwhm_mm > 0:       # the reference's l0 at the lowest shell, before it is freed
        b_low = min(shells)
        weights = tissue_weights(tpl_fa, _site_mean(sums.sums[reference_site][b_low][..., :1],
                                                    sums.counts[reference_site])[..., 0],
                                 b_low, tpl_mask)
    for b in shells:
        means = [sums.site_mean(site, b, site_mean) for site in (reference_site, target_site)]
        tau_b = tau
        if tissue_pool_fwhm_mm > 0:     # lambda^2 pooled per tissue; tau is inside
            lam2, pooled_taus = tissue_pooled_ratio(means[0], means[1], weights, tpl_mask,
                                                    tpl_affine, tissue_pool_fwhm_mm, tau)
            means, tau_b = [lam2, np.ones_like(lam2)], 0.0
        if scale_estimator == "matched":
            means[0] = _site_mean(native[b], sums.counts[target_site])
        elif scale_estimator == "native-log":   # lambda^2 = exp(mean log ratio); tau is inside
            log_ratio = _site_mean(native[b], sums.counts[target_site])
            means, tau_b = [np.exp(log_ratio), np.ones_like(log_ratio)], 0.0
        native.pop(b, None)
        maps[b], taus[b], stats[_shell_key(b)] = scale_maps(
            means[0], means[1], tpl_mask, tpl_affine, tau=tau_b,
            smoothing_fwhm_mm=smoothing_fwhm_mm, scale_range=scale_range, fill_index=fill)
        if tissue_pool_fwhm_mm > 0:
            taus[b] = pooled_taus
        del means
    params = {"template": tpl_info, "mask_coverage": MASK_COVERAGE, "site_mean": site_mean,
              "scale_estimator": scale_estimator, "refit_rounds": 0,
              "noise_floor": bool(noise_floor),
              "min_subjects": int(min_subjects),
              "registration_options": registration_record(tpl_affine, registration_options),
              "n_subjects": {reference_site: n_ref, target_site: n_tar},
              "stats": stats, "template_mask_voxels": int(tpl_mask.sum())}
    if tissue_pool_fwhm_mm > 0:     # recorded only when on: default artefacts are unchanged
        params["tissue_pool_fwhm_mm"] = float(tissue_pool_fwhm_mm)
    return HarmonizationArtefact(
        template_fa=tpl_fa, template_affine=tpl_affine, template_mask=tpl_mask,
        scale_maps=maps, shells=shells, lmax=lmax, tau=float(tau), tau_values=taus,
        smoothing_fwhm_mm=float(smoothing_fwhm_mm), scale_range=tuple(scale_range),
        registration=registration, reference_site=reference_site, target_site=target_site,
        subjects=sums.subjects, pipeline_version=pipeline_version(), parameters=params,
        transforms=transforms, registration_contrast=registration_contrast,
        site_factors=site_factors or {})


def fit_from_terms(reference: Sequence[Callable[[], SubjectTerms]],
                   target: Sequence[Callable[[], SubjectTerms]], shells: Sequence[float],
                   lmax: int, *, template, template_info: dict | None = None,
                   transforms: Mapping[str, Callable[[], Transform]] | None = None,
                   tau: float = TAU_FRACTION,
                   smoothing_fwhm_mm: float = DEFAULT_SMOOTHING_FWHM_MM,
                   scale_range: tuple[float, float] = SCALE_RANGE,
                   reference_site: str = "reference", target_site: str = "target",
                   registration: str = "syn", min_subjects: int = MIN_SUBJECTS_PER_SITE,
                   registration_options: dict | None = None, site_mean: str = "mean",
                   scale_estimator: str = "ratio", noise_floor: bool = False,
                   registration_contrast: str = DEFAULT_REGISTRATION_CONTRAST,
                   tissue_pool_fwhm_mm: float = DEFAULT_TISSUE_POOL_FWHM_MM
                   ) -> HarmonizationArtefact:
    """:func:`fit_harmonization` given each subject's :class:`SubjectTerms`
    (callables returning them, one loaded at a time) through transforms to
    ``template`` computed beforehand (the engine: one node per subject): the
    same sums in the same order, so the same artefact, bit for bit.
    ``transforms``: ``{subject: callable returning its Transform}`` to keep
    in the artefact (None: none kept). Not for the estimators that form a
    term on each subject's grid (``"matched"``, ``"native-log"``)."""
    lmax = sh.check_lmax(lmax)
    check_choice("registration", registration, REGISTRATIONS)
    shells = _check_fit_options(shells, reference_site, target_site, site_mean,
                                scale_estimator, noise_floor, tissue_pool_fwhm_mm,
                                registration_contrast)
    if scale_estimator in NATIVE_ESTIMATORS:
        raise ValueError(f"scale_estimator {scale_estimator!r} forms its terms on each "
                         f"subject's grid: use fit_harmonization")
    if registration_contrast == SITE_SCALED_CONTRAST:
        raise ValueError(f"registration_contrast {registration_contrast!r} registers the "
                         f"target subjects through their site-scaled DWI, which terms do not "
                         f"hold: use fit_harmonization")
    check_site_sizes({reference_site: len(reference), target_site: len(target)}, min_subjects)
    tpl_fa, tpl_affine, tpl_info = _given_template(template, template_info)
    sums = _SiteSums(tpl_fa.shape, shells, lmax, (reference_site, target_site),
                     noise_floor=noise_floor, median=site_mean == "median")
    kept = {}
    for site, items in ((reference_site, reference), (target_site, target)):
        for item in items:
            terms = item()
            sums.add(site, terms)
            subject = terms.record["subject"]
            if transforms is not None and terms.record["registration"] != "identity":
                kept[(site, subject)] = transforms[subject]()
            del terms
    return _artefact_from_sums(
        sums, {}, tpl_fa, tpl_affine, tpl_info, shells, lmax, tau=tau,
        smoothing_fwhm_mm=smoothing_fwhm_mm, scale_range=scale_range, registration=registration,
        site_mean=site_mean, scale_estimator=scale_estimator, noise_floor=noise_floor,
        min_subjects=min_subjects, registration_options=dict(registration_options or {}),
        transforms=kept, registration_contrast=registration_contrast,
        tissue_pool_fwhm_mm=tissue_pool_fwhm_mm)


def _refit(reference, target, shells, lmax, rounds: int, harmonised_fa, kw: dict
           ) -> HarmonizationArtefact:
    """:func:`fit_harmonization` with ``rounds`` re-registrations of the target
    subjects through their harmonised FA (the reference transforms and the
    template stay; the site means always come from the original RISH)."""
    if rounds < 0:
        raise ValueError(f"refit_rounds must be >= 0, got {rounds}")
    if kw["registration"] == "identity":
        raise ValueError("refit_rounds needs a registration (not 'identity')")
    if harmonised_fa is None:
        raise ValueError("refit_rounds needs harmonised_fa: {target subject: callable}")
    if kw["registration_contrast"] != "fa":
        raise ValueError("refit_rounds re-registers through the harmonised FA: it needs "
                         "registration_contrast 'fa'")
    keep, opts = kw["keep_transforms"], dict(kw["registration_options"] or {})
    art = fit_harmonization(reference, target, shells, lmax,
                            **{**kw, "keep_transforms": True, "refit_rounds": 0})
    for _ in range(rounds):
        reg = {s: (lambda t=t: t) for (site, s), t in art.transforms.items()
               if site == kw["reference_site"]}
        for item in target:
            f = _load(item)
            fa = harmonised_fa[f.subject](art, art.transforms[(kw["target_site"], f.subject)])
            t = register_fa(np.where(np.asarray(f.mask, dtype=bool), fa, 0).astype(np.float32),
                            f.affine, art.template_fa, art.template_affine,
                            kw["registration"], **opts)
            reg[f.subject] = lambda t=t: t
            del f
        art = fit_harmonization(reference, target, shells, lmax, **{
            **kw, "keep_transforms": True, "refit_rounds": 0, "registered": reg,
            "template": (art.template_fa, art.template_affine),
            "template_info": art.parameters["template"]})
    art.parameters["refit_rounds"] = int(rounds)
    if not keep:
        art.transforms = {}
    return art


# ----------------------------------------------------------------------------
# Apply
# ----------------------------------------------------------------------------
def applied_artefacts(sidecar: Mapping | None) -> list[str]:
    """Content ids of the artefacts already applied to a derivative (its sidecar)."""
    if not sidecar:
        return []
    return [str(x) for x in sidecar.get(SIDECAR_KEY, [])]


def match_artefact_shells(gtab: GradientTable, artefact: HarmonizationArtefact,
                          source: str = "subject") -> dict[float, float]:
    """{artefact shell: subject shell}; HarmonizationError on a mismatch.

    Every artefact shell needs a subject shell within ``SHELL_TOLERANCE``,
    every subject shell an artefact shell, and each shell enough directions
    for the artefact's lmax.
    """
    subj = gtab.shells
    pairs = {b: match_shell(b, subj) for b in artefact.shells}
    missing = [b for b, s in pairs.items() if s is None]
    extra = [s for s in subj if match_shell(s, artefact.shells) is None]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no shell near b={', '.join(f'{b:g}' for b in missing)} "
                         f"(tolerance {SHELL_TOLERANCE:g} s/mm^2)")
        if extra:
            parts.append(f"shell(s) b={', '.join(f'{b:g}' for b in extra)} not harmonised by "
                         f"the artefact (select the artefact's shells first)")
        raise HarmonizationError(f"{source}: acquisition does not match artefact "
                                 f"{artefact.content_id[:12]} (shells {artefact.shells}): "
                                 + "; ".join(parts))
    need = sh.n_coeffs(artefact.lmax)
    for b, s in pairs.items():
        n = int(np.sum(gtab.shell_of == s))
        if n < need:
            raise HarmonizationError(
                f"{source}: shell b={s:g} has {n} directions, too few for the artefact's lmax "
                f"{artefact.lmax} ({need} coefficients; these directions support lmax "
                f"{sh.max_order_for(n)})")
    return pairs


def warp_scale_maps(artefact: HarmonizationArtefact, transform: Transform,
                    at: np.ndarray | None = None) -> dict:
    """The artefact's scale maps on a subject's grid: {shell: (X, Y, Z, n_orders)}
    float32 (linear interpolation; 1 outside the template's field of view);
    ``at``: at those subject voxels only (C-order flat indices): {shell:
    (len(at), n_orders)}, the same values (every shell and order warped in
    one pass: :meth:`Transform.to_subject_many`)."""
    # warp (lambda - 1): outside the template's field of view that is 0,
    # i.e. lambda = 1 (no change) rather than 0.
    n = {b: artefact.scale_maps[b].shape[3] for b in artefact.shells}
    warped = transform.to_subject_many(
        [artefact.scale_maps[b][..., k] - np.float32(1.0) for b in artefact.shells
         for k in range(n[b])], at)
    out, j = {}, 0
    for b in artefact.shells:
        vol = np.ascontiguousarray(warped[..., j:j + n[b]])
        vol += np.float32(1.0)
        out[b] = vol
        j += n[b]
    return out


def apply_harmonization(dwi: DWI, fa: np.ndarray | None, artefact: HarmonizationArtefact, *,
                        applied: Iterable[str] = (), force: bool = False,
                        transform: Transform | None = None, registration: str | None = None,
                        keep_residual: bool = True, inplace: bool = False,
                        chunk_size: int | None = None, subject: str = "subject",
                        registration_options: dict | None = None,
                        refit_rounds: int | None = None) -> tuple[np.ndarray, dict]:
    """Harmonise one subject's DWIs with ``artefact``: (float32 4D data, info);
    for a series held as mask rows only (``dwi.data`` None), the harmonised
    rows instead (a new array; :func:`with_values` puts either back in a DWI).

    Per shell and mask voxel: SH coefficients of the b0-normalised signal are
    scaled per order by the subject-space lambda maps and the DWIs rebuilt
    (times the mean b0). The fit is linear, so this equals
    ``S + B diag(lambda - 1) B^+ S``, computed without dividing by b0.
    ``keep_residual`` (default) keeps the part of the signal the SH do not
    represent (noise above lmax), so lambda = 1 returns the input exactly;
    False rebuilds from the scaled SH alone (as in the papers, which also
    removes that noise). Negative results are set to 0 (share reported).
    b0 volumes, voxels outside the mask and voxels with mean b0 <= 0 are
    unchanged.

    ``fa``: the subject's FA (None: fitted here) to register to the template,
    unless a ``transform`` is given, when the artefact registers through FA;
    otherwise the subject is registered through the artefact's
    ``registration_contrast`` (:func:`dwi_registration_image`).
    ``applied``: content ids of artefacts already applied to this input
    (:func:`applied_artefacts` of its sidecar); applying the same artefact again is refused unless ``force``.
    ``inplace`` overwrites ``dwi.data`` (halves peak memory).
    ``refit_rounds`` (None: the artefact's): re-register the subject through
    its FA harmonised with the current transform this many times before the
    data are scaled, as the fit did for its target subjects.
    ``registration_options`` (:func:`register_fa`'s keywords): its
    ``match_resolution`` defaults to the artefact's, as the fit registered.
    """
    cid = artefact.content_id
    registration_options = {"match_resolution": artefact.match_resolution,
                            **dict(registration_options or {})}
    if refit_rounds is None:
        refit_rounds = int(artefact.parameters.get("refit_rounds", DEFAULT_REFIT_ROUNDS))
    history = [str(x) for x in applied]
    if cid in history and not force:
        raise HarmonizationError(f"{subject}: artefact {cid[:12]} was already applied to this "
                                 f"input (history {', '.join(h[:12] for h in history)}); "
                                 f"applying it twice scales the SH twice (force=True to do it "
                                 f"anyway)")
    source = dwi.paths.get("dwi", subject) if dwi.paths else subject
    pairs = match_artefact_shells(dwi.gtab, artefact, source)
    grid = dwi.mask.shape
    t_start = time.perf_counter()
    if transform is None:
        kind = registration or artefact.registration
        if kind == "identity":
            transform = Transform("identity", np.eye(4), artefact.template_fa.shape,
                                  artefact.template_affine, grid, dwi.affine)
        else:
            transform = register_fa(dwi_registration_image(dwi, artefact, fa, subject),
                                    dwi.affine, artefact.template_fa,
                                    artefact.template_affine, kind,
                                    **dict(registration_options or {}))
    elif transform.subject_shape != tuple(grid) or transform.template_shape != \
            artefact.template_fa.shape:
        raise HarmonizationError(f"{source}: the given transform maps grid "
                                 f"{transform.subject_shape} to {transform.template_shape}, "
                                 f"the data/artefact are {grid} and "
                                 f"{artefact.template_fa.shape}")
    if refit_rounds and artefact.registration_contrast != "fa":
        raise HarmonizationError(f"{source}: refit rounds re-register through the harmonised "
                                 f"FA; the artefact registers through "
                                 f"{artefact.registration_contrast!r}")
    for _ in range(refit_rounds if transform.kind != "identity" else 0):
        fa_h = harmonised_fa(dwi, artefact, transform, chunk_size=chunk_size)
        transform = register_fa(np.where(dwi.mask, fa_h, 0).astype(np.float32), dwi.affine,
                                artefact.template_fa, artefact.template_affine, transform.kind,
                                **dict(registration_options or {}))
    t_registered = time.perf_counter()
    voxels = dwi.masked_index()       # the (C-order) voxel of each row, in row order
    n_orders = artefact.lmax // 2 + 1
    # scale maps at the mask voxels (storage order): (n_vox, n_orders) per shell
    lam_rows, lam_median = {}, {}
    for b, lr in warp_scale_maps(artefact, transform, at=voxels).items():
        lam_rows[b] = lr
        lam_median[_shell_key(b)] = {f"l{2 * k}": float(np.median(lr[:, k])) if lr.size else None
                                     for k in range(n_orders)}
    out, n_clipped, n_values = scale_sh(dwi, lam_rows, artefact.lmax, pairs,
                                        keep_residual=keep_residual, inplace=inplace,
                                        chunk_size=chunk_size, source=source)
    info = {
        "artefact_content_id": cid, "applied": history + [cid],
        "reference_site": artefact.reference_site, "target_site": artefact.target_site,
        "shells": {_shell_key(b): float(s) for b, s in pairs.items()},
        "lmax": artefact.lmax, "registration": transform.kind,
        "refit_rounds": int(refit_rounds),
        "prealign": transform.prealign.tolist(), "keep_residual": bool(keep_residual),
        "negative_clipped_fraction": n_clipped / max(n_values, 1),
        "scale_median_in_mask": lam_median, "forced": bool(force and cid in history),
        "pipeline_version": pipeline_version(), "artefact_pipeline_version":
            artefact.pipeline_version,
        "timing_s": {"registration": t_registered - t_start,
                     "scaling": time.perf_counter() - t_registered},
    }
    return out, info


def scale_sh(dwi: DWI, lam_rows: Mapping[float, np.ndarray], lmax: int,
             pairs: Mapping[float, float], *, keep_residual: bool = True, inplace: bool = False,
             chunk_size: int | None = None, source: str = "subject"
             ) -> tuple[np.ndarray, int, int]:
    """Scale each shell's SH per order: (data or mask rows, negatives clipped,
    values scaled) - the scaling step of :func:`apply_harmonization`.

    ``lam_rows[shell]``: (mask voxels in storage order, lmax/2 + 1) factors
    per voxel (a broadcast view for one global factor per order);
    ``pairs``: {factor shell: the DWI's shell}. See
    :func:`apply_harmonization` for ``keep_residual``/``inplace``.
    """
    if dwi.data is None:       # mask rows only: harmonised into a new array, chunk by
        # chunk from the (read-only, mapped) rows: no whole copy first
        out = np.empty(dwi.rows.shape, dtype=np.float32, order="F")
        flat, rows_idx = dwi.rows, None
    else:
        out = dwi.data if inplace else dwi.data.copy(order="K")
        flat, rows_idx, _ = storage_rows(out, dwi.mask)
        if not np.shares_memory(flat, out):   # results are written through the view
            raise ValueError("data must be C- or F-contiguous")
    gtab = dwi.gtab
    b0 = np.flatnonzero(gtab.b0s_mask)
    if b0.size == 0:
        raise HarmonizationError(f"{source}: no b0 volume to normalise the signal")
    ops = []
    for b, s in pairs.items():
        idx = np.flatnonzero(gtab.shell_of == s)
        basis = sh.sh_basis(gtab.bvecs[idx], lmax)
        pinv = sh.sh_pinv(basis, lmax)
        per_coeff = sh.order_of_coeff(lmax) // 2
        ops.append((b, idx, pinv.T.astype(np.float32), basis.T.astype(np.float32), per_coeff))
    chunk = sh.chunk_voxels(out.shape[-1], chunk_size)
    n_clipped = n_values = 0
    n_rows = flat.shape[0] if rows_idx is None else rows_idx.size
    for i in range(0, n_rows, chunk):
        if rows_idx is None:
            where = slice(i, i + chunk)
            rows = np.array(flat[where], dtype=np.float32, order="C")
        else:
            where = rows_idx[i:i + chunk]
            rows = flat[where]
        s0 = rows[:, b0].mean(axis=1)
        ok = s0 > 0
        for b, idx, pinv_t, basis_t, per_coeff in ops:
            sig = rows[:, idx]
            c = sig @ pinv_t                                   # (n, n_coef), unnormalised
            lam = lam_rows[b][i:i + chunk][:, per_coeff]
            if keep_residual:
                new = sig + (c * (lam - np.float32(1.0))) @ basis_t
            else:
                new = (c * lam) @ basis_t
            neg = new < 0
            n_clipped += int(np.count_nonzero(neg[ok]))
            n_values += int(ok.sum()) * idx.size
            new[neg] = 0
            new[~ok] = sig[~ok]
            rows[:, idx] = new
        (out if rows_idx is None else flat)[where] = rows
    return out, n_clipped, n_values


def dwi_registration_image(dwi: DWI, artefact: HarmonizationArtefact,
                           fa: np.ndarray | None = None, subject: str = "subject") -> np.ndarray:
    """The image ``dwi`` is registered to ``artefact``'s template through: its
    ``registration_contrast`` (:func:`registration_image`), from ``fa`` (None:
    fitted here) or from RISH maps at the artefact's lmax and lowest shell, as
    the fit computed them for its subjects; for ``SITE_SCALED_CONTRAST`` the
    FA of ``dwi`` scaled by the artefact's site factors (a given ``fa``, of
    the unscaled data, is not used)."""
    source = dwi.paths.get("dwi", subject) if dwi.paths else subject
    grid = dwi.mask.shape
    rish, b0 = {}, None
    if artefact.registration_contrast == B0_CONTRAST:
        b0 = mean_b0(dwi)
    elif artefact.registration_contrast == SITE_SCALED_CONTRAST:
        fa = site_scaled_fa(dwi, artefact.site_factors, artefact.lmax, source=source)
    elif artefact.registration_contrast == "fa":
        fa = np.asarray(dti_fa(dwi) if fa is None else fa, dtype=np.float32)
        if fa.shape != grid:
            raise HarmonizationError(f"{source}: FA shape {fa.shape} != DWI grid {grid}")
    else:
        lowest = min(artefact.shells)
        shell = match_artefact_shells(dwi.gtab, artefact, source)[lowest]
        rish = {lowest: rish_maps(dwi, artefact.lmax, [shell])[shell]}
    f = SubjectFeatures(subject, fa, dwi.affine, dwi.mask, rish, b0=b0)
    return registration_image(f, artefact.registration_contrast, artefact.shells)


def site_scaled_fa(dwi: DWI, factors: Mapping[float, np.ndarray], lmax: int,
                   chunk_size: int | None = None, source: str = "subject") -> np.ndarray:
    """FA (:func:`dti_fa`) of ``dwi`` with each shell's SH scaled per order by
    one global factor (``{shell: (lmax/2 + 1,)}``, :func:`site_scaling_factors`):
    the image a target subject registers through for ``SITE_SCALED_CONTRAST``.
    Shells without a factor are left as they are."""
    pairs = {float(b): _select_shells(dwi, [b])[0] for b in factors}
    n_vox = int(dwi.masked_index().size)
    lam = {b: np.broadcast_to(np.asarray(g, dtype=np.float32), (n_vox, lmax // 2 + 1))
           for b, g in factors.items()}
    data = scale_sh(dwi, lam, lmax, pairs, chunk_size=chunk_size, source=source)[0]
    return dti_fa(with_values(dwi, data))


def harmonised_fa(dwi: DWI, artefact: HarmonizationArtefact, transform: Transform,
                  chunk_size: int | None = None) -> np.ndarray:
    """FA (:func:`dti_fa`) of ``dwi`` harmonised with ``artefact`` through
    ``transform``: the contrast the target subjects are re-registered
    through when refitting (``refit_rounds``)."""
    data, _ = apply_harmonization(dwi, None, artefact, transform=transform, force=True,
                                  chunk_size=chunk_size, refit_rounds=0)
    return dti_fa(with_values(dwi, data))


def with_values(dwi: DWI, values: np.ndarray) -> DWI:
    """``dwi`` holding ``values`` (what :func:`apply_harmonization` returned):
    4D data, or mask rows for a series held as rows."""
    return replace(dwi, rows=values) if dwi.data is None else replace(dwi, data=values, rows=None)


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------
def site_effect(values_ref, values_tar) -> dict:
    """Site effect on one metric: Cohen's d (target - reference, pooled SD),
    Welch's t and two-sided p, and both means."""
    from scipy import stats
    a = np.asarray(values_ref, dtype=np.float64).ravel()
    b = np.asarray(values_tar, dtype=np.float64).ravel()
    if a.size < 2 or b.size < 2:
        raise ValueError(f"need >= 2 values per site, got {a.size} and {b.size}")
    va, vb = a.var(ddof=1), b.var(ddof=1)
    pooled = math.sqrt(((a.size - 1) * va + (b.size - 1) * vb) / (a.size + b.size - 2))
    diff = b.mean() - a.mean()
    d = diff / pooled if pooled > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    if va == 0 and vb == 0:
        t, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    else:
        res = stats.ttest_ind(b, a, equal_var=False)
        t, p = float(res.statistic), float(res.pvalue)
    return {"cohen_d": float(d), "t": float(t), "p": float(p),
            "mean_ref": float(a.mean()), "mean_tar": float(b.mean())}


@dataclass
class SubjectSummary:
    """Maps and white-matter means of one subject for :func:`evaluate_harmonization`.
    ``values``: {(metric, shell): mean}, metric in fa, md, rish_l0, ...
    (shell NaN for the tensor metrics)."""

    subject: str
    fa: np.ndarray
    mask: np.ndarray
    wm_mask: np.ndarray
    values: dict

    def values_record(self) -> list:
        """``values`` as JSON-ready ``[metric, shell or None, mean]`` rows, in order."""
        return self.record_of(self.values)

    @staticmethod
    def record_of(values: Mapping) -> list:
        """A ``values`` dict (:func:`summary_values`) as :meth:`values_record`'s rows."""
        return [[m, None if math.isnan(b) else b, v] for (m, b), v in values.items()]

    @staticmethod
    def values_from_record(rows: Sequence) -> dict:
        """The ``values`` dict of :meth:`values_record`'s rows (JSON floats
        round-trip exactly)."""
        return {(m, math.nan if b is None else float(b)): float(v) for m, b, v in rows}


def warped_fa(f: SubjectFeatures, t: Transform) -> np.ndarray:
    """A reference subject's FA (0 outside its brain mask) on the template grid
    through its registration ``t``: its share of :func:`template_wm_mask`."""
    return t.to_template(masked_fa(f))


def own_wm_mask(fa: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A subject's own white matter (the ``own-fa`` evaluation mask): FA >=
    ``WM_FA_THRESHOLD`` within its brain mask. Moves with the site's noise
    and voxel size; :func:`template_wm_mask` is the engine's definition."""
    return np.asarray(mask, dtype=bool) & (np.asarray(fa) >= WM_FA_THRESHOLD)


def template_wm_mask(reference_fa: Sequence, template_mask: np.ndarray) -> np.ndarray:
    """The evaluation's white matter in template space, defined once from the
    reference site: the mean of the reference subjects' FA on the template
    grid (:func:`warped_fa`; arrays or callables loading them) >=
    ``WM_FA_THRESHOLD``, within the template mask. Every subject of both
    sites is then evaluated in it (:func:`subject_wm_mask`), so the sites'
    masks differ by registration only, not by their own FA's noise."""
    total, n = None, 0
    for item in reference_fa:
        arr = np.asarray(item() if callable(item) else item, dtype=np.float32)
        total = arr.copy() if total is None else total + arr
        n += 1
    if not n:
        raise HarmonizationError("no reference subject to define the evaluation's white matter")
    return np.asarray(template_mask, dtype=bool) & (total / np.float32(n) >= WM_FA_THRESHOLD)


def subject_wm_mask(template_wm: np.ndarray, t: Transform, mask: np.ndarray) -> np.ndarray:
    """The template-space white matter (:func:`template_wm_mask`) on a
    subject's grid through its registration ``t`` (linear, kept where >=
    ``EVAL_MASK_MIN_FRACTION``), within its brain ``mask``."""
    on_subject = t.to_subject(np.asarray(template_wm, dtype=np.float32))
    return np.asarray(mask, dtype=bool) & (on_subject >= EVAL_MASK_MIN_FRACTION)


def summary_values(fa: np.ndarray, md: np.ndarray, rish: Mapping, wm_mask: np.ndarray,
                   lmax: int, *, orders: Sequence[int] = EVAL_ORDERS,
                   subject: str = "") -> dict:
    """``{(metric, shell): mean}`` over ``wm_mask`` of FA, MD and the RISH maps
    ``{shell: (X, Y, Z, orders)}`` per order (shell NaN for the tensor metrics);
    an empty mask is a HarmonizationError."""
    wm_mask = np.asarray(wm_mask, dtype=bool)
    if not wm_mask.any():
        raise HarmonizationError(f"{subject or 'subject'}: empty white-matter mask")
    values = {("fa", math.nan): float(fa[wm_mask].mean()),
              ("md", math.nan): float(md[wm_mask].mean())}
    for b, r in rish.items():
        for o in orders:
            if o <= lmax:
                values[(f"rish_l{o}", float(b))] = float(r[..., o // 2][wm_mask].mean())
    return values


def summarise_subject(dwi: DWI, lmax: int, *, subject: str = "",
                      wm_mask: np.ndarray | None = None,
                      orders: Sequence[int] = EVAL_ORDERS, tensor=None,
                      rish: Mapping | None = None) -> SubjectSummary:
    """White-matter means of FA, MD (DTI on b <= DTI_MAX_BVAL) and RISH per
    shell and order; WM = FA >= WM_FA_THRESHOLD in the mask unless given
    (pass the pre-harmonization WM mask when summarising harmonised data).

    ``tensor`` (:func:`dti_tensor` of ``dwi``) and ``rish`` (:func:`rish_maps`
    of ``dwi`` at ``lmax``, every shell) are fitted here unless given, e.g.
    by the features of the same series: the summary is then computed
    without fitting either a second time.
    """
    tf = dti_tensor(dwi) if tensor is None else tensor
    fa, md = tf.fa, tf.md
    wm_mask = own_wm_mask(fa, dwi.mask) if wm_mask is None else np.asarray(wm_mask, dtype=bool)
    values = summary_values(fa, md, rish_maps(dwi, lmax) if rish is None else rish, wm_mask,
                            lmax, orders=orders, subject=subject)
    return SubjectSummary(subject, fa, dwi.mask.copy(), wm_mask, values)


def evaluate_harmonization(reference: Sequence, target_before: Sequence,
                           target_after: Sequence, lmax: int, *,
                           reference_after: Sequence | None = None,
                           wm_mask: str = EVAL_MASK_OWN):
    """Site effect before vs after harmonization, and anatomy preservation.

    Each list holds DWIs or :class:`SubjectSummary` (the same subjects, in the
    same order, in ``target_before`` and ``target_after``; harmonised data are
    summarised in the WM mask of their pre-harmonization data).
    ``reference_after`` (when the reference site was harmonised too) defaults
    to ``reference``. ``wm_mask``: how the summaries' white matter was
    defined (a key of ``EVAL_MASKS``; DWIs are summarised in their own,
    "own-fa"), recorded in every row.

    Returns (site table: metric, shell, n_ref, n_tar, d_before, p_before,
    d_after, p_after, mean_ref_before/after, mean_tar_before/after, wm_mask;
    preservation table: site, subject, fa_corr = Pearson correlation of the
    subject's FA maps before/after in its brain mask).
    """
    import pandas as pd
    check_choice("wm_mask", wm_mask, tuple(EVAL_MASKS))

    def summ(items, wms=None):
        out = []
        for i, x in enumerate(items):
            if isinstance(x, SubjectSummary):
                out.append(x)
            else:
                out.append(summarise_subject(x, lmax, subject=_name(x, i),
                                     wm_mask=None if wms is None else wms[i].wm_mask))
        return out

    if len(target_before) != len(target_after):
        raise ValueError(f"{len(target_before)} target subjects before but "
                         f"{len(target_after)} after harmonization")
    ref_b = summ(reference)
    tar_b = summ(target_before)
    tar_a = summ(target_after, tar_b)
    if reference_after is None:
        ref_a = ref_b
    else:
        if len(reference_after) != len(reference):
            raise ValueError("reference_after must list the reference subjects")
        ref_a = summ(reference_after, ref_b)
    rows = []
    keys = [k for k in ref_b[0].values if all(k in s.values for s in ref_b + tar_b + tar_a)]
    for metric, shell in keys:
        before = site_effect([s.values[(metric, shell)] for s in ref_b],
                             [s.values[(metric, shell)] for s in tar_b])
        after = site_effect([s.values[(metric, shell)] for s in ref_a],
                            [s.values[(metric, shell)] for s in tar_a])
        rows.append({"metric": metric, "shell": shell, "n_ref": len(ref_b), "n_tar": len(tar_b),
                     "d_before": before["cohen_d"], "p_before": before["p"],
                     "d_after": after["cohen_d"], "p_after": after["p"],
                     "mean_ref_before": before["mean_ref"], "mean_tar_before": before["mean_tar"],
                     "mean_ref_after": after["mean_ref"], "mean_tar_after": after["mean_tar"],
                     "wm_mask": wm_mask})
    pres = []
    for site, bef, aft in (("target", tar_b, tar_a),) + (
            (("reference", ref_b, ref_a),) if reference_after is not None else ()):
        for sb, sa in zip(bef, aft):
            m = sb.mask
            pres.append({"site": site, "subject": sb.subject,
                         "fa_corr": float(np.corrcoef(sb.fa[m], sa.fa[m])[0, 1])})
    return pd.DataFrame(rows), pd.DataFrame(pres)


def _name(x, i: int) -> str:
    paths = getattr(x, "paths", None) or {}
    return str(paths.get("dwi", f"subject-{i + 1}"))
