"""A subject's census row from the hash folder when its files' content was seen before.

The census (one row of acquisition facts per subject: a NIfTI header, the
gradients, the sidecar) is taken on every run; for a cohort of 1000 subjects
that was 2-3 s of a cached rerun. A row depends only on the content of those
files and on the code, so it is kept in the hash folder under the content
digests of the files (:mod:`~dmriflow.pipelines.file_hashes`, computed once
per file state and needed for the engine's keys anyway) and the pipeline
version; entries are written whole and read without a lock.
"""

from __future__ import annotations

import json
from hashlib import blake2b
from pathlib import Path

from dmriflow.interfaces.io import census_row
from dmriflow.pipelines.file_hashes import file_digest, store

#: Entry names: this prefix and the hex digest of the files' digests and the version.
ENTRY_PREFIX = "dmriflow-census-"


def census_files(subject) -> list:
    """The files a census row is read from (the sidecar when there is one)."""
    return [subject.dwi, subject.bval, subject.bvec] + ([subject.sidecar] if subject.sidecar
                                                        else [])


def cached_row_of(folder: Path, version: str):
    """A ``row_of(subject)`` for :func:`~dmriflow.pipelines.inputs.census` that
    keeps rows in ``folder``; a subject whose files cannot be read is left to
    :func:`~dmriflow.interfaces.io.census_row` (its error is the census error)."""
    def row_of(subject) -> dict:
        try:
            digests = [file_digest(p, folder) for p in census_files(subject)]
        except OSError:
            return census_row(subject.dwi, subject.bval, subject.bvec, subject.sidecar)
        key = blake2b(version.encode() + b"".join(digests), digest_size=20).hexdigest()
        entry = folder / f"{ENTRY_PREFIX}{key}.json"
        try:
            return json.loads(entry.read_text())
        except (FileNotFoundError, ValueError):
            pass
        row = census_row(subject.dwi, subject.bval, subject.bvec, subject.sidecar)
        store(entry, json.dumps(row).encode())
        return row
    return row_of
