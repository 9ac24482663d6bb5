"""The inference phase: a trained model applied to every subject (own submitter).

``dmriflow run ... --inference directions`` runs this phase before the main
cohort workflow. Per subject, the registered step
:mod:`dmriflow.interfaces.steps.inference` (task ``Inference``) loads the
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

import hashlib
from pathlib import Path

import pandas as pd
from pydra.compose import workflow

from dmriflow.interfaces import io
from dmriflow.pipelines.derivatives import external_path
from dmriflow.pipelines.engine import errors_of
from dmriflow.pipelines.progress import PROGRESS
from dmriflow.pipelines.steps import TASKS, ContentKeyed, Subject
from dmriflow.pipelines.workflows import add_series_steps, rows_only

#: Step name (node marker, failure records, sidecars).
STEP = "inference"
#: The group table of the models applied in a run.
MODELS_TABLE = "models.tsv"


def inference_subject_workflow(subject: Subject, options: dict, series_only: bool = False,
                               pipeline_version: str = "") -> dict:
    """Validate -> [Preprocess] -> [Harmonize] -> Inference, the same nodes (and
    so the same cache entries) as the main subject workflow. With
    ``series_only`` only the series steps run and the product is the
    subject's record (the CPU pre-phase on SLURM, see :func:`run_inference_phase`)."""
    record = add_series_steps(subject, options, pipeline_version, rows_only(options))
    if series_only:
        return record
    return workflow.add(TASKS[STEP](subject=subject.key, record=record, options=options[STEP],
                                    pipeline_version=pipeline_version),
                        hooks=PROGRESS).product


InferenceSubject = workflow.define(inference_subject_workflow,
                                   outputs=["product"], name="InferenceSubject")


def inference_phase_workflow(subjects: list[Subject], options: dict, series_only: bool = False,
                             pipeline_version: str = "") -> list:
    per = InferenceSubject(options=options, series_only=series_only,
                           pipeline_version=pipeline_version)
    return workflow.add(per.split("subject", subject=subjects).combine("subject"),
                        name="inference").product


InferencePhase = workflow.define(inference_phase_workflow,
                                 outputs=["products"], name="InferencePhase")


def resolve_checkpoint(kind: str, checkpoint: str = "") -> str:
    """The checkpoint folder to use: the given one, else the shipped one."""
    # interfaces.inference imports torch (seconds): only when a run uses a model
    from dmriflow.interfaces.inference import KINDS, default_checkpoint
    if kind not in KINDS:
        raise ValueError(f"unknown inference kind {kind!r}; choose from {sorted(KINDS)}")
    return str(Path(checkpoint or default_checkpoint(kind)).resolve())


def pin_checkpoint(options) -> None:
    """Resolve the inference options' checkpoint folder (default: the shipped
    one) and record its card's weights hash, so new weights mean new nodes. The
    folder is keyed in the cache by its card's content (which holds the
    weights' sha256, checked on load), not its path: a moved checkpoint (or
    a moved installation's shipped one) keeps the cache."""
    from dmriflow.interfaces.inference import check_model_kind
    from dmriflow.models.card import CARD_FILE, load_card  # torch: only when a run uses a model
    folder = resolve_checkpoint(options.inference, options.inference_checkpoint)
    check_model_kind(options.inference, folder)   # a wrong model fails the run, not each subject
    card = hashlib.sha256((Path(folder) / CARD_FILE).read_bytes()).hexdigest()
    options.inference_checkpoint = ContentKeyed(folder, f"sha256:{card}")
    options.weights_sha256 = load_card(options.inference_checkpoint).weights_sha256


def run_inference_phase(subjects, output_dir, config, root: Path, version: str,
                        submitter) -> tuple[list[dict], list[str]]:
    """Run the phase over ``subjects`` (:class:`Subject` units); (product per
    subject, engine errors).

    ``submitter(config, root, gpu=False)``: the run's Submitter factory
    (:func:`dmriflow.pipelines.execution.submitter`); the phase's own one is
    ``gpu=True`` (on SLURM its jobs take ``config.gpu_sbatch_args``). Writes
    ``group/models.tsv``. A subject whose inference failed has a failure
    record (Export reports it as that subject's failed step). On SLURM the
    series steps (Validate, Preprocess, Harmonize) first run as CPU jobs, so
    the GPU jobs find them cached and only apply the model.
    """
    options = config.options_record()

    def phase(series_only: bool):
        return InferencePhase(subjects=subjects, options=options, series_only=series_only,
                              pipeline_version=version)
    write_models_table(output_dir, [options[STEP]["inference_checkpoint"]])
    if config.worker == "slurm":
        with submitter(config, root) as sub:   # failures pass on as records
            sub(phase(True), raise_errors=False)
    with submitter(config, root, gpu=True) as sub:
        res = sub(phase(False), raise_errors=False)
    if res.errored:
        errors = errors_of(res, root)
        failed = {"status": "failed", "failed_step": STEP, "error": "; ".join(errors)}
        return [{"subject": s.key, **failed} for s in subjects], errors
    return list(res.outputs.products), []


def write_models_table(output_dir, checkpoints: list[str]) -> Path:
    """``group/models.tsv``: one row per metrics row of each model card used."""
    from dmriflow.models.card import load_card, metrics_rows  # torch, as above
    rows = []
    for ckpt in checkpoints:
        card = load_card(ckpt)
        base = {"checkpoint": external_path(ckpt, output_dir), "architecture": card.architecture,
                "weights_sha256": card.weights_sha256,
                "acquisition": card.acquisition.describe()}
        rows += [{**row, **base} for row in metrics_rows(card)] or \
            [{"model": card.name, "version": card.version, **base}]
    path = Path(output_dir, "dmriflow", "group", MODELS_TABLE)
    return io.write_text(pd.DataFrame(rows).to_csv(sep="\t", index=False, na_rep="n/a"), path)

