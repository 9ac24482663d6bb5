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

``--pipeline``: instead, the fit as a user runs it. A BIDS cohort of
``--per-site`` subjects per site (``phantom.write_cohort``, .nii.gz, brain
anatomy, travelling subjects: the target site re-scans the reference
persons) goes through ``dmriflow harmonize fit --worker cf --n-procs
WORKERS`` (features with each subject's summary before harmonization,
template rounds, final registration and the summary after harmonization one
node per subject, in parallel; then the fit and the evaluation's tables)
twice in one run, each in a fresh child process with its own
output and cache: ``setting=full`` with today's full registration pyramids
forced on each image's own grid (``harmonize.*_HALF_LEVEL_MAX_MM`` and
``REGISTRATION_GRID_MM`` set to 0 in the child before the CLI starts; the
engine's workers are forked from it), ``setting=rule`` with today's
defaults (the registration grid and the pyramid rule; ``grid_factor`` in
its row). Per setting: fit wall seconds per subject, CPU seconds per
subject (user + sys of the child and every process it waited for, the
engine's pool included: ``RUSAGE_CHILDREN`` of this process before and
after; less sensitive to other load on the machine; / workers = a quiet
machine's wall time if the work were evenly spread), peak RSS of the
largest process and of all of the fit's processes together (sampled from
/proc every 0.5 s, and ``ru_maxrss``) and load1 before and after; then a
``phases`` line: the wall seconds of each phase of the fit, from the times
its cache's nodes wrote their results (:func:`fit_phases`). Then the
end-to-end check on ``--held-out`` other persons scanned at both sites (not
in the fit): each held-out target scan harmonised with each artefact
(registered with the artefact's setting), and once more with the full
pyramids on its FA plus small noise (``JITTER_FA_SD``: today's own variation
for an input change that should not matter); reported per setting, shell and
order: the white-matter (truth label) mean RISH of the harmonised target
relative to the same person's reference scan (``err_pct``; 0 = perfect) and
the mean absolute voxelwise difference from the full-pyramid result
(``vs_full_pct``, % of the reference's WM mean).

Run: ``.venv/bin/python bench/harmonize.py [--shape X Y Z] [--per-site N]
[--keep DIR] [--pipeline [--workers W] [--held-out N] [--settings full rule]
[--grid-mm MM]]``. Ends with one line
of key=value figures (GB = 1e9 bytes).

Measured 2026-12-04, ``--pipeline --shape 56 68 56 --voxel 1.25 --per-site 3
--held-out 1`` (nice 10, OMP_NUM_THREADS=1, 2 cores shared with 5 other
jobs; the HCP-size run was not possible on that machine). With both half
levels (``SYN_HALF_LEVEL_MAX_MM`` = 2.5 then)::

  setting=full affine_levels=[100, 50, 10] syn_levels=[10, 10, 5] workers=2 subjects=6 fit_wall_s=366 fit_s_per_subject=61.0 cpu_s_per_subject=24.9 cpu_s_per_subject_per_core=12.4 peak_rss_gb=1.03 peak_total_rss_gb=1.34 load1_start=7.15 load1_end=9.51
  setting=rule affine_levels=[100, 50, 0] syn_levels=[10, 10, 0] workers=2 subjects=6 fit_wall_s=191 fit_s_per_subject=31.8 cpu_s_per_subject=16.2 cpu_s_per_subject_per_core=8.1 peak_rss_gb=1.02 peak_total_rss_gb=1.29 load1_start=9.51 load1_end=6.47

and with the adopted rule (affine half level only)::

  setting=full affine_levels=[100, 50, 10] syn_levels=[10, 10, 5] workers=2 subjects=6 fit_wall_s=380 fit_s_per_subject=63.4 cpu_s_per_subject=24.0 cpu_s_per_subject_per_core=12.0 peak_rss_gb=1.01 peak_total_rss_gb=1.35 load1_start=3.44 load1_end=7.51
  setting=rule affine_levels=[100, 50, 0] syn_levels=[10, 10, 5] workers=2 subjects=6 fit_wall_s=208 fit_s_per_subject=34.6 cpu_s_per_subject=19.3 cpu_s_per_subject_per_core=9.6 peak_rss_gb=1.01 peak_total_rss_gb=1.33 load1_start=7.51 load1_end=4.34

Held-out rows (l0; docs/harmonization.md has the others): both half levels
err_pct +0.43 / +0.45 / +0.53 (b=1000/2000/3000) vs full +0.37 / +0.31 /
+0.31 and full_jitter +0.38 / +0.32 / +0.32; the adopted rule +0.35 / +0.28
/ +0.26.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HCP_SHAPE = (145, 174, 145)
HCP_VOXEL_MM = 1.25
LMAX = 8
SNR_REF, SNR_TAR = 30.0, 20.0
SCALE = {0: 0.9, 2: 1.2, 4: 0.85, 6: 0.9, 8: 0.9}
#: --pipeline: the fit's registration settings, timed in one run.
PIPELINE_SETTINGS = ("full", "rule")
#: FA noise (SD, in the mask) of today's own-variation row of the held-out
#: check (as bench/harmonize_register_speed.py's JITTER_FA_SD).
JITTER_FA_SD = 0.02
JITTER_SEED = 7
#: Seeds: the fit cohort, and the held-out persons (other anatomies).
COHORT_SEED, HELD_OUT_SEED = 100, 900

CHILD = r"""
import json, resource, sys, time
from dataclasses import replace
from pathlib import Path
import numpy as np
task, args = sys.argv[1], json.loads(sys.argv[2])
t0 = time.perf_counter()
out = {}
def target_site(args):          # the simulated target site's effect (None: reference)
    from dmriflow.interfaces.sim import phantom
    if not args["target"]:
        return None
    return phantom.SiteEffect(name="target", snr=args["snr_tar"],
                              rish_scale={int(k): v for k, v in args["scale"].items()},
                              rish_lmax=args["lmax"])
if task == "simulate":
    from dmriflow.interfaces.sim import phantom
    from dmriflow.interfaces.gradients import format_bvals, format_bvecs
    from dmriflow.interfaces.io import save_nifti, write_text
    import nibabel as nib
    site = target_site(args)
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
elif task == "cohort":
    from dmriflow.interfaces.sim import phantom
    site = target_site(args)
    out["labels"] = phantom.write_cohort(
        args["dir"], args["n"], layout="bids", shape=tuple(args["shape"]), seed=args["seed"],
        snr=args["snr_ref"], site=site, subject_prefix=args["prefix"],
        voxel_size=args["voxel"], anatomy="brain")
elif task == "cli_fit":
    import os, threading
    from dmriflow.interfaces import harmonize as H
    if args["setting"] == "full":         # today's pyramids on every image's own grid
        H.AFFINE_HALF_LEVEL_MAX_MM = H.SYN_HALF_LEVEL_MAX_MM = H.REGISTRATION_GRID_MM = 0.0
    elif args["grid_mm"] is not None:     # --grid-mm: the rule on another registration grid
        H.REGISTRATION_GRID_MM = args["grid_mm"]
    from dmriflow.pipelines import cli
    peak = {"largest": 0, "total": 0}
    done = threading.Event()
    def rss_kb(pid):
        with open(f"/proc/{pid}/status") as fh:
            return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:"))
    def tree(pid):
        kids = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids += [int(c) for c in fh.read().split()]
        return [pid] + [p for k in kids for p in tree(k)]
    def watch():          # every process of the fit: the largest and the sum
        while not done.wait(0.5):
            try:
                rss = [rss_kb(p) for p in tree(os.getpid())]
            except (OSError, StopIteration):
                continue
            peak["largest"] = max(peak["largest"], max(rss))
            peak["total"] = max(peak["total"], sum(rss))
    threading.Thread(target=watch, daemon=True).start()
    out["code"] = cli.main(args["argv"])
    done.set()
    out["largest_rss_gb"] = peak["largest"] * 1024 / 1e9
    out["total_rss_gb"] = peak["total"] * 1024 / 1e9
elif task == "held_out":
    import nibabel as nib
    from dmriflow.interfaces import harmonize as H
    from dmriflow.interfaces.io import load_dwi
    def scan(d, label):
        base = Path(d) / f"sub-{label}" / "dwi" / f"sub-{label}_dwi"
        truth = Path(d) / "derivatives" / "truth" / f"sub-{label}"
        dwi = load_dwi(Path(f"{base}.nii.gz"), Path(f"{base}.bval"), Path(f"{base}.bvec"),
                       truth / "dwi" / f"sub-{label}_desc-brain_mask.nii.gz")
        wm = np.asarray(nib.load(truth / f"sub-{label}_param-label.nii.gz").dataobj)
        return dwi, wm == args["wm_label"]
    ref, wm = scan(args["ref_dir"], args["ref_label"])
    ref_rish = H.rish_maps(ref, args["lmax"])
    del ref
    dwi, _ = scan(args["tar_dir"], args["tar_label"])
    fa = H.dti_fa(dwi)
    rows, full = [], {}
    for name, folder, jitter in args["runs"]:
        if name.startswith("full"):
            H.AFFINE_HALF_LEVEL_MAX_MM = H.SYN_HALF_LEVEL_MAX_MM = H.REGISTRATION_GRID_MM = 0.0
        else:
            (H.AFFINE_HALF_LEVEL_MAX_MM, H.SYN_HALF_LEVEL_MAX_MM,
             H.REGISTRATION_GRID_MM) = args["bounds"]
        f = fa
        if jitter:
            rng = np.random.default_rng(args["jitter_seed"])
            f = np.where(dwi.mask, fa + rng.normal(0, args["jitter_sd"], fa.shape),
                         0).astype(np.float32)
        art = H.HarmonizationArtefact.load(folder)
        t1 = time.perf_counter()
        data, info = H.apply_harmonization(dwi, f, art)
        reg_s = info["timing_s"]["registration"]
        rish = H.rish_maps(replace(dwi, data=data), args["lmax"])
        del data
        for b in sorted(rish):
            for k in range(rish[b].shape[-1]):
                r = ref_rish[b][..., k][wm]
                x = rish[b][..., k][wm]
                if name == "full":
                    full[(b, k)] = x
                diff = (float(np.mean(np.abs(x - full[(b, k)]))) / float(np.mean(r)) * 100
                        if (b, k) in full else float("nan"))
                rows.append({"run": name, "shell": b, "order": 2 * k,
                             "err_pct": (float(np.mean(x)) / float(np.mean(r)) - 1) * 100,
                             "vs_full_pct": diff, "registration_s": reg_s})
    out["rows"] = rows
usage_self = resource.getrusage(resource.RUSAGE_SELF)
usage_children = resource.getrusage(resource.RUSAGE_CHILDREN)
out["wall_s"] = time.perf_counter() - t0
out["maxrss_gb"] = usage_self.ru_maxrss * 1024 / 1e9
out["children_maxrss_gb"] = usage_children.ru_maxrss * 1024 / 1e9
out["cpu_s"] = sum(u.ru_utime + u.ru_stime for u in (usage_self, usage_children))
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
        (run_pipeline if opts.pipeline else run)(opts, root)
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
    ap.add_argument("--keep", help="keep the simulated cohort and artefact here (--pipeline: "
                                   "and each fit's cache)")
    ap.add_argument("--pipeline", action="store_true",
                    help="time 'dmriflow harmonize fit' (full pyramids and the grid rule) "
                         "and check held-out subjects, instead of the library steps")
    ap.add_argument("--workers", type=int, default=2, help="--pipeline: engine processes")
    ap.add_argument("--held-out", type=int, default=1,
                    help="--pipeline: held-out persons (scanned at both sites)")
    ap.add_argument("--settings", nargs="+", choices=PIPELINE_SETTINGS,
                    default=list(PIPELINE_SETTINGS),
                    help="--pipeline: the registration settings to time (the held-out "
                         "check compares both, so it runs only when both are timed)")
    ap.add_argument("--grid-mm", type=float, default=None,
                    help="--pipeline: the rule setting's registration grid "
                         "(harmonize.REGISTRATION_GRID_MM; default: the library's)")
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


def run_pipeline(opts, root: Path) -> None:
    """``--pipeline``: the CLI fit per setting, then the held-out check."""
    from dmriflow.interfaces import harmonize as H
    from dmriflow.interfaces.sim.phantom import LABELS
    n, k = opts.per_site, opts.held_out
    bids, held = root / "bids", root / "held_out"
    print(f"cohort: {n} + {n} subjects (+ {k} held out at both sites), shape "
          f"{tuple(opts.shape)} at {opts.voxel} mm, 288 volumes, under {root}", flush=True)
    common = {"shape": opts.shape, "voxel": opts.voxel, "snr_ref": SNR_REF, "snr_tar": SNR_TAR,
              "scale": SCALE, "lmax": LMAX}
    labels = {}
    for where, count, seed in ((bids, n, COHORT_SEED), (held, k, HELD_OUT_SEED)):
        for prefix, target in (("a", False), ("b", True)):
            if count and not any(where.glob(f"sub-{prefix}*")):
                r = child("cohort", {**common, "dir": str(where), "n": count, "seed": seed,
                                     "prefix": prefix, "target": target})
                print(f"  simulated {where.name} {prefix}: {r['wall_s']:.0f} s", flush=True)
            labels[(where.name, prefix)] = sorted(p.name[4:] for p in where.glob(f"sub-{prefix}*"))
    table = root / "sites.tsv"
    table.write_text("participant_id\tsite\n" + "".join(
        f"sub-{lbl}\t{'siteA' if lbl.startswith('a') else 'siteB'}\n"
        for prefix in "ab" for lbl in labels[("bids", prefix)]))
    figures, artefacts = {}, {}
    for setting in opts.settings:
        out = root / f"fit-{setting}"
        shutil.rmtree(out, ignore_errors=True)
        argv = ["harmonize", "fit", str(bids), str(out), "--reference", "siteA",
                "--target", "siteB", "--site-column", "site", "--site-table", str(table),
                "--worker", "cf", "--n-procs", str(opts.workers), "--quiet",
                "--cache-dir", str(out / "cache")]
        load0 = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.time()
        r = child("cli_fit", {"setting": setting, "argv": argv, "grid_mm": opts.grid_mm})
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # all waited for, pools too
        cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        load1 = os.getloadavg()[0]
        if r["code"] != 0:
            raise SystemExit(f"harmonize fit ({setting}) exited {r['code']}")
        artefacts[setting] = str(next((out / "dmriflow" / "harmonization").iterdir()))
        params = json.loads((Path(artefacts[setting]) / "artefact.json").read_text())
        levels = params["parameters"]["registration_options"]
        n_sub = 2 * n
        peak = max(r["maxrss_gb"], r["children_maxrss_gb"], r["largest_rss_gb"])
        figures[setting] = r["wall_s"] / n_sub
        print(f"setting={setting} affine_levels={levels['affine_level_iters']} "
              f"syn_levels={levels['syn_level_iters']} "
              f"grid_factor={levels.get('grid_factor', 1)} workers={opts.workers} "
              f"subjects={n_sub} fit_wall_s={r['wall_s']:.0f} "
              f"fit_s_per_subject={r['wall_s'] / n_sub:.1f} "
              f"cpu_s_per_subject={cpu_s / n_sub:.1f} "
              f"cpu_s_per_subject_per_core={cpu_s / n_sub / opts.workers:.1f} "
              f"peak_rss_gb={peak:.2f} peak_total_rss_gb={r['total_rss_gb']:.2f} "
              f"load1_start={load0:.2f} load1_end={load1:.2f}",
              flush=True)
        phases = fit_phases(out / "cache", started)
        n_reg = phases.pop("registrations_n")
        print(f"phases setting={setting} " + " ".join(f"{k}_s={v:.0f}" for k, v in phases.items())
              + f" registration_nodes={n_reg}", flush=True)
        if not opts.keep:
            shutil.rmtree(out / "cache", ignore_errors=True)
    held_pairs = (zip(labels[("held_out", "a")], labels[("held_out", "b")])
                  if set(PIPELINE_SETTINGS) <= set(artefacts) else ())
    runs = [("full", artefacts.get("full"), False), ("rule", artefacts.get("rule"), False),
            ("full_jitter", artefacts.get("full"), True)]
    for ref_label, tar_label in held_pairs:
        load0 = os.getloadavg()[0]
        r = child("held_out", {"ref_dir": str(held), "ref_label": ref_label,
                               "tar_dir": str(held), "tar_label": tar_label, "lmax": LMAX,
                               "wm_label": LABELS["wm"], "runs": runs,
                               "bounds": [H.AFFINE_HALF_LEVEL_MAX_MM, H.SYN_HALF_LEVEL_MAX_MM,
                                          H.REGISTRATION_GRID_MM if opts.grid_mm is None
                                          else opts.grid_mm],
                               "jitter_sd": JITTER_FA_SD, "jitter_seed": JITTER_SEED})
        for row in r["rows"]:
            print(f"held_out={tar_label} run={row['run']} b={row['shell']:g} "
                  f"l={row['order']} err_pct={row['err_pct']:+.2f} "
                  f"vs_full_pct={row['vs_full_pct']:.3f} "
                  f"registration_s={row['registration_s']:.1f}", flush=True)
        print(f"  held-out check: {r['wall_s']:.0f} s, peak {r['maxrss_gb']:.2f} GB, "
              f"load1 {load0:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
    print(" ".join(f"harm_pipeline_fit_s_per_subject_{k}={v:.1f}" for k, v in figures.items())
          + f" shape={'x'.join(map(str, opts.shape))} n_subjects={2 * n} "
          f"workers={opts.workers}")


#: --pipeline: the fit's phases in order, each named by a file only its nodes write
#: (``fit_subjects``: the per-subject FitSubject nodes, since session 9; ``fit``
#: then is the final FitHarmonization node alone).
PHASE_FILES = (("features", "fa.nii.gz"), ("template_rounds", "template_fa.nii.gz"),
               ("registrations", "transform.json"), ("fit_subjects", "cover.npy"),
               ("fit", "artefact"),
               ("summaries_after", "fa_harmonised.nii.gz"),
               ("tables", "harmonization_site_effect.tsv"))


def fit_phases(cache: Path, started: float) -> dict:
    """Wall seconds of each phase of a ``harmonize fit`` from its cache: each
    phase ends when its last node wrote its result (``_result.pklz``); the
    final registrations are those that ended after the last template round.
    A phase whose nodes are absent (an older cache) is left out."""
    ends = {name: [] for name, _ in PHASE_FILES}
    for node in cache.iterdir():
        result = node / "_result.pklz"
        for name, marker in PHASE_FILES:
            if result.exists() and (node / marker).exists():
                ends[name].append(result.stat().st_mtime)
    out, last = {}, started
    for name, _ in PHASE_FILES:
        if ends[name]:
            end = max(ends[name])
            out[name] = end - last
            last = end
    out["registrations_n"] = len(ends["registrations"])
    return out


def child_fit(dirs: dict, root: Path, n: int) -> dict:
    args = {"ref": [str(d) for d in dirs["ref"]], "tar": [str(d) for d in dirs["tar"]],
            "shells": [1000.0, 2000.0, 3000.0], "lmax": LMAX, "out": str(root / "artefact"),
            "min_subjects": n}
    return child("fit", args)


if __name__ == "__main__":
    main()
