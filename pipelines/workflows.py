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
from dmriflow.pipelines.progress import PROGRESS
from dmriflow.pipelines.steps import (DTI_MAX_BVAL, Export, FitRish, FitTensor, GroupTable,
                                      Preprocess, Validate)

#: The per-subject inputs that are split together over the cohort.
SUBJECT_FIELDS = ("subject", "out_parts", "dwi", "bval", "bvec", "mask", "sidecar")


@workflow.define(outputs=["row"])
def SubjectWorkflow(subject: str, out_parts: list, dwi: File, bval: File, bvec: File,
                    output_dir: str, mask: File | None = None, sidecar: File | None = None,
                    fit_method: str = "WLS", dti_max_bval: float = DTI_MAX_BVAL,
                    lmax: int = 0, harmonization: str = "", denoise: bool = False,
                    degibbs: bool = False, pipeline_version: str = "") -> dict:
    files = dict(dwi=dwi, bval=bval, bvec=bvec, mask=mask)
    pv = dict(subject=subject, pipeline_version=pipeline_version)
    record = workflow.add(Validate(sidecar=sidecar, **files, **pv), hooks=PROGRESS).record
    if denoise or degibbs:
        record = workflow.add(Preprocess(record=record, denoise=denoise, degibbs=degibbs, **pv),
                              hooks=PROGRESS).record
    if harmonization:
        record = workflow.add(Harmonize(record=record, artefact=harmonization, **pv),
                              hooks=PROGRESS).record
    tensor = workflow.add(FitTensor(record=record, fit_method=fit_method,
                                    max_bval=dti_max_bval, **pv), hooks=PROGRESS).tensor
    rish = workflow.add(FitRish(record=record, lmax=lmax, **pv), hooks=PROGRESS).rish
    return workflow.add(Export(out_parts=out_parts, record=record, tensor=tensor, rish=rish,
                               output_dir=output_dir, **pv), hooks=PROGRESS).row


@workflow.define(outputs=["table", "rows"])
def CohortWorkflow(subject: list[str], out_parts: list[list], dwi: list[File],
                   bval: list[File], bvec: list[File], mask: list, sidecar: list,
                   output_dir: str, extra_rows: list[dict] | None = None,
                   fit_method: str = "WLS", dti_max_bval: float = DTI_MAX_BVAL, lmax: int = 0,
                   harmonization: str = "", denoise: bool = False, degibbs: bool = False,
                   pipeline_version: str = "") -> tuple[str, list]:
    per_subject = SubjectWorkflow(output_dir=output_dir, fit_method=fit_method,
                                  dti_max_bval=dti_max_bval, lmax=lmax,
                                  harmonization=harmonization, denoise=denoise,
                                  degibbs=degibbs, pipeline_version=pipeline_version)
    split = per_subject.split(SUBJECT_FIELDS, subject=subject, out_parts=out_parts, dwi=dwi,
                              bval=bval, bvec=bvec, mask=mask, sidecar=sidecar)
    subjects = workflow.add(split.combine("subject"), name="subjects")
    table = workflow.add(GroupTable(rows=subjects.row, extra_rows=extra_rows,
                                    output_dir=output_dir, pipeline_version=pipeline_version),
                         hooks=PROGRESS)
    return table.table, subjects.row
