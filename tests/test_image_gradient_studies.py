"""The image-gradient studies: the fibre-continuity phantom cohort and the
real two-TE pair (SCIENCE.md section 7).

The phantom has no gradient physics at all, so whatever an estimator finds
there comes from the fibre orientation alone; the real-data part checks the
T2 map of the MDT pair and that the study table is complete and sane.
"""

from __future__ import annotations

import numpy as np
import pytest

from dmriflow.interfaces import phantom as P

#: Small continuity subjects: fast, still ~2500 voxels each.
SMALL_SHAPE = (18, 18, 12)
#: Chance level of the acute angle between two random axes (deg).
CHANCE_MEAN_DEG = float(np.degrees(1.0))


def small_scheme():
    return P.hcp_scheme(n_b0=6, shells=(1000, 2000, 3000), n_dirs=30, seed=1, jitter=False)


def acute_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.abs(np.sum(a * b, axis=-1)) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))


def central_difference(image: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Plain central differences (X, Y, Z, 3), voxel axes, for the truth checks."""
    return np.stack([(np.roll(image, -1, a) - np.roll(image, 1, a)) / (2.0 * voxel_mm)
                     for a in range(3)], axis=-1)


# ----------------------------------------------------------------------------
# The fibre-continuity generator
# ----------------------------------------------------------------------------
def test_continuity_phantom_truth():
    """The image gradient is perpendicular to the fibre in the continuity half,
    unrelated to it in the other half, and the FD gradient of the noise-free
    b0 is the analytic one."""
    sch = P.hcp_scheme(n_b0=2, shells=(1000,), n_dirs=6, seed=1, jitter=False)
    random_half = []
    for seed in range(8):
        s = P.simulate_continuity_subject(SMALL_SHAPE, seed=seed, scheme=sch, snr=None)
        tr, m = s.truth, s.mask
        assert s.sigma == 0.0 and abs(tr["continuity"].mean() - P.CONTINUITY_FRACTION) < 0.01
        b0 = s.dwi[..., sch.b0s_mask].mean(axis=-1)
        fd = central_difference(np.log(b0), s.voxel_size[0])
        fd[..., 0] *= -1.0                          # FSL image frame: x flipped (det > 0)
        err = acute_deg(fd[m], tr["grad"][m])        # O(h^2) error of short waves
        assert np.median(err) < 1.5 and np.percentile(err, 99) < 10.0
        rms = np.sqrt(np.mean(np.sum(tr["grad"] ** 2, axis=-1)))
        assert rms == pytest.approx(P.CONTINUITY_LOG_GRADIENT, rel=1e-6)
        cont = tr["continuity"] & m
        assert acute_deg(tr["grad"][cont], tr["fibre"][cont]).min() > 89.99
        assert acute_deg(tr["v1"][m], tr["fibre"][m]).max() < 0.1      # v1 is the fibre
        random_half.append(acute_deg(tr["grad"][m & ~tr["continuity"]],
                                     tr["fibre"][m & ~tr["continuity"]]).mean())
        t2 = tr["t2"][m]
        assert 45.0 < t2.min() and t2.max() < 110.0                      # plausible WM T2
        assert 0.4 < np.percentile(tr["fa"][m], 5) and np.percentile(tr["fa"][m], 95) < 0.9
    # unrelated (smooth fields, so per-subject means scatter by ~3 deg): the
    # cohort mean is near chance
    assert abs(np.mean(random_half) - CHANCE_MEAN_DEG) < 3.0


def test_continuity_phantom_has_no_gradient_physics():
    """Changing the image contrast changes b0 only: S / b0 stays identical, and
    the noise is Rician with sigma = mean b0 / SNR."""
    sch = small_scheme()
    a = P.simulate_continuity_subject(SMALL_SHAPE, seed=7, scheme=sch, snr=None)
    b = P.simulate_continuity_subject(SMALL_SHAPE, seed=7, scheme=sch, snr=None,
                                      log_gradient=0.5 * P.CONTINUITY_LOG_GRADIENT)
    ea = a.dwi / a.truth["s0"][..., None]
    eb = b.dwi / b.truth["s0"][..., None]
    assert not np.allclose(a.truth["s0"], b.truth["s0"], rtol=1e-3)
    np.testing.assert_allclose(ea, eb, rtol=2e-5, atol=1e-6)
    noisy = P.simulate_continuity_subject(SMALL_SHAPE, seed=7, scheme=sch)
    assert noisy.sigma == pytest.approx(a.truth["s0"].mean() / P.CONTINUITY_SNR)
    b0 = noisy.dwi[..., sch.b0s_mask]
    sd = np.std(np.diff(b0, axis=-1)[noisy.mask]) / np.sqrt(2.0)
    assert sd == pytest.approx(noisy.sigma, rel=0.05)
