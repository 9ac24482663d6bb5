"""Gradient-orientation check: which axis flip/permutation of the b-vectors
makes the fibres most continuous (Jeurissen 2014; Schilling 2019).

A wrong flip or permutation of the b-vectors (the classic dcm2niix / vendor /
FSL-convention mistake) leaves FA unchanged but mirrors every principal
direction V1; fibres then no longer run along themselves. Like MRtrix3's
``dwigradcheck`` we compare the mean length of deterministic streamlines
under each of the 24 candidate transforms M (6 axis permutations x 4 flips;
a flip of all three axes is the identity for axial directions) and call the
longest the winner. Unlike it, the tensor is fitted ONCE: fitting with the
transformed b-vectors M g gives D' = M D M^T, so V1' = M V1 exactly and each
candidate costs only the tracking, vectorised over all seeds at once.

Confidence: seeds are grouped into spatial blocks (neighbouring streamlines
are correlated, blocks are far less so); the winner's gain over the
acquired table is a paired difference of mean lengths, and its z is the
mean block difference over its standard error. A transform is reported only
when z exceeds ``MIN_Z`` and the gain is at least ``MIN_GAIN``; otherwise the
acquired table stands ("ok"), or the check says it cannot tell
("inconclusive", too few seeds or blocks). Candidates the winner does not
beat by the same rule are ``tied`` with it: a volume of two slices, say,
cannot tell a flip of x from one of y (they differ only through z), and a
tied winner is reported but never applied by ``--fix-gradients``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np

from .dti import dti_shells, fit_dwi

#: Streamlines stop where FA falls below STOP_FA and are seeded at FA >=
#: SEED_FA: the cores of coherent bundles, whose curvature and crossings are
#: what a wrong table breaks. Lower thresholds let in smoothly oriented,
#: moderately anisotropic tissue, where streamline length measures the
#: region's shape rather than the table: on the phantom, whose background
#: white matter fans out almost uniformly (FA ~0.45), seeds at FA >= 0.3 made
#: a y/z permutation win on clean subjects; at 0.5/0.65 none of 16 did.
STOP_FA = 0.5
SEED_FA = 0.65
#: Largest turn (deg) between two steps (dwigradcheck's tckgen uses 45 for FACT-like tracking).
MAX_ANGLE_DEG = 45.0
#: Step length in voxels (of the smallest voxel side) and the most steps each way.
STEP_VOXELS = 0.5
MAX_STEPS = 40
#: At most this many seeds (a seeded random subset beyond it): the score is a
#: mean, and 20000 seeds give it to well under the differences that matter.
MAX_SEEDS = 20000
#: Side (voxels) of the spatial blocks seeds are pooled in for the standard error.
BLOCK_VOXELS = 4
#: Blocks (and seeds) needed before the check can judge at all.
MIN_BLOCKS = 8
MIN_SEEDS = 200
#: A candidate beats the acquired table when its gain in mean streamline
#: length has a z (over blocks) above MIN_Z and is at least MIN_GAIN of the
#: acquired length. z > 4 has a one-sided normal tail of 3e-5, so < 1e-3 per
#: subject over the 23 candidates; the gain floor keeps a real but tiny
#: preference (an axis a thin slab cannot resolve) from being called.
MIN_Z = 4.0
MIN_GAIN = 0.05
#: Verdicts of the check.
OK, FLIPPED, INCONCLUSIVE = "ok", "flipped", "inconclusive"


@dataclass(frozen=True)
class Candidate:
    """b-vectors g -> M g with M = diag(signs) @ P: the new x is old axis perm[0], ..."""

    perm: tuple[int, int, int]
    flip: str            # "", "x", "y" or "z": the axis negated after the permutation

    @property
    def signs(self) -> np.ndarray:
        """s of M = diag(s) P: -1 on the flipped axis."""
        s = np.ones(3)
        if self.flip:
            s["xyz".index(self.flip)] = -1
        return s

    @property
    def matrix(self) -> np.ndarray:
        return self.signs[:, None] * np.eye(3)[list(self.perm)]

    @property
    def label(self) -> str:
        """"none", "flip x", "permute yxz", "permute yxz flip z" (new axes by old names)."""
        parts = []
        if self.perm != (0, 1, 2):
            parts.append("permute " + "".join("xyz"[i] for i in self.perm))
        if self.flip:
            parts.append(f"flip {self.flip}")
        return " ".join(parts) or "none"

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not self.flip


def candidates() -> list[Candidate]:
    """The 24 distinct transforms, the identity first."""
    return [Candidate(p, f) for p in permutations(range(3)) for f in ("", "x", "y", "z")]


def candidate_by_label(label: str) -> Candidate:
    for c in candidates():
        if c.label == label:
            return c
    raise ValueError(f"unknown gradient transform {label!r}")


def apply_to_bvecs(bvecs: np.ndarray, cand: Candidate) -> np.ndarray:
    """b-vectors (N, 3) with the transform applied (rows g -> M g)."""
    return np.asarray(bvecs, dtype=np.float64) @ cand.matrix.T


@dataclass
class OrientationResult:
    verdict: str                 # OK, FLIPPED or INCONCLUSIVE
    best: str                    # label of the longest candidate
    z: float                     # z of best - acquired (0 when acquired is best)
    gain: float                  # relative gain in mean length of best over acquired
    n_seeds: int
    n_blocks: int
    lengths: dict                # label -> mean streamline length (mm)
    tied: tuple = ()             # candidates the best does not beat significantly

    @property
    def fixable(self) -> bool:
        """A transform to apply: the acquired table loses and the winner is unique."""
        return self.verdict == FLIPPED and not self.tied

    @property
    def flag(self) -> str:
        """The subject's QC flag text ("" when the acquired table stands)."""
        if self.verdict == FLIPPED:
            alt = f" (tied with {', '.join(self.tied)})" if self.tied else ""
            return f"gradients {self.best}{alt}"
        return ""   # inconclusive: said in the gradient_check column, not a finding

    def as_record(self) -> dict:
        return {"verdict": self.verdict, "best": self.best, "tied": list(self.tied),
                "z": round(self.z, 2),
                "gain": round(self.gain, 4), "n_seeds": self.n_seeds,
                "n_blocks": self.n_blocks,
                "mean_length_mm": {k: round(v, 3) for k, v in self.lengths.items()},
                "min_z": MIN_Z, "min_gain": MIN_GAIN, "stop_fa": STOP_FA, "seed_fa": SEED_FA,
                "max_angle_deg": MAX_ANGLE_DEG, "max_steps": MAX_STEPS}


def _index_frame_signs(affine: np.ndarray) -> np.ndarray:
    """Signs taking FSL image-frame vectors to directions along the voxel axes
    (mm), see gradients.py: x is negated when the affine's determinant is positive."""
    signs = np.ones(3, dtype=np.float32)
    if np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]) > 0:
        signs[0] = -1
    return signs


def track_lengths(v1: np.ndarray, fa: np.ndarray, mask: np.ndarray, seeds: np.ndarray,
                  zooms) -> np.ndarray:
    """Length (mm) of the two-way deterministic streamline from each seed.

    ``v1`` (X, Y, Z, 3): unit directions along the voxel axes in mm; nearest-
    neighbour lookup (FACT-like); a streamline stops outside ``mask``, where
    FA < STOP_FA, on a turn above MAX_ANGLE_DEG, or after MAX_STEPS.
    """
    return _track(np.asarray(v1), mask & (fa >= STOP_FA), seeds, zooms, (0, 1, 2),
                  np.ones(3, dtype=np.float32))


def _track(v1: np.ndarray, ok: np.ndarray, seeds: np.ndarray, zooms, axes,
           signs: np.ndarray) -> np.ndarray:
    """:func:`track_lengths` on the direction field ``signs * v1[..., axes]``,
    transformed as it is read: only the voxels a streamline visits, not the
    whole grid per candidate (that einsum and copy were 2.0 of the check's
    2.8 s on bench/e2e.py's HCP-size subject). A signed permutation is exact in float32, so the
    directions are the transformed field's bit for bit (up to the sign of a
    zero component, which no step, dot product or comparison below sees).
    ``ok``: mask & FA >= STOP_FA.
    """
    axes = list(axes)

    def directions(ijk):
        return v1[tuple(ijk.T)][:, axes] * signs

    zooms = np.asarray(zooms, dtype=np.float32)
    step_mm = np.float32(STEP_VOXELS * zooms.min())
    shape = np.array(ok.shape)
    cos_max = np.float32(np.cos(np.deg2rad(MAX_ANGLE_DEG)))
    total = np.zeros(seeds.shape[0], dtype=np.float32)
    for sign in (1.0, -1.0):
        pos = seeds.astype(np.float32)
        d = directions(seeds) * np.float32(sign)
        alive = np.arange(seeds.shape[0])
        for _ in range(MAX_STEPS):
            pos[alive] += d[alive] * (step_mm / zooms)
            ijk = np.rint(pos[alive]).astype(np.int64)
            inside = np.all((ijk >= 0) & (ijk < shape), axis=1)
            alive, ijk = alive[inside], ijk[inside]
            keep = ok[tuple(ijk.T)]
            alive, ijk = alive[keep], ijk[keep]
            new = directions(ijk)
            dot = np.einsum("ij,ij->i", new, d[alive])
            keep = np.abs(dot) >= cos_max
            alive, new, dot = alive[keep], new[keep], dot[keep]
            d[alive] = np.where(dot[:, None] < 0, -new, new)
            total[alive] += step_mm
            if alive.size == 0:
                break
    return total


def _seeds(fa: np.ndarray, mask: np.ndarray, rng_seed: int) -> np.ndarray:
    seeds = np.argwhere(mask & (fa >= SEED_FA))
    if seeds.shape[0] > MAX_SEEDS:
        keep = np.random.default_rng(rng_seed).choice(seeds.shape[0], MAX_SEEDS, replace=False)
        seeds = seeds[np.sort(keep)]
    return seeds


def check_orientation(v1: np.ndarray, fa: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                      zooms, rng_seed: int = 0) -> OrientationResult:
    """Score every candidate transform of the b-vectors on one tensor fit.

    ``v1`` (X, Y, Z, 3) in the FSL image frame of the acquired b-vectors,
    ``fa`` and ``mask`` on the same grid.
    """
    # the same booleans as np.all(..., axis=-1), component by component (a
    # reduction along a length-3 axis: 0.25 against 0.12 s on an HCP grid)
    finite = np.isfinite(v1)
    mask = np.asarray(mask, dtype=bool) & finite[..., 0] & finite[..., 1] & finite[..., 2]
    seeds = _seeds(fa, mask, rng_seed)
    blocks = np.unique(seeds // BLOCK_VOXELS, axis=0, return_inverse=True)[1].ravel() \
        if seeds.size else np.zeros(0, dtype=int)
    n_blocks = int(blocks.max() + 1) if blocks.size else 0
    cands = candidates()
    if seeds.shape[0] < MIN_SEEDS or n_blocks < MIN_BLOCKS:
        return OrientationResult(INCONCLUSIVE, "none", 0.0, 0.0, int(seeds.shape[0]),
                                 n_blocks, {})
    v1 = np.asarray(v1, dtype=np.float32)
    ok = mask & (fa >= STOP_FA)
    frame = _index_frame_signs(affine)
    per_seed = {}
    for cand in cands:
        # M v1 (M = diag(signs) P, see Candidate), then into the index frame
        per_seed[cand.label] = _track(v1, ok, seeds, zooms, cand.perm,
                                      frame * cand.signs.astype(np.float32))
    lengths = {k: float(v.mean()) for k, v in per_seed.items()}
    best = max(cands, key=lambda c: lengths[c.label])
    if best.is_identity:
        return OrientationResult(OK, best.label, 0.0, 0.0, int(seeds.shape[0]), n_blocks,
                                 lengths)
    z, gain = _paired(per_seed[best.label], per_seed["none"], blocks, n_blocks)
    verdict = FLIPPED if (z > MIN_Z and gain >= MIN_GAIN) else OK
    tied = tuple(c.label for c in cands if c is not best and not c.is_identity
                 and not _beats(*_paired(per_seed[best.label], per_seed[c.label], blocks,
                                         n_blocks)))
    return OrientationResult(verdict, best.label, z, gain, int(seeds.shape[0]), n_blocks,
                             lengths, tied if verdict == FLIPPED else ())


def check_dwi(dwi, rng_seed: int = 0, volumes=None) -> OrientationResult:
    """The check on a validated series (:class:`io.DWI`): one OLS tensor on its
    b0s and DTI shells (the direction is all that matters here), then
    :func:`check_orientation`. ``volumes``: use only these (no copy)."""
    idx = np.arange(len(dwi.gtab)) if volumes is None else np.asarray(volumes)
    gtab = dwi.gtab.select(idx)
    fit = fit_dwi(dwi, volumes=idx[gtab.select_shells(dti_shells(gtab))], fit_method="OLS")
    return check_orientation(fit.v1, fit.fa, dwi.mask, dwi.affine, dwi.zooms, rng_seed)


def _paired(a: np.ndarray, b: np.ndarray, blocks: np.ndarray, n_blocks: int):
    """z over blocks and relative gain of the mean of ``a`` over that of ``b``."""
    block_mean = np.bincount(blocks, weights=a - b) / np.bincount(blocks)
    se = float(block_mean.std(ddof=1) / np.sqrt(n_blocks))
    z = float(block_mean.mean() / se) if se > 0 else float("inf")
    gain = float((a.mean() - b.mean()) / b.mean()) if b.mean() > 0 else float("inf")
    return z, gain


def _beats(z: float, gain: float) -> bool:
    return z > MIN_Z and gain >= MIN_GAIN
