"""Tensor: DTI maps (FA, MD, AD, RD, S0, V1) of the b0s and the low shells."""

from __future__ import annotations

from dataclasses import dataclass

from .. import stepfiles
from ..dti import DEFAULT_WLS_ITERATIONS, DTI_MAX_BVAL, FIT_METHODS
from ..errors import check_choice
from .base import Product, Derivative, Schema, Step, option, register

#: BIDS model label of the tensor maps.
MODEL = "tensor"


@dataclass
class Options:
    fit_method: str = option("WLS", "tensor fit (default: %(default)s)", choices=FIT_METHODS)
    wls_iterations: int = option(
        DEFAULT_WLS_ITERATIONS, "WLS passes (default: %(default)s, as MRtrix3's dwi2tensor; "
                                "1: one-pass WLS as dipy's TensorModel)", metavar="N")
    dti_max_bval: float = option(
        DTI_MAX_BVAL, "fit the tensor to b0s and shells up to this b-value "
                      "(default: %(default)g s/mm^2)", units="s/mm^2", flag="--dti-max-b")

    def __post_init__(self):
        check_choice("--fit-method", self.fit_method, FIT_METHODS)
        if self.wls_iterations < 1:
            raise ValueError(f"--wls-iterations must be >= 1 (1: one-pass WLS), "
                             f"got {self.wls_iterations}")


def run(record: dict, options: Options, out_dir) -> Product:
    """Fit the tensor to the current series; FA statistics and the failed-fit
    fraction go into the subject's row."""
    out = stepfiles.write_tensor_maps(record["series"], out_dir, options.fit_method,
                                      options.dti_max_bval, options.wls_iterations)
    return Product(MODEL, maps=[Derivative({"model": MODEL, "param": p}, path)
                                for p, path in out["maps"].items()],
                   row={"median_fa": out["median_fa"], "failed_fit_voxels": out["failed_voxels"],
                        "failed_fit_fraction": out.get("failed_fraction")},
                   parameters=out["parameters"], qc_flags=out["qc_flags"])


STEP = register(Step(MODEL, "FitTensor", "product", Options, run, schema=Schema(
    map_entities=frozenset({"model", "param"}),
    row=frozenset({"median_fa", "failed_fit_voxels", "failed_fit_fraction"}),
    parameters=frozenset({"fit_method", "n_iter", "max_bval", "shells_used"}))))
