"""The Docker image: built from the Dockerfile (`make container`), run as its user.

`dmriflow demo` inside the container, writing to a bind-mounted folder, gives
the group table that `dmriflow demo` gives outside; the image runs as a
non-root user with `dmriflow` as entrypoint and stays within a size bound.

The session fixture reuses the engine named by ``DOCKER_HOST`` (``.ci/run``
starts one), else starts one with scripts/docker-engine.sh (root; state in
/var/tmp/dmriflow-docker so later sessions reuse the build cache) and stops
it at the end unless another test session is using it. Where the
``python:3.11-slim`` base cannot be pulled, ../shared/tools/make-python-shim.sh
builds a local stand-in. Without an engine the tests skip with the reason;
with ``DMRIFLOW_REQUIRE_DOCKER=1`` they fail.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import assert_same_group_table, system_part_missing

from dmriflow.interfaces.environment import LOCK_NAME, canonical, differences, read_pins

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[1]
ENGINE_SCRIPT = REPO / "scripts" / "docker-engine.sh"
SHIM_SCRIPT = REPO.parent / "shared" / "tools" / "make-python-shim.sh"
REQUIRE_ENV = "DMRIFLOW_REQUIRE_DOCKER"
DOCKER = "/usr/bin/docker"          # Debian's client (OPERATIONS.md)
STATE = Path(os.environ.get("DMRIFLOW_DOCKER_STATE", "/var/tmp/dmriflow-docker"))
BASE_IMAGE = "python:3.11-slim"
SHIM_IMAGE = "localhost/python-shim:3.11"
#: A tag of this session's own (concurrent sessions may build other code); removed after.
IMAGE = f"dmriflow:test-{os.getpid()}"
IMAGE_UID = 1000
#: CPU torch plus the scientific stack is ~1.5 GB; a CUDA torch build alone is several GB.
MAX_IMAGE_BYTES = 3 * 1024**3
DEMO_SUBJECTS = 2
BUILD_TIMEOUT_S = 1800
RUN_TIMEOUT_S = 600


def unavailable(reason: str):
    system_part_missing(reason, REQUIRE_ENV)


def docker(env: dict, *args: str, timeout: float = RUN_TIMEOUT_S,
           check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([DOCKER, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"docker {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _responds(env: dict) -> bool:
    try:
        return docker(env, "version", timeout=30, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="session")
def docker_env():
    host = os.environ.get("DOCKER_HOST")
    if host and Path(DOCKER).exists() and _responds(dict(os.environ)):
        yield dict(os.environ)             # started by someone else (.ci/run): left running
        return
    if os.geteuid() != 0:
        unavailable("starting a Docker engine needs root")
    if not shutil.which("apt-get") and not Path("/usr/sbin/dockerd").exists():
        unavailable("no dockerd and no apt-get to install it")
    STATE.mkdir(parents=True, exist_ok=True)
    # every session using the engine holds a shared lock; the last one out stops it
    users = open(STATE / ".users", "w")
    fcntl.flock(users, fcntl.LOCK_SH)
    proc = subprocess.run(["bash", str(ENGINE_SCRIPT), "start", str(STATE)],
                          capture_output=True, text=True, timeout=600)
    try:
        if proc.returncode:
            unavailable(f"the Docker engine did not start: {proc.stderr[-3000:]}")
        yield {**os.environ, "DOCKER_HOST": f"unix://{STATE / 'docker.sock'}"}
    finally:
        fcntl.flock(users, fcntl.LOCK_UN)
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass                            # another session still uses the engine
        else:
            subprocess.run(["bash", str(ENGINE_SCRIPT), "stop", str(STATE)],
                           capture_output=True, timeout=120)
        users.close()


def _base_image(env: dict) -> str:
    """python:3.11-slim when it is present or can be pulled, else the local shim."""
    if docker(env, "image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    if docker(env, "pull", BASE_IMAGE, timeout=900, check=False).returncode == 0:
        return BASE_IMAGE
    if not SHIM_SCRIPT.exists():
        unavailable(f"{BASE_IMAGE} cannot be pulled and {SHIM_SCRIPT} is missing")
    proc = subprocess.run(["bash", str(SHIM_SCRIPT)], env={**env, "ENGINE": DOCKER},
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return SHIM_IMAGE


@pytest.fixture(scope="session")
def image(docker_env) -> str:
    (REPO / "build").mkdir(exist_ok=True)
    with open(REPO / "build" / ".container-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)       # one build at a time from this tree
        base = _base_image(docker_env)
        t0 = time.perf_counter()
        proc = subprocess.run(["make", "-C", str(REPO), "container", f"IMAGE={IMAGE}",
                               f"BASE_IMAGE={base}", f"DOCKER={DOCKER}"], env=docker_env,
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    print(f"\ncontainer_build_s={time.perf_counter() - t0:.1f} base={base}")
    yield IMAGE
    docker(docker_env, "rmi", IMAGE, check=False)     # the tag; the layers stay cached


def read_table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "dmriflow" / "group" / "subjects.tsv", sep="\t")


def test_image_runs_as_its_user_with_dmriflow_entrypoint(docker_env, image):
    config = json.loads(docker(docker_env, "image", "inspect", image).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["dmriflow"]
    assert config["User"] == "dmriflow"
    uid = docker(docker_env, "run", "--rm", "--entrypoint", "id", image, "-u").stdout
    assert int(uid) == IMAGE_UID
    version = docker(docker_env, "run", "--rm", image, "--version").stdout
    from dmriflow.interfaces import __version__
    assert version.split() == ["dmriflow", __version__]
    torch = docker(docker_env, "run", "--rm", "--entrypoint", "python3", image, "-c",
                   "import torch; print(torch.__version__)").stdout.strip()
    assert torch == read_pins((REPO / LOCK_NAME).read_text())["torch"]


def test_image_environment_is_exactly_the_lock(docker_env, image):
    """The image's installed distributions (pip freeze) are the lock's pins, no
    more and no fewer; only pip itself and dmriflow are not pins."""
    freeze = docker(docker_env, "run", "--rm", "--entrypoint", "pip", image, "freeze",
                    "--all").stdout
    installed = {canonical(line.split("==")[0]): line.split("==")[1]
                 for line in freeze.splitlines() if "==" in line}
    unpinned = [line for line in freeze.splitlines() if line and "==" not in line]
    assert all(line.startswith("dmriflow @") for line in unpinned), unpinned
    pins = read_pins((REPO / LOCK_NAME).read_text())
    assert not differences(pins, installed), differences(pins, installed)


def test_image_size_is_bounded(docker_env, image):
    size = int(docker(docker_env, "image", "inspect", "-f", "{{.Size}}", image).stdout)
    print(f"\nimage_size_mb={size / 1e6:.0f}")
    assert size < MAX_IMAGE_BYTES


def test_demo_in_container_matches_demo_outside(docker_env, image, tmp_path):
    outside = tmp_path / "outside"
    proc = subprocess.run([str(Path(sys.executable).with_name("dmriflow")), "demo",
                           str(outside), "--subjects", str(DEMO_SUBJECTS), "--quiet"],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    mount = tmp_path / "mount"
    mount.mkdir()
    os.chown(mount, IMAGE_UID, IMAGE_UID)       # the image's user writes the results
    t0 = time.perf_counter()
    run = docker(docker_env, "run", "--rm", "-v", f"{mount}:/data", image, "demo",
                 "/data/demo", "--subjects", str(DEMO_SUBJECTS), "--quiet")
    print(f"\ncontainer_demo_s={time.perf_counter() - t0:.1f}")
    # the cwd (/home/...) does not hold the mount: shown inside OUTPUT, never absolute
    assert "summary table: OUTPUT/dmriflow/group/subjects.tsv" in run.stdout

    want, got = read_table(outside), read_table(mount / "demo")
    assert want["status"].tolist() == ["done"] * DEMO_SUBJECTS
    # same code and data; other library builds may round float32 sums differently
    assert_same_group_table(got, want, rtol=1e-4, atol=1e-6)
    fa = mount / "demo" / "dmriflow" / f"sub-{want['subject'][0].removeprefix('sub-')}"
    assert list(fa.glob("dwi/*_param-fa_dwimap.nii.gz")), "no FA map written to the mount"
    # the image's environment id is the lock's hash (the lock ships as data_files)
    lock_id = "sha256:" + hashlib.sha256((REPO / LOCK_NAME).read_bytes()).hexdigest()
    sidecar = json.loads(next(fa.glob("dwi/*_param-fa_dwimap.json")).read_text())
    assert sidecar["EnvironmentId"] == lock_id, sidecar["Lock"]


# ----------------------------------------------------------------------------
# The same image under podman, as an arbitrary uid with read-only input: what a
# cluster's Apptainer/Singularity does (it runs the image as the caller's uid,
# with the user's folders bound in). docs/operations.md, "Apptainer".
# ----------------------------------------------------------------------------
PODMAN = shutil.which("podman") or "/usr/bin/podman"
PODMAN_REQUIRE_ENV = "DMRIFLOW_REQUIRE_PODMAN"
#: A uid that is neither root nor the image's user, as a cluster account would be.
FOREIGN_UID = 4242
#: podman sets rlimits that this machine's sandbox refuses to raise (OPERATIONS.md).
PODMAN_ULIMITS = ("--ulimit", "nofile=16384:16384", "--ulimit", "nproc=8192:8192")


#: A cgroup-v2 hierarchy beside the v1 controllers ("hybrid" layout): crun, podman's
#: default runtime, refuses to start a container when it holds controllers; runc does not.
HYBRID_CGROUP_CONTROLLERS = Path("/sys/fs/cgroup/unified/cgroup.controllers")


def podman_runtime() -> tuple[str, ...]:
    """``--runtime runc`` on a host with the hybrid cgroup layout crun refuses
    (where runc is installed: docker.io brings it), else podman's default."""
    runc = shutil.which("runc")
    hybrid = HYBRID_CGROUP_CONTROLLERS.exists() and HYBRID_CGROUP_CONTROLLERS.read_text().strip()
    return ("--runtime", runc) if hybrid and runc else ()


def podman(*args: str, timeout: float = RUN_TIMEOUT_S, check: bool = True,
           **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([PODMAN, *podman_runtime(), *args], capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check and proc.returncode:
        raise AssertionError(f"podman {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def podman_image(docker_env, image) -> str:
    """The Docker-built image, handed to podman as an archive (as `apptainer build
    x.sif docker-archive://...` would take it)."""
    if not Path(PODMAN).exists():
        system_part_missing("podman is not installed (Debian package podman)", PODMAN_REQUIRE_ENV)
    if os.geteuid() != 0:
        system_part_missing("the podman test runs rootful podman (needs root)", PODMAN_REQUIRE_ENV)
    save = subprocess.Popen([DOCKER, "save", image], env=docker_env, stdout=subprocess.PIPE)
    loaded = podman("load", stdin=save.stdout, timeout=BUILD_TIMEOUT_S)
    save.stdout.close()
    assert save.wait() == 0, "docker save failed"
    names = [line.split("Loaded image:")[-1].strip().split(",")[0]
             for line in loaded.stdout.splitlines() if "Loaded image" in line]
    assert names, loaded.stdout + loaded.stderr
    yield names[0]
    podman("rmi", names[0], check=False)


def tree_digest(root: Path) -> dict:
    """Every file under root with its bytes' hash and mode: what 'untouched' means."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_podman_foreign_uid_read_only_input(podman_image, tmp_path):
    """Under podman, as a uid the image does not know, with the input bound
    read-only: every subject done, outputs owned by that uid, input untouched."""
    from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
    cohort = tmp_path / "in"
    write_cohort(cohort, DEMO_SUBJECTS, layout="bids", shape=(12, 14, 10), seed=0,
                 scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1))
    for p in [cohort, *cohort.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)              # read-only for everyone
    before = tree_digest(cohort)
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, FOREIGN_UID, FOREIGN_UID)
    t0 = time.perf_counter()
    run = podman("run", "--rm", *PODMAN_ULIMITS, "--user", f"{FOREIGN_UID}:{FOREIGN_UID}",
                 "-v", f"{cohort}:/in:ro", "-v", f"{out}:/out", podman_image,
                 "/in", "/out", "participant", "--nprocs", "1", "--quiet", check=False)
    print(f"\npodman_participant_s={time.perf_counter() - t0:.1f}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert read_table(out)["status"].tolist() == ["done"] * DEMO_SUBJECTS
    derivatives = out / "dmriflow"
    fa = sorted(derivatives.glob("sub-*/dwi/*_param-fa_dwimap.nii.gz"))
    assert len(fa) == DEMO_SUBJECTS
    owners = {p.stat().st_uid for p in derivatives.rglob("*")}
    assert owners == {FOREIGN_UID}, owners
    assert tree_digest(cohort) == before
    description = json.loads((derivatives / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Container"]["Type"] == "docker"   # the image's format
