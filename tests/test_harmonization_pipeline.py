"""harmonize fit / apply through the engine on a two-site phantom cohort."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dmriflow.interfaces.harmonize import SIDECAR_KEY, HarmonizationArtefact
from dmriflow.interfaces.sim.phantom import SiteEffect, hcp_scheme, write_cohort
from dmriflow.pipelines import cli

SHAPE = (20, 24, 18)
#: Target site: per-order RISH scaling of the b=1000 signal, lower SNR.
TARGET = SiteEffect(name="siteB", rish_scale={0: 0.85, 2: 1.3, 4: 0.75}, snr=20.0)
N_PER_SITE = 4
#: A target site scanned at 3 mm, coarser than the reference's voxels (the
#: phantom's 2.5 mm, the template's): ``--match-resolution`` blurs the
#: template for its subjects.
COARSE_TARGET = SiteEffect(name="siteB", rish_scale={0: 0.85, 2: 1.3, 4: 0.75}, snr=20.0,
                           voxel_size=3.0)
RULE = "box-linear"


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("harm") / "bids"
    scheme = hcp_scheme(n_b0=4, shells=(1000,), n_dirs=30, seed=2)
    write_cohort(root, N_PER_SITE, layout="bids", shape=SHAPE, seed=10, scheme=scheme,
                 subject_prefix="a")
    # the same seed: travelling subjects (each anatomy scanned at both sites)
    write_cohort(root, N_PER_SITE, layout="bids", shape=SHAPE, seed=10, scheme=scheme,
                 subject_prefix="b", site=TARGET)
    labels = sorted(p.name for p in root.glob("sub-*"))
    table = root / "sites.tsv"
    table.write_text("participant_id\tsite\n" + "".join(
        f"{lbl}\t{'siteA' if lbl.startswith('sub-a') else 'siteB'}\n" for lbl in labels))
    return root, table


@pytest.fixture(scope="module")
def fitted(two_sites, tmp_path_factory):
    root, table = two_sites
    out = tmp_path_factory.mktemp("harm-out")
    code = cli.main(["harmonize", "fit", str(root), str(out), "--reference", "siteA",
                     "--target", "siteB", "--site-column", "site", "--site-table", str(table),
                     "--registration", "affine", "--worker", "cf", "--quiet",
                     "--cache-dir", str(out / "cache")])
    assert code == cli.EXIT_OK
    return out


def test_fit_writes_artefact_and_removes_the_site_effect(fitted):
    folders = list((fitted / "dmriflow" / "harmonization").iterdir())
    assert len(folders) == 1
    art = HarmonizationArtefact.load(folders[0])
    assert art.shells == [1000.0] and art.lmax == 6
    assert (art.reference_site, art.target_site) == ("siteA", "siteB")
    assert len(art.subjects) == 2 * N_PER_SITE
    effect = pd.read_csv(fitted / "dmriflow" / "group" / "harmonization_site_effect.tsv",
                         sep="\t")
    assert (effect["wm_mask"] == "reference-template").all()     # the reference's WM for all
    rish = effect[effect["metric"].isin(["rish_l0", "rish_l2", "rish_l4"])]
    assert len(rish) == 3
    assert (rish["p_before"] < 0.01).all()          # the simulated site effect is detected
    assert (rish["p_after"] > 0.05).all()           # and gone after harmonization
    assert (rish["d_after"].abs() < rish["d_before"].abs() / 3).all()
    pres = pd.read_csv(fitted / "dmriflow" / "group" / "harmonization_preservation.tsv",
                       sep="\t")
    assert len(pres) == N_PER_SITE and (pres["fa_corr"] > 0.9).all()


def test_apply_writes_harmonised_series_with_provenance(fitted, two_sites, tmp_path):
    root, _ = two_sites
    artefact = next((fitted / "dmriflow" / "harmonization").iterdir())
    target = [p.name[4:] for p in sorted(root.glob("sub-b*"))]
    code = cli.main(["harmonize", "apply", str(artefact), str(root), str(tmp_path / "out"),
                     "--participant-label", *target, "--worker", "debug", "--quiet",
                     "--cache-dir", str(tmp_path / "cache")])
    assert code == cli.EXIT_OK
    art = HarmonizationArtefact.load(artefact)
    for label in target:
        dwi_dir = tmp_path / "out" / "dmriflow" / f"sub-{label}" / "dwi"
        meta = json.loads((dwi_dir / f"sub-{label}_desc-harmonized_dwi.json").read_text())
        assert meta[SIDECAR_KEY] == [art.content_id]
        # named relative to the dataset root (OUTPUT/dmriflow), never absolute
        recorded = meta["HarmonizationArtefact"]
        assert not Path(recorded).is_absolute()
        assert (tmp_path / "out" / "dmriflow" / recorded).resolve() == artefact.resolve()
        assert (dwi_dir / f"sub-{label}_desc-harmonized_dwi.nii.gz").exists()
        assert (dwi_dir / f"sub-{label}_model-tensor_param-fa_dwimap.nii.gz").exists()


def test_second_application_is_refused(fitted, two_sites, tmp_path):
    """Feeding harmonised outputs back in (their sidecar names the artefact) fails them."""
    root, _ = two_sites
    artefact = next((fitted / "dmriflow" / "harmonization").iterdir())
    label = sorted(p.name for p in root.glob("sub-b*"))[0]
    first = tmp_path / "first"
    assert cli.main(["run", str(root), str(first), "--participant-label", label,
                     "--harmonization", str(artefact), "--worker", "debug", "--quiet",
                     "--cache-dir", str(tmp_path / "c1")]) == cli.EXIT_OK
    again = tmp_path / "again" / label / "dwi"
    again.mkdir(parents=True)
    src = first / "dmriflow" / label / "dwi" / f"{label}_desc-harmonized_dwi"
    for ext in (".nii.gz", ".bval", ".bvec", ".json"):
        (again / f"{label}_dwi{ext}").write_bytes(Path(f"{src}{ext}").read_bytes())
    (tmp_path / "again" / "dataset_description.json").write_text('{"Name": "x"}')
    code = cli.main(["run", str(tmp_path / "again"), str(tmp_path / "out2"),
                     "--harmonization", str(artefact), "--worker", "debug", "--quiet",
                     "--cache-dir", str(tmp_path / "c2")])
    assert code == cli.EXIT_SUBJECTS_FAILED
    table = pd.read_csv(tmp_path / "out2" / "dmriflow" / "group" / "subjects.tsv", sep="\t")
    assert table["failed_step"][0] == "harmonize"
    assert "already" in table["error"][0]


def test_too_few_subjects_is_a_clear_error(two_sites, tmp_path, capsys):
    root, table = two_sites
    code = cli.main(["harmonize", "fit", str(root), str(tmp_path), "--reference", "siteA",
                     "--target", "siteB", "--site-column", "site", "--site-table", str(table),
                     "--participant-label", "a01", "a02", "b01", "b02", "b03",
                     "--worker", "debug", "--quiet"])
    assert code == cli.EXIT_INPUT
    assert "site 'siteA' has 2 subject(s); at least 3 are needed" in capsys.readouterr().err


def test_a_moved_artefact_keeps_the_cache_and_is_named_where_it_is(fitted, two_sites,
                                                                    tmp_path):
    """The Harmonize nodes' cache key is the artefact's content (artefact.json,
    which lists every file's sha256), not its path: after the folder moves, a
    rerun recomputes no step, and the sidecars name the new place."""
    import shutil

    from pydra.utils.hash import hash_function

    from dmriflow.pipelines.execution import RunConfig
    root, _ = two_sites
    label = sorted(p.name for p in root.glob("sub-b*"))[0]
    first = tmp_path / "art1" / "artefact"
    shutil.copytree(next((fitted / "dmriflow" / "harmonization").iterdir()), first)
    out, cache = tmp_path / "out", tmp_path / "cache"

    def apply(artefact):
        assert cli.main(["run", str(root), str(out), "--participant-label", label,
                         "--harmonization", str(artefact), "--worker", "debug", "--quiet",
                         "--cache-dir", str(cache)]) == cli.EXIT_OK
        return {p.parent.name: p.stat().st_mtime_ns for p in cache.rglob("_result.pklz")
                if (p.parent / "_dmriflow_step").is_file()
                and (p.parent / "_dmriflow_step").read_text() not in ("export", "group")}

    before = apply(first)
    assert "harmonize" in {(cache / k / "_dmriflow_step").read_text() for k in before}
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    first.rename(moved)
    after = apply(moved)
    assert after == before                            # no step recomputed
    meta = json.loads((out / "dmriflow" / label / "dwi"
                       / f"{label}_desc-harmonized_dwi.json").read_text())
    assert (out / "dmriflow" / meta["HarmonizationArtefact"]).resolve() == moved.resolve()

    # the key follows the content: same content elsewhere, same key; new content, new key
    def key(folder):
        return hash_function(RunConfig(worker="debug", harmonization=str(folder))
                             .options_record()["harmonize"])
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    assert key(copy) == key(moved)
    meta_file = copy / "artefact.json"
    meta_file.write_text(meta_file.read_text() + "\n")
    assert key(copy) != key(moved)


def test_drop_series_deletes_the_fits_series_copies_and_a_rerun_gives_the_same_artefact(
        two_sites, tmp_path):
    """``harmonize fit --drop-series`` deletes the series copies of the fit's
    Validate nodes and the FitSubject nodes' terms once the artefact is
    written (it accepted the flag and ignored it before; then kept the
    terms); a rerun reads the inputs again, recomputes the terms and fits
    the same artefact; the inputs are never touched."""
    from dmriflow.interfaces import io
    from dmriflow.interfaces.harmonize import SubjectTerms

    root, table = two_sites
    out, cache = tmp_path / "out", tmp_path / "cache"
    series = lambda: [p for name in (io.DECODED_NAME, io.ROWS_NAME)  # noqa: E731
                      for p in cache.glob(f"*/{name}")]
    terms = lambda: [p for name in SubjectTerms.FILE_PATTERNS  # noqa: E731
                     for p in cache.glob(f"*/{name}")]
    inputs = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}

    def fit(*extra):
        code = cli.main(["harmonize", "fit", str(root), str(out), "--reference", "siteA",
                         "--target", "siteB", "--site-column", "site", "--site-table",
                         str(table), "--participant-label", "a01", "a02", "a03", "b01", "b02",
                         "b03", "--registration", "affine", "--worker", "cf", "--quiet",
                         "--cache-dir", str(cache), *extra])
        assert code == cli.EXIT_OK
        folder, = (out / "dmriflow" / "harmonization").iterdir()
        return HarmonizationArtefact.load(folder).content_id

    first = fit("--drop-series")
    assert series() == [] and terms() == []
    assert fit() == first and len(series()) == 6      # read again, the same fit
    assert len(terms()) == 6 * 2                      # cover + one shell's RISH each
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == inputs


def test_fit_writes_its_methods_text(fitted):
    """``harmonize fit`` writes its own methods text (the same machinery as a
    run's): the series steps it read, the fit with the shells and order it
    resolved, the RISH references; the report shows it."""
    from dmriflow.pipelines.methods import METHODS_FILES, RISH_MULTISITE, SYN
    text = (fitted / "dmriflow" / "logs" / METHODS_FILES["harmonize fit"]).read_text()
    assert "for the harmonization fit over 8 unit(s)" in text
    assert "### FitHarmonization (`harmonization_fit`)" in text and "### Validate" in text
    assert "### FitTensor" not in text and "### Harmonize " not in text
    assert "- `--shells` = 1000.0 **(set for this run)**" in text
    assert "- `--harmonization-lmax` = 6 **(set for this run)**" in text
    assert "- `--registration` = affine **(set for this run)**" in text
    assert RISH_MULTISITE in text and SYN not in text      # affine: no SyN reference
    from dmriflow.interfaces.harmonize import EVAL_MASK_REFERENCE, EVAL_MASKS
    assert EVAL_MASKS[EVAL_MASK_REFERENCE] in text       # how the evaluation's WM was defined
    assert "FitHarmonization (<code>harmonization_fit</code>)" in \
        (fitted / "dmriflow" / "report.html").read_text()


def test_fit_evaluates_through_the_registrations_it_fitted_with(two_sites, tmp_path, monkeypatch):
    """The fit node's evaluation applies the artefact through each target
    subject's registration node's transform: no subject is registered a second
    time (at HCP size that was ~50 s per target subject, one after another)."""
    from dmriflow.interfaces import harmonize

    root, table = two_sites
    calls = []
    real = harmonize.register_fa

    def counted(*args, **kwargs):
        calls.append(kwargs.get("kind", args[4] if len(args) > 4 else "syn"))
        return real(*args, **kwargs)

    # apply_harmonization registers through this module global when it is given no
    # transform; the registration nodes call their own import, so only a second
    # registration inside the fit node is counted (the debug worker runs in-process)
    monkeypatch.setattr(harmonize, "register_fa", counted)
    code = cli.main(["harmonize", "fit", str(root), str(tmp_path / "out"), "--reference", "siteA",
                     "--target", "siteB", "--site-column", "site", "--site-table", str(table),
                     "--registration", "affine", "--registration-contrast", "rish-l0",
                     "--worker", "debug", "--quiet", "--cache-dir", str(tmp_path / "cache")])
    assert code == cli.EXIT_OK
    assert calls == []
    # the command line's contrast reached the fit and is recorded for apply
    folder, = (tmp_path / "out" / "dmriflow" / "harmonization").iterdir()
    assert HarmonizationArtefact.load(folder).registration_contrast == "rish-l0"


def test_fit_records_the_resolution_rule_and_apply_registers_with_it(tmp_path, monkeypatch):
    """``harmonize fit --match-resolution box-linear`` hands the rule to every
    registration node (template rounds and final) and records it in the
    artefact and the methods text; ``harmonize apply`` of a target subject
    registers it with the artefact's rule: the fit's own transform of it,
    which registering without the rule does not give. The rule is part of
    the registration nodes' cache keys: a fit with it off, in the same
    cache, registers every subject again (as without the rule), and its
    artefact records no rule."""
    from dmriflow.interfaces import harmonize
    from dmriflow.pipelines import harmonization as P
    root, n = tmp_path / "bids", 3
    scheme = hcp_scheme(n_b0=4, shells=(1000,), n_dirs=30, seed=2)
    write_cohort(root, n, layout="bids", shape=SHAPE, seed=10, scheme=scheme,
                 subject_prefix="a")
    write_cohort(root, n, layout="bids", shape=SHAPE, seed=20, scheme=scheme,
                 subject_prefix="b", site=COARSE_TARGET)
    table = root / "sites.tsv"
    table.write_text("participant_id\tsite\n" + "".join(
        f"sub-{p}0{k}\tsite{p.upper()}\n" for p in "ab" for k in range(1, n + 1)))

    def spy(real, calls):
        def call(*args, **kwargs):
            out = real(*args, **kwargs)
            calls.append((kwargs.get("match_resolution"), out, args, kwargs))
            return out
        return call

    # the debug worker runs the nodes in-process; the nodes call the library
    # through their own import, apply_harmonization through the module global
    fitted = []
    monkeypatch.setattr(P, "register_fa", spy(P.register_fa, fitted))
    out = tmp_path / "out"
    code = cli.main(["harmonize", "fit", str(root), str(out), "--reference", "siteA",
                     "--target", "siteB", "--site-column", "site", "--site-table", str(table),
                     "--registration", "affine", "--match-resolution", RULE, "--worker",
                     "debug", "--quiet", "--cache-dir", str(tmp_path / "cache")])
    assert code == cli.EXIT_OK
    # the template rounds (the first: the other reference subjects), then all of them
    rounds = (n - 1) + (harmonize.TEMPLATE_ITERATIONS - 1) * n
    assert [call[0] for call in fitted] == [RULE] * (rounds + 2 * n)
    folder, = (out / "dmriflow" / "harmonization").iterdir()
    art = HarmonizationArtefact.load(folder, transforms=True)
    assert art.match_resolution == RULE
    from dmriflow.pipelines.methods import METHODS_FILES
    text = (out / "dmriflow" / "logs" / METHODS_FILES["harmonize fit"]).read_text()
    assert f"- `--match-resolution` = {RULE} **(set for this run)**" in text
    applied = []
    monkeypatch.setattr(harmonize, "register_fa", spy(harmonize.register_fa, applied))
    code = cli.main(["harmonize", "apply", str(folder), str(root), str(tmp_path / "applied"),
                     "--participant-label", "b01", "--worker", "debug", "--quiet",
                     "--cache-dir", str(tmp_path / "cache-apply")])
    assert code == cli.EXIT_OK
    rule, transform, args, kwargs = applied[-1]   # the outermost (it recurses on coarse grids)
    assert rule == RULE
    fit_transform = art.transforms[("siteB", "sub-b01")]
    np.testing.assert_array_equal(transform.prealign, fit_transform.prealign)
    # without the rule, on the template as the registration nodes hold it (C order:
    # dipy's sums follow the memory order, and the loaded artefact's is Fortran)
    moving, moving_affine, template, *rest = args
    plain = harmonize.register_fa(moving, moving_affine, np.ascontiguousarray(template), *rest,
                                  **{**kwargs, "match_resolution": None})
    assert not np.allclose(plain.prealign, fit_transform.prealign)
    # the rule is in the nodes' cache keys: off, in the same cache, registers anew
    off = tmp_path / "off"
    fitted.clear()
    code = cli.main(["harmonize", "fit", str(root), str(off), "--reference", "siteA",
                     "--target", "siteB", "--site-column", "site", "--site-table", str(table),
                     "--registration", "affine", "--worker", "debug", "--quiet",
                     "--cache-dir", str(tmp_path / "cache")])
    assert code == cli.EXIT_OK
    assert [call[0] for call in fitted] == [None] * (rounds + 2 * n)
    folder, = (off / "dmriflow" / "harmonization").iterdir()
    art = HarmonizationArtefact.load(folder, transforms=True)
    assert art.match_resolution is None and "match_resolution" not in \
        art.parameters["registration_options"]
    np.testing.assert_array_equal(art.transforms[("siteB", "sub-b01")].prealign, plain.prealign)


def test_the_command_refuses_an_unknown_contrast():
    """The step's option (declared once, in interfaces/harmonize_choices.py,
    for the library and the command line) refuses a contrast the library
    cannot register through, naming the option."""
    from dmriflow.interfaces.steps import harmonization_fit
    with pytest.raises(ValueError, match="registration_contrast"):
        harmonization_fit.Options(reference="a", target="b", registration_contrast="t1")


@pytest.mark.parametrize("contrast, why", [("fa-sitescaled", "site-scaled FA"),
                                           ("b0", "mean b0")])
def test_the_command_refuses_the_library_only_contrast(capsys, contrast, why):
    """``fa-sitescaled`` registers target subjects through their site-scaled
    DWI, ``b0`` through the mean b0, neither of which the engine's
    per-subject nodes have: the step refuses each by name, saying why (not as
    an unknown value), and the command line does not offer it."""
    from dmriflow.interfaces.steps import harmonization_fit
    with pytest.raises(ValueError, match=f"not run by the engine.*{why}"):
        harmonization_fit.Options(reference="a", target="b", registration_contrast=contrast)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["harmonize", "fit", "in", "out", "--reference", "a",
                                       "--target", "b", "--registration-contrast", contrast])
    assert "invalid choice" in capsys.readouterr().err


def test_fit_offers_only_the_options_it_goes_through(tmp_path, capsys):
    """``harmonize fit`` reads each series as acquired (source and series
    steps) and computes its own features: a product step's option (the tensor
    fit's method, the run's SH order) changed nothing and is now a usage error
    instead of being accepted and ignored; a series step's option still works,
    and ``harmonize apply`` (which runs the product steps) keeps them."""
    from dmriflow.interfaces.steps import REGISTRY, fit_reads
    assert [n for n in REGISTRY if fit_reads(n)] == ["validate", "preprocess", "motion"]
    base = ["harmonize", "fit", str(tmp_path), str(tmp_path / "out"), "--reference", "a",
            "--target", "b"]
    for flag in (["--fit-method", "OLS"], ["--lmax", "4"], ["--snr-map"], ["--gpu-sbatch-args=x"]):
        with pytest.raises(SystemExit) as exc:
            cli.build_parser().parse_args(base + flag)
        assert exc.value.code == cli.EXIT_USAGE
        assert "unrecognized arguments: " + flag[0] in capsys.readouterr().err
    assert cli.build_parser().parse_args(base + ["--denoise"]).denoise is True
    apply = cli.build_parser().parse_args(["harmonize", "apply", "art", "in", "out",
                                           "--fit-method", "OLS", "--lmax", "4"])
    assert (apply.fit_method, apply.lmax) == ("OLS", 4)


def test_the_command_offers_every_resolution_rule(capsys):
    """``--match-resolution`` offers "off" (the default) and every rule the
    library has, and refuses another value by the option's name."""
    from dmriflow.interfaces import harmonize
    from dmriflow.interfaces.harmonize_choices import ENGINE_RESOLUTION_MATCH
    from dmriflow.interfaces.steps import harmonization_fit
    assert ENGINE_RESOLUTION_MATCH == ("off", *harmonize.RESOLUTION_MATCH_RULES)
    assert harmonization_fit.Options(reference="a", target="b").match_resolution == "off"
    with pytest.raises(ValueError, match="match_resolution"):
        harmonization_fit.Options(reference="a", target="b", match_resolution="gauss")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["harmonize", "fit", "in", "out", "--reference", "a",
                                       "--target", "b", "--match-resolution", "gauss"])
    assert "invalid choice" in capsys.readouterr().err
