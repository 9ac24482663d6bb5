"""A 5-CNN ensemble: the uncertainty baseline of the RISH-space 3T->7T model.

Issue 15 item 5 asks whether the diffusion model's sample spread beats a deep
ensemble. The ensemble is the equally-fed CNN (:class:`rishdiff.RishResidualCNN`)
trained :data:`MEMBERS` times on the same pairs with the same budget, differing
only in the seed (initial weights, patch draws): all five are cached as
``checkpoints/rish_cnn_ensemble_3t7t/seed-<s>`` (each an ordinary checkpoint
folder, float16 weights, ~118 KB). Every member is fed as the shipped ``cnn``
baseline it stands beside (the recipe :data:`PAIRS`, :data:`STEPS`,
:data:`SHARPNESS`, :data:`RESOLUTION`): seed 0 is that CNN
(``rish_cnn_3t7t``, trained by ``ldm_study train`` with seed 0), seeds 1-4
are trained here. Until 2026-12-05 the members were the five-channel CNNs
of the first recipe (no sharpness input, unwidened blur widths).

Scoring (:func:`rishdiff.ensemble_fit`, ``ldm_study.evaluate``): per subject
the members' log scales form a :class:`rishdiff.RishFit` (K = 5 "samples"),
so the ensemble gets exactly the shipped model's treatment: posterior mean
``sqrt(mean_k lambda_k^2)``, spread = member SD, Gaussian intervals
``mu +- t_{K-1} sqrt(1 + 1/K) c SD`` with the per-order factor ``c`` fitted
on the same train-family validation pairs (:func:`rishdiff.spread_scale_for`).

The ensemble's disagreement is the 3T->7T models' out-of-distribution score:
:func:`record_range` measures it on the validation pairs the calibration
used and stores the flag threshold in the shipped diffusion model's card
(``acquisition.ranges["ensemble_disagreement"]``), which ``dmriflow evaluate
3t7t`` and ``dmriflow run --inference 3t7t`` read.

``python -m dmriflow.models.experiments.ldm_ensemble OUT [--pairs 24]
[--steps 2000] [--seeds 1 2 3 4]`` trains the members;
``python -m dmriflow.models.experiments.ldm_ensemble CHECKPOINTS --record-range``
records the range of the members in CHECKPOINTS into its ``rish_3t7t`` card.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from dmriflow.models import card as cards
from dmriflow.models.experiments import ldm_study as study
from dmriflow.models.ldm import rishdiff

#: Members of the ensemble; seeds 1..MEMBERS-1 are trained here (seed 0: the shipped CNN).
MEMBERS = 5
EXTRA_SEEDS = tuple(range(1, MEMBERS))
#: The shipped CNN's recipe (its card: 24 pairs, 2000 steps, the measured-sharpness
#: channel, blur widths widened onto 1.0-1.8x; ``ldm_study train --pairs 24 --steps
#: 2000 --sharpness --resolution 1.0 1.8``), reused for every member so the
#: ensemble is fed as the model it is compared with.
PAIRS, STEPS = 24, 2000
SHARPNESS, RESOLUTION = True, (1.0, 1.8)


def train_members(out, seeds=EXTRA_SEEDS, n_pairs: int = PAIRS, steps: int = STEPS,
                  grid: int = 32, sharpness: bool = SHARPNESS, resolution=RESOLUTION,
                  log=print) -> list[dict]:
    """Train one equally-fed CNN per seed on the shipped CNN's pairs, inputs and
    budget (``sharpness``, ``resolution``: as :func:`study.train_shipped`);
    write ``out/seed-<s>`` checkpoints."""
    out = Path(out)
    t0 = time.perf_counter()
    subs = study.simulate_pairs(study.SEED_TRAIN + np.arange(n_pairs), "train", grid,
                                resolution)
    log(f"simulated {n_pairs} pairs in {time.perf_counter() - t0:.0f} s")
    pairs = [(s.f3, s.f7, s.sigma3) for s in subs]
    ranges = study.card_ranges(subs)
    data = study.training_data(n_pairs, grid, resolution)
    reports = []
    for seed in seeds:
        torch.manual_seed(seed)
        cnn = rishdiff.RishResidualCNN(grid=grid, sharpness=sharpness)
        rep = rishdiff.fit_cnn(cnn, pairs, rishdiff.RishBudget(steps=steps, seed=seed), log=log)
        study.save_rish_checkpoint(cnn, rep, "rish-cnn-3t7t", out / f"{study.MEMBER_PREFIX}{seed}",
                                   ranges, data, grid)
        log(f"member seed {seed}: {steps} steps in {rep['seconds']:.0f} s, "
            f"final loss {rep['history'][-1]['loss']:.4f}")
        reports.append(rep)
    return reports


def record_range(checkpoints=study.SHIPPED, grid: int = 32,
                 validation_pairs: int = study.VALIDATION_PAIRS, log=print) -> dict:
    """Measure the ensemble's disagreement range on the train-family
    validation pairs (the diffusion model's calibration seeds) and store it in
    ``checkpoints/rish_3t7t``'s card; weights unchanged. Returns the entry."""
    checkpoints = Path(checkpoints)
    folder = checkpoints / study.SHIPPED_DIFFUSION.name
    card = cards.load_card(folder)
    val = study.simulate_pairs(study.SEED_VALIDATION + np.arange(validation_pairs), "train",
                               grid)
    members = study.member_folders(checkpoints / study.SHIPPED_CNN.name,
                                   checkpoints / study.SHIPPED_ENSEMBLE.name)
    entry = study.disagreement_range(members, val, checkpoints)
    card.acquisition.ranges[rishdiff.DISAGREEMENT] = entry
    cards.write_card(card, folder)
    log(f"{rishdiff.DISAGREEMENT}: {entry['values']} on {entry['validation']}; "
        f"flagged above {entry['max']}")
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--pairs", type=int, default=PAIRS)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(EXTRA_SEEDS))
    ap.add_argument("--sharpness", action=argparse.BooleanOptionalAction, default=SHARPNESS,
                    help="the measured-sharpness condition channel (the shipped CNN has it)")
    ap.add_argument("--resolution", type=float, nargs=2, default=RESOLUTION,
                    metavar=("LO", "HI"), help="training blur widths widened onto LO-HI "
                                               "(the shipped CNN's 1.0 1.8)")
    ap.add_argument("--record-range", action="store_true",
                    help="train nothing: record the disagreement range of the ensemble in "
                         "OUT (a checkpoints folder) into OUT/rish_3t7t's card")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.record_range:
        record_range(a.out)
    else:
        train_members(a.out, a.seeds, a.pairs, a.steps, sharpness=a.sharpness,
                      resolution=tuple(a.resolution))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
