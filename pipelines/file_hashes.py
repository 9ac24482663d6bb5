"""Content hashes of a subject's input files for the engine's cache keys, without lock files.

Pydra hashes a ``File`` input by its content and keeps the hash in its
persistent hash cache, keyed by (path, mtime), taking a soft lock file per
lookup: about 1 ms a file, so seconds for the 5000 files of a 1000-subject
cohort on every run, even when nothing is recomputed. Here a
:class:`~dmriflow.pipelines.steps.Subject` is hashed with its files' content
digests kept in the same folder (Pydra's ``PYDRA_HASH_CACHE``, inside the cache
root during a run), one entry per file state, read without any lock: an entry
is written whole under a temporary name and renamed into place (two processes
computing the same entry write the same bytes). The key of a file state is
stricter than Pydra's: path, size, mtime, inode and ctime, so a file rewritten
in place with its mtime set back (``touch -d``) still gets a new digest.
"""

from __future__ import annotations

import os
import secrets
from hashlib import blake2b
from pathlib import Path

#: Entry names: this prefix and the hex digest of the file state's key.
ENTRY_PREFIX = "dmriflow-file-"
#: Digest bytes of a file's content (as Pydra's own hashes).
DIGEST_SIZE = 16
#: Bytes read at a time when a file is hashed.
CHUNK = 1 << 22
#: Distinguishes these digests from any other blake2b use.
PERSON = b"dmriflow-file"


def hash_folder() -> Path:
    """Pydra's persistent hash cache folder (its environment variable, or its default)."""
    from pydra.utils.hash import PersistentCache
    return Path(PersistentCache.location_default())


def state_key(path: Path) -> str:
    """The key of a file's present state: path, size, mtime, inode, ctime."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}"


def content_digest(path: Path) -> bytes:
    """blake2b digest of a file's bytes."""
    h = blake2b(digest_size=DIGEST_SIZE, person=PERSON)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.digest()


def file_digest(path, folder: Path | None = None) -> bytes:
    """A file's content digest, from the hash folder when its state was seen before."""
    folder = hash_folder() if folder is None else folder
    key = state_key(path)
    entry = folder / (ENTRY_PREFIX + blake2b(key.encode(), digest_size=20).hexdigest())
    try:
        stored = entry.read_bytes()
        if len(stored) == DIGEST_SIZE:
            return stored
    except FileNotFoundError:
        pass
    digest = content_digest(path)
    if state_key(path) != key:         # changed while read: not stored under either state
        return digest
    store(entry, digest)
    return digest


def store(entry: Path, data: bytes) -> None:
    """Write an entry whole: under a temporary name, then renamed into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, entry)
