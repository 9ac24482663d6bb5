"""Resolution-matched registration (``register_fa(match_resolution=rule)``):
a subject whose voxels are coarser than the template's is registered to the
template blurred to its resolution (``RESOLUTION_MATCH_RULES``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dmriflow.interfaces import harmonize as H


def _affine(zooms, angle_deg=0.0, origin=(-30.0, 12.0, 4.0)):
    """Voxel -> world: ``zooms`` along axes rotated by ``angle_deg`` about z."""
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rot @ np.diag(zooms)
    out[:3, 3] = origin
    return out


def test_blur_is_the_difference_of_the_voxels_point_spread():
    """3 mm against a 2.5 mm template: "box" SD sqrt((9 - 6.25) / 12) = 0.4787
    mm, "fwhm" FWHM sqrt(9 - 6.25) = 1.658 mm, "box-linear" SD sqrt((9 - 6.25)
    / 4) = 0.829 mm, per template axis in template voxels; isotropic voxels
    rotated against the template give the same; only the axis where the
    subject is coarser is blurred (2 x 2 x 4 mm against 2.5 mm: z only, with
    the z variance difference); a finer subject is not blurred and the
    template comes back unchanged."""
    tpl = _affine((2.5, 2.5, 2.5))
    dv2 = 3.0 ** 2 - 2.5 ** 2
    want = {"box": math.sqrt(dv2 / 12), "fwhm": math.sqrt(dv2) * H.FWHM_TO_SIGMA,
            "box-linear": math.sqrt(dv2 / 4)}
    for rule, sd_mm in want.items():
        for angle in (0.0, 30.0):
            got = H.resolution_match_sigma(_affine((3.0, 3.0, 3.0), angle), tpl, rule)
            np.testing.assert_allclose(got * 2.5, sd_mm, rtol=1e-9)
    got = H.resolution_match_sigma(_affine((2.0, 2.0, 4.0)), tpl, "box")
    np.testing.assert_allclose(got * 2.5, [0, 0, math.sqrt((16 - 6.25) / 12)], atol=1e-9)
    img = np.random.default_rng(0).random((8, 9, 7)).astype(np.float32)
    fine = _affine((2.0, 2.0, 2.0))
    np.testing.assert_array_equal(H.resolution_match_sigma(fine, tpl), 0)
    np.testing.assert_array_equal(H.resolution_matched(img, tpl, fine, "box"), img)
    np.testing.assert_array_equal(H.resolution_matched(img, tpl, _affine((3, 3, 3)), None), img)
    with pytest.raises(ValueError, match="match_resolution"):
        H.resolution_match_sigma(fine, tpl, "gauss")


def test_blurred_template_has_the_coarse_voxels_variance():
    """A point on the template grid blurred by the "box" rule spreads with
    the variance difference of the two voxels' boxes, (v_m^2 - v_s^2) / 12
    per axis (mm^2), so a 2.5 mm voxel's box variance plus the blur is a 3 mm
    voxel's, 9 / 12."""
    tpl = _affine((2.5, 2.5, 2.5))
    img = np.zeros((15, 15, 15), dtype=np.float32)
    img[7, 7, 7] = 1.0
    out = H.resolution_matched(img, tpl, _affine((3.0, 3.0, 3.0)), "box").astype(np.float64)
    x = (np.arange(15) - 7) * 2.5
    var = [float(np.sum(out.sum(axis=tuple(j for j in range(3) if j != k)) * x ** 2))
           / float(out.sum()) for k in range(3)]
    np.testing.assert_allclose(np.array(var) + 2.5 ** 2 / 12, 3.0 ** 2 / 12, rtol=0.02)


#: A small fit: reference persons at 2.5 mm, target persons at 3 mm (noise-free,
#: the target's SH scaled per order), registered with the "box-linear" rule.
SHAPE = (16, 18, 14)
SEEDS = (31, 32, 33)
LMAX = 4
BVAL = 1000.0
RULE = "box-linear"


@pytest.fixture(scope="module")
def matched_fit():
    from dmriflow.interfaces.sim import phantom
    gtab = phantom.hcp_scheme(n_b0=4, shells=(BVAL,), n_dirs=30)
    ref = [phantom.simulate_subject(SHAPE, seed=k, snr=None, scheme=gtab, voxel_size=2.5,
                                    site=phantom.SiteEffect(name="siteA")) for k in SEEDS]
    tar = [phantom.simulate_subject(SHAPE, seed=k + 10, snr=None, scheme=gtab, voxel_size=2.5,
                                    site=phantom.SiteEffect(name="siteB", voxel_size=3.0,
                                                            rish_scale={0: 0.9, 2: 1.25,
                                                                        4: 0.8}))
           for k in SEEDS]

    def dwi(s):
        import nibabel as nib
        from dmriflow.interfaces.io import DWI
        return DWI(np.asfortranarray(s.dwi, dtype=np.float32), s.gtab, s.mask, s.affine,
                   nib.Nifti1Header(), {})
    fr = [H.subject_features(dwi(s), f"ref{i}", LMAX) for i, s in enumerate(ref)]
    ft = [H.subject_features(dwi(s), f"tar{i}", LMAX) for i, s in enumerate(tar)]
    art = H.fit_harmonization(fr, ft, [BVAL], LMAX, reference_site="siteA",
                              target_site="siteB",
                              registration_options={"match_resolution": RULE})
    return art, [dwi(s) for s in tar], ft


def test_apply_registers_with_the_artefacts_rule(matched_fit, tmp_path):
    """The fit records the rule; apply, registering a target scan itself,
    uses it (the same result as with the fit's transform of that scan, not
    as registered without it), a saved artefact keeps it and its content
    id, and the rule edited in ``artefact.json`` no longer matches the
    content id: refused. The template is the reference's (2.5 mm): the
    target scans' transforms differ from unmatched ones."""
    from dmriflow.interfaces.errors import InputError
    art, dwis, ft = matched_fit
    assert art.match_resolution == RULE
    assert art.parameters["registration_options"]["match_resolution"] == RULE
    fit_t = art.transforms[("siteB", ft[0].subject)]
    plain = H.register_fa(H.masked_fa(ft[0]), ft[0].affine, art.template_fa,
                          art.template_affine)
    assert not np.array_equal(plain.forward, fit_t.forward)
    out, _ = H.apply_harmonization(dwis[0], None, art)
    np.testing.assert_array_equal(out, H.apply_harmonization(dwis[0], None, art,
                                                             transform=fit_t)[0])
    off, _ = H.apply_harmonization(dwis[0], None, art,
                                   registration_options={"match_resolution": None})
    np.testing.assert_array_equal(off, H.apply_harmonization(dwis[0], None, art,
                                                             transform=plain)[0])
    assert not np.array_equal(out, off)
    folder = art.save(tmp_path / "harm")
    back = H.HarmonizationArtefact.load(folder)
    assert back.match_resolution == RULE and back.content_id == art.content_id
    meta = json.loads((folder / H.ARTEFACT_JSON).read_text())
    meta["parameters"]["registration_options"]["match_resolution"] = "box"
    (folder / H.ARTEFACT_JSON).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="content id"):
        H.HarmonizationArtefact.load(folder)
