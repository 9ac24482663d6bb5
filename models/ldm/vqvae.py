"""VQ-VAEs of the RISH maps (MONAI ``VQVAE``): one for 3T, one for 7T.

As published (SCIENCE.md section 4): embedding dimension 32, 256 codes,
loss = L1 reconstruction + the quantiser's commitment loss (the codebook
itself follows an exponential moving average, MONAI's ``EMAQuantizer``).
The 7T autoencoder starts from the 3T weights and is fine-tuned on the scarce
7T data (:func:`init_from`). Two stride-2 stages: a ``G^3`` RISH cube has a
``(G/4)^3 x 32`` latent.
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


def build_vqvae(in_channels: int = 3, widths=DEFAULT_WIDTHS, res_layers: int = 1,
                embedding_dim: int = EMBEDDING_DIM,
                num_embeddings: int = NUM_EMBEDDINGS) -> VQVAE:
    """A 3D VQ-VAE with ``len(widths)`` stride-2 stages (kernel 4, padding 1)."""
    n = len(widths)
    return VQVAE(spatial_dims=3, in_channels=in_channels, out_channels=in_channels,
                 channels=tuple(widths), num_res_layers=res_layers,
                 num_res_channels=tuple(widths),
                 downsample_parameters=((2, 4, 1, 1),) * n,
                 upsample_parameters=((2, 4, 1, 1, 0),) * n,
                 num_embeddings=num_embeddings, embedding_dim=embedding_dim)


def vqvae_loss(vq: VQVAE, x: torch.Tensor) -> torch.Tensor:
    """L1 reconstruction + quantisation (commitment) loss of a batch."""
    recon, q_loss = vq(x)
    return torch.nn.functional.l1_loss(recon, x) + q_loss


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
