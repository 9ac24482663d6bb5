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

The digest is BLAKE3 in its key-derivation mode (``derive_key_context``, the
BLAKE3 specification's way to separate one application's hashes from every
other use): the 1.64 GB HCP series hashes in 0.56 s of CPU against blake2b's 2.1 s.
Entries of the earlier blake2b digests (:data:`OLD_ENTRY_PREFIX`) are never
read as BLAKE3 ones (another name prefix) and are removed by :func:`prune`.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
from hashlib import blake2b
from pathlib import Path

from blake3 import blake3

from dmriflow.interfaces.parallel import available_threads, produce_consume

#: Entry names: this prefix and the hex digest of the file state's key.
ENTRY_PREFIX = "dmriflow-blake3-"
#: Entry names of dmriflow's earlier blake2b content digests (this prefix and 40
#: hex digits, the same layout): never read, removed by :func:`prune`.
OLD_ENTRY_PREFIX = "dmriflow-file-"
OLD_ENTRY_NAME = re.compile(re.escape(OLD_ENTRY_PREFIX) + "[0-9a-f]{40}")
#: Digest bytes of a file's content (as Pydra's own hashes).
DIGEST_SIZE = 16
#: BLAKE3 key-derivation context of these digests ("hardcoded, globally unique,
#: application-specific", as the BLAKE3 specification asks): no other BLAKE3
#: use gives the same digest of the same bytes.
CONTEXT = "dmriflow 2026-12-06 input file content digest v1"
#: Bytes read at a time when a file is hashed (into reused buffers: one, or READ_AHEAD + 2).
CHUNK = 1 << 22
#: Blocks a large file's reading thread may be ahead of the hash (4 MiB 0.35-0.38 s,
#: 8 MiB 0.34-0.38 s, 16 MiB 0.39-0.84 s for the HCP series at depth 2).
READ_AHEAD = 2
#: Files from this size on are hashed by several threads (BLAKE3 splits a file
#: into 1 KiB chunks hashed independently); below it one thread is as fast
#: (2 cores, best of 30: 4 MiB 0.61 ms on one thread, 0.66 ms on two; 16 MiB
#: 2.36 ms, 1.40 ms; the 1.64 GB HCP file 0.36 s, 0.30 s, the same CPU time).
THREADED_MIN = 1 << 24
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
    """BLAKE3 digest (key-derivation mode, :data:`CONTEXT`) of a file's bytes,
    its first DIGEST_SIZE bytes; a large file over the threads this process may use.

    The file is read in CHUNK blocks, not memory-mapped: a mapped file that
    another process truncates would end this process with SIGBUS, naming no
    file (the map was 0.59-0.66 s for the 1.64 GB HCP series against the
    serial read-then-hash loop's 0.75-0.92 s, both under load 3.3). A large
    file is read in a second thread while this one hashes the block before
    (:func:`parallel.produce_consume`; HCP series 0.56-0.66 -> 0.35-0.38 s:
    the read alone is 0.31 s), through READ_AHEAD + 2 buffers, so no block is
    overwritten before it is hashed. A file changed in place while read gives
    a digest stored under neither state (:func:`file_digest`)."""
    threads = available_threads() if os.stat(path).st_size >= THREADED_MIN else 1
    h = blake3(derive_key_context=CONTEXT, max_threads=threads)
    buffers = [bytearray(CHUNK) for _ in range(READ_AHEAD + 2 if threads > 1 else 1)]

    def read(emit) -> None:
        with open(path, "rb", buffering=0) as fh:
            for i in itertools.count():
                buf = buffers[i % len(buffers)]
                if not (n := fh.readinto(buf)):
                    return
                emit(memoryview(buf)[:n])
    produce_consume(read, h.update, READ_AHEAD, n_threads=threads, name="dmriflow-digest-read")
    return h.digest(DIGEST_SIZE)


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
    no state (an earlier version's, which only that version reads) go too, and
    so do the blake2b entries of earlier versions (:data:`OLD_ENTRY_NAME`).
    """
    removed = 0
    try:
        listing = os.scandir(folder)
    except FileNotFoundError:
        return 0
    with listing:
        for item in listing:
            if OLD_ENTRY_NAME.fullmatch(item.name):
                Path(item.path).unlink(missing_ok=True)
                removed += 1
                continue
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
