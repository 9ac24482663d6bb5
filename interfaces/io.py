"""Validated NIfTI/bval/bvec loading, atomic writes and JSON sidecars.

Every check raises :class:`~dmriflow.interfaces.errors.InputError` whose
message starts with the offending file. Nothing here keeps float64 copies of
a whole 4D series: data are read once as float32 and checked volume by volume.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import mmap
import os
import platform
import shutil
import tempfile
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np

from . import __version__, codec, parallel
from .environment import environment
from .errors import InputError
from .gradients import (B0_THRESHOLD, GradientTable, check_readable_file, gradient_policy,
                        read_bvals, read_gradients)
from .sidecar_fields import echo_time_ms, field_strength_t

#: Voxel grids match when their affines agree to this (mm).
AFFINE_TOLERANCE = 1e-3
#: Dependencies whose versions go into every sidecar.
TRACKED_PACKAGES = ("numpy", "scipy", "nibabel", "dipy", "torch", "monai", "pydra",
                    "fileformats", "pandas")
#: What nibabel raises on unreadable, truncated or corrupt files (a header with an
#: unknown datatype code raises HeaderDataError, a negative dimension
#: OverflowError when the data are mapped).
_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, OverflowError, gzip.BadGzipFile,
                nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError)


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------
def load_image(path: str | os.PathLike, what: str = "image") -> nib.Nifti1Image:
    """Load a NIfTI header (data stay on disk), with a readable error."""
    path = os.fspath(path)
    check_readable_file(path, what)
    try:
        img = nib.load(path)
    except _READ_ERRORS as exc:
        raise InputError(path, f"cannot read {what} as NIfTI ({exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"{what} is not a NIfTI image ({type(img).__name__})")
    if any(int(n) <= 0 for n in img.shape):
        raise InputError(path, f"{what} header has an invalid shape {img.shape} "
                               f"(every dimension must be positive)")
    _check_size(img, path, what)
    return img


def _check_size(img: nib.Nifti1Image, path: str, what: str) -> None:
    """An uncompressed NIfTI must hold all the bytes its header promises."""
    if path.lower().endswith((".gz", ".bz2", ".zst")):
        return  # compressed: only decompressing tells; read_array reports it
    proxy = img.dataobj  # (img.header is a copy whose vox_offset is reset to 0)
    offset = getattr(proxy, "offset", None)
    if offset is None:
        return
    needed = int(offset) + int(np.prod(img.shape, dtype=np.int64)) * \
        img.get_data_dtype().itemsize
    size = os.path.getsize(path)
    if size < needed:
        raise InputError(path, f"{what} file is truncated: its header needs {needed} bytes, "
                               f"the file has {size}")


def read_array(img: nib.Nifti1Image, what: str = "image") -> np.ndarray:
    """All voxels as float32 (native order), reporting truncated files."""
    try:
        return np.asanyarray(img.get_fdata(dtype=np.float32, caching="unchanged"))
    except _READ_ERRORS as exc:
        raise InputError(img.get_filename(), f"cannot read {what} data, the file is truncated "
                                             f"or corrupt ({exc})") from None


def _volumes(data: np.ndarray):
    """The volumes of a 3D/4D array in order; those of an F-ordered memory map
    are read from its file into one reused buffer, so checking a 4 GB series
    does not map it all into this process (its pages would count as its RSS)."""
    if data.ndim != 4:
        yield data
        return
    # only a whole file's map (a view's .offset is its parent's)
    mapped = (isinstance(data, np.memmap) and isinstance(data.base, mmap.mmap)
              and data.filename and data.flags.f_contiguous)
    if not mapped:
        for k in range(data.shape[-1]):
            yield data[..., k]
        return
    vol = np.empty(data.shape[:3], dtype=data.dtype, order="F")
    buf = vol.reshape(-1, order="F").view(np.uint8)
    with open(data.filename, "rb") as fh:
        fh.seek(data.offset)
        for _ in range(data.shape[-1]):
            if fh.readinto(buf) != buf.size:
                raise EOFError(f"{data.filename} ended before its last volume")
            yield vol


def _check_finite(data: np.ndarray, path: str, what: str) -> None:
    for k, vol in enumerate(_volumes(data)):
        _check_finite_volume(vol, k if data.ndim == 4 else None, path, what)


def _check_finite_volume(vol: np.ndarray, k: int | None, path: str, what: str) -> None:
    """Raise naming the count and first NaN/Inf voxel of one (3D) volume ``k``."""
    finite = np.isfinite(vol)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise InputError(path, f"{what} has {bad.shape[0]} NaN/Inf voxel(s)"
                               + (f" in volume {k}" if k is not None else "")
                               + f", first at {tuple(int(i) for i in bad[0])}")


def same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image) -> bool:
    return (a.shape[:3] == b.shape[:3]
            and np.allclose(a.affine, b.affine, atol=AFFINE_TOLERANCE))


@dataclass
class DWI:
    """A validated diffusion series: float32 data, its gradients, its mask.

    Either ``data`` holds the whole grid, or (``data`` None) ``rows`` holds
    only the mask voxels, one row each, in the NIfTI storage (F) order of
    :meth:`masked` (see :func:`load_dwi_rows`): what the fits read, nothing
    else. Steps that need voxels outside the mask need ``data``.
    """

    data: np.ndarray | None     # (X, Y, Z, N) float32
    gtab: GradientTable
    mask: np.ndarray            # (X, Y, Z) bool
    affine: np.ndarray
    header: nib.Nifti1Header
    paths: dict
    rows: np.ndarray | None = None   # (mask voxels, N) float32, voxels in F order

    @property
    def zooms(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in self.header.get_zooms()[:3])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.mask.shape) + (len(self.gtab),)

    def select_volumes(self, indices) -> "DWI":
        """The same subject restricted to some volumes (a copy, unless all are kept)."""
        indices = np.asarray(indices)
        if indices.size == len(self.gtab) and np.array_equal(indices, np.arange(len(self.gtab))):
            return self
        if self.data is None:   # column by column: each is one contiguous block
            rows = np.empty((self.rows.shape[0], indices.size), np.float32, order="F")
            for j, k in enumerate(indices):
                rows[:, j] = self.rows[:, k]
            return replace(self, rows=rows, gtab=self.gtab.select(indices))
        return replace(self, data=np.asfortranarray(self.data[..., indices]),
                       gtab=self.gtab.select(indices))

    def voxel(self, c_index: int) -> np.ndarray:
        """The N values of the voxel at C-order flat index ``c_index`` (in the mask
        when only ``rows`` are held)."""
        at = np.unravel_index(c_index, self.mask.shape)
        if self.data is not None:
            return np.asarray(self.data[at], np.float32)
        pos = int(np.ravel_multi_index(at, self.mask.shape, order="F"))
        row = np.searchsorted(mask_rows_index(self.mask), pos)
        return np.asarray(self.rows[row], np.float32)

    @property
    def voxel_order(self) -> str:
        """'F' or 'C': the voxel order of the rows :meth:`masked` yields (that of
        the data's storage; F for mask rows)."""
        return "F" if self.data is None else _flat_view(self.data)[1]

    def masked_index(self, order: str = "C") -> np.ndarray:
        """Flat voxel indices (C order, or ``order="F"``) of the rows :meth:`masked`
        yields, in order.

        Results go back with ``out.reshape(-1, ...)[dwi.masked_index()] = rows``
        (C), or into an F-ordered ``out`` through ``out.reshape(-1, ..., order="F")``
        with ``masked_index("F")``: for rows in F voxel order (mask rows, NIfTI
        data) those indices ascend, so the writes are sequential, and no C
        index is computed. Computed once per mask and data object (read-only;
        Validate's QC, its tensor fit and the b0 noise all ask for the C one:
        0.1 s each on an HCP subject).
        """
        if order not in ("C", "F"):
            raise ValueError(f"order must be 'C' or 'F', not {order!r}")
        key = f"_masked_index_{order}"
        cached = self.__dict__.get(key)
        if cached is not None and cached[0] is self.mask and cached[1] is self.data:
            return cached[2]
        stored = self.voxel_order
        index = np.flatnonzero(self.mask.ravel(order=stored))   # storage order
        if stored != order:
            index = np.ravel_multi_index(np.unravel_index(index, self.mask.shape, order=stored),
                                         self.mask.shape, order=order)
        index.setflags(write=False)
        self.__dict__[key] = (self.mask, self.data, index)
        return index

    def masked(self, chunk: int | None = None):
        """(n_vox, N) float32 rows of the mask voxels, optionally in chunks.

        Rows come in the *storage* order of ``data`` (F order for NIfTI
        arrays), so each chunk is gathered from nearby memory through a view
        of the 4D array: about 3x faster than ``data[mask]`` order on an HCP
        subject. :meth:`masked_index` says which voxel each row is. With only
        ``rows`` held, the same rows are copied from them (the same chunks,
        values and layout, so fits give the same bits).
        """
        if self.data is None:
            n = self.rows.shape[0]
            if chunk is None:
                return np.ascontiguousarray(self.rows)
            return (np.ascontiguousarray(self.rows[i:i + chunk]) for i in range(0, n, chunk))
        flat, idx, _ = storage_rows(self.data, self.mask)
        if chunk is None:
            return flat[idx]
        return (flat[idx[i:i + chunk]] for i in range(0, idx.size, chunk))

    def masked_views(self, chunk: int):
        """The chunks of :meth:`masked`, but those of a series held as mask rows
        are views of the rows (F-ordered, no copy): for work that gives the same
        bits on either layout (a matrix product, whose BLAS packs either layout
        into the same panels; a gather of columns), or copies the rows itself
        in the worker that uses them."""
        if self.data is not None:
            return self.masked(chunk)
        return (self.rows[i:i + chunk] for i in range(0, self.rows.shape[0], chunk))


def mask_rows_index(mask: np.ndarray) -> np.ndarray:
    """F-order flat indices of the mask voxels: the voxel of each row of a
    series kept as mask rows (:func:`load_dwi_rows`), in row order."""
    return np.flatnonzero(np.asarray(mask).ravel(order="F"))


def storage_rows(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """(X*Y*Z, N) view of a 4D array in its storage order, the row index of each
    mask voxel in it (storage order), and that order ('C' or 'F')."""
    flat, order = _flat_view(data)
    return flat, np.flatnonzero(mask.ravel(order=order)), order


def _flat_view(data: np.ndarray) -> tuple[np.ndarray, str]:
    """(X*Y*Z, N) view of a 4D array without copying, and the voxel order."""
    order = "F" if data.flags.f_contiguous and not data.flags.c_contiguous else "C"
    if order == "C":
        return data.reshape(-1, data.shape[-1]), "C"
    # F-order: the last axis is slowest, so transpose to make voxels rows.
    return data.reshape(-1, data.shape[-1], order="F"), "F"


def load_mask(path, ref: nib.Nifti1Image) -> np.ndarray:
    img = load_image(path, "mask")
    if len(img.shape) != 3 and not (len(img.shape) == 4 and img.shape[3] == 1):
        raise InputError(path, f"mask must be 3D, found shape {img.shape}")
    if img.shape[:3] != ref.shape[:3]:
        raise InputError(path, f"mask grid {img.shape[:3]} does not match the DWI grid "
                               f"{ref.shape[:3]} of {ref.get_filename()}")
    if not np.allclose(img.affine, ref.affine, atol=AFFINE_TOLERANCE):
        raise InputError(path, f"mask affine differs from the DWI affine of "
                               f"{ref.get_filename()} (not the same voxel grid)")
    arr = read_array(img, "mask").reshape(img.shape[:3])
    if not np.all(np.isfinite(arr)):
        raise InputError(path, "mask holds NaN/Inf values")
    mask = arr > 0
    if not mask.any():
        raise InputError(path, "mask is empty (no voxel > 0)")
    return mask


def mean_b0_map(data: np.ndarray, gtab, volumes=None) -> np.ndarray:
    """Voxel mean of the b0 volumes, float32 (accumulated in float64 one volume
    at a time: no copy of the b0 volumes, ~0.3 GB for an HCP subject).
    ``volumes``: only the b0 volumes among these."""
    idx = np.flatnonzero(gtab.b0s_mask)
    if volumes is not None:
        idx = np.intersect1d(idx, volumes)
    if idx.size == 0:
        raise ValueError("no b0 volume in the gradient table")
    acc = np.zeros(data.shape[:3], dtype=np.float64)
    for k in idx:
        acc += data[..., k]
    return (acc / idx.size).astype(np.float32)


def load_dwi(dwi_path, bval_path, bvec_path, mask_path=None, *, data_path=None) -> DWI:
    """Load and validate one subject's diffusion data.

    Checks, each naming the file: the image exists, is readable NIfTI and 4D
    with at least 2 volumes; bvals/bvecs readable, counts equal to the volume
    count, bvecs 3xN or Nx3 and unit on DW volumes; all values finite; the
    mask (if any) on the same grid and affine and non-empty; the mean b0 is
    positive somewhere in the mask. Without a mask, voxels with a positive
    mean b0 are used.

    ``data_path``: an uncompressed copy of ``dwi_path``'s content (see
    :func:`decode_dwi`) to read the voxels from, as a memory map; every
    error still names ``dwi_path``.
    """
    img = load_image(dwi_path, "DWI")
    dwi_path = os.fspath(dwi_path)
    gtab = _checked_gradients(img, dwi_path, bval_path, bvec_path)
    header_img = img
    if data_path is not None:
        img = _load_copy(data_path, dwi_path, img)
    try:
        data = read_array(img, "DWI")
        _check_finite(data, dwi_path, "DWI")
    except InputError as exc:  # name the input, not its decompressed copy
        raise InputError(dwi_path, exc.problem) from None
    mean_b0 = mean_b0_map(data, gtab)
    if mask_path is not None:
        mask = load_mask(mask_path, header_img)
    else:
        mask = mean_b0 > 0
    if not np.any(mean_b0[mask] > 0):
        raise InputError(dwi_path, f"b0 volumes (b <= {B0_THRESHOLD:g}) are zero everywhere "
                                   f"in the mask")
    paths = {"dwi": dwi_path, "bval": os.fspath(bval_path), "bvec": os.fspath(bvec_path)}
    if mask_path is not None:
        paths["mask"] = os.fspath(mask_path)
    return DWI(data=data, gtab=gtab, mask=mask, affine=img.affine.copy(),
               header=img.header.copy(), paths=paths)


def _checked_gradients(img, dwi_path: str, bval_path, bvec_path) -> GradientTable:
    """A 4D DWI of >= 2 volumes and its gradients, one per volume."""
    if len(img.shape) != 4:
        raise InputError(dwi_path, f"DWI must be a 4D image, found {len(img.shape)}D "
                                   f"shape {img.shape}")
    if img.shape[3] < 2:
        raise InputError(dwi_path, f"DWI has only {img.shape[3]} volume")
    n_bvals = read_bvals(bval_path).size
    if n_bvals != img.shape[3]:
        raise InputError(bval_path, f"bval file has {n_bvals} values but the image "
                                    f"{dwi_path} has {img.shape[3]} volumes")
    return read_gradients(bval_path, bvec_path, n_volumes=img.shape[3])


def _load_copy(data_path, dwi_path: str, original: nib.Nifti1Image) -> nib.Nifti1Image:
    """The decompressed copy of ``dwi_path`` (its errors name ``dwi_path``); its
    header must be the one read from the compressed file."""
    try:
        img = load_image(data_path, "DWI")
    except InputError as exc:
        raise InputError(dwi_path, f"{exc.problem} (in the decompressed data)") from None
    if img.header.binaryblock != original.header.binaryblock:
        raise InputError(dwi_path, f"the decompressed copy {data_path} has another header")
    return img


#: File name of a decompressed input in the node folder of the step that read it.
DECODED_NAME = "dwi.nii"


@dataclass(frozen=True)
class DecodedInput:
    """An input read once: where its voxels are now (uncompressed) and its sha256."""

    path: str            # the uncompressed copy, or the input itself when not compressed
    sha256: str          # of the input file as given
    copied: bool         # True when ``path`` is a copy written here
    codec: str = ""


def decode_dwi(dwi_path, out_dir, codec_name: str = codec.DEFAULT_CODEC) -> DecodedInput:
    """Read a DWI file once: its sha256, and for a gzip file (by content, not by
    name) the data inflated to ``out_dir/dwi.nii`` with every gzip member's
    CRC32 and length checked. A corrupt or truncated stream raises an
    :class:`InputError` naming ``dwi_path``; nothing is left behind."""
    dwi_path = os.fspath(dwi_path)
    check_readable_file(dwi_path, "DWI")
    if not codec.is_gzip(dwi_path):
        return DecodedInput(dwi_path, codec.sha256_file(dwi_path), copied=False)
    found = {}

    def inflate(tmp):
        found["decoded"] = codec.decompress_and_hash(dwi_path, tmp, codec_name)
    try:
        dst = atomic_write(Path(out_dir) / DECODED_NAME, inflate)
    except codec.CorruptGzipError as exc:
        raise InputError(dwi_path, f"DWI is not a valid gzip file: {exc}") from None
    return DecodedInput(str(dst), found["decoded"].sha256, copied=True, codec=codec_name)


#: File name of a series' mask rows in Validate's node folder (see :func:`load_dwi_rows`).
ROWS_NAME = "dwi_rows.npy"


#: Stored voxel types whose every value float32 holds exactly: their mask rows
#: are cut from the inflated stream as float32, the values ``read_array`` gives.
#: Scanner data are mostly 16-bit integers (dcm2niix), HCP's float32.
ROWS_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.int16, np.uint16, np.int8, np.uint8))


def rows_readable(img: nib.Nifti1Image) -> bool:
    """True when an image's stored values are its float32 values exactly: a
    :data:`ROWS_DTYPES` type (either byte order) without scaling; then its
    mask rows can be cut from the inflated stream."""
    # the proxy's scaling: a loaded image's header has had it reset to NaN
    slope, inter = (getattr(img.dataobj, k, None) for k in ("slope", "inter"))
    return (img.get_data_dtype().newbyteorder("=") in ROWS_DTYPES
            and slope in (None, 1.0) and inter in (None, 0.0) and len(img.shape) == 4)


@dataclass
class RowsRead:
    """What :func:`load_dwi_rows` found besides the series: the input's hash and codec."""

    sha256: str              # of the input file as given
    codec: str


#: Decoded volumes waiting between the thread that inflates a DWI and the one
#: checking and storing them (:func:`load_dwi_rows`). Two let either side run
#: ahead by a volume (a slow write on one side, one read
#: block inflating into two volumes on the other) without stalling the other;
#: each costs one volume buffer (14.6 MB on an HCP grid), and the read holds
#: ``VOLUME_QUEUE_DEPTH + 2`` buffers at most, so memory stays bounded.
VOLUME_QUEUE_DEPTH = 2


class _VolumeStream:
    """Cuts an inflated NIfTI byte stream into its volumes (F order, of the
    stored type ``dtype``) and hands each to ``emit((k, vol))``, cycling
    through ``buffers`` volume buffers (1: one reused buffer; more when the
    volumes are used in another thread, see :func:`parallel.produce_consume`);
    bytes after the last volume are ignored, as nibabel does.

    Used as :func:`codec.inflate`'s ``into`` and ``write``: the stream is
    inflated straight into the current volume's buffer (:meth:`destination`),
    the header and the bytes after the last volume into a scratch block, and
    :meth:`write` only counts what was filled."""

    def __init__(self, offset: int, shape, emit, dtype=np.float32, buffers: int = 1,
                 scratch: int = codec.OUT_BLOCK):
        self.skip, self.n, self.k, self.fill = int(offset), int(shape[3]), 0, 0
        self.raws = [np.empty(tuple(shape[:3]), np.dtype(dtype), order="F")
                     for _ in range(buffers)]
        self.bufs = [memoryview(r.reshape(-1, order="F").view(np.uint8)) for r in self.raws]
        self.scratch = memoryview(bytearray(scratch))
        self.emit = emit

    def destination(self) -> memoryview:
        """Where the next inflated bytes go (never empty): the rest of the
        header, the unfilled part of the current volume, or scratch."""
        if self.skip:
            return self.scratch[:min(self.skip, len(self.scratch))]
        if self.k >= self.n:
            return self.scratch
        return self.bufs[self.k % len(self.raws)][self.fill:]

    def write(self, data) -> None:
        """``len(data)`` bytes were inflated into :meth:`destination`: count
        them, and emit the volume they complete."""
        n = len(data)
        if self.skip:
            self.skip -= n
        elif self.k < self.n:
            slot = self.k % len(self.raws)
            self.fill += n
            if self.fill == len(self.bufs[slot]):
                self.emit((self.k, self.raws[slot]))
                self.k, self.fill = self.k + 1, 0


def load_dwi_rows(dwi_path, bval_path, bvec_path, mask_path, out_dir,
                  codec_name: str = codec.DEFAULT_CODEC) -> tuple[DWI, RowsRead]:
    """Validate a gzip-compressed DWI in ONE read, keeping its mask rows (float32).

    The same checks as :func:`load_dwi` (same messages), but the file is read
    once (:func:`codec.inflate`: sha256, every gzip member's CRC32 and length),
    each volume checked for NaN/Inf as it arrives, and only the mask voxels
    kept: ``out_dir/dwi_rows.npy``, (mask voxels, N) float32 in Fortran order
    (each volume's mask voxels contiguous), row order that of
    :meth:`DWI.masked`. For an HCP subject that is 1.2 GB written instead of
    a 4.2 GB uncompressed copy (measured: writing 4.2 GB took 13.5 s here, as
    long as inflating), and a chunk of rows is read as N contiguous runs.
    Needs a mask and :func:`rows_readable` data. Where the process may use two
    threads, the inflate runs in a second one beside the per-volume work
    (:func:`parallel.produce_consume`): the same bytes, and the same error
    when the file has several faults (the first in file order).
    """
    img = load_image(dwi_path, "DWI")
    dwi_path = os.fspath(dwi_path)
    gtab = _checked_gradients(img, dwi_path, bval_path, bvec_path)
    if not rows_readable(img):
        raise ValueError(f"{dwi_path}: not stored as exact float32 values (use load_dwi)")
    mask = load_mask(mask_path, img)
    shape = img.shape
    idx = mask_rows_index(mask)
    column = np.empty(idx.size, np.float32)          # one volume's mask voxels
    stored = img.get_data_dtype()
    as_f32 = None if stored == np.float32 else np.empty(shape[:3], np.float32, order="F")
    # two threads (inflate | check and store) unless the user gave this process one
    threads = min(2, parallel.available_threads())
    b0_idx = np.flatnonzero(gtab.b0s_mask)
    if b0_idx.size == 0:
        raise ValueError("no b0 volume in the gradient table")
    found = {}

    def write_rows(tmp) -> None:
        # an .npy in Fortran order: each volume's mask voxels are one contiguous
        # block, appended as the volume arrives (no 4D array, no transposition)
        with open(tmp, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                "fortran_order": True, "shape": (int(idx.size), int(shape[3]))})

            def on_volume(item: tuple[int, np.ndarray]) -> None:
                k, vol = item
                if as_f32 is not None:          # exact for ROWS_DTYPES
                    as_f32[...] = vol
                    vol = as_f32
                _check_finite_volume(vol, k, dwi_path, "DWI")
                np.take(vol.reshape(-1, order="F"), idx, out=column)
                fh.write(column.data)

            def inflate(emit) -> None:
                stream = _VolumeStream(img.dataobj.offset, shape, emit, stored,
                                       buffers=1 if threads < 2 else VOLUME_QUEUE_DEPTH + 2)
                found["decoded"] = codec.inflate(dwi_path, stream.write, codec_name,
                                                 n_threads=threads, into=stream.destination)
                found["volumes"] = stream.k

            try:    # inflate in a second thread, the volumes checked and stored here
                parallel.produce_consume(inflate, on_volume, VOLUME_QUEUE_DEPTH, threads)
            except codec.CorruptGzipError as exc:
                raise InputError(dwi_path, f"DWI is not a valid gzip file: {exc}") from None
            n_read = found["volumes"]
            if n_read < shape[3]:
                raise InputError(dwi_path, f"cannot read DWI data, the file is truncated or "
                                           f"corrupt (the data end in volume {n_read} of "
                                           f"{shape[3]})")

    path = atomic_write(Path(out_dir) / ROWS_NAME, write_rows)
    rows = np.load(path, mmap_mode="r")
    # as mean_b0_map on the mask voxels: float64 sums in volume order, then float32;
    # each b0's mask values are one contiguous column of the rows just written
    acc = np.zeros(idx.size, dtype=np.float64)
    for k in b0_idx:
        acc += rows[:, k]
    if not np.any((acc / b0_idx.size).astype(np.float32) > 0):
        path.unlink()
        raise InputError(dwi_path, f"b0 volumes (b <= {B0_THRESHOLD:g}) are zero everywhere "
                                   f"in the mask")
    paths = {"dwi": dwi_path, "bval": os.fspath(bval_path), "bvec": os.fspath(bvec_path),
             "mask": os.fspath(mask_path)}
    dwi = DWI(data=None, gtab=gtab, mask=mask, affine=img.affine.copy(),
              header=img.header.copy(), paths=paths, rows=rows)
    return dwi, RowsRead(found["decoded"].sha256, codec_name)


def open_dwi_rows(dwi_path, bval_path, bvec_path, mask_path, rows_path) -> DWI:
    """A series Validate stored as mask rows (:func:`load_dwi_rows`): header of
    the input, gradients, mask, and the rows as a read-only memory map."""
    img = load_image(dwi_path, "DWI")
    gtab = _checked_gradients(img, os.fspath(dwi_path), bval_path, bvec_path)
    mask = load_mask(mask_path, img)
    rows = np.load(rows_path, mmap_mode="r")
    if rows.shape != (int(mask.sum()), len(gtab)) or rows.dtype != np.float32:
        raise InputError(rows_path, f"mask rows {rows.shape} {rows.dtype} do not match the "
                                    f"mask ({int(mask.sum())} voxels) and {len(gtab)} volumes")
    paths = {"dwi": os.fspath(dwi_path), "bval": os.fspath(bval_path),
             "bvec": os.fspath(bvec_path), "mask": os.fspath(mask_path)}
    return DWI(data=None, gtab=gtab, mask=mask, affine=img.affine.copy(),
               header=img.header.copy(), paths=paths, rows=rows)


# ----------------------------------------------------------------------------
# JSON sidecars and the acquisition census row
# ----------------------------------------------------------------------------
#: Keys of a census row (acquisition facts of one series), in table order.
CENSUS_FIELDS = ("field_strength_t", "echo_time_ms", "shells", "directions",
                 "n_b0", "voxel_size_mm", "dims")


def read_sidecar(path: str | None) -> dict:
    """A series' BIDS JSON sidecar as a dict ({} when there is none)."""
    if not path:
        return {}
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read JSON sidecar ({exc})") from None
    if not isinstance(meta, dict):
        raise InputError(path, f"JSON sidecar is a {type(meta).__name__}, not an object "
                               f"of fields: {str(meta)[:60]}")
    return meta


def census_row(dwi, bval, bvec, sidecar=None, gtab=None, shape=None, zooms=None,
               warnings: list | None = None) -> dict:
    """Acquisition facts of one series from its header, gradients and sidecar.

    ``gtab``/``shape``/``zooms`` may be passed when already loaded. Sidecar
    values in the wrong unit or type are converted or left empty (see
    :mod:`.sidecar_fields`); the warnings go to ``warnings`` when given.
    """
    if shape is None or zooms is None:
        img = load_image(dwi, "DWI")
        shape, zooms = img.shape, img.header.get_zooms()
    if gtab is None:
        gtab = read_gradients(bval, bvec, n_volumes=shape[3] if len(shape) == 4 else None)
    meta = read_sidecar(sidecar)
    field_t, field_warnings = field_strength_t(meta)
    te_ms, te_warnings = echo_time_ms(meta)
    if warnings is not None:
        warnings.extend(f"{Path(sidecar).name}: {w}" for w in field_warnings + te_warnings)
    return {
        "field_strength_t": field_t,
        "echo_time_ms": te_ms,
        "shells": " ".join(f"{b:g}" for b in gtab.shells),
        "directions": " ".join(str(n) for n in gtab.directions_per_shell().values()),
        "n_b0": int(gtab.b0s_mask.sum()),
        "voxel_size_mm": "x".join(f"{z:.3g}" for z in zooms[:3]),
        "dims": "x".join(str(int(d)) for d in shape[:3]),
    }


# ----------------------------------------------------------------------------
# Writing: temporary name, then rename
# ----------------------------------------------------------------------------
#: In the temporary name of an atomic write: ``.<name>.<random>.tmp<ext>``.
TEMP_TAG = ".tmp"


def temporary_files(folder) -> list[Path]:
    """Temporary names of atomic writes under a folder: a killed writer's leftovers
    (never valid results; only safe to delete when no writer is running)."""
    folder = Path(folder)
    return sorted(folder.rglob(f".*{TEMP_TAG}*")) if folder.is_dir() else []


def atomic_write(path: str | os.PathLike, write, folder: bool = False) -> Path:
    """Write ``path`` all at once: ``write(tmp)`` fills a temporary sibling
    (``.<name>.<random>.tmp<ext>``), which is then renamed onto ``path``.

    The one way dmriflow writes: a reader never sees a half-written file and
    a killed writer leaves only a temporary name (:func:`temporary_files`).
    ``folder``: ``tmp`` is a new empty folder and ``path`` a folder; an
    existing one is swapped out and deleted after the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = {"prefix": f".{path.name}.", "suffix": f"{TEMP_TAG}{''.join(path.suffixes)}",
             "dir": path.parent}
    if folder:
        tmp = tempfile.mkdtemp(**names)
        mode = 0o777
    else:
        fd, tmp = tempfile.mkstemp(**names)
        os.close(fd)
        mode = 0o666
    try:
        write(tmp)
        # mkstemp/mkdtemp create 0600/0700: give the mode a plain open()/mkdir() would
        os.chmod(tmp, mode & ~_umask())
        if folder and path.exists():
            old = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
            os.replace(path, os.path.join(old, path.name))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_nifti(data: np.ndarray, affine: np.ndarray, path, header=None) -> Path:
    """Write a float32 (or given dtype) NIfTI atomically (bool is stored as uint8)."""
    data = np.asanyarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    hdr = None
    if header is not None:
        hdr = header.copy()
        hdr.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, affine, hdr)
    img.header.set_data_dtype(data.dtype)
    img.header["descrip"] = f"dmriflow {__version__}".encode()
    return atomic_write(path, lambda tmp: _write_image(img, tmp))


def _write_image(img: nib.Nifti1Image, path: str) -> None:
    """nib.save, but a .gz through the fast writer (:func:`codec.gzip_writer`)."""
    if not path.endswith(".gz"):
        nib.save(img, path)
        return
    with codec.gzip_writer(path) as fh:
        img.to_stream(fh)


def copy_file(src, dst) -> Path:
    """Copy a file atomically (temporary name, then rename)."""
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def write_text(text: str, path) -> Path:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    return atomic_write(path, w)


def write_json(obj, path) -> Path:
    return write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n",
                      path)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------
def file_sha256(path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=1)
def package_versions() -> dict:
    versions = {"python": platform.python_version(), "dmriflow": __version__}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _source_dirs() -> dict[str, Path]:
    """The folder of each installed dmriflow layer (the source that is run)."""
    dirs = {}
    for layer in ("interfaces", "pipelines", "models"):
        spec = importlib.util.find_spec(f"dmriflow.{layer}")
        if spec is None or not spec.submodule_search_locations:
            continue
        dirs[layer] = Path(list(spec.submodule_search_locations)[0])
    return dirs


def _hash_sources(dirs: dict[str, Path]) -> str:
    """sha256 over names and bytes of the ``*.py`` files under each folder.

    Hidden files (editor lock files such as emacs' dangling ``.#x.py`` links)
    and anything that is not a regular file are skipped.
    """
    h = hashlib.sha256()
    for layer in sorted(dirs):
        pkg_dir = dirs[layer]
        for f in sorted(pkg_dir.rglob("*.py")):
            rel = f.relative_to(pkg_dir)
            if any(part.startswith(".") for part in rel.parts) or not f.is_file():
                continue
            content = f.read_bytes()
            h.update(f"{layer}/{rel.as_posix()}\0{len(content)}\0".encode())
            h.update(content)
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 over the source of all dmriflow layers (code edits -> new hash).

    Computed once per process: a process that edits its own source must call
    ``source_hash.cache_clear()``.
    """
    return _hash_sources(_source_dirs())


def pipeline_version() -> str:
    """Package version plus a hash of its source: the cache-busting key."""
    return f"{__version__}+{source_hash()}"


def sidecar(inputs: dict, parameters: dict, step: str, extra: dict | None = None,
            hashes: dict | None = None, version: str | None = None) -> dict:
    """Provenance for one derivative: inputs' hashes, parameters, versions and
    the environment id (the lock's sha256, see :mod:`.environment`).

    ``hashes`` (sha256 by input key) are the hashes recorded when the inputs
    were validated: they name the content that was processed, and spare
    re-reading a 4 GB series for every derivative; inputs without one are
    hashed here. ``version`` is the pipeline version of the run (default:
    this process's :func:`pipeline_version`), so every file of one run
    carries the same one.
    """
    hashes = hashes or {}
    return {
        "GeneratedBy": [{"Name": "dmriflow", "Version": __version__,
                         "PipelineVersion": version or pipeline_version(), "Step": step}],
        "Inputs": {k: {"path": os.fspath(p), "sha256": hashes.get(k) or file_sha256(p)}
                   for k, p in inputs.items() if p is not None},
        "Parameters": {**parameters, "gradient_policy": gradient_policy()},
        "Versions": package_versions(),
        **environment(),
        **(extra or {}),
    }
