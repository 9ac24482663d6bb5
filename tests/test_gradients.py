"""Gradient tables: b0 policy, shells, bvec layouts, frames (interfaces.gradients)."""

import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine, from_matvec
from numpy.testing import assert_allclose, assert_array_equal

from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.gradients import (B0_THRESHOLD, BVEC_NORM_TOLERANCE, GradientTable,
                                           check_and_normalise, cluster_shells, fsl_to_world,
                                           gradient_policy, read_bvals, read_bvecs,
                                           read_gradients, world_to_fsl)

MDT60 = "mdt_te60_b1k_b2k"
MDT91 = "mdt_te91_multishell"
PHILIPS = "philips_ingenia_b1000"


def _real(shared_data, name):
    folder = shared_data / name
    image = next(p for p in sorted(folder.glob("*.nii.gz")) if "mask" not in p.name)
    return image, next(folder.glob("*.bval")), next(folder.glob("*.bvec"))


def _unit(rng, n):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _write_rows(path, array, fmt="%.8f"):
    np.savetxt(path, np.atleast_2d(array), fmt=fmt)
    return path


def _rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


# ----------------------------------------------------------------------------
# b0 policy and shell clustering
# ----------------------------------------------------------------------------
def test_constants_in_policy():
    policy = gradient_policy()
    assert policy["b0_threshold"] == B0_THRESHOLD
    assert policy["bvec_norm_tolerance"] == BVEC_NORM_TOLERANCE
    assert policy["bvec_frame"] == "fsl-image"


def test_hcp_like_rounded_bvalues():
    # HCP stores b0 as 5 and the shells as 990/1985/2990 with +-15 jitter.
    rng = np.random.default_rng(0)
    stored = np.concatenate([np.full(18, 5.0),
                             990 + 5 * rng.integers(-3, 4, 90),
                             1985 + 5 * rng.integers(-3, 4, 90),
                             2990 + 5 * rng.integers(-3, 4, 90)])
    order = rng.permutation(stored.size)  # interleaved as acquired
    bvals = stored[order]
    truth = np.repeat([0.0, 1000.0, 2000.0, 3000.0], [18, 90, 90, 90])[order]
    assert_array_equal(cluster_shells(bvals), truth)
    bvecs = _unit(rng, bvals.size)
    gt = GradientTable(bvals, bvecs)
    assert gt.shells == [1000.0, 2000.0, 3000.0]
    assert int(gt.b0s_mask.sum()) == 18
    assert_array_equal(gt.b0s_mask, bvals == 5)
    assert gt.directions_per_shell() == {1000.0: 90, 2000.0: 90, 3000.0: 90}


def test_b0_threshold_is_inclusive():
    bvals = np.array([0, B0_THRESHOLD, B0_THRESHOLD + 1, 1000])
    gt = GradientTable(bvals, np.zeros((4, 3)))
    assert_array_equal(gt.b0s_mask, [True, True, False, False])
    assert_array_equal(cluster_shells(bvals)[:2], [0, 0])


def test_philips_small_nonzero_b0(shared_data):
    image, bval, bvec = _real(shared_data, PHILIPS)
    bvals = read_bvals(bval)
    assert bvals.shape == (17,)
    # b~0 volumes written as 0, 0.001, ..., 0.004
    assert_allclose(np.sort(bvals[bvals < 1])[1:], [0.001, 0.002, 0.003, 0.004])
    gt = read_gradients(bval, bvec, n_volumes=nib.load(image).shape[3])
    assert int(gt.b0s_mask.sum()) == 5
    assert_array_equal(np.flatnonzero(gt.b0s_mask), [0, 4, 8, 12, 16])
    assert gt.shells == [1000.0]
    assert gt.directions_per_shell() == {1000.0: 12}
    # the file's b0 rows hold non-zero vectors; the table zeroes them
    raw = np.loadtxt(bvec).T
    assert np.all(np.linalg.norm(raw[gt.b0s_mask], axis=1) > 0.9)
    assert_array_equal(gt.bvecs[gt.b0s_mask], 0)
    assert_allclose(np.linalg.norm(gt.bvecs[~gt.b0s_mask], axis=1), 1, atol=1e-12)


def test_mdt_multishell_counts(shared_data):
    _, bval, bvec = _real(shared_data, MDT91)
    gt = read_gradients(bval, bvec)
    assert len(gt) == 114
    assert int(gt.b0s_mask.sum()) == 6
    assert gt.shells == [750.0, 1500.0, 2250.0, 3000.0, 3750.0, 4500.0, 5200.0, 6000.0]
    assert gt.directions_per_shell() == {750.0: 3, 1500.0: 6, 2250.0: 9, 3000.0: 12,
                                         3750.0: 15, 4500.0: 18, 5200.0: 21, 6000.0: 24}


def test_mdt_two_shell_counts(shared_data):
    _, bval, bvec = _real(shared_data, MDT60)
    gt = read_gradients(bval, bvec, n_volumes=103)
    assert int(gt.b0s_mask.sum()) == 13
    assert gt.directions_per_shell() == {1000.0: 30, 2000.0: 60}


# ----------------------------------------------------------------------------
# File layouts
# ----------------------------------------------------------------------------
def test_bvecs_3xN_and_Nx3_read_the_same(tmp_path):
    vecs = _unit(np.random.default_rng(1), 7)
    a = read_bvecs(_write_rows(tmp_path / "std.bvec", vecs.T))
    b = read_bvecs(_write_rows(tmp_path / "tr.bvec", vecs))
    assert a.shape == b.shape == (7, 3)
    assert_allclose(a, vecs, atol=1e-8)
    assert_allclose(b, vecs, atol=1e-8)
    # with the volume count known, both layouts are still recognised
    assert_allclose(read_bvecs(tmp_path / "tr.bvec", n_volumes=7), vecs, atol=1e-8)


def test_bvecs_ambiguous_3x3_uses_standard_layout(tmp_path):
    # With N == 3 both readings are possible; the FSL 3xN one (columns are
    # vectors) wins, with or without the volume count.
    m = np.array([[1.0, 0.0, 0.6], [0.0, 0.0, 0.8], [0.0, 1.0, 0.0]])
    path = _write_rows(tmp_path / "amb.bvec", m)
    assert_allclose(read_bvecs(path), m.T)
    assert_allclose(read_bvecs(path, n_volumes=3), m.T)


def test_bvecs_Nx3_with_count_mismatch_is_an_error(tmp_path):
    path = _write_rows(tmp_path / "x.bvec", _unit(np.random.default_rng(2), 5))
    with pytest.raises(InputError, match="5 vectors but 6 volumes"):
        read_bvecs(path, n_volumes=6)


def test_one_row_and_one_column_bvals(tmp_path):
    b = np.array([0, 1000, 1000, 5, 2000])
    row = tmp_path / "row.bval"
    row.write_text("0 1000 1000 5 2000\n")
    col = tmp_path / "col.bval"
    col.write_text("0\n1000\n1000\n5\n2000\n")
    commas = tmp_path / "commas.bval"
    commas.write_text("0,1000,1000,5,2000")
    for path in (row, col, commas):
        out = read_bvals(path)
        assert out.dtype == np.float64
        assert_array_equal(out, b)


def test_bval_table_is_an_error(tmp_path):
    path = tmp_path / "two_rows.bval"
    path.write_text("0 1000 1000\n0 1000 1000\n")
    with pytest.raises(InputError, match="one row of values, found a 2x3 table"):
        read_bvals(path)


def test_bval_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.bval"
    path.write_bytes(b"\xef\xbb\xbf0 1000 2000\r\n")
    assert_array_equal(read_bvals(path), [0, 1000, 2000])


# ----------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------
def test_slightly_non_unit_bvecs_are_renormalised():
    rng = np.random.default_rng(3)
    unit = _unit(rng, 6)
    scale = np.array([1.0, 1.0, 1.02, 0.97, 1 + 0.9 * BVEC_NORM_TOLERANCE,
                      1 - 0.9 * BVEC_NORM_TOLERANCE])
    bvals = np.array([0, 1000, 1000, 1000, 1000, 1000.0])
    out = check_and_normalise(bvals, unit * scale[:, None], "g.bvec")
    assert_array_equal(out[0], 0)  # b0 vector zeroed
    assert_allclose(out[1:], unit[1:], atol=1e-12)  # same directions, unit length


def test_bvec_norm_beyond_tolerance_is_an_error():
    vecs = np.array([[0, 0, 0], [1, 0, 0], [0, 1 + 1.1 * BVEC_NORM_TOLERANCE, 0]], float)
    with pytest.raises(InputError) as err:
        check_and_normalise(np.array([0, 1000, 1000.0]), vecs, "g.bvec")
    assert err.value.path == "g.bvec"
    assert "volume(s) 2" in err.value.problem


def test_zero_bvec_is_fine_on_b0_not_on_dw():
    vecs = np.array([[0, 0, 0], [1, 0, 0], [0, 0, 0]], float)
    out = check_and_normalise(np.array([5, 1000, 0.0]), vecs, "g.bvec")
    assert_array_equal(out, [[0, 0, 0], [1, 0, 0], [0, 0, 0]])
    with pytest.raises(InputError, match=r"zero-norm b-vector .* volume\(s\) 2"):
        check_and_normalise(np.array([5, 1000, 1000.0]), vecs, "g.bvec")


def test_table_rejects_count_mismatch():
    with pytest.raises(InputError, match="3 b-values but 2 b-vectors"):
        GradientTable(np.array([0, 1000, 1000]), np.eye(3)[:2], source="s.bvec")


# ----------------------------------------------------------------------------
# Subsets and design matrix
# ----------------------------------------------------------------------------
@pytest.fixture
def multishell():
    bvals = np.array([0, 1000, 2000, 3000, 990, 5, 2010, 3000, 1000, 0], float)
    return GradientTable(bvals, np.vstack([np.zeros(3), _unit(np.random.default_rng(4), 9)]))


def test_shell_indices(multishell):
    assert_array_equal(multishell.shell_indices(1000), [1, 4, 8])
    assert_array_equal(multishell.shell_indices(2000), [2, 6])
    assert_array_equal(multishell.shell_indices(0), [0, 5, 9])
    with pytest.raises(ValueError, match="no shell at b=1500"):
        multishell.shell_indices(1500)


def test_select_shells(multishell):
    assert_array_equal(multishell.select_shells([2000, 3000]), [0, 2, 3, 5, 6, 7, 9])
    assert_array_equal(multishell.select_shells([2000], keep_b0=False), [2, 6])
    assert_array_equal(multishell.select_shells([], keep_b0=True), [0, 5, 9])


def test_select_gives_a_consistent_subtable(multishell):
    idx = multishell.select_shells([1000])
    sub = multishell.select(idx)
    assert len(sub) == 6
    assert_array_equal(sub.bvals, multishell.bvals[idx])
    assert_array_equal(sub.bvecs, multishell.bvecs[idx])
    assert sub.shells == [1000.0]
    assert int(sub.b0s_mask.sum()) == 3
    # a boolean selection works the same way
    sub2 = multishell.select(multishell.shell_of == 3000)
    assert_array_equal(sub2.bvals, [3000, 3000])


def test_bmatrix_design_matches_tensor_formula():
    rng = np.random.default_rng(5)
    n = 20
    bvals = np.concatenate([[0.0], rng.uniform(500, 3000, n - 1)])
    bvecs = np.vstack([np.zeros(3), _unit(rng, n - 1)])
    a = rng.normal(size=(3, 3)) * 1e-3
    D = a @ a.T  # symmetric positive semi-definite
    s0 = 812.0
    # ln S = ln S0 - b g^T D g, evaluated directly
    log_s = np.log(s0) - bvals * np.einsum("ni,ij,nj->n", bvecs, D, bvecs)
    X = GradientTable(bvals, bvecs).bmatrix_design()
    assert X.shape == (n, 7)
    params = np.array([D[0, 0], D[1, 1], D[2, 2], D[0, 1], D[0, 2], D[1, 2], np.log(s0)])
    assert_allclose(X @ params, log_s, rtol=1e-12)
    # and the least-squares fit recovers the tensor exactly
    assert_allclose(np.linalg.lstsq(X, log_s, rcond=None)[0], params, rtol=1e-8)


def test_to_dipy_keeps_the_policy(multishell):
    gt = multishell.to_dipy()
    assert_array_equal(gt.bvals, multishell.bvals)
    assert_array_equal(gt.b0s_mask, multishell.b0s_mask)


# ----------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------
def test_storage_order_does_not_change_world_directions():
    # FSL bvecs live in a radiological voxel frame: the same FSL vectors mean
    # the same world directions whether the image is stored LAS (det < 0)
    # or RAS (det > 0, x flipped).
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    v = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.6, 0.8, 0]])
    expected = np.array([[-1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-0.6, 0.8, 0]])
    assert_allclose(fsl_to_world(v, las), expected, atol=1e-15)
    assert_allclose(fsl_to_world(v, ras), expected, atol=1e-15)


@pytest.mark.parametrize("det_sign", [-1, 1])
def test_oblique_affine_voxel_axis_steps(det_sign):
    rng = np.random.default_rng(6)
    R = _rotation(rng)
    zooms = np.diag([1.5 * det_sign, 2.0, 2.5])
    affine = from_matvec(R @ zooms, [10.0, -20.0, 5.0])
    assert np.sign(np.linalg.det(affine[:3, :3])) == det_sign
    p = np.array([3.0, 4.0, 5.0])
    for axis in range(3):
        step = apply_affine(affine, p + np.eye(3)[axis]) - apply_affine(affine, p)
        step /= np.linalg.norm(step)
        if axis == 0 and det_sign > 0:
            step = -step  # the FSL x flip for positive determinants
        got = fsl_to_world(np.eye(3)[axis:axis + 1], affine)[0]
        assert_allclose(got, step, atol=1e-12)


@pytest.mark.parametrize("det_sign", [-1, 1])
def test_fsl_world_round_trip(det_sign):
    rng = np.random.default_rng(7)
    affine = from_matvec(_rotation(rng) @ np.diag([2.0 * det_sign, 1.0, 3.0]), [1, 2, 3])
    v = _unit(rng, 50)
    w = fsl_to_world(v, affine)
    assert_allclose(np.linalg.norm(w, axis=1), 1, atol=1e-12)  # rotation: lengths kept
    assert_allclose(world_to_fsl(w, affine), v, atol=1e-12)
    assert_allclose(fsl_to_world(world_to_fsl(v, affine), affine), v, atol=1e-12)
    gt = GradientTable(np.full(50, 1000.0), v)
    assert_allclose(gt.to_world(affine), w)
    # a list affine is accepted as well
    assert_allclose(fsl_to_world(v, affine.tolist()), w)


def _mrtrix_world_grad(tmp_path, image, bvec, bval):
    if shutil.which("mrconvert") is None:
        if os.environ.get("CI"):
            pytest.fail("MRtrix3 (mrconvert) is required in CI")
        pytest.skip("MRtrix3 mrconvert not installed")
    out = tmp_path / "grad.b"
    subprocess.run(["mrconvert", "-quiet", "-force", "-fslgrad", str(bvec), str(bval),
                    "-export_grad_mrtrix", str(out), str(image), str(tmp_path / "o.mif")],
                   check=True, capture_output=True)
    return np.loadtxt(out, comments="#")


def _check_against_mrtrix(tmp_path, image, bval, bvec, affine):
    gt = read_gradients(bval, bvec)
    mr = _mrtrix_world_grad(tmp_path, image, bvec, bval)
    assert mr.shape == (len(gt), 4)
    assert_allclose(mr[:, 3], gt.bvals, atol=1e-3)
    dw = ~gt.b0s_mask
    ours = gt.to_world(affine)[dw]
    theirs = mr[dw, :3] / np.linalg.norm(mr[dw, :3], axis=1, keepdims=True)
    dots = np.sum(ours * theirs, axis=1)
    assert np.abs(dots).min() > 0.9999
    assert dots.min() > 0.9999  # same sign too, not only the same axis
    return ours


@pytest.mark.mrtrix
def test_to_world_agrees_with_mrtrix(shared_data, tmp_path):
    image, bval, bvec = _real(shared_data, MDT91)
    img = nib.load(image)
    assert np.linalg.det(img.affine[:3, :3]) < 0
    world_las = _check_against_mrtrix(tmp_path, image, bval, bvec, img.affine)
    # The same slab stored with x reversed (positive determinant), same FSL
    # bvec file: MRtrix3 and we must both give the same world directions.
    flip = from_matvec(np.diag([-1.0, 1.0, 1.0]), [img.shape[0] - 1, 0, 0])
    ras_affine = img.affine @ flip
    assert np.linalg.det(ras_affine[:3, :3]) > 0
    ras = tmp_path / "ras.nii"
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1, :, :1], ras_affine), ras)
    world_ras = _check_against_mrtrix(tmp_path, ras, bval, bvec, ras_affine)
    assert_allclose(world_ras, world_las, atol=1e-12)


@pytest.mark.mrtrix
def test_to_world_agrees_with_mrtrix_oblique_philips(shared_data, tmp_path):
    image, bval, bvec = _real(shared_data, PHILIPS)
    affine = nib.load(image).affine
    assert np.abs(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))).max() > 0.1  # oblique
    _check_against_mrtrix(tmp_path, image, bval, bvec, affine)
