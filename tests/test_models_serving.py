"""Checkpoints (safetensors + JSON model card): round trip, refusals, no pickle."""

import json
import pickle

import numpy as np
import pytest
import torch

from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.gradients import GradientTable
from dmriflow.interfaces.gradients import electrostatic_directions
from dmriflow.models import card as mc


@mc.register("test-tiny-net")
class TinyNet(torch.nn.Module):
    def __init__(self, width: int = 8, n_in: int = 4):
        super().__init__()
        self.a = torch.nn.Linear(n_in, width)
        self.b = torch.nn.Linear(width, 1)
        self.register_buffer("scale", torch.full((1,), 2.0))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.scale


def _card(**acq) -> mc.ModelCard:
    acquisition = mc.Acquisition(**{"shells": [1000.0], "min_directions": {"1000": 30},
                                    "voxel_size_mm": [2.5, 2.5, 2.5], "field_strength_t": 3.0,
                                    **acq})
    return mc.ModelCard(name="tiny", version="1", architecture="test-tiny-net",
                        kwargs={"width": 8, "n_in": 4}, acquisition=acquisition,
                        normalisation={"signal": "mean b0"},
                        training={"data": "unit test"},
                        metrics=[{"split": "held-out", "rmse": 0.5}])


def _saved(tmp_path, seed=0):
    torch.manual_seed(seed)
    net = TinyNet(width=8, n_in=4)
    folder = mc.save_checkpoint(net, _card(), tmp_path / "ckpt")
    return net, folder


def _gtab(n_dirs=30, bval=1000.0, n_b0=2):
    dirs = electrostatic_directions(n_dirs, seed=1)
    return GradientTable(np.r_[np.zeros(n_b0), np.full(n_dirs, bval)],
                         np.r_[np.zeros((n_b0, 3)), dirs])


def test_round_trip_gives_identical_outputs(tmp_path):
    net, folder = _saved(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [mc.CARD_FILE, mc.WEIGHTS_FILE]
    loaded, card = mc.load_checkpoint(folder, device="cpu")
    x = torch.randn(64, 4)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))
    assert not loaded.training
    assert card.metrics == [{"split": "held-out", "rmse": 0.5}]
    assert card.weights_sha256 == mc.sha256_bytes((folder / mc.WEIGHTS_FILE).read_bytes())
    assert mc.metrics_rows(card) == [{"model": "tiny", "version": "1", "split": "held-out",
                                      "rmse": 0.5}]
    # the card.json path works as well as the folder
    again, _ = mc.load_checkpoint(folder / mc.CARD_FILE)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))


def test_card_that_does_not_rebuild_the_model_is_refused_at_save(tmp_path):
    card = _card()
    card.kwargs = {"width": 16, "n_in": 4}
    with pytest.raises(ValueError, match="does not rebuild"):
        mc.save_checkpoint(TinyNet(width=8), card, tmp_path / "x")


def test_matching_acquisition_passes_and_mismatches_are_named(tmp_path):
    card = _card()
    mc.check_acquisition(card, _gtab(30), "sub-01_dwi.nii.gz", zooms=(2.5, 2.5, 2.5),
                         field_strength=3.0)
    mc.check_acquisition(card, _gtab(64), "x", zooms=(2.55, 2.45, 2.5))   # more is fine
    cases = [
        (dict(data=_gtab(20)), "b=1000 has 20 directions, the model needs >= 30"),
        (dict(data=_gtab(30, bval=2000.0)), "no b=1000 shell"),
        (dict(data=_gtab(30, n_b0=0)), "0 b0 volume"),
        (dict(data=_gtab(30), zooms=(1.25, 1.25, 1.25)), "voxel size 1.25x1.25x1.25 mm"),
        (dict(data=_gtab(30), zooms=(2.5, 2.5, 2.5), field_strength=7.0),
         "field strength 7 T"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(InputError) as err:
            mc.check_acquisition(card, path="/data/sub-02_dwi.nii.gz", **kwargs)
        assert err.value.path == "/data/sub-02_dwi.nii.gz"
        assert expected in str(err.value), str(err.value)
        assert "tiny 1" in str(err.value)


def test_census_rows_are_checked_like_gradient_tables():
    card = _card()
    ok = {"shells": "1000 2000", "directions": "90 90", "n_b0": 6,
          "voxel_size_mm": "2.5x2.5x2.5", "field_strength_t": 3.0}
    mc.check_acquisition(card, ok, "ok.nii.gz")
    mc.check_acquisition(card, {**ok, "field_strength_t": float("nan")}, "ok.nii.gz")
    with pytest.raises(InputError, match="voxel size 1.25x1.25x1.25.*field strength 7 T"):
        mc.check_acquisition(card, {**ok, "voxel_size_mm": "1.25x1.25x1.25",
                                    "field_strength_t": 7.0}, "bad.nii.gz")


def test_tampered_weights_are_refused(tmp_path):
    _, folder = _saved(tmp_path)
    path = folder / mc.WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01                      # one bit in the last tensor's values
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match the model card") as err:
        mc.load_checkpoint(folder)
    assert err.value.path == str(path)


def test_weights_of_another_checkpoint_are_refused(tmp_path):
    _, folder = _saved(tmp_path, seed=0)
    other = mc.save_checkpoint(TinyNet(), _card(), tmp_path / "other")
    (folder / mc.WEIGHTS_FILE).write_bytes((other / mc.WEIGHTS_FILE).read_bytes())
    with pytest.raises(InputError, match="sha256"):
        mc.load_checkpoint(folder)


class _Payload:
    """Unpickling this writes a marker file: proof that something was unpickled."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_no_pickle_is_ever_loaded(tmp_path, monkeypatch):
    _, folder = _saved(tmp_path)
    marker = tmp_path / "UNPICKLED"
    _Payload.marker = marker
    for name in ("model.pt", "model.pth", "model.pkl", "optimizer.bin"):
        (folder / name).write_bytes(pickle.dumps(_Payload()))
    # the payload works when unpickled (so the test could fail)
    pickle.loads((folder / "model.pt").read_bytes())
    assert marker.exists()
    marker.unlink()

    def forbidden(*a, **k):
        raise AssertionError("pickle used while loading a checkpoint")
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)

    net, _ = mc.load_checkpoint(folder)            # loads, ignoring the .pt/.pkl files
    assert isinstance(net, TinyNet)
    for name in ("model.pt", "model.pkl"):
        with pytest.raises(InputError, match="never loaded"):
            mc.load_checkpoint(folder / name)
    # a card pointing at a pickle (or outside the folder) is refused before reading it
    for bad in ("model.pt", "../model.safetensors", "optimizer.bin"):
        d = json.loads((folder / mc.CARD_FILE).read_text())
        d["weights_file"] = bad
        (folder / mc.CARD_FILE).write_text(json.dumps(d))
        with pytest.raises(InputError, match="must be a .safetensors file"):
            mc.load_checkpoint(folder)
    assert not marker.exists()


def test_broken_cards_are_input_errors(tmp_path):
    _, folder = _saved(tmp_path)
    card_path = folder / mc.CARD_FILE
    good = json.loads(card_path.read_text())
    for text, match in [("{not json", "cannot read the model card"),
                        (json.dumps({**good, "evil": 1}), "unknown keys"),
                        (json.dumps({**good, "architecture": "nope"}), "unknown architecture"),
                        (json.dumps({**good, "schema": 99}), "newer"),
                        (json.dumps({**good, "weights_sha256": ""}), "no sha256")]:
        card_path.write_text(text)
        with pytest.raises(InputError, match=match):
            mc.load_checkpoint(folder)
    with pytest.raises(InputError, match="model card not found"):
        mc.load_checkpoint(tmp_path / "empty" / mc.CARD_FILE)


# ----------------------------------------------------------------------------
# Resumable training (models.train)
# ----------------------------------------------------------------------------
from dmriflow.models import train as mt  # noqa: E402


def _regression():
    """y = sin(x0) + x1 * x2: a small model learns it; batches from (step, rng)."""
    def batch(step, rng):
        x = torch.from_numpy(rng.uniform(-1, 1, (32, 4)).astype(np.float32))
        y = torch.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3]
        return x, y

    def loss(model, b):
        x, y = b
        return torch.nn.functional.mse_loss(torch.nn.functional.dropout(model(x), 0.1,
                                                                        model.training), y)

    def validate(model):
        x, y = batch(-1, np.random.default_rng(123))
        return float(torch.nn.functional.mse_loss(model(x), y))
    return batch, loss, validate


def test_training_loss_decreases_and_resume_equals_uninterrupted_run(tmp_path):
    batch, loss, validate = _regression()
    cfg = mt.TrainConfig(steps=60, lr=1e-2, warmup=5, seed=3, checkpoint_every=7,
                         validate_every=20, log_every=10, threads=1)
    torch.manual_seed(0)
    full = mt.train(TinyNet(width=16), loss, batch, cfg, state_dir=tmp_path / "a",
                    validate=validate)
    assert full.history[-1]["loss"] < 0.5 * full.history[0]["loss"]
    assert full.best_step in (20, 40, 60) and len(full.validation) == 3

    torch.manual_seed(0)
    part = mt.train(TinyNet(width=16), loss, batch, cfg, state_dir=tmp_path / "b",
                    validate=validate, stop_after=25)
    assert part.step == 25
    torch.manual_seed(99)                  # a different init: resume must overwrite it
    rest = mt.train(TinyNet(width=16), loss, batch, cfg, state_dir=tmp_path / "b",
                    validate=validate, resume=True)
    assert rest.resumed_from == 25 and rest.step == 60
    assert rest.history == full.history and rest.validation == full.validation
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, rest.model.state_dict()[k]), k

    # a changed config cannot resume; a tampered state is refused
    with pytest.raises(ValueError, match="config changed"):
        mt.train(TinyNet(width=16), loss, batch, mt.TrainConfig(**{**cfg.__dict__, "lr": 0.1}),
                 state_dir=tmp_path / "b", resume=True)
    tensors = tmp_path / "b" / mt.STATE_TENSORS
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0x01
    tensors.write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match"):
        mt.train(TinyNet(width=16), loss, batch, cfg, state_dir=tmp_path / "b", resume=True)


def test_training_is_deterministic_for_a_seed_and_differs_across_seeds():
    batch, loss, _ = _regression()
    results = []
    for seed in (1, 1, 2):
        torch.manual_seed(0)
        cfg = mt.TrainConfig(steps=15, lr=1e-2, warmup=3, seed=seed, threads=1, log_every=5)
        results.append(mt.train(TinyNet(width=8), loss, batch, cfg).model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert not torch.equal(results[0]["a.weight"], results[2]["a.weight"])
