"""Injected faults through ``dmriflow run``: each subject done, failed with the
reason, or done with QC flags, in subjects.tsv, ``dmriflow status``, the
report and the sidecars; the clean subject unflagged.

A BIDS phantom cohort of four (48^3, 3 b0 + 32 directions): sub-01 clean
but its sidecar has EchoTime in ms and the field strength as "3T"; sub-02
with the b-vectors' x axis flipped (run with --fix-gradients); sub-03 with
one all-zero volume; sub-04 with every volume identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import uri

from dmriflow.interfaces import stepfiles
from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
from dmriflow.pipelines import cli
from dmriflow.pipelines.inputs import discover

SHAPE = (48, 48, 48)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qc")
    cohort = tmp / "in"
    write_cohort(cohort, 4, layout="bids", shape=SHAPE, seed=0,
                 scheme=hcp_scheme(n_b0=3, shells=(1000,), n_dirs=32, seed=0, jitter=False))
    subjects = {s.key: s for s in discover(cohort)}
    clean, flip, zero, same = (subjects[f"sub-0{i}"] for i in range(1, 5))
    meta = json.loads(open(clean.sidecar).read())
    meta.update(EchoTime=89.5, MagneticFieldStrength="3T")
    open(clean.sidecar, "w").write(json.dumps(meta))
    original = np.loadtxt(flip.bvec)
    np.savetxt(flip.bvec, original * np.array([[-1.0], [1.0], [1.0]]), fmt="%.8f")
    img = nib.load(zero.dwi)
    data = np.asarray(img.dataobj).copy()
    bad = int(np.flatnonzero(np.loadtxt(zero.bval) > 50)[3])
    data[..., bad] = 0
    nib.save(nib.Nifti1Image(data, img.affine, img.header), zero.dwi)
    img = nib.load(same.dwi)
    data = np.repeat(np.asarray(img.dataobj)[..., :1], img.shape[3], axis=3)
    nib.save(nib.Nifti1Image(data, img.affine, img.header), same.dwi)
    out = tmp / "out"
    code = cli.main(["run", str(cohort), str(out), "--worker", "cf", "--n-procs", "2",
                     "--cache-dir", str(tmp / "cache"), "--fix-gradients", "--quiet"])
    table = pd.read_csv(out / "dmriflow" / "group" / "subjects.tsv", sep="\t",
                        keep_default_na=False).set_index("subject")
    return {"out": out, "code": code, "table": table, "subjects": subjects, "bad": bad,
            "original_bvec": original, "img": img}


def _sidecar(out, key: str, param: str = "fa") -> dict:
    path = out / "dmriflow" / key / "dwi" / f"{key}_model-tensor_param-{param}_dwimap.json"
    return json.loads(path.read_text())


def test_each_subject_is_done_failed_or_flagged(run):
    t = run["table"]
    assert run["code"] == cli.EXIT_SUBJECTS_FAILED
    assert list(t["status"]) == ["done", "done", "done", "failed"]
    # the clean subject: nothing flagged (false positives: 0 of 1 clean subject here,
    # 0 of 4 clean phantoms and both real series in tests/test_qc.py)
    assert t.loc["sub-01", "qc_flags"] == "" and t.loc["sub-01", "gradient_check"] == "ok"
    assert t.loc["sub-01", "outlier_volumes"] == ""
    assert t.loc["sub-02", "gradient_check"] == "flip x"
    assert t.loc["sub-02", "qc_flags"] == "gradients flip x (fixed)"
    assert t.loc["sub-03", "outlier_volumes"] == f"{run['bad']}: all zero"
    assert t.loc["sub-03", "qc_flags"] == "1 outlier volume(s) excluded"
    same = run["subjects"]["sub-04"]
    assert t.loc["sub-04", "failed_step"] == "validate"
    # OUTPUT names the input by its BIDS URI, never by absolute path
    assert t.loc["sub-04", "error"] == (
        f"{uri(Path(same.dwi), run['out'].parent / 'in')}: degenerate acquisition: all 35 volumes are identical in the mask: the "
        f"series carries no diffusion contrast (an export or conversion error)")
    for key in ("sub-01", "sub-02", "sub-03"):
        assert 0 <= float(t.loc[key, "failed_fit_fraction"]) <= stepfiles.MAX_FAILED_FRACTION


def test_sidecar_misunits_are_converted_with_a_warning(run):
    row = run["table"].loc["sub-01"]
    assert float(row["echo_time_ms"]) == 89.5 and float(row["field_strength_t"]) == 3.0
    assert "EchoTime 89.5 is above 1 s: read as milliseconds" in row["warnings"]
    assert "MagneticFieldStrength '3T' is a string; read as 3 T" in row["warnings"]
    assert "/" not in row["warnings"]          # the sidecar named by file name only


def test_the_fix_and_the_exclusion_are_in_every_sidecar(run):
    out = run["out"]
    chain = _sidecar(out, "sub-02")["ProcessingChain"]
    assert [c["step"] for c in chain] == ["gradient_fix"] and chain[0]["transform"] == "flip x"
    assert _sidecar(out, "sub-02", "v1")["ProcessingChain"] == chain
    fixed = out / "dmriflow" / "sub-02" / "dwi" / "sub-02_desc-gradfix_dwi.bvec"
    np.testing.assert_allclose(np.loadtxt(fixed), run["original_bvec"], atol=1e-8)
    meta = json.loads(fixed.with_suffix(".json").read_text())
    assert meta["Parameters"]["gradient_fix"]["transform"] == "flip x"
    chain = _sidecar(out, "sub-03")["ProcessingChain"]
    assert chain == [{"step": "volume_exclusion", "volumes": [run["bad"]],
                      "reasons": {str(run["bad"]): "all zero"}}]
    assert _sidecar(out, "sub-03")["Parameters"]["volumes_excluded"] == [run["bad"]]
    assert _sidecar(out, "sub-01")["ProcessingChain"] == []
    qc = _sidecar(out, "sub-01")["InputQC"]
    assert qc["gradient_check"]["verdict"] == "ok" and qc["outlier_volumes"] == {}


def test_the_fixed_table_gives_the_true_directions(run, tmp_path):
    """V1 of the fixed subject equals a fit with the b-vectors as simulated."""
    s = run["subjects"]["sub-02"]
    bvec = tmp_path / "true.bvec"
    np.savetxt(bvec, run["original_bvec"], fmt="%.8f")
    rec = stepfiles.validate_subject(s.key, s.dwi, s.bval, bvec, out_dir=tmp_path)
    assert rec["qc"]["gradient_check"] == "ok"
    ref = stepfiles.write_tensor_maps(rec["series"], tmp_path)
    v1_ref = nib.load(ref["maps"]["v1"]).get_fdata(dtype=np.float32)
    v1 = nib.load(run["out"] / "dmriflow" / "sub-02" / "dwi" /
                  "sub-02_model-tensor_param-v1_dwimap.nii.gz").get_fdata(dtype=np.float32)
    fa = nib.load(ref["maps"]["fa"]).get_fdata(dtype=np.float32)
    wm = fa > 0.3
    dots = np.abs(np.einsum("...i,...i->...", v1[wm], v1_ref[wm]))
    assert np.median(dots) > 1 - 1e-6


def test_status_and_report_show_the_flags(run, capsys):
    out = run["out"]
    assert cli.main(["status", str(out)]) == cli.EXIT_SUBJECTS_FAILED
    printed = capsys.readouterr().out
    assert "3 done, 1 failed, 0 missing (2 done with QC flags)" in printed
    line = next(ln for ln in printed.splitlines() if ln.startswith("sub-02"))
    assert line.endswith("QC: gradients flip x (fixed)")
    line = next(ln for ln in printed.splitlines() if ln.startswith("sub-04"))
    assert "[validate]" in line and "all 35 volumes are identical" in line
    page = (out / "dmriflow" / "report.html").read_text()
    assert "gradients flip x (fixed)" in page and "1 outlier volume(s) excluded" in page
    assert "<b>2</b>done with QC flags" in page


def test_wls_iterations_below_one_is_a_usage_error(run, tmp_path, capsys):
    cohort = run["out"].parent / "in"
    assert cli.main(["run", str(cohort), str(tmp_path / "out"), "--wls-iterations", "0"]) \
        == cli.EXIT_INPUT
    assert not (tmp_path / "out").exists()
    assert "--wls-iterations must be >= 1" in capsys.readouterr().err
