"""What every run pays whatever the size of its subjects (issue 14): the
process's end (no garbage collection over the libraries' objects) and the
report's imports, made beside the engine in the cf worker's parent process
once its worker processes exist."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading

from pydra.engine.submitter import Submitter

from dmriflow.pipelines import cli, execution

#: Longest wait on the helper thread of a test (never reached when it works).
WAIT_S = 30


def test_the_command_freezes_the_collector_before_the_process_ends(tmp_path):
    """As the process's command (``argv=None``) ``main`` leaves every object
    to the frozen generation, so the interpreter's shutdown does not collect
    over them; called as a function (a test, a library) it leaves the
    collector as it was."""
    script = ("import gc, sys\n"
              "from dmriflow.pipelines.cli import main\n"
              f"sys.argv = ['dmriflow', 'status', {str(tmp_path)!r}]\n"
              "code = main()\n"
              "print(code, gc.get_freeze_count() > 0)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    assert out == [str(cli.EXIT_INPUT), "True"]     # no run in tmp_path: an input error
    before = gc.get_freeze_count()
    assert cli.main(["status", str(tmp_path)]) == cli.EXIT_INPUT
    assert gc.get_freeze_count() == before


def test_work_beside_the_engine_starts_after_its_processes_are_forked(tmp_path):
    """The work starts once the pool was handed its first job (every process of
    the cf pool exists then: none may inherit its import locks), in another
    thread while the caller goes on; :func:`execution.prepared` waits for it."""
    release, started, seen = threading.Event(), threading.Event(), {}
    with Submitter(worker="cf", n_procs=2, cache_root=tmp_path) as sub:
        pool = sub.worker.pool

        def work():
            seen["thread"] = threading.current_thread()
            seen["processes"] = len(pool._processes)
            started.set()
            seen["released"] = release.wait(WAIT_S)

        assert execution.prepare_beside(sub, work)
        assert not started.wait(0.5) and pool._processes == {}    # no job yet: nothing
        assert pool.submit(sum, [1, 2]).result() == 3             # the first job
        assert started.wait(WAIT_S) and "released" not in seen    # the caller went on
        release.set()
        execution.prepared()
        assert seen["released"] and seen["thread"] is not threading.current_thread()
        assert seen["processes"] == 2
        assert pool.submit(sum, [3, 4]).result() == 7              # later jobs as before
        assert "submit" not in vars(pool)


def test_no_work_beside_a_worker_that_runs_nodes_in_this_process(tmp_path):
    ran = []
    with Submitter(worker="debug", cache_root=tmp_path) as sub:
        assert not execution.prepare_beside(sub, lambda: ran.append(1))
    execution.prepared()
    assert ran == []
