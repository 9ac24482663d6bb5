"""The one place that talks to the Pydra engine.

Worker choice (always explicit), cache root, the pipeline-version input,
clean-up of failed nodes before a rerun, failure isolation, progress and the
cohort-level status files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dmriflow.interfaces import io
from dmriflow.interfaces.errors import InputError
from dmriflow.pipelines.inputs import SubjectInputs, census
from dmriflow.pipelines.progress import PROGRESS_ENV
from dmriflow.pipelines.steps import (DTI_MAX_BVAL, FAILED_MARKER, STEP_MARKER, failed_row,
                                      status_path, write_status, write_subjects_table)

#: Engine workers dmriflow supports; there is no silent default.
WORKERS = ("cf", "debug", "slurm")
#: Pydra's crash file in a failed node folder.
ERROR_FILE = "_error.pklz"
#: Cache location under OUTPUT when --cache-dir is not given.
DEFAULT_CACHE = ".dmriflow-cache"


@dataclass
class RunConfig:
    worker: str
    n_procs: int = 1
    cache_dir: str | None = None
    sbatch_args: str = ""
    fit_method: str = "WLS"
    dti_max_bval: float = DTI_MAX_BVAL
    lmax: int = 0                  # 0: as many orders as each shell's directions allow (<= 8)
    harmonization: str = ""        # folder of a stored harmonization artefact to apply
    denoise: bool = False          # MP-PCA (raw data only; not for HCP minimal preprocessing)
    degibbs: bool = False          # Gibbs-ringing removal (raw data only)
    quiet: bool = False

    def __post_init__(self):
        if self.worker not in WORKERS:
            raise ValueError(f"worker must be one of {WORKERS}, got {self.worker!r}")
        if self.n_procs < 1:
            raise ValueError("n_procs must be >= 1")


@dataclass
class CohortResult:
    output_dir: Path
    table: Path
    rows: list[dict] = field(default_factory=list)
    engine_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r.get("status") != "done"]


def cache_root(output_dir, config: RunConfig) -> Path:
    return Path(config.cache_dir or Path(output_dir, DEFAULT_CACHE)).resolve()


def clean_cache(root: Path) -> int:
    """Remove node folders holding a failure, so a rerun recomputes them.

    Pydra keeps re-reporting an old error once it is cached (and our guarded
    tasks cache failure records): delete every node folder with an
    ``_error.pklz`` or a failure marker, and, if there was any, the workflow
    folders whose cached results embed them (rebuilt cheaply from the nodes).
    Returns the number of folders removed.
    """
    if not root.is_dir():
        return 0
    failed = [d for d in root.iterdir()
              if d.is_dir() and ((d / ERROR_FILE).exists() or (d / FAILED_MARKER).exists())]
    if failed:
        failed += [d for d in root.iterdir() if d.is_dir() and d.name.startswith("workflow-")
                   and d not in failed]
    for d in failed:
        shutil.rmtree(d, ignore_errors=True)
    return len(failed)


def _submitter(config: RunConfig, root: Path):
    from pydra.engine.submitter import Submitter  # before pydra.workers (OPERATIONS.md)
    os.environ[PROGRESS_ENV] = "0" if config.quiet else "1"
    kwargs = {}
    if config.worker == "cf":
        kwargs["n_procs"] = config.n_procs
    elif config.worker == "slurm":
        kwargs["sbatch_args"] = config.sbatch_args
    return Submitter(worker=config.worker, cache_root=root, **kwargs)


def _log(config: RunConfig, msg: str) -> None:
    if not config.quiet:
        print(f"[dmriflow] {msg}", file=sys.stderr, flush=True)


def preflight(subjects: list[SubjectInputs], output_dir, version: str):
    """Split subjects into runnable ones and rows for those with missing files."""
    runnable, failed = [], []
    for s in subjects:
        try:
            s.check_files()
            runnable.append(s)
        except InputError as exc:
            failed.append(write_status(failed_row(s.key, "validate", str(exc), version),
                                       output_dir, s.out_parts))
    return runnable, failed


def _submit(subjects, prefailed, output_dir, config: RunConfig, root: Path, version: str):
    from dmriflow.pipelines.workflows import CohortWorkflow
    task = CohortWorkflow(
        subject=[s.key for s in subjects], out_parts=[list(s.out_parts) for s in subjects],
        dwi=[s.dwi for s in subjects], bval=[s.bval for s in subjects],
        bvec=[s.bvec for s in subjects], mask=[s.mask for s in subjects],
        sidecar=[s.sidecar for s in subjects], output_dir=str(output_dir),
        extra_rows=prefailed, fit_method=config.fit_method,
        dti_max_bval=config.dti_max_bval, lmax=config.lmax,
        harmonization=str(Path(config.harmonization).resolve()) if config.harmonization else "",
        denoise=config.denoise, degibbs=config.degibbs,
        pipeline_version=version)
    with _submitter(config, root) as sub:
        return sub(task, raise_errors=False)


def _engine_errors(res, root: Path) -> list[str]:
    """The engine's own error text (crashes, not subject-level failures)."""
    errors = res.errors or {}
    text = "".join(str(e) for e in errors.get("error message", [])).strip()
    return [text or f"engine error: see {ERROR_FILE} files under {root}"]


def run_cohort(subjects: list[SubjectInputs], output_dir, config: RunConfig) -> CohortResult:
    """Run the cohort workflow; return per-subject rows and the table path.

    The cohort plan is written first (group/cohort.json) so ``dmriflow status``
    can tell missing subjects after a crash. Subject-level errors never
    raise: they become rows with status "failed" and a reason.
    """
    start = time.perf_counter()
    output_dir = Path(output_dir).resolve()
    group = output_dir / "dmriflow" / "group"
    root = cache_root(output_dir, config)
    version = io.pipeline_version()
    cen = census(subjects)
    io.write_text(cen.to_csv(sep="\t", index=False, na_rep="n/a"), group / "census.tsv")
    io.write_json({"pipeline_version": version, "worker": config.worker,
                   "subjects": [{"key": s.key, "out_parts": list(s.out_parts)} for s in subjects],
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, group / "cohort.json")
    removed = clean_cache(root)
    _log(config, f"{len(subjects)} subject(s), protocol groups "
                 f"{dict(cen['protocol'].value_counts())}; worker={config.worker} "
                 f"cache={root}" + (f"; cleared {removed} failed node folder(s)" if removed else ""))

    runnable, prefailed = preflight(subjects, output_dir, version)
    for row in prefailed:
        _log(config, f"{row['subject']}: failed before submission: {row['error']}")
    engine_errors: list[str] = []
    if not runnable:
        rows, table = prefailed, write_subjects_table(prefailed, output_dir)
    else:
        res = _submit(runnable, prefailed, output_dir, config, root, version)
        if res.errored:
            engine_errors = _engine_errors(res, root)
            rows = collect_status(output_dir, subjects)
            table = write_subjects_table(rows, output_dir)
        else:
            rows, table = list(res.outputs.rows) + prefailed, Path(res.outputs.table)
            missing = [d for r in rows for d in r.get("derivatives", []) if not Path(d).exists()]
            if missing:
                # derivatives deleted after a cached run: redo the cheap export steps
                _log(config, f"{len(missing)} derivative(s) missing; re-exporting")
                return _rerun_export(subjects, output_dir, config, root)
    result = CohortResult(output_dir=output_dir, table=table, rows=rows,
                          engine_errors=engine_errors, seconds=time.perf_counter() - start)
    n_done = sum(r.get("status") == "done" for r in rows)
    _log(config, f"finished in {result.seconds:.1f} s: {n_done} done, "
                 f"{len(rows) - n_done} failed; table {table}")
    return result


def _rerun_export(subjects, output_dir, config, root) -> CohortResult:
    remove_steps(root, ("export", "group"))
    for d in root.glob("workflow-*"):
        shutil.rmtree(d, ignore_errors=True)
    return run_cohort(subjects, output_dir, config)


def remove_steps(root: Path, steps: tuple[str, ...]) -> int:
    """Remove the node folders of the given steps (by their step marker)."""
    found = [d for d in root.glob("*/" + STEP_MARKER) if d.read_text() in steps]
    for marker in found:
        shutil.rmtree(marker.parent, ignore_errors=True)
    return len(found)


def collect_status(output_dir, subjects: list[SubjectInputs]) -> list[dict]:
    """Per-subject rows from the status files; subjects without one are missing."""
    rows = []
    for s in subjects:
        path = status_path(output_dir, s.out_parts, s.key)
        if path.exists():
            row = json.loads(path.read_text())
            gone = [d for d in row.get("derivatives", []) if not Path(d).exists()]
            if row.get("status") == "done" and gone:
                row.update(status="missing", error=f"{len(gone)} derivative(s) missing, "
                                                    f"e.g. {gone[0]}")
        else:
            row = {"subject": s.key, "status": "missing", "failed_step": "",
                   "error": "no result yet (not run, still running, or interrupted)"}
        rows.append(row)
    return rows


def read_plan(output_dir) -> list[SubjectInputs]:
    """Subjects of the last run started on OUTPUT (from group/cohort.json)."""
    plan = Path(output_dir, "dmriflow", "group", "cohort.json")
    if not plan.exists():
        raise FileNotFoundError(f"{plan}: no dmriflow run found in {output_dir}")
    entries = json.loads(plan.read_text())["subjects"]
    return [_PlannedSubject(e["key"], tuple(e["out_parts"])) for e in entries]


@dataclass(frozen=True)
class _PlannedSubject:
    key: str
    out_parts: tuple


def status_table(output_dir) -> pd.DataFrame:
    rows = collect_status(output_dir, read_plan(output_dir))
    cols = ["subject", "status", "failed_step", "error"]
    return pd.DataFrame([{c: r.get(c, "") for c in cols} for r in rows], columns=cols)


def run_harmonization_fit(subjects: list[SubjectInputs], output_dir, config: RunConfig,
                          sites: dict[str, str], reference_site: str, target_site: str,
                          shells: list[float] | None = None, lmax: int | None = None,
                          registration: str = "syn", smoothing_fwhm_mm: float = 0.0) -> dict:
    """Fit a harmonization artefact on a cohort; store it under OUTPUT/dmriflow.

    The artefact goes to ``OUTPUT/dmriflow/harmonization/<content id>/`` and
    the evaluation tables to ``OUTPUT/dmriflow/group/harmonization_*.tsv``.
    Only subjects of the two named sites are used.
    """
    from dmriflow.interfaces.harmonize import MIN_SUBJECTS_PER_SITE
    from dmriflow.pipelines.harmonization import HarmonizationFitWorkflow, common_shells_and_lmax

    output_dir = Path(output_dir).resolve()
    chosen = [s for s in subjects if sites.get(s.key) in (reference_site, target_site)]
    for site in (reference_site, target_site):
        n = sum(sites.get(s.key) == site for s in chosen)
        if n < MIN_SUBJECTS_PER_SITE:
            known = sorted(set(sites.values()))
            raise ValueError(f"site {site!r} has {n} subject(s); at least "
                             f"{MIN_SUBJECTS_PER_SITE} are needed (sites: {known})")
    version = io.pipeline_version()
    runnable, prefailed = preflight(chosen, output_dir, version)
    shells, lmax = common_shells_and_lmax(runnable, lmax) if shells is None else \
        (shells, lmax or common_shells_and_lmax(runnable)[1])
    root = cache_root(output_dir, config)
    clean_cache(root)
    _log(config, f"harmonization fit: {reference_site} (reference) vs {target_site} (target), "
                 f"shells {shells}, lmax {lmax}, registration {registration}")
    task = HarmonizationFitWorkflow(
        subject=[s.key for s in runnable], out_parts=[list(s.out_parts) for s in runnable],
        dwi=[s.dwi for s in runnable], bval=[s.bval for s in runnable],
        bvec=[s.bvec for s in runnable], mask=[s.mask for s in runnable],
        sidecar=[s.sidecar for s in runnable], sites={s.key: sites[s.key] for s in runnable},
        reference_site=reference_site, target_site=target_site, shells=list(shells),
        lmax=lmax, registration=registration, smoothing_fwhm_mm=smoothing_fwhm_mm,
        denoise=config.denoise, degibbs=config.degibbs, pipeline_version=version)
    with _submitter(config, root) as sub:
        res = sub(task, raise_errors=False)
    if res.errored:
        raise RuntimeError("harmonization fit failed: " + "\n".join(_engine_errors(res, root)))
    result = dict(res.outputs.result)
    dest = output_dir / "dmriflow" / "harmonization" / result["content_id"][:12]
    if not dest.exists():
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(result["artefact"], tmp)
        os.replace(tmp, dest)
    group = output_dir / "dmriflow" / "group"
    for key in ("site_effect", "preservation"):
        io.write_text(Path(result[key]).read_text(), group / f"harmonization_{key}.tsv")
        result[key] = str(group / f"harmonization_{key}.tsv")
    result["artefact"] = str(dest)
    result["excluded"] = result["excluded"] + [
        {"subject": r["subject"], "error": r["error"]} for r in prefailed]
    _log(config, f"artefact {dest}; site effect table {result['site_effect']}")
    return result
