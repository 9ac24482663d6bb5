"""Preprocessed inputs (issue 12, item 6): a ``desc-brain_mask`` written beside a
preprocessed DWI, as QSIPrep writes it, is the subject's mask (not a computed
one), recorded in the sidecar Sources and the status; a mask of another grid
fails that subject only, naming the file; ``space-`` stays in output names."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
from dmriflow.interfaces.stepfiles import load_subject
from dmriflow.pipelines import cli
from dmriflow.pipelines.inputs import discover

SHAPE = (12, 14, 10)
PREPROC = "space-T1w_desc-preproc_dwi"
MASK = "space-T1w_desc-brain_mask.nii.gz"


def qsiprep_cohort(root: Path, n: int = 3) -> Path:
    """A phantom BIDS cohort renamed to QSIPrep's output names."""
    write_cohort(root, n, layout="bids", shape=SHAPE, seed=0,
                 scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1))
    for f in sorted(root.glob("sub-*/dwi/sub-*_dwi.*")):
        f.rename(f.with_name(f.name.replace("_dwi.", f"_{PREPROC}.")))
    return root


def write_mask(dwi: Path, shape=None) -> tuple[Path, np.ndarray]:
    """A box mask beside ``dwi`` (its grid, or ``shape``): not what median-Otsu finds."""
    img = nib.load(dwi)
    mask = np.zeros(shape or img.shape[:3], np.uint8)
    mask[3:9, 4:10, 2:7] = 1
    path = dwi.with_name(dwi.name.replace(f"{PREPROC}.nii.gz", MASK))
    nib.save(nib.Nifti1Image(mask, img.affine), path)
    return path, mask.astype(bool)


def test_a_mask_beside_the_preprocessed_dwi_is_used_and_a_wrong_grid_fails_one(tmp_path):
    cohort = qsiprep_cohort(tmp_path / "in")
    dwi = {s: cohort / f"sub-{s}" / "dwi" / f"sub-{s}_{PREPROC}.nii.gz" for s in ("01", "02")}
    good, box = write_mask(dwi["01"])
    bad, _ = write_mask(dwi["02"], shape=(SHAPE[0] + 2,) + SHAPE[1:])
    units = {s.key: s for s in discover(cohort)}
    assert units["sub-01"].mask == str(good) and units["sub-02"].mask == str(bad)
    assert units["sub-03"].mask is None
    # the given mask differs from the one dmriflow would compute
    computed = load_subject(dwi["01"], *(str(dwi["01"]).replace(".nii.gz", e)
                                         for e in (".bval", ".bvec"))).mask
    assert computed.sum() != box.sum()

    out = tmp_path / "out"
    code = cli.main([str(cohort), str(out), "participant", "--worker", "debug", "--quiet",
                     "-w", str(tmp_path / "cache")])
    assert code == cli.EXIT_SUBJECTS_FAILED
    t = pd.read_csv(out / "dmriflow" / "group" / "subjects.tsv", sep="\t",
                    keep_default_na=False).set_index("subject")
    assert t.loc["sub-01", "status"] == "done" and t.loc["sub-03", "status"] == "done"
    assert t.loc["sub-02", "status"] == "failed"
    assert bad.name in t.loc["sub-02", "error"] and "grid" in t.loc["sub-02", "error"]

    status = json.loads(next((out / "dmriflow" / "sub-01").glob("*_status.json")).read_text())
    uri = f"bids:raw:sub-01/dwi/{good.name}"
    assert status["mask_source"] == "given" and status["mask_file"] == uri
    assert status["mask_voxels"] == int(box.sum())
    third = json.loads(next((out / "dmriflow" / "sub-03").glob("*_status.json")).read_text())
    assert third["mask_source"] == "median_otsu" and "mask_file" not in third

    fa = next((out / "dmriflow" / "sub-01" / "dwi").glob("*param-fa_dwimap.nii.gz"))
    assert fa.name.startswith("sub-01_space-T1w_model-tensor")      # space- kept
    meta = json.loads(fa.with_name(fa.name.replace(".nii.gz", ".json")).read_text())
    assert uri in meta["Sources"]
    fa_map = np.asarray(nib.load(fa).dataobj)
    assert not np.any(fa_map[~box])          # nothing outside the given mask
    methods = (out / "dmriflow" / "logs" / "methods.md").read_text()
    assert "given with the series" in methods and "for 2 of 3 unit(s)" in methods
