"""One pass over a compressed input: decompress, verify the gzip trailer, hash.

nibabel stops reading a ``.nii.gz`` once it has the voxels it needs and never
reads the gzip trailer, so a flipped bit (CRC mismatch, one voxel silently
wrong) goes unnoticed, and every step that re-reads the file pays for the
decompression again (25 s per HCP subject). :func:`decompress_and_hash`
reads the compressed file once, in blocks: the sha256 of the file's bytes,
the inflated bytes written to an uncompressed copy, and every gzip member's
CRC32 and length checked against its trailer (by the codec, with
``wbits = GZIP_WBITS``). Concatenated members (``cat a.gz b.gz``, pigz -i)
are read like ``gzip -dc`` does.

The codec is ISA-L's (the ``isal`` package, 2-3x zlib on inflate); plain
zlib when it is not installed, with identical results and checks.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

import gzip

try:  # ISA-L bindings: same API as zlib's decompressobj, about 2.3x faster to inflate
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - exercised where isal is not installed
    _igzip = _isal_zlib = None

#: wbits of a gzip stream (header + deflate + CRC32/ISIZE trailer) for decompressobj.
GZIP_WBITS = 16 + zlib.MAX_WBITS
#: Compressed bytes read per block (large enough to amortise the calls, small
#: enough to stay in cache-friendly buffers: measured flat from 1 to 16 MiB).
READ_BLOCK = 4 << 20
#: Most bytes inflated per call: bounds the buffers (a phantom's zeros inflate
#: 1000-fold) without slowing the HCP read.
OUT_BLOCK = 16 << 20
#: Magic bytes of a gzip member.
GZIP_MAGIC = b"\x1f\x8b"
#: Codec names as recorded (``CODECS[name]`` is its decompressobj factory).
CODECS = {"zlib": zlib.decompressobj}
if _isal_zlib is not None:
    CODECS["isal"] = _isal_zlib.decompressobj
#: The codec used when none is named: the fastest one installed.
DEFAULT_CODEC = "isal" if "isal" in CODECS else "zlib"
#: Exceptions each codec raises on corrupt data (CRC, length, deflate errors).
_CODEC_ERRORS = (zlib.error,) + ((_isal_zlib.error,) if _isal_zlib is not None else ())


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
    members: int         # gzip members read
    codec: str


def is_gzip(path) -> bool:
    """True when the file starts with the gzip magic (whatever its name says)."""
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def decompress_and_hash(src, dst, codec: str = DEFAULT_CODEC,
                        block: int = READ_BLOCK) -> Decoded:
    """Inflate gzip file ``src`` into file ``dst`` (see :func:`inflate`)."""
    with open(dst, "wb") as fout:
        return inflate(src, fout.write, codec, block)


def inflate(src, write, codec: str = DEFAULT_CODEC, block: int = READ_BLOCK) -> Decoded:
    """Inflate gzip file ``src``, handing the bytes to ``write`` in pieces of at
    most OUT_BLOCK, checking every member's CRC32 and length, and hash
    ``src``'s bytes (sha256) in the same read.

    Raises :class:`CorruptGzipError` on a CRC/length mismatch, a deflate
    error, a truncated stream or trailing bytes that are not a gzip member
    (zero padding is allowed). ``write`` may raise to stop early.
    """
    new = CODECS[codec]
    sha = hashlib.sha256()
    n_in = n_out = members = 0
    d = None          # the current member's decompressor (None between members)
    with open(src, "rb") as fin:
        while buf := fin.read(block):
            sha.update(buf)
            n_in += len(buf)
            while buf:
                if d is None:
                    if members:  # zero padding after a member is allowed (as gzip.open)
                        buf = buf.lstrip(b"\0")
                        if not buf:
                            break
                    d, members = new(wbits=GZIP_WBITS), members + 1
                try:
                    out = d.decompress(buf, OUT_BLOCK)
                except _CODEC_ERRORS as exc:
                    raise CorruptGzipError(f"{_describe(exc)} in gzip member {members} "
                                           f"(read up to compressed byte {n_in}; "
                                           f"{codec}: {exc})") from None
                write(out)
                n_out += len(out)
                if d.eof:  # the trailer checked out: the rest may be another member
                    buf, d = d.unused_data, None
                else:
                    buf = d.unconsumed_tail
    while d is not None and not d.eof:  # output held back by OUT_BLOCK at the end
        out = d.decompress(b"", OUT_BLOCK)
        if not out:
            break
        write(out)
        n_out += len(out)
    if d is not None and not d.eof:
        raise CorruptGzipError(f"the gzip stream is truncated (member {members} has no "
                               f"end after {n_in} compressed bytes)")
    if members == 0:
        raise CorruptGzipError("the file is empty")
    return Decoded(sha256=sha.hexdigest(), compressed_bytes=n_in, raw_bytes=n_out,
                   members=members, codec=codec)


def _describe(exc: Exception) -> str:
    """The codec's error in words (zlib and ISA-L word them differently)."""
    text = str(exc).lower()
    if any(w in text for w in ("data check", "length check", "checksum")):
        return "CRC32/length check failed (the data are damaged)"
    return "corrupt deflate data"


def sha256_file(path, block: int = READ_BLOCK) -> str:
    """sha256 of a file's bytes, read in blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while buf := fh.read(block):
            sha.update(buf)
    return sha.hexdigest()
