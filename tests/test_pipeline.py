"""End-to-end cohort runs on small phantom cohorts: outputs, cache, failures, status."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dmriflow.pipelines.derivatives import derivative_file
from dmriflow.interfaces import io
from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
from dmriflow.pipelines import cli
from dmriflow.pipelines.execution import RunConfig, run_cohort, status_table
from dmriflow.pipelines.inputs import assign_protocols, census, discover

SHAPE = (18, 22, 16)
TENSOR = ("fa", "md", "ad", "rd", "s0", "v1")


def small_scheme():
    return hcp_scheme(n_b0=4, shells=(1000, 2000), n_dirs=30, seed=1)


def make_cohort(root: Path, n: int, layout: str = "hcp", seed: int = 0) -> Path:
    write_cohort(root, n, layout=layout, shape=SHAPE, seed=seed, scheme=small_scheme())
    return root


def node_results(cache: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in cache.glob("*/_result.pklz")}


def config(tmp: Path, worker="debug", **kw) -> RunConfig:
    return RunConfig(worker=worker, n_procs=2, cache_dir=str(tmp / "cache"), quiet=True, **kw)


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cohort")
    cohort = make_cohort(tmp / "in", 3)
    subjects = discover(cohort)
    result = run_cohort(subjects, tmp / "out", config(tmp, worker="cf"))
    return tmp, subjects, result


def test_cohort_end_to_end(cohort_run):
    tmp, subjects, result = cohort_run
    assert [r["status"] for r in result.rows] == ["done"] * 3
    assert result.engine_errors == []
    for s in subjects:
        dwi_dir = tmp / "out" / "dmriflow" / f"sub-{s.label}" / "dwi"
        expected = {f"sub-{s.label}_model-tensor_param-{p}_dwimap.nii.gz" for p in TENSOR}
        expected |= {f"sub-{s.label}_model-rish_desc-b{b}_param-l{order}_dwimap.nii.gz"
                     for b in (1000, 2000) for order in (0, 2, 4)}   # 30 dirs -> lmax 6
        expected |= {f"sub-{s.label}_model-rish_desc-b{b}_param-l6_dwimap.nii.gz"
                     for b in (1000, 2000)}
        names = {p.name for p in dwi_dir.glob("*.nii.gz")}
        assert names == expected
        assert {p.name.replace(".json", ".nii.gz") for p in dwi_dir.glob("*.json")} == expected
        v1 = nib.load(dwi_dir / f"sub-{s.label}_model-tensor_param-v1_dwimap.nii.gz")
        assert v1.shape == SHAPE + (3,)
        meta = json.loads((dwi_dir / f"sub-{s.label}_model-tensor_param-fa_dwimap.json").read_text())
        assert meta["InputHashes"]["dwi"] == io.file_sha256(s.dwi)
        assert meta["Parameters"]["fit_method"] == "WLS"
        assert meta["Parameters"]["gradient_policy"]["b0_threshold"] == 50.0
        assert meta["GeneratedBy"][0]["PipelineVersion"] == io.pipeline_version()
        assert meta["Versions"]["pydra"] == "1.0a12"


def test_group_table(cohort_run):
    tmp, subjects, result = cohort_run
    table = pd.read_csv(result.table, sep="\t")
    assert list(table.columns[:4]) == ["subject", "status", "failed_step", "error"]
    assert list(table["subject"]) == [s.key for s in subjects]
    assert set(table["protocol"]) == {"P1"}
    assert set(table["shells"]) == {"1000 2000"} and set(table["directions"]) == {"30 30"}
    for s, median in zip(subjects, table["median_fa"]):
        fa = nib.load(tmp / "out" / "dmriflow" / f"sub-{s.label}" / "dwi" /
                      f"sub-{s.label}_model-tensor_param-fa_dwimap.nii.gz").get_fdata()
        mask = nib.load(s.mask).get_fdata() > 0
        assert median == pytest.approx(np.median(fa[mask]), rel=1e-5)


def test_immediate_rerun_recomputes_nothing(cohort_run):
    tmp, subjects, result = cohort_run
    before = node_results(tmp / "cache")
    again = run_cohort(subjects, tmp / "out", config(tmp, worker="cf"))
    assert node_results(tmp / "cache") == before
    assert [r["status"] for r in again.rows] == ["done"] * 3


def test_deleted_derivatives_are_restored(cohort_run):
    tmp, subjects, result = cohort_run
    victim = derivative_file(result.rows[0]["derivatives"][0], tmp / "out")
    victim.unlink()
    fits = {k: v for k, v in node_results(tmp / "cache").items()}
    run_cohort(subjects, tmp / "out", config(tmp))
    assert victim.exists()
    assert set(fits) <= set(node_results(tmp / "cache"))   # fits served from cache


def test_code_change_means_new_results(tmp_path, monkeypatch):
    cohort = make_cohort(tmp_path / "in", 1)
    subjects = discover(cohort)
    run_cohort(subjects, tmp_path / "out", config(tmp_path))
    first = node_results(tmp_path / "cache")
    monkeypatch.setattr(io, "pipeline_version", lambda: "0.1.0+edited-source")
    run_cohort(subjects, tmp_path / "out", config(tmp_path))
    second = node_results(tmp_path / "cache")
    assert set(first) < set(second)
    # every step ran again: validate, tensor, rish, export, group + 2 workflows
    assert len(set(second) - set(first)) >= 5
    meta = json.loads(next((tmp_path / "out" / "dmriflow").rglob("*param-fa_dwimap.json"))
                      .read_text())
    assert meta["GeneratedBy"][0]["PipelineVersion"] == "0.1.0+edited-source"


def _truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def test_broken_subjects_do_not_stop_the_cohort(tmp_path, capsys):
    cohort = make_cohort(tmp_path / "in", 4)
    good = make_cohort(tmp_path / "spare", 4)
    subjects = discover(cohort)
    truncated, no_bvals, nan_subject = subjects[0], subjects[1], subjects[2]
    _truncate(Path(truncated.dwi))
    Path(no_bvals.bval).unlink()
    img = nib.load(nan_subject.dwi)
    data = np.asarray(img.dataobj).copy()
    data[5, 5, 5, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine, img.header), nan_subject.dwi)

    result = run_cohort(subjects, tmp_path / "out", config(tmp_path, worker="cf"))
    by_subject = {r["subject"]: r for r in result.rows}
    assert by_subject[subjects[3].key]["status"] == "done"
    for s, problem in ((truncated, "truncated"), (no_bvals, "does not exist"),
                       (nan_subject, "NaN/Inf")):
        row = by_subject[s.key]
        assert row["status"] == "failed" and row["failed_step"] == "validate"
        path = s.bval if s is no_bvals else s.dwi
        assert row["error"].startswith(f"{path}: ") and problem in row["error"]

    out = tmp_path / "out"
    assert cli.main(["status", str(out)]) == cli.EXIT_SUBJECTS_FAILED
    printed = capsys.readouterr().out
    assert "1 done, 3 failed" in printed
    assert f"{truncated.key}" in printed and "truncated" in printed
    table = pd.read_csv(out / "dmriflow" / "group" / "subjects.tsv", sep="\t")
    assert sorted(table["status"]) == ["done", "failed", "failed", "failed"]
    assert not list((out / "dmriflow" / truncated.out_parts[0]).rglob("*.nii.gz"))

    # fix the inputs: the failed subjects now complete, the good one is not recomputed
    done_dir = out / "dmriflow" / subjects[3].out_parts[0] / "dwi"
    done_mtimes = {p: p.stat().st_mtime_ns for p in done_dir.iterdir()}
    for s in (truncated, no_bvals, nan_subject):
        src = Path(good, Path(s.dwi).relative_to(cohort))
        shutil.copytree(src.parent, Path(s.dwi).parent, dirs_exist_ok=True)
    result = run_cohort(subjects, tmp_path / "out", config(tmp_path, worker="cf"))
    assert [r["status"] for r in result.rows] == ["done"] * 4
    assert {p: p.stat().st_mtime_ns for p in done_dir.iterdir()} == done_mtimes
    assert set(status_table(out)["status"]) == {"done"}


def test_status_reports_missing_subjects(cohort_run, capsys):
    tmp, subjects, result = cohort_run
    status_file = next((tmp / "out" / "dmriflow" / f"sub-{subjects[1].label}").glob("*status.json"))
    saved = status_file.read_text()
    status_file.unlink()
    try:
        table = status_table(tmp / "out")
        assert list(table["status"]) == ["done", "missing", "done"]
        assert cli.main(["status", str(tmp / "out")]) == cli.EXIT_SUBJECTS_FAILED
        assert "missing" in capsys.readouterr().out
    finally:
        status_file.write_text(saved)


def test_bids_layout_and_participant_label(tmp_path):
    cohort = make_cohort(tmp_path / "bids", 3, layout="bids")
    subjects = discover(cohort)
    assert [s.key for s in subjects] == ["sub-01", "sub-02", "sub-03"]
    assert all(s.sidecar for s in subjects)
    picked = discover(cohort, participant_labels=["sub-02"])
    assert [s.key for s in picked] == ["sub-02"]
    code = cli.main(["run", str(cohort), str(tmp_path / "out"), "--worker", "debug",
                     "--participant-label", "02", "--cache-dir", str(tmp_path / "c"), "--quiet"])
    assert code == cli.EXIT_OK
    table = pd.read_csv(tmp_path / "out" / "dmriflow" / "group" / "subjects.tsv", sep="\t")
    assert list(table["subject"]) == ["sub-02"]
    assert table["field_strength_t"][0] == 3.0 and table["echo_time_ms"][0] == 89.5
    assert (tmp_path / "out" / "dmriflow" / "sub-02" / "dwi" /
            "sub-02_model-tensor_param-fa_dwimap.nii.gz").exists()


def test_unknown_participant_label_is_an_error(tmp_path):
    cohort = make_cohort(tmp_path / "in", 1)
    from dmriflow.interfaces.errors import UsageError
    with pytest.raises(UsageError, match="--participant-label nobody: no such subject"):
        discover(cohort, participant_labels=["nobody"])


def test_census_groups_protocols(tmp_path):
    cohort = make_cohort(tmp_path / "a", 2)
    write_cohort(tmp_path / "a", 1, shape=SHAPE, seed=7, subject_prefix="8",
                 scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=20, seed=3))
    subjects = discover(cohort)
    assert len(subjects) == 3
    df = census(subjects)
    assert sorted(df["protocol"]) == ["P1", "P1", "P2"]
    assert set(df.loc[df["protocol"] == "P2", "directions"]) == {"20"}
    rows = pd.DataFrame([{"voxel_size_mm": "2x2x2", "field_strength_t": 3.0,
                          "echo_time_ms": 89.5, "shells": "1000", "directions": "30"},
                         {"voxel_size_mm": "2.01x2x2", "field_strength_t": 3.0,
                          "echo_time_ms": 89.9, "shells": "1000", "directions": "30"},
                         {"voxel_size_mm": "2x2x2", "field_strength_t": 7.0,
                          "echo_time_ms": 89.5, "shells": "1000", "directions": "30"},
                         {"voxel_size_mm": None, "field_strength_t": None,
                          "echo_time_ms": None, "shells": None, "directions": None}])
    assert list(assign_protocols(rows)["protocol"]) == ["P1", "P1", "P2", "unreadable"]


def test_gzip_truncation_helper_really_truncates(tmp_path):
    """Guard for the broken-subject test: half a .nii.gz cannot be decompressed."""
    cohort = make_cohort(tmp_path / "in", 1)
    path = Path(discover(cohort)[0].dwi)
    _truncate(path)
    with pytest.raises(EOFError):
        with gzip.open(path) as fh:
            while fh.read(1 << 20):
                pass


def test_simulate_command_writes_a_cohort(tmp_path, capsys):
    out = tmp_path / "sim"
    assert cli.main(["simulate", str(out), "--subjects", "2", "--layout", "bids",
                     "--shape", "12", "14", "10", "--seed", "3"]) == cli.EXIT_OK
    assert "wrote 2 bids subject(s)" in capsys.readouterr().out
    subjects = discover(out)
    assert [s.key for s in subjects] == ["sub-01", "sub-02"]
    dwi = io.load_dwi(subjects[0].dwi, subjects[0].bval, subjects[0].bvec)
    assert dwi.data.shape == (12, 14, 10, 288)
    assert dwi.gtab.shells == [1000.0, 2000.0, 3000.0]
    assert (out / "derivatives" / "truth" / "sub-01" / "sub-01_param-fa.nii.gz").exists()


def test_unknown_input_folder_is_a_clear_cli_error(tmp_path, capsys):
    code = cli.main(["run", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--quiet"])
    assert code == cli.EXIT_INPUT
    assert f"{tmp_path / 'nowhere'}: input folder does not exist" in capsys.readouterr().err


def test_site_labels_from_protocols_and_tables(tmp_path):
    from dmriflow.pipelines.inputs import site_labels
    cohort = make_cohort(tmp_path / "in", 2, layout="bids")
    subjects = discover(cohort)
    assert site_labels(subjects) == {"sub-01": "P1", "sub-02": "P1"}
    table = tmp_path / "sites.tsv"
    table.write_text("participant_id\tscanner\n01\tprisma\nsub-02\tskyra\n")
    assert site_labels(subjects, "scanner", table) == {"sub-01": "prisma", "sub-02": "skyra"}
    table.write_text("participant_id\tscanner\n01\tprisma\n")
    with pytest.raises(Exception, match=r"sites.tsv: no 'scanner' value for \['sub-02'\]"):
        site_labels(subjects, "scanner", table)
    with pytest.raises(Exception, match="needs columns"):
        site_labels(subjects, "site", table)


def test_preprocessing_steps_run_and_are_recorded(tmp_path):
    """--denoise --degibbs: a preprocessed series and the MP-PCA noise map are
    exported; the noise map recovers the simulated Rician sigma in the brain."""
    cohort = tmp_path / "in"
    write_cohort(cohort, 1, layout="bids", shape=(24, 28, 20), seed=4,
                 scheme=hcp_scheme(n_b0=6, shells=(1000, 2000), n_dirs=40, seed=1))
    code = cli.main(["run", str(cohort), str(tmp_path / "out"), "--denoise", "--degibbs",
                     "--worker", "debug", "--quiet", "--cache-dir", str(tmp_path / "c")])
    assert code == cli.EXIT_OK
    dwi_dir = tmp_path / "out" / "dmriflow" / "sub-01" / "dwi"
    meta = json.loads((dwi_dir / "sub-01_desc-preproc_dwi.json").read_text())
    (step,) = meta["Parameters"]["history"]
    assert step["step"] == "preprocess"
    assert step["report"]["order"] == ["denoise", "degibbs"]
    truth = json.loads(next((cohort / "derivatives" / "truth" / "sub-01")
                            .glob("*simulation.json")).read_text())
    sigma = nib.load(dwi_dir / "sub-01_model-mppca_param-sigma_dwimap.nii.gz").get_fdata()
    brain = nib.load(next(cohort.rglob("sub-01*_desc-brain_mask.nii.gz"))).get_fdata() > 0
    assert np.median(sigma[brain]) == pytest.approx(truth["NoiseSigma"], rel=0.15)
    raw = nib.load(cohort / "sub-01" / "dwi" / "sub-01_dwi.nii.gz").get_fdata()
    pre = nib.load(dwi_dir / "sub-01_desc-preproc_dwi.nii.gz").get_fdata()
    assert pre.shape == raw.shape and not np.allclose(pre[brain], raw[brain])


def test_export_product_writes_maps_tables_and_sidecars(tmp_path):
    from dmriflow.pipelines.derivatives import export_product
    src = tmp_path / "node"
    src.mkdir()
    angle = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nii = io.save_nifti(angle, np.eye(4), src / "angle.nii.gz")
    tsv = io.write_text("estimator\tmean\nB\t51.0\n", src / "rows.tsv")
    product = {"subject": "s1", "status": "ok", "step": "image_gradient",
               "maps": {"model-imagegradient_est-B_param-angle": str(nii)},
               "tables": {"desc-imagegradient_angles": str(tsv)},
               "parameters": {"estimators": ["B"]}, "row": {"ig_B_mean": 51.0}}
    inputs = {"dwi": str(nii)}
    written = export_product(product, tmp_path / "out", "s1", inputs, {"InputHashes": {}})
    names = sorted(Path(w).name for w in written)
    assert names == ["s1_desc-imagegradient_angles.tsv",
                     "s1_model-imagegradient_est-B_param-angle_dwimap.nii.gz"]
    out = tmp_path / "out"
    assert np.array_equal(nib.load(out / names[1]).get_fdata(), angle)
    assert (out / names[0]).read_text() == tsv.read_text()
    for stem in ("s1_desc-imagegradient_angles", "s1_model-imagegradient_est-B_param-angle_dwimap"):
        meta = json.loads((out / f"{stem}.json").read_text())
        assert meta["Parameters"]["estimators"] == ["B"]
        assert meta["GeneratedBy"][0]["Step"] == "image_gradient"
        assert meta["Inputs"]["dwi"]["sha256"] == io.file_sha256(nii)
