"""Tissue-guided pooling of the site means (``fit_harmonization(tissue_pool_fwhm_mm=...)``).

Ground truth: a template with two tissues side by side (white matter, FA 0.6;
grey matter, FA 0.1; one sharp edge), a known site ratio per tissue and SH
order, and every fitting subject's own "anatomy": independent per-voxel
multiplicative variation of its RISH (unpaired: other subjects at each site).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from dmriflow.interfaces import harmonize as H

BVAL = 1000.0
LMAX = 4
GRID = (24, 12, 12)
VOXEL_MM = 2.0
EDGE = 12                               # x < EDGE: white matter, x >= EDGE: grey matter
N_PER_SITE = 6
ANATOMY_SD = 0.2                        # per-voxel log-SD of a subject's RISH around its tissue's
FWHM_MM = 10.0
#: the target's true scale lambda_l per tissue (orders 0, 2, 4): the fit must
#: find sqrt(E_ref / E_tar) = these
LAMBDA = {"wm": np.array([1.10, 1.25, 0.90]), "gm": np.array([0.90, 0.80, 1.20])}
#: reference RISH per tissue (l0 from a mean signal exp(-b ADC), ADC 0.7e-3 /
#: 0.9e-3 mm^2/s: both tissue, no CSF weight)
R_REF = {"wm": np.array([4 * np.pi * np.exp(-2 * 0.7), 0.30, 0.05]),
         "gm": np.array([4 * np.pi * np.exp(-2 * 0.9), 0.02, 0.004])}


def _template():
    fa = np.full(GRID, 0.1, np.float32)
    fa[:EDGE] = 0.6
    return fa, np.diag([VOXEL_MM] * 3 + [1.0])


def _subjects(site: str, seed: int):
    """``N_PER_SITE`` subjects of one site on the template grid, each tissue's
    RISH times the subject's own mean-one log-normal variation per voxel and
    order (the reference's RISH, or the target's: divided by LAMBDA^2)."""
    rng = np.random.default_rng(seed)
    fa, aff = _template()
    wm = (np.arange(GRID[0]) < EDGE)[:, None, None, None]
    base = np.broadcast_to(np.where(wm, R_REF["wm"], R_REF["gm"]), GRID + (3,))
    if site == "tar":
        base = base / np.where(wm, LAMBDA["wm"], LAMBDA["gm"]) ** 2
    out = []
    for i in range(N_PER_SITE):
        anat = np.exp(rng.normal(-ANATOMY_SD ** 2 / 2, ANATOMY_SD, base.shape))
        out.append(H.SubjectFeatures(f"{site}{i}", fa, aff, np.ones(GRID, bool),
                                     {BVAL: (base * anat).astype(np.float32)}))
    return out


def _fit(**kw):
    fa, aff = _template()
    return H.fit_harmonization(_subjects("ref", 1), _subjects("tar", 2), [BVAL], LMAX,
                               registration="identity", template=(fa, aff), **kw)


def _tolerance() -> float:
    """4 standard errors of lambda at a voxel next to the edge: the pooled
    ratio of two site means of ``N_PER_SITE`` subjects with independent
    per-voxel variation (log-SD ``ANATOMY_SD``) over the tissue's own
    Gaussian-weighted voxels (their effective number at the edge, from the
    weights); lambda = sqrt(ratio) halves the relative error."""
    w_tissue = np.zeros(GRID, np.float32)
    w_tissue[:EDGE] = 1
    sigma = FWHM_MM * H.FWHM_TO_SIGMA / VOXEL_MM
    delta = np.zeros(GRID, np.float32)
    delta[EDGE - 1, GRID[1] // 2, GRID[2] // 2] = 1
    g = ndimage.gaussian_filter(delta, sigma) * w_tissue   # the edge voxel's weights (symmetric)
    n_eff = g.sum() ** 2 / (g ** 2).sum()
    cv = np.sqrt(np.exp(ANATOMY_SD ** 2) - 1)
    return 4 * 0.5 * cv * np.sqrt(2 / N_PER_SITE / n_eff)


def test_tissue_pooling_recovers_each_tissues_ratio_at_the_edge():
    """At the voxels on both sides of the edge the pooled map is each
    tissue's own lambda_l within 4 standard errors of the sampling noise
    (bound from the weights: ~1 %); the per-voxel ratio there is off by the
    subjects' anatomy (~10 %), a Gaussian-smoothed map (same FWHM) by the
    other tissue's ratio (~10-20 %). Checked to fail when the tissues are
    mixed (one class for all), without the weights in the pooled means, and
    with the class ratios summed unweighted."""
    tol = _tolerance()
    assert 0.003 < tol < 0.02
    pooled = _fit(tissue_pool_fwhm_mm=FWHM_MM).scale_maps[BVAL]
    plain = _fit().scale_maps[BVAL]
    smoothed = _fit(smoothing_fwhm_mm=FWHM_MM).scale_maps[BVAL]
    inner = (slice(2, -2), slice(2, -2))          # away from the grid's other faces
    for x, tissue in ((EDGE - 1, "wm"), (EDGE, "gm")):
        want = LAMBDA[tissue]
        for name, maps in (("pooled", pooled), ("per-voxel", plain), ("smoothed", smoothed)):
            rel = maps[x][inner] / want - 1
            if name == "pooled":
                assert np.abs(rel).max() < tol, (tissue, np.abs(rel).max(), tol)
            else:   # what pooling within tissues is there to fix
                assert np.abs(rel).max() > 3 * tol, (name, tissue, np.abs(rel).max())
    # away from the edge the same tissue's ratio everywhere
    np.testing.assert_allclose(pooled[:EDGE - 4][(slice(None),) + inner] / LAMBDA["wm"], 1,
                               atol=tol)


def test_tissue_weights_are_soft_classes_that_sum_to_one():
    """White matter by the template FA ramp, CSF by the reference's apparent
    diffusivity, grey matter the rest: partial values on the ramps, 1 in
    total in the mask, 0 outside."""
    fa = np.array([0.6, 0.3, 0.1, 0.1, 0.1], np.float32)[:, None, None]
    adc = np.array([0.7e-3, 0.7e-3, 0.9e-3, 2.0e-3, 3.0e-3], np.float32)[:, None, None]
    l0 = 4 * np.pi * np.exp(-2 * BVAL * adc)
    mask = np.ones(fa.shape, bool)
    w = H.tissue_weights(fa, l0, BVAL, mask)[:, 0, 0]
    np.testing.assert_allclose(w, [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0.5, 0.5],
                                   [0, 0, 1]], atol=1e-5)
    mask[0] = False
    assert (H.tissue_weights(fa, l0, BVAL, mask)[0] == 0).all()


def test_default_artefact_is_unchanged_by_the_option(tmp_path):
    """Off (the default, or 0): the maps are the per-voxel ratio's closed
    formula and the saved artefact is byte for byte the one written without
    the option (its parameters do not name it); on, it is recorded. Checked to
    fail when the pooling runs at 0 too, and when the parameter is always
    recorded."""
    default, zero = _fit(), _fit(tissue_pool_fwhm_mm=0.0)
    ref, tar = _subjects("ref", 1), _subjects("tar", 2)
    r = np.mean([f.rish[BVAL] for f in ref], axis=0)
    t = np.mean([f.rish[BVAL] for f in tar], axis=0)
    tau = H.TAU_FRACTION * np.median(t.reshape(-1, 3), axis=0)
    np.testing.assert_allclose(default.scale_maps[BVAL], np.clip(np.sqrt(r / (t + tau)),
                                                                 *H.SCALE_RANGE), rtol=1e-6)
    default.save(tmp_path / "a")
    zero.save(tmp_path / "b")
    for p in sorted((tmp_path / "a").rglob("*")):
        if p.is_file():
            assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes(), p
    assert "tissue_pool_fwhm_mm" not in json.dumps(default.parameters)
    on = _fit(tissue_pool_fwhm_mm=FWHM_MM)
    assert on.parameters["tissue_pool_fwhm_mm"] == FWHM_MM and on.content_id != default.content_id


def test_tissue_pooling_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="tissue_pool_fwhm_mm must be >= 0"):
        _fit(tissue_pool_fwhm_mm=-1.0)
    with pytest.raises(ValueError, match="needs scale_estimator"):
        _fit(tissue_pool_fwhm_mm=FWHM_MM, scale_estimator="native-log")
    with pytest.raises(ValueError, match="FA template"):
        _fit(tissue_pool_fwhm_mm=FWHM_MM, registration_contrast="rish-l0")


def test_a_uniform_site_scale_is_recovered_exactly_in_partial_volume():
    """Paired subjects (each target = its reference over lambda_l^2, one
    lambda_l everywhere) on a template whose FA ramps from grey to white
    matter across the grid and with a CSF slab: every voxel's pooled map is
    lambda_l to float32 precision, partial-volume voxels included (each
    class's pooled ratio is lambda_l^2 and the class weights sum to 1).
    Checked to fail when the class ratios are summed unweighted (x2 .. x3 on
    the ramp)."""
    lam = np.array([1.10, 1.25, 0.90])
    fa = np.broadcast_to(np.linspace(0.1, 0.6, GRID[0], dtype=np.float32)[:, None, None],
                         GRID).copy()
    aff = np.diag([VOXEL_MM] * 3 + [1.0])
    adc = np.full(GRID, 0.8e-3)
    adc[:, :3] = np.linspace(1.2e-3, 3.0e-3, 3)[None, :, None]     # into CSF
    base = np.stack([4 * np.pi * np.exp(-2 * BVAL * adc), 0.3 * fa, 0.05 * fa], axis=-1)
    rng = np.random.default_rng(5)
    ref, tar = [], []
    for i in range(4):
        r = (base * np.exp(rng.normal(0, ANATOMY_SD, base.shape))).astype(np.float32)
        ref.append(H.SubjectFeatures(f"r{i}", fa, aff, np.ones(GRID, bool), {BVAL: r}))
        tar.append(H.SubjectFeatures(f"t{i}", fa, aff, np.ones(GRID, bool),
                                     {BVAL: (r / lam ** 2).astype(np.float32)}))
    w = H.tissue_weights(fa, np.mean([f.rish[BVAL][..., 0] for f in ref], axis=0), BVAL,
                         np.ones(GRID, bool))
    assert ((w > 0.05) & (w < 0.95)).any(axis=-1).mean() > 0.3    # much partial volume
    art = H.fit_harmonization(ref, tar, [BVAL], LMAX, registration="identity",
                              template=(fa, aff), tau=0.0, tissue_pool_fwhm_mm=FWHM_MM)
    np.testing.assert_allclose(art.scale_maps[BVAL], np.broadcast_to(lam, GRID + (3,)),
                               rtol=1e-5)
