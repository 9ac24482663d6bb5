"""Benchmark: image gradient from the diffusion signal (SCIENCE.md s.7).

Sections (each a function returning an ordered dict of figures; ``main``
prints them as key=value lines, one per line):

* ``montecarlo_section``: the spin random-walk simulator
  (interfaces/sim/montecarlo.py) - accuracy against the analytic results versus
  the number of walkers (free anisotropic diffusion: RMS error of
  |S(q)|/|S(0)| - E(q) over an HCP-like 3-shell scheme; linear R2 field:
  RMS error of the phase - (-1/2 q^T 2 Delta D g)), the mean reported
  standard error, and error x sqrt(N) (flat when the error falls as
  1/sqrt(N)); speed in walker-steps per second (a curved R2 field that is
  evaluated at every step, few volumes, so the walk dominates) and seconds
  per HCP voxel (288 volumes, 1e5 walkers, affine fields: one step per
  sequence segment is exact).
* ``montecarlo_study_section``: the image-gradient estimators on Monte Carlo
  voxels (``montecarlo.gradient_study``: random white-matter tensors and
  gradient axes, HCP scheme and timing, SNR 50, random background phase):
  exact physics (affine R2, |g| = 20/mm; an STE with an R1 gradient in a 1 s
  mixing time), and the linear proton-density model at |g| = 20, 50, 100/mm.
  Mean and median acute angle per estimator, and the mean's distance from
  chance (57.3 deg) in standard errors of the chance distribution
  (21.6 deg / sqrt(n)).

* ``estimators_section``: the estimators of interfaces/image_gradient.py on
  synthetic blocks of the HCP 288-volume scheme: B voxels per second on a
  65,536-voxel block, extrapolated to an HCP brain mask (1e6 voxels; not run
  on a full 145 x 174 x 145 subject), its ratio to the WLS tensor fit of the
  same block (peer in the same run), peak extra memory, the surrogate null;
  P and C on 8,192 voxels, A on 512.
* ``subject_section``: ``evaluate_subject`` with B and all controls on the
  full HCP grid with a ~1e6-voxel mask but 36 volumes (0.5 GB instead of
  4.2 GB): wall time, voxels per second, peak extra memory beside the input.
* ``sensitivity_section``: median angle of B, A, P and C to the true g on
  voxels from each estimator's own forward model, by |g| (1 and 10 /mm) and
  b0 SNR (30, 300, 3000): where each can see the gradient at all.

Run: ``nice -n 10 .venv/bin/python bench/image_gradient.py [--section NAME]
[--max-walkers N]``.
"""

from __future__ import annotations

import argparse
import time

import nibabel as nib
import numpy as np

from dmriflow.interfaces.sim import montecarlo as mc
from dmriflow.interfaces.sim.phantom import hcp_scheme

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


#: Study cases: (name, sequence, source, |g| 1/mm, voxels, estimators)
STUDY_CASES = (
    ("r2_g20", mc.Sequence.pgse(**HCP_TIMING), "R2", 20.0, 400, ("P", "B", "A")),
    ("ste_r1_g20", mc.Sequence.ste(0.0106, 1.0, 0.060, 0.960), "R1", 20.0, 200, ("P", "B", "A")),
    ("rho_g20", mc.Sequence.pgse(**HCP_TIMING), "rho", 20.0, 200, ("B", "A", "P")),
    ("rho_g50", mc.Sequence.pgse(**HCP_TIMING), "rho", 50.0, 200, ("B", "A", "P")),
    ("rho_g100", mc.Sequence.pgse(**HCP_TIMING), "rho", 100.0, 200, ("B", "A", "P")),
)
#: walkers per study voxel
STUDY_WALKERS = 5000
CHANCE_MEAN_DEG = np.degrees(1.0)
CHANCE_SD_DEG = np.degrees(np.sqrt(np.pi - 3.0))


def montecarlo_study_section(voxel_scale: float = 1.0) -> dict:
    out: dict = {"montecarlo_study_walkers": STUDY_WALKERS, "montecarlo_study_snr": 50.0}
    gtab = hcp_scheme()
    for i, (name, seq, source, g, n, estimators) in enumerate(STUDY_CASES):
        n = max(10, int(n * voxel_scale))
        t0 = time.perf_counter()
        study = mc.gradient_study(n, gtab, seq, source=source, g_norm=g, snr=50.0,
                                  estimators=estimators, n_walkers=STUDY_WALKERS, seed=100 + i)
        out[f"montecarlo_study_{name}_voxels"] = n
        for est in estimators:
            a = study.angles[est]
            a = a[np.isfinite(a)]
            z = (a.mean() - CHANCE_MEAN_DEG) / (CHANCE_SD_DEG / np.sqrt(a.size))
            out[f"montecarlo_study_{name}_{est}_mean_deg"] = f"{a.mean():.1f}"
            out[f"montecarlo_study_{name}_{est}_median_deg"] = f"{np.median(a):.1f}"
            out[f"montecarlo_study_{name}_{est}_z_vs_chance"] = f"{z:.1f}"
        out[f"montecarlo_study_{name}_s"] = f"{time.perf_counter() - t0:.1f}"
    return out


# ----------------------------------------------------------------------------
# Estimators (interfaces/image_gradient.py)
# ----------------------------------------------------------------------------
#: HCP brain masks hold ~0.9-1.2 M voxels of the 145 x 174 x 145 grid
HCP_MASK_VOXELS = 1_000_000


def _estimator_block(n: int, seed: int = 0, snr: float = 25.0):
    """n synthetic voxels on the HCP 288-volume scheme: white/grey-matter-like
    tensors (random orientation), S0 ~ 1000, |g| = 0.05-0.5 /mm, complex
    signal of P's forward model plus complex Gaussian noise (b0 SNR)."""
    from dmriflow.interfaces import image_gradient as ig
    rng = np.random.default_rng(seed)
    gtab = hcp_scheme()
    q = np.linalg.qr(rng.normal(size=(n, 3, 3)))[0]
    ev = np.where(rng.random((n, 1)) < 0.6, [1.7e-3, 0.4e-3, 0.3e-3], [0.9e-3, 0.8e-3, 0.7e-3])
    D = np.einsum("nij,nj,nkj->nik", q, ev, q)
    g = rng.normal(size=(n, 3))
    g *= rng.uniform(0.05, 0.5, (n, 1)) / np.linalg.norm(g, axis=1, keepdims=True)
    s0 = rng.uniform(800, 1200, n)
    S = ig.phase_signal(s0, D, g, gtab, ig.HCP_TIMING)
    S += 1000.0 / snr * (rng.normal(size=S.shape) + 1j * rng.normal(size=S.shape))
    return gtab, S.astype(np.complex64), D, g, s0


def estimators_section(n_block: int = 65536, n_small: int = 8192, n_nonlinear: int = 512) -> dict:
    """Voxels per second of the estimators on synthetic HCP-scheme blocks
    (288 volumes): B on ``n_block`` voxels, extrapolated to an HCP brain mask
    (``HCP_MASK_VOXELS``) - not run on a full 145 x 174 x 145 subject, which
    would take 4.2 GB of this shared machine; P and C on ``n_small``; A on
    ``n_nonlinear``. Peer in the same run: the WLS tensor fit of the same
    block (``dti.TensorModel``), so B's cost reads as a ratio to DTI. Peak
    memory: tracemalloc peak during the call (numpy allocations), beyond the
    input block."""
    import tracemalloc

    from dmriflow.interfaces import dti, parallel
    from dmriflow.interfaces import image_gradient as ig

    out: dict = {}
    gtab, S, D, g, s0 = _estimator_block(n_block)
    mag = np.abs(S).reshape(256, -1, S.shape[-1])
    out["image_gradient_block_voxels"] = n_block
    out["image_gradient_block_volumes"] = S.shape[-1]
    out["image_gradient_threads"] = parallel.available_threads()

    def peak(fn):
        tracemalloc.start()
        fn()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top / 1e6

    model_b = ig.PublishedModel(gtab, ig.HCP_TIMING)
    wall_b, cpu_b, fit_b = _timed(lambda rep: model_b.fit(mag))
    wall_dti, _, _ = _timed(lambda rep: dti.TensorModel(gtab).fit(mag))
    rate_b = n_block / wall_b
    out["image_gradient_B_voxels_per_s"] = f"{rate_b:.0f}"
    out["image_gradient_B_voxels_per_cpu_s"] = f"{n_block / cpu_b:.0f}"
    out["image_gradient_B_hcp_mask_s_extrapolated"] = f"{HCP_MASK_VOXELS / rate_b:.1f}"
    out["image_gradient_dti_voxels_per_s"] = f"{n_block / wall_dti:.0f}"
    out["image_gradient_B_over_dti_time_ratio"] = f"{wall_b / wall_dti:.2f}"
    out["image_gradient_B_peak_extra_MB"] = f"{peak(lambda: model_b.fit(mag)):.0f}"
    out["image_gradient_B_failed_fraction"] = f"{fit_b.n_failed / n_block:.4f}"
    wall_s, _, _ = _timed(lambda rep: model_b.fit_surrogate(mag, None, 40.0,
                                                            np.random.default_rng(rep)))
    out["image_gradient_B_surrogate_voxels_per_s"] = f"{n_block / wall_s:.0f}"

    small = S[:n_small].reshape(64, -1, S.shape[-1])
    model_p = ig.PhaseModel(gtab, ig.HCP_TIMING)
    wall_p, _, fit_p = _timed(lambda rep: model_p.fit(small))
    out["image_gradient_P_voxels_per_s"] = f"{n_small / wall_p:.0f}"
    ang = ig.acute_angle(fit_p.axis.reshape(-1, 3), g[:n_small])
    out["image_gradient_P_median_angle_deg_snr25"] = f"{np.nanmedian(ang):.1f}"

    # C: a second series of the same voxels at a longer diffusion time
    long_t = ig.SequenceTiming(80.0, 10.6, 120.0)
    Ds, Dl = ig.two_time_tensors(D[:n_small], g[:n_small],
                                 [ig.HCP_TIMING.gradient_time, long_t.gradient_time])
    rng = np.random.default_rng(7)
    s1 = ig.rician(ig.tensor_signal(s0[:n_small], Ds, gtab), 40.0, rng)
    s2 = ig.rician(ig.tensor_signal(s0[:n_small], Dl, gtab), 40.0, rng)
    model_c = ig.TwoTimeModel(gtab, ig.HCP_TIMING, gtab, long_t)
    wall_c, _, _ = _timed(lambda rep: model_c.fit(s1.reshape(64, -1, s1.shape[-1]),
                                                  s2.reshape(64, -1, s2.shape[-1])))
    out["image_gradient_C_voxels_per_s"] = f"{n_small / wall_c:.0f}"

    model_a = ig.NonlinearModel(gtab, ig.HCP_TIMING)
    rows_a = mag.reshape(-1, mag.shape[-1])[:n_nonlinear]
    wall_a, _, _ = _timed(lambda rep: model_a.fit(rows_a))
    out["image_gradient_A_voxels"] = n_nonlinear
    out["image_gradient_A_voxels_per_s"] = f"{n_nonlinear / wall_a:.1f}"
    out["image_gradient_A_hcp_mask_h_extrapolated"] = \
        f"{HCP_MASK_VOXELS / (n_nonlinear / wall_a) / 3600:.1f}"
    return out


#: grid and ellipsoidal brain mask of the subject-level run (as bench/memory.py)
HCP_GRID = (145, 174, 145)
MASK_AXES = (0.40, 0.42, 0.40)


def subject_section(n_dirs: int = 10, n_b0: int = 6) -> dict:
    """``evaluate_subject`` with B (gold standard, tensor maps, B, its shuffle
    and surrogate nulls, both fibre controls, strata, rows) on the full HCP
    grid 145 x 174 x 145 with an HCP-size ellipsoidal mask (~1e6 voxels),
    but ``n_b0 + 3 n_dirs`` volumes (36 by default, 0.5 GB) instead of 288
    (4.2 GB; too much for this shared machine). The per-voxel work scales
    with the volume count, the grid-sized maps do not; peak extra memory is
    the tracemalloc peak during the call (numpy allocations) beyond the
    input series, whose size is printed beside it."""
    import tracemalloc

    from dmriflow.interfaces import image_gradient as ig
    from dmriflow.interfaces.io import DWI

    rng = np.random.default_rng(11)
    gtab = hcp_scheme(n_b0=n_b0, n_dirs=n_dirs, jitter=False)
    ijk = np.indices(HCP_GRID, dtype=np.float32)
    centre = (np.asarray(HCP_GRID, np.float32) - 1) / 2
    r2 = sum(((ijk[k] - centre[k]) / (MASK_AXES[k] * HCP_GRID[k])) ** 2 for k in range(3))
    mask = r2 < 1.0
    del ijk, r2
    idx = np.flatnonzero(mask.ravel(order="F"))
    data = np.zeros(HCP_GRID + (len(gtab),), np.float32, order="F")
    flat = data.reshape(-1, len(gtab), order="F")
    affine = np.diag([1.25, 1.25, 1.25, 1.0])
    for s in range(0, idx.size, 65536):
        sel = idx[s:s + 65536]
        xyz = np.stack(np.unravel_index(sel, HCP_GRID, order="F"), axis=1) * 1.25
        s0 = 1000.0 * np.exp(0.3 * np.sin(xyz / 9.0).sum(axis=1))
        q = np.linalg.qr(rng.normal(size=(sel.size, 3, 3)))[0]
        D = np.einsum("nij,j,nkj->nik", q, [1.5e-3, 0.5e-3, 0.4e-3], q)
        flat[sel] = ig.rician(ig.tensor_signal(s0, D, gtab), 40.0, rng)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_zooms((1.25, 1.25, 1.25, 1.0))
    dwi = DWI(data=data, gtab=gtab, mask=mask, affine=affine, header=hdr, paths={})
    tracemalloc.start()
    t0 = time.perf_counter()
    ev = ig.evaluate_subject(dwi, ig.HCP_TIMING, ("B",), subject="bench", rng=0)
    wall = time.perf_counter() - t0
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {"image_gradient_subject_grid": "x".join(map(str, HCP_GRID)),
           "image_gradient_subject_mask_voxels": int(mask.sum()),
           "image_gradient_subject_eval_voxels": int(ev.mask.sum()),
           "image_gradient_subject_volumes": len(gtab),
           "image_gradient_subject_input_MB": f"{data.nbytes / 1e6:.0f}",
           "image_gradient_subject_B_s": f"{wall:.1f}",
           "image_gradient_subject_B_voxels_per_s": f"{ev.mask.sum() / wall:.0f}",
           "image_gradient_subject_B_peak_extra_MB": f"{top / 1e6:.0f}"}
    return out


def sensitivity_section(n_voxels: int = 2000, n_nonlinear: int = 200) -> dict:
    """Median acute angle (deg) between each estimator's axis and the true g
    on voxels generated from that estimator's own forward model (HCP 288-volume
    scheme, white-matter tensors of random orientation, S0 = 1000), by |g|
    (1/mm) and b0 SNR: where each estimator can see the gradient at all
    (chance: 60 deg). B uses its own tensor fit (the published recipe), so its
    first-order term is absorbed; C pairs Delta = 43.1 ms with 80 ms. A runs
    on ``n_nonlinear`` voxels, the others on ``n_voxels``."""
    from dmriflow.interfaces import image_gradient as ig
    rng = np.random.default_rng(21)
    gtab = hcp_scheme()
    t_long = ig.SequenceTiming(80.0, 10.6, 120.0)
    out: dict = {}
    models = {"B": ig.PublishedModel(gtab, ig.HCP_TIMING),
              "A": ig.NonlinearModel(gtab, ig.HCP_TIMING),
              "P": ig.PhaseModel(gtab, ig.HCP_TIMING),
              "C": ig.TwoTimeModel(gtab, ig.HCP_TIMING, gtab, t_long, max_bval=None)}
    for size in (1.0, 10.0):
        for snr in (30.0, 300.0, 3000.0):
            sigma = 1000.0 / snr
            n = n_voxels
            q = np.linalg.qr(rng.normal(size=(n, 3, 3)))[0]
            D = np.einsum("nij,j,nkj->nik", q, [1.7e-3, 0.4e-3, 0.3e-3], q)
            g = rng.normal(size=(n, 3))
            g *= size / np.linalg.norm(g, axis=1, keepdims=True)
            sims = {"B": ig.rician(ig.published_signal(1000.0, D, g, gtab, ig.HCP_TIMING),
                                   sigma, rng),
                    "A": ig.rician(ig.published_signal(1000.0, D[:n_nonlinear], g[:n_nonlinear],
                                                       gtab, ig.HCP_TIMING), sigma, rng)}
            clean = ig.phase_signal(1000.0, D, g, gtab, ig.HCP_TIMING)
            sims["P"] = clean + sigma * (rng.normal(size=clean.shape)
                                         + 1j * rng.normal(size=clean.shape))
            Ds, Dl = ig.two_time_tensors(D, g, [ig.HCP_TIMING.gradient_time,
                                                t_long.gradient_time])
            pair = (ig.rician(ig.tensor_signal(1000.0, Ds, gtab), sigma, rng),
                    ig.rician(ig.tensor_signal(1000.0, Dl, gtab), sigma, rng))
            for name, model in models.items():
                if name == "C":
                    axis = model.fit_rows(*pair)[0]
                    truth = g
                else:
                    axis = model.fit_rows(sims[name])[0]
                    truth = g[:axis.shape[0]]
                med = np.nanmedian(ig.acute_angle(axis, truth))
                out[f"image_gradient_sensitivity_{name}_g{size:g}_snr{snr:g}_median_deg"] = \
                    f"{med:.1f}"
    return out


#: sections in the order they run; another section is a function returning a dict
SECTIONS = {"montecarlo": montecarlo_section, "montecarlo_study": montecarlo_study_section,
            "estimators": estimators_section, "subject": subject_section,
            "sensitivity": sensitivity_section}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--section", choices=sorted(SECTIONS), action="append",
                    help="run only this section (repeatable; default all)")
    ap.add_argument("--max-walkers", type=int, default=max(WALKERS),
                    help="largest walker count of the Monte Carlo accuracy table")
    ap.add_argument("--voxel-scale", type=float, default=1.0,
                    help="scale the voxel counts of the Monte Carlo study")
    args = ap.parse_args(argv)
    options = {"montecarlo": {"max_walkers": args.max_walkers},
               "montecarlo_study": {"voxel_scale": args.voxel_scale}}
    for name in args.section or list(SECTIONS):
        figures = SECTIONS[name](**options.get(name, {}))
        for key, value in figures.items():
            print(f"{key}={value}", flush=True)


if __name__ == "__main__":
    main()
