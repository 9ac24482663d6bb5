"""Benchmark: direction synthesis on one subject, network vs the classical baselines.

A phantom subject (6 b0 + 90 b=1000 directions, 2.5 mm; 30 inputs, 60
targets) of a given grid; timed in one run on the CPU:

* the shipped network (``models/checkpoints/directions``): features (tensor
  fit + SH projection) and the slab-wise network pass (``run_volume``, one
  and two torch threads),
* the peers: DTI prediction and order-4 SH interpolation of the same targets,

with their held-out errors against the noise-free signal, and the peak RSS of
the process. GPU throughput is not measured (no GPU on the project machine).

Run: ``.venv/bin/python bench/inference.py [--shape X Y Z]``. Ends with one
line of key=value figures.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    from dmriflow.interfaces.inference import default_checkpoint
    from dmriflow.models import data as md
    from dmriflow.models import directions as dm
    from dmriflow.models.card import load_checkpoint
    from dmriflow.models.volume import run_volume

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[72, 88, 72])
    args = parser.parse_args()
    sample, t_sim = _timed(lambda: md.phantom_samples(1, seed=9200, shape=tuple(args.shape))[0])
    net, card = load_checkpoint(default_checkpoint("directions"), device="cpu")
    voxels = int(sample.mask.sum())

    feats, t_feat = _timed(lambda: dm.sh_features(sample))
    _, t_net1 = _timed(lambda: run_volume(net, feats, halo=net.halo, device="cpu", threads=1))
    _, t_net2 = _timed(lambda: run_volume(net, feats, halo=net.halo, device="cpu", threads=2))
    pred, t_full = _timed(lambda: dm.predict_network(net, sample, device="cpu"))
    dti, t_dti = _timed(lambda: dm.dti_prediction(sample))
    sh4, t_sh = _timed(lambda: dm.sh_interpolation(sample, 4))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def err(p):
        return float(np.sqrt(np.mean((p - sample.clean_targets)[sample.mask] ** 2)))
    rows = [("network (features + pass, 1 thread)", t_full, err(pred)),
            ("DTI prediction", t_dti, err(dti)), ("SH interpolation (order 4)", t_sh, err(sh4))]
    print(f"grid {tuple(args.shape)}, {voxels} mask voxels, 30 inputs -> 60 targets "
          f"(phantom simulated in {t_sim:.1f} s); CPU only, GPU not measured")
    print(f"{'method':<40}{'seconds':>10}{'rmse_clean':>12}")
    for name, sec, e in rows:
        print(f"{name:<40}{sec:>10.2f}{e:>12.4f}")
    print(f"network parts: features {t_feat:.2f} s; network pass over the whole grid "
          f"{t_net1:.2f} s (1 thread), {t_net2:.2f} s (2 threads); peak RSS {peak_gb:.2f} GB")
    print(f"voxels={voxels} network_s={t_full:.3f} features_s={t_feat:.3f} "
          f"pass_1thread_s={t_net1:.3f} pass_2threads_s={t_net2:.3f} dti_s={t_dti:.3f} "
          f"sh4_s={t_sh:.3f} network_vs_dti_time={t_full / t_dti:.2f} "
          f"rmse_network={err(pred):.4f} rmse_dti={err(dti):.4f} rmse_sh4={err(sh4):.4f} "
          f"peak_rss_gb={peak_gb:.2f}")


if __name__ == "__main__":
    main()
