"""``dmriflow status``, ``run --rerun-failed``, one run at a time, and provenance.

A small phantom cohort with one subject whose bvec file is corrupt: status
names the subject, the step and the reason; after fixing the file,
``--rerun-failed`` runs only that subject (done subjects' files keep their
inode and mtime) and the group table again covers the whole cohort.
"""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest

from dmriflow.pipelines.derivatives import derivative_file
from dmriflow.interfaces import io
from dmriflow.interfaces.environment import environment, lock_path
from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
from dmriflow.pipelines import cli
from dmriflow.pipelines.execution import exclusive_run, status_table
from dmriflow.pipelines.inputs import discover

SHAPE = (16, 18, 14)
N_SUBJECTS = 3
STEPS = ["validate", "tensor", "rish", "export"]
#: Packages whose versions every sidecar must name.
REQUIRED_VERSIONS = ("dmriflow", "pydra", "numpy", "scipy", "nibabel", "dipy", "torch", "monai",
                     "fileformats")


def make_cohort(root: Path) -> Path:
    write_cohort(root, N_SUBJECTS, shape=SHAPE, seed=3,
                 scheme=hcp_scheme(n_b0=3, shells=(1000, 2000), n_dirs=20, seed=2))
    return root


def run(cohort: Path, out: Path, *extra: str, quiet: bool = True) -> int:
    return cli.main(["run", str(cohort), str(out), "--worker", "cf", "--n-procs", "2",
                     *(["--quiet"] if quiet else []), *extra])


def steps_run(stderr: str) -> set[tuple[str, str]]:
    """(task, subject) of every node the run's progress lines report as run."""
    found = set()
    for line in stderr.splitlines():
        words = line.split("] ", 1)[-1].split()
        if len(words) >= 2 and words[1].startswith("sub-"):
            found.add((words[0], words[1].rstrip(":")))
    return found


def files_of(out: Path, key: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file of a subject: any rewrite changes the inode."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (out / "dmriflow" / key).rglob("*") if p.is_file()}


def status_lines(capsys, out: Path) -> tuple[int, list[str]]:
    code = cli.main(["status", str(out)])
    return code, capsys.readouterr().out.splitlines()


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("status")
    cohort = make_cohort(tmp / "in")
    subjects = discover(cohort)
    bad = subjects[1]
    good_bvec = Path(bad.bvec).read_text()
    Path(bad.bvec).write_text("0 1 0\nnot numbers at all\n")
    code = run(cohort, tmp / "out")
    return tmp, cohort, subjects, bad, good_bvec, code


def test_status_names_the_failed_subject_step_and_reason(broken_run, capsys):
    tmp, cohort, subjects, bad, _, code = broken_run
    out = tmp / "out"
    assert code == cli.EXIT_SUBJECTS_FAILED
    table = status_table(out)
    assert list(table.columns) == ["subject", "status", "failed_step", "error"] + STEPS + \
        ["qc_flags"]
    row = table.set_index("subject").loc[bad.key]
    assert row["status"] == "failed" and row["failed_step"] == "validate"
    uri = "bids:raw:" + Path(bad.bvec).relative_to(cohort).as_posix()   # never absolute
    assert row["error"].startswith(f"{uri}: ")
    assert [row[s] for s in STEPS] == ["failed", "skipped", "skipped", "skipped"]
    for s in subjects:
        if s is not bad:
            assert list(table.set_index("subject").loc[s.key, STEPS]) == ["done"] * 4

    code, lines = status_lines(capsys, out)
    assert code == cli.EXIT_SUBJECTS_FAILED
    assert lines[0] == f"{out}: {N_SUBJECTS} planned; 2 done, 1 failed, 0 missing"
    (bad_line,) = [ln for ln in lines if ln.startswith(bad.key)]
    assert bad_line.split()[1:6] == ["failed", "failed", "skipped", "skipped", "skipped"]
    assert f"[validate] {uri}: " in bad_line
    steps = {ln.split()[0]: [int(n) for n in ln.split()[1:]] for ln in lines
             if ln.split()[0] in STEPS}
    #                 done failed skipped missing
    assert steps == {"validate": [2, 1, 0, 0], "tensor": [2, 0, 1, 0],
                     "rish": [2, 0, 1, 0], "export": [2, 0, 1, 0]}


def test_rerun_failed_runs_only_the_fixed_subject(broken_run, capfd, tmp_path):
    tmp, cohort, subjects, bad, good_bvec, _ = broken_run
    out = tmp / "out"
    done = [s for s in subjects if s is not bad]
    before = {s.key: files_of(out, s.key) for s in done}
    assert all(before.values())

    Path(bad.bvec).write_text(good_bvec)
    capfd.readouterr()
    assert run(cohort, out, "--rerun-failed", quiet=False) == cli.EXIT_OK
    err = capfd.readouterr().err     # fd level: the cf workers' progress lines too
    assert f"--rerun-failed: 1 of {N_SUBJECTS} planned subject(s) to rerun: {bad.key}" in err
    assert steps_run(err) == {(task, bad.key) for task in
                              ("Validate", "FitTensor", "FitRish", "Export")}
    assert {s.key: files_of(out, s.key) for s in done} == before

    code, lines = status_lines(capfd, out)
    assert code == cli.EXIT_OK
    assert lines[0] == f"{out}: {N_SUBJECTS} planned; 3 done, 0 failed, 0 missing"
    # the table covers the whole plan and equals an uninterrupted run's
    table = pd.read_csv(out / "dmriflow" / "group" / "subjects.tsv", sep="\t")
    assert list(table["subject"]) == [s.key for s in subjects]
    assert set(table["status"]) == {"done"}
    clean = tmp_path / "clean"
    shutil.copytree(cohort, tmp_path / "in")
    assert run(tmp_path / "in", clean) == cli.EXIT_OK
    ref = pd.read_csv(clean / "dmriflow" / "group" / "subjects.tsv", sep="\t")
    pd.testing.assert_frame_equal(table, ref)


def test_rerun_failed_restores_deleted_derivatives_only(broken_run, capsys):
    tmp, cohort, subjects, bad, good_bvec, _ = broken_run
    out = tmp / "out"
    Path(bad.bvec).write_text(good_bvec)
    assert run(cohort, out, "--rerun-failed") == cli.EXIT_OK     # (idempotent if run)
    victim_key, kept_key = subjects[0].key, subjects[2].key
    row = json.loads(next((out / "dmriflow" / victim_key).glob("*_status.json")).read_text())
    entry = row["derivatives"][3]          # relative to OUTPUT/dmriflow
    victim = derivative_file(entry, out)
    victim.unlink()
    code, lines = status_lines(capsys, out)
    assert code == cli.EXIT_SUBJECTS_FAILED
    (line,) = [ln for ln in lines if ln.startswith(victim_key)]
    assert line.split()[1:6] == ["missing", "done", "done", "done", "missing"]
    assert f"1 derivative(s) missing, e.g. {entry}" in line

    kept = files_of(out, kept_key)
    assert run(cohort, out, "--rerun-failed") == cli.EXIT_OK
    assert victim.exists()
    assert files_of(out, kept_key) == kept
    assert status_lines(capsys, out)[0] == cli.EXIT_OK


def test_rerun_failed_needs_a_plan_and_no_labels(tmp_path, capsys):
    cohort = make_cohort(tmp_path / "in")
    assert run(cohort, tmp_path / "out", "--rerun-failed") == cli.EXIT_INPUT
    assert "no dmriflow run found" in capsys.readouterr().err
    assert run(cohort, tmp_path / "out", "--rerun-failed",
               "--participant-label", "900001") == cli.EXIT_INPUT
    assert "do not combine" in capsys.readouterr().err
    assert cli.main(["status", str(tmp_path / "out")]) == cli.EXIT_INPUT


def test_second_run_on_the_same_output_is_refused(tmp_path, capsys):
    cohort = make_cohort(tmp_path / "in")
    out = tmp_path / "out"
    with exclusive_run(out / "dmriflow"):
        assert run(cohort, out) == cli.EXIT_BUSY
    err = capsys.readouterr().err
    assert "another dmriflow run is using this folder" in err and "pid" in err
    assert not (out / "dmriflow" / "group").exists()
    assert run(cohort, out) == cli.EXIT_OK          # the lock went with its holder


def test_every_sidecar_carries_full_provenance(broken_run):
    tmp, cohort, subjects, bad, good_bvec, _ = broken_run
    out = tmp / "out"
    Path(bad.bvec).write_text(good_bvec)
    assert run(cohort, out, "--rerun-failed") == cli.EXIT_OK
    plan = json.loads((out / "dmriflow" / "group" / "cohort.json").read_text())
    version = plan["pipeline_version"]
    assert version == io.pipeline_version()
    installed = {name: metadata.version(name) for name in REQUIRED_VERSIONS
                 if name != "dmriflow"}
    lock_sha256 = io.file_sha256(lock_path())
    n_checked = 0
    for s in subjects:
        hashes = {k: io.file_sha256(p) for k, p in
                  {"dwi": s.dwi, "bval": s.bval, "bvec": s.bvec, "mask": s.mask,
                   "sidecar": s.sidecar}.items() if p}
        row = json.loads(next((out / "dmriflow" / s.key).glob("*_status.json")).read_text())
        assert row["status"] == "done" and row["pipeline_version"] == version
        for nii in row["derivatives"]:
            meta = json.loads(derivative_file(nii.replace(".nii.gz", ".json"),
                                              out).read_text())
            assert {k: v["sha256"] for k, v in meta["Inputs"].items()} == hashes
            # inputs named by BIDS URI relative to the input root, never by absolute path
            assert {k: v["path"] for k, v in meta["Inputs"].items()} == {
                k: "bids:raw:" + Path(getattr(s, k)).relative_to(cohort).as_posix()
                for k in hashes}
            assert meta["InputHashes"] == hashes
            gen = meta["GeneratedBy"][0]
            assert gen["PipelineVersion"] == version and gen["Name"] == "dmriflow"
            assert gen["Step"] in ("tensor", "rish")
            params = meta["Parameters"]
            assert params["gradient_policy"]["b0_threshold"] == 50.0
            if gen["Step"] == "tensor":
                assert params["fit_method"] == "WLS" and params["shells_used"] == [1000.0]
            else:
                assert params["shell"] in (1000.0, 2000.0) and params["order"] in (0, 2, 4)
            versions = meta["Versions"]
            assert meta["EnvironmentId"] == environment()["EnvironmentId"]
            assert meta["Lock"]["sha256"] == lock_sha256
            assert versions["dmriflow"] == version.split("+")[0]
            assert {k: versions[k] for k in installed} == installed
            n_checked += 1
    assert n_checked == N_SUBJECTS * (6 + 2 * 3)
    table_meta = json.loads((out / "dmriflow" / "group" / "subjects.json").read_text())
    assert table_meta["PipelineVersions"] == [version]
    assert table_meta["GeneratedBy"][0]["PipelineVersion"] == version
    assert table_meta["Versions"]["pydra"] == installed["pydra"]
    assert table_meta["EnvironmentId"] == environment()["EnvironmentId"]
    assert table_meta["Lock"]["sha256"] == lock_sha256
    assert table_meta["Subjects"] == {
        s.key: {"status": "done", "export_id": json.loads(next(
            (out / "dmriflow" / s.key).glob("*_status.json")).read_text())["export_id"]}
        for s in subjects}


def test_sidecar_uses_recorded_hashes_and_the_run_version(tmp_path):
    """The hash recorded at validation is what the sidecar states (the content
    that was processed), and the run's version, not this process's."""
    f = tmp_path / "dwi.nii.gz"
    f.write_bytes(b"validated bytes")
    recorded = io.file_sha256(f)
    f.write_bytes(b"changed after validation")
    meta = io.sidecar({"dwi": f, "bval": None}, {}, "tensor", hashes={"dwi": recorded},
                      version="9.9+run")
    assert meta["Inputs"] == {"dwi": {"path": str(f), "sha256": recorded}}
    assert meta["GeneratedBy"][0]["PipelineVersion"] == "9.9+run"
    fresh = io.sidecar({"dwi": f}, {}, "tensor")
    assert fresh["Inputs"]["dwi"]["sha256"] == io.file_sha256(f) != recorded
    assert fresh["GeneratedBy"][0]["PipelineVersion"] == io.pipeline_version()


def test_status_tells_a_run_in_progress(broken_run, capsys):
    tmp, *_ = broken_run
    out = tmp / "out"
    code, lines = status_lines(capsys, out)
    assert not any("in progress" in ln for ln in lines)
    with exclusive_run(out / "dmriflow"):
        code, lines = status_lines(capsys, out)
    assert lines[1].startswith("a run is in progress (pid ")
    assert status_lines(capsys, out)[1][1] == lines[2]     # lock gone: line gone


def test_cache_inside_the_output_folder_is_locked_once(tmp_path):
    cohort = make_cohort(tmp_path / "in")
    out = tmp_path / "out"
    assert run(cohort, out, "--cache-dir", str(out / "dmriflow")) == cli.EXIT_OK
    assert set(status_table(out)["status"]) == {"done"}


def test_a_failed_export_is_redone_once_its_cause_is_gone(tmp_path):
    """An export that failed (here: a file where the subject's dwi folder goes,
    as a full disk would fail it) is redone by the next run, with or without
    --rerun-failed, once the cause is removed; the other subjects stay done."""
    cohort = make_cohort(tmp_path / "in")
    out = tmp_path / "out"
    key = discover(cohort)[0].key
    blocker = out / "dmriflow" / key / "dwi"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")
    assert run(cohort, out) == cli.EXIT_SUBJECTS_FAILED
    table = status_table(out).set_index("subject")
    assert table.loc[key, "status"] == "failed" and table.loc[key, "failed_step"] == "export"
    assert (table.drop(index=key)["status"] == "done").all()
    assert run(cohort, out) == cli.EXIT_SUBJECTS_FAILED       # the cause is still there
    blocker.unlink()
    assert run(cohort, out, "--rerun-failed") == cli.EXIT_OK
    assert set(status_table(out)["status"]) == {"done"}


def test_every_run_writes_its_log_file(tmp_path):
    """A quiet run still logs: the command, versions and environment id, every
    node's progress line (written by the cf worker processes) and the summary;
    each run has its own file."""
    cohort = make_cohort(tmp_path / "in")
    out = tmp_path / "out"
    assert run(cohort, out) == cli.EXIT_OK
    logs = sorted((out / "dmriflow" / "logs").glob("run-*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert f"environment {environment()['EnvironmentId']}; command:" in text
    for s in discover(cohort):
        for step in ("Validate", "FitTensor", "FitRish", "Export"):
            assert f"] {step} {s.key}: done\n" in text, (step, s.key)
    assert "finished in" in text and f"{N_SUBJECTS} done, 0 not done" in text
    assert all(line.startswith("[dmriflow ") for line in text.splitlines())
    assert run(cohort, out) == cli.EXIT_OK
    assert len(list((out / "dmriflow" / "logs").glob("run-*.log"))) == 2


#: Run inside a private mount namespace by the disk-full test: OUTPUT on a 1 MB
#: tmpfs, filled but for 64 kB (the plan and log fit, the export does not).
DISK_FULL_SCRIPT = """
import json, os, subprocess, sys
from pathlib import Path
from dmriflow.pipelines import cli
root = Path(sys.argv[1]); out = root / "out"
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out)], check=True)
st = os.statvfs(out)
filler = out / "filler"
filler.write_bytes(bytes(st.f_bavail * st.f_frsize - 64 * 1024))
args = ["run", str(root / "in"), str(out), "--worker", "debug", "--quiet",
        "--cache-dir", str(root / "cache")]
codes = [cli.main(args)]
statuses = lambda: sorted(json.loads(p.read_text())["status"]
                          for p in (out / "dmriflow").glob("sub-*/*_status.json"))
first = statuses()
codes.append(cli.main(args + ["--rerun-failed"]))       # still full: nothing better
filler.unlink()                                           # space freed
codes.append(cli.main(args + ["--rerun-failed"]))
print(json.dumps({"codes": codes, "first": first, "last": statuses(),
                  "table": (out / "dmriflow" / "group" / "subjects.tsv").is_file()}))
"""


def test_an_export_that_hit_a_full_disk_is_redone_once_space_is_freed(tmp_path):
    """A real full disk (OUTPUT on a small tmpfs in a private mount namespace):
    the run ends with exit 2 and the error (no exception escapes); once space
    is freed, --rerun-failed exports every subject."""
    import os
    import subprocess
    import sys
    make_cohort(tmp_path / "in")
    (tmp_path / "out").mkdir()
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL_SCRIPT)
    namespace = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    proc = subprocess.run([*namespace, sys.executable, str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # still full, the rerun fails too: 2 (exports failed) or, once not even the
    # run's plan and log fit, 1 with the error (an exception would end the script)
    assert result["codes"][0] == cli.EXIT_SUBJECTS_FAILED, proc.stdout[-3000:]
    assert result["codes"][1] in (cli.EXIT_SUBJECTS_FAILED, cli.EXIT_INPUT)
    assert "No space left on device" in proc.stdout + proc.stderr
    assert result["first"] != ["done"] * N_SUBJECTS
    assert result["codes"][2] == cli.EXIT_OK and result["last"] == ["done"] * N_SUBJECTS
    assert result["table"]
