"""Every training loop feeds its batches to the device the model is on.

No GPU is needed: the loops train on the "meta" device (shape-only tensors,
no compute), ``select_device`` is patched to return it, and a forward
pre-hook on every module raises when an input tensor's device differs from
the module's parameters' device (a convolution with meta weights silently
accepts a CPU input, so the hook is what catches a batch left behind - the
bug a CUDA run hits as a crash). The optimizer is counted to prove the
loops really stepped.
"""

import numpy as np
import pytest
import torch

from dmriflow.models import train as training
from dmriflow.models.train import TrainConfig

torch.set_num_threads(1)

META = torch.device("meta")


class DeviceMismatch(AssertionError):
    pass


@pytest.fixture
def on_meta(monkeypatch):
    """Train on the meta device; fail on any module input on another device.

    Yields a dict counting optimizer steps (so a test can check that
    training ran rather than skipped the loop).
    """
    steps = {"n": 0}

    def check(module, args):
        own = [p for p in module.parameters(recurse=False)]
        if not own:
            return
        want = own[0].device
        for a in args:
            if torch.is_tensor(a) and a.is_floating_point() and a.device != want:
                raise DeviceMismatch(f"{type(module).__name__}: input on {a.device}, "
                                     f"parameters on {want}")

    real_opt = training.make_optimizer

    def counting_optimizer(model, config):
        opt = real_opt(model, config)
        step = opt.step

        def counted(*a, **k):
            steps["n"] += 1
            return step(*a, **k)
        opt.step = counted
        return opt

    monkeypatch.setattr(training, "select_device", lambda device=None: META)
    monkeypatch.setattr(training, "make_optimizer", counting_optimizer)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
    try:
        yield steps
    finally:
        handle.remove()


def test_the_hook_catches_a_batch_left_on_the_cpu(on_meta):
    """The check itself: a loss that forgets the move is caught."""
    net = torch.nn.Conv3d(2, 1, 3, padding=1).to(META)
    with pytest.raises(DeviceMismatch, match="input on cpu, parameters on meta"):
        net(torch.zeros(1, 2, 4, 4, 4))


def test_generic_loop_moves_nested_batches(on_meta):
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.Conv3d(4, 1, 1))

    def batch(step, rng):   # CPU tensors, nested as the models build them
        return {"x": torch.from_numpy(rng.standard_normal((2, 2, 6, 6, 6)).astype(np.float32)),
                "y": [torch.zeros(2, 1, 6, 6, 6)]}

    def loss(model, b):
        return ((model(b["x"]) - b["y"][0]) ** 2).mean()

    res = training.train(net, loss, batch, TrainConfig(steps=3, warmup=1, log_every=1))
    assert on_meta["n"] == 3 and training.model_device(res.model) == META
    assert np.isnan(res.history[-1]["loss"])          # meta: no values, only shapes


def test_ldm_all_stages_train_on_the_model_device(on_meta):
    from dmriflow.models.ldm.model import Budget, LatentDiffusion3T7T, fit
    rng = np.random.default_rng(0)
    g = 16
    mask = np.zeros((g, g, g), bool)
    mask[3:13, 3:13, 3:13] = True
    maps = [rng.uniform(0.1, 1.0, (g, g, g, 3)).astype(np.float32) for _ in range(4)]
    model = LatentDiffusion3T7T(grid=g, vq_widths=(8, 16), unet_channels=(16, 16, 16),
                                context_dim=8, sr_features=8, sr_blocks=1)
    fit(model, [(maps[0], mask)], [(maps[1], maps[2], mask), (maps[2], maps[3], mask)],
        Budget(vq3_steps=1, vq7_steps=1, diffusion_steps=1, sr_steps=1, vq_batch=2,
               diffusion_batch=2, sr_batch=2))
    assert on_meta["n"] == 4                          # vq3, vq7, denoiser, SR
    assert model.amp_scale.device == META


def test_faithful_ldm_both_stages_train_on_the_model_device(on_meta):
    """The shared VQ-VAE (with its dead-code reset and code count) and the
    class-conditioned denoiser. The reset's count of dead codes has no value
    on meta: torch's flag for a data-independent ``nonzero`` makes every code
    dead there, so the re-seeding runs on every step (its device handling is
    exercised, not skipped)."""
    from torch.fx.experimental import _config as fx_config
    from dmriflow.models.ldm import faithful, vqvae
    rng = np.random.default_rng(5)
    g = 16
    mask = np.zeros((g, g, g), bool)
    mask[3:13, 3:13, 3:13] = True
    maps = [rng.uniform(0.1, 1.0, (g, g, g, 3)).astype(np.float32) for _ in range(4)]
    model = faithful.FaithfulLatentDiffusion3T7T(grid=g, vq_widths=(8, 16),
                                                 unet_channels=(16, 16, 16))
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        report = faithful.fit(model, [(maps[0], mask)],
                              [(maps[1], maps[2], mask), (maps[2], maps[3], mask)],
                              faithful.FaithfulBudget(vq_steps=2, diffusion_steps=1,
                                                      vq_batch=2, diffusion_batch=2))
    assert on_meta["n"] == 3                          # vq twice, denoiser once
    assert report["vq"]["codes_reset"] == 2 * vqvae.NUM_EMBEDDINGS
    assert model.amp_scale.device == META and model.latent_scale.device == META


def test_rish_cnn_baseline_trains_on_the_model_device(on_meta):
    from dmriflow.models.ldm import baselines
    rng = np.random.default_rng(1)
    mask = np.ones((8, 8, 8), bool)
    pairs = [(rng.uniform(0.1, 1, (8, 8, 8, 3)).astype(np.float32),
              rng.uniform(0.1, 1, (8, 8, 8, 3)).astype(np.float32), mask) for _ in range(2)]
    baselines.train_cnn(pairs, steps=2, batch=2)
    assert on_meta["n"] == 2


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_dti6_trains_on_the_model_device(on_meta, kind):
    from dmriflow.models import data as md
    from dmriflow.models.experiments import dti6
    samples = [dti6.tensor_sample(s) for s in md.phantom_samples(1, seed=3, shape=(12, 14, 12))]
    cfg = TrainConfig(steps=2, warmup=1, log_every=1, checkpoint_every=2, validate_every=2)
    dti6.train_model(kind, samples, [], cfg)
    assert on_meta["n"] == 2


def test_direction_synthesis_trains_on_the_model_device(on_meta):
    from dmriflow.models import data as md
    from dmriflow.models import directions as dm
    samples = md.phantom_samples(1, seed=4, shape=(12, 14, 12))
    cfg = TrainConfig(steps=2, warmup=1, log_every=1)
    training.train(dm.DirectionNet(width=8, blocks=1), dm.loss_fn, dm.make_batches(samples),
                   cfg)
    assert on_meta["n"] == 2


def test_rish_diffusion_and_equally_fed_cnn_train_on_the_model_device(on_meta):
    from dmriflow.models.ldm import features, rishdiff
    rng = np.random.default_rng(2)
    mask = np.zeros((10, 10, 10), bool)
    mask[2:8, 2:8, 2:8] = True
    s0 = np.where(mask, 1000.0, 0).astype(np.float32)
    pairs = [(features.ShellFeatures(rng.uniform(0.1, 1, (10, 10, 10, 3)).astype(np.float32),
                                     None, s0, None, mask, np.eye(4), None),
              features.ShellFeatures(rng.uniform(0.1, 1, (10, 10, 10, 3)).astype(np.float32),
                                     None, s0, None, mask, np.eye(4), None), 20.0)
             for _ in range(2)]
    budget = rishdiff.RishBudget(steps=2, batch=2, patch=8)
    rishdiff.fit(rishdiff.RishDiffusion3T7T(grid=10, width=8, blocks=1), pairs, budget)
    rishdiff.fit_cnn(rishdiff.RishResidualCNN(grid=10, width=8, blocks=1), pairs, budget)
    assert on_meta["n"] == 4


@pytest.fixture
def default_device_elsewhere(monkeypatch):
    """A machine whose default inference device is not the one training uses
    (e.g. ``train(device="cpu")`` on a CUDA host): ``run_volume`` without an
    explicit device would pick "meta". Validation must still run where the
    model trains; moving the model would leave the optimizer's state behind."""
    from dmriflow.models import volume
    real = volume.select_device
    monkeypatch.setattr(volume, "select_device",
                        lambda device=None: META if device is None else real(device))


def _assert_validated_on_the_cpu(res):
    assert training.model_device(res.model).type == "cpu"
    assert res.validation and all(np.isfinite(v["score"]) for v in res.validation)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_dti6_validation_runs_on_the_training_device(default_device_elsewhere, kind):
    from dmriflow.models import data as md
    from dmriflow.models.experiments import dti6
    samples = [dti6.tensor_sample(s) for s in md.phantom_samples(2, seed=3, shape=(12, 14, 12))]
    cfg = TrainConfig(steps=2, warmup=1, log_every=1, checkpoint_every=2, validate_every=1)
    _, res = dti6.train_model(kind, samples[:1], samples[1:], cfg)
    _assert_validated_on_the_cpu(res)


def test_direction_validation_runs_on_the_training_device(default_device_elsewhere):
    from dmriflow.models import data as md
    from dmriflow.models import directions as dm
    samples = md.phantom_samples(2, seed=4, shape=(12, 14, 12))
    cfg = TrainConfig(steps=2, warmup=1, log_every=1, validate_every=1)
    res = training.train(dm.DirectionNet(width=8, blocks=1), dm.loss_fn,
                         dm.make_batches(samples[:1]), cfg,
                         validate=dm.validation_score(samples[1:]))
    _assert_validated_on_the_cpu(res)
