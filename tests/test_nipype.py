"""The Nipype interfaces run the same code as the Pydra steps: same maps, same errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dmriflow.interfaces import io, sh
from dmriflow.interfaces.dti import DEFAULT_WLS_ITERATIONS, dti_shells, fit_dwi
from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.nipype_interfaces import RISH, DTIFit, Validate
from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
from dmriflow.interfaces.stepfiles import TENSOR_PARAMS
from dmriflow.pipelines.execution import RunConfig, run_cohort
from dmriflow.pipelines.inputs import discover

SHAPE = (16, 20, 14)
SNR = 30.0


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    root = tmp_path_factory.mktemp("nipype")
    scheme = hcp_scheme(n_b0=4, shells=(1000, 2000), n_dirs=30, seed=1)
    write_cohort(root / "in", 1, layout="hcp", shape=SHAPE, seed=4, scheme=scheme, snr=SNR)
    (s,) = discover(root / "in")
    return root, s


def _workflow(base: Path, s, name="dwi"):
    from nipype import Node, Workflow
    wf = Workflow(name, base_dir=str(base))
    wf.config["execution"].update({"crashdump_dir": str(base / "crash"),
                                   "crashfile_format": "txt",
                                   "stop_on_first_crash": True,
                                   # keep outputs no node consumes (census, QC) for the checks
                                   "remove_unnecessary_outputs": False})
    val = Node(Validate(subject=s.key, dwi=s.dwi, bval=s.bval, bvec=s.bvec, mask=s.mask,
                        sidecar=s.sidecar), name="validate")
    dti = Node(DTIFit(), name="dti")
    rish = Node(RISH(), name="rish")
    for node in (dti, rish):
        wf.connect([(val, node, [(k, k) for k in ("dwi", "bval", "bvec", "mask", "exclude")])])
    return wf


@pytest.fixture(scope="module")
def nipype_run(subject):
    root, s = subject
    graph = _workflow(root / "work", s).run("MultiProc", plugin_args={"n_procs": 2})
    nodes = {n.name: n.result.outputs for n in graph.nodes()}
    return root, s, nodes


def test_fa_equals_the_pydra_pipeline_and_dti(nipype_run):
    root, s, out = nipype_run
    fa = nib.load(out["dti"].fa).get_fdata(dtype=np.float32)
    # interfaces.dti directly on the same data
    data = io.load_dwi(s.dwi, s.bval, s.bvec, s.mask)
    tf = fit_dwi(data.select_volumes(data.gtab.select_shells(dti_shells(data.gtab))),
                 n_iter=DEFAULT_WLS_ITERATIONS)
    np.testing.assert_array_equal(fa, np.asarray(tf.fa, dtype=np.float32))
    # the Pydra pipeline's exported FA map
    res = run_cohort([s], root / "pydra", RunConfig(worker="debug", quiet=True,
                                                   cache_dir=str(root / "pydra-cache")))
    assert res.rows[0]["status"] == "done"
    pydra_fa = root / "pydra" / "dmriflow" / s.key / "dwi" / \
        f"{s.key}_model-tensor_param-fa_dwimap.nii.gz"
    np.testing.assert_array_equal(fa, nib.load(pydra_fa).get_fdata(dtype=np.float32))
    valid = data.mask & ~tf.failed      # FA statistics over the voxels whose fit succeeded
    assert out["dti"].median_fa == pytest.approx(float(np.median(fa[valid])), rel=1e-6)
    assert out["dti"].median_fa == pytest.approx(res.rows[0]["median_fa"], rel=1e-6)
    for name in TENSOR_PARAMS:
        assert Path(getattr(out["dti"], name)).is_file()
    assert nib.load(out["dti"].v1).shape == SHAPE + (3,)


def test_rish_equals_fit_shells(nipype_run):
    _, s, out = nipype_run
    data = io.load_dwi(s.dwi, s.bval, s.bvec, s.mask)
    fits = sh.fit_shells(data)
    r = out["rish"]
    assert sorted(set(r.shells)) == sorted(fits)
    assert len(r.rish_maps) == sum(f.lmax // 2 + 1 for f in fits.values())
    for path, shell, order in zip(r.rish_maps, r.shells, r.orders):
        expected = np.asarray(fits[shell].rish(), dtype=np.float32)[..., order // 2]
        got = nib.load(path).get_fdata(dtype=np.float32)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7 * expected.max())
    assert max(expected.max() for expected in [np.asarray(f.rish()) for f in fits.values()]) > 0


def test_validate_census_and_qc(nipype_run):
    _, s, out = nipype_run
    v = out["validate"]
    assert v.census["shells"] == "1000 2000" and v.census["directions"] == "30 30"
    assert v.census["n_b0"] == 4
    mask = nib.load(s.mask)
    expected_ml = (np.asarray(mask.dataobj) > 0).sum() * np.prod(mask.header.get_zooms()) / 1e3
    assert v.mask_volume_ml == pytest.approx(expected_ml)
    # SNR is mean b0 in the whole mask (CSF included) / sigma: above the WM SNR
    assert SNR < v.b0_snr < 4 * SNR
    assert Path(v.record).is_file()


def test_bad_bvec_raises_naming_the_file(subject, tmp_path):
    _, s = subject
    bad = tmp_path / "bvecs"
    rows = np.loadtxt(s.bvec)
    np.savetxt(bad, rows[:, :-1])              # one direction short
    with pytest.raises(InputError, match=str(bad)):
        Validate(subject=s.key, dwi=s.dwi, bval=s.bval, bvec=str(bad), mask=s.mask).run(
            cwd=str(tmp_path))
    # inside a workflow: the run fails and the crash report names the file
    from dataclasses import replace
    wf = _workflow(tmp_path / "work", replace(s, bvec=str(bad)), name="bad")
    with pytest.raises(RuntimeError):
        wf.run("MultiProc", plugin_args={"n_procs": 2})
    crash = "".join(p.read_text() for p in (tmp_path / "work" / "crash").glob("crash-*"))
    assert "InputError" in crash and str(bad) in crash


def test_harmonize_applies_a_stored_artefact(subject, tmp_path):
    """An identity-registered artefact scaling RISH l0 of b=1000 by 1.2: the
    shell's direction-mean signal grows by 1.2, b=2000 (scale 1) and b0s are untouched,
    and a second application (recorded in the sidecar) is refused."""
    import json

    from dmriflow.interfaces import harmonize as H
    from dmriflow.interfaces.nipype_interfaces import Harmonize
    _, s = subject
    data = io.load_dwi(s.dwi, s.bval, s.bvec, s.mask)
    lmax, gain = 4, 1.2
    scale = np.ones(data.mask.shape + (lmax // 2 + 1,), np.float32)
    scale[..., 0] = gain
    art = H.HarmonizationArtefact(
        template_fa=np.zeros(data.mask.shape, np.float32), template_affine=data.affine,
        template_mask=data.mask, scale_maps={1000.0: scale, 2000.0: np.ones_like(scale)},
        shells=[1000.0, 2000.0], lmax=lmax, tau=H.TAU_FRACTION,
        tau_values={b: np.zeros(lmax // 2 + 1) for b in (1000.0, 2000.0)},
        smoothing_fwhm_mm=0.0, scale_range=H.SCALE_RANGE, registration="identity",
        reference_site="a", target_site="b", subjects=[], pipeline_version="test")
    folder = art.save(tmp_path / "artefact")
    res = Harmonize(subject=s.key, dwi=s.dwi, bval=s.bval, bvec=s.bvec, mask=s.mask,
                    artefact=str(folder)).run(cwd=str(tmp_path))
    assert res.outputs.content_id == art.content_id
    out = nib.load(res.outputs.dwi).get_fdata(dtype=np.float32)
    gtab, m = data.gtab, data.mask
    b1000, b2000 = (np.flatnonzero(gtab.shell_of == b) for b in (1000.0, 2000.0))
    ratio = out[m][:, b1000].mean(axis=1) / data.data[m][:, b1000].mean(axis=1)
    assert np.median(ratio) == pytest.approx(gain, abs=0.01)
    np.testing.assert_array_equal(out[..., b2000], data.data[..., b2000])
    np.testing.assert_array_equal(out[..., gtab.b0s_mask], data.data[..., gtab.b0s_mask])
    info = json.loads(Path(res.outputs.info).read_text())
    assert info["applied"] == [art.content_id]
    sidecar = tmp_path / "harmonised.json"
    sidecar.write_text(json.dumps({H.SIDECAR_KEY: info["applied"]}))
    (tmp_path / "again").mkdir()
    with pytest.raises(H.HarmonizationError, match="already applied"):
        Harmonize(subject=s.key, dwi=res.outputs.dwi, bval=res.outputs.bval,
                  bvec=res.outputs.bvec, mask=s.mask, artefact=str(folder),
                  sidecar=str(sidecar)).run(cwd=str(tmp_path / "again"))


def test_image_gradient_runs_the_pipeline_step(subject, tmp_path):
    """The interface writes the angle maps evaluate_subject gives with the
    pipeline's per-subject seed; without timing it names the sidecar."""
    import pandas as pd

    from dmriflow.interfaces import image_gradient as ig
    from dmriflow.interfaces.nipype_interfaces import ImageGradient
    from dmriflow.interfaces.stepfiles import entity_label, subject_seed
    _, s = subject
    files = dict(subject=s.key, dwi=s.dwi, bval=s.bval, bvec=s.bvec, mask=s.mask)
    res = ImageGradient(**files, estimators=["B"], gradient_separation_ms=ig.HCP_DELTA_MS,
                        gradient_duration_ms=ig.HCP_SMALL_DELTA_MS).run(cwd=str(tmp_path))
    data = io.load_dwi(s.dwi, s.bval, s.bvec, s.mask)
    ev = ig.evaluate_subject(data, ig.SequenceTiming(ig.HCP_DELTA_MS, ig.HCP_SMALL_DELTA_MS),
                             ("B",), subject=s.key, rng=subject_seed(s.key))
    by_label = {entity_label(m): m for m in ev.angles}
    out = res.outputs
    assert sorted(out.methods) == sorted(by_label)
    for label, path in zip(out.methods, out.angle_maps):
        expected = ev.angles[by_label[label]].astype(np.float32)
        np.testing.assert_array_equal(nib.load(path).get_fdata(dtype=np.float32), expected)
    assert np.isfinite(expected[ev.mask]).mean() > 0.99
    rows = pd.read_csv(out.summary, sep="\t")
    b_all = rows[(rows["method"] == "B") & (rows["stratum"] == "all")]
    ref = ev.rows[(ev.rows["method"] == "B") & (ev.rows["stratum"] == "all")]
    assert b_all["mean"].iloc[0] == pytest.approx(ref["mean"].iloc[0], rel=1e-6)
    with pytest.raises(InputError, match="DiffusionGradientSeparation") as err:
        ImageGradient(**files, sidecar=s.sidecar).run(cwd=str(tmp_path))
    assert s.sidecar in str(err.value)
