"""``dmriflow INPUT OUTPUT participant --slurm-array``: one SLURM job per unit.

The selected units (subject, or subject and session; the several series of one
share its task) become the tasks of one
SLURM job array; task ``i`` runs ``dmriflow INPUT OUTPUT participant
--participant-label L [--session-label S] <the other options>`` for unit
``i`` with the local ``cf`` worker (one SLURM allocation per unit, no
long-lived submitter), and a group job, submitted with
``--dependency=afterany:<array id>``, runs ``dmriflow INPUT OUTPUT group``
once every task has ended, whatever its outcome. The participant jobs share
OUTPUT and the cache (each holds its unit's lock, see
:mod:`dmriflow.pipelines.locks`). The job scripts live in SLURM's spool only:
nothing is written under OUTPUT before the jobs run.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: Options of the submitting command line that do not go on to the jobs (the
#: unit selection is given per task; the submission's own flags).
NOT_FORWARDED = ("--slurm-array", "--sbatch-args", "--participant-label", "--session-label")
#: How the jobs call dmriflow: this interpreter and its installed package.
DMRIFLOW = (sys.executable, "-m", "dmriflow.pipelines.cli")
#: Job names (``squeue``, ``sacct``).
ARRAY_NAME, GROUP_NAME = "dmriflow-participant", "dmriflow-group"
SBATCH_TIMEOUT_S = 120


class SubmitError(RuntimeError):
    """sbatch is missing or refused a job."""


@dataclass
class Submitted:
    array_id: str
    group_id: str
    units: list[str]


def forwarded(argv: list[str]) -> list[str]:
    """The options of ``participant INPUT OUTPUT <options>`` that every job gets:
    all but the unit selection and the submission's own flags."""
    return _split(argv)[0]


def selection(argv: list[str]) -> list[str]:
    """The unit selection of the submitting command line (``--participant-label``,
    ``--session-label`` with their values), for the group job."""
    return _split(argv)[1]


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(options forwarded to every job, unit selection) of a command line."""
    kept, chosen, taking = [], [], None
    for token in argv:
        name = token.split("=", 1)[0]
        if name in NOT_FORWARDED:
            taking = None if "=" in token else name
            if name in ("--participant-label", "--session-label"):
                chosen.append(token)
            continue
        if taking == "--slurm-array":          # its optional value: a number
            taking = None
            if token.isdigit():
                continue
        elif taking and not token.startswith("-"):
            if taking != "--sbatch-args":
                chosen.append(token)
            else:
                taking = None                  # one value only
            continue
        taking = None
        kept.append(token)
    return kept, chosen


def _has_nprocs(options: list[str]) -> bool:
    return any(o.split("=", 1)[0] in ("--nprocs", "--n-procs") for o in options)


def unit_args(unit) -> str:
    """``--participant-label L [--session-label S]`` of one unit (BIDS labels are
    alphanumeric, so the words need no quoting)."""
    return f"--participant-label {unit.label}" + (
        f" --session-label {unit.session}" if unit.session else "")


def task_args(units: list) -> list[str]:
    """The selection of each array task: one per subject/session, so the several
    series of one (runs, directions; units of their own) go to one task, which
    runs them all; two tasks never select the same unit."""
    return list(dict.fromkeys(unit_args(u) for u in units))


def _command(input_dir: Path, output_dir: Path, level: str, options: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in (*DMRIFLOW, str(input_dir), str(output_dir),
                                             level, *options))


def array_script(input_dir: Path, output_dir: Path, units: list, options: list[str]) -> str:
    """The array job: task ``$SLURM_ARRAY_TASK_ID`` runs the participant level on
    its unit (with the task's CPUs as processes unless --nprocs is given); its
    exit status is the participant run's."""
    table = "\n".join(f"    {shlex.quote(a)}" for a in task_args(units))
    nprocs = "" if _has_nprocs(options) else ' --nprocs "${SLURM_CPUS_PER_TASK:-1}"'
    return ("#!/bin/bash\n"
            "# dmriflow participant level, one array task per unit\n"
            f"UNITS=(\n{table}\n)\n"
            'echo "dmriflow: task $SLURM_ARRAY_TASK_ID: ${UNITS[$SLURM_ARRAY_TASK_ID]}"\n'
            f"exec {_command(input_dir, output_dir, 'participant', options)}{nprocs} "
            "${UNITS[$SLURM_ARRAY_TASK_ID]}\n")


def group_script(input_dir: Path, output_dir: Path, options: list[str]) -> str:
    """The group job: census, table and report of every unit that is done."""
    return ("#!/bin/bash\n"
            "# dmriflow group level, after every participant task ended\n"
            f"exec {_command(input_dir, output_dir, 'group', options)}\n")


def sbatch(args: list[str], script: str) -> str:
    """Submit ``script`` (on stdin) with ``sbatch --parsable``; the job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise SubmitError("sbatch not found: --slurm-array needs SLURM's client commands "
                          "(sbatch) on this machine")
    proc = subprocess.run([exe, "--parsable", *args], input=script, capture_output=True,
                          text=True, timeout=SBATCH_TIMEOUT_S)
    if proc.returncode:
        raise SubmitError(f"sbatch {' '.join(args)} failed (exit {proc.returncode}): "
                          f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def submit_array(units: list, input_dir, output_dir, argv: list[str], sbatch_args: str = "",
                 max_running: int = 0) -> Submitted:
    """Submit the participant array (one task per unit) and the group job after it.

    ``argv``: the options of the submitting ``participant`` command line (they
    go on to every job, but the unit selection and the submission flags);
    ``sbatch_args``: sbatch options of both jobs (``--time``, ``--mem``,
    ``--partition``, ...); ``max_running``: at most so many tasks at once (0:
    no limit)."""
    if not units:
        raise SubmitError("no units selected: nothing to submit")
    input_dir, output_dir = Path(input_dir).resolve(), Path(output_dir).resolve()
    options, chosen = _split(argv)
    extra = shlex.split(sbatch_args)
    span = f"0-{len(task_args(units)) - 1}" + (f"%{max_running}" if max_running else "")
    array_id = sbatch([f"--array={span}", f"--job-name={ARRAY_NAME}", *extra],
                      array_script(input_dir, output_dir, units, options))
    try:
        group_id = sbatch([f"--dependency=afterany:{array_id}", f"--job-name={GROUP_NAME}",
                           *extra], group_script(input_dir, output_dir, options + chosen))
    except SubmitError as exc:
        raise SubmitError(f"array job {array_id} was submitted, the group job not: {exc}; "
                          f"run 'dmriflow {input_dir} {output_dir} group' once it ended") \
            from None
    return Submitted(array_id, group_id, [u.key for u in units])
