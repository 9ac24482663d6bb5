"""``dmriflow evaluate 3t7t`` (issue 15 items 4 and 6): a small real run.

Two held-out seeds of the test degradation family on a 16^3 cube (the
networks are convolutional; the card's cube-voxel range is only reported,
in flags.tsv), 3 samples, 3 template (the fit's minimum per site) and 2
calibration pairs. A second run
on the first seed alone must reproduce that subject's scores exactly.
"""

import numpy as np
import pandas as pd
import pytest
import torch

from dmriflow.models import card as cards
from dmriflow.models import degrade
from dmriflow.models.experiments import ldm_metrics as ev
from dmriflow.models.experiments import ldm_study as study
from dmriflow.models.ldm import rishdiff

SEEDS = [study.SEED_HELDOUT + 201, study.SEED_HELDOUT + 202]
SMALL = dict(ldm_ckpt=None, samples=3, grid=16, template_pairs=3, validation_pairs=2,
             log=lambda s: None)
METHODS = ["shipped", "shipped_sample", "identity", "template_lambda", "cnn", "cnn_clipped",
           "oracle", "cnn_ensemble", "ldm_faithful", "ldm_faithful_rescaled"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    a = tmp_path_factory.mktemp("two")
    b = tmp_path_factory.mktemp("one")
    study.evaluate(SEEDS, a, **SMALL)
    study.evaluate(SEEDS[:1], b, **SMALL)
    return a, b


def _tsv(folder, name):
    return pd.read_csv(folder / f"{name}.tsv", sep="\t")


def test_metrics_table_has_every_method_and_map_once(runs):
    m = _tsv(runs[0], "metrics")
    assert list(m.columns[:5]) == ["method", "map", "nmse", "ssim", "skill"]
    assert len(m) == len(METHODS) * len(ev.MAPS)
    assert sorted(zip(m.method, m["map"])) == sorted((a, b) for a in METHODS for b in ev.MAPS)
    assert (m.n_subjects == 2).all()
    assert np.isfinite(m[["nmse", "ssim", "skill"]].to_numpy()).all()


def test_metrics_are_the_mean_over_subjects(runs):
    m = _tsv(runs[0], "metrics").set_index(["method", "map"])
    per = _tsv(runs[0], "subjects")
    assert sorted(per.subject.unique()) == SEEDS
    mean = per.groupby(["method", "map"])[["nmse", "ssim", "skill"]].mean()
    for col in ("nmse", "ssim", "skill"):
        np.testing.assert_allclose(m.loc[mean.index, col], mean[col], rtol=1e-4, atol=1e-6)
    # skill per subject = 1 - NMSE / NMSE_identity of that subject and map; the
    # TSV keeps 6 significant digits (relative rounding <= 5e-6 of skill, NMSE and
    # NMSE_identity), so the recomputed value may differ by 5e-6 |skill| +
    # 1e-5 |1 - skill| <= 1e-5 (1 + 2 |1 - skill|)
    ident = per[per.method == "identity"].set_index(["subject", "map"])["nmse"]
    for _, r in per.iterrows():
        assert r.skill == pytest.approx(1 - r.nmse / ident[(r.subject, r["map"])],
                                        abs=1e-5 * (1 + 2 * abs(1 - r.skill)))


def test_identity_has_zero_skill_and_the_oracle_beats_it(runs):
    m = _tsv(runs[0], "metrics").set_index(["method", "map"])
    for mp in ev.MAPS:
        assert m.loc[("identity", mp), "skill"] == 0.0
        assert m.loc[("oracle", mp), "nmse"] < m.loc[("identity", mp), "nmse"]
        assert m.loc[("oracle", mp), "skill"] > 0.9
    for mp in ("L0", "L2", "L4"):   # true 7T RISH, up to the tau floor (0.002 at 16^3)
        assert m.loc[("oracle", mp), "nmse"] < 1e-2
    per = _tsv(runs[0], "subjects")
    assert (per[per.method == "identity"].skill == 0.0).all()


def test_calibration_table_rows(runs):
    c = _tsv(runs[0], "calibration")
    assert list(c.columns) == ["method", "map", "nominal", "coverage"]
    # the sampling model (alone and widened by the ensemble's spread) on every
    # map, the noise proxy and the CNN ensemble on the RISH orders; methods
    # without an interval (identity, template, cnn, oracle) are absent
    want = ({(m, mp, n) for m in ("shipped", "shipped_widened") for mp in ev.MAPS
             for n in study.NOMINALS}
            | {(m, mp, n) for m in ("cnn_noise_proxy", "cnn_ensemble")
               for mp in ev.MAPS[:3] for n in study.NOMINALS})
    assert set(zip(c.method, c["map"], c.nominal)) == want and len(c) == len(want)
    assert c.coverage.between(0, 1).all()
    # wider intervals cover at least as much, per method and map
    for _, g in c.groupby(["method", "map"]):
        assert np.all(np.diff(g.sort_values("nominal").coverage.to_numpy()) >= 0)


def test_paired_tests_table(runs):
    t = _tsv(runs[0], "paired_tests")
    assert set(t.shipped_vs) == set(METHODS) - {"shipped", "oracle"}
    assert len(t) == (len(METHODS) - 2) * len(ev.MAPS) and (t.subjects == 2).all()
    # fewer than 5 subjects: no p-value claimed
    assert t.wilcoxon_p.isna().all()
    per = _tsv(runs[0], "subjects").set_index(["subject", "method", "map"])["nmse"]
    r = t[(t.shipped_vs == "identity") & (t["map"] == "L4")].iloc[0]
    d = [per[(s, "shipped", "L4")] - per[(s, "identity", "L4")] for s in SEEDS]
    assert r.wins == sum(x < 0 for x in d)
    assert r.mean_nmse_difference == pytest.approx(np.mean(d), rel=1e-4)


def test_a_seed_gives_the_same_subject_and_seeds_differ(runs):
    cols = ["method", "map", "nmse", "ssim", "skill"]
    two, one = _tsv(runs[0], "subjects"), _tsv(runs[1], "subjects")
    a = two[two.subject == SEEDS[0]][cols].sort_values(["method", "map"]).reset_index(drop=True)
    b = one[cols].sort_values(["method", "map"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)          # same seed, same numbers, other seeds aside
    i0, i1 = (two[(two.subject == s) & (two.method == "identity")].set_index("map").nmse
              for s in SEEDS)
    assert not np.allclose(i0, i1, rtol=1e-3)    # a different subject, not a copy
    f = _tsv(runs[0], "flags")
    assert list(f.subject) == SEEDS and f.snr.iloc[0] != f.snr.iloc[1]
    # the ensemble's disagreement is measured per subject (and flagged when high)
    assert (f.ensemble_disagreement > 0).all()


def test_held_out_pairs_are_different_subjects_of_the_test_family():
    a, b = study.simulate_pairs(SEEDS, "test", grid=16)
    assert a.degradation != b.degradation
    assert not np.array_equal(a.f3.rish, b.f3.rish) and not np.array_equal(a.f7.rish, b.f7.rish)
    assert a.degradation["family"] == b.degradation["family"] == "test"
    assert a.degradation["psf"] == degrade.FAMILIES["test"]["psf"]


def test_spread_error_table_and_the_ensemble_members(runs):
    sp = _tsv(runs[0], "spread_error_spearman")
    assert sorted(sp.method.unique()) == ["cnn_ensemble", "cnn_noise_proxy", "shipped",
                                          "shipped_widened"]
    assert len(sp) == 4 * len(SEEDS)
    assert sp[["L0", "L2", "L4"]].abs().le(1).all().all()
    # the ensemble: its own 5 seeds, fed as the `cnn` baseline (its data,
    # inputs and budget; seed 0 is that CNN), apart from its checkpoint
    folders = study.member_folders()
    assert folders == [study.SHIPPED_ENSEMBLE / f"seed-{s}" for s in range(5)]
    cnn = cards.load_card(study.SHIPPED_CNN)
    assert cards.load_card(folders[0]).weights_sha256 == cnn.weights_sha256
    member_cards = [cards.load_card(f) for f in folders]
    assert [c.training["budget"]["seed"] for c in member_cards] == [0, 1, 2, 3, 4]
    for c in member_cards:
        assert c.kwargs == cnn.kwargs and c.training["data"] == cnn.training["data"]
        assert {k: v for k, v in c.training["budget"].items() if k != "seed"} == \
            {k: v for k, v in cnn.training["budget"].items() if k != "seed"}


def test_an_input_the_ensemble_disagrees_on_is_flagged(tmp_path):
    """evaluate flags on the card's disagreement range (the one the inference
    step uses): with its threshold set to 0 in a copy of the shipped card, any
    disagreement is outside it, and the flag names the value and the range."""
    import shutil
    ckpt = tmp_path / "rish_3t7t"
    shutil.copytree(study.SHIPPED_DIFFUSION, ckpt)
    card = cards.load_card(ckpt)
    card.acquisition.ranges[rishdiff.DISAGREEMENT]["max"] = 0.0
    cards.write_card(card, ckpt)
    study.evaluate(SEEDS[:1], tmp_path / "out", diffusion_ckpt=ckpt, **SMALL)
    f = _tsv(tmp_path / "out", "flags")
    d = f.ensemble_disagreement.iloc[0]
    assert f"ensemble_disagreement {d:.4g} is outside the model's range 0-0; validation " \
        "pairs 0.2299-0.274" in f["flags"].iloc[0]


def test_evaluate_records_its_rows_on_the_cards(runs, tmp_path):
    """record_metrics writes evaluate's tables into both cards (the rows the
    previous session pasted by hand): every method and map of metrics.tsv
    with its NMSE/SSIM/skill, the shipped model's coverage at each nominal
    level, and the split naming the seeds; the weights stay the same."""
    import shutil
    folders = [tmp_path / p.name for p in (study.SHIPPED_DIFFUSION, study.SHIPPED_CNN)]
    for src, dst in zip((study.SHIPPED_DIFFUSION, study.SHIPPED_CNN), folders):
        shutil.copytree(src, dst)
    result = {"metrics": _tsv(runs[0], "metrics"), "calibration": _tsv(runs[0], "calibration")}
    study.record_metrics(folders, result, SEEDS)
    split = f"held-out (2, test degradation family, seeds {SEEDS[0]}-{SEEDS[1]})"
    for folder in folders:
        card = cards.load_card(folder)
        cards.load_checkpoint(folder, device="cpu")       # sha256 still matches
        scores = pd.DataFrame([r for r in card.metrics if "nmse" in r])
        cover = pd.DataFrame([r for r in card.metrics if "coverage" in r])
        assert set(scores.split) == set(cover.split) == {split}
        m = result["metrics"].set_index(["method", "map"])
        got = scores.set_index(["method", "map"])
        assert sorted(got.index) == sorted(m.index)
        for col in ("nmse", "ssim", "skill"):
            np.testing.assert_allclose(got.loc[m.index, col], m[col], atol=0.5e-4)
        c = result["calibration"]
        c = c[c.method == "shipped"].set_index(["map", "nominal"])["coverage"]
        assert set(cover.method) == {"shipped"}
        np.testing.assert_allclose(cover.set_index(["map", "nominal"]).loc[c.index, "coverage"],
                                   c, atol=0.5e-4)


def test_cnn_clipped_is_the_cnn_fed_inputs_inside_its_ranges(runs):
    """``cnn_clipped``: the equally-fed CNN with sharpness and SNR clipped into
    its card's ranges (both test subjects are sharper than training, one
    below its SNR range); ``cnn`` keeps the measured inputs."""
    cnn, card = cards.load_checkpoint(study.SHIPPED_CNN, device="cpu")
    cnn.float()
    per = _tsv(runs[0], "subjects").set_index(["subject", "method", "map"])["nmse"]
    for s in study.simulate_pairs(SEEDS, "test", SMALL["grid"]):
        fed = study.model_view(s, card.acquisition.ranges)
        assert fed.f3.sharpness != s.f3.sharpness                # the clip is active
        for method, v in (("cnn", s), ("cnn_clipped", fed)):
            want = study._scores(cnn.predict_lambda(v.f3, v.sigma3), s)
            for mp in ev.MAPS:
                assert per[(s.seed, method, mp)] == pytest.approx(want[f"nmse_{mp}"], rel=1e-5)


def test_shipped_clipped_is_the_diffusion_model_fed_inputs_inside_its_ranges(runs, tmp_path,
                                                                             monkeypatch):
    """``evaluate --clipped`` adds ``shipped_clipped``: the diffusion model's
    posterior mean (and its calibrated intervals) with the sharpness and SNR
    clipped into its own card's ranges, recomputed here from the checkpoint;
    every other row equals the run without the option to the digit. The CLI
    flag reaches :func:`evaluate`."""
    out = tmp_path / "clipped"
    study.evaluate(SEEDS[:1], out, clipped=True, **SMALL)
    diff, dcard = cards.load_checkpoint(study.SHIPPED_DIFFUSION, device="cpu")
    diff.float()
    k, steps = rishdiff.sampling(dcard, SMALL["samples"])
    s = study.simulate_pairs(SEEDS[:1], "test", SMALL["grid"])[0]
    fed = study.model_view(s, dcard.acquisition.ranges)
    assert fed.f3.sharpness != s.f3.sharpness                    # the clip is active
    fit = diff.fit_subject(fed.f3, fed.sigma3, samples=k, steps=steps, seed=s.seed)
    per = _tsv(out, "subjects").set_index(["method", "map"])["nmse"]
    want = study._scores(fit.lam, s)
    for mp in ev.MAPS:
        assert per[(study.SHIPPED_CLIPPED, mp)] == pytest.approx(want[f"nmse_{mp}"], rel=1e-5)
    assert per[(study.SHIPPED_CLIPPED, "L2")] != pytest.approx(per[("shipped", "L2")], rel=1e-3)
    cal = _tsv(out, "calibration")
    got = cal[cal.method == study.SHIPPED_CLIPPED].set_index(["map", "nominal"])["coverage"]
    expected = study.coverage(fit, s, study.fa_samples(fit, s))
    assert len(got) == len(expected)
    for mp, nom, c in expected:
        assert got[(mp, nom)] == pytest.approx(c, abs=1e-6)
    plain = _tsv(runs[1], "metrics").set_index(["method", "map"])
    both = _tsv(out, "metrics").set_index(["method", "map"])
    assert sorted(set(both.index) - set(plain.index)) == [(study.SHIPPED_CLIPPED, mp)
                                                          for mp in sorted(ev.MAPS)]
    pd.testing.assert_frame_equal(both.loc[plain.index], plain)
    tables = {key: _tsv(runs[1], name) for key, name in (
        ("metrics", "metrics"), ("calibration", "calibration"), ("tests", "paired_tests"),
        ("spearman", "spread_error_spearman"))}
    seen = {}
    monkeypatch.setattr(study, "evaluate_checkpoints",
                        lambda *a, **kw: seen.update(kw) or tables)
    assert study.main(["evaluate", str(tmp_path / "cli"), "--no-latent", "--clipped"]) == 0
    assert seen["clipped"] is True and seen["latent"] is False


def test_the_cli_help_names_every_table_evaluate_writes(runs):
    """``dmriflow evaluate 3t7t --out``'s help lists exactly the files a run writes."""
    import argparse
    import re
    from dmriflow.pipelines.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = next(a for a in sub.choices["evaluate"]._actions if a.dest == "out")
    assert set(re.findall(r"\w+\.tsv", out.help)) == {p.name for p in runs[0].iterdir()}
