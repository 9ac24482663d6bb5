"""BIDS file names from entities, and entities from names: the one grammar.

Every derivative is described by its entities (``{"model": "tensor",
"param": "fa"}``), a suffix (``dwimap``) and an extension; the subject's own
input entities (:data:`INPUT_ENTITIES`, e.g. ``sub``, ``ses``, ``acq``) come
first. :mod:`dmriflow.pipelines.derivatives` writes files under these names;
the report, status and the Nipype interfaces read names back with
:func:`parse_name`. No other module builds or parses a derivative name.
"""

from __future__ import annotations

import os

#: Separators of the grammar: ``key-value`` pairs joined by ``_``.
ENTITY_SEP, VALUE_SEP = "_", "-"
#: Entities of an input DWI name kept in every derivative name, in BIDS order
#: (two series that differ only by ``echo-``, ``part-`` or ``chunk-`` are two
#: units whose derivatives keep those entities).
INPUT_ENTITIES = ("sub", "ses", "acq", "rec", "dir", "run", "echo", "part", "space", "chunk")
#: The order of entities in a name (BIDS: the subject's entities, then the
#: derivative's). An entity not listed here goes where ``desc`` goes, in the
#: order given, so a name never depends on the order of a dict (records
#: travel as JSON with sorted keys).
ENTITY_ORDER = INPUT_ENTITIES + ("model", "desc", "param")
_OTHER = ENTITY_ORDER.index("desc")
#: Extensions with a dot inside, matched before the last-dot rule.
DOUBLE_EXTENSIONS = (".nii.gz",)
#: Characters of a label besides BIDS' alphanumerics ("." is let through for
#: input labels written that way; no derivative label dmriflow makes has one).
LABEL_EXTRA = "."
#: Shells in names (RISH maps): ``desc-b<b>``, the b-value in s/mm^2, e.g.
#: ``model-rish_desc-b1000_param-l2_dwimap``; ``shell-`` is not a BIDS entity.
#: A fractional b-value (never made by the shell rounding, a multiple of 50)
#: writes its point as ``p`` (``b1000p5``): labels stay alphanumeric.
SHELL_ENTITY, SHELL_PREFIX, SHELL_POINT = "desc", "b", "p"
#: The entity of the first naming (``model-rish_shell-1000_param-l2``), read
#: only to recognise derivatives of older runs; never written.
LEGACY_SHELL_ENTITY = "shell"


def _check_label(kind: str, text: str) -> str:
    if not text or not all(c.isalnum() or c in LABEL_EXTRA for c in text):
        raise ValueError(f"BIDS {kind} must be alphanumeric, got {text!r}")
    return text


def ordered(entities: dict) -> list[tuple[str, str]]:
    """The entities as (key, value) pairs in :data:`ENTITY_ORDER`."""
    rank = {k: i for i, k in enumerate(ENTITY_ORDER)}
    return sorted(entities.items(), key=lambda kv: rank.get(kv[0], _OTHER))


def format_entities(entities: dict) -> str:
    """``{"param": "fa", "model": "tensor"}`` -> ``model-tensor_param-fa``."""
    return ENTITY_SEP.join(f"{_check_label('entity', str(k))}{VALUE_SEP}"
                           f"{_check_label('label', str(v))}" for k, v in ordered(entities))


def parse_entities(text: str) -> tuple[dict, str]:
    """``model-directions_desc-synthesized_gradients`` -> (entities, suffix
    ``gradients``); the suffix is "" when the text ends with an entity.

    The inverse of :func:`format_entities`: a text it could not have written (a
    part that is not ``key-label``, an empty or non-alphanumeric key, label or
    suffix) is a ValueError, so what is read back can always be written again."""
    entities, suffix = {}, ""
    parts = text.split(ENTITY_SEP) if text else []
    if parts and VALUE_SEP not in parts[-1]:
        suffix = _check_label("suffix", parts.pop())
    for part in parts:
        key, sep, value = part.partition(VALUE_SEP)
        if not sep:
            raise ValueError(f"{text!r}: {part!r} is not a key-value entity")
        entities[_check_label("entity", key)] = _check_label("label", value)
    return entities, suffix


def build_name(entities: dict, suffix: str = "", extension: str = "") -> str:
    """A file name: the entities (in :data:`ENTITY_ORDER`), the suffix, the extension."""
    stem = format_entities(entities)
    return stem + (ENTITY_SEP + _check_label("suffix", suffix) if suffix else "") + extension


def split_extension(name: str) -> tuple[str, str]:
    """(stem, extension) of a file name; ``.nii.gz`` counts as one extension."""
    for ext in DOUBLE_EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)], ext
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot and stem else (name, "")


def parse_name(name) -> tuple[dict, str, str]:
    """(entities, suffix, extension) of a BIDS file name or path."""
    stem, ext = split_extension(os.path.basename(os.fspath(name)))
    entities, suffix = parse_entities(stem)
    return entities, suffix, ext


def input_entities(path) -> dict:
    """The :data:`INPUT_ENTITIES` of an input file name (``{}`` for a name that
    is not BIDS, e.g. HCP's ``data.nii.gz``)."""
    try:
        entities, _, _ = parse_name(path)
    except ValueError:
        return {}
    return {k: entities[k] for k in INPUT_ENTITIES if k in entities}


def shell_entities(b) -> dict:
    """The entities naming a shell: ``1000`` -> ``{"desc": "b1000"}``."""
    value = float(b)
    if value < 0 or value != value:
        raise ValueError(f"a shell's b-value must be >= 0, got {b!r}")
    text = f"{value:.6f}".rstrip("0").rstrip(".").replace(".", SHELL_POINT)
    return {SHELL_ENTITY: SHELL_PREFIX + text}


def shell_of(entities: dict) -> float | None:
    """The b-value a name's entities give its shell (``desc-b1000`` -> 1000.0;
    an older run's ``shell-1000`` as well); None when they name none."""
    label = entities.get(SHELL_ENTITY, "")
    digits = label[len(SHELL_PREFIX):]
    if label.startswith(SHELL_PREFIX) and digits[:1].isdigit():
        try:
            return float(digits.replace(SHELL_POINT, ".", 1))
        except ValueError:
            return None
    legacy = entities.get(LEGACY_SHELL_ENTITY)
    try:
        return None if legacy is None else float(legacy)
    except ValueError:
        return None
