"""The ``dmriflow`` command (BIDS-App style).

dmriflow run INPUT OUTPUT [--layout hcp|bids|auto] [--participant-label ...]
                          [--worker cf|debug|slurm] [--n-procs N] [--cache-dir DIR]
                          [--sbatch-args=ARGS] [--gpu-sbatch-args=ARGS]
dmriflow run INPUT OUTPUT --rerun-failed
dmriflow run ... --harmonization ARTEFACT
dmriflow run ... --inference directions|3t7t [--inference-checkpoint DIR]
dmriflow run ... --image-gradient [--image-gradient-estimators B,A]
                 [--gradient-separation MS --gradient-duration MS --echo-time MS]
dmriflow harmonize fit INPUT OUTPUT --reference SITE --target SITE [--site-column COL]
dmriflow harmonize apply ARTEFACT INPUT OUTPUT
dmriflow status OUTPUT
dmriflow report OUTPUT
dmriflow simulate OUT --subjects N --layout hcp|bids --shape X Y Z --seed S
dmriflow demo OUT [--inference directions]
dmriflow train directions INPUT OUTPUT_CHECKPOINT [--epochs N] [--resume]
dmriflow train 3t7t BIDS_INPUT OUTPUT_CHECKPOINT [--epochs N] [--grid G]

Exit status of ``run``/``demo``: 0 all subjects done, 2 some subjects failed
(listed, with reasons, in OUTPUT/dmriflow/group/subjects.tsv), 1 unusable input,
3 another run holds OUTPUT or the cache. ``status``: 0 every planned subject
done, 2 some failed or missing, 1 no run found in OUTPUT.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dmriflow.interfaces import __version__
from dmriflow.interfaces.errors import InputError
from dmriflow.pipelines.steps import DEFAULT_WLS_ITERATIONS, DTI_MAX_BVAL

EXIT_OK, EXIT_INPUT, EXIT_SUBJECTS_FAILED, EXIT_BUSY = 0, 1, 2, 3
#: A command-line mistake (sysexits' EX_USAGE), apart from 2 = some subjects failed.
EXIT_USAGE = 64
#: The reader of our output went away (`dmriflow status OUT | head`): the shell's
#: code for a process ended by SIGPIPE, and no traceback.
EXIT_CLOSED_PIPE = 128 + 13
#: Demo cohort: a few small phantom subjects, two workers.
DEMO_SUBJECTS = 4
DEMO_SHAPE = (36, 44, 36)


def _default_procs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker", choices=("cf", "debug", "slurm"), default="cf",
                   help="engine worker: cf (local processes, default), debug (serial, "
                        "in-process), slurm (one SLURM job per node)")
    p.add_argument("--n-procs", type=int, default=_default_procs(),
                   help="processes for the cf worker (default: %(default)s)")
    p.add_argument("--cache-dir", help="Pydra cache root (default: OUTPUT/.dmriflow-cache); "
                                       "must be on a path every SLURM node sees")
    p.add_argument("--sbatch-args", default="", metavar="ARGS",
                   help="sbatch arguments of every job (slurm worker); write "
                        "--sbatch-args='--time=60 --mem=8G' (with '=')")
    p.add_argument("--gpu-sbatch-args", default="", metavar="ARGS",
                   help="sbatch arguments of the GPU phase's jobs (--inference), e.g. "
                        "--gpu-sbatch-args='--partition=gpu --gres=gpu:1'")
    p.add_argument("--fit-method", choices=("WLS", "OLS"), default="WLS",
                   help="tensor fit (default: %(default)s)")
    p.add_argument("--wls-iterations", type=int, default=DEFAULT_WLS_ITERATIONS, metavar="N",
                   help="WLS passes (default: %(default)s, as MRtrix3's dwi2tensor; 1: one-pass "
                        "WLS as dipy's TensorModel)")
    p.add_argument("--fix-gradients", action="store_true",
                   help="apply the gradient check's winning axis flip/permutation to the "
                        "b-vectors (recorded in every sidecar); without it a wrong table is "
                        "only flagged")
    p.add_argument("--keep-outlier-volumes", action="store_true",
                   help="fit all volumes: outlier volumes (all zero, slice dropout, "
                        "intensity outliers) are then only flagged, not excluded")
    p.add_argument("--dti-max-b", type=float, default=DTI_MAX_BVAL,
                   help="fit the tensor to b0s and shells up to this b-value "
                        "(default: %(default)g s/mm^2)")
    p.add_argument("--lmax", type=int, default=0,
                   help="maximum SH order per shell (0: as the directions allow, up to 8)")
    p.add_argument("--denoise", action="store_true",
                   help="MP-PCA denoising (raw data only: not for HCP minimally preprocessed "
                        "series)")
    p.add_argument("--degibbs", action="store_true",
                   help="Gibbs-ringing removal (raw data only)")
    p.add_argument("--drop-series", action="store_true",
                   help="delete each subject's series copies in the cache once it is done "
                        "(Validate's uncompressed DWI: 4.2 GB per HCP subject; a later run "
                        "that needs them reads the input again)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", choices=("hcp", "bids", "auto"), default="auto")
    p.add_argument("--participant-label", nargs="+", metavar="LABEL",
                   help="only these subjects (with or without 'sub-')")


def _add_image_gradient_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image gradient (docs/image_gradient.md)")
    g.add_argument("--image-gradient", action="store_true",
                   help="estimate the image gradient from the diffusion signal per subject, "
                        "with its controls; group table and figure in OUTPUT/dmriflow/group")
    g.add_argument("--image-gradient-estimators", default="B", metavar="B[,A]",
                   help="one-series estimators (default: %(default)s); C (two diffusion "
                        "times) and P (phase) are study-only")
    g.add_argument("--image-gradient-max-voxels", type=int, default=0, metavar="N",
                   help="evaluate a seeded random subset of N voxels per subject (0: all; "
                        "A costs ~25 ms per voxel and fit with 288 volumes)")
    g.add_argument("--gradient-separation", type=float, metavar="MS",
                   help="Delta (ms); overrides the sidecar's DiffusionGradientSeparation (s)")
    g.add_argument("--gradient-duration", type=float, metavar="MS",
                   help="delta (ms); overrides the sidecar's DiffusionGradientDuration (s)")
    g.add_argument("--echo-time", type=float, metavar="MS",
                   help="TE (ms, recorded); overrides the sidecar's EchoTime (s)")


def _image_gradient_timing(args) -> dict:
    """Command-line timing overrides (ms); absent options are left out."""
    given = {"Delta": getattr(args, "gradient_separation", None),
             "delta": getattr(args, "gradient_duration", None),
             "TE": getattr(args, "echo_time", None)}
    return {k: v for k, v in given.items() if v is not None}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits with EXIT_USAGE (argparse's own 2 is
    dmriflow's "some subjects failed"). Sub-commands use the same class."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dmriflow", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"dmriflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the pipeline on a cohort")
    p.add_argument("input", help="cohort folder (HCP subjects or a BIDS dataset)")
    p.add_argument("output", help="output folder; derivatives go to OUTPUT/dmriflow")
    _add_selection(p)
    p.add_argument("--harmonization", metavar="ARTEFACT",
                   help="apply a stored harmonization artefact (folder) before the fits")
    p.add_argument("--inference", metavar="KIND",
                   help="apply a trained model to every subject as its own phase: "
                        "'directions' (synthesise b=1000 directions from 30 acquired), "
                        "'3t7t' (7T-like b=1000 series of 3T data, latent diffusion on RISH); "
                        "subjects whose acquisition does not match the model card fail")
    p.add_argument("--inference-checkpoint", metavar="DIR", default="",
                   help="checkpoint folder (card.json + model.safetensors) for --inference "
                        "(default: the one shipped with dmriflow)")
    p.add_argument("--rerun-failed", action="store_true",
                   help="run only the subjects of OUTPUT's last plan that are not done "
                        "(failed, missing, or done by other code); rebuild the group table "
                        "for the whole plan")
    _add_image_gradient_options(p)
    _add_run_options(p)

    p = sub.add_parser("harmonize", help="fit or apply RISH harmonization")
    hsub = p.add_subparsers(dest="harmonize_command", required=True)
    p = hsub.add_parser("fit", help="fit an artefact mapping a target site onto a reference")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--reference", required=True, help="reference site (group) name")
    p.add_argument("--target", required=True, help="target site (group) name")
    p.add_argument("--site-column", default="protocol",
                   help="'protocol' (census protocol groups, default) or a column of "
                        "--site-table")
    p.add_argument("--site-table", help="participants-style TSV with participant_id and the "
                                        "site column (default: INPUT/participants.tsv)")
    p.add_argument("--shells", type=float, nargs="+", help="shells to harmonise (default: all "
                                                           "shells every subject has)")
    p.add_argument("--harmonization-lmax", type=int, default=None,
                   help="highest SH order harmonised (default: as the directions allow, <= 8)")
    p.add_argument("--registration", choices=("syn", "affine", "identity"), default="syn")
    p.add_argument("--smoothing-fwhm", type=float, default=0.0, help="scale-map smoothing (mm)")
    _add_selection(p)
    _add_run_options(p)
    p = hsub.add_parser("apply", help="apply an artefact to a cohort, then fit DTI and RISH")
    p.add_argument("artefact", help="artefact folder written by 'harmonize fit'")
    p.add_argument("input")
    p.add_argument("output")
    _add_selection(p)
    _add_run_options(p)

    p = sub.add_parser("status", help="done/failed/missing per subject and step, with reasons",
                       epilog="exit status: 0 every planned subject done, 2 some failed or "
                              "missing, 1 no run found in OUTPUT")
    p.add_argument("output")

    p = sub.add_parser("report", help="(re)write the cohort HTML report "
                                      "OUTPUT/dmriflow/report.html")
    p.add_argument("output")

    p = sub.add_parser("simulate", help="write a synthetic phantom cohort with ground truth")
    p.add_argument("output")
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--layout", choices=("hcp", "bids"), default="hcp")
    p.add_argument("--shape", type=int, nargs=3, default=list(DEMO_SHAPE), metavar=("X", "Y", "Z"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snr", type=float, default=None, help="b0 SNR in white matter")

    p = sub.add_parser("train", help="train a model on a cohort (writes a checkpoint folder)")
    p.add_argument("model", choices=("directions", "3t7t"),
                   help="directions: synthesise b=1000 directions from 30 acquired ones; "
                        "3t7t: 3T->7T RISH latent diffusion (BIDS input with ses-3T/ses-7T "
                        "sessions or MagneticFieldStrength sidecars)")
    p.add_argument("input", help="cohort folder (HCP or BIDS) with > 30 b=1000 directions")
    p.add_argument("checkpoint", help="output checkpoint folder (card.json + model.safetensors)")
    _add_selection(p)
    p.add_argument("--epochs", type=float, default=None,
                   help="directions: passes of training patches over the training voxels "
                        "(default 20); 3t7t: passes of each stage over its maps (default 40)")
    p.add_argument("--grid", type=int, default=32,
                   help="3t7t: model grid, a multiple of 16 (published: 96; default: "
                        "%(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the training state saved in CHECKPOINT/training")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("evaluate", help="score a shipped model and its baselines on simulated "
                                        "held-out subjects")
    p.add_argument("model", choices=("3t7t",),
                   help="3t7t: the RISH-space diffusion model vs identity, template lambda, "
                        "the equally-fed CNN, the oracle and the latent model")
    p.add_argument("--seeds", type=int, nargs="+", required=True,
                   help="one held-out pair (test degradation family) per seed")
    p.add_argument("--out", required=True,
                   help="folder for metrics.tsv, calibration.tsv, subjects.tsv, tests.tsv")

    p = sub.add_parser("demo", help="simulate the built-in cohort and run the pipeline on it")
    p.add_argument("output", nargs="?", default="demo-output")
    p.add_argument("--subjects", type=int, default=DEMO_SUBJECTS)
    p.add_argument("--inference", metavar="KIND",
                   help="also run an inference phase, e.g. 'directions' (the shipped "
                        "direction-synthesis model; about doubles the demo's time on 2 cores)")
    _add_run_options(p)
    return parser


def _config(args):
    from dmriflow.pipelines.execution import RunConfig
    return RunConfig(worker=args.worker, n_procs=args.n_procs, cache_dir=args.cache_dir,
                     sbatch_args=args.sbatch_args, gpu_sbatch_args=args.gpu_sbatch_args,
                     fit_method=args.fit_method, wls_iterations=args.wls_iterations,
                     exclude_outliers=not args.keep_outlier_volumes,
                     fix_gradients=args.fix_gradients,
                     dti_max_bval=args.dti_max_b, lmax=args.lmax, quiet=args.quiet,
                     denoise=args.denoise, degibbs=args.degibbs,
                     harmonization=getattr(args, "harmonization", None) or "",
                     rerun_failed=getattr(args, "rerun_failed", False),
                     image_gradient=getattr(args, "image_gradient", False),
                     image_gradient_estimators=getattr(args, "image_gradient_estimators", "B"),
                     image_gradient_timing=_image_gradient_timing(args),
                     image_gradient_max_voxels=getattr(args, "image_gradient_max_voxels", 0),
                     inference=getattr(args, "inference", None) or "",
                     inference_checkpoint=getattr(args, "inference_checkpoint", "") or "",
                     drop_series=getattr(args, "drop_series", False))


def _run(input_dir, output, layout, labels, args) -> int:
    from dmriflow.pipelines.execution import run_cohort
    from dmriflow.pipelines.inputs import discover
    if labels and getattr(args, "rerun_failed", False):
        raise ValueError("--rerun-failed takes the subjects from OUTPUT's plan: "
                         "do not combine it with --participant-label")
    subjects = discover(input_dir, layout=layout, participant_labels=labels)
    config = _config(args)
    if config.image_gradient:   # a missing timing is a usage error: stop before any work
        from dmriflow.interfaces.stepfiles import resolve_timing
        for s in subjects:
            resolve_timing(config.image_gradient_timing, s.sidecar, s.dwi)
    result = run_cohort(subjects, output, config)
    print(f"derivatives: {result.output_dir / 'dmriflow'}")
    print(f"summary table: {result.table}")
    print(f"report: {result.report}")
    for row in result.failed:
        print(f"FAILED {row['subject']} [{row.get('failed_step', '')}]: {row.get('error', '')}")
    for err in result.engine_errors:
        print(f"ENGINE ERROR: {err}")
    return EXIT_SUBJECTS_FAILED if result.failed or result.engine_errors else EXIT_OK


def cmd_harmonize(args) -> int:
    from dmriflow.pipelines.inputs import discover, site_labels
    if args.harmonize_command == "apply":
        args.harmonization = args.artefact
        return _run(args.input, args.output, args.layout, args.participant_label, args)
    from dmriflow.pipelines.execution import run_harmonization_fit
    subjects = discover(args.input, layout=args.layout, participant_labels=args.participant_label)
    table = args.site_table or (Path(args.input) / "participants.tsv")
    sites = site_labels(subjects, args.site_column,
                        None if args.site_column == "protocol" else table)
    try:
        result = run_harmonization_fit(subjects, args.output, _config(args), sites,
                                       args.reference, args.target, shells=args.shells,
                                       lmax=args.harmonization_lmax,
                                       registration=args.registration,
                                       smoothing_fwhm_mm=args.smoothing_fwhm)
    except RuntimeError as exc:   # the fit node failed: its error text, no traceback
        print(f"dmriflow: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    print(f"artefact: {result['artefact']}")
    print(f"site effect before/after: {result['site_effect']}")
    print(f"anatomy preservation: {result['preservation']}")
    print(f"report: {result['report']}")
    for row in result["excluded"]:
        print(f"EXCLUDED {row['subject']}: {row['error']}")
    return EXIT_SUBJECTS_FAILED if result["excluded"] else EXIT_OK


def cmd_status(args) -> int:
    """Per subject: status, per-step outcome and the reason; then per step: counts."""
    from dmriflow.pipelines.execution import STEP_WORDS, run_holder, status_table
    table = status_table(args.output)
    steps = list(table.columns[4:-1])       # per-step outcomes, then qc_flags
    counts = table["status"].value_counts().to_dict()
    flagged = int(((table["status"] == "done") & (table["qc_flags"] != "")).sum())
    print(f"{args.output}: {len(table)} planned; "
          + ", ".join(f"{counts.get(w, 0)} {w}" for w in ("done", "failed", "missing"))
          + (f" ({flagged} done with QC flags)" if flagged else ""))
    holder = run_holder(Path(args.output, "dmriflow"))
    if holder:
        print(f"a run is in progress ({holder}): missing subjects may still be running")
    width = max([len("subject")] + [len(s) for s in table["subject"]]
                + [len(s) for s in steps]) + 2
    col = {s: max(11, len(s) + 1) for s in steps}     # e.g. "image_gradient"
    print(f"{'subject':<{width}}{'status':<9}" + "".join(f"{s:<{col[s]}}" for s in steps)
          + "reason")
    for row in table.itertuples(index=False):
        reason = ""
        if row.status != "done":
            reason = (f"[{row.failed_step}] " if row.failed_step else "") + str(row.error)
        elif row.qc_flags:
            reason = f"QC: {row.qc_flags}"
        print((f"{row.subject:<{width}}{row.status:<9}"
               + "".join(f"{getattr(row, s):<{col[s]}}" for s in steps) + reason).rstrip())
    print(f"{'step':<{width}}" + "".join(f"{w:>9}" for w in STEP_WORDS))
    for step in steps:
        n = table[step].value_counts()
        print(f"{step:<{width}}" + "".join(f"{n.get(w, 0):>9}" for w in STEP_WORDS))
    return EXIT_OK if set(counts) <= {"done"} else EXIT_SUBJECTS_FAILED


def cmd_report(args) -> int:
    from dmriflow.pipelines.report import write_report
    print(f"report: {write_report(args.output)}")
    return EXIT_OK


def cmd_simulate(args) -> int:
    from dmriflow.interfaces.sim.phantom import write_cohort
    kwargs = {} if args.snr is None else {"snr": args.snr}
    labels = write_cohort(args.output, args.subjects, layout=args.layout,
                          shape=tuple(args.shape), seed=args.seed, **kwargs)
    print(f"wrote {len(labels)} {args.layout} subject(s) to {args.output}: {' '.join(labels)}")
    return EXIT_OK


def cmd_train(args) -> int:
    """Load every subject (mask as the pipeline makes it) and train on the cohort."""
    from dmriflow.models.directions import train_on_subjects
    from dmriflow.interfaces.io import read_sidecar
    from dmriflow.interfaces.stepfiles import load_subject
    from dmriflow.pipelines.inputs import discover
    if args.model == "3t7t":
        return _train_3t7t(args)
    if args.epochs is None:
        args.epochs = 20.0
    subjects = discover(args.input, layout=args.layout, participant_labels=args.participant_label)
    fields = {read_sidecar(s.sidecar).get("MagneticFieldStrength") for s in subjects}
    field = fields.pop() if len(fields) == 1 else None
    loaded = ((s.key, load_subject(s.dwi, s.bval, s.bvec, s.mask)) for s in subjects)
    card = train_on_subjects(loaded, args.checkpoint, epochs=args.epochs, resume=args.resume,
                             seed=args.seed, field_strength=field)
    print(f"checkpoint: {Path(args.checkpoint).resolve()} ({card.name} {card.version}, "
          f"trained on {len(card.training['subjects'])} subject(s))")
    return EXIT_OK


def _train_3t7t(args) -> int:
    """Pair the 3T and 7T sessions of a BIDS dataset and train the latent diffusion model."""
    from dmriflow.interfaces.io import read_sidecar
    from dmriflow.interfaces.stepfiles import load_subject
    from dmriflow.models.ldm import cohort
    from dmriflow.pipelines.inputs import discover
    if args.resume:
        raise ValueError("--resume is not supported for 3t7t (its stages train in minutes)")
    subjects = discover(args.input, layout="bids", participant_labels=args.participant_label)
    sessions = [(s.label, cohort.session_field(read_sidecar(s.sidecar), s.session), s, s.dwi)
                for s in subjects]
    card = cohort.train_on_sessions(
        sessions, args.checkpoint, lambda s: load_subject(s.dwi, s.bval, s.bvec, s.mask),
        epochs=cohort.DEFAULT_EPOCHS if args.epochs is None else args.epochs, grid=args.grid,
        seed=args.seed, source=str(Path(args.input).resolve()))
    print(f"checkpoint: {Path(args.checkpoint).resolve()} ({card.name} {card.version}, "
          f"{card.training['n_pairs']} pair(s), {card.training['n_3t_only']} 3T-only)")
    return EXIT_OK


def cmd_evaluate(args) -> int:
    """Simulate held-out pairs at the seeds, apply the shipped checkpoints and the
    baselines, write the tables (:func:`dmriflow.models.experiments.ldm_study.evaluate`)."""
    from dmriflow.models.experiments import ldm_study as study
    from dmriflow.models.train import torch_threads
    with torch_threads(1):
        res = study.evaluate(args.seeds, args.out, log=print)
    print(res["metrics"][["method", "map", "nmse", "ssim", "skill"]].to_string(index=False))
    print(f"tables: {Path(args.out).resolve()} ({res['seconds']:.0f} s)")
    return EXIT_OK


def cmd_demo(args) -> int:
    from dmriflow.interfaces.sim.phantom import write_cohort
    out = Path(args.output)
    cohort = out / "input"
    if not cohort.is_dir():
        write_cohort(cohort, args.subjects, layout="hcp", shape=DEMO_SHAPE, seed=0)
    status = _run(cohort, out, "hcp", None, args)
    print(f"ground truth: {cohort / 'derivatives' / 'truth'}")
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except BrokenPipeError:
        # stdout's reader is gone: point stdout at /dev/null so the interpreter's
        # final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CLOSED_PIPE


def _dispatch(args) -> int:
    try:
        if args.command == "run":
            return _run(args.input, args.output, args.layout, args.participant_label, args)
        return {"status": cmd_status, "simulate": cmd_simulate, "demo": cmd_demo,
                "harmonize": cmd_harmonize, "report": cmd_report,
                "train": cmd_train, "evaluate": cmd_evaluate}[args.command](args)
    except (InputError, FileNotFoundError, ValueError) as exc:
        print(f"dmriflow: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except RuntimeError as exc:
        from dmriflow.pipelines.execution import RunInProgress
        if not isinstance(exc, RunInProgress):
            raise
        print(f"dmriflow: error: {exc}", file=sys.stderr)
        return EXIT_BUSY


if __name__ == "__main__":
    sys.exit(main())
