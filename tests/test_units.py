"""Units of work: each DWI series is its own unit, named by its entities.

Two runs of one subject are two units with ``run-`` in every name (and each
unit computes from its own series); a problem of one series (two files
claiming it, a .bval without its image, a name that contradicts its folder,
two applicable gradient files) fails that unit only, naming the files;
sessions, inherited .bval/.bvec/.json and the HCP layout (unchanged)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from conftest import uri

from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
from dmriflow.pipelines import cli
from dmriflow.pipelines.execution import status_table, unit_entities
from dmriflow.pipelines.inputs import discover, read_filter_file
from dmriflow.pipelines.locks import unit_lock_name
from dmriflow.pipelines.submit import task_args

SHAPE = (12, 14, 10)
FA = "model-tensor_param-fa_dwimap.nii.gz"


def bids_cohort(root: Path, n: int) -> Path:
    write_cohort(root, n, layout="bids", shape=SHAPE, seed=0,
                 scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1))
    return root


def participant(cohort, out, tmp, *extra) -> int:
    return cli.main([str(cohort), str(out), "participant", "--worker", "debug", "--quiet",
                     "-w", str(tmp / "cache"), *extra])


def table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "dmriflow" / "group" / "subjects.tsv", sep="\t",
                       keep_default_na=False).set_index("subject")


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def two_series(cohort: Path, entity: str) -> None:
    """sub-01's series becomes ``<entity>-1`` and ``<entity>-2`` is a copy of
    sub-02's; derivative masks are removed (every unit computes its own)."""
    shutil.rmtree(cohort / "derivatives")
    folder = cohort / "sub-01" / "dwi"
    for f in sorted(folder.glob("sub-01_dwi.*")):
        f.rename(folder / f.name.replace("_dwi.", f"_{entity}-1_dwi."))
    for f in sorted((cohort / "sub-02" / "dwi").glob("sub-02_dwi.*")):
        shutil.copy(f, folder / f.name.replace("sub-02_dwi.", f"sub-01_{entity}-2_dwi."))


def fa_map(out: Path, unit: str, folder: str) -> np.ndarray:
    return np.asarray(nib.load(out / "dmriflow" / folder / "dwi" / f"{unit}_{FA}").dataobj)


def test_two_runs_are_two_units_with_run_in_every_name(tmp_path, capsys):
    """sub-01's run-1 is its own series, run-2 a copy of sub-02's: run-2's FA
    equals sub-02's to the bit and differs from run-1's, so each unit computed
    from its own files; every sub-01 output carries its run, sub-02's names
    are today's."""
    cohort = bids_cohort(tmp_path / "in", 2)
    two_series(cohort, "run")
    assert [u.key for u in discover(cohort)] == ["sub-01_run-1", "sub-01_run-2", "sub-02"]

    out = tmp_path / "out"
    assert participant(cohort, out, tmp_path) == cli.EXIT_OK
    t = table(out)
    assert list(t.index) == ["sub-01_run-1", "sub-01_run-2", "sub-02"]
    assert set(t["status"]) == {"done"}
    sub01, sub02 = files_of(out / "dmriflow" / "sub-01"), files_of(out / "dmriflow" / "sub-02")
    for run in ("run-1", "run-2"):
        assert (out / "dmriflow" / "sub-01" / f"sub-01_{run}_desc-dmriflow_status.json").exists()
        assert (out / "dmriflow" / "sub-01" / "dwi" / f"sub-01_{run}_{FA}").exists()
    assert sub01 and all(p.name.startswith(("sub-01_run-1_", "sub-01_run-2_")) for p in sub01)
    assert len([p for p in sub01 if "run-1" in p.name]) == len(sub02)
    assert all(p.name.startswith("sub-02_") and "run-" not in p.name for p in sub02)
    assert (out / "dmriflow" / "sub-02" / "dwi" / f"sub-02_{FA}").exists()

    assert np.array_equal(fa_map(out, "sub-01_run-2", "sub-01"), fa_map(out, "sub-02", "sub-02"))
    assert not np.array_equal(fa_map(out, "sub-01_run-1", "sub-01"),
                              fa_map(out, "sub-02", "sub-02"))
    status = status_table(out).set_index("subject")["status"]      # dmriflow status
    assert dict(status) == {"sub-01_run-1": "done", "sub-01_run-2": "done", "sub-02": "done"}
    assert cli.main([str(cohort), str(out), "group"]) == cli.EXIT_OK
    assert list(table(out).index) == ["sub-01_run-1", "sub-01_run-2", "sub-02"]
    locks = {p.name for p in (out / "dmriflow" / ".dmriflow-locks").iterdir()}
    assert {"sub-01_run-1.lock", "sub-01_run-2.lock", "sub-02.lock"} <= locks
    capsys.readouterr()


def test_an_ambiguous_unit_fails_alone_with_the_files_named(tmp_path, capsys):
    """sub-01 has its series twice (.nii beside .nii.gz); sub-02 has a stray
    run-2 .bval without its image: those two units fail naming the files, sub-02's
    own series and sub-03 are done (exit 2, some units failed)."""
    cohort = bids_cohort(tmp_path / "in", 3)
    gz = cohort / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    twin = gz.with_name("sub-01_dwi.nii")
    shutil.copy(gz, twin)
    stray = cohort / "sub-02" / "dwi" / "sub-02_run-2_dwi.bval"
    shutil.copy(cohort / "sub-02" / "dwi" / "sub-02_dwi.bval", stray)

    out = tmp_path / "out"
    assert participant(cohort, out, tmp_path) == cli.EXIT_SUBJECTS_FAILED
    t = table(out)
    assert dict(t["status"]) == {"sub-01": "failed", "sub-02": "done",
                                 "sub-02_run-2": "failed", "sub-03": "done"}
    # OUTPUT names input files by BIDS URI, never by absolute path
    assert uri(gz, cohort) in t.loc["sub-01", "error"]
    assert uri(twin, cohort) in t.loc["sub-01", "error"]
    assert uri(stray, cohort) in t.loc["sub-02_run-2", "error"] and str(cohort) not in t.to_csv()
    assert "without the DWI image" in t.loc["sub-02_run-2", "error"]
    assert (out / "dmriflow" / "sub-02" / "dwi" / f"sub-02_{FA}").exists()
    assert not list((out / "dmriflow").glob("sub-*/**/*run-2*dwimap*"))
    capsys.readouterr()


def touch(path: Path, text: str = "0") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def series(root: Path, stem: str, *exts: str) -> Path:
    """``<stem>_dwi.nii.gz`` (and the given companions) under ``root`` (never read:
    discovery names files only)."""
    for ext in (".nii.gz", *exts):
        touch(root / f"{stem}_dwi{ext}", "{}" if ext == ".json" else "0")
    return root / f"{stem}_dwi.nii.gz"


def test_sessions_inheritance_and_per_unit_problems(tmp_path):
    root = tmp_path / "bids"
    touch(root / "dataset_description.json", json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    ses1 = series(root / "sub-01" / "ses-1" / "dwi", "sub-01_ses-1", ".bval", ".bvec", ".json")
    ses2 = root / "sub-01" / "ses-2" / "dwi"
    ap, pa = (series(ses2, f"sub-01_ses-2_dir-{d}") for d in ("AP", "PA"))
    shared_bval = touch(ses2 / "sub-01_ses-2_dwi.bval")       # inherited by both directions
    shared_bvec = touch(ses2 / "sub-01_ses-2_dwi.bvec")
    subject_json = touch(root / "sub-01" / "sub-01_dwi.json", "{}")
    one = series(root / "sub-02" / "dwi", "sub-02_acq-multi_run-01", ".bval", ".bvec")
    mixed = series(root / "sub-03" / "dwi", "sub-04", ".bval", ".bvec")
    two_bvals = series(root / "sub-05" / "dwi", "sub-05_dir-AP_run-1", ".bvec")
    bvals = [touch(root / "sub-05" / "dwi" / n) for n in ("sub-05_dwi.bval",
                                                         "sub-05_dir-AP_dwi.bval")]
    missing = series(root / "sub-06" / "dwi", "sub-06", ".bvec")
    # dataset-level files apply to every series whose entities they share
    root_json = touch(root / "dwi.json", "{}")
    root_grads = [touch(root / f"acq-multi_dwi{e}") for e in (".bval", ".bvec")]
    bare = series(root / "sub-07" / "dwi", "sub-07_acq-multi")
    # brain masks of a derivative dataset, for the series whose name they start with
    masks = root / "derivatives" / "pipe"
    ap_mask = touch(masks / "sub-01" / "ses-2" / "dwi" /
                    "sub-01_ses-2_dir-AP_desc-brain_mask.nii.gz")
    one_mask = touch(masks / "sub-02" / "dwi" / "sub-02_acq-multi_run-01_desc-brain_mask.nii.gz")

    units = {u.key: u for u in discover(root)}
    assert list(units) == ["sub-01_ses-1", "sub-01_ses-2_dir-AP", "sub-01_ses-2_dir-PA",
                           "sub-02", "sub-03", "sub-05", "sub-06", "sub-07"]
    u = units["sub-01_ses-1"]
    assert (u.dwi, u.bval, u.sidecar, u.problem) == (str(ses1), str(ses1).replace(
        ".nii.gz", ".bval"), str(ses1).replace(".nii.gz", ".json"), None)
    for key, image in (("sub-01_ses-2_dir-AP", ap), ("sub-01_ses-2_dir-PA", pa)):
        u = units[key]
        assert (u.dwi, u.bval, u.bvec, u.sidecar, u.problem) == (
            str(image), str(shared_bval), str(shared_bvec), str(subject_json), None)
        assert unit_lock_name(unit_entities(u)) == f"{key}.lock"
    assert (units["sub-01_ses-2_dir-AP"].mask, units["sub-01_ses-2_dir-PA"].mask) == (
        str(ap_mask), None)
    assert units["sub-02"].mask == str(one_mask) and units["sub-07"].mask is None
    # one series keeps today's name; its labels are kept as written (run-01)
    assert units["sub-02"].dwi == str(one) and units["sub-02"].problem is None
    assert units["sub-02"].series == {}
    assert (units["sub-02"].bval, units["sub-02"].sidecar) == (
        str(one).replace(".nii.gz", ".bval"), str(root_json))
    u = units["sub-07"]
    assert (u.dwi, [u.bval, u.bvec], u.sidecar, u.problem) == (
        str(bare), [str(g) for g in root_grads], str(root_json), None)
    assert str(mixed) in units["sub-03"].problem and "folder" in units["sub-03"].problem
    assert all(str(b) in units["sub-05"].problem for b in bvals)
    assert str(two_bvals) in units["sub-05"].problem
    assert units["sub-06"].problem is None and units["sub-06"].bval == str(missing).replace(
        ".nii.gz", ".bval")          # absent: the unit fails naming it (check_files)

    filt = tmp_path / "f.json"
    filt.write_text(json.dumps({"dwi": {"session": "2", "direction": "PA"}}))
    assert [u.key for u in discover(root, bids_filter=read_filter_file(filt))] == [
        "sub-01_ses-2_dir-PA"]
    assert [u.key for u in discover(root, session_labels=["ses-2"])] == [
        "sub-01_ses-2_dir-AP", "sub-01_ses-2_dir-PA"]
    # the array job gives one task per subject/session: both directions in one
    tasks = task_args([units[k] for k in ("sub-01_ses-2_dir-AP", "sub-01_ses-2_dir-PA",
                                          "sub-02")])
    assert tasks == ["--participant-label 01 --session-label 2", "--participant-label 02"]


def test_hcp_units_are_unchanged_and_bids2table_is_not_imported(tmp_path):
    cohort = tmp_path / "hcp"
    labels = write_cohort(cohort, 2, layout="hcp", shape=SHAPE, seed=0,
                          scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1))
    units = discover(cohort)
    assert [u.key for u in units] == [f"sub-{lbl}" for lbl in labels]
    assert all(u.series == {} and u.problem is None and u.dwi.endswith(
        "T1w/Diffusion/data.nii.gz") and u.bval.endswith("T1w/Diffusion/bvals") for u in units)
    probe = ("import sys; from dmriflow.pipelines.inputs import discover; "
             f"discover({str(cohort)!r}); print('bids2table' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    twin = cohort / f"{labels[0][:2]}-{labels[0][2:]}"         # maps to the same label
    shutil.copytree(cohort / labels[0], twin)
    units = {u.key: u for u in discover(cohort)}
    assert list(units) == [f"sub-{lbl}" for lbl in labels]
    assert str(twin) in units[f"sub-{labels[0]}"].problem
    assert units[f"sub-{labels[1]}"].problem is None


def test_two_echoes_are_two_units_with_echo_in_every_name(tmp_path, capsys):
    """sub-01's echo-1 is its own series, echo-2 a copy of sub-02's: two units
    (they claimed one unit, sub-01, when ``echo`` was not an input entity), each
    computed from its own files, every derivative name keeping its ``echo-``."""
    cohort = bids_cohort(tmp_path / "in", 2)
    two_series(cohort, "echo")
    assert [u.key for u in discover(cohort)] == ["sub-01_echo-1", "sub-01_echo-2", "sub-02"]

    out = tmp_path / "out"
    assert participant(cohort, out, tmp_path) == cli.EXIT_OK
    assert dict(table(out)["status"]) == {"sub-01_echo-1": "done", "sub-01_echo-2": "done",
                                          "sub-02": "done"}
    sub01 = files_of(out / "dmriflow" / "sub-01")
    assert sub01 and all(p.name.startswith(("sub-01_echo-1_", "sub-01_echo-2_")) for p in sub01)
    assert len([p for p in sub01 if "echo-1" in p.name]) == len(
        [p for p in sub01 if "echo-2" in p.name])
    assert np.array_equal(fa_map(out, "sub-01_echo-2", "sub-01"),
                          fa_map(out, "sub-02", "sub-02"))
    assert not np.array_equal(fa_map(out, "sub-01_echo-1", "sub-01"),
                              fa_map(out, "sub-02", "sub-02"))
    capsys.readouterr()


def test_series_differing_only_by_echo_part_or_chunk_are_separate_units(tmp_path):
    """Two series of one session that differ only by ``echo-``, ``part-`` or
    ``chunk-`` (labels kept as written) are two units, their keys the prefix of
    their derivative names; a filter selects either."""
    from dmriflow.interfaces.bids_names import format_entities
    from dmriflow.pipelines.steps import Subject
    root = tmp_path / "bids"
    touch(root / "dataset_description.json", json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    pairs = {"echo": ("1", "2"), "part": ("mag", "phase"), "chunk": ("01", "02")}
    for n, (entity, labels) in enumerate(pairs.items(), start=1):
        for label in labels:
            series(root / f"sub-0{n}" / "ses-1" / "dwi", f"sub-0{n}_ses-1_acq-multi_{entity}-"
                   f"{label}", ".bval", ".bvec")
    units = discover(root)
    assert [u.key for u in units] == [f"sub-0{n}_ses-1_acq-multi_{entity}-{label}"
                                      for n, (entity, labels) in enumerate(pairs.items(), 1)
                                      for label in labels]
    assert all(u.problem is None and format_entities(Subject.of(u).entities) == u.key
               for u in units)
    filt = tmp_path / "f.json"
    filt.write_text(json.dumps({"dwi": {"part": "phase"}}))
    assert [u.key for u in discover(root, bids_filter=read_filter_file(filt))] == [
        "sub-02_ses-1_acq-multi_part-phase"]
