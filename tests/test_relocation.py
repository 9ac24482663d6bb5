"""Relocatable outputs: OUTPUT (with its cache inside) and INPUT can move.

Nothing dmriflow writes under OUTPUT records an absolute path: status files
list derivatives relative to OUTPUT/dmriflow, sidecars and the plan name
inputs by ``bids:raw:`` URIs. After ``mv OUT OUT2`` and ``mv IN IN2``,
status, the report and a rerun (served from the cache) all work.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
from dmriflow.pipelines import cli
from dmriflow.pipelines.derivatives import (DESCRIPTION_FILE, derivative_file, input_root,
                                            input_uri)
from dmriflow.pipelines.execution import DEFAULT_CACHE

SHAPE = (12, 12, 10)
N_SUBJECTS = 2
#: Files dmriflow writes whose text is checked for absolute paths.
TEXT_SUFFIXES = (".json", ".tsv", ".html", ".log", ".bvec", ".bval")
#: Inline images of the report (base64 text, not paths).
DATA_URI = re.compile(r"data:[\w/+.-]+;base64,[^\"']*")
#: Any absolute POSIX path of two or more components inside a text.
ABSOLUTE = re.compile(r"(?<![\w.:/-])/(?:[\w.+-]+/)+[\w.+-]+")


def run(cohort: Path, out: Path, *extra: str) -> int:
    return cli.main(["run", str(cohort), str(out), "--worker", "debug", "--quiet", *extra])


def node_results(out: Path) -> dict[str, int]:
    """mtime of every node result in OUTPUT's cache (a recomputed node changes)."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for p in (out / DEFAULT_CACHE).rglob("_result.pklz")}


def newest_log(out: Path) -> Path:
    return max((out / "dmriflow" / "logs").glob("run-*.log"), key=lambda p: p.stat().st_mtime_ns)


def tasks_run(log: Path) -> set[str]:
    """Tasks the run's progress lines report as done (``<Task> [sub-X]: done``)."""
    return {line.split("] ", 1)[1].split()[0].rstrip(":") for line in log.read_text().splitlines()
            if line.endswith(": done")}


def figures(out: Path) -> int:
    return (out / "dmriflow" / "report.html").read_text().count("<figure")


def written_texts(out: Path):
    """(path, text) of every text file dmriflow wrote under OUTPUT/dmriflow."""
    for p in sorted((out / "dmriflow").rglob("*")):
        if p.is_file() and p.name.endswith(TEXT_SUFFIXES):
            yield p, DATA_URI.sub("", p.read_text())


def test_moved_output_and_input_keep_working(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    write_cohort(src, N_SUBJECTS, shape=SHAPE, seed=5,
                 scheme=hcp_scheme(n_b0=2, shells=(1000, 2000), n_dirs=15, seed=1))
    assert run(src, out) == cli.EXIT_OK
    assert cli.main(["report", str(out)]) == cli.EXIT_OK
    n_figures = figures(out)
    assert n_figures > 1

    src2, out2 = tmp_path / "moved" / "in2", tmp_path / "moved" / "out2"
    out2.parent.mkdir()
    src.rename(src2)
    out.rename(out2)
    capsys.readouterr()

    # status and report read the moved tree
    assert cli.main(["status", str(out2)]) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert sum(" done " in f" {ln} " for ln in lines) >= N_SUBJECTS, lines
    assert cli.main(["report", str(out2)]) == cli.EXIT_OK
    assert figures(out2) == n_figures

    # a rerun with the moved input is served from the moved cache
    before = node_results(out2)
    assert run(src2, out2) == cli.EXIT_OK
    after = node_results(out2)
    assert all(after[k] == before[k] for k in before)       # no result rewritten
    # only the copies into the moved OUTPUT ran (Export, GroupTable), no step
    assert tasks_run(newest_log(out2)) == {"Export", "GroupTable"}
    assert run(src2, out2, "--rerun-failed") == cli.EXIT_OK
    rows = [json.loads(p.read_text())
            for p in sorted((out2 / "dmriflow").glob("sub-*/*_status.json"))]
    assert len(rows) == N_SUBJECTS
    for row in rows:
        assert row["status"] == "done"
        assert all(derivative_file(d, out2).exists() for d in row["derivatives"])

    # no text dmriflow wrote names the old roots, or any absolute path
    for p, text in written_texts(out2):
        assert str(tmp_path) not in text, p
        assert not ABSOLUTE.findall(text), (p, ABSOLUTE.findall(text)[:3])


def test_dataset_description_is_a_valid_derivative(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_cohort(src, 1, shape=SHAPE, seed=5,
                 scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1))
    assert run(src, out) == cli.EXIT_OK
    path = out / "dmriflow" / DESCRIPTION_FILE
    desc = json.loads(path.read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    assert desc["GeneratedBy"][0]["Name"] == "dmriflow" and desc["GeneratedBy"][0]["Version"]
    assert desc["DatasetLinks"]["raw"] == "../../in"
    assert desc["SourceDatasets"] == [{"URL": "bids:raw:"}]
    stamp = path.stat().st_mtime_ns
    assert run(src, out) == cli.EXIT_OK
    assert path.stat().st_mtime_ns == stamp                  # identical: not rewritten

    maps = {p.name: json.loads(p.read_text())
            for p in (out / "dmriflow").rglob("*_dwimap.json")}
    fa = next(m for n, m in maps.items() if "model-tensor_param-fa" in n)
    md = next(m for n, m in maps.items() if "model-tensor_param-md" in n)
    v1 = next(m for n, m in maps.items() if "model-tensor_param-v1" in n)
    assert fa["Model"] == "tensor" and fa["Units"] == "unitless"
    assert md["Units"] == "mm^2/s"
    assert v1["OrientationEncoding"]["EncodingAxis"] == 3
    assert "FSL image frame" in v1["OrientationFrame"]


def test_inputs_are_named_by_bids_uri_relative_to_the_input_root():
    bids = input_root("/d/sub-x/study/sub-01/ses-1/dwi/sub-01_ses-1_dwi.nii.gz")
    assert bids == Path("/d/sub-x/study")
    mask = "/d/sub-x/study/derivatives/q/sub-01/ses-1/dwi/sub-01_desc-brain_mask.nii.gz"
    assert input_uri(mask, bids) == "bids:raw:derivatives/q/sub-01/ses-1/dwi/" \
                                    "sub-01_desc-brain_mask.nii.gz"
    hcp = input_root("/d/sub-x/hcp/100307/T1w/Diffusion/data.nii.gz")
    assert hcp == Path("/d/sub-x/hcp")
    assert input_uri("/d/sub-x/hcp/100307/T1w/Diffusion/bvals", hcp) == \
        "bids:raw:100307/T1w/Diffusion/bvals"
    assert input_uri("/elsewhere/a.nii.gz", hcp) == "bids:raw:a.nii.gz"   # never absolute


def assert_no_absolute_path(out: Path, *roots: Path):
    for p, text in written_texts(out):
        for root in roots:
            assert str(root) not in text, p
        assert not ABSOLUTE.findall(text), (p, ABSOLUTE.findall(text)[:3])


def test_a_moved_cache_dir_outside_output_serves_the_rerun(tmp_path):
    src, out, cache = tmp_path / "in", tmp_path / "out", tmp_path / "scratch" / "cache"
    write_cohort(src, N_SUBJECTS, shape=SHAPE, seed=5,
                 scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1))
    assert run(src, out, "--cache-dir", str(cache)) == cli.EXIT_OK
    results = {str(p.relative_to(cache)): p.stat().st_mtime_ns
               for p in cache.rglob("_result.pklz")}
    assert results and not (out / DEFAULT_CACHE).exists()

    moved = tmp_path / "project"
    moved.mkdir()
    out2, cache2 = moved / "out2", moved / "work" / "cache2"
    cache2.parent.mkdir()
    out.rename(out2)
    cache.rename(cache2)
    assert run(src, out2, "--cache-dir", str(cache2)) == cli.EXIT_OK
    after = {str(p.relative_to(cache2)): p.stat().st_mtime_ns
             for p in cache2.rglob("_result.pklz")}
    assert all(after[k] == results[k] for k in results)     # nothing recomputed
    assert tasks_run(newest_log(out2)) == {"Export", "GroupTable"}
    assert cli.main(["status", str(out2)]) == cli.EXIT_OK
    rows = [json.loads(p.read_text())
            for p in sorted((out2 / "dmriflow").glob("sub-*/*_status.json"))]
    assert [r["status"] for r in rows] == ["done"] * N_SUBJECTS
    assert all(derivative_file(d, out2).exists() for r in rows for d in r["derivatives"])
    assert_no_absolute_path(out2, tmp_path)


def test_harmonized_series_name_their_artefact_relative_to_the_dataset(tmp_path):
    from dmriflow.interfaces.harmonize import SIDECAR_KEY, HarmonizationArtefact
    from dmriflow.interfaces.sim.phantom import SiteEffect
    src, out = tmp_path / "in", tmp_path / "out"
    scheme = hcp_scheme(n_b0=2, shells=(1000,), n_dirs=20, seed=2)
    for prefix, site in (("a", None), ("b", SiteEffect(name="siteB", rish_scale={0: 0.9},
                                                       snr=30.0))):
        write_cohort(src, 3, layout="bids", shape=(16, 16, 12), seed=10, scheme=scheme,
                     subject_prefix=prefix, **({"site": site} if site else {}))
    labels = sorted(p.name for p in src.glob("sub-*"))
    sites = tmp_path / "sites.tsv"
    sites.write_text("participant_id\tsite\n" + "".join(
        f"{lbl}\t{'siteA' if lbl.startswith('sub-a') else 'siteB'}\n" for lbl in labels))
    assert cli.main(["harmonize", "fit", str(src), str(out), "--reference", "siteA",
                     "--target", "siteB", "--site-column", "site", "--site-table", str(sites),
                     "--registration", "affine", "--worker", "debug", "--quiet"]) == cli.EXIT_OK
    artefact = next((out / "dmriflow" / "harmonization").iterdir())
    target = [lbl[4:] for lbl in labels if lbl.startswith("sub-b")]
    assert run(src, out, "--participant-label", *target,
               "--harmonization", str(artefact)) == cli.EXIT_OK

    moved = tmp_path / "moved" / "out2"
    moved.parent.mkdir()
    out.rename(moved)
    content_id = HarmonizationArtefact.load(moved / "dmriflow" / "harmonization"
                                            / artefact.name).content_id
    for label in target:
        meta = json.loads((moved / "dmriflow" / f"sub-{label}" / "dwi"
                           / f"sub-{label}_desc-harmonized_dwi.json").read_text())
        assert meta[SIDECAR_KEY] == [content_id]
        assert meta["HarmonizationArtefact"] == f"harmonization/{artefact.name}"
        assert (moved / "dmriflow" / meta["HarmonizationArtefact"]).is_dir()   # still resolves
        history = [h for h in meta["Parameters"]["history"] if h["step"] == "harmonize"]
        assert history[0]["artefact"] == meta["HarmonizationArtefact"]
    assert_no_absolute_path(moved, tmp_path)


def test_inference_checkpoint_is_named_without_an_absolute_path(tmp_path):
    import pandas as pd
    import torch

    from dmriflow.interfaces.inference import default_checkpoint
    from dmriflow.models import card as mc
    from dmriflow.models import data as md
    from dmriflow.models import directions as dm
    from dmriflow.models.train import TrainConfig
    from dmriflow.pipelines.derivatives import external_path

    small = (20, 24, 20)
    torch.manual_seed(0)
    net = dm.DirectionNet(width=8, blocks=2)
    card = dm.make_card(net, md.phantom_samples(1, seed=1, shape=small), TrainConfig(steps=1),
                        [{"method": "network", "dwi_rmse": 0.03}], "untrained (test)",
                        voxel_size=(2.5, 2.5, 2.5), field_strength=3.0)
    ckpt = mc.save_checkpoint(net, card, tmp_path / "models" / "directions")
    src, out = tmp_path / "in", tmp_path / "out"
    write_cohort(src, 1, shape=small, seed=10, scheme=md.phantom_scheme(2))
    assert run(src, out, "--inference", "directions",
               "--inference-checkpoint", str(ckpt)) == cli.EXIT_OK
    models = pd.read_csv(out / "dmriflow" / "group" / "models.tsv", sep="\t")
    assert list(models["checkpoint"]) == ["../../models/directions"]
    assert (out / "dmriflow" / models["checkpoint"].iloc[0]).resolve() == Path(ckpt).resolve()
    sidecars = [json.loads(p.read_text())
                for p in (out / "dmriflow").rglob("*model-directions*.json")]
    assert sidecars and all(m["Parameters"]["weights_sha256"] == card.weights_sha256
                            for m in sidecars)
    assert_no_absolute_path(out, tmp_path)
    # moved elsewhere, the same checkpoint (keyed by its card's content) keeps the
    # cache: only Export and GroupTable run again; models.tsv names the new place
    before = {k: v for k, v in node_results(out).items()}
    moved = tmp_path / "elsewhere" / "ckpt"
    moved.parent.mkdir()
    Path(ckpt).rename(moved)
    assert run(src, out, "--inference", "directions",
               "--inference-checkpoint", str(moved)) == cli.EXIT_OK
    assert tasks_run(newest_log(out)) <= {"Export", "GroupTable"}
    after = node_results(out)
    assert all(after[k] == v for k, v in before.items())
    new = {(out / k).parent / "_dmriflow_step" for k in set(after) - set(before)}
    assert {p.read_text() for p in new if p.is_file()} <= {"export", "group"}
    models = pd.read_csv(out / "dmriflow" / "group" / "models.tsv", sep="\t")
    assert list(models["checkpoint"]) == ["../../elsewhere/ckpt"]
    # a new OUTPUT in this same process computes with the checkpoint where it is
    # now (Pydra would reuse the phase workflow built for its old place: same
    # content key, so the same input hash)
    assert run(src, tmp_path / "out-b", "--inference", "directions",
               "--inference-checkpoint", str(moved)) == cli.EXIT_OK
    # the checkpoint shipped with dmriflow is named inside the package
    shipped = default_checkpoint("directions")
    assert external_path(shipped, out) == "dmriflow:models/checkpoints/" + shipped.name


def test_shell_names_are_a_bids_desc_that_round_trips():
    from dmriflow.interfaces.bids_names import (ENTITY_ORDER, build_name, parse_name,
                                                shell_entities, shell_of)
    from dmriflow.interfaces.steps import rish
    assert "shell" not in ENTITY_ORDER                       # not a BIDS entity: never written
    for b, label in ((1000, "b1000"), ("2000", "b2000"), (0, "b0"), (1000.5, "b1000p5")):
        name = build_name({"sub": "01", "model": rish.MODEL, **shell_entities(b),
                           "param": "l2"}, "dwimap", ".nii.gz")
        assert name == f"sub-01_model-rish_desc-{label}_param-l2_dwimap.nii.gz"
        entities, suffix, ext = parse_name(name)
        assert shell_of(entities) == float(b) and (suffix, ext) == ("dwimap", ".nii.gz")
    # an older run's names are still read; other desc labels name no shell
    assert shell_of(parse_name("sub-01_model-rish_shell-2000_param-l0_dwimap.nii.gz")[0]) == 2000
    assert shell_of({"desc": "synthesized"}) is None and shell_of({"desc": "b"}) is None
    assert shell_of({"model": "tensor", "param": "fa"}) is None


def test_a_rerun_on_an_output_of_the_old_shell_naming_replaces_its_files(tmp_path, capsys):
    """An OUTPUT written with ``shell-<b>`` names (before the rename) and rerun:
    the subject's files its old status file lists are removed and written under
    the new names; a file the user put beside them stays."""
    from dmriflow.pipelines.report import subject_maps
    src, out = tmp_path / "in", tmp_path / "out"
    write_cohort(src, 1, shape=SHAPE, seed=5,
                 scheme=hcp_scheme(n_b0=2, shells=(1000, 2000), n_dirs=12, seed=1))
    assert run(src, out) == cli.EXIT_OK
    status = next((out / "dmriflow").glob("sub-*/*_desc-dmriflow_status.json"))
    dwi = status.parent / "dwi"
    new = sorted(p.name for p in dwi.glob("*_model-rish_desc-b*"))
    assert len(new) == 2 * 2 * 2              # 2 shells x (map, sidecar) x l0, l2 (12 dirs)

    # make it an OUTPUT of the old naming, with old code's status file
    row = json.loads(status.read_text())
    for name in new:
        (dwi / name).rename(dwi / name.replace("_desc-b", "_shell-"))
    row["derivatives"] = [d.replace("_desc-b", "_shell-") for d in row["derivatives"]]
    row.update(pipeline_version="0.0.old", export_id="old")
    status.write_text(json.dumps(row))
    (dwi / "my_notes.txt").write_text("the user's")
    old = sorted(p.name for p in dwi.glob("*_shell-*"))
    assert len(old) == len(new)
    # status calls it a result of other code; the report still reads the old names
    assert cli.main(["status", str(out)]) == cli.EXIT_SUBJECTS_FAILED
    assert "result of pipeline 0.0.old" in capsys.readouterr().out
    (maps,) = subject_maps(out / "dmriflow").values()
    assert sorted(maps.rish) == [(b, o) for b in (1000.0, 2000.0) for o in (0, 2)]

    assert run(src, out) == cli.EXIT_OK
    assert not list(dwi.glob("*_shell-*"))            # not mixed: the old files are gone
    assert sorted(p.name for p in dwi.glob("*_model-rish_desc-b*")) == new
    assert (dwi / "my_notes.txt").read_text() == "the user's"
    row = json.loads(status.read_text())
    assert row["status"] == "done" and not any("shell-" in d for d in row["derivatives"])
    assert all(derivative_file(d, out).exists() for d in row["derivatives"])


def test_retiring_an_export_removes_only_listed_files_inside_the_subject(tmp_path):
    """What an earlier status file lists is removed only when it is a regular
    file in the subject's own folder: a listed link, a file of another subject
    or outside OUTPUT, and a JSON beside a map that dmriflow did not write stay."""
    from dmriflow.pipelines.derivatives import retire_export
    out = tmp_path / "out"
    dwi = out / "dmriflow" / "sub-01" / "dwi"
    other = out / "dmriflow" / "sub-02" / "dwi"
    for d in (dwi, other):
        d.mkdir(parents=True)
    ours = dwi / "sub-01_model-rish_shell-1000_param-l0_dwimap.nii.gz"
    ours.write_bytes(b"map")
    ours_json = dwi / "sub-01_model-rish_shell-1000_param-l0_dwimap.json"
    ours_json.write_text(json.dumps({"GeneratedBy": [{"Name": "dmriflow"}]}))
    foreign = dwi / "sub-01_model-rish_shell-2000_param-l0_dwimap.nii.gz"
    foreign.write_bytes(b"map")
    foreign_json = dwi / "sub-01_model-rish_shell-2000_param-l0_dwimap.json"
    foreign_json.write_text(json.dumps({"Note": "the user's"}))
    neighbour = other / "sub-02_model-tensor_param-fa_dwimap.nii.gz"
    neighbour.write_bytes(b"fa")
    outside = tmp_path / "elsewhere.nii.gz"
    outside.write_bytes(b"x")
    link = dwi / "sub-01_model-tensor_param-md_dwimap.nii.gz"
    link.symlink_to(outside)
    status = out / "dmriflow" / "sub-01" / "sub-01_desc-dmriflow_status.json"
    rel = [str(p.relative_to(out / "dmriflow")) for p in (ours, foreign, neighbour, link)]
    status.write_text(json.dumps({"derivatives": rel + ["../../elsewhere.nii.gz",
                                                        str(outside)]}))
    assert retire_export(status, out, ("sub-01",)) == 3
    assert not ours.exists() and not ours_json.exists() and not foreign.exists()
    assert foreign_json.exists() and neighbour.exists() and outside.exists()
    assert link.is_symlink() and not status.exists()
