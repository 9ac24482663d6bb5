"""Residual conditional diffusion in RISH space: the 3T->7T model to ship.

Why not the latent model (:mod:`.model`): its autoencoder alone loses more
than identity on L2, and it regenerates anatomy from noise. This model works
on the ``grid^3`` RISH cube itself and predicts only the per-order log scale

    y_l = log(A7_l / A3_l),   A_l = sqrt(R_l + tau_l)

so the prediction *rescales* the subject's own 3T SH coefficients
(``lambda_l = exp(y_l)``, as RISH harmonisation does) and keeps its anatomy.
The denoiser sees the noisy ``y_t``, the time, and the condition (full
resolution, 5 channels): ``log A3`` per order (standardised), the mask and a
noise map ``log(sigma / s0)`` (sigma from the b0 repeats on the native grid,
:func:`noise_sigma`; s0 the voxel's mean b0 on the cube) - noise inflates the
3T high-order RISH, so the model must know how much noise there is.

The network predicts ``y_0`` directly (x0-parameterisation) and its last
layer starts at zero: an untrained model predicts ``y = 0``, i.e. lambda = 1,
identity. Sampling is ancestral (DDPM posterior steps on a cosine schedule,
:data:`SAMPLE_STEPS` steps); ``K`` samples per subject give the posterior
mean (``lambda = sqrt(mean_k exp(2 y_k))``: the mean of the delivered RISH)
and a per-voxel spread (SD of ``y_k``), from which :meth:`RishFit.interval`
gives Gaussian intervals in log space.

:class:`RishDiffusion3T7T` (registered ``"rish-diffusion-3t7t"``) holds the
network and the normalisation buffers; :func:`fit` trains it on random
patches with :func:`dmriflow.models.train.train`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import nn

from dmriflow.interfaces import harmonize
from dmriflow.models import card as cards
from dmriflow.models.card import register
from dmriflow.models.degrade import reference_b0
from dmriflow.models.ldm import features
from dmriflow.models.train import DEFAULT_THREADS, TrainConfig, train

N = features.N_ORDERS
#: Condition channels: log A3 per order, the mask, log(sigma / s0).
N_COND = N + 2
#: ... plus, for a model built with ``sharpness=True``, the measured sharpness
#: of the input (:func:`features.sharpness`, constant in the mask): the
#: training family randomises the blur width, so the model can learn how much
#: the effective resolution changes the mapping.
N_COND_SHARP = N_COND + 1
#: tau_l = TAU_FRACTION * median(R3_l in the mask): the floor under log A.
TAU_FRACTION = harmonize.TAU_FRACTION
#: lambda is clipped to this range. Wider below than RISH harmonisation's
#: (0.25, 4): the 3T noise floor of R2/R4 in near-isotropic voxels is ~50x the
#: 7T one, so a third of the L2/L4 mask voxels need lambda < 0.25 (measured
#: on train-family pairs at grid 32); 1/32 leaves < 1 % clipped.
SCALE_RANGE = (1 / 32, 4.0)
#: Network width and residual blocks (dilations cycle through DILATIONS).
WIDTH = 16
BLOCKS = 4
DILATIONS = (1, 2, 4, 1)
TIME_DIM = 32
#: Cosine schedule offset (Nichol & Dhariwal 2021) and floor of alpha-bar.
COSINE_S = 0.008
ALPHA_BAR_MIN = 1e-4
#: Default ancestral steps and samples per subject.
SAMPLE_STEPS = 8
SAMPLES = 12
#: Training patch edge (voxels) and batch.
PATCH = 16
BATCH = 4


# ----------------------------------------------------------------------------
# Noise estimate and the condition
# ----------------------------------------------------------------------------
def noise_sigma(data: np.ndarray, gtab, mask: np.ndarray) -> float:
    """Noise SD from the b0 repeats on the native grid: ``sqrt(mean_mask var_b0)``.

    Needs >= 2 b0 volumes; the variance across repeats is the noise
    variance where the signal is high (Rician ~ Gaussian), which holds in the
    brain mask at SNR >= 5.
    """
    b0 = np.asarray(data, dtype=np.float64)[..., gtab.b0s_mask]
    if b0.shape[-1] < 2:
        raise ValueError(f"{b0.shape[-1]} b0 volume(s): the noise estimate needs >= 2")
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        raise ValueError("empty mask: no noise estimate")
    return float(np.sqrt(np.mean(np.var(b0[m], axis=-1, ddof=1))))


def snr_of(data: np.ndarray, gtab, mask: np.ndarray, sigma: float | None = None) -> float:
    """SNR as the simulator defines it: the reference b0 (median of the
    brighter half of the mask's mean b0) over the noise SD."""
    sigma = noise_sigma(data, gtab, mask) if sigma is None else sigma
    return float(reference_b0(np.asarray(data), gtab, np.asarray(mask, bool)) / sigma)


def cube_voxel_mm(affine: np.ndarray) -> float:
    """Edge (mm) of an isotropic cube voxel: ``|det A|^(1/3)``."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])) ** (1 / 3))


#: Margin (fraction) around the trained cube voxel sizes that is still accepted.
VOXEL_MARGIN = 0.10


#: Name of the measured-sharpness range in a card's ``acquisition.ranges``.
SHARPNESS = "sharpness"


def training_ranges(cube_voxels, snrs=None, sharpness=None) -> dict:
    """A card's ``Acquisition.ranges`` from the training inputs: the cube voxel
    size (refused outside the trained range +- VOXEL_MARGIN: the networks'
    receptive fields are in voxels, so another voxel size is another task)
    and, when measured, the estimated SNR and the measured sharpness
    (:func:`features.sharpness`; both flagged outside the trained range:
    extrapolation of an input, e.g. another point-spread function)."""
    lo, hi = float(min(cube_voxels)), float(max(cube_voxels))
    out = {"cube_voxel_mm": {"trained": [round(lo, 4), round(hi, 4)],
                             "min": round(lo * (1 - VOXEL_MARGIN), 4),
                             "max": round(hi * (1 + VOXEL_MARGIN), 4), "action": "refuse"}}
    snrs = [v for v in (snrs or []) if v is not None]
    if snrs:
        out["snr"] = {"trained": [round(min(snrs), 2), round(max(snrs), 2)],
                      "min": round(min(snrs), 2), "max": round(max(snrs), 2), "action": "flag"}
    sharp = [v for v in (sharpness or []) if v is not None]
    if sharp:
        lo, hi = round(min(sharp), 4), round(max(sharp), 4)
        out[SHARPNESS] = {"trained": [lo, hi], "min": lo, "max": hi, "action": "flag"}
    return out


def clipped_inputs(ranges: dict, f3: features.ShellFeatures, sigma: float, snr: float | None
                   ) -> tuple[features.ShellFeatures, float]:
    """(f3, sigma) as the models are fed them: the measured sharpness and the
    SNR the noise estimate implies (``snr``; sigma scaled by snr / clipped
    snr) clipped into the card's trained ``ranges`` (unchanged without one).
    Outside those ranges a network extrapolates a constant input channel; the
    equally-fed CNN and a second diffusion seed then overshoot L2/L4 by
    factors of 2-90 on test-family inputs sharper than training (docs/models-studies.md,
    2026-12-05). Used by evaluate's ``cnn_clipped`` row; the shipped model is
    fed the measured values (clipping costs it 2-9 % NMSE)."""
    def clip(name, v):
        r = ranges.get(name)
        return v if r is None or v is None else float(np.clip(v, r["min"], r["max"]))
    if snr is not None and snr > 0:
        sigma = float(sigma) * snr / clip("snr", snr)
    sharp = clip(SHARPNESS, f3.sharpness)
    return (f3 if sharp == f3.sharpness else replace(f3, sharpness=sharp)), sigma


def taus(rish: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per order ``TAU_FRACTION * median(R_l)`` in the mask (the log floor)."""
    return TAU_FRACTION * np.median(np.asarray(rish)[mask], axis=0) + 1e-12


def log_amplitude(rish: np.ndarray, tau: np.ndarray) -> np.ndarray:
    return 0.5 * np.log(np.maximum(rish, 0.0) + tau)


def raw_condition(f3: features.ShellFeatures, sigma: float, sharpness: bool = False
                  ) -> np.ndarray:
    """(5, G, G, G) float32: log A3 (3), mask, log(sigma / s0); 0 outside the mask.
    ``sharpness``: a sixth channel, ``f3.sharpness`` in the mask."""
    m = f3.mask
    tau = taus(f3.rish, m)
    la = log_amplitude(f3.rish, tau).transpose(3, 0, 1, 2)
    s0 = np.maximum(f3.s0, 1e-6 * max(float(f3.s0[m].max()), 1e-12))
    noise = np.log(sigma / s0)
    chans = [la, m[None].astype(np.float64), noise[None]]
    if sharpness:
        if f3.sharpness is None:
            raise ValueError("no sharpness estimate (< 2 b0 volumes): the model needs it")
        chans.append(np.full((1,) + m.shape, f3.sharpness))
    out = np.concatenate(chans).astype(np.float32)
    out[:, ~m] = 0.0
    return out


def target(f3: features.ShellFeatures, f7: features.ShellFeatures, mask) -> np.ndarray:
    """(3, G, G, G) ``log lambda = log A7 - log A3`` (clipped; 0 outside ``mask``)."""
    tau = taus(f3.rish, mask)
    y = log_amplitude(f7.rish, tau) - log_amplitude(f3.rish, tau)
    y = np.clip(y, math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1])).transpose(3, 0, 1, 2)
    y[:, ~mask] = 0.0
    return y.astype(np.float32)


# ----------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------
def time_embedding(t: torch.Tensor, dim: int = TIME_DIM) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                      * (-math.log(1000.0) / max(half - 1, 1)))
    a = 1000.0 * t[:, None].float() * freqs[None]
    return torch.cat([torch.sin(a), torch.cos(a)], dim=1)


class Block(nn.Module):
    """conv - FiLM(time) - GELU - conv, residual; dilated for context."""

    def __init__(self, width: int, dilation: int, time_dim: int):
        super().__init__()
        self.c1 = nn.Conv3d(width, width, 3, padding=dilation, dilation=dilation)
        self.c2 = nn.Conv3d(width, width, 3, padding=1)
        self.film = nn.Linear(time_dim, 2 * width) if time_dim else None

    def forward(self, x, temb=None):
        h = self.c1(x)
        if self.film is not None:
            scale, shift = self.film(temb)[:, :, None, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        return x + self.c2(nn.functional.gelu(h))


class RishNet(nn.Module):
    """Dilated residual 3D CNN: (in_ch) -> 3 channels, last layer zero (output 0).

    Receptive radius ``1 + sum(dilation + 1)`` voxels (13 for the defaults).
    ``time_dim`` 0: no time input (the equally-fed CNN baseline).
    """

    def __init__(self, in_ch: int, width: int = WIDTH, blocks: int = BLOCKS,
                 time_dim: int = TIME_DIM):
        super().__init__()
        self.time_dim = time_dim
        self.inp = nn.Conv3d(in_ch, width, 3, padding=1)
        self.blocks = nn.ModuleList(Block(width, DILATIONS[i % len(DILATIONS)], time_dim)
                                    for i in range(blocks))
        self.temb = (nn.Sequential(nn.Linear(time_dim, time_dim), nn.GELU(),
                                   nn.Linear(time_dim, time_dim)) if time_dim else None)
        self.out = nn.Conv3d(width, N, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t=None):
        temb = self.temb(time_embedding(t, self.time_dim)) if self.temb is not None else None
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, temb)
        return self.out(nn.functional.gelu(h))


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule: fraction of signal variance kept at time t in [0, 1]."""
    f = torch.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
    f0 = math.cos(COSINE_S / (1 + COSINE_S) * math.pi / 2) ** 2
    return (f / f0).clamp(ALPHA_BAR_MIN, 1.0)


class _Normalised(nn.Module):
    """Buffers shared by the diffusion model and the CNN baseline: condition
    mean/SD per channel (over the training masks) and the target SD per order.
    ``sharpness``: the condition has the sharpness channel (:func:`raw_condition`)."""

    def __init__(self, sharpness: bool = False):
        super().__init__()
        self.sharpness = bool(sharpness)
        self.n_cond = N_COND_SHARP if self.sharpness else N_COND
        self.register_buffer("cond_mean", torch.zeros(self.n_cond))
        self.register_buffer("cond_std", torch.ones(self.n_cond))
        self.register_buffer("target_std", torch.ones(N))

    def raw_condition(self, f3: features.ShellFeatures, sigma: float) -> np.ndarray:
        """This model's unstandardised condition of one subject."""
        return raw_condition(f3, sigma, self.sharpness)

    @property
    def device(self) -> torch.device:
        return self.target_std.device

    def condition(self, raw: np.ndarray) -> torch.Tensor:
        """(5, G, G, G) or (B, 5, ...) raw condition -> standardised tensor on the model's
        device (mask channel kept 0/1, everything 0 outside the mask)."""
        x = torch.from_numpy(np.asarray(raw, dtype=np.float32))
        x = x[None] if x.ndim == 4 else x
        x = x.to(self.device)
        m = x[:, N:N + 1]
        z = (x - self.cond_mean.view(1, -1, 1, 1, 1)) / self.cond_std.view(1, -1, 1, 1, 1)
        z[:, N:N + 1] = m
        return z * m

    def set_normalisation(self, conds: list[np.ndarray], targets: list[np.ndarray]) -> None:
        vals = np.concatenate([c[:, c[N] > 0.5] for c in conds], axis=1)
        ys = np.concatenate([y[:, c[N] > 0.5] for c, y in zip(conds, targets)], axis=1)
        mean, std = vals.mean(axis=1), vals.std(axis=1) + 1e-6
        mean[N], std[N] = 0.0, 1.0
        self.cond_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.cond_std.copy_(torch.as_tensor(std, dtype=torch.float32))
        # RMS about 0 (identity), not the SD: a constant scale must stay learnable
        rms = np.sqrt(np.mean(ys.astype(np.float64) ** 2, axis=1)) + 1e-6
        self.target_std.copy_(torch.as_tensor(rms, dtype=torch.float32))


@register("rish-diffusion-3t7t")
class RishDiffusion3T7T(_Normalised):
    """Conditional diffusion of the per-order log scale ``log(A7/A3)``."""

    def __init__(self, grid: int = 32, width: int = WIDTH, blocks: int = BLOCKS,
                 sharpness: bool = False):
        super().__init__(sharpness)
        self.grid = int(grid)
        self.net = RishNet(N + self.n_cond, width, blocks, TIME_DIM)
        # per-order factor on the sample spread, fitted on validation subjects
        # (:func:`calibrate`); 1 = the raw sample spread
        self.register_buffer("spread_scale", torch.ones(N))

    def forward(self, y_t, cond, t):
        """Predicted normalised ``y_0`` from the noisy ``y_t``, the condition and t."""
        return self.net(torch.cat([y_t, cond], dim=1), t)

    @torch.no_grad()
    def sample(self, raw_cond: np.ndarray, samples: int = SAMPLES, steps: int = SAMPLE_STEPS,
               seed: int = 0) -> np.ndarray:
        """(K, 3, G, G, G) samples of ``log lambda`` for one subject (0 outside
        the mask). Ancestral DDPM steps on ``steps`` equally spaced times; the
        noise comes from a CPU generator seeded by ``seed`` (same result on
        any device up to float rounding)."""
        cond = self.condition(raw_cond).expand(samples, -1, -1, -1, -1)
        gen = torch.Generator().manual_seed(int(seed))
        shape = (samples, N) + tuple(cond.shape[2:])
        y = torch.randn(shape, generator=gen).to(self.device)
        ts = torch.linspace(1.0, 0.0, steps + 1, device=self.device)
        for t, s in zip(ts[:-1], ts[1:]):
            x0 = self(y, cond, t.expand(samples))
            ab_t, ab_s = alpha_bar(t), (alpha_bar(s) if s > 0 else torch.ones(()))
            ab_s = ab_s.to(self.device)
            if s <= 0:
                y = x0
                break
            a_ts = ab_t / ab_s
            beta = 1 - a_ts
            mean = (ab_s.sqrt() * beta / (1 - ab_t)) * x0 + \
                   (a_ts.sqrt() * (1 - ab_s) / (1 - ab_t)) * y
            var = beta * (1 - ab_s) / (1 - ab_t)
            y = mean + var.sqrt() * torch.randn(shape, generator=gen).to(self.device)
        y = y * self.target_std.view(1, -1, 1, 1, 1) * cond[:, N:N + 1]
        lo, hi = math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1])
        return y.clamp(lo, hi).cpu().numpy()

    def fit_subject(self, f3: features.ShellFeatures, sigma: float, samples: int = SAMPLES,
                    steps: int = SAMPLE_STEPS, seed: int = 0) -> "RishFit":
        ys = self.sample(self.raw_condition(f3, sigma), samples, steps, seed)
        return RishFit(ys.transpose(0, 2, 3, 4, 1), f3,
                       self.spread_scale.detach().cpu().numpy().astype(np.float32))


def sampling(card: cards.ModelCard, samples: int | None = None) -> tuple[int, int]:
    """(K samples per subject, ancestral steps) a checkpoint is applied with: its
    card's ``samples``/``sample_steps`` (``samples`` overrides K). One reading
    for ``dmriflow evaluate 3t7t`` and ``--inference 3t7t``."""
    k = int(samples or card.extra.get("samples", SAMPLES))
    return k, int(card.extra.get("sample_steps", SAMPLE_STEPS))


def diffusion_loss(model: RishDiffusion3T7T, batch) -> torch.Tensor:
    """x0-prediction MSE in the mask at a uniform random time per sample."""
    cond, y0, gen = batch
    b = y0.shape[0]
    dev = y0.device
    t = torch.rand(b, generator=gen).to(dev)
    eps = torch.randn(y0.shape, generator=gen).to(dev)
    ab = alpha_bar(t).view(-1, 1, 1, 1, 1)
    y0n = y0 / model.target_std.view(1, -1, 1, 1, 1)
    y_t = ab.sqrt() * y0n + (1 - ab).sqrt() * eps
    m = cond[:, N:N + 1]
    err = (model(y_t, cond, t) - y0n) ** 2 * m
    return err.sum() / (m.sum() * N).clamp_min(1.0)


@dataclass
class RishFit:
    """K samples of ``log lambda`` (K, G, G, G, 3) for one 3T subject ``f3``.

    ``spread_scale`` (per order) widens the samples about their mean for the
    uncertainty (:attr:`spread`, :meth:`interval`, :meth:`calibrated`); the
    posterior mean uses the raw samples.
    """

    samples: np.ndarray
    f3: features.ShellFeatures
    spread_scale: np.ndarray | None = None

    @property
    def scale(self) -> np.ndarray:
        return np.ones(N, np.float32) if self.spread_scale is None else self.spread_scale

    @property
    def lam(self) -> np.ndarray:
        """Posterior-mean scale: ``sqrt(mean_k lambda_k^2)`` (the mean delivered RISH)."""
        return np.sqrt(np.mean(np.exp(2.0 * self.samples), axis=0)).astype(np.float32)

    def lam_sample(self, k: int = 0) -> np.ndarray:
        return np.exp(self.samples[k]).astype(np.float32)

    def calibrated(self) -> np.ndarray:
        """The samples widened about their mean by ``spread_scale`` (K, G, G, G, 3)."""
        mu = self.samples.mean(axis=0)
        return (mu + self.scale * (self.samples - mu)).astype(np.float32)

    @property
    def raw_spread(self) -> np.ndarray:
        return self.samples.std(axis=0, ddof=1).astype(np.float32)

    @property
    def spread(self) -> np.ndarray:
        """Per-voxel predicted SD of ``log lambda`` (G, G, G, 3), calibrated."""
        return self.raw_spread * self.scale

    def rish(self, lam: np.ndarray | None = None) -> np.ndarray:
        """The RISH the rescaled 3T coefficients carry: ``lambda^2 R3``."""
        lam = self.lam if lam is None else lam
        return (lam.astype(np.float32) ** 2) * self.f3.rish

    def interval(self, nominal: float) -> tuple[np.ndarray, np.ndarray]:
        """Central ``nominal`` interval of the delivered RISH per voxel and order:
        Gaussian in ``log lambda`` (sample mean +- z SD, Student t for K samples)."""
        z = interval_z(nominal, self.samples.shape[0])
        mu, sd = self.samples.mean(axis=0), self.spread
        return (np.exp(2 * (mu - z * sd)) * self.f3.rish, np.exp(2 * (mu + z * sd)) * self.f3.rish)


def interval_z(nominal: float, k: int) -> float:
    """Half-width in sample SDs of a central ``nominal`` prediction interval from
    ``k`` Gaussian samples: ``t_{(1+p)/2, k-1} sqrt(1 + 1/k)``."""
    return float(stats.t.ppf(0.5 + nominal / 2, df=k - 1) * math.sqrt(1 + 1 / k))


#: Nominal level whose coverage :func:`calibrate` makes exact on its subjects.
CALIBRATION_LEVEL = 0.9


def calibrate(model: RishDiffusion3T7T, subjects: list, samples: int = SAMPLES,
              steps: int = SAMPLE_STEPS, level: float = CALIBRATION_LEVEL) -> np.ndarray:
    """Fit ``model.spread_scale`` so the ``level`` intervals cover exactly
    ``level`` of the true log scales on (f3, f7, sigma3, seed) validation
    subjects (pooled over their mask voxels, per order); returns it."""
    model.spread_scale.fill_(1.0)
    fits = [(model.fit_subject(f3, sigma, samples, steps, seed=seed), f7)
            for f3, f7, sigma, seed in subjects]
    scale = spread_scale_for(fits, level)
    model.spread_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
    return scale


def spread_scale_for(fits: list, level: float = CALIBRATION_LEVEL) -> np.ndarray:
    """Per order, the factor on the raw spread of (RishFit, f7) pairs that makes
    the ``level`` intervals (:meth:`RishFit.interval`) cover exactly ``level``
    of the true log scales, pooled over the subjects' mask voxels. Shared by
    the diffusion model's samples and a CNN ensemble's members."""
    ratios = [[] for _ in range(N)]
    k = None
    for fit, f7 in fits:
        f3 = fit.f3
        m = f3.mask & f7.mask
        y = target(f3, f7, f3.mask).transpose(1, 2, 3, 0)
        r = np.abs(y - fit.samples.mean(axis=0)) / np.maximum(fit.raw_spread, 1e-6)
        for j in range(N):
            ratios[j].append(r[..., j][m])
        k = fit.samples.shape[0]
    z = interval_z(level, k)
    return np.array([np.quantile(np.concatenate(r), level) / z for r in ratios])


# ----------------------------------------------------------------------------
# Intervals widened by the ensemble's disagreement
# ----------------------------------------------------------------------------
def widened(fit: RishFit, ensemble: RishFit, scale=None) -> RishFit:
    """The sampling model's uncertainty widened where the CNN ensemble disagrees:
    a :class:`RishFit` with the same sample mean whose per-voxel SD is
    ``scale * sqrt(spread_fit^2 + spread_ensemble^2)`` (both calibrated on the
    validation pairs: ``fit.spread_scale`` and the ensemble's ``c_l``), the
    samples stretched about their mean to that SD. ``scale`` (per order,
    :func:`spread_scale_for` on validation pairs; None = 1) recalibrates the
    sum. Under a shift the ensemble's members disagree more (their AUROC for
    the test family is 1.0) while the diffusion spread shrinks, so the sum
    widens there. For intervals only: the posterior mean is ``fit.lam``."""
    mu = fit.samples.mean(axis=0)
    raw = np.maximum(fit.raw_spread, 1e-6)
    total = np.sqrt(fit.spread ** 2 + ensemble.spread ** 2)
    samples = mu + (fit.samples - mu) * (total / raw)
    return RishFit(samples.astype(np.float32), fit.f3,
                   None if scale is None else np.asarray(scale, np.float32))


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
@dataclass
class RishBudget:
    steps: int = 600
    batch: int = BATCH
    patch: int = PATCH
    lr: float = 2e-3
    seed: int = 0
    threads: int = DEFAULT_THREADS


def training_arrays(pairs: list, sharpness: bool = False
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(raw conditions, targets) of (f3, f7, sigma3) training pairs."""
    conds, ys = [], []
    for f3, f7, sigma in pairs:
        conds.append(raw_condition(f3, sigma, sharpness))
        ys.append(target(f3, f7, f3.mask))
    return conds, ys


def patch_batches(conds: list[torch.Tensor], ys: list[torch.Tensor], patch: int, batch: int,
                  with_generator: bool):
    """``batch_fn(step, rng)``: random patches centred in the mask, random flips."""
    centres = [np.argwhere(c[N].numpy() > 0.5) for c in conds]
    g = conds[0].shape[-1]
    patch = min(patch, g)

    def batch_fn(step, rng):
        cs, ts = [], []
        for _ in range(batch):
            i = int(rng.integers(len(conds)))
            c = centres[i][rng.integers(len(centres[i]))]
            lo = np.clip(c - patch // 2, 0, np.asarray(conds[i].shape[1:]) - patch)
            sl = (slice(None),) + tuple(slice(int(a), int(a) + patch) for a in lo)
            dims = [1 + a for a in range(3) if rng.random() < 0.5]
            cs.append(torch.flip(conds[i][sl], dims) if dims else conds[i][sl])
            ts.append(torch.flip(ys[i][sl], dims) if dims else ys[i][sl])
        out = (torch.stack(cs), torch.stack(ts))
        if with_generator:
            out += (torch.Generator().manual_seed(int(rng.integers(2 ** 31))),)
        return out
    return batch_fn


def _standardised(model: _Normalised, conds):
    with torch.no_grad():
        return [model.condition(c).cpu()[0] for c in conds]


def fit(model: RishDiffusion3T7T, pairs: list, budget: RishBudget, log=None) -> dict:
    """Train in place on (f3, f7, sigma3) pairs; returns the training report."""
    return _fit(model, diffusion_loss, True, pairs, budget, log)


def _fit(model: _Normalised, loss, with_generator: bool, pairs: list, budget: RishBudget,
         log=None) -> dict:
    """The one training loop of both models (same data, patches and budget):
    normalise on the pairs, then ``train`` with ``loss``; ``with_generator``:
    batches carry a seeded generator for the diffusion noise (not the CNN's)."""
    conds, ys = training_arrays(pairs, model.sharpness)
    model.set_normalisation(conds, ys)
    cs = _standardised(model, conds)
    ts = [torch.from_numpy(y) for y in ys]
    cfg = TrainConfig(steps=budget.steps, lr=budget.lr, warmup=max(1, budget.steps // 10),
                      seed=budget.seed, threads=budget.threads,
                      log_every=max(1, budget.steps // 10), checkpoint_every=budget.steps,
                      validate_every=budget.steps)
    res = train(model, loss, patch_batches(cs, ts, budget.patch, budget.batch, with_generator),
                cfg, log=log)
    return {"budget": asdict(budget), "seconds": res.seconds, "history": res.history}


# ----------------------------------------------------------------------------
# The equally-fed CNN baseline
# ----------------------------------------------------------------------------
@register("rish-cnn-3t7t")
class RishResidualCNN(_Normalised):
    """The baseline with the diffusion model's inputs and output: the same
    condition (log A3, mask, noise map) -> ``log lambda`` by MSE regression
    (same network without the time input; zero last layer = identity)."""

    def __init__(self, grid: int = 32, width: int = WIDTH, blocks: int = BLOCKS,
                 sharpness: bool = False):
        super().__init__(sharpness)
        self.grid = int(grid)
        self.net = RishNet(self.n_cond, width, blocks, time_dim=0)

    def forward(self, cond):
        return self.net(cond)

    @torch.no_grad()
    def predict_lambda(self, f3: features.ShellFeatures, sigma: float) -> np.ndarray:
        """(G, G, G, 3) lambda = exp(predicted log scale), 1 outside the mask."""
        cond = self.condition(self.raw_condition(f3, sigma))
        y = self(cond) * self.target_std.view(1, -1, 1, 1, 1) * cond[:, N:N + 1]
        y = y.clamp(math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1]))
        return np.exp(y[0].permute(1, 2, 3, 0).cpu().numpy()).astype(np.float32)


def cnn_loss(model: RishResidualCNN, batch) -> torch.Tensor:
    cond, y0 = batch
    m = cond[:, N:N + 1]
    y0n = y0 / model.target_std.view(1, -1, 1, 1, 1)
    return ((model(cond) - y0n) ** 2 * m).sum() / (m.sum() * N).clamp_min(1.0)


def fit_cnn(model: RishResidualCNN, pairs: list, budget: RishBudget, log=None) -> dict:
    """Train the equally-fed CNN in place on (f3, f7, sigma3) pairs."""
    return _fit(model, cnn_loss, False, pairs, budget, log)


def ensemble_fit(members: list, f3: features.ShellFeatures, sigma: float,
                 spread_scale=None) -> RishFit:
    """The log scales of an ensemble of CNNs (``predict_lambda``) on one subject
    as a :class:`RishFit` whose "samples" are the members (spread = member SD)."""
    if len(members) < 2:
        raise ValueError(f"an ensemble needs >= 2 members for a spread, got {len(members)}")
    ys = np.stack([np.log(m.predict_lambda(f3, sigma)) for m in members])
    scale = None if spread_scale is None else np.asarray(spread_scale, np.float32)
    return RishFit(ys.astype(np.float32), f3, scale)


def load_members(folders) -> list:
    """The ensemble's CNNs (float32, CPU); every folder must hold a rish-cnn-3t7t."""
    members = []
    for f in folders:
        m, card = cards.load_checkpoint(f, device="cpu")
        if card.architecture != "rish-cnn-3t7t":
            raise ValueError(f"{f}: an ensemble member must be a rish-cnn-3t7t, "
                             f"not {card.architecture}")
        members.append(m.float())
    return members


# ----------------------------------------------------------------------------
# Out-of-distribution guard: the CNN ensemble's disagreement
# ----------------------------------------------------------------------------
#: Name of the ensemble-disagreement range in a card's ``acquisition.ranges``.
DISAGREEMENT = "ensemble_disagreement"
#: An input whose ensemble disagreement exceeds this factor times the largest
#: of the validation pairs' is flagged (the OOD study: the disagreement
#: separates every tested shift but the mildest SNR one, AUROC 1.0).
DISAGREEMENT_MARGIN = 1.1
DISAGREEMENT_DEFINITION = (
    "mean over the 3T mask voxels of the cube and over the orders L0, L2, L4 of the CNN "
    "ensemble members' SD of log lambda, each order's SD times the ensemble's spread_scale "
    "(fitted on the validation pairs so that their 90 % intervals cover exactly 90 %); "
    "flagged above max = margin x the largest value on the validation pairs")


def disagreement(fit: RishFit) -> float:
    """Mean predicted spread of ``log lambda`` over the mask and orders: the OOD
    score of an ensemble (members' SD) or of the sampling model."""
    return float(fit.spread[fit.f3.mask].mean())


def disagreement_range(fits: list, members: list[dict], validation: str,
                       margin: float = DISAGREEMENT_MARGIN) -> dict:
    """The card's ``ranges[DISAGREEMENT]`` entry from (uncalibrated ensemble
    RishFit, f7) pairs of the validation subjects: the ensemble's spread scale
    (:func:`spread_scale_for`), the disagreement of each validation pair with
    it, and the flag threshold ``margin`` x their largest. ``members``: the
    members it holds for (``checkpoint``, ``weights_sha256``), in order."""
    scale = spread_scale_for(fits)
    values = [disagreement(replace(f, spread_scale=scale)) for f, _ in fits]
    return {"min": 0.0, "max": round(margin * max(values), 6),
            "trained": [round(min(values), 6), round(max(values), 6)],
            "measured_on": "validation pairs", "action": "flag", "margin": margin,
            "values": [round(v, 6) for v in values], "validation": validation,
            "spread_scale": [round(float(c), 6) for c in scale], "members": members,
            "definition": DISAGREEMENT_DEFINITION}


def member_records(folders, root) -> list[dict]:
    """(``checkpoint`` relative to ``root``, ``weights_sha256``) of each member
    folder: what a disagreement range entry names."""
    return [{"checkpoint": Path(os.path.relpath(Path(f).resolve(), Path(root).resolve())).as_posix(),
             "weights_sha256": cards.load_card(f).weights_sha256} for f in folders]


def guard_members(entry: dict, root) -> list:
    """The members a disagreement range entry names, loaded from ``root``;
    their weights must be the recorded ones (the range holds for them only)."""
    folders = [Path(root) / m["checkpoint"] for m in entry["members"]]
    for f, m in zip(folders, entry["members"]):
        if cards.load_card(f).weights_sha256 != m["weights_sha256"]:
            raise ValueError(f"{f}: not the ensemble member the disagreement range was "
                             f"measured with (weights sha256 differs)")
    return load_members(folders)


def ensemble_disagreement(members: list, f3: features.ShellFeatures, sigma: float,
                          entry: dict) -> float:
    """The disagreement (:data:`DISAGREEMENT_DEFINITION`) of ``members`` on one
    3T subject, with the spread scale of the range ``entry``."""
    return disagreement(ensemble_fit(members, f3, sigma, entry["spread_scale"]))
