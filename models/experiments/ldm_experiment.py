"""The 3T->7T comparison on simulated pairs: train, evaluate, tabulate, ship.

``python -m dmriflow.models.experiments.ldm_experiment OUT [--grid 32] [--scale 1]``:

1. simulates 3T-only subjects (train family), paired training subjects
   (train family) and held-out paired subjects (the *test* degradation
   family, :mod:`dmriflow.models.degrade`), and their RISH/FA features on the
   ``grid^3`` cube (:mod:`dmriflow.models.ldm.features`);
2. trains the latent diffusion model (with and without 7T fine-tuning from
   the 3T autoencoder), the CNN baseline and fits the template-lambda
   baseline on the same training subjects;
3. evaluates every method on the held-out subjects (identity, template
   lambda, CNN, LDM variants incl. with/without SR, oracle lambda) with
   :mod:`.ldm_metrics`, writing ``results.json`` and ``table.md``;
4. saves the full model (fine-tuned, with SR) as a checkpoint folder
   (``OUT/checkpoint``: safetensors + model card, weights stored as float16)
   whose card carries the table.

Prints ``key=value`` lines with training throughput and inference time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dmriflow.interfaces import io
from dmriflow.interfaces.gradients import GradientTable
from dmriflow.models import card as cards
from dmriflow.models import degrade
from dmriflow.models.experiments import ldm_metrics
from dmriflow.models.ldm import baselines, diffusion, features, rishdiff
from dmriflow.models.ldm.model import Budget, LatentDiffusion3T7T, fit

#: Seed offsets of the three subject groups (disjoint anatomies).
SEED_3T_ONLY, SEED_PAIRED, SEED_TEST = 10_000, 20_000, 30_000
CHECKPOINT_NAME = "ldm-3t7t"
#: Diagnostic row: the 7T autoencoder (+ SR) applied to the TRUE 7T RISH - the
#: best any latent the denoiser could produce decodes to.
CEILING = "7T VQ-VAE + SR on the true 7T (LDM ceiling)"


def simulate_features(seeds, family: str, grid: int, sim_size: int, cache=None):
    """[(f3, f7, degradation)] for the given seeds (pairs simulated and featurised
    one at a time; kept as ``.npz`` under ``cache`` when given, and reused)."""
    out = []
    for s in seeds:
        path = None if cache is None else Path(cache) / f"pair-{family}-{int(s)}-g{grid}.npz"
        if path is not None and path.exists():
            out.append(_load_pair(path))
            continue
        p = degrade.simulate_pair(int(s), sim_size=sim_size, family=family)
        item = (features.shell_features(p.dwi3, p.gtab3, p.mask, p.affine, grid),
                features.shell_features(p.dwi7, p.gtab7, p.mask, p.affine, grid),
                p.degradation.describe())
        if path is not None:
            _save_pair(path, item)
        out.append(item)
    return out


_FIELDS = ("rish", "coeffs", "s0", "fa", "mask", "affine")


def _save_pair(path: Path, item) -> None:
    arrays = {}
    for tag, f in (("3", item[0]), ("7", item[1])):
        arrays.update({f"{k}{tag}": getattr(f, k) for k in _FIELDS})
        arrays[f"bvals{tag}"], arrays[f"bvecs{tag}"] = f.gtab.bvals, f.gtab.bvecs
    arrays["degradation"] = np.array(json.dumps(item[2]))
    path.parent.mkdir(parents=True, exist_ok=True)
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    io.atomic_write(path, write)


def _load_pair(path: Path):
    with np.load(path) as d:
        fs = [features.ShellFeatures(**{k: d[f"{k}{tag}"] for k in _FIELDS},
                                     gtab=GradientTable(d[f"bvals{tag}"], d[f"bvecs{tag}"]))
              for tag in ("3", "7")]
        return fs[0], fs[1], json.loads(str(d["degradation"]))


def acquisition_card(ranges: dict | None = None) -> cards.Acquisition:
    """b=1000 with >= 30 directions at 3 T; ``ranges``: the training ranges
    (:func:`rishdiff.training_ranges`; the cube voxel size is refused outside)."""
    return cards.Acquisition(shells=[features.SHELL_B],
                             min_directions={f"{features.SHELL_B:g}": 2 * 15},
                             voxel_size_mm=None, field_strength_t=degrade.FIELD_3T, min_b0=1,
                             ranges=ranges or {})


def to_half_and_back(model: torch.nn.Module) -> torch.nn.Module:
    """Round floating weights to float16 (the shipped precision) in place."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model


def run(out, grid: int = 32, n_3t_only: int = 16, n_pairs: int = 16, n_test: int = 6,
        budget: Budget | None = None, cnn_steps: int = 100, guidance: float = diffusion.GUIDANCE,
        ddim_steps: int = diffusion.DDIM_STEPS, ablation: bool = True, log=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = budget or Budget()
    sim_size = grid
    t0 = time.perf_counter()
    cache = out / "features"
    only3 = simulate_features(SEED_3T_ONLY + np.arange(n_3t_only), "train", grid, sim_size, cache)
    train = simulate_features(SEED_PAIRED + np.arange(n_pairs), "train", grid, sim_size, cache)
    test = simulate_features(SEED_TEST + np.arange(n_test), "test", grid, sim_size, cache)
    log(f"simulated_subjects={n_3t_only + n_pairs + n_test} seconds={time.perf_counter() - t0:.1f}")
    r3_only = [(f3.rish, f3.mask) for f3, _, _ in only3]
    pairs = [(f3.rish, f7.rish, f3.mask | f7.mask) for f3, f7, _ in train]

    variants = {}
    reports = {}
    for finetune in ((True, False) if ablation else (True,)):
        torch.manual_seed(budget.seed)
        m = LatentDiffusion3T7T(grid=grid)
        b = Budget(**{**budget.__dict__, "finetune": finetune})
        reports[f"finetune={finetune}"] = fit(m, r3_only, pairs, b, log=log,
                                              vq3_from=variants.get(True))
        variants[finetune] = m
    for m in variants.values():
        to_half_and_back(m)
    cnn, cnn_report = baselines.train_cnn(pairs, steps=cnn_steps, seed=budget.seed,
                                          threads=budget.threads)
    to_half_and_back(cnn)
    t1 = time.perf_counter()
    template = baselines.TemplateLambda().fit([(f3, f7) for f3, f7, _ in train])
    template_seconds = time.perf_counter() - t1

    methods = {"identity (no mapping)": [], "template lambda (classical RISH)": [],
               "3D CNN (RISH 3T->7T)": []}
    ldm_names = {(True, True): "LDM (fine-tune + SR)", (True, False): "LDM, fine-tune, no SR",
                 (False, True): "LDM, no fine-tune, SR", (False, False): "LDM, no fine-tune, no SR"}
    for k in ldm_names:
        if k[0] in variants:
            methods[ldm_names[k]] = []
    methods[CEILING] = []
    methods["oracle lambda (true 7T RISH)"] = []
    infer_seconds = []
    for i, (f3, f7, deg) in enumerate(test):
        mask = f3.mask & f7.mask
        preds = {"identity (no mapping)": baselines.identity(f3.rish),
                 "template lambda (classical RISH)": template.predict(f3),
                 "3D CNN (RISH 3T->7T)": cnn.predict(f3.rish, f3.mask),
                 "oracle lambda (true 7T RISH)": f7.rish}
        preds[CEILING] = variants[True].reconstruct_7t(f7.rish, f7.mask)
        for ft, model in variants.items():
            ts = time.perf_counter()
            preds[ldm_names[ft, True]], preds[ldm_names[ft, False]] = model.predict(
                f3.rish, f3.mask, guidance, ddim_steps, seed=i, use_sr=None)
            if ft:
                infer_seconds.append(time.perf_counter() - ts)
        for name, pred in preds.items():
            if name.startswith("identity"):
                lam, delivered = np.ones_like(f3.rish), f3.rish
            elif name.startswith("template"):
                lam = template.scales(f3)
                delivered = lam ** 2 * f3.rish
            else:
                lam, delivered = baselines.delivered_rish(f3.rish, pred, f3.mask, f3.affine)
            fa = features.fa_of(f3, lam)
            row = ldm_metrics.subject_metrics(delivered, f7.rish, fa, f7.fa, mask)
            methods[name].append({"subject": SEED_TEST + i, **row})
    summary = {k: ldm_metrics.summarise_metrics(v) for k, v in methods.items()}
    table = ldm_metrics.markdown_table(summary, n_test)
    io.write_text(table + "\n", out / "table.md")

    # throughput: samples per second of each stage (CPU, this machine, shared)
    rep = reports["finetune=True"]
    throughput = {}
    for stage, bs in (("vq3", budget.vq_batch), ("vq7", budget.vq_batch),
                      ("diffusion", budget.diffusion_batch), ("sr", budget.sr_batch)):
        throughput[stage] = rep[stage]["steps"] * bs / max(rep[stage]["seconds"], 1e-9)
    results = {"grid": grid, "n_3t_only": n_3t_only, "n_pairs": n_pairs, "n_test": n_test,
               "guidance": guidance, "ddim_steps": ddim_steps, "summary": summary,
               "per_subject": methods, "training": reports, "cnn": cnn_report,
               "template_fit_seconds": template_seconds,
               "train_samples_per_s": throughput,
               "inference_seconds_per_subject": float(np.mean(infer_seconds)),
               "test_degradations": [d for _, _, d in test], "definitions": ldm_metrics.DEFINITIONS}
    io.write_json(results, out / "results.json")

    model = variants[True]
    card = cards.ModelCard(
        name=CHECKPOINT_NAME, version="0.1", architecture="ldm-3t7t",
        kwargs={"grid": grid}, acquisition=acquisition_card(rishdiff.training_ranges(
            [rishdiff.cube_voxel_mm(f3.affine) for f3, _, _ in train])),
        normalisation={"input": "RISH orders 0/2/4 of the b0-normalised b=1000 shell (SH "
                                "lmax 4) on a grid^3 cube over the FOV; amplitudes "
                                "sqrt(R_l) / amp_scale_l (buffer)",
                       "amp_scale": model.amp_scale.tolist(),
                       "latent_scale": float(model.latent_scale)},
        training={"data": f"simulated pairs (dmriflow.models.degrade): {n_3t_only} 3T-only + "
                          f"{n_pairs} paired subjects, train degradation family; phantom "
                          f"7T at TE {degrade.TE_7T_MS} ms, 3T-like at TE {degrade.TE_3T_MS} ms",
                  "budget": budget.__dict__, "cpu_seconds": {
                      k: v["seconds"] for k, v in rep.items() if isinstance(v, dict)
                      and "seconds" in v},
                  "weights_precision": "float16 (rounded after training)",
                  "limitations": "synthetic degradation, not real 3T/7T pairs; tiny CPU "
                                 "budget; grid much smaller than the published 96^3"},
        metrics=[{"split": f"held-out ({n_test}, test degradation family)", "method": k,
                  **{m: round(v[0], 4) for m, v in s.items()}} for k, s in summary.items()],
        extra={"guidance": guidance, "ddim_steps": ddim_steps, "label": "7T",
               "field_strength_target_t": degrade.FIELD_7T})
    ckpt = out / "checkpoint"
    model.half()
    cards.save_checkpoint(model, card, ckpt)
    model.float()
    log(table)
    for stage, v in throughput.items():
        log(f"train_{stage}_samples_per_s={v:.2f}")
    log(f"inference_seconds_per_subject_grid{grid}={results['inference_seconds_per_subject']:.2f}")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--n-3t-only", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--test", type=int, default=6)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    ap.add_argument("--diffusion-steps", type=int, default=None,
                    help="denoiser steps (default: the scaled default)")
    ap.add_argument("--cnn-steps", type=int, default=None,
                    help="CNN baseline steps (default: the scaled default)")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    b = Budget(threads=a.threads)
    for k in ("vq3_steps", "vq7_steps", "diffusion_steps", "sr_steps"):
        setattr(b, k, max(1, int(getattr(b, k) * a.scale)))
    if a.diffusion_steps:
        b.diffusion_steps = a.diffusion_steps
    torch.set_num_threads(a.threads)
    run(a.out, a.grid, a.n_3t_only, a.pairs, a.test, b,
        cnn_steps=a.cnn_steps or max(1, int(100 * a.scale)), ablation=not a.no_ablation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
