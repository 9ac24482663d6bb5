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
import os
from pathlib import Path

import pandas as pd

from dmriflow.interfaces import __version__, io, stepfiles
from dmriflow.interfaces.bids_names import build_name, format_entities
from dmriflow.interfaces.harmonize import SIDECAR_KEY
from dmriflow.pipelines.inputs import HCP_DIFFUSION_DIR, assign_protocols
from dmriflow.pipelines.progress import ABSOLUTE_PATH
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
#: The derivative dataset's folder under OUTPUT: its root. Status files list
#: their derivatives relative to it, so OUTPUT can move.
DATASET_DIR = "dmriflow"
#: Name of the input dataset in dataset_description.json's DatasetLinks; the
#: sidecars name input files by the BIDS URI ``bids:raw:<path in INPUT>``.
RAW_DATASET = "raw"
RAW_URI = f"bids:{RAW_DATASET}:"
#: BEP016 ``Units`` of each map ``param``, as the maps are stored (the tensor is
#: fitted with b in s/mm^2, so diffusivities are in mm^2/s; RISH features are
#: of the b0-normalised signal; S0 is in the scanner's signal units).
MAP_UNITS = {"fa": "unitless", "md": "mm^2/s", "ad": "mm^2/s", "rd": "mm^2/s",
             "s0": "arbitrary", "v1": "unitless"}
#: ``Units`` of every map of a model (RISH: of the b0-normalised signal).
MODEL_UNITS = {"rish": "unitless"}
#: The V1 map: its ``param`` label, and the frame its vectors are in (the
#: b-vectors' frame, see :mod:`dmriflow.interfaces.gradients`), stated in its
#: sidecar in BEP016's ``OrientationEncoding`` terms.
V1_PARAM = "v1"
V1_FRAME = {
    "OrientationEncoding": {"Type": "unitvector", "EncodingAxis": 3, "Reference": "bvec"},
    "OrientationFrame": (
        "FSL image frame, as the input .bvec: components along the voxel axes i, j, k of "
        "this image (4th axis: x, y, z component), with the i component negated when the "
        "determinant of the affine's 3x3 part is positive; sign arbitrary; 0 outside the "
        "mask and where the fit failed. To world (RAS+) frame: flip i if det > 0, then "
        "apply the affine's rotation/zooms and normalise, as MRtrix3 does for bvecs."),
}
#: Parent folders of the running node searched for a moved cache's files.
CACHE_SEARCH_DEPTH = 3
#: BIDS version the derivative dataset follows.
BIDS_VERSION = "1.10.0"
DESCRIPTION_FILE = "dataset_description.json"
#: Container detection: the tag our Dockerfile sets, Apptainer/Singularity's
#: own variables (with the container type BIDS records), Docker's marker file.
CONTAINER_TAG_ENV = "DMRIFLOW_CONTAINER_TAG"
APPTAINER_ENV = (("APPTAINER_CONTAINER", "apptainer"), ("SINGULARITY_CONTAINER", "singularity"))
DOCKERENV = "/.dockerenv"
#: Folders between an HCP input root and a subject's files (subject/T1w/Diffusion).
HCP_DEPTH = len(Path(HCP_DIFFUSION_DIR).parts) + 1


def dataset_root(output_dir) -> Path:
    """OUTPUT/dmriflow: the root of the derivative dataset."""
    return Path(output_dir, DATASET_DIR)


def recorded_path(path: str, output_dir) -> str:
    """An absolute path found in a text OUTPUT keeps (an error, a warning) as OUTPUT
    records paths: inside the derivative dataset relative to its root; an input
    file (under a ``sub-*`` or HCP ``T1w/Diffusion`` folder) as its ``bids:raw:``
    URI; anything else by its name."""
    root = dataset_root(output_dir)
    rel = os.path.relpath(path, root)
    if not rel.startswith(os.pardir):
        return Path(rel).as_posix()
    parts = Path(path).parts
    hcp = HCP_DIFFUSION_DIR.parts
    if any(p.startswith("sub-") for p in parts[:-1]) or any(
            parts[i:i + len(hcp)] == hcp for i in range(len(parts))):
        return input_uri(path, input_root(path))
    return Path(path).name


def recorded_text(text: str, output_dir) -> str:
    """``text`` with every absolute path as :func:`recorded_path` names it."""
    return ABSOLUTE_PATH.sub(lambda m: recorded_path(m.group(0), output_dir), text)


def recorded_values(values: dict, output_dir) -> dict:
    """A row (status file, table) whose texts hold no absolute path."""
    return {k: recorded_text(v, output_dir) if isinstance(v, str) else v
            for k, v in values.items()}


def recorded_frame(df: pd.DataFrame, output_dir) -> pd.DataFrame:
    """A table (census, group table) whose texts hold no absolute path."""
    df = df.copy()
    for col in df.columns:
        if any(isinstance(v, str) for v in df[col]):
            df[col] = [recorded_text(v, output_dir) if isinstance(v, str) else v
                       for v in df[col]]
    return df


def relative_derivative(path, output_dir) -> str:
    """A written derivative's path relative to :func:`dataset_root` (POSIX)."""
    return Path(os.path.relpath(path, dataset_root(output_dir))).as_posix()


#: URI scheme of a file shipped inside the installed dmriflow package (a model
#: checkpoint): ``dmriflow:models/checkpoints/<name>``.
PACKAGE_URI = "dmriflow:"


def external_path(path, output_dir) -> str:
    """How OUTPUT records a file that is neither an input nor a derivative (a
    harmonization artefact, a model checkpoint), never as an absolute path: a
    file of the installed package as ``dmriflow:<path in the package>``, else
    its path relative to :func:`dataset_root` (POSIX; ``harmonization/<id>``
    for an artefact fitted into this OUTPUT)."""
    path = Path(path).resolve()
    package = Path(__file__).resolve().parents[1]
    if path.is_relative_to(package):
        return PACKAGE_URI + path.relative_to(package).as_posix()
    return Path(os.path.relpath(path, Path(dataset_root(output_dir)).resolve())).as_posix()


def derivative_file(entry, output_dir) -> Path:
    """The file a status row's derivative entry names, under the current OUTPUT
    (entries of older runs are absolute and used as they are)."""
    return Path(entry) if os.path.isabs(entry) else dataset_root(output_dir) / entry


def input_root(path) -> Path:
    """The input dataset root of one of a subject's input files: the folder
    above its ``sub-*`` folder (BIDS), else above ``<subject>/T1w/Diffusion`` (HCP)."""
    p = Path(path)
    if p.name.startswith("sub-"):
        subject = next((a for a in p.parents if a.name.startswith("sub-")), None)
        if subject is not None:
            return subject.parent
    return p.parents[min(HCP_DEPTH, len(p.parents) - 1)]


def input_uri(path, root) -> str:
    """``bids:raw:<path relative to the input root>`` of an input file (a file
    outside the root keeps only its name, never an absolute path)."""
    rel = os.path.relpath(path, root)
    if rel.startswith(os.pardir):
        rel = Path(path).name
    return RAW_URI + Path(rel).as_posix()


def subject_prefix(subject) -> str:
    """The entities text every name of a subject starts with: a subject unit's
    entities (``sub-01_ses-1_acq-multi``), or a given text."""
    return subject if isinstance(subject, str) else format_entities(subject)


def derivative_name(prefix: str, derivative: Derivative, table: bool = False) -> str:
    """``<prefix>_<entities>[_<suffix>]<extension>`` of one map or table."""
    suffix = derivative.suffix or ("" if table else MAP_SUFFIX)
    return f"{prefix}_" + build_name(derivative.entities, suffix,
                                     TABLE_EXTENSION if table else MAP_EXTENSION)


def container() -> dict | None:
    """BIDS ``GeneratedBy[].Container`` of the image this process runs in: the
    tag our Dockerfile sets in :data:`CONTAINER_TAG_ENV`; Apptainer/Singularity
    from their own variables; any other Docker container from /.dockerenv."""
    tag = os.environ.get(CONTAINER_TAG_ENV, "")
    for var, kind in APPTAINER_ENV:
        if os.environ.get(var):
            return {"Type": kind, "Tag": tag or Path(os.environ[var]).name}
    if tag or Path(DOCKERENV).exists():
        return {"Type": "docker", **({"Tag": tag} if tag else {})}
    return None


def dataset_description(source_uri: str) -> dict:
    """OUTPUT/dmriflow/dataset_description.json: a BIDS derivative dataset
    generated by this dmriflow, from the input dataset, linked as ``raw`` at
    ``source_uri`` (a path relative to OUTPUT/dmriflow)."""
    generated = {"Name": "dmriflow", "Version": __version__}
    image = container()
    if image:
        generated["Container"] = image
    return {"Name": "dmriflow derivatives", "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative", "GeneratedBy": [generated],
            "SourceDatasets": [{"URL": RAW_URI}],
            "DatasetLinks": {RAW_DATASET: source_uri}}


def write_dataset_description(output_dir, source_uri: str) -> Path:
    """Write the dataset description (atomically), unless the same one is there."""
    path = dataset_root(output_dir) / DESCRIPTION_FILE
    text = json.dumps(dataset_description(source_uri), indent=2, sort_keys=True) + "\n"
    try:
        if path.read_text() == text:
            return path
    except OSError:
        pass
    return io.write_text(text, path)


def source_uri(subjects, output_dir) -> str:
    """The input dataset's path relative to OUTPUT/dmriflow (POSIX); its folder
    name when no relative path exists (another drive); ``"."`` without subjects."""
    if not subjects:
        return "."
    root = input_root(subjects[0].dwi)
    try:
        return Path(os.path.relpath(root, dataset_root(output_dir))).as_posix()
    except ValueError:
        return root.name


def plan_entry(subject) -> dict:
    """A subject's entry in group/cohort.json: its key, output folders and input
    files (as ``bids:raw:`` URIs, so the plan holds no absolute path)."""
    files = {k: getattr(subject, k) for k in ("dwi", "bval", "bvec", "mask", "sidecar")}
    root = input_root(subject.dwi)
    return {"label": subject.label, "session": subject.session, "key": subject.key,
            "out_parts": list(subject.out_parts),
            **{k: input_uri(p, root) if p else None for k, p in files.items()}}


def cache_file(path) -> str:
    """A file a cached node wrote, where it is now.

    Node results record absolute paths; after OUTPUT (with its cache) or the
    cache folder moved, a result served from the cache names the old place.
    The step running now sits in a node folder of the current cache, so the
    same node folder and file are looked up under its parent folders (the
    shortest tail first: ``<node folder>/<file>``).
    """
    p = Path(path)
    if p.exists():
        return str(path)
    for root in list(Path.cwd().parents)[:CACHE_SEARCH_DEPTH]:
        for start in range(len(p.parts) - 2, 0, -1):
            candidate = root.joinpath(*p.parts[start:])
            if candidate.exists():
                return str(candidate)
    return str(path)          # not found: the copy names the recorded path


def sidecar_of(path: Path) -> Path:
    """The JSON sidecar beside a derivative (same name, ``.json``)."""
    stem = path.name[: -len(MAP_EXTENSION)] if path.name.endswith(MAP_EXTENSION) else path.stem
    return path.with_name(f"{stem}.json")


def sidecar(inputs: dict, params: dict, step: str, provenance: dict) -> dict:
    """A derivative's sidecar: the input hashes recorded by Validate (the content
    that was processed, not re-read) and the run's pipeline version. Inputs
    are named by BIDS URI (``provenance["InputURIs"]``), never by absolute path."""
    extra = {k: v for k, v in provenance.items() if k not in ("PipelineVersion", "InputURIs")}
    meta = io.sidecar(inputs, params, step, extra=extra, hashes=provenance.get("InputHashes"),
                      version=provenance.get("PipelineVersion") or None)
    uris = provenance.get("InputURIs", {})
    for key, entry in meta["Inputs"].items():
        entry["path"] = uris.get(key, Path(entry["path"]).name)
    return meta


def map_fields(step: str, derivative: Derivative | None) -> dict:
    """BEP016 fields of a map's sidecar: its model, and units and frame where known."""
    if derivative is None:
        return {}
    param = derivative.entities.get("param", "")
    model = derivative.entities.get("model", step)
    fields = {"Model": model}
    units = MODEL_UNITS.get(model) or (MAP_UNITS.get(param) if model == "tensor" else None)
    if units:
        fields["Units"] = units
    if param == V1_PARAM:
        fields.update(V1_FRAME)
    return fields


def export_file(src, dst: Path, inputs: dict, params: dict, step: str,
                provenance: dict, derivative: Derivative | None = None) -> str:
    """Copy one derivative into place (atomically) beside its JSON sidecar."""
    io.copy_file(cache_file(src), dst)
    meta = sidecar(inputs, params, step, provenance)
    meta["Sources"] = sorted(meta["Inputs"][k]["path"] for k in meta["Inputs"])
    meta.update(map_fields(step, derivative))
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
                        {**p.parameters, **d.parameters}, p.step, provenance,
                        None if table else d)
            for d, table in jobs]


def export_series(record: dict, dwi_dir: Path, prefix: str, inputs: dict,
                  provenance: dict, output_dir, artefact: str = "") -> list[str]:
    """Export the DWI series when a step changed it (preprocessing, harmonization);
    a harmonization artefact is named by :func:`external_path`, at ``artefact``
    (where the run's artefact is now) when given."""
    if not record.get("history"):
        return []
    history = [{**h, "artefact": external_path(artefact or h["artefact"], output_dir)}
               if "artefact" in h else h for h in record["history"]]
    desc = "".join(SERIES_DESC[h["step"]] for h in record["history"])
    base = f"{prefix}_" + build_name({"desc": desc}, SERIES_SUFFIX)
    series = record["series"]
    written = [str(io.copy_file(cache_file(series[k]), Path(dwi_dir, base + ext)))
               for k, ext in (("dwi", ".nii.gz"), ("bval", ".bval"), ("bvec", ".bvec"))]
    meta = sidecar(inputs, {"history": history}, desc, provenance)
    applied = [h for h in history if h["step"] == "harmonize"]
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
    written = str(io.copy_file(cache_file(record["series"]["bvec"]),
                               Path(dwi_dir, base + ".bvec")))
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


def previous_export(path: Path, eid: str, output_dir) -> dict | None:
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
    done = all(derivative_file(d, output_dir).exists() for d in row.get("derivatives", []))
    return row if done else None


def _written_by_dmriflow(sidecar: Path) -> bool:
    """Whether a JSON file is a sidecar dmriflow wrote (``GeneratedBy[0].Name``)."""
    try:
        meta = json.loads(sidecar.read_text())
        return meta["GeneratedBy"][0]["Name"] == "dmriflow"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False


def listed_files(row: dict, output_dir, out_parts) -> list[Path]:
    """The files an earlier status row lists that are dmriflow's to remove: its
    derivatives that are regular files (not links) inside this subject's own
    folder of the current OUTPUT, and the dmriflow sidecar beside each."""
    folder = dataset_root(output_dir).joinpath(*out_parts).resolve()
    found: list[Path] = []
    for entry in row.get("derivatives", []) if isinstance(row, dict) else []:
        path = derivative_file(str(entry), output_dir)
        try:
            inside = path.parent.resolve().is_relative_to(folder)
        except OSError:
            continue
        if not inside or path.is_symlink() or not path.is_file():
            continue
        side = sidecar_of(path)
        extra = [side] if side != path and side.is_file() and not side.is_symlink() \
            and _written_by_dmriflow(side) else []
        found += [p for p in (path, *extra) if p not in found]
    return found


def retire_export(status_file: Path, output_dir, out_parts) -> int:
    """Remove a subject's earlier export before it is redone: the files its
    status file lists (:func:`listed_files`), then the status file. A rerun
    thus never leaves files of an older run beside the new ones (e.g. names of
    an older naming scheme); files the status file does not list (the user's)
    are not touched. Files go first, so a run killed meanwhile leaves a status
    file whose missing derivatives make ``status`` report the subject missing
    and the next run redo it. Returns the number of files removed."""
    try:
        row = json.loads(Path(status_file).read_text())
    except (OSError, ValueError):
        row = {}
    files = listed_files(row, output_dir, out_parts)
    for path in files:
        path.unlink(missing_ok=True)
    Path(status_file).unlink(missing_ok=True)
    return len(files)


def status_path(output_dir, out_parts, key) -> Path:
    """OUTPUT/dmriflow/<out_parts>/<key>_desc-dmriflow_status.json."""
    return Path(output_dir, "dmriflow", *out_parts,
                f"{key}_" + build_name(STATUS_ENTITIES, STATUS_SUFFIX, ".json"))


def write_status(row: dict, output_dir, out_parts) -> dict:
    """Write a subject's status file (the last thing written for a subject)."""
    io.write_json(recorded_values(row, output_dir),
                  status_path(output_dir, out_parts, row["subject"]))
    return row


def failed_row(subject: str, step: str, error: str, pipeline_version: str) -> dict:
    return {"subject": subject, "status": "failed", "failed_step": step, "error": error,
            "derivatives": [], "pipeline_version": pipeline_version}


def write_subjects_table(rows: list[dict], output_dir) -> Path:
    """OUTPUT/dmriflow/group/subjects.tsv, one row per subject, and its sidecar."""
    df = assign_protocols(pd.DataFrame([recorded_values({k: v for k, v in r.items()
                                                         if k not in ROW_ONLY}, output_dir)
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
                   pipeline_version: str, artefact: str = "") -> dict:
    """Write one subject's derivatives; its status row (without the status file).

    ``subject``: the engine's subject unit (``key``, ``out_parts``,
    ``entities``); ``products``: the product records of the steps it went
    through, in registry order; ``artefact``: see :func:`export_series`. A
    failed record or product makes the row
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
    root = input_root(record["inputs"]["dwi"]["path"])
    provenance = {"InputHashes": {k: v["sha256"] for k, v in record["inputs"].items()},
                  "InputURIs": {k: input_uri(p, root) for k, p in inputs.items() if p},
                  "PipelineVersion": pipeline_version,
                  "ProcessingChain": stepfiles.processing_chain(record),
                  "InputQC": record.get("input_qc", {})}
    written = []
    if record.get("maps") or record.get("tables"):
        written += export_product(record_maps(record), dwi_dir, prefix, inputs, provenance)
    written += export_series(record, dwi_dir, prefix, inputs, provenance, output_dir, artefact)
    written += export_fixed_bvec(record, dwi_dir, prefix, inputs, provenance)
    flags = list(record.get("qc_flags", []))
    for product in products:
        written += export_product(product, dwi_dir, prefix, inputs, provenance)
        row.update(product.get("row", {}))
        flags += product.get("qc_flags", [])
    if "mask" in provenance["InputURIs"]:    # a given mask, named by its BIDS URI
        row["mask_file"] = provenance["InputURIs"]["mask"]
    row.update(mask_source=record["mask_source"], mask_voxels=record["mask_voxels"],
               qc_flags="; ".join(flags), warnings="; ".join(record.get("warnings", [])),
               **record.get("qc", {}), **record["census"])
    return {**row, "derivatives": [relative_derivative(w, output_dir) for w in written]}
