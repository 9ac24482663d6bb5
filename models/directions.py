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
of the inputs (15; it carries what the tensor misses, e.g. crossings) and
the mean b0 relative to the subject's median in the mask (1). The output is
the tensor's coefficients plus a learned correction (the last layer starts
at zero), so an untrained network *is* the DTI-prediction baseline (the
stronger classical baseline at b=1000) and training is judged by whether it
improves on it on held-out subjects.

Classical baselines on the same data (:func:`sh_interpolation`,
:func:`dti_prediction`) and the metrics (:func:`evaluate`: DWI RMSE of the
b0-normalised signal, FA RMSE against FA of the full acquisition) live here
too, so every table compares like with like.
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
from dmriflow.interfaces.sh import SHModel, n_coeffs, sh_basis, sh_pinv
from dmriflow.models.card import Acquisition, ModelCard, register, save_checkpoint
from dmriflow.models.data import (PHANTOM_SHAPE, SIGNAL_CLIP, UPSAMPLE_SHELL, DirectionSample,
                                  phantom_samples, split_dwi, split_subjects, summarise_methods,
                                  table_markdown)
from dmriflow.models.train import TrainConfig
from dmriflow.models.train import train as run_training
from dmriflow.models.volume import run_volume

#: SH order of the output (and of the tensor-prediction base) and of the LS input fit.
OUT_LMAX = 8
FEATURE_LMAX = 4
#: Directions on which the tensor prediction is sampled to get its SH coefficients.
TENSOR_SAMPLES = 200
N_FEATURES = n_coeffs(OUT_LMAX) + n_coeffs(FEATURE_LMAX) + 1
#: Training patch edge (voxels) and patches per step.
PATCH = 12
BATCH = 4
#: Architecture name in the checkpoint registry.
ARCHITECTURE = "direction-sh-cnn"


# ----------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------
def sh_features(sample: DirectionSample) -> np.ndarray:
    """(N_FEATURES, X, Y, Z) float32 features of a sample's b0s and inputs."""
    mask = sample.mask
    dense = spiral_directions(TENSOR_SAMPLES)
    tensor = dti_prediction(sample, dense)[mask]                 # (V, TENSOR_SAMPLES)
    proj = np.concatenate([sh_pinv(sh_basis(dense, OUT_LMAX), OUT_LMAX),
                           np.zeros((n_coeffs(FEATURE_LMAX), TENSOR_SAMPLES))])
    ls = sh_pinv(sh_basis(sample.input_bvecs, FEATURE_LMAX), FEATURE_LMAX)
    feats = np.zeros(mask.shape + (N_FEATURES,), dtype=np.float32)
    feats[mask, :-1] = tensor @ proj.T.astype(np.float32)
    feats[mask, n_coeffs(OUT_LMAX):-1] = sample.inputs[mask] @ ls.T.astype(np.float32)
    ref = float(np.median(sample.s0[mask])) if mask.any() else 1.0
    feats[mask, -1] = sample.s0[mask] / max(ref, 1e-12)
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


def dti_prediction(sample: DirectionSample, bvecs=None) -> np.ndarray:
    """DTI baseline: tensor (WLS) fitted to b0s + inputs, predicted at the targets."""
    fit = TensorModel(sample.gtab(0)).fit(sample.series(), sample.mask)
    bv = sample.target_bvecs if bvecs is None else np.asarray(bvecs)
    tg = type(sample.gtab(0))(np.full(len(bv), sample.bval), bv)
    pred = fit.predict(tg)
    out = np.zeros(pred.shape, np.float32)
    m = sample.mask
    out[m] = pred[m] / sample.s0[m, None]
    return np.clip(out, *SIGNAL_CLIP, out=out)


def series_fa(sample: DirectionSample, targets: np.ndarray | None) -> np.ndarray:
    """FA (WLS tensor) of b0s + inputs (+ targets) in the mask."""
    n = 0 if targets is None else targets.shape[-1]
    return np.asarray(TensorModel(sample.gtab(n)).fit(sample.series(targets), sample.mask).fa)


def _rmse(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a[mask] - b[mask]) ** 2)))


def score_synthesis(samples: list[DirectionSample], predictors: dict) -> list[dict]:
    """Per-subject metrics for each ``name -> fn(sample) -> targets`` predictor.

    ``dwi_rmse``: RMSE of the b0-normalised signal at the target directions
    against the acquired (noisy) targets, over mask voxels x targets;
    ``dwi_rmse_clean``: against the noise-free targets (phantoms);
    ``fa_rmse``: FA from b0s + inputs + predicted targets against FA from the
    full acquisition (b0s + inputs + acquired targets), in the mask.
    The row ``inputs only`` is FA from the inputs alone (no synthesis).
    """
    rows = []
    for s in samples:
        fa_full = series_fa(s, s.targets)
        rows.append({"subject": s.subject, "method": "inputs only", "dwi_rmse": math.nan,
                     "dwi_rmse_clean": math.nan,
                     "fa_rmse": _rmse(series_fa(s, None), fa_full, s.mask)})
        for name, fn in predictors.items():
            pred = fn(s)
            rows.append({"subject": s.subject, "method": name,
                         "dwi_rmse": _rmse(pred, s.targets, s.mask),
                         "dwi_rmse_clean": (_rmse(pred, s.clean_targets, s.mask)
                                            if s.clean_targets is not None else math.nan),
                         "fa_rmse": _rmse(series_fa(s, pred), fa_full, s.mask)})
    return rows


#: Metrics of the direction-synthesis tables.
METRICS = ("dwi_rmse", "dwi_rmse_clean", "fa_rmse")


def baselines() -> dict:
    return {"SH interpolation (order 4)": lambda s: sh_interpolation(s, 4),
            "SH interpolation (order 6)": lambda s: sh_interpolation(s, 6),
            "DTI prediction": dti_prediction}


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

    def score(model):
        return float(np.mean([_rmse(predict_network(model, s, feats=f), s.targets, s.mask)
                              for s, f in zip(samples, feats)]))
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
                                field_strength_t=field_strength),
        normalisation={"signal": "divided by the voxel's mean b0, clipped to "
                                 f"{list(SIGNAL_CLIP)}",
                       "features": f"SH order {OUT_LMAX} of the WLS tensor prediction + SH "
                                   f"order {FEATURE_LMAX} LS fit of the inputs + mean b0 / "
                                   f"median",
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
                       "acquisition, RMSE over the mask"}})


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
#: Phantom experiment: subjects for training / validation / held-out test.
EXPERIMENT_SUBJECTS = (10, 2, 4)
#: Seed of the phantom cohort (subjects seed, seed + 1, ...).
EXPERIMENT_SEED = 5000


def run_experiment(checkpoint_dir, state_dir=None, steps: int = 3000, resume: bool = True,
                   subjects=EXPERIMENT_SUBJECTS, seed: int = EXPERIMENT_SEED, log=print,
                   stop_after: int | None = None):
    """Phantom cohort -> train -> held-out table vs baselines -> checkpoint + card."""
    n_train, n_val, n_test = subjects
    samples = phantom_samples(n_train + n_val + n_test, seed=seed)
    train, val, test = split_subjects(samples, n_val, n_test)
    config = TrainConfig(steps=steps, lr=2e-3, warmup=100, seed=seed, checkpoint_every=100,
                         validate_every=250, log_every=50)
    model, result = train_directions(train, val, config, state_dir=state_dir, resume=resume,
                                     log=log, stop_after=stop_after)
    if result.step < steps:
        return None
    rows = score_synthesis(test, {"network": lambda s: predict_network(model, s), **baselines()})
    table = [{"split": "held-out phantom subjects", **r} for r in summarise_methods(rows, METRICS)]
    card = make_card(model, train, config, table,
                     data_description=(f"head phantom (dmriflow.interfaces.sim.phantom), "
                                       f"{n_train} training + {n_val} validation subjects "
                                       f"(seeds {seed}..), grid {PHANTOM_SHAPE} at 2.5 mm, "
                                       f"6 b0 + 90 b=1000 directions (own direction set per "
                                       f"subject), SNR 30 Rician; {len(test)} held-out test "
                                       f"subjects"),
                     voxel_size=(2.5, 2.5, 2.5), field_strength=3.0, seconds=result.seconds)
    card.training["best_step"] = result.best_step
    card.training["validation"] = result.validation
    save_checkpoint(model, card, checkpoint_dir)
    log(table_markdown(table, METRICS))
    return card


if __name__ == "__main__":   # nice -n 10 python -m dmriflow.models.directions CKPT STATE [STEPS]
    import sys
    run_experiment(sys.argv[1], sys.argv[2], steps=int(sys.argv[3]) if len(sys.argv) > 3 else 3000)


# ----------------------------------------------------------------------------
# Retraining on a user's cohort (``dmriflow train directions``)
# ----------------------------------------------------------------------------
#: Share of a user's subjects held out for validation (at least one).
VALIDATION_SHARE = 0.2
#: Training-state folder inside the output checkpoint (for --resume).
STATE_FOLDER = "training"


def train_on_subjects(subjects: list, checkpoint_dir, epochs: float = 20.0,
                      resume: bool = False, seed: int = 0, width: int = 24, blocks: int = 2,
                      field_strength=None, log=print) -> ModelCard:
    """Train a direction-synthesis model on ``subjects`` ((label, DWI) pairs, any
    iterable: a generator keeps one loaded series in memory at a time; the
    b=1000 shells are kept, in memory, for training).

    Each subject's b=1000 shell is split into 30 well-spread inputs and the
    other directions as targets; the last ``VALIDATION_SHARE`` of the
    subjects (at least one) are held out for model selection and for the
    card's table (network vs SH and DTI baselines). The training state is
    kept in ``checkpoint_dir/training`` so ``resume`` continues a stopped run.
    """
    samples, zooms = [], []
    for label, dwi in subjects:       # an iterable: one loaded series alive at a time
        samples.append(split_dwi(dwi, label))
        zooms.append(dwi.zooms)
        del dwi
    if len(samples) < 2:
        raise ValueError(f"training needs at least 2 subjects (1 is held out), got "
                         f"{len(samples)}")
    n_val = max(1, int(round(VALIDATION_SHARE * len(samples))))
    train, val, _ = split_subjects(samples, n_val, 0)
    config = TrainConfig(steps=steps_for_epochs(train, epochs), lr=2e-3, warmup=50, seed=seed,
                         checkpoint_every=50, validate_every=100, log_every=25)
    log(f"training on {len(train)} subject(s), validating on {len(val)}: "
        f"{config.steps} steps ({epochs:g} epochs)")
    state = Path(checkpoint_dir) / STATE_FOLDER
    model, result = train_directions(train, val, config, state_dir=state, resume=resume,
                                     width=width, blocks=blocks, log=log)
    rows = score_synthesis(val, {"network": lambda s: predict_network(model, s), **baselines()})
    table = [{"split": "validation subjects", **r} for r in summarise_methods(rows, METRICS)]
    card = make_card(model, train, config, table,
                     data_description=f"user cohort: {len(train)} training subjects "
                                      f"({', '.join(s.subject for s in train)}), "
                                      f"{len(val)} validation",
                     voxel_size=np.median(zooms, axis=0), field_strength=field_strength,
                     seconds=result.seconds)
    card.training["best_step"] = result.best_step
    save_checkpoint(model, card, checkpoint_dir)
    log(table_markdown(table, METRICS))
    return card
