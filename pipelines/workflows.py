"""Pydra workflows: one subject (validate -> tensor, RISH -> export) and the cohort.

The cohort maps the subject workflow over subjects with a scalar splitter on
(subject, files...), so every file input is hashed by content, and combines
the per-subject rows into the group table. Every node takes
``pipeline_version`` so that new package code means new cache entries.
"""

from __future__ import annotations

from fileformats.generic import File
from pydra.compose import workflow

from dmriflow.pipelines.harmonization import Harmonize
from dmriflow.pipelines.image_gradient import ImageGradient, ImageGradientGroup
from dmriflow.pipelines.progress import PROGRESS
from dmriflow.pipelines.steps import (DEFAULT_WLS_ITERATIONS, DTI_MAX_BVAL, SUBJECT_FIELDS, Export,
                                      FitRish, FitTensor, GroupTable, Preprocess, Validate)


def add_series_steps(files: dict, pv: dict, denoise: bool = False, degibbs: bool = False,
                     harmonization: str = "", exclude_outliers: bool = True,
                     fix_gradients: bool = False, rows_only: bool = False):
    """Add Validate -> [Preprocess] -> [Harmonize] to the workflow being built;
    return the record of the subject's current series.

    Every workflow that needs a subject's series uses this, so equal inputs
    give the same nodes and the cache serves them once (e.g. the inference
    phase and the main run). ``rows_only``: the tensor and RISH fits are the
    series' only readers, so Validate may keep just the mask rows."""
    rows_only = rows_only and not (denoise or degibbs or harmonization)
    record = workflow.add(Validate(**files, exclude_outliers=exclude_outliers,
                                   fix_gradients=fix_gradients, rows_only=rows_only, **pv),
                          hooks=PROGRESS).record
    if denoise or degibbs:
        record = workflow.add(Preprocess(record=record, denoise=denoise, degibbs=degibbs, **pv),
                              hooks=PROGRESS).record
    if harmonization:
        record = workflow.add(Harmonize(record=record, artefact=harmonization, **pv),
                              hooks=PROGRESS).record
    return record


def subject_workflow(subject: str, out_parts: list, dwi: File, bval: File, bvec: File,
                     output_dir: str, mask: File | None = None, sidecar: File | None = None,
                     fit_method: str = "WLS", dti_max_bval: float = DTI_MAX_BVAL,
                     lmax: int = 0, harmonization: str = "", denoise: bool = False,
                     degibbs: bool = False, image_gradient: bool = False,
                     image_gradient_estimators: list | None = None,
                     image_gradient_timing: dict | None = None,
                     image_gradient_max_voxels: int = 0, inference: dict | None = None,
                     wls_iterations: int = DEFAULT_WLS_ITERATIONS, exclude_outliers: bool = True,
                     fix_gradients: bool = False,
                     drop_series: bool = False,
                     pipeline_version: str = "") -> tuple[dict, dict | None]:
    pv = dict(subject=subject, pipeline_version=pipeline_version)
    # image gradient and inference read voxels outside the mask: the whole grid
    rows_only = not image_gradient and inference is None
    record = add_series_steps(dict(dwi=dwi, bval=bval, bvec=bvec, mask=mask, sidecar=sidecar),
                              pv, denoise=denoise, degibbs=degibbs, harmonization=harmonization,
                              exclude_outliers=exclude_outliers, fix_gradients=fix_gradients,
                              rows_only=rows_only)
    tensor = workflow.add(FitTensor(record=record, fit_method=fit_method,
                                    max_bval=dti_max_bval, n_iter=wls_iterations, **pv),
                          hooks=PROGRESS).tensor
    rish = workflow.add(FitRish(record=record, lmax=lmax, **pv), hooks=PROGRESS).rish
    gradient = None
    if image_gradient:
        gradient = workflow.add(ImageGradient(record=record, estimators=image_gradient_estimators,
                                              timing=image_gradient_timing,
                                              max_voxels=image_gradient_max_voxels, **pv),
                                hooks=PROGRESS).image_gradient
    row = workflow.add(Export(out_parts=out_parts, record=record, tensor=tensor, rish=rish,
                              image_gradient=gradient, inference=inference,
                              output_dir=output_dir, drop_series=drop_series, **pv),
                       hooks=PROGRESS).row
    return row, gradient


SubjectWorkflow = workflow.define(subject_workflow,
                                  outputs=["row", "image_gradient"], name="SubjectWorkflow")


def cohort_workflow(subject: list[str], out_parts: list[list], dwi: list[File],
                    bval: list[File], bvec: list[File], mask: list, sidecar: list,
                    output_dir: str, extra_rows: list[dict] | None = None,
                    fit_method: str = "WLS", dti_max_bval: float = DTI_MAX_BVAL, lmax: int = 0,
                    harmonization: str = "", denoise: bool = False, degibbs: bool = False,
                    image_gradient: bool = False, image_gradient_estimators: list | None = None,
                    image_gradient_timing: dict | None = None,
                    image_gradient_max_voxels: int = 0, inference: list | None = None,
                    wls_iterations: int = DEFAULT_WLS_ITERATIONS, exclude_outliers: bool = True,
                    fix_gradients: bool = False,
                    drop_series: bool = False,
                    pipeline_version: str = "") -> tuple[str, list, str | None]:
    per_subject = SubjectWorkflow(output_dir=output_dir, fit_method=fit_method,
                                  dti_max_bval=dti_max_bval, lmax=lmax,
                                  harmonization=harmonization, denoise=denoise,
                                  degibbs=degibbs, image_gradient=image_gradient,
                                  image_gradient_estimators=image_gradient_estimators,
                                  image_gradient_timing=image_gradient_timing,
                                  image_gradient_max_voxels=image_gradient_max_voxels,
                                  wls_iterations=wls_iterations,
                                  exclude_outliers=exclude_outliers,
                                  fix_gradients=fix_gradients,
                                  drop_series=drop_series, pipeline_version=pipeline_version)
    # products of the inference phase (pipelines/inference.py), one per subject
    extra = {"inference": inference} if inference else {}
    split = per_subject.split(SUBJECT_FIELDS + tuple(extra), subject=subject,
                              out_parts=out_parts, dwi=dwi, bval=bval, bvec=bvec, mask=mask,
                              sidecar=sidecar, **extra)
    subjects = workflow.add(split.combine("subject"), name="subjects")
    table = workflow.add(GroupTable(rows=subjects.row, extra_rows=extra_rows,
                                    output_dir=output_dir, pipeline_version=pipeline_version),
                         hooks=PROGRESS)
    gradient_table = None
    if image_gradient:
        gradient_table = workflow.add(ImageGradientGroup(products=subjects.image_gradient,
                                                         output_dir=output_dir,
                                                         pipeline_version=pipeline_version),
                                      hooks=PROGRESS).table
    return table.table, subjects.row, gradient_table


CohortWorkflow = workflow.define(cohort_workflow,
                                 outputs=["table", "rows", "image_gradient"], name="CohortWorkflow")
