"""What a step is: its options, its product, its registration.

A step (validate, tensor, rish, ...) is one module of this package that
declares an ``Options`` dataclass, a ``run`` function and one
:class:`Step` registration (``STEP = register(Step(...))``). Everything the
engines and the user see of a step is generated from that declaration: the
Pydra task (:mod:`dmriflow.pipelines.steps`), the Nipype interface
(:mod:`dmriflow.interfaces.nipype_interfaces`), the command-line options and
the config-file keys (:mod:`dmriflow.pipelines.cli`). Step modules never
import pydra or nipype.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..bids_names import parse_entities

#: dataclass-field metadata key holding an option's :class:`OptionInfo`.
OPTION_KEY = "dmriflow"
#: Step kinds: ``source`` reads the subject's input files and starts its
#: record; ``series`` hands on a new current series (a record); ``product``
#: reads the current series and returns a :class:`Product`.
KINDS = ("source", "series", "product")
#: Command-line commands that show a step's options by default.
ALL_COMMANDS = ("run", "demo", "harmonize")
#: Suffix and extension of every map derivative (BEP016 ``_dwimap``).
MAP_SUFFIX, MAP_EXTENSION = "dwimap", ".nii.gz"
#: Extension of every table derivative.
TABLE_EXTENSION = ".tsv"


@dataclass(frozen=True)
class OptionInfo:
    """How an option is shown: help text, units, choices, command-line flag.

    ``flag`` defaults to ``--name-with-dashes``; ``invert``: the flag is a
    switch that sets the (default True) option False; ``cli=False``: the
    option is set by code or the config file only; ``commands``: the
    commands that show it (default: its step's); ``cli_default``: a function
    giving the command line's default when it differs from the code's;
    ``aliases``: further flags for the same option (``-w`` for ``--cache-dir``).
    """

    help: str
    units: str = ""
    choices: tuple = ()
    flag: str = ""
    metavar: str | None = None
    invert: bool = False
    cli: bool = True
    commands: tuple = ()
    cli_default: Callable | None = None
    required: bool = False
    nargs: str | None = None
    aliases: tuple = ()


def option(default, help: str, **info) -> dataclasses.Field:
    """A dataclass field that is a user-facing option (see :class:`OptionInfo`)."""
    meta = {OPTION_KEY: OptionInfo(help=help, **info)}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def options_of(cls) -> list[tuple[dataclasses.Field, OptionInfo]]:
    """The option fields of an Options dataclass, in declaration order."""
    return [(f, f.metadata[OPTION_KEY]) for f in dataclasses.fields(cls)
            if OPTION_KEY in f.metadata]


def field_default(f: dataclasses.Field):
    """The default of a dataclass field (its factory's value; None without one)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


#: Python type of an option, by the first type of its annotation.
OPTION_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "list[float]": float,
                "list[str]": str}


def option_type(f: dataclasses.Field) -> type:
    """bool, int, float or str: the type of an option field (``float | None``: float;
    ``list[float] | None``: float, its items')."""
    annotation = f.type if isinstance(f.type, str) else f.type.__name__
    return OPTION_TYPES[annotation.split("|")[0].strip()]


def flag_of(f: dataclasses.Field, info: OptionInfo) -> str:
    return info.flag or "--" + f.name.replace("_", "-")


@dataclass
class NoOptions:
    """Options of a step that has none."""


# ----------------------------------------------------------------------------
# Products
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Derivative:
    """One output file of a step, named by its BIDS entities (the subject's own
    entities are added on export): ``{"model": "tensor", "param": "fa"}``.
    ``parameters`` are added to the product's in this file's sidecar;
    ``suffix``: the BIDS suffix (default: ``dwimap`` for a map, none for a table)."""

    entities: dict
    path: str
    parameters: dict = field(default_factory=dict)
    suffix: str = ""


@dataclass
class Product:
    """What a ``product`` step returns: maps (NIfTI) and tables (TSV) to export,
    row fields for the subject table, parameters for every sidecar, QC flags."""

    step: str
    maps: list[Derivative] = field(default_factory=list)
    tables: list[Derivative] = field(default_factory=list)
    row: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    qc_flags: list[str] = field(default_factory=list)

    def record(self, subject: str) -> dict:
        """Plain JSON types, as engines hand it on (see :func:`product_from_record`)."""
        def files(ds):
            return [{"entities": dict(d.entities), "path": d.path, "suffix": d.suffix,
                     "parameters": dict(d.parameters)} for d in ds]
        return {"subject": subject, "status": "ok", "step": self.step,
                "maps": files(self.maps), "tables": files(self.tables), "row": dict(self.row),
                "parameters": dict(self.parameters), "qc_flags": list(self.qc_flags)}


def derivatives_from_text(files: dict, parameters: dict | None = None) -> list[Derivative]:
    """Derivatives of ``{entities text: path}`` (e.g. ``model-x_desc-y_gradients``)."""
    out = []
    for text, path in files.items():
        entities, suffix = parse_entities(text)
        out.append(Derivative(entities, path, dict(parameters or {}), suffix))
    return out


def product_from_record(record: dict) -> Product:
    """The Product of a record written by :meth:`Product.record` (files may also
    be given as ``{entities text: path}``, see :func:`derivatives_from_text`)."""
    def files(items):
        if isinstance(items, dict):
            return derivatives_from_text(items)
        return [Derivative(dict(d["entities"]), d["path"], dict(d.get("parameters", {})),
                           d.get("suffix", "")) for d in items]
    return Product(step=record["step"], maps=files(record.get("maps", [])),
                   tables=files(record.get("tables", [])), row=dict(record.get("row", {})),
                   parameters=dict(record.get("parameters", {})),
                   qc_flags=list(record.get("qc_flags", [])))


@dataclass(frozen=True)
class Schema:
    """What a step's Product must hold: entity keys of every map and table,
    row fields it always fills, parameters it always records."""

    map_entities: frozenset = frozenset()
    table_entities: frozenset = frozenset()
    row: frozenset = frozenset()
    parameters: frozenset = frozenset()

    def check(self, product: Product) -> list[str]:
        """What is wrong with ``product`` (empty when it conforms)."""
        bad = []
        for kind, items, keys in (("map", product.maps, self.map_entities),
                                  ("table", product.tables, self.table_entities)):
            for d in items:
                if set(d.entities) - keys or not Path(d.path).is_file():
                    bad.append(f"{kind} {d.entities}: entities outside {sorted(keys)} or "
                               f"no file {os.path.basename(d.path)}")
        bad += [f"row lacks {k}" for k in sorted(self.row - set(product.row))]
        bad += [f"parameters lack {k}" for k in sorted(self.parameters - set(product.parameters))]
        return bad


# ----------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------
def _always(options) -> bool:
    return True


@dataclass(frozen=True)
class Step:
    """One registered step.

    ``run(series, options, out_dir)``: ``series`` is the subject's record (for
    a ``source`` step: its :class:`~dmriflow.interfaces.steps.subject.Subject`);
    it writes into ``out_dir`` and returns a record (source, series steps) or
    a :class:`Product`. ``task``: the engine task's name (node names, progress
    lines, SLURM job names). ``enabled(options)``: whether a run with these
    options goes through the step. ``grid``: the step reads voxels outside the
    mask (Validate then keeps the whole grid). ``example``: options that turn
    the step on for the phantom (the contract test runs every step with them).
    """

    name: str
    task: str
    kind: str
    Options: type
    run: Callable
    enabled: Callable = _always
    schema: Schema = Schema()
    grid: bool = False
    commands: tuple = ALL_COMMANDS
    example: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"step {self.name}: kind must be one of {KINDS}")


@dataclass(frozen=True)
class CohortStep:
    """One registered cohort step: it runs once over every subject's results.

    ``task``: the engine task's name (its Pydra task is written in
    :mod:`dmriflow.pipelines`, found by this name). ``enabled(options)``:
    whether a run with these subject-step options (``{step: Options}``) goes
    through it. ``commands``: where it runs and where its options are shown;
    a step of the ``run`` command is added to every cohort workflow, one of
    ``harmonize fit`` is that command's fit.
    """

    name: str
    task: str
    Options: type = NoOptions
    enabled: Callable = _always
    commands: tuple = ALL_COMMANDS


#: Every registered step by name, in the order a subject goes through them.
REGISTRY: dict[str, Step] = {}
#: Every registered cohort step by name, in the order a run goes through them.
COHORT_REGISTRY: dict[str, CohortStep] = {}


def register(step: Step | CohortStep) -> Step | CohortStep:
    """Add a step to :data:`REGISTRY` (a cohort step to :data:`COHORT_REGISTRY`),
    once; option names must be new across both."""
    registry = COHORT_REGISTRY if isinstance(step, CohortStep) else REGISTRY
    if step.name in REGISTRY or step.name in COHORT_REGISTRY:
        raise ValueError(f"step {step.name!r} is registered twice")
    taken = {f.name: s.name for s in (*REGISTRY.values(), *COHORT_REGISTRY.values())
             for f, _ in options_of(s.Options)}
    clash = [f.name for f, _ in options_of(step.Options) if f.name in taken]
    if clash:
        raise ValueError(f"step {step.name!r}: option(s) {clash} already declared by "
                         f"{[taken[c] for c in clash]}")
    registry[step.name] = step
    return step
