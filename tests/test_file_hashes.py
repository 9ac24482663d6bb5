"""The engine's key of a subject follows its files' content, read without lock files.

Pydra keys its file-hash cache by (path, mtime): a file rewritten in place with
its mtime set back kept its old hash. dmriflow's Subject hash keys a file state
by path, size, mtime, inode and ctime, and keeps one digest per state in the
hash folder (written whole, then renamed; read without a lock).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydra.utils.hash import hash_function

from dmriflow.pipelines import file_hashes
from dmriflow.pipelines.steps import Subject


def _subject(folder: Path) -> Subject:
    files = {}
    for name, text in (("data.nii.gz", b"A" * 64), ("bvals", b"0 1000"), ("bvecs", b"1 0 0")):
        (folder / name).write_bytes(text)
        files[name] = folder / name
    return Subject("sub-01", ("sub-01",), {"sub": "01"}, files["data.nii.gz"], files["bvals"],
                   files["bvecs"])


@pytest.fixture
def hashes(tmp_path, monkeypatch):
    folder = tmp_path / "hashes"
    monkeypatch.setenv("PYDRA_HASH_CACHE", str(folder))
    return folder


def test_a_file_rewritten_in_place_with_its_mtime_set_back_changes_the_key(tmp_path, hashes):
    subject = _subject(tmp_path)
    before = hash_function(subject)
    dwi = tmp_path / "data.nii.gz"
    st = dwi.stat()
    dwi.write_bytes(b"B" * 64)                             # same size ...
    os.utime(dwi, ns=(st.st_atime_ns, st.st_mtime_ns))     # ... and the old mtime
    assert dwi.stat().st_mtime_ns == st.st_mtime_ns
    assert hash_function(subject) != before
    dwi.write_bytes(b"A" * 64)                             # the old content: the old key
    assert hash_function(subject) == before


def test_the_key_is_the_files_names_and_content_not_their_folder(tmp_path, hashes):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert hash_function(_subject(tmp_path / "a")) == hash_function(_subject(tmp_path / "b"))
    other = _subject(tmp_path / "b")
    (tmp_path / "b" / "bvals").write_bytes(b"0 2000")
    assert hash_function(other) != hash_function(_subject(tmp_path / "a"))


def test_a_seen_file_state_is_not_read_again_and_a_cut_entry_is_recomputed(tmp_path, hashes,
                                                                         monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"content")
    digest = file_hashes.file_digest(path)
    assert digest == file_hashes.content_digest(path)
    entries = list(hashes.glob(file_hashes.ENTRY_PREFIX + "*"))
    assert len(entries) == 1 and not list(hashes.glob(".*"))     # no temporary left
    real = file_hashes.content_digest
    monkeypatch.setattr(file_hashes, "content_digest",
                        lambda p: pytest.fail("a stored file state was read again"))
    assert file_hashes.file_digest(path) == digest
    entries[0].write_bytes(digest[:5])                            # a cut entry
    monkeypatch.setattr(file_hashes, "content_digest", real)
    assert file_hashes.file_digest(path) == digest
    assert entries[0].read_bytes() == digest


def test_a_file_changed_while_it_is_hashed_is_not_stored(tmp_path, hashes, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"old")
    real = file_hashes.content_digest

    def read_then_change(p):
        digest = real(p)
        Path(p).write_bytes(b"new content")
        return digest
    monkeypatch.setattr(file_hashes, "content_digest", read_then_change)
    file_hashes.file_digest(path)
    assert not list(hashes.glob(file_hashes.ENTRY_PREFIX + "*"))


def test_cached_census_rows_equal_fresh_ones_and_follow_the_files(tmp_path, monkeypatch):
    from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
    from dmriflow.pipelines import census_cache
    from dmriflow.pipelines.inputs import census, discover
    write_cohort(tmp_path / "in", 3, shape=(4, 5, 4), seed=0,
                 scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=6, seed=0))
    subjects = discover(tmp_path / "in")
    folder = tmp_path / "hashes"
    fresh = census(subjects).to_csv(sep="\t", index=False)
    row_of = census_cache.cached_row_of(folder, "v1")
    assert census(subjects, row_of).to_csv(sep="\t", index=False) == fresh    # computed
    assert len(list(folder.glob(census_cache.ENTRY_PREFIX + "*"))) == len(subjects)
    monkeypatch.setattr(census_cache, "census_row",
                        lambda *a: pytest.fail("a stored census row was read again"))
    assert census(subjects, row_of).to_csv(sep="\t", index=False) == fresh    # stored
    bval = Path(subjects[0].bval)
    bval.write_text(" ".join(str(2 * int(b) if int(b) > 100 else int(b))       # new content
                             for b in bval.read_text().split()))
    monkeypatch.undo()
    changed = census(subjects, row_of)
    assert changed.to_csv(sep="\t", index=False) == census(subjects).to_csv(sep="\t", index=False)
    assert "2000" in changed.loc[0, "shells"] and changed.loc[1, "shells"] == "1000"
