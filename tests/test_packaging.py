"""The namespace-package layout installs as dmriflow.interfaces/pipelines/models."""

import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"interfaces": "dmriflow.interfaces", "pipelines": "dmriflow.pipelines",
          "models": "dmriflow.models"}


def _setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_every_package_folder_is_listed():
    cfg = _setup_cfg()
    listed = set(cfg["options"]["packages"].split())
    found = set()
    for folder, pkg in LAYERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((pkg,) + rel))
    assert found == listed


def test_package_dir_maps_the_layers():
    mapping = dict(line.split("=") for line in
                   _setup_cfg()["options"]["package_dir"].strip().splitlines())
    assert {k.strip(): v.strip() for k, v in mapping.items()} == \
        {pkg: folder for folder, pkg in LAYERS.items()}


def test_regular_install_imports(tmp_path):
    """A non-editable install (into a target folder) exposes all three layers."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(ROOT)],
                   check=True, capture_output=True)
    code = ("import dmriflow.interfaces.gradients, dmriflow.pipelines.inputs, dmriflow.models;"
            "import dmriflow.interfaces as i; print(i.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True,
                         capture_output=True, text=True, env={"PYTHONPATH": str(target)})
    assert out.stdout.strip().startswith(str(target))
    # every shipped checkpoint file travels with a regular install (the image's)
    shipped = {p.relative_to(ROOT / "models").as_posix()
               for p in (ROOT / "models" / "checkpoints").rglob("*")
               if p.name in ("card.json", "model.safetensors")}
    installed = {p.relative_to(target / "dmriflow" / "models").as_posix()
                 for p in (target / "dmriflow" / "models" / "checkpoints").rglob("*")
                 if p.is_file()}
    assert shipped and shipped <= installed, sorted(shipped - installed)


def test_console_script_entry_point():
    out = subprocess.run([Path(sys.executable).with_name("dmriflow"), "--version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("dmriflow ")


def _imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module a source file imports, at any depth
    (imports inside functions and classes count; relative ones are resolved
    against ``package``)."""
    import ast
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.update(f"{base}.{a.name}" for a in node.names)
            names.add(base)
    return names


def test_interfaces_and_models_never_import_pipelines():
    """ARCHITECTURE.md: pipelines -> interfaces -> numerics, interfaces.inference
    -> models; neither interfaces/ nor models/ imports dmriflow.pipelines."""
    pipelines = LAYERS["pipelines"]
    offenders = []
    for folder in ("interfaces", "models"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder)
            package = ".".join((LAYERS[folder],) + rel.parts[:-1])
            bad = sorted(m for m in _imported_modules(path, package)
                         if m == pipelines or m.startswith(pipelines + "."))
            if bad:
                offenders.append(f"{path.relative_to(ROOT)}: {', '.join(bad)}")
    assert not offenders, "\n".join(offenders)


def test_import_scan_sees_nested_and_relative_imports(tmp_path):
    """The scan above finds an import inside a function and a relative one
    that climbs out of interfaces/ into pipelines/."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from dmriflow.pipelines.inputs import census\n"
                   "class C:\n    def g(self):\n        from ..pipelines import steps\n"
                   "import numpy\n")
    found = _imported_modules(src, "dmriflow.interfaces")
    assert {"dmriflow.pipelines.inputs", "dmriflow.pipelines.steps", "numpy"} <= found
