"""The contract of every registered step (in the style of nibabel's test_image_api).

Each step of :data:`dmriflow.interfaces.steps.REGISTRY` runs on one phantom
subject, after Validate, through its Pydra task (``debug`` and ``cf``
workers) and through its generated Nipype interface: the three write the
same files (NIfTI compared as decompressed bytes), and a product step's
Product conforms to its declared schema. A step is turned on with the
options its registration gives as ``example``; steps that need a file
(an artefact to apply) get it from :data:`FIXTURE_OPTIONS`. Also: every
option is declared once, and every command-line flag comes from one
declaration.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from dmriflow.interfaces import io
from dmriflow.interfaces.bids_names import build_name
from dmriflow.interfaces.sim.phantom import write_cohort
from dmriflow.interfaces.steps import REGISTRY, default_options
from dmriflow.interfaces.steps.base import (Product, flag_of, options_of,
                                            product_from_record)
from dmriflow.pipelines.inputs import discover

SHAPE = (16, 20, 16)
#: Steps whose example options name a file the test makes (a fixture's name).
FIXTURE_OPTIONS = {"harmonize": "artefact"}
#: Pydra workers every step runs under.
WORKERS = ("debug", "cf")


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """One phantom subject with the acquisition the shipped directions model takes."""
    from dmriflow.models.data import phantom_scheme
    root = tmp_path_factory.mktemp("contract")
    write_cohort(root / "in", 1, shape=SHAPE, seed=7, scheme=phantom_scheme(2))
    (s,) = discover(root / "in")
    return root, s


@pytest.fixture(scope="module")
def artefact(subject):
    """An identity-registered harmonization artefact scaling RISH l0 of b=1000."""
    from dmriflow.interfaces import harmonize as H
    root, s = subject
    data = io.load_dwi(s.dwi, s.bval, s.bvec, s.mask)
    shells = [float(b) for b in data.gtab.shells]
    lmax = 4
    scale = np.ones(data.mask.shape + (lmax // 2 + 1,), np.float32)
    scale[..., 0] = 1.2
    art = H.HarmonizationArtefact(
        template_fa=np.zeros(data.mask.shape, np.float32), template_affine=data.affine,
        template_mask=data.mask, scale_maps={b: scale for b in shells}, shells=shells,
        lmax=lmax, tau=H.TAU_FRACTION, tau_values={b: np.zeros(lmax // 2 + 1) for b in shells},
        smoothing_fwhm_mm=0.0, scale_range=H.SCALE_RANGE, registration="identity",
        reference_site="a", target_site="b", subjects=[], pipeline_version="test")
    return str(art.save(root / "artefact"))


def step_options(name: str, request) -> dict:
    """The options that turn step ``name`` on for the phantom."""
    step = REGISTRY[name]
    options = dict(step.example)
    if name in FIXTURE_OPTIONS:
        value = request.getfixturevalue(FIXTURE_OPTIONS[name])
        options.update({f.name: value for f, _ in options_of(step.Options)})
    assert step.enabled(step.Options(**options)), \
        f"step {name}: give its registration an example that enables it"
    return options


def _pydra(task, root: Path, worker: str):
    from pydra.engine.submitter import Submitter
    kwargs = {"n_procs": 2} if worker == "cf" else {}
    with Submitter(worker=worker, cache_root=root, **kwargs) as sub:
        res = sub(task, raise_errors=True)
    return res.outputs


def run_pydra(name: str, options: dict, s, root: Path, worker: str) -> dict:
    """Validate, then the step, as Pydra tasks; the step's record."""
    from dmriflow.pipelines.steps import TASKS, Subject
    unit = Subject.of(s)
    record = _pydra(TASKS["validate"](subject=unit, options={}), root, worker).record
    if name == "validate":
        return record
    out = _pydra(TASKS[name](subject=unit.key, record=record, options=options), root, worker)
    return out.product if REGISTRY[name].kind == "product" else out.record


def run_nipype(name: str, options: dict, s, root: Path) -> dict:
    """Validate, then the step, as the generated Nipype interfaces; its record."""
    from dmriflow.interfaces.nipype_interfaces import STEP_INTERFACES
    files = {k: getattr(s, k) for k in ("dwi", "bval", "bvec", "mask", "sidecar")
             if getattr(s, k)}
    (root / "validate").mkdir(parents=True)
    val = STEP_INTERFACES["validate"](subject=s.key, **files).run(cwd=str(root / "validate"))
    if name == "validate":
        return json.loads(Path(val.outputs.record).read_text())
    (root / name).mkdir()
    res = STEP_INTERFACES[name](record=val.outputs.record, **options).run(cwd=str(root / name))
    out = res.outputs.product if REGISTRY[name].kind == "product" else res.outputs.record
    return json.loads(Path(out).read_text())


def written_files(name: str, record: dict) -> dict:
    """{what: path} of the files a step's record names: a product's maps and
    tables by entities, a record's current series and maps."""
    if REGISTRY[name].kind == "product":
        p = product_from_record(record)
        return {build_name(d.entities, d.suffix): d.path for d in p.maps + p.tables}
    files = {k: record["series"][k] for k in ("dwi", "bval", "bvec")}
    files.update({build_name(m["entities"]): m["path"] for m in record.get("maps", [])})
    return files


def content(path: str):
    raw = Path(path).read_bytes()
    return gzip.decompress(raw) if path.endswith(".gz") else raw


def assert_same_files(name: str, a: dict, b: dict) -> None:
    fa, fb = written_files(name, a), written_files(name, b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        assert content(fa[key]) == content(fb[key]), (name, key)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_step_runs_the_same_through_pydra_and_nipype(name, subject, request, tmp_path):
    root, s = subject
    options = step_options(name, request) if name != "validate" else {}
    runs = {w: run_pydra(name, options, s, tmp_path / f"pydra-{w}", w) for w in WORKERS}
    runs["nipype"] = run_nipype(name, options, s, tmp_path / "nipype")
    for engine, record in runs.items():
        assert record.get("status") == "ok", (engine, record.get("error"))
    for engine in ("cf", "nipype"):
        assert_same_files(name, runs["debug"], runs[engine])
    if REGISTRY[name].kind == "product":
        product = product_from_record(runs["debug"])
        assert isinstance(product, Product) and product.step == name
        assert REGISTRY[name].schema.check(product) == []
        assert product.maps or product.tables


def test_every_option_is_declared_once_and_every_flag_comes_from_one():
    """Walk the registry, the engine options and the command line: an option
    name belongs to one Options class; every run flag is generated from one
    declaration (or is one of the command's own arguments)."""
    from dmriflow.pipelines import cli
    declared: dict[str, str] = {}
    for section, cls, _ in cli.option_sources():
        for f, _ in options_of(cls):
            assert f.name not in declared, (f.name, declared.get(f.name), section)
            declared[f.name] = section
    assert set(default_options()) == set(REGISTRY)
    flags = {flag: f.name for _, cls, _ in cli.option_sources()
             for f, info in options_of(cls) if info.cli
             for flag in (flag_of(f, info), *info.aliases)}     # aliases: declared there too
    run = cli.build_parser().parse_args(["run", "in", "out"]).options_parser
    seen = {}
    for action in run._actions:
        for flag in action.option_strings:
            assert flag not in seen, f"{flag} declared twice"
            seen[flag] = action.dest
    generated = {f: d for f, d in seen.items() if f in flags}
    assert generated == {f: flags[f] for f in generated}
    own = set(seen) - set(flags)
    assert own == {"-h", "--help", "--layout", "--participant-label", "--config"}, own


def test_config_file_sets_options_and_flags_win(tmp_path):
    from dmriflow.pipelines import cli
    toml = tmp_path / "run.toml"
    toml.write_text('[tensor]\nfit_method = "OLS"\nwls_iterations = 1\n[rish]\nlmax = 4\n'
                    '[engine]\nworker = "debug"\n')
    args = cli.build_parser().parse_args(["run", "in", "out", "--config", str(toml),
                                          "--lmax", "6"])
    cli._apply_config(args)
    config = cli._config(args)
    assert (config.fit_method, config.wls_iterations, config.lmax, config.worker) == \
        ("OLS", 1, 6, "debug")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tensor.fit_methods": "OLS"}))
    with pytest.raises(ValueError, match="unknown option.*tensor.fit_methods"):
        cli.read_config(bad)


def test_the_subject_unit_is_hashed_by_file_content(tmp_path):
    """The engine's cache key of a subject's first node follows its files'
    contents, not their paths: the same path with new content is a new node,
    the same content under another path is the same node."""
    import os
    import shutil
    import time

    from dmriflow.pipelines.steps import TASKS, Subject
    write_cohort(tmp_path / "a", 1, shape=(8, 8, 6), seed=1)
    (s,) = discover(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (moved,) = discover(tmp_path / "b")

    def key(subject):
        return TASKS["validate"](subject=Subject.of(subject), options={})._hash
    before = key(s)
    assert key(moved) == before
    bvec = Path(s.bvec)
    bvec.write_text(bvec.read_text().replace("0", "1", 1))
    later = time.time() + 5          # a new mtime: the engine's hash cache keys on it
    os.utime(bvec, (later, later))
    assert key(s) != before


def test_nodes_are_named_after_their_tasks(subject):
    """Node names are SLURM job names and progress-line names: each enabled
    step's node carries its registered task name (Validate, FitTensor, ...)."""
    from pydra.engine.workflow import Workflow

    from dmriflow.pipelines.execution import RunConfig
    from dmriflow.pipelines.steps import Subject
    from dmriflow.pipelines.workflows import SubjectWorkflow
    _, s = subject
    config = RunConfig(worker="debug", snr_map=True)
    wf = Workflow.construct(SubjectWorkflow(subject=Subject.of(s), output_dir="out",
                                            options=config.options_record()))
    assert [n.name for n in wf.nodes] == \
        [REGISTRY[n].task for n in config.enabled_steps()] + ["Export"]


def test_cohort_steps_are_registered_and_their_flags_generated():
    """GroupTable, ImageGradientGroup and the harmonization fit are registered
    cohort steps; the run's cohort tasks and `harmonize fit`'s flags come from them."""
    from dmriflow.interfaces.steps import COHORT_REGISTRY
    from dmriflow.pipelines import cli
    from dmriflow.pipelines.workflows import COHORT_TASKS
    run_tasks = {s.task for s in COHORT_REGISTRY.values() if "run" in s.commands}
    assert run_tasks == set(COHORT_TASKS) == {"GroupTable", "ImageGradientGroup"}
    fit = COHORT_REGISTRY["harmonization_fit"].Options
    args = cli.build_parser().parse_args(["harmonize", "fit", "in", "out", "--reference", "a",
                                          "--target", "b", "--shells", "1000", "2000"])
    config = cli._config(args)
    assert config.cohort["harmonization_fit"] == fit(reference="a", target="b",
                                                     shells=[1000.0, 2000.0])
