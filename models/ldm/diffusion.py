"""Latent DDPM from 3T to 7T latents, with classifier-free guidance and DDIM sampling.

As published (SCIENCE.md section 4): a U-Net (MONAI ``DiffusionModelUNet``,
attention at the two deepest levels) predicts the noise of the 7T latent
``x_t``; the 3T latent enters by concatenation with ``x_t``; a class label
(the target's field strength) enters through cross-attention. In training
the label is replaced by the null label with probability ``p_uncond``, so
one network learns the conditional and the unconditional noise; sampling
combines them, ``eps = (1 + w) eps(x_t, c) - w eps(x_t, null)``, and runs
deterministic DDIM (``eta = 0``) in ``steps`` steps (20 by default).

Labels: 0 = null (dropped), 1 = 3T, 2 = 7T. Training pairs with label 7T have
the 7T latent as target; with label 3T the 3T map encoded by the 7T
autoencoder (the same anatomy at 3T contrast), so that the guidance has a
direction to push along (see :func:`diffusion_loss`).
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

#: Label indices of the cross-attention embedding.
NULL_LABEL, LABEL_3T, LABEL_7T = 0, 1, 2
N_LABELS = 3
#: Diffusion time steps in training, and the noise schedule (Stable-Diffusion style).
TRAIN_TIMESTEPS = 1000
SCHEDULE = "scaled_linear_beta"
BETA_RANGE = (0.0015, 0.0195)
#: Probability that a training sample's label is dropped (classifier-free guidance).
P_UNCOND = 0.15
#: Probability that a training sample is a 3T-labelled (3T -> 3T) one.
P_LABEL_3T = 0.25
#: Defaults at sampling: DDIM steps and guidance scale w.
DDIM_STEPS = 20
GUIDANCE = 1.0
#: U-Net widths per level (attention at the two deepest) and label embedding size.
DEFAULT_CHANNELS = (16, 32, 32)
CONTEXT_DIM = 16


class LatentDenoiser(torch.nn.Module):
    """Noise predictor ``eps(x_t, t | z3, label)`` on latents of ``latent_channels``."""

    def __init__(self, latent_channels: int = 32, channels=DEFAULT_CHANNELS,
                 context_dim: int = CONTEXT_DIM, head_channels: int = 8, norm_groups: int = 8):
        super().__init__()
        n = len(channels)
        self.unet = DiffusionModelUNet(
            spatial_dims=3, in_channels=2 * latent_channels, out_channels=latent_channels,
            num_res_blocks=1, channels=tuple(channels),
            attention_levels=tuple(i >= n - 2 for i in range(n)), norm_num_groups=norm_groups,
            num_head_channels=head_channels, with_conditioning=True,
            cross_attention_dim=context_dim)
        self.label_embedding = torch.nn.Embedding(N_LABELS, context_dim)

    def forward(self, x_t, t, z3, labels):
        context = self.label_embedding(labels)[:, None, :]
        return self.unet(torch.cat([x_t, z3], dim=1), t, context=context)


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, schedule=SCHEDULE,
                         beta_start=BETA_RANGE[0], beta_end=BETA_RANGE[1])


def sample_scheduler(steps: int = DDIM_STEPS) -> DDIMScheduler:
    s = DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, schedule=SCHEDULE,
                      beta_start=BETA_RANGE[0], beta_end=BETA_RANGE[1], clip_sample=False)
    s.set_timesteps(int(steps))
    return s


def diffusion_loss(den: LatentDenoiser, z3, z7, z3_in7, scheduler: DDPMScheduler,
                   generator: torch.Generator | None = None,
                   p_uncond: float = P_UNCOND, p_label_3t: float = P_LABEL_3T) -> torch.Tensor:
    """Noise-prediction MSE of a batch of latents (B, C, ...).

    ``z3``: condition (3T latent, 3T autoencoder); ``z7``: 7T target latent;
    ``z3_in7``: the 3T map in the 7T latent space (the 3T-labelled target).
    """
    b = z3.shape[0]
    dev = z3.device
    u = torch.rand(b, generator=generator).to(dev)
    is3 = u < p_label_3t
    target = torch.where(is3[:, None, None, None, None], z3_in7, z7)
    labels = torch.where(is3, LABEL_3T, LABEL_7T)
    drop = torch.rand(b, generator=generator).to(dev) < p_uncond
    labels = torch.where(drop, NULL_LABEL, labels).long()
    noise = torch.randn(target.shape, generator=generator).to(dev)
    t = torch.randint(0, scheduler.num_train_timesteps, (b,), generator=generator).to(dev)
    x_t = scheduler.add_noise(target, noise, t)
    return torch.nn.functional.mse_loss(den(x_t, t, z3, labels), noise)


@torch.no_grad()
def sample(den: LatentDenoiser, z3: torch.Tensor, label: int = LABEL_7T,
           guidance: float = GUIDANCE, steps: int = DDIM_STEPS,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM (eta 0) from Gaussian noise to a latent of ``z3``'s shape, guided by ``w``."""
    sched = sample_scheduler(steps)
    b = z3.shape[0]
    x = torch.randn(z3.shape, generator=generator).to(z3.device)
    cond = torch.full((b,), int(label), dtype=torch.long, device=z3.device)
    null = torch.full((b,), NULL_LABEL, dtype=torch.long, device=z3.device)
    for t in sched.timesteps:
        tt = torch.full((b,), int(t), dtype=torch.long, device=z3.device)
        if guidance == 0:
            eps = den(x, tt, z3, cond)
        else:
            both = den(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([z3, z3]),
                       torch.cat([cond, null]))
            e_c, e_u = both.chunk(2)
            eps = (1.0 + guidance) * e_c - guidance * e_u
        x, _ = sched.step(eps, int(t), x)
    return x
