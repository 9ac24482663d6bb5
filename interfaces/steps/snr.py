"""SNR: per-voxel noise and signal-to-noise maps from the b0 volumes.

``param-sigma``: the voxel's standard deviation over its b0 volumes (the
b0s repeat one signal, so their spread is the noise; with few b0s it is a
rough per-voxel estimate). ``param-snr``: the mean b0 over the pooled noise
sigma of the series (:func:`dmriflow.interfaces.stepfiles.b0_noise`, robust
to motion outliers), in the brain mask, 0 outside. The subject's row gets
the median SNR in the mask. Both maps are NaN-free; a series with fewer
than two b0 volumes fails here with a message naming its b-values file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import io, stepfiles
from ..errors import InputError
from .base import Derivative, Product, Schema, Step, option, register

#: Step name and BIDS model label of its maps.
NAME = MODEL = "snr"


@dataclass
class Options:
    snr_map: bool = option(False, "per-voxel noise sigma (spread of the b0 volumes) and SNR "
                                  "(mean b0 / pooled b0 noise) maps in the brain mask")


def enabled(options: Options) -> bool:
    return options.snr_map


def snr_maps(data: np.ndarray, gtab, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """(sigma map, SNR map, figures) of a 4D series: float32, 0 outside ``mask``."""
    b0 = np.flatnonzero(gtab.b0s_mask)
    sigma = np.zeros(mask.shape, np.float32)
    b0_rows = np.stack([data[..., k][mask] for k in b0], axis=1)   # the b0 volumes only
    sigma[mask] = np.std(b0_rows, axis=1, ddof=1)
    noise = stepfiles.b0_noise(data, gtab, mask)
    snr = np.zeros(mask.shape, np.float32)
    if noise["noise_sigma"] > 0:
        snr[mask] = io.mean_b0_map(data, gtab)[mask] / noise["noise_sigma"]
    return sigma, snr, {"noise_sigma": noise["noise_sigma"], "n_b0": int(b0.size)}


def run(record: dict, options: Options, out_dir) -> Product:
    """The two maps of the subject's current series, and its median SNR."""
    dwi = stepfiles.read_series(record["series"])
    if np.count_nonzero(dwi.gtab.b0s_mask) < stepfiles.MIN_B0_FOR_NOISE:
        raise InputError(record["series"]["bval"], f"the SNR step needs at least "
                                                   f"{stepfiles.MIN_B0_FOR_NOISE} b0 volumes")
    sigma, snr, figures = snr_maps(dwi.data, dwi.gtab, dwi.mask)
    maps = [Derivative({"model": MODEL, "param": param}, str(io.save_nifti(
        arr, dwi.affine, Path(out_dir) / f"{param}.nii.gz", dwi.header).resolve()))
        for param, arr in (("sigma", sigma), ("snr", snr))]
    return Product(NAME, maps=maps, row={"snr_median": float(np.median(snr[dwi.mask]))},
                   parameters={**figures, "method": "b0 spread; mean b0 / pooled b0 noise"})


STEP = register(Step(NAME, "SnrMap", "product", Options, run, enabled=enabled, grid=True, example={"snr_map": True},
                     schema=Schema(map_entities=frozenset({"model", "param"}),
                                   row=frozenset({"snr_median"}),
                                   parameters=frozenset({"noise_sigma", "n_b0", "method"}))))
