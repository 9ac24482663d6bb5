"""RISH harmonization on unpaired and paired two-site studies (issue 17).

Ground truth: :mod:`dmriflow.interfaces.sim.unpaired` - persons with their own
anatomy and non-linear deformation, site B at 3 mm / SNR 20 with a known
per-order, per-shell SH scaling, and a known group effect (lower anisotropy
in the cc of every second person). The harmonization is fitted on 12 persons
per site and evaluated on 12 held-out persons scanned at both sites, so each
harmonised target scan has its truth: the same person's reference-site scan.

Tolerances from the sample size: an unpaired fit's two site means come from
different persons, so the fitted scales carry a sampling error of about
sqrt(2/12) = 0.41 in units of the between-person SD (Cohen's d), and the
issue's |d| <= 0.2 (half of that) cannot be guaranteed at this n by any
site-mean estimator; a paired fit's scales only carry the scan-to-scan
error (~0.12 in d). The tests bound |d| by 0.2 + about one SE (0.6
unpaired, 0.4 paired; was 0.6 for both), require the residual not to be
significant (p > 0.05, either direction: no overcorrection) and bound the
relative residual of the means (8 % unpaired, 3 % paired: the d bound in
per cent of the most variable row); the same checks fail with the harmonization
off or applied twice (test_site_checks_catch_no_and_double_harmonization).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from dmriflow.interfaces import harmonize as H
from dmriflow.interfaces.sim import phantom
from dmriflow.interfaces.sim import unpaired as U

N_FIT = 12                  # persons per site in the fit (the issue asks >= 12)
N_HELD_OUT = 12             # held-out persons (6 controls + 6 patients) at both sites
#: Residual site effect on held-out persons, per fit design (see the module
#: docstring): |d| <= the acceptance's 0.2 + about one SE of the fitted scale.
#: Unpaired: SE = sqrt(1/12 + 1/12) = 0.41 of the between-person SD (two
#: sets of persons) -> 0.6 (measured max 0.41 at seed 0, 0.48 at seed 100).
#: Paired: the scale's error is the within-person (scan-to-scan) spread,
#: 0.2-0.3 of the between-person SD on every row but RISH l4 b=1000
#: (measured on the held-out persons), over 12 persons in the fit and 12 in
#: the evaluation: SE ~ 0.3 x sqrt(2/12) = 0.12 -> 0.2 + 1.5 SE = 0.4
#: (measured max 0.29 at seed 0, 0.35 at seed 100; the systematic part is
#: the voxel-size / SNR residual, docs/harmonization.md). The relative
#: residual of the means is the same bound in per cent of the most variable
#: row (RISH l2/l4: between-person CV up to 14 %): 0.6 x 14 % ~ 8 % unpaired
#: (measured max 1.6 % at seed 0, 7.1 % at seed 100 on l2 b=1000), and
#: 3 % paired (measured max 1.6 % and 1.8 %).
D_AFTER_MAX = {"unpaired": 0.6, "paired": 0.4}
REL_AFTER_MAX = {"unpaired": 0.08, "paired": 0.03}
#: The group effect keeps its Cohen's d within 10 % (measured ratios
#: 1.004-1.029) and stays significant (p < 0.01; measured <= 0.002).
GROUP_RATIO_TOL = 0.10
GROUP_P_MAX = 0.01
#: FA of the harmonised scan against the truth FA (DTI FA vs the phantom's
#: low-b FA in the brain mask): no worse than before by more than this, and
#: at least the issue's 0.95. Measured: min 0.946 before, 0.951-0.952 after
#: (the harmonised scan has site A's higher anisotropy contrast).
FA_CORR_LOSS_MAX = 0.005
FA_CORR_MIN = 0.95


@pytest.fixture(scope="module", params=["unpaired", "paired"])
def study(request):
    return request.param, U.validate(request.param, N_FIT, N_HELD_OUT, seed=0, in_sample=False)


# ----------------------------------------------------------------------------
# the generator
# ----------------------------------------------------------------------------
def test_scans_are_deterministic_and_persons_differ():
    a = U.scan(U.Person(3, "patient"), U.SITE_B)
    b = U.scan(U.Person(3, "patient"), U.SITE_B)
    np.testing.assert_array_equal(a.subject.dwi, b.subject.dwi)
    c = U.scan(U.Person(4, "patient"), U.SITE_B)
    assert not np.array_equal(a.subject.truth["label"], c.subject.truth["label"])
    assert a.subject.dwi.shape[:3] == (20, 23, 18)                  # 3 mm at site B
    assert U.scan(U.Person(3), U.SITE_A).subject.dwi.shape[:3] == U.STUDY_SHAPE
    # the noise follows the site's SNR (sigma = mean white-matter b0 / SNR)
    wm = a.subject.truth["label"] == phantom.LABELS["wm"]
    assert a.subject.sigma == pytest.approx(a.subject.truth["s0"][wm].mean() / U.SITE_B.snr)


def test_deformation_is_non_linear_and_invertible():
    """The person's warp is not an affine (RMS residual of the best affine fit
    over the head > 0.5 mm; measured 1.0-2.2 mm) and keeps a positive Jacobian
    (the strain bound: det >= (1 - WARP_MAX_STRAIN)^3 > 0)."""
    s = phantom.simulate_subject(U.STUDY_SHAPE, seed=0, snr=None, scheme=U.study_scheme())
    x = np.argwhere(s.mask) @ s.affine[:3, :3].T + s.affine[:3, 3]
    for seed in range(3):
        u = U.displacement(x, seed)
        design = np.column_stack([x, np.ones(len(x))])
        resid = u - design @ np.linalg.lstsq(design, u, rcond=None)[0]
        assert np.sqrt((resid ** 2).sum(axis=1).mean()) > 0.5, seed
        eps = 1e-3
        jac = np.stack([(U.displacement(x + eps * e, seed) - u) / eps for e in np.eye(3)],
                       axis=2) + np.eye(3)
        assert np.linalg.det(jac).min() > (1 - U.WARP_MAX_STRAIN) ** 3 - 1e-6, seed


def test_site_scales_the_sh_per_order_and_shell():
    """Noise-free, the same person at site B with and without its SH scaling:
    white-matter RISH ratio = s_l^2 per shell and order (median within 2 %)."""
    person = U.Person(7)
    plain = U.scan(person, replace(U.SITE_B, rish_scale=None)).subject
    scaled = U.scan(person, U.SITE_B).subject
    wm = plain.truth["label"] == phantom.LABELS["wm"]
    dw = U.as_dwi
    r0 = H.rish_maps(dw(U.Scan(plain, person, "x"), plain.noise_free), U.STUDY_LMAX)
    r1 = H.rish_maps(dw(U.Scan(scaled, person, "x"), scaled.noise_free), U.STUDY_LMAX)
    for b, table in U.SITE_B.rish_scale.items():
        for order, s in table.items():
            ratio = np.median(r1[b][..., order // 2][wm] / r0[b][..., order // 2][wm])
            assert ratio == pytest.approx(s ** 2, rel=0.02), (b, order)


def test_site_echo_time_sets_the_b0_contrast():
    """A site's echo time (``Site.te_ms``) sets the noise-free b0 to the
    phantom's ``pd exp(-TE / t2)`` (median relative error over the mask
    < 1 %; the person's warp resamples the maps, so edges differ more;
    measured 0.7 % at 89.5 ms, 0.6 % at 60 ms) and the b0 volumes follow the
    truth ``s0`` (within 2 %: they are stored at b=5); None keeps the
    phantom's TE bit for bit, so the studies of earlier sessions reproduce.
    The shorter TE lowers CSF/WM b0 contrast (measured 2.83 -> 2.00)."""
    person = U.Person(7)
    default = U.scan(person, U.SITE_A).subject
    same = U.scan(person, replace(U.SITE_A, te_ms=phantom.HCP_TE_MS)).subject
    np.testing.assert_array_equal(default.dwi, same.dwi)
    short = U.scan(person, replace(U.SITE_A, te_ms=60.0)).subject
    contrast = []
    for s, te in ((default, phantom.HCP_TE_MS), (short, 60.0)):
        m = s.mask
        b0 = s.noise_free[..., s.gtab.b0s_mask].mean(axis=-1)[m]
        np.testing.assert_allclose(b0, s.truth["s0"][m], rtol=0.02)
        t2 = s.truth["t2"][m]
        model = s.truth["pd"][m] * np.exp(-te / np.where(t2 > 0, t2, np.inf))
        assert np.median(np.abs(s.truth["s0"][m] / model - 1)) < 0.01, te
        label = s.truth["label"]
        contrast.append(np.median(s.noise_free[..., s.gtab.b0s_mask].mean(axis=-1)[
            label == phantom.LABELS["csf"]]) / np.median(s.truth["s0"][
                label == phantom.LABELS["wm"]]))
    assert contrast[1] < 0.8 * contrast[0], contrast


def test_group_effect_is_in_the_bundle_only():
    """Noise-free: a patient's FA drops in the group region (by > 0.1) and
    nowhere else: other white matter, one voxel away from the region (the
    warp interpolates across its edge), within 1e-3."""
    from scipy import ndimage
    ctrl = U.scan(U.Person(8, "control"), U.SITE_A).subject
    pat = U.scan(U.Person(8, "patient"), U.SITE_A).subject
    fa = [H.dti_fa(U.as_dwi(U.Scan(s, U.Person(8), "x"), s.noise_free)) for s in (ctrl, pat)]
    region = ctrl.truth["group_region"]
    other = (ctrl.truth["label"] == phantom.LABELS["wm"]) & ~ndimage.binary_dilation(region)
    assert region.sum() > 50
    assert fa[0][region].mean() - fa[1][region].mean() > 0.1
    assert abs(fa[0][other].mean() - fa[1][other].mean()) < 1e-3


# ----------------------------------------------------------------------------
# harmonization against the truth, held-out persons
# ----------------------------------------------------------------------------
def site_failures(rows, d_max: float, rel_max: float) -> list:
    """The held-out site rows that break the checks: significant residual
    (p <= 0.05, either direction: no overcorrection), |d| above ``d_max``,
    relative residual of the means above ``rel_max``, or less than two
    thirds of a large effect (|d before| > 1.5) removed."""
    bad = []
    for r in rows:
        if r["p_after"] <= 0.05 or abs(r["d_after"]) > d_max \
                or abs(r["rel_after"]) > rel_max \
                or (abs(r["d_before"]) > 1.5 and abs(r["d_after"]) >= abs(r["d_before"]) / 3):
            bad.append((r["metric"], r["shell"], round(r["d_after"], 2),
                        round(100 * r["rel_after"], 1)))
    return bad


def test_site_effect_removed_without_overcorrection(study):
    design, res = study
    rows = res["site"]
    assert {(r["metric"], r["shell"]) for r in rows if not math.isnan(r["shell"])} == {
        (f"rish_l{o}", b) for o in (0, 2, 4) for b in U.STUDY_SHELLS}
    assert sum(r["p_before"] < 0.01 and abs(r["d_before"]) > 1.5 for r in rows) >= 5
    assert site_failures(rows, D_AFTER_MAX[design], REL_AFTER_MAX[design]) == [], design


def test_site_checks_catch_no_and_double_harmonization(study):
    """The checks above are not loose enough to pass without harmonization
    (every scale 1) or with an overcorrecting one (the fitted scales squared:
    the artefact applied twice)."""
    design, res = study
    art = res["artefact"]
    for name, power in (("off", 0.0), ("twice", 2.0)):
        wrong = replace(art, scale_maps={b: (m ** power).astype(np.float32)
                                         for b, m in art.scale_maps.items()}, content_id="")
        assert len(site_failures(res["site_with"](wrong), D_AFTER_MAX[design],
                                  REL_AFTER_MAX[design])) >= 5, \
            (design, name)


def test_group_effect_kept(study):
    design, res = study
    assert {r["metric"] for r in res["group"]} == set(U.GROUP_METRICS)
    for r in res["group"]:
        assert r["p_before"] < GROUP_P_MAX and r["d_before"] < -2, (design, r)
        assert abs(r["ratio"] - 1) <= GROUP_RATIO_TOL, (design, r)
        assert r["p_after"] < GROUP_P_MAX, (design, r)


def test_fa_against_the_truth_kept(study):
    design, res = study
    assert len(res["fa_corr"]) == N_HELD_OUT
    for r in res["fa_corr"]:
        assert r["after"] >= r["before"] - FA_CORR_LOSS_MAX, (design, r)
        assert r["after"] >= FA_CORR_MIN, (design, r)


def test_cc_window_follows_the_voxel_size():
    """The SyN CC window is CC_RADIUS_MM in template voxels: 4 at HCP's
    1.25 mm (the former fixed default), 2 at the study's 2.5 mm."""
    assert H.cc_radius_for(np.diag([1.25, 1.25, 1.25, 1])) == H.CC_RADIUS == 4
    assert H.cc_radius_for(np.diag([2.5, 2.5, 2.5, 1])) == 2
    assert H.cc_radius_for(np.diag([20.0, 20.0, 20.0, 1])) == 1


# ----------------------------------------------------------------------------
# the evaluation's white matter: defined once from the reference site
# ----------------------------------------------------------------------------
#: A noisier target site and no site effect: the same 6 persons at both sites
#: on the same 2.5 mm grid, site B at SNR 10 (site A 30), no SH scaling.
MASK_STUDY_N = 6
MASK_STUDY_TARGET = U.Site("siteB", voxel_mm=U.STUDY_VOXEL_MM, snr=10.0)
#: The residual site effect a common mask may show on the noise-free signal:
#: the issue's |d| <= 0.2. Measured at seed 0 (registration through rish-l0,
#: which a site's noise does not bias): max |d| 0.04 with the reference-defined
#: masks, 0.58 (FA) with each scan's own FA >= 0.3 mask. Registered through
#: FA instead, site B's noisier FA biases its registration itself (its white
#: matter looks wider): the reference-defined masks then give |d| 0.45 (FA),
#: not 0.04 - the mask is only as common as the registration is unbiased.
MASK_D_MAX = 0.2


def test_reference_defined_masks_measure_no_site_effect_where_there_is_none():
    """With no site effect, the evaluation's masks must not make one. Each
    scan's noise-free signal is summarised in the white matter its noisy
    scan gives: with its own FA >= WM_FA_THRESHOLD (the evaluation before
    issue 17's item 3), site B's noise lets grey-matter voxels in and the
    noise-free FA differs between the sites of the same persons (|d| about
    0.6); with the white matter defined once in template space from the
    reference site and brought to each scan through its registration (the
    engine's evaluation), the masks differ by registration only and |d|
    stays within MASK_D_MAX on every row. The truth's white matter gives 0
    exactly (the same signal in the same voxels)."""
    study = U.paired_study(MASK_STUDY_N, 0, (U.SITE_A, MASK_STUDY_TARGET))
    feats = {site: U.features(scans) for site, scans in study.items()}
    art = H.fit_harmonization(feats["siteA"], feats["siteB"], list(U.STUDY_SHELLS), U.STUDY_LMAX,
                              reference_site="siteA", target_site="siteB",
                              registration_contrast="rish-l0")
    tables = U.fit_cohort_evaluation(study, feats, art, noise_free=True)
    worst = {name: t.loc[t["d_before"].abs().idxmax()] for name, t in tables.items()}
    shown = {name: f"{r['metric']} {r['shell']}: d {r['d_before']:.3f}"
             for name, r in worst.items()}
    assert (tables[U.TRUTH_WM_MASK]["d_before"] == 0).all(), shown
    assert abs(worst[H.EVAL_MASK_REFERENCE]["d_before"]) <= MASK_D_MAX, shown
    assert abs(worst[H.EVAL_MASK_OWN]["d_before"]) > MASK_D_MAX, shown
    assert (tables[H.EVAL_MASK_REFERENCE]["wm_mask"] == H.EVAL_MASK_REFERENCE).all()
