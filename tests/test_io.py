"""Validated loading, atomic writing and provenance (interfaces.io)."""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import dmriflow.interfaces as interfaces_pkg
from dmriflow.interfaces import io
from dmriflow.interfaces.gradients import B0_THRESHOLD, GradientTable, gradient_policy

MDT60 = "mdt_te60_b1k_b2k"


def _mdt60(shared_data):
    folder = shared_data / MDT60
    return dict(dwi_path=folder / "b1k_b2k_example_slices_24_38.nii.gz",
                bval_path=folder / "b1k_b2k.bval", bvec_path=folder / "b1k_b2k.bvec",
                mask_path=folder / "b1k_b2k_example_slices_24_38_mask.nii.gz")


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------
# load_dwi on real data
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mdt_dwi(shared_data):
    return io.load_dwi(**_mdt60(shared_data))


def test_load_dwi_real(shared_data, mdt_dwi):
    paths = _mdt60(shared_data)
    ref = nib.load(paths["dwi_path"])
    mask_ref = np.asanyarray(nib.load(paths["mask_path"]).dataobj) > 0
    assert mdt_dwi.data.shape == (104, 104, 2, 103)
    assert mdt_dwi.data.dtype == np.float32
    assert_array_equal(mdt_dwi.data, ref.get_fdata(dtype=np.float32))
    assert mdt_dwi.mask.dtype == bool and mdt_dwi.mask.shape == (104, 104, 2)
    assert_array_equal(mdt_dwi.mask, mask_ref)
    assert int(mdt_dwi.mask.sum()) == int(mask_ref.sum()) > 1000
    assert_array_equal(mdt_dwi.affine, ref.affine)
    assert_allclose(mdt_dwi.zooms, (2.0, 2.0, 2.0), atol=1e-5)
    assert isinstance(mdt_dwi.gtab, GradientTable)
    assert len(mdt_dwi.gtab) == 103
    assert int(mdt_dwi.gtab.b0s_mask.sum()) == 13
    assert mdt_dwi.gtab.directions_per_shell() == {1000.0: 30, 2000.0: 60}
    assert mdt_dwi.paths == {k.removesuffix("_path"): os.fspath(v) for k, v in paths.items()}


def test_load_dwi_without_mask_uses_positive_mean_b0(shared_data, mdt_dwi):
    paths = _mdt60(shared_data)
    del paths["mask_path"]
    dwi = io.load_dwi(**paths)
    expected = mdt_dwi.data[..., mdt_dwi.gtab.b0s_mask].mean(axis=-1) > 0
    assert_array_equal(dwi.mask, expected)
    assert "mask" not in dwi.paths


# ----------------------------------------------------------------------------
# DWI.masked
# ----------------------------------------------------------------------------
def _dwi(data, mask):
    n = data.shape[-1]
    bvals = np.r_[0.0, np.full(n - 1, 1000.0)]
    bvecs = np.r_[np.zeros((1, 3)), np.tile(np.eye(3), (n, 1))[:n - 1]]
    return io.DWI(data=data, gtab=GradientTable(bvals, bvecs), mask=mask,
                  affine=np.eye(4), header=nib.Nifti1Header(), paths={})


@pytest.mark.parametrize("order", ["C", "F", "strided"])
def test_masked_rows_equal_fancy_indexing(order):
    rng = np.random.default_rng(0)
    base = rng.random((7, 5, 4, 6)).astype(np.float32)
    if order == "strided":
        data = np.asarray(np.random.default_rng(1).random((14, 5, 4, 6)),
                          dtype=np.float32)[::2]
        assert not (data.flags.c_contiguous or data.flags.f_contiguous)
    else:
        data = np.array(base, order=order)
    mask = rng.random(data.shape[:3]) > 0.4
    dwi = _dwi(data, mask)
    rows = dwi.masked()
    idx = dwi.masked_index()
    assert rows.dtype == np.float32
    assert_array_equal(rows, data.reshape(-1, data.shape[-1])[idx])
    assert_array_equal(np.sort(idx), np.flatnonzero(mask.ravel()))
    chunks = list(dwi.masked(chunk=7))
    assert [c.shape[0] for c in chunks[:-1]] == [7] * (len(chunks) - 1)
    assert 0 < chunks[-1].shape[0] <= 7
    assert len(chunks) == -(-int(mask.sum()) // 7)
    assert_array_equal(np.concatenate(chunks), rows)
    # results scattered back through masked_index land on their own voxels
    out = np.zeros(data.shape, np.float32)   # C order: reshape is a view
    out.reshape(-1, data.shape[-1])[idx] = np.concatenate(chunks)
    assert_array_equal(out[mask], data[mask])
    assert_array_equal(out[~mask], 0)
    if order != "strided":  # contiguous data are read through a view, not a copy
        assert np.shares_memory(io._flat_view(data)[0], data)


@pytest.mark.parametrize("held", ["C", "F", "rows"])
def test_f_order_index_and_views_of_mask_rows(held):
    """``masked_index("F")`` places each row of ``masked()`` in an F-ordered map
    (ascending where the rows are in F voxel order), and ``masked_views``
    yields the rows of ``masked`` (views of mask rows, not copies)."""
    rng = np.random.default_rng(6)
    data = np.array(rng.random((6, 5, 4, 3)).astype(np.float32), order="F" if held != "C" else "C")
    mask = rng.random(data.shape[:3]) > 0.5
    dwi = _dwi(data, mask)
    if held == "rows":
        dwi = replace(dwi, data=None, rows=np.asfortranarray(dwi.masked()))
    assert dwi.voxel_order == ("C" if held == "C" else "F")
    f_idx = dwi.masked_index("F")
    out = np.zeros(data.shape, np.float32, order="F")
    out.reshape(-1, data.shape[-1], order="F")[f_idx] = dwi.masked()
    assert_array_equal(out[mask], data[mask])
    assert_array_equal(out[~mask], 0)
    assert np.all(np.diff(f_idx) > 0) == (held != "C")
    views = list(dwi.masked_views(4))
    assert_array_equal(np.concatenate(views), dwi.masked())
    assert all(np.shares_memory(v, dwi.rows) for v in views) == (held == "rows")
    with pytest.raises(ValueError, match="order"):
        dwi.masked_index("K")


def test_masked_index_computed_once_per_mask_and_data():
    """The index is kept (Validate asks for it from its QC, fit and noise) and
    read-only, and computed anew when the mask or the data object is replaced
    (a new mask, a series with other volumes or layout)."""
    rng = np.random.default_rng(4)
    data = np.asfortranarray(rng.random((6, 5, 4, 3)).astype(np.float32))
    mask = rng.random(data.shape[:3]) > 0.5
    dwi = _dwi(data, mask)
    first = dwi.masked_index()
    assert dwi.masked_index() is first and not first.flags.writeable
    dwi.mask = ~mask                            # F-ordered data: rows in F order
    in_f_order = np.flatnonzero((~mask).ravel(order="F"))
    assert_array_equal(dwi.masked_index(), np.ravel_multi_index(
        np.unravel_index(in_f_order, mask.shape, order="F"), mask.shape))
    assert_array_equal(dwi.masked(), data.reshape(-1, 3, order="F")[in_f_order])
    dwi.data = np.ascontiguousarray(data)       # C order: rows in C order now
    assert_array_equal(dwi.masked_index(), np.flatnonzero((~mask).ravel()))
    assert_array_equal(dwi.masked(), data[~mask])


def test_masked_real_data(mdt_dwi):
    """NIfTI data are F-ordered: rows come in storage order, named by masked_index."""
    data, idx = mdt_dwi.data, mdt_dwi.masked_index()
    assert data.flags.f_contiguous
    rows = mdt_dwi.masked()
    assert_array_equal(rows, data.reshape(-1, data.shape[-1])[idx])
    assert_array_equal(np.concatenate(list(mdt_dwi.masked(chunk=1000))), rows)


# ----------------------------------------------------------------------------
# Atomic writing
# ----------------------------------------------------------------------------
def test_save_nifti_round_trip_and_no_temp_left(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.normal(size=(5, 6, 7, 3)).astype(np.float32)
    affine = np.array([[-2.0, 0.1, 0, 90], [0, 1.9, -0.3, -120], [0, 0.3, 2.2, -70],
                       [0, 0, 0, 1]])
    target = tmp_path / "sub" / "out.nii.gz"
    assert io.save_nifti(data, affine, target) == target
    assert os.listdir(tmp_path / "sub") == ["out.nii.gz"]
    img = nib.load(target)
    assert img.get_data_dtype() == np.float32
    assert_array_equal(img.get_fdata(dtype=np.float32), data)
    assert_allclose(img.affine, affine, atol=1e-6)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~_umask()
    with open(target, "rb") as fh:
        assert fh.read(2) == b"\x1f\x8b"  # really gzip-compressed


def test_save_nifti_dtypes(tmp_path):
    labels = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    io.save_nifti(labels, np.eye(4), tmp_path / "l.nii")
    img = nib.load(tmp_path / "l.nii")
    assert img.get_data_dtype() == np.int16
    assert_array_equal(np.asanyarray(img.dataobj), labels)
    mask = labels > 10
    io.save_nifti(mask, np.eye(4), tmp_path / "m.nii.gz")
    img = nib.load(tmp_path / "m.nii.gz")
    assert img.get_data_dtype() == np.uint8
    assert_array_equal(np.asanyarray(img.dataobj), mask)


def test_save_nifti_is_deterministic(tmp_path):
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    a = io.save_nifti(data, np.eye(4), tmp_path / "a" / "x.nii.gz")
    b = io.save_nifti(data, np.eye(4), tmp_path / "b" / "x.nii.gz")
    # content-hashed caches need identical bytes (no temp name or time inside)
    assert io.file_sha256(a) == io.file_sha256(b)


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_previous_file_and_no_temp(tmp_path, monkeypatch, exc):
    target = tmp_path / "fa.nii.gz"
    old = np.ones((2, 2, 2), np.float32)
    io.save_nifti(old, np.eye(4), target)
    before = io.file_sha256(target)
    written = []

    def half_save(img, filename):
        with open(filename, "wb") as fh:
            fh.write(b"\x1f\x8b partial")
        written.append(filename)
        raise exc

    monkeypatch.setattr(io, "_write_image", half_save)
    with pytest.raises(type(exc)):
        io.save_nifti(np.zeros((2, 2, 2), np.float32), np.eye(4), target)
    monkeypatch.undo()
    assert len(written) == 1 and Path(written[0]).parent == tmp_path
    assert Path(written[0]).name != "fa.nii.gz"  # it wrote to a temporary name
    assert os.listdir(tmp_path) == ["fa.nii.gz"]
    assert io.file_sha256(target) == before
    assert_array_equal(nib.load(target).get_fdata(), old)


def test_write_json(tmp_path):
    obj = {"b": np.float32(1.5), "a": np.arange(3), "p": Path("/x/y"), "n": np.int64(7),
           "text": "µm²"}
    path = io.write_json(obj, tmp_path / "d" / "s.json")
    raw = path.read_text(encoding="utf-8")
    assert raw.endswith("\n")
    assert json.loads(raw) == {"a": [0, 1, 2], "b": 1.5, "n": 7, "p": "/x/y", "text": "µm²"}
    assert list(json.loads(raw)) == ["a", "b", "n", "p", "text"]  # sorted keys
    assert os.listdir(tmp_path / "d") == ["s.json"]


def test_write_json_unserialisable_keeps_previous(tmp_path):
    path = io.write_json({"ok": 1}, tmp_path / "s.json")
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        io.write_json({"bad": object()}, path)
    assert json.loads(path.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["s.json"]


# ----------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------
def test_file_sha256_matches_hashlib(tmp_path):
    payload = np.random.default_rng(3).bytes(3 * 1024 + 17)
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    expected = hashlib.sha256(payload).hexdigest()
    assert io.file_sha256(path) == expected
    assert io.file_sha256(path, block=1000) == expected  # several blocks, ragged end
    (tmp_path / "empty").write_bytes(b"")
    assert io.file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_sidecar(tmp_path):
    import numpy
    dwi = tmp_path / "dwi.nii.gz"
    dwi.write_bytes(b"dwi bytes")
    bval = tmp_path / "bvals"
    bval.write_bytes(b"0 1000")
    meta = io.sidecar({"dwi": dwi, "bval": str(bval), "mask": None},
                      {"fit_method": "WLS", "min_signal": 1e-3}, step="dti",
                      extra={"Subject": "01"})
    assert meta["Inputs"] == {
        "dwi": {"path": str(dwi), "sha256": hashlib.sha256(b"dwi bytes").hexdigest()},
        "bval": {"path": str(bval), "sha256": hashlib.sha256(b"0 1000").hexdigest()},
    }
    assert meta["Parameters"]["fit_method"] == "WLS"
    assert meta["Parameters"]["min_signal"] == 1e-3
    assert meta["Parameters"]["gradient_policy"] == gradient_policy()
    assert meta["Parameters"]["gradient_policy"]["b0_threshold"] == B0_THRESHOLD
    gen = meta["GeneratedBy"][0]
    assert gen["Name"] == "dmriflow" and gen["Step"] == "dti"
    assert gen["Version"] == interfaces_pkg.__version__
    assert gen["PipelineVersion"] == io.pipeline_version()
    assert meta["Versions"]["numpy"] == numpy.__version__
    assert meta["Versions"]["nibabel"] == nib.__version__
    assert meta["Versions"]["dmriflow"] == interfaces_pkg.__version__
    assert meta["Versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert meta["Subject"] == "01"
    # and it is writable as JSON
    assert json.loads(io.write_json(meta, tmp_path / "x.json").read_text()) == meta


@pytest.fixture
def fresh_source_hash(monkeypatch):
    io.source_hash.cache_clear()
    yield
    io.source_hash.cache_clear()  # later callers recompute from the real tree


def test_source_dirs_are_the_running_code():
    dirs = io._source_dirs()
    assert dirs["interfaces"].resolve() == Path(io.__file__).resolve().parent
    assert set(dirs) <= {"interfaces", "pipelines", "models"}


def test_pipeline_version_follows_source(tmp_path, monkeypatch, fresh_source_hash):
    real = io._source_dirs()
    copies = {layer: tmp_path / layer for layer in real}
    for layer, src in real.items():
        shutil.copytree(src, copies[layer], ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(io, "_source_dirs", lambda: dict(copies))

    v1 = io.pipeline_version()
    assert v1.startswith(interfaces_pkg.__version__ + "+")
    assert io.source_hash() == io._hash_sources(real)  # the copy hashes like the tree

    target = copies["interfaces"] / "gradients.py"
    original = target.read_bytes()
    target.write_bytes(original + b"\n# an edit\n")
    assert io.pipeline_version() == v1  # cached for the process...
    io.source_hash.cache_clear()
    v2 = io.pipeline_version()
    assert v2 != v1  # ...and a fresh computation sees the edit

    target.write_bytes(original)
    io.source_hash.cache_clear()
    assert io.pipeline_version() == v1  # a function of content only

    (copies["interfaces"] / "newstep.py").write_text("X = 1\n")
    io.source_hash.cache_clear()
    v3 = io.pipeline_version()
    assert v3 not in (v1, v2)

    # editor litter (hidden files, emacs' dangling lock links) does not count
    (copies["interfaces"] / ".#io.py").symlink_to(tmp_path / "nowhere")
    (copies["interfaces"] / ".scratch.py").write_text("Y = 2\n")
    (copies["interfaces"] / "notes.txt").write_text("not code\n")
    io.source_hash.cache_clear()
    assert io.pipeline_version() == v3


def test_pipeline_version_same_in_a_fresh_process():
    code = "from dmriflow.interfaces import io; print(io.pipeline_version())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    io.source_hash.cache_clear()
    assert out.stdout.strip() == io.pipeline_version()
