"""The derivatives tree: every file dmriflow writes under OUTPUT/dmriflow.

Names come from entities (:mod:`dmriflow.interfaces.bids_names`, the one
grammar): the subject's input entities (sub, ses, acq, run, dir, space)
followed by the derivative's own. Here: a subject's export (maps, tables,
changed series, each with a JSON sidecar), its status file, and the group
table. Every write is atomic (:mod:`dmriflow.interfaces.io`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from dmriflow.interfaces import io, stepfiles
from dmriflow.interfaces.bids_names import build_name, format_entities
from dmriflow.interfaces.harmonize import SIDECAR_KEY
from dmriflow.pipelines.inputs import assign_protocols
from dmriflow.interfaces.steps.base import (MAP_EXTENSION, MAP_SUFFIX, TABLE_EXTENSION,
                                            Derivative, product_from_record)

#: BIDS ``desc`` label of a DWI series changed by each step (joined in order).
SERIES_DESC = {"preprocess": "preproc", "motion": "moco", "harmonize": "harmonized"}
#: BIDS ``desc`` label of b-vectors fixed by the gradient check (``--fix-gradients``).
GRADFIX_DESC = "gradfix"
#: Suffix of a DWI series (and of its gradient files and sidecar).
SERIES_SUFFIX = "dwi"
#: Entities and suffix of a subject's status file.
STATUS_ENTITIES, STATUS_SUFFIX = {"desc": "dmriflow"}, "status"
#: Keys of a status row that are not columns of group/subjects.tsv.
ROW_ONLY = ("derivatives", "export_id")
#: Columns of group/subjects.tsv, in order (census fields follow "status").
STATUS_COLUMNS = ("subject", "status", "failed_step", "error", "qc_flags")


def subject_prefix(subject) -> str:
    """The entities text every name of a subject starts with: a subject unit's
    entities (``sub-01_ses-1_acq-multi``), or a given text."""
    return subject if isinstance(subject, str) else format_entities(subject)


def derivative_name(prefix: str, derivative: Derivative, table: bool = False) -> str:
    """``<prefix>_<entities>[_<suffix>]<extension>`` of one map or table."""
    suffix = derivative.suffix or ("" if table else MAP_SUFFIX)
    return f"{prefix}_" + build_name(derivative.entities, suffix,
                                     TABLE_EXTENSION if table else MAP_EXTENSION)


def sidecar_of(path: Path) -> Path:
    """The JSON sidecar beside a derivative (same name, ``.json``)."""
    stem = path.name[: -len(MAP_EXTENSION)] if path.name.endswith(MAP_EXTENSION) else path.stem
    return path.with_name(f"{stem}.json")


def sidecar(inputs: dict, params: dict, step: str, provenance: dict) -> dict:
    """A derivative's sidecar: the input hashes recorded by Validate (the content
    that was processed, not re-read) and the run's pipeline version."""
    extra = {k: v for k, v in provenance.items() if k != "PipelineVersion"}
    return io.sidecar(inputs, params, step, extra=extra, hashes=provenance.get("InputHashes"),
                      version=provenance.get("PipelineVersion") or None)


def export_file(src, dst: Path, inputs: dict, params: dict, step: str,
                provenance: dict) -> str:
    """Copy one derivative into place (atomically) beside its JSON sidecar."""
    io.copy_file(src, dst)
    meta = sidecar(inputs, params, step, provenance)
    meta["Sources"] = sorted(inputs.values())
    io.write_json(meta, sidecar_of(dst))
    return str(dst)


def export_product(product: dict, dwi_dir: Path, subject, inputs: dict,
                   provenance: dict) -> list[str]:
    """Export the maps and tables of a product record (see
    :class:`~dmriflow.interfaces.steps.base.Product`), each with a sidecar
    holding the product's parameters (and the file's own); ``subject``: the
    subject's entities (or their text). The caller merges the row."""
    p = product_from_record(product)
    prefix = subject_prefix(subject)
    jobs = [(d, False) for d in p.maps] + [(d, True) for d in p.tables]
    return [export_file(d.path, Path(dwi_dir) / derivative_name(prefix, d, table), inputs,
                        {**p.parameters, **d.parameters}, p.step, provenance)
            for d, table in jobs]


def export_series(record: dict, dwi_dir: Path, prefix: str, inputs: dict,
                  provenance: dict) -> list[str]:
    """Export the DWI series when a step changed it (preprocessing, harmonization)."""
    if not record.get("history"):
        return []
    desc = "".join(SERIES_DESC[h["step"]] for h in record["history"])
    base = f"{prefix}_" + build_name({"desc": desc}, SERIES_SUFFIX)
    series = record["series"]
    written = [str(io.copy_file(series[k], Path(dwi_dir, base + ext)))
               for k, ext in (("dwi", ".nii.gz"), ("bval", ".bval"), ("bvec", ".bvec"))]
    meta = sidecar(inputs, {"history": record["history"]}, desc, provenance)
    applied = [h for h in record["history"] if h["step"] == "harmonize"]
    if applied:
        meta[SIDECAR_KEY] = applied[-1]["applied"]
        meta["HarmonizationArtefact"] = applied[-1]["artefact"]
    io.write_json(meta, Path(dwi_dir, base + ".json"))
    return written + [str(Path(dwi_dir, base + ".json"))]


def export_fixed_bvec(record: dict, dwi_dir: Path, prefix: str, inputs: dict,
                      provenance: dict) -> list[str]:
    """The b-vectors with the gradient check's fix applied (``--fix-gradients``),
    when no exported series carries them already."""
    fixes = [p for p in record.get("provenance", []) if p["step"] == "gradient_fix"]
    if not fixes or record.get("history"):
        return []
    base = f"{prefix}_" + build_name({"desc": GRADFIX_DESC}, SERIES_SUFFIX)
    written = str(io.copy_file(record["series"]["bvec"], Path(dwi_dir, base + ".bvec")))
    io.write_json(sidecar(inputs, {"gradient_fix": fixes[-1]}, GRADFIX_DESC, provenance),
                  Path(dwi_dir, base + ".json"))
    return [written, str(Path(dwi_dir, base + ".json"))]


def record_maps(record: dict) -> dict:
    """The maps and tables series steps put into the record (preprocessing's
    MP-PCA noise map, the motion table), as a product record whose sidecars
    carry the history."""
    return {"step": "preprocess", "maps": record.get("maps", []),
            "tables": record.get("tables", []),
            "parameters": {"history": record["history"]}}


def export_id(*records, **fields) -> str:
    """Content id of an export: sha256 of everything Export writes from."""
    text = json.dumps([records, fields], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def previous_export(path: Path, eid: str) -> dict | None:
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


def status_path(output_dir, out_parts, key) -> Path:
    """OUTPUT/dmriflow/<out_parts>/<key>_desc-dmriflow_status.json."""
    return Path(output_dir, "dmriflow", *out_parts,
                f"{key}_" + build_name(STATUS_ENTITIES, STATUS_SUFFIX, ".json"))


def write_status(row: dict, output_dir, out_parts) -> dict:
    """Write a subject's status file (the last thing written for a subject)."""
    io.write_json(row, status_path(output_dir, out_parts, row["subject"]))
    return row


def failed_row(subject: str, step: str, error: str, pipeline_version: str) -> dict:
    return {"subject": subject, "status": "failed", "failed_step": step, "error": error,
            "derivatives": [], "pipeline_version": pipeline_version}


def write_subjects_table(rows: list[dict], output_dir) -> Path:
    """OUTPUT/dmriflow/group/subjects.tsv, one row per subject, and its sidecar."""
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


def export_subject(subject, record: dict, products: list[dict], output_dir,
                   pipeline_version: str) -> dict:
    """Write one subject's derivatives; its status row (without the status file).

    ``subject``: the engine's subject unit (``key``, ``out_parts``,
    ``entities``); ``products``: the product records of the steps it went
    through, in registry order. A failed record or product makes the row
    failed (its step and reason); an exception while writing fails the
    export.
    """
    row = {"subject": subject.key, "status": "done", "failed_step": "", "error": ""}
    failed = next((r for r in (record, *products) if r.get("status") == "failed"), None)
    if failed is not None:
        row.update(status="failed", failed_step=failed["failed_step"], error=failed["error"])
        if record.get("status") == "ok":
            row.update(record["census"])
        return {**row, "derivatives": []}
    dwi_dir = Path(output_dir, "dmriflow", *subject.out_parts, "dwi")
    prefix = subject_prefix(subject.entities)
    inputs = {k: v["path"] for k, v in record["inputs"].items()}
    provenance = {"InputHashes": {k: v["sha256"] for k, v in record["inputs"].items()},
                  "PipelineVersion": pipeline_version,
                  "ProcessingChain": stepfiles.processing_chain(record),
                  "InputQC": record.get("input_qc", {})}
    written = []
    if record.get("maps") or record.get("tables"):
        written += export_product(record_maps(record), dwi_dir, prefix, inputs, provenance)
    written += export_series(record, dwi_dir, prefix, inputs, provenance)
    written += export_fixed_bvec(record, dwi_dir, prefix, inputs, provenance)
    flags = list(record.get("qc_flags", []))
    for product in products:
        written += export_product(product, dwi_dir, prefix, inputs, provenance)
        row.update(product.get("row", {}))
        flags += product.get("qc_flags", [])
    row.update(mask_source=record["mask_source"], mask_voxels=record["mask_voxels"],
               qc_flags="; ".join(flags), warnings="; ".join(record.get("warnings", [])),
               **record.get("qc", {}), **record["census"])
    return {**row, "derivatives": written}
