"""Benchmark: gradient-orientation check, dmriflow vs MRtrix3's dwigradcheck, in one run.

The same series go to both tools: the shared real data (Philips 12-direction
whole brain; MDT two-slice Prisma) as acquired and with the b-vectors' x axis
flipped, and a phantom subject (48^3, 32 directions) with y flipped. Both get
the same brain mask (the one dmriflow's Validate computes or the shipped one).

* dmriflow: :func:`orientation.check_dwi` on the loaded series (one OLS
  tensor fit, then 24 candidate transforms tracked from one set of seeds),
  timed in-process (reading the series is not included; it is shared with
  Validate in the pipeline).
* MRtrix3: ``dwigradcheck -nthreads 2 -fslgrad ... -mask ...
  -export_grad_fsl``, timed as a command (includes its own reading); its
  answer is the transform between the exported and the given b-vectors.

A row per series: the verdict and transform of each, and seconds. The
transform names the correction (what to apply to the given table); "none"
means the table was kept. Run: ``.venv/bin/python bench/gradcheck.py``
(about 3-5 minutes on 2 cores, nearly all of it dwigradcheck).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np

from dmriflow.interfaces import io, orientation
from dmriflow.interfaces.gradients import GradientTable
from dmriflow.interfaces.sim.phantom import hcp_scheme, simulate_subject
from dmriflow.interfaces.stepfiles import load_subject

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PHILIPS = DATA / "philips_ingenia_b1000" / "DTI_Biobank_2mm_MB3S2_EPI_701"
MDT = DATA / "mdt_te60_b1k_b2k"
THREADS = 2


def flipped(dwi: io.DWI, label: str) -> io.DWI:
    cand = orientation.candidate_by_label(label)
    return replace(dwi, gtab=GradientTable(dwi.gtab.bvals,
                                           orientation.apply_to_bvecs(dwi.gtab.bvecs, cand)))


def series() -> list[tuple[str, io.DWI]]:
    philips = load_subject(f"{PHILIPS}.nii.gz", f"{PHILIPS}.bval", f"{PHILIPS}.bvec")
    mdt = load_subject(MDT / "b1k_b2k_example_slices_24_38.nii.gz", MDT / "b1k_b2k.bval",
                       MDT / "b1k_b2k.bvec", MDT / "b1k_b2k_example_slices_24_38_mask.nii.gz")
    s = simulate_subject(shape=(48, 48, 48), seed=0,
                         scheme=hcp_scheme(n_b0=3, shells=(1000,), n_dirs=32, jitter=False))
    phantom = io.DWI(s.dwi, s.gtab, s.mask, s.affine,
                     nib.Nifti1Image(s.dwi[..., :1], s.affine).header, {})
    return [("philips", philips), ("philips flip x", flipped(philips, "flip x")),
            ("mdt", mdt), ("mdt flip x", flipped(mdt, "flip x")),
            ("phantom flip y", flipped(phantom, "flip y"))]


def dmriflow_check(dwi: io.DWI) -> tuple[str, float]:
    t = time.perf_counter()
    res = orientation.check_dwi(dwi)
    sec = time.perf_counter() - t
    answer = res.best if res.verdict == orientation.FLIPPED else res.verdict
    return answer + (f" (tied x{len(res.tied)})" if res.tied else ""), sec


def mrtrix_check(dwi: io.DWI, tmp: Path) -> tuple[str, float]:
    img, mask = tmp / "dwi.nii", tmp / "mask.nii"
    nib.save(nib.Nifti1Image(dwi.data, dwi.affine), img)
    nib.save(nib.Nifti1Image(dwi.mask.astype(np.uint8), dwi.affine), mask)
    bval, bvec = tmp / "dwi.bval", tmp / "dwi.bvec"
    np.savetxt(bval, dwi.gtab.bvals[None], fmt="%g")
    np.savetxt(bvec, dwi.gtab.bvecs.T, fmt="%.8f")
    out_bvec, out_bval = tmp / "out.bvec", tmp / "out.bval"
    t = time.perf_counter()
    subprocess.run(["dwigradcheck", "-quiet", "-force", "-nthreads", str(THREADS),
                    "-fslgrad", str(bvec), str(bval), "-mask", str(mask), str(img),
                    "-export_grad_fsl", str(out_bvec), str(out_bval)], check=True,
                   cwd=tmp, capture_output=True)
    sec = time.perf_counter() - t
    given, got = dwi.gtab.bvecs, np.loadtxt(out_bvec).T
    dw = ~dwi.gtab.b0s_mask
    for cand in orientation.candidates():   # a vector's sign is free: M and -M are one answer
        mine = orientation.apply_to_bvecs(given[dw], cand)
        if np.allclose(mine, got[dw], atol=1e-4) or np.allclose(-mine, got[dw], atol=1e-4):
            return cand.label, sec
    m = np.linalg.lstsq(given[dw], got[dw], rcond=None)[0].T     # got = given @ m.T
    return "other " + np.array2string(np.round(m, 2), separator=",").replace("\n", ""), sec


def main() -> None:
    if not shutil.which("dwigradcheck"):
        raise SystemExit("dwigradcheck (MRtrix3) is not on PATH")
    rows = []
    print(f"{'series':<16}{'dmriflow':<26}{'s':>7}  {'dwigradcheck':<16}{'s':>7}  ratio")
    for name, dwi in series():
        ours, t_ours = dmriflow_check(dwi)
        with tempfile.TemporaryDirectory() as tmp:
            theirs, t_theirs = mrtrix_check(dwi, Path(tmp))
        rows.append((t_ours, t_theirs))
        print(f"{name:<16}{ours:<26}{t_ours:7.2f}  {theirs:<16}{t_theirs:7.2f}  "
              f"{t_theirs / t_ours:5.1f}x", flush=True)
    total = np.sum(rows, axis=0)
    print(f"total dmriflow_s={total[0]:.2f} dwigradcheck_s={total[1]:.2f} "
          f"speedup={total[1] / total[0]:.1f}x threads={THREADS}")


if __name__ == "__main__":
    main()
