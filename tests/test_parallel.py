"""The one chunked parallel map (interfaces/parallel.py)."""

import ctypes
import importlib
import sys
import threading
import time

import numpy as np
import pytest

from dmriflow.interfaces import parallel
from dmriflow.interfaces.parallel import available_threads, map_chunks


def test_results_in_chunk_order_whatever_the_schedule():
    out = map_chunks(lambda k: k * k, range(50), n_threads=4)
    assert out == [k * k for k in range(50)]


def test_a_generator_is_drawn_by_one_thread_at_a_time():
    inside = []
    lock = threading.Lock()

    def chunks():
        for k in range(20):
            assert lock.acquire(blocking=False)   # no two threads in here at once
            inside.append(k)
            lock.release()
            yield np.full(3, k)

    out = map_chunks(lambda rows: int(rows.sum()), chunks(), n_threads=3)
    assert inside == list(range(20)) and out == [3 * k for k in range(20)]


def test_the_first_error_stops_the_others_and_is_raised():
    done = []

    def work(k):
        if k == 2:
            raise ValueError("chunk 2")
        done.append(k)

    with pytest.raises(ValueError, match="chunk 2"):
        map_chunks(work, iter(range(1000)), n_threads=2)
    assert len(done) < 1000


def test_one_thread_runs_in_the_caller():
    caller = threading.get_ident()
    assert map_chunks(lambda _: threading.get_ident(), range(3), n_threads=1) == [caller] * 3
    assert available_threads() >= 1


def test_beside_runs_both_at_once_and_returns_both():
    """side runs in a second thread while main runs here: main waits for a
    signal only side gives (a serial call would time out)."""
    started = threading.Event()
    caller = threading.get_ident()

    def main():
        assert started.wait(timeout=10), "side did not run beside main"
        return "main", threading.get_ident()

    def side():
        started.set()
        return "side", threading.get_ident()

    (m, m_thread), (s, s_thread) = parallel.beside(main, side, n_threads=2)
    assert (m, s) == ("main", "side") and m_thread == caller != s_thread


def test_beside_raises_mains_error_first_and_after_side_ended():
    side_done = []

    def slow_side(error=None):
        time.sleep(0.2)
        side_done.append(True)
        if error:
            raise error
        return 1

    def failing_main():
        raise ValueError("main")

    with pytest.raises(ValueError, match="main"):
        parallel.beside(failing_main, lambda: slow_side(KeyError("side")), n_threads=2)
    assert side_done == [True]               # joined before the error came out
    with pytest.raises(KeyError, match="side"):
        parallel.beside(lambda: 0, lambda: slow_side(KeyError("side")), n_threads=2)


def test_beside_with_one_thread_is_the_serial_call():
    order, caller = [], threading.get_ident()

    def part(name):
        order.append((name, threading.get_ident()))
        return name

    assert parallel.beside(lambda: part("main"), lambda: part("side"), n_threads=1) == \
        ("main", "side")
    assert order == [("main", caller), ("side", caller)]
    with pytest.raises(ValueError):     # serial: main's error, side never runs
        parallel.beside(lambda: (_ for _ in ()).throw(ValueError("m")),
                        lambda: part("never"), n_threads=1)
    assert ("never", caller) not in order


# ---------------------------------------------------------------------------
# reduce: results handed over in order, memory bounded
# ---------------------------------------------------------------------------
def test_reduce_gets_every_result_in_chunk_order_and_never_overlaps():
    got, inside = [], []
    lock = threading.Lock()
    rng = np.random.default_rng(0)
    delays = rng.uniform(0, 2e-3, 60)            # finish out of order

    def work(k):
        time.sleep(delays[k])
        return k

    def reduce(k):
        assert lock.acquire(blocking=False)       # no two reduce calls at once
        inside.append(threading.get_ident())
        got.append(k)
        lock.release()

    assert map_chunks(work, range(60), n_threads=4, single_blas=False, reduce=reduce) is None
    assert got == list(range(60))
    # reduce runs in the worker threads, not in the caller
    assert threading.get_ident() not in inside


def test_reduce_holds_at_most_workers_plus_one_results():
    """Chunk 0 is slow: the other workers finish theirs, but may draw new
    chunks only while fewer than n + 1 drawn chunks wait for the reduction,
    so the results held never exceed n + 1 (without the bound all 40 would)."""
    n = 3
    state = {"held": 0, "max_held": 0, "started": 0}
    lock = threading.Lock()
    release = threading.Event()

    def work(k):
        with lock:
            state["started"] += 1
        if k == 0:
            release.wait(5.0)
        with lock:
            state["held"] += 1
            state["max_held"] = max(state["max_held"], state["held"])
        return np.zeros(10)

    def reduce(res):
        with lock:
            state["held"] -= 1

    def unblock():
        # wait until the others are stuck at the bound, then let chunk 0 finish
        deadline = time.monotonic() + 5.0
        while state["started"] < n + 1 and time.monotonic() < deadline:
            time.sleep(1e-3)
        time.sleep(0.05)                          # time to draw more, were it allowed
        with lock:
            stuck = state["started"]
        release.set()
        return stuck

    t = threading.Thread(target=lambda: state.update(stuck=unblock()))
    t.start()
    map_chunks(work, range(40), n_threads=n, single_blas=False, reduce=reduce)
    t.join()
    assert state["stuck"] == n + 1                # chunk 0 and n more, then the bound
    assert state["max_held"] <= n + 1 and state["held"] == 0


def test_reduce_with_an_error_in_a_worker_raises_and_stops_the_pool():
    done, reduced = [], []

    def work(k):
        if k == 5:
            raise ValueError("chunk 5")
        done.append(k)
        return k

    with pytest.raises(ValueError, match="chunk 5"):
        map_chunks(work, iter(range(1000)), n_threads=3, single_blas=False,
                   reduce=reduced.append)
    assert len(done) < 20                         # stopped: at most a window past chunk 5
    assert reduced == list(range(len(reduced))) and 5 not in reduced


def test_reduce_with_an_error_in_reduce_raises_and_stops_the_pool():
    done = []

    def reduce(k):
        if k == 3:
            raise RuntimeError("reduce 3")

    with pytest.raises(RuntimeError, match="reduce 3"):
        map_chunks(lambda k: done.append(k) or k, iter(range(1000)), n_threads=2,
                   single_blas=False, reduce=reduce)
    assert len(done) < 20


def test_reduce_with_one_thread_runs_in_the_caller_in_order():
    caller = threading.get_ident()
    got = []
    map_chunks(lambda k: (k, threading.get_ident()), range(5), n_threads=1,
               reduce=got.append)
    assert got == [(k, caller) for k in range(5)]


def test_workers_run_openmp_teams_of_one():
    """torch's OpenMP runtime gives a thread it did not start one team member
    per core unless told otherwise; map_chunks' workers (single_blas) must
    run teams of one (two workers with teams of two spin-waited: Gibbs
    removal took 3.6x the CPU time). The caller's setting is left alone."""
    importlib.import_module("torch")     # loads the OpenMP runtime
    libs = parallel._loaded_libraries(lambda name: name.startswith(("libgomp", "libiomp")))
    assert libs, "torch's OpenMP runtime is not loaded"
    team = ctypes.CDLL(libs[0]).omp_get_max_threads
    team.restype = ctypes.c_int
    before = team()
    assert map_chunks(lambda _: team(), range(6), n_threads=2) == [1] * 6
    assert team() == before


def test_blas_is_looked_up_again_after_an_import_and_pinned(monkeypatch):
    """A BLAS loaded after the first look (scipy's own OpenBLAS comes with
    scipy.linalg) must be controlled too: the setters are looked up again
    once modules were imported since, and each BLAS found is pinned to one
    thread process-wide."""
    pinned = []

    def fake_find():
        return [("libopenblas.so", lambda n: 0, pinned.append)]
    monkeypatch.setattr(parallel, "_find_blas", fake_find)
    monkeypatch.setitem(parallel._BLAS, "modules", -1)
    first = parallel.blas_local_setters()
    assert len(first) == 1 and pinned == [parallel.BLAS_THREADS]
    assert parallel.blas_local_setters() is first and len(pinned) == 1   # nothing new imported
    monkeypatch.setitem(sys.modules, "a_module_with_a_blas", object())
    assert len(parallel.blas_local_setters()) == 1 and len(pinned) == 2
    monkeypatch.undo()
    parallel.pin_blas_threads()                    # the real libraries again

