"""Input QC of a diffusion series: degenerate acquisitions and outlier volumes.

Two kinds of wrong input are caught before any fit:

* A *degenerate* acquisition cannot support a tensor at all: every volume
  identical (a real GE export did this), fewer than ``MIN_DIRECTIONS``
  distinct non-collinear diffusion directions, no diffusion-weighted volume,
  or b-values far outside any diffusion protocol (a unit mix-up). The
  subject fails, the reason naming the policy value.
* *Outlier volumes* are all-zero, have a slice whose signal dropped out
  (motion during the diffusion encoding), or a whole-volume intensity far
  from the other volumes of the same shell. They are listed with the reason
  and left out of the fits; a subject losing more than
  ``MAX_EXCLUDED_FRACTION`` of its volumes is flagged.

Slice and volume means are compared with the other volumes of the same
shell (b0s with b0s) at the same slice, on a log scale, by a robust z
(median and 1.4826 MAD), so direction-dependent contrast within a shell
sets the scale; an effect-size floor keeps tiny but consistent differences
(noise-free data, few directions) from being called.
"""

from __future__ import annotations

import numpy as np

from . import parallel
from .gradients import B0_THRESHOLD, GradientTable

#: A tensor has 6 unknowns besides S0: at least this many distinct,
#: non-collinear diffusion directions.
MIN_DIRECTIONS = 6
#: Two directions closer than this (deg, sign ignored) count as one.
SAME_DIRECTION_DEG = 1.0
#: b-values above this (s/mm^2) are no in-vivo or ex-vivo diffusion protocol:
#: most likely s/m^2 (x 1e6) written as s/mm^2.
MAX_PLAUSIBLE_B = 30000.0
#: Robust z (Iglewicz and Hoaglin's 3.5 as in the report; here on the log
#: of a slice or volume mean, relative to its shell) beyond which a slice or
#: volume is an outlier ...
OUTLIER_Z = 3.5
#: ... provided its signal also differs by at least this fraction: dropout
#: loses half or more of a slice, and direction contrast within a shell of
#: the brain's slice means stays well below it.
DROPOUT_MIN_LOSS = 0.3
INTENSITY_MIN_CHANGE = 0.3
#: Slices with fewer mask voxels than this are not judged slice-wise (their
#: mean is too noisy); volumes in a shell of fewer than MIN_GROUP are judged
#: for all-zero only (no reference to compare with).
MIN_SLICE_VOXELS = 50
MIN_GROUP = 4
#: A subject losing more than this fraction of its volumes is flagged.
MAX_EXCLUDED_FRACTION = 0.2
#: Robust scale: MAD -> standard deviation for Gaussian data.
MAD_TO_SD = 1.4826


class DegenerateAcquisition(ValueError):
    """The series cannot support a tensor fit (the message says why)."""


def qc_policy() -> dict:
    """The named constants, as written into the record and sidecars."""
    return {"min_directions": MIN_DIRECTIONS, "same_direction_deg": SAME_DIRECTION_DEG,
            "max_plausible_b": MAX_PLAUSIBLE_B, "outlier_z": OUTLIER_Z,
            "dropout_min_loss": DROPOUT_MIN_LOSS,
            "intensity_min_change": INTENSITY_MIN_CHANGE,
            "min_slice_voxels": MIN_SLICE_VOXELS, "min_group": MIN_GROUP,
            "max_excluded_fraction": MAX_EXCLUDED_FRACTION, "b0_threshold": B0_THRESHOLD}


# ----------------------------------------------------------------------------
# Degenerate acquisitions
# ----------------------------------------------------------------------------
def distinct_directions(bvecs: np.ndarray) -> np.ndarray:
    """Axes (k, 3) of the distinct directions (sign ignored) among unit ``bvecs``."""
    cos_same = np.cos(np.deg2rad(SAME_DIRECTION_DEG))
    kept: list[np.ndarray] = []
    for g in np.asarray(bvecs, dtype=np.float64):
        if not any(abs(float(g @ k)) >= cos_same for k in kept):
            kept.append(g)
    return np.array(kept).reshape(-1, 3)


def check_gradients(gtab: GradientTable, volumes=None) -> None:
    """Raise DegenerateAcquisition when the table (or its ``volumes``) cannot
    determine a tensor."""
    if volumes is not None:
        gtab = gtab.select(np.asarray(volumes))
    high = np.flatnonzero(gtab.bvals > MAX_PLAUSIBLE_B)
    if high.size:
        raise DegenerateAcquisition(
            f"b-value {gtab.bvals[high[0]]:g} above {MAX_PLAUSIBLE_B:g} s/mm^2 "
            f"(volume(s) {', '.join(map(str, high[:8]))}): no diffusion protocol goes there; "
            f"b-values in s/m^2?")
    dw = ~gtab.b0s_mask
    if not dw.any():
        raise DegenerateAcquisition(f"no diffusion-weighted volume (every b <= b0 threshold "
                                    f"{B0_THRESHOLD:g} s/mm^2)")
    if not gtab.b0s_mask.any():
        raise DegenerateAcquisition(f"no b0 volume left (b <= b0 threshold "
                                    f"{B0_THRESHOLD:g} s/mm^2)")
    n = distinct_directions(gtab.bvecs[dw]).shape[0]
    if n < MIN_DIRECTIONS:
        raise DegenerateAcquisition(
            f"{n} distinct diffusion direction(s) (directions within {SAME_DIRECTION_DEG:g} deg "
            f"count as one); a tensor needs at least {MIN_DIRECTIONS} non-collinear ones")
    rank = np.linalg.matrix_rank(gtab.bmatrix_design()[dw][:, :6] / gtab.bvals[dw, None])
    if rank < 6:
        raise DegenerateAcquisition(
            f"the {n} diffusion directions span a tensor design of rank {rank} (coplanar or "
            f"otherwise degenerate); a tensor needs rank 6")


def _mask_values(data: np.ndarray, mask: np.ndarray, rows_index=None):
    """``(values(k), voxel index)``: the mask values of volume ``k`` and the C-order
    flat index of each. ``data`` is the 4D grid, or with ``rows_index`` the
    (mask voxels, N) rows of a series held as mask rows (voxel of each row)."""
    if rows_index is None:
        return (lambda k: data[..., k][mask]), np.flatnonzero(mask.ravel())
    return (lambda k: np.asarray(data[:, k])), np.asarray(rows_index)


def check_identical_volumes(data: np.ndarray, mask: np.ndarray, gtab: GradientTable,
                            rows_index=None) -> None:
    """Raise DegenerateAcquisition when every diffusion-weighted volume equals
    the first volume in the mask (no diffusion contrast was stored)."""
    values, _ = _mask_values(data, mask, rows_index)
    ref = values(0)
    dw = np.flatnonzero(~gtab.b0s_mask)
    if dw.size and all(np.array_equal(values(k), ref) for k in dw):
        raise DegenerateAcquisition(
            f"all {len(gtab)} volumes are identical in the mask: the series carries no "
            f"diffusion contrast (an export or conversion error)")


# ----------------------------------------------------------------------------
# Outlier volumes
# ----------------------------------------------------------------------------
def _robust_z(x: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD) along axis 0; 0 where there is no spread."""
    med = np.median(x, axis=0)
    mad = np.median(np.abs(x - med), axis=0) * MAD_TO_SD
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (x - med) / mad
    return np.where(mad > 0, z, 0.0), med


#: Mask rows per block of the one-pass volume statistics (:func:`_slice_sums`):
#: a float64 block of this many rows x 288 volumes is 9 MB.
QC_BLOCK_ROWS = 4096


def _mask_row_chunks(data: np.ndarray, mask: np.ndarray, rows_index=None,
                     slice_axis: int = 2):
    """Blocks ``(rows (n, N), slice of each row)`` of the mask voxels' values.

    Each slice's rows come in the order of :func:`_mask_values` (C order for
    the grid, row order for mask rows), which fixes the order of its sums. The
    grid is read one slice plane at a time: within a plane C order is the
    plane's own, and a plane of an F-ordered image is one block per volume
    (gathering whole-grid C order from it was slower than the per-volume pass).
    """
    if rows_index is not None:
        yield from _row_blocks(data, np.unravel_index(np.asarray(rows_index),
                                                      mask.shape)[slice_axis])
        return
    for p in range(mask.shape[slice_axis]):
        at = [slice(None)] * 3
        at[slice_axis] = p
        in_plane = mask[tuple(at)]
        if in_plane.any():
            rows = np.asarray(data[tuple(at)])[in_plane]
            yield rows, np.full(rows.shape[0], p)


def _row_blocks(rows: np.ndarray, slice_of: np.ndarray, lo: int = 0, hi: int | None = None):
    """Blocks ``(rows, slice of each row)`` of at most QC_BLOCK_ROWS mask rows,
    from row ``lo`` to ``hi`` (default: all), in row order."""
    hi = rows.shape[0] if hi is None else hi
    for a in range(lo, hi, QC_BLOCK_ROWS):
        b = min(a + QC_BLOCK_ROWS, hi)
        yield rows[a:b], slice_of[a:b]


def _slice_sums(chunks, n_slices: int, n_vol: int):
    """``(sums (N, n_slices) float64, nonzero (N,) bool, rows read)`` in ONE pass
    over the mask rows (``chunks``: :func:`_mask_row_chunks`): each volume's
    per-slice sums and whether it has any nonzero value.

    The sums are bit-identical to ``np.bincount(slice_of, weights=column.astype(
    float64))`` per volume (the earlier one-column-at-a-time pass, 288 passes on
    an HCP series): every slice's sum is accumulated row by row in the rows'
    order, ``((0 + x1) + x2) + ...``, as bincount does. Within a block the rows
    are stably grouped by slice and each group added onto its slice's running
    sum by a reduction along axis 0 of a C-ordered block, which numpy performs
    row after row (its pairwise summation is only used along the contiguous axis).
    """
    acc = np.zeros((n_slices, n_vol), dtype=np.float64)
    nonzero = np.zeros(n_vol, dtype=bool)
    buf = np.empty((QC_BLOCK_ROWS + 1, n_vol), dtype=np.float64)
    n_rows = 0
    for rows, where in chunks:
        n = rows.shape[0]
        n_rows += n
        if buf.shape[0] < n + 1:
            buf = np.empty((n + 1, n_vol), dtype=np.float64)
        nonzero |= np.any(rows, axis=0)
        if not np.all(where[1:] >= where[:-1]):
            order = np.argsort(where, kind="stable")
            rows, where = np.asarray(rows)[order], where[order]
        bounds = np.flatnonzero(where[1:] != where[:-1]) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, n]):
            s = where[a]
            buf[0] = acc[s]
            buf[1:b - a + 1] = rows[a:b]
            np.add.reduce(buf[:b - a + 1], axis=0, out=acc[s])
    return np.ascontiguousarray(acc.T), nonzero, n_rows


def _slice_sums_by_parts(data: np.ndarray, mask: np.ndarray, rows_index, slice_axis: int,
                         slice_of: np.ndarray, n_vol: int):
    """:func:`_slice_sums` on the worker threads, where each slice's mask rows
    are contiguous (a series held as Fortran-order mask rows and the last axis
    as slice axis: Validate's series and the default): the rows are cut at slice
    boundaries into one part per thread, so each slice is still summed whole, in
    row order, by one thread, and the parts' sums add exact zeros elsewhere -
    the same bits. Elsewhere one pass in this thread. ``slice_of``: the slice
    of each mask voxel, in the order of :func:`_mask_values`."""
    n_slices = mask.shape[slice_axis]
    if rows_index is None:
        return _slice_sums(_mask_row_chunks(data, mask, None, slice_axis), n_slices, n_vol)
    threads = parallel.available_threads()
    if threads < 2 or not np.all(slice_of[1:] >= slice_of[:-1]):
        return _slice_sums(_row_blocks(data, slice_of), n_slices, n_vol)
    n = slice_of.size
    cuts = np.unique(np.r_[0, np.searchsorted(slice_of, slice_of[n * np.arange(1, threads)
                                                                // threads]), n])

    def part(bounds):
        return _slice_sums(_row_blocks(data, slice_of, *bounds), n_slices, n_vol)

    parts = parallel.map_chunks(part, list(zip(cuts[:-1], cuts[1:])), threads)
    return (sum(p[0] for p in parts), np.logical_or.reduce([p[1] for p in parts]),
            sum(p[2] for p in parts))


def volume_outliers(data: np.ndarray, mask: np.ndarray, gtab: GradientTable,
                    slice_axis: int = 2, rows_index=None) -> dict[int, str]:
    """``{volume: reason}`` of all-zero, dropout and intensity-outlier volumes,
    judged on the mask voxels (``data``/``rows_index``: see :func:`_mask_values`).

    Reasons: "all zero", "signal dropout in slice(s) 12, 13 (-64%)", "mean
    intensity +85% vs its shell".
    """
    n_vol = len(gtab)
    out: dict[int, str] = {}
    index = np.flatnonzero(mask.ravel()) if rows_index is None else np.asarray(rows_index)
    n_slices = mask.shape[slice_axis]
    slice_of = np.unravel_index(index, mask.shape)[slice_axis]
    slice_n = np.bincount(slice_of, minlength=n_slices)
    judged = np.flatnonzero(slice_n >= MIN_SLICE_VOXELS)
    means = np.zeros((n_vol, n_slices), dtype=np.float64)
    vol_mean = np.zeros(n_vol, dtype=np.float64)
    slice_sums, nonzero, n_rows = _slice_sums_by_parts(data, mask, rows_index, slice_axis,
                                                       slice_of, n_vol)
    if n_rows != index.size:
        raise RuntimeError(f"QC read {n_rows} mask voxels, expected {index.size}")
    for k in range(n_vol):
        if not nonzero[k]:
            out[k] = "all zero"
            continue
        sums = slice_sums[k]
        means[k] = sums / np.maximum(slice_n, 1)
        vol_mean[k] = sums.sum() / max(index.size, 1)
    for shell in np.unique(gtab.shell_of):
        group = np.array([k for k in np.flatnonzero(gtab.shell_of == shell) if k not in out])
        if group.size < MIN_GROUP:
            continue
        floor = np.finfo(np.float64).tiny
        # whole volume
        lv = np.log(np.maximum(vol_mean[group], floor))
        z, med = _robust_z(lv)
        change = np.exp(lv - med) - 1.0
        for k, zk, ck in zip(group, z, change):
            if abs(zk) > OUTLIER_Z and abs(ck) >= INTENSITY_MIN_CHANGE:
                out[int(k)] = f"mean intensity {ck:+.0%} vs its shell (robust z {zk:+.1f})"
        # slice-wise dropout
        if judged.size:
            ls = np.log(np.maximum(means[np.ix_(group, judged)], floor))
            z, med = _robust_z(ls)
            loss = 1.0 - np.exp(ls - med)
            bad = (z < -OUTLIER_Z) & (loss >= DROPOUT_MIN_LOSS)
            for row in np.flatnonzero(bad.any(axis=1)):
                k = int(group[row])
                if k in out:
                    continue
                cols = np.flatnonzero(bad[row])
                out[k] = (f"signal dropout in slice(s) "
                          f"{', '.join(str(int(judged[c])) for c in cols[:8])} "
                          f"(-{loss[row, cols].max():.0%} vs its shell)")
    return dict(sorted(out.items()))
