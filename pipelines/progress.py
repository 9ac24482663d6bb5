"""Progress lines while a run is going (pydra 1.0a12 prints nothing itself).

The hook runs in whichever process ran the node (a cf worker, a SLURM job),
so it writes one self-contained line to stderr per finished node.
"""

from __future__ import annotations

import os
import sys
import time

from pydra.engine.hooks import TaskHooks


#: Set to "0" (by execution, for quiet runs) to silence node progress lines;
#: an environment variable so that worker processes see it too.
PROGRESS_ENV = "DMRIFLOW_PROGRESS"


def _report(job, result) -> None:
    if os.environ.get(PROGRESS_ENV, "1") == "0":
        return
    subject = getattr(job.task, "subject", None)
    status = "error" if getattr(result, "errored", False) else "done"
    outputs = getattr(result, "outputs", None)
    for value in (getattr(outputs, name, None) for name in ("record", "tensor", "rish", "row")):
        if isinstance(value, dict) and value.get("status") == "failed":
            status = f"failed ({value.get('failed_step')})"
            break
    where = f" {subject}" if isinstance(subject, str) else ""
    print(f"[dmriflow {time.strftime('%H:%M:%S')}] {type(job.task).__name__}{where}: {status}",
          file=sys.stderr, flush=True)


PROGRESS = TaskHooks(post_run=_report)
