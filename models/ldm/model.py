"""The 3T->7T latent diffusion model as one checkpointable network, and its training.

:class:`LatentDiffusion3T7T` (registered as ``"ldm-3t7t"`` for
:mod:`dmriflow.models.card`) holds the 3T and 7T VQ-VAEs, the latent
denoiser, the super-resolution module and the normalisation constants
(buffers, so they travel with the weights). The pipeline (SCIENCE.md s. 4):

    R3 (G^3 x 3) -> amplitudes sqrt(R_l) / scale_l -> 3T encoder -> z3
    z7 ~ DDIM(denoiser | z3, label 7T, guidance w) -> 7T decoder -> SR
    -> R7 = (scale_l * amplitude)^2

Amplitudes (``sqrt(R_l)``, the RMS SH coefficient per order) divided by each
order's 99th percentile over the training masks keep the three channels on
one scale although R_4 is ~100x smaller than R_0. :func:`fit` trains the
stages one after another with :func:`dmriflow.models.train.train`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dmriflow.models.card import register
from dmriflow.models.ldm import diffusion, features, sr, vqvae
from dmriflow.models import train as training
from dmriflow.models.train import DEFAULT_THREADS, TrainConfig, train

#: Percentile of the training amplitudes (in the masks) that maps to 1.
AMPLITUDE_PERCENTILE = 99.0


@register("ldm-3t7t")
class LatentDiffusion3T7T(torch.nn.Module):
    """VQ-VAE(3T), VQ-VAE(7T), latent denoiser and SR module on a ``grid^3`` cube."""

    def __init__(self, grid: int = 32, vq_widths=vqvae.DEFAULT_WIDTHS,
                 unet_channels=diffusion.DEFAULT_CHANNELS,
                 context_dim: int = diffusion.CONTEXT_DIM,
                 sr_features: int = sr.SR_FEATURES, sr_blocks: int = sr.SR_BLOCKS):
        super().__init__()
        if grid % (vqvae.DOWNSAMPLE * 2 ** (len(unet_channels) - 1)):
            raise ValueError(f"grid {grid} must be a multiple of "
                             f"{vqvae.DOWNSAMPLE * 2 ** (len(unet_channels) - 1)}")
        self.grid = int(grid)
        c = features.N_ORDERS
        self.vq3 = vqvae.build_vqvae(c, tuple(vq_widths), decay=vqvae.PAIRED_EMA_DECAY)
        self.vq7 = vqvae.build_vqvae(c, tuple(vq_widths), decay=vqvae.PAIRED_EMA_DECAY)
        self.denoiser = diffusion.LatentDenoiser(vqvae.EMBEDDING_DIM, tuple(unet_channels),
                                                 context_dim)
        self.sr = sr.ResidualCNN(c, sr_features, sr_blocks)
        self.register_buffer("amp_scale", torch.ones(c))
        self.register_buffer("latent_scale", torch.ones(()))

    # -- normalisation --------------------------------------------------------
    def to_input(self, rish: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        """(..., G, G, G, 3) RISH maps -> (B, 3, G, G, G) scaled amplitudes (0 outside)."""
        return rish_to_input(rish, mask, self.amp_scale)

    def to_rish(self, x: torch.Tensor, mask: np.ndarray) -> np.ndarray:
        """(B, 3, G, G, G) amplitudes -> (B, G, G, G, 3) RISH (0 outside the mask)."""
        return input_to_rish(x, mask, self.amp_scale)

    # -- inference ------------------------------------------------------------
    @torch.no_grad()
    def predict(self, rish3: np.ndarray, mask: np.ndarray, guidance: float = diffusion.GUIDANCE,
                steps: int = diffusion.DDIM_STEPS, seed: int = 0, use_sr: bool | None = True,
                batch: int = 4):
        """Predicted 7T RISH (B, G, G, G, 3) from 3T RISH (B or none, G, G, G, 3).

        ``use_sr=None`` returns ``(with SR, without SR)`` from the same samples
        (the ablation). The DDIM noise comes from a generator seeded by ``seed``.
        """
        rish3 = np.asarray(rish3, dtype=np.float32)
        single = rish3.ndim == 4
        rish3 = rish3[None] if single else rish3
        mask = np.asarray(mask, dtype=bool).reshape(rish3.shape[:4])
        dev = self.amp_scale.device
        gen = torch.Generator().manual_seed(int(seed))
        with_sr, without = [], []
        for i in range(0, rish3.shape[0], batch):
            x3 = self.to_input(rish3[i:i + batch], mask[i:i + batch]).to(dev)
            z3 = vqvae.encode(self.vq3, x3) * self.latent_scale
            z7 = diffusion.sample(self.denoiser, z3, diffusion.LABEL_7T, guidance, steps, gen)
            x7 = vqvae.decode(self.vq7, z7 / self.latent_scale)
            if use_sr is not False:
                with_sr.append(self.to_rish(self.sr(x7), mask[i:i + batch]))
            if not use_sr:
                without.append(self.to_rish(x7, mask[i:i + batch]))
        outs = [np.concatenate(o) for o in (with_sr, without) if o]
        outs = [o[0] if single else o for o in outs]
        return tuple(outs) if use_sr is None else outs[0]

    @torch.no_grad()
    def reconstruct_7t(self, rish7: np.ndarray, mask: np.ndarray,
                       use_sr: bool = True) -> np.ndarray:
        """7T RISH through the 7T autoencoder (+ SR): the quality ceiling of
        :meth:`predict` (a perfect denoiser would produce this latent)."""
        x = self.to_input(rish7, mask).to(self.amp_scale.device)
        y = vqvae.decode(self.vq7, vqvae.encode(self.vq7, x))
        y = self.sr(y) if use_sr else y
        out = self.to_rish(y, np.asarray(mask, dtype=bool).reshape((-1,) + y.shape[2:]))
        return out[0] if np.asarray(rish7).ndim == 4 else out


def rish_to_input(rish: np.ndarray, mask: np.ndarray, scale: torch.Tensor) -> torch.Tensor:
    """(..., G, G, G, 3) RISH -> (B, 3, G, G, G) float32 ``sqrt(R) / scale`` in the mask."""
    r = np.asarray(rish, dtype=np.float32)
    r = r.reshape((-1,) + r.shape[-4:])
    m = np.asarray(mask, dtype=np.float32).reshape(r.shape[:4] + (1,))
    amp = np.sqrt(np.maximum(r, 0.0)) * m
    x = torch.from_numpy(np.ascontiguousarray(amp.transpose(0, 4, 1, 2, 3)))
    return x / scale.detach().cpu().view(1, -1, 1, 1, 1)


def input_to_rish(x: torch.Tensor, mask: np.ndarray, scale: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`rish_to_input`: (B, 3, G, G, G) scaled amplitudes ->
    (B, G, G, G, 3) RISH (negative amplitudes clipped; 0 outside the mask)."""
    amp = torch.clamp(x, min=0.0) * scale.to(x.device).view(1, -1, 1, 1, 1)
    out = (amp ** 2).permute(0, 2, 3, 4, 1).cpu().numpy().astype(np.float32)
    return out * np.asarray(mask, dtype=np.float32).reshape(out.shape[:4] + (1,))


def amplitude_scale(maps: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """Per order, the AMPLITUDE_PERCENTILE of ``sqrt(R_l)`` over (rish, mask) pairs."""
    vals = np.concatenate([np.sqrt(np.maximum(r[m], 0.0)) for r, m in maps])
    return torch.tensor(np.percentile(vals, AMPLITUDE_PERCENTILE, axis=0), dtype=torch.float32)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
@dataclass
class Budget:
    """Optimizer steps and batch sizes of the training stages."""

    vq3_steps: int = 150
    vq7_steps: int = 80
    diffusion_steps: int = 250
    sr_steps: int = 40
    vq_batch: int = 4
    diffusion_batch: int = 4
    sr_batch: int = 4
    lr: float = 2e-3
    finetune: bool = True
    seed: int = 0
    threads: int = DEFAULT_THREADS


#: The 8 flips of a cube (axes per flip; RISH maps are scalar images: every flip is valid).
FLIPS = [[a for a in range(3) if (k >> a) & 1] for k in range(8)]


def _flip(x: torch.Tensor, axes) -> torch.Tensor:
    return torch.flip(x, dims=[2 + a for a in axes]) if axes else x


def _random_axes(rng: np.random.Generator) -> list[int]:
    """Random flips of the cube's axes (RISH maps are scalar images: any flip is valid)."""
    return [a for a in range(3) if rng.random() < 0.5]


def _config(steps: int, budget: Budget, lr: float | None = None) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr or budget.lr, warmup=max(1, steps // 10),
                       seed=budget.seed, threads=budget.threads, log_every=max(1, steps // 10),
                       checkpoint_every=max(1, steps), validate_every=max(1, steps))


def fit(model: LatentDiffusion3T7T, rish3_only: list, pairs: list, budget: Budget,
        log=None, vq3_from: LatentDiffusion3T7T | None = None) -> dict:
    """Train every stage of ``model`` in place; returns per-stage histories and times.

    ``rish3_only``: (rish3, mask) of 3T subjects without a 7T scan (they train
    the 3T autoencoder, as the paper's 1065 3T subjects do); ``pairs``:
    (rish3, rish7, mask) of paired subjects (3T and 7T autoencoders, the
    denoiser and the SR module). All maps (G, G, G, 3) on the model grid.
    """
    log = log or (lambda s: None)
    report = {"budget": asdict(budget)}
    all3 = [(r, m) for r, m in rish3_only] + [(r3, m) for r3, _, m in pairs]
    scale = amplitude_scale(all3 + [(r7, m) for _, r7, m in pairs])
    # the image pools stay on the CPU (the loop moves each batch); every part
    # and buffer of the model goes to the training device (CUDA when present)
    x3_all = torch.cat([rish_to_input(r, m, scale) for r, m in all3])
    x3 = torch.cat([rish_to_input(r3, m, scale) for r3, _, m in pairs])
    x7 = torch.cat([rish_to_input(r7, m, scale) for _, r7, m in pairs])
    dev = training.select_device(None)
    model.to(dev)
    model.amp_scale.copy_(scale)
    masks = torch.from_numpy(np.stack([m for _, _, m in pairs])[:, None].astype(np.float32))

    def images(pool, n):
        def batch(step, rng):
            idx = rng.choice(pool.shape[0], size=min(n, pool.shape[0]), replace=False)
            return _flip(pool[idx], _random_axes(rng))
        return batch

    def stage(name, net, loss, batch_fn, steps, lr=None):
        t0 = time.perf_counter()
        res = train(net, loss, batch_fn, _config(steps, budget, lr),
                    log=lambda s: log(f"{name}: {s}"))
        report[name] = {"steps": steps, "seconds": time.perf_counter() - t0,
                        "history": res.history}
        log(f"{name}: {steps} steps in {report[name]['seconds']:.0f} s")

    if vq3_from is None:
        stage("vq3", model.vq3, vqvae.vqvae_loss, images(x3_all, budget.vq_batch),
              budget.vq3_steps)
    else:
        if not torch.equal(vq3_from.amp_scale, model.amp_scale):
            raise ValueError("vq3_from was trained with another normalisation")
        vqvae.init_from(model.vq3, vq3_from.vq3)
        report["vq3"] = {"reused": True}
    if budget.finetune:
        vqvae.init_from(model.vq7, model.vq3)
    stage("vq7", model.vq7, vqvae.vqvae_loss, images(x7, budget.vq_batch), budget.vq7_steps)

    # latents of every flip of every pair (encoders frozen from here on)
    flips = FLIPS
    model.eval()
    with torch.no_grad():
        x3d, x7d = x3.to(dev), x7.to(dev)
        z3 = torch.stack([vqvae.encode(model.vq3, _flip(x3d, f)) for f in flips], 1)
        z7 = torch.stack([vqvae.encode(model.vq7, _flip(x7d, f)) for f in flips], 1)
        z37 = torch.stack([vqvae.encode(model.vq7, _flip(x3d, f)) for f in flips], 1)
        model.latent_scale.copy_(1.0 / z7.std().clamp_min(1e-6))
        decoded7 = vqvae.decode(model.vq7, z7[:, 0])
    s = model.latent_scale
    sched = diffusion.train_scheduler()

    def latent_batch(step, rng):
        i = rng.choice(z3.shape[0], size=min(budget.diffusion_batch, z3.shape[0]),
                       replace=z3.shape[0] < budget.diffusion_batch)
        k = rng.integers(0, 8, size=i.size)
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        return z3[i, k] * s, z7[i, k] * s, z37[i, k] * s, g

    def dloss(den, b):
        return diffusion.diffusion_loss(den, b[0], b[1], b[2], sched, b[3])

    stage("diffusion", model.denoiser, dloss, latent_batch, budget.diffusion_steps)

    def sr_batch(step, rng):
        idx = rng.choice(x7.shape[0], size=min(budget.sr_batch, x7.shape[0]), replace=False)
        axes = _random_axes(rng)
        return (_flip(decoded7[idx], axes), _flip(x7[idx], axes), _flip(masks[idx], axes))

    stage("sr", model.sr, lambda net, b: sr.mse_loss(net, *b), sr_batch, budget.sr_steps)
    model.eval()
    return report
