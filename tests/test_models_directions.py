"""Direction synthesis: paired data, baselines on known signals, the network, training."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.gradients import GradientTable
from dmriflow.interfaces.io import DWI
from dmriflow.interfaces.gradients import electrostatic_directions, min_pair_angle
from dmriflow.models import card as mc
from dmriflow.models import data as md
from dmriflow.models import directions as dm
from dmriflow.models.train import TrainConfig

SMALL = (20, 24, 20)


@pytest.fixture(scope="module")
def samples():
    return md.phantom_samples(3, seed=42, shape=SMALL)


def test_spread_subset_is_deterministic_and_well_spread():
    dirs = electrostatic_directions(90, seed=3)
    pick = md.spread_subset(dirs, 30)
    assert np.array_equal(pick, md.spread_subset(dirs, 30))
    assert len(set(pick.tolist())) == 30
    rng = np.random.default_rng(0)
    random_best = max(min_pair_angle(dirs[rng.choice(90, 30, replace=False)])
                      for _ in range(200))
    # greedy farthest-point beats the best of 200 random subsets by a clear margin
    assert min_pair_angle(dirs[pick]) > random_best + 1.0


def test_split_partitions_the_shell_and_keeps_noise_free_targets(samples):
    s = samples[0]
    assert s.inputs.shape == SMALL + (30,) and s.targets.shape == SMALL + (60,)
    all_vecs = np.concatenate([s.input_bvecs, s.target_bvecs])
    assert min_pair_angle(all_vecs) > 1.0                         # no direction twice
    assert s.clean_targets.shape == s.targets.shape
    m = s.mask
    # b0-normalised: noise-free signals lie in (0, 1]; noise averages out
    assert 0 < s.clean_targets[m].min() and s.clean_targets[m].max() <= 1.0 + 1e-6
    assert abs(float(np.mean(s.targets[m] - s.clean_targets[m]))) < 0.01
    assert not s.targets[~m].any()


def test_split_refuses_too_few_directions():
    dirs = electrostatic_directions(20, seed=1)
    gtab = GradientTable(np.r_[0.0, np.full(20, 1000.0)], np.r_[np.zeros((1, 3)), dirs])
    dwi = DWI(data=np.ones((2, 2, 2, 21), np.float32), gtab=gtab, mask=np.ones((2, 2, 2), bool),
              affine=np.eye(4), header=None, paths={"dwi": "sub-x_dwi.nii.gz"})
    with pytest.raises(InputError, match="sub-x_dwi.nii.gz: b=1000 has 20 directions"):
        md.split_dwi(dwi)
    with pytest.raises(InputError, match="no b=2000 shell"):
        md.split_dwi(dwi, shell=2000.0)


def _tensor_sample(shape=(6, 5, 4)) -> md.DirectionSample:
    """A sample whose signal is exactly one tensor per voxel (known truth)."""
    rng = np.random.default_rng(7)
    n = int(np.prod(shape))
    evals = np.sort(rng.uniform(0.2e-3, 1.8e-3, (n, 3)), axis=1)[:, ::-1]
    rot = np.linalg.qr(rng.standard_normal((n, 3, 3)))[0]
    D = np.einsum("nij,nj,nkj->nik", rot, evals, rot)
    dirs = electrostatic_directions(90, seed=5)

    def sig(v):
        return np.exp(-1000.0 * np.einsum("ni,nij,nj->n", np.broadcast_to(v, (n, 3)), D,
                                          np.broadcast_to(v, (n, 3))))
    signal = np.stack([sig(v) for v in dirs], axis=1).reshape(shape + (90,)).astype(np.float32)
    pick = md.spread_subset(dirs, 30)
    rest = np.setdiff1d(np.arange(90), pick)
    s0 = np.full(shape, 1000.0, np.float32)
    return md.DirectionSample("tensor", signal[..., pick], dirs[pick], signal[..., rest],
                              dirs[rest], np.repeat(s0[..., None], 2, axis=-1), s0,
                              np.ones(shape, bool), 1000.0, clean_targets=signal[..., rest])


def test_baselines_recover_a_pure_tensor_signal():
    s = _tensor_sample()
    m = s.mask
    err_dti = np.abs(dm.dti_prediction(s) - s.targets)[m].max()
    err_sh4 = np.sqrt(np.mean((dm.sh_interpolation(s, 4) - s.targets)[m] ** 2))
    assert err_dti < 1e-4                       # the tensor model is exact here
    assert err_sh4 < 0.01                       # order 4 captures most of a b=1000 tensor
    # FA of inputs + exact targets equals FA of the full acquisition
    assert np.abs(dm.series_fa(s, s.targets) - dm.series_fa(s, dm.dti_prediction(s)))[m].max() < 1e-3


@pytest.mark.parametrize("snr", [15.0, 30.0, 60.0])
def test_noise_input_recovers_the_simulated_sigma(snr):
    """The noise channel's sigma (median SH-fit residual) is the phantom's sigma.

    Per voxel the residual RMS has 15 degrees of freedom (~18 % SD); the median
    over ~2000 mask voxels leaves < 1 %, the regularised fit and Rician bias a
    few %: 10 % bounds it (measured: 0.97, 0.99, 1.02)."""
    from dmriflow.interfaces.sim.phantom import simulate_subject
    truth = simulate_subject(shape=SMALL, seed=77, snr=snr, scheme=md.phantom_scheme(77)).sigma
    s = md.phantom_samples(1, seed=77, shape=SMALL, snr=snr)[0]
    assert abs(dm.noise_sigma(s) / truth - 1.0) < 0.10
    channel = dm.sh_features(s)[-1][s.mask]
    s0 = s.s0[s.mask]
    expected = np.minimum(dm.NOISE_FEATURE_SCALE * dm.noise_sigma(s) / s0, dm.NOISE_FEATURE_MAX)
    assert np.allclose(channel, expected, rtol=1e-5)


def test_training_snrs_span_the_range_and_are_reproducible():
    snrs = [md.subject_snr(5000 + k) for k in range(12)]
    lo, hi = md.TRAIN_SNR_RANGE
    assert all(lo <= v <= hi for v in snrs) and snrs == [md.subject_snr(5000 + k)
                                                         for k in range(12)]
    assert max(snrs) / min(snrs) > 2.0                  # a range, not one level


def test_training_subjects_get_their_own_snr_from_the_range():
    """``phantom_samples`` with the training range simulates each subject at its
    drawn SNR (seeds 5004 and 5005 draw 12.6 and 60.0: the noise differs 5x),
    and the shipped card was trained that way on its subjects."""
    from dmriflow.interfaces.sim.phantom import simulate_subject
    got = md.phantom_samples(2, seed=5004, shape=SMALL, snr=md.TRAIN_SNR_RANGE)
    for k, s in enumerate(got):
        assert s.snr == md.subject_snr(5004 + k)
        truth = simulate_subject(shape=SMALL, seed=5004 + k, snr=s.snr,
                                 scheme=md.phantom_scheme(5004 + k)).sigma
        assert abs(dm.noise_sigma(s) / truth - 1.0) < 0.10       # as the noise-input test
    assert dm.noise_sigma(got[0]) > 3 * dm.noise_sigma(got[1])
    card = mc.load_card(Path(dm.__file__).parent / "checkpoints" / "directions")
    assert card.training["snr_range"] == list(md.TRAIN_SNR_RANGE)
    seeds = [int(label.split("-")[1]) for label in card.training["subjects"]]
    drawn = ", ".join(f"{md.subject_snr(k):.1f}" for k in seeds)
    assert f"(training: {drawn})" in card.training["data"]


def test_denoised_dti_baseline_beats_plain_dti_at_low_snr():
    """MP-PCA before the tensor fit lowers the error vs the noise-free targets."""
    s = md.phantom_samples(1, seed=78, shape=SMALL, snr=15.0)[0]

    def err(pred):
        return float(np.sqrt(np.mean((pred - s.clean_targets)[s.mask] ** 2)))
    assert err(dm.denoised_dti_prediction(s)) < err(dm.dti_prediction(s))


def test_untrained_network_is_the_dti_baseline_and_shapes(samples):
    s = samples[0]
    torch.manual_seed(0)
    net = dm.DirectionNet(width=8, blocks=1)
    feats = dm.sh_features(s)
    assert feats.shape == (dm.N_FEATURES,) + SMALL
    pred = dm.predict_network(net, s, feats=feats)
    assert pred.shape == s.targets.shape
    assert np.abs(pred - dm.dti_prediction(s))[s.mask].max() < 2e-3
    # any b-vector can be asked for: one network, conditioned on the target direction
    extra = electrostatic_directions(7, seed=9)
    assert dm.predict_network(net, s, bvecs=extra, feats=feats).shape == SMALL + (7,)


def _train(samples, seed, steps=30):
    cfg = TrainConfig(steps=steps, lr=3e-3, warmup=5, seed=seed, log_every=10, threads=1)
    torch.manual_seed(0)
    from dmriflow.models.train import train
    return train(dm.DirectionNet(width=8, blocks=1), dm.loss_fn, dm.make_batches(samples[:2]),
                 cfg)


def test_training_lowers_the_loss_and_is_deterministic(samples):
    a = _train(samples, seed=1)
    b = _train(samples, seed=1)
    c = _train(samples, seed=2, steps=10)
    assert a.history[-1]["loss"] < a.history[0]["loss"]
    assert a.history == b.history
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k])
    assert c.history[0]["loss"] != a.history[0]["loss"]


def test_direction_checkpoint_round_trip(samples, tmp_path):
    s = samples[2]
    torch.manual_seed(3)
    net = dm.DirectionNet(width=8, blocks=1)
    torch.nn.init.normal_(net.out.weight, std=0.01)     # not the zero-initialised head
    card = dm.make_card(net, samples[:1], TrainConfig(steps=1), [{"method": "x"}],
                        "unit test", voxel_size=(2.5, 2.5, 2.5))
    mc.save_checkpoint(net, card, tmp_path / "ckpt")
    loaded, card2 = mc.load_checkpoint(tmp_path / "ckpt", device="cpu")
    assert np.array_equal(dm.predict_network(net, s), dm.predict_network(loaded, s))
    assert card2.acquisition.min_directions == {"1000": 30}
    assert card2.kwargs == {"width": 8, "blocks": 1}


def test_retrained_card_table_comes_from_subjects_not_used_for_selection(tmp_path):
    """Three disjoint groups: training, checkpoint selection, the card's table."""
    cohort = [(f"sub-{k}", md.phantom_dwi(60 + k, shape=SMALL)[0]) for k in range(5)]
    card = dm.train_on_subjects(iter(cohort), tmp_path / "ckpt", epochs=1, width=8, blocks=1,
                                log=lambda *a: None)
    train = set(card.training["subjects"])
    selection = set(card.training["selection_subjects"])
    table = set(card.training["table_subjects"])
    assert train and selection and table
    assert not (train & selection) and not (train & table) and not (selection & table)
    assert train | selection | table == {label for label, _ in cohort}
    assert {r["subjects"] for r in card.metrics} == {len(table)}
    assert all("not used for selection" in r["split"] for r in card.metrics)
    # the numbers are those of the table subjects, not of the selection subjects
    model, _ = mc.load_checkpoint(tmp_path / "ckpt", device="cpu")
    dwis = dict(cohort)

    def table_of(labels):
        return dm.held_out_table(model, [md.split_dwi(dwis[k], k) for k in sorted(labels)],
                                 card.metrics[0]["split"])

    def numbers(rows):
        return np.array([[r[k] for k in ("dwi_rmse", "fa_rmse")] for r in rows], dtype=float)
    assert np.allclose(numbers(card.metrics), numbers(table_of(table)), rtol=0, atol=2e-5,
                       equal_nan=True)
    assert not np.allclose(numbers(card.metrics), numbers(table_of(selection)), rtol=0,
                           atol=1e-3, equal_nan=True)
    with pytest.raises(ValueError, match="at least 3 subjects"):
        dm.train_on_subjects(iter(cohort[:2]), tmp_path / "two", epochs=1)
