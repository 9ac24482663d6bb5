"""The image-gradient studies (SCIENCE.md section 7): numerics, no pydra.

Two studies of the claim that the diffusion signal carries the spatial
gradient of the image, both built on :mod:`dmriflow.interfaces.image_gradient`:

* **Fibre-continuity phantom cohort** (:func:`continuity_study`): subjects of
  :func:`dmriflow.interfaces.sim.phantom.simulate_continuity_subject`, whose signal has *no*
  gradient physics and whose b0 gradient is perpendicular to the fibre in
  half of the voxels. Every estimator, null and fibre-only control is run
  per subject (:func:`dmriflow.interfaces.image_gradient.evaluate_subject`) and tested across
  subjects (:func:`dmriflow.interfaces.image_gradient.cohort_tests`).
* **Real two-TE pair** (:func:`real_pair_study`): the MDT example slices at
  TE 60 / 91 ms with diffusion times 26.5 / 42 ms (in the folder passed as
  ``data_dir``, e.g. ``../shared/data``). The T2 map comes from the two mean
  b0s (:func:`t2_map`). The data hold two slices only, so no central
  difference exists along z: the gold standards (grad ln b0 of each series,
  grad R2) are **in-plane** (x, y) gradients
  (:func:`inplane_gold_standard`), and an estimate is compared with them by
  the acute 3D angle to the in-plane gradient and by the angle within the
  slice plane. An in-plane gold standard is not isotropic, so the nominal
  chance values (57.3 / 45 deg) hold only for isotropic estimates: the
  baseline is the voxel-shuffle null of each method (:func:`shuffle_null`),
  one subject allows no cohort test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from .. import image_gradient as ig
from .. import io
from ..sim import phantom
from ..errors import InputError

#: The real two-TE pair: folder, file stem and gradient stem of each series.
MDT_SERIES = {
    "te60": ("mdt_te60_b1k_b2k", "b1k_b2k_example_slices_24_38", "b1k_b2k"),
    "te91": ("mdt_te91_multishell", "multishell_b6k_max_example_slices_24_38",
             "multishell_b6k_max"),
}
#: T2 (ms) outside this range is implausible for brain tissue at 3T (white
#: matter ~70, grey ~85-100, CSF > 1000 but ill-determined from TE 60/91).
T2_PLAUSIBLE_MS = (30.0, 200.0)
#: Reported median T2 of the pair (data README) and its tolerance (ms).
MDT_MEDIAN_T2_MS = 70.0
#: The slice normal in the b-vector (FSL image) frame: the voxel k axis.
SLICE_NORMAL = np.array([0.0, 0.0, 1.0])
#: Number of voxel shuffles of the within-subject permutation p-values.
N_SHUFFLES = 200
#: Default continuity cohort (small grid, HCP-like three shells).
CONTINUITY_SUBJECTS = 8


# ----------------------------------------------------------------------------
# Fibre-continuity phantom cohort
# ----------------------------------------------------------------------------
def phantom_dwi(subject: phantom.PhantomSubject) -> io.DWI:
    """A simulated subject as the :class:`io.DWI` the estimators take."""
    header = nib.Nifti1Header()
    header.set_data_shape(subject.dwi.shape)
    header.set_zooms(tuple(subject.voxel_size) + (1.0,))
    return io.DWI(data=subject.dwi, gtab=subject.gtab, mask=subject.mask.copy(),
                  affine=subject.affine, header=header, paths={"dwi": "<phantom>"})


@dataclass
class CohortStudy:
    """Per-subject rows (``image_gradient.ROW_COLUMNS``), the cohort tests and
    the truth check (mean acute angle between the true image gradient and the
    fibre, per subject, in the continuity and the random voxels)."""

    rows: object
    tests: object
    truth: object


def continuity_study(n_subjects: int = CONTINUITY_SUBJECTS,
                     shape: Sequence[int] = (18, 18, 12), scheme=None,
                     snr: float = phantom.CONTINUITY_SNR, seed: int = 0,
                     estimators: Sequence[str] = ("B",),
                     timing: ig.SequenceTiming = ig.HCP_TIMING,
                     fraction: float = phantom.CONTINUITY_FRACTION,
                     **evaluate_kw) -> CohortStudy:
    """Run the fibre-continuity cohort: simulate, evaluate, test.

    Subject ``i`` uses :func:`phantom.cohort_subject_seed` ``(seed, i)``; its random
    controls use the same seed. Estimators B and A; P gets the phase of the
    simulated complex noise (the noise-free signal is real: no physics).
    ``evaluate_kw`` go to ``evaluate_subject``.
    """
    import pandas as pd  # pandas: a second to import, for the tables only
    scheme = scheme if scheme is not None else phantom.hcp_scheme(jitter=False)
    rows, truth = [], []
    for i in range(int(n_subjects)):
        s_seed = phantom.cohort_subject_seed(seed, i)
        subj = phantom.simulate_continuity_subject(shape, seed=s_seed, scheme=scheme, snr=snr,
                                                   te=timing.TE if np.isfinite(timing.TE)
                                                   else phantom.HCP_TE_MS, fraction=fraction)
        ev = ig.evaluate_subject(phantom_dwi(subj), timing, tuple(estimators),
                                 subject=f"sub-{i + 1:02d}", rng=s_seed,
                                 phase=subj.phase if "P" in estimators else None, **evaluate_kw)
        rows.append(ev.rows)
        cont = subj.truth["continuity"] & ev.mask
        rand = ~subj.truth["continuity"] & ev.mask
        fib = ig.acute_angle(subj.truth["grad"], subj.truth["fibre"])
        truth.append({"subject": f"sub-{i + 1:02d}", "n_voxels": int(ev.mask.sum()),
                      "continuity_share": float(cont.sum() / max(ev.mask.sum(), 1)),
                      "grad_fibre_continuity": float(np.mean(fib[cont])),
                      "grad_fibre_random": float(np.mean(fib[rand])),
                      "sigma_estimated": ev.sigma, "sigma_true": subj.sigma})
    rows = pd.concat(rows, ignore_index=True)
    return CohortStudy(rows=rows, tests=ig.cohort_tests(rows), truth=pd.DataFrame(truth))


# ----------------------------------------------------------------------------
# T2 from two echo times
# ----------------------------------------------------------------------------
def t2_map(b0_short: np.ndarray, b0_long: np.ndarray, te_short: float, te_long: float,
           mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mono-exponential T2 (ms) and R2 = 1/T2 (1/ms) from b0 images at two
    echo times (ms): R2 = ln(S_short / S_long) / (TE_long - TE_short).

    Assumes the same proton-density and T1 weighting in both (the MDT pair:
    same session, TR 7.1 / 7.8 s, so T1 weighting differs by < 1 % in white
    matter). NaN where either signal is not positive or S_long >= S_short
    (no decay: noise or CSF), and outside ``mask``.
    """
    s1 = np.asarray(b0_short, dtype=np.float64)
    s2 = np.asarray(b0_long, dtype=np.float64)
    if s1.shape != s2.shape:
        raise ValueError(f"b0 images differ in shape: {s1.shape} vs {s2.shape}")
    if not te_long > te_short:
        raise ValueError(f"TE_long ({te_long} ms) must exceed TE_short ({te_short} ms)")
    ok = (s1 > 0) & (s2 > 0) & (s1 > s2)
    if mask is not None:
        ok &= np.asarray(mask, dtype=bool)
    r2 = np.full(s1.shape, np.nan)
    r2[ok] = np.log(s1[ok] / s2[ok]) / (te_long - te_short)
    with np.errstate(divide="ignore"):
        t2 = np.where(ok, 1.0 / r2, np.nan)
    return t2.astype(np.float32), r2.astype(np.float32)


# ----------------------------------------------------------------------------
# In-plane gold standard (two-slice data)
# ----------------------------------------------------------------------------
def inplane_mask(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` whose 4 in-plane (x, y) neighbours are inside it:
    the in-plane analogue of ``image_gradient.evaluation_mask``."""
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros_like(mask)
    core = mask[1:-1, 1:-1].copy()
    core &= mask[2:, 1:-1] & mask[:-2, 1:-1] & mask[1:-1, 2:] & mask[1:-1, :-2]
    out[1:-1, 1:-1] = core
    return out


def inplane_gold_standard(image: np.ndarray, affine: np.ndarray, mask: np.ndarray,
                          log: bool = True) -> ig.GoldStandard:
    """In-plane gold standard (z component 0) for data with too few slices
    for a z central difference: ``log`` True gives grad ln I (a b0 image),
    False the plain gradient of ``image`` (e.g. an R2 map). Frame: the
    b-vectors' (FSL image frame); evaluated where the image is finite (and
    positive for ``log``) at the voxel and its 4 in-plane neighbours.
    """
    img = np.asarray(image, dtype=np.float64)
    valid = np.asarray(mask, bool) & np.isfinite(img) & ((img > 0) if log else True)
    evaluate = inplane_mask(valid)
    work = np.where(valid, np.log(np.where(valid & (img > 0), img, 1.0)) if log else img, np.nan)
    grad = ig.central_differences(work)
    grad[..., 2] = 0.0                                  # no z difference: in-plane only
    grad = ig.index_to_frame(grad, affine, "fsl")
    grad[~evaluate] = np.nan
    return ig.GoldStandard(gradient=grad.astype(np.float32), image=img.astype(np.float32),
                           mask=evaluate, frame="fsl", log=log,
                           excluded={"inplane_border_or_invalid": int(valid.sum()
                                                                     - evaluate.sum())})


# ----------------------------------------------------------------------------
# The real two-TE pair
# ----------------------------------------------------------------------------
@dataclass
class PairSeries:
    """One series of the pair: the validated DWI and its timing (ms)."""

    name: str
    dwi: io.DWI
    timing: ig.SequenceTiming


def load_mdt_pair(data_dir) -> dict[str, PairSeries]:
    """The two MDT series (``MDT_SERIES``) with their brain masks and the
    timing of their ``.prtcl`` protocols; checks they share one grid."""
    root = Path(data_dir)
    out = {}
    for name, (folder, stem, grad) in MDT_SERIES.items():
        d = root / folder
        dwi = io.load_dwi(d / f"{stem}.nii.gz", d / f"{grad}.bval", d / f"{grad}.bvec",
                          d / f"{stem}_mask.nii.gz")
        out[name] = PairSeries(name, dwi, ig.SequenceTiming.from_prtcl(d / f"{grad}.prtcl"))
    a, b = out["te60"].dwi, out["te91"].dwi
    if a.data.shape[:3] != b.data.shape[:3] or not np.allclose(a.affine, b.affine, atol=1e-3):
        raise InputError(b.paths["dwi"], "the two series are not on the same voxel grid")
    return out


@dataclass
class PairStudy:
    """Results of :func:`real_pair_study`.

    ``t2``/``r2``: maps (ms, 1/ms); ``t2_summary``: percentiles in the joint
    mask; ``table``: one row per gold standard x method x stratum with the
    per-voxel mean/median of the acute angle (``mean``, ``median``; chance
    57.3/60) and of the in-slice angle (``mean_2d``, ``median_2d``; chance
    45), ``shuffle_mean`` and ``p_shuffle`` (the baseline and two-sided
    within-subject permutation p-value of the mean angle, ``N_SHUFFLES``
    voxel shuffles; spatial autocorrelation makes the p-value optimistic);
    ``parameters``.
    """

    t2: np.ndarray
    r2: np.ndarray
    mask: np.ndarray
    t2_summary: dict
    table: object
    parameters: dict


def _series_estimates(series: PairSeries, mask, rng, second: PairSeries | None = None):
    """(axes, kinds) of B on one series, or of C with ``second``, with
    the voxel-shuffle and surrogate nulls, restricted to ``mask``."""
    dwi = series.dwi
    sigma = ig.estimate_sigma(dwi.data, dwi.gtab, dwi.mask)
    if second is None:
        name = f"B_{series.name}"
        model = ig.make_model("B", dwi.gtab, series.timing)
        fit = model.fit(dwi.data, mask)
        sfit = model.fit_surrogate(dwi.data, mask, sigma, rng)
    else:
        name = "C"
        model = ig.make_model("C", dwi.gtab, series.timing,
                              second=(second.dwi.gtab, second.timing))
        sigma2 = ig.estimate_sigma(second.dwi.data, second.dwi.gtab, second.dwi.mask)
        fit = model.fit(dwi.data, second.dwi.data, mask)
        sfit = model.fit_surrogate(dwi.data, second.dwi.data, mask, (sigma, sigma2), rng)
    axes = {name: fit.axis, name + ig.SHUFFLE_SUFFIX: ig.shuffle_axes(fit.axis, mask, rng),
            name + ig.SURROGATE_SUFFIX: sfit.axis}
    kinds = {name: "estimator", name + ig.SHUFFLE_SUFFIX: "null",
             name + ig.SURROGATE_SUFFIX: "null"}
    return axes, kinds


def shuffle_null(axis: np.ndarray, gold: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator, n: int = N_SHUFFLES) -> tuple[float, float]:
    """Within-subject permutation null of the mean acute angle between
    ``axis`` and ``gold`` over ``mask``: (mean of ``n`` voxel shuffles of
    ``axis``, two-sided p-value of the observed mean). The shuffles keep the
    orientation distribution of both maps, so their mean is the chance level
    for these data even where neither map is isotropic (an in-plane gold
    standard is not)."""
    a = axis[mask].astype(np.float64)
    g = gold[mask].astype(np.float64)
    ok = np.isfinite(a).all(1) & np.isfinite(g).all(1)
    a, g = a[ok], g[ok]
    if a.shape[0] < 2:
        return float("nan"), float("nan")
    observed = float(np.mean(ig.acute_angle(a, g)))
    null = np.array([np.mean(ig.acute_angle(a[rng.permutation(a.shape[0])], g))
                     for _ in range(int(n))])
    centre = float(null.mean())
    extreme = np.sum(np.abs(null - centre) >= abs(observed - centre))
    return centre, float((extreme + 1) / (n + 1))


def real_pair_study(data_dir, seed: int = 0, n_shuffles: int = N_SHUFFLES) -> PairStudy:
    """T2 map and the in-plane image-gradient study of the MDT two-TE pair.

    Gold standards (in-plane, :func:`inplane_gold_standard`): ``lnb0_te60``,
    ``lnb0_te91`` (grad ln of each mean b0) and ``r2`` (grad R2 from
    :func:`t2_map`). Methods: B on each series (``B_te60``, ``B_te91``: Delta
    26.5 / 42 ms), C from the two diffusion times (tensors up to b = 1500 of
    each series: b 1000 vs 750 + 1500; the pair shares no shell), each with
    its shuffle and surrogate nulls; fibre-only controls from the TE 60
    series' tensor (V1, E3; FA strata from it too). All compared on the same
    voxels: the joint brain mask, in-plane eroded, with a finite T2.
    """
    import pandas as pd  # pandas: a second to import, for the tables only
    rng = np.random.default_rng(seed)
    pair = load_mdt_pair(data_dir)
    short, long_ = pair["te60"], pair["te91"]
    b0s = {k: io.mean_b0_map(s.dwi.data, s.dwi.gtab) for k, s in pair.items()}
    joint = short.dwi.mask & long_.dwi.mask
    t2, r2 = t2_map(b0s["te60"], b0s["te91"], short.timing.TE, long_.timing.TE, joint)
    golds = {"lnb0_te60": inplane_gold_standard(b0s["te60"], short.dwi.affine, joint),
             "lnb0_te91": inplane_gold_standard(b0s["te91"], short.dwi.affine, joint),
             "r2": inplane_gold_standard(r2, short.dwi.affine, joint, log=False)}
    tmaps = ig.tensor_maps(short.dwi.data, short.dwi.gtab, joint)
    mask = np.logical_and.reduce([g.mask for g in golds.values()]) & np.isfinite(tmaps.fa) \
        & np.isfinite(tmaps.v1).all(-1)
    if not mask.any():
        raise InputError(short.dwi.paths["dwi"], "no voxel left for the in-plane evaluation")
    axes, kinds = {}, {}
    for args in ((short,), (long_,), (short, long_)):
        a, k = _series_estimates(args[0], mask, rng, *args[1:])
        axes.update(a)
        kinds.update(k)
    axes[ig.FIBRE_E3], kinds[ig.FIBRE_E3] = tmaps.e3, "control"
    perp = np.full(mask.shape + (3,), np.nan, np.float32)
    perp[mask] = ig.perpendicular_random_axis(tmaps.v1[mask], rng)
    axes[ig.FIBRE_PERP], kinds[ig.FIBRE_PERP] = perp, "control"
    strata = ig.fa_strata(tmaps.fa, mask)
    normal = np.broadcast_to(SLICE_NORMAL, mask.shape + (3,))
    tables = []
    for gname, gold in golds.items():
        angles = {m: np.where(mask, ig.acute_angle(a, gold.gradient), np.nan)
                  for m, a in axes.items()}
        in_slice = {m: np.where(mask, ig.plane_angle(a, gold.gradient, normal), np.nan)
                    for m, a in axes.items()}
        t = ig.summarise_angles(angles, in_slice, strata, kinds, subject="mdt")
        t.insert(1, "gold", gname)
        nulls = {m: (shuffle_null(a, gold.gradient, mask, rng, n_shuffles)
                     if not m.endswith(ig.SHUFFLE_SUFFIX) else (float("nan"),) * 2)
                 for m, a in axes.items()}
        t["shuffle_mean"] = [nulls[m][0] if s == "all" else float("nan")
                             for m, s in zip(t["method"], t["stratum"])]
        t["p_shuffle"] = [nulls[m][1] if s == "all" else float("nan")
                          for m, s in zip(t["method"], t["stratum"])]
        tables.append(t)
    sel = t2[mask]
    summary = {"n_voxels": int(np.isfinite(t2[joint]).sum()),
               "undefined_voxels": int(np.count_nonzero(joint & ~np.isfinite(t2))),
               "median_ms": float(np.nanmedian(t2[joint])),
               **{f"p{q}_ms": float(np.nanpercentile(t2[joint], q)) for q in (5, 25, 75, 95)},
               "evaluated_median_ms": float(np.median(sel))}
    params = {"timing": {k: vars(s.timing) for k, s in pair.items()},
              "n_voxels": int(mask.sum()), "n_slices": int(mask.shape[2]),
              "gold_standard": "in-plane central differences (z impossible: 2 slices)",
              "frame": "fsl-image", "n_shuffles": int(n_shuffles), "seed": int(seed)}
    return PairStudy(t2=t2, r2=r2, mask=mask, t2_summary=summary,
                     table=pd.concat(tables, ignore_index=True), parameters=params)

