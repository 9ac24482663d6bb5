"""Progress lines while a run is going (pydra 1.0a12 prints nothing itself).

The hook runs in whichever process ran the node (a cf worker, a SLURM job),
so it writes one self-contained line per finished node: to stderr (unless the
run is quiet) and to the run's log file (always), which every process finds
through an environment variable and appends to.
"""

from __future__ import annotations

import os
import sys
import time

from pydra.engine.hooks import TaskHooks


#: Set to "0" (by execution, for quiet runs) to silence node progress lines;
#: an environment variable so that worker processes see it too.
PROGRESS_ENV = "DMRIFLOW_PROGRESS"
#: Path of the run's log file (set by execution for the run; workers inherit it).
LOG_ENV = "DMRIFLOW_LOG"


def log_line(text: str, to_stderr: bool = True) -> None:
    """One timestamped line to stderr (optional) and to the run's log file.

    Each line is one small append (O_APPEND), so lines of several worker
    processes never mix; a log that cannot be written never fails a step.
    """
    line = f"[dmriflow {time.strftime('%H:%M:%S')}] {text}"
    if to_stderr:
        print(line, file=sys.stderr, flush=True)
    path = os.environ.get(LOG_ENV)
    if path:
        try:
            with open(path, "a") as fh:
                fh.write(line + "\n")
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
             to_stderr=os.environ.get(PROGRESS_ENV, "1") != "0")


PROGRESS = TaskHooks(post_run=_report)
