"""Broken inputs: every case raises InputError naming the file and the problem.

Each case starts from a tiny valid synthetic subject written in ``tmp_path``
(6x6x4 voxels, 2 b0 + 12 directions at b=1000, an oblique affine with a
positive determinant, a mask) and breaks one thing.
"""

import gzip
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import from_matvec
from numpy.testing import assert_allclose, assert_array_equal

from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.io import load_dwi

SHAPE = (6, 6, 4)
B0_VOLUMES = (0, 7)
N_VOL = 14


def _directions():
    rng = np.random.default_rng(42)
    v = rng.normal(size=(12, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _affine():
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    return from_matvec(rot @ np.diag([2.0, 2.0, 2.5]), [-5.0, -6.0, 3.0])


def write_nifti(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def write_table(path, rows, fmt="%.6f"):
    np.savetxt(path, np.atleast_2d(rows), fmt=fmt)
    return path


@dataclass
class Subject:
    dwi: Path
    bval: Path
    bvec: Path
    mask: Path
    data: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray        # (N, 3)
    mask_array: np.ndarray
    affine: np.ndarray

    def load(self, **override):
        paths = dict(dwi_path=self.dwi, bval_path=self.bval, bvec_path=self.bvec,
                     mask_path=self.mask)
        paths.update(override)
        return load_dwi(**paths)


@pytest.fixture
def subject(tmp_path):
    affine = _affine()
    assert np.linalg.det(affine[:3, :3]) > 0
    bvals = np.full(N_VOL, 1000.0)
    bvals[list(B0_VOLUMES)] = 0
    bvecs = np.zeros((N_VOL, 3))
    bvecs[bvals > 0] = _directions()
    D = np.diag([1.7e-3, 0.3e-3, 0.3e-3])
    s0 = np.full(SHAPE, 200.0)
    s0[1:5, 1:5, 1:3] = 1000.0
    att = np.exp(-bvals * np.einsum("ni,ij,nj->n", bvecs, D, bvecs))
    data = (s0[..., None] * att).astype(np.float32)
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:5, 1:5, 1:3] = 1
    return Subject(
        dwi=write_nifti(tmp_path / "dwi.nii.gz", data, affine),
        bval=write_table(tmp_path / "dwi.bval", bvals, "%g"),
        bvec=write_table(tmp_path / "dwi.bvec", bvecs.T),
        mask=write_nifti(tmp_path / "mask.nii.gz", mask, affine),
        data=data, bvals=bvals, bvecs=bvecs, mask_array=mask.astype(bool), affine=affine)


def assert_input_error(call, path, *phrases):
    """``call()`` raises InputError for ``path`` whose problem holds every phrase."""
    with pytest.raises(InputError) as info:
        call()
    err = info.value
    path = os.fspath(path)
    assert err.path == path
    assert str(err) == f"{path}: {err.problem}"
    for phrase in phrases:
        assert phrase in err.problem, f"{phrase!r} not in {err.problem!r}"
    return err


# ----------------------------------------------------------------------------
# The valid subject, and variants that must be accepted
# ----------------------------------------------------------------------------
def test_valid_subject_loads(subject):
    dwi = subject.load()
    assert dwi.data.shape == SHAPE + (N_VOL,)
    assert_array_equal(dwi.data, subject.data)
    assert_array_equal(dwi.mask, subject.mask_array)
    assert_array_equal(np.flatnonzero(dwi.gtab.b0s_mask), B0_VOLUMES)
    assert dwi.gtab.shells == [1000.0]
    assert_allclose(dwi.gtab.bvecs, subject.bvecs, atol=1e-6)
    assert_allclose(dwi.affine, subject.affine, atol=1e-6)


def test_bvecs_Nx3_are_accepted_and_transposed(subject):
    write_table(subject.bvec, subject.bvecs)  # N x 3, N = 14
    dwi = subject.load()
    assert dwi.gtab.bvecs.shape == (N_VOL, 3)
    assert_allclose(dwi.gtab.bvecs, subject.bvecs, atol=1e-6)


def test_zero_and_nonzero_bvecs_on_b0_are_accepted(subject):
    vecs = subject.bvecs.copy()
    vecs[B0_VOLUMES[1]] = [0.57735, 0.57735, 0.57735]  # Philips writes these
    write_table(subject.bvec, vecs.T)
    dwi = subject.load()
    assert_array_equal(dwi.gtab.bvecs[list(B0_VOLUMES)], 0)


def test_slightly_non_unit_bvecs_are_renormalised(subject):
    write_table(subject.bvec, (subject.bvecs * 1.03).T)
    dwi = subject.load()
    assert_allclose(dwi.gtab.bvecs, subject.bvecs, atol=1e-6)


def test_small_nonzero_b0_and_one_column_bvals_are_accepted(subject):
    bvals = subject.bvals.copy()
    bvals[B0_VOLUMES[1]] = 0.003
    write_table(subject.bval, bvals[:, None], "%g")
    dwi = subject.load()
    assert_array_equal(np.flatnonzero(dwi.gtab.b0s_mask), B0_VOLUMES)


def test_mask_with_singleton_4th_axis_is_accepted(subject):
    write_nifti(subject.mask, subject.mask_array[..., None].astype(np.uint8), subject.affine)
    assert_array_equal(subject.load().mask, subject.mask_array)


def test_error_survives_pickling(subject):
    err = assert_input_error(lambda: subject.load(bval_path=subject.dwi.parent / "nope"),
                             subject.dwi.parent / "nope", "does not exist")
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.problem, str(again)) == (err.path, err.problem, str(err))


# ----------------------------------------------------------------------------
# The DWI image file
# ----------------------------------------------------------------------------
def test_missing_dwi(subject):
    subject.dwi.unlink()
    assert_input_error(subject.load, subject.dwi, "DWI file does not exist")


def test_directory_instead_of_dwi(subject, tmp_path):
    folder = tmp_path / "folder.nii.gz"
    folder.mkdir()
    assert_input_error(lambda: subject.load(dwi_path=folder), folder,
                       "is a directory, not a DWI file")


def test_unreadable_dwi(subject):
    """A file without read permission. Root reads any file, so as root the load
    runs in a child process as user nobody (setpriv), on a world-traversable copy."""
    if os.geteuid() != 0:
        subject.dwi.chmod(0)
        assert_input_error(subject.load, subject.dwi, "not readable (permission denied)")
        return
    folder = Path(tempfile.mkdtemp(prefix="dmriflow-perm-"))
    try:
        folder.chmod(0o755)
        for name in ("dwi", "bval", "bvec"):
            shutil.copy(getattr(subject, name), folder / getattr(subject, name).name)
            (folder / getattr(subject, name).name).chmod(0o644)
        dwi = folder / subject.dwi.name
        dwi.chmod(0)
        code = ("import sys; from dmriflow.interfaces.io import load_dwi\n"
                "from dmriflow.interfaces.errors import InputError\n"
                "try:\n    load_dwi(*sys.argv[1:4])\n"
                "except InputError as e:\n    print(e)")
        args = [str(dwi), str(folder / subject.bval.name), str(folder / subject.bvec.name)]
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              sys.executable, "-c", code, *args],
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == f"{dwi}: DWI file is not readable (permission denied)"
    finally:
        shutil.rmtree(folder)


def test_truncated_nii_gz_data(subject):
    raw = subject.dwi.read_bytes()
    subject.dwi.write_bytes(raw[:len(raw) // 2])
    assert_input_error(subject.load, subject.dwi, "cannot read DWI data",
                       "truncated or corrupt")


def test_truncated_nii_gz_header(subject):
    subject.dwi.write_bytes(subject.dwi.read_bytes()[:100])
    assert_input_error(subject.load, subject.dwi, "cannot read DWI as NIfTI")


def test_truncated_uncompressed_nii(subject, tmp_path):
    path = write_nifti(tmp_path / "dwi.nii", subject.data, subject.affine)
    path.write_bytes(path.read_bytes()[:-100])
    assert_input_error(lambda: subject.load(dwi_path=path), path,
                       "DWI file is truncated", f"the file has {os.path.getsize(path)}")


def test_garbage_bytes_named_nii_gz(subject):
    subject.dwi.write_bytes(bytes(range(256)) * 8)
    assert_input_error(subject.load, subject.dwi, "cannot read DWI as NIfTI",
                       "not a gzip file")


def test_gzipped_garbage_named_nii_gz(subject):
    subject.dwi.write_bytes(gzip.compress(b"this is not a NIfTI header " * 40))
    assert_input_error(subject.load, subject.dwi, "cannot read DWI as NIfTI")


def test_text_file_named_nii(subject, tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("subject 01 diffusion data, see email\n" * 20)
    assert_input_error(lambda: subject.load(dwi_path=path), path, "cannot read DWI as NIfTI")


def test_non_nifti_image_mgz(subject, tmp_path):
    path = tmp_path / "dwi.mgz"
    nib.save(nib.MGHImage(subject.data, subject.affine), path)
    assert_input_error(lambda: subject.load(dwi_path=path), path,
                       "DWI is not a NIfTI image (MGHImage)")


def _corrupt_header(subject, tmp_path, field, value):
    path = write_nifti(tmp_path / "dwi.nii", subject.data, subject.affine)
    raw = path.read_bytes()
    hdr = nib.Nifti1Header.from_fileobj(open(path, "rb"))
    hdr[field] = value
    path.write_bytes(hdr.binaryblock + raw[len(hdr.binaryblock):])
    return path


def test_unknown_datatype_code_in_header(subject, tmp_path):
    path = _corrupt_header(subject, tmp_path, "datatype", 999)
    assert_input_error(lambda: subject.load(dwi_path=path), path,
                       "cannot read DWI as NIfTI", "999 not recognized")


def test_negative_dimension_in_header(subject, tmp_path):
    path = _corrupt_header(subject, tmp_path, "dim", [4, -6, 6, 4, N_VOL, 1, 1, 1])
    assert_input_error(lambda: subject.load(dwi_path=path), path,
                       "DWI header has an invalid shape (-6, 6, 4, 14)")


def test_3d_image_as_dwi(subject):
    write_nifti(subject.dwi, subject.data[..., 0], subject.affine)
    assert_input_error(subject.load, subject.dwi, "DWI must be a 4D image, found 3D")


def test_single_volume_4d(subject):
    write_nifti(subject.dwi, subject.data[..., :1], subject.affine)
    assert_input_error(subject.load, subject.dwi, "DWI has only 1 volume")


def test_wrong_volume_count_vs_bvals(subject):
    write_nifti(subject.dwi, subject.data[..., :N_VOL - 1], subject.affine)
    assert_input_error(subject.load, subject.bval, f"bval file has {N_VOL} values",
                       f"the image {subject.dwi} has {N_VOL - 1} volumes")


@pytest.mark.parametrize("value, volume", [(np.nan, 4), (np.inf, 0)], ids=["nan", "inf"])
def test_non_finite_voxel(subject, value, volume):
    data = subject.data.copy()
    data[1, 2, 3, volume] = value
    write_nifti(subject.dwi, data, subject.affine)
    assert_input_error(subject.load, subject.dwi,
                       f"DWI has 1 NaN/Inf voxel(s) in volume {volume}, first at (1, 2, 3)")


def test_all_zero_b0(subject):
    data = subject.data.copy()
    data[..., list(B0_VOLUMES)] = 0
    write_nifti(subject.dwi, data, subject.affine)
    assert_input_error(subject.load, subject.dwi, "b0 volumes", "are zero everywhere in the mask")


# ----------------------------------------------------------------------------
# bval file
# ----------------------------------------------------------------------------
def test_missing_bval(subject):
    subject.bval.unlink()
    assert_input_error(subject.load, subject.bval, "bval file does not exist")


def test_directory_instead_of_bval(subject, tmp_path):
    folder = tmp_path / "bvals"
    folder.mkdir()
    assert_input_error(lambda: subject.load(bval_path=folder), folder,
                       "is a directory, not a bval file")


def test_non_numeric_bval(subject):
    subject.bval.write_text("0 1000 1000 abc " + " ".join(["1000"] * 10) + "\n")
    assert_input_error(subject.load, subject.bval, "non-numeric value 'abc'")


def test_binary_garbage_bval(subject):
    subject.bval.write_bytes(bytes(range(256)))
    assert_input_error(subject.load, subject.bval, "cannot read bval file as text")


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank"])
def test_empty_bval(subject, content):
    subject.bval.write_text(content)
    assert_input_error(subject.load, subject.bval, "bval file is empty")


def test_negative_bvalue(subject):
    bvals = subject.bvals.copy()
    bvals[3] = -1000
    write_table(subject.bval, bvals, "%g")
    assert_input_error(subject.load, subject.bval, "negative b-values (volume(s) 3)")


def test_nan_in_bvals(subject):
    bvals = subject.bvals.copy()
    bvals[5] = np.nan
    write_table(subject.bval, bvals, "%g")
    assert_input_error(subject.load, subject.bval, "bval file holds NaN or Inf")


def test_bval_table_with_two_rows(subject):
    write_table(subject.bval, np.vstack([subject.bvals, subject.bvals]), "%g")
    assert_input_error(subject.load, subject.bval, "must hold one row", "2x14 table")


def test_no_b0_volume(subject):
    write_table(subject.bval, np.full(N_VOL, 1000.0), "%g")
    vecs = np.tile(_directions(), (2, 1))[:N_VOL]
    write_table(subject.bvec, vecs.T)
    assert_input_error(subject.load, subject.bval, "no b0 volume (no b-value <= 50")


# ----------------------------------------------------------------------------
# bvec file
# ----------------------------------------------------------------------------
def test_missing_bvec(subject):
    subject.bvec.unlink()
    assert_input_error(subject.load, subject.bvec, "bvec file does not exist")


def test_bvec_count_differs_from_bval_count(subject):
    write_table(subject.bvec, subject.bvecs[:-1].T)
    assert_input_error(subject.load, subject.bvec,
                       f"{N_VOL - 1} vectors but {N_VOL} volumes are expected")


@pytest.mark.parametrize("rows", [4, 2])
def test_bvec_wrong_row_count(subject, rows):
    table = np.vstack([subject.bvecs.T, np.zeros((1, N_VOL))])[:rows]
    write_table(subject.bvec, table)
    assert_input_error(subject.load, subject.bvec,
                       f"must be 3xN (or Nx3), found {rows}x{N_VOL}")


def test_ragged_bvec_rows(subject):
    lines = subject.bvec.read_text().splitlines()
    lines[1] = " ".join(lines[1].split()[:-1])  # one value missing in the y row
    subject.bvec.write_text("\n".join(lines) + "\n")
    assert_input_error(subject.load, subject.bvec, "rows of different lengths",
                       f"[{N_VOL - 1}, {N_VOL}]")


def test_nan_in_bvecs(subject):
    vecs = subject.bvecs.copy()
    vecs[2, 1] = np.nan
    write_table(subject.bvec, vecs.T)
    assert_input_error(subject.load, subject.bvec, "bvec file holds NaN or Inf")


def test_non_unit_bvec_on_dw_volume(subject):
    vecs = subject.bvecs.copy()
    vecs[3] *= 0.5
    write_table(subject.bvec, vecs.T)
    assert_input_error(subject.load, subject.bvec, "norm far from 1",
                       "volume(s) 3 (norms 0.500)")


def test_zero_bvec_on_dw_volume(subject):
    vecs = subject.bvecs.copy()
    vecs[5] = 0
    write_table(subject.bvec, vecs.T)
    assert_input_error(subject.load, subject.bvec,
                       "zero-norm b-vector on diffusion-weighted volume(s) 5")


# ----------------------------------------------------------------------------
# mask file
# ----------------------------------------------------------------------------
def test_missing_mask(subject):
    subject.mask.unlink()
    assert_input_error(subject.load, subject.mask, "mask file does not exist")


def test_mask_on_another_grid(subject):
    write_nifti(subject.mask, subject.mask_array[:, :, :3].astype(np.uint8), subject.affine)
    assert_input_error(subject.load, subject.mask, "mask grid (6, 6, 3) does not match",
                       f"(6, 6, 4) of {subject.dwi}")


def test_mask_with_another_affine(subject):
    shifted = subject.affine.copy()
    shifted[:3, 3] += [2.0, 0, 0]
    write_nifti(subject.mask, subject.mask_array.astype(np.uint8), shifted)
    assert_input_error(subject.load, subject.mask, "mask affine differs from the DWI affine")


def test_4d_mask(subject):
    two = np.stack([subject.mask_array] * 2, axis=-1).astype(np.uint8)
    write_nifti(subject.mask, two, subject.affine)
    assert_input_error(subject.load, subject.mask, "mask must be 3D, found shape (6, 6, 4, 2)")


def test_empty_mask(subject):
    write_nifti(subject.mask, np.zeros(SHAPE, np.uint8), subject.affine)
    assert_input_error(subject.load, subject.mask, "mask is empty")


def test_nan_in_mask(subject):
    mask = subject.mask_array.astype(np.float32)
    mask[2, 2, 2] = np.nan
    write_nifti(subject.mask, mask, subject.affine)
    assert_input_error(subject.load, subject.mask, "mask holds NaN/Inf")
