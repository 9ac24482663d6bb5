"""The methods text of a run (as QSIPrep's citation boilerplate): what was
done, with which settings, software versions and references.

Written to ``OUTPUT/dmriflow/logs/methods.md`` by every run and shown in the
report. Nothing in it is listed by hand: the steps are those of the run's
:class:`~dmriflow.pipelines.execution.RunConfig` that are enabled (subject
steps from the step registry, then the cohort steps of ``run``), each
described by its module's first docstring line, with every option it declares
(its help text, its value, and whether the run changed it from the default).
References are attached to a step, an option that is on, or an option's value
(:data:`REFERENCES`, whose keys name registered steps and options: a test
checks them); only those of what ran are printed. Paths among the option
values are named as OUTPUT records them (:func:`external_path`), never absolute.
"""

from __future__ import annotations

import dataclasses
import html
import os
import re
import sys
import time
from importlib import metadata
from pathlib import Path

from dmriflow.interfaces import __version__, io
from dmriflow.interfaces import steps as steps_package
from dmriflow.interfaces.steps import (COHORT_REGISTRY, REGISTRY, STEP_MODULES, cohort_steps,
                                       fit_reads)
from dmriflow.interfaces.steps.base import field_default, flag_of, options_of
from dmriflow.interfaces.steps.harmonization_fit import COMMAND as FIT_STEP_COMMAND
from dmriflow.pipelines.derivatives import PACKAGE_URI, external_path

#: The file, under OUTPUT/dmriflow/logs: a run's, and ``dmriflow harmonize fit``'s
#: (its own, so a fit and a run on one OUTPUT keep both).
METHODS_FILE = "methods.md"
FIT_COMMAND = FIT_STEP_COMMAND
METHODS_FILES = {"run": METHODS_FILE, FIT_COMMAND: "methods-harmonize-fit.md"}
#: Software whose version the text states (the numerics and the engine).
METHODS_PACKAGES = ("dipy", "nibabel", "numpy", "scipy", "pydra", "torch")

DIPY = ("Garyfallidis E, Brett M, Amirbekian B, Rokem A, van der Walt S, Descoteaux M, "
        "Nimmo-Smith I; Dipy Contributors (2014). DIPY, a library for the analysis of diffusion "
        "MRI data. Front Neuroinform 8:8. doi:10.3389/fninf.2014.00008")
NIBABEL = "Brett M, Markiewicz CJ, Hanke M, et al. nibabel. doi:10.5281/zenodo.591597"
PYDRA = ("Jarecka D, Goncalves M, Markiewicz CJ, Esteban O, Lo N, Kaczmarzyk J, Ghosh S "
         "(2020). Pydra - a flexible and lightweight dataflow engine for scientific analyses. "
         "Proc 19th Python in Science Conf (SciPy 2020):132-139. "
         "doi:10.25080/Majora-342d178e-012")
MEDIAN_OTSU = ("Garyfallidis E, Brett M, Correia MM, Williams GB, Nimmo-Smith I (2012). "
               "Quickbundles, a method for tractography simplification. Front Neurosci 6:175 "
               "(median-Otsu brain mask). doi:10.3389/fnins.2012.00175")
MPPCA = ("Veraart J, Novikov DS, Christiaens D, Ades-aron B, Sijbers J, Fieremans E (2016). "
         "Denoising of diffusion MRI using random matrix theory. NeuroImage 142:394-406. "
         "doi:10.1016/j.neuroimage.2016.08.016")
GIBBS = ("Kellner E, Dhital B, Kiselev VG, Reisert M (2016). Gibbs-ringing artifact removal "
         "based on local subvoxel-shifts. Magn Reson Med 76:1574-1581. doi:10.1002/mrm.26054")
BVEC_ROTATION = ("Leemans A, Jones DK (2009). The B-matrix must be rotated when correcting "
                 "for subject motion in DTI data. Magn Reson Med 61:1336-1349. "
                 "doi:10.1002/mrm.21890")
FD = ("Power JD, Barnes KA, Snyder AZ, Schlaggar BL, Petersen SE (2012). Spurious but "
      "systematic correlations in functional connectivity MRI networks arise from subject "
      "motion. NeuroImage 59:2142-2154. doi:10.1016/j.neuroimage.2011.10.018")
RISH = ("Mirzaalian H, Ning L, Savadjiev P, Pasternak O, Bouix S, Michailovich O, Grant G, "
        "Marx CE, Morey RA, Flashman LA, George MS, McAllister TW, Andaluz N, Shutter L, "
        "Coimbra R, Zafonte RD, Coleman MJ, Kubicki M, Westin CF, Stein MB, Shenton ME, "
        "Rathi Y (2016). Inter-site and inter-scanner diffusion MRI data harmonization. "
        "NeuroImage 135:311-323. doi:10.1016/j.neuroimage.2016.04.041")
RISH_MULTISITE = ("Cetin Karayumak S, Bouix S, Ning L, James A, Crow T, Shenton M, Kubicki M, "
                  "Rathi Y (2019). Retrospective harmonization of multi-site diffusion MRI data "
                  "acquired with different acquisition parameters. NeuroImage 184:180-200. "
                  "doi:10.1016/j.neuroimage.2018.08.073")
DTI = ("Basser PJ, Mattiello J, LeBihan D (1994). MR diffusion tensor spectroscopy and "
       "imaging. Biophys J 66:259-267. doi:10.1016/S0006-3495(94)80775-1")
WLS = ("Veraart J, Sijbers J, Sunaert S, Leemans A, Jeurissen B (2013). Weighted linear least "
       "squares estimation of diffusion MRI parameters: strengths, limitations, and pitfalls. "
       "NeuroImage 81:335-346. doi:10.1016/j.neuroimage.2013.05.028")
SH = ("Descoteaux M, Angelino E, Fitzgibbons S, Deriche R (2007). Regularized, fast, and robust "
      "analytical Q-ball imaging. Magn Reson Med 58:497-510. doi:10.1002/mrm.21277")

SYN = ("Avants BB, Epstein CL, Grossman M, Gee JC (2008). Symmetric diffeomorphic image "
       "registration with cross-correlation: evaluating automated labeling of elderly and "
       "neurodegenerative brain. Med Image Anal 12:26-41. doi:10.1016/j.media.2007.06.004")

#: References by what ran: ``"step"`` (the step ran), ``"step.option"`` (the
#: option is on: true or non-empty) or ``"step.option=value"``; ``""``: every run.
#: (The median-Otsu mask's reference is added when a unit had no mask given.)
REFERENCES: dict[str, tuple[str, ...]] = {
    "": (DIPY, NIBABEL, PYDRA),
    "preprocess.denoise": (MPPCA,),
    "preprocess.degibbs": (GIBBS,),
    "motion": (BVEC_ROTATION, FD),
    "harmonize": (RISH, RISH_MULTISITE),
    "tensor": (DTI,),
    "tensor.fit_method=WLS": (WLS,),
    "rish": (SH, RISH),
    "harmonization_fit": (RISH, RISH_MULTISITE),
    "harmonization_fit.registration=syn": (SYN,),
}


def _fit_evaluation_note() -> str:
    """How ``harmonize fit`` evaluates its cohort (its site-effect table's
    ``wm_mask`` column names the same definition)."""
    from dmriflow.interfaces.harmonize import EVAL_MASK_REFERENCE, EVAL_MASKS
    return (f"The site effect before and after harmonization (Cohen's d and Welch's t of "
            f"the subjects' white-matter means of FA, MD and RISH per shell and order, "
            f"target - reference) was evaluated on the fitting cohort in "
            f"{EVAL_MASKS[EVAL_MASK_REFERENCE]} (`wm_mask` = {EVAL_MASK_REFERENCE}); each "
            f"target subject was harmonised through its own registration from the fit.")


#: A step's methods paragraph beyond its summary line, where its module's
#: docstring cannot say it (a callable: its text).
STEP_NOTES = {"harmonization_fit": _fit_evaluation_note}


def step_summaries() -> dict[str, str]:
    """``{step name: the first line of its module's docstring}``, without the
    ``Name:`` lead, for every registered step and cohort step."""
    out = {}
    for module in STEP_MODULES:
        mod = sys.modules[f"{steps_package.__name__}.{module}"]
        line = ((mod.__doc__ or "").strip().splitlines() or [""])[0].strip()
        line = (line.split(": ", 1)[1] if ": " in line else line).replace("``", "`")
        out[mod.STEP.name] = line[:1].upper() + line[1:]
    return out


def _shown(value, output_dir) -> str:
    """An option value as the text shows it (a path as OUTPUT records it)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str) and os.path.isabs(value):
        return external_path(value, output_dir)
    if value is None or value == "":
        return "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def option_rows(options, output_dir) -> list[tuple[str, str, str, bool]]:
    """(flag, help, shown value, changed from the default) of each declared option.
    A file of the installed package (a shipped checkpoint the run resolved the
    empty default to) is the default, not a change."""
    rows = []
    for f, info in options_of(type(options)):
        value, default = getattr(options, f.name), field_default(f)
        shown = (not value) if info.invert else value      # the flag's own sense
        try:
            help_text = info.help % {"default": default}
        except (TypeError, ValueError, KeyError):
            help_text = info.help
        text = _shown(shown, output_dir)
        changed = value != default and not text.startswith(PACKAGE_URI)
        rows.append((flag_of(f, info), help_text, text, changed))
    return rows


def run_values(options) -> list[tuple[str, str]]:
    """(name, value) of the fields a run sets itself (not options: e.g. the
    checkpoint's weights hash), when set."""
    declared = {f.name for f, _ in options_of(type(options))}
    return [(f.name, str(getattr(options, f.name))) for f in dataclasses.fields(options)
            if f.name not in declared and getattr(options, f.name) not in ("", None)]


def references(steps: dict) -> list[str]:
    """The references of what ran, in the order of :data:`REFERENCES` (each once).

    ``steps``: ``{step name: its Options}`` of the steps that ran."""
    found: list[str] = []
    for key, refs in REFERENCES.items():
        step, _, rest = key.partition(".")
        name, _, wanted = rest.partition("=")
        if key and step not in steps:
            continue
        if name:
            value = getattr(steps[step], name)
            if (wanted and str(value) != wanted) or (not wanted and not value):
                continue
        found += [r for r in refs if r not in found]
    return found


def versions() -> dict[str, str]:
    """dmriflow's version and those of :data:`METHODS_PACKAGES` (from the installed
    metadata: nothing is imported)."""
    out = {"dmriflow": __version__}
    for name in METHODS_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def ran_steps(config, command: str = "run") -> tuple[dict, dict]:
    """({subject step: Options}, {cohort step: Options}) of what ``command`` goes
    through: a run's enabled steps; a harmonization fit's steps up to the series
    it reads (the series as acquired: no artefact applied, no product step)."""
    subject = {name: config.steps[name] for name in config.enabled_steps()}
    if command == FIT_COMMAND:
        subject = {name: o for name, o in subject.items() if fit_reads(name)}
    cohort = {s.name: config.cohort[s.name] for s in cohort_steps(config.steps, command)}
    return subject, cohort


def mask_sentence(n_subjects: int, masks_given: int) -> str:
    """Where the brain masks came from."""
    given = "given with the series (a `desc-brain_mask`, or HCP's `nodif_brain_mask`)"
    computed = "computed by median Otsu thresholding of the mean b0 image"
    if masks_given >= n_subjects:
        return f"The brain mask was the one {given}."
    if masks_given:
        return (f"The brain mask was the one {given} for {masks_given} of {n_subjects} "
                f"unit(s), and {computed} for the others.")
    return f"The brain mask was {computed}."


def methods_text(config, output_dir, n_subjects: int, masks_given: int = 0,
                 command: str = "run") -> str:
    """The methods text (Markdown) of a run with ``config`` over ``n_subjects`` units,
    ``masks_given`` of which came with a brain mask (``command``: see :func:`ran_steps`)."""
    subject, cohort = ran_steps(config, command)
    summaries = step_summaries()
    v = versions()
    lines = ["# Methods", "",
             f"*Generated by dmriflow {__version__} (pipeline {io.pipeline_version()}) on "
             f"{time.strftime('%Y-%m-%d')} for the {_what(command)} over {n_subjects} unit(s), "
             f"from the steps that ran and their settings.*", "",
             f"Diffusion MRI data were processed with dmriflow {__version__}, which runs each "
             f"subject's series as a cached Pydra {v['pydra']} task graph. The numerics use "
             f"DIPY {v['dipy']}, NiBabel {v['nibabel']}, NumPy {v['numpy']}, SciPy {v['scipy']}"
             + (f" and PyTorch {v['torch']}" if "inference" in subject else "")
             + ". Each subject's series went through the following steps, in this order. "
             + mask_sentence(n_subjects, masks_given), ""]
    for title, steps, registry in (("Subject steps", subject, REGISTRY),
                                   ("Cohort steps", cohort, COHORT_REGISTRY)):
        if not steps:
            continue
        lines += [f"## {title}", ""]
        for name, options in steps.items():
            step = registry[name]
            lines.append(f"### {step.task} (`{name}`)")
            lines += ["", summaries.get(name) or name, ""]
            if name in STEP_NOTES:
                lines += [STEP_NOTES[name](), ""]
            for flag, help_text, shown, changed in option_rows(options, output_dir):
                mark = " **(set for this run)**" if changed else ""
                lines.append(f"- `{flag}` = {shown}{mark}: {help_text}")
            lines += [f"- `{name}` = {value} (set by the run)" for name, value in
                      run_values(options)]
            lines.append("")
    lines += ["## Software", ""] + [f"- {k} {val}" for k, val in v.items()] + [""]
    lines += ["## References", ""] + [f"{i}. {r}" for i, r in
                                      enumerate(references({**subject, **cohort})
                                                + ([MEDIAN_OTSU] if masks_given < n_subjects
                                                   else []), 1)]
    return "\n".join(lines) + "\n"


def _what(command: str) -> str:
    return "harmonization fit" if command == FIT_COMMAND else "run"


def write_methods(config, log_dir, output_dir, n_subjects: int, masks_given: int = 0,
                  command: str = "run") -> Path:
    """Write ``<log_dir>/<METHODS_FILES[command]>`` (OUTPUT/dmriflow/logs,
    atomically); return its path."""
    return io.write_text(methods_text(config, output_dir, n_subjects, masks_given, command),
                         Path(log_dir) / METHODS_FILES[command])


def methods_html(text: str) -> str:
    """The methods text as HTML for the report (the Markdown this module writes:
    headings, bullet and numbered items, paragraphs, ``code``, **bold**, *italic*)."""
    def inline(line: str) -> str:
        line = html.escape(line, quote=False)
        line = re.sub(r"`([^`]+)`", r"<code>\1</code>", line)
        line = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", line)
        return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", line)
    out, open_list = [], ""
    for line in text.splitlines():
        item = re.match(r"^(- |\d+\. )(.*)$", line)
        kind = ("ul" if item[1] == "- " else "ol") if item else ""
        if open_list and kind != open_list:
            out.append(f"</{open_list}>")
            open_list = ""
        if item:
            if not open_list:
                out.append(f"<{kind}>")
                open_list = kind
            out.append(f"<li>{inline(item[2])}</li>")
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 2, 6)    # under the section's h2
            if level > 3:
                out.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    if open_list:
        out.append(f"</{open_list}>")
    return "".join(out)
