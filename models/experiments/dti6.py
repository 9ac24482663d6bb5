"""The review's first experiment: the diffusion tensor from 6 directions.

Karimi & Warfield (2024) start with predicting DTI from 6 diffusion
directions, first voxel-wise with an MLP, then with a patch CNN, against the
classical fit. Here, on held-out phantom subjects:

* input: b0s and 6 well-spread b=1000 directions, as apparent diffusion
  coefficients ``ADC_i = -ln(S_i / S0) / b`` (um^2/ms) plus ``ln`` of the
  mean b0 relative to the subject's median (7 values per voxel),
* target: the 6 tensor elements (Dxx, Dyy, Dzz, Dxy, Dxz, Dyz, um^2/ms) of a
  WLS fit to the *noise-free* full series (b0s + 90 directions) - not a noisy
  classical fit (the review warns about such targets),
* models: :class:`TensorMLP` (one voxel), :class:`TensorPatchCNN`
  (3D neighbourhood, ``halo`` voxels each side), and the classical WLS fit to
  the same b0s + 6 directions; the WLS fit to the noisy full 90 directions is
  listed as a reference,
* metrics: RMSE of the tensor elements, FA and MD against the target, over
  the mask.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dmriflow.interfaces.dti import (B_UNIT, MIN_SIGNAL, TensorModel, eig_sym3,
                                     fractional_anisotropy, mean_diffusivity)
from dmriflow.interfaces.gradients import GradientTable
from dmriflow.models.card import register
from dmriflow.models.data import (DirectionSample, phantom_samples, split_subjects, spread_subset,
                                  summarise_methods, table_markdown)
from dmriflow.models.directions import _crop
from dmriflow.models.train import TrainConfig, model_device
from dmriflow.models.train import train as run_training
from dmriflow.models.volume import run_volume

#: Directions of the acquisition the models see.
N_DIRECTIONS = 6
N_INPUT = N_DIRECTIONS + 1
#: Patch edge and patches per step (CNN); voxels per step (MLP).
PATCH = 12
PATCH_BATCH = 6
VOXEL_BATCH = 2048
#: Experiment: phantom subjects for training / validation / held-out test, and seed.
EXPERIMENT_SUBJECTS = (8, 2, 4)
EXPERIMENT_SEED = 7000
EXPERIMENT_STEPS = {"mlp": 3000, "cnn": 1500}
#: Metrics of the table: RMSE of tensor elements (um^2/ms), FA, MD (um^2/ms).
METRICS = ("tensor_rmse", "fa_rmse", "md_rmse")


@dataclass
class TensorSample:
    """Inputs (7, X, Y, Z), target elements (6, X, Y, Z), mask, and the raw data
    needed for the classical fits."""

    subject: str
    inputs: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    six: DirectionSample          # b0s + the 6 input directions (noisy)
    full: DirectionSample         # b0s + all 90 noisy directions (reference fit)


def _elements(fit) -> np.ndarray:
    """(6, X, Y, Z) Dxx, Dyy, Dzz, Dxy, Dxz, Dyz in um^2/ms of a TensorFit."""
    d = fit.quadratic_form * B_UNIT
    return np.stack([d[..., 0, 0], d[..., 1, 1], d[..., 2, 2],
                     d[..., 0, 1], d[..., 0, 2], d[..., 1, 2]]).astype(np.float32)


def _unit_b0_gtab(bvecs: np.ndarray, bval: float) -> GradientTable:
    return GradientTable(np.r_[0.0, np.full(len(bvecs), bval)], np.r_[np.zeros((1, 3)), bvecs])


def tensor_sample(sample: DirectionSample) -> TensorSample:
    """A 6-direction sample from a direction-upsampling sample with noise-free signals."""
    if sample.clean_inputs is None or sample.clean_targets is None:
        raise ValueError("the 6-direction experiment needs noise-free signals (phantoms)")
    m = sample.mask
    all_vecs = np.concatenate([sample.input_bvecs, sample.target_bvecs])
    pick = spread_subset(all_vecs, N_DIRECTIONS)
    noisy = np.concatenate([sample.inputs, sample.targets], axis=-1)
    clean = np.concatenate([sample.clean_inputs, sample.clean_targets], axis=-1)
    six = DirectionSample(sample.subject, noisy[..., pick], all_vecs[pick],
                          noisy[..., :0], all_vecs[:0], sample.b0, sample.s0, m, sample.bval)
    adc = -np.log(np.maximum(six.inputs, MIN_SIGNAL)) / sample.bval * B_UNIT
    ref = float(np.median(sample.s0[m]))
    inputs = np.zeros((N_INPUT,) + m.shape, np.float32)
    inputs[:N_DIRECTIONS, m] = adc[m].T
    inputs[N_DIRECTIONS, m] = np.log(np.maximum(sample.s0[m], 1e-6) / ref)
    # target: WLS fit to the noise-free normalised series (S0 = 1, all 90 directions)
    series = np.concatenate([np.ones(m.shape + (1,), np.float32), clean], axis=-1)
    target = _elements(TensorModel(_unit_b0_gtab(all_vecs, sample.bval)).fit(series, m))
    full = DirectionSample(sample.subject, noisy, all_vecs, noisy[..., :0], all_vecs[:0],
                           sample.b0, sample.s0, m, sample.bval)
    return TensorSample(sample.subject, inputs, target, m, six, full)


def maps_of(elements: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """FA and MD (um^2/ms) of tensor elements (6, X, Y, Z) in the mask."""
    e = [elements[k][mask] for k in range(6)]
    evals, _ = eig_sym3(e[0], e[1], e[2], e[3], e[4], e[5])
    return {"fa": np.clip(np.nan_to_num(fractional_anisotropy(evals)), 0, 1),
            "md": mean_diffusivity(evals)}


def classical(s: TensorSample, full: bool = False) -> np.ndarray:
    """Elements of the WLS fit to b0s + the 6 directions (or to all 90 with ``full``)."""
    src = s.full if full else s.six
    return _elements(TensorModel(src.gtab(0)).fit(src.series(), s.mask))


# ----------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------
@register("dti6-mlp")
class TensorMLP(nn.Module):
    """Voxel-wise MLP: 6 ADCs + ln relative b0 -> 6 tensor elements (um^2/ms).

    Written as 1x1x1 convolutions so it runs on volumes like the CNN.
    """

    def __init__(self, width: int = 64, depth: int = 3):
        super().__init__()
        layers, n = [], N_INPUT
        for _ in range(depth):
            layers += [nn.Conv3d(n, width, 1), nn.GELU()]
            n = width
        layers.append(nn.Conv3d(n, 6, 1))
        self.net = nn.Sequential(*layers)
        self.halo = 0

    def forward(self, x):
        return self.net(x)


@register("dti6-cnn")
class TensorPatchCNN(nn.Module):
    """Patch CNN: the same inputs with 3D context (receptive radius ``halo``)."""

    def __init__(self, width: int = 32, layers: int = 3):
        super().__init__()
        mods, n = [], N_INPUT
        for _ in range(layers):
            mods += [nn.Conv3d(n, width, 3, padding=1), nn.GELU()]
            n = width
        mods += [nn.Conv3d(n, width, 1), nn.GELU(), nn.Conv3d(width, 6, 1)]
        self.net = nn.Sequential(*mods)
        self.halo = layers

    def forward(self, x):
        return self.net(x)


def predict(model: nn.Module, s: TensorSample, device=None) -> np.ndarray:
    out = run_volume(model, s.inputs, halo=model.halo, device=device)
    out[:, ~s.mask] = 0.0
    return out


def _batches_cnn(samples: list[TensorSample]):
    centres = [np.argwhere(s.mask) for s in samples]

    def batch_fn(step, rng):
        x, y, m = [], [], []
        for _ in range(PATCH_BATCH):
            i = rng.integers(len(samples))
            corner = centres[i][rng.integers(len(centres[i]))] - PATCH // 2
            x.append(_crop(samples[i].inputs, corner, PATCH))
            y.append(_crop(samples[i].target, corner, PATCH))
            m.append(_crop(samples[i].mask, corner, PATCH))
        return tuple(torch.from_numpy(np.stack(a)) for a in (x, y, m))
    return batch_fn


def _batches_mlp(samples: list[TensorSample]):
    x = np.concatenate([s.inputs[:, s.mask] for s in samples], axis=1)
    y = np.concatenate([s.target[:, s.mask] for s in samples], axis=1)

    def batch_fn(step, rng):
        idx = rng.integers(x.shape[1], size=VOXEL_BATCH)
        # voxels along one spatial axis: a (1, C, n, 1, 1) "volume" (1x1x1 convolutions)
        return (torch.from_numpy(x[:, idx][None, :, :, None, None].copy()),
                torch.from_numpy(y[:, idx][None, :, :, None, None].copy()),
                torch.ones(1, VOXEL_BATCH, 1, 1, dtype=torch.bool))
    return batch_fn


def loss_fn(model, batch) -> torch.Tensor:
    """MSE of the tensor elements (um^2/ms) over mask voxels."""
    x, y, m = batch
    m = m[:, None].to(torch.float32)
    return ((model(x) - y) ** 2 * m).sum() / (m.sum() * 6).clamp_min(1.0)


def _score(samples):
    def score(model):   # on the device the model trains on (not the default one)
        dev = model_device(model)
        return float(np.mean([_rmse(predict(model, s, device=dev), s.target, s.mask)
                              for s in samples]))
    return score


def _rmse(a, b, mask) -> float:
    return float(np.sqrt(np.mean((a[:, mask] - b[:, mask]) ** 2)))


def score_tensor_fits(samples: list[TensorSample], predictors: dict) -> list[dict]:
    """Per-subject RMSE of tensor elements, FA and MD against the target."""
    rows = []
    for s in samples:
        truth = maps_of(s.target, s.mask)
        for name, fn in predictors.items():
            pred = fn(s)
            maps = maps_of(pred, s.mask)
            rows.append({"subject": s.subject, "method": name,
                         "tensor_rmse": _rmse(pred, s.target, s.mask),
                         "fa_rmse": float(np.sqrt(np.mean((maps["fa"] - truth["fa"]) ** 2))),
                         "md_rmse": float(np.sqrt(np.mean((maps["md"] - truth["md"]) ** 2)))})
    return rows


def train_model(kind: str, train: list[TensorSample], val: list[TensorSample], config,
                state_dir=None, resume: bool = False, log=None, stop_after=None):
    """Train the ``"mlp"`` or ``"cnn"`` model; returns (model, TrainResult)."""
    torch.manual_seed(config.seed)
    model = TensorMLP() if kind == "mlp" else TensorPatchCNN()
    batches = _batches_mlp(train) if kind == "mlp" else _batches_cnn(train)
    start = time.perf_counter()
    result = run_training(model, loss_fn, batches, config, state_dir=state_dir, resume=resume,
                 validate=_score(val) if val else None, log=log, stop_after=stop_after)
    result.seconds = time.perf_counter() - start
    return result.model, result


def run_experiment(steps: dict | None = None, subjects=EXPERIMENT_SUBJECTS,
                   seed: int = EXPERIMENT_SEED, state_dir=None, log=print) -> list[dict]:
    """Phantom cohort -> MLP and patch CNN vs the classical fit -> held-out table.

    ``steps``: optimizer steps per model kind (default :data:`EXPERIMENT_STEPS`).
    """
    n_train, n_val, n_test = subjects
    samples = [tensor_sample(s) for s in phantom_samples(sum(subjects), seed=seed)]
    train, val, test = split_subjects(samples, n_val, n_test)
    models = {}
    for kind in ("mlp", "cnn"):
        cfg = TrainConfig(steps=(steps or EXPERIMENT_STEPS)[kind], lr=2e-3, warmup=50,
                          seed=seed, validate_every=100, log_every=50, checkpoint_every=100)
        sd = None if state_dir is None else Path(state_dir) / kind
        models[kind], res = train_model(kind, train, val, cfg, state_dir=sd, resume=True,
                                        log=log)
        log(f"{kind}: {res.step} steps in {res.seconds:.0f} s, best validation "
            f"{res.best_score:.4g} at {res.best_step}")
    rows = score_tensor_fits(test, {
        "classical WLS, 6 directions": lambda s: classical(s),
        "MLP, 6 directions": lambda s: predict(models["mlp"], s),
        "patch CNN, 6 directions": lambda s: predict(models["cnn"], s),
        "classical WLS, all 90 directions (reference)": lambda s: classical(s, full=True)})
    return summarise_methods(rows, METRICS)


if __name__ == "__main__":   # nice -n 10 python -m dmriflow.models.experiments.dti6 [STATE_DIR]
    table = run_experiment(state_dir=sys.argv[1] if len(sys.argv) > 1 else None)
    print(table_markdown(table, METRICS))
