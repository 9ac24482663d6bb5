"""3T->7T latent diffusion on the CPU: training throughput and inference time per subject.

Training: samples/s of each stage (3T/7T VQ-VAE, latent denoiser, SR module)
at the model grid with the default batch sizes, timed over a few optimizer
steps after one warm-up step. Inference: one DDIM pass (classifier-free
guidance doubles the denoiser batch) per subject at the shipped grid and,
unless --no-96, at the published 96^3 grid (untrained weights: the time does
not depend on their values); and the whole 3t7t inference kind on a phantom
subject (features on the cube, prediction, lambda maps, DWIs rebuilt on the
subject grid). Each stage also reports the process's peak resident memory.
GPU figures are not measured here (no GPU on this machine).

Usage: nice -n 10 python bench/ldm_3t7t.py [--grid 32] [--steps 5] [--no-96]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import torch

from dmriflow.interfaces.inference import synthesize_7t_like
from dmriflow.models import card as cards
from dmriflow.models import degrade
from dmriflow.models.ldm import diffusion, sr, vqvae
from dmriflow.models.ldm.model import Budget, LatentDiffusion3T7T


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_steps(net, loss_fn, batch, steps: int) -> float:
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    net.train()

    def one():
        loss = loss_fn(net, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    one()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-96", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"load_average_1min={os.getloadavg()[0]:.1f} threads={a.threads} device=cpu "
          f"gpu=not_measured")
    g, b = a.grid, Budget()
    model = LatentDiffusion3T7T(grid=g)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"grid={g} parameters={n_params} float16_weights_mb={2 * n_params / 2**20:.2f}")
    x = torch.rand(b.vq_batch, 3, g, g, g)
    s = time_steps(model.vq3, vqvae.vqvae_loss, x, a.steps)
    print(f"stage=vqvae batch={b.vq_batch} s_per_step={s:.3f} "
          f"samples_per_s={b.vq_batch / s:.2f} peak_rss_mb={peak_mb():.0f}")
    lat = g // vqvae.DOWNSAMPLE
    z = torch.randn(b.diffusion_batch, vqvae.EMBEDDING_DIM, lat, lat, lat)
    sched = diffusion.train_scheduler()
    s = time_steps(model.denoiser, lambda n, zz: diffusion.diffusion_loss(n, zz, zz, zz, sched),
                   z, a.steps)
    print(f"stage=diffusion batch={b.diffusion_batch} s_per_step={s:.3f} "
          f"samples_per_s={b.diffusion_batch / s:.2f} peak_rss_mb={peak_mb():.0f}")
    xs = torch.rand(b.sr_batch, 3, g, g, g)
    s = time_steps(model.sr, lambda n, xx: sr.mse_loss(n, xx, xx), xs, a.steps)
    print(f"stage=sr batch={b.sr_batch} s_per_step={s:.3f} samples_per_s={b.sr_batch / s:.2f} "
          f"peak_rss_mb={peak_mb():.0f}")

    model.eval()
    grids = [g] if a.no_96 else [g, 96]
    for grid in grids:
        m = model if grid == g else LatentDiffusion3T7T(grid=grid).eval()
        rish = np.random.default_rng(0).uniform(0, 1, (grid,) * 3 + (3,)).astype(np.float32)
        mask = np.ones((grid,) * 3, bool)
        t = time.perf_counter()
        m.predict(rish, mask, steps=diffusion.DDIM_STEPS)
        print(f"inference=ddim grid={grid} ddim_steps={diffusion.DDIM_STEPS} "
              f"guidance={diffusion.GUIDANCE} seconds_per_subject={time.perf_counter() - t:.2f} "
              f"peak_rss_mb={peak_mb():.0f}")

    # the whole inference kind on a phantom subject (3T-like, train family)
    p = degrade.simulate_pair(1, sim_size=g, family="test")
    from dmriflow.interfaces.io import DWI
    import nibabel as nib
    dwi = DWI(p.dwi3, p.gtab3, p.mask, p.affine, nib.Nifti1Header(), {})
    card = cards.ModelCard(name="bench", version="0", architecture="ldm-3t7t",
                           kwargs={"grid": g}, acquisition=cards.Acquisition(shells=[1000.0]))
    t = time.perf_counter()
    out = synthesize_7t_like(model, card, dwi)
    print(f"inference=kind_3t7t grid={g} subject_shape={'x'.join(map(str, p.mask.shape))} "
          f"volumes={len(p.gtab3)} seconds_per_subject={time.perf_counter() - t:.2f} "
          f"peak_rss_mb={peak_mb():.0f} outputs={len(out.maps)}")


if __name__ == "__main__":
    main()
