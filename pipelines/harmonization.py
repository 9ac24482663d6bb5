"""RISH harmonization in the engine: per-subject features, the fit, and apply.

``harmonize fit`` maps a features node (FA + per-shell RISH) over subjects in
parallel, builds the FA template in rounds (each round: every reference
subject registered as its own node, then one node averages them), registers
every subject to the final template as its own node (cached per subject,
parallel under the workers), warps each subject's RISH to the template as its
own node, then one node sums them per site into the scale maps and stores the
artefact, and the evaluation (site effect before/after on the fitting cohort)
summarises each subject as its own node (a target subject harmonised too) in
white matter defined once in template space from the reference site
(``EVAL_MASKS``), brought to the subject through its registration. The
per-subject apply step (``dmriflow run --harmonization``, ``dmriflow
harmonize apply``) is the registered step
:mod:`dmriflow.interfaces.steps.harmonize`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydra.compose import python, workflow

from dmriflow.interfaces import io
from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.gradients import read_gradients
from dmriflow.interfaces.harmonize import (DEFAULT_REGISTRATION_CONTRAST, EVAL_MASK_REFERENCE,
                                           RISH_CONTRAST_ORDERS,
                                           TEMPLATE_ITERATIONS, HarmonizationArtefact,
                                           HarmonizationError, SavedTransform,
                                           SubjectFeatures, SubjectSummary, SubjectTerms,
                                           Transform, apply_harmonization, artefact_fingerprint,
                                           check_site_sizes, dti_tensor, evaluate_harmonization,
                                           fit_from_terms, read_checked_image, register_fa,
                                           registration_image, rish_maps, subject_features,
                                           subject_terms, subject_wm_mask, summarise_subject,
                                           summary_values, template_mean, template_wm_mask,
                                           warped_fa, with_values)
from dmriflow.interfaces.io import file_sha256
from dmriflow.interfaces.sh import max_order_for
from dmriflow.pipelines.progress import PROGRESS
from dmriflow.pipelines.steps import FAILED_MARKER, STEP_MARKER, Subject, guarded, load_series
from dmriflow.pipelines.workflows import add_series_steps, enabled

#: Default highest SH order harmonised (as the shells' directions allow).
DEFAULT_HARMONIZATION_LMAX = 8
#: Step marker of the FitSubject nodes (``--drop-series`` deletes their terms).
FIT_SUBJECT_STEP = "harmonize-fit-subject"


def _save(arr, affine, name: str) -> str:
    return str(io.save_nifti(np.asarray(arr), affine, Path.cwd() / name).resolve())


def _hashed(files: dict) -> dict:
    """``files`` (name -> path, or name -> {key: path}) with ``files_sha256``
    (path -> sha256) added: the nodes that read them check each
    (:func:`_read`)."""
    paths = [q for v in files.values() for q in (v.values() if isinstance(v, dict) else [v])]
    return {**files, "files_sha256": {q: file_sha256(q) for q in paths}}


def _read(record: dict, path: str, what: str, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A map a node of this workflow wrote (array, affine), read in one ISA-L
    pass and checked against the sha256 ``record`` lists for it
    (:func:`_hashed`; :func:`~dmriflow.interfaces.harmonize.read_checked_image`):
    a cached file changed since is refused, naming it."""
    return read_checked_image(Path(path), record["files_sha256"][path], what, dtype)


@guarded("features")
def harmonization_features_step(subject: str, record: dict, shells: list, lmax: int,
                                pipeline_version: str = "") -> dict:
    """FA and per-shell RISH maps of one subject, as files, for the fit; and
    the maps its evaluation before harmonization averages once its white
    matter is known (:func:`evaluation_summary_step`): MD and the RISH of
    every shell, from the same tensor fit and, when the fit uses every shell,
    the same RISH files."""
    data = load_series(record)
    hashes = {k: v["sha256"] for k, v in record["inputs"].items()}
    tensor = dti_tensor(data)
    f = subject_features(data, subject, lmax, shells=shells, fa=tensor.fa, sha256=hashes)
    files = feature_files(f)
    every_shell = [float(b) for b in f.rish] == [float(b) for b in data.gtab.shells]
    rish = files["rish"] if every_shell else {
        f"{b:g}": _save(r.astype(np.float32, copy=False), f.affine, f"summary_rish_b{b:g}.nii.gz")
        for b, r in rish_maps(data, lmax).items()}
    summary = _hashed({"md": _save(tensor.md.astype(np.float32, copy=False), f.affine,
                                   "md.nii.gz"), "rish": rish})
    return {"subject": subject, "status": "ok", "sha256": hashes, "record": record,
            **files, "summary": summary}


def feature_files(f: SubjectFeatures) -> dict:
    """A subject's FA, mask and RISH maps saved in the cwd: their paths
    (``fa``, ``mask``, ``rish``) and each file's sha256 (``files_sha256``),
    which the nodes that read them check (:func:`_loader`)."""
    return _hashed({"fa": _save(f.fa.astype(np.float32, copy=False), f.affine, "fa.nii.gz"),
                    "mask": _save(f.mask.astype(np.uint8), f.affine, "mask.nii.gz"),
                    "rish": {f"{b:g}": _save(r.astype(np.float32, copy=False), f.affine,
                                             f"rish_b{b:g}.nii.gz")
                             for b, r in f.rish.items()}})


HarmonizationFeatures = python.define(harmonization_features_step,
                                      outputs=["features"], name="HarmonizationFeatures")


def _loader(entry: dict, rish: bool = True):
    """A callable returning the SubjectFeatures of a features record (lazy load);
    without the RISH maps unless ``rish`` (registering through FA reads none
    of them: an HCP subject's are 0.2 GB inflated per load). Each file is read
    in one ISA-L pass that checks it against the sha256 its features node
    recorded (:func:`_read`)."""
    def read(path: str, what: str, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        return _read(entry, path, f"{entry['subject']} {what}", dtype)

    def load():
        fa, affine = read(entry["fa"], "FA")
        return SubjectFeatures(
            subject=entry["subject"], fa=fa, affine=affine,
            mask=read(entry["mask"], "mask", np.uint8)[0] > 0,
            rish={float(b): read(p, f"RISH b={b}")[0]
                  for b, p in entry["rish"].items()} if rish else {},
            sha256=entry["sha256"])
    return load


def _image_loader(entry: dict, contrast: str):
    """:func:`_loader` with the RISH maps only when ``contrast`` is made of them."""
    return _loader(entry, rish=contrast in RISH_CONTRAST_ORDERS)


def _site(features: list[dict], sites: dict, site: str) -> list[dict]:
    """The features records of one site whose features succeeded, in order."""
    return [f for f in features if f.get("status") == "ok" and sites.get(f["subject"]) == site]


def _template(template: dict) -> tuple[np.ndarray, np.ndarray]:
    """A template node's image and affine, checked (:func:`_read`). C-ordered,
    as the serial fit's mean is: dipy's registration sums in memory order,
    so the layout changes its last bits."""
    img, affine = _read(template, template["fa"], "template")
    return np.ascontiguousarray(img), affine


def _transforms(registered: list[dict], saved: bool = False) -> dict:
    """``{subject: callable loading its Transform}`` of the registration nodes;
    ``saved``: its :class:`SavedTransform` instead (its files, copied into
    the artefact without decoding the SyN fields)."""
    load = SavedTransform if saved else Transform.load
    return {r["subject"]: (lambda p=r["transform"]: load(Path(p)))
            for r in registered if r.get("transform")}


def template_start_step(features: list[dict], sites: dict, reference_site: str,
                        target_site: str, shells: list | None = None,
                        contrast: str = DEFAULT_REGISTRATION_CONTRAST,
                        pipeline_version: str = "") -> dict:
    """Round 0 of the template: the first reference subject's registration
    image (``contrast`` of ``shells``)."""
    ref = _site(features, sites, reference_site)
    check_site_sizes({reference_site: len(ref),
                      target_site: len(_site(features, sites, target_site))})
    first = _image_loader(ref[0], contrast)()
    return {**_hashed({"fa": _save(registration_image(first, contrast, shells), first.affine,
                                   "template_fa.nii.gz")}),
            "round": 0, "first_subject": first.subject}


TemplateStart = python.define(template_start_step, outputs=["template"], name="TemplateStart")


def register_subject_step(entry: dict, template: dict, sites: dict, register_sites: list,
                          registration: str = "syn", shells: list | None = None,
                          contrast: str = DEFAULT_REGISTRATION_CONTRAST,
                          match_resolution: str | None = None,
                          pipeline_version: str = "") -> dict:
    """Register one subject's registration image (``contrast`` of ``shells``)
    to the template (one node per subject); ``match_resolution``: the rule
    of :func:`register_fa` (None: off), an input, so part of the node's
    cache key.

    Subjects outside ``register_sites``, failed ones and, in the first
    template round, the first reference subject (the template itself) pass
    with no transform.
    """
    out = {"subject": entry["subject"], "transform": None}
    if (entry.get("status") != "ok" or sites.get(entry["subject"]) not in register_sites
            or (template["round"] == 0 and entry["subject"] == template["first_subject"])):
        return out
    f = _image_loader(entry, contrast)()
    tpl_fa, tpl_affine = _template(template)
    prefix = Path.cwd() / "transform"
    register_fa(registration_image(f, contrast, shells), f.affine, tpl_fa, tpl_affine,
                registration, match_resolution=match_resolution).save(prefix)
    return {**out, "transform": str(prefix.resolve())}


RegisterSubject = python.define(register_subject_step, outputs=["registered"],
                                name="RegisterSubject")


def template_mean_step(features: list[dict], sites: dict, reference_site: str, template: dict,
                       registered: list[dict], shells: list | None = None,
                       contrast: str = DEFAULT_REGISTRATION_CONTRAST,
                       pipeline_version: str = "") -> dict:
    """One template round: the mean of the registered reference subjects'
    registration images."""
    tpl_fa, tpl_affine = _template(template)
    transforms = _transforms(registered)
    mean = template_mean([_image_loader(f, contrast)
                          for f in _site(features, sites, reference_site)],
                         tpl_fa.shape, lambda f, fa: transforms[f.subject](),
                         first_round=template["round"] == 0,
                         image=lambda f: registration_image(f, contrast, shells))
    return {**_hashed({"fa": _save(mean, tpl_affine, "template_fa.nii.gz")}),
            "round": template["round"] + 1, "first_subject": template["first_subject"]}


TemplateMean = python.define(template_mean_step, outputs=["template"], name="TemplateMean")


def fit_subject_step(entry: dict, sites: dict, reference_site: str, target_site: str,
                     shells: list, lmax: int, registered: list[dict],
                     pipeline_version: str = "") -> dict:
    """One subject's share of the fit (one node per subject, in parallel): its
    RISH and mask warped to the template through the transform its
    registration node computed (:func:`subject_terms`), saved for the final
    :func:`fit_harmonization_step`. Subjects of neither site and failed ones
    pass with no terms."""
    out = {"subject": entry["subject"], "terms": None}
    site = sites.get(entry["subject"])
    if entry.get("status") != "ok" or site not in (reference_site, target_site):
        return out
    Path(STEP_MARKER).write_text(FIT_SUBJECT_STEP)
    transform = _transforms(registered)[entry["subject"]]()
    f = _loader(entry)()
    terms = subject_terms(f, transform, shells, lmax, site)
    if site == reference_site:      # its share of the evaluation's white matter
        return {**out, "terms": terms.save(Path.cwd()), **_hashed(
            {"fa_template": _save(warped_fa(f, transform), transform.template_affine,
                                  "fa_template.nii.gz")})}
    return {**out, "terms": terms.save(Path.cwd())}


FitSubject = python.define(fit_subject_step, outputs=["terms"], name="FitSubject")


def fit_harmonization_step(features: list[dict], sites: dict, reference_site: str, target_site: str,
                           shells: list, lmax: int, template: dict, registered: list[dict],
                           terms: list[dict], registration: str = "syn",
                           smoothing_fwhm_mm: float = 0.0,
                           contrast: str = DEFAULT_REGISTRATION_CONTRAST,
                           match_resolution: str | None = None,
                           pipeline_version: str = "") -> dict:
    """Fit the artefact on the subjects whose features succeeded: their
    :func:`fit_subject_step` terms summed per site in the serial fit's order
    (:func:`fit_from_terms`), the scale maps, and the artefact written and
    verified once (evaluated by :func:`evaluation_summary_step` and
    :func:`evaluate_fit_step`). ``match_resolution``: the registration
    nodes' rule, recorded in the artefact (``registration_options``) so
    apply registers with it."""
    Path(STEP_MARKER).write_text("harmonize-fit")
    excluded = [{"subject": f["subject"], "error": f.get("error", "")}
                for f in features if f.get("status") != "ok"]
    if excluded:
        Path(FAILED_MARKER).write_text("harmonize-fit")
    ref = _site(features, sites, reference_site)
    tar = _site(features, sites, target_site)
    saved = {t["subject"]: t["terms"] for t in terms if t.get("terms")}
    info = {"source": "reference-site mean", "iterations": int(template["round"]),
            "first_subject": template["first_subject"], "registration": registration}
    artefact = fit_from_terms([lambda f=f: SubjectTerms.load(saved[f["subject"]]) for f in ref],
                              [lambda f=f: SubjectTerms.load(saved[f["subject"]]) for f in tar],
                              shells, lmax, template=_template(template), template_info=info,
                              transforms=_transforms(registered, saved=True),
                              reference_site=reference_site,
                              target_site=target_site, registration=registration,
                              smoothing_fwhm_mm=smoothing_fwhm_mm,
                              registration_contrast=contrast,
                              registration_options={"match_resolution": match_resolution})
    folder = artefact.save(Path.cwd() / "artefact")
    by_subject = {t["subject"]: t for t in terms}
    wm = template_wm_mask([lambda t=by_subject[f["subject"]]: _read(
        t, t["fa_template"], f"{t['subject']} FA on the template")[0] for f in ref],
        artefact.template_mask)
    return {"artefact": str(folder.resolve()), "content_id": artefact.content_id,
            "fingerprint": artefact_fingerprint(folder),
            "n_reference": len(ref), "n_target": len(tar), "excluded": excluded,
            **_hashed({"evaluation_wm": _save(wm.astype(np.uint8), artefact.template_affine,
                                              "evaluation_wm.nii.gz")})}


FitHarmonization = python.define(fit_harmonization_step,
                                 outputs=["result"], name="FitHarmonization")


def evaluation_summary_step(entry: dict, fit: dict, sites: dict, reference_site: str,
                            target_site: str, lmax: int, registered: list[dict],
                            pipeline_version: str = "") -> dict:
    """The evaluation of one subject of either site (one node per subject): its
    white matter, the fit's template-space one from the reference site
    (:func:`~dmriflow.interfaces.harmonize.template_wm_mask`) brought to its
    grid through the transform its registration node computed for the fit
    (:func:`~dmriflow.interfaces.harmonize.subject_wm_mask`), the means of
    its features' maps there (before), and for a target subject its series
    harmonised with the fitted artefact through the same transform (no
    second registration) and summarised in the same white matter (after).

    Other subjects and failed ones pass with no summary; a subject that fails
    is left out of the evaluation only.
    """
    site = sites.get(entry["subject"])
    if entry.get("status") != "ok" or site not in (reference_site, target_site):
        return {"subject": entry["subject"], "status": "ok", "summary": None}
    own = _transforms(registered).get(entry["subject"])
    return _evaluation_summary(subject=entry["subject"], entry=entry, fit=fit,
                               transform=None if own is None else own(), lmax=lmax,
                               harmonise=site == target_site)


@guarded("harmonize-evaluate")
def _evaluation_summary(subject: str, entry: dict, fit: dict, transform, lmax: int,
                        harmonise: bool) -> dict:
    """One subject summarised in the reference-defined white matter (every
    file checked, :func:`_read`), harmonised first when ``harmonise``; the
    artefact read as the fit wrote it (its fingerprint: its JSON's sha256, so
    every file is checked against the hashes the fit listed and the content
    id is the fit's). An empty white matter is recorded as the subject's
    error (left out of the evaluation only)."""
    if transform is None:
        raise HarmonizationError(f"{subject}: no registration to the template to bring the "
                                 f"evaluation's white matter to")
    tpl_wm = _read(fit, fit["evaluation_wm"], "evaluation white matter (template)",
                   np.uint8)[0] > 0
    mask, affine = _read(entry, entry["mask"], f"{subject} mask", np.uint8)
    wm = subject_wm_mask(tpl_wm, transform, mask > 0)
    maps = entry["summary"]
    fa = _read(entry, entry["fa"], f"{subject} FA")[0]
    try:
        before = summary_values(
            fa, _read(maps, maps["md"], f"{subject} MD")[0],
            {float(b): _read(maps, p, f"{subject} RISH b={b}")[0]
             for b, p in maps["rish"].items()}, wm, lmax, subject=subject)
    except HarmonizationError as exc:
        return {"subject": subject, "status": "ok",
                "summary": {"error": f"{type(exc).__name__}: {exc}"}}
    files = {"wm_mask": _save(wm.astype(np.uint8), affine, "wm_mask.nii.gz")}
    summary = {"before": SubjectSummary.record_of(before), "after": None}
    if harmonise:
        dwi = load_series(entry["record"])
        art = HarmonizationArtefact.load(fit["artefact"], fingerprint=fit["fingerprint"])
        dwi = with_values(dwi, apply_harmonization(dwi, None, art, subject=subject,
                                                   transform=transform, inplace=True)[0])
        s = summarise_subject(dwi, lmax, subject=subject, wm_mask=wm)
        summary["after"] = s.values_record()
        files["fa"] = _save(s.fa.astype(np.float32, copy=False), dwi.affine,
                            "fa_harmonised.nii.gz")
    return {"subject": subject, "status": "ok", "summary": {**summary, **_hashed(files)}}


EvaluationSummary = python.define(evaluation_summary_step, outputs=["summary"],
                                  name="EvaluationSummary")


def _subject_summaries(entry: dict, summary: dict) -> list[SubjectSummary]:
    """A subject's :class:`SubjectSummary` before (and, for a target subject,
    after) from its features record and its evaluation summary; every file
    checked (:func:`_read`)."""
    name = entry["subject"]
    mask = _read(entry, entry["mask"], f"{name} mask", np.uint8)[0] > 0
    wm = _read(summary, summary["wm_mask"], f"{name} white-matter mask", np.uint8)[0] > 0
    out = [SubjectSummary(name, _read(entry, entry["fa"], f"{name} FA")[0], mask, wm,
                          SubjectSummary.values_from_record(summary["before"]))]
    if summary.get("after") is not None:
        out.append(SubjectSummary(name, _read(summary, summary["fa"], f"{name} FA")[0], mask,
                                  wm, SubjectSummary.values_from_record(summary["after"])))
    return out


def evaluate_fit_step(fit: dict, features: list[dict], summaries: list[dict], sites: dict,
                      reference_site: str, target_site: str, lmax: int,
                      pipeline_version: str = "") -> dict:
    """Site effect before/after and anatomy preservation on the fitting cohort
    (:func:`evaluate_harmonization` of the per-subject summaries, every
    subject in the reference-defined white matter: ``wm_mask`` column
    "reference-template"): the two TSVs, added to the fit's result with the
    subjects left out of them."""
    Path(STEP_MARKER).write_text("harmonize-evaluate")
    evaluated = {s["subject"]: s for s in summaries}
    not_evaluated = []

    def summaries_of(entry: dict) -> list[SubjectSummary] | None:
        """The subject's summaries (before, and after for a target subject), or
        None - it is left out, named - when its evaluation failed or a file
        it lists fails its check."""
        node = evaluated.get(entry["subject"]) or {}
        summary = node.get("summary") or {}
        error = node.get("error") if node.get("status") == "failed" else summary.get("error")
        if error or "before" not in summary:
            not_evaluated.append({"subject": entry["subject"],
                                  "error": error or "no evaluation summary"})
            return None
        try:
            return _subject_summaries(entry, summary)
        except InputError as exc:
            not_evaluated.append({"subject": entry["subject"],
                                  "error": f"{type(exc).__name__}: {exc}"})
            return None

    ref = [s[0] for f in _site(features, sites, reference_site)
           if (s := summaries_of(f)) is not None]
    tar = [s for f in _site(features, sites, target_site)
           if (s := summaries_of(f)) is not None]
    if not_evaluated:
        Path(FAILED_MARKER).write_text("harmonize-evaluate")
    site_table, preservation = evaluate_harmonization(ref, [s[0] for s in tar],
                                                      [s[1] for s in tar], lmax,
                                                      wm_mask=EVAL_MASK_REFERENCE)
    site_tsv = Path.cwd() / "harmonization_site_effect.tsv"
    pres_tsv = Path.cwd() / "harmonization_preservation.tsv"
    io.write_text(site_table.to_csv(sep="\t", index=False, na_rep="n/a"), site_tsv)
    io.write_text(preservation.to_csv(sep="\t", index=False, na_rep="n/a"), pres_tsv)
    return {**fit, "site_effect": str(site_tsv), "preservation": str(pres_tsv),
            "not_evaluated": not_evaluated}


EvaluateFit = python.define(evaluate_fit_step, outputs=["result"], name="EvaluateFit")


def features_workflow(subject: Subject, options: dict, shells: list | None = None,
                      lmax: int = DEFAULT_HARMONIZATION_LMAX,
                      pipeline_version: str = "") -> dict:
    """Validate -> [Preprocess] -> features of one subject (``options`` without
    an artefact to apply: the fit reads the series as acquired). The features
    and the summaries read mask voxels only, so with no series step Validate
    keeps only the mask rows (:func:`~dmriflow.interfaces.io.load_dwi_rows`):
    the nodes map a third of the grid instead of reading the whole of it."""
    record = add_series_steps(subject, options, pipeline_version,
                              rows_only=not enabled(options, ("series",)))
    return workflow.add(HarmonizationFeatures(subject=subject.key, record=record, shells=shells,
                                              lmax=lmax, pipeline_version=pipeline_version),
                        hooks=PROGRESS).features


FeaturesWorkflow = workflow.define(features_workflow,
                                   outputs=["features"], name="FeaturesWorkflow")


def harmonization_fit_workflow(subjects: list[Subject], options: dict, sites: dict,
                               reference_site: str, target_site: str, shells: list,
                               lmax: int = DEFAULT_HARMONIZATION_LMAX, registration: str = "syn",
                               smoothing_fwhm_mm: float = 0.0,
                               contrast: str = DEFAULT_REGISTRATION_CONTRAST,
                               match_resolution: str | None = None,
                               pipeline_version: str = "") -> dict:
    per = FeaturesWorkflow(options=options, shells=shells, lmax=lmax,
                           pipeline_version=pipeline_version)
    feats = workflow.add(per.split("subject", subject=subjects).combine("subject"),
                         name="features")
    common = dict(sites=sites, pipeline_version=pipeline_version)
    image = dict(shells=shells, contrast=contrast)       # what is registered
    how = dict(registration=registration, match_resolution=match_resolution)
    tpl = workflow.add(TemplateStart(features=feats.features, reference_site=reference_site,
                                     target_site=target_site, **image, **common),
                       name="template_0")
    for r in range(1, TEMPLATE_ITERATIONS + 1):
        reg = workflow.add(RegisterSubject(template=tpl.template, register_sites=[reference_site],
                                           **how, **image, **common)
                           .split("entry", entry=feats.features).combine("entry"),
                           name=f"register_template_{r}")
        tpl = workflow.add(TemplateMean(features=feats.features, reference_site=reference_site,
                                        template=tpl.template, registered=reg.registered,
                                        **image, **common), name=f"template_{r}")
    reg = workflow.add(RegisterSubject(template=tpl.template,
                                       register_sites=[reference_site, target_site],
                                       **how, **image, **common)
                       .split("entry", entry=feats.features).combine("entry"), name="register")
    sides = dict(reference_site=reference_site, target_site=target_site)
    terms = workflow.add(FitSubject(registered=reg.registered, shells=shells, lmax=lmax,
                                    **sides, **common)
                         .split("entry", entry=feats.features).combine("entry"),
                         name="fit_subject")
    fit = workflow.add(FitHarmonization(features=feats.features, sites=sites, **sides,
                                        shells=shells, lmax=lmax, registration=registration,
                                        template=tpl.template, registered=reg.registered,
                                        terms=terms.terms,
                                        smoothing_fwhm_mm=smoothing_fwhm_mm, contrast=contrast,
                                        match_resolution=match_resolution,
                                        pipeline_version=pipeline_version), hooks=PROGRESS)
    after = workflow.add(EvaluationSummary(fit=fit.result, lmax=lmax, registered=reg.registered,
                                           **sides, **common)
                         .split("entry", entry=feats.features).combine("entry"),
                         name="evaluation_summary")
    evaluation = workflow.add(EvaluateFit(fit=fit.result, features=feats.features,
                                          summaries=after.summary, sites=sites,
                                          reference_site=reference_site, target_site=target_site,
                                          lmax=lmax, pipeline_version=pipeline_version),
                              hooks=PROGRESS)
    return evaluation.result


HarmonizationFitWorkflow = workflow.define(harmonization_fit_workflow,
                                           outputs=["result"], name="HarmonizationFitWorkflow")


def common_shells_and_lmax(subjects, lmax: int | None = None) -> tuple[list[float], int]:
    """Shells every subject has, and the highest even order all of them support."""
    shells, orders = None, []
    for s in subjects:
        gtab = read_gradients(s.bval, s.bvec)
        shells = set(gtab.shells) if shells is None else shells & set(gtab.shells)
        orders += [max_order_for(n) for n in gtab.directions_per_shell().values()]
    if not shells:
        raise ValueError("the subjects share no diffusion-weighted shell")
    supported = min(min(orders), DEFAULT_HARMONIZATION_LMAX)
    if lmax is not None and lmax > supported:
        raise ValueError(f"lmax {lmax} needs more directions than the shells have "
                         f"(they support lmax {supported})")
    return sorted(shells), lmax or supported

