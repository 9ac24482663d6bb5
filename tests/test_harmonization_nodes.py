"""The engine's per-subject registration nodes give the serial fit's artefact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dmriflow.interfaces import harmonize as H
from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces import io, stepfiles
from dmriflow.interfaces.gradients import GradientTable
from dmriflow.interfaces.io import DWI
from dmriflow.interfaces.sim import phantom
from dmriflow.pipelines import harmonization as P
from dmriflow.pipelines.steps import load_series

SHAPE = (20, 24, 18)
LMAX = 4
BVAL = 1000.0
N_PER_SITE = 3
TARGET = phantom.SiteEffect(name="siteB", rish_scale={0: 0.9, 2: 1.2, 4: 0.8}, snr=25.0)


def _features(seed: int, site) -> H.SubjectFeatures:
    scheme: GradientTable = phantom.hcp_scheme(n_b0=4, shells=(BVAL,), n_dirs=30)
    s = phantom.simulate_subject(SHAPE, seed=seed, snr=40.0, scheme=scheme, site=site)
    dwi = DWI(np.asfortranarray(s.dwi, dtype=np.float32), s.gtab, s.mask, s.affine, None, {})
    return H.subject_features(dwi, f"{site.name}{seed}", LMAX)


def _in(folder: Path, fn, **kw):
    """Run a node function in its own working folder (as the engine does)."""
    folder.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return fn(**kw)
    finally:
        os.chdir(cwd)


def _entry(f: H.SubjectFeatures, folder: Path) -> dict:
    """A features node's record of ``f`` (files as the engine stores them)."""
    folder.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return {"subject": f.subject, "status": "ok", "sha256": f.content_hash(),
                **P.feature_files(f)}
    finally:
        os.chdir(cwd)


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.nii.gz"))}


@pytest.mark.parametrize("registration, contrast", [("syn", "fa"), ("affine", "fa"),
                                                    ("affine", "rish-l2")])
def test_per_subject_nodes_give_the_serial_artefact(tmp_path, registration, contrast):
    sites = {}
    entries = []
    for k, site in enumerate([phantom.SiteEffect(name="siteA")] * N_PER_SITE
                             + [TARGET] * N_PER_SITE):
        f = _features(20 + k % N_PER_SITE, site)
        sites[f.subject] = site.name
        entries.append(_entry(f, tmp_path / "features" / f.subject))
    tpl, reg = _register_nodes(tmp_path, entries, sites, registration, shells=[BVAL],
                               contrast=contrast)
    ref = [P._loader(e) for e in entries if sites[e["subject"]] == "siteA"]
    tar = [P._loader(e) for e in entries if sites[e["subject"]] == "siteB"]
    info = {"source": "reference-site mean", "iterations": H.TEMPLATE_ITERATIONS,
            "first_subject": tpl["first_subject"], "registration": registration}
    names = dict(reference_site="siteA", target_site="siteB")
    nodes = H.fit_harmonization(ref, tar, [BVAL], LMAX, registration=registration,
                                template=P._template(tpl), template_info=info,
                                registered=P._transforms(reg), registration_contrast=contrast,
                                **names)
    serial = H.fit_harmonization(ref, tar, [BVAL], LMAX, registration=registration,
                                 registration_contrast=contrast, **names)
    assert nodes.registration_contrast == serial.registration_contrast == contrast
    assert nodes.content_id == serial.content_id
    assert nodes.parameters == serial.parameters
    a, b = nodes.save(tmp_path / "nodes"), serial.save(tmp_path / "serial")
    assert _digests(a) == _digests(b)
    # the engine's split fit: one FitSubject node per subject, the sums in FitHarmonization;
    # the fit node copies the registration nodes' transform files (SavedTransform)
    # instead of decoding their SyN fields and encoding them again
    split = _fit_nodes(tmp_path / "split", entries, tpl, reg, [BVAL], registration,
                       sites=sites, contrast=contrast, fit_without_transforms=True)
    assert split["content_id"] == serial.content_id
    engine = H.HarmonizationArtefact.load(split["artefact"], transforms=True)
    assert engine.parameters == serial.parameters and engine.subjects == _subjects(b)
    assert _digests(Path(split["artefact"])) == _digests(b)
    assert engine.transforms.keys() == serial.transforms.keys()


def _register_nodes(tmp_path: Path, entries, sites, registration, match_resolution=None,
                    **image) -> tuple[dict, list]:
    """The template rounds and the final registrations as the engine's nodes
    (``image``: ``shells``, ``contrast`` of the registration image)."""
    common = dict(sites=sites, **image)
    tpl = _in(tmp_path / "t0", P.template_start_step, features=entries, reference_site="siteA",
              target_site="siteB", **common)
    how = dict(registration=registration, match_resolution=match_resolution, **common)
    for r in range(1, H.TEMPLATE_ITERATIONS + 1):
        reg = [_in(tmp_path / f"r{r}" / e["subject"], P.register_subject_step, entry=e,
                   template=tpl, register_sites=["siteA"], **how) for e in entries]
        tpl = _in(tmp_path / f"t{r}", P.template_mean_step, features=entries,
                  reference_site="siteA", template=tpl, registered=reg, **common)
    reg = [_in(tmp_path / "reg" / e["subject"], P.register_subject_step, entry=e, template=tpl,
               register_sites=["siteA", "siteB"], **how) for e in entries]
    return tpl, reg


#: Resolution-matched registration through the nodes: the target site at 3 mm,
#: and one reference subject too (so the template rounds blur for it), against
#: the template's 2.5 mm (the first reference subject's grid).
COARSE_MM = 3.0
RULE = "box-linear"


def test_nodes_register_with_the_resolution_rule_as_the_serial_fit(tmp_path):
    """``match_resolution`` reaches every registration node (template rounds
    and final) and the fit node: with subjects coarser than the template, the
    nodes' artefact is the serial fit's with the same rule
    (``registration_options``) bit for bit and records the rule (which apply
    follows); a target subject's transform is not the one registering
    without the rule gives. (Off: the nodes' artefact is the serial fit's
    without options, test_per_subject_nodes_give_the_serial_artefact.)"""
    sites, entries = {}, []
    coarse = dict(voxel_size=COARSE_MM)
    for k, site in enumerate([phantom.SiteEffect(name="siteA")] * (N_PER_SITE - 1)
                             + [phantom.SiteEffect(name="siteA", **coarse)]
                             + [replace(TARGET, **coarse)] * N_PER_SITE):
        f = _features(20 + k % N_PER_SITE, site)
        sites[f.subject] = site.name
        entries.append(_entry(f, tmp_path / "features" / f.subject))
    tpl, reg = _register_nodes(tmp_path, entries, sites, "affine", match_resolution=RULE,
                               shells=[BVAL])
    fit = _in(tmp_path / "fit", P.fit_harmonization_step, features=entries, shells=[BVAL],
              lmax=LMAX, template=tpl, registered=reg, terms=_terms(tmp_path, entries, reg, sites),
              registration="affine", sites=sites, match_resolution=RULE,
              reference_site="siteA", target_site="siteB")
    ref = [P._loader(e) for e in entries if sites[e["subject"]] == "siteA"]
    tar = [P._loader(e) for e in entries if sites[e["subject"]] == "siteB"]
    serial = H.fit_harmonization(ref, tar, [BVAL], LMAX, registration="affine",
                                 reference_site="siteA", target_site="siteB",
                                 registration_options={"match_resolution": RULE})
    nodes = H.HarmonizationArtefact.load(fit["artefact"], transforms=True)
    assert nodes.content_id == serial.content_id and nodes.parameters == serial.parameters
    assert _digests(Path(fit["artefact"])) == _digests(serial.save(tmp_path / "serial"))
    assert nodes.match_resolution == RULE
    f = tar[0]()
    plain = H.register_fa(H.masked_fa(f), f.affine, P._template(tpl)[0], nodes.template_affine,
                          "affine")
    assert not np.allclose(plain.prealign, nodes.transforms[("siteB", f.subject)].prealign)


def _subjects(folder: Path) -> list:
    """The subject list an artefact folder records."""
    return json.loads((folder / H.ARTEFACT_JSON).read_text())["subjects"]


# ----------------------------------------------------------------------------
# The evaluation: per-subject summary nodes give the serial evaluation's tables
# ----------------------------------------------------------------------------
EVAL_SHELLS = (BVAL, 2000.0)


def _record(k: int, site, folder: Path) -> dict:
    """A subject's record with its series as files (two shells), as Validate hands it on."""
    scheme = phantom.hcp_scheme(n_b0=4, shells=EVAL_SHELLS, n_dirs=30)
    s = phantom.simulate_subject(SHAPE, seed=20 + k, snr=40.0, scheme=scheme, site=site)
    dwi = DWI(np.asfortranarray(s.dwi, dtype=np.float32), s.gtab, s.mask, s.affine, None, {})
    folder.mkdir(parents=True)
    mask = str(io.save_nifti(s.mask.astype(np.uint8), s.affine, folder / "mask.nii.gz"))
    return {"series": stepfiles.write_series(dwi, folder, mask),
            "inputs": {"dwi": {"sha256": f"{k:064x}"}}}


def _nodes(tmp_path: Path, shells: list, records: dict, sites: dict) -> tuple:
    """Features, template rounds, registrations and the fit as the engine's nodes."""
    entries = [_in(tmp_path / "features" / s, P.harmonization_features_step, subject=s,
                   record=r, shells=shells, lmax=LMAX) for s, r in records.items()]
    tpl, reg = _register_nodes(tmp_path, entries, sites, "affine")
    fit = _fit_nodes(tmp_path, entries, tpl, reg, shells, "affine", sites=sites)
    return entries, tpl, reg, fit


def _terms(tmp_path: Path, entries, reg, sites, shells=(BVAL,)) -> list[dict]:
    """One FitSubject node per subject, as the engine runs them."""
    return [_in(tmp_path / "fit-subject" / e["subject"], P.fit_subject_step, entry=e,
                shells=list(shells), lmax=LMAX, registered=reg, sites=sites,
                reference_site="siteA", target_site="siteB") for e in entries]


def _fit_nodes(tmp_path: Path, entries, tpl, reg, shells, registration, sites,
               contrast=H.DEFAULT_REGISTRATION_CONTRAST,
               fit_without_transforms: bool = False) -> dict:
    """The fit as the engine runs it: one FitSubject node per subject, then
    FitHarmonization (``fit_without_transforms``: with Transform.load and
    Transform.save failing while it runs)."""
    sides = dict(reference_site="siteA", target_site="siteB")
    terms = _terms(tmp_path, entries, reg, sites, shells)
    with pytest.MonkeyPatch.context() as mp:
        if fit_without_transforms:
            def refuse(*args, **kwargs):
                raise AssertionError("the fit node decoded or encoded a transform")
            mp.setattr(H.Transform, "load", refuse)
            mp.setattr(H.Transform, "save", refuse)
        return _in(tmp_path / "fit", P.fit_harmonization_step, features=entries,
                   shells=shells, lmax=LMAX, template=tpl, registered=reg, terms=terms,
                   registration=registration, sites=sites, contrast=contrast, **sides)


def test_the_fit_node_refuses_a_changed_transform_field(tmp_path):
    """The fit node copies each registration node's SyN field files into the
    artefact, checked against the sha256 the transform's JSON lists: a field
    re-written with one voxel changed (a valid gzip file) is refused, as
    decoding it was."""
    sites, entries = {}, []
    for k, site in enumerate([phantom.SiteEffect(name="siteA")] * N_PER_SITE
                             + [TARGET] * N_PER_SITE):
        f = _features(20 + k % N_PER_SITE, site)
        sites[f.subject] = site.name
        entries.append(_entry(f, tmp_path / "features" / f.subject))
    tpl = _in(tmp_path / "t0", P.template_start_step, features=entries, reference_site="siteA",
              target_site="siteB", sites=sites)
    tpl = {**tpl, "round": H.TEMPLATE_ITERATIONS}       # registered to the first subject
    reg = [_in(tmp_path / "reg" / e["subject"], P.register_subject_step, entry=e, template=tpl,
               register_sites=["siteA", "siteB"], registration="syn", sites=sites)
           for e in entries]
    sides = dict(reference_site="siteA", target_site="siteB", sites=sites)
    terms = [_in(tmp_path / "fit-subject" / e["subject"], P.fit_subject_step, entry=e,
                 shells=[BVAL], lmax=LMAX, registered=reg, **sides) for e in entries]
    field = Path(reg[-1]["transform"] + "_forward.nii.gz")
    img = nib.load(field)
    data = np.asarray(img.dataobj).copy()
    data[tuple(n // 2 for n in data.shape[:3])] += 1.0
    io.save_nifti(data, img.affine, field)
    with pytest.raises(InputError, match="forward displacement field changed"):
        _in(tmp_path / "fit", P.fit_harmonization_step, features=entries, shells=[BVAL],
            lmax=LMAX, template=tpl, registered=reg, terms=terms, registration="syn", **sides)


def _evaluate(tmp_path: Path, entries, reg, fit, sites, name="eval") -> dict:
    after = [_in(tmp_path / f"{name}-after" / e["subject"], P.evaluation_summary_step, entry=e,
                 fit=fit, sites=sites, reference_site="siteA", target_site="siteB", lmax=LMAX,
                 registered=reg)
             for e in entries]
    return _in(tmp_path / name, P.evaluate_fit_step, fit=fit, features=entries, summaries=after,
               sites=sites, reference_site="siteA", target_site="siteB", lmax=LMAX)


def _serial_tables(entries, tpl, reg, sites, shells) -> tuple[str, str]:
    """The evaluation computed serially with the library: every series read
    again, summarised before and (target) harmonised through the fit's own
    transform, all in the reference-defined white matter
    (:func:`H.template_wm_mask` of the reference subjects' warped FA, brought
    to each subject by :func:`H.subject_wm_mask`), one by one."""
    ref = [e for e in entries if sites[e["subject"]] == "siteA"]
    tar = [e for e in entries if sites[e["subject"]] == "siteB"]
    info = {"source": "reference-site mean", "iterations": H.TEMPLATE_ITERATIONS,
            "first_subject": tpl["first_subject"], "registration": "affine"}
    art = H.fit_harmonization([P._loader(e) for e in ref], [P._loader(e) for e in tar], shells,
                              LMAX, reference_site="siteA", target_site="siteB",
                              registration="affine", template=P._template(tpl),
                              template_info=info, registered=P._transforms(reg))
    transforms = P._transforms(reg)
    tpl_wm = H.template_wm_mask([H.warped_fa(P._loader(e)(), transforms[e["subject"]]())
                                 for e in ref], art.template_mask)

    def wm(e, dwi):
        return H.subject_wm_mask(tpl_wm, transforms[e["subject"]](), dwi.mask)

    ref_s = [H.summarise_subject(dwi, LMAX, subject=e["subject"], wm_mask=wm(e, dwi))
             for e in ref for dwi in [load_series(e["record"])]]
    before, after = [], []
    for e in tar:
        dwi = load_series(e["record"])
        before.append(H.summarise_subject(dwi, LMAX, subject=e["subject"], wm_mask=wm(e, dwi)))
        dwi.data, _ = H.apply_harmonization(dwi, None, art, subject=e["subject"],
                                            transform=transforms[e["subject"]](), inplace=True)
        after.append(H.summarise_subject(dwi, LMAX, subject=e["subject"],
                                         wm_mask=before[-1].wm_mask))
    site, pres = H.evaluate_harmonization(ref_s, before, after, LMAX,
                                          wm_mask=H.EVAL_MASK_REFERENCE)
    return tuple(t.to_csv(sep="\t", index=False, na_rep="n/a") for t in (site, pres))


@pytest.fixture(scope="module")
def eval_cohort(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    records, sites = {}, {}
    for k, site in enumerate([phantom.SiteEffect(name="siteA")] * N_PER_SITE
                             + [TARGET] * N_PER_SITE):
        name = f"{site.name}{k % N_PER_SITE}"
        sites[name] = site.name
        # the same anatomies at both sites (travelling subjects)
        records[name] = _record(k % N_PER_SITE, site, tmp / "series" / name)
    return tmp, records, sites


@pytest.mark.parametrize("shells", [[BVAL, 2000.0], [2000.0, BVAL]],
                         ids=["features-rish", "own-rish"])
def test_evaluation_nodes_give_the_serial_tables(eval_cohort, tmp_path, shells):
    """The per-subject summaries (before: in the features node, from its tensor
    and, when it fits every shell in the series' order, its RISH maps, else
    RISH fitted again; after: one node per target subject) combine into the
    TSVs the serial evaluation writes, to the last digit."""
    _, records, sites = eval_cohort
    entries, tpl, reg, fit = _nodes(tmp_path, shells, records, sites)
    result = _evaluate(tmp_path, entries, reg, fit, sites)
    site, pres = _serial_tables(entries, tpl, reg, sites, shells)
    assert Path(result["site_effect"]).read_text() == site
    assert Path(result["preservation"]).read_text() == pres
    assert result["not_evaluated"] == [] and result["content_id"] == fit["content_id"]
    table = pd.read_csv(result["site_effect"], sep="\t")
    assert set(table["shell"].dropna()) == set(EVAL_SHELLS)     # every shell, not the fit's
    assert (table["wm_mask"] == H.EVAL_MASK_REFERENCE).all()
    rish = table[table["metric"] == "rish_l2"]
    assert (rish["d_after"].abs() < rish["d_before"].abs()).all()   # the site effect shrinks
    assert json.loads(json.dumps(entries[0]["summary"])) == entries[0]["summary"]


def test_one_subjects_failed_evaluation_leaves_the_others(eval_cohort, tmp_path):
    """A target subject whose harmonised summary fails (its series gone) is left
    out of the tables only and named; the others are evaluated."""
    _, records, sites = eval_cohort
    entries, _, reg, fit = _nodes(tmp_path, list(EVAL_SHELLS), records, sites)
    broken = next(e for e in entries if sites[e["subject"]] == "siteB")
    moved = {**broken, "record": {**broken["record"], "series": {
        **broken["record"]["series"], "dwi": str(tmp_path / "missing.nii.gz")}}}
    entries = [moved if e is broken else e for e in entries]
    result = _evaluate(tmp_path, entries, reg, fit, sites, name="broken")
    assert [r["subject"] for r in result["not_evaluated"]] == [broken["subject"]]
    table = pd.read_csv(result["site_effect"], sep="\t")
    assert (table["n_tar"] == N_PER_SITE - 1).all() and (table["n_ref"] == N_PER_SITE).all()
    pres = pd.read_csv(result["preservation"], sep="\t")
    assert broken["subject"] not in set(pres["subject"])


def test_fit_subject_refuses_a_changed_features_file(eval_cohort, tmp_path):
    """The fit's nodes read a features node's FA, mask and RISH maps through
    the checked reader (one ISA-L pass: sha256, inflate, CRC32) against the
    sha256 the features node recorded: a RISH map re-written with one voxel
    changed (a valid gzip file) is refused. Python's gzip read it silently
    before. The untouched files read as nibabel reads them."""
    _, records, _ = eval_cohort
    name = next(iter(records))
    entry = _in(tmp_path / "features", P.harmonization_features_step, subject=name,
                record=records[name], shells=[BVAL], lmax=LMAX)
    f = P._loader(entry)()
    assert np.array_equal(f.fa, np.asarray(nib.load(entry["fa"]).dataobj))
    assert np.array_equal(f.affine, nib.load(entry["fa"]).affine)
    assert np.array_equal(f.mask, np.asarray(nib.load(entry["mask"]).dataobj) > 0)
    rish = entry["rish"][f"{BVAL:g}"]
    img = nib.load(rish)
    assert np.array_equal(f.rish[BVAL], np.asarray(img.dataobj))
    data = np.asarray(img.dataobj).copy()
    data[tuple(n // 2 for n in data.shape[:3]) + (1,)] *= 2
    io.save_nifti(data, img.affine, rish)
    with pytest.raises(InputError, match="changed since it was written"):
        P._loader(entry)()


def _change_one_voxel(path: str) -> None:
    """``path`` re-written (a valid NIfTI) with one voxel changed."""
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    idx = tuple(int(i[0]) for i in np.nonzero(data))        # a voxel inside (masks: a 1)
    data[idx] = 0
    io.save_nifti(data, img.affine, path)


@pytest.mark.parametrize("which", ["wm_mask", "fa_harmonised", "fa_reference"])
def test_evaluation_leaves_out_a_subject_whose_file_changed(eval_cohort, tmp_path, which):
    """The evaluation reads every map it uses (white-matter mask, FA before and
    after, brain mask) checked against the sha256 the node that wrote it
    recorded: one subject's file changed in the cache (here a target
    subject's white-matter mask or harmonised FA, or a reference subject's
    FA) leaves that subject out, named with the file, and the others are
    evaluated; nibabel read the changed file silently before."""
    _, records, sites = eval_cohort
    entries, _, reg, fit = _nodes(tmp_path, list(EVAL_SHELLS), records, sites)
    after = [_in(tmp_path / "after" / e["subject"], P.evaluation_summary_step, entry=e,
                 fit=fit, sites=sites, reference_site="siteA", target_site="siteB", lmax=LMAX,
                 registered=reg)
             for e in entries]
    site = "siteA" if which == "fa_reference" else "siteB"
    k = next(i for i, e in enumerate(entries) if sites[e["subject"]] == site)
    path = {"wm_mask": after[k]["summary"]["wm_mask"], "fa_reference": entries[k]["fa"],
            "fa_harmonised": (after[k]["summary"] or {}).get("fa")}[which]
    _change_one_voxel(path)
    result = _in(tmp_path / "eval", P.evaluate_fit_step, fit=fit, features=entries,
                 summaries=after, sites=sites, reference_site="siteA", target_site="siteB",
                 lmax=LMAX)
    assert [r["subject"] for r in result["not_evaluated"]] == [entries[k]["subject"]]
    assert f"{path}: " in result["not_evaluated"][0]["error"]
    assert "changed since it was written" in result["not_evaluated"][0]["error"]
    table = pd.read_csv(result["site_effect"], sep="\t")
    n_ref, n_tar = (N_PER_SITE - 1, N_PER_SITE) if site == "siteA" else (N_PER_SITE, N_PER_SITE - 1)
    assert (table["n_ref"] == n_ref).all() and (table["n_tar"] == n_tar).all()


def test_registration_refuses_a_changed_template(eval_cohort, tmp_path):
    """A template node's image is read checked against the sha256 it recorded:
    a template changed in the cache is refused by the registration nodes
    (one voxel: a valid NIfTI, which nibabel read silently before)."""
    _, records, sites = eval_cohort
    entries, tpl, _, _ = _nodes(tmp_path, [BVAL], records, sites)
    img, affine = P._template(tpl)
    assert np.array_equal(img, np.asarray(nib.load(tpl["fa"]).dataobj))
    assert np.array_equal(affine, nib.load(tpl["fa"]).affine)
    _change_one_voxel(tpl["fa"])
    with pytest.raises(InputError, match="template file changed since it was written"):
        _in(tmp_path / "reg-bad", P.register_subject_step, entry=entries[-1], template=tpl,
            register_sites=["siteA", "siteB"], registration="affine", sites=sites)


def _arrays(folder: Path) -> dict:
    """The voxel bytes of every NIfTI under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): np.asanyarray(nib.load(p).dataobj).tobytes()
            for p in sorted(folder.rglob("*.nii.gz"))}


def test_fit_from_mask_rows_equals_fit_from_the_grid(eval_cohort, tmp_path):
    """The fit's features and harmonised summaries read a series Validate kept
    as mask rows (the default with no series step) exactly as one it kept
    whole (its uncompressed copy, the path before): the same features and
    summary maps, artefact (content id and files) and evaluation TSVs, byte
    for byte."""
    _, records, sites = eval_cohort
    runs = {}
    for rows_only in (False, True):
        root = tmp_path / ("rows" if rows_only else "grid")
        validated = {}
        for name, r in records.items():
            (root / "validate" / name).mkdir(parents=True)
            s = r["series"]
            validated[name] = stepfiles.validate_subject(
                name, s["dwi"], s["bval"], s["bvec"], s["mask"],
                out_dir=root / "validate" / name, rows_only=rows_only)
            assert ("rows" in validated[name]["series"]) == rows_only
        entries, _, reg, fit = _nodes(root, list(EVAL_SHELLS), validated, sites)
        result = _evaluate(root, entries, reg, fit, sites)
        assert not result["not_evaluated"]
        runs[rows_only] = {
            "content_id": fit["content_id"],
            "maps": {k: v for k, v in _arrays(root).items() if not k.startswith("validate")},
            "tables": [Path(result[k]).read_text() for k in ("site_effect", "preservation")]}
    grid, rows = runs[False], runs[True]
    assert any(k.startswith("eval-after") for k in grid["maps"])   # summaries after were run
    assert grid["content_id"] == rows["content_id"]
    assert grid["maps"].keys() == rows["maps"].keys()
    for key in grid["maps"]:
        assert grid["maps"][key] == rows["maps"][key], key
    assert grid["tables"] == rows["tables"]


def _tamper_voxel(folder: Path) -> None:
    """One voxel of a scale map changed (the file re-written, the JSON left)."""
    scale = next(folder.glob("scale_b*.nii.gz"))
    img = nib.load(scale)
    data = np.asarray(img.dataobj).copy()
    data[data.shape[0] // 2, data.shape[1] // 2, data.shape[2] // 2, 1] *= 2
    io.save_nifti(data, img.affine, scale)


def _tamper_cut(folder: Path) -> None:
    """A scale map cut short (half-written)."""
    scale = next(folder.glob("scale_b*.nii.gz"))
    raw = scale.read_bytes()
    scale.write_bytes(raw[:len(raw) // 2])


def _tamper_relisted(folder: Path) -> None:
    """A changed scale map whose new sha256 is listed in the JSON (the content id left)."""
    _tamper_voxel(folder)
    meta = json.loads((folder / H.ARTEFACT_JSON).read_text())
    for entry in meta["files"].values():
        entry["sha256"] = io.file_sha256(folder / entry["file"])
    (folder / H.ARTEFACT_JSON).write_text(json.dumps(meta))


@pytest.mark.parametrize("tamper", [_tamper_voxel, _tamper_cut, _tamper_relisted],
                         ids=["voxel", "cut", "relisted"])
def test_evaluation_summary_refuses_a_changed_artefact(eval_cohort, tmp_path, tamper):
    """The summary nodes read the artefact with the fingerprint the fit handed
    on (its JSON's sha256) instead of recomputing the content id: a changed,
    cut or consistently re-listed scale map still fails the subject, and the
    untouched artefact gives the fit's content id."""
    _, records, sites = eval_cohort
    entries, _, reg, fit = _nodes(tmp_path, list(EVAL_SHELLS), records, sites)
    assert H.HarmonizationArtefact.load(fit["artefact"], fingerprint=fit["fingerprint"]
                                        ).content_id == fit["content_id"]
    target = next(e for e in entries if sites[e["subject"]] == "siteB")
    kw = dict(entry=target, sites=sites, reference_site="siteA", target_site="siteB", lmax=LMAX,
              registered=reg)
    ok = _in(tmp_path / "after-ok", P.evaluation_summary_step, fit=fit, **kw)
    assert ok["status"] == "ok" and ok["summary"]["after"], ok.get("traceback")
    changed = tmp_path / "changed"
    shutil.copytree(fit["artefact"], changed)
    tamper(changed)
    bad = _in(tmp_path / "after-bad", P.evaluation_summary_step,
              fit={**fit, "artefact": str(changed)}, **kw)
    assert bad["status"] == "failed" and "sha256 mismatch" in bad["error"]
