"""``--inference 3t7t`` with the shipped RISH-space diffusion checkpoint on the CPU.

One simulated 3T subject (``degrade.simulate_pair(1, family="test")``, the
27x32x27x96 phantom of the latent model's bench row) through
:func:`dmriflow.interfaces.inference.run_inference` with the default
checkpoint: card checks, the CNN ensemble's disagreement guard, the cube's
features, K samples of the diffusion model, the lambda maps applied on the
subject grid, FA. Prints the whole call (``seconds_per_subject``), its
``model_and_apply`` part (the row's ``inference_seconds``: the cube's
features, the model, the SH rescaled, FA; the rest is loading, card checks
and the ensemble guard) and the process's peak resident memory;
``--checkpoint`` times another one (e.g. the latent model's). Quote with the
load average.

Usage: nice -n 10 python bench/inference_3t7t.py [--checkpoint DIR] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from dmriflow.interfaces.inference import THREE_T_TO_7T, run_inference
from dmriflow.models import degrade


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    p = degrade.simulate_pair(1, family="test")
    dwi = p.dwi_3t("sub-1_dwi.nii.gz")
    for _ in range(a.repeats):
        t = time.perf_counter()
        out, card = run_inference(THREE_T_TO_7T, a.checkpoint, dwi, dwi.paths["dwi"],
                                  census={"field_strength_t": 3.0})
        total = time.perf_counter() - t
        info = out.parameters
        print(f"inference=kind_3t7t model={card.name} samples={info.get('samples', '-')} "
              f"subject_shape={'x'.join(map(str, p.dwi3.shape))} seconds_per_subject="
              f"{total:.2f} model_and_apply={out.row['inference_seconds']:.2f} "
              f"peak_rss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} "
              f"load1={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
