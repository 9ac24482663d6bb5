"""One read per subject (issue 14): decompress + verify + hash in one pass, the
decompressed series shared by later steps, and corrupt gzip inputs caught."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import threading
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from dmriflow.interfaces import codec, io, stepfiles
from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
from dmriflow.pipelines.execution import RunConfig, run_cohort
from dmriflow.pipelines.inputs import discover

SHAPE = (14, 16, 10)
#: Both codecs when isal is installed (it is, from the lock); zlib always.
CODECS = tuple(codec.CODECS)


def scheme():
    return hcp_scheme(n_b0=3, shells=(1000, 2000), n_dirs=16, seed=2)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("read_once") / "in"
    write_cohort(root, 3, layout="hcp", shape=SHAPE, seed=3, scheme=scheme())
    return root


def with_value(dwi: Path, at: tuple, value: float, dest: Path) -> Path:
    """A float32 copy of ``dwi`` at ``dest`` with one voxel set to ``value``."""
    img = nib.load(dwi)
    arr = img.get_fdata(dtype=np.float32)
    arr[at] = value
    dest.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), dest)
    return dest


def flip_bit_in_stored_gzip(path: Path, value_index: int = 4000) -> int:
    """Flip one bit of a voxel value in a .nii.gz as a storage fault would: the
    file is rewritten with stored (uncompressed) deflate blocks holding the
    damaged bytes and the trailer keeps the CRC32 of the original data, so
    the deflate stream stays valid and only the CRC tells. Returns the
    flipped byte's offset in the NIfTI."""
    raw = gzip.decompress(path.read_bytes())
    offset = int(nib.load(path).dataobj.offset) + 4 * value_index + 2
    damaged = raw[:offset] + bytes([raw[offset] ^ 0x10]) + raw[offset + 1:]
    comp = bytearray(gzip.compress(damaged, compresslevel=0))
    comp[-8:-4] = zlib.crc32(raw).to_bytes(4, "little")
    path.write_bytes(bytes(comp))
    return offset


# ----------------------------------------------------------------------------
# The codec pass
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", CODECS)
def test_decompress_and_hash_matches_gzip_and_sha256(tmp_path, name):
    payload = np.random.default_rng(0).integers(0, 50, 3_000_000, dtype=np.uint8).tobytes()
    src = tmp_path / "x.gz"
    # two members and zero padding, as `cat a.gz b.gz` and some writers produce
    src.write_bytes(gzip.compress(payload[:1_000_000], 6) + gzip.compress(payload[1_000_000:], 1)
                    + b"\0" * 7)
    dst = tmp_path / "x"
    got = codec.decompress_and_hash(src, dst, name, block=65536)
    assert dst.read_bytes() == payload
    assert got.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (got.raw_bytes, got.compressed_bytes) == (len(payload), src.stat().st_size)


def gzip_members(payload: bytes, members: int) -> bytes:
    """``payload`` as ``members`` concatenated gzip members (level 6), as ``cat a.gz b.gz``."""
    cuts = np.linspace(0, len(payload), members + 1).astype(int)
    return b"".join(gzip.compress(payload[a:b], 6) for a, b in zip(cuts[:-1], cuts[1:]))


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("members", [1, 5])
def test_inflate_gives_gzips_bytes_from_one_reused_block(tmp_path, name, members):
    """The bytes of gzip.decompress, in order, each ``write`` handed a view of
    the same buffer (no new bytes per piece) holding at most ``block`` bytes;
    a block size that divides neither the members nor the file."""
    rng = np.random.default_rng(members)
    payload = rng.integers(0, 40, 2_500_000, dtype=np.uint8).tobytes()
    src = tmp_path / "x.gz"
    src.write_bytes(gzip_members(payload, members))
    assert gzip.decompress(src.read_bytes()) == payload
    block, pieces, owners = 100_003, [], []

    def write(view):
        owners.append(view.obj)          # kept alive: a fresh buffer each time has a new id
        assert len(view) <= block
        pieces.append(bytes(view))

    got = codec.inflate(src, write, name, block=block)
    assert b"".join(pieces) == payload and got.raw_bytes == len(payload)
    assert len({id(o) for o in owners}) == 1 and len(owners[0]) == block
    assert len(pieces) >= len(payload) // block


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("threads", [1, 2])
def test_inflate_into_the_callers_buffers(tmp_path, name, threads):
    """With ``into`` the bytes are inflated straight into the buffers it gives,
    of any size (here 1 byte to 3 blocks, cycling), at most ``block`` at a
    time: each ``write`` gets the filled start of the very view ``into`` gave
    (same memory, no copy), and the pieces are gzip's bytes; an empty buffer
    is refused."""
    payload = np.random.default_rng(4).integers(0, 40, 1_500_000, dtype=np.uint8).tobytes()
    src = tmp_path / "x.gz"
    src.write_bytes(gzip_members(payload, 3))
    block, sizes = 65_536, itertools.cycle([1, 7, 4096, 100_003, 3 * 65_536])
    given, pieces = [], []

    def into():
        given.append(np.zeros(next(sizes), np.uint8))
        return memoryview(given[-1])

    def write(view):
        dest = given[-1]
        assert len(view) <= min(block, dest.size)
        assert np.shares_memory(np.frombuffer(view, np.uint8), dest)
        assert np.frombuffer(view, np.uint8).ctypes.data == dest.ctypes.data
        pieces.append(bytes(view))

    got = codec.inflate(src, write, name, block=block, n_threads=threads, into=into)
    assert b"".join(pieces) == payload and got.raw_bytes == len(payload)
    with pytest.raises(ValueError, match="empty buffer"):
        codec.inflate(src, write, name, n_threads=threads, into=lambda: memoryview(b"")[:0])


@pytest.mark.parametrize("name", CODECS)
def test_highly_compressible_stream_in_bounded_pieces(tmp_path, name):
    """Zeros inflate ~1000-fold: the output comes in pieces of at most OUT_BLOCK
    and nothing is lost at the end of the file."""
    payload = bytes(40 * codec.OUT_BLOCK + 12345)
    src = tmp_path / "zeros.gz"
    src.write_bytes(gzip.compress(payload, 9))
    sizes = []
    got = codec.inflate(src, lambda b: sizes.append(len(b)), name)
    assert sum(sizes) == got.raw_bytes == len(payload) and max(sizes) <= codec.OUT_BLOCK


def test_isal_is_the_default_codec():
    assert codec.DEFAULT_CODEC == "isal"   # the lock installs it; zlib is the fallback


def test_without_isal_zlib_reads_and_writes(tmp_path):
    """Where isal is not installed (imports blocked in a fresh interpreter) the
    codec is zlib: the same bytes and sha256, and the gzip writer works."""
    import subprocess
    import sys
    payload = np.random.default_rng(4).integers(0, 30, 600_000, dtype=np.uint8).tobytes()
    src = tmp_path / "x.gz"
    src.write_bytes(gzip.compress(payload[:200_000]) + gzip.compress(payload[200_000:]))
    script = ("import sys; sys.modules['isal'] = None\n"
              "from dmriflow.interfaces import codec\n"
              "got = codec.decompress_and_hash(sys.argv[1], sys.argv[2])\n"
              "with codec.gzip_writer(sys.argv[3]) as fh:\n"
              "    fh.write(open(sys.argv[2], 'rb').read())\n"
              "print(sorted(codec.CODECS), got.codec, got.sha256, got.raw_bytes)\n")
    out = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "x"),
                          str(tmp_path / "y.gz")], capture_output=True, text=True, check=True)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert out.stdout.split() == ["['zlib']", "zlib", sha, str(len(payload))]
    assert (tmp_path / "x").read_bytes() == payload
    assert gzip.decompress((tmp_path / "y.gz").read_bytes()) == payload


class Stop(Exception):
    pass


def inflate_threads() -> list:
    """The threads of :func:`codec.inflate`'s two-thread read still running."""
    return [t for t in threading.enumerate() if t.name == codec.INFLATE_THREAD]


#: ``inflate``'s n_threads in the tests: all in the calling thread, and the
#: hash beside the inflate.
HASH_THREADS = (1, 2)


@pytest.mark.parametrize("threads", HASH_THREADS)
@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("error", [Stop, EOFError])
def test_write_raising_stops_the_read_and_closes_the_file(tmp_path, name, error, threads):
    """``write`` raising stops the read at once: its own exception (an
    EOFError too, not taken for a truncated stream), the input closed, no
    thread left."""
    src = tmp_path / "x.gz"
    src.write_bytes(gzip.compress(np.random.default_rng(1).bytes(3_000_000), 1))
    calls = []

    def write(view):
        calls.append(len(view))
        if len(calls) == 2:
            raise error("enough")

    with pytest.raises(error, match="enough") as info:   # its traceback keeps inflate's frame
        codec.inflate(src, write, name, block=65536, n_threads=threads)
    assert calls == [65536, 65536] and info.value.__traceback__ is not None
    assert not inflate_threads()
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    assert str(src.resolve()) not in open_files


@pytest.mark.parametrize("threads", HASH_THREADS)
@pytest.mark.parametrize("name", CODECS)
def test_disk_error_is_not_called_corrupt_data(tmp_path, monkeypatch, name, threads):
    """An OSError of the disk passes through as it is (gzip.BadGzipFile, what
    the readers raise on a bad header or trailer, is an OSError too); no
    thread left."""
    src = tmp_path / "x.gz"
    src.write_bytes(gzip.compress(np.random.default_rng(2).bytes(3_000_000), 1))
    real = codec._HashingReader.readinto

    def failing(self, b):
        if self.n:
            raise OSError(5, "Input/output error")
        return real(self, b)

    monkeypatch.setattr(codec._HashingReader, "readinto", failing)
    with pytest.raises(OSError, match="Input/output error") as info:
        codec.inflate(src, lambda b: None, name, read_block=65536, n_threads=threads)
    assert type(info.value) is OSError
    assert not inflate_threads()


def damaged(damage: str) -> bytes:
    """A gzip file of 1 MB (stored blocks) damaged as named."""
    payload = bytes(range(256)) * 4000
    comp = bytearray(gzip.compress(payload, compresslevel=0))
    if damage == "crc":
        comp[-6] ^= 0x01
    elif damage == "length":
        comp[-2] ^= 0x01
    elif damage == "data":
        comp[5000] ^= 0x04          # a stored block's payload byte: only the CRC tells
    elif damage == "deflate":       # a compressed member whose Huffman table is broken
        comp = bytearray(gzip.compress(payload, 6))
        comp[40] ^= 0xFF
    elif damage == "truncated":
        comp = comp[:-20]
    elif damage == "trailer_cut":
        comp = comp[:-3]
    elif damage == "header_cut":
        comp = comp[:5]
    elif damage == "garbage":
        comp += b"junk after the member"
    elif damage == "padding_then_garbage":
        comp += b"\0" * 5 + b"junk after the padding"
    elif damage == "stray_bytes":   # fewer than a gzip header's 10 bytes
        comp += b"\0" * 5 + b"junk"
    elif damage == "second_member_cut":
        comp += gzip.compress(payload, 6)[:-100]
    elif damage == "not_gzip":
        comp = bytearray(b"plain text, no gzip header at all")
    elif damage == "zeros":
        comp = bytearray(1000)
    elif damage == "empty":
        comp = bytearray()
    return bytes(comp)


#: damage -> the words of the refusal
DAMAGE_WORDS = {"crc": "CRC32/length check failed", "data": "CRC32/length check failed",
                "length": "CRC32/length check failed", "deflate": "corrupt deflate data",
                "truncated": "the gzip stream is truncated",
                "trailer_cut": "the gzip stream is truncated",
                "header_cut": "the gzip stream is truncated",
                "second_member_cut": "the gzip stream is truncated",
                "garbage": "corrupt deflate data", "padding_then_garbage": "corrupt deflate data",
                "not_gzip": "corrupt deflate data", "zeros": "corrupt deflate data",
                "empty": "the file is empty",
                # ISA-L's reader wants a whole header (10 bytes) before it checks
                # the magic: a short tail reads as a member cut short
                "stray_bytes": {"isal": "the gzip stream is truncated",
                                "zlib": "corrupt deflate data"}}


def damage_words(damage: str, codec_name: str) -> str:
    """The words with which ``codec_name`` refuses ``damage``."""
    words = DAMAGE_WORDS[damage]
    return words if isinstance(words, str) else words[codec_name]


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("damage", sorted(DAMAGE_WORDS))
def test_corrupt_streams_are_refused(tmp_path, name, damage):
    src = tmp_path / "bad.gz"
    src.write_bytes(damaged(damage))
    with pytest.raises(codec.CorruptGzipError) as info:
        codec.decompress_and_hash(src, tmp_path / "out", name)
    assert damage_words(damage, name) in str(info.value)


class SlowSha256:
    """A sha256 that takes its time over each block (so that the blocks wait
    in the queue while the reader reuses its buffer)."""

    delay_s = 0.002

    def __init__(self, real=hashlib.sha256):
        self.sha = real()

    def update(self, data) -> None:
        time.sleep(self.delay_s)
        self.sha.update(data)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("members", [1, 4])
def test_hash_beside_the_inflate_gives_the_same_hash_and_bytes(tmp_path, monkeypatch, name,
                                                                members):
    """n_threads=2: the sha256 of the file's bytes and gzip's bytes, as with
    one thread; ``write`` runs in the inflating thread, which ends with the
    call. With one thread none is started. A slow hash keeps blocks waiting in
    the queue while the reader reads on (small reads: many blocks)."""
    rng = np.random.default_rng(10 + members)
    payload = rng.integers(0, 40, 1_500_000, dtype=np.uint8).tobytes()
    src = tmp_path / "x.gz"
    src.write_bytes(gzip_members(payload, members))
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    monkeypatch.setattr(hashlib, "sha256", SlowSha256)
    got = {}
    for threads in HASH_THREADS:
        pieces, names, running = [], set(), set()

        def write(view):
            pieces.append(bytes(view))
            names.add(threading.current_thread().name)
            running.add(len(inflate_threads()))

        decoded = codec.inflate(src, write, name, block=65536, read_block=16384,
                                n_threads=threads)
        assert b"".join(pieces) == payload and decoded.sha256 == sha
        got[threads] = (decoded, names, running)
        assert not inflate_threads()
    assert got[1][0] == got[2][0]
    assert got[1][1:] == ({threading.current_thread().name}, {0})
    assert got[2][1:] == ({codec.INFLATE_THREAD}, {1})


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("damage", sorted(DAMAGE_WORDS))
def test_hash_beside_the_inflate_refuses_the_same_damage(tmp_path, name, damage):
    """n_threads=2 refuses every damage with the one-thread read's words (the
    whole message: where the fault was found too), no thread left."""
    src = tmp_path / "bad.gz"
    src.write_bytes(damaged(damage))
    found = []
    for threads in HASH_THREADS:
        with pytest.raises(codec.CorruptGzipError) as info:
            codec.inflate(src, lambda b: None, name, read_block=4096, n_threads=threads)
        found.append(str(info.value))
        assert not inflate_threads()
    assert damage_words(damage, name) in found[1]
    assert found[0] == found[1]


# ----------------------------------------------------------------------------
# Validate's read
# ----------------------------------------------------------------------------
def subject_files(cohort: Path, i: int = 0) -> dict:
    sid = sorted(p.name for p in cohort.iterdir() if p.name.isdigit())[i]
    d = cohort / sid / "T1w" / "Diffusion"
    return {"dwi": d / "data.nii.gz", "bval": d / "bvals", "bvec": d / "bvecs",
            "mask": d / "nodif_brain_mask.nii.gz"}


def test_flipped_bit_passes_nibabel_but_not_validate(cohort, tmp_path):
    files = subject_files(cohort)
    bad = tmp_path / "data.nii.gz"
    bad.write_bytes(files["dwi"].read_bytes())
    flip_bit_in_stored_gzip(bad)
    # today's path: nibabel reads the damaged voxel without a word
    clean = nib.load(files["dwi"]).get_fdata(dtype=np.float32)
    damaged = nib.load(bad).get_fdata(dtype=np.float32)
    assert np.count_nonzero(clean != damaged) == 1
    node = tmp_path / "node"
    with pytest.raises(InputError) as info:
        stepfiles.validate_subject("s", bad, files["bval"], files["bvec"], files["mask"],
                                   out_dir=node)
    assert info.value.path == str(bad)
    assert "not a valid gzip file" in info.value.problem
    assert not node.exists() or not any(node.iterdir())   # nothing half-written left


def test_validate_records_sha256_and_shares_an_uncompressed_series(cohort, tmp_path):
    files = subject_files(cohort)
    rec = stepfiles.validate_subject("s", *(files[k] for k in ("dwi", "bval", "bvec", "mask")),
                                     out_dir=tmp_path)
    assert rec["inputs"]["dwi"]["sha256"] == io.file_sha256(files["dwi"])
    assert rec["series"]["dwi"] == str(files["dwi"])      # messages name the input
    series = Path(rec["series"]["copy"])
    assert series == (tmp_path / io.DECODED_NAME).resolve()
    assert series.read_bytes() == gzip.decompress(files["dwi"].read_bytes())
    assert rec["read"] == {"codec": codec.DEFAULT_CODEC, "copy": str(series),
                           "decoded_bytes": series.stat().st_size}
    data = stepfiles.read_series(rec["series"]).data
    assert isinstance(data, np.memmap)             # later steps map it, never inflate again


def maps_as_arrays(result: dict) -> dict:
    flat = {}
    for key, value in result["maps"].items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return {k: np.asanyarray(nib.load(p).dataobj) for k, p in flat.items()}


def stored_as(files: dict, dtype: str, folder: Path) -> dict:
    """``files`` with the DWI stored as ``dtype``: "float32" (as written),
    "int16" (rounded integers, no slope: as scanners write them) or
    "int16-scaled" (nibabel picks a slope)."""
    if dtype == "float32":
        return files
    img = nib.load(files["dwi"])
    arr = img.get_fdata(dtype=np.float32)
    hdr = img.header.copy()
    hdr.set_data_dtype(np.int16)
    stored = folder / "data.nii.gz"
    folder.mkdir()
    if dtype == "int16":
        nib.save(nib.Nifti1Image(np.rint(arr).astype(np.int16), img.affine, hdr), stored)
        assert nib.load(stored).header.get_slope_inter() == (None, None)
    else:
        nib.save(nib.Nifti1Image(arr, img.affine, hdr), stored)
        assert nib.load(stored).dataobj.slope != 1.0
    return {**files, "dwi": stored}


@pytest.mark.parametrize("rows_only", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "int16", "int16-scaled"])
def test_shared_series_gives_byte_identical_derivatives(cohort, tmp_path, dtype, rows_only):
    """FA (all tensor maps) and RISH from Validate's shared series equal, bit for
    bit, the maps computed from the .nii.gz read directly (today's path): for
    the mask rows (float32, and unscaled int16 as scanners write it, converted
    to float32 as the volumes arrive) and the uncompressed copy (float32, and
    a scaled int16 input, which the copy keeps as int16 + scaling)."""
    files = stored_as(subject_files(cohort, 1), dtype, tmp_path / "in")
    direct = {k: str(v) for k, v in files.items()}
    rec = stepfiles.validate_subject("s", *(files[k] for k in ("dwi", "bval", "bvec", "mask")),
                                     out_dir=tmp_path / "validate", rows_only=rows_only)
    as_rows = rows_only and dtype != "int16-scaled"
    assert rec["series"].get("rows", "").endswith(io.ROWS_NAME) == as_rows
    assert rec["series"].get("copy", "").endswith(io.DECODED_NAME) != as_rows
    if as_rows:
        rows = np.load(rec["series"]["rows"])
        full = nib.load(files["dwi"]).get_fdata(dtype=np.float32)
        mask = np.asanyarray(nib.load(files["mask"]).dataobj) > 0
        assert rows.shape == (mask.sum(), full.shape[3]) and rows.flags.f_contiguous
        assert_array_equal(rows, full.reshape(-1, full.shape[3], order="F")[
            np.flatnonzero(mask.ravel(order="F"))])
    for name, run in (("tensor", stepfiles.write_tensor_maps),
                      ("rish", stepfiles.write_rish_maps)):
        old = maps_as_arrays(run(direct, tmp_path / f"{name}_old"))
        new = maps_as_arrays(run(rec["series"], tmp_path / f"{name}_new"))
        assert old.keys() == new.keys() and old
        for key in old:
            assert old[key].dtype == new[key].dtype
            assert old[key].tobytes() == new[key].tobytes(), key


@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_rows_record_matches_grid_record(cohort, tmp_path, dtype):
    """Census, hashes and QC figures (b0 noise and SNR) are the same whichever
    way Validate keeps the series (an int16 input's rows converted as they
    arrive, the copy by nibabel)."""
    stored = stored_as(subject_files(cohort, 2), dtype, tmp_path / "in")
    files = [stored[k] for k in ("dwi", "bval", "bvec", "mask")]
    grid = stepfiles.validate_subject("s", *files, out_dir=tmp_path / "g")
    rows = stepfiles.validate_subject("s", *files, out_dir=tmp_path / "r", rows_only=True)
    assert "rows" in rows["series"] and "rows" not in grid["series"]
    for key in ("census", "inputs", "qc", "mask_voxels", "mask_source"):
        assert grid[key] == rows[key], key
    assert rows["read"]["decoded_bytes"] == np.load(rows["series"]["rows"]).nbytes + 128


@pytest.mark.parametrize("rows_only", [False, True])
def test_nan_named_by_the_input_and_nothing_left(cohort, tmp_path, rows_only):
    files = subject_files(cohort)
    bad = with_value(files["dwi"], (3, 4, 5, 7), np.nan, tmp_path / "in" / "data.nii.gz")
    node = tmp_path / "node"
    with pytest.raises(InputError) as info:
        stepfiles.validate_subject("s", bad, files["bval"], files["bvec"], files["mask"],
                                   out_dir=node, rows_only=rows_only)
    assert info.value.path == str(bad)
    assert info.value.problem == "DWI has 1 NaN/Inf voxel(s) in volume 7, first at (3, 4, 5)"
    assert not node.exists() or list(node.iterdir()) == []


@pytest.mark.parametrize("rows_only", [False, True])
def test_valid_gzip_with_too_few_voxels_is_refused(cohort, tmp_path, rows_only):
    """A gzip stream that is whole (CRC fine) but shorter than the header says."""
    files = subject_files(cohort)
    short = tmp_path / "in" / "data.nii.gz"
    short.parent.mkdir()
    short.write_bytes(gzip.compress(gzip.decompress(files["dwi"].read_bytes())[:-1000]))
    with pytest.raises(InputError) as info:
        stepfiles.validate_subject("s", short, files["bval"], files["bvec"], files["mask"],
                                   out_dir=tmp_path / "node", rows_only=rows_only)
    assert info.value.path == str(short) and "truncated" in info.value.problem


# ----------------------------------------------------------------------------
# The cohort: a corrupt subject fails, naming its file; the others are done
# ----------------------------------------------------------------------------
def test_corrupt_subject_fails_others_done(cohort, tmp_path):
    root = tmp_path / "in"
    write_cohort(root, 3, layout="hcp", shape=SHAPE, seed=3, scheme=scheme())
    subjects = discover(root)
    bad = Path(subjects[1].dwi)
    flip_bit_in_stored_gzip(bad)
    config = RunConfig(worker="cf", n_procs=2, cache_dir=str(tmp_path / "cache"), quiet=True)
    result = run_cohort(subjects, tmp_path / "out", config)
    status = {r["subject"]: r for r in result.rows}
    assert [status[s.key]["status"] for s in subjects] == ["done", "failed", "done"]
    failed = status[subjects[1].key]
    assert failed["failed_step"] == "validate"
    assert failed["error"].startswith(f"{bad}: DWI is not a valid gzip file")
    assert "CRC32/length check failed" in failed["error"]
    # the done subjects' sidecars record the sha256 of the file as given
    s = subjects[0]
    fa = (tmp_path / "out" / "dmriflow" / f"sub-{s.label}" / "dwi" /
          f"sub-{s.label}_model-tensor_param-fa_dwimap.json")
    assert json.loads(fa.read_text())["InputHashes"]["dwi"] == io.file_sha256(s.dwi)


def test_refused_input_leaves_no_copy(cohort, tmp_path):
    files = subject_files(cohort)
    with pytest.raises(InputError):   # bvals of another subject's length
        bad = tmp_path / "bvals"
        bad.write_text(" ".join(["0"] * 5) + "\n")
        stepfiles.validate_subject("s", files["dwi"], bad, files["bvec"], files["mask"],
                                   out_dir=tmp_path / "node")
    nan_in = with_value(files["dwi"], (0, 0, 0, 0), np.inf, tmp_path / "inf" / "data.nii.gz")
    with pytest.raises(InputError, match="NaN/Inf"):
        stepfiles.validate_subject("s", nan_in, files["bval"], files["bvec"], files["mask"],
                                   out_dir=tmp_path / "node")
    assert not (tmp_path / "node" / io.DECODED_NAME).exists()


def test_drop_series_deletes_copies_and_reruns(cohort, tmp_path):
    subjects = discover(cohort)[:2]
    cfg = dict(worker="cf", n_procs=2, cache_dir=str(tmp_path / "cache"), quiet=True)
    copies = lambda: sorted(p for name in (io.DECODED_NAME, io.ROWS_NAME)  # noqa: E731
                            for p in (tmp_path / "cache").glob(f"*/{name}"))
    kept = run_cohort(subjects, tmp_path / "out", RunConfig(**cfg))
    assert [r["status"] for r in kept.rows] == ["done", "done"]
    assert [p.name for p in copies()] == [io.ROWS_NAME] * 2    # the fits read mask rows
    fa = {s.key: (tmp_path / "out" / "dmriflow" / f"sub-{s.label}" / "dwi" /
                  f"sub-{s.label}_model-tensor_param-fa_dwimap.nii.gz").read_bytes()
          for s in subjects}
    dropped = run_cohort(subjects, tmp_path / "out", RunConfig(**cfg, drop_series=True))
    assert [r["status"] for r in dropped.rows] == ["done", "done"] and copies() == []
    # a later run that needs the series again (another lmax) reads the input again
    again = run_cohort(subjects, tmp_path / "out", RunConfig(**cfg, lmax=2, drop_series=True))
    assert [r["status"] for r in again.rows] == ["done", "done"] and copies() == []
    for s in subjects:
        out = (tmp_path / "out" / "dmriflow" / f"sub-{s.label}" / "dwi" /
               f"sub-{s.label}_model-tensor_param-fa_dwimap.nii.gz")
        assert out.read_bytes() == fa[s.key]
    assert all(Path(s.dwi).exists() for s in subjects)    # inputs never touched


def test_save_nifti_writes_what_nibabel_writes(tmp_path):
    """The fast gzip writer changes the compressed bytes only: the .nii inside
    is nibabel's, byte for byte."""
    arr = np.random.default_rng(1).random((9, 8, 7, 3), dtype=np.float32)
    ours = io.save_nifti(arr, np.eye(4), tmp_path / "ours.nii.gz")
    theirs = io.save_nifti(arr, np.eye(4), tmp_path / "theirs.nii")
    assert gzip.decompress(ours.read_bytes()) == theirs.read_bytes()
    assert_array_equal(np.asanyarray(nib.load(ours).dataobj), arr)


def test_volume_qc_is_the_same_on_rows_and_grid(cohort, tmp_path):
    """The input QC of issue 13 reads the series Validate keeps: judged on mask
    rows or on the grid, a zero volume and a slice dropout are found alike and
    the records (QC figures, flags, exclusions, provenance) are equal."""
    files = subject_files(cohort, 1)
    img = nib.load(files["dwi"])
    data = np.asarray(img.dataobj, dtype=np.float32)
    gtab = io.read_gradients(files["bval"], files["bvec"])
    dw = np.flatnonzero(~gtab.b0s_mask)
    zero, dropped = int(dw[2]), int(dw[5])
    data[..., zero] = 0
    data[:, :, SHAPE[2] // 2, dropped] *= 0.2
    faulty = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), faulty)
    args = [faulty, files["bval"], files["bvec"], files["mask"]]
    grid = stepfiles.validate_subject("s", *args, out_dir=tmp_path / "g")
    rows = stepfiles.validate_subject("s", *args, out_dir=tmp_path / "r", rows_only=True)
    assert "rows" in rows["series"] and "rows" not in grid["series"]
    assert grid["series"]["exclude"] == [zero, dropped]
    assert "all zero" in grid["input_qc"]["outlier_volumes"][str(zero)]
    assert "dropout" in grid["input_qc"]["outlier_volumes"][str(dropped)]
    for key in ("qc", "qc_flags", "input_qc", "provenance", "census", "inputs"):
        assert grid[key] == rows[key], key
    assert grid["series"]["exclude"] == rows["series"]["exclude"]
