"""Validate's read in two threads (inflate | per-volume work): the same bytes
and, for a file with several faults, the same error as the serial read (the
first fault in file order), and nothing left running or behind on an error."""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dmriflow.interfaces import codec, io, parallel
from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort

SHAPE = (14, 16, 10)
#: Inflated bytes per hand-over and compressed bytes per read in the fault
#: tests (``codec.inflate``'s block and read_block): smaller than one stored
#: volume (8960 bytes), so every volume before a fault is handed on before
#: the reader reaches it (ISA-L's reader inflates ahead within a read).
SMALL_BLOCK = 4096
#: Volume with a NaN in the fault tests, and the voxel.
NAN_VOLUME, NAN_AT = 7, (3, 4, 5)
#: Extra time the threaded read's consumer spends on each volume in the tests,
#: so that the inflating thread runs ahead of it (as on a loaded machine).
CONSUMER_DELAY_S = 0.003
#: Volumes of the test subject (3 b0 + 2 shells x 16).
N_VOLUMES = 35


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    root = tmp_path_factory.mktemp("read_threads") / "in"
    write_cohort(root, 1, layout="hcp", shape=SHAPE, seed=5,
                 scheme=hcp_scheme(n_b0=3, shells=(1000, 2000), n_dirs=16, seed=2))
    d = next(p for p in root.iterdir() if p.name.isdigit()) / "T1w" / "Diffusion"
    return {"dwi": d / "data.nii.gz", "bval": d / "bvals", "bvec": d / "bvecs",
            "mask": d / "nodif_brain_mask.nii.gz"}


def nifti_parts(dwi: Path, tmp: Path, dtype=np.float32, nan_volume: int | None = None,
                repeat: int = 1):
    """The NIfTI header bytes and each volume's bytes of ``dwi`` stored as
    ``dtype``, its volumes ``repeat`` times over (a NaN at NAN_AT in
    ``nan_volume``)."""
    img = nib.load(dwi)
    arr = np.tile(img.get_fdata(dtype=np.float32), (1, 1, 1, repeat))
    if nan_volume is not None:
        arr[NAN_AT + (nan_volume,)] = np.nan
    out = nib.Nifti1Image(arr.astype(dtype), img.affine, img.header)
    out.set_data_dtype(dtype)
    path = tmp / f"plain_{np.dtype(dtype).name}.nii"
    nib.save(out, path)
    raw, offset = path.read_bytes(), int(nib.load(path).dataobj.offset)
    step = int(np.prod(SHAPE)) * np.dtype(dtype).itemsize
    vols = [raw[offset + k * step:offset + (k + 1) * step] for k in range(arr.shape[3])]
    assert len(raw) == offset + len(vols) * step
    return raw[:offset], vols


def stored_gzip(header: bytes, vols: list[bytes]) -> tuple[bytearray, list[int]]:
    """One gzip member of stored (level 0) deflate blocks, flushed after the
    header and each volume, and the compressed offset where each volume's
    first block starts (its 3 header bits, then LEN and NLEN)."""
    comp = zlib.compressobj(0, zlib.DEFLATED, codec.GZIP_WBITS)
    out = bytearray(comp.compress(header) + comp.flush(zlib.Z_FULL_FLUSH))
    starts = []
    for v in vols:
        starts.append(len(out))
        out += comp.compress(v) + comp.flush(zlib.Z_FULL_FLUSH)
    out += comp.flush()
    return out, starts


def read_rows(files, dwi, out_dir, threads, monkeypatch, block=None):
    """load_dwi_rows with ``threads`` threads (and ``block`` bytes per hand-over):
    (what came out, or the InputError's text)."""
    monkeypatch.setattr(parallel, "available_threads", lambda: threads)
    if threads > 1:     # a slow consumer: the inflate runs ahead, to the next fault
        check = io._check_finite_volume
        monkeypatch.setattr(io, "_check_finite_volume",
                            lambda *a: (time.sleep(CONSUMER_DELAY_S), check(*a)))
    if block is not None:
        monkeypatch.setattr(codec, "inflate", functools.partial(codec.inflate, block=block,
                                                               read_block=block))
    try:
        data, read = io.load_dwi_rows(dwi, files["bval"], files["bvec"], files["mask"], out_dir)
    except InputError as exc:
        return str(exc)
    finally:
        monkeypatch.undo()
    rows = Path(out_dir, io.ROWS_NAME).read_bytes()
    return {"rows": rows, "sha256": read.sha256, "mask": data.mask.tobytes()}


def producer_threads() -> list:
    return [t for t in threading.enumerate()
            if t.name in ("dmriflow-produce", codec.INFLATE_THREAD)]


# ----------------------------------------------------------------------------
# The same bytes
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
@pytest.mark.parametrize("members", [1, 3])
def test_threaded_read_gives_the_serial_bytes(subject, tmp_path, monkeypatch, dtype, members):
    """Rows file, sha256 equal to the serial read's, and the rows
    those of the image nibabel reads; ``members`` gzip members split inside
    volumes (as ``cat a.gz b.gz``)."""
    header, vols = nifti_parts(subject["dwi"], tmp_path, dtype)
    raw = header + b"".join(vols)
    cuts = np.linspace(0, len(raw), members + 1).astype(int)
    dwi = tmp_path / "data.nii.gz"
    dwi.write_bytes(b"".join(zlib.compress(raw[a:b], 6, codec.GZIP_WBITS)
                             for a, b in zip(cuts[:-1], cuts[1:])))
    serial = read_rows(subject, dwi, tmp_path / "serial", 1, monkeypatch)
    threaded = read_rows(subject, dwi, tmp_path / "threaded", 2, monkeypatch)
    assert threaded == serial
    assert serial["sha256"] == hashlib.sha256(dwi.read_bytes()).hexdigest()
    img = nib.load(dwi)
    mask = np.asanyarray(nib.load(subject["mask"]).dataobj) > 0
    arr = np.asarray(img.dataobj, dtype=np.float32)
    want = arr.reshape(-1, arr.shape[3], order="F")[io.mask_rows_index(mask)]
    got = np.load(tmp_path / "threaded" / io.ROWS_NAME)
    assert got.shape == want.shape and got.tobytes(order="C") == want.tobytes()


# ----------------------------------------------------------------------------
# Several faults in one file: the first in file order is reported
# ----------------------------------------------------------------------------
def damage(comp: bytearray, starts: list[int], how: str, volume: int = 0) -> None:
    """Damage a :func:`stored_gzip` stream: "break" the stored block where
    ``volume`` starts (NLEN no longer ~LEN: a deflate error there), "cut" the
    file where it starts, or flip a bit of the trailer's "crc"."""
    if how == "break":
        comp[starts[volume] + 3] ^= 0xFF
    elif how == "cut":
        del comp[starts[volume]:]
    elif how == "crc":
        comp[-6] ^= 0x01


#: fault -> (volume with a NaN, damage, what is reported)
FAULTS = {
    "nan_then_corrupt": (NAN_VOLUME, ("break", NAN_VOLUME + 2), "nan"),
    "corrupt_then_nan": (NAN_VOLUME, ("break", NAN_VOLUME - 2), "corrupt"),
    "nan_then_truncated": (NAN_VOLUME, ("cut", NAN_VOLUME + 2), "nan"),
    "truncated_then_nan": (NAN_VOLUME, ("cut", NAN_VOLUME - 1), "truncated"),
    "nan_then_bad_crc": (NAN_VOLUME, ("crc",), "nan"),
    "nan_in_last_volume": (N_VOLUMES - 1, ("none",), "nan"),
}
WORDS = {"nan": "NaN/Inf voxel(s) in volume {k}, first at (3, 4, 5)",
         "corrupt": "DWI is not a valid gzip file: corrupt deflate data (",
         "truncated": "DWI is not a valid gzip file: the gzip stream is truncated"}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_first_fault_in_file_order_is_reported(subject, tmp_path, monkeypatch, fault):
    nan_volume, how, kind = FAULTS[fault]
    header, vols = nifti_parts(subject["dwi"], tmp_path, nan_volume=nan_volume)
    comp, starts = stored_gzip(header, vols)
    damage(comp, starts, *how)
    dwi = tmp_path / "data.nii.gz"
    dwi.write_bytes(bytes(comp))
    serial = read_rows(subject, dwi, tmp_path / "serial", 1, monkeypatch, SMALL_BLOCK)
    threaded = read_rows(subject, dwi, tmp_path / "threaded", 2, monkeypatch, SMALL_BLOCK)
    assert isinstance(serial, str)
    assert WORDS[kind].format(k=nan_volume) in serial
    assert threaded == serial
    assert producer_threads() == []
    for out in ("serial", "threaded"):   # the temporary rows file removed (atomic_write)
        assert not (tmp_path / out).exists() or list((tmp_path / out).iterdir()) == []


def test_nan_stops_the_inflate_and_closes_the_file(subject, tmp_path, monkeypatch):
    """A NaN in volume 0 of a long series: the inflating thread stops within a
    few volumes (not after the whole file), and the input is closed."""
    repeat = 40
    header, vols = nifti_parts(subject["dwi"], tmp_path, nan_volume=0, repeat=repeat)
    dwi = tmp_path / "data.nii.gz"
    dwi.write_bytes(stored_gzip(header, vols)[0])
    grads = {}
    for key in ("bval", "bvec"):
        grads[key] = tmp_path / key
        np.savetxt(grads[key], np.tile(np.atleast_2d(np.loadtxt(subject[key])), (1, repeat)))
    written = []
    real_inflate = codec.inflate

    def counted(src, write, *args, **kwargs):
        return real_inflate(src, lambda b: (written.append(len(b)), write(b)), *args,
                            block=SMALL_BLOCK, read_block=SMALL_BLOCK, **kwargs)

    monkeypatch.setattr(codec, "inflate", counted)
    monkeypatch.setattr(parallel, "available_threads", lambda: 2)
    with pytest.raises(InputError, match="in volume 0, first at"):
        io.load_dwi_rows(dwi, grads["bval"], grads["bvec"], subject["mask"], tmp_path / "node")
    # volume 0 consumed; at most depth waiting, one being filled when the stop
    # came, one more filled before the next hand-over sees it; one read past that
    limit = len(header) + (io.VOLUME_QUEUE_DEPTH + 3) * len(vols[0]) + SMALL_BLOCK
    assert sum(written) <= limit < len(vols) * len(vols[0]) / 10
    assert producer_threads() == []
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    assert str(dwi.resolve()) not in open_files
    assert list((tmp_path / "node").iterdir()) == []


# ----------------------------------------------------------------------------
# The helper itself
# ----------------------------------------------------------------------------
class Boom(Exception):
    pass


def test_producer_error_waits_for_the_items_before_it():
    """The producer fails after item 9; the consumer fails on item 5, after
    the producer's error happened: the consumer's error is raised."""
    seen = []

    def produce(emit):
        for i in range(10):
            emit(i)
        raise Boom("producer")

    def consume(i):
        time.sleep(0.01)
        seen.append(i)
        if i == 5:
            raise Boom("consumer")

    with pytest.raises(Boom, match="consumer"):
        parallel.produce_consume(produce, consume, depth=20, n_threads=2)
    assert seen == list(range(6))
    seen.clear()
    with pytest.raises(Boom, match="producer"):    # without the consumer's error: all 10 first
        parallel.produce_consume(produce, lambda i: seen.append(i), depth=20, n_threads=2)
    assert seen == list(range(10)) and producer_threads() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("nested", [False, True])
def test_consumer_error_stops_the_producer(nested):
    """The consumer's error stops the producer within a queue's depth and is
    raised, every thread ended. ``nested``: the producer is itself a
    produce_consume (codec.inflate's hash beside the inflate, inside
    Validate's read) whose own producer emits to the outer queue: the outer
    ``emit`` raising inside it stops both calls."""
    emitted, hashed = [], []

    def produce(emit, inner_emit=lambda i: None):
        for i in range(1000):
            inner_emit(i)
            emitted.append(i)
            emit(i)

    def nested_produce(emit):
        parallel.produce_consume(lambda inner_emit: produce(emit, inner_emit), hashed.append,
                                 depth=2, n_threads=2, name=codec.INFLATE_THREAD)

    def consume(i):
        if i == 3:
            raise Boom("consumer")

    with pytest.raises(Boom, match="consumer"):
        parallel.produce_consume(nested_produce if nested else produce, consume, depth=2,
                                 n_threads=2)
    assert len(emitted) <= 3 + 2 + 2 and producer_threads() == []


def test_depth_plus_two_buffers_are_never_overwritten_in_use():
    """A producer cycling through depth + 2 buffers, a slow consumer: every
    item is read as written."""
    depth, n = 2, 30
    buffers = [np.zeros(1000) for _ in range(depth + 2)]
    got = []

    def produce(emit):
        for i in range(n):
            buf = buffers[i % len(buffers)]
            buf[:] = i
            emit((i, buf))

    def consume(item):
        i, buf = item
        time.sleep(0.002)
        got.append((i, float(buf.min()), float(buf.max())))

    parallel.produce_consume(produce, consume, depth=depth, n_threads=2)
    assert got == [(i, float(i), float(i)) for i in range(n)]


def test_one_thread_runs_in_the_calling_thread():
    names = []
    parallel.produce_consume(lambda emit: [emit(i) for i in range(3)],
                             lambda i: names.append(threading.current_thread().name),
                             depth=2, n_threads=1)
    assert names == [threading.current_thread().name] * 3


@pytest.mark.parametrize("omp, cores, threaded", [("1", 2, False), ("2", 2, True),
                                                  ("", 1, False), ("", 2, True)])
def test_thread_flag_is_respected(subject, tmp_path, monkeypatch, omp, cores, threaded):
    """--omp-nthreads 1 (OMP_NUM_THREADS=1) or one core: the inflate runs in the
    calling thread, and so does its sha256 (no thread started); two allowed:
    the inflate in a second one, the bytes inflated in a third while the
    second hashes them."""
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    names, writers = [], set()
    real_inflate = codec.inflate

    def recorded(src, write, *args, **kwargs):
        names.append(threading.current_thread().name)
        return real_inflate(src, lambda b: (writers.add(threading.current_thread().name),
                                            write(b)), *args, **kwargs)

    monkeypatch.setattr(codec, "inflate", recorded)
    io.load_dwi_rows(subject["dwi"], subject["bval"], subject["bvec"], subject["mask"],
                     tmp_path)
    here = threading.current_thread().name
    assert names == ["dmriflow-produce" if threaded else here]
    assert writers == {codec.INFLATE_THREAD if threaded else here}
