"""Issue 15 item 5: the CNN-ensemble uncertainty baseline and the
out-of-distribution scores with their AUROC over graded shifts."""

import math
import re

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

pytest.importorskip("monai")  # noqa: E402 - the model family's declared dependency

from dmriflow.models import card as cards
from dmriflow.models import degrade as dg
from dmriflow.models.experiments import ldm_ood as ood
from dmriflow.models.experiments import ldm_study as study
from dmriflow.models.ldm import features, rishdiff

torch.set_num_threads(1)


class Member:
    """An ensemble member predicting a fixed log scale map."""

    def __init__(self, y):
        self.y = y

    def predict_lambda(self, f3, sigma):
        return np.exp(self.y).astype(np.float32)


def _f(rish, mask):
    return features.ShellFeatures(rish, None, None, None, mask, np.eye(4), None)


def test_ensemble_fit_treats_members_as_samples():
    rng = np.random.default_rng(0)
    g = 6
    mask = np.ones((g, g, g), bool)
    ys = rng.normal(0, 0.3, (4, g, g, g, 3)).astype(np.float32)
    fit = rishdiff.ensemble_fit([Member(y) for y in ys], _f(np.ones((g, g, g, 3)), mask), 1.0,
                                spread_scale=[2.0, 1.0, 0.5])
    np.testing.assert_allclose(fit.samples, ys, atol=1e-6)
    np.testing.assert_allclose(fit.lam, np.sqrt(np.mean(np.exp(2 * ys), axis=0)), rtol=1e-5)
    np.testing.assert_allclose(fit.spread, ys.std(axis=0, ddof=1) * [2.0, 1.0, 0.5], rtol=1e-5)
    with pytest.raises(ValueError, match=">= 2 members"):
        rishdiff.ensemble_fit([Member(ys[0])], _f(np.ones((g, g, g, 3)), mask), 1.0)


def _subject(rng, g, k, under):
    """Members spread ``under`` times narrower than the truth's deviation."""
    mask = np.ones((g, g, g), bool)
    rish3 = rng.uniform(0.5, 1.0, (g, g, g, 3)).astype(np.float32)
    mu = rng.normal(0, 0.2, (g, g, g, 3))
    sd = rng.uniform(0.05, 0.2, (g, g, g, 3))
    truth = mu + sd * rng.standard_normal((g, g, g, 3))
    members = [Member(mu + sd / under * rng.standard_normal(mu.shape)) for _ in range(k)]
    f3 = _f(rish3, mask)
    f7 = _f((np.exp(2 * truth) * rish3).astype(np.float32), mask)
    return members, f3, f7


def test_ensemble_calibration_recovers_a_known_under_dispersion():
    """5 members 3x narrower than the truth's deviation: the fitted factor is
    the one making ``(truth - mean) / (c SD)`` a t_{K-1} sqrt(1 + 1/K) variable,
    i.e. 3 sqrt((1 + 1/(9K)) / (1 + 1/K)); on a new subject the calibrated
    90 % intervals cover 90 % (binomial SE over 16^3 voxels: 0.005)."""
    rng = np.random.default_rng(5)
    g, k, under = 16, 5, 3.0
    fits = []
    for _ in range(3):
        members, f3, f7 = _subject(rng, g, k, under)
        fits.append((rishdiff.ensemble_fit(members, f3, 1.0), f7))
    scale = rishdiff.spread_scale_for(fits)
    want = under * math.sqrt((1 + 1 / (under ** 2 * k)) / (1 + 1 / k))
    np.testing.assert_allclose(scale, want, rtol=0.05)
    members, f3, f7 = _subject(rng, g, k, under)
    fit = rishdiff.ensemble_fit(members, f3, 1.0, scale)
    cov = {(m, n): c for m, n, c in study.coverage(fit, study.Subject(0, f3, f7, 1, 1, {}))}
    for mp in ("L0", "L2", "L4"):
        assert cov[mp, 0.9] == pytest.approx(0.9, abs=0.02)
    raw = rishdiff.ensemble_fit(members, f3, 1.0)            # uncalibrated: far too narrow
    cov_raw = {(m, n): c for m, n, c in study.coverage(raw, study.Subject(0, f3, f7, 1, 1, {}))}
    assert cov_raw["L2", 0.9] < 0.6


def test_auroc_is_the_mann_whitney_statistic():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 9), rng.normal(0.8, 1, 7)
    u = mannwhitneyu(b, a).statistic
    assert ood.auroc(a, b) == pytest.approx(u / (len(a) * len(b)))
    assert ood.auroc([0, 1], [2, 3]) == 1.0 and ood.auroc([2, 3], [0, 1]) == 0.0
    assert ood.auroc([0, 0], [0, 0]) == 0.5           # a blind score: ties count 1/2
    with pytest.raises(ValueError):
        ood.auroc([], [1.0])


def test_range_score_is_zero_inside_and_the_log_distance_outside():
    acq = cards.Acquisition(shells=[1000.0], ranges={
        "cube_voxel_mm": {"min": 2.8, "max": 3.5, "action": "refuse"},
        "snr": {"min": 11.0, "max": 30.0, "action": "flag"}})
    assert ood.range_score(acq, {"cube_voxel_mm": 3.1, "snr": 20.0}) == 0.0
    assert ood.range_score(acq, {"cube_voxel_mm": 7.0, "snr": 20.0}) == pytest.approx(
        math.log(2.0))
    assert ood.range_score(acq, {"cube_voxel_mm": 3.0, "snr": 5.5}) == pytest.approx(
        math.log(2.0))
    assert ood.range_score(acq, {"cube_voxel_mm": 7.0, "snr": 2.75}) == pytest.approx(
        math.log(4.0))                                  # the farther quantity
    assert ood.range_score(cards.Acquisition(shells=[1000.0]), {"snr": 1.0}) == 0.0


def test_range_score_measures_the_sharpness_as_a_difference_and_evaluate_shares_the_values():
    """The sharpness is itself a (negative) logarithm: its distance outside the
    card's range is the plain difference, on either side; it is one of the
    measured values the OOD study and ``evaluate`` check (``card_values``)."""
    lo, hi = -2.246, -1.7498                            # the shipped card's range
    acq = cards.Acquisition(shells=[1000.0], ranges={
        rishdiff.SHARPNESS: {"min": lo, "max": hi, "action": "flag"},
        "snr": {"min": 11.0, "max": 30.0, "action": "flag"}})
    assert ood.range_score(acq, {rishdiff.SHARPNESS: -2.0, "snr": 20.0}) == 0.0
    assert ood.range_score(acq, {rishdiff.SHARPNESS: -1.55, "snr": 20.0}) == pytest.approx(
        -1.55 - hi)                                     # sharper than trained (test family)
    assert ood.range_score(acq, {rishdiff.SHARPNESS: -2.5, "snr": 20.0}) == pytest.approx(
        lo + 2.5)                                       # blurrier than trained
    assert ood.range_score(acq, {rishdiff.SHARPNESS: -1.55, "snr": 5.5}) == pytest.approx(
        math.log(2.0))                                  # the farther quantity
    s = ood.shifted_subject(70_902, "snr", 1.0, 16)
    values = study.card_values(s)
    assert s.f3.sharpness is not None
    assert values[rishdiff.SHARPNESS] == s.f3.sharpness
    assert values["snr"] == s.snr3


def test_graded_shifts_change_what_they_say_and_nothing_else():
    seed, g = 70_900, 16
    base = ood.shifted_subject(seed, "snr", 1.0, g)
    for shift in ("bvalue", "voxel"):                      # factor 1: the same pair
        same = ood.shifted_subject(seed, shift, 1.0, g)
        np.testing.assert_array_equal(same.f3.rish, base.f3.rish)
    noisy = ood.shifted_subject(seed, "snr", 0.5, g)
    assert noisy.snr3 / base.snr3 == pytest.approx(0.5, rel=0.1)   # noise estimate: ~5 %
    big = ood.shifted_subject(seed, "voxel", 1.33, g)
    assert big.f3.mask.shape == (12,) * 3
    assert rishdiff.cube_voxel_mm(big.f3.affine) / rishdiff.cube_voxel_mm(base.f3.affine) \
        == pytest.approx(16 / 12, rel=1e-6)
    hib = ood.shifted_subject(seed, "bvalue", 1.5, g)
    assert hib.f3.gtab.bvals.max() == pytest.approx(dg.SHELL_B)      # labelled b = 1000
    assert hib.snr3 == base.snr3                                      # same b0s, same noise
    m = base.f3.mask & hib.f3.mask
    # stronger weighting: the b0-normalised mean DW signal (SH order 0) drops
    assert np.median(hib.f3.coeffs[..., 0][m]) < 0.9 * np.median(base.f3.coeffs[..., 0][m])


def test_the_shipped_models_scores_see_a_noise_shift():
    """With the shipped card and model: an SNR-0.3 subject is flagged, has a
    positive range score, and its condition sits farther from training."""
    diff, dcard = cards.load_checkpoint(study.SHIPPED_DIFFUSION, device="cpu")
    diff.float()
    base = ood.shifted_subject(70_901, "snr", 1.0)
    low = ood.shifted_subject(70_901, "snr", 0.3)
    a = ood.scores(diff, dcard, [], None, base, samples=2, steps=2)
    b = ood.scores(diff, dcard, [], None, low, samples=2, steps=2)
    assert b["card"] == "flagged" and b["card_range"] > a["card_range"]
    assert b["card_range"] == pytest.approx(
        math.log(dcard.acquisition.ranges["snr"]["min"] / low.snr3))
    assert b["condition_shift"] > a["condition_shift"] + 0.3
    assert "ensemble_spread" not in a


def test_ood_study_writes_one_auroc_per_shift_factor_and_score(tmp_path):
    """A small run (16^3 simulation and cube, 3.125 mm voxels as trained)
    through the study's own tables."""
    r = ood.study_ood(tmp_path, seeds=[70_910, 70_911], grades={"snr": (0.3,), "bvalue": (1.6,)},
                      family_seeds=[70_960], grid=16, samples=2, ensemble_dir=None,
                      log=lambda s: None)
    per = r["scores"]
    assert len(per) == 2 + 2 * 2 + 1
    # SNR x 0.3 puts every train-family subject (SNR 15-35) below the card's 11.2
    assert (per[per["shift"] == "snr"].card == "flagged").all()
    bsub = per[per["shift"] == "bvalue"].set_index("subject")
    nsub = per[per["shift"] == "none"].set_index("subject")
    assert (bsub.card == nsub.card).all() and (bsub.snr == nsub.snr).all()
    tab = r["auroc"]
    keys = set(zip(tab["shift"], tab.factor, tab.score))
    names = ("card_range", "condition_shift", "predicted_spread")
    assert keys == {(sh, f, n) for sh, f in (("snr", 0.3), ("bvalue", 1.6), ("family", 1.0))
                    for n in names}
    snr = tab[tab["shift"] == "snr"]
    assert (snr.flagged == 2).all() and (tab.refused == 0).all()
    base = per[per["shift"] == "none"]
    for _, row in tab.iterrows():
        shifted = per[(per["shift"] == row["shift"]) & (per.factor == row.factor)]
        assert row.auroc == ood.auroc(base[row.score], shifted[row.score])
    # a mislabelled b changes neither the b0s nor the measured SNR: the card is blind
    b16 = tab[(tab["shift"] == "bvalue") & (tab.score == "card_range")].auroc.item()
    assert b16 == 0.5
    on_disk = (tmp_path / "ood_auroc.tsv").read_text().splitlines()
    assert len(on_disk) == len(tab) + 1


def test_members_and_shipped_models_are_written_as_loadable_checkpoints(tmp_path):
    """Tiny budgets: the ensemble trainer and ``train_shipped`` share
    ``save_rish_checkpoint``; each folder loads (sha-checked) with its budget."""
    from dmriflow.models.experiments import ldm_ensemble
    ldm_ensemble.train_members(tmp_path / "ens", seeds=(3,), n_pairs=2, steps=2, grid=16,
                               log=lambda s: None)
    folders = study.member_folders(tmp_path / "cnn", tmp_path / "ens")
    assert [f.name for f in folders] == ["cnn", "seed-3"]
    m, card = cards.load_checkpoint(folders[1], device="cpu")
    assert card.architecture == "rish-cnn-3t7t" and card.training["budget"]["seed"] == 3
    assert card.training["budget"]["steps"] == 2 and "seed" not in card.kwargs
    assert card.acquisition.ranges["cube_voxel_mm"]["trained"] == [3.125, 3.125]
    # the members are fed as the shipped CNN they are compared with: its
    # sharpness channel, its widened blur widths, its pairs and budget
    shipped = cards.load_card(study.SHIPPED_CNN)
    assert card.kwargs == {"grid": 16, "sharpness": True}
    assert "sharpness" in card.acquisition.ranges
    assert shipped.kwargs == {"grid": 32, "sharpness": ldm_ensemble.SHARPNESS}
    assert study.training_data(ldm_ensemble.PAIRS, 32, ldm_ensemble.RESOLUTION) == \
        shipped.training["data"]
    assert shipped.training["budget"]["steps"] == ldm_ensemble.STEPS
    rep = study.train_shipped(tmp_path / "ship", n_pairs=2, steps=2, grid=16,
                              log=lambda s: None)
    d, dcard = cards.load_checkpoint(tmp_path / "ship" / "rish_3t7t", device="cpu")
    np.testing.assert_allclose(dcard.training["spread_scale"], rep["diffusion"]["spread_scale"])
    np.testing.assert_allclose(d.spread_scale.float().numpy(),
                               np.float16(rep["diffusion"]["spread_scale"]), rtol=1e-3)
    with pytest.raises(ValueError, match="must be a rish-cnn-3t7t"):
        study.load_members([tmp_path / "ship" / "rish_cnn_3t7t", tmp_path / "ship" / "rish_3t7t"])


def test_training_refuses_the_report_and_calibration_families(tmp_path):
    """Only :data:`study.TRAINING_FAMILIES` train: the test family is the
    report and ``calib`` the shift the spread is checked on, so both must stay
    unseen (function and command line); the card names the PSFs drawn."""
    assert set(study.TRAINING_FAMILIES) == set(dg.FAMILIES) - {study.REPORT_FAMILY,
                                                                study.CALIBRATION_FAMILY}
    for family in (study.REPORT_FAMILY, study.CALIBRATION_FAMILY):
        with pytest.raises(ValueError, match="stay unseen"):
            study.train_shipped(tmp_path / family, n_pairs=2, steps=2, grid=16, family=family,
                                log=lambda s: None)
        with pytest.raises(SystemExit):
            study.main(["train", str(tmp_path / family), "--family", family])
    assert not list(tmp_path.iterdir())
    text = study.training_data(24, 32, (1.0, 1.8), "train-mixed")
    counts = dict(re.findall(r"([a-z-]+) (\d+)", text.split("PSF per pair: ")[1].split(")")[0]))
    psfs = [study.widened_degradation(s, "train-mixed", (1.0, 1.8)).psf
            for s in study.SEED_TRAIN + np.arange(24)]
    assert {k: int(v) for k, v in counts.items()} == {p: psfs.count(p) for p in set(psfs)}
    assert set(psfs) == set(dg.FAMILIES["train-mixed"]["psf"])


# ----------------------------------------------------------------------------
# The ensemble-disagreement range on the card, and the inference flag
# ----------------------------------------------------------------------------
def test_shipped_card_records_the_ensemble_disagreement_range():
    """The shipped diffusion card holds the range the evaluate flag and the
    inference step use: measured on the calibration pairs with the shipped
    members (re-measured here on the first pair), flagged above 1.1 x the
    largest."""
    card = cards.load_card(study.SHIPPED_DIFFUSION)
    e = card.acquisition.ranges[rishdiff.DISAGREEMENT]
    assert e["action"] == "flag" and e["definition"] == rishdiff.DISAGREEMENT_DEFINITION
    assert len(e["values"]) == study.VALIDATION_PAIRS
    assert f"seeds {study.SEED_VALIDATION}-{study.SEED_VALIDATION + 5}" in e["validation"]
    assert e["trained"] == [min(e["values"]), max(e["values"])]
    assert e["max"] == pytest.approx(rishdiff.DISAGREEMENT_MARGIN * max(e["values"]), abs=1e-6)
    folders = study.member_folders()
    assert e["members"] == rishdiff.member_records(folders, study.SHIPPED)
    (v,) = study.simulate_pairs([study.SEED_VALIDATION], "train", 32)
    members = rishdiff.guard_members(e, study.SHIPPED)
    assert rishdiff.ensemble_disagreement(members, v.f3, v.sigma3, e) == \
        pytest.approx(e["values"][0], abs=2e-6)


def test_a_recorded_range_holds_only_for_its_members(tmp_path):
    """``record_range`` writes the entry into the diffusion card (weights
    untouched, still loadable); swapping a member's weights is refused."""
    from dmriflow.models.experiments import ldm_ensemble
    quiet = dict(n_pairs=2, steps=2, grid=16, log=lambda s: None)
    study.train_shipped(tmp_path, **quiet)
    ldm_ensemble.train_members(tmp_path / study.SHIPPED_ENSEMBLE.name, seeds=(1,), **quiet)
    entry = ldm_ensemble.record_range(tmp_path, grid=16, validation_pairs=2, log=lambda s: None)
    _, card = cards.load_checkpoint(tmp_path / "rish_3t7t", device="cpu")
    assert card.acquisition.ranges[rishdiff.DISAGREEMENT] == entry
    assert [m["checkpoint"] for m in entry["members"]] == ["rish_cnn_3t7t",
                                                           "rish_cnn_ensemble_3t7t/seed-1"]
    assert entry["max"] > entry["trained"][1] >= entry["trained"][0] > 0
    assert len(rishdiff.guard_members(entry, tmp_path)) == 2
    other = dict(entry, members=[entry["members"][0],
                                 {**entry["members"][1], "weights_sha256": "0" * 64}])
    with pytest.raises(ValueError, match="not the ensemble member"):
        rishdiff.guard_members(other, tmp_path)


def _series(seed: int, family: str):
    """A simulated 3T member (32^3 grid, 3.125 mm: the card's cube) as a DWI."""
    return dg.simulate_pair(seed, family=family).dwi_3t(f"sub-{seed}_dwi.nii.gz")


def test_3t7t_inference_flags_a_subject_the_ensemble_disagrees_on():
    """``--inference 3t7t`` measures the shipped ensemble's disagreement on each
    subject: an unseen train-family pair (seed 60000, disagreement 0.234) is
    not flagged; a test-family pair (seed 50000: k-space PSF and bump bias,
    SNR 18 - inside the card's SNR range, 0.717) is flagged with its value and
    the card's range (and for its sharpness, above the training pairs')."""
    from dmriflow.interfaces.inference import THREE_T_TO_7T, run_inference
    limit = cards.load_card(study.SHIPPED_DIFFUSION).acquisition.ranges[
        rishdiff.DISAGREEMENT]["max"]
    runs = {}
    for seed, family in ((60_000, "train"), (50_000, "test")):
        dwi = _series(seed, family)
        out, _ = run_inference(THREE_T_TO_7T, None, dwi, dwi.paths["dwi"],
                               census={"field_strength_t": 3.0})
        runs[family] = out
    inside, shifted = runs["train"].parameters, runs["test"].parameters
    assert 0 < inside["ensemble_disagreement"] < limit and inside["range_flags"] == ""
    d = shifted["ensemble_disagreement"]
    assert d > limit and runs["test"].row["inference_ensemble_disagreement"] == d
    # the k-space PSF also reads sharper than any training pair (the cards' range)
    flag = re.fullmatch(r"sharpness (\S+) is outside the model's range -2\.246--1\.75; "
                        r"training data -2\.246--1\.75; "
                        r"ensemble_disagreement (\S+) is outside the model's range "
                        r"0-0\.3015; validation pairs 0\.2299-0\.274", shifted["range_flags"])
    assert flag and float(flag[2]) == pytest.approx(d, abs=1e-4) and float(flag[1]) > -1.75


def test_3t7t_inference_computes_the_cube_features_once(monkeypatch):
    """``generate_7t_like`` hands its shell features to the ensemble guard: the
    cube's features are computed once per subject (they were twice), and the
    guard's value is the one it measures from the series on its own."""
    import dataclasses

    from dmriflow.models.ldm import cohort
    diff, dcard = cards.load_checkpoint(study.SHIPPED_DIFFUSION, device="cpu")
    dcard = dataclasses.replace(dcard, extra={"samples": 2, "sample_steps": 2})
    dwi = _series(60_000, "train")
    alone, _ = cohort.ensemble_guard(dwi.select_volumes(features.shell_volumes(dwi.gtab)[0]))
    calls = []
    real = features.shell_features

    def counted(*args, **kwargs):
        calls.append(args[-1] if len(args) > 4 else kwargs.get("grid"))
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "shell_features", counted)
    _, _, extra = cohort.generate_7t_like(diff.float(), dcard, dwi, seed=0)
    assert calls == [diff.grid]
    assert extra["info"]["ensemble_disagreement"] == round(alone, 5)
