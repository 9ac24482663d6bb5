"""Inference: a trained model applied to the subject's current series.

The kinds (``directions``, ``3t7t``) are registered in
:mod:`dmriflow.interfaces.inference`; a subject whose acquisition does not
match the model card fails with an InputError naming its file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import io, stepfiles
from .base import Product, Schema, Step, derivatives_from_text, option, register

#: Step name (node marker, failure records, sidecars).
NAME = "inference"


@dataclass
class Options:
    inference: str = option(
        "", "apply a trained model to every subject as its own phase: 'directions' "
            "(synthesise b=1000 directions from 30 acquired), '3t7t' (7T-like b=1000 series of "
            "3T data: residual diffusion on RISH maps, or a latent diffusion checkpoint); "
            "subjects whose acquisition does not match the model card fail", metavar="KIND")
    inference_checkpoint: str = option(
        "", "checkpoint folder (card.json + model.safetensors) for --inference (default: the "
            "one shipped with dmriflow)", metavar="DIR")
    #: sha256 of the checkpoint's weights (the card's), set by the run: new
    #: weights in the same folder mean a new cache entry; must match the card.
    weights_sha256: str = ""


def enabled(options: Options) -> bool:
    return bool(options.inference)


def run(record: dict, options: Options, out_dir) -> Product:
    """The model's maps and tables; its name and version go into the row."""
    from ..inference import run_inference  # torch (seconds): only when this step runs
    data = stepfiles.read_series(record["series"])
    out, card = run_inference(options.inference, options.inference_checkpoint or None, data,
                              record["series"]["dwi"], census=record.get("census"))
    if options.weights_sha256 and card.weights_sha256 != options.weights_sha256:
        raise RuntimeError(f"checkpoint {options.inference_checkpoint} changed during the run")
    out_dir = Path(out_dir)
    maps = {entities: str(io.save_nifti(np.asarray(arr, dtype=np.float32), data.affine,
                                        out_dir / f"{entities}.nii.gz", data.header).resolve())
            for entities, arr in out.maps.items()}
    tables = {entities: str(io.write_text(df.to_csv(sep="\t", index=False),
                                          out_dir / f"{entities}.tsv").resolve())
              for entities, df in out.tables.items()}
    return Product(NAME, maps=derivatives_from_text(maps), tables=derivatives_from_text(tables),
                   parameters={**out.parameters, "kind": options.inference},
                   row={"inference_model": f"{card.name} {card.version}", **out.row})


STEP = register(Step(NAME, "Inference", "product", Options, run, enabled=enabled, grid=True, example={"inference": "directions"},
                     commands=("run", "demo"),
                     schema=Schema(map_entities=frozenset({"model", "desc", "param"}),
                                   table_entities=frozenset({"model", "desc"}),
                                   row=frozenset({"inference_model"}),
                                   parameters=frozenset({"kind", "model", "weights_sha256"}))))
