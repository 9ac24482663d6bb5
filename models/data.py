"""Paired data for direction upsampling: few acquired directions -> the others.

He et al. (ISMRM 2020) take HCP b=1000 with 90 directions, use 30 as the
input and predict the other 60. :func:`split_dwi` does this for any
subject with enough directions on the shell: a well-spread subset of
``n_input`` directions (:func:`spread_subset`) is the input, the rest are the
targets. Signals are b0-normalised (divided by the voxel's mean b0).

:func:`phantom_samples` builds such pairs from the head phantom
(:mod:`dmriflow.interfaces.sim.phantom`) with a different electrostatic direction
set per subject (so a model cannot learn one fixed set) and the noise-free
targets kept for evaluation; :func:`split_subjects` holds subjects out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.gradients import GradientTable
from dmriflow.interfaces.io import DWI, mean_b0_map
from dmriflow.interfaces.sim.phantom import hcp_scheme, simulate_subject

#: The shell used for direction upsampling (HCP b=1000, as in He et al.).
UPSAMPLE_SHELL = 1000.0
#: Acquired input directions per subject (He et al.: the first 30 of 90).
N_INPUT = 30
#: b0 volumes and directions of the phantom scheme (one b=1000 shell, HCP-like).
PHANTOM_B0 = 6
PHANTOM_DIRECTIONS = 90
#: Phantom grid for training data (the demo cohort's, 2.5 mm voxels).
PHANTOM_SHAPE = (36, 44, 36)
#: b0-normalised signals are clipped to this range (noise can exceed 1).
SIGNAL_CLIP = (0.0, 1.5)
#: Phantom SNR of the direction-synthesis training subjects: log-uniform over
#: this range, drawn per subject from its seed (clinical b=1000 to HCP-like).
TRAIN_SNR_RANGE = (12.0, 60.0)


def subject_snr(seed: int, snr_range=TRAIN_SNR_RANGE) -> float:
    """The SNR of phantom subject ``seed``: log-uniform over ``snr_range``."""
    lo, hi = (math.log(float(v)) for v in snr_range)
    return float(math.exp(np.random.default_rng([seed, 15]).uniform(lo, hi)))


def spread_subset(bvecs: np.ndarray, n: int, first: int = 0) -> np.ndarray:
    """Indices of ``n`` well-spread directions (greedy farthest point, sign-free).

    Starts from ``first`` and repeatedly adds the direction farthest (largest
    smallest angle, antipodes equal) from those chosen: deterministic, and as
    even as the acquired set allows.
    """
    v = np.asarray(bvecs, dtype=np.float64)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    if n > len(v):
        raise ValueError(f"cannot choose {n} of {len(v)} directions")
    chosen = [int(first)]
    closeness = np.abs(v @ v[first])
    for _ in range(n - 1):
        closeness[chosen] = np.inf
        nxt = int(np.argmin(closeness))
        chosen.append(nxt)
        closeness = np.maximum(closeness, np.abs(v @ v[nxt]))
    return np.array(sorted(chosen))


@dataclass
class DirectionSample:
    """One subject split into input and target directions of one shell.

    ``inputs``/``targets``: b0-normalised signals (X, Y, Z, n) float32;
    ``b0``: the raw b0 volumes (X, Y, Z, n_b0) for tensor fits; ``s0``: their
    mean; ``clean_inputs``/``clean_targets``: noise-free normalised signals
    and ``snr``: the simulated SNR (phantoms only); ``input_volumes``: the
    inputs' volume indices in the subject's series.
    """

    subject: str
    inputs: np.ndarray
    input_bvecs: np.ndarray
    targets: np.ndarray
    target_bvecs: np.ndarray
    b0: np.ndarray
    s0: np.ndarray
    mask: np.ndarray
    bval: float
    clean_targets: np.ndarray | None = None
    clean_inputs: np.ndarray | None = None
    affine: np.ndarray | None = None
    snr: float | None = None
    input_volumes: np.ndarray | None = None

    def gtab(self, n_target: int | None = None) -> GradientTable:
        """Gradients of b0s + inputs + targets (the first ``n_target`` of them)."""
        tb = self.target_bvecs[:n_target]
        n_b0 = self.b0.shape[-1]
        return GradientTable(
            np.r_[np.zeros(n_b0), np.full(len(self.input_bvecs) + len(tb), self.bval)],
            np.r_[np.zeros((n_b0, 3)), self.input_bvecs, tb])

    def series(self, targets: np.ndarray | None = None) -> np.ndarray:
        """Raw-scale series b0s + inputs (+ targets, normalised) as (X, Y, Z, N)."""
        parts = [self.b0, self.inputs * self.s0[..., None]]
        if targets is not None:
            parts.append(targets * self.s0[..., None])
        return np.concatenate(parts, axis=-1).astype(np.float32)


def normalise(signal: np.ndarray, s0: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``signal / s0`` in the mask (0 outside and where s0 <= 0), clipped."""
    good = mask & (s0 > 0)
    out = np.zeros(signal.shape, dtype=np.float32)
    out[good] = signal[good] / s0[good, None]
    return np.clip(out, *SIGNAL_CLIP, out=out)


def split_dwi(dwi: DWI, subject: str = "", shell: float = UPSAMPLE_SHELL,
              n_input: int | None = N_INPUT, noise_free: np.ndarray | None = None,
              input_index: np.ndarray | None = None) -> DirectionSample:
    """Split one subject's ``shell`` into ``n_input`` inputs and the remaining targets.

    ``input_index`` (positions within the shell's volumes) overrides the
    well-spread choice; ``n_input=None`` makes every direction an input (no
    targets: for synthesis). Raises InputError when the shell has too few
    directions (at least one target is needed).
    """
    gtab = dwi.gtab
    path = dwi.paths.get("dwi", subject)
    try:
        idx = gtab.shell_indices(shell)
    except ValueError:
        raise InputError(path, f"no b={shell:g} shell (shells {gtab.shells})") from None
    if n_input is None:
        input_index = np.arange(idx.size)
    elif idx.size <= n_input:
        raise InputError(path, f"b={shell:g} has {idx.size} directions: direction "
                               f"upsampling needs more than the {n_input} inputs")
    pick = spread_subset(gtab.bvecs[idx], n_input) if input_index is None else \
        np.sort(np.asarray(input_index))
    rest = np.setdiff1d(np.arange(idx.size), pick)
    b0 = dwi.data[..., gtab.b0s_mask].astype(np.float32)
    s0 = mean_b0_map(dwi.data, gtab)
    mask = dwi.mask & (s0 > 0)
    clean = clean_in = None
    if noise_free is not None:
        clean_s0 = mean_b0_map(noise_free, gtab)
        clean = normalise(noise_free[..., idx[rest]], clean_s0, mask)
        clean_in = normalise(noise_free[..., idx[pick]], clean_s0, mask)
    return DirectionSample(
        subject=subject, inputs=normalise(dwi.data[..., idx[pick]], s0, mask),
        input_bvecs=gtab.bvecs[idx[pick]], targets=normalise(dwi.data[..., idx[rest]], s0, mask),
        target_bvecs=gtab.bvecs[idx[rest]], b0=b0, s0=s0, mask=mask, bval=float(shell),
        clean_targets=clean, clean_inputs=clean_in, affine=dwi.affine,
        input_volumes=idx[pick])


def phantom_scheme(seed: int, n_b0: int = PHANTOM_B0,
                   n_dirs: int = PHANTOM_DIRECTIONS) -> GradientTable:
    """A one-shell (b=1000) HCP-like scheme with its own direction set per seed."""
    return hcp_scheme(n_b0=n_b0, shells=(UPSAMPLE_SHELL,), n_dirs=n_dirs, seed=seed)


def phantom_samples(n_subjects: int, seed: int = 0, shape=PHANTOM_SHAPE, snr=30.0,
                    n_input: int = N_INPUT, first_index: int = 0) -> list[DirectionSample]:
    """Paired samples from ``n_subjects`` phantom subjects (seeds ``seed + i``).

    Each subject has its own anatomy and its own 90-direction set; the noisy
    data are split as :func:`split_dwi` does and the noise-free targets kept.
    ``snr``: one value, or a (low, high) range drawn per subject
    (:func:`subject_snr`).
    """
    out = []
    for i in range(first_index, first_index + n_subjects):
        level = subject_snr(seed + i, snr) if np.ndim(snr) else float(snr)
        dwi, noise_free = phantom_dwi(seed + i, shape, level)
        out.append(split_dwi(dwi, f"phantom-{seed + i}", n_input=n_input,
                             noise_free=noise_free))
        out[-1].snr = level
    return out


def phantom_dwi(seed: int, shape=PHANTOM_SHAPE, snr: float = 30.0) -> tuple[DWI, np.ndarray]:
    """Phantom subject ``seed`` on its own 90-direction scheme: (DWI, noise-free data)."""
    s = simulate_subject(shape=shape, seed=seed, snr=snr, scheme=phantom_scheme(seed),
                         keep_noise_free=True)
    header = nib.Nifti1Header()
    header.set_data_shape(s.dwi.shape)
    header.set_zooms(tuple(s.voxel_size) + (1.0,))
    dwi = DWI(data=s.dwi, gtab=s.gtab, mask=s.mask, affine=s.affine, header=header,
              paths={"dwi": f"phantom-{seed}"})
    return dwi, s.noise_free


def split_subjects(samples: list, n_val: int, n_test: int) -> tuple[list, list, list]:
    """Train / validation / test by subject (the last ``n_test`` are held out)."""
    if n_val + n_test >= len(samples):
        raise ValueError(f"{len(samples)} subjects cannot give {n_val} validation and "
                         f"{n_test} test subjects and still train")
    n_train = len(samples) - n_val - n_test
    return samples[:n_train], samples[n_train:n_train + n_val], samples[n_train + n_val:]


# ----------------------------------------------------------------------------
# Result tables (held-out metrics per method)
# ----------------------------------------------------------------------------
def summarise_methods(rows: list[dict], metrics) -> list[dict]:
    """Mean and SD over subjects of each metric, per method (first-seen order).

    Metrics that are NaN for every subject of a method become None.
    """
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        row = {"method": method, "subjects": len(sel)}
        for key in metrics:
            v = np.array([r[key] for r in sel], dtype=float)
            empty = bool(np.isnan(v).all())
            row[key] = None if empty else round(float(np.mean(v)), 5)
            row[f"{key}_sd"] = None if empty else round(float(np.std(v)), 5)
        out.append(row)
    return out


def table_markdown(table: list[dict], metrics) -> str:
    """A markdown table of :func:`summarise_methods` rows (mean +- SD over subjects)."""
    def cell(row, key):
        v = row.get(key)
        return "-" if v is None else f"{v:.4f} +- {row[key + '_sd']:.4f}"
    lines = ["| method | subjects | " + " | ".join(metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    lines += [f"| {r['method']} | {r['subjects']} | " + " | ".join(cell(r, k) for k in metrics)
              + " |" for r in table]
    return "\n".join(lines)
