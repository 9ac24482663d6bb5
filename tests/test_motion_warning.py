"""A raw series run without motion correction warns, once per subject, naming it;
HCP minimally preprocessed input and processed derivatives do not."""

from __future__ import annotations

import importlib
from pathlib import Path

import pandas as pd
import pytest

from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
from dmriflow.pipelines import cli
from dmriflow.pipelines.execution import LOG_DIR

SHAPE = (14, 16, 12)
#: The step module (the package re-exports a function of the same name).
motion_step = importlib.import_module("dmriflow.interfaces.steps.motion")


def _cohort(root: Path, layout: str) -> Path:
    write_cohort(root, 2, layout=layout, shape=SHAPE, seed=2,
                 scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1))
    return root


def _run(cohort: Path, out: Path, *extra) -> tuple[pd.DataFrame, str]:
    code = cli.main(["run", str(cohort), str(out), "--worker", "debug", "--quiet",
                     "--cache-dir", str(out.parent / f"cache-{out.name}"), *extra])
    assert code == cli.EXIT_OK
    table = pd.read_csv(out / "dmriflow" / "group" / "subjects.tsv", sep="\t",
                        keep_default_na=False).set_index("subject")
    log = "".join(p.read_text() for p in (out / "dmriflow" / LOG_DIR).glob("*.log"))
    return table, log


def _warned(log: str) -> list[str]:
    return [line for line in log.splitlines() if motion_step.UNCORRECTED_WARNING in line]


def test_raw_bids_without_motion_correction_warns_once_per_subject(tmp_path):
    table, log = _run(_cohort(tmp_path / "bids", "bids"), tmp_path / "out")
    lines = _warned(log)
    assert len(lines) == 2                                   # once per subject ...
    for key in ("sub-01", "sub-02"):                         # ... naming it
        assert sum(f"{key}:" in line for line in lines) == 1
        assert motion_step.UNCORRECTED_WARNING in table.loc[key, "warnings"]


def test_hcp_input_does_not_warn(tmp_path):
    table, log = _run(_cohort(tmp_path / "hcp", "hcp"), tmp_path / "out")
    assert _warned(log) == []
    assert not table["warnings"].str.contains(motion_step.UNCORRECTED_WARNING, regex=False).any()


@pytest.mark.parametrize("path, raw", [
    ("ds/sub-01/dwi/sub-01_dwi.nii.gz", True),
    ("ds/sub-01/ses-1/dwi/sub-01_ses-1_acq-b1000_dwi.nii.gz", True),
    ("hcp/100307/T1w/Diffusion/data.nii.gz", False),                   # HCP minimal preproc
    ("qsiprep/sub-01/dwi/sub-01_space-T1w_desc-preproc_dwi.nii.gz", False),
    ("ds/derivatives/x/sub-01/dwi/sub-01_dwi.nii.gz", False),
])
def test_raw_series_recognised(tmp_path, path, raw):
    assert motion_step.is_raw_series(tmp_path / path) is raw


def test_derivative_dataset_description_is_not_raw(tmp_path):
    dwi = tmp_path / "prep" / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    dwi.parent.mkdir(parents=True)
    (tmp_path / "prep" / "dataset_description.json").write_text(
        '{"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}')
    assert not motion_step.is_raw_series(dwi)
    (tmp_path / "prep" / "dataset_description.json").write_text(
        '{"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "raw"}')
    assert motion_step.is_raw_series(dwi)


def test_no_warning_with_motion_correction_on():
    record = {"status": "ok", "inputs": {"dwi": {"path": "ds/sub-01/dwi/sub-01_dwi.nii.gz"}}}
    assert motion_step.uncorrected_warning(record, motion_step.Options()) == \
        motion_step.UNCORRECTED_WARNING
    assert motion_step.uncorrected_warning(
        record, motion_step.Options(motion_correction=True)) is None
