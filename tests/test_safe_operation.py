"""Safe with the user's files and the user's shell.

dmriflow cleans its cache (failed nodes, engine leftovers) and loads the
node results in it, which are pickles. So a folder is used as a cache only
when it is dmriflow's (marked, or new, or a marker-less cache holding only
engine entries), owned by this user and writable by no one else; and the
run lock is never opened through a symbolic link. On the command line, a
usage mistake has its own exit code and a closed pipe ends without a traceback.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
from dmriflow.pipelines import cli
from dmriflow.pipelines.execution import CACHE_MARKER, HASH_CACHE_DIR, RUN_JOURNAL, RUN_LOCK

SHAPE = (12, 14, 10)
#: A uid that is not this process's (the test runs as root in CI: chown works).
OTHER_UID = 4242


class Planted:
    """Unpickling this creates a file: proof that a planted pickle was loaded."""

    def __init__(self, proof: Path):
        self.proof = str(proof)

    def __reduce__(self):
        return (Path.write_text, (Path(self.proof), "loaded"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache-safety") / "in"
    write_cohort(root, 1, shape=SHAPE, seed=5,
                 scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1))
    return root


def run(cohort: Path, out: Path, cache: Path, capsys) -> tuple[int, str]:
    code = cli.main(["run", str(cohort), str(out), "--worker", "debug", "--quiet",
                     "--cache-dir", str(cache)])
    return code, capsys.readouterr().err


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_users_folder_is_refused_and_left_untouched(cohort, tmp_path, capsys):
    cache = tmp_path / "my-project"
    (cache / "workflow-mine").mkdir(parents=True)
    (cache / "workflow-mine" / "draft.txt").write_text("keep me")
    (cache / "notes.txt").write_text("mine")
    (cache / "build.lock").write_text("mine too")          # names the engine also uses
    (cache / "job_info.json").write_text("{}")
    before = tree(cache)
    code, err = run(cohort, tmp_path / "out", cache, capsys)
    assert code == cli.EXIT_INPUT
    assert f"{cache}: not a dmriflow cache" in err and "notes.txt" in err
    assert tree(cache) == before and sorted(p.name for p in cache.iterdir()) == [
        "build.lock", "job_info.json", "notes.txt", "workflow-mine"]


def test_a_new_cache_is_marked_private_and_reused(cohort, tmp_path, capsys):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    assert run(cohort, out, cache, capsys)[0] == cli.EXIT_OK
    assert (cache / CACHE_MARKER).is_file()
    assert not cache.stat().st_mode & 0o022
    assert run(cohort, out, cache, capsys)[0] == cli.EXIT_OK


def test_a_cache_of_an_earlier_version_is_adopted(cohort, tmp_path, capsys):
    """An unmarked cache holding only engine entries (what a run before the
    marker existed left) is taken over, not refused."""
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    assert run(cohort, out, cache, capsys)[0] == cli.EXIT_OK
    (cache / CACHE_MARKER).unlink()
    assert run(cohort, out, cache, capsys)[0] == cli.EXIT_OK
    assert (cache / CACHE_MARKER).is_file()


def test_a_hash_lock_left_by_a_killed_run_is_cleared(cohort, tmp_path, capsys):
    """Pydra's file-hash cache lives in the cache root; an empty soft lock there
    (a run killed while hashing: filelock cannot tell its owner and never breaks
    it) is removed by the next run's upkeep instead of hanging it."""
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    assert run(cohort, out, cache, capsys)[0] == cli.EXIT_OK
    hashes = cache / HASH_CACHE_DIR
    assert any(p.suffix != ".lock" for p in hashes.iterdir())   # the run's file hashes are here
    for p in hashes.iterdir():                                  # as if killed mid-hash:
        p.with_suffix(".lock").write_bytes(b"")                # every key locked, no owner
    assert run(cohort, out, cache, capsys)[0] == cli.EXIT_OK
    assert not list(hashes.glob("*.lock"))


@pytest.mark.parametrize("how", ["writable by others", "owned by another user"])
def test_an_unsafe_cache_is_refused_before_any_pickle_is_loaded(cohort, tmp_path, capsys,
                                                                how):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    assert run(cohort, out, cache, capsys)[0] == cli.EXIT_OK
    # someone plants a node result and a journal, so the next run would load it
    proof = tmp_path / "proof"
    node = next(cache.glob("python-*"))
    (node / "_result.pklz").write_bytes(pickle.dumps(Planted(proof)))
    (cache / RUN_JOURNAL).write_text('{"started": 0}')
    if how == "writable by others":
        cache.chmod(0o777)
        expected = "writable by other users (mode 777)"
    else:
        os.chown(cache, OTHER_UID, OTHER_UID)
        expected = f"belongs to uid {OTHER_UID}"
    code, err = run(cohort, out, cache, capsys)
    assert code == cli.EXIT_INPUT and expected in err
    assert not proof.exists()


def test_a_symlinked_run_lock_is_not_followed(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / "dmriflow").mkdir(parents=True)
    (out / "dmriflow" / RUN_LOCK).symlink_to(victim)
    code, err = run(cohort, out, tmp_path / "cache", capsys)
    assert code == cli.EXIT_INPUT and "the run lock is a symbolic link" in err
    assert victim.read_text() == "precious\n"


def test_usage_errors_have_their_own_exit_code(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--no-such-option"])
    assert exc.value.code == cli.EXIT_USAGE != cli.EXIT_SUBJECTS_FAILED
    assert "error:" in capsys.readouterr().err


def test_a_closed_pipe_ends_status_quietly(cohort, tmp_path, capsys):
    """`dmriflow status OUT | true` (the reader is gone before the first line):
    no BrokenPipe traceback."""
    import subprocess
    import sys
    out = tmp_path / "out"
    assert run(cohort, out, tmp_path / "cache", capsys)[0] == cli.EXIT_OK
    dmriflow = str(Path(sys.executable).with_name("dmriflow"))
    proc = subprocess.run(f"'{dmriflow}' status '{out}' | true; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True,
                          timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == cli.EXIT_CLOSED_PIPE


def test_user_files_in_a_dmriflow_cache_are_never_removed(cohort, tmp_path, capsys):
    """Files a user puts into dmriflow's own (marked) cache, even under names like
    the engine's (``build.lock``, ``job_info.json``, ``workflow-mine/`` with a
    failure marker), survive the upkeep and cleaning of later runs; what a
    killed engine left under its own names is cleared."""
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    assert run(cohort, out, cache, capsys)[0] == cli.EXIT_OK
    mine = {"build.lock": "mine", "job_info.json": "{}", "notes.txt": "mine",
            "workflow-mine/draft.txt": "keep me", "workflow-mine/_dmriflow_failed": "x"}
    for name, text in mine.items():
        (cache / name).parent.mkdir(exist_ok=True)
        (cache / name).write_text(text)
    node = next(p for p in cache.glob("python-*") if p.is_dir())
    stale = [cache / f"{node.name}.lock", cache / f"{node.name}_save.lock",
             cache / f"{'0' * 32}_info.json"]
    for p in stale:                                   # as a killed engine leaves them
        p.write_text("")
    (node / "_dmriflow_failed").write_text("tensor")  # a failed node: cleaned, recomputed
    assert run(cohort, out, cache, capsys)[0] == cli.EXIT_OK
    assert {n: (cache / n).read_text() for n in mine} == mine
    assert not any(p.exists() for p in stale)
