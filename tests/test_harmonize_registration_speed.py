"""The registration's cheaper defaults hold the known warp (s18-b).

``register_fa`` skips the affine pyramid levels given 0 iterations (dipy
itself still runs one L-BFGS-B iteration there), samples ``MI_SAMPLES``
points for mutual information on larger grids, and inverts SyN's fields to
a mean residual of ``SYN_INV_TOL``. Ground truth: the brain phantom's known
per-person map to its template on a fine (1.25 mm) grid, as in
``bench/harmonize_register_speed.py`` and test_harmonize_registration_grid.py.
"""

from __future__ import annotations

import functools

import numpy as np

from dmriflow.interfaces import harmonize as H
from test_harmonize_registration_grid import MOVING_SEED, SHAPE, STATIC_SEED, _subject

#: Measured on this phantom pair (48 x 58 x 48 at 1.25 mm): SyN 0.23 mm
#: (before: 0.24 mm), the affine stage alone 0.76 mm (before: 0.75 mm);
#: SyN without any field inversion 3.6 mm, centre of mass alone 3.0 mm.
SYN_BOUND_MM = 0.3
AFFINE_BOUND_MM = 0.8


@functools.lru_cache(maxsize=None)
def _pair():
    return _subject(STATIC_SEED), _subject(MOVING_SEED)


def _truth_error_mm(kind: str, **options) -> float:
    """Mean distance (static mask, mm) between each static voxel's template
    point and the one the registration brings there from the moving subject."""
    (static, static_affine, c_static), (moving, moving_affine, c_moving) = _pair()
    t = H.register_fa(moving, moving_affine, static, static_affine, kind, grid_mm=0.0,
                      **options)
    mapped = np.stack([t.to_template(c_moving[..., i]) for i in range(3)], axis=-1)
    mask = static > 0
    return float(np.linalg.norm(mapped[mask] - c_static[mask], axis=1).mean())


def test_affine_level_with_zero_iterations_evaluates_nothing(monkeypatch):
    """On a 1.25 mm grid the affine pyramid's finest level has 0 iterations
    (``AFFINE_HALF_LEVEL_MAX_MM``): no mutual-information evaluation runs on
    the full grid (dipy alone makes 3-4 per stage there), each stage
    evaluates the coarser levels, and each stage's optimizer on the skipped
    level ends where it started; the affine still lands on the known map."""
    from dipy.align import imaffine
    (static, static_affine, _), _ = _pair()
    assert H.registration_levels(static_affine)["affine_level_iters"][-1] == 0
    shapes, starts_kept = [], []
    evaluate = imaffine.MutualInformationMetric.distance_and_gradient

    def spy(self, params):
        shapes.append(tuple(self.static.shape))
        return evaluate(self, params)
    monkeypatch.setattr(imaffine.MutualInformationMetric, "distance_and_gradient", spy)
    optimizer = imaffine.Optimizer

    class Recording(optimizer):
        def __init__(self, fun, x0, **kw):
            super().__init__(fun, x0, **kw)
            if kw["options"]["maxfun"] == 0:
                starts_kept.append(np.array_equal(np.asarray(self.xopt), np.asarray(x0)))
    monkeypatch.setattr(imaffine, "Optimizer", Recording)
    error = _truth_error_mm("affine")
    assert shapes and SHAPE not in shapes, sorted(set(shapes))
    assert len(set(shapes)) == len(H.registration_levels(static_affine)["affine_level_iters"]) - 1
    assert starts_kept == [True] * 3                          # translation, rigid, affine
    assert error < AFFINE_BOUND_MM, error


def test_syn_with_the_cheaper_defaults_recovers_the_known_warp():
    """SyN after the affine stages with the finest level skipped, with the
    looser inversion tolerance, recovers the phantom's map to within a
    quarter of a voxel."""
    assert H.SYN_INV_TOL == 1e-2
    error = _truth_error_mm("syn")
    assert error < SYN_BOUND_MM, error


def test_the_truth_bounds_fail_a_broken_registration(monkeypatch):
    """The bounds above catch a broken registration: SyN with no field
    inversion, or an affine stage that skips every level (centre of mass)."""
    monkeypatch.setattr(H, "SYN_INV_ITER", 0)
    error = _truth_error_mm("syn")
    assert error > SYN_BOUND_MM, error
    error = _truth_error_mm("affine", affine_level_iters=(0, 0, 0))
    assert error > AFFINE_BOUND_MM, error


def test_the_artefact_records_what_the_registration_ran():
    """The registration record carries the MI sampling, the zero-level rule
    and SyN's inversion settings (they change the artefact)."""
    (_, static_affine, _), _ = _pair()
    record = H.registration_record(static_affine)
    assert record["affine_zero_levels"] == "skipped"
    assert (record["mi_samples"], record["syn_inv_iter"], record["syn_inv_tol"]) == (
        H.MI_SAMPLES, H.SYN_INV_ITER, H.SYN_INV_TOL)
