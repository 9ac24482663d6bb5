"""Smooth random non-linear deformations with an analytic, bounded Jacobian.

A deformation is ``u(x) = sum_m a_m sin(k_m . x + phi_m)`` (a few plane waves,
displacement in mm at points in mm). Its Jacobian ``I + du/dx`` with
``du/dx = sum_m a_m k_m^T cos(...)`` has operator norm ``|du/dx| <= sum_m
|a_m| |k_m|``; capping that sum (``max_strain`` < 1) keeps ``I + du/dx``
invertible everywhere with ``det >= (1 - max_strain)^3 > 0``, so ``x -> x +
u(x)`` is a diffeomorphism of space. Used per simulated person by the brain
phantom (:mod:`.brain`) and the unpaired study (:mod:`.unpaired`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Warp:
    """Plane waves: wave vectors ``k`` (modes, 3; rad/mm), ``phase`` (modes,)
    and displacement amplitudes ``amp`` (modes, 3; mm)."""

    k: np.ndarray
    phase: np.ndarray
    amp: np.ndarray

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """u (n, 3; mm) at points (n, 3; mm)."""
        return np.sin(points @ self.k.T + self.phase) @ self.amp

    def gradient(self, points: np.ndarray) -> np.ndarray:
        """du/dx (n, 3, 3): ``[i, a, b] = d u_a / d x_b``."""
        c = np.cos(points @ self.k.T + self.phase)                  # (n, modes)
        return np.einsum("nm,ma,mb->nab", c, self.amp, self.k)

    @property
    def strain_bound(self) -> float:
        """Upper bound of |du/dx| (operator norm) over all of space."""
        return float(np.sum(np.linalg.norm(self.amp, axis=1) * np.linalg.norm(self.k, axis=1)))


def random_warp(seed: int, stream: int, n_modes: int, wavelength_mm: tuple[float, float],
                rms_mm: float, max_strain: float) -> Warp:
    """The deformation of ``seed`` (``stream`` keeps users' draws independent):
    random directions, wavelengths in ``wavelength_mm``, RMS displacement about
    ``rms_mm`` per axis, amplitudes shrunk so that the strain bound is at most
    ``max_strain``."""
    if not 0.0 <= max_strain < 1.0:
        raise ValueError(f"max_strain must be in [0, 1) for an invertible map, got {max_strain}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(stream)]))
    direction = rng.standard_normal((n_modes, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    wavelength = rng.uniform(*wavelength_mm, n_modes)
    k = direction * (2.0 * math.pi / wavelength)[:, None]
    phase = rng.uniform(0.0, 2.0 * math.pi, n_modes)
    amp = rng.standard_normal((n_modes, 3)) * (rms_mm * math.sqrt(2.0 / n_modes))
    warp = Warp(k, phase, amp)
    strain = warp.strain_bound
    if strain > max_strain:
        warp = Warp(k, phase, amp * (max_strain / strain))
    return warp
