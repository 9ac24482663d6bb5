"""Threads for the numerics: how many, BLAS inside them, and the one chunked map.

* :func:`available_threads` - the one place the thread count comes from;
* :func:`pin_blas_threads` - one BLAS thread process-wide, always (run when
  ``dmriflow.interfaces`` is imported): parallelism comes from the workers,
  and a BLAS reduction split over threads rounds differently, so results
  would depend on the thread count the machine gives;
* :func:`single_threaded_blas` - one BLAS thread, and OpenMP teams of one, in
  a worker (BLAS threads inside several workers fight);
* :func:`map_chunks` - the one chunked parallel map (collecting the results,
  or reducing them in order): every loop that spreads
  chunks of voxels (or volumes, or slabs) over worker threads runs through it;
* :func:`produce_consume` - a producer in a second thread handing items to
  the calling thread in order (a decoder beside the work on what it decodes);
* :func:`beside` - two independent calls at once, one in a second thread.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterable


def available_threads() -> int:
    """CPU threads this process may use: its CPU affinity, capped by
    OMP_NUM_THREADS when set (what SLURM / containers give us)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        n = min(n, int(env))
    return max(1, n)


#: Name affixes of OpenBLAS builds' process-wide setter (scipy-openblas wheels:
#: ``scipy_openblas_set_num_threads64_``); the per-thread one has none.
_OPENBLAS_PREFIXES = ("", "scipy_")
_OPENBLAS_SUFFIXES = ("", "64_", "_64")


def _blas_setters(lib) -> tuple:
    """(per-thread, process-wide) thread-count setters of one loaded BLAS,
    each None where the library has none (OpenBLAS < 0.3.27: no per-thread one)."""
    openblas = [f"{p}openblas_set_num_threads{x}" for p in _OPENBLAS_PREFIXES
                for x in _OPENBLAS_SUFFIXES]
    for local, names in (("openblas_set_num_threads_local", openblas),
                         ("MKL_Set_Num_Threads_Local", ["MKL_Set_Num_Threads"])):
        put = next((g for g in (getattr(lib, n, None) for n in names) if g is not None), None)
        fn = getattr(lib, local, None)
        if fn is None and put is None:
            continue
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        if put is not None:
            put.argtypes, put.restype = [ctypes.c_int], None
        return fn, put
    return None, None


def _find_blas() -> list:
    """(path, per-thread setter or None, process-wide setter or None) of every
    OpenBLAS/MKL loaded (numpy's and scipy's wheels each bring their own OpenBLAS).

    OpenBLAS >= 0.3.27 (``openblas_set_num_threads_local``) and MKL
    (``MKL_Set_Num_Threads_Local``) let one thread pin its own BLAS thread
    count; both return the previous setting. The CPU path runs one worker per
    core, each with single-threaded BLAS. Without that control the caller
    falls back to one worker (BLAS threads inside two workers fight over the
    cores: 0.29 s instead of 0.15 s per 200k voxels in our first measurement).
    """
    found = []
    for path in _loaded_libraries(lambda name: "openblas" in name or name.startswith("libmkl_rt")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        local, put = _blas_setters(lib)
        if local is not None or put is not None:
            found.append((path, local, put))
    return found


def _find_openmp_local_setters() -> list:
    """Per-thread team-size setters of every OpenMP runtime loaded (torch's
    libgomp: its MKL matrix products and FFTs, and its own kernels, run
    OpenMP teams). ``omp_set_num_threads`` sets the calling thread's own
    team size; a thread the runtime did not start (our workers) otherwise
    gets one team member per core, so two workers each ran teams of two that
    spin-waited: Gibbs removal took 3.6x the CPU time of one worker, MP-PCA
    1.3x. Each setter returns the previous size, as the BLAS ones do."""
    setters = []
    for path in _loaded_libraries(lambda name: name.startswith(("libgomp", "libiomp"))):
        try:
            lib = ctypes.CDLL(path)
            put, get = lib.omp_set_num_threads, lib.omp_get_max_threads
        except (OSError, AttributeError):
            continue
        put.argtypes, put.restype = [ctypes.c_int], None
        get.argtypes, get.restype = [], ctypes.c_int

        def setter(n, put=put, get=get):
            prev = get()
            put(n)
            return prev
        setters.append(setter)
    return setters


def _loaded_libraries(wanted) -> list:
    """Paths of the shared libraries mapped into this process whose file name
    (lower case) ``wanted(name)`` accepts."""
    found = set()
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 6 and wanted(os.path.basename(parts[-1]).lower()):
                    found.add(parts[-1])
    except OSError:
        return []
    return sorted(found)


#: BLAS thread count of every thread of a dmriflow process (pin_blas_threads).
BLAS_THREADS = 1
_BLAS: dict = {"modules": -1, "local": []}
_BLAS_LOCK = threading.Lock()
_OMP_LOCAL: list = []
_OMP_LOOKED_UP = False
_OMP_LOOKED_UP_WITH_TORCH = False


def openmp_local_setters() -> list:
    """The OpenMP runtimes' per-thread team-size setters: looked up once, and
    once more after torch (which brings one) has been imported."""
    global _OMP_LOCAL, _OMP_LOOKED_UP, _OMP_LOOKED_UP_WITH_TORCH
    with_torch = "torch" in sys.modules
    if not _OMP_LOOKED_UP or (with_torch and not _OMP_LOOKED_UP_WITH_TORCH):
        _OMP_LOCAL = _find_openmp_local_setters()
        _OMP_LOOKED_UP, _OMP_LOOKED_UP_WITH_TORCH = True, with_torch
    return _OMP_LOCAL


@contextmanager
def single_threaded_blas():
    """One BLAS thread, and OpenMP teams of one, in the calling thread while
    the block runs, in every BLAS and OpenMP runtime that allows per-thread
    control (otherwise nothing changes)."""
    setters = blas_local_setters() + openmp_local_setters()
    prev = [setter(1) for setter in setters]
    try:
        yield
    finally:
        for setter, p in zip(setters, prev):
            setter(p)


def blas_local_setters() -> list:
    """The per-thread thread-count setters of every BLAS loaded.

    Looked up again whenever modules were imported since the last look (a
    BLAS comes with an extension module: scipy's own OpenBLAS with
    ``scipy.linalg``), so a BLAS loaded later is controlled too; every BLAS
    found is pinned to ``BLAS_THREADS`` process-wide (:func:`pin_blas_threads`).
    """
    with _BLAS_LOCK:
        if len(sys.modules) != _BLAS["modules"]:
            _BLAS["modules"] = len(sys.modules)
            found = _find_blas()
            for _, _, put in found:
                if put is not None:
                    put(BLAS_THREADS)
            _BLAS["local"] = [local for _, local, _ in found if local is not None]
        return _BLAS["local"]


def pin_blas_threads() -> None:
    """One BLAS thread (``BLAS_THREADS``) process-wide, in numpy's BLAS and
    scipy's (imported here so that its own OpenBLAS is loaded and pinned too),
    whatever OPENBLAS_NUM_THREADS / OMP_NUM_THREADS (``--omp-nthreads``) say.

    Why: OpenBLAS splits a product over its threads differently with 1 and
    2 threads, and the rounding differs: the RISH maps of a small phantom
    (one float32 product in the calling thread) and the artefact fitted from
    them changed with the BLAS thread count, and so did the refit's
    registrations through the harmonised FA (tests/test_thread_reproducibility.py). Parallel work runs
    in workers with one BLAS thread each (:func:`map_chunks`), so no fit
    here needs BLAS threads."""
    for module in ("numpy", "scipy.linalg"):    # load numpy's BLAS and scipy's own
        importlib.import_module(module)
    _BLAS["modules"] = -1
    blas_local_setters()


def blas_local_setter():
    """The first BLAS's per-thread thread-count setter, or None."""
    setters = blas_local_setters()
    return setters[0] if setters else None


_END = object()


def map_chunks(work: Callable, chunks: Iterable, n_threads: int | None = None,
               single_blas: bool = True, reduce: Callable | None = None) -> list | None:
    """``[work(c) for c in chunks]`` on up to ``n_threads`` worker threads.

    ``n_threads``: default :func:`available_threads`; capped by ``len(chunks)``
    when it has one. Chunks are drawn one at a time under a lock, so a
    generator (e.g. one reading rows from a memory map) is advanced by one
    thread at a time and never held whole. ``single_blas``: each worker runs
    with one BLAS thread; where the BLAS has no per-thread control, one worker
    runs instead (several workers with full BLAS threads each oversubscribe).
    The first exception (in ``work`` or ``reduce``) stops the other workers
    after their current chunk and is raised. With one worker everything runs
    in the calling thread. Results come back in the chunks' order, whatever
    the schedule.

    ``reduce``: instead of collecting the results, hand each one to
    ``reduce(result)`` in the chunks' order as soon as it and all earlier ones
    are done, and return None. The calls never overlap (one worker at a time
    makes them, the one that finished the next result in order), so ``reduce``
    may add into shared sums without a lock, and the sums come out the same on
    every run whatever the schedule. Memory stays bounded: a worker draws a
    new chunk only while fewer than ``n + 1`` drawn chunks wait to be reduced
    (``n`` the number of workers), so at most ``n + 1`` results are held.
    """
    n = available_threads() if n_threads is None else max(1, int(n_threads))
    if hasattr(chunks, "__len__"):
        n = min(n, max(1, len(chunks)))
    if single_blas and blas_local_setter() is None:
        n = 1
    items = iter(chunks)
    cond = threading.Condition()
    stop = threading.Event()
    results: dict[int, object] = {}     # reduce: results done but not yet reduced
    window = n + 1                      # reduce: drawn but not yet reduced, at most
    state = {"drawn": 0, "reduced": 0, "reducing": False}

    def may_draw():
        return stop.is_set() or state["drawn"] - state["reduced"] < window

    def draw():
        with cond:
            if reduce is not None:
                cond.wait_for(may_draw)
            item = _END if stop.is_set() else next(items, _END)
            if item is _END:
                return _END, -1
            k = state["drawn"]
            state["drawn"] += 1
            if reduce is None:
                results[k] = None
            return item, k

    def fail():
        with cond:
            stop.set()
            state["reducing"] = False
            cond.notify_all()

    def drain():
        """Reduce the results that are next in order, while there are any;
        run by one worker at a time (``reducing``)."""
        while True:
            with cond:
                res = _END if stop.is_set() else results.pop(state["reduced"], _END)
                if res is _END:
                    state["reducing"] = False
                    return
            reduce(res)
            with cond:
                state["reduced"] += 1
                cond.notify_all()

    def worker():
        with single_threaded_blas() if single_blas else nullcontext():
            while True:
                item, k = draw()
                if item is _END:
                    return
                try:
                    res = work(item)
                    if reduce is None:
                        results[k] = res
                        continue
                    with cond:
                        results[k] = res
                        if state["reducing"]:   # the reducing worker will take it
                            continue
                        state["reducing"] = True
                    del res
                    drain()
                except BaseException:
                    fail()
                    raise

    if n == 1:
        worker()
    else:
        with ThreadPoolExecutor(n) as pool:
            for f in [pool.submit(worker) for _ in range(n)]:
                f.result()
    if reduce is not None:
        return None
    return [results[k] for k in range(len(results))]


class _Stopped(Exception):
    """Raised by ``emit`` in the producing thread once the consumer has stopped."""


def produce_consume(produce: Callable, consume: Callable, depth: int,
                    n_threads: int | None = None, name: str = "dmriflow-produce") -> None:
    """``produce(consume)``, with ``produce`` in a second thread: what it
    emits reaches ``consume`` here, in order, while it goes on producing.

    Errors come out as in the serial call: an error in ``produce`` is raised
    here once every item emitted before it has been consumed (an error of
    ``consume`` among those wins); an error in ``consume`` stops ``produce``
    at its next emit (``emit`` raises inside it) and is raised once the
    producing thread has ended. ``emit`` blocks while ``depth`` items wait, so
    when it returns every item emitted ``depth + 1`` or more before has been
    consumed: a producer cycling through ``depth + 2`` buffers never
    overwrites one in use. ``n_threads`` (default :func:`available_threads`)
    below 2: the serial call, in this thread. ``name``: the producing thread's.
    Calls nest: a producer may itself call this (its ``emit`` stopping raises
    through the inner call to the outer producer).
    """
    n = available_threads() if n_threads is None else int(n_threads)
    if n < 2:
        produce(consume)
        return
    waiting: queue.Queue = queue.Queue(max(1, int(depth)))
    stop = threading.Event()

    def emit(item) -> None:
        if stop.is_set():
            raise _Stopped
        waiting.put((True, item))

    def run() -> None:
        try:
            produce(emit)
        except _Stopped as exc:
            if not stop.is_set():       # an outer call's stop (nested): pass it on
                waiting.put((False, exc))
            return
        except BaseException as exc:    # handed over in order, raised by the consumer
            waiting.put((False, exc))
            return
        waiting.put((False, None))

    producer = threading.Thread(target=run, name=name, daemon=True)
    producer.start()
    try:
        while True:
            more, item = waiting.get()
            if not more:
                if item is not None:
                    raise item
                return
            consume(item)
    finally:
        stop.set()
        while producer.is_alive():      # unblock its put until it sees the stop
            try:
                waiting.get(timeout=0.05)
            except queue.Empty:
                pass
        producer.join()


def beside(main: Callable, side: Callable, n_threads: int | None = None) -> tuple:
    """``(main(), side())``, ``side`` running in a second thread while ``main``
    runs in this one: independent parts of one step share the cores
    (Validate's orientation check, Python-bound tracking for the most part,
    beside its b0 noise medians). Errors as in the serial call: ``main``'s is
    raised (once ``side`` has ended), else ``side``'s. ``n_threads`` (default
    :func:`available_threads`) below 2: ``main()`` then ``side()`` here."""
    n = available_threads() if n_threads is None else int(n_threads)
    if n < 2:
        first = main()
        return first, side()
    got: dict = {}

    def run() -> None:
        try:
            got["value"] = side()
        except BaseException as exc:
            got["error"] = exc

    thread = threading.Thread(target=run, name="dmriflow-beside", daemon=True)
    thread.start()
    try:
        first = main()
    finally:
        thread.join()
    if "error" in got:
        raise got["error"]
    return first, got["value"]
