"""Benchmark: motion correction, dmriflow vs dipy's ``motion_correction``, same series.

One phantom subject (default 28x34x28 voxels at 3.5 mm, 4 b0 + 20 b=1000
directions, SNR 30) moved by known random rigid transforms (+-2 mm, +-2 deg
per axis, the first b0 still: both tools use it as the reference frame).
Both tools correct the same series in this process, one after the other:

* dmriflow: b0s to their mean, diffusion volumes to leave-one-out tensor
  predictions, shell offsets anchored to the mean b0, one resampling.
* dipy ``motion_correction`` (``dipy_correct_motion``): every volume
  registered to the first b0 (its default pipeline: center of mass,
  translation, rigid, affine), b-vectors rotated.

Per tool: wall time, peak resident memory during the call (the process's
high-water mark, reset before each tool through ``/proc/self/clear_refs``;
Linux), and the rms / max error of the estimated translations
(mm) and rotations (deg) against the truth (rotation part of dipy's affines).

Run: ``.venv/bin/python bench/motion.py [--shape 28 34 28 --voxel 3.5]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from dipy.align import motion_correction

from dmriflow.interfaces import motion
from dmriflow.interfaces.parallel import available_threads
from dmriflow.interfaces.sim.motion import move_subject, random_motion
from dmriflow.interfaces.sim.phantom import hcp_scheme, simulate_subject


def _status_kb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (kB), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident memory (GB) of this process over a ``with`` block: the kernel's
    high-water mark (VmHWM) reset on entry (``echo 5 > /proc/self/clear_refs``).
    ``gb`` is None where the mark cannot be reset (then it would include what ran before);
    ``start_gb``: resident memory on entry (the peak less it is what the call added)."""

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.gb, self.start_gb = None, (_status_kb("VmRSS") or float("nan")) / 1024 ** 2
        return self

    def __exit__(self, *exc):
        hwm = _status_kb("VmHWM")
        if self.reset and hwm is not None:
            self.gb = hwm / 1024 ** 2
        return False


def errors(estimated, truth) -> dict:
    """rms / max error of translations (mm) and rotations (deg) over the volumes."""
    err = np.asarray(estimated) - truth
    rot = np.rad2deg(err[:, 3:])
    return {"trans_rms_mm": float(np.sqrt((err[:, :3] ** 2).mean())),
            "trans_max_mm": float(np.abs(err[:, :3]).max()),
            "rot_rms_deg": float(np.sqrt((rot ** 2).mean())), "rot_max_deg": float(np.abs(rot).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(28, 34, 28))
    ap.add_argument("--voxel", type=float, default=3.5)
    ap.add_argument("--dirs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    scheme = hcp_scheme(n_b0=4, shells=(1000,), n_dirs=args.dirs, jitter=False)
    subject = simulate_subject(shape=args.shape, voxel_size=args.voxel, seed=1, scheme=scheme,
                               keep_noise_free=True, snr=30)
    truth = random_motion(len(scheme), seed=args.seed)
    moved = move_subject(subject, truth)
    print(f"series {moved.dwi.shape}, {args.voxel} mm, threads {available_threads()}")
    rows = []
    print(f"series {moved.dwi.nbytes / 1e9:.3f} GB float32; resident before the tools "
          f"{(_status_kb('VmRSS') or float('nan')) / 1024 ** 2:.2f} GB")
    t = time.perf_counter()
    with PeakRSS() as mem:
        ours = motion.correct_motion(moved.dwi, moved.gtab, moved.affine, subject.mask,
                                     iterations=1)
    rows.append({"tool": "dmriflow", "seconds": time.perf_counter() - t, "peak_gb": mem.gb,
                 "added_gb": mem.gb - mem.start_gb if mem.gb is not None else None,
                 **errors(ours.parameters, truth)})
    del ours
    t = time.perf_counter()
    with PeakRSS() as mem:
        _, affines = motion_correction(moved.dwi, moved.gtab.to_dipy(), affine=moved.affine,
                                       b0_ref=0, static_mask=subject.mask.astype(np.int32))
    seconds = time.perf_counter() - t
    theirs = np.stack([motion.rigid_parameters(affines[..., k]) for k in range(len(scheme))])
    rows.append({"tool": "dipy motion_correction", "seconds": seconds, "peak_gb": mem.gb,
                 "added_gb": mem.gb - mem.start_gb if mem.gb is not None else None,
                 **errors(theirs, truth)})
    print(f"{'tool':24s} {'s':>7s} {'peak GB':>8s} {'added':>6s} {'trans rms mm':>13s} {'max':>6s} "
          f"{'rot rms deg':>12s} {'max':>6s}")
    for r in rows:
        peak = (f"{r['peak_gb']:8.3f} {r['added_gb']:6.3f}" if r["peak_gb"] is not None
                else f"{'n/a':>8s} {'n/a':>6s}")
        print(f"{r['tool']:24s} {r['seconds']:7.1f} {peak} {r['trans_rms_mm']:13.3f} "
              f"{r['trans_max_mm']:6.3f} {r['rot_rms_deg']:12.3f} {r['rot_max_deg']:6.3f}")


if __name__ == "__main__":
    main()
