"""Lock and journal files: who may write what under OUTPUT and in the cache.

Every lock is a ``flock`` on a small file, opened without following a
symbolic link (``O_NOFOLLOW``), so a planted link never makes dmriflow
truncate its target; the kernel drops a lock when its holder dies (even by
SIGKILL), so a lock that can be taken proves that its holder is gone.

- The **run lock** (``.dmriflow-run.lock`` in OUTPUT/dmriflow and in the cache
  root) is held *shared* by the jobs that compute units (``participant``,
  ``run``) and *exclusively* by whatever needs the whole folder (``harmonize
  fit``, and a job's short upkeep of leftovers when it finds itself alone).
- A **unit lock** (``OUTPUT/dmriflow/.dmriflow-locks/<unit>.lock``, the unit
  named by :mod:`dmriflow.interfaces.bids_names` from its entities, e.g.
  ``sub-01_ses-1.lock``) is held exclusively by the one job that computes and
  exports that unit: two jobs of different units share OUTPUT and the cache,
  a second job of the same unit is refused.
- The **cohort lock** (``OUTPUT/dmriflow/.dmriflow-cohort.lock``) is held while
  the cohort files (plan, census, group table, report) are read and written.
- A **journal** (``.dmriflow-run-<pid>-<random>.json`` in the cache root) is
  created with ``O_EXCL | O_NOFOLLOW`` and held locked while its job runs; one
  that can be locked belongs to a job that died, whose node results are then
  checked (:func:`dmriflow.pipelines.execution.discard_interrupted_results`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import cloudpickle  # what Pydra pickles jobs with

from dmriflow.interfaces.bids_names import build_name
from dmriflow.interfaces.errors import InputError

#: Lock file held (flock) in the output and cache folders for a whole run.
RUN_LOCK = ".dmriflow-run.lock"
#: Folder of the unit locks, under OUTPUT/dmriflow.
UNIT_LOCK_DIR = ".dmriflow-locks"
UNIT_LOCK_EXTENSION = ".lock"
#: Held while the cohort files are written, under OUTPUT/dmriflow.
COHORT_LOCK = ".dmriflow-cohort.lock"
#: The journal of a run that holds the cache alone (``harmonize fit``) ...
RUN_JOURNAL = ".dmriflow-run.json"
#: ... and of each job sharing the cache: ``.dmriflow-run-<pid>-<random>.json``.
JOURNAL_PREFIX = ".dmriflow-run-"
JOURNAL_PATTERN = re.compile(rf"^{re.escape(RUN_JOURNAL)}$|^{re.escape(JOURNAL_PREFIX)}.*\.json$")
#: Written into a run lock by a job doing its short upkeep alone: a job that finds
#: the lock taken waits for such a holder (up to BRIEF_WAIT_S) instead of giving up.
UPKEEP = "upkeep of leftovers"
#: How long a job waits for a lock held only briefly (another job's upkeep, the
#: cohort files being written) before it gives up.
BRIEF_WAIT_S = 300.0
POLL_S = 0.2
#: Pydra job file of a node folder (its task with the inputs it ran on).
JOB_FILE = "_job.pklz"
#: Task inputs that name the units a node belongs to (``entry``: a features record,
#: input of the harmonization fit's per-subject nodes).
UNIT_INPUTS = ("subject", "subjects", "rows", "extra_rows", "entry")


class RunInProgress(RuntimeError):
    """Another dmriflow run holds the output or cache folder, or the unit."""


def open_lock(path: Path, what: str = "run lock"):
    """A lock file, opened (created if needed) without following a symbolic link."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(path, f"the {what} is a symbolic link; dmriflow does not "
                                   f"follow it (remove the link)") from None
        raise
    return os.fdopen(fd, "r+")


def try_lock(fh, mode: int, wait_s: float = 0.0, while_holder=None) -> bool:
    """``flock(mode)`` without blocking; retried for up to ``wait_s`` seconds
    (only while ``while_holder(fh)`` is true, when given)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline or (while_holder and not while_holder(fh)):
                return False
            time.sleep(POLL_S)


def holder(fh) -> str:
    """The text the holder of a lock wrote into it."""
    fh.seek(0)
    return fh.read().strip()


def me(what: str = "") -> str:
    """This process, as a lock holder names itself: pid, host, start, SLURM job."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job
           else os.environ.get("SLURM_JOB_ID"))
    return (f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%dT%H:%M:%S')}" + (f", SLURM job {job}" if job else "")
            + (f" ({what})" if what else ""))


def sign(fh, what: str = "") -> None:
    """Write this process's name into a lock it holds exclusively.

    Written over the old text, then cut at its end: truncating a non-empty file
    to zero first makes ext4 (auto_da_alloc) flush it to disk on close, 2-3 ms
    per lock, seconds for the unit locks of a large cohort."""
    fh.seek(0)
    fh.write(me(what) + "\n")
    fh.truncate()          # (at the position written to: a longer old text's tail goes)
    fh.flush()


def unit_lock_name(entities: dict) -> str:
    """``sub-01_ses-1_run-1.lock``: the unit's entities (subject, session and, for one
    of several series, the series' own) through the one grammar of names."""
    return build_name(entities, "", UNIT_LOCK_EXTENSION)


def unit_lock_path(dataset: Path, entities: dict) -> Path:
    return Path(dataset, UNIT_LOCK_DIR, unit_lock_name(entities))


def lock_holders(path: Path) -> list[tuple[str, str]]:
    """(READ or WRITE, pid) of every flock on ``path`` now, from /proc/locks (Linux;
    asking takes no lock, so it never makes a starting run fail). Locks taken on
    another host of a shared file system are not visible here."""
    try:
        st = path.stat()
        with open("/proc/locks") as fh:
            table = fh.read().split("\n")
    except OSError:
        return []
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return [(f[3], f[4]) for line in table
            if len(f := line.split()) > 5 and f[1] == "FLOCK" and f[5] == inode]


@contextmanager
def journal(root: Path, units: list[str]):
    """This job's journal in the cache root, created with O_EXCL | O_NOFOLLOW and
    locked while the job runs; removed when the body completes (an interrupted
    job leaves it, unlocked, for the next job to find). Yields its path."""
    path = root / f"{JOURNAL_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.json"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with os.fdopen(fd, "r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps({"started": time.time(), "pid": os.getpid(), "units": units}))
        fh.flush()
        yield path
        path.unlink(missing_ok=True)


def write_new(path: Path, text: str) -> None:
    """Create ``path`` with ``text``; never through a link, never over a file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def dead_journals(root: Path, own: Path | None = None) -> list[tuple[Path, dict]]:
    """(path, content) of the journals in ``root`` whose job is gone (their lock
    can be taken; the plain RUN_JOURNAL of an exclusive run is never locked)."""
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not JOURNAL_PATTERN.match(path.name) or path == own:
            continue
        if path.is_symlink():
            raise InputError(path, "the run journal is a symbolic link; dmriflow does not "
                                   "follow it (remove the link)")
        try:
            with open(path, "r", opener=_nofollow) as fh:
                if not try_lock(fh, fcntl.LOCK_EX):
                    continue                          # its job is running
                content = json.loads(fh.read() or "{}")
                fcntl.flock(fh, fcntl.LOCK_UN)
        except (OSError, ValueError):
            content = {}
        found.append((path, content if isinstance(content, dict) else {}))
    return found


def _nofollow(path, flags):
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


def node_units(folder: Path) -> set[str]:
    """The units (subject keys) a cache node folder belongs to, from the inputs
    in its Pydra job file; empty when unknown. Call only on a claimed cache
    (the job file is a pickle)."""
    try:
        with open(Path(folder, JOB_FILE), "rb") as fh:
            task = cloudpickle.load(fh).task
    except Exception:  # noqa: BLE001 - a folder that cannot be read is nobody's
        return set()
    keys = set()
    for name in UNIT_INPUTS:
        value = getattr(task, name, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            key = item.get("subject") if isinstance(item, dict) else getattr(item, "key", item)
            if isinstance(key, str) and key:
                keys.add(key)
    return keys
