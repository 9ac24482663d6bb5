"""Direction synthesis: predict unacquired gradient directions from a few acquired.

One network serves every target direction. It reads a 3D neighbourhood of
spherical-harmonic (SH) features of the acquired shell and outputs, per
voxel, the order-8 SH coefficients of the b0-normalised signal; the signal
at any target b-vector ``g`` is those coefficients dotted with the SH basis
at ``g``. The network is thus conditioned on the target b-vector through
``Y(g)``, works for any input and target direction set (inputs enter as SH
coefficients), and gives all targets of a voxel from one forward pass
(He et al. 2020 trained 60 U-Nets, one per output direction).

Features per voxel: the order-8 SH coefficients of the signal predicted by a
tensor (WLS) fitted to b0s + inputs (45), the order-4 least-squares SH fit
of the inputs (15; it carries what the tensor misses, e.g. crossings), the
mean b0 relative to the subject's median in the mask (1) and the noise
level: the subject's noise sigma relative to the voxel's mean b0
(:func:`noise_sigma`, 1), so one network serves a range of SNRs. The output is
the tensor's coefficients plus a learned correction (the last layer starts
at zero), so an untrained network *is* the DTI-prediction baseline (the
stronger classical baseline at b=1000) and training is judged by whether it
improves on it on held-out subjects.

Classical baselines on the same data (:func:`sh_interpolation`,
:func:`dti_prediction`, :func:`denoised_dti_prediction`) and the metrics
(:func:`score_synthesis`: DWI RMSE of the b0-normalised signal, FA RMSE
against FA of the full acquisition and, on phantoms, FA/MD RMSE against the
noise-free truth) live here too, so every table compares like with like.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dmriflow.interfaces.dti import TensorModel
from dmriflow.interfaces.gradients import spiral_directions
from dmriflow.interfaces.preprocess import mppca
from dmriflow.interfaces.sh import SHModel, n_coeffs, sh_basis, sh_pinv
from dmriflow.models.card import (Acquisition, ModelCard, load_card, register, save_checkpoint,
                                  write_card)
from dmriflow.models.data import (PHANTOM_SHAPE, SIGNAL_CLIP, TRAIN_SNR_RANGE, UPSAMPLE_SHELL,
                                  DirectionSample, phantom_samples, split_dwi, split_subjects,
                                  summarise_methods, table_markdown)
from dmriflow.models.train import TrainConfig, model_device
from dmriflow.models.train import train as run_training
from dmriflow.models.volume import run_volume

#: SH order of the output (and of the tensor-prediction base) and of the LS input fit.
OUT_LMAX = 8
FEATURE_LMAX = 4
#: Directions on which the tensor prediction is sampled to get its SH coefficients.
TENSOR_SAMPLES = 200
#: Feature channels: tensor SH, LS SH of the inputs, relative b0, noise level.
N_FEATURES = n_coeffs(OUT_LMAX) + n_coeffs(FEATURE_LMAX) + 2
#: The noise channel is NOISE_FEATURE_SCALE x sigma / b0 (about 1/SNR), capped
#: at NOISE_FEATURE_MAX (b0 near zero at the mask edge).
NOISE_FEATURE_SCALE = 10.0
NOISE_FEATURE_MAX = 5.0
#: Training patch edge (voxels) and patches per step.
PATCH = 12
BATCH = 4
#: Architecture name in the checkpoint registry.
ARCHITECTURE = "direction-sh-cnn"


# ----------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------
def noise_sigma(sample: DirectionSample) -> float:
    """The subject's noise sigma (raw signal units), estimated from its inputs.

    Per mask voxel the RMS residual of the order-:data:`FEATURE_LMAX` SH fit
    to the input directions (divided by its degrees of freedom, in raw units);
    the subject's sigma is the median over the mask (robust to the few voxels
    the fit misses). Needs more inputs than SH coefficients.
    """
    mask = sample.mask
    if not mask.any():
        return 0.0
    basis = sh_basis(sample.input_bvecs, FEATURE_LMAX)
    y = sample.inputs[mask].astype(np.float64)
    resid = y - (y @ sh_pinv(basis, FEATURE_LMAX).T) @ basis.T
    dof = max(len(sample.input_bvecs) - n_coeffs(FEATURE_LMAX), 1)
    rms = np.sqrt((resid ** 2).sum(axis=1) / dof) * sample.s0[mask]
    return float(np.median(rms))


def input_snr(sample: DirectionSample) -> float:
    """Estimated SNR of a subject: the median mean-b0 over the mask divided by
    :func:`noise_sigma` (what the card's ``snr`` range is measured in; on the
    phantoms 1.3-1.6x the simulator's SNR, whose reference is another b0)."""
    sigma = noise_sigma(sample)
    return float(np.median(sample.s0[sample.mask])) / sigma if sigma > 0 else float("inf")


def snr_ranges(train: list[DirectionSample], note: str = "") -> dict:
    """The card's ``acquisition.ranges`` from the training subjects: their
    estimated SNR (:func:`input_snr`), flagged outside - the noise level is an
    input, so another SNR is extrapolation, not a new task."""
    snrs = [input_snr(s) for s in train]
    lo, hi = round(min(snrs), 2), round(max(snrs), 2)
    return {"snr": {"min": lo, "max": hi, "trained": [lo, hi], "action": "flag",
                    "definition": "median mean-b0 over the mask / noise sigma (median "
                                  f"residual of the order-{FEATURE_LMAX} SH fit to the inputs)",
                    **({"note": note} if note else {})}}


def sh_features(sample: DirectionSample) -> np.ndarray:
    """(N_FEATURES, X, Y, Z) float32 features of a sample's b0s and inputs."""
    mask = sample.mask
    n_out, n_ls = n_coeffs(OUT_LMAX), n_coeffs(FEATURE_LMAX)
    dense = spiral_directions(TENSOR_SAMPLES)
    tensor = dti_prediction(sample, dense)[mask]                 # (V, TENSOR_SAMPLES)
    proj = sh_pinv(sh_basis(dense, OUT_LMAX), OUT_LMAX)
    ls = sh_pinv(sh_basis(sample.input_bvecs, FEATURE_LMAX), FEATURE_LMAX)
    feats = np.zeros(mask.shape + (N_FEATURES,), dtype=np.float32)
    feats[mask, :n_out] = tensor @ proj.T.astype(np.float32)
    feats[mask, n_out:n_out + n_ls] = sample.inputs[mask] @ ls.T.astype(np.float32)
    s0 = np.maximum(sample.s0[mask], 1e-12)
    ref = float(np.median(sample.s0[mask])) if mask.any() else 1.0
    feats[mask, -2] = s0 / max(ref, 1e-12)
    feats[mask, -1] = np.minimum(NOISE_FEATURE_SCALE * noise_sigma(sample) / s0,
                                 NOISE_FEATURE_MAX)
    return np.ascontiguousarray(np.moveaxis(feats, -1, 0))


def target_basis(bvecs: np.ndarray) -> np.ndarray:
    """(n, 45) float32 order-8 SH basis at the target directions (the conditioning)."""
    return sh_basis(bvecs, OUT_LMAX).astype(np.float32)


# ----------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c1 = nn.Conv3d(width, width, 3, padding=1)
        self.c2 = nn.Conv3d(width, width, 3, padding=1)

    def forward(self, x):
        return x + self.c2(nn.functional.gelu(self.c1(x)))


@register(ARCHITECTURE)
class DirectionNet(nn.Module):
    """3D residual CNN: SH features -> order-8 SH coefficients of the signal.

    ``forward(features)`` returns coefficients (B, 45, X, Y, Z); the signal at
    target directions is :meth:`signal` (coefficients x basis). ``halo``
    voxels of context on each side determine a voxel's output.
    """

    def __init__(self, width: int = 24, blocks: int = 2):
        super().__init__()
        self.width, self.blocks = int(width), int(blocks)
        self.inp = nn.Conv3d(N_FEATURES, width, 1)
        self.body = nn.Sequential(*[_Block(width) for _ in range(blocks)])
        self.out = nn.Conv3d(width, n_coeffs(OUT_LMAX), 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.halo = 2 * self.blocks

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.inp(feats))
        return feats[:, :n_coeffs(OUT_LMAX)] + self.out(self.body(h))

    @staticmethod
    def signal(coeffs: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """Signal (B, T, X, Y, Z) at targets with basis (B, T, 45) or (T, 45)."""
        if basis.dim() == 2:
            return torch.einsum("bcxyz,tc->btxyz", coeffs, basis)
        return torch.einsum("bcxyz,btc->btxyz", coeffs, basis)


# ----------------------------------------------------------------------------
# Predictions on a whole subject: network and classical baselines
# ----------------------------------------------------------------------------
def predict_network(model: DirectionNet, sample: DirectionSample, bvecs=None,
                    device=None, feats: np.ndarray | None = None) -> np.ndarray:
    """Normalised signal (X, Y, Z, n) at ``bvecs`` (default the sample's targets).

    ``feats``: the sample's :func:`sh_features` when already computed. The
    network runs on the mask's bounding box grown by its receptive radius
    (the same result as the whole grid, which is mostly background), and the
    signal is evaluated in mask voxels only.
    """
    feats = sh_features(sample) if feats is None else feats
    mask = sample.mask
    out = np.zeros(mask.shape + (len(sample.target_bvecs if bvecs is None else bvecs),),
                   dtype=np.float32)
    if not mask.any():
        return out
    idx = np.argwhere(mask)
    box = tuple(slice(max(int(lo) - model.halo, 0), min(int(hi) + 1 + model.halo, n))
                for lo, hi, n in zip(idx.min(0), idx.max(0), mask.shape))
    coeffs = run_volume(model, feats[(slice(None),) + box], halo=model.halo, device=device)
    basis = target_basis(sample.target_bvecs if bvecs is None else bvecs)
    inner = mask[box]
    out[box][inner] = coeffs[:, inner].T @ basis.T
    return np.clip(out, *SIGNAL_CLIP, out=out)


def sh_interpolation(sample: DirectionSample, lmax: int, bvecs=None) -> np.ndarray:
    """SH interpolation baseline: order-``lmax`` LS fit to the inputs, evaluated at targets."""
    fit = SHModel(sample.input_bvecs, lmax=lmax).fit(sample.inputs, sample.mask)
    out = fit.predict(sample.target_bvecs if bvecs is None else bvecs)
    out[~sample.mask] = 0.0
    return np.clip(out, *SIGNAL_CLIP, out=out)


def dti_prediction(sample: DirectionSample, bvecs=None, series=None) -> np.ndarray:
    """DTI baseline: tensor (WLS) fitted to b0s + inputs (or to ``series``, the
    same volumes processed), predicted at the targets, divided by the b0 mean."""
    series = sample.series() if series is None else series
    fit = TensorModel(sample.gtab(0)).fit(series, sample.mask)
    bv = sample.target_bvecs if bvecs is None else np.asarray(bvecs)
    tg = type(sample.gtab(0))(np.full(len(bv), sample.bval), bv)
    pred = fit.predict(tg)
    out = np.zeros(pred.shape, np.float32)
    m = sample.mask
    out[m] = pred[m] / sample.s0[m, None]
    return np.clip(out, *SIGNAL_CLIP, out=out)


#: MP-PCA of the denoise-then-DTI baseline: the package's estimator, one thread.
DENOISE_THREADS = 1


def denoised_dti_prediction(sample: DirectionSample, bvecs=None) -> np.ndarray:
    """Denoise-then-DTI baseline: MP-PCA (:func:`interfaces.preprocess.mppca`)
    of b0s + inputs, then the DTI prediction from the denoised volumes."""
    den = mppca(sample.series(), sample.mask, return_sigma=False, n_threads=DENOISE_THREADS)
    return dti_prediction(sample, bvecs, series=np.asarray(den, dtype=np.float32))


def series_fa(sample: DirectionSample, targets: np.ndarray | None) -> np.ndarray:
    """FA (WLS tensor) of b0s + inputs (+ targets) in the mask."""
    n = 0 if targets is None else targets.shape[-1]
    return np.asarray(TensorModel(sample.gtab(n)).fit(sample.series(targets), sample.mask).fa)


def _rmse(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a[mask] - b[mask]) ** 2)))


#: MD is reported in 1e-3 mm^2/s (um^2/ms).
MD_UNIT = 1e3


def series_fa_md(sample: DirectionSample, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FA and MD (1e-3 mm^2/s) of b0s + inputs + ``targets`` (WLS tensor)."""
    fit = TensorModel(sample.gtab(None)).fit(sample.series(targets), sample.mask)
    return np.asarray(fit.fa), np.asarray(fit.md) * MD_UNIT


def truth_fa_md(sample: DirectionSample) -> tuple[np.ndarray, np.ndarray] | None:
    """FA and MD of the noise-free full acquisition (phantoms; else None)."""
    if sample.clean_targets is None or sample.clean_inputs is None:
        return None
    n_b0 = sample.b0.shape[-1]
    series = np.concatenate([np.ones(sample.mask.shape + (n_b0,), np.float32),
                             sample.clean_inputs, sample.clean_targets], axis=-1)
    fit = TensorModel(sample.gtab(None)).fit(series, sample.mask)
    return np.asarray(fit.fa), np.asarray(fit.md) * MD_UNIT


def score_synthesis(samples: list[DirectionSample], predictors: dict) -> list[dict]:
    """Per-subject metrics for each ``name -> fn(sample) -> targets`` predictor.

    ``dwi_rmse``: RMSE of the b0-normalised signal at the target directions
    against the acquired (noisy) targets, over mask voxels x targets;
    ``dwi_rmse_clean``: against the noise-free targets (phantoms);
    ``fa_rmse``: FA from b0s + inputs + predicted targets against FA from the
    full acquisition (b0s + inputs + acquired targets), in the mask;
    ``fa_rmse_clean``/``md_rmse_clean``: FA/MD of b0s + inputs + predicted
    targets against the noise-free full acquisition (phantoms).
    The row ``inputs only`` is FA from the inputs alone (no synthesis).
    """
    rows = []
    for s in samples:
        fa_full = series_fa(s, s.targets)
        truth = truth_fa_md(s)

        def truth_rmse(maps):
            if truth is None:
                return {"fa_rmse_clean": math.nan, "md_rmse_clean": math.nan}
            return {"fa_rmse_clean": _rmse(maps[0], truth[0], s.mask),
                    "md_rmse_clean": _rmse(maps[1], truth[1], s.mask)}
        inputs_fit = TensorModel(s.gtab(0)).fit(s.series(), s.mask)
        rows.append({"subject": s.subject, "snr": s.snr, "method": "inputs only",
                     "dwi_rmse": math.nan, "dwi_rmse_clean": math.nan,
                     "fa_rmse": _rmse(np.asarray(inputs_fit.fa), fa_full, s.mask),
                     **truth_rmse((np.asarray(inputs_fit.fa),
                                   np.asarray(inputs_fit.md) * MD_UNIT))})
        for name, fn in predictors.items():
            pred = fn(s)
            maps = series_fa_md(s, pred)
            rows.append({"subject": s.subject, "snr": s.snr, "method": name,
                         "dwi_rmse": _rmse(pred, s.targets, s.mask),
                         "dwi_rmse_clean": (_rmse(pred, s.clean_targets, s.mask)
                                            if s.clean_targets is not None else math.nan),
                         "fa_rmse": _rmse(maps[0], fa_full, s.mask), **truth_rmse(maps)})
    return rows


#: Metrics of the direction-synthesis tables.
METRICS = ("dwi_rmse", "dwi_rmse_clean", "fa_rmse", "fa_rmse_clean", "md_rmse_clean")


def baselines(denoised: bool = True) -> dict:
    """Classical predictors; ``denoised`` adds MP-PCA-then-DTI (the slowest)."""
    out = {"SH interpolation (order 4)": lambda s: sh_interpolation(s, 4),
           "SH interpolation (order 6)": lambda s: sh_interpolation(s, 6),
           "DTI prediction": dti_prediction}
    if denoised:
        out["MP-PCA then DTI prediction"] = denoised_dti_prediction
    return out


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
@dataclass
class _Prepared:
    feats: np.ndarray        # (C, X, Y, Z)
    targets: np.ndarray      # (T, X, Y, Z)
    basis: np.ndarray        # (T, 45)
    mask: np.ndarray
    centres: np.ndarray      # mask voxel coordinates (patch centres)


def _prepare(s: DirectionSample) -> _Prepared:
    return _Prepared(sh_features(s),
                     np.ascontiguousarray(np.moveaxis(s.targets, -1, 0)),
                     target_basis(s.target_bvecs), s.mask, np.argwhere(s.mask))


def _crop(arr: np.ndarray, corner, size: int) -> np.ndarray:
    """A (..., size, size, size) crop at ``corner``, zero-padded past the edges."""
    out = np.zeros(arr.shape[:-3] + (size,) * 3, dtype=arr.dtype)
    src, dst = [], []
    for c, n in zip(corner, arr.shape[-3:]):
        lo, hi = max(c, 0), min(c + size, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - c, hi - c))
    out[(Ellipsis, *dst)] = arr[(Ellipsis, *src)]
    return out


def make_batches(train: list[DirectionSample], patch: int = PATCH, batch: int = BATCH):
    """``batch_fn(step, rng)`` for :func:`models.train.train`: random patches
    centred on mask voxels of random training subjects, with a random subset
    of as many targets as every subject has."""
    prepared = [_prepare(s) for s in train]
    n_t = min(p.targets.shape[0] for p in prepared)

    def batch_fn(step, rng):
        feats, targets, basis, masks = [], [], [], []
        for _ in range(batch):
            p = prepared[rng.integers(len(prepared))]
            centre = p.centres[rng.integers(len(p.centres))]
            corner = centre - patch // 2
            t = rng.choice(p.targets.shape[0], n_t, replace=False)
            feats.append(_crop(p.feats, corner, patch))
            targets.append(_crop(p.targets, corner, patch)[t])
            basis.append(p.basis[t])
            masks.append(_crop(p.mask, corner, patch))
        return tuple(torch.from_numpy(np.stack(a)) for a in (feats, targets, basis, masks))
    return batch_fn


def loss_fn(model: DirectionNet, batch) -> torch.Tensor:
    """Mean squared error of the normalised signal at the targets, in the mask."""
    device = next(model.parameters()).device
    feats, targets, basis, mask = (t.to(device) for t in batch)
    pred = model.signal(model(feats), basis)
    m = mask[:, None].to(pred.dtype)
    return ((pred - targets) ** 2 * m).sum() / (m.sum() * targets.shape[1]).clamp_min(1.0)


def validation_score(samples: list[DirectionSample]):
    """``validate(model)``: mean DWI RMSE on the validation subjects."""
    feats = [sh_features(s) for s in samples]

    def score(model):   # on the device the model trains on (not the default one)
        dev = model_device(model)
        return float(np.mean([_rmse(predict_network(model, s, feats=f, device=dev), s.targets,
                                    s.mask) for s, f in zip(samples, feats)]))
    return score


def steps_for_epochs(train: list[DirectionSample], epochs: float, patch: int = PATCH,
                     batch: int = BATCH) -> int:
    """Optimizer steps in which the patches cover the training voxels ``epochs`` times."""
    voxels = sum(int(s.mask.sum()) for s in train)
    return max(1, int(math.ceil(epochs * voxels / (batch * patch ** 3))))


def make_card(model: DirectionNet, train: list[DirectionSample], config, table: list[dict],
              data_description: str, voxel_size, field_strength=None, seconds=None,
              name: str = "directions", version: str = "1") -> ModelCard:
    """The model card: expected acquisition, training data and the held-out table."""
    n_input = int(train[0].inputs.shape[-1])
    return ModelCard(
        name=name, version=version, architecture=ARCHITECTURE,
        kwargs={"width": model.width, "blocks": model.blocks},
        acquisition=Acquisition(shells=[UPSAMPLE_SHELL],
                                min_directions={f"{UPSAMPLE_SHELL:g}": n_input},
                                voxel_size_mm=[float(v) for v in voxel_size],
                                field_strength_t=field_strength, ranges=snr_ranges(train)),
        normalisation={"signal": "divided by the voxel's mean b0, clipped to "
                                 f"{list(SIGNAL_CLIP)}",
                       "features": f"SH order {OUT_LMAX} of the WLS tensor prediction + SH "
                                   f"order {FEATURE_LMAX} LS fit of the inputs + mean b0 / "
                                   f"median + noise: {NOISE_FEATURE_SCALE:g} x sigma / mean "
                                   f"b0 (sigma: median SH-fit residual), capped at "
                                   f"{NOISE_FEATURE_MAX:g}",
                       "output": f"SH order {OUT_LMAX} coefficients of the normalised signal"},
        training={"data": data_description, "subjects": [s.subject for s in train],
                  "n_input": n_input, "patch": PATCH, "batch": BATCH,
                  "config": asdict(config), "seconds": seconds,
                  "device": "cpu (GPU throughput not measured)"},
        metrics=table,
        extra={"metric_definitions": {
            "dwi_rmse": "RMSE of the b0-normalised signal at held-out target directions vs "
                        "the acquired signal, over mask voxels x targets",
            "dwi_rmse_clean": "the same vs the noise-free signal (phantom only)",
            "fa_rmse": "FA (WLS DTI) of b0s + inputs + predicted targets vs FA of the full "
                       "acquisition, RMSE over the mask",
            "fa_rmse_clean": "FA of b0s + inputs + predicted targets vs FA of the noise-free "
                             "full acquisition (phantom only)",
            "md_rmse_clean": "the same for MD, in 1e-3 mm^2/s (phantom only)"}})


def train_directions(train: list[DirectionSample], val: list[DirectionSample], config,
                     state_dir=None, resume: bool = False, width: int = 24, blocks: int = 2,
                     log=None, stop_after: int | None = None):
    """Train a :class:`DirectionNet` (resumable); returns (model, TrainResult)."""
    torch.manual_seed(config.seed)
    model = DirectionNet(width=width, blocks=blocks)
    start = time.perf_counter()
    result = run_training(model, loss_fn, make_batches(train), config, state_dir=state_dir,
                 resume=resume, validate=validation_score(val) if val else None, log=log,
                 stop_after=stop_after)
    result.seconds = time.perf_counter() - start
    return result.model, result


# ----------------------------------------------------------------------------
# The experiment behind the shipped checkpoint
# ----------------------------------------------------------------------------
#: Phantom experiment: training subjects, validation (checkpoint selection)
#: subjects and held-out test subjects per test SNR level.
EXPERIMENT_SUBJECTS = (10, 2, 3)
#: SNR levels of the held-out table (training draws from TRAIN_SNR_RANGE).
TEST_SNRS = (15.0, 30.0, 60.0)
#: Seed of the phantom cohort (subjects seed, seed + 1, ...).
EXPERIMENT_SEED = 5000
#: Optimizer steps of the shipped run (about 5 CPU minutes on a shared machine).
EXPERIMENT_STEPS = 5000
#: Card version of the shipped run (2: noise input, trained over an SNR range).
EXPERIMENT_VERSION = "2"


def held_out_table(model, test: list[DirectionSample], split: str) -> list[dict]:
    """Summary rows (network vs baselines) on ``test``, one block per SNR level."""
    rows = score_synthesis(test, {"network": lambda s: predict_network(model, s), **baselines()})
    table = []
    for snr in dict.fromkeys(r["snr"] for r in rows):
        label = split if snr is None else f"{split}, SNR {snr:g}"
        table += [{"split": label, "snr": snr, **r}
                  for r in summarise_methods([r for r in rows if r["snr"] == snr], METRICS)]
    return table


def run_experiment(checkpoint_dir, state_dir=None, steps: int = EXPERIMENT_STEPS,
                   resume: bool = True, subjects=EXPERIMENT_SUBJECTS, seed: int = EXPERIMENT_SEED,
                   log=print, stop_after: int | None = None):
    """Phantom cohort over an SNR range -> train (validation subjects pick the
    checkpoint) -> table on other held-out subjects at each of TEST_SNRS vs
    baselines -> checkpoint + card."""
    n_train, n_val, n_test = subjects
    samples = phantom_samples(n_train + n_val, seed=seed, snr=TRAIN_SNR_RANGE)
    train, val, _ = split_subjects(samples, n_val, 0)
    config = TrainConfig(steps=steps, lr=2e-3, warmup=100, seed=seed, checkpoint_every=100,
                         validate_every=250, log_every=50)
    model, result = train_directions(train, val, config, state_dir=state_dir, resume=resume,
                                     log=log, stop_after=stop_after)
    if result.step < steps:
        return None
    test = []
    for k, snr in enumerate(TEST_SNRS):
        test += phantom_samples(n_test, seed=seed, snr=snr,
                                first_index=n_train + n_val + k * n_test)
    table = held_out_table(model, test, "held-out phantom subjects")
    snrs = ", ".join(f"{s.snr:.1f}" for s in train)
    card = make_card(model, train, config, table,
                     data_description=(f"head phantom (dmriflow.interfaces.sim.phantom), "
                                       f"{n_train} training + {n_val} validation subjects "
                                       f"(seeds {seed}..), grid {PHANTOM_SHAPE} at 2.5 mm, "
                                       f"6 b0 + 90 b=1000 directions (own direction set per "
                                       f"subject), Rician noise at SNR log-uniform over "
                                       f"{list(TRAIN_SNR_RANGE)} per subject (training: "
                                       f"{snrs}); {n_test} held-out test subjects at each "
                                       f"SNR of {list(TEST_SNRS)}"),
                     voxel_size=(2.5, 2.5, 2.5), field_strength=3.0, seconds=result.seconds,
                     version=EXPERIMENT_VERSION)
    card.training.update(best_step=result.best_step, validation=result.validation,
                         snr_range=list(TRAIN_SNR_RANGE),
                         selection_subjects=[s.subject for s in val],
                         table_subjects=[s.subject for s in test],
                         budget=f"{steps} steps ({result.seconds:.0f} s) on 1 thread of a "
                                f"shared 2-core CPU")
    save_checkpoint(model, card, checkpoint_dir)
    log(table_markdown(table, METRICS))
    return card


def record_snr_range(checkpoint, subjects: int = EXPERIMENT_SUBJECTS[0],
                     seed: int = EXPERIMENT_SEED) -> dict:
    """Add the SNR range of the shipped run's training subjects (re-simulated:
    seeds ``seed``.., SNRs drawn from TRAIN_SNR_RANGE) to ``checkpoint``'s card,
    which predates it; the weights are unchanged. Returns the ranges."""
    card = load_card(checkpoint)
    train = phantom_samples(subjects, seed=seed, snr=TRAIN_SNR_RANGE)
    if [s.subject for s in train] != card.training["subjects"]:
        raise ValueError(f"{checkpoint}: trained on {card.training['subjects']}, not on "
                         f"{[s.subject for s in train]}")
    card.acquisition.ranges = snr_ranges(
        train, note=f"estimated on the {subjects} training subjects, re-simulated from their "
                    f"seeds; added after training, weights unchanged")
    write_card(card, checkpoint)
    return card.acquisition.ranges


if __name__ == "__main__":   # nice -n 10 python -m dmriflow.models.directions CKPT STATE [STEPS]
    import sys
    run_experiment(sys.argv[1], sys.argv[2],
                   steps=int(sys.argv[3]) if len(sys.argv) > 3 else EXPERIMENT_STEPS)


# ----------------------------------------------------------------------------
# Retraining on a user's cohort (``dmriflow train directions``)
# ----------------------------------------------------------------------------
#: Share of a user's subjects held out for checkpoint selection, and again for the table.
VALIDATION_SHARE = 0.2
#: Fewest subjects ``train_on_subjects`` accepts (train, selection, table).
MIN_SUBJECTS = 3
#: Training-state folder inside the output checkpoint (for --resume).
STATE_FOLDER = "training"


def train_on_subjects(subjects: list, checkpoint_dir, epochs: float = 20.0,
                      resume: bool = False, seed: int = 0, width: int = 24, blocks: int = 2,
                      field_strength=None, log=print) -> ModelCard:
    """Train a direction-synthesis model on ``subjects`` ((label, DWI) pairs, any
    iterable: a generator keeps one loaded series in memory at a time; the
    b=1000 shells are kept, in memory, for training).

    Each subject's b=1000 shell is split into 30 well-spread inputs and the
    other directions as targets. Two disjoint sets of subjects are held out,
    each ``VALIDATION_SHARE`` of the cohort (at least one): the validation
    subjects pick the checkpoint, the test subjects (the last ones) give the
    card's table (network vs SH, DTI and MP-PCA-then-DTI baselines), so the
    table is not computed on the subjects that chose the model. The training
    state is kept in ``checkpoint_dir/training`` so ``resume`` continues a
    stopped run.
    """
    samples, zooms = [], []
    for label, dwi in subjects:       # an iterable: one loaded series alive at a time
        samples.append(split_dwi(dwi, label))
        zooms.append(dwi.zooms)
        del dwi
    if len(samples) < MIN_SUBJECTS:
        raise ValueError(f"training needs at least {MIN_SUBJECTS} subjects (1 to train, 1 to "
                         f"select the checkpoint, 1 for the table), got {len(samples)}")
    n_held = max(1, int(round(VALIDATION_SHARE * len(samples))))
    train, val, test = split_subjects(samples, n_held, n_held)
    config = TrainConfig(steps=steps_for_epochs(train, epochs), lr=2e-3, warmup=50, seed=seed,
                         checkpoint_every=50, validate_every=100, log_every=25)
    log(f"training on {len(train)} subject(s), validating on {len(val)}: "
        f"{config.steps} steps ({epochs:g} epochs)")
    state = Path(checkpoint_dir) / STATE_FOLDER
    model, result = train_directions(train, val, config, state_dir=state, resume=resume,
                                     width=width, blocks=blocks, log=log)
    table = held_out_table(model, test, "held-out test subjects (not used for selection)")
    card = make_card(model, train, config, table,
                     data_description=f"user cohort: {len(train)} training subjects "
                                      f"({', '.join(s.subject for s in train)}), "
                                      f"{len(val)} validation (checkpoint selection), "
                                      f"{len(test)} test (the table)",
                     voxel_size=np.median(zooms, axis=0), field_strength=field_strength,
                     seconds=result.seconds)
    card.training.update(best_step=result.best_step,
                         selection_subjects=[s.subject for s in val],
                         table_subjects=[s.subject for s in test])
    save_checkpoint(model, card, checkpoint_dir)
    log(table_markdown(table, METRICS))
    return card
