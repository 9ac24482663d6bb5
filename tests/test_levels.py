"""The participant and group levels: several participant jobs of different
subjects at once on one OUTPUT and one cache (each holds its subject's lock);
a second job of the same subject refused (exit 3, the holder named); the
cohort files never shrunk to one job's subset; lock files never followed
through a symbolic link; a job sharing the cache clears only its own
subjects' leftovers.

Every job here is a real ``dmriflow`` process on the phantom cohort.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
from dmriflow.pipelines import cli
from dmriflow.pipelines.execution import cohort_files, run_holder, unit_holders
from dmriflow.pipelines.locks import (COHORT_LOCK, RUN_LOCK, UNIT_LOCK_DIR, node_units,
                                      open_lock, sign)

SHAPE = (12, 14, 10)
DMRIFLOW = str(Path(sys.executable).with_name("dmriflow"))
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("levels") / "in"
    write_cohort(root, 3, layout="bids", shape=SHAPE, seed=0,
                 scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1))
    return root


def job(cohort: Path, out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    """A participant job, as a scheduler would start it."""
    return subprocess.Popen([DMRIFLOW, str(cohort), str(out), "participant", "-w", str(cache),
                             "--worker", "cf", "--nprocs", "1", "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=JOB_TIMEOUT_S)
    return proc.returncode, out + err


def wait_for(condition, what: str, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "dmriflow" / "group" / "subjects.tsv", sep="\t",
                       keep_default_na=False).set_index("subject")


def test_two_participant_jobs_share_output_and_cache_then_group(cohort, tmp_path):
    """Jobs of sub-01 and sub-02 started together both run (each holds its own
    lock at the same moment: the test holds the cohort files' lock, which both
    need, until it has seen both subject locks held), both finish, the table
    holds both; `group` then gives the whole cohort's table and census."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    with cohort_files(out):
        jobs = [job(cohort, out, cache, "--participant-label", label) for label in ("01", "02")]
        try:
            wait_for(lambda: unit_holders(out / "dmriflow") == ["sub-01", "sub-02"],
                     "both jobs to hold their subject's lock")
            # `dmriflow status` names them (both share the output folder's run lock)
            wait_for(lambda: (run_holder(out / "dmriflow") or "").startswith(
                "2 participant job(s): pid "), "both jobs to share the output folder")
            assert run_holder(out / "dmriflow").endswith("; running sub-01, sub-02")
        except AssertionError:
            for p in jobs:
                p.kill()
            raise AssertionError("both jobs did not run at once: "
                                 + " | ".join(finish(p)[1] for p in jobs)) from None
    results = [finish(p) for p in jobs]
    assert [code for code, _ in results] == [cli.EXIT_OK, cli.EXIT_OK], results
    assert all("another dmriflow" not in text for _, text in results)
    t = table(out)
    assert sorted(t.index) == ["sub-01", "sub-02"] and set(t["status"]) == {"done"}
    # one cache: the nodes of both subjects are in it
    exports = [node_units(d) for d in cache.glob("python-*")
               if (d / "_dmriflow_step").is_file() and (d / "_dmriflow_step").read_text()
               == "export"]
    assert sorted(k for units in exports for k in units) == ["sub-01", "sub-02"]

    (out / "dmriflow" / "group" / "subjects.tsv").unlink()        # group rebuilds it
    proc = subprocess.run([DMRIFLOW, str(cohort), str(out), "group", "--participant-label",
                           "01", "02"], capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == cli.EXIT_OK, proc.stdout + proc.stderr
    assert "2 of 2 done" in proc.stdout
    t = table(out)
    assert sorted(t.index) == ["sub-01", "sub-02"] and set(t["status"]) == {"done"}
    assert t.loc["sub-01", "median_fa"] != "" and t.loc["sub-02", "median_fa"] != ""
    census = pd.read_csv(out / "dmriflow" / "group" / "census.tsv", sep="\t")
    assert sorted(census["subject"]) == ["sub-01", "sub-02"]
    assert (out / "dmriflow" / "report.html").is_file()
    # the whole INPUT at the group level: sub-03 was never run
    proc = subprocess.run([DMRIFLOW, str(cohort), str(out), "group"], capture_output=True,
                          text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == cli.EXIT_SUBJECTS_FAILED
    assert list(table(out)["status"]) == ["done", "done", "missing"]


def test_a_second_job_of_the_same_subject_is_refused(cohort, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    with cohort_files(out):            # the first job waits, holding sub-01's lock
        first = job(cohort, out, cache, "--participant-label", "01")
        try:
            wait_for(lambda: unit_holders(out / "dmriflow") == ["sub-01"], "the first job")
            code, text = finish(job(cohort, out, cache, "--participant-label", "sub-01"))
        except BaseException:
            first.kill()
            raise
    assert code == cli.EXIT_BUSY, text
    assert "sub-01: another dmriflow job is running this unit" in text
    assert f"pid {first.pid} on " in text
    assert str(out / "dmriflow" / UNIT_LOCK_DIR / "sub-01.lock") in text
    assert finish(first)[0] == cli.EXIT_OK
    assert list(table(out).index) == ["sub-01"]
    assert not unit_holders(out / "dmriflow")                   # released with their jobs


def test_participant_after_a_full_run_keeps_every_row(cohort, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert finish(job(cohort, out, cache))[0] == cli.EXIT_OK
    before = table(out)
    assert len(before) == 3
    report = (out / "dmriflow" / "report.html").stat().st_mtime_ns
    code, text = finish(job(cohort, out, cache, "--participant-label", "02"))
    assert code == cli.EXIT_OK, text
    # a job of some subjects leaves the report (it reads every subject) to `group`
    assert "report: left to the group level" in text
    assert (out / "dmriflow" / "report.html").stat().st_mtime_ns == report
    after = table(out)
    assert list(after.index) == ["sub-01", "sub-02", "sub-03"]
    assert set(after["status"]) == {"done"}
    pd.testing.assert_frame_equal(after.drop(columns="pipeline_version"),
                                  before.drop(columns="pipeline_version"))
    plan = json.loads((out / "dmriflow" / "group" / "cohort.json").read_text())
    assert [e["key"] for e in plan["subjects"]] == ["sub-01", "sub-02", "sub-03"]
    census = pd.read_csv(out / "dmriflow" / "group" / "census.tsv", sep="\t")
    assert list(census["subject"]) == ["sub-01", "sub-02", "sub-03"]
    assert set(census["protocol"]) == {"P1"}
    assert cli.main(["status", str(out)]) == cli.EXIT_OK


@pytest.mark.parametrize("lock", ["unit", "unit locks' folder", "cohort", "run",
                                  "run journal"])
def test_a_symlinked_lock_is_not_followed(cohort, tmp_path, capsys, lock):
    out = tmp_path / "out"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    path = {"unit": out / "dmriflow" / UNIT_LOCK_DIR / "sub-01.lock",
            "unit locks' folder": out / "dmriflow" / UNIT_LOCK_DIR,
            "cohort": out / "dmriflow" / COHORT_LOCK,
            "run": tmp_path / "cache" / RUN_LOCK,
            "run journal": tmp_path / "cache" / ".dmriflow-run-4242-planted.json"}[lock]
    path.parent.mkdir(parents=True)
    if lock == "unit locks' folder":       # a folder holding a file of the lock's name
        (tmp_path / "elsewhere").mkdir()
        victim = tmp_path / "elsewhere" / "sub-01.lock"
        victim.write_text("precious\n")
        path.symlink_to(victim.parent)
    else:
        path.symlink_to(victim)
    code = cli.main([str(cohort), str(out), "participant", "--participant-label", "01",
                     "--worker", "debug", "--quiet", "-w", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_INPUT, err
    what = lock if lock.endswith(("folder", "journal")) else f"{lock} lock"
    assert f"{path}: the {what} is a symbolic link" in err
    assert victim.read_text() == "precious\n"
    assert path.is_symlink()


def test_a_job_sharing_the_cache_clears_only_its_own_subjects_leftovers(cohort, tmp_path):
    """A job killed while computing sub-01 and sub-02 left Pydra's soft lock
    files of their Validate nodes; a new job of sub-01 starts while another
    job shares the cache: it removes sub-01's stale lock (or it would wait on it
    for ever) and leaves sub-02's, which it cannot tell from a running job's."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert finish(job(cohort, out, cache, "--participant-label", "01", "02"))[0] == cli.EXIT_OK
    validate = {next(iter(node_units(d))): d for d in cache.glob("python-*")
                if (d / "_dmriflow_step").read_text() == "validate"}
    stale = {}
    for key in ("sub-01", "sub-02"):
        (validate[key] / "_result.pklz").unlink()              # killed before its result
        stale[key] = validate[key].with_suffix(".lock")
        stale[key].write_text("")
    for d in cache.glob("workflow-*"):
        (d / "_result.pklz").unlink(missing_ok=True)
    with open_lock(cache / RUN_LOCK) as other:                 # another job shares the cache
        fcntl.flock(other, fcntl.LOCK_SH)
        proc = job(cohort, out, cache, "--participant-label", "01")
        try:
            code, text = finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == cli.EXIT_OK, text
    assert not stale["sub-01"].exists() and stale["sub-02"].exists()
    assert (validate["sub-01"] / "_result.pklz").is_file()     # recomputed
    log = sorted((out / "dmriflow" / "logs").glob("run-*.log"))[-1].read_text()
    assert "removed 1 leftover(s) of an interrupted run" in log
    assert "sharing OUTPUT/cache with other jobs" in log


def test_harmonize_fit_style_exclusive_holder_refuses_participant_jobs(cohort, tmp_path):
    """A run that needs OUTPUT whole (exclusive run lock, signed) refuses a
    participant job at once, naming it; sign() is what such a holder writes."""
    out = tmp_path / "out"
    (out / "dmriflow").mkdir(parents=True)
    with open_lock(out / "dmriflow" / RUN_LOCK) as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        sign(fh)
        t0 = time.monotonic()
        code, text = finish(job(cohort, out, tmp_path / "cache", "--participant-label", "01"))
    assert code == cli.EXIT_BUSY and "another dmriflow run is using this folder" in text
    assert time.monotonic() - t0 < 60                          # refused, not waited for


def test_slurm_array_scripts_carry_the_options_and_one_unit_per_task(tmp_path, capsys):
    """What each array task and the group job run (the submission itself is
    tested on the local cluster in tests/test_slurm.py)."""
    from dmriflow.pipelines.inputs import SubjectInputs
    from dmriflow.pipelines.submit import array_script, group_script, _split
    argv = ["--participant-label", "01", "sub-02", "--slurm-array", "4", "-w", "my cache",
            "--sbatch-args=--time=5 --mem=1G", "--quiet", "--session-label=1", "--lmax", "6"]
    options, chosen = _split(argv)
    assert options == ["-w", "my cache", "--quiet", "--lmax", "6"]
    assert chosen == ["--participant-label", "01", "sub-02", "--session-label=1"]
    units = [SubjectInputs("01", "d", "b", "v", session="1"), SubjectInputs("02", "d", "b", "v")]
    script = array_script(Path("/in"), Path("/o ut"), units, options)
    assert "    '--participant-label 01 --session-label 1'\n" in script
    assert "    '--participant-label 02'\n" in script
    assert ("participant -w 'my cache' --quiet --lmax 6 --nprocs \"${SLURM_CPUS_PER_TASK:-1}\" "
            "${UNITS[$SLURM_ARRAY_TASK_ID]}\n") in script
    assert "'/o ut' participant" in script and "--slurm-array" not in script
    assert "--nprocs \"$" not in array_script(Path("/in"), Path("/o"), units, ["--nprocs", "3"])
    group = group_script(Path("/in"), Path("/o"), options + chosen)
    assert group.rstrip().endswith("/in /o group -w 'my cache' --quiet --lmax 6 "
                                   "--participant-label 01 sub-02 --session-label=1")
    # combinations that make no sense are refused before anything is submitted
    cohort = tmp_path / "in"
    write_cohort(cohort, 1, layout="bids", shape=SHAPE, seed=0,
                 scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1))
    for extra, phrase in ((["--worker", "slurm"], "--worker slurm"),
                          (["--rerun-failed"], "--rerun-failed")):
        code = cli.main([str(cohort), str(tmp_path / "out"), "participant", "--slurm-array",
                         *extra])
        assert code == cli.EXIT_INPUT and phrase in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_signing_a_lock_replaces_a_longer_holder_text(tmp_path):
    """sign() writes over the old text and cuts the file at its end (no truncation to
    zero first: ext4 flushes such a file on close); nothing of a longer text remains."""
    import os
    path = tmp_path / "x.lock"
    path.write_text("pid 1 on an-old-and-much-longer-host-name (" + "x" * 200 + ")\n")
    with open_lock(path) as fh:
        sign(fh, "upkeep")
    text = path.read_text()
    assert text.startswith(f"pid {os.getpid()} on ") and text.endswith(" (upkeep)\n")
    assert text.count("\n") == 1
    assert "xxxx" not in text
