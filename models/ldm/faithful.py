"""The faithful 3T->7T latent diffusion: one class-conditioned latent DDPM, DDIM inversion.

Issue 15 item 2; SCIENCE.md section 4 (the paper's update, its Eq. 8, is the
DDIM inversion step). Pipeline of :class:`FaithfulLatentDiffusion3T7T`
(registry ``"ldm-faithful-3t7t"``)::

    R3 -> amplitudes sqrt(R_l) / scale_l -> VQ-VAE encoder -> z3 (quantised)
    z3 --DDIM inversion, label 3T, eta 0--> x_T
    x_T --DDIM, label 7T, guidance w--> z7 -> VQ-VAE decoder -> R7

* **One autoencoder for both fields**, trained on every 3T map (3T-only and
  paired subjects) and every 7T map, with a healthy codebook
  (:data:`vqvae.EMA_DECAY`, :class:`vqvae.DeadCodeReset`): both labels then
  describe distributions in one latent space, which is what inverting under
  one label and sampling under the other needs (a dual diffusion implicit
  bridge, Su et al. 2023).
* **One denoiser over both fields' latents** (:class:`ClassConditionedDenoiser`,
  no concatenated condition): the label (null / 3T / 7T) has a learned
  embedding of the time-embedding width, added to the time embedding, and
  *every* residual block derives its own per-channel scale and shift (FiLM,
  after its group norm) from that sum; the label is dropped to null with
  probability :data:`diffusion.P_UNCOND` in training (classifier-free
  guidance).
* **Translation**: deterministic DDIM inversion (eta 0) of ``z3`` under the
  3T label to ``x_T`` (MONAI's ``DDIMScheduler.reversed_step``), then DDIM
  from ``x_T`` under the 7T label with guidance ``w``:
  ``eps = (1 + w) eps(x, 7T) - w eps(x, null)``. Anatomy is carried by
  ``x_T``; nothing is regenerated from fresh noise.

The DDIM grid (:func:`ddim_scheduler`): ``set_alpha_to_one=False``, so the
clean latent is the sample at timestep 0 and sampling's last step (0 -> the
final alpha = alpha_0) is the identity; inversion runs ``reversed_step``
over the ascending timesteps but the largest (0 -> s -> ... -> T), the exact
mirror of the sampling steps (T -> ... -> 0). For a noise prediction that
does not depend on ``x`` the round trip is exact (tested).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from monai.networks.schedulers import DDIMScheduler

from dmriflow.models.card import register
from dmriflow.models.ldm import diffusion, features, vqvae
from dmriflow.models.ldm.baselines import delivered_rish
from dmriflow.models.ldm.model import (FLIPS, _config, _flip, _random_axes, amplitude_scale,
                                       input_to_rish, rish_to_input)
from dmriflow.models import train as training
from dmriflow.models.train import DEFAULT_THREADS, train

#: DDIM steps of inversion and of sampling (each); guidance scale w at sampling.
DDIM_STEPS = 50
GUIDANCE = 1.0
#: U-Net widths per level (8^3, 4^3, 2^3 at grid 32).
DEFAULT_CHANNELS = (32, 32, 32)

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


# ----------------------------------------------------------------------------
# DDIM numerics (no network here: ``eps_fn(x, t)`` is any noise prediction)
# ----------------------------------------------------------------------------
def ddim_scheduler(steps: int = DDIM_STEPS) -> DDIMScheduler:
    """MONAI's DDIM on the training schedule, with the clean latent at timestep 0.

    The timesteps are the multiples ``(N-1)k, ..., k, 0`` of ``k = T // N``:
    ``step`` and ``reversed_step`` move by exactly ``k``, while MONAI 1.6's
    ``set_timesteps`` spaces the grid by ``(T-1)/(N-1)`` (999, 888, ... for
    N = 10), so each of its steps would land on an alpha the next step does
    not assume.
    """
    s = DDIMScheduler(num_train_timesteps=diffusion.TRAIN_TIMESTEPS, schedule=diffusion.SCHEDULE,
                      beta_start=diffusion.BETA_RANGE[0], beta_end=diffusion.BETA_RANGE[1],
                      clip_sample=False, set_alpha_to_one=False)
    s.set_timesteps(int(steps))
    k = s.num_train_timesteps // s.num_inference_steps
    s.timesteps = torch.arange(s.num_inference_steps - 1, -1, -1, dtype=torch.long) * k
    return s


def inversion_timesteps(sched: DDIMScheduler) -> list[int]:
    """Ascending timesteps ``0, s, ..., T - s``: ``reversed_step`` at each goes one
    step up, ending at the largest sampling timestep ``T``."""
    return [int(t) for t in sched.timesteps.flip(0)[:-1]]


@torch.no_grad()
def ddim_invert(eps_fn: EpsFn, z0: torch.Tensor, sched: DDIMScheduler) -> torch.Tensor:
    """Deterministic DDIM inversion: clean ``z0`` -> ``x_T`` (eta 0)."""
    x = z0
    for t in inversion_timesteps(sched):
        x, _ = sched.reversed_step(eps_fn(x, t), t, x)
    return x


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, x_t: torch.Tensor, sched: DDIMScheduler) -> torch.Tensor:
    """Deterministic DDIM sampling (eta 0): ``x_T`` -> clean latent."""
    x = x_t
    for t in sched.timesteps:
        x, _ = sched.step(eps_fn(x, int(t)), int(t), x)
    return x


# ----------------------------------------------------------------------------
# The class-conditioned denoiser
# ----------------------------------------------------------------------------
class FiLMBlock(torch.nn.Module):
    """Residual block whose second normalisation is modulated by the embedding:
    ``norm(h) * (1 + scale) + shift`` per channel (FiLM), scale and shift a
    learned function of the (time + label) embedding. Applied *after* the
    group norm, so the label's effect is not normalised away (an additive
    shift before a group norm loses its group-common part)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = torch.nn.GroupNorm(min(groups, c_in), c_in)
        self.conv1 = torch.nn.Conv3d(c_in, c_out, 3, padding=1)
        self.norm2 = torch.nn.GroupNorm(min(groups, c_out), c_out)
        self.film = torch.nn.Linear(emb_dim, 2 * c_out)
        self.conv2 = torch.nn.Conv3d(c_out, c_out, 3, padding=1)
        self.skip = torch.nn.Conv3d(c_in, c_out, 1) if c_in != c_out else torch.nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(torch.nn.functional.silu(self.norm1(x)))
        scale, shift = self.film(torch.nn.functional.silu(emb))[..., None, None, None].chunk(2, 1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(torch.nn.functional.silu(h))


class ClassConditionedDenoiser(torch.nn.Module):
    """Noise predictor ``eps(x_t, t | label)`` on latents (no other condition).

    A small 3D U-Net (one FiLM block per level on the way down and up, stride-2
    convolutions between levels, skip connections); the embedding is an MLP of
    the sinusoidal time embedding plus a learned label embedding (null / 3T /
    7T) of the same width, and every block gets its own scale and shift from
    it. Last convolution zero-initialised (an untrained model predicts 0).
    """

    def __init__(self, latent_channels: int = vqvae.EMBEDDING_DIM, channels=DEFAULT_CHANNELS,
                 norm_groups: int = 8):
        super().__init__()
        c = tuple(int(v) for v in channels)
        self.base = c[0]
        emb = 4 * c[0]
        self.time_mlp = torch.nn.Sequential(torch.nn.Linear(c[0], emb), torch.nn.SiLU(),
                                            torch.nn.Linear(emb, emb))
        self.label_embedding = torch.nn.Embedding(diffusion.N_LABELS, emb)
        self.inp = torch.nn.Conv3d(latent_channels, c[0], 3, padding=1)
        self.down = torch.nn.ModuleList(
            FiLMBlock(c[max(i - 1, 0)], c[i], emb, norm_groups) for i in range(len(c)))
        self.pool = torch.nn.ModuleList(
            torch.nn.Conv3d(c[i], c[i], 3, stride=2, padding=1) for i in range(len(c) - 1))
        self.mid = FiLMBlock(c[-1], c[-1], emb, norm_groups)
        self.up = torch.nn.ModuleList(
            FiLMBlock(c[i + 1] + c[i], c[i], emb, norm_groups) for i in range(len(c) - 1))
        self.out = torch.nn.Conv3d(c[0], latent_channels, 3, padding=1)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, x_t, t, labels):
        emb = self.time_mlp(get_timestep_embedding(t, self.base).to(x_t.dtype))
        emb = emb + self.label_embedding(labels)
        h = self.inp(x_t)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            if i < len(self.pool):
                skips.append(h)
                h = self.pool[i](h)
        h = self.mid(h, emb)
        for i in reversed(range(len(self.up))):
            h = torch.nn.functional.interpolate(h, size=skips[i].shape[2:], mode="nearest")
            h = self.up[i](torch.cat([h, skips[i]], 1), emb)
        return self.out(torch.nn.functional.silu(h))


def guided_eps(den: torch.nn.Module, label: int, guidance: float = 0.0) -> EpsFn:
    """``eps(x, t)`` under ``label``; with ``guidance`` w > 0 the classifier-free
    combination ``(1 + w) eps(x, label) - w eps(x, null)``."""
    def eps(x, t):
        b = x.shape[0]
        tt = torch.full((b,), int(t), dtype=torch.long, device=x.device)
        cond = torch.full((b,), int(label), dtype=torch.long, device=x.device)
        if guidance == 0:
            return den(x, tt, cond)
        null = torch.full_like(cond, diffusion.NULL_LABEL)
        e_c, e_u = den(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, null])).chunk(2)
        return (1.0 + guidance) * e_c - guidance * e_u
    return eps


def translate(den: torch.nn.Module, z: torch.Tensor, source: int = diffusion.LABEL_3T,
              target: int = diffusion.LABEL_7T, guidance: float = GUIDANCE,
              steps: int = DDIM_STEPS) -> torch.Tensor:
    """Invert ``z`` under ``source`` (unguided), sample under ``target`` (guided)."""
    sched = ddim_scheduler(steps)
    x_t = ddim_invert(guided_eps(den, source), z, sched)
    return ddim_sample(guided_eps(den, target, guidance), x_t, sched)


def class_diffusion_loss(den: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor,
                         scheduler, generator: torch.Generator | None = None,
                         p_uncond: float = diffusion.P_UNCOND) -> torch.Tensor:
    """Noise-prediction MSE of latents ``z`` with their field labels (dropped to
    null with probability ``p_uncond``)."""
    b, dev = z.shape[0], z.device
    drop = torch.rand(b, generator=generator).to(dev) < p_uncond
    labels = torch.where(drop, diffusion.NULL_LABEL, labels).long()
    noise = torch.randn(z.shape, generator=generator).to(dev)
    t = torch.randint(0, scheduler.num_train_timesteps, (b,), generator=generator).to(dev)
    return torch.nn.functional.mse_loss(den(scheduler.add_noise(z, noise, t), t, labels), noise)


# ----------------------------------------------------------------------------
# The checkpointable model
# ----------------------------------------------------------------------------
@register("ldm-faithful-3t7t")
class FaithfulLatentDiffusion3T7T(torch.nn.Module):
    """Shared VQ-VAE + class-conditioned latent denoiser on a ``grid^3`` cube."""

    def __init__(self, grid: int = 32, vq_widths=vqvae.DEFAULT_WIDTHS,
                 unet_channels=DEFAULT_CHANNELS):
        super().__init__()
        step = vqvae.DOWNSAMPLE * 2 ** (len(unet_channels) - 1)
        if grid % step:
            raise ValueError(f"grid {grid} must be a multiple of {step}")
        self.grid = int(grid)
        self.vq = vqvae.build_vqvae(features.N_ORDERS, tuple(vq_widths))
        self.denoiser = ClassConditionedDenoiser(vqvae.EMBEDDING_DIM, tuple(unet_channels))
        self.register_buffer("amp_scale", torch.ones(features.N_ORDERS))
        self.register_buffer("latent_scale", torch.ones(()))

    @torch.no_grad()
    def predict(self, rish3: np.ndarray, mask: np.ndarray, guidance: float = GUIDANCE,
                steps: int = DDIM_STEPS, batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """(predicted 7T RISH, the autoencoder's reconstruction of the 3T RISH),
        each (B or none, G, G, G, 3), from 3T RISH (B or none, G, G, G, 3)."""
        rish3 = np.asarray(rish3, dtype=np.float32)
        single = rish3.ndim == 4
        rish3 = rish3[None] if single else rish3
        mask = np.asarray(mask, dtype=bool).reshape(rish3.shape[:4])
        dev = self.amp_scale.device
        pred, recon = [], []
        for i in range(0, rish3.shape[0], batch):
            m = mask[i:i + batch]
            z3 = vqvae.encode(self.vq, rish_to_input(rish3[i:i + batch], m, self.amp_scale)
                              .to(dev)) * self.latent_scale
            z7 = translate(self.denoiser, z3, guidance=guidance, steps=steps)
            pred.append(input_to_rish(vqvae.decode(self.vq, z7 / self.latent_scale), m,
                                      self.amp_scale))
            recon.append(input_to_rish(self.vq.decode(z3 / self.latent_scale), m,
                                       self.amp_scale))
        pred, recon = np.concatenate(pred), np.concatenate(recon)
        return (pred[0], recon[0]) if single else (pred, recon)

    def lambdas(self, rish3: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                **kw) -> dict[str, np.ndarray]:
        """Per-order scale maps of one subject, two ways: ``"replaced"`` - as
        published, ``sqrt(R7_pred / R3)`` (the prediction replaces the 3T RISH);
        ``"rescaled"`` - ``sqrt(R7_pred / D(E(R3)))``, the translation's change
        of the decoded map, so the autoencoder's reconstruction error cancels."""
        pred, recon = self.predict(rish3, mask, **kw)
        return {"replaced": delivered_rish(rish3, pred, mask, affine)[0],
                "rescaled": delivered_rish(recon, pred, mask, affine)[0]}


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
@dataclass
class FaithfulBudget:
    """Optimizer steps and batch sizes of the two stages."""

    vq_steps: int = 600
    diffusion_steps: int = 1500
    vq_batch: int = 4
    diffusion_batch: int = 8
    lr: float = 2e-3
    dead_after: int = vqvae.DEAD_AFTER_STEPS
    seed: int = 0
    threads: int = DEFAULT_THREADS


def fit(model: FaithfulLatentDiffusion3T7T, rish3_only: list, pairs: list,
        budget: FaithfulBudget, log=None) -> dict:
    """Train ``model`` in place on (rish3, mask) 3T-only subjects and (rish3, rish7,
    mask) pairs (every map on the model grid); returns histories, times and the
    codes each field's maps use."""
    log = log or (lambda s: None)
    report = {"budget": asdict(budget)}
    maps3 = [(r, m) for r, m in rish3_only] + [(r3, m) for r3, _, m in pairs]
    maps7 = [(r7, m) for _, r7, m in pairs]
    scale = amplitude_scale(maps3 + maps7)
    x3 = torch.cat([rish_to_input(r, m, scale) for r, m in maps3])
    x7 = torch.cat([rish_to_input(r, m, scale) for r, m in maps7])
    dev = training.select_device(None)
    model.to(dev)
    model.amp_scale.copy_(scale)

    def stage(name, net, loss, batch_fn, steps):
        t0 = time.perf_counter()
        res = train(net, loss, batch_fn, _config(steps, budget),
                    log=lambda s: log(f"{name}: {s}"))
        report[name] = {"steps": steps, "seconds": time.perf_counter() - t0,
                        "history": res.history}
        log(f"{name}: {steps} steps in {report[name]['seconds']:.0f} s")

    pool = torch.cat([x3, x7])
    reset = vqvae.DeadCodeReset(vqvae.NUM_EMBEDDINGS, budget.dead_after)

    def images(step, rng):
        idx = rng.choice(pool.shape[0], size=min(budget.vq_batch, pool.shape[0]), replace=False)
        return _flip(pool[idx], _random_axes(rng))

    stage("vq", model.vq, lambda vq, x: vqvae.vqvae_loss(vq, x, reset), images, budget.vq_steps)
    report["vq"]["codes_reset"] = reset.resets
    report["codes_used"] = {"3T": vqvae.code_usage(model.vq, x3),
                            "7T": vqvae.code_usage(model.vq, x7)}
    log(f"codes used: {report['codes_used']}")

    model.eval()
    with torch.no_grad():
        z = torch.cat([torch.stack([vqvae.encode(model.vq, _flip(x.to(dev), f)) for f in FLIPS],
                                   1).flatten(0, 1) for x in (x3, x7)])
        labels = torch.tensor([diffusion.LABEL_3T] * (8 * x3.shape[0])
                              + [diffusion.LABEL_7T] * (8 * x7.shape[0]), device=dev)
        model.latent_scale.copy_(1.0 / z.std().clamp_min(1e-6))
    s = model.latent_scale
    sched = diffusion.train_scheduler()

    def latent_batch(step, rng):
        i = rng.choice(z.shape[0], size=min(budget.diffusion_batch, z.shape[0]), replace=False)
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        return z[i] * s, labels[i], g

    stage("diffusion", model.denoiser,
          lambda den, b: class_diffusion_loss(den, b[0], b[1], sched, b[2]),
          latent_batch, budget.diffusion_steps)
    model.eval()
    return report
