"""Benchmark: RISH harmonization fit + apply time per subject and peak memory.

A paired two-site phantom cohort of HCP size (145 x 174 x 145 at 1.25 mm,
HCP scheme 18 b0 + 3 x 90 directions = 288 volumes, 4.2 GB float32 per
subject; the target site with a per-order RISH scaling and lower SNR) is
simulated subject by subject and written as uncompressed NIfTI to a
temporary folder. Fresh child processes then run what a pipeline runs, each
reporting its wall time and peak resident memory (``ru_maxrss``):

1. features, per subject: ``io.load_dwi`` + ``harmonize.subject_features``
   (DTI FA on b <= 1500, SH lmax 8 + RISH on every shell), written as NIfTI;
2. fit, once: ``harmonize.fit_harmonization`` over all subjects (template
   from the reference site, 2 rounds; affine + SyN registration of every
   subject; site means; scale maps), loading one subject at a time, and
   ``HarmonizationArtefact.save``;
3. apply, per target subject: ``load_dwi`` + artefact load +
   ``apply_harmonization`` (registration, warped scale maps, SH scaling of
   all 3 shells) into a new array; once more in place for the peak memory
   without the output copy.

Per-subject fit time = (features time per subject) + (fit wall time / number
of subjects); the registrations dominate. Peak = the largest child.

Run: ``.venv/bin/python bench/harmonize.py [--shape X Y Z] [--per-site N]
[--keep DIR]``. Ends with one line of key=value figures (GB = 1e9 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HCP_SHAPE = (145, 174, 145)
HCP_VOXEL_MM = 1.25
LMAX = 8
SNR_REF, SNR_TAR = 30.0, 20.0
SCALE = {0: 0.9, 2: 1.2, 4: 0.85, 6: 0.9, 8: 0.9}

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
task, args = sys.argv[1], json.loads(sys.argv[2])
t0 = time.perf_counter()
out = {}
if task == "simulate":
    from dmriflow.interfaces.sim import phantom
    from dmriflow.interfaces.gradients import format_bvals, format_bvecs
    from dmriflow.interfaces.io import save_nifti, write_text
    import nibabel as nib
    site = None
    if args["target"]:
        site = phantom.SiteEffect(name="target", snr=args["snr_tar"],
                                  rish_scale={int(k): v for k, v in args["scale"].items()},
                                  rish_lmax=args["lmax"])
    s = phantom.simulate_subject(tuple(args["shape"]), seed=args["seed"], snr=args["snr_ref"],
                                 scheme=phantom.hcp_scheme(), voxel_size=args["voxel"],
                                 site=site)
    d = Path(args["dir"])
    d.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(s.dwi, s.affine), d / "data.nii")
    save_nifti(s.mask.astype(np.uint8), s.affine, d / "mask.nii.gz")
    write_text(format_bvals(s.gtab.bvals), d / "bvals")
    write_text(format_bvecs(s.gtab.bvecs), d / "bvecs")
    out["mask_voxels"] = int(s.mask.sum())
elif task == "features":
    from dmriflow.interfaces import harmonize as H
    from dmriflow.interfaces.io import load_dwi, save_nifti
    d = Path(args["dir"])
    dwi = load_dwi(d / "data.nii", d / "bvals", d / "bvecs", d / "mask.nii.gz")
    t1 = time.perf_counter()
    f = H.subject_features(dwi, args["id"], args["lmax"], sha256="bench")
    out["compute_s"] = time.perf_counter() - t1
    save_nifti(f.fa, dwi.affine, d / "fa.nii.gz")
    for b, r in f.rish.items():
        save_nifti(r, dwi.affine, d / f"rish_b{b:g}.nii.gz")
elif task == "fit":
    import nibabel as nib
    from dmriflow.interfaces import harmonize as H
    def loader(d, sid):
        d = Path(d)
        def load():
            fa = nib.load(d / "fa.nii.gz")
            mask = np.asarray(nib.load(d / "mask.nii.gz").dataobj) > 0
            rish = {float(p.name[6:-7]): np.asarray(nib.load(p).dataobj, dtype=np.float32)
                    for p in sorted(d.glob("rish_b*.nii.gz"))}
            return H.SubjectFeatures(sid, np.asarray(fa.dataobj, dtype=np.float32),
                                     fa.affine, mask, rish, sha256=sid)
        return load
    ref = [loader(d, f"ref{i}") for i, d in enumerate(args["ref"])]
    tar = [loader(d, f"tar{i}") for i, d in enumerate(args["tar"])]
    art = H.fit_harmonization(ref, tar, args["shells"], args["lmax"],
                              min_subjects=args["min_subjects"])
    out["fit_s"] = time.perf_counter() - t0
    art.save(args["out"], overwrite=True)
    lam = {f"{b:g}": [round(float(np.median(art.scale_maps[b][art.template_mask][:, k])), 4)
                      for k in range(args["lmax"] // 2 + 1)] for b in art.shells}
    out["lambda_median"] = lam
    out["template_mask_voxels"] = int(art.template_mask.sum())
elif task == "apply":
    from dmriflow.interfaces import harmonize as H
    from dmriflow.interfaces.io import load_dwi
    d = Path(args["dir"])
    dwi = load_dwi(d / "data.nii", d / "bvals", d / "bvecs", d / "mask.nii.gz")
    art = H.HarmonizationArtefact.load(args["artefact"])
    t1 = time.perf_counter()
    fa = np.asarray(__import__("nibabel").load(d / "fa.nii.gz").dataobj, dtype=np.float32)
    data, info = H.apply_harmonization(dwi, fa, art, inplace=args["inplace"])
    out["apply_s"] = time.perf_counter() - t1
    out["registration_s"] = info["timing_s"]["registration"]
    out["scaling_s"] = info["timing_s"]["scaling"]
    out["clipped"] = info["negative_clipped_fraction"]
out["wall_s"] = time.perf_counter() - t0
out["maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
print("RESULT " + json.dumps(out))
"""


def child(task: str, args: dict) -> dict:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", CHILD, task, json.dumps(args)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{task} child failed (exit {proc.returncode})")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    opts, root = _options()
    try:
        run(opts, root)
    finally:
        if not opts.keep:          # the cohort is ~17 GB of uncompressed NIfTI
            shutil.rmtree(root, ignore_errors=True)


def _options():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=HCP_SHAPE)
    ap.add_argument("--voxel", type=float, default=HCP_VOXEL_MM)
    ap.add_argument("--per-site", type=int, default=2,
                    help="subjects per site (the fit's minimum is lowered to this: the "
                         "benchmark measures cost, not statistics)")
    ap.add_argument("--keep", help="keep the simulated cohort and artefact here")
    ap.add_argument("--no-inplace", action="store_true",
                    help="skip the extra in-place application (peak memory without the copy)")
    opts = ap.parse_args()
    root = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="dmriflow-harm-"))
    return opts, root


def run(opts, root: Path) -> None:
    n = opts.per_site
    dirs = {site: [root / f"{site}{i}" for i in range(n)] for site in ("ref", "tar")}
    print(f"cohort: {n} + {n} subjects, shape {tuple(opts.shape)} at {opts.voxel} mm, "
          f"288 volumes, under {root}", flush=True)
    sim = []
    for site, ds in dirs.items():
        for i, d in enumerate(ds):
            if (d / "data.nii").exists() and (d / "mask.nii.gz").exists():
                continue
            r = child("simulate", {"shape": opts.shape, "seed": 100 + i, "voxel": opts.voxel,
                                   "snr_ref": SNR_REF, "snr_tar": SNR_TAR, "scale": SCALE,
                                   "lmax": LMAX, "target": site == "tar", "dir": str(d)})
            sim.append(r["wall_s"])
            print(f"  simulated {d.name}: {r['wall_s']:.0f} s, {r['mask_voxels']} mask voxels, "
                  f"peak {r['maxrss_gb']:.1f} GB", flush=True)
    feats = []
    for site, ds in dirs.items():
        for i, d in enumerate(ds):
            r = child("features", {"dir": str(d), "id": d.name, "lmax": LMAX})
            feats.append(r)
            print(f"  features {d.name}: {r['wall_s']:.1f} s ({r['compute_s']:.1f} s DTI+SH), "
                  f"peak {r['maxrss_gb']:.2f} GB", flush=True)
    fit = child_fit(dirs, root, n)
    n_sub = 2 * n
    print(f"  fit: {fit['fit_s']:.0f} s for {n_sub} subjects, peak {fit['maxrss_gb']:.2f} GB; "
          f"median lambda in the template mask {fit['lambda_median']}", flush=True)
    applies = []
    for d in dirs["tar"]:
        r = child("apply", {"dir": str(d), "artefact": str(root / "artefact"), "inplace": False})
        applies.append(r)
        print(f"  apply {d.name}: {r['wall_s']:.1f} s (registration {r['registration_s']:.1f} s, "
              f"SH scaling {r['scaling_s']:.1f} s, rest = loading), peak {r['maxrss_gb']:.2f} GB, "
              f"negative values clipped {r['clipped']:.1e}", flush=True)
    inplace_peak = None
    if not opts.no_inplace:
        r = child("apply", {"dir": str(dirs["tar"][0]), "artefact": str(root / "artefact"),
                            "inplace": True})
        inplace_peak = r["maxrss_gb"]
        print(f"  apply {dirs['tar'][0].name} in place: {r['wall_s']:.1f} s, "
              f"peak {inplace_peak:.2f} GB", flush=True)
    feat_s = sum(r["wall_s"] for r in feats) / len(feats)
    fit_s = feat_s + fit["fit_s"] / n_sub
    apply_s = sum(r["wall_s"] for r in applies) / len(applies)
    peak = max([fit["maxrss_gb"]] + [r["maxrss_gb"] for r in feats + applies])
    print(f"harm_fit_s_per_subject={fit_s:.1f} harm_apply_s_per_subject={apply_s:.1f} "
          f"harm_peak_gb={peak:.2f} harm_features_s_per_subject={feat_s:.1f} "
          f"harm_fit_only_s_per_subject={fit['fit_s'] / n_sub:.1f} "
          + (f"harm_apply_inplace_peak_gb={inplace_peak:.2f} " if inplace_peak else "")
          + f"shape={'x'.join(map(str, opts.shape))} n_subjects={n_sub}")


def child_fit(dirs: dict, root: Path, n: int) -> dict:
    args = {"ref": [str(d) for d in dirs["ref"]], "tar": [str(d) for d in dirs["tar"]],
            "shells": [1000.0, 2000.0, 3000.0], "lmax": LMAX, "out": str(root / "artefact"),
            "min_subjects": n}
    return child("fit", args)


if __name__ == "__main__":
    main()
