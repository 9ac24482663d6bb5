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


def test_console_script_entry_point():
    out = subprocess.run([Path(sys.executable).with_name("dmriflow"), "--version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("dmriflow ")
