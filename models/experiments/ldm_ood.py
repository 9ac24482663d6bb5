"""Out-of-distribution scores of the RISH-space 3T->7T model, and their AUROC
over graded shifts (issue 15 item 5).

Shifts, applied to train-family pairs (the training distribution; the
unshifted pairs go through the same code with factor 1):

* ``snr``: the 3T member's SNR times ``factor`` (< 1: noisier than trained);
* ``voxel``: the cube voxel edge times ``factor`` - the same field of view on
  a ``round(32 / factor)`` cube, i.e. a bigger head on the model's cube
  (anatomy in fewer voxels; the receptive field is in voxels);
* ``bvalue``: the 3T member simulated at ``b = 1000 factor`` but labelled
  b = 1000 (a gradient-calibration error or a mislabelled shell). A correctly
  labelled other b-value is refused by the card's shell check already; this
  shift is the one no header reveals;
* ``family``: the test degradation family (k-space truncation, bump bias) on
  other seeds - the shift the held-out tables are scored on.

Scores (higher = less familiar), each computed from what the card or the
model exposes:

* ``card_range``: how far the measured cube voxel, SNR and sharpness lie
  outside the card's ``acquisition.ranges`` - max over quantities of
  ``|log(value / nearest bound)|`` (for the sharpness, itself a logarithm,
  ``|value - nearest bound|``), 0 inside (ties at 0 count 1/2 in the AUROC);
* ``condition_shift``: RMS over the non-mask condition channels (log A3 per
  order, log sigma/s0, and the sharpness for a model that takes it) of their
  mask mean after the model's own
  standardisation (``cond_mean``/``cond_std`` over the training masks);
* ``predicted_spread``: mean calibrated sample SD of ``log lambda`` in the mask;
* ``ensemble_spread``: mean member SD of the CNN ensemble (when given).

AUROC per (shift, factor, score): the unshifted subjects against the shifted
ones, ``P(score_shifted > score_unshifted)`` with ties 1/2. The card's
decision (accepted / flagged / refused) is recorded per subject.

``python -m dmriflow.models.experiments.ldm_ood OUT [--seeds ...]`` writes
``ood_scores.tsv`` (per subject) and ``ood_auroc.tsv``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dmriflow.interfaces import io
from dmriflow.models import card as cards
from dmriflow.models import degrade
from dmriflow.models.experiments import ldm_study as study
from dmriflow.models.ldm import features, rishdiff

#: Train-family seeds of the OOD study (disjoint from training, validation,
#: template and held-out seeds).
SEED_OOD = 70_000
SUBJECTS = 5
#: Graded shift factors per shift (1 = the training distribution). Voxel:
#: cubes of 30, 26 and 24 (3.33 mm is inside the card's +-10 %, the others not).
GRADES = {"snr": (0.7, 0.5, 0.3), "voxel": (1.07, 1.23, 1.33), "bvalue": (1.1, 1.3, 1.6)}
#: Seeds of the test-family pairs of the ``family`` shift.
SEED_FAMILY = SEED_OOD + 500
SCORES = ("card_range", "condition_shift", "predicted_spread", "ensemble_spread")


def shifted_subject(seed: int, shift: str, factor: float, grid: int = 32) -> study.Subject:
    """A train-family pair of ``seed`` with one shift of size ``factor``
    (module docstring); factor 1 gives the unshifted pair of the same path."""
    if shift == "family":
        return study.simulate_pairs([seed], "test", grid)[0]
    if shift not in GRADES:
        raise ValueError(f"unknown shift {shift!r}; known: {sorted(GRADES)} and 'family'")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7037]))
    spec = degrade.sample_degradation("train", rng)
    labelled = degrade.single_shell_scheme(degrade.DIRS_3T, seed=3)
    scheme3, cube = labelled, grid
    if shift == "snr":
        spec = dataclasses.replace(spec, snr=spec.snr * factor)
    elif shift == "bvalue":
        scheme3 = degrade.single_shell_scheme(degrade.DIRS_3T, seed=3,
                                              bval=degrade.SHELL_B * factor)
    else:
        cube = int(round(grid / factor))
    p = degrade.simulate_pair(int(seed), sim_size=grid, degradation=spec, scheme3=scheme3)
    p = dataclasses.replace(p, gtab3=labelled)          # the header says b = 1000
    sigma = rishdiff.noise_sigma(p.dwi3, p.gtab3, p.mask)
    return study.Subject(int(seed),
                         features.shell_features(p.dwi3, p.gtab3, p.mask, p.affine, cube),
                         features.shell_features(p.dwi7, p.gtab7, p.mask, p.affine, cube),
                         sigma, rishdiff.snr_of(p.dwi3, p.gtab3, p.mask, sigma),
                         p.degradation.describe())


#: Card ranges whose quantity is already a logarithm (and may be negative):
#: their distance outside the range is the plain difference, not a log ratio.
LOG_QUANTITIES = (rishdiff.SHARPNESS,)


def range_score(acq: cards.Acquisition, values: dict) -> float:
    """Max over the card's ranges of the distance outside it in log units -
    ``|log(value / nearest bound)|``, or ``|value - nearest bound|`` for a
    quantity already in log units (:data:`LOG_QUANTITIES`); 0 inside."""
    out = 0.0
    for name, rng in (acq.ranges or {}).items():
        v = values.get(name)
        if v is None:
            continue
        lo, hi = float(rng.get("min", -math.inf)), float(rng.get("max", math.inf))
        if lo <= v <= hi:
            continue
        bound = lo if v < lo else hi
        out = max(out, abs(v - bound) if name in LOG_QUANTITIES else abs(math.log(v / bound)))
    return out


def condition_shift(model: rishdiff.RishDiffusion3T7T, s: study.Subject) -> float:
    """RMS of the mask means of the standardised condition channels (mask excluded)."""
    with torch.no_grad():
        z = model.condition(model.raw_condition(s.f3, s.sigma3))[0].cpu().numpy()
    m = z[rishdiff.N] > 0.5
    keep = [c for c in range(model.n_cond) if c != rishdiff.N]
    means = np.array([z[c][m].mean() for c in keep])
    return float(np.sqrt(np.mean(means ** 2)))


def scores(diff, dcard, members, ens_scale, s: study.Subject, samples: int, steps: int) -> dict:
    """Every OOD score of one subject, and the card's decision on it."""
    values = study.card_values(s)
    problems = cards.range_problems(dcard.acquisition, values)
    fit = diff.fit_subject(s.f3, s.sigma3, samples=samples, steps=steps, seed=s.seed)
    sharp = values[rishdiff.SHARPNESS]
    out = {"cube_voxel_mm": round(values["cube_voxel_mm"], 4), "snr": round(s.snr3, 3),
           "sharpness": None if sharp is None else round(sharp, 4),
           "card": "refused" if problems["refuse"] else
                   "flagged" if problems["flag"] else "accepted",
           "card_range": range_score(dcard.acquisition, values),
           "condition_shift": condition_shift(diff, s),
           "predicted_spread": study.disagreement(fit)}
    if members:
        out["ensemble_spread"] = study.disagreement(
            rishdiff.ensemble_fit(members, s.f3, s.sigma3, ens_scale))
    return out


def auroc(negatives, positives) -> float:
    """P(positive > negative) over all pairs, ties 1/2 (the Mann-Whitney AUC)."""
    n = np.asarray(negatives, dtype=np.float64)[:, None]
    p = np.asarray(positives, dtype=np.float64)[None, :]
    if n.size == 0 or p.size == 0:
        raise ValueError("AUROC needs at least one negative and one positive")
    return float(np.mean((p > n) + 0.5 * (p == n)))


def study_ood(out, seeds=None, grades=None, diffusion_ckpt=study.SHIPPED_DIFFUSION,
              cnn_ckpt=study.SHIPPED_CNN, ensemble_dir=study.SHIPPED_ENSEMBLE,
              grid: int = 32, samples: int | None = None, family_seeds=None,
              validation_pairs: int = study.VALIDATION_PAIRS, log=print) -> dict:
    """Score unshifted and shifted subjects; write ``ood_scores.tsv`` and
    ``ood_auroc.tsv`` to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seeds = list(SEED_OOD + np.arange(SUBJECTS)) if seeds is None else list(seeds)
    grades = GRADES if grades is None else grades
    family_seeds = (list(SEED_FAMILY + np.arange(len(seeds))) if family_seeds is None
                    else list(family_seeds))
    diff, dcard = cards.load_checkpoint(diffusion_ckpt, device="cpu")
    diff.float()
    k = int(samples or dcard.extra.get("samples", rishdiff.SAMPLES))
    steps = int(dcard.extra.get("sample_steps", rishdiff.SAMPLE_STEPS))
    folders = study.member_folders(cnn_ckpt, ensemble_dir) if ensemble_dir else []
    members = study.load_members(folders) if len(folders) > 1 else []
    ens_scale = None
    if members:
        val = study.simulate_pairs(study.SEED_VALIDATION + np.arange(validation_pairs),
                                   "train", grid)
        ens_scale = study.ensemble_range(dcard, folders, val)["spread_scale"]
    cases = [("none", 1.0, s) for s in seeds]
    cases += [(shift, float(f), s) for shift, fs in grades.items() for f in fs for s in seeds]
    cases += [("family", 1.0, s) for s in family_seeds]
    rows = []
    for shift, factor, seed in cases:
        sub = shifted_subject(int(seed), "snr" if shift == "none" else shift, factor, grid)
        rows.append({"shift": shift, "factor": factor, "subject": int(seed),
                     **scores(diff, dcard, members, ens_scale, sub, k, steps)})
    per = pd.DataFrame(rows)
    base = per[per["shift"] == "none"]
    names = [c for c in SCORES if c in per.columns]
    table = []
    for (shift, factor), g in per[per["shift"] != "none"].groupby(["shift", "factor"],
                                                                   sort=False):
        for name in names:
            table.append({"shift": shift, "factor": factor, "score": name,
                          "auroc": auroc(base[name], g[name]), "n_unshifted": len(base),
                          "n_shifted": len(g), "refused": int((g.card == "refused").sum()),
                          "flagged": int((g.card == "flagged").sum())})
    table = pd.DataFrame(table)
    for frame, name in ((per, "ood_scores"), (table, "ood_auroc")):
        io.write_text(frame.to_csv(sep="\t", index=False, float_format="%.6g"),
                      out / f"{name}.tsv")
    seconds = time.perf_counter() - t0
    log(f"OOD study: {len(per)} subjects in {seconds:.0f} s")
    return {"scores": per, "auroc": table, "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    r = study_ood(a.out, a.seeds)
    print(r["auroc"].pivot_table(index=["shift", "factor"], columns="score",
                                 values="auroc", sort=False).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
