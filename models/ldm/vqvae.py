"""VQ-VAEs of the RISH maps (MONAI ``VQVAE``): one for 3T, one for 7T.

As published (SCIENCE.md section 4): embedding dimension 32, 256 codes,
loss = L1 reconstruction + the quantiser's commitment loss (the codebook
itself follows an exponential moving average, MONAI's ``EMAQuantizer``).
The 7T autoencoder starts from the 3T weights and is fine-tuned on the scarce
7T data (:func:`init_from`). Two stride-2 stages: a ``G^3`` RISH cube has a
``(G/4)^3 x 32`` latent.

Codebook health: with MONAI's default EMA decay 0.5 and no re-seeding, the
paired model's codebooks collapsed (30 / 49 of 256 codes used). The faithful
model uses :data:`EMA_DECAY` and :class:`DeadCodeReset` (codes unused for
:data:`DEAD_AFTER_STEPS` steps are re-seeded from the batch's encoder
outputs); :func:`code_usage` reports the codes a data set uses.
"""

from __future__ import annotations

import torch
from monai.networks.nets import VQVAE

#: Latent channels and codebook size (as published).
EMBEDDING_DIM = 32
NUM_EMBEDDINGS = 256
#: Feature widths of the two downsampling stages (ours: small, for CPU).
DEFAULT_WIDTHS = (16, 32)
#: Spatial downsampling of the latent (two stride-2 stages).
DOWNSAMPLE = 4
#: EMA decay of the codebook: 0.99 averages a code over ~100 steps (the usual
#: VQ-VAE value); the paired model was trained with MONAI's default 0.5
#: (a code follows its last two batches), kept for its checkpoint.
EMA_DECAY = 0.99
PAIRED_EMA_DECAY = 0.5
#: A code no encoder output picked for this many training steps is re-seeded.
DEAD_AFTER_STEPS = 20


def build_vqvae(in_channels: int = 3, widths=DEFAULT_WIDTHS, res_layers: int = 1,
                embedding_dim: int = EMBEDDING_DIM,
                num_embeddings: int = NUM_EMBEDDINGS, decay: float = EMA_DECAY) -> VQVAE:
    """A 3D VQ-VAE with ``len(widths)`` stride-2 stages (kernel 4, padding 1) and an
    EMA codebook of ``decay``."""
    n = len(widths)
    return VQVAE(spatial_dims=3, in_channels=in_channels, out_channels=in_channels,
                 channels=tuple(widths), num_res_layers=res_layers,
                 num_res_channels=tuple(widths),
                 downsample_parameters=((2, 4, 1, 1),) * n,
                 upsample_parameters=((2, 4, 1, 1, 0),) * n,
                 num_embeddings=num_embeddings, embedding_dim=embedding_dim, decay=decay)


class DeadCodeReset:
    """Re-seeds the codes no encoder output picked for ``dead_after`` steps.

    A dead code is moved onto a randomly chosen encoder output of the current
    batch (its EMA statistics restarted as one vector's), so that it competes
    again: the standard remedy for codebook collapse (e.g. Dhariwal et al.
    2020, Jukebox). Keeps its per-code idle counters (not part of the model)
    on the codebook's device, so a step moves nothing to the host but the
    number of dead codes (which sizes the draw). The draw itself is made on
    the CPU generator (seeded per step by ``train``): the same batch positions
    are picked whatever the device.
    """

    def __init__(self, num_embeddings: int = NUM_EMBEDDINGS,
                 dead_after: int = DEAD_AFTER_STEPS):
        self.idle = torch.zeros(num_embeddings, dtype=torch.long)
        self.dead_after = int(dead_after)
        self.resets = 0

    @torch.no_grad()
    def __call__(self, vq: VQVAE, z_e: torch.Tensor, indices: torch.Tensor) -> int:
        """Update the counters with this step's ``indices``; re-seed dead codes
        from ``z_e`` (B, D, ...); return how many were re-seeded."""
        q = vq.quantizer.quantizer
        self.idle = self.idle.to(q.ema_w.device)
        used = torch.zeros_like(self.idle, dtype=torch.bool)
        used[indices.reshape(-1).to(used.device)] = True
        self.idle = torch.where(used, torch.zeros_like(self.idle), self.idle + 1)
        dead = torch.nonzero(self.idle >= self.dead_after).reshape(-1)
        if dead.numel() == 0:
            return 0
        flat = z_e.movedim(1, -1).reshape(-1, z_e.shape[1])
        draw = torch.randint(0, flat.shape[0], (dead.numel(),)).to(flat.device)
        pick = flat[draw].to(q.ema_w.dtype)
        q.embedding.weight.data[dead] = pick
        q.ema_w.data[dead] = pick
        q.ema_cluster_size.data[dead] = 1.0
        self.idle[dead] = 0
        self.resets += int(dead.numel())
        return int(dead.numel())


def vqvae_loss(vq: VQVAE, x: torch.Tensor, reset: DeadCodeReset | None = None) -> torch.Tensor:
    """L1 reconstruction + quantisation (commitment) loss of a batch; with
    ``reset``, dead codes are re-seeded after the step's EMA update."""
    if reset is None:
        recon, q_loss = vq(x)
        return torch.nn.functional.l1_loss(recon, x) + q_loss
    z_e = vq.encode(x)
    quantized, q_loss, indices = vq.quantizer.quantizer(z_e)
    recon = vq.decode(quantized)
    reset(vq, z_e.detach(), indices)
    return torch.nn.functional.l1_loss(recon, x) + q_loss


@torch.no_grad()
def code_usage(vq: VQVAE, images, batch: int = 8) -> dict:
    """Codes the quantised latents of ``images`` (N, C, ...) use: the count of
    distinct codes and the perplexity ``exp(entropy)`` of their histogram
    (= the count when every used code is equally frequent). The histogram is
    accumulated on the model's device; on the "meta" device (shape-only dry
    runs, the device tests) it has no values and both figures are NaN."""
    was_training = vq.training
    vq.eval()     # an EMA quantiser in training mode would update its codebook
    try:
        dev = next(vq.parameters()).device
        counts = torch.zeros(vq.quantizer.quantizer.num_embeddings, dtype=torch.float64,
                             device=dev)
        for i in range(0, images.shape[0], batch):
            idx = vq.index_quantize(images[i:i + batch].to(dev)).reshape(-1)
            counts.index_add_(0, idx, torch.ones(idx.shape, dtype=counts.dtype, device=dev))
    finally:
        vq.train(was_training)
    if dev.type == "meta":
        return {"codes_used": float("nan"), "num_embeddings": int(counts.numel()),
                "perplexity": float("nan")}
    counts = counts.cpu()
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"codes_used": int((counts > 0).sum()), "num_embeddings": int(counts.numel()),
            "perplexity": float(torch.exp(-(nz * nz.log()).sum()))}


def encode(vq: VQVAE, x: torch.Tensor) -> torch.Tensor:
    """Quantised latent ``(B, EMBEDDING_DIM, G/4, G/4, G/4)``."""
    return vq.encode_stage_2_inputs(x)


def decode(vq: VQVAE, z: torch.Tensor) -> torch.Tensor:
    """RISH-channel image from a (continuous) latent: quantise, then decode."""
    return vq.decode_stage_2_outputs(z)


def init_from(target: VQVAE, source: VQVAE) -> VQVAE:
    """Copy ``source``'s weights and codebook state into ``target`` (transfer learning)."""
    target.load_state_dict(source.state_dict())
    return target
