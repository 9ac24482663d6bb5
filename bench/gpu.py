"""GPU check of the models (issue 15 item 8): smoke-train every training loop on
the device, training samples/s per stage at two grids, and DDIM time and peak
memory per subject at the largest grid, with bf16 autocast on CUDA. How to run
it on the lent GPU machine: bench/gpu.sh's header.

1. smoke: every training loop the package has (latent model: 3T/7T VQ-VAE,
   latent denoiser, SR; the faithful latent model: shared VQ-VAE,
   class-conditioned denoiser; the RISH CNN baseline; the dti6 MLP and patch CNN;
   direction synthesis; the RISH-space diffusion model and its equally-fed
   CNN) runs a few steps through its own entry point on ``--device``; the
   check fails unless the model ends on that device and the loss is finite.
   These loops use the package's ``train`` (bf16 autocast on CUDA).
2. throughput: samples/s of each stage (one optimizer step = forward,
   backward, AdamW) at each ``--grids`` size, after a warm-up step; batch
   sizes are the training budgets'. Stages: the paired latent model's
   VQ-VAE, denoiser and SR, its RISH CNN baseline, the faithful model's
   shared VQ-VAE (with its dead-code reset) and class-conditioned denoiser,
   the RISH diffusion model and its equally-fed CNN.
3. inference at the largest grid, seconds per subject and peak memory (CUDA:
   max allocated; CPU: the process's peak RSS), after a warm-up run of the
   fewest steps: the paired latent model's DDIM (20 steps, guidance: 40
   denoiser passes); the faithful model's translation as ``predict`` does it
   (encode, DDIM inversion of the 3T latent under the 3T label, 50 steps,
   then 50 DDIM steps under the 7T label with guidance, each a batched
   conditional + unconditional pass, then decode); the RISH diffusion
   model's 12 samples of 8 steps. Untrained weights: the time does not
   depend on their values.

Time budget (``--budget-s``, which gpu.sh sets to its hard limit less a
margin): after the smoke test, each timed unit (a stage at a grid, a model's
inference) gets an equal share of the time left; a unit whose warm-up shows
that its timed steps would not fit runs as many as fit (at least one, or the
fewest DDIM steps) and its row says ``scaled_from=`` the count asked for. The
total row counts the scaled rows.

Every result is a ``key=value`` line on stdout (the last: ``part=total``)
and, with ``--out DIR``, a row of ``DIR/gpu.tsv``. ``--tiny`` shrinks grids
and steps to a CPU dry run of the same code path (about a minute); without
CUDA, the default ``--device auto`` runs that dry run (so ``make bench``,
which runs every ``bench/*.py``, passes on a CPU machine).
Usage: ``bench/gpu.sh [--device cuda|cpu] [--tiny] [--budget-s S] [--out DIR]``
(gpu.sh passes ``--budget-s`` and ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dmriflow.models import train as training
from dmriflow.models.train import TrainConfig

#: Shipped training budgets' batch sizes (see each model's Budget; the faithful
#: model's come from its FaithfulBudget).
BATCH = 4
#: The fewest sampling steps a warm-up or a scaled inference runs (DDIM, RISH DDPM).
LEAST_DDIM_STEPS = 2
LEAST_RISH_STEPS = 1


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def autocast(dev: torch.device, bf16: bool):
    """bf16 autocast on CUDA (as ``train`` does); nothing elsewhere."""
    if bf16 and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Report:
    """Collects ``key=value`` rows, prints each at once and, with ``path``,
    rewrites them as a TSV after every row (rows survive gpu.sh's hard kill)."""

    def __init__(self, path: Path | None = None):
        self.rows = []
        self.path = path

    def __call__(self, **row):
        self.rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        if self.path is not None:
            self.write(self.path)

    def write(self, path: Path) -> None:
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        lines = ["\t".join(keys)] + ["\t".join(str(r.get(k, "")) for k in keys)
                                     for r in self.rows]
        path.write_text("\n".join(lines) + "\n")


class Budget:
    """Wall-clock budget of the timed units: each gets an equal share of the
    time left, so the run ends before gpu.sh's hard limit (no limit: ``None``)."""

    def __init__(self, seconds: float | None, units: int):
        self.end = None if seconds is None else time.perf_counter() + seconds
        self.units = units
        self.scaled = 0

    def share(self) -> float:
        """Seconds the next unit may take (inf without a limit); counts it off."""
        left = math.inf if self.end is None else max(0.0, self.end - time.perf_counter())
        share = left / max(1, self.units)
        self.units -= 1
        return share

    def steps(self, wanted: int, least: int, per_step: float, seconds: float) -> int:
        """Steps of ``per_step`` seconds that fit ``seconds`` (``wanted`` at most,
        ``least`` at least); a cut is counted."""
        n = wanted if per_step * wanted <= seconds else max(least, int(seconds // per_step))
        n = min(n, wanted)
        self.scaled += n < wanted
        return n


def _scaled(n: int, wanted: int) -> dict:
    """The row's note of a cut step count (nothing when none was cut)."""
    return {"scaled_from": wanted} if n < wanted else {}


# ----------------------------------------------------------------------------
# 1. smoke test of every training loop
# ----------------------------------------------------------------------------
def _check(name: str, model: torch.nn.Module, losses, dev: torch.device, report, t0) -> bool:
    on = training.model_device(model)
    finite = all(np.isfinite(v) for v in losses)
    ok = on.type == dev.type and finite
    report(part="smoke", loop=name, ok=ok, model_device=str(on),
           final_loss=f"{losses[-1]:.4g}" if losses else "nan",
           seconds=f"{time.perf_counter() - t0:.2f}")
    return ok


def _history_losses(history) -> list[float]:
    return [h["loss"] for h in history if "loss" in h]


def smoke(dev: torch.device, grid: int, steps: int, report) -> bool:
    """Each training loop for ``steps`` steps through its own entry point."""
    from dmriflow.models import data as md
    from dmriflow.models import directions as dm
    from dmriflow.models.experiments import dti6
    from dmriflow.models.ldm import baselines, faithful, features, rishdiff
    from dmriflow.models.ldm.model import Budget, LatentDiffusion3T7T, fit

    rng = np.random.default_rng(0)
    g = grid
    mask = np.zeros((g, g, g), bool)
    mask[g // 8:-g // 8, g // 8:-g // 8, g // 8:-g // 8] = True
    maps = [rng.uniform(0.1, 1.0, (g, g, g, 3)).astype(np.float32) for _ in range(4)]
    ok = True

    t0 = time.perf_counter()
    model = LatentDiffusion3T7T(grid=g)
    rep = fit(model, [(maps[0], mask)], [(maps[1], maps[2], mask), (maps[2], maps[3], mask)],
              Budget(vq3_steps=steps, vq7_steps=steps, diffusion_steps=steps, sr_steps=steps,
                     vq_batch=2, diffusion_batch=2, sr_batch=2))
    losses = [v for k in ("vq3", "vq7", "diffusion", "sr") if k in rep
              for v in _history_losses(rep[k]["history"])]
    ok &= _check("ldm (vq3, vq7, denoiser, sr)", model, losses, dev, report, t0)

    t0 = time.perf_counter()
    model = faithful.FaithfulLatentDiffusion3T7T(grid=g)
    rep = faithful.fit(model, [(maps[0], mask)], [(maps[1], maps[2], mask),
                                                  (maps[2], maps[3], mask)],
                       faithful.FaithfulBudget(vq_steps=steps, diffusion_steps=steps,
                                               vq_batch=2, diffusion_batch=2))
    losses = [v for k in ("vq", "diffusion") for v in _history_losses(rep[k]["history"])]
    ok &= _check("ldm faithful (shared vq, class-conditioned denoiser)", model, losses, dev,
                 report, t0)

    t0 = time.perf_counter()
    cnn, crep = baselines.train_cnn([(maps[0], maps[1], mask), (maps[2], maps[3], mask)],
                                    steps=steps, batch=2)
    ok &= _check("ldm rish cnn baseline", cnn, _history_losses(crep["history"]), dev, report, t0)

    shape = (12, 14, 12)
    cfg = TrainConfig(steps=steps, warmup=1, log_every=1, checkpoint_every=steps,
                      validate_every=steps)
    samples6 = [dti6.tensor_sample(s) for s in md.phantom_samples(1, seed=3, shape=shape)]
    for kind in ("mlp", "cnn"):
        t0 = time.perf_counter()
        m, res = dti6.train_model(kind, samples6, [], cfg)
        ok &= _check(f"dti6 {kind}", m, _history_losses(res.history), dev, report, t0)

    t0 = time.perf_counter()
    dsamples = md.phantom_samples(1, seed=4, shape=shape)
    m, res = dm.train_directions(dsamples, [], cfg, width=8, blocks=1)
    ok &= _check("direction synthesis", m, _history_losses(res.history), dev, report, t0)

    s0 = np.where(mask, 1000.0, 0).astype(np.float32)
    pairs = [(features.ShellFeatures(maps[i], None, s0, None, mask, np.eye(4), None),
              features.ShellFeatures(maps[i + 1], None, s0, None, mask, np.eye(4), None), 20.0)
             for i in range(2)]
    budget = rishdiff.RishBudget(steps=steps, batch=2, patch=min(16, g))
    for name, net, fn in (("rish diffusion", rishdiff.RishDiffusion3T7T(grid=g), rishdiff.fit),
                          ("rish equally-fed cnn", rishdiff.RishResidualCNN(grid=g),
                           rishdiff.fit_cnn)):
        t0 = time.perf_counter()
        r = fn(net, pairs, budget)
        ok &= _check(name, net, _history_losses(r["history"]), dev, report, t0)
    return ok


# ----------------------------------------------------------------------------
# 2. training throughput per stage
# ----------------------------------------------------------------------------
def time_steps(net, loss_fn, batch, steps: int, dev, bf16: bool,
               budget: Budget) -> tuple[float, int]:
    """(seconds per optimizer step, timed steps): one warm-up step, then
    ``steps`` or as many as fit the budget's share."""
    share = budget.share()
    net.to(dev).train()
    batch = training.to_device(batch, dev)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)

    def one():
        with autocast(dev, bf16):
            loss = loss_fn(net, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    t = time.perf_counter()
    one()
    sync(dev)
    warm = time.perf_counter() - t
    n = budget.steps(steps, 1, warm, share - warm)
    t = time.perf_counter()
    for _ in range(n):
        one()
    sync(dev)
    return (time.perf_counter() - t) / n, n


#: Timed stages per grid (the rows of :func:`throughput`).
THROUGHPUT_STAGES = 8


def throughput(dev, grid: int, steps: int, bf16: bool, report, budget: Budget) -> None:
    from dmriflow.models.ldm import diffusion, faithful, rishdiff, sr, vqvae
    from dmriflow.models.ldm.baselines import RishCNN
    from dmriflow.models.ldm.model import LatentDiffusion3T7T

    g, b = grid, BATCH
    model = LatentDiffusion3T7T(grid=g)
    fmodel = faithful.FaithfulLatentDiffusion3T7T(grid=g)
    fbudget = faithful.FaithfulBudget()
    lat = g // vqvae.DOWNSAMPLE
    sched = diffusion.train_scheduler()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(b, 3, g, g, g, generator=gen)
    z = torch.randn(b, vqvae.EMBEDDING_DIM, lat, lat, lat, generator=gen)
    m = torch.ones(b, 1, g, g, g)
    cond = torch.randn(b, rishdiff.N_COND, g, g, g, generator=gen)
    cond[:, rishdiff.N] = 1.0
    y0 = torch.randn(b, rishdiff.N, g, g, g, generator=gen)
    fb, zb = fbudget.vq_batch, fbudget.diffusion_batch
    fx = torch.rand(fb, 3, g, g, g, generator=gen)
    fz = torch.randn(zb, vqvae.EMBEDDING_DIM, lat, lat, lat, generator=gen)
    flabels = torch.arange(zb) % 2 + diffusion.LABEL_3T     # half 3T, half 7T latents
    reset = vqvae.DeadCodeReset(vqvae.NUM_EMBEDDINGS, fbudget.dead_after)
    stages = [
        ("ldm vqvae", model.vq3, vqvae.vqvae_loss, x),
        ("ldm denoiser", model.denoiser,
         lambda n, zz: diffusion.diffusion_loss(n, zz, zz, zz, sched), z),
        ("ldm sr", model.sr, lambda n, xx: sr.mse_loss(n, xx, xx), x),
        ("ldm rish cnn baseline", RishCNN(), lambda n, bb: sr.mse_loss(n, *bb), (x, x, m)),
        ("ldm faithful vqvae (shared, dead-code reset)", fmodel.vq,
         lambda n, xx: vqvae.vqvae_loss(n, xx, reset), fx),
        ("ldm faithful denoiser (class-conditioned)", fmodel.denoiser,
         lambda n, bb: faithful.class_diffusion_loss(n, bb[0], bb[1], sched, bb[2]),
         (fz, flabels, torch.Generator().manual_seed(2))),
        ("rish diffusion", rishdiff.RishDiffusion3T7T(grid=g), rishdiff.diffusion_loss,
         (cond, y0, torch.Generator().manual_seed(1))),
        ("rish equally-fed cnn", rishdiff.RishResidualCNN(grid=g), rishdiff.cnn_loss,
         (cond, y0)),
    ]
    assert len(stages) == THROUGHPUT_STAGES
    for name, net, loss, batch in stages:
        reset_peak(dev)
        bs = (batch[0] if isinstance(batch, tuple) else batch).shape[0]
        s, n = time_steps(net, loss, batch, steps, dev, bf16, budget)
        report(part="train", stage=name, grid=g, batch=bs, bf16=bf16 and dev.type == "cuda",
               timed_steps=n, s_per_step=f"{s:.4f}", samples_per_s=f"{bs / s:.2f}",
               peak_mb=f"{peak_mb(dev):.0f}", **_scaled(n, steps))
        net.to("cpu")
    del model, fmodel
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------
# 3. inference per subject at the largest grid
# ----------------------------------------------------------------------------
#: Timed inference units (the rows of :func:`inference`).
INFERENCE_MODELS = 3


def time_inference(run, steps: int, least: int, dev, budget: Budget) -> tuple[float, int]:
    """(seconds, steps) of ``run(steps)`` for one subject: a warm-up with
    ``least`` steps (same shapes, so the kernels are chosen and the per-step
    time is bounded), then ``steps`` or as many as fit the budget's share;
    the peak memory is reset before the timed run."""
    share = budget.share()
    sync(dev)
    t = time.perf_counter()
    run(least)
    sync(dev)
    warm = time.perf_counter() - t
    n = budget.steps(steps, least, warm / least, share - warm)
    reset_peak(dev)
    t = time.perf_counter()
    run(n)
    sync(dev)
    return time.perf_counter() - t, n


def inference(dev, grid: int, bf16: bool, report, budget: Budget, ddim_steps=None) -> None:
    """Per-subject sampling time and peak memory of the three generative models."""
    from dmriflow.models.ldm import diffusion, faithful, features, rishdiff
    from dmriflow.models.ldm.model import LatentDiffusion3T7T

    g = grid
    rng = np.random.default_rng(0)
    rish = rng.uniform(0.1, 1.0, (g, g, g, 3)).astype(np.float32)
    mask = np.ones((g, g, g), bool)
    on_cuda_bf16 = bf16 and dev.type == "cuda"

    steps = ddim_steps or diffusion.DDIM_STEPS
    model = LatentDiffusion3T7T(grid=g).to(dev).eval()

    def paired(n):
        with torch.no_grad(), autocast(dev, bf16):
            model.predict(rish, mask, steps=n)
    sec, n = time_inference(paired, steps, LEAST_DDIM_STEPS, dev, budget)
    report(part="inference", model="latent ddim", grid=g, ddim_steps=n,
           denoiser_passes=2 * n, bf16=on_cuda_bf16, seconds_per_subject=f"{sec:.3f}",
           peak_mb=f"{peak_mb(dev):.0f}", **_scaled(n, steps))
    model.to("cpu")

    steps = ddim_steps or faithful.DDIM_STEPS
    fmodel = faithful.FaithfulLatentDiffusion3T7T(grid=g).to(dev).eval()

    def translate(n):
        with torch.no_grad(), autocast(dev, bf16):
            fmodel.predict(rish, mask, guidance=faithful.GUIDANCE, steps=n)
    sec, n = time_inference(translate, steps, LEAST_DDIM_STEPS, dev, budget)
    report(part="inference", model="faithful ldm translation", grid=g, ddim_steps=n,
           inversion_passes=n - 1, guided_passes=n, guidance=faithful.GUIDANCE, bf16=on_cuda_bf16,
           seconds_per_subject=f"{sec:.3f}", peak_mb=f"{peak_mb(dev):.0f}",
           **_scaled(n, steps))
    fmodel.to("cpu")
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    diff = rishdiff.RishDiffusion3T7T(grid=g).to(dev).eval()
    f3 = features.ShellFeatures(rish, None, np.full((g, g, g), 1000.0, np.float32), None,
                                mask, np.eye(4), None)
    raw = rishdiff.raw_condition(f3, 20.0)
    k, steps = rishdiff.SAMPLES, rishdiff.SAMPLE_STEPS

    def rish_samples(n):
        with autocast(dev, bf16):
            diff.sample(raw, samples=k, steps=n)
    sec, n = time_inference(rish_samples, steps, LEAST_RISH_STEPS, dev, budget)
    report(part="inference", model="rish diffusion", grid=g, samples=k, steps=n,
           bf16=on_cuda_bf16, seconds_per_subject=f"{sec:.3f}",
           peak_mb=f"{peak_mb(dev):.0f}", **_scaled(n, steps))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                    help="auto: CUDA when present, else the CPU dry run (--tiny)")
    ap.add_argument("--tiny", action="store_true",
                    help="CPU dry run: grids 16 and 32, one timed step, 2 DDIM steps")
    ap.add_argument("--grids", type=int, nargs="+", default=[32, 96])
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per stage")
    ap.add_argument("--smoke-steps", type=int, default=3)
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds the whole run may take (timed steps are cut to fit; "
                         "default: no limit)")
    ap.add_argument("--out", default=None, help="folder for gpu.tsv (default: none)")
    a = ap.parse_args(argv)
    budget = Budget(a.budget_s, 0)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
        a.tiny = a.tiny or a.device == "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    grids = [16, 32] if a.tiny else sorted(a.grids)
    steps, smoke_steps = (1, 1) if a.tiny else (a.steps, a.smoke_steps)
    budget.units = THROUGHPUT_STAGES * len(grids) + INFERENCE_MODELS
    bf16 = not a.no_bf16
    out = None
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "gpu.tsv" if out else None)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    report(part="env", device=str(dev), name=name.replace(" ", "_"), torch=torch.__version__,
           bf16=bf16 and dev.type == "cuda", load_average_1min=f"{os.getloadavg()[0]:.1f}",
           tiny=a.tiny, budget_s=a.budget_s)
    t0 = time.perf_counter()
    ok = smoke(dev, grids[0], smoke_steps, report)
    for g in grids:
        throughput(dev, g, steps, bf16, report, budget)
    inference(dev, grids[-1], bf16, report, budget,
              ddim_steps=LEAST_DDIM_STEPS if a.tiny else None)
    report(part="total", ok=ok, scaled_rows=budget.scaled,
           seconds=f"{time.perf_counter() - t0:.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
