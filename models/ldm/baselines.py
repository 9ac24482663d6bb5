"""Baselines of the 3T->7T RISH mapping, on the same cube as the model.

* :func:`identity` - no mapping (the 3T RISH as the 7T prediction);
* :class:`TemplateLambda` - classical RISH harmonisation (Mirzaalian 2016):
  site-mean scale maps ``lambda_l = sqrt(E_7T[R_l] / (E_3T[R_l] + tau))`` in
  a template space from the paired training subjects, fitted by
  :func:`dmriflow.interfaces.harmonize.fit_harmonization` (FA registration),
  warped into each test subject; prediction ``lambda_l^2 R3_l``;
* :class:`RishCNN` - a small residual 3D CNN (Cetin Karayumak 2018 style)
  mapping 3T RISH amplitudes to 7T ones, trained with MSE in the mask;
* the oracle - the true 7T RISH (lambda from the target itself): the ceiling
  of any method that only rescales the 3T SH coefficients per order.
"""

from __future__ import annotations

import numpy as np
import torch

from dmriflow.interfaces import harmonize
from dmriflow.models.card import register
from dmriflow.models.ldm import features, sr
from dmriflow.models.ldm.model import amplitude_scale, rish_to_input
from dmriflow.models.train import DEFAULT_THREADS, TrainConfig, train

#: Registration of subjects to the template for the classical baseline.
TEMPLATE_REGISTRATION = "affine"
#: Width and depth of the CNN baseline.
CNN_FEATURES = 16
CNN_BLOCKS = 3


def identity(rish3: np.ndarray) -> np.ndarray:
    return np.asarray(rish3, dtype=np.float32).copy()


def delivered_rish(rish3: np.ndarray, rish7_pred: np.ndarray, mask: np.ndarray,
                   affine: np.ndarray, tau: float = harmonize.TAU_FRACTION) -> tuple:
    """(lambda, lambda^2 R3): the scale maps a predicted 7T RISH implies
    (:func:`harmonize.scale_maps`: tau, clipping and fill as in harmonisation)
    and the RISH the rescaled 3T coefficients then carry."""
    lam, _, _ = harmonize.scale_maps(rish7_pred, rish3, mask, affine, tau=tau)
    return lam, (lam.astype(np.float32) ** 2) * rish3


class TemplateLambda:
    """Site-mean RISH scale maps in a template space (the classical method)."""

    def __init__(self, registration: str = TEMPLATE_REGISTRATION):
        self.registration = registration
        self.artefact = None

    def fit(self, train: list[tuple[features.ShellFeatures, features.ShellFeatures]],
            subjects: list[str] | None = None) -> "TemplateLambda":
        """``train``: (3T, 7T) features of the paired training subjects."""
        names = subjects or [f"s{i:03d}" for i in range(len(train))]
        b = features.SHELL_B

        def feats(f, name):
            return harmonize.SubjectFeatures(name, f.fa, f.affine, f.mask, {b: f.rish})
        self.artefact = harmonize.fit_harmonization(
            [feats(f7, n) for (_, f7), n in zip(train, names)],
            [feats(f3, n) for (f3, _), n in zip(train, names)],
            shells=[b], lmax=features.LMAX, reference_site="7T", target_site="3T",
            registration=self.registration, keep_transforms=False)
        return self

    def scales(self, f3: features.ShellFeatures) -> np.ndarray:
        """The template lambda maps warped into a 3T subject (G, G, G, 3)."""
        a = self.artefact
        f = harmonize.SubjectFeatures("subject", f3.fa, f3.affine, f3.mask,
                                      {features.SHELL_B: f3.rish})
        t = harmonize.register_fa(harmonize.registration_image(f, a.registration_contrast,
                                                               a.shells),
                                  f3.affine, a.template_fa, a.template_affine, self.registration)
        return harmonize.warp_scale_maps(a, t)[features.SHELL_B]

    def predict(self, f3: features.ShellFeatures) -> np.ndarray:
        return (self.scales(f3) ** 2) * f3.rish


@register("cnn-3t7t")
class RishCNN(torch.nn.Module):
    """Residual 3D CNN on scaled RISH amplitudes (3 channels in, 3 out)."""

    def __init__(self, features_: int = CNN_FEATURES, blocks: int = CNN_BLOCKS):
        super().__init__()
        self.net = sr.ResidualCNN(features.N_ORDERS, features_, blocks)
        self.register_buffer("amp_scale", torch.ones(features.N_ORDERS))

    def forward(self, x):
        return self.net(x)

    @torch.no_grad()
    def predict(self, rish3: np.ndarray, mask: np.ndarray) -> np.ndarray:
        x = rish_to_input(rish3, mask, self.amp_scale).to(self.amp_scale.device)
        amp = torch.clamp(self(x), min=0.0) * self.amp_scale.view(1, -1, 1, 1, 1)
        out = (amp ** 2).permute(0, 2, 3, 4, 1).cpu().numpy()
        out = out * np.asarray(mask, dtype=np.float32).reshape(out.shape[:4] + (1,))
        return out[0] if np.asarray(rish3).ndim == 4 else out


def train_cnn(pairs: list, steps: int = 300, batch: int = 4, lr: float = 2e-3, seed: int = 0,
              threads: int = DEFAULT_THREADS, log=None) -> tuple[RishCNN, dict]:
    """Train :class:`RishCNN` on (rish3, rish7, mask) pairs; random flips."""
    net = RishCNN()
    net.amp_scale.copy_(amplitude_scale([(r3, m) for r3, _, m in pairs]
                                        + [(r7, m) for _, r7, m in pairs]))
    x3 = torch.cat([rish_to_input(r3, m, net.amp_scale) for r3, _, m in pairs])
    x7 = torch.cat([rish_to_input(r7, m, net.amp_scale) for _, r7, m in pairs])
    masks = torch.from_numpy(np.stack([m for _, _, m in pairs])[:, None].astype(np.float32))

    def batch_fn(step, rng):
        idx = rng.choice(x3.shape[0], size=min(batch, x3.shape[0]), replace=False)
        dims = [2 + a for a in range(3) if rng.random() < 0.5]
        flip = (lambda t: torch.flip(t, dims)) if dims else (lambda t: t)
        return flip(x3[idx]), flip(x7[idx]), flip(masks[idx])

    cfg = TrainConfig(steps=steps, lr=lr, warmup=max(1, steps // 10), seed=seed, threads=threads,
                      log_every=max(1, steps // 10), checkpoint_every=steps, validate_every=steps)
    res = train(net, lambda n, b: sr.mse_loss(n, *b), batch_fn, cfg, log=log)
    return res.model, {"steps": steps, "seconds": res.seconds, "history": res.history}
