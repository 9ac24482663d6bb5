"""Input QC: injected faults are caught, clean data are not flagged.

Faults are injected into phantom subjects with known ground truth and into
the shared real data: b-vector axis flips and permutations (the gradient-
orientation check must name the transform that undoes them), all-zero,
dropout and intensity-outlier volumes, degenerate acquisitions, sidecar
misunits, tensor fits that fail in part of the mask. Every clean series is
run through the same checks and must come out unflagged.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dmriflow.interfaces import dti, io, orientation, parallel, qc, stepfiles
from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.gradients import B0_THRESHOLD, GradientTable
from dmriflow.interfaces.sim.phantom import hcp_scheme, simulate_subject
from dmriflow.interfaces.sidecar_fields import echo_time_ms, field_strength_t

#: Phantom grid for the orientation check: 2.5 mm voxels, bundles thick
#: enough for ~1500 coherent-bundle seeds. Over subjects 0-7 on this grid and
#: on 48x58x48, 5 injected transforms each (80 cases): 70 named exactly, 6
#: flagged as ties (not applied), 4 missed, 0 wrong; all on subject 4, whose
#: background white matter is anisotropic enough to be seeded (see
#: orientation.STOP_FA), which test_a_weak_subject_is_never_fixed_wrongly covers.
PHANTOM_SHAPE = (48, 48, 48)
PHANTOM_SEEDS = (0, 1, 2, 3)
WEAK_SEED = 4
#: Injected b-vector transforms: each single-axis flip, a swap, a 3-cycle with a flip.
INJECTED = ("flip x", "flip y", "flip z", "permute yxz", "permute zxy flip y")
PHILIPS = "philips_ingenia_b1000/DTI_Biobank_2mm_MB3S2_EPI_701"


def light_scheme() -> GradientTable:
    """3 b0 + 32 directions at b=1000: a clinical DTI scheme, fast to simulate."""
    return hcp_scheme(n_b0=3, shells=(1000,), n_dirs=32, seed=0, jitter=False)


def as_dwi(subject) -> io.DWI:
    header = nib.Nifti1Image(subject.dwi[..., :1], subject.affine).header
    return io.DWI(data=subject.dwi, gtab=subject.gtab, mask=subject.mask,
                  affine=subject.affine, header=header, paths={})


@pytest.fixture(scope="module")
def phantoms() -> dict[int, io.DWI]:
    return {s: as_dwi(simulate_subject(shape=PHANTOM_SHAPE, seed=s, scheme=light_scheme()))
            for s in PHANTOM_SEEDS}


def with_bvecs(dwi: io.DWI, label: str) -> io.DWI:
    """The series as if its b-vectors had been written with ``label`` applied."""
    cand = orientation.candidate_by_label(label)
    return replace(dwi, gtab=GradientTable(dwi.gtab.bvals,
                                           orientation.apply_to_bvecs(dwi.gtab.bvecs, cand)))


def undoing(label: str) -> str:
    """The candidate that undoes ``label`` (its inverse; sign of the whole matrix free)."""
    m = orientation.candidate_by_label(label).matrix
    return next(c.label for c in orientation.candidates()
                if np.allclose(c.matrix, m.T) or np.allclose(c.matrix, -m.T))


@pytest.fixture(scope="module")
def real_series(shared_data) -> dict:
    d = shared_data
    return {"philips": (d / f"{PHILIPS}.nii.gz", d / f"{PHILIPS}.bval", d / f"{PHILIPS}.bvec",
                        None),
            "mdt": (d / "mdt_te60_b1k_b2k/b1k_b2k_example_slices_24_38.nii.gz",
                    d / "mdt_te60_b1k_b2k/b1k_b2k.bval", d / "mdt_te60_b1k_b2k/b1k_b2k.bvec",
                    d / "mdt_te60_b1k_b2k/b1k_b2k_example_slices_24_38_mask.nii.gz")}


@pytest.fixture(scope="module")
def real(real_series) -> dict[str, io.DWI]:
    return {k: stepfiles.load_subject(*v) for k, v in real_series.items()}


# ----------------------------------------------------------------------------
# Gradient orientation
# ----------------------------------------------------------------------------
def test_candidates_are_the_24_distinct_axis_transforms():
    mats = [c.matrix for c in orientation.candidates()]
    assert len(mats) == 24 and orientation.candidates()[0].is_identity
    for i, a in enumerate(mats):       # distinct up to the sign of the whole matrix
        assert not any(np.allclose(a, b) or np.allclose(a, -b) for b in mats[i + 1:])
    # D' = M D M^T: V1 of the transformed table is M V1 (the one fit the check relies on)
    rng = np.random.default_rng(0)
    g = rng.normal(size=(30, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    m = orientation.candidate_by_label("permute zxy flip y").matrix
    d = np.diag([1.7, 0.3, 0.2])
    adc = np.einsum("ni,ij,nj->n", g, d, g)
    gm = orientation.apply_to_bvecs(g, orientation.candidate_by_label("permute zxy flip y"))
    np.testing.assert_allclose(np.einsum("ni,ij,nj->n", gm, m @ d @ m.T, gm), adc, rtol=1e-12)


def test_candidates_are_tracked_on_their_whole_transformed_field_bit_for_bit(phantoms):
    """The check transforms V1 only where a streamline reads it; each candidate's
    mean length equals tracking on the whole field M V1 (in the index frame),
    exactly, on a phantom with a non-symmetric transform injected, for both
    handednesses of the affine."""
    flipped = with_bvecs(phantoms[1], "permute zxy flip y")
    gtab = flipped.gtab
    fit = dti.fit_dwi(flipped, volumes=np.arange(len(gtab))[gtab.select_shells(
        dti.dti_shells(gtab))], fit_method="OLS")
    v1, fa = fit.v1.astype(np.float32), fit.fa
    mask = flipped.mask & np.all(np.isfinite(v1), axis=-1)
    seeds = orientation._seeds(fa, mask, 3)
    for affine in (flipped.affine, np.diag([-1.0, 1, 1, 1]) @ flipped.affine):
        res = orientation.check_orientation(v1, fa, flipped.mask, affine, flipped.zooms, 3)
        ref = {}
        for cand in orientation.candidates():
            field = np.einsum("ij,...j->...i", cand.matrix.astype(np.float32), v1)
            if np.linalg.det(affine[:3, :3]) > 0:      # FSL image frame -> voxel axes
                field[..., 0] = -field[..., 0]
            ref[cand.label] = float(orientation.track_lengths(field, fa, mask, seeds,
                                                              flipped.zooms).mean())
        assert res.lengths == ref
        assert max(ref, key=ref.get) == res.best
    assert res.best != undoing("permute zxy flip y")   # the mirrored frame moved the winner
    res = orientation.check_dwi(flipped, rng_seed=3)
    assert res == orientation.check_orientation(v1, fa, flipped.mask, flipped.affine,
                                                flipped.zooms, 3)
    assert res.best == undoing("permute zxy flip y") and res.fixable


def test_phantom_flips_and_permutations_are_found_and_clean_subjects_pass(phantoms):
    false_positives = 0
    for seed, dwi in phantoms.items():
        clean = orientation.check_dwi(dwi)
        false_positives += clean.verdict != orientation.OK
        assert clean.best == "none", (seed, clean.best)
        for label in INJECTED:
            res = orientation.check_dwi(with_bvecs(dwi, label))
            assert res.verdict == orientation.FLIPPED, (seed, label, res.as_record())
            assert res.best == undoing(label) and res.fixable, (seed, label, res.tied)
            assert res.z > orientation.MIN_Z and res.gain >= orientation.MIN_GAIN
    assert false_positives == 0      # 0 of 4 clean phantoms flagged


def test_a_weak_subject_is_never_fixed_wrongly():
    """Subject 4's near-uniform, anisotropic background makes some transforms
    undecidable: the check may miss them or call a tie, never apply a wrong one."""
    dwi = as_dwi(simulate_subject(shape=PHANTOM_SHAPE, seed=WEAK_SEED, scheme=light_scheme()))
    assert orientation.check_dwi(dwi).verdict == orientation.OK
    for label in INJECTED:
        res = orientation.check_dwi(with_bvecs(dwi, label))
        if res.fixable:
            assert res.best == undoing(label), label
        elif res.verdict == orientation.FLIPPED:
            assert undoing(label) in (res.best, *res.tied), label


def test_real_data_flips_are_found_and_the_original_passes(real):
    dwi = real["philips"]
    clean = orientation.check_dwi(dwi)
    assert clean.verdict == orientation.OK and clean.best == "none"
    for label in ("flip x", "flip y", "flip z", "permute yxz"):
        res = orientation.check_dwi(with_bvecs(dwi, label))
        assert (res.verdict, res.best, res.tied) == (orientation.FLIPPED, undoing(label), ()), \
            (label, res.as_record())
        assert res.flag == f"gradients {undoing(label)}"


def test_a_two_slice_series_flags_in_plane_flips_but_does_not_pick_one(real):
    """Two axial slices cannot tell a flip of x from one of y (they differ only
    through z), nor the original from a flip of z: in-plane flips are flagged
    with their twin as a tie, never applied, and the original passes."""
    dwi = real["mdt"]
    assert orientation.check_dwi(dwi).verdict == orientation.OK
    assert orientation.check_dwi(with_bvecs(dwi, "flip z")).verdict == orientation.OK
    for label, twin in (("flip x", "flip y"), ("flip y", "flip x")):
        res = orientation.check_dwi(with_bvecs(dwi, label))
        assert res.verdict == orientation.FLIPPED and not res.fixable
        assert {res.best, *res.tied} >= {label, twin}
        assert "tied with" in res.flag


def test_too_few_seeds_is_inconclusive_not_a_flag():
    s = simulate_subject(shape=(12, 14, 12), seed=0, scheme=light_scheme())
    res = orientation.check_dwi(as_dwi(s))
    assert res.verdict == orientation.INCONCLUSIVE and res.flag == "" and not res.fixable


def test_validate_fixes_a_flipped_table_with_provenance(real_series, tmp_path):
    dwi, bval, bvec, _ = real_series["philips"]
    table = np.loadtxt(bvec)
    flipped = tmp_path / "flipped.bvec"
    np.savetxt(flipped, table * np.array([[-1.0], [1.0], [1.0]]), fmt="%.8f")
    rec = stepfiles.validate_subject("sub-x", dwi, bval, flipped, out_dir=tmp_path,
                                     fix_gradients=True)
    assert rec["qc"]["gradient_check"] == "flip x"
    assert "gradients flip x (fixed)" in rec["qc_flags"]
    assert rec["provenance"] == [{"step": "gradient_fix", "transform": "flip x",
                                  "z": rec["input_qc"]["gradient_check"]["z"],
                                  "gain": rec["input_qc"]["gradient_check"]["gain"]}]
    np.testing.assert_allclose(np.loadtxt(rec["series"]["bvec"]), table, atol=1e-8)
    # without the option the table is only flagged
    rec = stepfiles.validate_subject("sub-x", dwi, bval, flipped, out_dir=tmp_path)
    assert rec["series"]["bvec"] == str(flipped) and rec["provenance"] == []
    assert "gradients flip x" in rec["qc_flags"]


# ----------------------------------------------------------------------------
# Outlier volumes
# ----------------------------------------------------------------------------
def test_clean_series_have_no_outlier_volumes(phantoms, real):
    for name, dwi in [*phantoms.items(), *real.items()]:
        assert qc.volume_outliers(dwi.data, dwi.mask, dwi.gtab) == {}, name


def test_zero_dropout_and_intensity_outliers_are_found(phantoms, real):
    for dwi in (phantoms[0], real["philips"]):
        data = dwi.data.copy()
        dw = np.flatnonzero(~dwi.gtab.b0s_mask)
        zero, dropout, bright = int(dw[2]), int(dw[5]), int(dw[8])
        z_mid = int(np.argmax(dwi.mask.sum(axis=(0, 1))))
        data[..., zero] = 0
        data[:, :, z_mid:z_mid + 2, dropout] *= 0.2       # two slices lose 80 %
        data[..., bright] *= 2.0
        found = qc.volume_outliers(data, dwi.mask, dwi.gtab)
        assert sorted(found) == sorted((zero, dropout, bright))
        assert found[zero] == "all zero"
        assert found[dropout].startswith(f"signal dropout in slice(s) {z_mid}, {z_mid + 1}")
        assert found[bright].startswith("mean intensity +")   # x2 vs the shell's median


def _bincount_sums(values, slice_of, n_slices):
    """Reference: per-slice float64 sums one volume at a time (the pass the
    one-pass :func:`qc._slice_sums` replaced)."""
    return np.stack([np.bincount(slice_of, weights=values[:, k].astype(np.float64),
                                 minlength=n_slices) for k in range(values.shape[1])])


@pytest.mark.parametrize("shape,n_vol", [((30, 20, 11), 9), ((40, 50, 23), 288)])
def test_one_pass_slice_sums_are_bit_identical_to_per_volume_sums(shape, n_vol):
    """Order-sensitive data (log-normal magnitudes over 10 decades, both signs):
    the one-pass sums equal per-volume bincount sums bit for bit, on the grid
    (C order) and on mask rows in Fortran voxel order, for each slice axis."""
    rng = np.random.default_rng(7)
    mask = rng.random(shape) < 0.7
    grid = (rng.lognormal(0.0, 3.0, shape + (n_vol,))
            * rng.choice([-1.0, 1.0], shape + (n_vol,))).astype(np.float32)
    c_idx = np.flatnonzero(mask.ravel())
    f_idx = np.ravel_multi_index(np.nonzero(mask.transpose(2, 1, 0))[::-1], shape)
    rows = np.asfortranarray(grid.reshape(-1, n_vol)[f_idx])
    order_matters = 0
    for axis in (0, 1, 2):
        for index, values, chunks in (
                (c_idx, grid[mask], qc._mask_row_chunks(grid, mask, None, axis)),
                (f_idx, rows, qc._mask_row_chunks(rows, mask, f_idx, axis))):
            slice_of = np.unravel_index(index, shape)[axis]
            ref = _bincount_sums(values, slice_of, shape[axis])
            sums, nonzero, n_rows = qc._slice_sums(chunks, shape[axis], n_vol)
            assert np.array_equal(sums, ref) and nonzero.all() and n_rows == index.size
            # the same sums in another order (reversed rows) do differ in the last
            # bits on these data, so equality above tests the order
            order_matters += int((_bincount_sums(values[::-1], slice_of[::-1], shape[axis])
                                  != ref).sum())
    assert order_matters > 0


@pytest.mark.parametrize("threads", [2, 3])
def test_slice_sums_by_parts_on_threads_are_the_one_pass_bits(monkeypatch, threads):
    """Validate's mask rows (Fortran order, slices along the last axis) cut at
    slice boundaries into one part per thread give the one-pass sums bit for
    bit, on order-sensitive data (cut inside a slice, they would not)."""
    rng = np.random.default_rng(11)
    shape, n_vol = (40, 50, 23), 12
    mask = rng.random(shape) < 0.7
    grid = (rng.lognormal(0.0, 3.0, shape + (n_vol,))
            * rng.choice([-1.0, 1.0], shape + (n_vol,))).astype(np.float32)
    f_idx = np.ravel_multi_index(np.nonzero(mask.transpose(2, 1, 0))[::-1], shape)
    rows = np.asfortranarray(grid.reshape(-1, n_vol)[f_idx])
    monkeypatch.setattr(qc, "QC_BLOCK_ROWS", 1000)     # several blocks per part
    one = qc._slice_sums(qc._mask_row_chunks(rows, mask, f_idx, 2), shape[2], n_vol)
    parts = []
    one_pass = qc._slice_sums
    monkeypatch.setattr(qc, "_slice_sums", lambda *a: parts.append(1) or one_pass(*a))
    monkeypatch.setattr(parallel, "available_threads", lambda: threads)
    slice_of = np.unravel_index(f_idx, shape)[2]
    sums, nonzero, n_rows = qc._slice_sums_by_parts(rows, mask, f_idx, 2, slice_of, n_vol)
    assert len(parts) == threads
    assert np.array_equal(sums, one[0]) and np.array_equal(nonzero, one[1])
    assert n_rows == one[2] == f_idx.size


def test_outliers_on_mask_rows_equal_the_grid_and_the_injected_faults(phantoms):
    """The series held as Fortran-order mask rows (as Validate stores it) gives
    the grid's outlier dict, which names exactly the injected faults."""
    dwi = phantoms[0]
    data = dwi.data.copy()
    dw = np.flatnonzero(~dwi.gtab.b0s_mask)
    zero, dropout, bright = int(dw[1]), int(dw[6]), int(dw[9])
    z_mid = int(np.argmax(dwi.mask.sum(axis=(0, 1))))
    data[..., zero] = 0
    data[:, :, z_mid, dropout] *= 0.3                    # one slice loses 70 %
    data[..., bright] *= 0.5
    f_idx = np.ravel_multi_index(np.nonzero(dwi.mask.transpose(2, 1, 0))[::-1],
                                 dwi.mask.shape)
    rows = np.asfortranarray(data.reshape(-1, data.shape[-1])[f_idx])
    grid = qc.volume_outliers(data, dwi.mask, dwi.gtab)
    held = qc.volume_outliers(rows, dwi.mask, dwi.gtab, rows_index=f_idx)
    assert held == grid
    assert sorted(held) == sorted((zero, dropout, bright))
    assert held[zero] == "all zero"
    assert held[dropout].startswith(f"signal dropout in slice(s) {z_mid} (-")
    assert held[bright].startswith("mean intensity -50% vs its shell")


def _write(tmp: Path, data, bvals, bvecs, affine, mask=None, name="dwi") -> tuple:
    """A series on disk (FSL text gradients), its mask."""
    dwi = tmp / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), dwi)
    bval, bvec = tmp / f"{name}.bval", tmp / f"{name}.bvec"
    np.savetxt(bval, np.atleast_2d(bvals), fmt="%g")
    np.savetxt(bvec, np.asarray(bvecs).T, fmt="%.8f")
    mpath = None
    if mask is not None:
        mpath = tmp / f"{name}_mask.nii.gz"
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), mpath)
    return dwi, bval, bvec, mpath


def test_an_all_zero_volume_is_excluded_from_the_fit(phantoms, tmp_path):
    """Excluded, the fit is exactly the fit without that volume; kept, it
    moves the median FA (the issue's 0.045 -> 0.306) ten times more than
    leaving out a good volume does."""
    dwi = phantoms[1]
    bad = int(np.flatnonzero(~dwi.gtab.b0s_mask)[4])
    data = dwi.data.copy()
    data[..., bad] = 0
    files = _write(tmp_path, data, dwi.gtab.bvals, dwi.gtab.bvecs, dwi.affine, dwi.mask)
    rec = stepfiles.validate_subject("sub-z", *files, out_dir=tmp_path)
    assert rec["series"]["exclude"] == [bad]
    assert rec["qc"]["outlier_volumes"] == f"{bad}: all zero"
    assert rec["qc_flags"] == ["1 outlier volume(s) excluded"]
    assert rec["provenance"][0] == {"step": "volume_exclusion", "volumes": [bad],
                                    "reasons": {str(bad): "all zero"}}
    excluded = stepfiles.write_tensor_maps(rec["series"], tmp_path / "a")
    assert excluded["parameters"]["volumes_excluded"] == [bad]
    keep = np.setdiff1d(np.arange(len(dwi.gtab)), [bad])
    ref = _write(tmp_path, dwi.data[..., keep], dwi.gtab.bvals[keep], dwi.gtab.bvecs[keep],
                 dwi.affine, dwi.mask, name="ref")
    clean = stepfiles.write_tensor_maps(dict(zip(stepfiles.SERIES_KEYS, map(str, ref))),
                                        tmp_path / "b")
    assert excluded["median_fa"] == clean["median_fa"]
    kept = stepfiles.write_tensor_maps({**rec["series"], "exclude": []}, tmp_path / "c")
    other = stepfiles.write_tensor_maps({**rec["series"], "exclude": [bad, bad + 1]},
                                        tmp_path / "d")
    assert kept["median_fa"] - clean["median_fa"] > \
        10 * abs(other["median_fa"] - clean["median_fa"])


def test_too_many_outliers_flag_the_subject(phantoms, tmp_path):
    dwi = phantoms[2]
    dw = np.flatnonzero(~dwi.gtab.b0s_mask)
    n_bad = int(np.floor(qc.MAX_EXCLUDED_FRACTION * len(dwi.gtab))) + 1
    data = dwi.data.copy()
    data[..., dw[:n_bad]] = 0
    files = _write(tmp_path, data, dwi.gtab.bvals, dwi.gtab.bvecs, dwi.affine, dwi.mask)
    rec = stepfiles.validate_subject("sub-m", *files, out_dir=tmp_path)
    assert len(rec["series"]["exclude"]) == n_bad
    assert f"outlier volumes {n_bad / len(dwi.gtab):.0%} > 20%" in rec["qc_flags"]


# ----------------------------------------------------------------------------
# Degenerate acquisitions
# ----------------------------------------------------------------------------
@pytest.fixture
def small(tmp_path):
    """A 10x10x6 series: 2 b0 + 12 directions at b=1000, an anisotropic tensor."""
    rng = np.random.default_rng(3)
    dirs = rng.normal(size=(12, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvals = np.r_[0, 0, np.full(12, 1000.0)]
    bvecs = np.r_[np.zeros((2, 3)), dirs]
    att = np.exp(-bvals * np.einsum("ni,ij,nj->n", bvecs, np.diag([1.7e-3, 3e-4, 3e-4]),
                                    bvecs))
    data = np.broadcast_to(1000.0 * att, (10, 10, 6, 14)).copy()
    mask = np.zeros((10, 10, 6), bool)
    mask[2:8, 2:8, 1:5] = True
    return tmp_path, data, bvals, bvecs, np.diag([2.0, 2.0, 2.0, 1.0]), mask


def _validate(tmp, data, bvals, bvecs, affine, mask):
    files = _write(tmp, data, bvals, bvecs, affine, mask)
    return files, lambda: stepfiles.validate_subject("sub-d", *files, out_dir=tmp)


def test_the_small_series_itself_is_accepted(small):
    _, call = _validate(*small)
    rec = call()
    assert rec["status"] == "ok" and rec["qc"]["n_outlier_volumes"] == 0


def test_identical_volumes_fail_naming_the_dwi(small):
    tmp, data, bvals, bvecs, affine, mask = small
    files, call = _validate(tmp, np.repeat(data[..., :1], 14, axis=3), bvals, bvecs, affine,
                            mask)
    with pytest.raises(InputError, match="all 14 volumes are identical") as err:
        call()
    assert err.value.path == str(files[0])


@pytest.mark.parametrize("case, phrase", [
    ("five_directions", "5 distinct diffusion direction(s)"),
    ("coplanar", "rank 3"),
    ("si_units", "above 30000 s/mm^2"),
    ("no_dw", f"b0 threshold {B0_THRESHOLD:g} s/mm^2"),
])
def test_gradients_that_cannot_support_a_tensor_fail(small, case, phrase):
    tmp, data, bvals, bvecs, affine, mask = small
    bvals, bvecs = bvals.copy(), bvecs.copy()
    if case == "five_directions":
        bvecs[2:] = bvecs[2:7][np.arange(12) % 5]
    elif case == "coplanar":
        ang = np.linspace(0, np.pi, 12, endpoint=False)
        bvecs[2:] = np.c_[np.cos(ang), np.sin(ang), np.zeros(12)]
    elif case == "si_units":
        bvals = bvals * 1e6
    else:
        bvals = np.where(bvals > 0, 40.0, 0.0)
    files, call = _validate(tmp, data, bvals, bvecs, affine, mask)
    with pytest.raises(InputError, match="degenerate acquisition") as err:
        call()
    assert phrase in err.value.problem and err.value.path == str(files[2])


def test_excluding_outliers_can_leave_too_few_directions(small):
    tmp, data, bvals, bvecs, affine, mask = small
    data = data.copy()
    data[..., 2:9] = 0            # 7 of the 12 directions are all zero
    files, call = _validate(tmp, data, bvals, bvecs, affine, mask)
    with pytest.raises(InputError, match="after excluding the outlier volume") as err:
        call()
    assert "5 distinct" in err.value.problem and err.value.path == str(files[0])


def test_zero_norm_message_names_the_b0_threshold(small):
    tmp, data, bvals, bvecs, affine, mask = small
    bvals = bvals.copy()
    bvals[0] = 50.1               # a "b0" just above the threshold, with a zero vector
    _, call = _validate(tmp, data, bvals, bvecs, affine, mask)
    with pytest.raises(InputError, match=r"above the b0 threshold 50\)"):
        call()


# ----------------------------------------------------------------------------
# Failed tensor fits
# ----------------------------------------------------------------------------
def test_failed_fits_are_counted_and_left_out_of_the_fa_statistics(small):
    """Half the mask gets diffusion-weighted signal above its b0 (a negative
    diffusivity: not positive definite): exactly those voxels fail, the
    subject is flagged, and the median FA is that of the other half."""
    tmp, data, bvals, bvecs, affine, mask = small
    data = data.copy()
    half = mask.copy()
    half[:, :5] = False
    data[half, 2:] = 1500.0 * (data[half, 2:] / 1000.0) ** -0.3
    files = _write(tmp, data, bvals, bvecs, affine, mask)
    out = stepfiles.write_tensor_maps(dict(zip(stepfiles.SERIES_KEYS, map(str, files))), tmp)
    assert out["failed_voxels"] == half.sum()
    assert out["failed_fraction"] == pytest.approx(half.sum() / mask.sum(), abs=1e-6)
    assert out["qc_flags"] == [f"tensor fit failed in {out['failed_fraction']:.1%} of the "
                               f"mask > {stepfiles.MAX_FAILED_FRACTION:.0%}"]
    fa = nib.load(out["maps"]["fa"]).get_fdata(dtype=np.float32)
    assert out["median_fa"] == float(np.median(fa[mask & ~half]))
    assert out["median_fa"] > 0.5      # the valid half's tensor (FA 0.77), not the zeros


# ----------------------------------------------------------------------------
# Sidecar units and types
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("value, ms, warned", [
    (0.0895, 89.5, False), (89.5, 89.5, True), ("0.0895", 89.5, False), ("long", None, True),
    (-0.05, None, True), (None, None, False)])
def test_echo_time_units(value, ms, warned):
    got, warnings = echo_time_ms({} if value is None else {"EchoTime": value})
    assert got == ms and bool(warnings) == warned
    if warned and ms is not None:
        assert "milliseconds" in warnings[0]


@pytest.mark.parametrize("value, tesla, warned", [
    (3, 3.0, False), (2.89, 2.89, False), ("3T", 3.0, True), ("7 Tesla", 7.0, True),
    ("1.5 t", 1.5, True), ("three", None, True), (3000, None, True), (True, None, True)])
def test_field_strength_parsing(value, tesla, warned):
    got, warnings = field_strength_t({"MagneticFieldStrength": value})
    assert got == tesla and bool(warnings) == warned


def test_census_converts_misunits_with_a_warning(small):
    tmp, data, bvals, bvecs, affine, mask = small
    files = _write(tmp, data, bvals, bvecs, affine, mask)
    sidecar = tmp / "dwi.json"
    sidecar.write_text(json.dumps({"EchoTime": 89.5, "MagneticFieldStrength": "3T"}))
    rec = stepfiles.validate_subject("sub-s", *files, sidecar=sidecar, out_dir=tmp)
    assert rec["census"]["echo_time_ms"] == 89.5 and rec["census"]["field_strength_t"] == 3.0
    assert len(rec["warnings"]) == 2
    assert all(w.startswith("dwi.json: ") for w in rec["warnings"])   # no absolute path
    sidecar.write_text(json.dumps({"EchoTime": "n/a", "MagneticFieldStrength": "high"}))
    rec = stepfiles.validate_subject("sub-s", *files, sidecar=sidecar, out_dir=tmp)
    assert rec["status"] == "ok" and rec["census"]["echo_time_ms"] is None
    assert rec["census"]["field_strength_t"] is None and len(rec["warnings"]) == 2


def test_interpolated_layout_is_recognised(tmp_path):
    assert stepfiles.is_interpolated(tmp_path / "100307" / "T1w" / "Diffusion" / "data.nii.gz")
    assert not stepfiles.is_interpolated(tmp_path / "sub-01" / "dwi" / "sub-01_dwi.nii.gz")
    shutil.rmtree(tmp_path, ignore_errors=True)


# ----------------------------------------------------------------------------
# Absolute flags: SNR floor, mask; the processing chain
# ----------------------------------------------------------------------------
def test_low_snr_is_flagged_and_ordinary_snr_is_not(tmp_path):
    """A b0 SNR (mask mean b0 / noise sigma) below MIN_B0_SNR flags the
    subject whatever the cohort (no group needed); an ordinary one does not."""
    flags = {}
    for snr in (2.0, 30.0):   # WM SNR; the mask mean b0 is ~1.9x the WM one
        s = simulate_subject(shape=(24, 28, 24), seed=0, snr=snr, scheme=light_scheme())
        files = _write(tmp_path, s.dwi, s.gtab.bvals, s.gtab.bvecs, s.affine, s.mask,
                       name=f"snr{snr:g}")
        rec = stepfiles.validate_subject("sub-n", *files, out_dir=tmp_path)
        flags[snr] = [f for f in rec["qc_flags"] if f.startswith("b0 SNR")]
    assert len(flags[2.0]) == 1 and flags[2.0][0].endswith(f"< {stepfiles.MIN_B0_SNR:g}")
    assert flags[30.0] == []


def test_mask_flags():
    mask = np.zeros((30, 30, 20), bool)
    mask[5:25, 5:25, 4:16] = True
    row, flags = stepfiles.mask_figures(mask, (2.0, 2.0, 2.0))
    assert flags == [] and row["mask_largest_component_fraction"] == 1.0
    mask[5:25, 12:14, 4:16] = False          # two blocks of 7 and 11 columns
    row, flags = stepfiles.mask_figures(mask, (2.0, 2.0, 2.0))
    assert row["mask_largest_component_fraction"] == pytest.approx(11 / 18, abs=1e-4)
    assert flags == ["mask fragmented (largest component 61.1% < 95%)"]
    _, flags = stepfiles.mask_figures(np.ones((30, 30, 20), bool), (2.0, 2.0, 2.0))
    assert flags == ["mask 100.0% of the field of view > 80%"]


def test_preprocessing_is_in_the_chain_and_warned_on_interpolated_data(small, monkeypatch):
    from dmriflow.pipelines.steps import preprocess_step
    tmp, data, bvals, bvecs, affine, mask = small
    hcp = tmp / "100307" / "T1w" / "Diffusion"
    hcp.mkdir(parents=True)
    rng = np.random.default_rng(0)
    noisy = data + rng.normal(0, 20, data.shape)
    files = _write(hcp, noisy, bvals, bvecs, affine, mask, name="data")
    rec = stepfiles.validate_subject("sub-h", *files, out_dir=tmp)
    assert rec["interpolated"] is True
    monkeypatch.chdir(tmp)
    new = preprocess_step(subject="sub-h", record=rec, options={"degibbs": True})
    assert new["status"] == "ok", new.get("error")
    assert new["warnings"] == [stepfiles.INTERPOLATED_WARNING]
    assert stepfiles.processing_chain(new) == [
        {"step": "preprocess", "denoise": False, "degibbs": True,
         "warning": stepfiles.INTERPOLATED_WARNING}]


def test_fitting_a_volume_subset_needs_no_copy_and_gives_the_same_fit(phantoms):
    from dmriflow.interfaces.dti import fit_dwi
    dwi = phantoms[0]
    idx = np.flatnonzero(np.arange(len(dwi.gtab)) % 3 != 1)
    a = fit_dwi(dwi, volumes=idx, fit_method="OLS")
    b = fit_dwi(dwi.select_volumes(idx), fit_method="OLS")
    # The same fit up to float32 rounding, not bit for bit: BLAS picks its
    # kernels by memory layout (a view vs a copy), and on some CPUs (AMD EPYC
    # here) 0.2 % of the eigenvalues moved by up to 5.8 eps max|lambda|. Bound:
    # each eigenvalue sums n volumes' terms (n eps max|lambda|); V1 turns by at
    # most that over its gap to the second eigenvalue (first-order perturbation;
    # measured: 0.11 of the bound at most).
    tol = len(idx) * np.finfo(np.float32).eps * np.abs(a.evals).max()
    np.testing.assert_allclose(a.evals, b.evals, rtol=0, atol=tol)
    gap = a.evals[..., 0] - a.evals[..., 1]
    angle = np.linalg.norm(np.cross(a.v1.astype(np.float64), b.v1.astype(np.float64)), axis=-1)
    assert np.all(angle <= tol / np.maximum(gap, tol)), angle.max()


@pytest.mark.parametrize("layout", ["C", "F", "rows"])
def test_a_volume_subset_reaches_the_kernel_contiguous_with_the_same_bits(phantoms, monkeypatch,
                                                                         layout):
    """``fit_dwi(volumes=...)`` (the gradient check's fit in Validate) hands the
    kernel C-contiguous rows - ``chunk[:, volumes]`` was strided, and the
    kernel's elementwise log on it 20x slower on an HCP subject - and fits
    the same bits as those strided rows did; a series held as Fortran-order
    mask rows (Validate's) is copied so by the worker that fits each chunk."""
    from dmriflow.interfaces.dti import TensorModel, fit_dwi
    dwi = phantoms[0]
    if layout != "C":
        dwi = replace(dwi, data=np.asfortranarray(dwi.data))
    idx = np.flatnonzero(np.arange(len(dwi.gtab)) % 3 != 1)
    model = TensorModel(dwi.gtab.select(idx), fit_method="OLS")
    strided = model._fit_chunks((c[:, idx] for c in dwi.masked(model.chunk_size)),
                                dwi.masked_index(), tuple(dwi.mask.shape), dwi.mask)
    if layout == "rows":
        dwi = replace(dwi, data=None, rows=np.asfortranarray(dwi.masked()))
    fit_chunks, layouts = TensorModel._fit_chunks, []

    def spy(self, rows, *args, prepare=None, **kw):
        def seen(rows):
            for r in rows:
                if prepare is None:
                    layouts.append(r.flags.c_contiguous)
                yield r

        def prepared(r):
            r = prepare(r)
            layouts.append(r.flags.c_contiguous)
            return r
        return fit_chunks(self, seen(rows), *args,
                          prepare=None if prepare is None else prepared, **kw)
    monkeypatch.setattr(TensorModel, "_fit_chunks", spy)
    fit = fit_dwi(dwi, volumes=idx, fit_method="OLS")
    assert layouts and all(layouts)
    for name in ("evals", "v1", "fa", "md"):
        assert np.asarray(getattr(fit, name)).tobytes() == \
            np.asarray(getattr(strided, name)).tobytes(), name


def test_an_excluded_zero_b0_does_not_enter_the_noise_estimate(phantoms, tmp_path):
    """With b0 volume 0 all zero and excluded, sigma comes from the remaining
    b0 pair and still recovers the simulated sigma (within the 5 % the report
    docs state for the estimator); kept, it would be off by orders of magnitude."""
    dwi = phantoms[3]
    s = simulate_subject(shape=PHANTOM_SHAPE, seed=3, scheme=light_scheme())
    b0 = int(np.flatnonzero(dwi.gtab.b0s_mask)[0])
    data = dwi.data.copy()
    data[..., b0] = 0
    files = _write(tmp_path, data, dwi.gtab.bvals, dwi.gtab.bvecs, dwi.affine, dwi.mask)
    rec = stepfiles.validate_subject("sub-b", *files, out_dir=tmp_path)
    assert rec["series"]["exclude"] == [b0] and rec["qc"]["n_b0_pairs"] == 1
    assert rec["qc"]["noise_sigma"] == pytest.approx(s.sigma, rel=0.05)
    kept = stepfiles.b0_noise(data, dwi.gtab, dwi.mask)
    assert kept["noise_sigma"] > 10 * s.sigma


def test_b0_noise_equals_its_definition_bit_for_bit():
    """sigma = 1.4826 MAD of consecutive b0 differences / sqrt 2 and the mean b0
    of io.mean_b0_map in the mask, written out per pair as defined, on
    order-sensitive data (log-normal over decades) and a subset of volumes, on
    the grid and on mask rows; and
    a known sigma is recovered from pure noise (1000 x 6 pairs: MAD within 5 %)."""
    rng = np.random.default_rng(3)
    shape, n = (40, 50, 30), 7
    gtab = GradientTable(np.r_[np.zeros(n - 1), 1000.0], np.tile([1.0, 0, 0], (n, 1)))
    data = rng.lognormal(3.0, 3.0, shape + (n,)).astype(np.float32)
    mask = rng.random(shape) < 0.6
    f_idx = np.ravel_multi_index(np.nonzero(mask.transpose(2, 1, 0))[::-1], shape)
    rows = np.asfortranarray(data.reshape(-1, n)[f_idx])
    order_matters = 0
    for volumes in (None, np.array([0, 2, 3, 5, 6])):
        idx = np.flatnonzero(gtab.b0s_mask)
        idx = idx if volumes is None else np.intersect1d(idx, volumes)
        diffs = np.concatenate([data[..., b][mask] - data[..., a][mask]
                                for a, b in zip(idx[:-1], idx[1:])])
        sigma = qc.MAD_TO_SD * float(np.median(np.abs(diffs - np.median(diffs)))) / np.sqrt(2)
        mean_b0 = float(io.mean_b0_map(data, gtab, idx)[mask].mean())
        got = stepfiles.b0_noise(data, gtab, mask, volumes)
        assert got == {"noise_sigma": sigma, "b0_snr": mean_b0 / sigma,
                       "n_b0_pairs": idx.size - 1}
        # held as Fortran-order mask rows (as Validate keeps a series): the same bits,
        # although the mean b0 of these data in the rows' own order differs
        assert stepfiles.b0_noise(rows, gtab, mask, volumes, rows_index=f_idx) == got
        in_row_order = io.mean_b0_map(rows[:, None, None, :], gtab, idx).mean()
        order_matters += int(float(in_row_order) != mean_b0)
    assert order_matters > 0
    noise = (100.0 + 7.0 * rng.standard_normal((10, 10, 10, n))).astype(np.float32)
    got = stepfiles.b0_noise(noise, gtab, np.ones((10, 10, 10), bool))
    assert got["noise_sigma"] == pytest.approx(7.0, rel=0.05)
    assert got["b0_snr"] == pytest.approx(100.0 / 7.0, rel=0.05)
