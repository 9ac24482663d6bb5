"""The BIDS-App command line (``dmriflow INPUT OUTPUT participant|group``) and
per-unit discovery problems: a problem of one subject fails that subject only,
naming the file and the value; the others run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import uri

from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
from dmriflow.pipelines import cli
from dmriflow.pipelines.execution import RunConfig
from dmriflow.pipelines.inputs import discover, read_filter_file

SHAPE = (12, 14, 10)


def bids_cohort(root: Path, n: int = 2) -> Path:
    write_cohort(root, n, layout="bids", shape=SHAPE, seed=0,
                 scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1))
    return root


def split_runs(root: Path, label: str = "01") -> list[Path]:
    """Turn ``sub-<label>``'s one series into run-1 and run-2 (same data)."""
    folder = root / f"sub-{label}" / "dwi"
    runs = []
    for f in sorted(folder.glob(f"sub-{label}_dwi.*")):
        for run in (1, 2):
            shutil.copy(f, folder / f.name.replace("_dwi.", f"_run-{run}_dwi."))
        f.unlink()
    for run in (1, 2):
        runs.append(folder / f"sub-{label}_run-{run}_dwi.nii.gz")
    return runs


def table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "dmriflow" / "group" / "subjects.tsv", sep="\t",
                       keep_default_na=False).set_index("subject")


def participant(cohort, out, tmp, *extra) -> int:
    return cli.main([str(cohort), str(out), "participant", "--worker", "debug", "--quiet",
                     "-w", str(tmp / "cache"), *extra])


def test_a_filter_file_selects_one_of_two_runs(tmp_path, capsys):
    """Two runs of sub-01 are two units (run- in their names); a pybids-style
    filter file selects run 1 (and sub-02, which has no run entity); the
    selected unit keeps the name it has without the filter."""
    cohort = bids_cohort(tmp_path / "in")
    run1, run2 = split_runs(cohort)
    units = {s.key: s for s in discover(cohort)}
    assert set(units) == {"sub-01_run-1", "sub-01_run-2", "sub-02"}
    assert (units["sub-01_run-1"].dwi, units["sub-01_run-2"].dwi) == (str(run1), str(run2))
    assert all(u.problem is None for u in units.values())

    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"dwi": {"run": 1}, "t1w": {"run": 2}}))
    assert read_filter_file(filt) == {"run": 1}
    picked = {s.key: s.dwi for s in discover(cohort, bids_filter=read_filter_file(filt))}
    assert picked == {"sub-01_run-1": str(run1)}        # sub-02 has no run entity
    filt.write_text(json.dumps({"dwi": {"run": [1, None]}}))
    code = participant(cohort, tmp_path / "out2", tmp_path, "--bids-filter-file", str(filt))
    assert code == cli.EXIT_OK
    t = table(tmp_path / "out2")
    assert list(t.index) == ["sub-01_run-1", "sub-02"] and set(t["status"]) == {"done"}
    dwi = tmp_path / "out2" / "dmriflow" / "sub-01" / "dwi"
    assert (dwi / "sub-01_run-1_model-tensor_param-fa_dwimap.nii.gz").exists()
    assert not list(dwi.parent.glob("**/*run-2*"))
    capsys.readouterr()


def test_a_filter_leaving_out_a_chosen_participant_says_so(tmp_path, capsys):
    """A participant that exists but whose every series the filter leaves out
    is a usage error naming the filter, not "no such subject"; a label that
    exists nowhere still says so."""
    cohort = bids_cohort(tmp_path / "in")
    split_runs(cohort)
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"dwi": {"run": 3}}))
    assert participant(cohort, tmp_path / "out", tmp_path, "--participant-label", "sub-01",
                       "--bids-filter-file", str(filt)) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--participant-label sub-01: the --bids-filter-file" in err and '"run": 3' in err
    assert participant(cohort, tmp_path / "out", tmp_path, "--participant-label", "01", "07",
                       "--bids-filter-file", str(filt)) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "no such subject" in err and "07" in err
    assert not (tmp_path / "out" / "dmriflow" / "sub-01").exists()


def test_bad_filter_files_are_usage_errors(tmp_path, capsys):
    cohort = bids_cohort(tmp_path / "in", 1)
    filt = tmp_path / "f.json"
    for text, phrase in (("{not json", "cannot read"), ('{"dwi": {"flavour": "x"}}', "flavour"),
                         ('["dwi"]', "JSON object")):
        filt.write_text(text)
        assert participant(cohort, tmp_path / "out", tmp_path,
                           "--bids-filter-file", str(filt)) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert str(filt) in err and phrase in err


def test_a_bad_sidecar_fails_one_subject_only(tmp_path, capsys):
    """A sidecar that is no JSON object fails its subject (the file named), a
    "3T" field strength is read with a warning; the other subjects run."""
    cohort = bids_cohort(tmp_path / "in", 3)
    bad = cohort / "sub-01" / "dwi" / "sub-01_dwi.json"
    bad.write_text("[3, 0.0895]")
    odd = cohort / "sub-02" / "dwi" / "sub-02_dwi.json"
    odd.write_text(json.dumps({**json.loads(odd.read_text()), "MagneticFieldStrength": "3T"}))
    assert participant(cohort, tmp_path / "out", tmp_path) == cli.EXIT_SUBJECTS_FAILED
    t = table(tmp_path / "out")
    assert list(t["status"]) == ["failed", "done", "done"]
    assert uri(bad, cohort) in t.loc["sub-01", "error"]
    assert "[3, 0.0895]" in t.loc["sub-01", "error"]
    assert float(t.loc["sub-02", "field_strength_t"]) == 3.0
    assert "'3T'" in t.loc["sub-02", "warnings"]
    census = pd.read_csv(tmp_path / "out" / "dmriflow" / "group" / "census.tsv", sep="\t")
    assert uri(bad, cohort) in census.set_index("subject").loc["sub-01", "census_error"]
    assert str(tmp_path) not in census.to_csv() + t.to_csv()
    assert not [p for p in (tmp_path / "out" / "dmriflow").rglob("*.json")
                if str(tmp_path) in p.read_text()]
    capsys.readouterr()


def test_an_unreadable_timing_fails_that_subject_only(tmp_path):
    """--image-gradient: a non-numeric DiffusionGradientSeparation in one sidecar
    fails that unit (file and value named); in every sidecar it stops the run."""
    cohort = bids_cohort(tmp_path / "in", 2)
    for label, value in (("01", "43ms"), ("02", 0.0431)):
        path = cohort / f"sub-{label}" / "dwi" / f"sub-{label}_dwi.json"
        path.write_text(json.dumps({**json.loads(path.read_text()),
                                    "DiffusionGradientSeparation": value,
                                    "DiffusionGradientDuration": 0.0106}))
    config = RunConfig(worker="debug", image_gradient=True)
    units = {s.key: s for s in cli._timing_problems(discover(cohort), config)}
    assert units["sub-02"].problem is None
    problem = units["sub-01"].problem
    assert "sub-01_dwi.json" in problem and "'43ms'" in problem
    with pytest.raises(Exception, match="43ms"):
        cli._timing_problems([units["sub-01"]], config)


def test_participant_labels_with_and_without_prefix_and_sessions(tmp_path):
    cohort = bids_cohort(tmp_path / "in", 3)
    assert ([s.key for s in discover(cohort, participant_labels=["sub-01", "03"])]
            == [s.key for s in discover(cohort, participant_labels=["01", "sub-03"])]
            == ["sub-01", "sub-03"])
    args = cli.build_parser().parse_args(
        cli.bids_app_argv(["in", "out", "participant", "--participant-label", "sub-01", "02",
                           "--session-label", "ses-1", "-w", "c", "--nprocs", "3",
                           "--omp-nthreads", "2", "--mem", "8", "-v"]))
    assert args.command == "participant" and (args.input, args.output) == ("in", "out")
    assert args.participant_label == ["sub-01", "02"] and args.session_label == ["ses-1"]
    config = cli._config(args)
    assert (config.cache_dir, config.n_procs, config.omp_nthreads, config.mem,
            config.verbose) == ("c", 3, 2, 8.0, True)
    # the old verbs are untouched
    assert cli.bids_app_argv(["run", "in", "out"]) == ["run", "in", "out"]
    assert cli.bids_app_argv(["status", "out"]) == ["status", "out"]


def test_exit_codes(tmp_path, capsys):
    cohort = bids_cohort(tmp_path / "in", 1)
    out = str(tmp_path / "out")
    for wrong in (["participant", "--nprocs", "many"], ["participant", "--no-such-flag"],
                  ["everyone"]):
        with pytest.raises(SystemExit) as info:
            cli.main([str(cohort), out, *wrong])
        assert info.value.code == cli.EXIT_USAGE
    assert cli.main([str(tmp_path / "none"), out, "participant"]) == cli.EXIT_INPUT
    assert cli.main([str(cohort), out, "participant",
                     "--participant-label", "99"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--participant-label 99: no such subject" in err and "labels found: 01" in err
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and "dmriflow" in capsys.readouterr().out


def test_group_aggregates_what_is_done_without_computing(tmp_path, capsys):
    """Two participant runs of one subject each, then group: the table holds
    both (each participant run adds its row), no node is computed, and a
    subject never run is listed as missing."""
    cohort = bids_cohort(tmp_path / "in", 3)
    out = tmp_path / "out"
    for label in ("01", "sub-02"):
        assert participant(cohort, out, tmp_path, "--participant-label", label) == cli.EXIT_OK
    assert list(table(out).index) == ["sub-01", "sub-02"]       # never shrunk to one row
    nodes = sorted(p.name for p in (tmp_path / "cache").iterdir())
    code = cli.main([str(cohort), str(out), "group", "--participant-label", "01", "02"])
    assert code == cli.EXIT_OK
    assert list(table(out)["status"]) == ["done", "done"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == nodes
    assert (out / "dmriflow" / "report.html").exists()
    assert cli.main([str(cohort), str(out), "group"]) == cli.EXIT_SUBJECTS_FAILED
    assert list(table(out)["status"]) == ["done", "done", "missing"]
    assert "NOT DONE sub-03 (missing)" in capsys.readouterr().out


def test_mem_limits_processes_and_omp_sets_worker_threads(tmp_path, monkeypatch):
    cohort = bids_cohort(tmp_path / "in", 2)
    units = discover(cohort)
    series = cli.series_gb(units[0].dwi)
    assert series == pytest.approx(12 * 14 * 10 * 14 * 4 / 1e9)
    peak = cli.PEAK_PER_SERIES["copy"] * series
    assert cli.processes_for_memory(units, 4, 100.0) == (4, peak)
    assert cli.processes_for_memory(units, 4, 2.5 * peak) == (2, peak)
    assert cli.processes_for_memory(units, 4, 0.5 * peak) == (1, peak)
    # the default run only fits (Validate keeps mask rows); a series step holds a copy
    fits = cli.PEAK_PER_SERIES["fits"]
    assert fits < cli.PEAK_PER_SERIES["copy"]
    assert cli.peak_per_series(RunConfig(worker="cf").options_record()) == fits
    assert cli.peak_per_series(RunConfig(worker="cf", denoise=True).options_record()) == \
        cli.PEAK_PER_SERIES["copy"]
    for name in cli.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    config = RunConfig(worker="cf", n_procs=4, omp_nthreads=3, mem=2.5 * fits * series)
    cli._apply_resources(units, config)
    assert config.n_procs == 2
    denoising = RunConfig(worker="cf", n_procs=4, denoise=True, mem=2.5 * fits * series)
    cli._apply_resources(units, denoising)
    assert denoising.n_procs == 1
    assert all(__import__("os").environ[name] == "3" for name in cli.THREAD_VARIABLES)


def test_two_hcp_folders_of_one_label_fail_that_label_only(tmp_path):
    cohort = tmp_path / "hcp"
    write_cohort(cohort, 2, layout="hcp", shape=SHAPE, seed=0,
                 scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1))
    first = sorted(p.name for p in cohort.iterdir() if (p / "T1w").is_dir())[0]
    shutil.copytree(cohort / first, cohort / f"sub-{first}")
    units = {s.key: s for s in discover(cohort)}
    assert len(units) == 2
    problem = units[f"sub-{first}"].problem
    assert str(cohort / first) in problem and str(cohort / f"sub-{first}") in problem
    assert "rename or remove" in problem
    assert [s.problem for k, s in units.items() if k != f"sub-{first}"] == [None]


def test_every_verb_is_known_to_the_bids_app_form():
    verbs = cli.build_parser()._subparsers._group_actions[0].choices
    assert set(verbs) == set(cli.VERBS)


def test_hcp_folder_names_with_an_underscore_select_their_subject(tmp_path, capsys):
    """HCP folders may hold characters a BIDS label cannot (``100307_3T`` becomes
    ``sub-1003073T``): --participant-label takes the folder's name or the label,
    with or without ``sub-``; a label matching nothing is a usage error (64)
    naming it, with no run started."""
    cohort = tmp_path / "hcp"
    first, second = write_cohort(cohort, 2, layout="hcp", shape=SHAPE, seed=0,
                                  scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=12, seed=1))
    (cohort / first).rename(cohort / "100307_3T")
    for label in ("100307_3T", "sub-100307_3T", "1003073T", "sub-1003073T"):
        assert [s.key for s in discover(cohort, participant_labels=[label])] == \
            ["sub-1003073T"], label
    assert [s.key for s in discover(cohort, participant_labels=["100307_3T", second])] == \
        sorted(["sub-1003073T", f"sub-{second}"])
    out = tmp_path / "out"
    assert participant(cohort, out, tmp_path, "--participant-label", "100307_3T") == cli.EXIT_OK
    assert list(table(out).index) == ["sub-1003073T"]
    capsys.readouterr()
    for wrong in ("100307-3T", "sub-100307", "1003073t"):
        assert participant(cohort, tmp_path / "none", tmp_path, "--participant-label",
                           second, wrong) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert f"--participant-label {wrong}: no such subject" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "none").exists()
