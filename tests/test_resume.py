"""A cohort run killed with SIGKILL mid-run, then resumed.

``dmriflow run`` (cf worker, 2 processes) runs as a subprocess in its own
process group; the whole group is killed as soon as the first subject's
status file exists, while one subject is held at its read (so the kill
lands mid-run whatever the machine's speed). Then: nothing half-written is visible under OUTPUT, a
status file exists only for complete subjects, and a rerun finishes the
cohort without recomputing finished subjects and gives the same group table
as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dmriflow.pipelines.derivatives import derivative_file
from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort

SMALL_SHAPE = (18, 22, 16)
N_SMALL = 4
#: The subject the killed run holds at its read until the kill: its folder.
HELD_SUBJECT = "9901"
#: The source hash is pinned in the child processes: other work in the same
#: checkout (editor saves, new files) must not change the pipeline version
#: between the killed run and the resume.
PINNED_SOURCE_HASH = "resume-test"
#: With HOLD_ENV set to a path, the held subject's read (both of io's read
#: paths) waits until that file exists: the workers are forked, so the patch
#: made here reaches them. The test never creates it; the kill ends the wait.
HOLD_ENV = "DMRIFLOW_TEST_HOLD"
#: The runner also gives SIGINT its default (KeyboardInterrupt), as a shell
#: does for a command typed at a terminal: a test session started in the
#: background (``pytest ... &`` in a script, nohup) inherits SIGINT ignored,
#: and an ignored disposition survives exec - the Ctrl-C case then tested
#: nothing (the run finished or outlived the timeout).
RUNNER = ("import os, signal, sys, time\n"
          "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
          "from dmriflow.interfaces import io\n"
          f"io.source_hash = lambda: {PINNED_SOURCE_HASH!r}\n"
          f"release = os.environ.get({HOLD_ENV!r})\n"
          "def held(read):\n"
          "    def wait_then_read(dwi, *args, **kwargs):\n"
          f"        while {HELD_SUBJECT!r} in os.fspath(dwi).split(os.sep) \\\n"
          "                and not os.path.exists(release):\n"
          "            time.sleep(0.05)\n"
          "        return read(dwi, *args, **kwargs)\n"
          "    return wait_then_read\n"
          "if release:\n"
          "    io.load_dwi_rows, io.decode_dwi = held(io.load_dwi_rows), held(io.decode_dwi)\n"
          "from dmriflow.pipelines.cli import main\n"
          "sys.exit(main(sys.argv[1:]))\n")
KILL_TIMEOUT_S = 120
#: A run told to stop (SIGINT) must be gone within this.
INTERRUPT_TIMEOUT_S = 30
#: Temporary names of io's atomic writes: ".<name>.<random>.tmp<ext>".
TEMP_MARK = ".tmp"


def scheme():
    return hcp_scheme(n_b0=4, shells=(1000, 2000), n_dirs=30, seed=1)


def make_cohort(root: Path) -> Path:
    write_cohort(root, N_SMALL, shape=SMALL_SHAPE, seed=0, scheme=scheme())
    held = write_cohort(root, 1, shape=SMALL_SHAPE, seed=9, scheme=scheme(), subject_prefix="99")
    assert held == [HELD_SUBJECT]
    return root


def start(*args, log: Path, hold: Path | None = None) -> subprocess.Popen:
    """``dmriflow ARGS`` in a new session (its own process group); with
    ``hold``, the held subject waits at its read until that file exists."""
    env = {**os.environ, HOLD_ENV: str(hold)} if hold else None
    return subprocess.Popen([sys.executable, "-c", RUNNER, *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            start_new_session=True, env=env)


def run(*args, log: Path) -> int:
    proc = start(*args, log=log)
    try:
        return proc.wait(timeout=KILL_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def status_files(out: Path) -> dict[str, Path]:
    return {p.name.split("_desc-")[0]: p for p in (out / "dmriflow").glob("sub-*/*_status.json")}


def kill_mid_run(cohort: Path, out: Path, log: Path, sig: int) -> set[str]:
    """Start a run that holds one subject at its read; send ``sig`` to its
    process group once a status file exists (SIGINT: what Ctrl-C in a
    terminal does)."""
    proc = start("run", cohort, out, "--worker", "cf", "--n-procs", "2", log=log,
                 hold=out.parent / f"{out.name}.never-released")
    deadline = time.monotonic() + KILL_TIMEOUT_S
    try:
        while not status_files(out):
            assert proc.poll() is None, f"run ended before the kill:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no subject finished in time"
            time.sleep(0.005)
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=INTERRUPT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run was still alive {INTERRUPT_TIMEOUT_S} s after "
                                 f"{signal.Signals(sig).name}:\n{log.read_text()[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _wait_group_gone(proc.pid)
    return set(status_files(out))


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Workers of the killed group are gone (no process left writing)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process group {pgid} still alive after SIGKILL")


def snapshot(out: Path, subject: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file of a subject: an atomic rewrite gets a new inode."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (out / "dmriflow" / subject).rglob("*") if p.is_file()}


def visible_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)]


def assert_nothing_half_written(out: Path) -> None:
    root = out / "dmriflow"
    for p in visible_files(root):
        assert TEMP_MARK not in p.name, p
        if p.name.endswith(".nii.gz"):
            img = nib.load(p)
            data = np.asanyarray(img.dataobj)     # decompresses every byte
            assert data.shape == img.shape, p
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".tsv":
            lines = p.read_text().splitlines()
            assert lines and all(line.count("\t") == lines[0].count("\t") for line in lines), p
    for subject, path in status_files(out).items():
        row = json.loads(path.read_text())
        assert row["status"] == "done", (subject, row)
        names = {Path(d).name for d in row["derivatives"]}
        present = {p.name for p in (root / subject / "dwi").glob("*.nii.gz")}
        assert names and names == present, subject
        for d in row["derivatives"]:
            assert derivative_file(d.replace(".nii.gz", ".json"), out).exists(), d


def progress_subjects(log: Path, task: str) -> set[str]:
    """Subjects for which the run's progress lines report ``task`` as run."""
    return {line.split(f"{task} ", 1)[1].split(":")[0] for line in log.read_text().splitlines()
            if f"] {task} sub-" in line}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same cohort run once without interruption."""
    tmp = tmp_path_factory.mktemp("resume")
    cohort = make_cohort(tmp / "in")
    code = run("run", cohort, tmp / "clean", "--worker", "cf", "--n-procs", "2",
               log=tmp / "clean.log")
    assert code == 0, (tmp / "clean.log").read_text()
    return tmp, cohort


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_run_resumes_without_recomputing_finished_subjects(reference, sig):
    tmp, cohort = reference
    out = tmp / f"killed-{sig.name}"
    log, resume_log = tmp / f"killed-{sig.name}.log", tmp / f"resume-{sig.name}.log"
    finished = kill_mid_run(cohort, out, log, sig)
    planned = {f"sub-{d.name}" for d in cohort.iterdir() if d.name.isdigit()}
    assert finished and finished < planned, "the kill must land mid-run"
    assert f"sub-{HELD_SUBJECT}" not in finished, "the held subject was not held"
    assert_nothing_half_written(out)
    before = {s: snapshot(out, s) for s in finished}
    # what the kill left: the engine's soft locks and job files, temporary files
    cache = out / ".dmriflow-cache"
    leftovers = [p for pattern in ("*.lock", "*_info.json") for p in cache.glob(pattern)
                 if p.name != ".dmriflow-run.lock"]
    leftovers += [p for p in (out / "dmriflow").rglob(".*") if TEMP_MARK in p.name]
    assert any(p.suffix == ".lock" for p in leftovers) or sig == signal.SIGINT

    code = run("run", cohort, out, "--worker", "cf", "--n-procs", "2", log=resume_log)
    assert code == 0, resume_log.read_text()
    assert set(status_files(out)) == planned
    assert_nothing_half_written(out)
    assert not [p for p in (out / "dmriflow").rglob("*") if TEMP_MARK in p.name]
    if leftovers:
        assert f"removed {len(leftovers)} leftover(s) of an interrupted run" in \
            resume_log.read_text()
    assert not any(p.exists() for p in leftovers)
    # finished subjects: not one file rewritten, no fit run again (the engine
    # may run Export again when the kill lost its result record: it finds the
    # identical export in place and leaves it) ...
    assert {s: snapshot(out, s) for s in finished} == before
    for task in ("Validate", "FitTensor", "FitRish"):
        ran = progress_subjects(resume_log, task)
        assert not ran & finished, (task, ran & finished)
    # ... and the rest were run by the resume (the progress lines are not silent)
    assert progress_subjects(resume_log, "Export") >= planned - finished
    clean = (tmp / "clean" / "dmriflow" / "group" / "subjects.tsv").read_text()
    assert (out / "dmriflow" / "group" / "subjects.tsv").read_text() == clean


class Killed(KeyboardInterrupt):
    """Ctrl-C inside a step: nothing after it runs, no Exception handler sees it."""


def test_interrupted_reexport_never_leaves_an_old_done_status(tmp_path, monkeypatch):
    """New code re-exports a done subject; the export dies after two files.
    The old status file ("done", old version) must be gone: the subject is
    missing, not done with a mix of old and new files. A rerun completes it."""
    from dmriflow.interfaces import io
    from dmriflow.pipelines.execution import RunConfig, run_cohort, status_table
    from dmriflow.pipelines.inputs import discover

    write_cohort(tmp_path / "in", 1, shape=SMALL_SHAPE, seed=0, scheme=scheme())
    subjects = discover(tmp_path / "in")
    cfg = RunConfig(worker="debug", cache_dir=str(tmp_path / "cache"), quiet=True)
    monkeypatch.setattr(io, "pipeline_version", lambda: "0.1.0+old")
    run_cohort(subjects, tmp_path / "out", cfg)
    assert list(status_table(tmp_path / "out")["status"]) == ["done"]

    monkeypatch.setattr(io, "pipeline_version", lambda: "0.1.0+new")
    real, calls = io.copy_file, []

    def dies_on_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise Killed
        return real(src, dst)

    # patched on the io module: the engine may run a by-value copy of the step
    # functions (their own globals), but they reach io through the module
    monkeypatch.setattr(io, "copy_file", dies_on_third)
    with pytest.raises(Killed):
        run_cohort(subjects, tmp_path / "out", cfg)
    assert not status_files(tmp_path / "out")
    table = status_table(tmp_path / "out")
    assert list(table["status"]) == ["missing"]
    assert table["export"][0] == "missing"

    monkeypatch.setattr(io, "copy_file", real)
    result = run_cohort(subjects, tmp_path / "out", cfg)
    assert [r["status"] for r in result.rows] == ["done"]
    (row,) = [json.loads(p.read_text()) for p in status_files(tmp_path / "out").values()]
    assert row["pipeline_version"] == "0.1.0+new"
    for nii in row["derivatives"]:
        meta = json.loads(derivative_file(nii.replace(".nii.gz", ".json"),
                                          tmp_path / "out").read_text())
        assert meta["GeneratedBy"][0]["PipelineVersion"] == "0.1.0+new"
