"""The RISH-space residual diffusion model, its equally-fed CNN, training
ranges and out-of-distribution refusal, calibration and the evaluation.

Tiny grids and budgets (12^3 cubes, widths 8) so each test runs in seconds.
"""

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("monai")  # noqa: E402 - the model family's declared dependency

from dmriflow.interfaces.errors import InputError
from dmriflow.models import card as cards
from dmriflow.models import degrade as dg
from dmriflow.models.experiments import ldm_study as study
from dmriflow.models.ldm import features, rishdiff

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pair():
    p = dg.simulate_pair(31, sim_size=16, family="test")
    f3 = features.shell_features(p.dwi3, p.gtab3, p.mask, p.affine, 16)
    f7 = features.shell_features(p.dwi7, p.gtab7, p.mask, p.affine, 16)
    return p, f3, f7


def test_noise_estimate_recovers_the_simulated_sigma(pair):
    p, _, _ = pair
    # 6 b0 repeats x ~2000 mask voxels: the pooled variance is within a few %
    # of the simulator's sigma (Rician ~ Gaussian at the b0's SNR >= 10)
    assert rishdiff.noise_sigma(p.dwi3, p.gtab3, p.mask) == pytest.approx(p.sigma3, rel=0.05)
    # the 7T member (SNR 60) is far less noisy
    assert rishdiff.snr_of(p.dwi7, p.gtab7, p.mask) > 2 * rishdiff.snr_of(p.dwi3, p.gtab3, p.mask)
    with pytest.raises(ValueError, match="needs >= 2"):
        rishdiff.noise_sigma(p.dwi3[..., 5:], p.gtab3.select(np.arange(5, len(p.gtab3))),
                             p.mask)


def test_target_is_the_log_scale_that_rescales_3t_onto_7t(pair):
    _, f3, f7 = pair
    m = f3.mask
    y = rishdiff.target(f3, f7, m)
    lam = np.exp(y).transpose(1, 2, 3, 0)
    lo, hi = rishdiff.SCALE_RANGE
    tau = rishdiff.taus(f3.rish, m)
    inside = m[..., None] & (lam > lo * 1.001) & (lam < hi * 0.999)
    exact = (f7.rish + tau) / (f3.rish + tau)
    assert inside.sum() > 0.6 * 3 * m.sum()        # the rest is clipped (mostly L4: noise)
    assert np.allclose(lam[inside] ** 2, exact[inside], rtol=1e-4)
    # the rescaled 3T RISH is the 7T RISH up to the tau floor (oracle NMSE ~ 0
    # on L0 and L2; L4 loses the clipped voxels)
    from dmriflow.models.experiments.ldm_metrics import nmse
    for k in range(2):
        assert nmse(lam[..., k] ** 2 * f3.rish[..., k], f7.rish[..., k], m) < 1e-3
    assert np.all(rishdiff.target(f3, f3, m) == 0)            # same RISH: lambda = 1


def test_untrained_models_are_identity(pair):
    p, f3, _ = pair
    torch.manual_seed(0)
    model = rishdiff.RishDiffusion3T7T(grid=16, width=8, blocks=2)
    fit = model.fit_subject(f3, p.sigma3, samples=3, steps=3, seed=1)
    assert fit.samples.shape == (3, 16, 16, 16, 3)
    assert np.all(fit.lam == 1.0) and np.all(fit.spread == 0)
    assert np.array_equal(fit.rish(), f3.rish)
    cnn = rishdiff.RishResidualCNN(grid=16, width=8, blocks=2)
    assert np.all(cnn.predict_lambda(f3, p.sigma3) == 1.0)


def _known_pairs(scale=(1.3, 0.8, 0.5), n=3, g=12):
    """Pairs whose 7T RISH is the 3T RISH times a known per-order factor."""
    rng = np.random.default_rng(5)
    out = []
    for _ in range(n):
        mask = np.zeros((g, g, g), bool)
        mask[2:10, 2:10, 2:10] = True
        rish3 = rng.uniform(0.2, 1.0, (g, g, g, 3)).astype(np.float32) * mask[..., None]
        s0 = np.where(mask, rng.uniform(500, 1500, (g, g, g)), 0).astype(np.float32)
        f3 = features.ShellFeatures(rish3, None, s0, None, mask, np.eye(4), None)
        f7 = features.ShellFeatures(rish3 * np.float32(scale) ** 2, None, s0, None, mask,
                                    np.eye(4), None)
        out.append((f3, f7, 20.0))
    return out


def test_diffusion_and_cnn_learn_a_known_per_order_scale():
    scale = np.array([1.3, 0.8, 0.5])
    pairs = _known_pairs(tuple(scale))
    budget = rishdiff.RishBudget(steps=150, batch=2, patch=8, lr=5e-3)
    torch.manual_seed(0)
    model = rishdiff.RishDiffusion3T7T(grid=12, width=8, blocks=2)
    report = rishdiff.fit(model, pairs, budget)
    assert report["history"][-1]["loss"] < 0.5 * report["history"][0]["loss"]
    f3 = pairs[0][0]
    fit = model.fit_subject(f3, 20.0, samples=4, steps=6, seed=0)
    lam = fit.lam[f3.mask]
    # the mapping is deterministic: the posterior mean recovers the scale
    # within 10 % (150 steps), where identity is 20-100 % off
    assert np.all(np.abs(np.median(lam, axis=0) / scale - 1) < 0.10)
    torch.manual_seed(0)
    cnn = rishdiff.RishResidualCNN(grid=12, width=8, blocks=2)
    rishdiff.fit_cnn(cnn, pairs, budget)
    lam_cnn = cnn.predict_lambda(f3, 20.0)[f3.mask]
    assert np.all(np.abs(np.median(lam_cnn, axis=0) / scale - 1) < 0.10)
    # deterministic sampling for a seed, different across seeds
    a = model.fit_subject(f3, 20.0, samples=2, steps=3, seed=7).samples
    assert np.array_equal(a, model.fit_subject(f3, 20.0, samples=2, steps=3, seed=7).samples)
    assert not np.array_equal(a, model.fit_subject(f3, 20.0, samples=2, steps=3, seed=8).samples)


def test_sample_intervals_cover_the_nominal_fraction_for_gaussian_truth():
    """Truth drawn from the same distribution as the K samples: the intervals
    must cover the nominal fraction (t-quantile with the predictive factor)."""
    rng = np.random.default_rng(0)
    g, k = 24, 8
    mu = rng.normal(0, 0.3, (g, g, g, 3))
    sd = rng.uniform(0.05, 0.3, (g, g, g, 3))
    samples = mu + sd * rng.standard_normal((k, g, g, g, 3))
    truth_y = mu + sd * rng.standard_normal((g, g, g, 3))
    mask = np.ones((g, g, g), bool)
    rish3 = rng.uniform(0.5, 1.0, (g, g, g, 3)).astype(np.float32)
    f3 = features.ShellFeatures(rish3, None, None, None, mask, np.eye(4), None)
    f7 = features.ShellFeatures(np.exp(2 * truth_y) * rish3, None, None, None, mask,
                                np.eye(4), None)
    fit = rishdiff.RishFit(samples.astype(np.float32), f3)
    s = study.Subject(0, f3, f7, 1.0, 20.0, {})
    cov = {(m, n): c for m, n, c in study.coverage(fit, s)}
    for nominal in study.NOMINALS:               # 41k voxels x 3 orders: SE < 0.3 %
        for m in ("L0", "L2", "L4"):
            assert cov[m, nominal] == pytest.approx(nominal, abs=0.015)
    # an over-confident model (spread / 3) under-covers
    narrow = rishdiff.RishFit((mu + (samples - mu) / 3).astype(np.float32), f3)
    assert dict(((m, n), c) for m, n, c in study.coverage(narrow, s))["L0", 0.9] < 0.6


# ----------------------------------------------------------------------------
# Training ranges and refusal
# ----------------------------------------------------------------------------
RANGES = {"cube_voxel_mm": {"min": 2.8, "max": 3.45, "trained": [3.125, 3.125],
                            "action": "refuse"},
          "snr": {"min": 15.0, "max": 35.0, "trained": [15.0, 35.0], "action": "flag"}}


def _card():
    return cards.ModelCard(name="m", version="1", architecture="rish-diffusion-3t7t",
                           kwargs={}, acquisition=cards.Acquisition(shells=[1000.0],
                                                                    ranges=RANGES))


def test_out_of_range_inputs_are_refused_or_flagged():
    card = _card()
    assert cards.check_ranges(card, {"cube_voxel_mm": 3.125, "snr": 20.0}, "x.nii.gz") == []
    with pytest.raises(InputError, match=r"x.nii.gz.*cube_voxel_mm 6\.875 is outside the "
                                         r"model's range 2\.8-3\.45; training data 3\.125"):
        cards.check_ranges(card, {"cube_voxel_mm": 6.875, "snr": 20.0}, "x.nii.gz")
    flags = cards.check_ranges(card, {"cube_voxel_mm": 3.0, "snr": 9.0}, "x.nii.gz")
    assert flags == ["snr 9 is outside the model's range 15-35; training data 15-35"]
    assert cards.check_ranges(card, {"cube_voxel_mm": None}, "x") == []   # not measured


def test_ranges_survive_the_card_and_old_cards_have_none(tmp_path):
    torch.manual_seed(0)
    model = rishdiff.RishDiffusion3T7T(grid=16, width=8, blocks=1)
    card = _card()
    card.kwargs = {"grid": 16, "width": 8, "blocks": 1}
    cards.save_checkpoint(model, card, tmp_path / "ck")
    assert cards.load_card(tmp_path / "ck").acquisition.ranges == RANGES
    d = card.to_dict()
    del d["acquisition"]["ranges"]                 # a card written before ranges existed
    assert cards.ModelCard.from_dict(d).acquisition.ranges == {}


def test_a_real_head_field_of_view_is_refused_by_the_shipped_card():
    """A 110 x 110 x 70 head at 2 mm spans 220 mm: the 32^3 cube voxel is
    6.9 mm, against 3.125 mm in training - refused, naming the value."""
    _, card = cards.load_checkpoint(study.SHIPPED_DIFFUSION, device="cpu")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    cube, _ = features.cube_grid(affine, (110, 110, 70), card.kwargs["grid"])
    vox = rishdiff.cube_voxel_mm(cube)
    assert vox == pytest.approx(220 / 32, rel=0.01)
    with pytest.raises(InputError, match="cube_voxel_mm 6.8"):
        cards.check_ranges(card, {"cube_voxel_mm": vox}, "head_dwi.nii.gz")
    trained = card.acquisition.ranges["cube_voxel_mm"]["trained"]
    assert cards.check_ranges(card, {"cube_voxel_mm": trained[0]}, "x") == []


def test_shipped_rish_checkpoints_are_small_and_state_their_ranges():
    for folder in (study.SHIPPED_DIFFUSION, study.SHIPPED_CNN):
        assert (folder / cards.WEIGHTS_FILE).stat().st_size < 1 * 2**20
        model, card = cards.load_checkpoint(folder, device="cpu")
        # the diffusion card also holds the ensemble's disagreement range (its OOD guard)
        assert set(card.acquisition.ranges) == {"cube_voxel_mm", "snr", rishdiff.SHARPNESS} | (
            {rishdiff.DISAGREEMENT} if folder == study.SHIPPED_DIFFUSION else set())
        # both take the measured sharpness as an input (the equally-fed comparison)
        assert model.sharpness and card.kwargs["sharpness"] is True
        assert card.acquisition.field_strength_t == 3.0 and model.grid == card.kwargs["grid"]


# the evaluation's tables: tests/test_models_evaluate.py (a real two-seed run)


def test_cli_evaluate_3t7t_passes_seeds_and_folder(tmp_path, monkeypatch, capsys):
    import pandas as pd
    from dmriflow.pipelines.cli import main
    seen = {}

    def fake(seeds, out, log=print):
        seen.update(seeds=seeds, out=out)
        return {"metrics": pd.DataFrame({"method": ["shipped"], "map": ["L0"], "nmse": [0.1],
                                         "ssim": [0.9], "skill": [0.2]}), "seconds": 1.0}
    monkeypatch.setattr(study, "evaluate", fake)
    assert main(["evaluate", "3t7t", "--seeds", "5", "9", "--out", str(tmp_path)]) == 0
    assert seen == {"seeds": [5, 9], "out": str(tmp_path)}
    assert "shipped" in capsys.readouterr().out


class _UnderDispersed:
    """A sampler whose K samples per voxel are ``under`` times narrower than
    the spread of the truth about their centre (``f3.extra_mu``/``extra_sd``)."""

    def __init__(self, under: float):
        self.under = under
        self.spread_scale = torch.ones(3)

    def fit_subject(self, f3, sigma, samples, steps, seed=0):
        r = np.random.default_rng(seed)
        raw = f3.extra_mu + (f3.extra_sd / self.under) * r.standard_normal(
            (samples,) + f3.extra_mu.shape)
        return rishdiff.RishFit(raw.astype(np.float32), f3, self.spread_scale.numpy().copy())


def _gaussian_subjects(rng, g: int, n: int, seed0: int) -> list:
    """``n`` (f3, f7, sigma, seed) subjects on a g^3 mask whose true log scale
    per voxel is N(mu, sd^2); mu and sd ride on f3 for :class:`_UnderDispersed`."""
    mask = np.ones((g, g, g), bool)
    out = []
    for j in range(n):
        rish3 = rng.uniform(0.5, 1.0, (g, g, g, 3)).astype(np.float32)
        mu = rng.normal(0, 0.2, (g, g, g, 3))
        sd = rng.uniform(0.05, 0.2, (g, g, g, 3))
        truth = mu + sd * rng.standard_normal((g, g, g, 3))
        f3 = features.ShellFeatures(rish3, None, None, None, mask, np.eye(4), None)
        f3.extra_mu, f3.extra_sd = mu, sd
        f7 = features.ShellFeatures(np.exp(2 * truth) * rish3, None, None, None, mask,
                                    np.eye(4), None)
        out.append((f3, f7, 1.0, seed0 + j))
    return out


def test_calibration_recovers_a_known_under_dispersion():
    """Samples 3x narrower than the truth's spread: the fitted spread scale is
    ~3 and the calibrated 90 % intervals then cover ~90 %."""
    rng = np.random.default_rng(3)
    subjects = _gaussian_subjects(rng, 16, 3, 100)
    stub = _UnderDispersed(3.0)
    scale = rishdiff.calibrate(stub, subjects, samples=8, steps=1)
    assert np.allclose(scale, 3.0, rtol=0.08)
    f3, f7, _, seed = subjects[0]
    fit = stub.fit_subject(f3, 1.0, 8, 1, seed=seed + 7)
    cov = dict(((m, n), c) for m, n, c in study.coverage(fit, study.Subject(0, f3, f7, 1, 1, {})))
    assert cov["L2", 0.9] == pytest.approx(0.9, abs=0.02)


def test_calibration_recovers_a_known_factor_within_its_sampling_error():
    """Per voxel, truth - sample mean ~ N(0, sd^2 (1 + 1/(u^2 K))) and the
    sample SD ~ (sd/u) chi_{K-1}/sqrt(K-1), so |error| / SD is
    c |t_{K-1}| with c = u sqrt(1 + 1/(u^2 K)), and the fitted factor
    (0.9 quantile / (t_{0.95,K-1} sqrt(1 + 1/K))) is
    u sqrt((1 + 1/(u^2 K)) / (1 + 1/K)). Its relative standard error from n
    pooled voxels is that of a sample quantile,
    sqrt(p (1 - p) / n) / (2 f_t(t_p) t_p); the test allows 4 of them."""
    from scipy import stats
    g, k, under, n_subjects = 16, 12, 4.0, 2
    subjects = _gaussian_subjects(np.random.default_rng(11), g, n_subjects, 200)
    scale = rishdiff.calibrate(_UnderDispersed(under), subjects, samples=k, steps=1)
    want = under * np.sqrt((1 + 1 / (under ** 2 * k)) / (1 + 1 / k))
    level = rishdiff.CALIBRATION_LEVEL
    tp = stats.t.ppf(0.5 + level / 2, k - 1)
    rel_se = np.sqrt(level * (1 - level) / (n_subjects * g ** 3)) / (
        2 * stats.t.pdf(tp, k - 1) * tp)
    assert rel_se < 0.012                                 # the check is a sharp one
    np.testing.assert_array_less(np.abs(scale / want - 1), 4 * rel_se)


def test_recalibrate_writes_the_family_scale_into_the_checkpoint(tmp_path):
    """``ldm_study calibrate``: the scale the card records is the one
    :func:`rishdiff.spread_scale_for` gives on the named family's pairs with
    the card's K and steps, the buffer holds it (float16), every other
    weight is unchanged, and the report family is refused."""
    study.train_shipped(tmp_path, n_pairs=2, steps=2, grid=16, log=lambda s: None)
    folder = tmp_path / "rish_3t7t"
    before, card0 = cards.load_checkpoint(folder, device="cpu")
    seeds = [study.SEED_CALIBRATION, study.SEED_CALIBRATION + 1]
    assert study.main(["calibrate", str(folder), "--seeds", *map(str, seeds)]) == 0
    after, card = cards.load_checkpoint(folder, device="cpu")
    assert card.training["calibration_family"] == study.CALIBRATION_FAMILY == "calib"
    assert card.training["calibration_seeds"] == seeds
    assert f"2 calib-family pairs (seeds {seeds[0]}-{seeds[1]})" in card.training["calibration"]
    assert card.weights_sha256 != card0.weights_sha256
    k, steps = rishdiff.sampling(card)
    before.float().spread_scale.fill_(1.0)
    subs = study.simulate_pairs(seeds, "calib", 16)
    want = rishdiff.spread_scale_for(
        [(before.fit_subject(s.f3, s.sigma3, k, steps, seed=s.seed), s.f7) for s in subs])
    np.testing.assert_allclose(card.training["spread_scale"], want, rtol=1e-5)
    np.testing.assert_allclose(after.spread_scale.float().numpy(), np.float16(want), rtol=1e-3)
    b, a = before.state_dict(), after.state_dict()
    for name in b:
        if name != "spread_scale":
            assert torch.equal(b[name].half(), a[name].half()), name
    with pytest.raises(ValueError, match="held-out report"):
        study.recalibrate(folder, seeds, family=study.REPORT_FAMILY)


# ----------------------------------------------------------------------------
# The 3t7t inference kind with RISH-space checkpoints
# ----------------------------------------------------------------------------
def test_untrained_rish_checkpoint_through_the_3t7t_kind_returns_the_input(pair, tmp_path):
    """The last layer starts at zero: every sample is log lambda = 0, so
    ``--inference 3t7t`` with an untrained checkpoint must give back the
    subject's own b0 + b=1000 series (the SH are rescaled by exactly 1, the
    residual kept), lambda 1 and SD 0 everywhere."""
    from dmriflow.interfaces.inference import THREE_T_TO_7T, run_inference
    p, f3, _ = pair
    model = rishdiff.RishDiffusion3T7T(grid=16, width=8, blocks=2)
    card = cards.ModelCard(name="untrained", version="0", architecture=model.architecture,
                           kwargs={"grid": 16, "width": 8, "blocks": 2},
                           acquisition=study.acquisition(rishdiff.training_ranges(
                               [rishdiff.cube_voxel_mm(f3.affine)])),
                           extra={"samples": 3, "sample_steps": 2})
    cards.save_checkpoint(model, card, tmp_path / "ck")
    dwi = p.dwi_3t("sub-1_dwi.nii.gz")
    out, used = run_inference(THREE_T_TO_7T, tmp_path / "ck", dwi, dwi.paths["dwi"],
                              census={"field_strength_t": 3.0})
    assert used.name == "untrained" and out.parameters["samples"] == 3
    idx, _ = features.shell_volumes(dwi.gtab)
    series = out.maps["model-rish3t7t_desc-7tlike"]
    scale = float(np.abs(dwi.data).max())
    np.testing.assert_allclose(series, dwi.data[..., idx], rtol=0,
                               atol=4 * np.finfo(np.float32).eps * scale)
    np.testing.assert_array_equal(out.maps["model-rish3t7t_param-lambda"], 1.0)
    np.testing.assert_array_equal(out.maps["model-rish3t7t_desc-sd_param-loglambda"], 0.0)


def test_3t7t_refuses_a_checkpoint_it_cannot_apply_naming_it(pair):
    """The equally-fed CNN is a RISH-space model but not one ``3t7t`` applies:
    refused before its weights load, with the checkpoint's card named."""
    from dmriflow.interfaces.inference import THREE_T_TO_7T, run_inference
    p, _, _ = pair
    dwi = p.dwi_3t("sub-1_dwi.nii.gz")
    with pytest.raises(InputError, match=r"rish_cnn_3t7t/card\.json.*'rish-cnn-3t7t', which "
                                         r"--inference 3t7t does not apply"):
        run_inference(THREE_T_TO_7T, study.SHIPPED_CNN, dwi, dwi.paths["dwi"],
                      census={"field_strength_t": 3.0})


def test_3t7t_inference_applies_what_evaluate_scores_as_shipped():
    """Same subject and seed: the RISH the inference kind delivers on its cube
    is exactly the posterior mean ``dmriflow evaluate 3t7t`` scores as its
    ``shipped`` row (same K, steps, noise estimate and spread scale; the card
    asks for 2 samples of 2 steps here to keep the test short)."""
    import dataclasses

    from dmriflow.models.ldm import cohort
    (s,) = study.simulate_pairs([50_000], "test")
    diff, dcard = cards.load_checkpoint(study.SHIPPED_DIFFUSION, device="cpu")
    dcard = dataclasses.replace(dcard, extra={"samples": 2, "sample_steps": 2})
    k, steps = rishdiff.sampling(dcard)
    fit = diff.fit_subject(s.f3, s.sigma3, samples=k, steps=steps, seed=s.seed)
    dwi = dg.simulate_pair(50_000, family="test").dwi_3t()
    _, _, extra = cohort.generate_7t_like(diff, dcard, dwi, seed=s.seed)
    np.testing.assert_array_equal(extra["rish_cube"], fit.rish())
    assert extra["info"]["samples"] == k == dcard.extra["samples"]


# ----------------------------------------------------------------------------
# The measured sharpness (condition channel of the shipped models)
# ----------------------------------------------------------------------------
def _sharpness(resolution: float, snr: float, seed: int = 3) -> float:
    spec = dg.Degradation(psf="gaussian", resolution=resolution, snr=snr, bias=0.0)
    p = dg.simulate_pair(seed, 32, degradation=spec)
    return features.shell_features(p.dwi3, p.gtab3, p.mask, p.affine, 32).sharpness


def test_sharpness_measures_the_blur_not_the_noise():
    """Same anatomy: a 1.8x blur reads ~0.3 lower than a 1.2x one; SNR 15
    instead of 35 (the training range) moves it < 0.03, a tenth of that."""
    sharp, blurred = _sharpness(1.2, 35.0), _sharpness(1.8, 35.0)
    assert sharp - blurred > 0.2
    assert abs(_sharpness(1.2, 15.0) - sharp) < 0.03
    assert abs(_sharpness(1.8, 15.0) - blurred) < 0.03


def test_sharpness_channel_is_the_estimate_in_the_mask_and_needs_it():
    rng = np.random.default_rng(1)
    g = 8
    mask = np.zeros((g, g, g), bool)
    mask[2:6, 2:6, 2:6] = True
    f3 = features.ShellFeatures(rng.uniform(0.1, 1, (g, g, g, 3)).astype(np.float32), None,
                                np.full((g, g, g), 100.0, np.float32), None, mask, np.eye(4),
                                None, sharpness=-1.9)
    plain, sharp = rishdiff.RishResidualCNN(g), rishdiff.RishResidualCNN(g, sharpness=True)
    a, b = plain.raw_condition(f3, 5.0), sharp.raw_condition(f3, 5.0)
    assert a.shape[0] == plain.n_cond == rishdiff.N_COND and b.shape[0] == sharp.n_cond == 6
    np.testing.assert_array_equal(b[:-1], a)
    np.testing.assert_array_equal(b[-1][mask], np.float32(-1.9))
    assert not b[-1][~mask].any()
    with pytest.raises(ValueError, match="no sharpness estimate"):
        sharp.raw_condition(dataclasses.replace(f3, sharpness=None), 5.0)


def test_ensemble_widened_intervals_cover_the_sum_of_two_independent_spreads():
    """Truth = mean + a part the samples see (SD s1) + a part only the ensemble
    sees (SD s2): the widened intervals (SD sqrt(s1^2 + s2^2), scale 1) cover
    the nominal fraction; the samples alone under-cover. The posterior mean
    is unchanged."""
    rng = np.random.default_rng(2)
    g, k = 12, 200                                 # many samples: SDs and z near exact
    mu = rng.normal(0, 0.3, (g, g, g, 3))
    s1, s2 = rng.uniform(0.05, 0.3, (2, g, g, g, 3))
    samples = (mu + s1 * rng.standard_normal((k, g, g, g, 3))).astype(np.float32)
    members = (mu + s2 * rng.standard_normal((k, g, g, g, 3))).astype(np.float32)
    truth = mu + np.hypot(s1, s2) * rng.standard_normal((g, g, g, 3))
    mask = np.ones((g, g, g), bool)
    rish3 = rng.uniform(0.5, 1.0, (g, g, g, 3)).astype(np.float32)
    f3 = features.ShellFeatures(rish3, None, None, None, mask, np.eye(4), None)
    f7 = features.ShellFeatures(np.exp(2 * truth) * rish3, None, None, None, mask, np.eye(4),
                                None)
    fit, ens = rishdiff.RishFit(samples, f3), rishdiff.RishFit(members - members.mean(0) + mu, f3)
    wide = rishdiff.widened(fit, ens)
    np.testing.assert_allclose(wide.samples.mean(0), samples.mean(0), atol=1e-5)
    s = study.Subject(0, f3, f7, 1.0, 20.0, {})
    cov = {(m, n): c for m, n, c in study.coverage(wide, s)}
    alone = {(m, n): c for m, n, c in study.coverage(fit, s)}
    for nominal in study.NOMINALS:               # 5k voxels per order: SE < 0.7 %
        for m in ("L0", "L2", "L4"):
            assert cov[m, nominal] == pytest.approx(nominal, abs=0.025)
            assert alone[m, nominal] < nominal - 0.05


def test_scalar_inputs_are_clipped_into_the_cards_ranges(pair):
    """Sharpness and the SNR the noise estimate implies are held inside the
    trained ranges (the models never extrapolate a constant channel); inside
    the ranges nothing changes."""
    _, f3, _ = pair
    ranges = {"snr": {"min": 11.2, "max": 32.65}, rishdiff.SHARPNESS: {"min": -2.2, "max": -1.75}}
    inside = dataclasses.replace(f3, sharpness=-2.0)
    g, s = rishdiff.clipped_inputs(ranges, inside, 3.0, 20.0)
    assert g is inside and s == 3.0
    sharp = dataclasses.replace(f3, sharpness=-1.5)
    g, s = rishdiff.clipped_inputs(ranges, sharp, 3.0, 8.0)
    assert g.sharpness == -1.75 and np.array_equal(g.rish, f3.rish)
    # SNR 8 -> 11.2: the reference b0 (snr x sigma) is kept, sigma shrinks
    assert s * 11.2 == pytest.approx(3.0 * 8.0, rel=1e-12)
    g, s = rishdiff.clipped_inputs(ranges, dataclasses.replace(f3, sharpness=-3.0), 3.0, 40.0)
    assert g.sharpness == -2.2 and s * 32.65 == pytest.approx(3.0 * 40.0, rel=1e-12)
    g, s = rishdiff.clipped_inputs({}, sharp, 3.0, 8.0)            # no ranges: as measured
    assert g is sharp and s == 3.0
