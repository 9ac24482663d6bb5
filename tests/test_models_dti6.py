"""The DTI-from-6-directions experiment: data, classical fit, MLP and patch CNN."""

import numpy as np
import pytest

from dmriflow.interfaces.dti import TensorModel
from dmriflow.interfaces.gradients import electrostatic_directions
from dmriflow.models import card as mc
from dmriflow.models import data as md
from dmriflow.models.experiments import dti6
from dmriflow.models.train import TrainConfig

SMALL = (20, 24, 20)


def _pure_tensor_sample(shape=(5, 4, 3)):
    """Noise-free signals of one known tensor per voxel, as a direction sample."""
    rng = np.random.default_rng(11)
    n = int(np.prod(shape))
    evals = np.sort(rng.uniform(0.2, 1.8, (n, 3)), axis=1)[:, ::-1]          # um^2/ms
    rot = np.linalg.qr(rng.standard_normal((n, 3, 3)))[0]
    D = np.einsum("nij,nj,nkj->nik", rot, evals, rot)
    dirs = electrostatic_directions(90, seed=4)
    signal = np.exp(-np.einsum("ti,nij,tj->nt", dirs, D, dirs)).reshape(shape + (90,))
    signal = signal.astype(np.float32)
    s0 = np.full(shape, 500.0, np.float32)
    sample = md.DirectionSample("pure", signal[..., :30], dirs[:30], signal[..., 30:],
                                dirs[30:], np.repeat(s0[..., None], 3, axis=-1), s0,
                                np.ones(shape, bool), 1000.0, clean_targets=signal[..., 30:],
                                clean_inputs=signal[..., :30])
    elements = np.stack([D[:, 0, 0], D[:, 1, 1], D[:, 2, 2], D[:, 0, 1], D[:, 0, 2],
                         D[:, 1, 2]]).reshape((6,) + shape)
    return sample, elements


def test_pure_tensor_target_classical_fit_and_inputs_recover_the_tensor():
    sample, truth = _pure_tensor_sample()
    s = dti6.tensor_sample(sample)
    m = s.mask
    assert s.inputs.shape == (dti6.N_INPUT,) + m.shape
    assert np.abs(s.target - truth)[:, m].max() < 2e-3
    assert np.abs(dti6.classical(s) - truth)[:, m].max() < 2e-3
    # the 6 ADC inputs determine the tensor linearly: ADC_i = g_i^T D g_i
    g = s.six.input_bvecs
    A = np.column_stack([g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2, 2 * g[:, 0] * g[:, 1],
                         2 * g[:, 0] * g[:, 2], 2 * g[:, 1] * g[:, 2]])
    solved = np.linalg.solve(A, s.inputs[:6, m])
    assert np.abs(solved - truth[:, m]).max() < 2e-3


def test_maps_agree_with_the_tensor_fit():
    sample, _ = _pure_tensor_sample()
    gtab = sample.gtab(None)
    fit = TensorModel(gtab).fit(sample.series(sample.targets), sample.mask)
    maps = dti6.maps_of(dti6._elements(fit), sample.mask)
    assert np.abs(maps["fa"] - np.asarray(fit.fa)[sample.mask]).max() < 1e-4
    assert np.abs(maps["md"] - 1000 * np.asarray(fit.md)[sample.mask]).max() < 1e-4


@pytest.fixture(scope="module")
def samples():
    return [dti6.tensor_sample(s) for s in md.phantom_samples(3, seed=77, shape=SMALL)]


def test_six_noisy_directions_are_far_worse_than_ninety(samples):
    rows = dti6.score_tensor_fits(samples[:1], {"six": dti6.classical,
                                       "full": lambda s: dti6.classical(s, full=True)})
    six, full = rows
    assert full["tensor_rmse"] < 0.5 * six["tensor_rmse"]
    assert full["fa_rmse"] < 0.5 * six["fa_rmse"]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_training_lowers_the_loss_deterministically_and_round_trips(samples, kind, tmp_path):
    cfg = TrainConfig(steps=40, lr=3e-3, warmup=5, seed=5, log_every=10, threads=1)
    a, res_a = dti6.train_model(kind, samples[:2], [], cfg)
    b, res_b = dti6.train_model(kind, samples[:2], [], cfg)
    assert res_a.history[-1]["loss"] < 0.5 * res_a.history[0]["loss"]
    assert res_a.history == res_b.history
    pred = dti6.predict(a, samples[2])
    assert pred.shape == (6,) + SMALL
    assert np.array_equal(pred, dti6.predict(b, samples[2]))
    card = mc.ModelCard(name=f"dti6-{kind}", version="test", architecture=a.architecture,
                        kwargs={}, acquisition=mc.Acquisition(shells=[1000.0],
                                                              min_directions={"1000": 6}))
    mc.save_checkpoint(a, card, tmp_path / kind)
    loaded, _ = mc.load_checkpoint(tmp_path / kind, device="cpu")
    assert np.array_equal(dti6.predict(loaded, samples[2]), pred)

