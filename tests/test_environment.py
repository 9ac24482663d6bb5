"""The lock and the environment id.

requirements.lock is the one install file (venv, CI, image): every runtime and
test dependency of setup.cfg is pinned in it, within setup.cfg's bounds, with
hashes. A result's environment id is the lock's sha256 only when the running
interpreter is exactly the lock; any difference makes it ``unlocked``.
"""

from __future__ import annotations

import configparser
import hashlib
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from dmriflow.interfaces import environment as env

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / env.LOCK_NAME


def _blocks(text: str) -> dict[str, str]:
    """Each pin's block of the lock (its line, hashes and comments)."""
    starts = [m.start() for m in re.finditer(r"^[A-Za-z0-9]", text, re.M)]
    return {env.canonical(text[s:].split("==")[0]): text[s:e]
            for s, e in zip(starts, starts[1:] + [len(text)])}


def setup_requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    lines += cfg["options.extras_require"]["test"].splitlines()
    return [Requirement(line) for line in lines if line.strip()]


def test_lock_pins_every_dependency_within_setup_cfg_with_hashes():
    text = LOCK.read_text()
    pins = env.read_pins(text)
    assert len(pins) > 50                      # the transitive closure, not a summary
    for name, block in _blocks(text).items():
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", block), f"{name} has no hash"
    for req in setup_requirements():
        name = env.canonical(req.name)
        assert name in pins, f"{req} is not in {LOCK.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
    # the torch build is the CPU one (a CUDA build is several GB and needs no GPU here)
    assert pins["torch"].endswith("+cpu")


def test_this_environment_is_the_lock():
    """`make env` installed exactly the lock: the id is its hash (left out of
    `make check-latest`, whose environment differs from the lock on purpose)."""
    record = env.environment()
    assert record["Lock"]["differences"] == []
    assert record["EnvironmentId"] == "sha256:" + hashlib.sha256(LOCK.read_bytes()).hexdigest()


@pytest.mark.parametrize("change, expected", [
    (lambda s: s.update(numpy="0.0.1"), "numpy: locked {numpy}, installed 0.0.1"),
    (lambda s: s.pop("scipy"), "scipy: locked {scipy}, not installed"),
    (lambda s: s.update(leftpad="1.0"), "leftpad: 1.0 installed, not in the lock"),
])
def test_any_difference_makes_the_environment_unlocked(monkeypatch, change, expected):
    pins = env.read_pins(LOCK.read_text())
    installed = {**pins, "pip": "99", "dmriflow": "0"}     # neither is a pin
    monkeypatch.setattr(env, "installed_versions", lambda: installed)
    env.environment.cache_clear()
    try:
        assert env.environment()["EnvironmentId"].startswith("sha256:")
        change(installed)
        env.environment.cache_clear()
        record = env.environment()
    finally:
        env.environment.cache_clear()
    assert record["EnvironmentId"] == env.UNLOCKED
    assert record["Lock"]["differences"] == [expected.format(**pins)]
    assert record["Lock"]["sha256"] == hashlib.sha256(LOCK.read_bytes()).hexdigest()


def test_names_compare_as_pep503():
    assert env.read_pins("Typing_Extensions==4.1 \\\n    --hash=sha256:00\n") == {
        "typing-extensions": "4.1"}
    assert env.canonical("ruamel.yaml") == env.canonical("Ruamel_Yaml") == "ruamel-yaml"


def _canary(tmp_path: Path, budget: int, python: str) -> tuple[int, str, float]:
    """Runs .ci/canary with `make check-latest` on a stand-in interpreter and a
    throwaway venv folder in tmp_path (the repo's build/latest is left alone)."""
    import os
    import subprocess
    import time
    log = tmp_path / "canary.log"
    environ = dict(os.environ, PYTHON=python, LATEST=str(tmp_path / "latest"))
    start = time.monotonic()
    done = subprocess.run([str(REPO / ".ci" / "canary"), str(budget), str(log)], env=environ,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, time.monotonic() - start


def test_canary_cut_short_by_its_budget_reports_and_passes(tmp_path):
    """A canary that outlives CI's budget is stopped, says so and leaves the verdict
    to the locked suite (a slow CI machine once failed a passing submission here)."""
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nsleep 60\n")
    slow.chmod(0o755)
    code, out, seconds = _canary(tmp_path, 2, str(slow))
    assert code == 0, out
    assert "CUT SHORT by the 2 s budget" in out
    assert "ci: check-latest tests: none finished" in out
    assert seconds < 30                       # the sleeping child was stopped with make


def test_canary_failure_is_reported_not_fatal(tmp_path):
    code, out, _ = _canary(tmp_path, 60, "false")
    assert code == 0, out
    assert re.search(r"check-latest FAILED \(exit [1-9]\d*\)", out), out


def test_canary_without_time_left_is_not_run(tmp_path):
    code, out, seconds = _canary(tmp_path, -5, "false")
    assert code == 0 and "not run: no time left" in out
    assert not (tmp_path / "latest").exists()
