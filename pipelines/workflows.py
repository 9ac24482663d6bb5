"""Pydra workflows built by iterating the registry: one subject, and the cohort.

A subject enters as one :class:`~dmriflow.pipelines.steps.Subject` unit (its
files hashed by content) and goes through the enabled steps of the registry
in order: the source and series steps (Validate, [Preprocess], [Harmonize])
give its current series, every enabled product step reads it, and Export
writes the derivatives. The run configuration is one input, ``options``
(``{step name: Options as a dict}``); each node gets its own step's part, so
a changed option re-runs only the nodes of its step. The cohort maps the
subject workflow over the subjects and hands their rows and products to the
registered cohort steps of a run (the group table, [the image-gradient
tests]) when it covers the whole cohort (``cohort_steps``); each cohort task
takes those of its inputs it declares. Every node takes ``pipeline_version`` so that new package code means
new cache entries.
"""

from __future__ import annotations

from pydra.compose import workflow
from pydra.utils.general import get_fields

from dmriflow.interfaces.steps import REGISTRY
from dmriflow.interfaces.steps import cohort_steps as cohort_steps_of
from dmriflow.pipelines.image_gradient import ImageGradientGroup
from dmriflow.pipelines.progress import PROGRESS
from dmriflow.pipelines.steps import EXPORT_SLOTS, OUTPUT, TASKS, Export, GroupTable, Subject

#: The registered step whose product comes from its own phase (own submitter).
PHASE_STEP = "inference"
#: The Pydra task of each cohort step of a run, by its registered task name.
COHORT_TASKS = {task.__name__: task for task in (GroupTable, ImageGradientGroup)}


def step_options(options: dict) -> dict:
    """``{name: Options}`` of the JSON options input (defaults for absent steps)."""
    return {name: step.Options(**options.get(name, {})) for name, step in REGISTRY.items()}


def enabled(options: dict, kinds: tuple) -> list[str]:
    """Names of the enabled steps of these kinds, in registry order."""
    typed = step_options(options)
    return [n for n, s in REGISTRY.items() if s.kind in kinds and s.enabled(typed[n])]


def rows_only(options: dict) -> bool:
    """Whether Validate may keep only the mask rows: the fits are the series'
    only readers (no series step rewrites it, no step reads the whole grid)."""
    return not any(REGISTRY[n].grid or REGISTRY[n].kind == "series"
                   for n in enabled(options, ("series", "product")))


def add_series_steps(subject: Subject, options: dict, pipeline_version: str,
                     rows_only: bool = False):
    """Add the enabled source and series steps (Validate -> [Preprocess] ->
    [Harmonize]) to the workflow being built; return the subject's record.

    Every workflow that needs a subject's series uses this, so equal inputs
    give the same nodes and the cache serves them once (e.g. the inference
    phase and the main run)."""
    record = None
    for name in enabled(options, ("source", "series")):
        task = TASKS[name]
        if REGISTRY[name].kind == "source":
            node = task(subject=subject, options=options.get(name, {}), rows_only=rows_only,
                        pipeline_version=pipeline_version)
        else:
            node = task(subject=subject.key, record=record, options=options.get(name, {}),
                        pipeline_version=pipeline_version)
        # a node is named after its task class (Validate, ...): SLURM job names
        record = getattr(workflow.add(node, hooks=PROGRESS), OUTPUT["series"])
    return record


def subject_workflow(subject: Subject, output_dir: str, options: dict,
                     inference: dict | None = None, drop_series: bool = False,
                     pipeline_version: str = "", harmonization: str = "") -> tuple[dict, list]:
    """``harmonization``: the artefact's path as a plain text, for Export only (the
    options key the Harmonize node by the artefact's content, so a moved
    artefact changes this workflow's hash through this input alone)."""
    record = add_series_steps(subject, options, pipeline_version, rows_only(options))
    products = []
    for name in enabled(options, ("product",)):
        if name == PHASE_STEP:   # computed by its own phase (pipelines/inference.py)
            products.append(inference)
            continue
        node = TASKS[name](subject=subject.key, record=record, options=options.get(name, {}),
                           pipeline_version=pipeline_version)
        products.append(workflow.add(node, hooks=PROGRESS).product)
    if len(products) > EXPORT_SLOTS:
        raise ValueError(f"{len(products)} product steps enabled; Export has {EXPORT_SLOTS}")
    slots = {f"p{i}": p for i, p in enumerate(products)}
    export = workflow.add(Export(subject=subject, record=record, output_dir=output_dir,
                                 drop_series=drop_series, pipeline_version=pipeline_version,
                                 motion_options=options.get("motion", {}),
                                 harmonization=harmonization, **slots),
                          hooks=PROGRESS)
    return export.row, export.products


SubjectWorkflow = workflow.define(subject_workflow,
                                  outputs=["row", "products"], name="SubjectWorkflow")


def cohort_workflow(subjects: list[Subject], output_dir: str, options: dict,
                    extra_rows: list[dict] | None = None, inference: list | None = None,
                    drop_series: bool = False, cohort_steps: bool = True,
                    pipeline_version: str = "",
                    harmonization: str = "") -> tuple[str | None, list, str | None]:
    per_subject = SubjectWorkflow(output_dir=output_dir, options=options,
                                  drop_series=drop_series, pipeline_version=pipeline_version,
                                  harmonization=harmonization)
    # products of the inference phase (pipelines/inference.py), one per subject
    extra = {"inference": inference} if inference else {}
    split = per_subject.split(("subject",) + tuple(extra), subject=subjects, **extra)
    per = workflow.add(split.combine("subject"), name="subjects")
    given = {"rows": per.row, "products": per.products, "extra_rows": extra_rows,
             "output_dir": output_dir, "pipeline_version": pipeline_version}
    tables = {}
    # a run of some units of a cohort leaves the cohort steps to a run of all of them
    for step in cohort_steps_of(step_options(options)) if cohort_steps else []:
        task = COHORT_TASKS[step.task]
        names = {f.name for f in get_fields(task)}
        inputs = {k: v for k, v in given.items() if k in names}
        tables[step.name] = workflow.add(task(**inputs), hooks=PROGRESS).table
    return tables.get("group_table"), per.row, tables.get("image_gradient_group")


CohortWorkflow = workflow.define(cohort_workflow,
                                 outputs=["table", "rows", "image_gradient"], name="CohortWorkflow")
