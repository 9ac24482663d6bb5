"""The image-gradient step in the engine: a fibre-continuity phantom cohort end
to end (maps, rows, group table, figure, cache), timing precedence and the
command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dmriflow.interfaces.sim import phantom as P
from dmriflow.interfaces import stepfiles as sf
from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.steps import image_gradient as ig_step
from dmriflow.pipelines import cli
from dmriflow.pipelines import image_gradient as pig
from dmriflow.pipelines.execution import RunConfig, run_cohort
from dmriflow.pipelines.inputs import discover
from dmriflow.pipelines.steps import STEP_MARKER

SHAPE = (16, 16, 12)
N_SUBJECTS = 4                 # + one whose mask is too thin for the gold standard
#: HCP timing (ms), given on the command line (HCP ships no sidecar).
TIMING = {"Delta": 43.1, "delta": 10.6, "TE": 89.5}
METHODS = ("B", "B_shuffle", "B_surrogate", "fibre_e3", "fibre_perp")
#: Steps whose nodes a rerun may recompute: the failed subject's chain (its
#: failure records are cleared from the cache) and the group nodes.
RECOMPUTED = {"validate", "tensor", "rish", "image_gradient", "export", "group"}


def continuity_cohort(root: Path) -> Path:
    """Fibre-continuity subjects (no gradient physics) in the HCP layout; the
    last one's brain mask is a 2-slice slab: valid for the tensor fit, but no
    voxel has both z neighbours inside, so its image-gradient step fails."""
    scheme = P.hcp_scheme(n_b0=6, shells=(1000, 3000), n_dirs=30, seed=1, jitter=False)
    for label in P.cohort_labels(N_SUBJECTS + 1, "hcp"):
        subject = P.simulate_continuity_subject(SHAPE, seed=int(label), scheme=scheme)
        if label == P.cohort_labels(N_SUBJECTS + 1, "hcp")[-1]:
            subject.mask[..., :5] = False
            subject.mask[..., 7:] = False
        P.write_subject(subject, root, label, "hcp")
    return root


def node_results(cache: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in cache.glob("*/_result.pklz")}


def step_nodes(cache: Path, step: str) -> dict[str, int]:
    """Result files (and their mtimes) of the node folders of one step."""
    return {str(m.parent): (m.parent / "_result.pklz").stat().st_mtime_ns
            for m in cache.glob("*/" + STEP_MARKER) if m.read_text() == step}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imagegradient")
    subjects = discover(continuity_cohort(tmp / "in"))
    config = RunConfig(worker="cf", n_procs=2, cache_dir=str(tmp / "cache"), quiet=True,
                       image_gradient=True, gradient_separation=TIMING["Delta"],
                       gradient_duration=TIMING["delta"], echo_time=TIMING["TE"])
    result = run_cohort(subjects, tmp / "out", config)
    return tmp, subjects, config, result


def test_subject_maps_and_rows(run):
    tmp, subjects, _, result = run
    assert [r["status"] for r in result.rows] == ["done"] * N_SUBJECTS + ["failed"], result.rows
    for s, row in zip(subjects[:N_SUBJECTS], result.rows):
        dwi_dir = tmp / "out" / "dmriflow" / f"sub-{s.label}" / "dwi"
        stem = f"sub-{s.label}_{sf.MODEL_ENTITY}"
        for method in METHODS:
            label = sf.entity_label(method)
            angle = nib.load(dwi_dir / f"{stem}_desc-{label}_param-angle_dwimap.nii.gz")
            a = np.asarray(angle.dataobj)
            assert a.shape == SHAPE
            v = a[np.isfinite(a)]
            assert v.size == row["imagegradient_voxels"] > 1000
            assert v.min() >= 0.0 and v.max() <= 90.0
            assert np.mean(v) == pytest.approx(row[f"imagegradient_{method}_mean_deg"], abs=1e-3)
        axis = np.asarray(nib.load(dwi_dir / f"{stem}_desc-B_param-axis_dwimap.nii.gz").dataobj)
        norms = np.linalg.norm(axis[np.isfinite(axis).all(-1)], axis=-1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
        meta = json.loads((dwi_dir / f"{stem}_desc-B_param-angle_dwimap.json").read_text())
        assert meta["Parameters"]["timing"]["Delta_ms"] == TIMING["Delta"]
        assert meta["Parameters"]["timing_source"]["Delta"] == "command line"
        summary = pd.read_csv(dwi_dir / f"{stem}_desc-summary.tsv", sep="\t")
        assert set(METHODS) <= set(summary["method"])
        hist = pd.read_csv(dwi_dir / f"{stem}_desc-histogram.tsv", sep="\t")
        counts = hist[(hist["name"] == "B") & (hist["kind"] == "3d")]["count"].sum()
        assert counts == row["imagegradient_voxels"]
    subjects_tsv = pd.read_csv(result.table, sep="\t")
    assert subjects_tsv["imagegradient_B_mean_deg"].notna().sum() == N_SUBJECTS


def test_failing_subject_is_isolated(run):
    """The thin-mask subject fails in the image-gradient step with the reason;
    the others and the group table go on without it."""
    tmp, subjects, _, result = run
    bad = result.rows[-1]
    assert bad["subject"] == subjects[-1].key and bad["failed_step"] == "image_gradient"
    assert "no voxel left to evaluate" in bad["error"]
    table = pd.read_csv(tmp / "out" / "dmriflow" / "group" / pig.GROUP_TABLE, sep="\t")
    assert (table["n_failed_subjects"] == 1).all()
    overall = table[(table["test"] == "chance") & (table["stratum"] == "all")]
    assert (overall["n_subjects"] == N_SUBJECTS).all()


def test_group_table_and_figure(run):
    """Estimators beside nulls and controls; with fibre continuity and no
    physics the fibre-only controls sit below chance (57.3 deg), the shuffle
    null at it. (How far B follows them depends on the scheme: see
    test_image_gradient_studies.py and docs/image_gradient.md.)"""
    tmp = run[0]
    group = tmp / "out" / "dmriflow" / "group"
    table = pd.read_csv(group / pig.GROUP_TABLE, sep="\t")
    overall = table[(table["stratum"] == "all") & (table["statistic"] == "mean")
                    & (table["test"] == "chance")].set_index("method")
    assert set(METHODS) <= set(overall.index)
    assert (overall["n_subjects"] == N_SUBJECTS).all()           # the failed one left out
    assert overall.loc["B", "kind"] == "estimator" and overall.loc["fibre_e3", "kind"] == "control"
    for method in ("fibre_e3", "fibre_perp"):
        assert 50.0 < overall.loc[method, "mean"] < 55.0 and overall.loc[method, "p"] < 0.05
    assert 50.0 < overall.loc["B", "mean"] < 60.0
    assert abs(overall.loc["B_shuffle", "mean"] - np.degrees(1.0)) < 2.0
    assert {"vs_fibre_e3", "vs_fibre_perp"} <= set(table["test"])
    png = (group / pig.GROUP_FIGURE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_rerun_is_served_from_cache(run):
    tmp, subjects, config, _ = run
    before = node_results(tmp / "cache")
    again = run_cohort(subjects, tmp / "out", config)
    assert [r["status"] for r in again.rows] == ["done"] * N_SUBJECTS + ["failed"]
    # only the failed subject's chain, the group nodes and the workflow
    # folders (rebuilt cheaply) are recomputed: the cache drops failures
    changed = [Path(p).parent for p, t in node_results(tmp / "cache").items()
               if before.get(p) != t]
    steps = [d.joinpath(STEP_MARKER).read_text() for d in changed
             if not d.name.startswith("workflow-")]
    assert set(steps) <= RECOMPUTED and steps.count("image_gradient") == 1


def test_timing_precedence(tmp_path):
    """Command line > sidecar (seconds) > error naming the sidecar."""
    sidecar = tmp_path / "dwi.json"
    sidecar.write_text(json.dumps({"EchoTime": 0.0895, "DiffusionGradientSeparation": 0.0431,
                                   "DiffusionGradientDuration": 0.0106}))
    timing, source = ig_step.resolve_timing({}, str(sidecar), "dwi.nii.gz")
    assert (timing.Delta, timing.delta, timing.TE) == pytest.approx((43.1, 10.6, 89.5))
    assert set(source.values()) == {"sidecar"}
    timing, source = ig_step.resolve_timing({"Delta": 40.0}, str(sidecar), "dwi.nii.gz")
    assert timing.Delta == 40.0 and source["Delta"] == "command line" and timing.delta == 10.6
    sidecar.write_text(json.dumps({"EchoTime": 0.0895}))
    with pytest.raises(InputError, match="DiffusionGradientSeparation.*--gradient-separation"):
        ig_step.resolve_timing({}, str(sidecar), "dwi.nii.gz")
    with pytest.raises(InputError, match="dwi.nii.gz"):
        ig_step.resolve_timing(None, None, "dwi.nii.gz")
    sidecar.write_text(json.dumps({"DiffusionGradientSeparation": "long",
                                   "DiffusionGradientDuration": 0.01}))
    with pytest.raises(InputError, match="seconds"):
        ig_step.resolve_timing({}, str(sidecar), "dwi.nii.gz")
    with pytest.raises(InputError, match="invalid timing"):
        ig_step.resolve_timing({"Delta": 5.0, "delta": 30.0}, None, "dwi.nii.gz")


def test_estimator_options():
    assert sf.parse_estimators("b, A") == ("B", "A")
    for bad, words in (("C", "two diffusion times"), ("P", "phase"), ("X", "unknown"),
                       ("", "no image-gradient")):
        with pytest.raises(ValueError, match=words):
            sf.parse_estimators(bad)
    with pytest.raises(ValueError, match="two diffusion times"):
        RunConfig(worker="debug", image_gradient=True, image_gradient_estimators=("B", "C"))


def test_command_line(run, capsys):
    """``dmriflow run --image-gradient``: a missing timing or a study-only
    estimator stops before any work (exit 1, the reason); with the timing
    options the run reuses the cached image-gradient nodes."""
    tmp = run[0]
    common = [str(tmp / "in"), "--worker", "debug", "--quiet", "--cache-dir", str(tmp / "cache")]
    assert cli.main(["run", str(tmp / "in"), str(tmp / "cli0"), "--image-gradient",
                     *common[1:]]) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "data.json" in err and "--gradient-separation" in err
    assert not (tmp / "cli0" / "dmriflow").exists()
    assert cli.main(["run", str(tmp / "in"), str(tmp / "cli1"), "--image-gradient",
                     "--image-gradient-estimators", "B,C", *common[1:]]) == cli.EXIT_INPUT
    assert "two diffusion times" in capsys.readouterr().err
    before = step_nodes(tmp / "cache", "image_gradient")
    assert len(before) == N_SUBJECTS + 1
    code = cli.main(["run", str(tmp / "in"), str(tmp / "cli2"), "--image-gradient",
                     "--gradient-separation", "43.1", "--gradient-duration", "10.6",
                     "--echo-time", "89.5", *common[1:]])
    assert code == cli.EXIT_SUBJECTS_FAILED                         # the thin-mask subject
    assert (tmp / "cli2" / "dmriflow" / "group" / pig.GROUP_TABLE).exists()
    after = step_nodes(tmp / "cache", "image_gradient")
    assert after.keys() == before.keys()                   # the same nodes: reused, and
    assert sum(after[k] != before[k] for k in before) == 1  # only the failed one recomputed


def test_subject_products_with_a_and_a_voxel_subset(tmp_path):
    """The step's file function with B and the nonlinear A on a seeded random
    subset of voxels: both estimators' maps, rows over exactly that subset,
    and the same subset (same angles) when run again."""
    from dmriflow.interfaces.image_gradient import HCP_TIMING
    from dmriflow.interfaces.studies.image_gradient import phantom_dwi
    scheme = P.hcp_scheme(n_b0=4, shells=(1000, 3000), n_dirs=20, seed=1, jitter=False)
    data = phantom_dwi(P.simulate_continuity_subject((12, 12, 10), seed=5, scheme=scheme))
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        out.mkdir()
        runs.append(sf.subject_products(data, HCP_TIMING, ("B", "A"), out, "sub-01",
                                        max_voxels=40))
    product = runs[0]
    assert product["row"]["imagegradient_voxels"] == 40
    for est in ("A", "A_shuffle", "A_surrogate", "B"):
        entity = f"{sf.MODEL_ENTITY}_desc-{sf.entity_label(est)}_param-angle"
        maps = [np.asarray(nib.load(r["maps"][entity]).dataobj) for r in runs]
        assert np.isfinite(maps[0]).sum() == 40
        np.testing.assert_array_equal(maps[0], maps[1])
        assert 0.0 <= product["row"][f"imagegradient_{est}_mean_deg"] <= 90.0
    assert product["parameters"]["quality"] == {"B": "rank1_fraction", "A": "rss_reduction"}


def test_group_level_gives_the_whole_runs_statistics(run, tmp_path):
    """`dmriflow INPUT OUTPUT group` (what follows participant jobs of one subject
    each) writes the cohort's image-gradient tests from the exported tables:
    the same table as the run over the whole cohort."""
    from dmriflow.pipelines import cli
    tmp = run[0]
    out = tmp_path / "out"
    shutil.copytree(tmp / "out" / "dmriflow", out / "dmriflow")
    group = out / "dmriflow" / "group"
    whole = pd.read_csv(group / pig.GROUP_TABLE, sep="\t")
    (group / pig.GROUP_TABLE).unlink()
    (group / pig.GROUP_FIGURE).unlink()
    assert cli.main([str(tmp / "in"), str(out), "group"]) == cli.EXIT_SUBJECTS_FAILED
    pd.testing.assert_frame_equal(pd.read_csv(group / pig.GROUP_TABLE, sep="\t"), whole)
    assert (group / pig.GROUP_FIGURE).is_file()
