"""Compare the derivatives of two dmriflow output folders, file by file.

    python scripts/compare_derivatives.py OLD_OUTPUT NEW_OUTPUT

Every file under ``OLD/dmriflow`` must have a counterpart under
``NEW/dmriflow`` whose name has the same BIDS entities, or more (a name may
only GAIN entities), in the same folder. Counterparts are compared:

* NIfTI (``.nii``/``.nii.gz``): the decompressed bytes (header and data; the
  gzip wrapper's time stamp is not part of the image);
* JSON: the parsed documents, after dropping :data:`IGNORED_KEYS` (they
  change with the code or the clock, not with the result) and writing both
  output roots as ``OUTPUT`` (and mapped names as the old ones); the list of
  a status file's ``derivatives`` is compared as a set (its order is the
  order of writing);
* TSV: the cells, without the :data:`IGNORED_KEYS` columns;
* anything else (TSV, bval/bvec, PNG): the bytes, with the same path mapping
  for text.

Files under :data:`SKIPPED` (run logs, locks, the HTML report, which embeds
the run's time) are not compared. Prints one line per difference and a
summary; exit status 0 when every old file has an identical counterpart.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

#: JSON keys whose values legitimately change between two runs of different
#: code: the pipeline version (a hash of the package source), the export's
#: content id (it hashes the records and that version) and start times.
IGNORED_KEYS = {"PipelineVersion", "pipeline_version", "PipelineVersions", "export_id",
                "started", "steps"}
#: JSON lists compared as sets (their order is the order files were written in).
SET_KEYS = {"derivatives"}
#: Not compared: per-run logs, engine lock files, the report (it embeds the run time).
SKIPPED = (re.compile(r"(^|/)logs/"), re.compile(r"\.lock$"), re.compile(r"report\.html$"))
#: A BIDS entity ``key-value`` in a file name.
ENTITY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9.]+)$")


def split_name(name: str) -> tuple[frozenset, str, str]:
    """(entities, suffix, extension) of a BIDS-like file name."""
    stem, _, ext = name.partition(".")
    parts = stem.split("_")
    suffix = "" if ENTITY.match(parts[-1]) else parts.pop()
    return frozenset(parts), suffix, ext


def counterpart(old: Path, new_files: dict[Path, list[Path]]) -> Path | None:
    """The new file in the same folder with a superset of the old name's entities."""
    ents, suffix, ext = split_name(old.name)
    candidates = [p for p in new_files.get(old.parent, [])
                  if split_name(p.name)[1:] == (suffix, ext) and ents <= split_name(p.name)[0]]
    exact = [p for p in candidates if split_name(p.name)[0] == ents]
    chosen = exact or sorted(candidates, key=lambda p: len(p.name))
    return chosen[0] if chosen else None


def _strip(doc, renames: dict[str, str]):
    """A JSON document without IGNORED_KEYS, with new names written as the old."""
    if isinstance(doc, dict):
        return {k: sorted(_strip(v, renames)) if k in SET_KEYS else _strip(v, renames)
                for k, v in doc.items() if k not in IGNORED_KEYS}
    if isinstance(doc, list):
        return [_strip(v, renames) for v in doc]
    if isinstance(doc, str):
        return _rename(doc, renames)
    return doc


def _rename(text: str, renames: dict[str, str]) -> str:
    for new, old in renames.items():
        text = text.replace(new, old)
    return text


def _tsv_columns(text: str) -> list[list[str]]:
    """A TSV's rows without the IGNORED_KEYS columns (e.g. pipeline_version)."""
    rows = [line.split("\t") for line in text.splitlines()]
    keep = [i for i, c in enumerate(rows[0] if rows else []) if c not in IGNORED_KEYS]
    return [[r[i] for i in keep if i < len(r)] for r in rows]


def _content(path: Path, root: Path, renames: dict[str, str]):
    """What is compared of one file (see the module docstring)."""
    name = path.name
    if name.endswith(".nii.gz"):
        return gzip.decompress(path.read_bytes())
    raw = path.read_bytes()
    if name.endswith((".json", ".tsv", ".bval", ".bvec", ".txt")):
        text = raw.decode().replace(str(root), "OUTPUT")
        if name.endswith(".json"):
            return _strip(json.loads(text), renames)
        if name.endswith(".tsv"):
            return _tsv_columns(_rename(text, renames))
        return _rename(text, renames)
    return raw


def compare(old_root: Path, new_root: Path) -> tuple[list[str], dict[str, str], int]:
    """(differences, old name -> new name where renamed, files compared)."""
    old_root, new_root = old_root.resolve(), new_root.resolve()
    old_base, new_base = old_root / "dmriflow", new_root / "dmriflow"
    old_files = _files(old_root)
    new_by_dir: dict[Path, list[Path]] = {}
    for p in _files(new_root):
        new_by_dir.setdefault(p.parent, []).append(p)
    mapping = {rel: counterpart(rel, new_by_dir) for rel in old_files}
    renames = {new.name: old.name for old, new in mapping.items() if new and new != old}
    problems = []
    for old, new in sorted(mapping.items()):
        if new is None:
            problems.append(f"MISSING  {old} (no new file with these entities or more)")
            continue
        a = _content(old_base / old, old_root, {})
        b = _content(new_base / new, new_root, renames)
        if a != b:
            problems.append(f"DIFFERS  {old}" + (f" -> {new}" if new != old else ""))
    return problems, {str(o): str(n) for o, n in mapping.items() if n and n != o}, len(mapping)


def _files(root: Path) -> list[Path]:
    base = root / "dmriflow"
    return [p.relative_to(base) for p in sorted(base.rglob("*")) if p.is_file()
            and not any(s.search(str(p.relative_to(base))) for s in SKIPPED)]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 64
    problems, renamed, n = compare(Path(argv[0]), Path(argv[1]))
    for old, new in sorted(renamed.items()):
        print(f"RENAMED  {old} -> {new}")
    for line in problems:
        print(line)
    print(f"{n} file(s) compared: {n - len(problems)} identical, {len(problems)} "
          f"differ or missing, {len(renamed)} renamed (entities gained)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
