"""Per-subject Pydra tasks: validate, tensor, RISH, export; and the group table.

Each task runs in its own node folder (the cwd) and returns a small dict
record. Tasks are *guarded*: an exception inside one subject's task becomes a
``{"status": "failed", ...}`` record (and a marker file in the node folder so
the execution layer can discard it before the next run); a task whose
upstream record failed passes that failure on without computing. Thus one
bad subject never stops the cohort, and its reason reaches the group table.

Every task is a module-level function (``validate_step``) made into a task
class (``Validate = python.define(validate_step, ...)``), never a decorated
class name: the engine ships a task to a worker process with cloudpickle and
checks that its hash did not change on the way. A function reachable by its
module and name travels by reference and hashes from its source in both
processes; one that is not (a decorator's closure stored under the class's
name) travels by value, and cloudpickle >= 3.1.3 gives its code the file name
``<dynamic-code>``, so pydra hashes the bytecode instead and every job fails.
``tests/test_task_hashes.py`` checks every task of the pipelines.
"""

from __future__ import annotations

import functools
import hashlib
import json
import traceback
from pathlib import Path

from fileformats.generic import File
from pydra.compose import python

from dmriflow.interfaces import io, stepfiles
from dmriflow.interfaces.dti import DEFAULT_WLS_ITERATIONS, DTI_MAX_BVAL  # noqa: F401
from dmriflow.interfaces.errors import InputError

#: Written into a node folder whose record is a failure (see execution.clean_cache).
FAILED_MARKER = "_dmriflow_failed"
#: Written into every node folder: the step's name, so folders can be found by step.
STEP_MARKER = "_dmriflow_step"
#: Written into a node folder whose series copy was dropped (--drop-series): the
#: next run removes the folder, so the step recomputes it if it is needed again.
DROPPED_MARKER = "_dmriflow_series_dropped"
#: The per-subject inputs that are split together over the cohort.
SUBJECT_FIELDS = ("subject", "out_parts", "dwi", "bval", "bvec", "mask", "sidecar")
#: BIDS ``desc`` label of a DWI series changed by each step (joined in order).
SERIES_DESC = {"preprocess": "preproc", "harmonize": "harmonized"}
#: BIDS ``desc`` label of b-vectors fixed by the gradient check (``--fix-gradients``).
GRADFIX_DESC = "gradfix"
#: Keys of a status row that are not columns of group/subjects.tsv.
ROW_ONLY = ("derivatives", "export_id")
#: Columns of group/subjects.tsv, in order (census fields follow "status").
STATUS_COLUMNS = ("subject", "status", "failed_step", "error", "qc_flags")


def _failure(step: str, subject: str, exc: BaseException | None = None, upstream=None) -> dict:
    Path(FAILED_MARKER).write_text(step)
    if upstream is not None:
        return dict(upstream)
    return {"subject": subject, "status": "failed", "failed_step": step,
            "error": str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()}


def guarded(step: str):
    """Turn exceptions into failure records and pass upstream failures on.

    Store the result under the function's own name (``@guarded`` on a
    module-level ``def``), so the wrapper is reachable by module and name.
    """
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(**kwargs):
            Path(STEP_MARKER).write_text(step)
            subject = kwargs.get("subject", "")
            for value in kwargs.values():
                if isinstance(value, dict) and value.get("status") == "failed":
                    return _failure(step, subject, upstream=value)
            try:
                return fn(**kwargs)
            except Exception as exc:  # noqa: BLE001 - any subject-level error is reported
                return _failure(step, subject, exc)
        return wrapper
    return deco


def load_series(record: dict):
    """The DWI a step works on: the current series of the subject's record.

    Validate, Preprocess and Harmonize each hand on ``record["series"]``
    (paths of dwi, bval, bvec, mask), so later steps need not know which of
    them ran.
    """
    return stepfiles.read_series(record["series"])


def save_series(data, record: dict, step: str, extra: dict | None = None) -> dict:
    """Write a DWI (data, gradients, mask) into the node folder as the new series."""
    return with_series(record, stepfiles.write_series(data, Path.cwd(), record["series"]["mask"]),
                       step, extra)


def with_series(record: dict, series: dict, step: str, extra: dict | None = None) -> dict:
    """The record with a new current series, written by ``step`` (added to its history)."""
    history = list(record.get("history", [])) + [{"step": step, **(extra or {})}]
    return {**record, "series": series, "history": history}


@guarded("validate")
def validate_step(subject: str, dwi: File, bval: File, bvec: File, mask: File | None = None,
                  sidecar: File | None = None, exclude_outliers: bool = True,
                  fix_gradients: bool = False, rows_only: bool = False,
                  pipeline_version: str = "") -> dict:
    """Read and check every input once; record the census row, input hashes, QC
    (degenerate series fail, outlier volumes, gradient-orientation check) and
    the series later steps map (``rows_only``: only the fits read it)."""
    return stepfiles.validate_subject(subject, dwi, bval, bvec, mask, sidecar, Path.cwd(),
                                      exclude_outliers=exclude_outliers,
                                      fix_gradients=fix_gradients, rows_only=rows_only)


Validate = python.define(validate_step, outputs=["record"], name="Validate")


@guarded("preprocess")
def preprocess_step(subject: str, record: dict, denoise: bool = False, degibbs: bool = False,
                    pipeline_version: str = "") -> dict:
    """MP-PCA denoising and/or Gibbs-ringing removal (pass-through when both off).

    Both assume raw, uninterpolated data: leave them off for HCP's minimally
    preprocessed series (already eddy-corrected and resampled).
    """
    if not (denoise or degibbs):
        return record
    from dmriflow.interfaces.preprocess import preprocess_dwi, report_for_sidecar
    out, report = preprocess_dwi(load_series(record), denoise=denoise, degibbs=degibbs)
    extra = {"report": report_for_sidecar(report), "denoise": denoise, "degibbs": degibbs}
    warnings = list(record.get("warnings", []))
    if record.get("interpolated"):
        extra["warning"] = stepfiles.INTERPOLATED_WARNING
        warnings.append(stepfiles.INTERPOLATED_WARNING)
    new = save_series(out, record, "preprocess", extra)
    new["warnings"] = warnings
    if "noise_sigma" in report["maps"]:
        new["maps"] = {**record.get("maps", {}), "model-mppca_param-sigma": str(
            io.save_nifti(report["maps"]["noise_sigma"], out.affine,
                          Path.cwd() / "noise_sigma.nii.gz", out.header).resolve())}
    return new


Preprocess = python.define(preprocess_step, outputs=["record"], name="Preprocess")


@guarded("tensor")
def fit_tensor_step(subject: str, record: dict, fit_method: str = "WLS",
                    max_bval: float = DTI_MAX_BVAL, n_iter: int = DEFAULT_WLS_ITERATIONS,
                    pipeline_version: str = "") -> dict:
    """DTI maps (FA, MD, AD, RD, S0, V1) as NIfTI files in the node folder."""
    return {"subject": subject, "status": "ok",
            **stepfiles.write_tensor_maps(record["series"], Path.cwd(), fit_method, max_bval,
                                          n_iter)}


FitTensor = python.define(fit_tensor_step, outputs=["tensor"], name="FitTensor")


@guarded("rish")
def fit_rish_step(subject: str, record: dict, lmax: int = 0, pipeline_version: str = "") -> dict:
    """Per-shell SH fit of the b0-normalised signal and RISH maps l = 0..L."""
    return {"subject": subject, "status": "ok",
            **stepfiles.write_rish_maps(record["series"], Path.cwd(), lmax)}


FitRish = python.define(fit_rish_step, outputs=["rish"], name="FitRish")


def _export_series(record: dict, dwi_dir: Path, key: str, inputs: dict,
                   provenance: dict) -> list[str]:
    """Export the DWI series when a step changed it (e.g. harmonization)."""
    if not record.get("history"):
        return []
    from dmriflow.interfaces.harmonize import SIDECAR_KEY
    desc = "".join(SERIES_DESC[h["step"]] for h in record["history"])
    base = dwi_dir / f"{key}_desc-{desc}_dwi"
    series = record["series"]
    written = [str(io.copy_file(series[k], Path(f"{base}{ext}")))
               for k, ext in (("dwi", ".nii.gz"), ("bval", ".bval"), ("bvec", ".bvec"))]
    meta = _sidecar(inputs, {"history": record["history"]}, desc, provenance)
    applied = [h for h in record["history"] if h["step"] == "harmonize"]
    if applied:
        meta[SIDECAR_KEY] = applied[-1]["applied"]
        meta["HarmonizationArtefact"] = applied[-1]["artefact"]
    io.write_json(meta, Path(f"{base}.json"))
    return written + [f"{base}.json"]


def _export_fixed_bvec(record: dict, dwi_dir: Path, key: str, inputs: dict,
                       provenance: dict) -> list[str]:
    """The b-vectors with the gradient check's fix applied (``--fix-gradients``),
    when no exported series carries them already."""
    fixes = [p for p in record.get("provenance", []) if p["step"] == "gradient_fix"]
    if not fixes or record.get("history"):
        return []
    base = dwi_dir / f"{key}_desc-{GRADFIX_DESC}_dwi"
    written = str(io.copy_file(record["series"]["bvec"], Path(f"{base}.bvec")))
    io.write_json(_sidecar(inputs, {"gradient_fix": fixes[-1]}, GRADFIX_DESC, provenance),
                  Path(f"{base}.json"))
    return [written, f"{base}.json"]


def _sidecar(inputs: dict, params: dict, step: str, provenance: dict) -> dict:
    """A derivative's sidecar: the input hashes recorded by Validate (the content
    that was processed, not re-read) and the run's pipeline version."""
    extra = {k: v for k, v in provenance.items() if k != "PipelineVersion"}
    return io.sidecar(inputs, params, step, extra=extra, hashes=provenance.get("InputHashes"),
                      version=provenance.get("PipelineVersion") or None)


def export_id(*records, **fields) -> str:
    """Content id of an export: sha256 of everything Export writes from."""
    text = json.dumps([records, fields], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _previous_export(path: Path, eid: str) -> dict | None:
    """The status row of an identical, complete earlier export, if there is one.

    The engine can lose an Export node's result when a run is killed right
    after the status file was written; the rerun then finds the derivatives
    already in place and must not rewrite them. An export that itself failed
    (e.g. a full disk) is never reused: its cause may be gone.
    """
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if row.get("export_id") != eid or row.get("failed_step") == "export":
        return None
    return row if all(Path(d).exists() for d in row.get("derivatives", [])) else None


def derivative_name(key: str, entities: str) -> str:
    return f"{key}_{entities}_dwimap.nii.gz"


def _export_file(src, dst: Path, inputs: dict, params: dict, step: str,
                 provenance: dict) -> str:
    """Copy one derivative into place (atomically) beside its JSON sidecar."""
    io.copy_file(src, dst)
    meta = _sidecar(inputs, params, step, provenance)
    meta["Sources"] = sorted(inputs.values())
    stem = dst.name.removesuffix(".nii.gz") if dst.name.endswith(".nii.gz") else dst.stem
    io.write_json(meta, dst.with_name(f"{stem}.json"))
    return str(dst)


def export_product(product: dict, dwi_dir: Path, key: str, inputs: dict,
                   provenance: dict) -> list[str]:
    """Export the files of an optional step's *product record*.

    A product record is ``{"subject", "status": "ok", "step", "maps":
    {entities: nii}, "tables": {entities: tsv}, "parameters", "row"}``:
    maps become ``<key>_<entities>_dwimap.nii.gz``, tables
    ``<key>_<entities>.tsv``, each with a sidecar carrying ``parameters``;
    the caller merges ``row`` into the subject's row.
    """
    step, params = product["step"], product.get("parameters", {})
    jobs = [(path, dwi_dir / derivative_name(key, entities))
            for entities, path in product.get("maps", {}).items()]
    jobs += [(path, dwi_dir / f"{key}_{entities}.tsv")
             for entities, path in product.get("tables", {}).items()]
    return [_export_file(src, dst, inputs, params, step, provenance) for src, dst in jobs]


def status_path(output_dir, out_parts, key) -> Path:
    return Path(output_dir, "dmriflow", *out_parts, f"{key}_desc-dmriflow_status.json")


def write_status(row: dict, output_dir, out_parts) -> dict:
    """Write a subject's status file (the last thing written for a subject)."""
    io.write_json(row, status_path(output_dir, out_parts, row["subject"]))
    return row


def failed_row(subject: str, step: str, error: str, pipeline_version: str) -> dict:
    return {"subject": subject, "status": "failed", "failed_step": step, "error": error,
            "derivatives": [], "pipeline_version": pipeline_version}


def drop_series_copies(record: dict) -> int:
    """Delete the series files dmriflow wrote for a subject in the cache
    (Validate's uncompressed copy of the input, a Preprocess/Harmonize series),
    marking each node folder (:data:`DROPPED_MARKER`); returns bytes freed.
    Only files in a node folder that carries a step marker are touched: never
    an input."""
    files = {record.get("read", {}).get("copy", "")}
    if record.get("history"):
        files.add(record["series"]["dwi"])
    freed = 0
    for f in filter(None, files):
        path = Path(f)
        if not (path.parent / STEP_MARKER).exists() or not path.exists():
            continue
        (path.parent / DROPPED_MARKER).write_text(path.name)
        freed += path.stat().st_size
        path.unlink()
    return freed


def export_step(subject: str, out_parts: list, record: dict, tensor: dict, rish: dict,
                output_dir: str, image_gradient: dict | None = None, inference: dict | None = None,
                drop_series: bool = False, pipeline_version: str = "") -> dict:
    """Copy a subject's maps into the derivatives tree, each with a sidecar.

    ``image_gradient`` and ``inference`` are product records of optional
    steps (see :func:`export_product`). A previous status file is removed
    first and the new one written last (done, or failed with the reason), so
    a killed run never shows a subject as done with missing or mixed files.
    An identical complete export (same ``export_id``) is not redone. With
    ``drop_series`` the subject's series copies in the cache are deleted once
    it is done (see :func:`drop_series_copies`).
    """
    Path(STEP_MARKER).write_text("export")
    key = subject
    dwi_dir = Path(output_dir, "dmriflow", *out_parts, "dwi")
    products = [p for p in (image_gradient, inference) if p is not None]
    eid = export_id(record, tensor, rish, *products, out_parts=out_parts,
                    output_dir=output_dir, pipeline_version=pipeline_version)
    status_file = status_path(output_dir, out_parts, key)
    previous = _previous_export(status_file, eid)
    if previous is not None:
        if previous.get("status") != "done":
            Path(FAILED_MARKER).write_text("export")
        return previous
    status_file.unlink(missing_ok=True)
    row = {"subject": key, "status": "done", "failed_step": "", "error": ""}
    failed = next((r for r in (record, tensor, rish, *products) if r.get("status") == "failed"),
                  None)
    written = []
    try:
        if failed is not None:
            Path(FAILED_MARKER).write_text("export")
            row.update(status="failed", failed_step=failed["failed_step"], error=failed["error"])
        else:
            inputs = {k: v["path"] for k, v in record["inputs"].items()}
            provenance = {"InputHashes": {k: v["sha256"] for k, v in record["inputs"].items()},
                          "PipelineVersion": pipeline_version,
                          "ProcessingChain": stepfiles.processing_chain(record),
                          "InputQC": record.get("input_qc", {})}
            jobs = [(f"model-tensor_param-{p}", path, "tensor", tensor["parameters"])
                    for p, path in tensor["maps"].items()]
            jobs += [(f"model-rish_shell-{shell}_param-l{order}", path, "rish",
                      {**rish["parameters"], "shell": float(shell), "order": int(order)})
                     for shell, by_order in rish["maps"].items()
                     for order, path in by_order.items()]
            jobs += [(entities, path, "preprocess", {"history": record["history"]})
                     for entities, path in record.get("maps", {}).items()]
            written += [_export_file(src, dwi_dir / derivative_name(key, entities), inputs,
                                     params, step, provenance)
                        for entities, src, step, params in jobs]
            written += _export_series(record, dwi_dir, key, inputs, provenance)
            written += _export_fixed_bvec(record, dwi_dir, key, inputs, provenance)
            row.update(median_fa=tensor["median_fa"], failed_fit_voxels=tensor["failed_voxels"],
                       failed_fit_fraction=tensor.get("failed_fraction"),
                       mask_source=record["mask_source"], mask_voxels=record["mask_voxels"],
                       qc_flags="; ".join(record.get("qc_flags", [])
                                          + tensor.get("qc_flags", [])),
                       warnings="; ".join(record.get("warnings", [])),
                       **record.get("qc", {}))
            for product in products:
                written += export_product(product, dwi_dir, key, inputs, provenance)
                row.update(product.get("row", {}))
        if record.get("status") == "ok":
            row.update(record["census"])
    except Exception as exc:  # noqa: BLE001 - an export problem fails this subject only
        Path(FAILED_MARKER).write_text("export")
        row.update(status="failed", failed_step="export", error=f"{type(exc).__name__}: {exc}")
    row["derivatives"] = written
    row["pipeline_version"] = pipeline_version
    row["export_id"] = eid
    write_status(row, output_dir, out_parts)
    if drop_series and row["status"] == "done":
        drop_series_copies(record)
    return row


Export = python.define(export_step, outputs=["row"], name="Export")


def group_table_step(rows: list[dict], output_dir: str, extra_rows: list[dict] | None = None,
                     pipeline_version: str = "") -> str:
    """Write OUTPUT/dmriflow/group/subjects.tsv, one row per subject.

    ``extra_rows`` are subjects that failed before entering the graph.
    """
    Path(STEP_MARKER).write_text("group")
    rows = list(rows) + list(extra_rows or [])
    if any(r.get("status") != "done" for r in rows):
        Path(FAILED_MARKER).write_text("group")
    return str(write_subjects_table(rows, output_dir))


GroupTable = python.define(group_table_step, outputs=["table"], name="GroupTable")


def write_subjects_table(rows: list[dict], output_dir) -> Path:
    import pandas as pd

    from dmriflow.pipelines.inputs import assign_protocols
    df = assign_protocols(pd.DataFrame([{k: v for k, v in r.items() if k not in ROW_ONLY}
                                        for r in rows]))
    # the same columns in the same order whether rows come from the engine or
    # from status files (JSON with sorted keys): status columns, then by name
    first = [c for c in STATUS_COLUMNS if c in df.columns]
    df = df[first + sorted(c for c in df.columns if c not in first)].sort_values("subject")
    path = Path(output_dir, "dmriflow", "group", "subjects.tsv")
    io.write_json(_table_sidecar(rows), path.with_suffix(".json"))
    return io.write_text(df.to_csv(sep="\t", index=False, na_rep="n/a"), path)


def _table_sidecar(rows: list[dict]) -> dict:
    """Provenance of the group table: the pipeline version(s) its rows come from
    (more than one only in a cohort of mixed versions), package versions, and
    each subject's status and ``export_id`` (which names the export, whose
    sidecars hold the input hashes)."""
    versions = sorted({r["pipeline_version"] for r in rows if r.get("pipeline_version")})
    return io.sidecar({}, {}, "group", version=versions[0] if len(versions) == 1 else None,
                      extra={"PipelineVersions": versions,
                             "Subjects": {r["subject"]: {"status": r.get("status", ""),
                                                         "export_id": r.get("export_id", "")}
                                          for r in rows}})
