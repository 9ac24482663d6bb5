"""The Pydra face of the registered steps, the Export task and the group table.

Every registered step (:mod:`dmriflow.interfaces.steps`) becomes one Pydra
task class named after it (``Validate``, ``FitTensor``, ...) by
:func:`make_task`. Tasks run in their own node folder (the cwd), take the
step's options as ONE dict input (its ``Options`` as plain JSON) and hand on
small dict records. A subject enters the graph as one typed unit
(:class:`Subject`) whose files the engine hashes by content.

Tasks are *guarded*: an exception inside one subject's task becomes a
``{"status": "failed", ...}`` record (and a marker file in the node folder so
the execution layer can discard it before the next run); a task whose
upstream record failed passes that failure on without computing. Thus one
bad subject never stops the cohort, and its reason reaches the group table.

Every task function is a module-level name of this module (``fit_tensor_step``
etc., registered in the module's globals when generated): the engine ships a
task to a worker process with cloudpickle and checks that its hash did not
change on the way. A function reachable by its module and name travels by
reference and hashes from its source in both processes; one that is not
travels by value, and cloudpickle >= 3.1.3 gives its code the file name
``<dynamic-code>``, so pydra hashes the bytecode instead and every job fails.
The generated functions share their source, so each carries its step's name
as an input (``step_name``): different steps never share a cache entry.
``tests/test_task_hashes.py`` checks every task of the pipelines.
"""

from __future__ import annotations

import functools
import os
import traceback
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

from pydra.compose import python
from pydra.utils.hash import hash_single, register_serializer

from dmriflow.interfaces import stepfiles
from dmriflow.interfaces.bids_names import input_entities
from dmriflow.interfaces.errors import InputError
from dmriflow.interfaces.steps import REGISTRY, Product, Step
from dmriflow.interfaces.steps.motion import Options as MotionOptions, uncorrected_warning
from dmriflow.pipelines import derivatives
from dmriflow.pipelines.file_hashes import file_digest
from dmriflow.pipelines.progress import PROGRESS_ENV, log_line

#: Written into a node folder whose record is a failure (see execution.clean_cache).
FAILED_MARKER = "_dmriflow_failed"
#: Written into every node folder: the step's name, so folders can be found by step.
STEP_MARKER = "_dmriflow_step"
#: Written into a node folder whose series copy was dropped (--drop-series): the
#: next run removes the folder, so the step recomputes it if it is needed again.
DROPPED_MARKER = "_dmriflow_series_dropped"
#: Output name of the tasks of each step kind.
OUTPUT = {"source": "record", "series": "record", "product": "product"}


@dataclass(frozen=True)
class Subject:
    """One subject (or subject-session) as the engine carries it: its name, its
    output folder parts, the input entities its derivative names keep, and
    its files (absolute paths, hashed by content: :func:`_subject_bytes`;
    plain paths, as fileformats' ``File`` costs 0.3 ms each to build)."""

    key: str
    out_parts: tuple
    entities: dict
    dwi: Path
    bval: Path
    bvec: Path
    mask: Path | None = None
    sidecar: Path | None = None

    @classmethod
    def of(cls, s) -> Subject:
        """The unit of a discovered subject (:class:`~dmriflow.pipelines.inputs.SubjectInputs`)."""
        entities = {"sub": s.label, **({"ses": s.session} if s.session else {}),
                    **{k: v for k, v in input_entities(s.dwi).items()
                       if k not in ("sub", "ses")}}
        return cls(s.key, tuple(s.out_parts), entities,
                   *(None if p is None else Path(os.path.abspath(p))
                     for p in (s.dwi, s.bval, s.bvec, s.mask, s.sidecar)))


@register_serializer(Subject)
def _subject_bytes(subject: Subject, cache) -> Iterator[bytes]:
    """What the engine hashes of a :class:`Subject`: its fields, each file by its
    name and content digest, not its folder, as Pydra hashes a file
    (:mod:`~dmriflow.pipelines.file_hashes`: no lock file per file)."""
    yield b"dmriflow.Subject:{"
    for f in fields(subject):
        value = getattr(subject, f.name)
        yield f"{f.name}=".encode()
        if isinstance(value, Path):
            yield f"file:{value.name}:".encode() + file_digest(value)
        else:
            yield hash_single(value, cache)
        yield b";"
    yield b"}"


class ContentKeyed(str):
    """A path option (a str, as options travel) whose cache key is ``key``, a hash
    of the content it names, not the path: the same artefact moved elsewhere
    keeps its nodes' cache entries, and new content under the same path gets
    new ones."""

    def __new__(cls, path: str, key: str):
        obj = super().__new__(cls, path)
        obj.key = key
        return obj

    def __reduce__(self):           # pickled (workers) and deep-copied with its key
        return (type(self), (str(self), self.key))


@register_serializer(ContentKeyed)
def _content_keyed_bytes(obj: ContentKeyed, cache):
    yield f"{__name__}.ContentKeyed:{obj.key}".encode()


def artefact_option(path: str) -> str:
    """The ``--harmonization`` option as nodes get it: the absolute folder (they
    run in their own folder), keyed by its content
    (:func:`~dmriflow.interfaces.harmonize.artefact_fingerprint`); an unreadable
    one by its path (applying it fails each subject with the reason)."""
    from dmriflow.interfaces.harmonize import artefact_fingerprint
    folder = str(Path(path).resolve())
    fingerprint = artefact_fingerprint(folder)
    return ContentKeyed(folder, "sha256:" + fingerprint) if fingerprint else folder


def _failure(step: str, subject: str, exc: BaseException | None = None, upstream=None) -> dict:
    Path(FAILED_MARKER).write_text(step)
    if upstream is not None:
        return dict(upstream)
    return {"subject": subject, "status": "failed", "failed_step": step,
            "error": str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()}


def guarded(step: str):
    """Turn exceptions into failure records and pass upstream failures on, for a
    task function that is not a registered step (e.g. harmonization features).

    Store the result under the function's own name (``@guarded`` on a
    module-level ``def``), so the wrapper is reachable by module and name.
    """
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(**kwargs):
            Path(STEP_MARKER).write_text(step)
            subject = kwargs.get("subject", "")
            for value in kwargs.values():
                if isinstance(value, dict) and value.get("status") == "failed":
                    return _failure(step, subject, upstream=value)
            try:
                return fn(**kwargs)
            except Exception as exc:  # noqa: BLE001 - any subject-level error is reported
                return _failure(step, subject, exc)
        return wrapper
    return deco


def run_step(name: str, subject: str, series, options: dict, **kwargs) -> dict:
    """Run one registered step in the cwd, guarded; its record (a product's as
    :meth:`Product.record`). A failed upstream record is passed on."""
    step = REGISTRY[name]
    Path(STEP_MARKER).write_text(name)
    if isinstance(series, dict) and series.get("status") == "failed":
        return _failure(name, subject, upstream=series)
    try:
        out = step.run(series, step.Options(**options), Path.cwd(), **kwargs)
    except Exception as exc:  # noqa: BLE001 - any subject-level error is reported
        return _failure(name, subject, exc)
    return out.record(subject) if isinstance(out, Product) else out


def _source_task(name: str):
    def task(subject: Subject, options: dict, rows_only: bool = False, step_name: str = name,
             pipeline_version: str = "") -> dict:
        """Read and check the subject's input files; start its record."""
        return run_step(step_name, subject.key, subject, options, rows_only=rows_only)
    return task


def _record_task(name: str):
    def task(subject: str, record: dict, options: dict, step_name: str = name,
             pipeline_version: str = "") -> dict:
        """Run the step on the subject's current series (its record)."""
        return run_step(step_name, subject, record, options)
    return task


def make_task(step: Step):
    """The Pydra task class of a registered step, named ``step.task``; its function
    is stored in this module as ``<step>_step`` (reachable by module and name)."""
    fn = (_source_task if step.kind == "source" else _record_task)(step.name)
    fn.__name__ = fn.__qualname__ = f"{step.name}_step"
    fn.__module__ = __name__
    globals()[fn.__name__] = fn
    return python.define(fn, outputs=[OUTPUT[step.kind]], name=step.task)


#: The task class of every registered step, by step name.
TASKS = {name: make_task(step) for name, step in REGISTRY.items()}
globals().update({REGISTRY[name].task: task for name, task in TASKS.items()})


def load_series(record: dict):
    """The DWI a step works on: the current series of the subject's record."""
    return stepfiles.read_series(record["series"])


def drop_series_copies(record: dict) -> int:
    """Delete the series files dmriflow wrote for a subject in the cache
    (Validate's uncompressed copy of the input, a Preprocess/Harmonize series),
    marking each node folder (:data:`DROPPED_MARKER`); returns bytes freed.
    Only files in a node folder that carries a step marker are touched: never
    an input."""
    files = {record.get("read", {}).get("copy", "")}
    if record.get("history"):
        files.add(record["series"]["dwi"])
    freed = 0
    for f in filter(None, files):
        path = Path(f)
        if not (path.parent / STEP_MARKER).exists() or not path.exists():
            continue
        (path.parent / DROPPED_MARKER).write_text(path.name)
        freed += path.stat().st_size
        path.unlink()
    return freed


#: Product slots of :class:`Export` (inputs ``p0`` ... ``p7``, filled in registry
#: order): Pydra resolves a lazy value given as an input, not one inside a list.
EXPORT_SLOTS = 8


def export_step(subject: Subject, record: dict, output_dir: str,
                p0: dict | None = None, p1: dict | None = None, p2: dict | None = None,
                p3: dict | None = None, p4: dict | None = None, p5: dict | None = None,
                p6: dict | None = None, p7: dict | None = None,
                drop_series: bool = False, pipeline_version: str = "",
                motion_options: dict | None = None,
                harmonization: str = "") -> tuple[dict, list]:
    """Copy a subject's maps into the derivatives tree, each with a sidecar;
    (the subject's status row, the product records it exported).

    ``p0``...: the product records of the subject's product steps. A
    previous export is removed first, the files its status file lists, then
    that file (:func:`~dmriflow.pipelines.derivatives.retire_export`), and the
    new status file written last (done, or failed with the reason), so a
    killed run never shows a subject as done with missing or mixed files. An identical complete export (same
    ``export_id``) is not redone. With ``drop_series`` the subject's series
    copies in the cache are deleted once it is done (see
    :func:`drop_series_copies`). ``motion_options``: the run's motion-step
    options; a raw input series run without motion correction gets its
    warning (row ``warnings``, and one line in the run's log naming the subject).
    ``harmonization``: where the run's artefact is now (a Harmonize result
    served from the cache names where it was when computed: its cache key is
    the artefact's content), as the sidecars name it.
    """
    Path(STEP_MARKER).write_text("export")
    warning = uncorrected_warning(record, MotionOptions(**(motion_options or {})))
    if warning:
        record = {**record, "warnings": list(record.get("warnings", [])) + [warning]}
        log_line(f"{subject.key}: warning: {warning}",
                 to_stderr=os.environ.get(PROGRESS_ENV, "1") != "0")
    products = [p for p in (p0, p1, p2, p3, p4, p5, p6, p7) if p is not None]
    eid = derivatives.export_id(record, *products, out_parts=list(subject.out_parts),
                                output_dir=output_dir, pipeline_version=pipeline_version,
                                **({"harmonization": harmonization} if harmonization else {}))
    status_file = derivatives.status_path(output_dir, subject.out_parts, subject.key)
    previous = derivatives.previous_export(status_file, eid, output_dir)
    if previous is not None:
        if previous.get("status") != "done":
            Path(FAILED_MARKER).write_text("export")
        return previous, products
    derivatives.retire_export(status_file, output_dir, subject.out_parts)
    try:
        row = derivatives.export_subject(subject, record, products, output_dir,
                                         pipeline_version, harmonization)
    except Exception as exc:  # noqa: BLE001 - an export problem fails this subject only
        row = {"subject": subject.key, "status": "failed", "failed_step": "export",
               "error": f"{type(exc).__name__}: {exc}", "derivatives": []}
        if record.get("status") == "ok":
            row.update(record["census"])
    if row["status"] != "done":
        Path(FAILED_MARKER).write_text("export")
    row["pipeline_version"] = pipeline_version
    row["export_id"] = eid
    derivatives.write_status(row, output_dir, subject.out_parts)
    if drop_series and row["status"] == "done":
        drop_series_copies(record)
    return row, products


Export = python.define(export_step, outputs=["row", "products"], name="Export")


def group_table_step(rows: list[dict], output_dir: str, extra_rows: list[dict] | None = None,
                     pipeline_version: str = "") -> str:
    """Write OUTPUT/dmriflow/group/subjects.tsv, one row per subject.

    ``extra_rows`` are subjects that failed before entering the graph.
    """
    Path(STEP_MARKER).write_text("group")
    rows = list(rows) + list(extra_rows or [])
    if any(r.get("status") != "done" for r in rows):
        Path(FAILED_MARKER).write_text("group")
    return str(derivatives.write_subjects_table(rows, output_dir))


GroupTable = python.define(group_table_step, outputs=["table"], name="GroupTable")
