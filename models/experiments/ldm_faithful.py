"""Train and ship the faithful latent DDPM (:mod:`dmriflow.models.ldm.faithful`).

``python -m dmriflow.models.experiments.ldm_faithful OUT [--vq-steps N]
[--diffusion-steps N]``: simulates the train-family pairs the other 3T->7T
models use (``ldm_study.SEED_TRAIN``, the 3T and 7T maps) and 3T-only
subjects (:data:`SEED_3T_ONLY`, their 3T maps only), trains the shared
VQ-VAE and the class-conditioned denoiser on all of them, reports the codes
each field's maps use (and, when the paired-concatenation checkpoint is
there, the codes its two autoencoders use on the same maps), and writes the
checkpoint ``OUT/ldm_faithful_3t7t`` (float16 weights + model card).
``dmriflow evaluate 3t7t`` scores it as the rows ``ldm_faithful``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from dmriflow.interfaces import io
from dmriflow.models import card as cards
from dmriflow.models import degrade
from dmriflow.models.experiments import ldm_study as study
from dmriflow.models.experiments.ldm_experiment import (acquisition_card, simulate_features,
                                                        to_half_and_back)
from dmriflow.models.ldm import faithful, rishdiff, vqvae
from dmriflow.models.ldm.model import rish_to_input

#: 3T-only subjects (train family, their 7T member unused): disjoint from the
#: training (40000-), validation (41000-) and held-out (50000-) seeds.
SEED_3T_ONLY = 43_000
CHECKPOINT_NAME = "ldm-faithful-3t7t"


def paired_model_code_usage(maps3, maps7, folder=study.SHIPPED_LDM) -> dict | None:
    """Codes the paired-concatenation model's 3T / 7T autoencoders use on these
    (rish, mask) maps (its own amplitude scale); None without its checkpoint."""
    if not Path(folder).exists():
        return None
    old, _ = cards.load_checkpoint(folder, device="cpu")
    old.float()
    return {tag: vqvae.code_usage(vq, torch.cat([rish_to_input(r, m, old.amp_scale)
                                                 for r, m in maps]))
            for tag, vq, maps in (("3T", old.vq3, maps3), ("7T", old.vq7, maps7))}


def train(out, n_pairs: int = 24, n_3t_only: int = 16, grid: int = 32,
          budget: faithful.FaithfulBudget | None = None, log=print) -> dict:
    out = Path(out)
    budget = budget or faithful.FaithfulBudget()
    t0 = time.perf_counter()
    cache = out / "features"
    pairs = simulate_features(study.SEED_TRAIN + np.arange(n_pairs), "train", grid, grid, cache)
    only3 = simulate_features(SEED_3T_ONLY + np.arange(n_3t_only), "train", grid, grid, cache)
    log(f"simulated {n_pairs} pairs + {n_3t_only} 3T-only in {time.perf_counter() - t0:.0f} s")
    maps3_only = [(f3.rish, f3.mask) for f3, _, _ in only3]
    paired = [(f3.rish, f7.rish, f3.mask | f7.mask) for f3, f7, _ in pairs]
    torch.manual_seed(budget.seed)
    model = faithful.FaithfulLatentDiffusion3T7T(grid=grid)
    report = faithful.fit(model, maps3_only, paired, budget, log=log)
    report["codes_used_paired_concatenation"] = paired_model_code_usage(
        maps3_only + [(r3, m) for r3, _, m in paired], [(r7, m) for _, r7, m in paired])
    log(f"paired-concatenation model on the same maps: "
        f"{report['codes_used_paired_concatenation']}")
    to_half_and_back(model)
    card = cards.ModelCard(
        name=CHECKPOINT_NAME, version="0.1", architecture=CHECKPOINT_NAME,
        kwargs={"grid": grid},
        acquisition=acquisition_card(rishdiff.training_ranges(
            [rishdiff.cube_voxel_mm(f3.affine) for f3, _, _ in pairs + only3])),
        normalisation={"input": "RISH orders 0/2/4 of the b0-normalised b=1000 shell (SH "
                                "lmax 4) on a grid^3 cube over the FOV; amplitudes "
                                "sqrt(R_l) / amp_scale_l (buffer); latents x latent_scale",
                       "amp_scale": model.amp_scale.tolist(),
                       "latent_scale": float(model.latent_scale)},
        training={"data": f"simulated (dmriflow.models.degrade), train degradation family, "
                          f"grid {grid}: {n_pairs} pairs (seeds {study.SEED_TRAIN}-"
                          f"{study.SEED_TRAIN + n_pairs - 1}; 3T and 7T maps) + {n_3t_only} "
                          f"3T-only (seeds {SEED_3T_ONLY}-{SEED_3T_ONLY + n_3t_only - 1})",
                  "budget": report["budget"],
                  "cpu_seconds": {k: round(v["seconds"], 1) for k, v in report.items()
                                  if isinstance(v, dict) and "seconds" in v},
                  "final_loss": {k: report[k]["history"][-1]["loss"]
                                 for k in ("vq", "diffusion")},
                  "codes_reset": report["vq"]["codes_reset"],
                  "codes_used": report["codes_used"],
                  "codes_used_paired_concatenation": report["codes_used_paired_concatenation"],
                  "weights_precision": "float16 (rounded after training)",
                  "limitations": "synthetic degradation, not real 3T/7T pairs; tiny CPU "
                                 "budget; grid much smaller than the published 96^3"},
        extra={"guidance": faithful.GUIDANCE, "ddim_steps": faithful.DDIM_STEPS,
               "translation": "DDIM inversion under the 3T label, DDIM under the 7T label",
               "field_strength_target_t": degrade.FIELD_7T})
    folder = out / "ldm_faithful_3t7t"
    cards.save_checkpoint(model.half(), card, folder)
    model.float()
    io.write_json({k: v for k, v in report.items()}, out / "faithful_report.json")
    log(f"checkpoint {folder.name}: {time.perf_counter() - t0:.0f} s in all")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--n-3t-only", type=int, default=16)
    ap.add_argument("--vq-steps", type=int, default=faithful.FaithfulBudget.vq_steps)
    ap.add_argument("--diffusion-steps", type=int,
                    default=faithful.FaithfulBudget.diffusion_steps)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    train(a.out, a.pairs, a.n_3t_only, budget=faithful.FaithfulBudget(
        vq_steps=a.vq_steps, diffusion_steps=a.diffusion_steps, threads=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
