"""The Marchenko-Pastur law's quantities that MP-PCA's noise split reads,
shared by the torch path (:mod:`.preprocess`) and the compiled one
(:mod:`.mppca_split`, which compiles :func:`mp_gamma`). Plain arithmetic: it
works on numbers and on torch tensors alike."""

from __future__ import annotations

import math


def mp_edge(n: int, N: int) -> float:
    """(1 + sqrt(min(N, n) / q))^2: the MP distribution's upper edge over the
    noise variance; eigenvalues / q above it times the variance are signal
    ("veraart", as dipy)."""
    return (1.0 + math.sqrt(min(N, n) / max(N, n))) ** 2


def mp_gamma(c, m: int, q: int, exp2: bool):
    """gamma_c of the MP criterion for candidate c (a number or a tensor):
    (c+1)/q (Exp1, "veraart") or (c+1)/(q - signal components) (Exp2,
    Cordero-Grande)."""
    return (c + 1) / (q - (m - c - 1)) if exp2 else (c + 1) / q
