"""Pydra's SLURM worker with jobs that SLURM ended early reported as failures.

Pydra 1.0a12 requeues a job that SLURM cancelled, timed out or preempted
(``scontrol requeue``), so ``scancel`` never stops a run and a job over its
time limit loops; with ``--no-requeue`` it treats the ended job as finished,
finds no result and spins forever. Here such a job fails its node with the
SLURM state and the job's stderr file named, so the run reports the failure,
the other subjects go on, and a rerun resubmits only what is missing.

Pydra also submits a job for every node of a workflow it expands, even one
whose result is already cached (the job then only loads it); here a cached
node is answered without a job, so a rerun after a failure costs as many
SLURM jobs as there are nodes left to compute, not one per node.
"""

from __future__ import annotations

from pydra.engine.submitter import Submitter  # noqa: F401  (before pydra.workers; OPERATIONS.md)
from pydra.workers import slurm

#: sacct states of a job that SLURM ended before it could write a result.
ENDED_EARLY = ("CANCELLED", "TIMEOUT", "PREEMPTED")


class JobEndedError(RuntimeError):
    """A SLURM job ended (cancelled, timed out, preempted) without a result."""


class SlurmWorker(slurm.SlurmWorker):
    """One SLURM job per node (``sbatch``), watched with ``squeue`` and ``sacct``."""

    _plugin_name = "slurm"   # a plain subclass: attrs would replace pydra's pickling rules

    async def run(self, job, rerun: bool = False):
        if not rerun and _cached(job):
            return True
        return await super().run(job, rerun=rerun)

    async def _poll_job(self, jobid):
        state = await super()._poll_job(jobid)
        if state in ENDED_EARLY:
            raise JobEndedError(f"SLURM job {jobid} was {state.lower()} before it finished "
                                f"(stderr: {self.error.get(jobid)})")
        return state


def _cached(job) -> bool:
    """Whether the node's successful result is in the cache already."""
    try:
        result = job.result()
    except Exception:  # noqa: BLE001 - an unreadable result is recomputed by a job
        return False
    return result is not None and not result.errored
