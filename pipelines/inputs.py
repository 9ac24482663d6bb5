"""Cohort discovery (HCP and BIDS layouts) and the acquisition census.

Discovery only finds subjects and names their files; it never opens image
data, so a broken subject is still listed and fails later, in its own node,
with a clear reason. The census reads headers, b-values and sidecars only.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

from dmriflow.interfaces.bids_names import (ENTITY_SEP, INPUT_ENTITIES, build_name,
                                            format_entities, parse_name, split_extension)
from dmriflow.interfaces.errors import InputError, UsageError
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
    #: files claiming one series): it fails alone, before submission, with this reason.
    problem: str | None = None
    #: The series' entities besides subject and session (``{"run": "1"}``) that name
    #: the unit: set when its subject/session has several series, empty otherwise,
    #: so a subject with one series keeps the name it always had.
    series: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The unit's name (``sub-01_ses-1_run-1``), the stem of its status file,
        lock and group-table row."""
        return (f"sub-{self.label}" + (f"_ses-{self.session}" if self.session else "")
                + (ENTITY_SEP + format_entities(self.series) if self.series else ""))

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


def read_filter_file(path) -> dict:
    """The DWI entity filter of a pybids-style ``--bids-filter-file``:
    ``{"dwi": {"acquisition": "multi", "run": 1}}`` -> ``{"acq": "multi", "run": 1}``.

    Long entity names (pybids') and short ones (file names') are both accepted;
    a value may be a list (any of them) or null (the entity must be absent).
    Queries for other datatypes (``t1w``, ``fmap``) are ignored. A file that
    cannot be read or names an unknown entity is a usage error (exit 64, as a
    BIDS App's argument errors), naming the file.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"--bids-filter-file {path}: cannot read it ({exc})") from None
    query = doc.get(FILTER_DATATYPE, {}) if isinstance(doc, dict) else None
    if not isinstance(query, dict):
        raise UsageError(f'--bids-filter-file {path}: a BIDS filter file is a JSON object '
                         f'such as {{"{FILTER_DATATYPE}": {{"run": 1}}}}')
    wanted = {}
    for key, value in query.items():
        if key in ("datatype", "suffix", "extension"):
            continue
        short = ENTITY_SHORT.get(key, key)
        if short not in ENTITY_SHORT.values():
            raise UsageError(f"--bids-filter-file {path}: unknown BIDS entity {key!r}; "
                             f"known: {sorted(ENTITY_SHORT)}")
        wanted[short] = value
    return wanted


#: pybids' entity names -> the file-name keys (bids_names' grammar).
ENTITY_SHORT = {"subject": "sub", "session": "ses", "acquisition": "acq",
                "reconstruction": "rec", "direction": "dir", "run": "run", "space": "space",
                "echo": "echo", "part": "part", "chunk": "chunk", "desc": "desc"}


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


#: Extensions of a DWI image, and of the files that belong to it.
IMAGE_EXTENSIONS = (".nii.gz", ".nii")
COMPANION_EXTENSIONS = {"bval": ".bval", "bvec": ".bvec", "sidecar": ".json"}
#: Folders whose inheritance levels are remembered (a few per subject).
LEVELS_CACHE = 8192
#: The suffix of a DWI series' files (``sub-01_dwi.nii.gz``, ``sub-01_dwi.bval``).
DWI_SUFFIX = "dwi"


@dataclass(frozen=True)
class _Named:
    """A file of the dataset and the entities its name states (labels as written)."""

    path: Path
    entities: dict
    ext: str


def _index_dwi(root: Path) -> tuple[list[_Named], list[_Named], list[Path]]:
    """(DWI images, their .bval/.bvec/.json companions, DWI images whose name is
    outside the grammar) of a BIDS dataset.

    Files come from bids2table's index (imported here, so HCP input never pays
    for it); every name is parsed by :mod:`~dmriflow.interfaces.bids_names`, the
    grammar the derivative names are made with (not bids2table's parser, which
    skips a part that is not ``key-label``, nor its table, which casts
    ``run-01`` to 1), so a series' entities and its derivatives' names agree.
    A companion whose name is outside the grammar applies to no series. JSON sidecars,
    which bids2table leaves out of its index, are listed from the folders that
    can hold an applicable one (the series' folder up to the dataset root), and
    so are the root's ``[<entities>_]dwi.bval/.bvec/.json``, which apply to
    every series whose entities they share (bids2table indexes subject folders).
    """
    import bids2table  # noqa: PLC0415 - BIDS input only

    table = bids2table.index_dataset(root)
    images, companions, unnamed, folders = [], [], [], set()
    for rel in table.column("path").to_pylist() if table.num_rows else []:
        path = root / rel
        named = _named(path)
        image = path.parent.name == FILTER_DATATYPE and _dwi_image(path.name)
        if image and named is None:
            unnamed.append(path)
        elif named is None:
            continue
        elif image:
            images.append(named)
            folders.update(_levels(named.path, root))
        elif named.ext in COMPANION_EXTENSIONS.values():
            companions.append(named)
    sidecar = "_dwi" + COMPANION_EXTENSIONS["sidecar"]
    for folder in sorted(folders):       # a listing, not a glob: no pattern to compile
        with os.scandir(folder) as entries:
            for entry in entries:
                if folder == root:
                    named = _named(root / entry.name, subject=False)
                    if named is not None and named.ext in COMPANION_EXTENSIONS.values():
                        companions.append(named)
                elif entry.name.startswith("sub-") and entry.name.endswith(sidecar):
                    named = _named(folder / entry.name)
                    if named is not None:
                        companions.append(named)
    return (sorted(images, key=lambda n: n.path), sorted(companions, key=lambda n: n.path),
            sorted(unnamed))


def _dwi_image(name: str) -> bool:
    """Whether a file name ends as a DWI image's does (``..._dwi.nii[.gz]``)."""
    stem, ext = split_extension(name)
    return ext in IMAGE_EXTENSIONS and stem.endswith(ENTITY_SEP + DWI_SUFFIX)


def _named(path: Path, subject: bool = True) -> _Named | None:
    """A ``[<entities>_]dwi.*`` file of the grammar (:func:`parse_name`) with a
    subject entity when ``subject``, else None."""
    try:
        entities, suffix, ext = parse_name(path)
    except ValueError:
        return None
    if suffix != DWI_SUFFIX or (subject and not entities.get("sub")):
        return None
    return _Named(path, entities, ext)


def _levels(image: Path, root: Path) -> tuple[Path, ...]:
    """The folders whose files may apply to an image (BIDS inheritance): its own,
    then each parent up to the dataset root, nearest first."""
    return _folder_levels(image.parent, root)


@functools.lru_cache(maxsize=LEVELS_CACHE)
def _folder_levels(folder: Path, root: Path) -> tuple[Path, ...]:
    if folder == root or folder.parent == folder:
        return (folder,) if folder == root else ()
    return (folder,) + _folder_levels(folder.parent, root)


def _applies(companion: _Named, image: _Named) -> bool:
    """BIDS inheritance: a companion applies when its entities are a subset of
    the image's (same labels)."""
    return all(image.entities.get(k) == v for k, v in companion.entities.items())


def _companion(image: _Named, kind: str, by_folder: dict, root: Path):
    """(path, problem, files claimed) of an image's .bval/.bvec/.json: the file of
    the same name, else the nearest applicable one by BIDS inheritance; two
    applicable at the nearest level are a problem naming both (and both are
    claimed: neither is a stray file). Without one the path is the same-named
    file (absent, so the unit fails naming it)."""
    ext = COMPANION_EXTENSIONS[kind]
    stem, _ = split_extension(image.path.name)
    own = image.path.with_name(stem + ext)
    for folder in _levels(image.path, root):
        found = [c for c in by_folder.get(folder, []) if c.ext == ext and _applies(c, image)]
        if any(c.path == own for c in found):
            return own, None, [own]
        if len(found) == 1:
            return found[0].path, None, [found[0].path]
        if found:
            return own, (f"{len(found)} {ext} files apply to {image.path}: "
                         f"{', '.join(str(c.path) for c in found)}"), [c.path for c in found]
    return (None if kind == "sidecar" else own), None, []


def _folder_entities(path: Path, root: Path) -> dict:
    """The subject and session the folders of a path name (``sub-01/ses-1/dwi``)."""
    out = {}
    for part in path.relative_to(root).parts[:-1]:
        key, sep, value = part.partition("-")
        if sep and key in ("sub", "ses"):
            out[key] = value
    return out


#: Brain masks of derivative datasets, found for a DWI of the same folder whose
#: name (without ``_dwi``) they start with.
DERIVED_MASK = "*_desc-brain_mask.nii*"


def _derived_masks(root: Path) -> dict[Path, list[Path]]:
    """``derivatives/*/sub-*/[ses-*/]dwi/*_desc-brain_mask.nii*`` by their folder
    relative to the derivative dataset (one listing for the cohort, not one
    pattern per series: 1000 patterns cost ~1 s of compiling)."""
    found: dict[Path, list[Path]] = defaultdict(list)
    if not (root / "derivatives").is_dir():
        return found
    for pattern in (f"derivatives/*/sub-*/{FILTER_DATATYPE}/{DERIVED_MASK}",
                    f"derivatives/*/sub-*/ses-*/{FILTER_DATATYPE}/{DERIVED_MASK}"):
        for path in sorted(root.glob(pattern)):     # derivatives/<name>/<folder>/<mask>
            found[Path(*path.parent.relative_to(root).parts[2:])].append(path)
    return found


def discover_bids(input_dir, bids_filter: dict | None = None) -> list[SubjectInputs]:
    """One unit per DWI series (``sub-*/[ses-*/]dwi/*_dwi.nii[.gz]``, found by
    bids2table), with its .bval/.bvec/.json (same name, or inherited), restricted
    to the series whose entities match ``bids_filter``.

    A subject/session with several series (runs, directions, acquisitions) gives
    one unit each, named with the series' entities (:attr:`SubjectInputs.series`,
    decided before the filter, so a unit keeps its name whatever is selected).
    Problems fail the unit concerned only, naming the files: a DWI image whose
    name is outside the grammar (a unit of its folders' subject/session), a name whose
    subject or session differs from its folders', a .bval/.bvec no image takes
    (a unit of its own), several applicable .bval/.bvec/.json at one level, and
    several files claiming one unit (see :func:`_one_per_key`).

    A brain mask is taken from beside the DWI (:func:`beside_mask`) or from
    ``derivatives/*/sub-*/[ses-*/]dwi/*_desc-brain_mask.nii.gz``.
    """
    root = Path(input_dir).resolve()
    images, companions, unnamed = _index_dwi(root)
    by_folder: dict[Path, list[_Named]] = defaultdict(list)
    for c in companions:
        by_folder[c.path.parent].append(c)
    derived_masks = _derived_masks(root)
    taken = set()
    items = []              # (entities, SubjectInputs without its series names)
    for image in images:
        found = {kind: _companion(image, kind, by_folder, root) for kind in COMPANION_EXTENSIONS}
        taken.update(p for _, _, claimed in found.values() for p in claimed)
        problems = [why for _, why, _ in found.values() if why]
        folder = _folder_entities(image.path, root)
        if folder != {k: image.entities[k] for k in ("sub", "ses") if k in image.entities}:
            problems.append(f"{image.path}: its name's subject/session differs from its "
                            f"folder's ({format_entities(folder)})")
        stem, _ = split_extension(image.path.name)
        base = stem[: -len(ENTITY_SEP + DWI_SUFFIX)]
        masks = beside_mask(image.path, image.entities) or [     # labels checked by parse_name
            m for m in derived_masks.get(image.path.parent.relative_to(root), [])
            if m.name.startswith(base)]
        items.append((image.entities, SubjectInputs(
            label=folder.get("sub", image.entities["sub"]), session=folder.get("ses"),
            dwi=str(image.path), bval=str(found["bval"][0]), bvec=str(found["bvec"][0]),
            mask=str(masks[0]) if masks else None,
            sidecar=None if found["sidecar"][0] is None else str(found["sidecar"][0]),
            problem="; ".join(problems) or None)))
    for c in companions:
        if (c.ext != COMPANION_EXTENSIONS["sidecar"] and c.path not in taken
                and c.entities.get("sub")):     # a root file names no unit
            stem, _ = split_extension(c.path.name)
            items.append(_failed_unit(c.path.with_name(stem + IMAGE_EXTENSIONS[0]), root,
                                      c.entities, f"{c.path}: a {c.ext} file without the DWI "
                                                  f"image it belongs to"))
    for path in unnamed:        # its folders' subject/session: the only entities known
        folder = _folder_entities(path, root)
        if "sub" in folder:
            items.append(_failed_unit(path, root, folder, f"{path}: {UNNAMED}"))
    per_session = defaultdict(int)
    for _, unit in items:
        per_session[(unit.label, unit.session)] += 1
    units = []
    for entities, unit in items:
        if per_session[(unit.label, unit.session)] > 1:
            unit = replace(unit, series={k: entities[k] for k in SERIES_ENTITIES
                                         if k in entities})
        if not bids_filter or matches_filter(entities, bids_filter):
            units.append(unit)
    return units


#: Why a DWI image whose name is outside the grammar is not a series.
UNNAMED = ("not a BIDS name of a DWI series (sub-<label>[_<key>-<label>...]_dwi, "
           "alphanumeric labels); rename it")


def _failed_unit(dwi: Path, root: Path, entities: dict, problem: str):
    """(entities, unit) of a series that fails with ``problem``: its image ``dwi``
    and the gradient files of that name, of its folders' subject/session."""
    stem, _ = split_extension(dwi.name)
    folder = _folder_entities(dwi, root)
    return entities, SubjectInputs(
        label=folder.get("sub", entities.get("sub")), session=folder.get("ses"), dwi=str(dwi),
        bval=str(dwi.with_name(stem + COMPANION_EXTENSIONS["bval"])),
        bvec=str(dwi.with_name(stem + COMPANION_EXTENSIONS["bvec"])), problem=problem)


#: The input entities that name one series among a subject/session's several.
SERIES_ENTITIES = tuple(k for k in INPUT_ENTITIES if k not in ("sub", "ses"))


def _one_per_key(subjects: list[SubjectInputs], layout: str) -> list[SubjectInputs]:
    """One unit per name: several series (or folders) claiming one name (same
    entities, e.g. ``.nii`` beside ``.nii.gz`` or a ``desc-`` variant; two HCP
    folders mapping to one label) become one failed unit naming every file,
    so nobody else stops."""
    by_key: dict[str, list[SubjectInputs]] = {}
    for s in subjects:
        by_key.setdefault(s.key, []).append(s)
    units = []
    for key, found in by_key.items():
        if len(found) == 1:
            units.append(found[0])
            continue
        files = ", ".join(s.dwi for s in found)
        how = ("remove or rename all but one, or select one with --bids-filter-file "
               "(e.g. {\"dwi\": {\"desc\": \"preproc\"}})"
               if layout == "bids" else "rename or remove one of the folders")
        own = "".join(f"; {s.problem}" for s in found if s.problem)
        units.append(replace(found[0], problem=f"{len(found)} DWI files claim the unit "
                                               f"{key}: {files}; {how}{own}"))
    return units


def _normalise(labels, prefix: str) -> set[str]:
    return {str(lbl).removeprefix(prefix) for lbl in labels}


def unit_names(s: SubjectInputs, layout: str) -> set[str]:
    """The labels a unit answers to (without ``sub-``): its label, and for HCP
    its folder's own name, which may hold characters a BIDS label cannot
    (``100307_3T`` has the label ``1003073T``)."""
    names = {s.label}
    if layout == "hcp":
        names.add(Path(s.dwi).parents[len(HCP_DIFFUSION_DIR.parts)].name.removeprefix("sub-"))
    return names


#: Labels a usage error lists of those found (the first few).
SHOWN_LABELS = 10


def select_participants(subjects: list[SubjectInputs], labels, layout: str,
                        input_dir) -> list[SubjectInputs]:
    """The units ``labels`` name (each with or without ``sub-``; the label a unit
    maps to or the name its input uses, see :func:`unit_names`). A label that
    names no unit is a :class:`UsageError` naming it and some labels found."""
    wanted = _normalise(labels, "sub-")
    chosen = [s for s in subjects if unit_names(s, layout) & wanted]
    known = set().union(*(unit_names(s, layout) for s in subjects))
    unknown = [str(lbl) for lbl in labels if str(lbl).removeprefix("sub-") not in known]
    if unknown:
        found = sorted({s.label for s in subjects})
        raise UsageError(f"--participant-label {' '.join(unknown)}: no such subject in "
                         f"{input_dir} ({layout} layout; labels found: "
                         f"{', '.join(found[:SHOWN_LABELS]) or 'none'}"
                         f"{', ...' if len(found) > SHOWN_LABELS else ''})")
    return chosen


def _explain_filtered_out(input_dir, labels, kept: list[SubjectInputs], bids_filter) -> None:
    """When every label that selected nothing names a participant whose series
    the filter all left out, say that (a :class:`UsageError` naming the filter)
    rather than "no such subject". Indexes the dataset again: error path only."""
    found = {s.label for s in kept}
    missing = [str(lbl) for lbl in labels if str(lbl).removeprefix("sub-") not in found]
    everyone = {s.label for s in discover_bids(input_dir)}
    if missing and all(lbl.removeprefix("sub-") in everyone for lbl in missing):
        raise UsageError(f"--participant-label {' '.join(missing)}: the --bids-filter-file "
                         f"query {json.dumps(bids_filter)} selects none of "
                         f"{'its' if len(missing) == 1 else 'their'} DWI series in {input_dir}")


def discover(input_dir, layout: str = "auto",
             participant_labels: list[str] | None = None,
             session_labels: list[str] | None = None,
             bids_filter: dict | None = None) -> list[SubjectInputs]:
    """Units of a cohort folder (one per DWI series: an HCP subject, a BIDS
    series), optionally restricted to some participant and session labels
    (with or without ``sub-``/``ses-``) and, for BIDS, to the series a filter
    selects.

    Files that claim one unit (or two HCP folders mapping to one label) make
    that unit fail alone (:attr:`SubjectInputs.problem`), never the cohort.
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
        try:
            subjects = select_participants(subjects, participant_labels, layout, input_dir)
        except UsageError:
            if bids_filter:
                _explain_filtered_out(input_dir, participant_labels, subjects, bids_filter)
            raise
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
