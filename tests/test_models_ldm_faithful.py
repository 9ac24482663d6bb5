"""The faithful 3T->7T latent DDPM: codebook health, DDIM inversion, the label's effect.

Tiny synthetic data (no phantom), one torch thread: a few seconds each.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("monai")  # noqa: E402 - the model family's declared dependency

from dmriflow.models import card as cards
from dmriflow.models.ldm import diffusion, faithful, vqvae

torch.set_num_threads(1)   # oversubscribed shared cores: one thread is much faster

FLOAT32_EPS = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------
# Codebook health
# ----------------------------------------------------------------------------
#: Tiny codebook test: 64 codes of dimension 16 on a one-stage VQ-VAE.
TINY_CODES, TINY_DIM = 64, 16


def _blobs(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """``n`` images of 3 channels: Gaussian blobs of random centre, width, height."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.linspace(-1, 1, size)
    grid = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"))
    out = []
    for _ in range(n):
        c = torch.rand(3, 3, 1, 1, 1, generator=g) * 1.4 - 0.7
        w = 0.15 + 0.5 * torch.rand(3, 1, 1, 1, generator=g)
        h = 0.2 + torch.rand(3, 1, 1, 1, generator=g)
        out.append(h * torch.exp(-((grid[None] - c) ** 2).sum(1) / (2 * w ** 2)))
    return torch.stack(out)


def _train_tiny_vqvae(reset: bool, decay: float, steps: int = 60) -> dict:
    torch.manual_seed(0)
    vq = vqvae.build_vqvae(3, (8,), embedding_dim=TINY_DIM, num_embeddings=TINY_CODES,
                           decay=decay)
    x = _blobs(16)
    keeper = vqvae.DeadCodeReset(TINY_CODES, dead_after=5) if reset else None
    opt = torch.optim.Adam(vq.parameters(), 3e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        loss = vqvae.vqvae_loss(vq, x[rng.choice(16, 4, replace=False)], keeper)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vqvae.code_usage(vq, x)


def test_dead_code_reset_keeps_the_codebook_alive():
    """Without re-seeding, codes that no encoder output picks stay dead (MONAI's
    random codebook lies away from the encoder outputs): a minority of the 64
    codes is used. With the reset every code dead for 5 steps moves onto an
    encoder output, so most of the codebook is in use at the end."""
    healthy = _train_tiny_vqvae(reset=True, decay=vqvae.EMA_DECAY)
    collapsed = _train_tiny_vqvae(reset=False, decay=vqvae.EMA_DECAY)
    legacy = _train_tiny_vqvae(reset=False, decay=vqvae.PAIRED_EMA_DECAY)
    bound = TINY_CODES // 2
    assert healthy["codes_used"] > bound, healthy
    assert collapsed["codes_used"] < bound, collapsed
    assert legacy["codes_used"] < bound, legacy
    assert healthy["perplexity"] > collapsed["perplexity"]


def test_code_usage_counts_and_perplexity_and_leaves_the_codebook_alone():
    torch.manual_seed(0)
    vq = vqvae.build_vqvae(3, (8,), embedding_dim=TINY_DIM, num_embeddings=TINY_CODES)
    vq.train()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    x = _blobs(4)
    usage = vqvae.code_usage(vq, x)
    after = vq.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and vq.training
    idx = vq.eval().index_quantize(x).reshape(-1)
    counts = torch.bincount(idx, minlength=TINY_CODES).double()
    p = counts[counts > 0] / counts.sum()
    assert usage["codes_used"] == int((counts > 0).sum())
    assert usage["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-9)
    assert 1.0 <= usage["perplexity"] <= usage["codes_used"]


# ----------------------------------------------------------------------------
# DDIM inversion
# ----------------------------------------------------------------------------
def test_ddim_inversion_round_trip_is_exact_for_an_x_independent_noise_prediction():
    """With eps(x, t) = e (fixed), one DDIM step is an affine map of x with
    coefficient sqrt(a'/a) and the inversion step is its exact inverse when it
    uses the same pair of alphas: the round trip returns z0 up to float32
    rounding. Bound: each of the 2N steps rounds values of size |z0| + |e| to
    a relative FLOAT32_EPS, and an error made at alpha_t reaches the clean end
    multiplied by sqrt(1 / alpha_t) <= 1 / sqrt(alpha_T). An alpha grid
    shifted by one step misses by far more."""
    torch.manual_seed(0)
    z0 = torch.randn(2, 4, 4, 4, 4)
    e = torch.randn(2, 4, 4, 4, 4)
    steps = 20
    sched = faithful.ddim_scheduler(steps)
    def eps_fn(x, t):
        return e
    x_t = faithful.ddim_invert(eps_fn, z0, sched)
    back = faithful.ddim_sample(eps_fn, x_t, sched)
    alpha_t = float(sched.alphas_cumprod[int(sched.timesteps[0])])
    scale = float((z0.abs() + e.abs()).max())
    tol = 2 * steps * FLOAT32_EPS * scale / np.sqrt(alpha_t)
    err = float((back - z0).abs().max())
    assert err < tol, (err, tol)
    # x_T is (almost) the noise: the latent was inverted all the way up
    assert float(torch.corrcoef(torch.stack([x_t.flatten(), e.flatten()]))[0, 1]) > 0.99
    # the same round trip with the inversion's alphas one step off
    step, top = sched.num_train_timesteps // steps, int(sched.timesteps[0])
    x = z0
    for t in faithful.inversion_timesteps(sched):
        x, _ = sched.reversed_step(e, min(t + step, top - step), x)
    wrong = float((faithful.ddim_sample(eps_fn, x, sched) - z0).abs().max())
    assert wrong > 1000 * tol


def test_sampling_grid_ends_on_the_clean_latent():
    sched = faithful.ddim_scheduler(10)
    inv = faithful.inversion_timesteps(sched)
    assert inv[0] == 0 and inv == sorted(inv) and len(inv) == 9
    assert [int(t) for t in sched.timesteps[:-1]] == [t + 100 for t in inv[::-1]]
    assert int(sched.timesteps[0]) == 900
    z = torch.randn(1, 2, 2, 2, 2)
    out, _ = sched.step(torch.randn_like(z), 0, z)      # the last step is the identity
    assert torch.allclose(out, z, atol=10 * FLOAT32_EPS)


# ----------------------------------------------------------------------------
# The class-conditioned denoiser: the label must change the translation
# ----------------------------------------------------------------------------
def _toy_latents(n, mean, seed):
    g = torch.Generator().manual_seed(seed)
    return mean + 0.3 * torch.randn(n, 4, 4, 4, 4, generator=g)


@pytest.fixture(scope="module")
def toy_denoiser():
    """A tiny denoiser trained on 3T latents around -1 and 7T latents around +1."""
    torch.manual_seed(0)
    den = faithful.ClassConditionedDenoiser(4, (8, 8), norm_groups=4)
    z = torch.cat([_toy_latents(64, -1.0, 0), _toy_latents(64, 1.0, 1)])
    labels = torch.tensor([diffusion.LABEL_3T] * 64 + [diffusion.LABEL_7T] * 64)
    sched = diffusion.train_scheduler()
    opt = torch.optim.Adam(den.parameters(), 3e-3)
    rng = np.random.default_rng(0)
    for i in range(300):
        idx = rng.choice(128, 16, replace=False)
        loss = faithful.class_diffusion_loss(den, z[idx], labels[idx], sched,
                                             torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return den.eval()


def test_translation_moves_3t_latents_to_the_7t_distribution(toy_denoiser):
    """Inverting a held-out 3T latent under the 3T label and sampling under 7T
    lands closer to the 7T mean (+1) than to the 3T one (-1) after 300 toy
    steps; under 3T again it comes back to the 3T latent. A denoiser that
    ignored its label would return the 3T latent both times."""
    z3 = _toy_latents(4, -1.0, 99)
    to7 = faithful.translate(toy_denoiser, z3, guidance=0.0, steps=20)
    back = faithful.translate(toy_denoiser, z3, target=diffusion.LABEL_3T, guidance=0.0,
                              steps=20)
    assert float(to7.mean()) > 0.0, float(to7.mean())
    assert float((back - z3).abs().mean()) < 0.1 * float((to7 - z3).abs().mean())
    # the per-voxel deviation from the mean is carried through x_T (anatomy kept)
    d3, d7 = (z3 - z3.mean()).flatten(), (to7 - to7.mean()).flatten()
    assert float(torch.corrcoef(torch.stack([d3, d7]))[0, 1]) > 0.5
    # the label embedding has effect: eps(7T) and eps(3T) differ by > 3 % (the
    # paired model's cross-attention label: 0.02 %)
    x = torch.randn(4, 4, 4, 4, 4)
    t = torch.full((4,), 500)
    with torch.no_grad():
        e3 = toy_denoiser(x, t, torch.full((4,), diffusion.LABEL_3T))
        e7 = toy_denoiser(x, t, torch.full((4,), diffusion.LABEL_7T))
    assert float((e7 - e3).norm() / e3.norm()) > 0.03


# ----------------------------------------------------------------------------
# The checkpointable model
# ----------------------------------------------------------------------------
def _maps(n, grid, seed):
    g = np.random.default_rng(seed)
    x = _blobs(n, grid, seed).numpy().transpose(0, 2, 3, 4, 1)
    rish = (x * np.array([1.0, 0.3, 0.05]) + 0.01 * g.random(x.shape)).astype(np.float32)
    return rish, (x[..., 0] > 0.02)


def test_fit_predict_and_checkpoint_round_trip(tmp_path):
    grid = 16
    r3, m3 = _maps(3, grid, 0)
    r7, m7 = _maps(2, grid, 1)
    model = faithful.FaithfulLatentDiffusion3T7T(grid=grid, vq_widths=(8, 16),
                                                 unet_channels=(16, 16))
    report = faithful.fit(model, [(r3[2], m3[2])], [(r3[i], r7[i], m3[i] | m7[i])
                                                    for i in range(2)],
                          faithful.FaithfulBudget(vq_steps=4, diffusion_steps=4, vq_batch=2,
                                                  diffusion_batch=4))
    assert set(report["codes_used"]) == {"3T", "7T"}
    assert 1 <= report["codes_used"]["3T"]["codes_used"] <= vqvae.NUM_EMBEDDINGS
    pred, recon = model.predict(r3[0], m3[0], steps=3)
    assert pred.shape == recon.shape == r3[0].shape
    assert np.all(pred[~m3[0]] == 0) and np.all(pred >= 0)
    lam = model.lambdas(r3[0], m3[0], np.eye(4), steps=3)
    assert set(lam) == {"replaced", "rescaled"} and lam["rescaled"].shape == r3[0].shape
    kwargs = dict(grid=grid, vq_widths=[8, 16], unet_channels=[16, 16])
    card = cards.ModelCard(name="t", version="0", architecture="ldm-faithful-3t7t",
                           kwargs=kwargs,
                           acquisition=cards.Acquisition(shells=[1000.0], field_strength_t=3.0))
    cards.save_checkpoint(model, card, tmp_path / "ckpt")
    loaded, _ = cards.load_checkpoint(tmp_path / "ckpt", device="cpu")
    again, _ = loaded.predict(r3[0], m3[0], steps=3)
    np.testing.assert_array_equal(again, pred)
    with pytest.raises(ValueError, match="multiple"):
        faithful.FaithfulLatentDiffusion3T7T(grid=24)
