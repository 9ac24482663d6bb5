"""Synthetic head-like diffusion-MRI cohorts with known ground truth.

Numerics plus file writing (no pydra). :func:`simulate_subject` builds one
subject in memory, :func:`write_cohort` writes a cohort in the HCP or BIDS
layout together with the ground truth under ``derivatives/truth``.

Anatomy (normalised to the field of view, so any grid shape works)
------------------------------------------------------------------
Two anatomies: this module's geometric head (the default, below; the tests,
studies and shipped checkpoints are built on it) and ``anatomy="brain"``
(:mod:`.brain`: MNI152 2009 tissue maps, white-matter orientations from their
structure, a non-linear warp per seed), which shares the signal model, the
truth maps and the noise below.

An ellipsoidal head (semi-axes ``HEAD_FILL`` x FOV) with an outer CSF rim,
a folded cortex-like grey-matter shell, white matter inside, two lateral
ventricles (CSF) and two thalamus-like deep grey nuclei. The white matter
holds five fibre bundles plus a background population:

* ``cc`` - corpus-callosum-like arc (left-right, a slab curving upwards),
* ``cst_left``/``cst_right`` - straight projection bundles, crossing the
  ``cc`` at 90 deg,
* ``slf_left`` - an arched anterior-posterior association bundle crossing
  ``cst_left`` at 90 deg, ``slf_right`` its mirror tilted to cross
  ``cst_right`` at 60 deg,
* ``background`` - diffuse white matter whose fibres fan out radially from a
  point below the head (corona-radiata-like).

Each fibre population's orientation is the tangent of its bundle's centre
curve, so orientation is continuous along the fibres. Volume fractions come
from signed distances with a linear partial-volume ramp one voxel wide, so
coarser voxels (a ``SiteEffect`` resolution) get more partial volume.

Signal
------
Per fibre population: intra-axonal stick plus extra-axonal zeppelin
(``BUNDLE_TISSUE``, ``BACKGROUND_TISSUE``; tortuosity across in bundles);
grey matter isotropic ``D_GM``, CSF free water ``D_CSF``. Each tissue carries
proton density ``PD`` and transverse relaxation ``T2_MS``, both modulated by
smooth low-order spatial fields, so tissue ``t`` contributes
``f_t PD_t exp(-TE / T2_t) E_t(b, g)`` (``f_t`` volume fraction). Rician noise
is added with ``sigma = mean(white-matter b0) / SNR``.

Ground truth (``PhantomSubject.truth``)
---------------------------------------
* ``s0``: noise-free b=0 signal (HCP-style b0 volumes stored at b=5 are
  weighted by b=5 too: up to 1.5 % lower in CSF); ``pd``: ``sum_t f_t PD_t`` (signal units);
  ``t2``: apparent T2 (ms) with ``s0 == pd * exp(-TE / t2)`` exactly (the
  tissue T2 in pure voxels, a TE-dependent mixture in partial volume).
* ``fa``, ``md`` (mm^2/s), ``v1``: of the mean diffusion tensor
  ``D = sum_c w_c D_c`` over all compartments, weights ``w_c`` = b=0 signal
  fractions (= volume fractions within a tissue). This is the exact low-b
  (first cumulant) limit: ``-d ln S / db |_{b=0} = g^T D g``. A DTI fit at
  b=1000 sees ``ln S = -b g^T D g + b^2/2 Var_g(ADC) - ...`` and so
  underestimates diffusivities where compartments differ (white-matter
  radial diffusivity ~10-20 %, CSF partial volume more): measured with
  b0 + b=1000, pure white matter FA +0.02..0.09 (bundles ~+0.04,
  background ~+0.06) and MD -3..-9 %. In crossings the mean
  tensor is the average of the populations' tensors: FA drops and ``v1`` is
  that of the average, not of any fibre (ill-defined in an equal 90 deg
  crossing); use ``peaks``/``peak_fractions``/``nfib`` there. ``v1`` is 0
  where ``fa < V1_MIN_FA``.
* ``label`` (0 background, 1 CSF, 2 GM, 3 WM; the largest tissue fraction),
  ``mask`` (head fraction >= 0.5; ``mask == (label > 0)``), ``nfib``
  (populations holding >= ``NFIB_MIN_FRACTION`` of the voxel volume),
  ``fractions`` (X, Y, Z, 3: CSF, GM, WM), ``peaks`` (X, Y, Z, 3, 3) and
  ``peak_fractions`` (X, Y, Z, 3) of the three largest populations,
  ``bundle`` (index into ``BUNDLES`` + 1 of the largest population, 0 none).

Fibre-continuity phantom
------------------------
:func:`simulate_continuity_subject` is a white-matter slab with no gradient
physics in the signal whose b0 gradient is perpendicular to the fibre in a
chosen share of the voxels: the confound control of the image-gradient study.

Frames: the affine is diagonal with a positive determinant (RAS+, as
written by dcm2niix/BIDS tools), centred on the head. b-vectors, ``v1`` and
``peaks`` are in the FSL image frame of :mod:`dmriflow.interfaces.gradients`
(voxel axes, **x flipped** because the determinant is positive), so a DTI
fit of the written data compares with ``v1`` directly; the signal itself is
computed with ``gtab.to_world(affine)``.
"""

from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np

from .. import __version__, sh
from ..dti import fractional_anisotropy, mean_diffusivity
from ..gradients import (GradientTable, electrostatic_directions, format_bvals, format_bvecs,
                         world_to_fsl)
from ..io import save_nifti, write_json, write_text

# ----------------------------------------------------------------------------
# Named constants
# ----------------------------------------------------------------------------
#: Default grid and voxel size (mm): small and fast, scales to any shape.
DEFAULT_SHAPE = (40, 48, 40)
DEFAULT_VOXEL_MM = 2.5
#: HCP 3T echo time (ms) and field strength (T).
HCP_TE_MS = 89.5
HCP_FIELD_T = 3.0
#: Default SNR (mean white-matter b0 / sigma).
DEFAULT_SNR = 30.0
#: Signal units: proton density 1 maps to this value.
SIGNAL_SCALE = 10000.0
#: HCP stores b0 volumes as b=5 and shells as e.g. 990/1985/2990 s/mm^2.
HCP_B0_STORED = 5.0
HCP_SHELL_OFFSET = -10.0
HCP_SHELL_JITTER_STEPS = 2       # +- steps of 5 s/mm^2 around the offset

#: Diffusivities (mm^2/s).
D_CSF = 3.0e-3                   # free water at body temperature
D_GM = 0.8e-3                    # grey matter, isotropic
#: Fibre population = intra-axonal stick (volume fraction ``f_intra``,
#: diffusivity ``d_intra``) + extra-axonal zeppelin (``d_extra_par`` along,
#: ``d_extra_perp`` across; None = tortuosity ``d_extra_par (1 - f_intra)``).
#: Bundles: coherent, FA ~0.8, MD ~0.75e-3 (low-b limit).
BUNDLE_TISSUE = {"f_intra": 0.6, "d_intra": 1.7e-3, "d_extra_par": 1.7e-3, "d_extra_perp": None}
#: Background white matter: fewer axons and a less anisotropic extra-axonal
#: space, a crude stand-in for orientation dispersion (FA ~0.45, MD ~0.8e-3).
BACKGROUND_TISSUE = {"f_intra": 0.3, "d_intra": 1.7e-3, "d_extra_par": 1.0e-3,
                     "d_extra_perp": 0.8e-3}
#: T2 (ms, 3T) and relative proton density per tissue.
T2_MS = {"csf": 1500.0, "gm": 85.0, "wm": 70.0}
PD = {"csf": 1.0, "gm": 0.82, "wm": 0.70}
TISSUES = ("csf", "gm", "wm")
#: Labels written to the truth label map.
LABELS = {"background": 0, "csf": 1, "gm": 2, "wm": 3}

#: Geometry in head-normalised units (head surface at radius 1).
HEAD_FILL = 0.40                 # head semi-axes as a fraction of the FOV
R_CSF_INNER = 0.92               # outer CSF rim: 0.92 .. 1
R_WM = 0.74                      # grey/white boundary radius ...
FOLD_AMPLITUDE = 0.04            # ... folded by this much (gyri)
VENTRICLE_CENTRE = (0.11, 0.04, 0.0)
VENTRICLE_SEMI = (0.065, 0.30, 0.09)
THALAMUS_CENTRE = (0.14, -0.12, -0.13)
THALAMUS_SEMI = (0.08, 0.13, 0.08)
#: Fibre bundles (indices + 1 are the truth ``bundle`` map values).
BUNDLES = ("cc", "cst_left", "cst_right", "slf_left", "slf_right")
POPULATIONS = BUNDLES + ("background",)
#: Crossing angles designed into the template (deg).
CROSSING_ANGLES = {"cc/cst": 90.0, "slf_left/cst_left": 90.0, "slf_right/cst_right": 60.0}

#: A population counts in ``nfib`` when it holds this much of the voxel.
NFIB_MIN_FRACTION = 0.1
#: ``v1`` is set to 0 where the true FA is below this (isotropic tissue).
V1_MIN_FA = 0.01
#: Voxels per chunk of the signal computation (float64 rows of N volumes).
CHUNK_VOXELS = 8192

#: Per-subject variability (standard deviations unless stated).
SUBJECT_SD = {
    "rotation_deg": 2.5, "scale": 0.03, "shear": 0.01, "translation_mm": 1.5,
    "diffusivity": 0.04, "f_intra": 0.03, "t2": 0.04, "t2_csf": 0.08, "pd": 0.02,
    "t2_field": 0.03, "pd_field": 0.015, "wm_radius": 0.012, "bundle_size": 0.06,
}
VENTRICLE_SCALE_RANGE = (0.85, 1.25)


# ----------------------------------------------------------------------------
# Gradient scheme
# ----------------------------------------------------------------------------
def hcp_scheme(n_b0: int = 18, shells: Sequence[float] = (1000, 2000, 3000),
               n_dirs: int | Sequence[int] = 90, seed: int = 0,
               jitter: bool = True) -> GradientTable:
    """An HCP-like multi-shell scheme (default 18 b0 + 3 x 90 = 288 volumes).

    Each shell has its own electrostatically spread direction set. b0
    volumes are interleaved at regular intervals (HCP: one every 16), shell
    volumes round-robin in between. With ``jitter`` b-values are stored as
    HCP does: b0 = 5, shells ``nominal - 10 +- 5k`` (990, 1985, ...), so shell
    classification is exercised; without it b0 = 0 and exact nominal shells.
    """
    rng = np.random.default_rng(seed)
    counts = [int(n_dirs)] * len(shells) if np.isscalar(n_dirs) else [int(n) for n in n_dirs]
    if len(counts) != len(shells):
        raise ValueError(f"{len(shells)} shells but {len(counts)} direction counts")
    dirs = [electrostatic_directions(n, rng) for n in counts]
    # round-robin: item j of a shell with n directions sits at (j + 0.5) / n
    keys = [((j + 0.5) / n, s, j) for s, n in enumerate(counts) for j in range(n)]
    keys.sort()
    n_dw = len(keys)
    n_total = n_b0 + n_dw
    b0_pos = set((np.arange(n_b0) * n_total) // max(n_b0, 1))
    bvals = np.zeros(n_total)
    bvecs = np.zeros((n_total, 3))
    it = iter(keys)
    for i in range(n_total):
        if i in b0_pos:
            bvals[i] = HCP_B0_STORED if jitter else 0.0
            continue
        _, s, j = next(it)
        b = float(shells[s])
        if jitter:
            b += HCP_SHELL_OFFSET + 5.0 * rng.integers(-HCP_SHELL_JITTER_STEPS,
                                                       HCP_SHELL_JITTER_STEPS + 1)
        bvals[i] = b
        bvecs[i] = dirs[s][j]
    return GradientTable(bvals, bvecs, source="dmriflow.phantom.hcp_scheme")


# ----------------------------------------------------------------------------
# Site effects and subject parameters
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteEffect:
    """Acquisition/site differences applied on top of the anatomy.

    Fields left ``None`` keep the arguments of :func:`simulate_subject`.

    * ``rish_scale``: ``{order: scale}`` applied to the SH coefficients
      (up to ``rish_lmax``, default :func:`sh.max_order_for` the shell's
      direction count) of every shell's b0-normalised noise-free signal, or
      ``{shell_b: {order: scale}}`` per shell; b0 volumes are untouched. The
      part of the signal above ``rish_lmax`` is kept, so an SH fit of order
      ``rish_lmax`` of the result has RISH ``s_l^2 R_l`` exactly, except where
      a scaled signal went negative and was clipped to 0 (none at b=1000 for
      scales ~0.8-1.3, ~10 % of white-matter signals at b=3000 for
      {2: 1.3, 4: 0.8}; the share is in ``params["rish_clipped_fraction"]``).
    * ``snr``, ``te`` (ms), ``voxel_size`` (mm; the same FOV is simulated on
      the grid of this voxel size), ``scheme``.
    * ``field_strength`` (T): written to the sidecars; ``t2_scale``
      multiplies all tissue T2 (e.g. ~0.8 for 7T).
    """

    name: str = "site"
    rish_scale: Mapping | None = None
    rish_lmax: int | None = None
    snr: float | None = None
    te: float | None = None
    voxel_size: float | Sequence[float] | None = None
    field_strength: float = HCP_FIELD_T
    t2_scale: float = 1.0
    scheme: GradientTable | None = None

    def describe(self) -> dict:
        d = asdict(self)
        d.pop("scheme")
        d["scheme"] = None if self.scheme is None else f"{len(self.scheme)} volumes"
        if self.rish_scale is not None:
            d["rish_scale"] = {str(k): (dict((str(a), b) for a, b in v.items())
                                        if isinstance(v, Mapping) else v)
                               for k, v in self.rish_scale.items()}
        return d


@dataclass
class PhantomSubject:
    """One simulated subject: float32 DWI (X, Y, Z, N), gradients, truth."""

    dwi: np.ndarray
    gtab: GradientTable
    affine: np.ndarray
    mask: np.ndarray
    truth: dict
    seed: int
    snr: float | None
    sigma: float
    te: float
    field_strength: float
    voxel_size: tuple
    site: str | None = None
    params: dict = field(default_factory=dict)
    noise_free: np.ndarray | None = None
    phase: np.ndarray | None = None     # radians, where the generator keeps the complex noise

    def sidecar(self) -> dict:
        """BIDS-style acquisition sidecar (EchoTime in s)."""
        return {
            "Manufacturer": "dmriflow-phantom",
            "ManufacturersModelName": "head phantom",
            "SoftwareVersions": __version__,
            "MagneticFieldStrength": float(self.field_strength),
            "EchoTime": round(self.te / 1000.0, 6),
            "PhantomSimulation": {
                "Seed": int(self.seed), "SNR": self.snr, "NoiseSigma": float(self.sigma),
                "NoiseModel": "rician", "Site": self.site,
                "VoxelSize": list(self.voxel_size), "BvecFrame": "fsl-image",
            },
        }


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _field_terms(u: np.ndarray) -> np.ndarray:
    """Low-order polynomial terms (n, 9) of head-normalised coordinates."""
    x, y, z = u.T
    return np.stack([x, y, z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3,
                     x * y, x * z, y * z], axis=1)


def subject_parameters(seed: int) -> dict:
    """All random per-subject quantities (anatomy, tissue, relaxation)."""
    anat_ss, tissue_ss = np.random.SeedSequence([int(seed), 1]).spawn(2)
    ra, rt = np.random.default_rng(anat_ss), np.random.default_rng(tissue_ss)
    sd = SUBJECT_SD
    scales = np.clip(1.0 + sd["scale"] * ra.standard_normal(3), 0.92, 1.08)
    shear = np.clip(sd["shear"] * ra.standard_normal(3), -0.03, 0.03)
    shear_m = np.eye(3)
    shear_m[0, 1], shear_m[0, 2], shear_m[1, 2] = shear
    rot = _rotation(np.radians(np.clip(sd["rotation_deg"] * ra.standard_normal(3), -6, 6)))
    n_pop = len(POPULATIONS)
    f_nominal = np.array([BUNDLE_TISSUE["f_intra"]] * len(BUNDLES)
                         + [BACKGROUND_TISSUE["f_intra"]])
    return {
        "A": rot @ shear_m @ np.diag(scales),
        "t": np.clip(sd["translation_mm"] * ra.standard_normal(3), -3, 3),
        "ventricle_scale": float(ra.uniform(*VENTRICLE_SCALE_RANGE)),
        "wm_radius": float(R_WM + np.clip(sd["wm_radius"] * ra.standard_normal(), -0.03, 0.03)),
        "fold_phase": float(ra.uniform(0, 2 * math.pi)),
        "bundle_size": np.clip(1 + sd["bundle_size"] * ra.standard_normal(len(BUNDLES)),
                               0.85, 1.15),
        "cc_curvature": float(np.clip(1 + 0.05 * ra.standard_normal(), 0.9, 1.1)),
        "diffusivity_scale": np.clip(1 + sd["diffusivity"] * rt.standard_normal(n_pop), 0.88, 1.12),
        "f_intra": np.clip(f_nominal + sd["f_intra"] * rt.standard_normal(n_pop), 0.2, 0.8),
        "d_gm": D_GM * float(np.clip(1 + sd["diffusivity"] * rt.standard_normal(), 0.88, 1.12)),
        "d_csf": D_CSF,
        "t2": {t: T2_MS[t] * float(np.clip(1 + sd["t2_csf" if t == "csf" else "t2"]
                                           * rt.standard_normal(), 0.8, 1.2)) for t in TISSUES},
        "pd": {t: PD[t] * float(np.clip(1 + sd["pd"] * rt.standard_normal(), 0.93, 1.07))
               for t in TISSUES},
        "t2_field": sd["t2_field"] * rt.standard_normal(9),
        "pd_field": sd["pd_field"] * rt.standard_normal(9),
        "age": int(rt.integers(22, 37)),
        "sex": "F" if rt.random() < 0.5 else "M",
    }


# ----------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------
def _ramp(sd: np.ndarray, width: float) -> np.ndarray:
    """Fraction of a voxel of ``width`` (mm) inside a surface at signed
    distance ``sd`` (mm, negative inside): linear partial-volume ramp."""
    return np.clip(0.5 - sd / width, 0.0, 1.0)


def _ellipsoid_sd(p: np.ndarray, centre, semi) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipsoid (first order)."""
    q = (p - np.asarray(centre)) / np.asarray(semi)
    r = np.linalg.norm(q, axis=1)
    grad = np.linalg.norm(q / np.asarray(semi), axis=1) / np.maximum(r, 1e-12)
    return (r - 1.0) / np.maximum(grad, 1e-12)


@dataclass(frozen=True)
class _Bundle:
    """A tube around a straight line (``radius`` None) or a circular arc.

    Line: ``centre`` on the axis, ``e1`` the direction, ``e2`` the first
    cross-section axis. Arc: ``centre`` of the circle, ``e1`` towards the
    reference point, ``e2`` the tangent there. Cross-section half-widths
    ``a`` (along ``e2`` for a line, radial for an arc) and ``b`` (along
    ``e1 x e2``), superelliptic (power 4). ``extent``: half-length (mm) or
    half-angle (rad).
    """

    centre: np.ndarray
    e1: np.ndarray
    e2: np.ndarray
    a: float
    b: float
    extent: float
    radius: float | None = None

    def evaluate(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Signed distance (mm) and unit tangent (n, 3) at points ``p``."""
        e3 = np.cross(self.e1, self.e2)
        q = p - self.centre
        x1, x2, x3 = q @ self.e1, q @ self.e2, q @ e3
        if self.radius is None:
            r1, r2 = x2, x3
            along = np.abs(x1) - self.extent
            tangent = np.broadcast_to(self.e1, p.shape)
        else:
            r1, r2 = np.hypot(x1, x2) - self.radius, x3
            ang = np.arctan2(x2, x1)
            along = (np.abs(ang) - self.extent) * self.radius
            tangent = -np.sin(ang)[:, None] * self.e1 + np.cos(ang)[:, None] * self.e2
        s1, s2 = r1 / self.a, r2 / self.b
        rho = (s1 ** 4 + s2 ** 4) ** 0.25
        grad = np.hypot(s1 ** 3 / self.a, s2 ** 3 / self.b) / np.maximum(rho, 1e-12) ** 3
        sd = np.where(rho > 1e-9, (rho - 1.0) / np.maximum(grad, 1e-12), -min(self.a, self.b))
        return np.maximum(sd, along), tangent


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _bundles(semi: np.ndarray, prm: dict) -> list[_Bundle]:
    """The template bundles (template mm space) for head semi-axes ``semi``."""
    rm = float(np.mean(semi))
    size = prm["bundle_size"]
    # corpus callosum: a slab around an upward-curving arc in the x-z plane
    z_cc = 0.20 * semi[2]
    r_arc = 1.6 * rm * prm["cc_curvature"]
    cc_centre = np.array([0.0, 0.0, z_cc + r_arc])
    ex, ey, ez = np.eye(3)
    cc = _Bundle(cc_centre, -ez, ex, a=0.085 * rm * size[0], b=0.38 * semi[1] * size[0],
                 extent=0.7, radius=r_arc)
    out = [cc]
    cst, cross = [], []
    for side, k in ((-1.0, 1), (1.0, 2)):
        alpha = math.asin(side * 0.32 * semi[0] / r_arc)
        d = math.cos(alpha) * -ez + math.sin(alpha) * ex      # radial: perpendicular to cc
        p = cc_centre + r_arc * d
        cst.append(_Bundle(p, _unit(d), ey, a=0.09 * rm * size[k], b=0.09 * rm * size[k],
                           extent=2.5 * rm))
        cross.append(p + 0.30 * rm * d)                        # below the cc crossing
    out += cst
    for (side, k), c, q in zip(((-1.0, 3), (1.0, 4)), cst, cross):
        up = -c.e1                                             # cst direction, upwards
        angle = math.radians(90.0 if side < 0 else 60.0)
        t = _unit(math.cos(angle) * up + math.sin(angle) * ey)  # tangent at the crossing
        n = _unit(up - (up @ t) * t)                           # arches upwards
        r_a = 1.3 * rm
        out.append(_Bundle(q - r_a * n, n, t, a=0.075 * rm * size[k], b=0.075 * rm * size[k],
                           extent=1.0, radius=r_a))
    return out


#: Fibres of the background white matter fan out from this point (head units).
BACKGROUND_ORIGIN = (0.0, -0.1, -1.4)


def _anatomy(x: np.ndarray, fov: np.ndarray, voxel: np.ndarray, prm: dict) -> dict:
    """Tissue fractions, fibre populations and relaxation at world points ``x``."""
    semi = HEAD_FILL * fov
    h = float(np.mean(voxel))
    p = (x - prm["t"]) @ np.linalg.inv(prm["A"]).T            # template mm
    u = p / semi
    r = np.linalg.norm(u, axis=1)
    grad_r = np.linalg.norm(u / semi, axis=1) / np.maximum(r, 1e-12)
    to_mm = 1.0 / np.maximum(grad_r, 1e-12)
    head = _ramp((r - 1.0) * to_mm, h)
    brain = np.minimum(_ramp((r - R_CSF_INNER) * to_mm, h), head)
    polar = np.arccos(np.clip(u[:, 2] / np.maximum(r, 1e-12), -1, 1))
    azim = np.arctan2(u[:, 1], u[:, 0])
    fold = np.cos(5 * polar) * np.sin(4 * azim + prm["fold_phase"])
    r_wm = prm["wm_radius"] + FOLD_AMPLITUDE * fold
    wm = np.minimum(_ramp((r - r_wm) * to_mm, h), brain)
    vs = prm["ventricle_scale"]
    vent = np.zeros_like(r)
    deep = np.zeros_like(r)
    for side in (-1.0, 1.0):
        c = np.array(VENTRICLE_CENTRE) * [side, 1, 1] * semi
        vent = np.maximum(vent, _ramp(_ellipsoid_sd(p, c, np.array(VENTRICLE_SEMI) * vs * semi), h))
        c = np.array(THALAMUS_CENTRE) * [side, 1, 1] * semi
        deep = np.maximum(deep, _ramp(_ellipsoid_sd(p, c, np.array(THALAMUS_SEMI) * semi), h))
    f_csf = head - brain + brain * vent
    f_gm = (brain - wm) * (1 - vent) + wm * (1 - vent) * deep
    f_wm = wm * (1 - vent) * (1 - deep)
    # fibre populations inside the white matter
    occ, tang = [], []
    for b in _bundles(semi, prm):
        sd, t = b.evaluate(p)
        occ.append(_ramp(sd, h))
        tang.append(t)
    origin = np.array(BACKGROUND_ORIGIN) * semi
    tang.append((p - origin) / np.linalg.norm(p - origin, axis=1, keepdims=True))
    occ = np.stack(occ, axis=1)
    total = occ.sum(axis=1)
    w = np.where(total[:, None] > 1.0, occ / np.maximum(total, 1e-12)[:, None], occ)
    w = np.concatenate([w, np.clip(1.0 - total, 0.0, None)[:, None]], axis=1)
    v = np.stack(tang, axis=1) @ prm["A"].T                    # tangents -> world
    v /= np.linalg.norm(v, axis=2, keepdims=True)
    return {"head": head, "fractions": np.stack([f_csf, f_gm, f_wm], axis=1),
            "weights": w, "dirs": v, **_relaxation_fields(u, prm)}


def _relaxation_fields(u: np.ndarray, prm: dict) -> dict:
    """Smooth T2 and PD modulation at head-normalised points ``u`` (n, 3)."""
    terms = _field_terms(u)
    return {"t2_field": np.clip(1.0 + terms @ prm["t2_field"], 0.8, 1.2),
            "pd_field": np.clip(1.0 + terms @ prm["pd_field"], 0.9, 1.1)}


# ----------------------------------------------------------------------------
# Signal and truth
# ----------------------------------------------------------------------------
def _population_params(prm: dict, index: Sequence[int] | None = None
                       ) -> tuple[np.ndarray, ...]:
    """Per population: f_intra, d_intra, d_extra_par, d_extra_perp. ``index``
    picks populations of ``POPULATIONS`` (the brain anatomy's coherent and
    dispersed white matter use the first bundle's and the background's draws)."""
    index = list(range(len(POPULATIONS))) if index is None else list(index)
    f = np.asarray(prm["f_intra"], dtype=np.float64)[index]
    scale = np.asarray(prm["diffusivity_scale"], dtype=np.float64)[index]
    kinds = [(BUNDLE_TISSUE if i < len(BUNDLES) else BACKGROUND_TISSUE) for i in index]
    d_in = np.array([k["d_intra"] for k in kinds]) * scale
    d_par = np.array([k["d_extra_par"] for k in kinds]) * scale
    d_perp = np.array([k["d_extra_par"] * (1.0 - fk) if k["d_extra_perp"] is None
                       else k["d_extra_perp"] for k, fk in zip(kinds, f)]) * scale
    return f, d_in, d_par, d_perp


def _gm_diffusivities(prm: dict) -> tuple[float, float]:
    """Grey matter along / across its normal (mm^2/s): MD ``d_gm``, anisotropy
    ``prm["gm_anisotropy"]`` (0: isotropic, the geometric phantom)."""
    k = float(prm.get("gm_anisotropy", 0.0))
    return prm["d_gm"] * (1.0 + 2.0 * k), prm["d_gm"] * (1.0 - k)


def _signal(amp: np.ndarray, weights: np.ndarray, dirs: np.ndarray, g: np.ndarray,
            b: np.ndarray, prm: dict, index: Sequence[int] | None = None,
            gm_dirs: np.ndarray | None = None) -> np.ndarray:
    """Noise-free signal (n, N) float64: amp (n, 3) b0 amplitudes per tissue;
    ``index``: see :func:`_population_params`; ``gm_dirs`` (n, 3): grey-matter
    normals (anisotropic grey matter, :func:`_gm_diffusivities`)."""
    f, d_in, d_par, d_perp = _population_params(prm, index)
    out = np.outer(amp[:, 0], np.exp(-b * prm["d_csf"]))
    gm_par, gm_perp = _gm_diffusivities(prm)
    if gm_dirs is None or gm_par == gm_perp:
        out += np.outer(amp[:, 1], np.exp(-b * prm["d_gm"]))
    else:
        out += amp[:, 1:2] * np.exp(-b * (gm_perp + (gm_par - gm_perp) * (gm_dirs @ g.T) ** 2))
    for k in range(weights.shape[1]):
        sel = np.flatnonzero((weights[:, k] > 0) & (amp[:, 2] > 0))
        if sel.size == 0:
            continue
        c2 = (dirs[sel, k] @ g.T) ** 2
        e = f[k] * np.exp(-b * d_in[k] * c2)
        e += (1.0 - f[k]) * np.exp(-b * (d_perp[k] + (d_par[k] - d_perp[k]) * c2))
        out[sel] += (amp[sel, 2] * weights[sel, k])[:, None] * e
    return out


def _mean_tensor(amp: np.ndarray, weights: np.ndarray, dirs: np.ndarray, prm: dict,
                 index: Sequence[int] | None = None,
                 gm_dirs: np.ndarray | None = None) -> np.ndarray:
    """Signal-fraction-weighted mean diffusion tensor (n, 3, 3) (arguments as
    :func:`_signal`)."""
    f, d_in, d_par, d_perp = _population_params(prm, index)
    s0 = amp.sum(axis=1)
    gm_par, gm_perp = _gm_diffusivities(prm)
    iso = amp[:, 0] * prm["d_csf"] + amp[:, 1] * (prm["d_gm"] if gm_dirs is None else gm_perp)
    tensor = iso[:, None, None] * np.eye(3)
    if gm_dirs is not None:
        tensor += (amp[:, 1] * (gm_par - gm_perp))[:, None, None] * (
            gm_dirs[:, :, None] * gm_dirs[:, None, :])
    for k in range(weights.shape[1]):
        wk = amp[:, 2] * weights[:, k]
        vv = dirs[:, k, :, None] * dirs[:, k, None, :]
        comp = (f[k] * d_in[k] + (1 - f[k]) * (d_par[k] - d_perp[k])) * vv
        comp = comp + ((1 - f[k]) * d_perp[k]) * np.eye(3)
        tensor += wk[:, None, None] * comp
    return tensor / np.maximum(s0, 1e-30)[:, None, None]


def mean_tensor_maps(tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FA, MD and principal eigenvector of tensors (n, 3, 3)."""
    evals, evecs = np.linalg.eigh(tensor)
    return fractional_anisotropy(evals), mean_diffusivity(evals), evecs[:, :, 2]


def _rish_operator(gtab: GradientTable, scales: Mapping, lmax: int | None) -> list:
    """Per shell: (volume indices, N x N operator) adding the scaled SH part."""
    ops = []
    for shell in gtab.shells:
        table = scales.get(shell, scales.get(int(shell))) if any(
            isinstance(v, Mapping) for v in scales.values()) else scales
        if not table:
            continue
        idx = gtab.shell_indices(shell)
        lm = sh.max_order_for(idx.size) if lmax is None else int(lmax)
        bad = [o for o in table if int(o) % 2 or int(o) > lm or int(o) < 0]
        if bad:
            raise ValueError(f"RISH scale orders {bad} not in the even orders 0..{lm} "
                             f"fitted for shell b={shell:g}")
        basis = sh.sh_basis(gtab.bvecs[idx], lm)
        pinv = sh.sh_pinv(basis, lm)
        s = np.ones(lm // 2 + 1)
        for o, v in table.items():
            s[int(o) // 2] = float(v)
        per_coeff = s[sh.order_of_coeff(lm) // 2] - 1.0
        # E' = E + B diag(s - 1) B^+ E ; rows: E' = E @ (I + B diag B^+)^T
        op = (basis * per_coeff) @ pinv
        ops.append((shell, idx, op.T))
    return ops


def _grid_affine(shape: tuple, voxel: np.ndarray) -> np.ndarray:
    aff = np.diag(list(voxel) + [1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * voxel
    return aff


def _as3(v) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64).ravel()
    return np.repeat(a, 3) if a.size == 1 else a


#: Anatomies of :func:`simulate_subject`: the geometric head (this module)
#: and the realistic brain (:mod:`.brain`, MNI152 2009 tissue maps).
ANATOMIES = ("geometric", "brain")
#: The brain's white-matter populations: coherent (a bundle's tissue) and
#: dispersed (the background's), as indices into ``POPULATIONS``.
BRAIN_POPULATIONS = (0, len(POPULATIONS) - 1)


def simulate_subject(shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 0,
                     snr: float | None = DEFAULT_SNR, scheme: GradientTable | None = None,
                     te: float = HCP_TE_MS, site: SiteEffect | None = None,
                     voxel_size: float | Sequence[float] = DEFAULT_VOXEL_MM,
                     keep_noise_free: bool = False,
                     chunk_voxels: int = CHUNK_VOXELS,
                     anatomy: str = "geometric") -> PhantomSubject:
    """Simulate one subject.

    The anatomy fills the field of view ``shape * voxel_size`` and depends on
    ``seed`` only (not on SNR, scheme, TE or site), so the same seed gives the
    same subject at several sites. ``snr`` None (or inf) gives noise-free
    data; ``te`` in ms; ``scheme`` defaults to :func:`hcp_scheme`. Non-None
    ``site`` fields override ``snr``/``te``/``scheme`` and the grid (same FOV
    at ``site.voxel_size``). ``keep_noise_free`` also returns the noise-free
    series as ``noise_free``. ``anatomy``: ``"geometric"`` (the head above)
    or ``"brain"`` (:mod:`.brain`: MNI152 tissue maps, white-matter
    orientations from their structure, a non-linear warp per seed; truth
    ``bundle`` 1 is the callosal body, ``nfib`` counts its one population).
    """
    if anatomy not in ANATOMIES:
        raise ValueError(f"unknown anatomy {anatomy!r} ({' or '.join(ANATOMIES)})")
    voxel = _as3(voxel_size)
    fov = np.asarray(shape, dtype=np.float64) * voxel
    if site is not None:
        snr = site.snr if site.snr is not None else snr
        te = site.te if site.te is not None else te
        scheme = site.scheme if site.scheme is not None else scheme
        if site.voxel_size is not None:
            voxel = _as3(site.voxel_size)
    grid = tuple(int(n) for n in np.maximum(np.round(fov / voxel), 1).astype(int))
    gtab = scheme if scheme is not None else hcp_scheme()
    affine = _grid_affine(grid, voxel)
    prm = subject_parameters(seed)
    t2_scale = site.t2_scale if site is not None else 1.0

    ijk = np.indices(grid, dtype=np.float64).reshape(3, -1).T
    xyz = ijk * voxel + affine[:3, 3]
    pop_index = None
    if anatomy == "brain":
        from . import brain
        prm["gm_anisotropy"] = brain.GM_ANISOTROPY
        prm["anatomy_scale"] = brain.anatomy_scale(fov)
        inside = np.arange(xyz.shape[0])
        anat = brain.anatomy(xyz, fov, voxel, prm, seed)
        anat.update(_relaxation_fields(anat.pop("u"), prm))
        pop_index = BRAIN_POPULATIONS
    else:   # voxels touched by the head (a margin of one voxel around the ellipsoid)
        p = (xyz - prm["t"]) @ np.linalg.inv(prm["A"]).T
        semi = HEAD_FILL * fov
        reach = np.linalg.norm(p / semi, axis=1) < 1.0 + 2.0 * voxel.max() / semi.min()
        inside = np.flatnonzero(reach)
        anat = _anatomy(xyz[inside], fov, voxel, prm)
    head = anat["head"]
    keep = head > 0
    inside, head = inside[keep], head[keep]
    anat = {k: v[keep] for k, v in anat.items()}
    frac = anat["fractions"]
    t2 = np.stack([prm["t2"][t] * t2_scale * anat["t2_field"] for t in TISSUES], axis=1)
    pd = np.stack([prm["pd"][t] * anat["pd_field"] for t in TISSUES], axis=1) * SIGNAL_SCALE
    amp = frac * pd * np.exp(-te / t2)                   # b0 amplitude per tissue
    s0 = amp.sum(axis=1)
    pd_eff = (frac * pd).sum(axis=1)

    n_vox = int(np.prod(grid))
    mask_flat = np.zeros(n_vox, dtype=bool)
    mask_flat[inside] = head >= 0.5
    label_flat = np.zeros(n_vox, dtype=np.uint8)
    label_flat[inside] = np.where(head >= 0.5, 1 + np.argmax(frac, axis=1), 0)
    wm_label = label_flat[inside] == LABELS["wm"]
    if not wm_label.any():
        raise ValueError(f"grid {grid} is too coarse: no white-matter voxel")
    sigma = 0.0
    if snr is not None and np.isfinite(snr):
        if snr <= 0:
            raise ValueError(f"SNR must be positive, got {snr}")
        sigma = float(s0[wm_label].mean() / snr)

    # truth maps
    def full(values, dtype=np.float32, tail=()):
        out = np.zeros((n_vox,) + tail, dtype=dtype)
        out[inside] = values
        return out.reshape(grid + tail)

    gm_dirs = anat.get("gm_dirs")
    fa, md, v1 = mean_tensor_maps(_mean_tensor(amp, anat["weights"], anat["dirs"], prm,
                                               pop_index, gm_dirs))
    v1 = world_to_fsl(v1, affine)
    v1[fa < V1_MIN_FA] = 0.0
    lead = np.take_along_axis(v1, np.argmax(np.abs(v1), axis=1)[:, None], axis=1)
    v1 *= np.where(lead < 0, -1.0, 1.0)                   # sign: largest component > 0
    vol_w = anat["weights"] * frac[:, 2:3]                # population volume fractions
    dirs = anat["dirs"]
    if anatomy == "brain":   # both populations share one direction: one peak
        vol_w = np.concatenate([vol_w.sum(axis=1, keepdims=True), np.zeros((len(vol_w), 2))],
                               axis=1)
        dirs = np.concatenate([dirs[:, :1], np.zeros((len(dirs), 2, 3))], axis=1)
    top = np.argsort(-vol_w, axis=1)[:, :3]
    peak_frac = np.take_along_axis(vol_w, top, axis=1)
    peaks = np.take_along_axis(dirs, top[:, :, None], axis=1)
    peaks = world_to_fsl(peaks.reshape(-1, 3), affine).reshape(-1, 3, 3)
    peaks[peak_frac < 1e-6] = 0.0
    if te > 0:   # apparent T2: s0 == pd * exp(-TE / t2)
        with np.errstate(divide="ignore"):
            t2_app = -te / np.log(np.maximum(s0, 1e-30) / np.maximum(pd_eff, 1e-30))
    else:        # TE = 0: no relaxation weighting; report the PD-weighted mean T2
        t2_app = (frac * pd * t2).sum(axis=1) / np.maximum(pd_eff, 1e-30)
    t2_app = np.where(pd_eff > 0, t2_app, 0.0)
    truth = {
        "fa": full(fa), "md": full(md), "v1": full(v1, tail=(3,)),
        "s0": full(s0), "pd": full(pd_eff), "t2": full(t2_app),
        "label": label_flat.reshape(grid), "mask": mask_flat.reshape(grid),
        "nfib": full((vol_w >= NFIB_MIN_FRACTION).sum(axis=1), np.uint8),
        "fractions": full(frac, tail=(3,)),
        "peaks": full(peaks, tail=(3, 3)), "peak_fractions": full(peak_frac, tail=(3,)),
        "bundle": full(anat["bundle"] if "bundle" in anat else
                       np.where((vol_w.max(axis=1) > 0) & (top[:, 0] < len(BUNDLES)),
                                top[:, 0] + 1, 0), np.uint8),
    }

    # signal, chunk by chunk over the whole grid (noise everywhere)
    g = gtab.to_world(affine)
    b = gtab.bvals
    n_vol = len(gtab)
    rish_ops = []
    if site is not None and site.rish_scale:
        rish_ops = _rish_operator(gtab, site.rish_scale, site.rish_lmax)
    dwi = np.zeros((n_vox, n_vol), dtype=np.float32)
    clean = np.zeros((n_vox, n_vol), dtype=np.float32) if keep_noise_free else None
    clipped = {f"{shell:g}": 0 for shell in gtab.shells} if rish_ops else None
    pos = np.full(n_vox, -1, dtype=np.int64)
    pos[inside] = np.arange(inside.size)
    site_key = zlib.crc32((site.name if site else "").encode())
    noise_ss = np.random.SeedSequence([int(seed), 2, site_key])
    rng = np.random.default_rng(noise_ss)
    for start in range(0, n_vox, chunk_voxels):
        stop = min(start + chunk_voxels, n_vox)
        rows = pos[start:stop]
        sel = np.flatnonzero(rows >= 0)
        block = np.zeros((stop - start, n_vol), dtype=np.float32)
        if sel.size:
            r = rows[sel]
            sig = _signal(amp[r], anat["weights"][r], anat["dirs"][r], g, b, prm, pop_index,
                          None if gm_dirs is None else gm_dirs[r])
            if rish_ops:  # linear, so scaling E = S / b0 and multiplying back is S
                for shell, idx, op in rish_ops:
                    sig[:, idx] += sig[:, idx] @ op
                    clipped[f"{shell:g}"] += int(np.count_nonzero(sig[:, idx] < 0))
                np.maximum(sig, 0.0, out=sig)
            block[sel] = sig
        if clean is not None:
            clean[start:stop] = block
        if sigma > 0:   # Rician: |S + sigma (n1 + i n2)|
            re = rng.standard_normal(block.shape, dtype=np.float32)
            re *= sigma
            re += block
            im = rng.standard_normal(block.shape, dtype=np.float32)
            im *= sigma
            block = np.hypot(re, im, out=re)
        dwi[start:stop] = block
    params = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in prm.items()}
    params["t2"] = {t: v * t2_scale for t, v in prm["t2"].items()}
    params["anatomy"] = anatomy
    if clipped is not None:   # share of in-head signals clipped at 0 after RISH scaling
        params["rish_clipped_fraction"] = {
            k: v / (inside.size * gtab.shell_indices(float(k)).size) for k, v in clipped.items()}
    return PhantomSubject(
        dwi=dwi.reshape(grid + (n_vol,)), gtab=gtab, affine=affine,
        mask=truth["mask"], truth=truth, seed=int(seed),
        snr=None if sigma == 0 else float(snr), sigma=sigma, te=float(te),
        field_strength=site.field_strength if site is not None else HCP_FIELD_T,
        voxel_size=tuple(float(v) for v in voxel), site=site.name if site else None,
        params=params,
        noise_free=None if clean is None else clean.reshape(grid + (n_vol,)))


# ----------------------------------------------------------------------------
# Fibre-continuity phantom: image gradient vs fibre, no gradient physics
# ----------------------------------------------------------------------------
#: Share of voxels whose b0 gradient is perpendicular to the local fibre.
CONTINUITY_FRACTION = 0.5
#: SNR of the fibre-continuity study (Aganj et al. simulate at SNR 20).
CONTINUITY_SNR = 20.0
#: Default grid (voxels) and voxel size (mm) of a continuity subject.
CONTINUITY_SHAPE = (24, 24, 16)
CONTINUITY_VOXEL_MM = 2.0
#: RMS of |grad ln b0| (1/mm) over the grid: smooth relaxation contrast.
CONTINUITY_LOG_GRADIENT = 0.04
#: Share of the ln b0 field carried by relaxation (R2); the rest is proton density.
CONTINUITY_R2_SHARE = 0.5
#: Wavelength ranges (mm) of the random smooth fields: the image (ln b0), the
#: helper field orienting fibres within the plane perpendicular to the image
#: gradient, and the fibre field of the random half.
CONTINUITY_IMAGE_WAVELENGTH = (16.0, 32.0)
CONTINUITY_FIBRE_WAVELENGTH = (10.0, 20.0)
#: Sinusoidal modes per random field (many: each subject's gradient directions
#: spread widely, so per-subject angle means scatter little).
CONTINUITY_MODES = 24
#: Share of the voxel signal in a coherent bundle (rest: background white
#: matter, same axis): a smooth field in this range, so FA varies ~0.45-0.8.
CONTINUITY_BUNDLE_SHARE = (0.2, 1.0)


def _smooth_field(rng: np.random.Generator, x: np.ndarray, wavelengths, n_modes: int,
                  dim: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sum of random plane waves at points ``x`` (n, 3 mm): values (n, dim) and
    their spatial gradients (n, dim, 3), each component of unit RMS amplitude."""
    k_dir = rng.standard_normal((n_modes, 3))
    k_dir /= np.linalg.norm(k_dir, axis=1, keepdims=True)
    k = k_dir * (2.0 * math.pi / rng.uniform(*wavelengths, size=n_modes))[:, None]
    phase = rng.uniform(0.0, 2.0 * math.pi, size=n_modes)
    amp = rng.standard_normal((n_modes, dim)) * math.sqrt(2.0 / n_modes)
    arg = x @ k.T + phase                                    # (n, modes)
    values = np.sin(arg) @ amp
    grads = np.einsum("nm,md,mj->ndj", np.cos(arg), amp, k)
    return values, grads


def simulate_continuity_subject(shape: Sequence[int] = CONTINUITY_SHAPE, seed: int = 0,
                                snr: float | None = CONTINUITY_SNR,
                                scheme: GradientTable | None = None, te: float = HCP_TE_MS,
                                voxel_size: float = CONTINUITY_VOXEL_MM,
                                fraction: float = CONTINUITY_FRACTION,
                                log_gradient: float = CONTINUITY_LOG_GRADIENT) -> PhantomSubject:
    """White-matter slab whose b0 gradient is perpendicular to the fibre in
    ``fraction`` of the voxels and unrelated to it in the others.

    The confound control of Aganj et al.'s image-gradient claim: fibre
    bundles vary little along themselves, so the image gradient tends to be
    perpendicular to the fibre. Here the diffusion signal carries **no**
    gradient physics at all: each voxel is ``b0(x) * E(fibre(x), b, g)`` with
    the head phantom's stick+zeppelin populations (:func:`_signal`), so any
    estimator that finds the image gradient better than chance does so
    through the fibre orientation only.

    * ``ln b0 = ln PD(x) - TE / T2(x)``: one smooth random field, shared
      between R2 (``CONTINUITY_R2_SHARE``) and ln PD; RMS ``|grad ln b0|`` =
      ``log_gradient`` (1/mm).
    * ``continuity`` half (voxels with the smallest world x, ``fraction`` of
      the grid): fibre = unit ``grad ln b0 x h(x)`` (``h`` a smooth random
      field), exactly perpendicular to the image gradient and smooth.
    * other voxels: fibre = an independent smooth random field.
    * bundle share of the signal: a smooth field in ``CONTINUITY_BUNDLE_SHARE``
      (the rest is background white matter along the same axis).

    ``phase`` is the phase of the noisy complex signal (noise only: the
    noise-free signal is real), for the phase estimator P.

    Truth adds ``grad`` (analytic ``grad ln b0``, 1/mm, FSL image frame like
    ``v1``; the affine is diagonal so covector and vector frames agree),
    ``fibre`` (FSL frame) and ``continuity`` (bool). The mask leaves a one-voxel
    border so finite differences at its edge see real neighbours.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    grid = tuple(int(n) for n in shape)
    if len(grid) != 3 or min(grid) < 3:
        raise ValueError(f"shape must be 3 sizes >= 3, got {shape}")
    voxel = _as3(voxel_size)
    affine = _grid_affine(grid, voxel)
    gtab = scheme if scheme is not None else hcp_scheme()
    prm = subject_parameters(seed)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 3]))
    ijk = np.indices(grid, dtype=np.float64).reshape(3, -1).T
    xyz = ijk * voxel + affine[:3, 3]
    n_vox = xyz.shape[0]

    # image: ln b0 = ln PD - TE R2(x), the smooth field scaled to the target gradient
    field_, grad = _smooth_field(rng, xyz, CONTINUITY_IMAGE_WAVELENGTH, CONTINUITY_MODES)
    scale = log_gradient / np.sqrt(np.mean(np.sum(grad[:, 0] ** 2, axis=1)))
    log_b0_var, grad_log = field_[:, 0] * scale, grad[:, 0] * scale
    pd = prm["pd"]["wm"] * SIGNAL_SCALE * np.exp((1.0 - CONTINUITY_R2_SHARE) * log_b0_var)
    r2 = 1.0 / prm["t2"]["wm"] - CONTINUITY_R2_SHARE * log_b0_var / te   # 1/ms
    if np.any(r2 <= 0):
        raise ValueError(f"log_gradient {log_gradient} too large: T2 would turn negative")
    s0 = pd * np.exp(-te * r2)

    # fibres: perpendicular to the image gradient in the continuity part
    order = np.argsort(xyz[:, 0], kind="stable")
    continuity = np.zeros(n_vox, dtype=bool)
    continuity[order[:int(round(fraction * n_vox))]] = True
    h, _ = _smooth_field(rng, xyz, CONTINUITY_FIBRE_WAVELENGTH, CONTINUITY_MODES, dim=3)
    h += rng.standard_normal(3)                                   # a mean direction
    perp = np.cross(grad_log, h)
    weak = np.linalg.norm(perp, axis=1) < 1e-9 * np.linalg.norm(grad_log, axis=1).max()
    perp[weak] = np.cross(grad_log[weak], rng.standard_normal(3))
    other, _ = _smooth_field(rng, xyz, CONTINUITY_FIBRE_WAVELENGTH, CONTINUITY_MODES, dim=3)
    other += rng.standard_normal(3)
    fibre = np.where(continuity[:, None], perp, other)
    fibre /= np.linalg.norm(fibre, axis=1, keepdims=True)

    # signal: the head phantom's bundle and background populations, one axis
    share, _ = _smooth_field(rng, xyz, CONTINUITY_IMAGE_WAVELENGTH, CONTINUITY_MODES)
    lo, hi = CONTINUITY_BUNDLE_SHARE
    share = lo + (hi - lo) * 0.5 * (1.0 + np.tanh(share[:, 0]))
    weights = np.zeros((n_vox, len(POPULATIONS)))
    weights[:, 0], weights[:, -1] = share, 1.0 - share
    dirs = np.repeat(fibre[:, None, :], len(POPULATIONS), axis=1)
    amp = np.zeros((n_vox, 3))
    amp[:, 2] = s0
    g = gtab.to_world(affine)
    clean = np.empty((n_vox, len(gtab)), dtype=np.float32)
    for start in range(0, n_vox, CHUNK_VOXELS):
        sl = slice(start, start + CHUNK_VOXELS)
        clean[sl] = _signal(amp[sl], weights[sl], dirs[sl], g, gtab.bvals, prm)
    sigma = 0.0 if snr is None or not np.isfinite(snr) else float(s0.mean() / snr)
    if snr is not None and np.isfinite(snr) and snr <= 0:
        raise ValueError(f"SNR must be positive, got {snr}")
    dwi, phase = clean, np.zeros_like(clean)
    if sigma > 0:   # complex Gaussian noise: Rician magnitude and its phase
        noise = np.random.default_rng(np.random.SeedSequence([int(seed), 4]))
        re = clean + sigma * noise.standard_normal(clean.shape, dtype=np.float32)
        im = sigma * noise.standard_normal(clean.shape, dtype=np.float32)
        dwi, phase = np.hypot(re, im), np.arctan2(im, re)

    fa, md, v1 = mean_tensor_maps(_mean_tensor(amp, weights, dirs, prm))
    mask = np.zeros(grid, dtype=bool)
    mask[1:-1, 1:-1, 1:-1] = True

    def to_grid(a, dtype=np.float32):
        return np.asarray(a, dtype=dtype).reshape(grid + a.shape[1:])

    truth = {
        "fa": to_grid(fa), "md": to_grid(md), "v1": to_grid(world_to_fsl(v1, affine)),
        "s0": to_grid(s0), "pd": to_grid(pd), "t2": to_grid(1.0 / r2),
        "label": np.where(mask, LABELS["wm"], 0).astype(np.uint8),
        "mask": mask, "nfib": mask.astype(np.uint8),
        "grad": to_grid(world_to_fsl(grad_log, affine)),
        "fibre": to_grid(world_to_fsl(fibre, affine)),
        "continuity": continuity.reshape(grid),
    }
    params = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in prm.items()}
    params.update(continuity_fraction=fraction, log_gradient=log_gradient, physics="none")
    return PhantomSubject(
        dwi=dwi.reshape(grid + (len(gtab),)), gtab=gtab, affine=affine, mask=mask,
        truth=truth, seed=int(seed), snr=None if sigma == 0 else float(snr), sigma=sigma,
        te=float(te), field_strength=HCP_FIELD_T, voxel_size=tuple(float(v) for v in voxel),
        site="continuity", params=params, noise_free=clean.reshape(grid + (len(gtab),)),
        phase=phase.reshape(grid + (len(gtab),)))


# ----------------------------------------------------------------------------
# Writing cohorts
# ----------------------------------------------------------------------------
#: Truth maps written per subject (``sub-<label>_param-<name>.nii.gz``).
TRUTH_PARAMS = ("fa", "md", "v1", "t2", "s0", "pd", "label", "nfib")
_TRUTH_DTYPES = {"label": np.uint8, "nfib": np.uint8}
BIDS_VERSION = "1.9.0"


def cohort_subject_seed(seed: int, index: int) -> int:
    """Seed of subject ``index`` of a cohort generated with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _nifti_header(affine: np.ndarray):
    """mm units, qform and sform both the affine with code 1 (scanner), as dcm2niix."""
    hdr = nib.Nifti1Header()
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    return hdr


def write_truth(subject: PhantomSubject, truth_dir, label: str) -> list[Path]:
    """Ground-truth maps of one subject under ``truth_dir/sub-<label>/``.

    Parameters ``sub-<label>_param-<p>.nii.gz`` for ``TRUTH_PARAMS``, the
    brain mask as ``dwi/sub-<label>_desc-brain_mask.nii.gz`` (where BIDS
    discovery looks for derivative masks) and the simulation parameters as
    ``sub-<label>_desc-simulation.json``.
    """
    root = Path(truth_dir) / f"sub-{label}"
    hdr = _nifti_header(subject.affine)
    written = []
    for name in TRUTH_PARAMS:
        data = np.asarray(subject.truth[name]).astype(_TRUTH_DTYPES.get(name, np.float32))
        written.append(save_nifti(data, subject.affine, root / f"sub-{label}_param-{name}.nii.gz",
                                  header=hdr))
    written.append(save_nifti(subject.mask.astype(np.uint8), subject.affine,
                              root / "dwi" / f"sub-{label}_desc-brain_mask.nii.gz", header=hdr))
    meta = {
        "Subject": label, "Seed": subject.seed, "TE_ms": subject.te, "SNR": subject.snr,
        "NoiseSigma": subject.sigma, "Site": subject.site, "VoxelSize": subject.voxel_size,
        "Units": {"md": "mm^2/s", "t2": "ms", "s0": "signal", "pd": "signal"},
        "Labels": LABELS, "Bundles": list(BUNDLES), "CrossingAnglesDeg": CROSSING_ANGLES,
        "VectorFrame": "fsl-image (x flipped: positive affine determinant)",
        "TensorTruth": "signal-fraction-weighted mean tensor (low-b / first-cumulant limit)",
        "NfibMinFraction": NFIB_MIN_FRACTION, "Parameters": subject.params,
        "Anatomy": subject.params.get("anatomy", "geometric"),
    }
    written.append(write_json(meta, root / f"sub-{label}_desc-simulation.json"))
    return written


#: On-disk DWI data type per layout: HCP distributes preprocessed float32;
#: BIDS raw data from dcm2niix are int16 (also 3x faster to gzip, 1/3 the size).
DWI_DTYPES = {"hcp": "float32", "bids": "int16"}


def _dwi_for_disk(dwi: np.ndarray, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return dwi.astype(np.float32, copy=False)
    if dtype.kind not in "iu":
        raise ValueError(f"DWI dtype must be float32 or an integer type, got {dtype}")
    info = np.iinfo(dtype)
    top = float(dwi.max(initial=0.0))
    if top > info.max:
        raise ValueError(f"signal up to {top:.0f} does not fit {dtype} (max {info.max}); "
                         f"write float32")
    return np.rint(dwi).astype(dtype)


def write_subject(subject: PhantomSubject, out_dir, label: str, layout: str = "hcp",
                  dtype=None) -> list[Path]:
    """Write one subject's DWI, gradients, sidecar and mask, plus its truth.

    ``dtype``: of the DWI on disk, default ``DWI_DTYPES[layout]`` (integers
    are rounded; the rounding error, <= 0.5, is far below the noise).
    """
    out = Path(out_dir)
    hdr = _nifti_header(subject.affine)
    if layout == "hcp":
        d = out / label / "T1w" / "Diffusion"
        paths = {"dwi": d / "data.nii.gz", "bval": d / "bvals", "bvec": d / "bvecs",
                 "mask": d / "nodif_brain_mask.nii.gz", "json": d / "data.json"}
    elif layout == "bids":
        d = out / f"sub-{label}" / "dwi"
        stem = f"sub-{label}_dwi"
        paths = {"dwi": d / f"{stem}.nii.gz", "bval": d / f"{stem}.bval",
                 "bvec": d / f"{stem}.bvec", "json": d / f"{stem}.json"}
    else:
        raise ValueError(f"unknown layout {layout!r} (hcp or bids)")
    data = _dwi_for_disk(subject.dwi, dtype or DWI_DTYPES[layout])
    written = [save_nifti(data, subject.affine, paths["dwi"], header=hdr),
               write_text(format_bvals(subject.gtab.bvals), paths["bval"]),
               write_text(format_bvecs(subject.gtab.bvecs), paths["bvec"]),
               write_json(subject.sidecar(), paths["json"])]
    if "mask" in paths:
        written.append(save_nifti(subject.mask.astype(np.uint8), subject.affine, paths["mask"],
                                  header=hdr))
    written += write_truth(subject, out / "derivatives" / "truth", label)
    return written


def cohort_labels(n_subjects: int, layout: str = "hcp",
                  subject_prefix: str | None = None) -> list[str]:
    """Participant labels: HCP-like numbers 900001.. or BIDS 01, 02, .."""
    if subject_prefix is None:
        subject_prefix = "9000" if layout == "hcp" else ""
    if not str(subject_prefix).isalnum() and subject_prefix != "":
        raise ValueError(f"subject_prefix must be alphanumeric, got {subject_prefix!r}")
    width = max(2, len(str(n_subjects)))
    return [f"{subject_prefix}{i + 1:0{width}d}" for i in range(n_subjects)]


def _simulate_and_write(job: dict) -> str:
    subject = simulate_subject(shape=job["shape"], seed=job["seed"], snr=job["snr"],
                               scheme=job["scheme"], te=job["te"], site=job["site"],
                               voxel_size=job["voxel_size"], anatomy=job["anatomy"])
    write_subject(subject, job["out_dir"], job["label"], job["layout"], job["dtype"])
    return job["label"]


def write_cohort(out_dir, n_subjects: int, layout: str = "hcp",
                 shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 0,
                 snr: float | None = DEFAULT_SNR, site: SiteEffect | None = None,
                 subject_prefix: str | None = None, scheme: GradientTable | None = None,
                 te: float = HCP_TE_MS, voxel_size: float | Sequence[float] = DEFAULT_VOXEL_MM,
                 n_jobs: int = 1, dtype=None, anatomy: str = "geometric") -> list[str]:
    """Simulate and write ``n_subjects`` subjects; return their folder names.

    ``layout="hcp"``: ``<out>/<id>/T1w/Diffusion/{data.nii.gz, bvals, bvecs,
    nodif_brain_mask.nii.gz, data.json}`` with numeric ids (``9000`` +
    number: 900001, 900002, ...). ``layout="bids"``: ``<out>/sub-<label>/dwi/
    sub-<label>_dwi.{nii.gz,bval,bvec,json}``, ``dataset_description.json``
    and ``participants.tsv``. Both: truth under ``<out>/derivatives/truth/
    sub-<label>/`` (see :func:`write_truth`). Subject ``i`` uses
    :func:`cohort_subject_seed` ``(seed, i)``, so the same ``seed`` at another
    ``site`` gives the same anatomies (paired data). Returns the subject
    folder names (HCP ``900001``, BIDS ``sub-01``). ``n_jobs > 1`` simulates
    subjects in parallel processes. ``dtype``: see :func:`write_subject`.
    ``anatomy``: see :func:`simulate_subject`.
    """
    if layout not in ("hcp", "bids"):
        raise ValueError(f"unknown layout {layout!r} (hcp or bids)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = cohort_labels(n_subjects, layout, subject_prefix)
    scheme = scheme if scheme is not None else hcp_scheme()
    jobs = [dict(shape=tuple(shape), seed=cohort_subject_seed(seed, i), snr=snr, scheme=scheme,
                 te=te, site=site, voxel_size=voxel_size, out_dir=os.fspath(out), label=lbl,
                 layout=layout, dtype=dtype, anatomy=anatomy) for i, lbl in enumerate(labels)]
    if n_jobs > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(n_jobs, len(jobs))) as pool:
            list(pool.map(_simulate_and_write, jobs))
    else:
        for job in jobs:
            _simulate_and_write(job)
    site_name = site.name if site is not None else "reference"
    generated = [{"Name": "dmriflow.phantom", "Version": __version__}]
    rows = ["participant_id\tage\tsex\tsite\tseed"]
    for job in jobs:
        prm = subject_parameters(job["seed"])
        rows.append(f"sub-{job['label']}\t{prm['age']}\t{prm['sex']}\t{site_name}\t{job['seed']}")
    truth = out / "derivatives" / "truth"
    write_json({"Name": "dmriflow phantom ground truth", "BIDSVersion": BIDS_VERSION,
                "DatasetType": "derivative", "GeneratedBy": generated},
               truth / "dataset_description.json")
    write_text("\n".join(rows) + "\n", truth / "participants.tsv")
    if layout == "bids":
        write_json({"Name": "dmriflow phantom cohort", "BIDSVersion": BIDS_VERSION,
                    "DatasetType": "raw", "GeneratedBy": generated},
                   out / "dataset_description.json")
        write_text("\n".join(rows) + "\n", out / "participants.tsv")
        return [f"sub-{lbl}" for lbl in labels]
    return labels
