"""The same inputs give the same bytes whatever thread count the machine gives.

A study's harmonization artefact and its derivatives must not depend on
OMP_NUM_THREADS / OPENBLAS_NUM_THREADS (what ``--omp-nthreads`` sets for the
workers): each probe runs in a fresh process per thread count (OpenBLAS reads
its thread count when it is loaded) and the hashes of its outputs must be
equal. Before BLAS was pinned to one thread process-wide, the RISH maps of
one small phantom (a float32 product in the calling thread) and therefore the
fitted artefact differed between one and two BLAS threads on the 2-core test
machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent
#: Thread counts compared (a machine with fewer cores caps OpenBLAS at its cores).
THREAD_COUNTS = (1, 2)
SHAPE = (16, 18, 14)
SEEDS = (31, 32, 33)


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def probe() -> dict:
    """Hashes of what the thread count could change: DTI maps, RISH maps,
    one SyN registration, and a fitted artefact (three persons per site)."""
    sys.path.insert(0, str(TESTS))
    from test_harmonize import LMAX, SCALE, as_dwi, features, scheme

    from dmriflow.interfaces import dti
    from dmriflow.interfaces import harmonize as H
    from dmriflow.interfaces.sim import phantom

    site = phantom.SiteEffect(name="siteB", rish_scale=SCALE, snr=40.0)
    ref = [phantom.simulate_subject(SHAPE, seed=k, snr=40.0, scheme=scheme(),
                                    site=phantom.SiteEffect(name="siteA")) for k in SEEDS]
    tar = [phantom.simulate_subject(SHAPE, seed=k + 10, snr=40.0, scheme=scheme(), site=site)
           for k in SEEDS]
    fit = dti.fit_dwi(as_dwi(ref[0].dwi, ref[0]))
    fr, ft = features(ref, "ref"), features(tar, "tar")
    reg = H.register_fa(H.masked_fa(ft[0]), ft[0].affine, H.masked_fa(fr[0]), fr[0].affine)
    art = H.fit_harmonization(fr, ft, [1000.0], LMAX, reference_site="siteA",
                              target_site="siteB", template_iterations=1)
    return {"input": _digest(*(s.dwi for s in ref + tar)),
            "dti": _digest(fit.fa, fit.md, fit.evecs, fit.s0),
            "rish": _digest(*(v for f in fr + ft for v in f.rish.values())),
            "registration": _digest(reg.prealign, reg.forward, reg.backward),
            "artefact": art.content_id}


def _run_probe(threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    code = (f"import json, sys; sys.path.insert(0, {str(TESTS)!r}); "
            "import test_thread_reproducibility as t; print(json.dumps(t.probe()))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_features_registration_and_artefact_are_the_same_bytes_with_one_or_two_threads():
    one, two = (_run_probe(n) for n in THREAD_COUNTS)
    assert one["input"] == two["input"]          # the phantoms themselves
    differ = [k for k in one if one[k] != two[k]]
    assert not differ, f"outputs that depend on the thread count: {differ}"
