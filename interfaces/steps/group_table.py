"""Group table: every subject's status row in ``group/subjects.tsv`` (a cohort step).

Its Pydra task is :data:`dmriflow.pipelines.steps.GroupTable`.
"""

from __future__ import annotations

from .base import CohortStep, register

STEP = register(CohortStep("group_table", "GroupTable"))
