"""RISH: per-shell SH fit of the b0-normalised signal and its RISH maps l = 0..L."""

from __future__ import annotations

from dataclasses import dataclass

from .. import stepfiles
from ..bids_names import SHELL_ENTITY, shell_entities
from .base import Derivative, Product, Schema, Step, option, register

#: BIDS model label of the RISH maps, and the prefix of their order (param-l2).
MODEL, ORDER_PREFIX = "rish", "l"


@dataclass
class Options:
    lmax: int = option(0, "maximum SH order per shell (0: as the directions allow, up to 8)")

    def __post_init__(self):
        if self.lmax < 0 or self.lmax % 2:
            raise ValueError(f"--lmax must be 0 or a positive even order, got {self.lmax}")


def run(record: dict, options: Options, out_dir) -> Product:
    """One map per shell and even order (``model-rish_desc-b<b>_param-l<order>``);
    each sidecar names its shell (b-value) and order."""
    out = stepfiles.write_rish_maps(record["series"], out_dir, options.lmax)
    return Product(MODEL, maps=[
        Derivative({"model": MODEL, **shell_entities(shell), "param": f"{ORDER_PREFIX}{order}"},
                   path,
                   {"shell": float(shell), "order": int(order)})
        for shell, by_order in out["maps"].items() for order, path in by_order.items()],
        parameters=out["parameters"])


STEP = register(Step(MODEL, "FitRish", "product", Options, run, schema=Schema(
    map_entities=frozenset({"model", SHELL_ENTITY, "param"}),
    parameters=frozenset({"lmax", "normalisation"}))))
