"""The one place that talks to the Pydra engine.

Worker choice (always explicit), cache root, the pipeline-version input,
clean-up of failed nodes before a rerun, failure isolation, progress and the
cohort-level status files. A job holds the lock of each unit it computes and
shares OUTPUT and the cache with jobs of other units; what a killed run left
behind (engine lock files, temporary files, failed nodes) is cleared by a job
alone on the folder, or, for its own units, by any job (see
:mod:`dmriflow.pipelines.locks`). ``harmonize fit`` holds both folders alone.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from io import StringIO
from pathlib import Path

import cloudpickle  # what Pydra pickles results with
import pandas as pd

from dmriflow.interfaces import __version__, io
from dmriflow.interfaces.bids_names import parse_entities
from dmriflow.interfaces.environment import environment
from dmriflow.interfaces.errors import InputError, check_choice
from dmriflow.interfaces.harmonize import MIN_SUBJECTS_PER_SITE, SubjectTerms
from dmriflow.interfaces.harmonize_choices import RESOLUTION_MATCH_OFF, resolution_match_rule
from dmriflow.interfaces.steps import (COHORT_REGISTRY, REGISTRY, default_options,
                                       option_owner)
from dmriflow.interfaces.steps.base import field_default, option
from dmriflow.pipelines.census_cache import cached_row_of
from dmriflow.pipelines.derivatives import (derivative_file, failed_row, plan_entry,
                                            recorded_frame, retire_export, source_uri,
                                            status_path,
                                            write_dataset_description, write_status,
                                            write_subjects_table)
from dmriflow.pipelines.engine import ERROR_FILE, errors_of
from dmriflow.pipelines.file_hashes import prune as prune_file_hashes
from dmriflow.pipelines.harmonization import (FIT_SUBJECT_STEP, HarmonizationFitWorkflow,
                                              common_shells_and_lmax)
from dmriflow.pipelines.inference import pin_checkpoint, run_inference_phase
from dmriflow.pipelines.inputs import SubjectInputs, assign_protocols, census
from dmriflow.pipelines.locks import (BRIEF_WAIT_S, COHORT_LOCK, JOURNAL_PATTERN, RUN_JOURNAL,
                                      RUN_LOCK, UNIT_LOCK_DIR, UPKEEP, RunInProgress, dead_journals, holder,
                                      journal, lock_holders, node_units, open_lock, sign,
                                      try_lock, unit_lock_path, write_new)
from dmriflow.pipelines.methods import FIT_COMMAND, write_methods
from dmriflow.pipelines.progress import (BAR, LOG_ENV, LOG_ROOT_ENV, PROGRESS_ENV, ProgressBar,
                                         bar_wanted, log_line, shown_path)
from dmriflow.pipelines.slurm import SlurmWorker
from dmriflow.pipelines.steps import (DROPPED_MARKER, FAILED_MARKER, STEP_MARKER, Subject,
                                      artefact_option)
from dmriflow.pipelines.workflows import CohortWorkflow

#: Engine workers dmriflow supports; there is no silent default.
WORKERS = ("cf", "debug", "slurm")
#: Cache location under OUTPUT when --cache-dir is not given.
DEFAULT_CACHE = ".dmriflow-cache"
#: Pydra's persistent file-hash cache (PYDRA_HASH_CACHE), kept in the cache root:
#: a run killed while Pydra hashed a file leaves an empty soft lock there whose
#: owner filelock cannot tell, so it is never broken and every later run waits on
#: it for ever (tests/test_resume.py met it). In the cache root it is one of the
#: engine's leftovers, removed by the upkeep.
HASH_CACHE_DIR = ".pydra-hashes"
#: What a killed engine leaves in the cache root, by the names Pydra gives them:
#: soft lock files of node folders (``<node>.lock``, ``<node>_save.lock``) and
#: job info files (``<uuid hex>_info.json``); and the hash cache's locks (in
#: HASH_CACHE_DIR). Nothing else is removed: a user's ``build.lock`` stays.
ENGINE_LEFTOVER = re.compile(r"^(python|workflow|shell)-[0-9a-f]{32}(_save)?\.lock$"
                             r"|^[0-9a-f]{32}_info\.json$")
#: In the cache root while a run is going (RUN_JOURNAL or one per job sharing the
#: cache, see :mod:`dmriflow.pipelines.locks`: its start time); an interrupted run
#: leaves it behind, telling the next run which node results to check.
#: Node results written this long before the journal's start time are checked too
#: (file-system time stamps are coarse).
JOURNAL_SLACK_S = 2.0
#: Folder of the per-run log files, under OUTPUT/dmriflow.
LOG_DIR = "logs"
#: Written into a cache root when dmriflow creates (or adopts) it: only a folder
#: carrying it is ever cleaned or has its node results (pickles) loaded.
CACHE_MARKER = ".dmriflow-cache.json"
#: Entries the engine and dmriflow make in a cache root: what an unmarked cache of an
#: earlier version may hold to be adopted (anything else there is someone's file).
#: A node folder's name (Pydra: task type, then the 32-hex checksum): the only
#: folders of a cache root the cleaning removes.
ENGINE_NODE = re.compile(r"^(python|workflow|shell)-[0-9a-f]{32}$")
ENGINE_ENTRY = re.compile(rf"{ENGINE_NODE.pattern}"
                          rf"|{ENGINE_LEFTOVER.pattern}|^{re.escape(RUN_LOCK)}$"
                          rf"|{JOURNAL_PATTERN.pattern}|^{re.escape(HASH_CACHE_DIR)}$")
#: Permission bits that let someone other than the owner write (and so plant a
#: node result that the next run would unpickle).
FOREIGN_WRITE = stat.S_IWGRP | stat.S_IWOTH


def _default_procs() -> int:
    """Processes of the cf worker on the command line: the cores, at most 2."""
    return max(1, min(2, os.cpu_count() or 1))


@dataclass
class EngineOptions:
    """How a run is executed (not what it computes): worker, cache, SLURM, output."""

    worker: str = option("cf", "engine worker: cf (local processes, default), debug (serial, "
                               "in-process), slurm (one SLURM job per node)", choices=WORKERS)
    n_procs: int = option(1, "processes for the cf worker (default: %(default)s)",
                          cli_default=_default_procs, aliases=("--nprocs",))
    cache_dir: str | None = option(None, "Pydra cache root (default: OUTPUT/.dmriflow-cache); "
                                         "must be on a path every SLURM node sees",
                                   aliases=("-w", "--work-dir"))
    omp_nthreads: int | None = option(
        None, "threads per worker process: numpy worker threads and torch (sets OMP_NUM_THREADS, "
              "OPENBLAS_NUM_THREADS, MKL_NUM_THREADS for the workers; BLAS itself runs one "
              "thread per worker thread, so results do not depend on N; default: unset)",
        metavar="N")
    mem: float | None = option(
        None, "memory for the run in GB: fewer cf processes so that the concurrent subjects' "
              "estimated peaks fit (a subject's peak is estimated as "
              "2x its series as float32, from the header)", units="GB", metavar="GB")
    verbose: bool = option(False, "more detail: the selected units and the engine's log",
                           aliases=("-v",))
    session_label: list[str] | None = option(
        None, "only these sessions (with or without 'ses-')", metavar="LABEL", nargs="+")
    bids_filter_file: str | None = option(
        None, "pybids-style JSON selecting DWI series by entities, e.g. "
              "{\"dwi\": {\"acquisition\": \"multi\", \"run\": 1}}", metavar="FILE")
    sbatch_args: str = option("", "sbatch arguments of every job (slurm worker); write "
                                  "--sbatch-args='--time=60 --mem=8G' (with '=')",
                              metavar="ARGS")
    gpu_sbatch_args: str = option("", "sbatch arguments of the GPU phase's jobs (--inference), "
                                      "e.g. --gpu-sbatch-args='--partition=gpu --gres=gpu:1'",
                                  metavar="ARGS", commands=("run", "demo"))
    drop_series: bool = option(
        False, "delete each subject's series copies in the cache once it is done (Validate's "
               "float32 series: 1.2 GB of mask rows per HCP subject, 4.2 GB where a step needs "
               "the whole grid; a later run that needs them reads the input again); harmonize "
               "fit: also its per-subject terms once the artefact is written (235 MB per HCP "
               "subject)")
    quiet: bool = option(False, "no progress lines")
    rerun_failed: bool = option(
        False, "run only the subjects of OUTPUT's last plan that are not done (failed, "
               "missing, or done by other code); rebuild the group table for the whole plan",
        commands=("run",))

    def __post_init__(self):
        check_choice("worker", self.worker, WORKERS)
        if self.n_procs < 1:
            raise ValueError("n_procs must be >= 1")
        if self.omp_nthreads is not None and self.omp_nthreads < 1:
            raise ValueError("omp_nthreads must be >= 1")
        if self.mem is not None and self.mem <= 0:
            raise ValueError("mem must be > 0 GB")


class RunConfig:
    """A run's configuration: :class:`EngineOptions`, ``{step: Options}`` and
    ``{cohort step: Options}``.

    ``RunConfig(worker="cf", lmax=4, image_gradient=True)``: every keyword is
    an engine option or the option of exactly one registered step (its
    ``Options`` declares it); ``steps`` gives whole Options objects instead.
    Options read as attributes (``config.lmax``).
    """

    def __init__(self, worker: str, steps: dict | None = None, **options):
        engine = {f.name for f in fields(EngineOptions)}
        owner = {**option_owner(), **option_owner(COHORT_REGISTRY)}
        unknown = sorted(k for k in options if k not in engine and k not in owner)
        if unknown:
            raise TypeError(f"unknown run option(s) {unknown}")
        by_step: dict[str, dict] = {}
        for name, value in options.items():
            if name not in engine:
                by_step.setdefault(owner[name], {})[name] = value
        self.engine = EngineOptions(worker=worker, **{k: v for k, v in options.items()
                                                       if k in engine})
        self.steps = {**default_options(), **(steps or {})}
        self.cohort = {name: step.Options() for name, step in COHORT_REGISTRY.items()}
        for step, values in by_step.items():
            chosen = self.cohort if step in COHORT_REGISTRY else self.steps
            chosen[step] = replace(chosen[step], **values)
        harmonize = self.steps["harmonize"]
        if harmonize.harmonization:   # absolute, cache key from its content
            harmonize.harmonization = artefact_option(harmonize.harmonization)

    def __getattr__(self, name):
        if name in ("engine", "steps", "cohort"):
            raise AttributeError(name)
        if hasattr(self.engine, name):
            return getattr(self.engine, name)
        owner = option_owner().get(name)
        if owner is not None:
            return getattr(self.steps[owner], name)
        owner = option_owner(COHORT_REGISTRY).get(name)
        if owner is None:
            raise AttributeError(f"RunConfig has no option {name!r}")
        return getattr(self.cohort[owner], name)

    def options_record(self) -> dict:
        """``{step: options dict}``: the one hashed input of the workflows."""
        return {name: asdict(opts) for name, opts in self.steps.items()}

    def enabled_steps(self) -> list[str]:
        return [name for name, step in REGISTRY.items() if step.enabled(self.steps[name])]

    def __repr__(self) -> str:
        return f"RunConfig({self.engine!r}, steps={self.steps!r}, cohort={self.cohort!r})"


@dataclass
class CohortResult:
    output_dir: Path
    table: Path | None              # None: it could not be written (engine_errors say why)
    rows: list[dict] = field(default_factory=list)
    engine_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report: Path | None = None     # OUTPUT/dmriflow/report.html

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r.get("status") != "done"]


def cache_root(output_dir, config: RunConfig) -> Path:
    return Path(config.cache_dir or Path(output_dir, DEFAULT_CACHE)).resolve()


def clean_cache(root: Path, units: set[str] | None = None) -> int:
    """Remove node folders holding a failure (or whose series copy was dropped,
    see :func:`drop_series_files`), so a rerun recomputes them.

    Pydra keeps re-reporting an old error once it is cached (and our guarded
    tasks cache failure records): delete every node folder with an
    ``_error.pklz`` or a failure marker, and, if there was any, the workflow
    folders whose cached results embed them (rebuilt cheaply from the nodes).
    Given ``units`` (a job sharing the cache with others), only the folders
    whose job names one of them (:func:`~dmriflow.pipelines.locks.node_units`).
    Returns the number of folders removed.
    """
    if not root.is_dir():
        return 0
    mine = (lambda d: True) if units is None else (lambda d: bool(node_units(d) & units))
    failed = [d for d in root.iterdir()
              if ENGINE_NODE.match(d.name) and d.is_dir() and any((d / f).exists()
                                    for f in (ERROR_FILE, FAILED_MARKER, DROPPED_MARKER))
              and mine(d)]
    if failed:
        failed += [d for d in root.iterdir() if ENGINE_NODE.match(d.name) and d.is_dir()
                   and d.name.startswith("workflow-") and d not in failed and mine(d)]
    for d in failed:
        shutil.rmtree(d, ignore_errors=True)
    return len(failed)


def claim_cache(root: Path) -> None:
    """Make ``root`` dmriflow's cache, or refuse it (an :class:`InputError`).

    A missing or empty folder is created and marked (CACHE_MARKER), writable by
    its owner only. A marked one is used. An unmarked, non-empty one is
    adopted only when every entry is one the engine makes (a cache of an
    earlier version), else refused: it holds someone's files, and a run
    cleans its cache. A cache owned by another user, or writable by anyone
    but its owner, is refused too, since its node results are pickles that
    a run loads.
    """
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise InputError(root, "the cache must be a folder (not a link or a file)")
    root.mkdir(parents=True, exist_ok=True)
    st = root.stat()
    if st.st_uid != os.geteuid():
        raise InputError(root, f"cache folder belongs to uid {st.st_uid}, not to this user "
                               f"(uid {os.geteuid()}); its node results would be loaded as "
                               f"pickles: use a cache folder of your own")
    marker = root / CACHE_MARKER
    if not marker.is_file():
        # (the marker itself: another job may be marking the new cache at this moment)
        foreign = sorted(p.name for p in root.iterdir()
                         if not ENGINE_ENTRY.match(p.name) and p.name != CACHE_MARKER)
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise InputError(root, f"not a dmriflow cache (no {CACHE_MARKER}) and not empty "
                                   f"({shown}); give --cache-dir an empty or new folder")
        if not any(root.iterdir()):
            root.chmod(stat.S_IMODE(st.st_mode) & ~FOREIGN_WRITE)   # a new cache: ours only
            st = root.stat()
    if st.st_mode & FOREIGN_WRITE:
        raise InputError(root, f"cache folder is writable by other users (mode "
                               f"{stat.S_IMODE(st.st_mode):o}); its node results would be "
                               f"loaded as pickles: chmod go-w it or use another folder")
    if not marker.is_file():
        try:     # created at once (O_EXCL, no temporary name another job would see)
            write_new(marker, json.dumps({"created_by": "dmriflow", "version": __version__,
                                          "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
                                         indent=2, sort_keys=True) + "\n")
        except FileExistsError:
            pass                                  # another job marked it meanwhile


def _open_lock(path: Path):
    """The run lock file, opened without following a symbolic link (O_NOFOLLOW:
    a planted link must not make dmriflow truncate its target)."""
    return open_lock(path)


@contextmanager
def exclusive_run(*folders: Path):
    """Hold an exclusive lock on each folder for the duration of a run.

    The kernel releases the lock when the holder dies (even by SIGKILL), so
    a lock that can be taken proves that no other run is using the folder:
    leftovers of a killed run can then be removed safely.
    """
    with ExitStack() as stack:
        for folder in dict.fromkeys(Path(f).resolve() for f in folders):   # once each
            folder.mkdir(parents=True, exist_ok=True)
            fh = stack.enter_context(_open_lock(folder / RUN_LOCK))
            if not try_lock(fh, fcntl.LOCK_EX, BRIEF_WAIT_S, while_holder=_in_upkeep):
                raise RunInProgress(f"{folder}: another dmriflow run is using this folder "
                                    f"({_holder_of(fh)}); wait for it or stop it first")
            sign(fh)
        yield


def _in_upkeep(fh) -> bool:
    """For a job that wants to hold a run lock exclusively: whether it is held for
    another job's short upkeep (or by a holder that has not signed it yet), not
    by jobs sharing it or by a whole run."""
    if any(kind == "READ" for kind, _ in lock_holders(_path_of(fh))):
        return False
    return _upkeep_text(holder(fh))


def _shareable_soon(fh) -> bool:
    """For a job that wants to share a run lock: whether it is held exclusively
    only for another job's short upkeep, or already shared again (that job
    turns its exclusive lock into a shared one: the kernel drops the one before
    it takes the other), not by a run that needs the folder whole."""
    if not any(kind == "WRITE" for kind, _ in lock_holders(_path_of(fh))):
        return True
    return _upkeep_text(holder(fh))


def _upkeep_text(text: str) -> bool:
    return not text or text.endswith(f"({UPKEEP})")


def _path_of(fh) -> Path:
    return Path(f"/proc/self/fd/{fh.fileno()}").resolve()


def _holder_of(fh) -> str:
    """Who holds a run lock: the exclusive holder's own words, or the jobs sharing it."""
    holders = lock_holders(_path_of(fh))
    readers = sorted({pid for kind, pid in holders if kind == "READ"})
    if readers and not any(kind == "WRITE" for kind, _ in holders):
        return (f"{len(readers)} participant job(s) sharing it: pid {', '.join(readers)}; "
                f"see their unit locks in {UNIT_LOCK_DIR_TEXT}")
    return holder(fh) or "unknown process"


#: How the unit locks' folder is named in messages.
UNIT_LOCK_DIR_TEXT = "OUTPUT/dmriflow/.dmriflow-locks"


def _shared(fh, folder: Path, upkeep) -> bool:
    """Hold a run lock shared (the jobs computing units share OUTPUT and the cache).

    When no other job holds it, it is first held exclusively for ``upkeep()``
    (leftovers of killed jobs can then be cleared safely), then shared. Returns
    whether the upkeep ran. A folder held by a run that needs it whole is refused
    (:class:`RunInProgress`); another job's short upkeep is waited for."""
    alone = try_lock(fh, fcntl.LOCK_EX)
    if alone:
        sign(fh, UPKEEP)
        upkeep()
    if try_lock(fh, fcntl.LOCK_SH, BRIEF_WAIT_S, while_holder=_shareable_soon):
        return alone
    raise RunInProgress(f"{folder}: another dmriflow run is using this folder "
                        f"({_holder_of(fh)}); wait for it or stop it first")


def run_holder(folder) -> str | None:
    """Who holds a folder's run lock right now ("pid N on HOST since T", or the
    participant jobs sharing it), or None.

    Looks the lock up in /proc/locks (Linux) instead of taking it, so asking
    never makes a run that starts at that moment fail. A lock held from
    another host of a shared file system is not visible here.
    """
    path = Path(folder, RUN_LOCK)
    holders = lock_holders(path)
    if not holders:
        return None
    readers = sorted({pid for kind, pid in holders if kind == "READ"})
    if any(kind == "WRITE" for kind, _ in holders):
        try:
            return path.read_text().strip() or "unknown process"
        except OSError:
            return "unknown process"
    units = unit_holders(folder)
    return (f"{len(readers)} participant job(s): pid {', '.join(readers)}"
            + (f"; running {', '.join(units)}" if units else ""))


def unit_holders(dataset) -> list[str]:
    """The units whose lock is held now (by name, e.g. ``sub-01_ses-1``)."""
    folder = Path(dataset, UNIT_LOCK_DIR)
    return sorted(p.name[: -len(".lock")] for p in folder.glob("*.lock")
                  if not p.is_symlink() and lock_holders(p)) if folder.is_dir() else []


def clear_interrupted(root: Path, output_dir: Path) -> int:
    """Remove what a killed run left behind; call only under :func:`exclusive_run`.

    Pydra's soft lock files of a dead run make the next run wait for ever
    when their owner cannot be checked (another host, a reused process id);
    temporary files of atomic writes are never valid results. Node folders
    without a result are recomputed by the engine itself. Returns the number
    of paths removed.
    """
    return (clear_engine_leftovers(root) + clear_temporary(output_dir)
            + clear_cohort_temporary(output_dir))


def clear_engine_leftovers(root: Path) -> int:
    """Pydra's lock and job-info files in the cache root; only with the cache held alone."""
    if not root.is_dir():
        return 0
    stale = [p for p in root.iterdir() if ENGINE_LEFTOVER.match(p.name)]
    stale += list((root / HASH_CACHE_DIR).glob("*.lock"))
    return _remove(stale)


def clear_temporary(output_dir: Path, units=None) -> int:
    """Temporary files of atomic writes under OUTPUT/dmriflow; given ``units``,
    only those of their files (named after the unit) in their folders."""
    dataset = Path(output_dir, "dmriflow")
    if units is None:      # the cohort files' are cleared under their lock (cohort_files)
        return _remove([p for p in io.temporary_files(dataset)
                        if p.parent not in (dataset, dataset / "group")])
    stale = [p for u in units for p in io.temporary_files(dataset.joinpath(*u.out_parts))
             if p.name.startswith(f".{u.key}_")]
    return _remove(stale)


def _remove(paths) -> int:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return len(paths)


def discard_interrupted_results(root: Path, units: set[str] | None = None,
                                own: Path | None = None) -> int:
    """Remove node folders whose saved result an interrupted run left unusable.

    On Ctrl-C (KeyboardInterrupt inside a worker) Pydra 1.0a12 still saves
    the node's result, with no outputs and not marked as errored: the next
    run would take it from the cache and fail on it for ever. A result cut
    short by SIGKILL does not load. Only results written since an interrupted
    run started (its journal, see :func:`dmriflow.pipelines.locks.journal`) are
    read. With the cache held alone (:func:`exclusive_run`, or a job's upkeep)
    every node is checked and the journals removed; a job sharing the cache
    passes its ``units`` and checks only their node folders (no other job runs
    them), removing a journal only when all its units are among them. Returns
    the number of node folders removed.
    """
    unusable = []
    for path, content in dead_journals(root, own):
        try:
            started = float(content["started"])
        except (KeyError, TypeError, ValueError):
            started = 0.0 if units is None else None
        if started is not None:
            for result_file in root.glob("*/_result.pklz"):
                if not ENGINE_NODE.match(result_file.parent.name) or \
                        result_file.stat().st_mtime < started - JOURNAL_SLACK_S:
                    continue
                if units is not None and not node_units(result_file.parent) & units:
                    continue
                if not _usable(result_file):
                    unusable.append(result_file.parent)
        theirs = set(content.get("units") or [])
        if units is None or (theirs and theirs <= units):
            path.unlink(missing_ok=True)
    unusable = list(dict.fromkeys(unusable))
    for node in unusable:
        shutil.rmtree(node, ignore_errors=True)
    return len(unusable)


def _usable(result_file: Path) -> bool:
    try:
        with open(result_file, "rb") as fh:
            result = cloudpickle.load(fh)
        return bool(result.errored) or result.outputs is not None
    except Exception:  # noqa: BLE001 - a result that does not load is unusable
        return False


def clear_unit_leftovers(root: Path, units: set[str]) -> int:
    """What killed runs of ``units`` left in a cache shared with running jobs:
    Pydra's soft lock files of their node folders (a stale one would make this
    job wait for ever). Only node folders whose job names one of ``units``
    are touched: no other job runs them while this one holds their locks."""
    stale = []
    for lock in root.glob("*.lock") if root.is_dir() else []:
        node = root / lock.name[: -len(".lock")].removesuffix("_save")
        if ENGINE_LEFTOVER.match(lock.name) and node.is_dir() and node_units(node) & units:
            stale.append(lock)
    return _remove(stale)


@contextmanager
def locked_run(output_dir: Path, root: Path, config: RunConfig):
    """Everything a run that needs OUTPUT and the cache whole does around the
    engine call (``harmonize fit``): hold :func:`exclusive_run`, clear an
    interrupted run's leftovers, keep the run journal while running (removed
    only when the body completes). The cache is claimed first
    (:func:`claim_cache`): nothing is written into a folder that is not ours."""
    claim_cache(root)
    with exclusive_run(output_dir / "dmriflow", root), run_log(output_dir, config):
        cleared = clear_interrupted(root, output_dir)
        if cleared:
            _log(config, f"removed {cleared} leftover(s) of an interrupted run")
        discarded = discard_interrupted_results(root)
        if discarded:
            _log(config, f"discarded {discarded} node result(s) an interrupted run left "
                         f"unusable")
        prune_file_hashes(root / HASH_CACHE_DIR)
        write_new(root / RUN_JOURNAL, json.dumps({"started": time.time(),
                                                  "pid": os.getpid()}))
        yield
        (root / RUN_JOURNAL).unlink(missing_ok=True)


@dataclass
class UnitRun:
    """What :func:`unit_run` found: whether it had OUTPUT / the cache alone for
    the upkeep, what it cleared, and its journal."""

    output_alone: bool = False
    cache_alone: bool = False
    cleared: dict = field(default_factory=dict)
    journal: Path | None = None


def unit_entities(unit) -> dict:
    """A unit's naming entities (subject, session and, for one of several series,
    the series' own) for its lock: read back from its key, a name of the one grammar."""
    return parse_entities(unit.key)[0]


@contextmanager
def unit_run(output_dir: Path, root: Path, units: list, config: RunConfig):
    """Everything a job computing ``units`` does around the engine call.

    Takes each unit's lock (exclusive: a second job of the same unit is
    refused with :class:`RunInProgress` naming the holder), then the run locks
    of OUTPUT/dmriflow and of the cache *shared* with other such jobs. A job
    that finds a folder unused first clears every leftover of killed runs in
    it (exclusively, then shares it); otherwise it clears only what killed
    runs of its own units left (temporary files, Pydra lock files, unusable
    results, failed node folders). Keeps a journal while it runs. The cache
    is claimed first (:func:`claim_cache`)."""
    claim_cache(root)
    dataset = (output_dir / "dmriflow").resolve()
    keys = {u.key for u in units}
    state = UnitRun()
    with ExitStack() as stack:
        for unit in sorted(units, key=lambda u: u.key):
            path = unit_lock_path(dataset, unit_entities(unit))
            if path.parent.is_symlink():
                raise InputError(path.parent, "the unit locks' folder is a symbolic link; "
                                              "dmriflow does not follow it (remove the link)")
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = stack.enter_context(open_lock(path, "unit lock"))
            if not try_lock(fh, fcntl.LOCK_EX):
                raise RunInProgress(f"{unit.key}: another dmriflow job is running this unit "
                                    f"({holder(fh) or 'unknown process'}; lock "
                                    f"{path}); wait for it or stop it first")
            sign(fh)
        locks = {dataset: "output"}
        locks.setdefault(root.resolve(), "cache")
        for folder, kind in locks.items():
            fh = stack.enter_context(_open_lock(folder / RUN_LOCK))
            both = folder == root.resolve()          # the cache inside OUTPUT/dmriflow
            if kind == "output":
                upkeep = (lambda: _upkeep_all(state, root, output_dir, both))
            else:
                upkeep = (lambda: _upkeep_all(state, root, None, True))
            alone = _shared(fh, folder, upkeep)
            if kind == "output":
                state.output_alone = alone
                state.cache_alone = state.cache_alone or (alone and both)
            else:
                state.cache_alone = alone
        if not state.output_alone:
            state.cleared["temporary"] = clear_temporary(output_dir, units)
        if not state.cache_alone:
            state.cleared["engine"] = clear_unit_leftovers(root, keys)
            state.cleared["unusable"] = discard_interrupted_results(root, keys)
            state.cleared["failed"] = clean_cache(root, keys)
        stack.enter_context(run_log(output_dir, config))
        cleared = state.cleared.get("temporary", 0) + state.cleared.get("engine", 0)
        if cleared:
            _log(config, f"removed {cleared} leftover(s) of an interrupted run")
        if state.cleared.get("unusable"):
            _log(config, f"discarded {state.cleared['unusable']} node result(s) an "
                         f"interrupted run left unusable")
        if state.cleared.get("failed"):
            _log(config, f"cleared {state.cleared['failed']} failed node folder(s)")
        state.journal = stack.enter_context(journal(root, sorted(keys)))
        yield state


def _upkeep_all(state: UnitRun, root: Path, output_dir: Path | None, cache: bool) -> None:
    """A job's upkeep with a folder held alone (see :func:`unit_run`)."""
    if output_dir is not None:
        state.cleared["temporary"] = (clear_temporary(output_dir)
                                      + clear_cohort_temporary(output_dir))
    if cache:
        state.cleared["engine"] = clear_engine_leftovers(root)
        state.cleared["unusable"] = discard_interrupted_results(root)
        state.cleared["failed"] = clean_cache(root)
        state.cleared["file hashes"] = prune_file_hashes(root / HASH_CACHE_DIR)


@contextmanager
def cohort_files(output_dir: Path):
    """Hold the cohort lock while the cohort files (plan, census, group table,
    report, dataset description) are read and written; waits for another
    writer (up to BRIEF_WAIT_S). Temporary files of a killed writer in the
    group folder are cleared first."""
    dataset = Path(output_dir, "dmriflow")
    dataset.mkdir(parents=True, exist_ok=True)
    with open_lock(dataset / COHORT_LOCK, "cohort lock") as fh:
        if not try_lock(fh, fcntl.LOCK_EX, BRIEF_WAIT_S):
            raise RunInProgress(f"{dataset}: the cohort files are being written by "
                                f"{holder(fh) or 'another process'} for over "
                                f"{BRIEF_WAIT_S:.0f} s")
        sign(fh)
        _remove(_cohort_temporary(dataset))
        yield


def _cohort_temporary(dataset: Path) -> list[Path]:
    """Temporary files of the cohort files' writes (OUTPUT/dmriflow and its group folder)."""
    return [p for folder in (dataset, dataset / "group") if folder.is_dir()
            for p in folder.glob(f".*{io.TEMP_TAG}*")]


def clear_cohort_temporary(output_dir: Path) -> int:
    """The cohort files' temporary files, when no one is writing them (the cohort
    lock is free: taken and released at once)."""
    dataset = Path(output_dir, "dmriflow")
    with open_lock(dataset / COHORT_LOCK, "cohort lock") as fh:
        if not try_lock(fh, fcntl.LOCK_EX):
            return 0
        return _remove(_cohort_temporary(dataset))


def submitter(config: RunConfig, root: Path, gpu: bool = False):
    """The engine's Submitter for one phase of a run.

    On SLURM every job of a submission gets the same sbatch arguments, so a
    phase that needs a GPU (model inference) gets its own submitter with
    ``gpu=True``: its jobs take ``config.gpu_sbatch_args`` (e.g. a partition
    and ``--gres=gpu:1``), the other phases ``config.sbatch_args``. SLURM
    jobs that are cancelled, time out or are preempted fail their node
    (:class:`dmriflow.pipelines.slurm.SlurmWorker`).
    """
    from pydra.engine.submitter import Submitter  # before pydra.workers (OPERATIONS.md)
    from pydra.engine.workflow import Workflow
    from pydra.utils.hash import PersistentCache
    # Pydra reuses a workflow constructed earlier in this process when its inputs
    # hash the same. Ours hash by content (Subject, ContentKeyed), so a cohort or
    # artefact moved between two runs in one process would get the old paths.
    Workflow.clear_cache()
    os.environ[PersistentCache.LOCATION_ENV_VAR] = str(root / HASH_CACHE_DIR)   # workers inherit
    if os.environ.get(PROGRESS_ENV) != BAR:      # a progress bar shows the node lines
        os.environ[PROGRESS_ENV] = "0" if config.quiet else "1"
    worker, kwargs = config.worker, {}
    if config.worker == "cf":
        kwargs["n_procs"] = config.n_procs
    elif config.worker == "slurm":
        worker = SlurmWorker(sbatch_args=config.gpu_sbatch_args if gpu else config.sbatch_args)
    return Submitter(worker=worker, cache_root=root, **kwargs)


#: Threads of :func:`prepare_beside` still importing: a fork waits for them.
_PREPARING: list[threading.Thread] = []


def _join_preparing() -> None:
    while _PREPARING:
        _PREPARING.pop().join()


# a process forked while another thread imports inherits that import's module
# locks held for ever; no fork is expected while one runs, but one would wait
os.register_at_fork(before=_join_preparing)


def prepare_beside(sub, work) -> bool:
    """Run ``work`` (imports for what follows the engine: the report's) in a
    thread of this process while the engine's worker processes compute, on
    time a core would spend idle (e.g. beside a one-threaded Validate).

    Only with the cf worker (``sub``'s process pool), and only once the pool
    was handed its first job: by then every worker process is forked (none
    inherits the thread's import locks; :func:`_join_preparing` holds back any
    later fork) and the job was pickled without the thread taking turns at the
    interpreter lock (started with the engine, it delayed the first node by
    0.6-1 s on 2 loaded cores). Other workers run nodes in this process
    (debug) or elsewhere (SLURM): there ``work`` is left to its caller.
    Returns whether it will run; :func:`prepared` waits for it."""
    pool = getattr(sub.worker, "pool", None)
    if not isinstance(pool, ProcessPoolExecutor):
        return False
    submit = pool.submit

    def run():
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - the caller imports again and says why
            _debug(f"preparing beside the engine failed: {type(exc).__name__}: {exc}")

    def first_submit(*args, **kwargs):
        del pool.submit                   # later jobs: the pool's own method
        future = submit(*args, **kwargs)  # forks every worker process (fork start method)
        thread = threading.Thread(target=run, name="dmriflow-prepare", daemon=True)
        _PREPARING.append(thread)
        thread.start()
        return future
    pool.submit = first_submit
    return True


def prepared() -> None:
    """Wait for the work of :func:`prepare_beside` (e.g. before the report)."""
    _join_preparing()


def _log(config: RunConfig, msg: str) -> None:
    """A run message: to stderr unless quiet, always to the run's log file."""
    log_line(msg, to_stderr=not config.quiet)


def _debug(msg: str) -> None:
    """Detail for the run's log file only (not on the terminal)."""
    log_line(msg, to_stderr=False)


def changed_options(config: RunConfig) -> dict:
    """``{option: value}`` of every step and engine option the run changed from
    its default (paths as the log shows them)."""
    out = {}
    for opts in (config.engine, *config.steps.values(), *config.cohort.values()):
        for f in fields(opts):
            value = getattr(opts, f.name)
            if value != field_default(f):
                out[f.name] = value
    return out


def _shown_command(output_dir) -> str:
    """The command line for the log, absolute paths shown as :func:`shown_path` does."""
    return " ".join(shown_path(a, output_dir) if os.path.isabs(a) else a for a in sys.argv)


@contextmanager
def run_log(output_dir: Path, config: RunConfig):
    """The run's own log file, ``OUTPUT/dmriflow/logs/run-<time>-<pid>-<random>.log``:
    the command, versions and environment id, every message and every node's
    progress line (worker processes append to it through LOG_ENV). Yields its path."""
    name = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}.log"
    path = output_dir / "dmriflow" / LOG_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = {k: os.environ.get(k) for k in (LOG_ENV, LOG_ROOT_ENV)}
    os.environ[LOG_ENV] = str(path)
    os.environ[LOG_ROOT_ENV] = str(output_dir)     # logged paths: relative to OUTPUT
    try:
        log_line(f"dmriflow {__version__} ({io.pipeline_version()}), environment "
                 f"{environment()['EnvironmentId']}; command: {_shown_command(output_dir)}; "
                 f"worker={config.worker} n_procs={config.n_procs}", to_stderr=False)
        yield path
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def preflight(subjects: list[SubjectInputs], output_dir, version: str):
    """Split subjects into runnable ones and rows for those with missing files."""
    runnable, failed = [], []
    for s in subjects:
        try:
            s.check_files()
            runnable.append(s)
        except InputError as exc:
            retire_export(status_path(output_dir, s.out_parts, s.key), output_dir,
                          s.out_parts)
            failed.append(write_status(failed_row(s.key, "validate", str(exc), version),
                                       output_dir, s.out_parts))
    return runnable, failed


def _submit(subjects, prefailed, output_dir, config: RunConfig, root: Path, version: str,
            cohort_steps: bool = True, beside=None):
    """Run the cohort workflow; ``beside``: work for this process while the
    engine computes (:func:`prepare_beside`)."""
    units = [Subject.of(s) for s in subjects]
    products = None
    if config.inference:
        # own phase and submitter (GPU jobs on SLURM); products reach Export
        # (the checkpoint was pinned before the methods text was written)
        products, errors = run_inference_phase(units, output_dir, config, root, version,
                                               submitter)
        for err in errors:
            _log(config, f"inference phase: {err}")
    task = CohortWorkflow(subjects=units, output_dir=str(output_dir), options=config.options_record(),
                          extra_rows=prefailed, inference=products,
                          drop_series=config.drop_series, cohort_steps=cohort_steps,
                          pipeline_version=version,
                          harmonization=str(config.harmonization or ""))
    with submitter(config, root) as sub:
        if beside is not None:
            prepare_beside(sub, beside)
        return sub(task, raise_errors=False)


def run_cohort(subjects: list[SubjectInputs], output_dir, config: RunConfig) -> CohortResult:
    """Run the selected units; return their rows and the group table's path.

    The job holds each selected unit's lock and shares OUTPUT and the cache
    with jobs of other units (:func:`unit_run`): several participant jobs may
    run at once on one OUTPUT and cache; a second job of a running unit is
    refused (:class:`RunInProgress`). The units are merged into the cohort plan
    (group/cohort.json) first, so ``dmriflow status`` can tell missing units
    after a crash; the plan, the census and the group table keep every unit
    of earlier jobs (never shrunk to this job's subset) and are written under
    the cohort lock (:func:`cohort_files`). Subject-level errors never raise:
    they become rows with status "failed" and a reason. With
    ``config.rerun_failed`` only the failed and missing units of the stored
    plan are run.
    """
    output_dir = Path(output_dir).resolve()
    root = cache_root(output_dir, config)
    selected = subjects
    if config.rerun_failed:
        subjects, selected = rerun_selection(subjects, output_dir)
    with unit_run(output_dir, root, selected, config) as state:
        if config.rerun_failed:
            _log(config, f"--rerun-failed: {len(selected)} of {len(subjects)} planned "
                         f"subject(s) to rerun: {' '.join(s.key for s in selected) or 'none'}")
        return _run_units(subjects, selected, output_dir, config, root, state)


def rerun_selection(subjects: list[SubjectInputs], output_dir) -> tuple[list, list]:
    """(planned subjects, those to rerun) for ``--rerun-failed``.

    The plan is OUTPUT's cohort.json; the subjects to rerun are those not
    "done" with the current pipeline version (failed, never finished,
    derivatives gone, or done by other code). Planned subjects must still be
    found in INPUT.
    """
    planned = [e.key for e in read_plan(output_dir)]
    found = {s.key: s for s in subjects}
    lost = [k for k in planned if k not in found]
    if lost:
        raise InputError(output_dir, f"--rerun-failed: planned subject(s) {lost} not found in "
                                     f"the input folder")
    cohort = [found[k] for k in planned]
    todo = {r["subject"] for r in collect_status(output_dir, cohort, io.pipeline_version())
            if r["status"] != "done"}
    return cohort, [s for s in cohort if s.key in todo]


def merge_plan(output_dir: Path, subjects: list, config: RunConfig, version: str,
               root: Path) -> list:
    """Add ``subjects`` to the stored plan (group/cohort.json; an entry of the
    same unit is replaced, the others kept) and their rows to the census (rows
    kept in the cache root's hash folder, see :mod:`.census_cache`); write the
    dataset description. Call under :func:`cohort_files`. Returns the plan's
    units."""
    group = output_dir / "dmriflow" / "group"
    try:
        old = _plan(output_dir).get("subjects", [])
    except (FileNotFoundError, ValueError):
        old = []
    entries = {e["key"]: e for e in old if isinstance(e, dict) and "key" in e}
    entries.update({s.key: plan_entry(s) for s in subjects})
    io.write_json({"pipeline_version": version, "worker": config.worker,
                   "steps": list(planned_steps(config)), "subjects": list(entries.values()),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, group / "cohort.json")
    cen = recorded_frame(census(subjects, cached_row_of(root / HASH_CACHE_DIR, version)),
                         output_dir)
    text = cen.to_csv(sep="\t", index=False, na_rep="n/a")
    if len(entries) > len(subjects) and (group / "census.tsv").is_file():
        text = merged_census(group / "census.tsv", text)
    io.write_text(text, group / "census.tsv")
    write_dataset_description(output_dir, source_uri(subjects, output_dir))
    return read_plan(output_dir)


def merged_census(path: Path, fresh: str) -> str:
    """The stored census with the rows of ``fresh`` (TSV text) added or replaced;
    protocol groups assigned anew over all rows (both read back the same way)."""
    def read(src):
        return pd.read_csv(src, sep="\t", dtype=str, keep_default_na=False, na_values=["n/a"])
    new = read(StringIO(fresh))
    old = read(path)
    rows = pd.concat([old[~old["subject"].isin(new["subject"])], new], ignore_index=True)
    rows = assign_protocols(rows.drop(columns=["protocol"], errors="ignore")
                            .sort_values("subject", kind="stable"))
    return rows.to_csv(sep="\t", index=False, na_rep="n/a")


def _run_units(subjects, selected, output_dir: Path, config: RunConfig, root: Path,
               state: UnitRun) -> CohortResult:
    start = time.perf_counter()
    version = io.pipeline_version()
    with cohort_files(output_dir):
        planned = merge_plan(output_dir, subjects, config, version, root)
    keys = {s.key for s in selected}
    whole = keys >= {p.key for p in planned}
    cen = pd.read_csv(output_dir / "dmriflow" / "group" / "census.tsv", sep="\t",
                      keep_default_na=False)
    if config.inference:    # the methods text names the checkpoint the run uses
        pin_checkpoint(config.steps["inference"])
    methods = write_methods(config, output_dir / "dmriflow" / LOG_DIR, output_dir, len(selected),
                            sum(bool(getattr(s, "mask", None)) for s in selected))
    _debug(f"options changed from their defaults: {changed_options(config)}; methods text "
           f"{shown_path(methods, output_dir)}")
    _log(config, f"{len(selected)} of {len(planned)} planned unit(s), protocol groups "
                 f"{ {k: int(v) for k, v in cen['protocol'].value_counts().items()} }; "
                 f"worker={config.worker} cache={shown_path(root, output_dir)}"
                 + ("" if state.cache_alone and state.output_alone else
                    "; sharing OUTPUT/cache with other jobs"))

    runnable, prefailed = preflight(selected, output_dir, version)
    for row in prefailed:
        _log(config, f"{row['subject']}: failed before submission: {row['error']}")
    engine_errors: list[str] = []
    table = None
    if not runnable:   # (with --rerun-failed, possibly nothing to do)
        rows = prefailed
    else:
        bar = ProgressBar(os.environ[LOG_ENV], len(runnable) + len(prefailed),
                          len(planned_steps(config)), len(prefailed)) \
            if bar_wanted(config.quiet) and os.environ.get(LOG_ENV) else nullcontext()
        with bar:
            # the report's imports beside the engine, when this job writes the report
            res = _submit(runnable, prefailed, output_dir, config, root, version,
                          cohort_steps=whole,
                          beside=_prepare_report if whole or config.rerun_failed else None)
        if res.errored or res.outputs is None:
            engine_errors = errors_of(res, root)
            rows = collect_status(output_dir, selected)
        else:
            rows = list(res.outputs.rows) + prefailed
            table = Path(res.outputs.table) if res.outputs.table else None
            missing = [d for r in rows for d in r.get("derivatives", [])
                       if not derivative_file(d, output_dir).exists()]
            if missing:
                # derivatives deleted after a cached run: redo the cheap export steps
                _log(config, f"{len(missing)} derivative(s) missing; re-exporting")
                mine = None if state.cache_alone else keys
                remove_steps(root, ("export", "group"), mine)
                for d in root.glob("workflow-*"):
                    if mine is None or node_units(d) & mine:
                        shutil.rmtree(d, ignore_errors=True)
                return _run_units(subjects, selected, output_dir, config, root, state)
    if config.drop_series:
        _drop_series(root, None if state.cache_alone else keys, config)
    if config.rerun_failed:
        rows = collect_status(output_dir, subjects)   # the whole plan's
    with cohort_files(output_dir):
        planned = read_plan(output_dir)       # other jobs may have added units meanwhile
        whole = keys >= {p.key for p in planned}
        if table is None or not whole:
            # the table covers the whole plan, from the status files
            try:
                table = write_subjects_table(collect_status(output_dir, planned), output_dir)
            except OSError as exc:     # e.g. a full disk: the status files say the rest
                engine_errors.append(f"group table not written: {exc}")
                table = None
        # the report reads every unit's maps: a job of some units leaves it to the group
        # level (one per job would cost each job the whole cohort, under the lock)
        report = _write_report(output_dir, config) if whole or config.rerun_failed else None
    result = CohortResult(output_dir=output_dir, table=table, rows=rows,
                          engine_errors=engine_errors, seconds=time.perf_counter() - start,
                          report=report)
    n_done = sum(r.get("status") == "done" for r in rows)
    for row in rows:
        if row.get("status") != "done":
            _debug(f"NOT DONE {row.get('subject')} [{row.get('failed_step', '')}] "
                   f"{row.get('status')}: {row.get('error', '')}")
    for err in engine_errors:
        _debug(f"ENGINE ERROR: {err}")
    _log(config, f"finished in {result.seconds:.1f} s: {n_done} done, "
                 f"{len(rows) - n_done} not done; table {shown_path(table, output_dir)}; "
                 f"report {shown_path(result.report, output_dir)}")
    return result


def _prepare_report() -> None:
    from dmriflow.pipelines.report import prepare  # lazy: keeps `dmriflow --help` fast
    prepare()


def _write_report(output_dir: Path, config: RunConfig) -> Path | None:
    """The cohort HTML report; a report problem is logged, never fails the run."""
    prepared()
    from dmriflow.pipelines.report import write_report  # lazy: keeps `dmriflow --help` fast
    try:
        return write_report(output_dir)
    except Exception as exc:  # noqa: BLE001 - the derivatives are done; say what failed
        _log(config, f"report not written: {type(exc).__name__}: {exc}")
        return None


#: Steps that write a subject's series into their node folder, and its file names there.
SERIES_STEPS = ("validate", "preprocess", "harmonize")
SERIES_FILES = (io.DECODED_NAME, io.ROWS_NAME, "dwi.nii.gz")
#: What ``--drop-series`` deletes, by step marker: file name patterns in the node
#: folder. The fit's per-subject terms are read by its fit node only (235 MB per
#: HCP subject).
DROPPED_FILES = {**dict.fromkeys(SERIES_STEPS, SERIES_FILES),
                 FIT_SUBJECT_STEP: SubjectTerms.FILE_PATTERNS}


def drop_series_files(root: Path, units: set[str] | None = None) -> int:
    """Delete the series files of every series step's node folder (after a run:
    the Export steps of a first run already dropped theirs, a cached rerun's
    recomputed Validate left new ones) and the fit's per-subject terms
    (:data:`DROPPED_FILES`); each folder is marked so that the next run
    removes it (:func:`clean_cache`). Given ``units``, only their node
    folders. Returns bytes freed."""
    freed = 0
    for marker in root.glob("*/" + STEP_MARKER):
        patterns = DROPPED_FILES.get(marker.read_text(), ())
        if not patterns:
            continue
        if units is not None and not node_units(marker.parent) & units:
            continue
        for path in (p for pattern in patterns for p in sorted(marker.parent.glob(pattern))):
            if path.is_file():
                (marker.parent / DROPPED_MARKER).write_text(path.name)
                freed += path.stat().st_size
                path.unlink()
    return freed


def _drop_series(root: Path, units: set[str] | None, config: RunConfig) -> None:
    """``--drop-series`` after a run: :func:`drop_series_files`, and say how much."""
    freed = drop_series_files(root, units)
    if freed:
        _log(config, f"--drop-series: {freed / 1e9:.2f} GB of series copies (and fit terms) "
                     f"deleted")


def remove_steps(root: Path, steps: tuple[str, ...], units: set[str] | None = None) -> int:
    """Remove the node folders of the given steps (by their step marker); given
    ``units``, only their node folders."""
    found = [d for d in root.glob("*/" + STEP_MARKER) if d.read_text() in steps
             and (units is None or node_units(d.parent) & units)]
    for marker in found:
        shutil.rmtree(marker.parent, ignore_errors=True)
    return len(found)


#: Per-step outcome words of ``dmriflow status``.
STEP_DONE, STEP_FAILED, STEP_SKIPPED, STEP_MISSING = "done", "failed", "skipped", "missing"
STEP_WORDS = (STEP_DONE, STEP_FAILED, STEP_SKIPPED, STEP_MISSING)


def planned_steps(config: RunConfig) -> tuple[str, ...]:
    """The per-subject steps a run with this configuration goes through, in order."""
    return tuple(config.enabled_steps()) + ("export",)


def collect_status(output_dir, subjects: list[SubjectInputs],
                   pipeline_version: str | None = None) -> list[dict]:
    """Per-subject rows from the status files.

    A subject is "missing" when it has no status file (not run, still
    running, or interrupted), when derivatives its status file lists are
    gone, or, given ``pipeline_version``, when its result came from another
    pipeline version than the plan's (an interrupted run of new code).
    """
    rows = []
    for s in subjects:
        path = status_path(output_dir, s.out_parts, s.key)
        if path.exists():
            row = json.loads(path.read_text())
            gone = [d for d in row.get("derivatives", [])
                    if not derivative_file(d, output_dir).exists()]
            old = row.get("pipeline_version")
            if row.get("status") == "done" and gone:
                row.update(status=STEP_MISSING, error=f"{len(gone)} derivative(s) missing, "
                                                      f"e.g. {gone[0]}")
            elif pipeline_version and old and old != pipeline_version:
                row.update(status=STEP_MISSING, failed_step="",
                           error=f"result of pipeline {old} ({row.get('status')}); the last run "
                                 f"planned {pipeline_version}")
        else:
            row = {"subject": s.key, "status": STEP_MISSING, "failed_step": "",
                   "error": "no result yet (not run, still running, or interrupted)"}
        rows.append(row)
    return rows


def step_outcomes(row: dict, steps: tuple[str, ...]) -> dict[str, str]:
    """done/failed/skipped/missing for each planned step of one status row.

    Steps before the failed one are done, the steps after it skipped (a
    failed subject exports nothing). A missing subject whose derivatives
    are gone was computed but not (or no longer) exported.
    """
    status, failed = row.get("status"), row.get("failed_step", "")
    if status == "done":
        return dict.fromkeys(steps, STEP_DONE)
    if status == "failed" and failed in steps:
        k = steps.index(failed)
        return {s: STEP_DONE if i < k else STEP_FAILED if i == k else STEP_SKIPPED
                for i, s in enumerate(steps)}
    if row.get("derivatives"):      # computed once, derivatives since deleted
        return {s: STEP_MISSING if s == "export" else STEP_DONE for s in steps}
    return dict.fromkeys(steps, STEP_MISSING)


def read_plan(output_dir) -> list[SubjectInputs]:
    """Subjects of the last run started on OUTPUT (from group/cohort.json)."""
    entries = _plan(output_dir)["subjects"]
    return [_PlannedSubject(e["key"], tuple(e["out_parts"])) for e in entries]


def _plan(output_dir) -> dict:
    plan = Path(output_dir, "dmriflow", "group", "cohort.json")
    if not plan.exists():
        raise FileNotFoundError(f"{plan}: no dmriflow run found in {output_dir}")
    return json.loads(plan.read_text())


@dataclass(frozen=True)
class _PlannedSubject:
    key: str
    out_parts: tuple


def status_table(output_dir) -> pd.DataFrame:
    """One row per planned subject: status, failed step, reason, then one column
    per planned step (done/failed/skipped/missing), then the subject's absolute
    QC flags (a done subject with flags is "done with QC flags")."""
    plan = _plan(output_dir)
    steps = tuple(plan.get("steps") or planned_steps(RunConfig(worker="debug")))
    rows = collect_status(output_dir, read_plan(output_dir), plan.get("pipeline_version"))
    cols = ["subject", "status", "failed_step", "error"]
    return pd.DataFrame([{**{c: r.get(c, "") for c in cols}, **step_outcomes(r, steps),
                          "qc_flags": r.get("qc_flags", "") or ""}
                         for r in rows], columns=cols + list(steps) + ["qc_flags"])


def run_harmonization_fit(subjects: list[SubjectInputs], output_dir, config: RunConfig,
                          *args, **kwargs) -> dict:
    """Fit a harmonization artefact on a cohort; store it under OUTPUT/dmriflow.

    The artefact goes to ``OUTPUT/dmriflow/harmonization/<content id>/`` and
    the evaluation tables to ``OUTPUT/dmriflow/group/harmonization_*.tsv``.
    Only subjects of the two named sites are used. Arguments after
    ``config``: see :func:`_harmonization_fit`. Runs under
    :func:`exclusive_run`, like :func:`run_cohort`.
    """
    output_dir = Path(output_dir).resolve()
    root = cache_root(output_dir, config)
    with locked_run(output_dir, root, config):
        return _harmonization_fit(subjects, output_dir, config, *args, **kwargs)


def _harmonization_fit(subjects: list[SubjectInputs], output_dir, config: RunConfig,
                       sites: dict[str, str], reference_site: str, target_site: str,
                       shells: list[float] | None = None, lmax: int | None = None,
                       registration: str = "syn", smoothing_fwhm_mm: float = 0.0,
                       contrast: str = "fa", match_resolution: str = RESOLUTION_MATCH_OFF
                       ) -> dict:

    output_dir = Path(output_dir).resolve()
    chosen = [s for s in subjects if sites.get(s.key) in (reference_site, target_site)]
    for site in (reference_site, target_site):
        n = sum(sites.get(s.key) == site for s in chosen)
        if n < MIN_SUBJECTS_PER_SITE:
            known = sorted(set(sites.values()))
            raise ValueError(f"site {site!r} has {n} subject(s); at least "
                             f"{MIN_SUBJECTS_PER_SITE} are needed (sites: {known})")
    version = io.pipeline_version()
    runnable, prefailed = preflight(chosen, output_dir, version)
    shells, lmax = common_shells_and_lmax(runnable, lmax) if shells is None else \
        (shells, lmax or common_shells_and_lmax(runnable)[1])
    root = cache_root(output_dir, config)
    clean_cache(root)
    _log(config, f"harmonization fit: {reference_site} (reference) vs {target_site} (target), "
                 f"shells {shells}, lmax {lmax}, registration {registration} "
                 f"through {contrast}"
                 + (f", template blurred to coarser subjects' voxels ({match_resolution})"
                    if resolution_match_rule(match_resolution) else ""))
    # the methods text states the fit as run: the shells and order it resolved
    fit_config = copy.copy(config)
    fit_config.cohort = {**config.cohort, "harmonization_fit": replace(
        config.cohort["harmonization_fit"], reference=reference_site, target=target_site,
        shells=[float(b) for b in shells], harmonization_lmax=int(lmax),
        registration=registration, smoothing_fwhm=smoothing_fwhm_mm,
        registration_contrast=contrast, match_resolution=match_resolution)}
    write_methods(fit_config, output_dir / "dmriflow" / LOG_DIR, output_dir, len(chosen),
                  sum(bool(getattr(s, "mask", None)) for s in chosen), command=FIT_COMMAND)
    options = {**config.options_record(), "harmonize": {}}   # features of the acquired series
    task = HarmonizationFitWorkflow(
        subjects=[Subject.of(s) for s in runnable], options=options,
        sites={s.key: sites[s.key] for s in runnable},
        reference_site=reference_site, target_site=target_site, shells=list(shells),
        lmax=lmax, registration=registration, smoothing_fwhm_mm=smoothing_fwhm_mm,
        contrast=contrast, match_resolution=resolution_match_rule(match_resolution),
        pipeline_version=version)
    with submitter(config, root) as sub:
        res = sub(task, raise_errors=False)
    if res.errored or res.outputs is None:
        raise RuntimeError("harmonization fit failed: " + "\n".join(errors_of(res, root)))
    if config.drop_series:     # the fit is done: no node reads a series again
        _drop_series(root, {s.key for s in runnable}, config)
    result = dict(res.outputs.result)
    dest = output_dir / "dmriflow" / "harmonization" / result["content_id"][:12]
    if not dest.exists():
        io.atomic_write(dest, lambda tmp: shutil.copytree(result["artefact"], tmp,
                                                          dirs_exist_ok=True), folder=True)
    group = output_dir / "dmriflow" / "group"
    for key in ("site_effect", "preservation"):
        io.write_text(Path(result[key]).read_text(), group / f"harmonization_{key}.tsv")
        result[key] = str(group / f"harmonization_{key}.tsv")
    result["artefact"] = str(dest)
    result["excluded"] = result["excluded"] + [
        {"subject": r["subject"], "error": r["error"]} for r in prefailed]
    result["report"] = _write_report(output_dir, config)
    _log(config, f"artefact {shown_path(dest, output_dir)}; site effect table "
                 f"{shown_path(result['site_effect'], output_dir)}")
    return result
