"""One pass over a compressed input: decompress, verify the gzip trailer, hash.

nibabel stops reading a ``.nii.gz`` once it has the voxels it needs and never
reads the gzip trailer, so a flipped bit (CRC mismatch, one voxel silently
wrong) goes unnoticed, and every step that re-reads the file pays for the
decompression again (25 s per HCP subject). :func:`decompress_and_hash`
reads the compressed file once, in blocks: the sha256 of the file's bytes,
the inflated bytes written to an uncompressed copy, and every gzip member's
CRC32 and length checked against its trailer (by the codec's gzip reader).
Concatenated members (``cat a.gz b.gz``, pigz -i) are read like ``gzip -dc``
does.

The codec is ISA-L's (the ``isal`` package, 2-3x zlib on inflate; its gzip
reader is C and inflates straight into the caller's buffer); the standard
library's gzip reader (zlib) when it is not installed, with identical
results and checks.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from dataclasses import dataclass

from . import parallel

try:  # ISA-L bindings: a C gzip reader, about 2.3x faster to inflate than zlib
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - exercised where isal is not installed
    _igzip = _isal_zlib = None

#: wbits of a gzip stream (header + deflate + CRC32/ISIZE trailer) for zlib.
GZIP_WBITS = 16 + zlib.MAX_WBITS
#: Compressed bytes read per block (measured on an HCP subject, ISA-L: 6.4 s
#: CPU with 1 MiB, 6.5 s with 4 MiB; within noise).
READ_BLOCK = 1 << 20
#: Inflated bytes per hand-over to ``write``: one buffer of this size, reused.
#: Measured on an HCP subject (1.64 GB gz, 4.21 GB out, ISA-L): 6.5 s CPU for
#: 256 KiB, 6.6-6.7 s for 64 KiB-1 MiB, 6.8-6.9 s for 4 MiB; the former
#: 16 MiB pieces, fresh bytes each, cost 9.5 s (realloc, 1.2 M page faults).
OUT_BLOCK = 256 << 10
#: Inflated bytes per read when inflating straight into the caller's buffers
#: (``inflate(into=)``): no reused buffer to keep in cache, so larger reads pay
#: (Validate's read of an HCP subject, two rounds: 256 KiB 6.85-6.93 s wall,
#: 1 MiB 6.62-6.67 s, 4 MiB 6.71-6.73 s).
INTO_BLOCK = 1 << 20
#: Compressed blocks (copies of up to READ_BLOCK bytes) waiting between the
#: thread that inflates and the one that hashes them (``inflate(n_threads=2)``).
HASH_QUEUE_DEPTH = 4
#: Name of the thread that inflates beside the hash (``inflate(n_threads=2)``).
INFLATE_THREAD = "dmriflow-inflate"
#: Magic bytes of a gzip member.
GZIP_MAGIC = b"\x1f\x8b"


def _zlib_reader(raw, read_block: int):
    return gzip.GzipFile(fileobj=io.BufferedReader(raw, read_block), mode="rb")


def _isal_reader(raw, read_block: int):
    # the C reader igzip.IGzipFile wraps (a private name of isal 1.9, the lock's):
    # its readinto inflates straight into the caller's buffer and reads
    # ``read_block`` at a time (IGzipFile(fileobj=raw): 6.45-6.56 s CPU on the
    # HCP floor against 6.42, but with its own read size)
    return _isal_zlib._GzipReader(raw, read_block)


#: Codec names as recorded (``CODECS[name](raw, read_block)`` is its gzip
#: reader of the binary file ``raw``, read ``read_block`` bytes at a time: all
#: members, CRC32 and length checked, ``readinto``).
CODECS = {"zlib": _zlib_reader}
if _isal_zlib is not None and hasattr(_isal_zlib, "_GzipReader"):
    CODECS["isal"] = _isal_reader   # (a release without it falls back to zlib)
#: The codec used when none is named: the fastest one installed.
DEFAULT_CODEC = "isal" if "isal" in CODECS else "zlib"
#: What the readers raise on damaged data (both raise gzip.BadGzipFile on a
#: CRC/length mismatch or a bad header, EOFError on a truncated stream, their
#: codec's error on corrupt deflate data); an OSError of the disk is not one.
_READER_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error) + (
    (_isal_zlib.error,) if _isal_zlib is not None else ())


#: gzip level of the .nii.gz files dmriflow writes: the fastest of each codec
#: (ISA-L level 1 writes an FA map 5x faster than zlib level 1, nibabel's
#: default, and as small).
WRITE_LEVEL = 1


class gzip_writer:
    """``with gzip_writer(path) as fh``: a binary file object writing gzip at
    :data:`WRITE_LEVEL` (ISA-L, else zlib), with no name and time 0 in the gzip
    header (as nibabel writes), so equal data give equal files."""

    def __init__(self, path):
        self.raw = open(path, "wb")
        kind = _igzip.IGzipFile if _igzip is not None else gzip.GzipFile
        self.fh = kind(filename="", mode="wb", compresslevel=WRITE_LEVEL, fileobj=self.raw,
                       mtime=0)

    def __enter__(self):
        return self.fh

    def __exit__(self, *exc):
        try:
            self.fh.close()
        finally:
            self.raw.close()


class CorruptGzipError(ValueError):
    """The compressed stream is corrupt or truncated (message says which)."""


@dataclass(frozen=True)
class Decoded:
    """What one pass over a compressed file found."""

    sha256: str          # of the compressed file, as stored
    compressed_bytes: int
    raw_bytes: int       # bytes written (the uncompressed file's size)
    codec: str


def is_gzip(path) -> bool:
    """True when the file starts with the gzip magic (whatever its name says)."""
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def decompress_and_hash(src, dst, codec: str = DEFAULT_CODEC, block: int = OUT_BLOCK,
                        read_block: int = READ_BLOCK) -> Decoded:
    """Inflate gzip file ``src`` into file ``dst`` (see :func:`inflate`)."""
    with open(dst, "wb") as fout:
        return inflate(src, fout.write, codec, block, read_block)


class _HashingReader(io.RawIOBase):
    """A binary file read through ``readinto``, every byte read counted and
    added to a sha256 on the way (the codec's reader reads the file through
    it: one pass gives the inflated bytes and the file's hash). ``take``: what
    gets each block read (a memoryview valid during the call); default: the
    sha256's update."""

    def __init__(self, fh):
        self.fh, self.sha, self.n = fh, hashlib.sha256(), 0
        self.take = self.sha.update

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.fh.readinto(b)
        if n:
            self.take(memoryview(b)[:n])
            self.n += n
        return n


def inflate(src, write, codec: str = DEFAULT_CODEC, block: int | None = None,
            read_block: int = READ_BLOCK, n_threads: int = 1, into=None) -> Decoded:
    """Inflate gzip file ``src`` (every member, as ``gzip -dc``) through the
    codec's gzip reader, checking every member's CRC32 and length, and hash
    ``src``'s bytes (sha256) in the same read (of ``read_block`` bytes at a
    time).

    The bytes are inflated into one buffer of ``block`` bytes, reused, and
    ``write`` gets a memoryview of its filled part (at most ``block`` bytes):
    valid only during the call, so ``write`` copies what it keeps. Raises
    :class:`CorruptGzipError` on a CRC/length mismatch, a deflate error, a
    truncated stream, trailing bytes that are not a gzip member (zero padding
    is allowed) or an empty file. The bytes before a fault reach ``write``
    first, but for the last ones the reader had inflated ahead: up to a
    ``block``, and with ISA-L some tens of KiB when ``block`` is small (48 KiB
    measured with 4 KiB blocks and 1 MiB reads; 7 KiB with 4 KiB reads).
    ``write`` may raise to stop early (the file is closed).

    ``into``: a callable giving the writable memoryview (never empty) that the
    next bytes are inflated straight into, at most ``block`` of it; ``write``
    then gets the filled part of that very view, so a caller cutting the
    stream into its own buffers copies nothing (an HCP series: 0.5 s less for
    the inflating thread, the copy of 4.2 GB out of the reused buffer).
    ``block`` defaults to :data:`OUT_BLOCK`, with ``into`` :data:`INTO_BLOCK`.

    ``n_threads`` 2 or more: the inflate (and ``write``) runs in a second
    thread (:data:`INFLATE_THREAD`) and the calling thread hashes copies of
    the compressed blocks as they are read, in file order, at most
    :data:`HASH_QUEUE_DEPTH` waiting (:func:`parallel.produce_consume`: the
    same hash, bytes and errors; the thread ended on every error). Below 2:
    all in the calling thread, no copy.
    """
    if block is None:
        block = OUT_BLOCK if into is None else INTO_BLOCK
    n_out = 0
    with open(src, "rb", buffering=0) as fh:
        raw = _HashingReader(fh)

        def produce(emit) -> None:
            nonlocal n_out
            # emit: the sha256's update when serial, else the hand-over to it
            raw.take = emit if n_threads < 2 else (lambda view: emit(bytes(view)))
            buf = memoryview(bytearray(block)) if into is None else None
            reader = CODECS[codec](raw, read_block)
            while True:
                if into is not None:
                    buf = into()[:block]
                    if not len(buf):
                        raise ValueError("inflate: into() gave an empty buffer")
                try:
                    n = reader.readinto(buf)
                except _READER_ERRORS as exc:
                    raise CorruptGzipError(f"{_describe(exc)} (after {n_out} inflated bytes, "
                                           f"read up to compressed byte {raw.n}; "
                                           f"{codec}: {exc})") from None
                if not n:
                    break
                write(buf[:n])
                n_out += n

        parallel.produce_consume(produce, raw.sha.update, HASH_QUEUE_DEPTH, n_threads,
                                 name=INFLATE_THREAD)
    if raw.n == 0:
        raise CorruptGzipError("the file is empty")
    return Decoded(sha256=raw.sha.hexdigest(), compressed_bytes=raw.n, raw_bytes=n_out,
                   codec=codec)


def _describe(exc: Exception) -> str:
    """The reader's error in words (ISA-L's and the stdlib's readers raise
    the same classes: gzip.BadGzipFile for a bad header or trailer)."""
    if isinstance(exc, EOFError):
        return "the gzip stream is truncated (a member has no end)"
    text = str(exc).lower()
    if "crc check" in text or "length of data" in text:
        return "CRC32/length check failed (the data are damaged)"
    return "corrupt deflate data"


def sha256_file(path, block: int = READ_BLOCK) -> str:
    """sha256 of a file's bytes, read in blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while buf := fh.read(block):
            sha.update(buf)
    return sha.hexdigest()
