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
* **One denoiser over both fields' latents** (MONAI ``DiffusionModelUNet``,
  no concatenated condition): the label (null / 3T / 7T) has a learned
  embedding of the time-embedding width that is added to the time embedding
  and enters *every* residual block through that block's own projection
  (a per-channel shift at every level), dropped to null with probability
  :data:`diffusion.P_UNCOND` in training (classifier-free guidance).
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
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler

from dmriflow.models.card import register
from dmriflow.models.ldm import diffusion, features, vqvae
from dmriflow.models.ldm.baselines import delivered_rish
from dmriflow.models.ldm.model import (_config, _flip, _random_axes, amplitude_scale,
                                       input_to_rish, rish_to_input)
from dmriflow.models import train as training
from dmriflow.models.train import DEFAULT_THREADS, train

#: DDIM steps of inversion and of sampling (each); guidance scale w at sampling.
DDIM_STEPS = 50
GUIDANCE = 1.0
#: U-Net widths per level (attention at the deepest); latent 8^3 at grid 32.
DEFAULT_CHANNELS = (32, 64, 64)
#: The 8 flips of a cube (scalar maps: every flip is a valid augmentation).
FLIPS = [[a for a in range(3) if (k >> a) & 1] for k in range(8)]

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


# ----------------------------------------------------------------------------
# DDIM numerics (no network here: ``eps_fn(x, t)`` is any noise prediction)
# ----------------------------------------------------------------------------
def ddim_scheduler(steps: int = DDIM_STEPS) -> DDIMScheduler:
    """MONAI's DDIM on the training schedule, with the clean latent at timestep 0."""
    s = DDIMScheduler(num_train_timesteps=diffusion.TRAIN_TIMESTEPS, schedule=diffusion.SCHEDULE,
                      beta_start=diffusion.BETA_RANGE[0], beta_end=diffusion.BETA_RANGE[1],
                      clip_sample=False, set_alpha_to_one=False)
    s.set_timesteps(int(steps))
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
class ClassConditionedDenoiser(torch.nn.Module):
    """Noise predictor ``eps(x_t, t | label)`` on latents (no other condition)."""

    def __init__(self, latent_channels: int = vqvae.EMBEDDING_DIM, channels=DEFAULT_CHANNELS,
                 head_channels: int = 16, norm_groups: int = 8):
        super().__init__()
        n = len(channels)
        self.unet = DiffusionModelUNet(
            spatial_dims=3, in_channels=latent_channels, out_channels=latent_channels,
            num_res_blocks=1, channels=tuple(channels),
            attention_levels=tuple(i == n - 1 for i in range(n)), norm_num_groups=norm_groups,
            num_head_channels=head_channels, num_class_embeds=diffusion.N_LABELS)

    def forward(self, x_t, t, labels):
        return self.unet(x_t, t, class_labels=labels)


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
