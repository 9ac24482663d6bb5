"""The one chunked parallel map (interfaces/parallel.py)."""

import threading

import numpy as np
import pytest

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
