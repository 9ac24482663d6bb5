"""Every Pydra task of the pipelines hashes the same in the submitter and in a worker.

The engine ships a task to a worker process with cloudpickle and refuses to
run it when its hash changed on the way ("Input field hashes have changed").
A task function that cloudpickle cannot find by module and name travels by
value; cloudpickle 3.1.3 then gives its code the file name ``<dynamic-code>``
and pydra hashes bytecode instead of source, so every ``cf``/``slurm`` job of
such a task failed (3.1.1 kept the file name). Here one process builds every
task, hashes it and pickles it; a fresh process unpickles and hashes again,
under the locked cloudpickle and under 3.1.1 (installed into a scratch folder
that shadows the locked one).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from dmriflow.interfaces.steps import REGISTRY

#: The cloudpickle versions the round trip must hold under, besides the locked
#: one: 3.1.1, the last release that kept a by-value function's file name.
OTHER_CLOUDPICKLE = "cloudpickle==3.1.1 --hash=sha256:" \
    "c8c5a44295039331ee9dad40ba100a9c7297b6f988e50e87ccdf3765a668350e"
#: Tasks that must be found (the enumeration itself is checked with these).
KNOWN_TASKS = {"Validate", "Preprocess", "FitTensor", "FitRish", "Export", "GroupTable",
               "Harmonize", "HarmonizationFeatures", "FitSubject", "FitHarmonization",
               "FeaturesWorkflow", "HarmonizationFitWorkflow", "Inference", "InferenceSubject",
               "InferencePhase", "ImageGradient", "ImageGradientGroup", "SubjectWorkflow",
               "CohortWorkflow"}
#: ... and the generated task of every registered step (e.g. SnrMap).
KNOWN_TASKS |= {step.task for step in REGISTRY.values()}
CHILD_TIMEOUT_S = 300


def task_classes() -> dict[str, tuple[type, types.FunctionType]]:
    """``{name: (task class, its function or constructor)}`` of dmriflow.pipelines."""
    from pydra.compose.base import Task
    from pydra.utils.general import get_fields

    import dmriflow.pipelines as pkg
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if not (inspect.isclass(obj) and issubclass(obj, Task)) or name in found:
                continue
            fields = get_fields(obj)
            field = fields.get("function") or fields.get("constructor")
            if field is not None and field.default.__module__.startswith("dmriflow."):
                found[name] = (obj, field.default)
    return found


def _dummy(tp, a_file: Path):
    """A value of type ``tp`` for a mandatory input (files: one real file)."""
    from fileformats.generic import File
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _dummy(next(a for a in args if a is not type(None)), a_file)
    if origin is list:
        return [_dummy(args[0], a_file)] if args else ["x"]
    if inspect.isclass(tp) and issubclass(tp, (File, Path)):
        return a_file
    if dataclasses.is_dataclass(tp):       # a typed unit, e.g. pipelines.steps.Subject
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _dummy(hints[f.name], a_file) for f in dataclasses.fields(tp)})
    return {str: "sub-01", int: 2, float: 1.5, bool: True, dict: {"k": "v"},
            list: ["x"], tuple: ("x",)}[tp]


def build_tasks(a_file: Path) -> dict:
    """One instance of every task, mandatory inputs filled with dummies."""
    from pydra.utils.general import get_fields
    tasks = {}
    for name, (cls, _) in sorted(task_classes().items()):
        fields = get_fields(cls)
        mandatory = {k: _dummy(f.type, a_file) for k, f in fields.items()
                     if f.mandatory and k not in ("function", "constructor")}
        tasks[name] = cls(**mandatory)
    return tasks


def _child(mode: str, folder: Path) -> None:
    """``dump``: hash and pickle every task; ``load``: unpickle and hash again."""
    import cloudpickle
    a_file = folder / "input.txt"
    report = {"cloudpickle": cloudpickle.__version__, "hashes": {}}
    if mode == "dump":
        a_file.write_text("the same content in both processes\n")
        for name, task in build_tasks(a_file).items():
            report["hashes"][name] = task._hash
            (folder / f"{name}.pkl").write_bytes(cloudpickle.dumps(task))
    else:
        for path in sorted(folder.glob("*.pkl")):    # written by the dump process above
            report["hashes"][path.stem] = cloudpickle.loads(path.read_bytes())._hash
    (folder / f"{mode}.json").write_text(json.dumps(report))


def _run_child(mode: str, folder: Path, shadow: Path | None) -> dict:
    env = dict(os.environ)
    if shadow is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shadow), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, mode, str(folder)], env=env,
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((folder / f"{mode}.json").read_text())


def test_every_task_function_is_reachable_by_module_and_name():
    tasks = task_classes()
    assert KNOWN_TASKS <= set(tasks), f"not found: {sorted(KNOWN_TASKS - set(tasks))}"
    for name, (_, fn) in tasks.items():
        module = sys.modules[fn.__module__]
        assert getattr(module, fn.__qualname__, None) is fn, (
            f"{name}: {fn.__module__}.{fn.__qualname__} is not its function, so cloudpickle "
            "ships it by value (define the task from a module-level function)")


@pytest.fixture(scope="module")
def other_cloudpickle(tmp_path_factory) -> Path:
    """A folder holding cloudpickle 3.1.1 (hash-checked), to put first on PYTHONPATH."""
    folder = tmp_path_factory.mktemp("cloudpickle-3.1.1")
    req = folder / "requirements.txt"
    req.write_text(OTHER_CLOUDPICKLE + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                           "--require-hashes", "--target", str(folder / "site"), "-r", str(req)],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder / "site"


@pytest.mark.parametrize("which", ["locked", "3.1.1"])
def test_task_hash_survives_a_trip_to_a_worker_process(which, other_cloudpickle, tmp_path):
    shadow = other_cloudpickle if which == "3.1.1" else None
    dumped = _run_child("dump", tmp_path, shadow)
    loaded = _run_child("load", tmp_path, shadow)
    if which == "3.1.1":
        assert dumped["cloudpickle"] == loaded["cloudpickle"] == "3.1.1"
    assert set(dumped["hashes"]) >= KNOWN_TASKS
    changed = {name: (h, loaded["hashes"].get(name)) for name, h in dumped["hashes"].items()
               if loaded["hashes"].get(name) != h}
    assert not changed, f"hash changed in the worker (cloudpickle {dumped['cloudpickle']}): " \
                        f"{changed}"


if __name__ == "__main__":
    _child(sys.argv[1], Path(sys.argv[2]))
