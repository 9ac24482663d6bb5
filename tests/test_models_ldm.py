"""3T->7T latent diffusion: degradation, features, metrics, baselines, networks, checkpoints.

Small grids (16^3 networks, phantom pairs of 16-20 voxels) so the file runs
in well under a minute on the CPU.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")  # noqa: E402 - the model family's declared dependency

from dmriflow.interfaces import harmonize, sh
from dmriflow.interfaces.sim import phantom
from dmriflow.models import card as cards
from dmriflow.models import degrade as dg
from dmriflow.models.experiments import ldm_metrics
from dmriflow.models.ldm import baselines, diffusion, features, sr, vqvae
from dmriflow.models.ldm.model import Budget, LatentDiffusion3T7T, fit

torch.set_num_threads(1)   # oversubscribed shared cores: one thread is much faster


# ----------------------------------------------------------------------------
# Degradation
# ----------------------------------------------------------------------------
def _no_degradation(**kw):
    base = dict(psf="none", resolution=1.0, snr=math.inf, bias_model="none", bias=0.0)
    return dg.Degradation(**{**base, **kw})


def test_kspace_truncation_keeps_exactly_the_central_band():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((20, 24, 16)).astype(np.float32)
    out = dg.kspace_truncate(v, 2.0)
    fin, fout = np.fft.fftn(v), np.fft.fftn(out)
    keep = [np.abs(np.fft.fftfreq(n)) <= 0.25 for n in v.shape]
    band = keep[0][:, None, None] & keep[1][None, :, None] & keep[2][None, None, :]
    assert np.allclose(fout[band], fin[band], atol=1e-3)
    assert np.abs(fout[~band]).max() < 1e-3 * np.abs(fin[~band]).max()


def _cosine_gain(k: int, factor: float, taper: float, n: int = 64) -> float:
    """Amplitude gain of the k-space PSF on a cosine of ``k`` cycles over ``n``
    voxels along axis 0 (constant along the others)."""
    x = np.arange(n)
    v = np.broadcast_to(np.cos(2 * np.pi * k * x / n)[:, None, None], (n, 4, 4)).astype(np.float32)
    out = dg.kspace_truncate(v, factor, taper)
    return float(np.sum(out * v) / np.sum(v * v))


@pytest.mark.parametrize("taper, edge", [(0.5, 8), (0.75, 4), (1.0, 0)])
def test_apodised_kspace_psf_has_the_tukey_transfer_function(taper, edge):
    """n = 64, factor 2: the band ends at fc = 16 cycles; a Tukey fraction a
    keeps bins <= (1 - a) 16 = ``edge`` at gain 1 and falls as cos^2 to 0 at
    16 - values derived by hand: 1/2 halfway, cos^2(pi/8) a quarter and
    sin^2(pi/8) three quarters into the taper, 0 at and beyond fc."""
    width = 16 - edge
    assert _cosine_gain(edge, 2.0, taper) == pytest.approx(1.0, abs=1e-5)
    assert _cosine_gain(edge + width // 4, 2.0, taper) == pytest.approx(
        math.cos(math.pi / 8) ** 2, abs=1e-5)
    assert _cosine_gain(edge + width // 2, 2.0, taper) == pytest.approx(0.5, abs=1e-5)
    assert _cosine_gain(edge + 3 * width // 4, 2.0, taper) == pytest.approx(
        math.sin(math.pi / 8) ** 2, abs=1e-5)
    for k in (16, 20, 31):
        assert abs(_cosine_gain(k, 2.0, taper)) < 1e-5
    # the rectangular window (the test family's) keeps the whole band at gain 1
    assert _cosine_gain(edge + width // 2, 2.0, 0.0) == pytest.approx(1.0, abs=1e-5)
    # separable in 3D: the filter of a random volume is the product of the axes'
    v = np.random.default_rng(3).standard_normal((20, 24, 16)).astype(np.float32)
    w = [dg.kspace_window(n, 1.6, taper) for n in v.shape]
    expected = np.fft.fftn(v) * (w[0][:, None, None] * w[1][None, :, None] * w[2][None, None, :])
    np.testing.assert_allclose(np.fft.fftn(dg.kspace_truncate(v, 1.6, taper)), expected,
                               atol=1e-3)
    # a reconstruction filter applies at the native resolution too; a constant passes
    assert _cosine_gain(24, 1.0, taper) < 0.99 and _cosine_gain(24, 1.0, 0.0) == 1.0
    assert _cosine_gain(24, 0.8, taper) == pytest.approx(_cosine_gain(24, 1.0, taper), abs=1e-6)
    const = np.full((12, 10, 8), 2.5, np.float32)
    np.testing.assert_allclose(dg.kspace_truncate(const, 1.7, taper), const, rtol=1e-5)


def test_mixed_training_family_draws_the_psf_per_pair_and_never_the_held_out_ones():
    """``train-mixed``: Gaussian or apodised k-space per pair, Tukey fraction
    inside KSPACE_TAPER, never the test family's rectangular truncation or the
    calibration family's box; a seed keeps the train family's other draws."""
    fam = dg.FAMILIES["train-mixed"]
    assert not {dg.FAMILIES["test"]["psf"], dg.FAMILIES["calib"]["psf"]} & set(fam["psf"])
    assert fam["taper"][0] > 0
    draws, same = [], []
    for seed in range(200):
        rng = lambda: np.random.default_rng(np.random.SeedSequence([seed, dg.PAIR_SEED_TAG]))
        d, t = dg.sample_degradation("train-mixed", rng()), dg.sample_degradation("train", rng())
        draws.append(d)
        same.append(_same_draws_but_psf(d, t))
    assert all(same)
    assert {d.psf for d in draws} == set(fam["psf"])
    tapers = [d.taper for d in draws if d.psf == dg.APODISED]
    assert fam["taper"][0] <= min(tapers) and max(tapers) <= fam["taper"][1]
    assert all(d.taper == 0 for d in draws if d.psf != dg.APODISED)
    with pytest.raises(ValueError, match="taper"):
        dg.Degradation(psf=dg.APODISED, taper=0.0)
    with pytest.raises(ValueError, match="taper"):
        dg.Degradation(psf="kspace", taper=0.5)
    # without noise, bias and motion the 3T member is the apodised noise-free series
    plain = dg.simulate_pair(11, sim_size=16, degradation=_no_degradation())
    apod = dg.simulate_pair(11, sim_size=16, degradation=_no_degradation(
        psf=dg.APODISED, resolution=1.5, taper=0.7))
    np.testing.assert_allclose(apod.dwi3, np.maximum(dg.kspace_truncate(plain.dwi3, 1.5, 0.7), 0),
                               rtol=1e-5, atol=1e-5)


def _same_draws_but_psf(mixed, train) -> bool:
    """Every draw of ``mixed`` but the PSF (and its taper) equals ``train``'s."""
    skip = {"family", "psf", "taper"}
    return all(getattr(mixed, f) == getattr(train, f) for f in mixed.__dataclass_fields__
               if f not in skip)


def test_blur_decimate_removes_fine_detail_and_keeps_coarse():
    x = np.arange(32, dtype=np.float32)
    vol = lambda period: np.broadcast_to(np.sin(2 * np.pi * x / period)[:, None, None],
                                         (32, 8, 8)).copy()
    fine, coarse = vol(2.5), vol(16.0)
    inner = slice(4, 28)
    assert np.std(dg.blur_decimate(fine, 1.8)[inner]) < 0.3 * np.std(fine[inner])
    kept = dg.blur_decimate(coarse, 1.8)[inner]
    assert np.corrcoef(kept.ravel(), coarse[inner].ravel())[0, 1] > 0.99
    assert 0.8 < np.std(kept) / np.std(coarse[inner]) <= 1.0
    assert np.array_equal(dg.blur_decimate(coarse, 1.0), coarse)


def test_box_psf_is_a_block_average_unlike_the_other_families_psfs():
    """The calibration family's PSF: the box taps are the voxels' overlaps with
    the wider voxel; a constant is kept, fine detail removed, coarse detail
    kept; it is neither the Gaussian nor the k-space PSF of the same width."""
    np.testing.assert_allclose(dg.box_kernel(1.5), [1 / 6, 2 / 3, 1 / 6], rtol=1e-12)
    np.testing.assert_allclose(dg.box_kernel(2.0), [0.25, 0.5, 0.25], rtol=1e-12)
    np.testing.assert_allclose(dg.box_kernel(3.0), [1 / 3] * 3, rtol=1e-12)
    assert np.array_equal(dg.box_kernel(1.0), [1.0])
    x = np.arange(32, dtype=np.float32)
    vol = lambda period: np.broadcast_to(np.sin(2 * np.pi * x / period)[:, None, None],
                                         (32, 8, 8)).copy()
    fine, coarse, inner = vol(2.5), vol(16.0), slice(4, 28)
    assert np.std(dg.box_decimate(fine, 1.8)[inner]) < 0.3 * np.std(fine[inner])
    kept = dg.box_decimate(coarse, 1.8)[inner]
    assert np.corrcoef(kept.ravel(), coarse[inner].ravel())[0, 1] > 0.99
    const = np.full((12, 10, 8), 3.5, np.float32)
    np.testing.assert_allclose(dg.box_decimate(const, 1.6), const, rtol=1e-6)
    v = np.random.default_rng(2).standard_normal((16, 16, 16)).astype(np.float32)
    box = dg.box_decimate(v, 1.6)
    for other in (dg.blur_decimate(v, 1.6), dg.kspace_truncate(v, 1.6)):
        assert np.abs(box - other).mean() > 0.1 * np.abs(box).mean()


def test_calibration_family_has_its_own_psf_and_simulates_with_it():
    rng = np.random.default_rng(4)
    fam = dg.FAMILIES["calib"]
    assert fam["psf"] not in {dg.FAMILIES["train"]["psf"], dg.FAMILIES["test"]["psf"]}
    draws = [dg.sample_degradation("calib", rng) for _ in range(50)]
    assert {d.psf for d in draws} == {"box"} and {d.family for d in draws} == {"calib"}
    assert all(fam["snr"][0] <= d.snr <= fam["snr"][1] for d in draws)
    p = dg.simulate_pair(11, sim_size=16, family="calib")
    assert p.degradation.psf == "box" and np.isfinite(p.dwi3).all()
    # without noise, bias and motion the 3T member is the box-blurred noise-free series
    plain = dg.simulate_pair(11, sim_size=16, degradation=_no_degradation())
    boxed = dg.simulate_pair(11, sim_size=16, degradation=_no_degradation(psf="box",
                                                                          resolution=1.5))
    np.testing.assert_allclose(boxed.dwi3, np.maximum(dg.box_decimate(plain.dwi3, 1.5), 0),
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(boxed.dwi3, plain.dwi3, atol=1e-3)


def test_bias_fields_have_the_stated_amplitude():
    f = dg.bias_field((16, 18, 14), "polynomial", 0.2, np.linspace(-1, 1, 9))
    assert np.isclose(np.abs(f - 1).max(), 0.2, rtol=1e-5) and f.min() > 0
    b = dg.bias_field((16, 18, 14), "bump", 0.3, (0.0, 0.0, 0.0, 1.0))
    assert np.isclose(b.max(), 1.3, atol=0.02) and b.min() >= 1.0
    assert np.array_equal(dg.bias_field((4, 4, 4), "none", 0.3, ()), np.ones((4, 4, 4)))


def test_rician_noise_has_the_stated_sigma():
    rng = np.random.default_rng(1)
    high = dg.add_rician(np.full(200_000, 100.0, np.float32), 2.0, rng)
    assert abs(np.std(high) - 2.0) < 0.03                  # Gaussian limit at high SNR
    zero = dg.add_rician(np.zeros(200_000, np.float32), 2.0, rng)
    assert abs(zero.mean() - 2.0 * math.sqrt(math.pi / 2)) < 0.02   # Rayleigh mean


def test_degrade_sets_snr_from_the_reference_b0_and_is_identity_without_degradation():
    g = dg.single_shell_scheme(30, n_b0=3)
    s = phantom.simulate_subject((16, 20, 16), seed=3, snr=None, scheme=g)
    same, sigma0 = dg.degrade(s.dwi, g, s.mask, _no_degradation(), np.random.default_rng(0))
    assert sigma0 == 0 and np.array_equal(same, s.dwi)
    out, sigma = dg.degrade(s.dwi, g, s.mask, _no_degradation(snr=20.0), np.random.default_rng(0))
    assert np.isclose(sigma, dg.reference_b0(s.dwi, g, s.mask) / 20.0)
    bright = s.mask & (s.dwi[..., 0] > 0.5 * s.dwi[..., 0].max())
    resid = (out - s.dwi)[bright][:, g.b0s_mask]            # SNR >= 10: Rician ~ Gaussian
    assert abs(np.std(resid) / sigma - 1) < 0.06            # ~1400 samples: 3 sd


def test_pair_contrast_follows_the_echo_times_and_t2():
    """Noise-free 3T member / 7T member in pure white matter = the TE/T2 law."""
    seed = 5
    p = dg.simulate_pair(seed, sim_size=20, degradation=_no_degradation())
    truth3 = phantom.simulate_subject(p.mask.shape, seed=seed, snr=None, scheme=p.gtab3,
                                      te=dg.TE_3T_MS, voxel_size=p.affine[0, 0]).truth
    wm = (truth3["fractions"][..., 2] > 0.999) & p.mask
    assert wm.sum() > 50
    t2 = truth3["t2"][wm]                                    # apparent = tissue T2 here
    expected = np.exp(-dg.TE_3T_MS / t2) / np.exp(-dg.TE_7T_MS / (dg.T2_SCALE_7T * t2))
    b0_3 = p.dwi3[..., p.gtab3.b0s_mask].mean(-1)[wm]
    b0_7 = p.dwi7[..., p.gtab7.b0s_mask].mean(-1)[wm]       # 7T at SNR 60: average out
    assert abs(np.median(b0_3 / b0_7) / np.median(expected) - 1) < 0.02
    assert p.dwi3.shape[3] == dg.N_B0 + dg.DIRS_3T and p.dwi7.shape[3] == dg.N_B0 + dg.DIRS_7T


def test_families_differ_and_pairs_are_reproducible():
    rng = np.random.default_rng(0)
    tr = [dg.sample_degradation("train", rng) for _ in range(50)]
    te = [dg.sample_degradation("test", rng) for _ in range(50)]
    assert {d.psf for d in tr} == {"gaussian"} and {d.psf for d in te} == {"kspace"}
    assert {d.bias_model for d in te} == {"bump"}
    assert min(d.snr for d in te) < dg.FAMILIES["train"]["snr"][0]
    a = dg.simulate_pair(11, sim_size=16, family="test")
    b = dg.simulate_pair(11, sim_size=16, family="test")
    assert a.degradation == b.degradation and np.array_equal(a.dwi3, b.dwi3)
    with pytest.raises(ValueError, match="family"):
        dg.sample_degradation("real", rng)


# ----------------------------------------------------------------------------
# Features and the oracle
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_features():
    out = []
    for seed in (21, 22, 23):
        p = dg.simulate_pair(seed, sim_size=16, family="train")
        out.append((features.shell_features(p.dwi3, p.gtab3, p.mask, p.affine, 16),
                    features.shell_features(p.dwi7, p.gtab7, p.mask, p.affine, 16)))
    return out


def test_oracle_lambda_reproduces_the_target_rish_exactly(pair_features):
    f3, f7 = pair_features[0]
    mask = f3.mask & (f3.rish > 0).all(-1)
    lam, _, _ = harmonize.scale_maps(f7.rish, f3.rish, mask, f3.affine, tau=0.0,
                                     scale_range=(1e-6, 1e6))
    rebuilt = sh.rish(sh.scale_by_order(f3.coeffs, features.LMAX, lam))
    assert np.allclose(rebuilt[mask], f7.rish[mask], rtol=1e-4, atol=1e-9)
    # and through the DWIs: refitting the rebuilt shell gives the same RISH
    dwi = features.reconstruct(f3, lam)
    refit = sh.SHModel(f3.gtab, features.LMAX, shell=features.SHELL_B).fit(dwi, mask)
    ok = mask & (dwi[..., ~f3.gtab.b0s_mask] > 0).all(-1)   # no clipping at 0
    assert np.allclose(refit.rish()[ok], f7.rish[ok], rtol=2e-3, atol=1e-7)


def test_reconstruct_with_unit_lambda_is_the_sh_fit(pair_features):
    f3, _ = pair_features[0]
    dwi = features.reconstruct(f3, np.ones(f3.mask.shape + (3,), np.float32))
    fit = sh.SHModel(f3.gtab, features.LMAX, shell=features.SHELL_B).fit(dwi, f3.mask)
    assert np.allclose(fit.coeffs[f3.mask], f3.coeffs[f3.mask], atol=1e-4)
    assert np.allclose(dwi[f3.mask][:, f3.gtab.b0s_mask], f3.s0[f3.mask][:, None])


def test_shell_features_cube_and_7t_anisotropy(pair_features):
    f3, f7 = pair_features[0]
    assert f3.rish.shape == (16, 16, 16, 3) and f7.fa.shape == (16, 16, 16)
    wm = f7.mask & (f7.fa > 0.4)
    assert wm.sum() > 5
    # the degraded 3T member is blurred: less anisotropy in the 7T white matter
    assert np.median(f3.fa[wm]) < np.median(f7.fa[wm])


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------
def test_nmse_known_values():
    rng = np.random.default_rng(0)
    gt = rng.uniform(1, 2, (10, 10, 10))
    mask = np.ones(gt.shape, bool)
    assert ldm_metrics.nmse(gt, gt, mask) == 0
    assert np.isclose(ldm_metrics.nmse(1.1 * gt, gt, mask), 0.01)
    assert np.isclose(ldm_metrics.nmse(np.zeros_like(gt), gt, mask), 1.0)


def test_ssim_identical_constant_and_monai():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (24, 24, 24))
    mask = np.ones(x.shape, bool)
    assert np.isclose(ldm_metrics.ssim3d(x, x, mask), 1.0)
    a, b, L = 0.3, 0.6, 1.0
    c1 = (0.01 * L) ** 2
    const = ldm_metrics.ssim3d(np.full(x.shape, a), np.full(x.shape, b), mask, data_range=L)
    assert np.isclose(const, (2 * a * b + c1) / (a * a + b * b + c1))
    # the interior (valid window) of our map equals MONAI's SSIM
    from monai.metrics.regression import compute_ssim_and_cs
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    ours = ldm_metrics.ssim_map(y, x, 1.0)[5:-5, 5:-5, 5:-5].mean()
    theirs, _ = compute_ssim_and_cs(torch.from_numpy(y)[None, None],
                                    torch.from_numpy(x)[None, None], 3, [11] * 3, [1.5] * 3,
                                    data_range=1.0)
    assert abs(ours - float(theirs.mean())) < 2e-3
    assert ldm_metrics.ssim3d(y, x, mask) < 0.9


def test_table_has_definitions_and_all_maps():
    rows = [{"nmse_L0": 0.1, "ssim_L0": 0.9, "nmse_L2": 0.2, "ssim_L2": 0.8, "nmse_L4": 0.3,
             "ssim_L4": 0.7, "nmse_FA": 0.05, "ssim_FA": 0.95}] * 2
    t = ldm_metrics.markdown_table({"m": ldm_metrics.summarise_metrics(rows)}, 2)
    assert "| m | 0.100 +- 0.000" in t and "NMSE = sum_mask" in t and "SSIM FA" in t


# ----------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------
def test_template_lambda_recovers_a_known_site_scale(pair_features):
    scale = np.array([1.2, 0.8, 1.5], np.float32)
    train = []
    for f3, _ in pair_features:
        f7 = features.ShellFeatures(f3.rish * scale ** 2, f3.coeffs, f3.s0, f3.fa, f3.mask,
                                    f3.affine, f3.gtab)
        train.append((f3, f7))
    tl = baselines.TemplateLambda(registration="identity").fit(train)
    f3 = pair_features[0][0]
    lam = tl.scales(f3)[f3.mask]
    assert np.allclose(np.median(lam, axis=0), scale, rtol=0.01)
    assert np.allclose(tl.predict(f3)[f3.mask], (lam ** 2) * f3.rish[f3.mask])


def test_cnn_baseline_starts_as_identity_and_learns(pair_features):
    pairs = [(f3.rish, f7.rish, f3.mask | f7.mask) for f3, f7 in pair_features]
    net = baselines.RishCNN()
    net.amp_scale.fill_(1.0)
    r3, _, m = pairs[0]
    assert np.allclose(net.predict(r3, m), r3 * m[..., None], rtol=1e-5, atol=1e-7)
    trained, report = baselines.train_cnn(pairs, steps=8, batch=2, lr=3e-3)
    losses = [h["loss"] for h in report["history"]]
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------
def test_vqvae_shapes_and_loss_decreases():
    torch.manual_seed(0)
    vq = vqvae.build_vqvae(3, (8, 16))
    g = torch.linspace(-1, 1, 16)
    r2 = sum(c ** 2 for c in torch.meshgrid(g, g, g, indexing="ij"))
    x = torch.stack([torch.exp(-r2 * s) for s in (1.0, 3.0, 6.0)])[None].repeat(2, 1, 1, 1, 1)
    x[1] = 0.5 * x[1].flip(-1)                             # smooth blobs: learnable
    z = vqvae.encode(vq, x)
    assert z.shape == (2, vqvae.EMBEDDING_DIM, 4, 4, 4)
    assert vqvae.decode(vq, z).shape == x.shape
    assert vq.quantizer.quantizer.num_embeddings == vqvae.NUM_EMBEDDINGS
    opt = torch.optim.Adam(vq.parameters(), 3e-3)
    losses = []
    for _ in range(15):
        loss = vqvae.vqvae_loss(vq, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    vq7 = vqvae.init_from(vqvae.build_vqvae(3, (8, 16)), vq)
    assert all(torch.equal(a, b) for a, b in zip(vq7.state_dict().values(),
                                                  vq.state_dict().values()))


def test_diffusion_loss_decreases_and_guidance_combines_two_predictions():
    torch.manual_seed(0)
    den = diffusion.LatentDenoiser(8, (16, 16, 16), 8)
    z3 = torch.randn(4, 8, 4, 4, 4)
    z7 = 0.5 * z3 + 0.1
    sched = diffusion.train_scheduler()
    opt = torch.optim.Adam(den.parameters(), 2e-3)
    losses = []
    for i in range(25):
        loss = diffusion.diffusion_loss(den, z3, z7, z3, sched, torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    # w = 0 is the conditional prediction alone; w changes the result
    def draw(w):
        return diffusion.sample(den, z3[:1], guidance=w, steps=3,
                                generator=torch.Generator().manual_seed(1))
    s0, s0b, s2 = draw(0.0), draw(0.0), draw(2.0)
    assert torch.equal(s0, s0b) and not torch.allclose(s0, s2)
    assert diffusion.sample_scheduler().timesteps.numel() == diffusion.DDIM_STEPS


def test_sr_module_mse_decreases():
    torch.manual_seed(0)
    net = sr.ResidualCNN(3, 8, 1)
    x = torch.rand(2, 3, 12, 12, 12)
    target = 0.8 * x
    assert torch.equal(net(x), x)                          # identity before training
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    losses = []
    for _ in range(15):
        loss = sr.mse_loss(net, x, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.fixture(scope="module")
def tiny_model(pair_features):
    pairs = [(f3.rish, f7.rish, f3.mask | f7.mask) for f3, f7 in pair_features]
    model = LatentDiffusion3T7T(grid=16, vq_widths=(8, 16), unet_channels=(16, 16, 16),
                                context_dim=8, sr_features=8, sr_blocks=1)
    report = fit(model, [(f3.rish, f3.mask) for f3, _ in pair_features[:1]], pairs,
                 Budget(vq3_steps=6, vq7_steps=4, diffusion_steps=6, sr_steps=4, vq_batch=2,
                        diffusion_batch=2, sr_batch=2))
    return model, report, pair_features


def test_model_fit_predict_shapes_and_determinism(tiny_model):
    model, report, feats = tiny_model
    assert set(report) >= {"vq3", "vq7", "diffusion", "sr"}
    f3 = feats[0][0]
    a = model.predict(f3.rish, f3.mask, steps=3, seed=4)
    b = model.predict(f3.rish, f3.mask, steps=3, seed=4)
    c = model.predict(f3.rish, f3.mask, steps=3, seed=5)
    assert a.shape == f3.rish.shape and np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.all(a[~f3.mask] == 0) and np.all(a >= 0)
    with_sr, without = model.predict(f3.rish, f3.mask, steps=3, seed=4, use_sr=None)
    assert np.array_equal(with_sr, a) and without.shape == a.shape
    f7 = feats[0][1]
    ceiling = model.reconstruct_7t(f7.rish, f7.mask)
    assert ceiling.shape == f7.rish.shape and np.all(ceiling[~f7.mask] == 0)
    with pytest.raises(ValueError, match="multiple"):
        LatentDiffusion3T7T(grid=24)


def test_checkpoint_round_trip_through_the_card(tiny_model, tmp_path):
    model, _, feats = tiny_model
    kwargs = dict(grid=16, vq_widths=[8, 16], unet_channels=[16, 16, 16], context_dim=8,
                  sr_features=8, sr_blocks=1)
    card = cards.ModelCard(name="ldm-test", version="0", architecture="ldm-3t7t", kwargs=kwargs,
                           acquisition=cards.Acquisition(shells=[1000.0], field_strength_t=3.0))
    cards.save_checkpoint(model, card, tmp_path / "ck")
    loaded, lcard = cards.load_checkpoint(tmp_path / "ck", device="cpu")
    f3 = feats[1][0]
    assert torch.equal(loaded.amp_scale, model.amp_scale)
    assert np.array_equal(loaded.predict(f3.rish, f3.mask, steps=2, seed=0),
                          model.predict(f3.rish, f3.mask, steps=2, seed=0))
    from dmriflow.interfaces.errors import InputError
    with pytest.raises(InputError, match="field strength"):
        cards.check_acquisition(lcard, f3.gtab, "sub-x_dwi.nii.gz", field_strength=7.0)


# ----------------------------------------------------------------------------
# Cohorts on disk, training to a checkpoint, the inference kind
# ----------------------------------------------------------------------------
def test_pairing_by_field_strength():
    from dmriflow.interfaces.errors import InputError
    from dmriflow.models.ldm import cohort
    assert cohort.session_field({"MagneticFieldStrength": 7}, "3T") == 7.0
    assert cohort.session_field({}, "7T") == 7.0 and cohort.session_field({}, "pre") is None
    only3, pairs = cohort.pair_by_field([("01", 3.0, "a3", "p"), ("01", 7.0, "a7", "p"),
                                         ("02", 3.0, "b3", "p")])
    assert only3 == ["b3"] and pairs == [("a3", "a7")]
    with pytest.raises(InputError, match="neither"):
        cohort.pair_by_field([("01", 1.5, "x", "f.nii.gz")])


def test_train_on_paired_bids_cohort_and_apply_the_3t7t_kind(tmp_path):
    from dmriflow.interfaces.inference import KINDS, THREE_T_TO_7T, run_inference
    from dmriflow.interfaces.stepfiles import load_subject
    from dmriflow.models.ldm import cohort
    from dmriflow.pipelines.inputs import discover
    cohort.write_paired_cohort(tmp_path / "bids", 3, sim_size=16, sessions_3t_only=1)
    subjects = discover(tmp_path / "bids", layout="bids")
    assert sorted(s.key for s in subjects) == ["sub-01_ses-3T", "sub-01_ses-7T", "sub-02_ses-3T",
                                               "sub-02_ses-7T", "sub-03_ses-3T"]
    from dmriflow.pipelines.cli import main
    assert main(["train", "3t7t", str(tmp_path / "bids"), str(tmp_path / "ck"), "--epochs", "1",
                 "--grid", "16"]) == 0
    card = cards.load_card(tmp_path / "ck")
    assert card.training["n_pairs"] == 2 and card.training["n_3t_only"] == 1
    assert card.kwargs == {"grid": 16} and card.acquisition.field_strength_t == 3.0
    s3 = next(s for s in subjects if s.key == "sub-03_ses-3T")
    dwi = load_subject(s3.dwi, s3.bval, s3.bvec, s3.mask)
    assert THREE_T_TO_7T in KINDS
    out, _ = run_inference(THREE_T_TO_7T, tmp_path / "ck", dwi, s3.dwi,
                           census={"field_strength_t": 3.0})
    series = out.maps["model-ldm3t7t_desc-7tlike"]
    table = out.tables["model-ldm3t7t_desc-7tlike_gradients"]
    assert series.shape == dwi.data.shape[:3] + (len(table),)
    assert out.maps["model-ldm3t7t_param-lambda"].shape == dwi.data.shape[:3] + (3,)
    lam = out.maps["model-ldm3t7t_param-lambda"][dwi.mask]
    lo, hi = harmonize.SCALE_RANGE
    assert lam.min() >= lo - 1e-6 and lam.max() <= hi + 1e-6
    # b0 volumes and voxels outside the mask are the input's
    b0 = table["bval"].to_numpy() == 0
    assert np.array_equal(series[..., b0], dwi.data[..., dwi.gtab.b0s_mask])
    assert set(out.row) >= {"inference_lambda_l0_median", "inference_seconds"}
    from dmriflow.interfaces.errors import InputError
    with pytest.raises(InputError, match="field strength"):
        run_inference(THREE_T_TO_7T, tmp_path / "ck", dwi, s3.dwi,
                      census={"field_strength_t": 7.0})


#: The shipped latent-model checkpoint (``--inference-checkpoint`` for ``3t7t``).
SHIPPED_LDM = Path(cards.__file__).parent / "checkpoints" / "ldm_3t7t"


def test_shipped_checkpoint_is_small_and_states_its_acquisition_and_table():
    folder = SHIPPED_LDM
    assert sorted(p.name for p in folder.iterdir()) == [cards.CARD_FILE, cards.WEIGHTS_FILE]
    assert (folder / cards.WEIGHTS_FILE).stat().st_size < 4 * 2**20
    model, card = cards.load_checkpoint(folder, device="cpu")
    assert card.acquisition.shells == [1000.0] and card.acquisition.field_strength_t == 3.0
    methods = {r["method"] for r in card.metrics}
    assert {"identity (no mapping)", "template lambda (classical RISH)", "3D CNN (RISH 3T->7T)",
            "LDM (fine-tune + SR)", "oracle lambda (true 7T RISH)"} <= methods
    assert model.grid == card.kwargs["grid"] and float(model.latent_scale) > 0


@pytest.mark.parametrize("checkpoint, name, entity", [
    (None, "rish-diffusion-3t7t", "model-rish3t7t"),
    (SHIPPED_LDM, "ldm-3t7t", "model-ldm3t7t")], ids=["default-rish", "latent"])
def test_3t7t_inference_phase_through_the_engine(tmp_path, checkpoint, name, entity):
    """``dmriflow run --inference 3t7t`` on a phantom 3T subject: by default the
    shipped RISH-space diffusion checkpoint (its card in the row and sidecar;
    the calibrated SD of log lambda exported, finite and >= 0 in the mask, with
    K and the spread scale in the sidecar); with ``--inference-checkpoint`` the
    latent model, through the same kind (no SD map). The 7T-like series, its
    FA and lambda maps are exported either way."""
    import json

    import nibabel as nib

    from dmriflow.pipelines.execution import RunConfig, run_cohort
    from dmriflow.pipelines.inputs import discover
    scheme = dg.single_shell_scheme(40, n_b0=3)
    # a 100 mm field of view: 3.125 mm cube voxels on the 32^3 grid, as in training
    phantom.write_cohort(tmp_path / "in", 1, shape=(20, 24, 20), seed=41, scheme=scheme,
                         voxel_size=100 / 24)
    cfg = RunConfig(worker="debug", cache_dir=str(tmp_path / "cache"), quiet=True,
                    inference="3t7t", inference_checkpoint=str(checkpoint or ""))
    result = run_cohort(discover(tmp_path / "in"), tmp_path / "out", cfg)
    (row,) = result.rows
    assert row["status"] == "done", row
    assert row["inference_model"] == f"{name} 0.1"
    files = {p.name: p for p in (tmp_path / "out").rglob("sub-*") if "cache" not in p.parts}
    key = row["subject"]
    for entities in (f"{entity}_desc-7tlike_dwimap.nii.gz", f"{entity}_param-fa_dwimap.nii.gz",
                     f"{entity}_param-lambda_dwimap.nii.gz",
                     f"{entity}_desc-7tlike_gradients.tsv"):
        assert f"{key}_{entities}" in files
    lam = f"{key}_{entity}_param-lambda_dwimap"
    assert {f"{key}_{entities}" for entities in (
        f"{entity}_desc-7tlike_dwimap.nii.gz", f"{entity}_param-fa_dwimap.nii.gz",
        f"{entity}_param-lambda_dwimap.nii.gz")} <= {p.split("/")[-1] for p in row["derivatives"]}
    sidecar = json.loads(files[f"{lam}.json"].read_text())["Parameters"]
    assert sidecar["model"] == name and sidecar["architecture"] == name
    sd_name = f"{key}_{entity}_desc-sd_param-loglambda_dwimap.nii.gz"
    if name == "ldm-3t7t":
        lo, hi = harmonize.SCALE_RANGE
        assert lo <= row["inference_lambda_l0_median"] <= hi
        assert sd_name not in files and "samples" not in sidecar
        return
    shipped = cards.load_card(Path(cards.__file__).parent / "checkpoints" / "rish_3t7t")
    assert sidecar["samples"] == shipped.extra["samples"] >= 8
    # the model's buffer is the card's value rounded to float16 (weights_precision)
    assert sidecar["spread_scale"] == pytest.approx(shipped.training["spread_scale"],
                                                    rel=2.0 ** -11)
    assert sidecar["weights_sha256"] == shipped.weights_sha256
    assert sidecar["ensemble_disagreement"] is not None and "range_flags" in sidecar
    assert sd_name in {p.split("/")[-1] for p in row["derivatives"]}
    sd = nib.load(files[sd_name]).get_fdata()
    mask = nib.load(files[f"{lam}.nii.gz"]).get_fdata()[..., 0] != 1
    assert sd.shape[-1] == 3 and np.isfinite(sd).all() and sd.min() >= 0
    # a trained model is uncertain somewhere: the SD is not 0 throughout the mask
    assert (sd[mask] > 0).mean() > 0.5
    assert row["inference_loglambda_sd_l2_median"] > 0


def test_3t7t_refuses_a_field_of_view_outside_the_cards_range(tmp_path):
    """The shipped card was trained on 3.125 mm cube voxels: a 60 mm field of
    view gives 1.875 mm cube voxels (a real head, ~220 mm, gives ~6.9 mm) and
    is refused before the model runs, naming the value and the range."""
    from dmriflow.interfaces.errors import InputError
    from dmriflow.interfaces.inference import THREE_T_TO_7T, default_checkpoint, run_inference
    from dmriflow.interfaces.stepfiles import load_subject
    from dmriflow.pipelines.inputs import discover
    scheme = dg.single_shell_scheme(40, n_b0=3)
    phantom.write_cohort(tmp_path / "in", 1, shape=(20, 24, 20), seed=41, scheme=scheme,
                         voxel_size=2.5)
    (s,) = discover(tmp_path / "in")
    dwi = load_subject(s.dwi, s.bval, s.bvec, s.mask)
    with pytest.raises(InputError, match=r"cube_voxel_mm 1\.875 is outside the model's range "
                                         r"2\.812-3\.438"):
        run_inference(THREE_T_TO_7T, default_checkpoint(THREE_T_TO_7T), dwi, s.dwi,
                      census={"field_strength_t": 3.0})
