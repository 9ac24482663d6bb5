"""The realistic brain phantom (dmriflow.interfaces.sim.brain, ``anatomy="brain"``).

Realism is judged against the real whole-brain Philips scan in ../shared/data
like for like: the phantom is simulated with that scan's gradient table, voxel
size, echo time and SNR (noise from the scan's tensor-fit residuals), both are
fitted with dmriflow's TensorModel, and the FA quartiles in each brain mask are
compared (the noise lifts FA in grey matter and CSF, so the truth cannot be
compared with a measured FA directly).
"""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from dmriflow.interfaces.dti import TensorModel
from dmriflow.interfaces.gradients import GradientTable
from dmriflow.interfaces.sim import brain, phantom as P, unpaired as U, warp

PHILIPS = ("philips_ingenia_b1000", "DTI_Biobank_2mm_MB3S2_EPI_701")
PHILIPS_VOXEL_MM = 2.0
PHILIPS_TE_MS = 69.0
#: b-values below this are the scan's b~0 volumes (stored at b 0.001-0.004).
B0_MAX = 50.0
#: Life-size field of view at the scan's 2 mm (the template head is 152 x 188 x 158 mm).
LIFE_SIZE_SHAPE = (84, 102, 86)
#: Real scan's "white matter" for its SNR: FA above this.
WM_FA = 0.3
#: Tolerance on each FA quartile (25/50/75 %): twice the change of the real
#: scan's median with the mask definition (median_otsu 0.277, eroded by two
#: voxels 0.299). The geometric phantom misses it (median 0.19 vs 0.27).
QUARTILE_TOL = 0.04
QUARTILES = (25, 50, 75)
#: The group effect: lower FA in the callosal body (loss 0.3 of the
#: anisotropic signal): at least this much lower, nowhere else changed.
GROUP_FA_DROP_MIN = 0.1


def _fa_quartiles(dwi, gtab, mask) -> np.ndarray:
    fa = np.nan_to_num(TensorModel(gtab).fit(dwi, mask=mask).fa)
    return np.percentile(fa[mask], QUARTILES)


@pytest.fixture(scope="module")
def real(shared_data):
    """The Philips scan: FA quartiles in its brain mask, gradients and SNR."""
    from dipy.segment.mask import median_otsu
    folder, stem = shared_data / PHILIPS[0], PHILIPS[1]
    data = nib.load(folder / f"{stem}.nii.gz").get_fdata(dtype=np.float32)
    bvals = np.loadtxt(folder / f"{stem}.bval")
    gtab = GradientTable(bvals, np.loadtxt(folder / f"{stem}.bvec").T)
    b0 = data[..., bvals < B0_MAX].mean(axis=-1)
    _, mask = median_otsu(b0, median_radius=2, numpass=2)
    fit = TensorModel(gtab).fit(data, mask=mask)
    fa = np.nan_to_num(fit.fa)
    n = len(bvals)
    resid = (data - fit.predict(gtab))[mask]
    sigma = np.sqrt(np.median(np.mean(resid ** 2, axis=1)) * n / (n - 7))
    snr = float(b0[mask & (fa > WM_FA)].mean() / sigma)
    return {"gtab": gtab, "snr": snr, "quartiles": np.percentile(fa[mask], QUARTILES)}


def _like_real(real, anatomy: str, seed: int = 1) -> np.ndarray:
    sub = P.simulate_subject(LIFE_SIZE_SHAPE, seed=seed, snr=real["snr"], scheme=real["gtab"],
                             voxel_size=PHILIPS_VOXEL_MM, te=PHILIPS_TE_MS, anatomy=anatomy)
    assert sub.params["anatomy"] == anatomy
    return _fa_quartiles(sub.dwi, sub.gtab, sub.mask)


def test_fa_like_a_real_brain(real):
    """Measured like the Philips scan, the brain phantom's FA quartiles in the
    brain mask are the real brain's (within QUARTILE_TOL); the geometric
    phantom's are not, so the check tells a brain from an ellipse."""
    got = _like_real(real, "brain")
    print(f"\nreal quartiles {np.round(real['quartiles'], 3)} snr {real['snr']:.1f}; "
          f"brain phantom {np.round(got, 3)}")
    np.testing.assert_allclose(got, real["quartiles"], atol=QUARTILE_TOL)
    geometric = _like_real(real, "geometric")
    assert np.any(np.abs(geometric - real["quartiles"]) > QUARTILE_TOL), geometric


@pytest.fixture(scope="module")
def subject():
    scheme = P.hcp_scheme(n_b0=2, shells=(1000.0,), n_dirs=30, jitter=False)
    return P.simulate_subject(P.DEFAULT_SHAPE, seed=4, snr=None, scheme=scheme, anatomy="brain")


def test_truth_is_a_brain(subject):
    """Tissue fractions sum to the head; all tissues present; white matter is
    anisotropic and grey matter weakly so; the callosal body runs left-right."""
    t = subject.truth
    frac = t["fractions"]
    assert frac.min() >= 0 and frac.sum(axis=-1).max() <= 1 + 1e-6
    m = t["mask"]
    counts = np.bincount(t["label"][m], minlength=4)
    assert all(counts[1:] > 0.1 * m.sum()), counts
    fa = t["fa"]
    wm, gm = t["label"] == P.LABELS["wm"], t["label"] == P.LABELS["gm"]
    assert 0.35 < np.median(fa[wm]) < 0.7
    assert 0.03 < np.median(fa[gm]) < 0.25
    cc = t["bundle"] == 1
    assert cc.sum() > 10
    # v1 is in the FSL frame (x flipped); left-right is |x| either way
    assert np.median(np.abs(t["v1"][cc][:, 0])) > 0.9
    assert np.all(t["nfib"][~wm & m] <= 1)


def test_deterministic_per_seed_and_persons_differ():
    scheme = P.hcp_scheme(n_b0=1, shells=(1000.0,), n_dirs=6, jitter=False)
    a, b, c = (P.simulate_subject((24, 28, 24), seed=s, snr=20.0, scheme=scheme, anatomy="brain")
               for s in (7, 7, 8))
    np.testing.assert_array_equal(a.dwi, b.dwi)
    for k in a.truth:
        np.testing.assert_array_equal(a.truth[k], b.truth[k])
    assert np.mean(a.truth["label"] != c.truth["label"]) > 0.02


def test_warp_is_non_linear_and_invertible():
    """The person's warp is invertible (Jacobian det > 0 with the strain bound
    (1 - max strain)^3) and not affine (its gradient varies over the brain);
    removing the cap (a deliberate bug) breaks invertibility."""
    tpl = brain.template()
    pts = np.random.default_rng(0).uniform(-0.5, 0.5, (4000, 3)) * tpl.extent + tpl.centre
    for seed in range(20):
        w = brain.person_warp(seed)
        assert w.strain_bound <= brain.WARP_MAX_STRAIN + 1e-12
        jac = np.eye(3) + w.gradient(pts)
        det = np.linalg.det(jac)
        assert det.min() >= (1 - brain.WARP_MAX_STRAIN) ** 3 - 1e-9, seed
        assert np.std(w.gradient(pts), axis=0).max() > 0.01
        # the analytic gradient is the displacement's
        eps = 1e-4
        num = np.stack([(w.displacement(pts + eps * e) - w.displacement(pts - eps * e)) / (2 * eps)
                        for e in np.eye(3)], axis=-1)
        np.testing.assert_allclose(num, w.gradient(pts), atol=1e-6)
    # uncapped: the same draws with a larger amplitude fold space somewhere
    w = brain.person_warp(0)
    big = warp.Warp(w.k, w.phase, w.amp * (6.0 / w.strain_bound))
    assert np.linalg.det(np.eye(3) + big.gradient(pts)).min() < 0
    with pytest.raises(ValueError):
        warp.random_warp(0, 1, 4, (40.0, 80.0), 3.0, max_strain=1.0)


def test_group_effect_where_injected():
    """A patient and a control with the same anatomy: FA in the callosal body
    lower by at least GROUP_FA_DROP_MIN (noise-free truth of the study's
    scans: DTI of the noise-free signal), identical outside it."""
    from dmriflow.interfaces import dti
    scans = [U.scan(U.Person(11, g), U.SITE_A, anatomy="brain", shape=(32, 38, 32))
             for g in U.GROUPS]
    fa = []
    for sc in scans:
        s = sc.subject
        fa.append(np.nan_to_num(dti.TensorModel(s.gtab).fit(s.noise_free, mask=s.mask).fa))
    region = scans[0].subject.truth["group_region"]
    assert region.sum() > 10
    np.testing.assert_array_equal(region, scans[1].subject.truth["group_region"])
    drop = fa[0][region].mean() - fa[1][region].mean()
    assert drop > GROUP_FA_DROP_MIN, drop
    outside = scans[0].subject.mask & ~region
    np.testing.assert_allclose(fa[0][outside], fa[1][outside], atol=1e-5)


def test_template_from_the_installed_package_without_importing_nilearn():
    """The maps are nilearn's package data, read without importing nilearn
    (no network, no start-up cost)."""
    code = ("import sys; from dmriflow.interfaces.sim import brain; t = brain.template(); "
            "print(int('nilearn' in sys.modules), t.fractions.shape[-1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "3"]
    assert all((brain.template_dir() / f).is_file() for f in brain.TEMPLATE_FILES.values())
