"""The slurm worker on a real SLURM cluster (scripts/slurm-cluster.sh, accounting on).

A phantom cohort run as SLURM jobs gives the cf worker's group table; every job
carries the run's sbatch arguments (checked in ``sacct``); a job cancelled with
``scancel`` fails its run, and a rerun completes every subject.

The session fixture reuses the cluster named by ``SLURM_CONF`` when it has the
``debug`` and ``gpu`` partitions (``.ci/run`` starts one), else starts its own
(root, Debian packages installable) and stops it at the end. Without a cluster
the tests skip with the reason; with ``DMRIFLOW_REQUIRE_SLURM=1`` they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from conftest import assert_same_group_table, system_part_missing

from dmriflow.interfaces.sim.phantom import write_cohort
from dmriflow.models.data import phantom_scheme

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm-cluster.sh"
REQUIRE_ENV = "DMRIFLOW_REQUIRE_SLURM"
DMRIFLOW = str(Path(sys.executable).with_name("dmriflow"))
PARTITIONS = {"debug", "gpu"}
N_SUBJECTS = 2
SHAPE = (20, 24, 20)
#: Engine steps that each run as one SLURM job per subject ...
SUBJECT_STEPS = ("Validate", "FitTensor", "FitRish", "Export")
#: ... those of the inference (GPU) phase, run with its own sbatch arguments: the
#: model alone (the series steps ran before it as CPU jobs and are cached) ...
GPU_PHASE_STEPS = ("Inference",)
#: ... and those of the CPU jobs (the series pre-phase, then the main phase).
CPU_PHASE_STEPS = SUBJECT_STEPS
INFERENCE = ("--inference", "directions")
START_TIMEOUT_S = 600
RUN_TIMEOUT_S = 300
#: How long sacct may lag behind a job that has finished (slurmctld sends job
#: records to slurmdbd asynchronously).
ACCOUNTING_LAG_S = 30


def unavailable(reason: str):
    system_part_missing(reason, REQUIRE_ENV)


class Cluster:
    """Client side of a running cluster: its environment and the SLURM commands."""

    def __init__(self, slurm_conf: str):
        self.env = {**os.environ, "SLURM_CONF": slurm_conf}

    def cmd(self, *args: str, check: bool = True) -> str:
        return subprocess.run(args, env=self.env, capture_output=True, text=True,
                              check=check, timeout=60).stdout

    def partitions(self) -> set[str]:
        return {p.rstrip("*") for p in self.cmd("sinfo", "-h", "-o", "%P").split()}

    def sacct(self, comment: str) -> pd.DataFrame:
        """Allocations (not steps) of the jobs whose comment is ``comment``."""
        fields = ["JobID", "JobName", "Partition", "State", "Timelimit", "ReqMem", "Comment"]
        out = self.cmd("sacct", "-a", "-X", "-n", "-P", "-S", "now-1days",
                       "-o", ",".join(f"{f}%200" for f in fields))
        rows = [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line]
        return pd.DataFrame([r for r in rows if r["Comment"] == comment], columns=fields)

    def dmriflow(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([DMRIFLOW, *args], env=self.env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)


def _responds(conf: str) -> bool:
    try:
        return PARTITIONS <= Cluster(conf).partitions()
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    conf = os.environ.get("SLURM_CONF")
    if conf and _responds(conf):
        yield Cluster(conf)          # started by someone else (.ci/run): left running
        return
    if os.geteuid() != 0:
        unavailable("starting a local SLURM cluster needs root")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        unavailable("no SLURM daemons and no apt-get to install them")
    # /var/tmp, not pytest's private tmp: munge and mysql must reach the state folder
    state = Path(tempfile.mkdtemp(prefix="dmriflow-slurm-", dir="/var/tmp"))
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT), "start", str(state)], capture_output=True,
                          text=True, timeout=START_TIMEOUT_S)
    if proc.returncode:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True)
        shutil.rmtree(state, ignore_errors=True)
        unavailable(f"the local SLURM cluster did not start: {proc.stderr[-3000:]}")
    print(f"\nslurm_cluster_start_s={time.perf_counter() - t0:.1f}")
    try:
        yield Cluster(str(state / "etc" / "slurm.conf"))
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    # on /var/tmp, a path every node of this one-node cluster sees (as the cache must be)
    root = Path(tempfile.mkdtemp(prefix="dmriflow-slurm-test-", dir="/var/tmp"))
    # a one-shell scheme the shipped direction-synthesis model accepts (inference phase)
    write_cohort(root / "in", N_SUBJECTS, shape=SHAPE, seed=3, scheme=phantom_scheme(2))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cf_table(cohort) -> pd.DataFrame:
    out = cohort / "out-cf"
    proc = subprocess.run([DMRIFLOW, "run", str(cohort / "in"), str(out), "--worker", "cf",
                           "--n-procs", "2", "--quiet", *INFERENCE], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return read_table(out)


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, cohort):
    comment = f"dmriflow-test-{uuid.uuid4().hex[:8]}"
    out = cohort / "out-slurm"
    t0 = time.perf_counter()
    proc = slurm_cluster.dmriflow(
        "run", str(cohort / "in"), str(out), "--worker", "slurm", *INFERENCE,
        f"--sbatch-args=--time=15 --mem=300M --comment={comment}",
        f"--gpu-sbatch-args=--partition=gpu --time=20 --mem=400M --comment={comment}-gpu")
    print(f"\nslurm_run_s={time.perf_counter() - t0:.1f}")
    return proc, out, comment


def read_table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "dmriflow" / "group" / "subjects.tsv", sep="\t")


def assert_same_table(got: pd.DataFrame, want: pd.DataFrame):
    """The same code on the same data: equal to float32 precision."""
    assert_same_group_table(got, want, rtol=1e-5, atol=1e-7)


def test_slurm_worker_gives_the_cf_table(slurm_run, cf_table):
    proc, out, _ = slurm_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = read_table(out)
    assert table["status"].tolist() == ["done"] * N_SUBJECTS
    assert_same_table(table, cf_table)
    assert cf_table["median_fa"].between(0.01, 0.9).all()
    assert cf_table["inference_model"].notna().all()


def test_every_job_is_in_sacct_with_its_phase_sbatch_args(slurm_cluster, slurm_run):
    """--sbatch-args reach every main-phase job, --gpu-sbatch-args the inference phase's."""
    proc, _, comment = slurm_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for phase, steps, partition, limit, mem in (
            (comment, CPU_PHASE_STEPS, "debug", "00:15:00", "300M"),
            (f"{comment}-gpu", GPU_PHASE_STEPS, "gpu", "00:20:00", "400M")):
        jobs = slurm_cluster.sacct(phase)
        names = jobs["JobName"].str.split(".").str[0]
        for step in steps:
            assert (names == step).sum() == N_SUBJECTS, (phase, step, jobs)
        assert len(jobs) == len(steps) * N_SUBJECTS + (partition == "debug"), jobs  # GroupTable
        assert set(jobs["State"]) == {"COMPLETED"}
        assert set(jobs["Partition"]) == {partition}
        assert set(jobs["Timelimit"]) == {limit}
        assert set(jobs["ReqMem"]) == {mem}


def _cancel_a_running_job(cluster: Cluster, comment: str, proc: subprocess.Popen,
                          timeout_s: float = 120) -> str:
    """scancel the first job of the run seen running; its id once sacct says CANCELLED."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        running = [line.split("|") for line in
                   cluster.cmd("squeue", "-h", "-t", "R", "-o", "%i|%k").splitlines()]
        ids = [job for job, note in running if note == comment]
        if ids:
            cluster.cmd("scancel", ids[0])
            for _ in range(50):
                state = cluster.sacct(comment).set_index("JobID")["State"].get(ids[0], "")
                if state.startswith("CANCELLED"):
                    return ids[0]
                if state in ("COMPLETED", "FAILED"):
                    break                    # it finished first: cancel another one
                time.sleep(0.2)
        time.sleep(0.1)
    raise AssertionError("no job of the run could be cancelled while it ran")


def test_cancelled_job_fails_the_run_and_a_rerun_completes(slurm_cluster, cohort, cf_table):
    comment = f"dmriflow-cancel-{uuid.uuid4().hex[:8]}"
    out = cohort / "out-cancel"
    args = [DMRIFLOW, "run", str(cohort / "in"), str(out), "--worker", "slurm",
            f"--sbatch-args=--comment={comment}"]
    proc = subprocess.Popen(args, env=slurm_cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        job = _cancel_a_running_job(slurm_cluster, comment, proc)
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, stdout + stderr        # some subjects failed
    assert f"SLURM job {job} was cancelled" in stdout
    assert "FAILED" in stdout
    status = slurm_cluster.dmriflow("status", str(out))
    assert status.returncode == 2
    assert read_table(out)["status"].tolist().count("done") < N_SUBJECTS

    rerun = slurm_cluster.dmriflow("run", str(cohort / "in"), str(out), "--worker", "slurm",
                                   f"--sbatch-args=--comment={comment}-rerun")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert slurm_cluster.dmriflow("status", str(out)).returncode == 0
    rerun_table = read_table(out)            # (no inference columns in this run)
    assert set(rerun_table.columns) < set(cf_table.columns)
    assert_same_table(rerun_table, cf_table[rerun_table.columns])
    # the rerun submitted jobs only for what the cancelled run left undone (cached nodes
    # need no job): at most the one subject's steps and the group table
    cancelled = slurm_cluster.sacct(comment).set_index("JobID").loc[job, "JobName"]
    # the accounting daemon may record the last job a moment after the run ended
    deadline = time.monotonic() + ACCOUNTING_LAG_S
    while True:
        rerun_steps = slurm_cluster.sacct(f"{comment}-rerun")["JobName"].str.split(".").str[0]
        if "GroupTable" in set(rerun_steps) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert cancelled.split(".")[0] in set(rerun_steps)
    assert "GroupTable" in set(rerun_steps)
    assert len(rerun_steps) <= len(SUBJECT_STEPS) + 1, rerun_steps.tolist()



#: The array test's cohort: three small BIDS subjects, sub-02 with broken b-vectors.
ARRAY_SUBJECTS, ARRAY_BROKEN = ("sub-01", "sub-02", "sub-03"), "sub-02"
ARRAY_TIMEOUT_S = 600


def _wait_for_jobs(cluster: Cluster, comment: str, n: int, timeout_s: float) -> pd.DataFrame:
    """sacct rows of the ``n`` jobs with this comment once all have ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = cluster.sacct(comment)
        ended = jobs["State"].str.match(r"^(COMPLETED|FAILED|CANCELLED|TIMEOUT|OUT_OF_ME)")
        if len(jobs) == n and ended.all():
            return jobs
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs not ended after {timeout_s} s:\n{jobs}")
        time.sleep(1)


def test_participant_array_and_group_job(slurm_cluster, tmp_path_factory):
    """`participant --slurm-array`: one array task per subject (the broken one
    fails alone, exit 2), the group job after them all (afterany) with the
    whole table; the ids printed are the jobs SLURM ran."""
    from dmriflow.interfaces.sim.phantom import hcp_scheme
    root = Path(tempfile.mkdtemp(prefix="dmriflow-slurm-array-", dir="/var/tmp"))
    try:
        cohort = root / "in"
        write_cohort(cohort, len(ARRAY_SUBJECTS), layout="bids", shape=(12, 14, 10), seed=0,
                     scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1))
        bvec = cohort / ARRAY_BROKEN / "dwi" / f"{ARRAY_BROKEN}_dwi.bvec"
        bvec.write_text("not numbers\n")
        out, comment = root / "out", f"dmriflow-array-{uuid.uuid4().hex[:8]}"
        proc = subprocess.run(
            [DMRIFLOW, str(cohort), str(out), "participant", "--slurm-array", "-w",
             str(root / "cache"), "--quiet", f"--sbatch-args=--time=10 --mem=500M "
                                            f"--comment={comment}"],
            env=slurm_cluster.env, cwd=root, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
        array_id = lines["array job"].split()[0]
        group_id = lines["group job"].split()[0]
        assert lines["group job"].endswith(f"(--dependency=afterany:{array_id})")
        assert " ".join(ARRAY_SUBJECTS) in lines["array job"]

        jobs = _wait_for_jobs(slurm_cluster, comment, len(ARRAY_SUBJECTS) + 1, ARRAY_TIMEOUT_S)
        exits = slurm_cluster.cmd("sacct", "-X", "-n", "-P", "-j", f"{array_id},{group_id}",
                                  "-o", "JobID,JobName,State,ExitCode,Start,End")
        rows = {r[0]: r[1:] for r in (line.split("|") for line in exits.splitlines() if line)}
        tasks = {f"{array_id}_{i}": key for i, key in enumerate(ARRAY_SUBJECTS)}
        assert set(tasks) | {group_id} == set(rows), rows
        for task, key in tasks.items():
            name, state, code, *_ = rows[task]
            assert name == "dmriflow-participant"
            if key == ARRAY_BROKEN:
                assert (state, code) == ("FAILED", "2:0"), (task, rows[task])
            else:
                assert (state, code) == ("COMPLETED", "0:0"), (task, rows[task])
        name, state, code, start, _ = rows[group_id]
        assert (name, state, code) == ("dmriflow-group", "FAILED", "2:0"), rows[group_id]
        assert start >= max(rows[t][4] for t in tasks)          # after every task ended
        assert set(jobs["JobID"]) == set(rows)

        table = read_table(out).set_index("subject")
        assert list(table.index) == list(ARRAY_SUBJECTS)
        assert table["status"].to_dict() == {k: "failed" if k == ARRAY_BROKEN else "done"
                                             for k in ARRAY_SUBJECTS}
        assert "bids:raw:" + bvec.relative_to(cohort).as_posix() in \
            table.loc[ARRAY_BROKEN, "error"]
        assert table.drop(index=ARRAY_BROKEN)["median_fa"].between(0.01, 0.9).all()
        assert slurm_cluster.dmriflow("status", str(out)).returncode == 2
        # each task's own run log, and the group job's output, in the submission folder
        assert len(list((out / "dmriflow" / "logs").glob("run-*.log"))) == len(ARRAY_SUBJECTS)
        group_out = (root / f"slurm-{group_id}.out").read_text()
        assert f"2 of {len(ARRAY_SUBJECTS)} done" in group_out
        assert f"NOT DONE {ARRAY_BROKEN} (failed [validate])" in group_out
    finally:
        shutil.rmtree(root, ignore_errors=True)
