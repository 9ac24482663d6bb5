"""Several images through one SyN map in one pass give dipy's bits.

:func:`dmriflow.interfaces.resample.warp_many` (behind
``Transform.to_template_many`` / ``to_subject_many``) reproduces dipy's
linear ``warp_3d``; these tests compare its bytes with dipy's own warp of
each image (``Transform.to_template`` / ``to_subject``), and the fit's
artefact and the apply's output with those computed image by image.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dmriflow.interfaces import harmonize as H
from dmriflow.interfaces import resample
from dmriflow.interfaces.io import DWI
from dmriflow.interfaces.sim import phantom

TEMPLATE_SHAPE = (21, 24, 18)
SUBJECT_SHAPE = (19, 22, 20)       # another grid: an index-order slip shows
FIELD_MM = 3.0                     # displacements that reach past the field of view


def _affine(zoom: float, shift) -> np.ndarray:
    aff = np.diag([zoom, zoom, zoom, 1.0])
    aff[:3, 3] = shift
    return aff


def _syn_transform(seed: int = 0) -> H.Transform:
    """A SyN Transform of dipy's layout (inverse map: domain = subject) with
    smooth random fields of a few mm, a rotated and shifted prealignment and
    template and subject grids of different shapes and voxel sizes."""
    rng = np.random.default_rng(seed)
    tpl_aff = _affine(2.0, [-20.0, -24.0, -18.0])
    sub_aff = _affine(2.2, [-21.0, -23.0, -22.0])

    def field():
        f = np.stack([ndimage.gaussian_filter(rng.standard_normal(TEMPLATE_SHAPE), 2.0)
                      for _ in range(3)], axis=-1)
        return (f / f.std() * FIELD_MM).astype(np.float32)

    c, s = np.cos(0.1), np.sin(0.1)
    prealign = np.array([[c, -s, 0, 1.3], [s, c, 0, -0.7], [0, 0, 1, 0.4], [0, 0, 0, 1]])
    geometry = {"disp_shape": TEMPLATE_SHAPE, "disp_grid2world": tpl_aff,
                "domain_shape": SUBJECT_SHAPE, "domain_grid2world": sub_aff,
                "codomain_shape": TEMPLATE_SHAPE, "codomain_grid2world": tpl_aff,
                "prealign": prealign, "is_inverse": True}
    return H.Transform("syn", prealign, TEMPLATE_SHAPE, tpl_aff, SUBJECT_SHAPE, sub_aff,
                       forward=field(), backward=field(), syn_geometry=geometry)


def _images(shape, seed: int) -> list[np.ndarray]:
    """Signed values, zeros outside a box (where dipy writes +0.0 unless a
    corner reaches in), -0.0 voxels, a 0/1 mask, a constant image, and one
    that is -0.0 in a box and +0.0 elsewhere (dipy gives -0.0 where every
    corner is -0.0: those voxels must be interpolated too)."""
    rng = np.random.default_rng(seed)
    box = np.zeros(shape, bool)
    box[3:-4, 2:-3, 4:-2] = True
    signed = np.where(box, rng.standard_normal(shape), 0).astype(np.float32)
    neg_zero = signed.copy()
    neg_zero[rng.random(shape) < 0.2] = -0.0
    only_neg_zero = np.zeros(shape, np.float32)
    only_neg_zero[box] = -0.0
    return [signed, neg_zero, box.astype(np.float32), np.full(shape, 0.75, np.float32),
            (rng.random(shape) * 4 - 1).astype(np.float32), only_neg_zero]


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and \
        np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


@pytest.fixture
def one_pass(monkeypatch):
    """Every call of to_*_many through warp_many, however few its images."""
    monkeypatch.setattr(resample, "MIN_IMAGES", 1)


@pytest.mark.usefixtures("one_pass")
@pytest.mark.parametrize("seed", [0, 1])
def test_to_template_many_gives_dipys_bits(seed):
    t = _syn_transform(seed)
    images = _images(SUBJECT_SHAPE, seed)
    many = t.to_template_many(images)
    assert many.shape == TEMPLATE_SHAPE + (len(images),)
    for k, im in enumerate(images):
        assert _same_bits(many[..., k], t.to_template(im)), k
    # -0.0 outside the box, where the other image is +0.0: reached as well
    pair = [np.where(images[2] > 0, np.float32(1.0), np.float32(-0.0)), images[2]]
    for k, d in enumerate(t.to_template_many(pair).transpose(3, 0, 1, 2)):
        assert _same_bits(d, t.to_template(pair[k])), k
    assert np.signbit(t.to_template(pair[0])).any()


@pytest.mark.usefixtures("one_pass")
@pytest.mark.parametrize("seed", [0, 1])
def test_to_subject_many_gives_dipys_bits_on_the_grid_and_at_voxels(seed):
    t = _syn_transform(seed)
    images = _images(TEMPLATE_SHAPE, seed + 10)
    dipy = [t.to_subject(im) for im in images]
    many = t.to_subject_many(images)
    at = np.flatnonzero(np.random.default_rng(seed).random(SUBJECT_SHAPE) < 0.4)
    picked = t.to_subject_many(images, at)
    assert picked.shape == (at.size, len(images))
    for k, d in enumerate(dipy):
        assert _same_bits(many[..., k], d), k
        assert _same_bits(picked[:, k], d.reshape(-1)[at]), k
    # the positions reach past the template on some voxels: 0 there, as dipy
    assert (many == 0).all(axis=-1).any()
    assert np.signbit(many[..., -1]).any()          # the -0.0 box shows


def test_the_positions_are_dipys_own_affines():
    """warp_parameters reads the affines dipy computes for the grids given (a
    changed output grid changes them) and restores the map's warp function."""
    t = _syn_transform()
    m = t._map()
    p = resample.warp_parameters(m, True, np.linalg.inv(t.subject_affine), TEMPLATE_SHAPE,
                                 t.template_affine)
    q = resample.warp_parameters(m, True, np.linalg.inv(t.subject_affine), TEMPLATE_SHAPE,
                                 _affine(2.0, [-19.0, -24.0, -18.0]))
    assert not np.array_equal(p["affine_idx_in"], q["affine_idx_in"])
    assert "_get_warping_function" not in vars(m)
    assert p["field"] is m.forward or p["field"] is m.backward


# ----------------------------------------------------------------------------
# The fit's artefact and the apply's output: the same bytes as image by image
# ----------------------------------------------------------------------------
SHAPE = (20, 24, 18)
LMAX = 4
SHELLS = (1000.0, 2000.0)
TARGET = phantom.SiteEffect(name="siteB", rish_scale={0: 0.9, 2: 1.2, 4: 0.8}, snr=25.0)


def _dwi(seed: int, site) -> DWI:
    scheme = phantom.hcp_scheme(n_b0=4, shells=SHELLS, n_dirs=30)
    s = phantom.simulate_subject(SHAPE, seed=seed, snr=40.0, scheme=scheme, site=site)
    return DWI(np.asfortranarray(s.dwi, dtype=np.float32), s.gtab, s.mask, s.affine, None, {})


@pytest.fixture(scope="module")
def syn_cohort():
    """3 + 3 subjects (travelling: the same anatomies), registered with SyN to
    a reference template once; their features and transforms."""
    dwis = {f"{site.name}{k}": _dwi(20 + k, site)
            for site in (phantom.SiteEffect(name="siteA"), TARGET) for k in range(3)}
    feats = {s: H.subject_features(d, s, LMAX, noise_floor=True) for s, d in dwis.items()}
    ref = [f for s, f in feats.items() if s.startswith("siteA")]
    tpl, tpl_affine, info = H.build_template(ref, registration="syn")
    transforms = {s: H.register_fa(H.masked_fa(f), f.affine, tpl, tpl_affine, "syn")
                  for s, f in feats.items()}
    return dwis, feats, (tpl, tpl_affine, info), transforms


def _fit(syn_cohort, noise_floor: bool) -> H.HarmonizationArtefact:
    _, feats, (tpl, tpl_affine, info), transforms = syn_cohort
    return H.fit_harmonization(
        [f for s, f in feats.items() if s.startswith("siteA")],
        [f for s, f in feats.items() if s.startswith("siteB")], list(SHELLS), LMAX,
        reference_site="siteA", target_site="siteB", template=(tpl, tpl_affine),
        template_info=info, registered={s: (lambda t=t: t) for s, t in transforms.items()},
        noise_floor=noise_floor)


def _image_by_image_terms(f, t, rish, noise, lmax, *, interpolation="linear"):
    """H._warped_terms as it was: each order of each map warped alone."""
    mask = np.asarray(f.mask, dtype=bool)

    def warp(maps):
        return np.stack([t.to_template(np.where(mask, maps[..., k], 0), interpolation)
                         for k in range(lmax // 2 + 1)], axis=-1)

    cover = np.clip(t.to_template(mask.astype(np.float32), interpolation), 0, 1)
    return H.SubjectTerms(
        cover=cover, warped={float(b): warp(r) for b, r in rish.items()},
        noise={float(b): warp(w) for b, w in noise.items()},
        record={"subject": f.subject, "sha256": f.content_hash(), "grid": list(mask.shape),
                "affine": np.asarray(f.affine).tolist(), "prealign": t.prealign.tolist(),
                "registration": t.kind})


def _image_by_image_scale_maps(artefact, transform, at=None):
    """H.warp_scale_maps as it was (each order alone, on the whole grid), the
    rows at ``at`` picked afterwards as apply_harmonization picked them."""
    out = {}
    for b in artefact.shells:
        maps = artefact.scale_maps[b]
        vol = np.empty(transform.subject_shape + (maps.shape[3],), dtype=np.float32)
        for k in range(maps.shape[3]):
            vol[..., k] = transform.to_subject(maps[..., k] - np.float32(1.0))
        vol += np.float32(1.0)
        out[b] = vol if at is None else np.stack(
            [vol[..., k].reshape(-1)[at] for k in range(maps.shape[3])], axis=1)
    return out


@pytest.mark.parametrize("noise_floor", [False, True])
def test_fit_and_apply_equal_the_image_by_image_warps(syn_cohort, monkeypatch, noise_floor):
    """The artefact (content id, every scale map), each subject's terms and a
    target subject's harmonised series (4D and mask rows) are the bytes of
    the same computation with every image warped alone through dipy."""
    dwis, feats, _, transforms = syn_cohort
    subject = "siteB1"
    f, t = feats[subject], transforms[subject]

    def run():
        art = _fit(syn_cohort, noise_floor)
        terms = H.subject_terms(f, t, list(SHELLS), LMAX, "siteB", noise_floor=noise_floor)
        dwi = dwis[subject]
        grid, _ = H.apply_harmonization(dwi, None, art, subject=subject, transform=t)
        rows = DWI(None, dwi.gtab, dwi.mask, dwi.affine, None, {},
                   rows=np.asfortranarray(dwi.masked()))
        from_rows, _ = H.apply_harmonization(rows, None, art, subject=subject, transform=t)
        return art, terms, grid, from_rows

    art, terms, grid, from_rows = run()
    # main's code before the batch: every map warped alone through dipy
    monkeypatch.setattr(resample, "MIN_IMAGES", 10 ** 9)
    monkeypatch.setattr(H, "_warped_terms", _image_by_image_terms)
    monkeypatch.setattr(H, "warp_scale_maps", _image_by_image_scale_maps)
    old_art, old_terms, old_grid, old_rows = run()
    assert art.content_id == old_art.content_id
    for b in art.shells:
        assert _same_bits(art.scale_maps[b], old_art.scale_maps[b])
    assert _same_bits(terms.cover, old_terms.cover)
    assert terms.warped.keys() == old_terms.warped.keys() == set(SHELLS)
    assert terms.noise.keys() == old_terms.noise.keys()
    assert bool(terms.noise) == noise_floor
    for part, old in ((terms.warped, old_terms.warped), (terms.noise, old_terms.noise)):
        for b in part:
            assert _same_bits(part[b], old[b]) and part[b].flags.c_contiguous
    assert _same_bits(grid, old_grid) and _same_bits(from_rows, old_rows)
    # the mask rows harmonised chunk by chunk from the rows: the grid's voxels
    on_grid = DWI(grid, dwis[subject].gtab, dwis[subject].mask, dwis[subject].affine, None, {})
    assert _same_bits(from_rows, on_grid.masked())
    assert not np.array_equal(grid, dwis[subject].data)      # harmonised: it changed
