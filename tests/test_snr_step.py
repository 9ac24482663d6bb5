"""The SNR-map step recovers the phantom's noise and signal-to-noise ratio."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dmriflow.interfaces import io
from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
from dmriflow.interfaces.steps import snr
from dmriflow.pipelines.inputs import discover

#: b0 volumes of the phantom: the per-voxel sigma is the spread of these.
N_B0 = 8
#: Relative tolerance of the pooled sigma: 1.4826 MAD over ~2k mask voxels x 7
#: differences has a standard error of ~1%, Rician bias at SNR 30 is < 0.1%.
SIGMA_RTOL = 0.05
#: Relative tolerance of the mean per-voxel variance: its sampling error over
#: ~2k voxels x 7 degrees of freedom is ~1%; Rician bias in the darkest mask
#: voxels (edges) lowers it by a few per cent.
VARIANCE_RTOL = 0.15


def test_snr_maps_recover_the_simulated_noise(tmp_path):
    scheme = hcp_scheme(n_b0=N_B0, shells=(1000,), n_dirs=12, seed=2)
    write_cohort(tmp_path, 1, shape=(16, 18, 14), seed=3, scheme=scheme, snr=30.0)
    (s,) = discover(tmp_path)
    truth = json.loads(open(s.sidecar).read())["PhantomSimulation"]["NoiseSigma"]
    data = io.load_dwi(s.dwi, s.bval, s.bvec, s.mask)
    sigma, ratio, figures = snr.snr_maps(data.data, data.gtab, data.mask)
    assert figures["noise_sigma"] == pytest.approx(truth, rel=SIGMA_RTOL)
    assert figures["n_b0"] == N_B0
    # per voxel: the sample sd of 8 b0s is an unbiased-variance estimate of sigma
    assert np.mean(sigma[data.mask] ** 2) == pytest.approx(truth ** 2, rel=VARIANCE_RTOL)
    mean_b0 = io.mean_b0_map(data.data, data.gtab)
    np.testing.assert_allclose(ratio[data.mask], mean_b0[data.mask] / figures["noise_sigma"],
                               rtol=1e-6)
    assert not ratio[~data.mask].any() and not sigma[~data.mask].any()
