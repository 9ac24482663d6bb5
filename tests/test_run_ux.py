"""A run as a user sees it (issue 12, item 10): the run's log file under OUTPUT,
a progress bar on a terminal (plain lines otherwise) and the methods text.

The terminal is a real pseudo-terminal (``os.openpty``) given to a real
``dmriflow`` process; nothing is mocked."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
from dmriflow.interfaces.steps import COHORT_REGISTRY, REGISTRY
from dmriflow.interfaces.steps.base import flag_of, options_of
from dmriflow.pipelines import cli
from dmriflow.pipelines.execution import RunConfig
from dmriflow.pipelines.methods import (METHODS_FILE, MPPCA, GIBBS, REFERENCES, RISH,
                                        methods_text, ran_steps)

SHAPE = (12, 12, 10)
#: Any absolute POSIX path of two or more components inside a text.
ABSOLUTE = re.compile(r"(?<![\w.:/-])/(?:[\w.+-]+/)+[\w.+-]+")
#: Terminal control sequences (colours, cursor moves) of the bar.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
#: A node's plain progress line.
PLAIN = re.compile(r"^\[dmriflow \d\d:\d\d:\d\d\] Export sub-\d+: done$", re.M)


def cohort(root: Path, n: int = 3, bad: int | None = None) -> list[str]:
    """An HCP-layout phantom cohort; subject ``bad`` gets a mask of another grid
    (it fails at Validate, inside the engine)."""
    labels = write_cohort(root, n, shape=SHAPE, seed=3,
                          scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1))
    if bad is not None:
        mask = root / labels[bad] / "T1w" / "Diffusion" / "nodif_brain_mask.nii.gz"
        img = nib.load(mask)
        nib.save(nib.Nifti1Image(np.ones((SHAPE[0] + 3,) + SHAPE[1:], np.uint8), img.affine),
                 mask)
    return labels


def dmriflow(*args: str, tty: bool, cwd: Path) -> tuple[int, str]:
    """Run the real command line; its stdout and stderr are one pseudo-terminal
    (``tty``) or pipes. Returns (exit code, everything it wrote)."""
    cmd = [sys.executable, "-m", "dmriflow.pipelines.cli", *args]
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm-256color"}
    if not tty:
        res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        return res.returncode, res.stdout + res.stderr
    leader, follower = os.openpty()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=follower, stdout=follower,
                            stderr=follower, close_fds=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            data = os.read(leader, 65536)
        except OSError:           # EIO: every writer closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def only_log(out: Path) -> Path:
    logs = sorted((out / "dmriflow" / "logs").glob("run-*.log"))
    assert len(logs) == 1, logs
    return logs[0]


def test_progress_bar_on_a_terminal_and_a_log_without_absolute_paths(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    labels = cohort(src, 3, bad=1)
    code, text = dmriflow("run", str(src), str(out), "--worker", "cf", "--n-procs", "2",
                          tty=True, cwd=tmp_path)
    assert code == cli.EXIT_SUBJECTS_FAILED, text
    assert "\x1b[" in text                                # drawn with terminal controls
    screen = ANSI.sub("\n", text)
    assert "2 done, 1 failed / 3 subjects; 12/12 steps" in screen, screen[-2000:]
    assert re.search(r"ETA \d+:\d\d:\d\d", screen), screen[-2000:]
    assert not PLAIN.search(screen)                       # the bar, not the node lines
    # the failed subject's node line is shown above the bar
    assert f"Export sub-{labels[1]}: failed (validate)" in screen

    log = only_log(out).read_text()
    assert not ABSOLUTE.findall(log), ABSOLUTE.findall(log)[:3]
    assert str(tmp_path) not in log
    # what the terminal showed (messages, node lines) plus detail for the log only
    assert len(PLAIN.findall(log)) == 2
    assert f"Export sub-{labels[1]}: failed (validate)" in log
    assert re.search(rf"NOT DONE sub-{labels[1]} \[validate\] failed: .*nodif_brain_mask"
                     r"\.nii\.gz", log), log
    assert "finished in" in log and "options changed from their defaults" in log


def test_plain_lines_when_not_a_terminal(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    cohort(src, 2)
    code, text = dmriflow("run", str(src), str(out), "--worker", "cf", "--n-procs", "2",
                          tty=False, cwd=tmp_path)
    assert code == cli.EXIT_OK, text
    assert "\x1b[" not in text and "ETA" not in text
    assert len(PLAIN.findall(text)) == 2                  # the line format tools parse
    assert len(PLAIN.findall(only_log(out).read_text())) == 2
    # the summary names its files relative to the cwd, never absolute
    assert "summary table: out/dmriflow/group/subjects.tsv" in text, text
    assert "derivatives: out/dmriflow\n" in text and not ABSOLUTE.findall(text), text


def test_terminal_paths_are_relative_to_the_cwd_or_output(tmp_path, monkeypatch):
    from dmriflow.pipelines.progress import terminal_path, terminal_text
    out = tmp_path / "scratch" / "out"
    table = out / "dmriflow" / "group" / "subjects.tsv"
    monkeypatch.chdir(tmp_path)
    assert terminal_path(table, out) == "scratch/out/dmriflow/group/subjects.tsv"
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(home)                                # OUTPUT is not under the cwd
    assert terminal_path(table, out) == "OUTPUT/dmriflow/group/subjects.tsv"
    assert terminal_path(out, out) == "OUTPUT"
    assert terminal_path(tmp_path / "in" / "x.nii.gz", out) == "../in/x.nii.gz"
    assert terminal_text(f"{tmp_path}/in/x.nii.gz: bad; see {table}", out) == \
        "../in/x.nii.gz: bad; see OUTPUT/dmriflow/group/subjects.tsv"


def test_methods_text_names_exactly_the_steps_run_and_their_changed_options(tmp_path):
    config = RunConfig(worker="debug", denoise=True, lmax=4, fit_method="OLS", quiet=True)
    text = methods_text(config, tmp_path, 2)
    named = set(re.findall(r"^### \w+ \(`(\w+)`\)$", text, re.M))
    subject, cohort_ = ran_steps(config)
    assert named == set(subject) | set(cohort_)
    assert named >= {"validate", "preprocess", "tensor", "rish", "group_table"}
    assert not named & {"motion", "harmonize", "inference", "snr", "image_gradient"}
    changed = set(re.findall(r"^- `(--[\w-]+)` = [^*\n]* \*\*\(set for this run\)\*\*", text,
                             re.M))
    assert changed == {"--denoise", "--lmax", "--fit-method"}
    assert "`--fit-method` = OLS" in text and "`--lmax` = 4" in text
    # references only of what ran: MP-PCA (denoise on), RISH (rish ran), not Gibbs or WLS
    assert MPPCA in text and RISH in text and GIBBS not in text
    assert "Weighted linear least squares" not in text
    for package in ("dmriflow", "dipy", "nibabel", "pydra", "torch", "numpy"):
        assert re.search(rf"^- {package} \S+$", text, re.M), package

    # a real run writes it under logs/ and the report shows it
    src, out = tmp_path / "in", tmp_path / "out"
    cohort(src, 1)
    assert cli.main(["run", str(src), str(out), "--worker", "debug", "--quiet", "--degibbs",
                     "--snr-map"]) == cli.EXIT_OK
    written = (out / "dmriflow" / "logs" / METHODS_FILE).read_text()
    assert set(re.findall(r"^### \w+ \(`(\w+)`\)$", written, re.M)) == \
        {"validate", "preprocess", "tensor", "rish", "snr", "group_table"}
    assert set(re.findall(r"^- `(--[\w-]+)` = [^*\n]* \*\*\(set for this run\)\*\*", written,
                          re.M)) == {"--degibbs", "--snr-map"}
    assert GIBBS in written and MPPCA not in written
    assert not ABSOLUTE.findall(written)
    report = (out / "dmriflow" / "report.html").read_text()
    assert 'id="methods"' in report and "Kellner E" in report and "<code>--degibbs</code>" in report


def test_every_reference_key_names_a_registered_step_and_option():
    registries = {**REGISTRY, **COHORT_REGISTRY}
    for key in REFERENCES:
        if not key:
            continue
        step, _, rest = key.partition(".")
        assert step in registries, key
        name = rest.partition("=")[0]
        if name:
            assert name in {f.name for f, _ in options_of(registries[step].Options)}, key
    # every option of every step has a flag the text can name
    for step in registries.values():
        for f, info in options_of(step.Options):
            assert flag_of(f, info).startswith("-")
    assert dataclasses.is_dataclass(REGISTRY["tensor"].Options)


def test_a_progress_line_reaches_stderr_in_one_write(monkeypatch, tmp_path):
    """Worker processes share stderr: a line and its newline written apart let
    another worker's line land between them (seen in `make demo`: two lines run
    together, then an empty one). Each line must be a single write."""
    from dmriflow.pipelines import progress

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, s):
            self.writes.append(s)
            return len(s)

        def flush(self):
            pass

    err = Recorder()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv(progress.LOG_ENV, str(tmp_path / "run.log"))
    progress.log_line("Export sub-01: done")
    assert len(err.writes) == 1 and PLAIN.match(err.writes[0]) and err.writes[0].endswith("\n")
    assert PLAIN.match((tmp_path / "run.log").read_text())
