"""The inference phase: a trained model applied to every subject (own submitter).

``dmriflow run ... --inference directions`` runs this phase before the main
cohort workflow. Per subject, :class:`Inference` (a guarded step) loads the
checkpoint, refuses a subject whose acquisition does not match the model
card (an InputError that becomes that subject's failure; the others go on),
applies the model (:mod:`dmriflow.interfaces.inference`, GPU when present)
and returns a *product record* that the main workflow's Export copies into
the derivatives tree. The phase has its own Pydra Submitter so that on SLURM
its jobs can ask for a GPU (``RunConfig.gpu_sbatch_args``) while the other
steps do not. It shares the Validate/Preprocess/Harmonize nodes with the main
workflow through the cache (same inputs, same node), so nothing is computed
twice. ``group/models.tsv`` lists the models used with their cards' metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fileformats.generic import File
from pydra.compose import python, workflow

from dmriflow.interfaces import io
from dmriflow.pipelines.progress import PROGRESS
from dmriflow.pipelines.steps import guarded, load_series

#: Step name (node marker, failure records, sidecars).
STEP = "inference"
#: The group table of the models applied in a run.
MODELS_TABLE = "models.tsv"


@guarded(STEP)
def inference_step(subject: str, record: dict, kind: str, checkpoint: str = "",
                   weights_sha256: str = "", pipeline_version: str = "") -> dict:
    """Apply an inference model to the subject's current series; a product record.

    ``weights_sha256`` (the card's) is an input so that new weights in the
    same checkpoint folder mean a new cache entry; it must match the card.
    """
    from dmriflow.interfaces.inference import run_inference
    data = load_series(record)
    out, card = run_inference(kind, checkpoint or None, data, record["series"]["dwi"],
                              census=record.get("census"))
    if weights_sha256 and card.weights_sha256 != weights_sha256:
        raise RuntimeError(f"checkpoint {checkpoint} changed during the run")
    cwd = Path.cwd()
    maps = {entities: str(io.save_nifti(np.asarray(arr, dtype=np.float32), data.affine,
                                        cwd / f"{entities}.nii.gz", data.header).resolve())
            for entities, arr in out.maps.items()}
    tables = {entities: str(io.write_text(df.to_csv(sep="\t", index=False),
                                          cwd / f"{entities}.tsv").resolve())
              for entities, df in out.tables.items()}
    return {"subject": subject, "status": "ok", "step": STEP, "maps": maps, "tables": tables,
            "parameters": {**out.parameters, "kind": kind},
            "row": {"inference_model": f"{card.name} {card.version}", **out.row}}


Inference = python.define(inference_step, outputs=["product"], name="Inference")


def inference_subject_workflow(subject: str, out_parts: list, dwi: File, bval: File, bvec: File,
                               kind: str, checkpoint: str = "", weights_sha256: str = "",
                               mask: File | None = None, sidecar: File | None = None,
                               harmonization: str = "",
                               denoise: bool = False, degibbs: bool = False,
                               exclude_outliers: bool = True, fix_gradients: bool = False,
                               pipeline_version: str = "") -> dict:
    """Validate -> [Preprocess] -> [Harmonize] -> Inference, the same nodes (and
    so the same cache entries) as the main subject workflow. With ``kind=""``
    only the series steps run and the product is the subject's record (the
    CPU pre-phase on SLURM, see :func:`run_inference_phase`)."""
    from dmriflow.pipelines.workflows import add_series_steps
    pv = dict(subject=subject, pipeline_version=pipeline_version)
    record = add_series_steps(dict(dwi=dwi, bval=bval, bvec=bvec, mask=mask, sidecar=sidecar),
                              pv, denoise=denoise, degibbs=degibbs, harmonization=harmonization,
                              exclude_outliers=exclude_outliers, fix_gradients=fix_gradients)
    if not kind:
        return record
    return workflow.add(Inference(record=record, kind=kind, checkpoint=checkpoint,
                                  weights_sha256=weights_sha256, **pv), hooks=PROGRESS).product


InferenceSubject = workflow.define(inference_subject_workflow,
                                   outputs=["product"], name="InferenceSubject")


def inference_phase_workflow(subject: list[str], out_parts: list[list], dwi: list[File],
                             bval: list[File], bvec: list[File], mask: list, sidecar: list, kind: str,
                             checkpoint: str = "", weights_sha256: str = "", harmonization: str = "",
                             denoise: bool = False, degibbs: bool = False,
                             exclude_outliers: bool = True, fix_gradients: bool = False,
                             pipeline_version: str = "") -> list:
    from dmriflow.pipelines.workflows import SUBJECT_FIELDS
    per = InferenceSubject(kind=kind, checkpoint=checkpoint, weights_sha256=weights_sha256,
                           harmonization=harmonization,
                           denoise=denoise, degibbs=degibbs, exclude_outliers=exclude_outliers,
                           fix_gradients=fix_gradients, pipeline_version=pipeline_version)
    split = per.split(SUBJECT_FIELDS, subject=subject, out_parts=out_parts, dwi=dwi, bval=bval,
                      bvec=bvec, mask=mask, sidecar=sidecar)
    return workflow.add(split.combine("subject"), name="inference").product


InferencePhase = workflow.define(inference_phase_workflow,
                                 outputs=["products"], name="InferencePhase")


def resolve_checkpoint(kind: str, checkpoint: str = "") -> str:
    """The checkpoint folder to use: the given one, else the shipped one."""
    from dmriflow.interfaces.inference import KINDS, default_checkpoint
    if kind not in KINDS:
        raise ValueError(f"unknown inference kind {kind!r}; choose from {sorted(KINDS)}")
    return str(Path(checkpoint or default_checkpoint(kind)).resolve())


def phase_submitter(config, root: Path):
    """The phase's own Submitter (on SLURM its jobs take ``config.gpu_sbatch_args``)."""
    from dmriflow.pipelines import execution
    return execution.submitter(config, root, gpu=True)


def run_inference_phase(subjects, output_dir, config, root: Path, version: str,
                        kind: str, checkpoint: str = "") -> tuple[list[dict], list[str]]:
    """Run the phase over ``subjects``; (product per subject, engine errors).

    Writes ``group/models.tsv``. A subject whose inference failed has a
    failure record (Export reports it as that subject's failed step). On
    SLURM the series steps (Validate, Preprocess, Harmonize) first run as CPU
    jobs, so the GPU jobs find them cached and only apply the model.
    """
    from dmriflow.models.card import load_card
    from dmriflow.pipelines import execution
    checkpoint = resolve_checkpoint(kind, checkpoint)
    sha = load_card(checkpoint).weights_sha256
    write_models_table(output_dir, [checkpoint])

    def phase(kind: str):
        return InferencePhase(
            subject=[s.key for s in subjects], out_parts=[list(s.out_parts) for s in subjects],
            dwi=[s.dwi for s in subjects], bval=[s.bval for s in subjects],
            bvec=[s.bvec for s in subjects], mask=[s.mask for s in subjects],
            sidecar=[s.sidecar for s in subjects], kind=kind, checkpoint=checkpoint,
            weights_sha256=sha,
            harmonization=(str(Path(config.harmonization).resolve())
                           if config.harmonization else ""),
            denoise=config.denoise, degibbs=config.degibbs,
            exclude_outliers=config.exclude_outliers, fix_gradients=config.fix_gradients,
            pipeline_version=version)
    if config.worker == "slurm":
        with execution.submitter(config, root) as sub:   # failures pass on as records
            sub(phase(""), raise_errors=False)
    with phase_submitter(config, root) as sub:
        res = sub(phase(kind), raise_errors=False)
    if res.errored:
        from dmriflow.pipelines.execution import _engine_errors
        errors = _engine_errors(res, root)
        failed = {"status": "failed", "failed_step": STEP, "error": "; ".join(errors)}
        return [{"subject": s.key, **failed} for s in subjects], errors
    return list(res.outputs.products), []


def write_models_table(output_dir, checkpoints: list[str]) -> Path:
    """``group/models.tsv``: one row per metrics row of each model card used."""
    import pandas as pd

    from dmriflow.models.card import load_card, metrics_rows
    rows = []
    for ckpt in checkpoints:
        card = load_card(ckpt)
        base = {"checkpoint": str(ckpt), "architecture": card.architecture,
                "weights_sha256": card.weights_sha256,
                "acquisition": card.acquisition.describe()}
        rows += [{**row, **base} for row in metrics_rows(card)] or \
            [{"model": card.name, "version": card.version, **base}]
    path = Path(output_dir, "dmriflow", "group", MODELS_TABLE)
    return io.write_text(pd.DataFrame(rows).to_csv(sep="\t", index=False, na_rep="n/a"), path)

