"""Unpaired multi-site dMRI studies with a known site effect and a known group effect.

The ground truth for RISH harmonization (issue 17). A *person* is a phantom
anatomy (:func:`phantom.simulate_subject`, its own affine and tissue
parameters) plus a smooth non-linear deformation of their own, and a group:
half of each site's persons are "patients" whose ``GROUP_BUNDLE`` has lost
anisotropy (lower FA, slightly higher MD). A *site* scans a person at its
own voxel size and SNR and scales the SH coefficients of every shell's
signal per order (the site effect harmonization must remove).

Order of the simulation, per scan: noise-free anatomy on the site's grid ->
group effect (in the bundle's voxels) -> the person's deformation (the
noise-free signal and the truth maps resampled through it) -> site SH
scaling -> Rician noise. The group effect and the site scaling are both
per-voxel SH scalings and commute, so the biology is the same at every site.

Designs: :func:`unpaired_study` (different persons per site, the case labs
have), :func:`paired_study` (the same persons at both sites, travelling
subjects) and :func:`held_out` (other persons scanned at both sites, so the
harmonised scan of a person can be compared with the reference-site scan of
the same person). Everything is deterministic from the seed.

Anatomy: the geometric phantom (``interfaces/sim/phantom``, the default) or
``anatomy="brain"`` (``interfaces/sim/brain``: MNI152 tissue maps; the
person's warp is the brain phantom's own, exact, with fibres reoriented, and
no resampling follows; its group bundle is the callosal body).

Limits: with the geometric anatomy the deformation resamples the signal
without reorienting the gradients (RISH and FA are rotation invariant; fibre
orientations are only approximately consistent with the warp); the site
effect is spatially uniform per order and shell (no coil/B1 pattern).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

from . import phantom, warp

# ----------------------------------------------------------------------------
# Named constants
# ----------------------------------------------------------------------------
#: Anatomy grid and voxel size (mm) of the reference site: small, a subject
#: simulates in well under a second and registers in about one.
STUDY_SHAPE = (24, 28, 22)
STUDY_VOXEL_MM = 2.5
#: Acquisition: b0 count, shells (s/mm^2) and directions per shell (lmax 4
#: needs 15; 30 leave room for noise).
STUDY_N_B0 = 4
STUDY_SHELLS = (1000.0, 3000.0)
STUDY_N_DIRS = 30
#: Group effect: patients' bundle (a phantom bundle name) loses this share of
#: its anisotropic SH signal (orders >= 2 scaled by 1 - loss) and its
#: diffusivity rises by this much (mm^2/s): FA in the bundle drops by
#: 0.15-0.17; Cohen's d between 6 + 6 persons -3 to -11 depending on the
#: draw (site B's coarser voxels and lower SNR add spread: d -3.0 there vs
#: -5.0 at site A for the same held-out persons).
GROUP_BUNDLE = "cc"
GROUP_ANISOTROPY_LOSS = 0.3
GROUP_DIFFUSIVITY_INCREASE = 0.1e-3
GROUPS = ("control", "patient")
#: Non-linear deformation per person: a sum of ``WARP_MODES`` plane waves
#: with wavelengths in ``WARP_WAVELENGTH_MM``, RMS displacement about
#: ``WARP_RMS_MM`` per axis, and a bound on the summed strain (|du/dx| <= this)
#: so the map stays invertible (diffeomorphic).
WARP_MODES = 4
WARP_WAVELENGTH_MM = (40.0, 80.0)
WARP_RMS_MM = 3.0
WARP_MAX_STRAIN = 0.8
#: Random stream of the person's deformation (independent of the phantom's draws).
WARP_STREAM = 17
#: Phantom seeds of the persons: unpaired site B persons and held-out persons
#: come from disjoint ranges, so nobody is scanned twice by accident.
SITE_PERSON_OFFSET = 1000
HELD_OUT_OFFSET = 5000


@dataclass(frozen=True)
class Site:
    """A scanner: voxel size (mm), SNR (mean white-matter b0 / sigma), the
    SH scaling ``{shell: {order: scale}}`` of its signal (None = none) and
    its echo time ``te_ms`` (None: the phantom's default, ``phantom.HCP_TE_MS``):
    TE changes the b0 contrast (``s0 = pd exp(-TE / t2)`` per tissue) and,
    through the tissues' weights in partial-volume voxels, the b0-normalised
    signal too."""

    name: str
    voxel_mm: float = STUDY_VOXEL_MM
    snr: float = 30.0
    rish_scale: Mapping | None = None
    te_ms: float | None = None


#: The default pair: reference site A; target site B at coarser voxels, lower
#: SNR and a per-order, per-shell SH scaling.
SITE_A = Site("siteA", voxel_mm=2.5, snr=30.0)
SITE_B = Site("siteB", voxel_mm=3.0, snr=20.0,
              rish_scale={1000.0: {0: 0.9, 2: 1.2, 4: 0.85},
                          3000.0: {0: 0.85, 2: 1.15, 4: 0.9}})


@dataclass(frozen=True)
class Person:
    """One simulated person: phantom seed (anatomy, tissue, deformation) and group."""

    seed: int
    group: str = "control"

    @property
    def label(self) -> str:
        return f"p{self.seed:05d}{self.group[0]}"


@dataclass
class Scan:
    """One person scanned at one site: a :class:`phantom.PhantomSubject`
    (dwi, gtab, affine, mask, truth warped with the person) plus who and where.
    ``truth["group_region"]`` marks the white-matter voxels of the group bundle."""

    subject: phantom.PhantomSubject
    person: Person
    site: str
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.site}-{self.person.label}"


def study_scheme(shells: Sequence[float] = STUDY_SHELLS, n_dirs: int = STUDY_N_DIRS,
                 n_b0: int = STUDY_N_B0):
    """The study's gradient table (the same at both sites)."""
    return phantom.hcp_scheme(n_b0=n_b0, shells=tuple(shells), n_dirs=n_dirs, seed=3)


def persons(n: int, first_seed: int) -> list[Person]:
    """``n`` persons with consecutive seeds; every second one is a patient."""
    return [Person(first_seed + i, GROUPS[i % 2]) for i in range(n)]


# ----------------------------------------------------------------------------
# Deformation
# ----------------------------------------------------------------------------
def warp_modes(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The person's plane waves: wave vectors k (modes, 3; rad/mm), phases,
    and displacement amplitudes (modes, 3; mm), strain-bounded."""
    w = _person_warp(seed)
    return w.k, w.phase, w.amp


def _person_warp(seed: int) -> warp.Warp:
    return warp.random_warp(seed, WARP_STREAM, WARP_MODES, WARP_WAVELENGTH_MM, WARP_RMS_MM,
                            WARP_MAX_STRAIN)


def displacement(points: np.ndarray, seed: int) -> np.ndarray:
    """Displacement (mm) of the person ``seed`` at world points (n, 3)."""
    return _person_warp(seed).displacement(points)


def _warp(volume: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    """Resample a 3D or 4D volume at voxel coordinates (3, X, Y, Z)."""
    from scipy import ndimage
    if volume.ndim == 3:
        return ndimage.map_coordinates(volume, coords, order=order, mode="nearest")
    out = np.empty(coords.shape[1:] + volume.shape[3:], dtype=volume.dtype)
    flat = volume.reshape(volume.shape[:3] + (-1,))
    out_flat = out.reshape(coords.shape[1:] + (-1,))
    for i in range(flat.shape[3]):
        out_flat[..., i] = ndimage.map_coordinates(flat[..., i], coords, order=order,
                                                   mode="nearest")
    return out


# ----------------------------------------------------------------------------
# One scan
# ----------------------------------------------------------------------------
def _scale_sh(signal: np.ndarray, gtab, table: Mapping, weight: np.ndarray | None = None):
    """Scale the SH of every shell's signal (rows, volumes) per order in place:
    ``{shell: {order: s}}`` or one ``{order: s}`` for all shells; ``weight``
    (rows,) blends the change per voxel."""
    for shell, idx, op in phantom._rish_operator(gtab, table, None):
        change = signal[:, idx] @ op
        if weight is not None:
            change *= weight[:, None]
        signal[:, idx] += change
    np.maximum(signal, 0.0, out=signal)


def scan(person: Person, site: Site, *, shape: Sequence[int] = STUDY_SHAPE,
         voxel_mm: float = STUDY_VOXEL_MM, scheme=None, anatomy: str = "geometric") -> Scan:
    """Simulate ``person`` scanned at ``site`` (the same field of view
    ``shape * voxel_mm`` on the site's grid). ``anatomy="brain"``: the
    phantom's brain (:mod:`.brain`), whose own per-person non-linear warp is
    exact (the template sampled through it), so no resampling warp follows."""
    gtab = study_scheme() if scheme is None else scheme
    grid_site = phantom.SiteEffect(name=site.name, voxel_size=site.voxel_mm, te=site.te_ms)
    s = phantom.simulate_subject(shape, seed=person.seed, snr=None, scheme=gtab,
                                 voxel_size=voxel_mm, site=grid_site, anatomy=anatomy)
    grid = s.dwi.shape[:3]
    sig = s.dwi.reshape(-1, len(gtab)).astype(np.float64)
    region = (s.truth["bundle"] == phantom.BUNDLES.index(GROUP_BUNDLE) + 1) & \
        (s.truth["label"] == phantom.LABELS["wm"])
    if person.group == "patient":
        keep = 1.0 - GROUP_ANISOTROPY_LOSS
        w = region.ravel().astype(np.float64)
        _scale_sh(sig, gtab, {2: keep, 4: keep, 6: keep}, weight=w)
        sig *= np.where(w[:, None] > 0, np.exp(-gtab.bvals * GROUP_DIFFUSIVITY_INCREASE), 1.0)
    if anatomy == "brain":   # already deformed per person inside the phantom
        dwi = sig.reshape(grid + (len(gtab),)).astype(np.float32)
        truth = dict(s.truth, group_region=region)
    else:   # the person's deformation: the anatomy seen at x is the phantom's at x + u(x)
        ijk = np.indices(grid, dtype=np.float64).reshape(3, -1).T
        world = ijk @ s.affine[:3, :3].T + s.affine[:3, 3]
        moved = world + displacement(world, person.seed)
        coords = ((moved - s.affine[:3, 3]) @ np.linalg.inv(s.affine[:3, :3]).T).T.reshape(
            (3,) + grid)
        dwi = _warp(sig.reshape(grid + (len(gtab),)).astype(np.float32), coords, order=1)
        truth = {}
        for name, val in s.truth.items():
            nearest = val.dtype == bool or np.issubdtype(val.dtype, np.integer)
            truth[name] = _warp(val.astype(np.float32) if val.dtype == bool else val, coords,
                                order=0 if nearest else 1).astype(val.dtype)
        truth["group_region"] = _warp(region.astype(np.uint8), coords, order=0).astype(bool)
    mask = truth["mask"]
    sig = dwi.reshape(-1, len(gtab)).astype(np.float64)
    if site.rish_scale:
        _scale_sh(sig, gtab, site.rish_scale)
    clean = sig.astype(np.float32).reshape(dwi.shape)
    wm = truth["label"] == phantom.LABELS["wm"]
    sigma = float(truth["s0"][wm].mean() / site.snr)
    rng = np.random.default_rng(np.random.SeedSequence(
        [int(person.seed), zlib.crc32(site.name.encode()), 2]))
    noisy = np.hypot(clean + sigma * rng.standard_normal(clean.shape, dtype=np.float32),
                     sigma * rng.standard_normal(clean.shape, dtype=np.float32))
    subject = replace(s, dwi=noisy.astype(np.float32), mask=mask, truth=truth, snr=site.snr,
                      sigma=sigma, site=site.name, noise_free=clean)
    params = {"group": person.group, "seed": person.seed, "site": site.name,
              "voxel_mm": site.voxel_mm, "snr": site.snr, "te_ms": site.te_ms,
              "anatomy": anatomy,
              "rish_scale": None if not site.rish_scale else
              {f"{float(b):g}": dict(v) for b, v in site.rish_scale.items()}}
    return Scan(subject, person, site.name, params)


# ----------------------------------------------------------------------------
# Designs
# ----------------------------------------------------------------------------
def unpaired_study(n_per_site: int, seed: int = 0, sites: Sequence[Site] = (SITE_A, SITE_B),
                   **kw) -> dict[str, list[Scan]]:
    """Different persons at each site (half of them patients): {site name: scans}."""
    return {site.name: [scan(p, site, **kw) for p in
                        persons(n_per_site, seed + i * SITE_PERSON_OFFSET)]
            for i, site in enumerate(sites)}


def paired_study(n: int, seed: int = 0, sites: Sequence[Site] = (SITE_A, SITE_B),
                 **kw) -> dict[str, list[Scan]]:
    """The same ``n`` persons scanned at every site (travelling subjects)."""
    people = persons(n, seed)
    return {site.name: [scan(p, site, **kw) for p in people] for site in sites}


def held_out(n: int, seed: int = 0, sites: Sequence[Site] = (SITE_A, SITE_B),
             **kw) -> dict[str, list[Scan]]:
    """Persons outside every fitting cohort of ``seed``, scanned at every site."""
    return paired_study(n, seed + HELD_OUT_OFFSET, sites, **kw)


# ----------------------------------------------------------------------------
# Validation of a harmonization on a study
# ----------------------------------------------------------------------------
#: SH order of the harmonization in the study (30 directions per shell).
STUDY_LMAX = 4
#: Metrics of the group effect: FA in the group region and RISH l2 there
#: (b = the first shell), per scan.
GROUP_METRICS = ("group_fa", "group_rish_l2")


def as_dwi(sc: Scan, data: np.ndarray | None = None):
    """The scan (or ``data`` on its grid, e.g. harmonised) as an io.DWI."""
    import nibabel as nib
    from ..io import DWI
    s = sc.subject
    return DWI(np.asfortranarray(s.dwi if data is None else data, dtype=np.float32), s.gtab,
               s.mask, s.affine, nib.Nifti1Header(), {})


def measures(sc: Scan, data: np.ndarray | None = None, lmax: int = STUDY_LMAX) -> dict:
    """One scan's numbers: ``{(metric, shell): value}`` - white-matter means
    (truth label, the same definition at both sites) of FA, MD and RISH
    l0/l2/l4 per shell, and the group metrics in the group region - plus
    ``"fa_corr"``: Pearson correlation of the DTI FA with the truth FA in the
    brain mask."""
    from .. import harmonize as H
    dwi = as_dwi(sc, data)
    truth = sc.subject.truth
    wm = truth["label"] == phantom.LABELS["wm"]
    summ = H.summarise_subject(dwi, lmax, subject=sc.label, wm_mask=wm)
    out = dict(summ.values)
    region = truth["group_region"]
    first = float(sc.subject.gtab.shells[0])
    out[("group_fa", math.nan)] = float(summ.fa[region].mean())
    out[("group_rish_l2", first)] = float(H.rish_maps(dwi, lmax, [first])[first][..., 1]
                                          [region].mean())
    m = sc.subject.mask
    out["fa_corr"] = float(np.corrcoef(summ.fa[m], truth["fa"][m])[0, 1])
    return out


def features(scans: Sequence[Scan], lmax: int = STUDY_LMAX, noise_floor: bool = False,
             b0: bool = False) -> list:
    """The harmonization fit's inputs (FA + RISH; with ``noise_floor`` the
    RISH noise estimate too, with ``b0`` the mean b0 image) of the scans."""
    from .. import harmonize as H
    return [H.subject_features(as_dwi(sc), sc.label, lmax, noise_floor=noise_floor, b0=b0)
            for sc in scans]


def harmonise(scans: Sequence[Scan], artefact) -> list[np.ndarray]:
    """Each scan's DWIs harmonised with ``artefact`` (registered to its template)."""
    from .. import harmonize as H
    return [H.apply_harmonization(as_dwi(sc), None, artefact, subject=sc.label)[0]
            for sc in scans]


def _d(a, b) -> tuple[float, float]:
    from .. import harmonize as H
    r = H.site_effect(a, b)
    return r["cohen_d"], r["p"]


def site_rows(ref: Sequence[dict], before: Sequence[dict], after: Sequence[dict]) -> list[dict]:
    """Site effect (target - reference) per metric before and after."""
    rows = []
    for key in ref[0]:
        if key == "fa_corr" or key[0] in GROUP_METRICS:
            continue
        r = np.mean([m[key] for m in ref])
        db, pb = _d([m[key] for m in ref], [m[key] for m in before])
        da, pa = _d([m[key] for m in ref], [m[key] for m in after])
        rows.append({"metric": key[0], "shell": key[1], "d_before": db, "p_before": pb,
                     "d_after": da, "p_after": pa,
                     "rel_before": np.mean([m[key] for m in before]) / r - 1,
                     "rel_after": np.mean([m[key] for m in after]) / r - 1})
    return rows


def group_rows(scans: Sequence[Scan], before: Sequence[dict], after: Sequence[dict]
               ) -> list[dict]:
    """Group effect (patients - controls) at one site before and after."""
    pat = [sc.person.group == "patient" for sc in scans]
    rows = []
    for key in before[0]:
        if key == "fa_corr" or key[0] not in GROUP_METRICS:
            continue
        sel = lambda ms, want: [m[key] for m, p in zip(ms, pat) if p == want]   # noqa: E731
        db, pb = _d(sel(before, False), sel(before, True))
        da, pa = _d(sel(after, False), sel(after, True))
        rows.append({"metric": key[0], "shell": key[1], "d_before": db, "p_before": pb,
                     "d_after": da, "p_after": pa, "ratio": da / db if db else math.nan})
    return rows


def validate(design: str = "unpaired", n_fit: int = 12, n_held_out: int = 12, seed: int = 0,
             sites: Sequence[Site] = (SITE_A, SITE_B), in_sample: bool = True,
             anatomy: str = "geometric", shape: Sequence[int] = STUDY_SHAPE,
             fit_cohort: bool = False, **fit_options) -> dict:
    """Fit a harmonization on a ``design`` ("unpaired" or "paired") cohort of
    ``n_fit`` persons per site and evaluate it on ``n_held_out`` other
    persons scanned at both sites (reference scan = the truth of each person's
    harmonised target scan), and in-sample on the fit cohort's target site.

    Returns tables (lists of row dicts): ``site`` (held-out, reference vs
    target before/after), ``group`` (held-out target site), ``group_fit``
    (fit cohort's target site; empty unless ``in_sample``),
    ``group_reference`` (held-out reference site, for scale), ``fa_corr``
    (held-out target scans, before/after), the timings (s per subject), the
    artefact, and ``site_with(artefact)``: the held-out site table with another
    artefact applied instead (e.g. a deliberately wrong one, so a test can
    show that its checks would catch it). ``fit_cohort``: also ``fit_cohort``,
    the evaluation ``dmriflow harmonize fit`` reports on the fit cohort, per
    white-matter definition (:func:`fit_cohort_evaluation`). ``fit_options``
    go to :func:`harmonize.fit_harmonization`.
    """
    import time
    from .. import harmonize as H
    make = {"unpaired": unpaired_study, "paired": paired_study}[design]
    ref_site, tar_site = sites[0].name, sites[1].name
    scan_kw = {"anatomy": anatomy, "shape": tuple(shape)}
    fit = make(n_fit, seed, sites, **scan_kw)
    test = held_out(n_held_out, seed, sites, **scan_kw)
    t0 = time.perf_counter()
    b0 = fit_options.get("registration_contrast") == H.B0_CONTRAST
    feats = {name: features(scans, b0=b0) for name, scans in fit.items()}
    art = H.fit_harmonization(feats[ref_site], feats[tar_site], list(STUDY_SHELLS), STUDY_LMAX,
                              reference_site=ref_site, target_site=tar_site, **fit_options)
    t_fit = (time.perf_counter() - t0) / (2 * n_fit)
    t0 = time.perf_counter()
    after = harmonise(test[tar_site], art)
    t_apply = (time.perf_counter() - t0) / n_held_out
    m_ref = [measures(sc) for sc in test[ref_site]]
    m_bef = [measures(sc) for sc in test[tar_site]]
    m_aft = [measures(sc, d) for sc, d in zip(test[tar_site], after)]
    group_fit = []
    if in_sample:
        f_bef = [measures(sc) for sc in fit[tar_site]]
        f_aft = [measures(sc, d) for sc, d in zip(fit[tar_site], harmonise(fit[tar_site], art))]
        group_fit = group_rows(fit[tar_site], f_bef, f_aft)
    return {"site": site_rows(m_ref, m_bef, m_aft),
            "site_with": lambda artefact: site_rows(
                m_ref, m_bef, [measures(sc, d) for sc, d in
                               zip(test[tar_site], harmonise(test[tar_site], artefact))]),
            "group": group_rows(test[tar_site], m_bef, m_aft),
            "group_fit": group_fit,
            "group_reference": group_rows(test[ref_site], m_ref, m_ref),
            "fa_corr": [{"subject": sc.label, "before": b["fa_corr"], "after": a["fa_corr"]}
                        for sc, b, a in zip(test[tar_site], m_bef, m_aft)],
            "fit_s_per_subject": t_fit, "apply_s_per_subject": t_apply, "artefact": art,
            "fit_cohort": fit_cohort_evaluation(fit, feats, art) if fit_cohort else {}}


#: The white matter of the truth's label: the same anatomy at both sites,
#: known only in simulation (the yardstick of the evaluation's own masks).
TRUTH_WM_MASK = "truth-label"


def fit_cohort_evaluation(study: Mapping[str, Sequence[Scan]], feats: Mapping[str, Sequence],
                          artefact, lmax: int = STUDY_LMAX, noise_free: bool = False) -> dict:
    """The evaluation ``dmriflow harmonize fit`` reports - the site effect
    before/after on the fitting cohort ``study`` ({site: scans}, ``feats``
    its features in the same order), each target scan harmonised through its
    own transform from the fit - with each white-matter definition:
    ``{name: site table}`` for the engine's (``harmonize.EVAL_MASKS``:
    reference-defined in template space, and each scan's own FA) and
    ``TRUTH_WM_MASK``. The reference-defined masks are built with the same
    functions the engine calls (:func:`harmonize.template_wm_mask`,
    :func:`harmonize.subject_wm_mask`). ``noise_free``: summarise (and
    harmonise) every scan's noise-free signal in the masks its noisy scan
    gave - with no site scaling the site effect is then the masks' alone."""
    from .. import harmonize as H
    ref_site, tar_site = artefact.reference_site, artefact.target_site

    def transform(site, sc):
        return artefact.transforms[(site, sc.label)]

    tpl_wm = H.template_wm_mask([H.warped_fa(f, transform(ref_site, sc)) for sc, f in
                                 zip(study[ref_site], feats[ref_site])], artefact.template_mask)

    def masks(site, sc, f) -> dict:
        """The scan's white matter by each definition (``f``: its features)."""
        return {H.EVAL_MASK_REFERENCE: H.subject_wm_mask(tpl_wm, transform(site, sc), f.mask),
                H.EVAL_MASK_OWN: H.own_wm_mask(f.fa, f.mask),
                TRUTH_WM_MASK: sc.subject.truth["label"] == phantom.LABELS["wm"]}

    def summaries(sc, wms: dict, data=None) -> dict:
        """The scan (or ``data`` on its grid, harmonised) summarised in each mask."""
        dwi = as_dwi(sc, sc.subject.noise_free if noise_free and data is None else data)
        tensor, rish = H.dti_tensor(dwi), H.rish_maps(dwi, lmax)
        return {name: H.summarise_subject(dwi, lmax, subject=sc.label, tensor=tensor,
                                          rish=rish, wm_mask=wm) for name, wm in wms.items()}

    ref = [summaries(sc, masks(ref_site, sc, f))
           for sc, f in zip(study[ref_site], feats[ref_site])]
    tar_masks = [masks(tar_site, sc, f) for sc, f in zip(study[tar_site], feats[tar_site])]
    before = [summaries(sc, m) for sc, m in zip(study[tar_site], tar_masks)]
    after = [summaries(sc, m, H.apply_harmonization(as_dwi(sc, sc.subject.noise_free if
                                                           noise_free else None), None, artefact,
                                                    subject=sc.label,
                                                    transform=transform(tar_site, sc))[0])
             for sc, m in zip(study[tar_site], tar_masks)]
    out = {}
    for name in tar_masks[0]:
        table, _ = H.evaluate_harmonization([s[name] for s in ref], [s[name] for s in before],
                                            [s[name] for s in after], lmax)
        out[name] = table.assign(wm_mask=name)
    return out
