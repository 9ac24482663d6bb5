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

An entry holds the digest and the state's key, so :func:`prune` (the run's
upkeep) can drop the entries of states that are gone: one entry per file
state would otherwise be kept for ever.
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
#: Bytes of an entry read at most: the digest and a state key (a path of up to
#: Linux's PATH_MAX and four numbers); a longer one is cut, so never a hit.
ENTRY_MAX = DIGEST_SIZE + 8192


def hash_folder() -> Path:
    """Pydra's persistent hash cache folder (its environment variable, or its default)."""
    from pydra.utils.hash import PersistentCache
    return Path(PersistentCache.location_default())


def state_key(path) -> bytes:
    """The key of a file's present state: path, size, mtime, inode, ctime."""
    st = os.stat(path)
    return b"%s\0%d\0%d\0%d\0%d" % (os.fsencode(os.path.abspath(path)), st.st_size,
                                   st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def _read(entry) -> bytes | None:
    """An entry's bytes (at most ENTRY_MAX), None when there is none (plain system
    calls: a cached rerun reads one per input file, the upkeep every one)."""
    try:
        fd = os.open(entry, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, ENTRY_MAX)
    finally:
        os.close(fd)


def content_digest(path: Path) -> bytes:
    """blake2b digest of a file's bytes."""
    h = blake2b(digest_size=DIGEST_SIZE, person=PERSON)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.digest()


def file_digest(path, folder: Path | None = None) -> bytes:
    """A file's content digest, from the hash folder when its state was seen before.

    The entry is the digest followed by the state's key (read back by :func:`prune`)."""
    folder = hash_folder() if folder is None else folder
    key = state_key(path)
    entry = folder / (ENTRY_PREFIX + blake2b(key, digest_size=20).hexdigest())
    stored = _read(entry)
    if stored is not None and stored[DIGEST_SIZE:] == key:
        return stored[:DIGEST_SIZE]
    digest = content_digest(path)
    if state_key(path) != key:         # changed while read: stored under neither state
        return digest
    store(entry, digest + key)
    return digest


def _live(key: bytes) -> bool:
    """Whether the file of a recorded state key is still in that state."""
    path = key.partition(b"\0")[0]
    try:
        return bool(path) and state_key(path) == key
    except OSError:             # the file is gone (or no longer reachable)
        return False


def prune(folder: Path) -> int:
    """Remove the entries of file states that no longer exist; returns how many.

    An entry is dropped when its file is gone or the file's present state
    (size, mtime, inode, ctime) is not the recorded one: no lookup can hit it
    again, as a lookup's key is the file's present state, so a process running
    beside the pruning never loses an entry it may need. Entries that record
    no state (an earlier version's, which only that version reads) go too.
    """
    removed = 0
    try:
        listing = os.scandir(folder)
    except FileNotFoundError:
        return 0
    with listing:
        for item in listing:
            if not item.name.startswith(ENTRY_PREFIX):
                continue
            stored = _read(item.path)
            if stored is not None and not _live(stored[DIGEST_SIZE:]):
                Path(item.path).unlink(missing_ok=True)
                removed += 1
    return removed


def store(entry: Path, data: bytes) -> None:
    """Write an entry whole: under a temporary name, then renamed into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, entry)
