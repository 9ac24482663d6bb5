"""The ``dmriflow`` command (BIDS-App style).

dmriflow INPUT OUTPUT participant [--participant-label 01 sub-02 ...] [--session-label S]
                                 [--bids-filter-file FILE] [-w DIR] [--nprocs N]
                                 [--omp-nthreads N] [--mem GB] [-v] [--config FILE]
dmriflow INPUT OUTPUT participant --slurm-array [MAX_RUNNING] [--sbatch-args=ARGS] [...]:
                                 one SLURM array task per unit, then a group job
dmriflow INPUT OUTPUT group [same options]: table, census and report of what is done
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

Exit status of ``participant``/``group``/``run``/``demo``: 0 all subjects done, 2 some
subjects failed (listed, with reasons, in OUTPUT/dmriflow/group/subjects.tsv), 1 unusable
input, 3 another run holds OUTPUT or the cache, or another job the same subject, 64 a
usage error. ``status``: 0 every planned subject
done, 2 some failed or missing, 1 no run found in OUTPUT.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import tomllib
from dataclasses import replace
from functools import partial
from pathlib import Path

import nibabel as nib

from dmriflow.interfaces import __version__, io
from dmriflow.interfaces.errors import InputError, UsageError
from dmriflow.interfaces.io import read_sidecar
from dmriflow.interfaces.stepfiles import load_subject
from dmriflow.interfaces.steps import COHORT_REGISTRY, REGISTRY, fit_reads
from dmriflow.interfaces.steps.base import ALL_COMMANDS, flag_of, option_type, options_of
from dmriflow.interfaces.steps.image_gradient import resolve_timing
from dmriflow.pipelines.derivatives import recorded_frame, write_subjects_table
from dmriflow.pipelines.execution import (STEP_WORDS, EngineOptions, RunConfig, RunInProgress,
                                          cohort_files, collect_status, read_plan,
                                          run_cohort, run_harmonization_fit, run_holder,
                                          status_table)
from dmriflow.pipelines.image_gradient import group_from_status
from dmriflow.pipelines.methods import FIT_COMMAND
from dmriflow.pipelines.inputs import census, discover, read_filter_file, site_labels
from dmriflow.pipelines.progress import terminal_path, terminal_text
from dmriflow.pipelines.workflows import rows_only

EXIT_OK, EXIT_INPUT, EXIT_SUBJECTS_FAILED, EXIT_BUSY = 0, 1, 2, 3
#: A command-line mistake (sysexits' EX_USAGE), apart from 2 = some subjects failed.
EXIT_USAGE = 64
#: The reader of our output went away (`dmriflow status OUT | head`): the shell's
#: code for a process ended by SIGPIPE, and no traceback.
EXIT_CLOSED_PIPE = 128 + 13
#: BIDS-App analysis levels: ``dmriflow INPUT OUTPUT participant|group``.
LEVELS = ("participant", "group")
#: The verbs of the command line (a BIDS-App INPUT never shadows one of them).
VERBS = ("run", "participant", "group", "harmonize", "status", "report", "simulate",
         "train", "evaluate", "demo")
#: A subject's peak memory as a multiple of its series held as float32, by
#: what the run does with the series. Fits only (Validate keeps mask rows,
#: :func:`~dmriflow.pipelines.workflows.rows_only`): the largest measured on an
#: HCP-size subject, bench/memory.py's DTI on the whole series (1.11x in 2026-11,
#: 1.01x on 2026-12-05; bench/cohort.py --hcp's largest worker 1.02x, bench/e2e.py
#: 0.37x from .nii.gz). A series step (preprocessing, harmonization) or a step
#: reading the whole grid holds a second series-sized copy beside the first: 2x.
PEAK_PER_SERIES = {"fits": 1.11, "copy": 2.0}
FLOAT32_BYTES = 4
BYTES_PER_GB = 1e9
#: Thread-count variables the workers' numpy/BLAS/torch read (``--omp-nthreads``).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: Demo cohort: a few small phantom subjects, two workers.
DEMO_SUBJECTS = 4
DEMO_SHAPE = (36, 44, 36)
DEMO_VOXEL_MM = 2.5
#: The demo's subjects are brains (MNI152 2009 tissue maps, nilearn's package data).
DEMO_ANATOMY = "brain"


#: Section of the engine options in a config file (the steps' sections are their names).
ENGINE_SECTION = "engine"


def option_sources() -> list[tuple[str, type, tuple]]:
    """(config section, Options class, default commands) of every declared option:
    the engine's, then each registered step's, then each cohort step's."""
    steps = (*REGISTRY.items(), *COHORT_REGISTRY.items())
    return [(ENGINE_SECTION, EngineOptions, ALL_COMMANDS)] + [
        (name, step.Options, step.commands) for name, step in steps]


def _add_generated_options(p: argparse.ArgumentParser, *commands: str) -> None:
    """The options of the engine and of every step shown by one of ``commands``
    (e.g. "harmonize", "harmonize fit"), one argument group per step,
    generated from their Options declarations."""
    for section, cls, shown_by in option_sources():
        if FIT_COMMAND in commands and section in REGISTRY and not fit_reads(section):
            continue                    # a step the fit does not go through
        group = p.add_argument_group(f"{section} options")
        for f, info in options_of(cls):
            if not info.cli or not set(commands) & set(info.commands or shown_by):
                continue
            kwargs = {"dest": f.name, "help": info.help}
            if option_type(f) is bool:
                kwargs.update(action="store_false" if info.invert else "store_true",
                              default=f.default)
            else:
                default = info.cli_default() if info.cli_default else f.default
                kwargs.update(type=option_type(f), default=default, metavar=info.metavar,
                              required=info.required, nargs=info.nargs)
                if info.choices:
                    kwargs["choices"] = info.choices
            group.add_argument(flag_of(f, info), *info.aliases, **kwargs)
    p.set_defaults(options_parser=p)    # where --config finds the defaults
    p.add_argument("--config", metavar="FILE",
                   help="options from a TOML or JSON file: a table per step (or 'engine') "
                        "with its options, e.g. [tensor] fit_method = \"OLS\"; keys "
                        "'step.option' also work; flags on the command line win")


def read_config(path) -> dict:
    """``{option name: value}`` of a config file (TOML or JSON), checked against
    the declarations: every key must be ``section.option`` of a declared option."""
    raw = Path(path).read_bytes()
    doc = tomllib.loads(raw.decode()) if str(path).endswith(".toml") else json.loads(raw)
    flat = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    known = {f"{section}.{f.name}": f.name for section, cls, _ in option_sources()
             for f, _ in options_of(cls)}
    unknown = sorted(k for k in flat if k not in known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; known: {sorted(known)}")
    return {known[k]: v for k, v in flat.items()}


def _apply_config(args) -> None:
    """Fill the options not given on the command line from ``--config``."""
    path = getattr(args, "config", None)
    if not path:
        return
    parser = args.options_parser
    for name, value in read_config(path).items():
        if not hasattr(args, name):
            raise ValueError(f"{path}: option {name!r} does not apply to "
                             f"'dmriflow {args.command}'")
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", choices=("hcp", "bids", "auto"), default="auto")
    p.add_argument("--participant-label", nargs="+", metavar="LABEL",
                   help="only these subjects (with or without 'sub-')")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits with EXIT_USAGE (argparse's own 2 is
    dmriflow's "some subjects failed"). Sub-commands use the same class."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dmriflow", description=__doc__.split("\n")[0],
                     epilog="BIDS-App form: dmriflow INPUT OUTPUT participant|group [options] "
                            "(the same as dmriflow participant|group INPUT OUTPUT [options])")
    parser.add_argument("--version", action="version", version=f"dmriflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    cohort_commands = {
        "run": "run the pipeline on a cohort",
        "participant": "run the per-subject steps for the selected subjects (BIDS-App "
                       "form: dmriflow INPUT OUTPUT participant; the same as 'run')",
        "group": "aggregate what is done (group table, census, report) without computing "
                 "any subject (dmriflow INPUT OUTPUT group)"}
    for name, text in cohort_commands.items():   # one command line for both levels
        p = sub.add_parser(name, help=text)
        p.add_argument("input", help="cohort folder (HCP subjects or a BIDS dataset)")
        p.add_argument("output", help="output folder; derivatives go to OUTPUT/dmriflow")
        _add_selection(p)
        if name == "participant":
            p.add_argument("--slurm-array", nargs="?", const=0, type=int, default=None,
                           metavar="MAX_RUNNING",
                           help="submit one SLURM job per selected unit (a job array, each "
                                "task running this command on its unit with the cf worker) "
                                "and a group job after them (--dependency=afterany), print "
                                "their ids and return; MAX_RUNNING: at most so many tasks at "
                                "once; --sbatch-args go to both jobs")
        _add_generated_options(p, "run")

    p = sub.add_parser("harmonize", help="fit or apply RISH harmonization")
    hsub = p.add_subparsers(dest="harmonize_command", required=True)
    p = hsub.add_parser("fit", help="fit an artefact mapping a target site onto a reference")
    p.add_argument("input")
    p.add_argument("output")
    _add_selection(p)
    _add_generated_options(p, "harmonize", FIT_COMMAND)
    p = hsub.add_parser("apply", help="apply an artefact to a cohort, then fit DTI and RISH")
    p.add_argument("artefact", help="artefact folder written by 'harmonize fit'")
    p.add_argument("input")
    p.add_argument("output")
    _add_selection(p)
    _add_generated_options(p, "harmonize")

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
    p.add_argument("--anatomy", choices=("geometric", "brain"), default="geometric",
                   help="geometric head (default) or a brain from the MNI152 2009 template")

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
                   help="folder for the tables: metrics.tsv (mean over subjects), "
                        "calibration.tsv (interval coverage), subjects.tsv (per subject), "
                        "paired_tests.tsv (shipped vs each baseline), "
                        "spread_error_spearman.tsv (predicted spread vs error), "
                        "flags.tsv (per subject: SNR, inputs outside the card's ranges)")

    p = sub.add_parser("demo", help="simulate the built-in cohort and run the pipeline on it")
    p.add_argument("output", nargs="?", default="demo-output")
    p.add_argument("--subjects", type=int, default=DEMO_SUBJECTS)
    _add_generated_options(p, "demo")
    return parser


def _config(args):
    """The RunConfig of the parsed options (those a command does not show keep
    their defaults)."""
    given = {f.name: getattr(args, f.name) for _, cls, _ in option_sources()
             for f, _ in options_of(cls) if hasattr(args, f.name)}
    return RunConfig(**given)


def _discover(input_dir, layout, labels, args):
    """The units of INPUT selected by the labels, ``--session-label`` and
    ``--bids-filter-file`` (when the command has them)."""
    path = getattr(args, "bids_filter_file", None)
    return discover(input_dir, layout=layout, participant_labels=labels,
                    session_labels=getattr(args, "session_label", None),
                    bids_filter=read_filter_file(path) if path else None)


def _timing_problems(subjects, config):
    """Units whose image-gradient timing cannot be read get it as their
    ``problem`` (they fail alone); when no unit has it, it is a usage mistake:
    the first unit's InputError stops before any work."""
    timing = config.steps["image_gradient"].timing
    checked, errors = [], []
    for s in subjects:
        try:
            resolve_timing(timing, s.sidecar, s.dwi)
            checked.append(s)
        except InputError as exc:
            errors.append(exc)
            checked.append(replace(s, problem=s.problem or str(exc)))
    if errors and len(errors) == len(subjects):
        raise errors[0]
    return checked


def series_gb(dwi) -> float:
    """A series' size as float32 in GB, from its header (0 when unreadable:
    the subject fails in its own node)."""
    try:
        shape = nib.load(dwi).header.get_data_shape()
    except Exception:  # noqa: BLE001 - a broken file is reported by Validate
        return 0.0
    return math.prod(shape) * FLOAT32_BYTES / BYTES_PER_GB


def peak_per_series(options: dict) -> float:
    """``PEAK_PER_SERIES`` for a run with these step options (``{step: options}``)."""
    return PEAK_PER_SERIES["fits" if rows_only(options) else "copy"]


def processes_for_memory(subjects, n_procs: int, mem_gb: float,
                         per_series: float = PEAK_PER_SERIES["copy"]) -> tuple[int, float]:
    """(processes, estimated peak GB of the largest subject): at most ``n_procs``,
    and few enough that that many of the largest subjects fit in ``mem_gb``;
    a subject's peak is ``per_series`` x its float32 series (:func:`peak_per_series`)."""
    peak = per_series * max((series_gb(s.dwi) for s in subjects), default=0.0)
    fit = int(mem_gb // peak) if peak > 0 else n_procs
    return max(1, min(n_procs, fit)), peak


def _apply_resources(subjects, config) -> None:
    """``--omp-nthreads`` (environment the workers inherit) and ``--mem`` (fewer processes)."""
    if config.omp_nthreads:
        for name in THREAD_VARIABLES:
            os.environ[name] = str(config.omp_nthreads)
    if config.mem:
        per_series = peak_per_series(config.options_record())
        n, peak = processes_for_memory(subjects, config.n_procs, config.mem, per_series)
        if n < config.n_procs or config.verbose:
            print(f"--mem {config.mem:g} GB: {n} process(es) (largest subject's estimated "
                  f"peak {peak:.2f} GB = {per_series:g}x its float32 series)")
        if peak > config.mem:
            print(f"warning: the largest subject's estimated peak ({peak:.2f} GB) exceeds "
                  f"--mem {config.mem:g} GB; running one process", file=sys.stderr)
        config.engine.n_procs = n


def _run(input_dir, output, layout, labels, args) -> int:
    if labels and getattr(args, "rerun_failed", False):
        raise ValueError("--rerun-failed takes the subjects from OUTPUT's plan: "
                         "do not combine it with --participant-label")
    subjects = _discover(input_dir, layout, labels, args)
    config = _config(args)
    if config.image_gradient:   # timing unreadable for every unit: a usage mistake
        subjects = _timing_problems(subjects, config)
    if config.verbose:
        logging.basicConfig(level=logging.INFO)
        for s in subjects:
            print(f"unit {s.key}: {s.dwi}" + (f" (fails: {s.problem})" if s.problem else ""))
    _apply_resources(subjects, config)
    result = run_cohort(subjects, output, config)
    shown = partial(terminal_path, output_dir=result.output_dir)
    print(f"derivatives: {shown(result.output_dir / 'dmriflow')}")
    print(f"summary table: {shown(result.table) if result.table else 'not written'}")
    left = ("left to the group level (this job ran some of the planned subjects): "
            "dmriflow INPUT OUTPUT group")
    print(f"report: {shown(result.report) if result.report else left}")
    for row in result.failed:
        print(f"FAILED {row['subject']} [{row.get('failed_step', '')}]: "
              + terminal_text(str(row.get('error', '')), result.output_dir))
    for err in result.engine_errors:
        print(f"ENGINE ERROR: {terminal_text(err, result.output_dir)}")
    return EXIT_SUBJECTS_FAILED if result.failed or result.engine_errors else EXIT_OK


def cmd_group(args) -> int:
    """The group level: census, group table, image-gradient tests and report over
    every unit that is selected in INPUT or planned in OUTPUT, from their status
    files; no subject is computed and the table never shrinks to the last subset."""
    from dmriflow.pipelines.report import write_report  # lazy: keeps `dmriflow --help` fast
    output = Path(args.output).resolve()
    units = {s.key: s for s in _discover(args.input, args.layout, args.participant_label, args)}
    try:
        planned = read_plan(output)
    except FileNotFoundError:
        planned = []
    found = list(units.values())
    rows_for = found + [p for p in planned if p.key not in units]
    with cohort_files(output):      # participant jobs may go on meanwhile
        rows = collect_status(output, sorted(rows_for, key=lambda u: u.key))
        cen = recorded_frame(census(found), output)
        io.write_text(cen.to_csv(sep="\t", index=False, na_rep="n/a"),
                      output / "dmriflow" / "group" / "census.tsv")
        table = write_subjects_table(rows, output)
        statistics = group_from_status(rows, output)   # None without image-gradient results
        report = write_report(output)
    done = sum(r.get("status") == "done" for r in rows)
    shown = partial(terminal_path, output_dir=output)
    print(f"summary table: {shown(table)} ({done} of {len(rows)} done)")
    if statistics:
        print(f"image-gradient tests: {shown(statistics['table'])} "
              f"({statistics['n_subjects']} subject(s))")
    print(f"report: {shown(report)}")
    for row in rows:
        if row.get("status") != "done":
            print(f"NOT DONE {row['subject']} ({row.get('status')}"
                  + (f" [{row['failed_step']}]" if row.get("failed_step") else "")
                  + f"): {terminal_text(str(row.get('error', '')), output)}")
    return EXIT_OK if done == len(rows) else EXIT_SUBJECTS_FAILED


def cmd_submit(args) -> int:
    """``participant --slurm-array``: the selected units as a SLURM job array and a
    group job after it (:mod:`dmriflow.pipelines.submit`)."""
    from dmriflow.pipelines.submit import SubmitError, submit_array  # lazy: this flag only
    if args.rerun_failed:
        raise ValueError("--slurm-array submits one job per selected unit: select them with "
                         "--participant-label instead of --rerun-failed")
    if args.worker == "slurm":
        raise ValueError("--slurm-array runs each unit in its own SLURM job with the cf "
                         "worker: do not combine it with --worker slurm")
    if args.slurm_array < 0:
        raise ValueError("--slurm-array MAX_RUNNING must be >= 0")
    units = _discover(args.input, args.layout, args.participant_label, args)
    options = list(args.argv[1:])              # past the level; INPUT and OUTPUT out
    for positional in (args.input, args.output):
        options.remove(positional)
    try:
        sub = submit_array(units, args.input, args.output, options, args.sbatch_args,
                           args.slurm_array)
    except SubmitError as exc:
        print(f"dmriflow: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    print(f"array job: {sub.array_id} ({len(sub.units)} task(s): {' '.join(sub.units)})")
    print(f"group job: {sub.group_id} (--dependency=afterany:{sub.array_id})")
    return EXIT_OK


def cmd_harmonize(args) -> int:
    if args.harmonize_command == "apply":
        args.harmonization = args.artefact
        return _run(args.input, args.output, args.layout, args.participant_label, args)
    subjects = _discover(args.input, args.layout, args.participant_label, args)
    config = _config(args)
    _apply_resources(subjects, config)
    fit = config.cohort["harmonization_fit"]
    table = fit.site_table or (Path(args.input) / "participants.tsv")
    sites = site_labels(subjects, fit.site_column,
                        None if fit.site_column == "protocol" else table)
    try:
        result = run_harmonization_fit(subjects, args.output, config, sites,
                                       fit.reference, fit.target, shells=fit.shells,
                                       lmax=fit.harmonization_lmax,
                                       registration=fit.registration,
                                       smoothing_fwhm_mm=fit.smoothing_fwhm,
                                       contrast=fit.registration_contrast,
                                       match_resolution=fit.match_resolution)
    except RuntimeError as exc:   # the fit node failed: its error text, no traceback
        print(f"dmriflow: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    shown = partial(terminal_path, output_dir=args.output)
    print(f"artefact: {shown(result['artefact'])}")
    print(f"site effect before/after: {shown(result['site_effect'])}")
    print(f"anatomy preservation: {shown(result['preservation'])}")
    print(f"report: {shown(result['report'])}")
    for row in result["excluded"]:
        print(f"EXCLUDED {row['subject']}: {row['error']}")
    for row in result["not_evaluated"]:
        print(f"NOT EVALUATED {row['subject']} (in the fit, not in the evaluation tables): "
              f"{row['error']}")
    return EXIT_SUBJECTS_FAILED if result["excluded"] or result["not_evaluated"] else EXIT_OK


def cmd_status(args) -> int:
    """Per subject: status, per-step outcome and the reason; then per step: counts."""
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
    from dmriflow.pipelines.report import write_report  # lazy: keeps `dmriflow --help` fast
    print(f"report: {terminal_path(write_report(args.output), args.output)}")
    return EXIT_OK


def cmd_simulate(args) -> int:
    from dmriflow.interfaces.sim.phantom import write_cohort  # lazy: CLI start-up
    kwargs = {} if args.snr is None else {"snr": args.snr}
    labels = write_cohort(args.output, args.subjects, layout=args.layout,
                          shape=tuple(args.shape), seed=args.seed, anatomy=args.anatomy,
                          **kwargs)
    print(f"wrote {len(labels)} {args.layout} subject(s) to {args.output}: {' '.join(labels)}")
    return EXIT_OK


def cmd_train(args) -> int:
    """Load every subject (mask as the pipeline makes it) and train on the cohort."""
    from dmriflow.models.directions import train_on_subjects  # torch: train/evaluate only
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
    print(f"checkpoint: {terminal_path(args.checkpoint)} ({card.name} {card.version}, "
          f"trained on {len(card.training['subjects'])} subject(s))")
    return EXIT_OK


def _train_3t7t(args) -> int:
    """Pair the 3T and 7T sessions of a BIDS dataset and train the latent diffusion model."""
    from dmriflow.models.ldm import cohort  # torch and MONAI: this command only
    if args.resume:
        raise ValueError("--resume is not supported for 3t7t (its stages train in minutes)")
    subjects = discover(args.input, layout="bids", participant_labels=args.participant_label)
    sessions = [(s.label, cohort.session_field(read_sidecar(s.sidecar), s.session), s, s.dwi)
                for s in subjects]
    card = cohort.train_on_sessions(
        sessions, args.checkpoint, lambda s: load_subject(s.dwi, s.bval, s.bvec, s.mask),
        epochs=cohort.DEFAULT_EPOCHS if args.epochs is None else args.epochs, grid=args.grid,
        seed=args.seed, source=str(Path(args.input).resolve()))
    print(f"checkpoint: {terminal_path(args.checkpoint)} ({card.name} {card.version}, "
          f"{card.training['n_pairs']} pair(s), {card.training['n_3t_only']} 3T-only)")
    return EXIT_OK


def cmd_evaluate(args) -> int:
    """Simulate held-out pairs at the seeds, apply the shipped checkpoints and the
    baselines, write the tables (:func:`dmriflow.models.experiments.ldm_study.evaluate`)."""
    # torch and MONAI (seconds): this command only
    from dmriflow.models.experiments import ldm_study as study
    from dmriflow.models.train import torch_threads
    with torch_threads(1):
        res = study.evaluate(args.seeds, args.out, log=print)
    print(res["metrics"][["method", "map", "nmse", "ssim", "skill"]].to_string(index=False))
    print(f"tables: {terminal_path(args.out)} ({res['seconds']:.0f} s)")
    return EXIT_OK


def cmd_demo(args) -> int:
    from dmriflow.interfaces.sim.phantom import write_cohort  # lazy: CLI start-up
    out = Path(args.output)
    cohort = out / "input"
    if not cohort.is_dir():
        write_cohort(cohort, args.subjects, layout="hcp", shape=DEMO_SHAPE, seed=0,
                     voxel_size=DEMO_VOXEL_MM, anatomy=DEMO_ANATOMY)
    status = _run(cohort, out, "hcp", None, args)
    print(f"ground truth: {terminal_path(cohort / 'derivatives' / 'truth', out)}")
    return status


def bids_app_argv(argv: list[str]) -> list[str]:
    """``INPUT OUTPUT participant|group ...`` -> ``participant|group INPUT OUTPUT ...``
    (the BIDS-App order); any other command line (``run ...``, ``status ...``) is
    returned unchanged."""
    if len(argv) >= 3 and argv[2] in LEVELS and not argv[0].startswith("-") \
            and argv[0] not in VERBS:
        return [argv[2], argv[0], argv[1], *argv[3:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    """The ``dmriflow`` command; ``argv=None``: the process's own command line,
    and the process ends after this returns (see :func:`before_exit`)."""
    whole_process = argv is None
    argv = bids_app_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return _dispatch(args)
    except BrokenPipeError:
        # stdout's reader is gone: point stdout at /dev/null so the interpreter's
        # final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CLOSED_PIPE
    finally:
        if whole_process:
            before_exit()


def before_exit() -> None:
    """Spare the interpreter's shutdown its garbage collections over every object
    of the imported libraries (numpy, pandas, scipy, Pydra, nibabel: 0.3-0.4 s
    of every command on 2 cores) by freezing them, when the process is about to
    end. Only the cyclic collector skips frozen objects: files are closed, atexit
    handlers run and stdout and stderr are flushed as before; what a reference
    cycle holds is left to the operating system, as the process ends."""
    gc.freeze()


def _dispatch(args) -> int:
    try:
        _apply_config(args)
        if args.command == "participant" and args.slurm_array is not None:
            return cmd_submit(args)
        if args.command in ("run", "participant"):
            return _run(args.input, args.output, args.layout, args.participant_label, args)
        return {"status": cmd_status, "simulate": cmd_simulate, "demo": cmd_demo,
                "harmonize": cmd_harmonize, "report": cmd_report, "group": cmd_group,
                "train": cmd_train, "evaluate": cmd_evaluate}[args.command](args)
    except UsageError as exc:
        print(f"dmriflow: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        raise
    except (InputError, OSError, ValueError) as exc:   # OSError: e.g. OUTPUT's disk is full
        print(f"dmriflow: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except RuntimeError as exc:
        if not isinstance(exc, RunInProgress):
            raise
        print(f"dmriflow: error: {exc}", file=sys.stderr)
        return EXIT_BUSY


if __name__ == "__main__":
    sys.exit(main())
