"""Train, ship and score the RISH-space 3T->7T model against its baselines.

* :func:`simulate_pairs` - held-out (or training) pairs at given seeds: both
  members' features on the cube plus the 3T member's noise estimate and SNR
  (on the native grid, as an inference run would see them);
* :func:`train_shipped` - trains the residual diffusion model and the
  equally-fed CNN on train-family pairs (``--family train-mixed``: the PSF
  drawn per pair, Gaussian or apodised k-space) and writes both checkpoints
  (``python -m dmriflow.models.experiments.ldm_study train OUT``);
* :func:`evaluate` - scores every method on the given seeds (test family):
  ``metrics.tsv`` (method, map, nmse, ssim, skill = 1 - NMSE/NMSE_identity,
  mean over subjects), ``calibration.tsv`` (method, map, nominal, coverage),
  ``subjects.tsv`` (per subject), ``paired_tests.tsv`` (paired Wilcoxon tests of the
  shipped model against each baseline), ``spread_error_spearman.tsv`` (per
  subject and method with an uncertainty) and ``flags.tsv`` - ``dmriflow
  evaluate 3t7t``;
* :func:`record_metrics` - writes evaluate's rows into the checkpoints' cards
  (``evaluate --record``; ``train`` does it on ``--heldout`` seeds).
* :func:`recalibrate` - refits the diffusion checkpoint's spread scale on
  pairs of a family other than the report one and records family and seeds
  on its card (``calibrate``; measured 2026-12-05 with the held-out-PSF
  family ``calib``, not shipped: docs/models-studies.md).

Methods: ``shipped`` (posterior mean of K samples), ``shipped_sample`` (one
sample), ``identity``, ``template_lambda`` (classical RISH mapping fitted on
train-family pairs), ``cnn`` (the equally-fed CNN), ``cnn_clipped`` (the same
CNN fed its sharpness and SNR clipped into its card's ranges,
:func:`model_view`), ``shipped_clipped`` (``evaluate --clipped`` only: the
diffusion model's posterior mean with its inputs clipped the same way into its
own card's ranges; coverage and spread-error rows too), ``oracle`` (true 7T
RISH), ``cnn_ensemble`` (posterior mean of the 5-CNN ensemble,
:mod:`.ldm_ensemble`, when its members are there), ``ldm_paired_concatenation``
(the earlier latent model, when its checkpoint is given), ``ldm_faithful``
and ``ldm_faithful_rescaled`` (the class-conditioned latent DDPM translating
by DDIM inversion, :mod:`.ldm_faithful`, when its checkpoint is given: scales
``sqrt(R7_pred / R3)`` as published, and ``sqrt(R7_pred / D(E(R3)))``). Uncertainty rows
(calibration, spread-error Spearman): ``shipped`` (calibrated sample spread),
``cnn_noise_proxy`` (the CNN +- c sigma/s0) and ``cnn_ensemble`` (member SD
times c); both c fitted on the same train-family validation pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import norm, spearmanr, wilcoxon

from dmriflow.interfaces import io
from dmriflow.models import card as cards
from dmriflow.models import degrade
from dmriflow.models.experiments import ldm_metrics as ev
from dmriflow.models.ldm import baselines, features, rishdiff

#: Seeds of the training / validation pairs (train family) and the default
#: held-out seeds (test family); disjoint from the latent model's experiment.
SEED_TRAIN, SEED_HELDOUT = 40_000, 50_000
#: Calibration levels of the sample intervals.
NOMINALS = (0.5, 0.8, 0.9, 0.95)
#: Template-lambda baseline: train-family pairs it is fitted on at evaluation.
TEMPLATE_PAIRS = 4
#: Validation pairs (train family) that calibrate the spread.
VALIDATION_PAIRS = 6
SEED_VALIDATION = SEED_TRAIN + 1000
#: Pairs of the held-out-PSF family ``degrade.FAMILIES["calib"]`` that
#: :func:`recalibrate` fits the diffusion model's spread scale on by default
#: (seeds disjoint from the training, validation and held-out ones).
CALIBRATION_FAMILY = "calib"
CALIBRATION_PAIRS = 10
SEED_CALIBRATION = SEED_TRAIN + 2000
#: The family the held-out evaluation reports on: never used to calibrate.
REPORT_FAMILY = "test"
#: Families a model may be trained on: neither the report family nor the
#: calibration one (that must stay an unseen shift). ``train-mixed`` draws the
#: PSF per pair (Gaussian or apodised k-space, ``degrade.FAMILIES``).
TRAINING_FAMILIES = tuple(f for f in degrade.FAMILIES if f not in (REPORT_FAMILY,
                                                                    CALIBRATION_FAMILY))
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints"
SHIPPED_DIFFUSION = SHIPPED / "rish_3t7t"
SHIPPED_CNN = SHIPPED / "rish_cnn_3t7t"
SHIPPED_LDM = SHIPPED / "ldm_3t7t"
SHIPPED_FAITHFUL = SHIPPED / "ldm_faithful_3t7t"
#: The CNN ensemble's members (``ldm_ensemble``): ``seed-0`` ... ``seed-4`` (see
#: :func:`member_folders`; without a ``seed-0`` there, member 0 is the ``cnn``).
SHIPPED_ENSEMBLE = SHIPPED / "rish_cnn_ensemble_3t7t"
MEMBER_PREFIX = "seed-"


@dataclass
class Subject:
    seed: int
    f3: features.ShellFeatures
    f7: features.ShellFeatures
    sigma3: float          # noise SD estimated from the 3T b0 repeats
    snr3: float            # estimated SNR of the 3T member
    degradation: dict

    @property
    def mask(self) -> np.ndarray:
        return self.f3.mask & self.f7.mask


def widened_degradation(seed: int, family: str, resolution) -> degrade.Degradation:
    """The degradation ``family`` draws at ``seed`` with its resolution factor
    mapped linearly from the family's range onto ``resolution`` (lo, hi): the
    same PSF type and bias model, a wider (or other) range of blur widths."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), degrade.PAIR_SEED_TAG]))
    spec = degrade.sample_degradation(family, rng)
    lo0, hi0 = degrade.FAMILIES[family]["resolution"]
    lo, hi = resolution
    r = lo + (spec.resolution - lo0) / (hi0 - lo0) * (hi - lo)
    return dataclasses.replace(spec, resolution=max(float(r), 1.0))


def simulate_pairs(seeds, family: str, grid: int = 32, resolution=None) -> list[Subject]:
    """Pairs at ``seeds`` drawn from ``family``; ``resolution`` (lo, hi): with
    the resolution factor widened onto that range (:func:`widened_degradation`)."""
    out = []
    for s in seeds:
        spec = None if resolution is None else widened_degradation(s, family, resolution)
        p = degrade.simulate_pair(int(s), sim_size=grid, family=family, degradation=spec)
        sigma = rishdiff.noise_sigma(p.dwi3, p.gtab3, p.mask)
        out.append(Subject(int(s),
                           features.shell_features(p.dwi3, p.gtab3, p.mask, p.affine, grid),
                           features.shell_features(p.dwi7, p.gtab7, p.mask, p.affine, grid),
                           sigma, rishdiff.snr_of(p.dwi3, p.gtab3, p.mask, sigma),
                           p.degradation.describe()))
    return out


def model_view(s: Subject, ranges: dict) -> Subject:
    """``s`` as the models are fed it: sharpness and noise estimate clipped into
    the card's ``ranges`` (:func:`rishdiff.clipped_inputs`); ``snr3`` stays the
    measured one (the range flags read it)."""
    f3, sigma = rishdiff.clipped_inputs(ranges, s.f3, s.sigma3, s.snr3)
    return dataclasses.replace(s, f3=f3, sigma3=sigma)


def card_values(s: Subject) -> dict:
    """The measured quantities of ``s`` that a card has ranges for (cube
    voxel, 3T SNR, measured sharpness; None where not measured)."""
    return {"cube_voxel_mm": rishdiff.cube_voxel_mm(s.f3.affine), "snr": s.snr3,
            rishdiff.SHARPNESS: s.f3.sharpness}


def card_ranges(subjects: list[Subject]) -> dict:
    """The card's ranges from the training subjects (:func:`rishdiff.training_ranges`)."""
    return rishdiff.training_ranges([rishdiff.cube_voxel_mm(s.f3.affine) for s in subjects],
                                    [s.snr3 for s in subjects],
                                    [s.f3.sharpness for s in subjects])


def acquisition(ranges: dict) -> cards.Acquisition:
    return cards.Acquisition(shells=[features.SHELL_B],
                             min_directions={f"{features.SHELL_B:g}": 30},
                             field_strength_t=degrade.FIELD_3T, min_b0=2, ranges=ranges)


def train_shipped(out, n_pairs: int = 16, steps: int = 600, cnn_steps: int | None = None,
                  grid: int = 32, seed: int = 0, sharpness: bool = False, resolution=None,
                  family: str = "train", log=print) -> dict:
    """Train both RISH-space models on ``family`` pairs (one of
    :data:`TRAINING_FAMILIES`; the spread is calibrated on validation pairs of
    the same family); write their checkpoints to ``out/rish_3t7t`` and
    ``out/rish_cnn_3t7t`` (float16-rounded weights). ``sharpness``: both get
    the measured-sharpness condition channel; ``resolution`` (lo, hi): the
    training pairs' blur widths widened onto it."""
    if family not in TRAINING_FAMILIES:
        raise ValueError(f"training family must be one of {TRAINING_FAMILIES} (the "
                         f"{REPORT_FAMILY!r} and {CALIBRATION_FAMILY!r} families stay unseen), "
                         f"got {family!r}")
    out = Path(out)
    t0 = time.perf_counter()
    subs = simulate_pairs(SEED_TRAIN + np.arange(n_pairs), family, grid, resolution)
    log(f"simulated {n_pairs} pairs in {time.perf_counter() - t0:.0f} s")
    pairs = [(s.f3, s.f7, s.sigma3) for s in subs]
    ranges = card_ranges(subs)
    torch.manual_seed(seed)
    diff = rishdiff.RishDiffusion3T7T(grid=grid, sharpness=sharpness)
    rep = rishdiff.fit(diff, pairs, rishdiff.RishBudget(steps=steps, seed=seed), log=log)
    val = simulate_pairs(SEED_VALIDATION + np.arange(VALIDATION_PAIRS), family, grid)
    t1 = time.perf_counter()
    scale = rishdiff.calibrate(diff, [(s.f3, s.f7, s.sigma3, s.seed) for s in val])
    rep["spread_scale"] = scale.tolist()
    rep["calibration"] = (f"{VALIDATION_PAIRS} {family}-family validation pairs (seeds "
                          f"{SEED_VALIDATION}-{SEED_VALIDATION + VALIDATION_PAIRS - 1}), "
                          f"{rishdiff.CALIBRATION_LEVEL:.0%} level, "
                          f"{time.perf_counter() - t1:.0f} s")
    log(f"spread scale {np.round(scale, 3).tolist()} ({rep['calibration']})")
    torch.manual_seed(seed)
    cnn = rishdiff.RishResidualCNN(grid=grid, sharpness=sharpness)
    cbudget = rishdiff.RishBudget(steps=cnn_steps or steps, seed=seed)
    crep = rishdiff.fit_cnn(cnn, pairs, cbudget, log=log)
    data = training_data(n_pairs, grid, resolution, family)
    for model, report, name, folder in ((diff, rep, "rish-diffusion-3t7t", "rish_3t7t"),
                                        (cnn, crep, "rish-cnn-3t7t", "rish_cnn_3t7t")):
        save_rish_checkpoint(model, report, name, out / folder, ranges, data, grid)
        log(f"{name}: {report['budget']['steps']} steps in {report['seconds']:.0f} s, "
            f"final loss {report['history'][-1]['loss']:.4f}")
    return {"diffusion": rep, "cnn": crep, "ranges": ranges}


def training_data(n_pairs: int, grid: int, resolution=None, family: str = "train") -> str:
    """The cards' description of the training pairs (with the PSFs drawn when
    the family has several)."""
    wide = ("" if resolution is None else
            f" with the resolution factor widened onto {resolution[0]:g}-{resolution[1]:g}")
    psf = degrade.FAMILIES[family]["psf"]
    if not isinstance(psf, str):
        drawn = [widened_degradation(s, family, resolution or
                                     degrade.FAMILIES[family]["resolution"]).psf
                 for s in SEED_TRAIN + np.arange(n_pairs)]
        wide += " (PSF per pair: " + ", ".join(f"{p} {drawn.count(p)}" for p in psf) + ")"
    return (f"simulated pairs (dmriflow.models.degrade), seeds {SEED_TRAIN}-"
            f"{SEED_TRAIN + n_pairs - 1}, {family} degradation family{wide}, grid {grid}")


def save_rish_checkpoint(model, report: dict, name: str, folder, ranges: dict, data: str,
                         grid: int) -> None:
    """Write one RISH-space model (float16-rounded weights) and its card to ``folder``."""
    _round_half(model)
    sharp = {"sharpness": True} if model.sharpness else {}
    card = cards.ModelCard(
        name=name, version="0.1", architecture=name, kwargs={"grid": grid, **sharp},
        acquisition=acquisition(ranges),
        normalisation={"input": "log A3 = 0.5 log(R3_l + tau_l) per order, mask, "
                                "log(sigma / s0)"
                                + (", measured sharpness (features.sharpness)" if sharp else "")
                                + "; standardised by the cond_mean/cond_std "
                                "buffers; output log(A7/A3) / target_std",
                       "tau_fraction": rishdiff.TAU_FRACTION},
        training={"data": data, "budget": report["budget"],
                  "cpu_seconds": round(report["seconds"], 1),
                  "final_loss": report["history"][-1]["loss"],
                  **({"spread_scale": report["spread_scale"],
                      "calibration": report["calibration"]}
                     if "spread_scale" in report else {}),
                  "weights_precision": "float16 (rounded after training)",
                  "limitations": "synthetic degradation, not real 3T/7T pairs"},
        extra={"samples": rishdiff.SAMPLES, "sample_steps": rishdiff.SAMPLE_STEPS})
    cards.save_checkpoint(model.half(), card, folder)
    model.float()


def _round_half(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())


# ----------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------
def _scores(lam: np.ndarray, s: Subject) -> dict:
    """NMSE/SSIM of the delivered RISH (lambda^2 R3) and of FA of the rebuilt DWIs."""
    rish = (lam ** 2) * s.f3.rish
    return ev.subject_metrics(rish, s.f7.rish, features.fa_of(s.f3, lam), s.f7.fa, s.mask)


def _oracle_lambda(s: Subject) -> np.ndarray:
    lam = np.exp(rishdiff.target(s.f3, s.f7, s.f3.mask)).transpose(1, 2, 3, 0)
    return lam.astype(np.float32)


def coverage(fit: rishdiff.RishFit, s: Subject, fa_samples: np.ndarray | None = None) -> list:
    """(map, nominal, coverage) of the sample intervals against the truth in the mask."""
    rows = []
    m = s.mask
    for nominal in NOMINALS:
        lo, hi = fit.interval(nominal)
        for k, name in enumerate(ev.MAPS[:3]):
            t = s.f7.rish[..., k][m]
            inside = (t >= lo[..., k][m]) & (t <= hi[..., k][m])
            rows.append((name, nominal, float(np.mean(inside))))
        if fa_samples is not None:
            q = np.quantile(fa_samples[:, m], [0.5 - nominal / 2, 0.5 + nominal / 2], axis=0)
            t = s.f7.fa[m]
            rows.append(("FA", nominal, float(np.mean((t >= q[0]) & (t <= q[1])))))
    return rows


def fa_samples(fit: rishdiff.RishFit, s: Subject) -> np.ndarray:
    """(K, G, G, G) FA of the DWIs rebuilt from each calibrated sample of ``fit``
    (the FA intervals :func:`coverage` reads)."""
    return np.stack([features.fa_of(s.f3, v) for v in np.exp(fit.calibrated())])


def spread_error_spearman(fit: rishdiff.RishFit, s: Subject, spread=None) -> dict:
    """Per order: Spearman correlation of the predicted spread (``fit``'s, or
    ``spread``) with the actual |error| of ``fit``'s posterior-mean log
    lambda, over mask voxels."""
    m = s.mask
    err = np.abs(np.log(fit.lam) - np.log(_oracle_lambda(s)))
    sp = fit.spread if spread is None else spread
    return {name: float(spearmanr(sp[..., k][m], err[..., k][m])[0])
            for k, name in enumerate(ev.MAPS[:3])}


def _noise_proxy(s: Subject) -> np.ndarray:
    """Local-noise proxy of the uncertainty: ``sigma / s0`` per voxel (G, G, G)."""
    return s.sigma3 / np.maximum(s.f3.s0, 1e-6 * float(s.f3.s0.max()))


def fit_noise_proxy(cnn, subjects: list[Subject], level: float = rishdiff.CALIBRATION_LEVEL
                    ) -> np.ndarray:
    """Per order, the factor c making ``log lambda_cnn +- z c sigma/s0`` cover
    ``level`` of the true log scales on ``subjects`` (the proxy baseline's
    calibration, on the same validation pairs as the diffusion model's)."""
    ratios = [[] for _ in range(3)]
    for s in subjects:
        y = np.log(cnn.predict_lambda(s.f3, s.sigma3))
        err = np.abs(rishdiff.target(s.f3, s.f7, s.f3.mask).transpose(1, 2, 3, 0) - y)
        r = err / _noise_proxy(s)[..., None]
        for k in range(3):
            ratios[k].append(r[..., k][s.mask])
    return np.array([np.quantile(np.concatenate(r), level) for r in ratios]) / norm.ppf(
        0.5 + level / 2)


def proxy_coverage(cnn, c: np.ndarray, s: Subject) -> tuple[list, dict]:
    """Coverage rows and Spearman(proxy, |error|) of the noise-proxy intervals
    around the equally-fed CNN's prediction."""
    y = np.log(cnn.predict_lambda(s.f3, s.sigma3))
    sd = _noise_proxy(s)[..., None] * c
    m = s.mask
    rows = []
    for nominal in NOMINALS:
        z = norm.ppf(0.5 + nominal / 2)
        # exponents clipped: outside the mask s0 ~ 0 makes the proxy huge
        lo = np.exp(np.clip(2 * (y - z * sd), -50, 50)) * s.f3.rish
        hi = np.exp(np.clip(2 * (y + z * sd), -50, 50)) * s.f3.rish
        for k, name in enumerate(ev.MAPS[:3]):
            t = s.f7.rish[..., k][m]
            inside = (t >= lo[..., k][m]) & (t <= hi[..., k][m])
            rows.append((name, nominal, float(np.mean(inside))))
    err = np.abs(y - np.log(_oracle_lambda(s)))
    rho = {name: float(spearmanr(sd[..., k][m], err[..., k][m])[0])
           for k, name in enumerate(ev.MAPS[:3])}
    return rows, rho


def member_folders(cnn_ckpt=SHIPPED_CNN, ensemble_dir=SHIPPED_ENSEMBLE) -> list[Path]:
    """The CNN ensemble's checkpoint folders: ``cnn_ckpt``, then ``seed-*`` by
    seed; only the ``seed-*`` folders when they include ``seed-0`` (an
    ensemble kept apart from the ``cnn`` baseline's checkpoint)."""
    extra = sorted(Path(ensemble_dir).glob(f"{MEMBER_PREFIX}*"),
                   key=lambda p: int(p.name[len(MEMBER_PREFIX):]))
    own = any(p.name == f"{MEMBER_PREFIX}0" for p in extra)
    return extra if own else [Path(cnn_ckpt)] + extra


#: Shared with the OOD study and the inference guard (one definition).
disagreement, load_members = rishdiff.disagreement, rishdiff.load_members


def disagreement_range(folders, validation: list[Subject], root=SHIPPED) -> dict:
    """The disagreement range entry of the ensemble in ``folders`` measured on
    ``validation`` pairs (:func:`rishdiff.disagreement_range`); members are
    named relative to ``root`` (the folder holding the card's checkpoint)."""
    members = load_members(folders)
    fits = [(rishdiff.ensemble_fit(members, v.f3, v.sigma3), v.f7) for v in validation]
    seeds = [v.seed for v in validation]
    return rishdiff.disagreement_range(
        fits, rishdiff.member_records(folders, root),
        f"{len(seeds)} train-family validation pairs (seeds {min(seeds)}-{max(seeds)}, "
        f"grid {validation[0].f3.rish.shape[0]})")


def ensemble_range(dcard: cards.ModelCard, folders, validation: list[Subject]) -> dict:
    """The ensemble's disagreement range: the card's (as the inference step
    uses it) when it was measured with these members, else measured on the
    ``validation`` pairs by the same function."""
    entry = dcard.acquisition.ranges.get(rishdiff.DISAGREEMENT)
    shas = [cards.load_card(f).weights_sha256 for f in folders]
    if entry is not None and [m["weights_sha256"] for m in entry["members"]] == shas:
        return entry
    return disagreement_range(folders, validation)


#: The diffusion model fed its inputs clipped into its card's ranges
#: (``evaluate --clipped``; the ``shipped`` rows keep the measured inputs).
SHIPPED_CLIPPED = "shipped_clipped"


def widening_scale(diff, k: int, steps: int, members: list, ens_scale, val: list[Subject]
                   ) -> np.ndarray:
    """Per order, the factor making the ensemble-widened intervals
    (:func:`rishdiff.widened`) cover exactly 90 % on the train-family
    ``val`` pairs (the diffusion model's calibration pairs and seeds)."""
    fits = [(rishdiff.widened(diff.fit_subject(v.f3, v.sigma3, k, steps, seed=v.seed),
                              rishdiff.ensemble_fit(members, v.f3, v.sigma3, ens_scale)), v.f7)
            for v in val]
    return rishdiff.spread_scale_for(fits)


def evaluate(seeds, out, diffusion_ckpt=SHIPPED_DIFFUSION, cnn_ckpt=SHIPPED_CNN,
             ldm_ckpt=SHIPPED_LDM, samples: int | None = None, grid: int = 32,
             template_pairs: int = TEMPLATE_PAIRS, family: str = REPORT_FAMILY,
             validation_pairs: int = VALIDATION_PAIRS, ensemble_dir=SHIPPED_ENSEMBLE,
             faithful_ckpt=SHIPPED_FAITHFUL, clipped: bool = False, log=print) -> dict:
    """Score every method on held-out pairs at ``seeds`` (``family``: the test
    degradation family by default; "train" for the in-distribution check);
    write the TSVs. ``validation_pairs``: train-family pairs that calibrate the
    noise-proxy baseline and the ensemble (the diffusion model's spread scale
    is in its card). ``ensemble_dir``: the CNN ensemble's extra members
    (:func:`member_folders`: its ``seed-*`` folders, ``cnn_ckpt`` first when
    there is no ``seed-0``; None or no
    member there: no ensemble rows). ``ldm_ckpt`` / ``faithful_ckpt``: the
    latent models (None: no rows). ``clipped``: also the :data:`SHIPPED_CLIPPED`
    rows (a second posterior per subject, fed :func:`model_view` of the
    diffusion card's ranges), so a recipe's draws can be compared clipped and
    not on the same subjects."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    diff, dcard = cards.load_checkpoint(diffusion_ckpt, device="cpu")
    cnn, cnn_card = cards.load_checkpoint(cnn_ckpt, device="cpu")
    ldm, faithful = (cards.load_checkpoint(c, device="cpu")[0] if c else None
                     for c in (ldm_ckpt, faithful_ckpt))
    for m in (diff, cnn, ldm, faithful):
        if m is not None:
            m.float()
    k, steps = rishdiff.sampling(dcard, samples)
    test = simulate_pairs(seeds, family, grid)
    tmpl = simulate_pairs(SEED_TRAIN + np.arange(template_pairs), "train", grid)
    template = baselines.TemplateLambda().fit([(s.f3, s.f7) for s in tmpl])
    val = simulate_pairs(SEED_VALIDATION + np.arange(validation_pairs), "train", grid)
    proxy_scale = fit_noise_proxy(cnn, val)
    folders = member_folders(cnn_ckpt, ensemble_dir) if ensemble_dir else []
    members = load_members(folders) if len(folders) > 1 else []
    acq = dcard.acquisition
    if members:
        acq = dataclasses.replace(acq, ranges={**acq.ranges, rishdiff.DISAGREEMENT:
                                               ensemble_range(dcard, folders, val)})
        ens_scale = acq.ranges[rishdiff.DISAGREEMENT]["spread_scale"]
        widen = widening_scale(diff, k, steps, members, ens_scale, val)
        e = acq.ranges[rishdiff.DISAGREEMENT]
        log(f"ensemble of {len(members)}: spread scale {ens_scale}, disagreement range "
            f"0-{e['max']} (validation {e['trained']}), widening {np.round(widen, 4).tolist()}")
    log(f"simulated {len(test)} held-out + {template_pairs} template pairs, fitted the "
        f"template in {time.perf_counter() - t0:.0f} s")
    rows, cal, spear, flags = [], [], [], []
    for i, s in enumerate(test):
        ts = time.perf_counter()
        values = card_values(s)
        if members:
            efit = rishdiff.ensemble_fit(members, s.f3, s.sigma3, ens_scale)
            d = values[rishdiff.DISAGREEMENT] = disagreement(efit)
        problems = cards.range_problems(acq, values)
        msgs = problems["flag"] + problems["refuse"]
        flags.append({"subject": s.seed, "snr": round(s.snr3, 2),
                      **({"ensemble_disagreement": round(d, 4)} if members else {}),
                      "flags": "; ".join(msgs)})
        fit = diff.fit_subject(s.f3, s.sigma3, samples=k, steps=steps, seed=s.seed)
        fed = model_view(s, cnn_card.acquisition.ranges)
        lams = {"shipped": fit.lam, "shipped_sample": fit.lam_sample(0),
                "identity": np.ones_like(s.f3.rish), "template_lambda": template.scales(s.f3),
                "cnn": cnn.predict_lambda(s.f3, s.sigma3),
                "cnn_clipped": cnn.predict_lambda(fed.f3, fed.sigma3), "oracle": _oracle_lambda(s)}
        if clipped:
            dfed = model_view(s, dcard.acquisition.ranges)
            cfit = diff.fit_subject(dfed.f3, dfed.sigma3, samples=k, steps=steps, seed=s.seed)
            lams[SHIPPED_CLIPPED] = cfit.lam
        if members:
            lams["cnn_ensemble"] = efit.lam
        if ldm is not None:
            pred = ldm.predict(s.f3.rish, s.f3.mask, seed=s.seed)
            lams["ldm_paired_concatenation"] = baselines.delivered_rish(
                s.f3.rish, pred, s.f3.mask, s.f3.affine)[0]
        if faithful is not None:
            fl = faithful.lambdas(s.f3.rish, s.f3.mask, s.f3.affine)
            lams["ldm_faithful"], lams["ldm_faithful_rescaled"] = fl["replaced"], fl["rescaled"]
        for name, lam in lams.items():
            for map_, v in _scores(lam, s).items():
                rows.append({"subject": s.seed, "method": name, "metric": map_, "value": v})
        cal += [{"subject": s.seed, "method": "shipped", "map": mp, "nominal": nom,
                 "coverage": c} for mp, nom, c in coverage(fit, s, fa_samples(fit, s))]
        spear.append({"subject": s.seed, "method": "shipped", **spread_error_spearman(fit, s)})
        if clipped:
            cal += [{"subject": s.seed, "method": SHIPPED_CLIPPED, "map": mp, "nominal": nom,
                     "coverage": c} for mp, nom, c in coverage(cfit, s, fa_samples(cfit, s))]
            spear.append({"subject": s.seed, "method": SHIPPED_CLIPPED,
                          **spread_error_spearman(cfit, s)})
        prow, prho = proxy_coverage(cnn, proxy_scale, s)
        cal += [{"subject": s.seed, "method": "cnn_noise_proxy", "map": mp, "nominal": nom,
                 "coverage": c} for mp, nom, c in prow]
        spear.append({"subject": s.seed, "method": "cnn_noise_proxy", **prho})
        if members:
            wfit = rishdiff.widened(fit, efit, widen)
            cal += [{"subject": s.seed, "method": "shipped_widened", "map": mp, "nominal": nom,
                     "coverage": c} for mp, nom, c in coverage(wfit, s, fa_samples(wfit, s))]
            spear.append({"subject": s.seed, "method": "shipped_widened",
                          **spread_error_spearman(fit, s, wfit.spread)})
            cal += [{"subject": s.seed, "method": "cnn_ensemble", "map": mp, "nominal": nom,
                     "coverage": c} for mp, nom, c in coverage(efit, s)]
            spear.append({"subject": s.seed, "method": "cnn_ensemble",
                          **spread_error_spearman(efit, s)})
        log(f"subject {s.seed} (SNR {s.snr3:.1f}) in {time.perf_counter() - ts:.0f} s")
    per = pd.DataFrame(rows)
    per[["score", "map"]] = per["metric"].str.split("_", n=1, expand=True).to_numpy()
    wide = per.pivot_table(index=["subject", "method", "map"], columns="score",
                           values="value").reset_index()
    ident = wide[wide.method == "identity"].set_index(["subject", "map"])["nmse"]
    wide["skill"] = 1 - wide["nmse"] / ident.reindex(
        list(zip(wide.subject, wide["map"]))).to_numpy()
    order = {m: i for i, m in enumerate(lams)}
    metrics = (wide.groupby(["method", "map"], sort=False)[["nmse", "ssim", "skill"]]
               .agg(["mean", "std"]))
    metrics.columns = [a if b == "mean" else f"{a}_sd" for a, b in metrics.columns]
    metrics = metrics.reset_index()
    metrics["n_subjects"] = len(test)
    metrics = metrics[["method", "map", "nmse", "ssim", "skill", "nmse_sd", "ssim_sd",
                       "skill_sd", "n_subjects"]]
    metrics = metrics.sort_values(["method", "map"], key=lambda c: c.map(
        order if c.name == "method" else {m: i for i, m in enumerate(ev.MAPS)}))
    calib = pd.DataFrame(cal).groupby(["method", "map", "nominal"], sort=False)["coverage"] \
        .mean().reset_index()
    tests = []
    ship = wide[wide.method == "shipped"].set_index(["subject", "map"])
    for other in lams:
        if other in ("shipped", "oracle"):
            continue
        o = wide[wide.method == other].set_index(["subject", "map"])
        for mp in ev.MAPS:
            a = ship.xs(mp, level="map")["nmse"]
            b = o.xs(mp, level="map")["nmse"].reindex(a.index)
            d = (a - b).to_numpy()
            p = float(wilcoxon(a, b).pvalue) if len(d) >= 5 and np.any(d != 0) else float("nan")
            tests.append({"shipped_vs": other, "map": mp, "wins": int(np.sum(d < 0)),
                          "subjects": len(d), "mean_nmse_difference": float(d.mean()),
                          "wilcoxon_p": p})
    sp = pd.DataFrame(spear)
    for table, name in ((metrics, "metrics"), (calib, "calibration"), (wide, "subjects"),
                        (pd.DataFrame(tests), "paired_tests"), (sp, "spread_error_spearman"),
                        (pd.DataFrame(flags), "flags")):
        io.write_text(table.to_csv(sep="\t", index=False, float_format="%.6g"),
                      out / f"{name}.tsv")
    seconds = time.perf_counter() - t0
    log(f"evaluated {len(test)} subjects in {seconds:.0f} s")
    return {"metrics": metrics, "calibration": calib, "tests": pd.DataFrame(tests),
            "spearman": sp, "flags": pd.DataFrame(flags), "seconds": seconds}


def seed_span(seeds) -> str:
    """``seeds A-B`` for a contiguous run, else the seeds listed."""
    seeds = sorted(int(s) for s in seeds)
    return (f"seeds {seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1))
            else "seeds " + ", ".join(map(str, seeds)))


def recalibrate(folder, seeds=None, family: str = CALIBRATION_FAMILY, log=print) -> np.ndarray:
    """Refit the spread scale of the diffusion checkpoint in ``folder`` on
    ``family`` pairs at ``seeds`` (:func:`rishdiff.calibrate`, with the K and
    steps the card applies, on the card's grid) and write it: the model's
    ``spread_scale`` buffer (float16, so the weights file and its sha256
    change, nothing else in it) and the card's ``training`` entries
    ``spread_scale``, ``calibration``, ``calibration_family`` and
    ``calibration_seeds``. The report family is refused: it must not choose
    anything. Returns the scale."""
    if family == REPORT_FAMILY:
        raise ValueError(f"the {REPORT_FAMILY!r} family is the held-out report; calibrate on "
                         f"another ({', '.join(f for f in degrade.FAMILIES if f != family)})")
    seeds = [int(s) for s in (SEED_CALIBRATION + np.arange(CALIBRATION_PAIRS)
                              if seeds is None else seeds)]
    model, card = cards.load_checkpoint(folder, device="cpu")
    model.float()
    k, steps = rishdiff.sampling(card)
    t0 = time.perf_counter()
    subs = simulate_pairs(seeds, family, int(card.kwargs["grid"]))
    scale = rishdiff.calibrate(model, [(s.f3, s.f7, s.sigma3, s.seed) for s in subs], k, steps)
    card.training.update(
        spread_scale=scale.tolist(), calibration_family=family, calibration_seeds=seeds,
        calibration=(f"{len(seeds)} {family}-family pairs ({seed_span(seeds)}), "
                     f"{rishdiff.CALIBRATION_LEVEL:.0%} level, K {k}, {steps} steps, "
                     f"{time.perf_counter() - t0:.0f} s"))
    cards.save_checkpoint(model.half(), card, folder)
    log(f"spread scale {np.round(scale, 3).tolist()} ({card.training['calibration']})")
    return scale


def evaluate_checkpoints(checkpoints, out, seeds, family: str = REPORT_FAMILY,
                         record: bool = False, latent: bool = True, clipped: bool = False,
                         log=print) -> dict:
    """:func:`evaluate` on the RISH-space checkpoints in the folder
    ``checkpoints`` (its CNN ensemble when there; ``latent``: the shipped
    latent models' rows too; ``clipped``: the :data:`SHIPPED_CLIPPED` rows too);
    ``record``: the rows written into both cards (:func:`record_metrics`)."""
    c = Path(checkpoints)
    folders = [c / SHIPPED_DIFFUSION.name, c / SHIPPED_CNN.name]
    ldm, faithful = (p if latent and p.exists() else None
                     for p in (SHIPPED_LDM, SHIPPED_FAITHFUL))
    r = evaluate(seeds, out, *folders, ldm, family=family,
                 ensemble_dir=c / SHIPPED_ENSEMBLE.name, faithful_ckpt=faithful,
                 clipped=clipped, log=log)
    if record:
        record_metrics(folders, r, seeds, family)
    return r


#: Digits the cards' metrics rows keep.
CARD_DIGITS = 4


def card_rows(metrics: pd.DataFrame, calib: pd.DataFrame, split: str) -> list[dict]:
    """A card's ``metrics`` table from evaluate's tables: every method's mean
    NMSE/SSIM/skill per map, then the shipped model's interval coverage."""
    rows = [{"split": split, "method": r.method, "map": r.map,
             **{c: round(float(getattr(r, c)), CARD_DIGITS) for c in ("nmse", "ssim", "skill")}}
            for r in metrics.itertuples()]
    rows += [{"split": split, "method": r.method, "map": r.map, "nominal": float(r.nominal),
              "coverage": round(float(r.coverage), CARD_DIGITS)}
             for r in calib[calib.method == "shipped"].itertuples()]
    return rows


def heldout_split(seeds, family: str = REPORT_FAMILY) -> str:
    """The ``split`` a card's rows carry: how many subjects, which family and seeds."""
    return f"held-out ({len(seeds)}, {family} degradation family, {seed_span(seeds)})"


def record_metrics(folders, result: dict, seeds, family: str = REPORT_FAMILY) -> list[dict]:
    """Write evaluate's ``result`` (on ``seeds``) into the cards of the
    checkpoint ``folders`` as their ``metrics`` table (weights unchanged);
    returns the rows."""
    rows = card_rows(result["metrics"], result["calibration"], heldout_split(seeds, family))
    for folder in folders:
        card = cards.load_card(folder)
        card.metrics = rows
        cards.write_card(card, folder)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("out")
    t.add_argument("--pairs", type=int, default=16)
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--cnn-steps", type=int, default=None)
    t.add_argument("--sharpness", action="store_true",
                   help="add the measured-sharpness condition channel to both models")
    t.add_argument("--resolution", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="widen the training pairs' resolution factor onto LO-HI "
                        "(same PSF types and polynomial bias)")
    t.add_argument("--family", default="train", choices=TRAINING_FAMILIES,
                   help="degradation family of the training and validation pairs "
                        "(train-mixed: Gaussian or apodised k-space PSF per pair)")
    t.add_argument("--heldout", type=int, default=12, metavar="N",
                   help="score the new checkpoints on N held-out test-family seeds from "
                        f"{SEED_HELDOUT} and record the rows on their cards (0: none)")
    e = sub.add_parser("evaluate")
    e.add_argument("out")
    e.add_argument("--seeds", type=int, nargs="+",
                   default=list(SEED_HELDOUT + np.arange(12)))
    e.add_argument("--checkpoints", default=str(SHIPPED))
    e.add_argument("--family", default=REPORT_FAMILY, choices=sorted(degrade.FAMILIES))
    e.add_argument("--record", action="store_true",
                   help="write the rows into the evaluated checkpoints' cards")
    e.add_argument("--no-latent", action="store_true",
                   help="without the latent models' rows (they do not depend on the "
                        "RISH-space checkpoints)")
    e.add_argument("--clipped", action="store_true",
                   help=f"also score the diffusion model fed its sharpness and SNR clipped "
                        f"into its card's ranges ({SHIPPED_CLIPPED!r} rows)")
    c = sub.add_parser("calibrate", help="refit the diffusion checkpoint's spread scale on "
                                         "pairs of a non-report family and record it on its card")
    c.add_argument("checkpoint", help="a rish-diffusion-3t7t checkpoint folder (rewritten; "
                                      "no default, so the shipped one is never changed by "
                                      "accident)")
    c.add_argument("--family", default=CALIBRATION_FAMILY,
                   choices=sorted(f for f in degrade.FAMILIES if f != REPORT_FAMILY))
    c.add_argument("--seeds", type=int, nargs="+",
                   default=list(SEED_CALIBRATION + np.arange(CALIBRATION_PAIRS)))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.cmd == "calibrate":
        recalibrate(a.checkpoint, a.seeds, a.family)
    elif a.cmd == "train":
        train_shipped(a.out, a.pairs, a.steps, a.cnn_steps, sharpness=a.sharpness,
                      resolution=a.resolution, family=a.family)
        if a.heldout:
            seeds = list(SEED_HELDOUT + np.arange(a.heldout))
            evaluate_checkpoints(a.out, Path(a.out) / "heldout", seeds, record=True,
                                 latent=False)
    else:
        r = evaluate_checkpoints(a.checkpoints, a.out, a.seeds, a.family, a.record,
                                 latent=not a.no_latent, clipped=a.clipped)
        print(r["metrics"].to_string())
        print(r["calibration"].to_string())
        print(r["tests"].to_string())
        print(r["spearman"].groupby("method").mean(numeric_only=True).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
