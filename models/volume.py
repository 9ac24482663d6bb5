"""A fully convolutional network over a whole volume, in slabs (batched, device-aware).

:func:`run_volume` runs the network over slabs along the last axis, each with
``halo`` voxels of context on both sides, so memory stays bounded and the
result equals one pass over the whole volume. Device: CUDA when available,
else the CPU; bf16 autocast on CUDA only, so CPU results are deterministic.
Served inference (:mod:`dmriflow.interfaces.inference`) and the networks'
own prediction helpers share it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from dmriflow.models.card import select_device
from dmriflow.models.train import torch_threads

#: Slab thickness (voxels along the last axis) per forward pass, excluding the halo.
SLAB = 32
#: torch threads for CPU inference: pipeline nodes already run in parallel
#: workers, and an oversubscribed pool is many times slower (models.train).
CPU_THREADS = 1


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_volume(model: torch.nn.Module, volume: np.ndarray, halo: int, slab: int = SLAB,
               device=None, threads: int = CPU_THREADS) -> np.ndarray:
    """``model`` applied to ``volume`` (C, X, Y, Z); output (C', X, Y, Z) float32.

    Slabs of ``slab`` voxels along Z are run with up to ``halo`` voxels of
    neighbours on each side (none beyond the volume, where the network pads
    as in a whole-volume pass), so with ``halo`` >= the network's receptive
    radius each output voxel equals that of a single whole-volume pass.
    ``threads``: torch threads on the CPU (see :data:`CPU_THREADS`).
    """
    device = select_device(device)
    model = model.to(device).eval()
    n_z = volume.shape[-1]
    out = None
    threads_ctx = torch_threads(threads) if device.type == "cpu" else contextlib.nullcontext()
    with torch.no_grad(), _autocast(device), threads_ctx:
        for z0 in range(0, n_z, slab):
            z1 = min(z0 + slab, n_z)
            lo, hi = max(z0 - halo, 0), min(z1 + halo, n_z)
            chunk = np.ascontiguousarray(volume[..., lo:hi], dtype=np.float32)
            res = model(torch.from_numpy(chunk)[None].to(device))[0].float().cpu().numpy()
            if out is None:
                out = np.zeros(res.shape[:-1] + (n_z,), dtype=np.float32)
            out[..., z0:z1] = res[..., z0 - lo:z1 - lo]
    return out
