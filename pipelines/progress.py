"""Progress while a run is going (pydra 1.0a12 prints nothing itself).

The hook runs in whichever process ran the node (a cf worker, a SLURM job),
so it writes one self-contained line per finished node: to stderr (unless the
run is quiet, or a progress bar shows it) and to the run's log file (always),
which every process finds through an environment variable and appends to.

On a terminal, :class:`ProgressBar` (rich) shows subjects done/failed/total,
finished steps and an ETA instead of the lines: it reads the same lines back
from the log file, so it counts the nodes of every worker (cf processes,
SLURM jobs on a shared file system). Not on a terminal (a pipe, a CI log, a
SLURM job's output), the plain lines stay as they are: tools parse them.

Absolute paths never reach the log file: a path inside OUTPUT is written
relative to it, any other as its file name (:func:`loggable`).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from pathlib import Path

from pydra.engine.hooks import TaskHooks
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text


#: Set to "0" (by execution, for quiet runs) to silence node progress lines;
#: an environment variable so that worker processes see it too.
PROGRESS_ENV = "DMRIFLOW_PROGRESS"
#: Path of the run's log file (set by execution for the run; workers inherit it).
LOG_ENV = "DMRIFLOW_LOG"
#: OUTPUT of the run (set with LOG_ENV): paths inside it are logged relative to it.
LOG_ROOT_ENV = "DMRIFLOW_LOG_ROOT"
#: PROGRESS_ENV while a progress bar shows the progress: no node lines on stderr.
BAR = "bar"
#: An absolute POSIX path of two or more components inside a message.
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/-])/(?:[^\s/:;,'\"()\[\]]+/)+[^\s/:;,'\"()\[\]]+")
#: A node's progress line: ``[dmriflow HH:MM:SS] <Task>[ <subject>]: <status>``.
PROGRESS_LINE = re.compile(r"^\[dmriflow [\d:]+\] (?P<task>[A-Za-z]\w*)(?: (?P<subject>\S+))?"
                           r": (?P<status>done|error|failed \((?P<step>[^)]*)\))$")
#: The node that ends a subject (its line says whether the subject is done or failed).
SUBJECT_END_TASK = "Export"


def shown_path(path, output_dir) -> str:
    """A path as the run log shows it: relative to OUTPUT when inside it (e.g.
    the default cache), else its name only (logs record no absolute path)."""
    if path is None:
        return "none"
    if output_dir:
        rel = os.path.relpath(path, output_dir)
        if not rel.startswith(os.pardir):
            return Path(rel).as_posix()
    return Path(path).name


#: How the terminal summary names OUTPUT when a path in it is not under the cwd.
OUTPUT_WORD = "OUTPUT"


def terminal_path(path, output_dir=None) -> str:
    """A path as the terminal summary prints it, never absolute: relative to the
    cwd when inside it, else ``OUTPUT/<path inside OUTPUT>`` when inside OUTPUT,
    else relative to the cwd (``../...``)."""
    here = Path.cwd().resolve()
    path = Path(path).resolve()
    if path.is_relative_to(here):
        return Path(os.path.relpath(path, here)).as_posix()
    if output_dir is not None and path.is_relative_to(Path(output_dir).resolve()):
        inside = path.relative_to(Path(output_dir).resolve()).as_posix()
        return OUTPUT_WORD + ("" if inside == "." else "/" + inside)
    return Path(os.path.relpath(path, here)).as_posix()


def terminal_text(text: str, output_dir=None) -> str:
    """``text`` (an error) with every absolute path shown as :func:`terminal_path`."""
    return ABSOLUTE_PATH.sub(lambda m: terminal_path(m.group(0), output_dir), text)


def loggable(text: str, root: str | None = None) -> str:
    """``text`` with every absolute path shown as :func:`shown_path` shows it,
    relative to ``root`` (OUTPUT; default: the run's, from LOG_ROOT_ENV)."""
    root = root if root is not None else os.environ.get(LOG_ROOT_ENV)
    return ABSOLUTE_PATH.sub(lambda m: shown_path(m.group(0), root), text)


def log_line(text: str, to_stderr: bool = True) -> None:
    """One timestamped line to stderr (optional) and to the run's log file.

    Each line is one small append (O_APPEND), and one write to stderr with its
    newline (``print`` writes the newline apart, and the terminal showed two
    workers' lines run together), so lines of several worker processes never
    mix; a log that cannot be written never fails a step.
    """
    line = f"[dmriflow {time.strftime('%H:%M:%S')}] {text}"
    if to_stderr:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    path = os.environ.get(LOG_ENV)
    if path:
        try:
            with open(path, "a") as fh:
                fh.write(loggable(line) + "\n")
        except OSError:
            pass


def _report(job, result) -> None:
    subject = getattr(job.task, "subject", None)
    subject = getattr(subject, "key", subject)      # a subject unit, or its key
    status = "error" if getattr(result, "errored", False) else "done"
    outputs = getattr(result, "outputs", None)
    for value in (getattr(outputs, name, None) for name in ("record", "product", "row")):
        if isinstance(value, dict) and value.get("status") == "failed":
            status = f"failed ({value.get('failed_step')})"
            break
    where = f" {subject}" if isinstance(subject, str) else ""
    log_line(f"{type(job.task).__name__}{where}: {status}",
             to_stderr=os.environ.get(PROGRESS_ENV, "1") == "1")


PROGRESS = TaskHooks(post_run=_report)


def bar_wanted(quiet: bool, stream=None) -> bool:
    """A progress bar instead of node lines: stderr is a terminal (not a pipe, a
    file or a dumb terminal) and the run is not quiet."""
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and not quiet and os.environ.get("TERM", "") != "dumb"


class _EtaColumn(ProgressColumn):
    """``ETA h:mm:ss`` from the mean time per finished step so far."""

    def render(self, task) -> Text:
        if task.finished:
            return Text("ETA 0:00:00")
        if not task.completed or task.elapsed is None:
            return Text("ETA -:--:--")
        left = task.elapsed * (task.total - task.completed) / task.completed
        h, rest = divmod(int(round(left)), 3600)
        return Text(f"ETA {h}:{rest // 60:02d}:{rest % 60:02d}")


class ProgressBar:
    """A rich progress bar over a run's subjects, fed by the run's log file.

    ``subjects``: units in the run, ``prefailed`` of them failed before
    submission; ``steps``: node lines a subject produces (its steps and
    Export). Nodes served from the cache print no line; the bar is completed
    when the run ends. A failed subject's line is printed above the bar.
    Use as a context manager around the engine call.
    """

    POLL_S = 0.2

    def __init__(self, log_path, subjects: int, steps: int, prefailed: int = 0):
        self.log_path = Path(log_path)
        self.total_steps = max(1, (subjects - prefailed) * steps)
        self.subjects, self.done, self.failed = subjects, 0, prefailed
        self.finished_steps = 0
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]dmriflow[/bold]"), BarColumn(),
            TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), _EtaColumn(),
            console=self.console, transient=False)
        self._stop = threading.Event()
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._previous = None

    def counts(self) -> str:
        return (f"{self.done} done, {self.failed} failed / {self.subjects} subjects; "
                f"{min(self.finished_steps, self.total_steps)}/{self.total_steps} steps")

    def __enter__(self):
        self._previous = os.environ.get(PROGRESS_ENV)
        os.environ[PROGRESS_ENV] = BAR
        self.task = self.progress.add_task("run", total=self.total_steps, counts=self.counts())
        self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._read()
        self.progress.update(self.task, completed=self.total_steps, counts=self.counts())
        self.progress.stop()
        if self._previous is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = self._previous
        return False

    def _follow(self) -> None:
        while not self._stop.wait(self.POLL_S):
            self._read()

    def _read(self) -> None:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except OSError:
            return
        complete = data[: data.rfind(b"\n") + 1]       # whole lines only
        self._offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            self.line(line)
        self.progress.update(self.task, completed=min(self.finished_steps, self.total_steps),
                             counts=self.counts())

    def line(self, line: str) -> None:
        """Count one log line (a node's progress line; other lines are ignored)."""
        m = PROGRESS_LINE.match(line)
        if m is None or not m["subject"]:
            return
        self.finished_steps += 1
        if m["task"] == SUBJECT_END_TASK:
            if m["status"] == "done":
                self.done += 1
            else:      # the subject's outcome, once (its later nodes only pass it on)
                self.failed += 1
                self.progress.console.print(line, markup=False, highlight=False)
