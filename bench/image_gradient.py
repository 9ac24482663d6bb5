"""Benchmark: image gradient from the diffusion signal (SCIENCE.md s.7).

Sections (each a function returning an ordered dict of figures; ``main``
prints them as key=value lines, one per line):

* ``montecarlo_section``: the spin random-walk simulator
  (interfaces/montecarlo.py) - accuracy against the analytic results versus
  the number of walkers (free anisotropic diffusion: RMS error of
  |S(q)|/|S(0)| - E(q) over an HCP-like 3-shell scheme; linear R2 field:
  RMS error of the phase - (-1/2 q^T 2 Delta D g)), the mean reported
  standard error, and error x sqrt(N) (flat when the error falls as
  1/sqrt(N)); speed in walker-steps per second (a curved R2 field that is
  evaluated at every step, few volumes, so the walk dominates) and seconds
  per HCP voxel (288 volumes, 1e5 walkers, affine fields: one step per
  sequence segment is exact).

Run: ``nice -n 10 .venv/bin/python bench/image_gradient.py [--section NAME]
[--max-walkers N]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dmriflow.interfaces import montecarlo as mc
from dmriflow.interfaces.phantom import hcp_scheme

#: HCP 3T timing (s)
HCP_TIMING = dict(delta=0.0106, Delta=0.0431, TE=0.0895)
#: walker counts of the accuracy table
WALKERS = (1_000, 10_000, 100_000, 1_000_000)
#: an anisotropic white-matter-like tensor (mm^2/s), fixed orientation
_ROT = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0]
D_WM = _ROT @ np.diag([1.7e-3, 0.4e-3, 0.3e-3]) @ _ROT.T
#: grad ln I (1/mm) of the phase accuracy rows
G_PHASE = np.array([12.0, -6.0, 8.0])


def _rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def _timed(fn) -> tuple[float, float, object]:
    """Best wall and CPU time over 3 runs (the machine may be shared)."""
    wall = cpu = np.inf
    for rep in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        res = fn(rep)
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu, res


def _hcp_q(seq: mc.Sequence, n_dirs: int = 30) -> np.ndarray:
    gtab = hcp_scheme(n_b0=1, n_dirs=n_dirs, jitter=False)
    return seq.qvectors(gtab.bvals, gtab.bvecs)


def montecarlo_section(max_walkers: int = max(WALKERS)) -> dict:
    out: dict = {}
    seq = mc.Sequence.pgse(**HCP_TIMING)
    q = _hcp_q(seq)
    dw = np.linalg.norm(q, axis=1) > 0
    E = mc.free_attenuation(seq, q, D_WM)
    grad_r2 = -G_PHASE / seq.TE
    phi = mc.linear_field_phase(seq, q, D_WM, grad_R2=grad_r2)
    for n in (w for w in WALKERS if w <= max_walkers):
        free = mc.simulate(seq, q, mc.Compartment(D_WM), n_walkers=n, n_steps=6, seed=n)
        err = free.magnitude[0, dw] - E[dw]
        rms = float(np.sqrt(np.mean(err ** 2)))
        out[f"montecarlo_magnitude_rms_error_n{n}"] = f"{rms:.3e}"
        out[f"montecarlo_magnitude_rms_se_n{n}"] = f"{_rms(free.se_magnitude[0, dw]):.3e}"
        out[f"montecarlo_magnitude_rms_error_x_sqrt_n{n}"] = f"{rms * np.sqrt(n):.3f}"
        field = mc.simulate(seq, q, mc.Compartment(D_WM), R2=mc.PolynomialField(20.0, grad_r2),
                            n_walkers=n, n_steps=6, seed=n + 1)
        # phase error where the signal is not buried (E > 0.05)
        sel = dw & (E > 0.05)
        perr = np.angle(np.exp(1j * (field.phase[0, sel] - phi[sel])))
        prms = float(np.sqrt(np.mean(perr ** 2)))
        out[f"montecarlo_phase_rms_error_rad_n{n}"] = f"{prms:.3e}"
        out[f"montecarlo_phase_rms_se_rad_n{n}"] = f"{_rms(field.se_phase[0, sel]):.3e}"
        out[f"montecarlo_phase_rms_error_x_sqrt_n{n}"] = f"{prms * np.sqrt(n):.3f}"

    # speed of the walk: curved field evaluated every step, 4 volumes
    q4 = seq.qvectors([0.0, 1000.0, 2000.0, 3000.0], np.eye(3)[[0, 0, 1, 2]])
    curved = mc.PolynomialField(20.0, [5.0, 0.0, 0.0], np.diag([300.0, 200.0, 100.0]))
    n_walk, n_steps = 200_000, 100
    wall, cpu, res = _timed(lambda rep: mc.simulate(
        seq, q4, mc.Compartment(D_WM), R2=curved, n_walkers=n_walk, n_steps=n_steps, seed=rep))
    out["montecarlo_walkers"] = n_walk
    out["montecarlo_steps"] = res.n_steps
    out["montecarlo_walker_steps_per_s"] = f"{n_walk * res.n_steps / wall:.3e}"
    out["montecarlo_walker_steps_per_cpu_s"] = f"{n_walk * res.n_steps / cpu:.3e}"

    # one HCP voxel: 288 volumes, 1e5 walkers, affine R2 (exact with 1 step per segment)
    gtab = hcp_scheme(jitter=False)
    seq_q = seq.qvectors(gtab.bvals, gtab.bvecs)
    wall, cpu, _ = _timed(lambda rep: mc.simulate(
        seq, seq_q, mc.Compartment(D_WM), R2=mc.PolynomialField(20.0, grad_r2),
        n_walkers=100_000, n_steps=6, seed=rep))
    out["montecarlo_hcp_voxel_volumes"] = len(seq_q)
    out["montecarlo_hcp_voxel_walkers"] = 100_000
    out["montecarlo_hcp_voxel_s"] = f"{wall:.3f}"
    out["montecarlo_hcp_voxel_cpu_s"] = f"{cpu:.3f}"
    return out


#: sections in the order they run; another section is a function returning a dict
SECTIONS = {"montecarlo": montecarlo_section}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--section", choices=sorted(SECTIONS), action="append",
                    help="run only this section (repeatable; default all)")
    ap.add_argument("--max-walkers", type=int, default=max(WALKERS),
                    help="largest walker count of the Monte Carlo accuracy table")
    args = ap.parse_args(argv)
    for name in args.section or list(SECTIONS):
        fn = SECTIONS[name]
        figures = fn(args.max_walkers) if name == "montecarlo" else fn()
        for key, value in figures.items():
            print(f"{key}={value}", flush=True)


if __name__ == "__main__":
    main()
