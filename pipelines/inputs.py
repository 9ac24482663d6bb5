"""Cohort discovery (HCP and BIDS layouts) and the acquisition census.

Discovery only finds subjects and names their files; it never opens image
data, so a broken subject is still listed and fails later, in its own node,
with a clear reason. The census reads headers, b-values and sidecars only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from dmriflow.interfaces.bids_names import build_name, parse_name
from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.gradients import check_readable_file
# The census row and sidecar reader are step code (interfaces.io); read_sidecar
# stays importable from here for the pipeline's callers.
from dmriflow.interfaces.io import CENSUS_FIELDS, census_row, read_sidecar  # noqa: F401

#: HCP per-subject files, relative to the subject folder.
HCP_DIFFUSION_DIR = Path("T1w", "Diffusion")
HCP_FILES = {"dwi": "data.nii.gz", "bval": "bvals", "bvec": "bvecs",
             "mask": "nodif_brain_mask.nii.gz", "sidecar": "data.json"}
#: Voxel sizes and echo times are rounded to these before protocol grouping.
VOXEL_ROUNDING_MM = 0.05
TE_ROUNDING_MS = 1.0
#: The datatype a ``--bids-filter-file`` selects series of (pybids-style query).
FILTER_DATATYPE = "dwi"


@dataclass(frozen=True)
class SubjectInputs:
    """The files of one subject (or subject-session). ``key`` names outputs."""

    label: str                 # participant label without "sub-"
    dwi: str
    bval: str
    bvec: str
    mask: str | None = None
    sidecar: str | None = None
    session: str | None = None  # without "ses-"
    #: Why this unit cannot run, naming the files (found during discovery, e.g. two
    #: series for one subject): it fails alone, before submission, with this reason.
    problem: str | None = None

    @property
    def key(self) -> str:
        return f"sub-{self.label}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def out_parts(self) -> tuple[str, ...]:
        """Folder parts under OUTPUT/dmriflow/ for this subject's derivatives."""
        return (f"sub-{self.label}",) + ((f"ses-{self.session}",) if self.session else ())

    def check_files(self) -> None:
        """InputError naming the first required file that is missing or unreadable.

        Run before submission: the engine cannot even hash a missing file, so
        such a subject is reported without entering the task graph.
        """
        if self.problem:    # already names its files
            raise InputError(None, self.problem)
        for what in ("dwi", "bval", "bvec", "mask", "sidecar"):
            path = getattr(self, what)
            if path is not None or what in ("dwi", "bval", "bvec"):
                check_readable_file(path, {"dwi": "DWI"}.get(what, what))


def detect_layout(input_dir) -> str:
    root = Path(input_dir)
    if not root.is_dir():
        raise InputError(root, "input folder does not exist")
    if (root / "dataset_description.json").exists() or any(root.glob("sub-*/**/dwi")):
        return "bids"
    if any((d / HCP_DIFFUSION_DIR).is_dir() for d in root.iterdir() if d.is_dir()):
        return "hcp"
    raise InputError(root, "neither a BIDS dataset (sub-*/dwi) nor an HCP folder "
                           "(<subject>/T1w/Diffusion) was found")


def _optional(path: Path) -> str | None:
    return str(path) if path.exists() else None


def discover_hcp(input_dir) -> list[SubjectInputs]:
    root = Path(input_dir).resolve()
    subjects = []
    for d in sorted(p for p in root.iterdir() if (p / HCP_DIFFUSION_DIR).is_dir()):
        diff = d / HCP_DIFFUSION_DIR
        subjects.append(SubjectInputs(
            label=_bids_safe(d.name), dwi=str(diff / HCP_FILES["dwi"]),
            bval=str(diff / HCP_FILES["bval"]), bvec=str(diff / HCP_FILES["bvec"]),
            mask=_optional(diff / HCP_FILES["mask"]),
            sidecar=_optional(diff / HCP_FILES["sidecar"])))
    return subjects


def _bids_safe(name: str) -> str:
    label = re.sub(r"[^A-Za-z0-9]", "", name.removeprefix("sub-"))
    if not label:
        raise InputError(name, "subject folder name has no alphanumeric characters")
    return label


def _strip_ext(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def read_filter_file(path) -> dict:
    """The DWI entity filter of a pybids-style ``--bids-filter-file``:
    ``{"dwi": {"acquisition": "multi", "run": 1}}`` -> ``{"acq": "multi", "run": 1}``.

    Long entity names (pybids') and short ones (file names') are both accepted;
    a value may be a list (any of them) or null (the entity must be absent).
    Queries for other datatypes (``t1w``, ``fmap``) are ignored.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read the BIDS filter file ({exc})") from None
    query = doc.get(FILTER_DATATYPE, {}) if isinstance(doc, dict) else None
    if not isinstance(query, dict):
        raise InputError(path, f'a BIDS filter file is a JSON object such as '
                               f'{{"{FILTER_DATATYPE}": {{"run": 1}}}}')
    wanted = {}
    for key, value in query.items():
        if key in ("datatype", "suffix", "extension"):
            continue
        short = ENTITY_SHORT.get(key, key)
        if short not in ENTITY_SHORT.values():
            raise InputError(path, f"unknown BIDS entity {key!r}; known: "
                                   f"{sorted(ENTITY_SHORT)}")
        wanted[short] = value
    return wanted


#: pybids' entity names -> the file-name keys (bids_names' grammar).
ENTITY_SHORT = {"subject": "sub", "session": "ses", "acquisition": "acq",
                "reconstruction": "rec", "direction": "dir", "run": "run", "space": "space",
                "echo": "echo", "part": "part", "chunk": "chunk"}


def _same_label(value, label: str | None) -> bool:
    """A filter value matches an entity label; numbers match numerically (run 1 = run-01)."""
    if value is None:
        return label is None
    if isinstance(value, list):
        return any(_same_label(v, label) for v in value)
    if label is None:
        return False
    text = str(value).removeprefix("sub-").removeprefix("ses-")
    if text.isdigit() and label.isdigit():
        return int(text) == int(label)
    return text == label


def matches_filter(entities: dict, wanted: dict) -> bool:
    """True when a series' entities satisfy every entity of the filter."""
    return all(_same_label(value, entities.get(key)) for key, value in wanted.items())


#: Entities of a preprocessed series that its mask does not carry (QSIPrep writes
#: ``..._space-T1w_desc-preproc_dwi.nii.gz`` beside ``..._space-T1w_desc-brain_mask.nii.gz``).
MASK_DROPPED_ENTITIES = ("desc",)


def beside_mask(dwi: Path, entities: dict) -> list[Path]:
    """The BIDS-derivative brain mask beside a (preprocessed) DWI, as QSIPrep writes
    it: the series' own entities (``space-`` included) with ``desc-brain`` and
    suffix ``mask``, in the same folder; ``[]`` when there is none."""
    kept = {k: v for k, v in entities.items() if k not in MASK_DROPPED_ENTITIES}
    found = []
    for ext in (".nii.gz", ".nii"):
        candidate = dwi.with_name(build_name({**kept, "desc": "brain"}, "mask", ext))
        if candidate.is_file():
            found.append(candidate)
    return found


def discover_bids(input_dir, bids_filter: dict | None = None) -> list[SubjectInputs]:
    """``sub-*/[ses-*/]dwi/*_dwi.nii[.gz]`` with .bval/.bvec/.json beside,
    restricted to the series whose entities match ``bids_filter``.

    A brain mask is taken from ``derivatives/*/sub-*/[ses-*/]dwi/
    *_desc-brain_mask.nii.gz`` when present. File names are read with
    :func:`~dmriflow.interfaces.bids_names.parse_name`.
    """
    root = Path(input_dir).resolve()
    subjects = []
    for dwi in sorted(root.glob("sub-*/**/dwi/*_dwi.nii*")):
        if "derivatives" in dwi.relative_to(root).parts:
            continue
        try:
            entities, suffix, ext = parse_name(dwi)
        except ValueError:
            continue
        if suffix != "dwi" or ext not in (".nii", ".nii.gz") or not entities.get("sub"):
            continue
        if bids_filter and not matches_filter(entities, bids_filter):
            continue
        stem = _strip_ext(dwi)
        base = dwi.with_name(stem[: -len("_dwi")])
        masks = beside_mask(dwi, entities) or sorted(
            root.glob(f"derivatives/*/{dwi.parent.relative_to(root)}/"
                      f"{base.name}*_desc-brain_mask.nii*"))
        subjects.append(SubjectInputs(
            label=entities["sub"], session=entities.get("ses"),
            dwi=str(dwi), bval=str(dwi.with_name(stem + ".bval")),
            bvec=str(dwi.with_name(stem + ".bvec")),
            mask=str(masks[0]) if masks else None,
            sidecar=_optional(dwi.with_name(stem + ".json"))))
    return subjects


def _one_per_key(subjects: list[SubjectInputs], layout: str) -> list[SubjectInputs]:
    """One unit per subject/session: several series (or folders) for one key
    become one failed unit naming every file, so nobody else stops."""
    by_key: dict[str, list[SubjectInputs]] = {}
    for s in subjects:
        by_key.setdefault(s.key, []).append(s)
    units = []
    for key, found in by_key.items():
        if len(found) == 1:
            units.append(found[0])
            continue
        files = ", ".join(s.dwi for s in found)
        how = ("select one with --bids-filter-file (e.g. {\"dwi\": {\"run\": 1}})"
               if layout == "bids" else "rename or remove one of the folders")
        units.append(replace(found[0], problem=f"{len(found)} DWI series map to {key}: "
                                               f"{files}; {how}"))
    return units


def _normalise(labels, prefix: str) -> set[str]:
    return {str(lbl).removeprefix(prefix) for lbl in labels}


def discover(input_dir, layout: str = "auto",
             participant_labels: list[str] | None = None,
             session_labels: list[str] | None = None,
             bids_filter: dict | None = None) -> list[SubjectInputs]:
    """Units (subject or subject-session) of a cohort folder, optionally
    restricted to some participant and session labels (with or without
    ``sub-``/``ses-``) and, for BIDS, to the series a filter selects.

    A label that maps to several series is one unit that fails alone
    (:attr:`SubjectInputs.problem`), never the whole cohort.
    """
    if layout == "auto":
        layout = detect_layout(input_dir)
    if layout not in ("hcp", "bids"):
        raise ValueError(f"unknown layout {layout!r} (hcp, bids or auto)")
    if layout == "hcp" and bids_filter:
        raise ValueError("--bids-filter-file applies to BIDS input only")
    subjects = discover_hcp(input_dir) if layout == "hcp" else discover_bids(input_dir,
                                                                             bids_filter)
    if participant_labels:
        wanted = _normalise(participant_labels, "sub-")
        unknown = wanted - {s.label for s in subjects}
        if unknown:
            raise InputError(input_dir, f"participant label(s) not found: {sorted(unknown)}")
        subjects = [s for s in subjects if s.label in wanted]
    if session_labels:
        wanted = _normalise(session_labels, "ses-")
        subjects = [s for s in subjects if s.session in wanted]
    subjects = _one_per_key(subjects, layout)
    if not subjects:
        raise InputError(input_dir, f"no subjects found in the {layout} layout"
                         + (" for the selected labels and filter"
                            if session_labels or bids_filter else ""))
    return subjects


# ----------------------------------------------------------------------------
# Acquisition census
# ----------------------------------------------------------------------------
def _protocol_key(row: dict) -> tuple:
    zooms = tuple(round(float(z) / VOXEL_ROUNDING_MM) for z in str(row["voxel_size_mm"]).split("x"))
    field, te = row["field_strength_t"], row["echo_time_ms"]
    return (None if pd.isna(field) else float(field), row["shells"], row["directions"], zooms,
            None if pd.isna(te) else round(float(te) / TE_ROUNDING_MS))


def assign_protocols(df: pd.DataFrame) -> pd.DataFrame:
    """Add a ``protocol`` column: P1, P2, ... by decreasing group size.

    Groups share field strength, shells, directions per shell, voxel size and
    TE; rows without census fields (unreadable input) get "unreadable".
    """
    df = df.copy()
    readable = df["shells"].notna() if "shells" in df.columns else pd.Series(False, df.index)
    keys = [_protocol_key(r) for r in df[readable].to_dict("records")]
    counts = pd.Series(keys, dtype=object).value_counts(sort=True)
    names = {k: f"P{i + 1}" for i, k in enumerate(counts.index)}
    df["protocol"] = "unreadable"
    df.loc[readable, "protocol"] = [names[k] for k in keys]
    return df


def census(subjects: list[SubjectInputs], row_of=None) -> pd.DataFrame:
    """One row per subject with acquisition facts and a protocol group.

    Subjects whose headers or gradients cannot be read keep empty fields and
    the reason in ``census_error``. ``row_of(subject)`` reads a subject's facts
    (default: :func:`census_row` of its files; a run passes a cached one).
    """
    rows = []
    for s in subjects:
        row = {"subject": s.key, "census_error": ""}
        try:
            if s.problem:
                raise InputError(None, s.problem)
            row.update(row_of(s) if row_of else census_row(s.dwi, s.bval, s.bvec, s.sidecar))
        except InputError as exc:
            row.update({f: None for f in CENSUS_FIELDS}, census_error=str(exc))
        rows.append(row)
    return assign_protocols(pd.DataFrame(rows))


def subjects_to_json(subjects: list[SubjectInputs]) -> list[dict]:
    return [asdict(s) | {"key": s.key} for s in subjects]


def site_labels(subjects: list[SubjectInputs], by: str = "protocol",
                table: str | os.PathLike | None = None) -> dict[str, str]:
    """Site (group) of each subject: its census protocol group, or a TSV column.

    ``by="protocol"`` uses :func:`census`; any other value names a column of
    ``table`` (a participants.tsv-style file with a ``participant_id`` column,
    with or without the ``sub-`` prefix). Every subject must have a value.
    """
    if by == "protocol":
        df = census(subjects)
        return dict(zip(df["subject"], df["protocol"]))
    if table is None or not Path(table).is_file():
        raise InputError(table, f"a subject table with a {by!r} column is needed "
                                f"to group subjects by {by!r}")
    df = pd.read_csv(table, sep="\t", dtype=str)
    if "participant_id" not in df.columns or by not in df.columns:
        raise InputError(table, f"needs columns 'participant_id' and {by!r}; has "
                                f"{list(df.columns)}")
    sites = {"sub-" + str(p).removeprefix("sub-"): v for p, v in zip(df["participant_id"], df[by])}
    missing = [s.key for s in subjects if not isinstance(sites.get(f"sub-{s.label}"), str)]
    if missing:
        raise InputError(table, f"no {by!r} value for {missing}")
    return {s.key: sites[f"sub-{s.label}"] for s in subjects}
