"""Cohort discovery (HCP and BIDS layouts) and the acquisition census.

Discovery only finds subjects and names their files; it never opens image
data, so a broken subject is still listed and fails later, in its own node,
with a clear reason. The census reads headers, b-values and sidecars only.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

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
_BIDS_DWI = re.compile(r"^(sub-[A-Za-z0-9]+)(?:_(ses-[A-Za-z0-9]+))?(?:_[a-z]+-[A-Za-z0-9]+)*_dwi\.nii(\.gz)?$")


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


def discover_bids(input_dir) -> list[SubjectInputs]:
    """``sub-*/[ses-*/]dwi/*_dwi.nii[.gz]`` with .bval/.bvec/.json beside.

    A brain mask is taken from ``derivatives/*/sub-*/[ses-*/]dwi/
    *_desc-brain_mask.nii.gz`` when present.
    """
    root = Path(input_dir).resolve()
    subjects = []
    for dwi in sorted(root.glob("sub-*/**/dwi/*_dwi.nii*")):
        if "derivatives" in dwi.relative_to(root).parts:
            continue
        m = _BIDS_DWI.match(dwi.name)
        if not m:
            continue
        stem = _strip_ext(dwi)
        base = dwi.with_name(stem[: -len("_dwi")])
        masks = sorted(root.glob(f"derivatives/*/{dwi.parent.relative_to(root)}/"
                                 f"{base.name}*_desc-brain_mask.nii*"))
        subjects.append(SubjectInputs(
            label=m.group(1)[4:], session=m.group(2)[4:] if m.group(2) else None,
            dwi=str(dwi), bval=str(dwi.with_name(stem + ".bval")),
            bvec=str(dwi.with_name(stem + ".bvec")),
            mask=str(masks[0]) if masks else None,
            sidecar=_optional(dwi.with_name(stem + ".json"))))
    return subjects


def discover(input_dir, layout: str = "auto",
             participant_labels: list[str] | None = None) -> list[SubjectInputs]:
    """Subjects of a cohort folder, optionally restricted to some labels."""
    if layout == "auto":
        layout = detect_layout(input_dir)
    if layout not in ("hcp", "bids"):
        raise ValueError(f"unknown layout {layout!r} (hcp, bids or auto)")
    subjects = discover_hcp(input_dir) if layout == "hcp" else discover_bids(input_dir)
    keys = [s.key for s in subjects]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise InputError(input_dir, f"several DWI series for {dup}: select one acquisition "
                                    f"per subject/session")
    if participant_labels:
        wanted = {lbl.removeprefix("sub-") for lbl in participant_labels}
        unknown = wanted - {s.label for s in subjects}
        if unknown:
            raise InputError(input_dir, f"participant label(s) not found: {sorted(unknown)}")
        subjects = [s for s in subjects if s.label in wanted]
    if not subjects:
        raise InputError(input_dir, f"no subjects found in the {layout} layout")
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


def census(subjects: list[SubjectInputs]) -> pd.DataFrame:
    """One row per subject with acquisition facts and a protocol group.

    Subjects whose headers or gradients cannot be read keep empty fields and
    the reason in ``census_error``.
    """
    rows = []
    for s in subjects:
        row = {"subject": s.key, "census_error": ""}
        try:
            row.update(census_row(s.dwi, s.bval, s.bvec, s.sidecar))
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
