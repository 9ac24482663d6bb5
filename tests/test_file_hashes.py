"""The engine's key of a subject follows its files' content, read without lock files.

Pydra keys its file-hash cache by (path, mtime): a file rewritten in place with
its mtime set back kept its old hash. dmriflow's Subject hash keys a file state
by path, size, mtime, inode and ctime, and keeps one digest per state in the
hash folder (written whole, then renamed; read without a lock).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from blake3 import blake3
from pydra.utils.hash import hash_function

from dmriflow.pipelines import file_hashes
from dmriflow.pipelines.steps import Subject


#: BLAKE3's official test vectors (test_vectors/test_vectors.json of the BLAKE3
#: repository): the derive_key mode's context, and the first 16 bytes of its
#: output for inputs of 0 and 1025 bytes (a byte pattern 0, 1, ..., 250, 0, 1, ...).
VECTOR_CONTEXT = "BLAKE3 2019-12-27 16:29:52 test vectors context"
VECTOR_DERIVE_KEY = {0: "2cc39783c223154fea8dfb7c1b1660f2",
                     1025: "effaa245f065fbf82ac186839a249707"}


def _vector_input(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


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
    assert entries[0].read_bytes()[:file_hashes.DIGEST_SIZE] == digest


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


def _entries(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob(file_hashes.ENTRY_PREFIX + "*")}


def test_prune_drops_gone_and_changed_states_only(tmp_path, hashes):
    """Entries of a live file stay; those of a deleted file, of a file whose state
    changed (rewritten with the same bytes: same digest, new state) and an earlier
    version's (no state recorded) go; files that are not entries stay."""
    live, gone, changed = (tmp_path / n for n in ("live", "gone", "changed"))
    for p in (live, gone, changed):
        p.write_bytes(p.name.encode())
        file_hashes.file_digest(p)
    before = _entries(hashes)
    assert len(before) == 3
    gone.unlink()
    st = changed.stat()
    changed.write_bytes(b"changed")
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    legacy = hashes / (file_hashes.ENTRY_PREFIX + "0" * 40)
    legacy.write_bytes(b"x" * file_hashes.DIGEST_SIZE)
    others = [hashes / "pydra-own-entry", hashes / "dmriflow-census-abc.json"]
    for p in others:
        p.write_bytes(b"{}")
    assert file_hashes.prune(hashes) == 3
    after = _entries(hashes)
    assert len(after) == 1 and set(after) < set(before) and all(p.exists() for p in others)
    assert next(iter(after.values()))[:file_hashes.DIGEST_SIZE] == file_hashes.content_digest(
        live)
    assert file_hashes.prune(hashes) == 0 and file_hashes.prune(tmp_path / "absent") == 0


def test_a_rerun_prunes_the_changed_inputs_entry_and_a_cached_rerun_still_hits(tmp_path,
                                                                             monkeypatch):
    """A run, then an input rewritten with new content: the rerun's upkeep drops
    that file's old-state entry and keeps the other files'; the next rerun
    reads no file again (every digest from its entry) and computes no node."""
    from dmriflow.interfaces.sim.phantom import hcp_scheme, write_cohort
    from dmriflow.pipelines.execution import HASH_CACHE_DIR, RunConfig, run_cohort
    from dmriflow.pipelines.inputs import discover
    write_cohort(tmp_path / "in", 1, shape=(4, 5, 4), seed=0,
                 scheme=hcp_scheme(n_b0=2, shells=(1000,), n_dirs=6, seed=0))
    subjects = discover(tmp_path / "in")
    cache, out = tmp_path / "cache", tmp_path / "out"
    config = RunConfig(worker="debug", cache_dir=str(cache), quiet=True)

    def run() -> tuple[dict, int]:
        result = run_cohort(subjects, out, config)
        assert {r["status"] for r in result.rows} == {"done"}
        return _entries(cache / HASH_CACHE_DIR), len(list(cache.glob("*/_result.pklz")))

    first, nodes = run()
    bvec = Path(subjects[0].bvec)
    stale = [n for n, data in first.items() if data.endswith(file_hashes.state_key(bvec))]
    assert len(stale) == 1
    np.savetxt(bvec, -np.loadtxt(bvec))             # the same directions, new bytes
    second, nodes_after_change = run()
    assert stale[0] not in second and set(first) - set(second) == set(stale)
    assert len(second) == len(first) and nodes_after_change > nodes    # recomputed
    monkeypatch.setattr(file_hashes, "content_digest",
                        lambda p: pytest.fail(f"{p} was read again on a cached rerun"))
    third, nodes_cached = run()
    assert third == second and nodes_cached == nodes_after_change


@pytest.mark.parametrize("size", sorted(VECTOR_DERIVE_KEY))
def test_the_digest_is_blake3_key_derivation_of_the_files_bytes(tmp_path, monkeypatch, size):
    """With the official vectors' context the digest is the official derive_key
    output (cut to DIGEST_SIZE); with dmriflow's context it is the blake3
    package's one-shot derive_key digest of the same bytes, and differs from a
    plain BLAKE3 hash of them."""
    path = tmp_path / "f"
    data = _vector_input(size)
    path.write_bytes(data)
    ours = file_hashes.content_digest(path)
    assert ours == blake3(data, derive_key_context=file_hashes.CONTEXT).digest(16)
    assert len(ours) == file_hashes.DIGEST_SIZE and ours != blake3(data).digest(16)
    monkeypatch.setattr(file_hashes, "CONTEXT", VECTOR_CONTEXT)
    assert file_hashes.content_digest(path).hex() == VECTOR_DERIVE_KEY[size]


def test_a_large_file_is_hashed_over_the_threads_the_process_may_use(tmp_path, monkeypatch):
    """A file from THREADED_MIN on (lowered here) is hashed by as many threads as
    available_threads gives (OMP_NUM_THREADS caps it), a smaller one by one; the
    digest is the one-thread digest either way."""
    small, large = tmp_path / "small", tmp_path / "large"
    data = np.random.default_rng(0).bytes(3 << 20)
    small.write_bytes(data[:1000])
    large.write_bytes(data)
    monkeypatch.setattr(file_hashes, "THREADED_MIN", 1 << 20)
    asked = []

    def recording(*args, max_threads, **kwargs):
        asked.append(max_threads)
        return blake3(*args, max_threads=max_threads, **kwargs)
    monkeypatch.setattr(file_hashes, "blake3", recording)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    for path in (large, small):
        assert file_hashes.content_digest(path) == blake3(
            path.read_bytes(), derive_key_context=file_hashes.CONTEXT).digest(16)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    file_hashes.content_digest(large)
    assert asked == [3, 1, 1]


def test_a_large_files_blocks_are_read_ahead_and_hashed_in_order_unchanged(tmp_path,
                                                                          monkeypatch):
    """A large file is read in a second thread while this one hashes (a slow
    hash here, so the reader runs as far ahead as it may): the digest is still
    the one-shot digest of the bytes, so no block is overwritten before it is
    hashed, and the blocks are hashed in file order; the reading thread is gone."""
    path = tmp_path / "large"
    data = np.random.default_rng(1).bytes((3 << 20) + 12345)
    path.write_bytes(data)
    monkeypatch.setattr(file_hashes, "THREADED_MIN", 1 << 20)
    monkeypatch.setattr(file_hashes, "CHUNK", 1 << 16)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    readers = []

    class SlowHash:
        def __init__(self, *args, **kwargs):
            self.real = blake3(*args, **kwargs)

        def update(self, block):
            readers.extend(t.name for t in threading.enumerate()
                           if t.name == "dmriflow-digest-read")
            time.sleep(0.002)
            self.real.update(bytes(block))

        def digest(self, n):
            return self.real.digest(n)
    monkeypatch.setattr(file_hashes, "blake3", SlowHash)
    assert file_hashes.content_digest(path) == blake3(
        data, derive_key_context=file_hashes.CONTEXT).digest(file_hashes.DIGEST_SIZE)
    assert readers and not any(t.name == "dmriflow-digest-read" for t in threading.enumerate())


def test_an_earlier_versions_blake2b_entry_is_never_read_and_prune_removes_it(tmp_path,
                                                                            hashes):
    """An entry of dmriflow's blake2b digests, under the very name and layout the
    earlier version gave the same file state, is not returned as the digest:
    the file is hashed anew; prune removes it (dmriflow's own name pattern) and
    leaves a file that only shares its prefix."""
    from hashlib import blake2b
    path = tmp_path / "f"
    path.write_bytes(b"content")
    key = file_hashes.state_key(path)
    name = blake2b(key, digest_size=20).hexdigest()
    hashes.mkdir()
    old_digest = blake2b(b"content", digest_size=16, person=b"dmriflow-file").digest()
    old = hashes / (file_hashes.OLD_ENTRY_PREFIX + name)
    old.write_bytes(old_digest + key)
    users = hashes / (file_hashes.OLD_ENTRY_PREFIX + "notes.txt")
    users.write_bytes(b"not an entry")
    digest = file_hashes.file_digest(path)
    assert digest == file_hashes.content_digest(path) != old_digest
    assert (hashes / (file_hashes.ENTRY_PREFIX + name)).read_bytes() == digest + key
    assert file_hashes.prune(hashes) == 1
    assert not old.exists() and users.exists()
    assert file_hashes.file_digest(path) == digest
