"""One grammar for input and derivative names: a contract between discovery and bids_names.

Discovery (``pipelines/inputs.py``) finds a BIDS dataset's files with
bids2table's index but reads every name with :mod:`dmriflow.interfaces.bids_names`,
the grammar the derivative names are written in. Each name below goes through
both paths, discovery (the unit's subject, session and series entities, and the
entities its derivative names keep, :meth:`Subject.of`) and ``parse_name``, and
they must agree; for a valid name the unit's key is the prefix of its derivative
names. Names outside the grammar are no series: their unit fails naming the file
(one of them, ``..._extra_...``, is a name bids2table's parser reads, skipping
the part that is not ``key-label``: discovery with that parser gave the unit
``acq-multi`` in its key while its derivative names had none).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmriflow.interfaces.bids_names import (INPUT_ENTITIES, format_entities, input_entities,
                                            parse_name)
from dmriflow.pipelines.inputs import SERIES_ENTITIES, UNNAMED, discover
from dmriflow.pipelines.steps import Subject

#: Odd but valid DWI names: every input entity, entity order variants, labels
#: with digits (kept as written: ``run-01``), ``desc-``, ``.nii``, a session.
VALID = [
    "sub-01_acq-multi_rec-mag_dir-AP_run-1_echo-2_part-phase_space-T1w_chunk-3_dwi.nii.gz",
    "sub-01_run-2_dir-PA_acq-b1000x64_dwi.nii.gz",
    "sub-01_chunk-01_echo-1_dwi.nii.gz",
    "sub-01_acq-2p5mm_run-007_part-mag_dwi.nii",
    "sub-01_space-T1w_desc-preproc_dwi.nii.gz",
    "sub-01_ses-20240101_dir-AP_run-01_dwi.nii.gz",
    "sub-1a2b_ses-pre_echo-1_dwi.nii.gz",
]
#: DWI image names outside the grammar (bids2table's parser reads the first).
INVALID = [
    "sub-01_acq-multi_extra_dwi.nii.gz",        # a part that is not key-label
    "sub-01__run-1_dwi.nii.gz",                 # an empty part
    "sub-01_acq-a+b_dwi.nii.gz",                # a label that is not alphanumeric
    "sub-01_acq-_dwi.nii.gz",                   # an empty label
    "sub-01_-x_dwi.nii.gz",                     # an empty key
]
#: The entity of the sibling series every dataset below has (so the odd series is
#: one of several and its key carries its series entities).
SIBLING = {"acq": "sibling"}


def dataset(root: Path, name: str) -> Path:
    """A BIDS dataset whose subject/session (from ``name``'s leading parts) has the
    series ``name`` and a sibling series; files are never read (discovery names
    files only). Returns the path of ``name``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t",
                                                               "BIDSVersion": "1.9.0"}))
    folders = [p for p in name.split("_") if p.startswith(("sub-", "ses-"))]
    folder = root.joinpath(*folders, "dwi")
    folder.mkdir(parents=True, exist_ok=True)
    sibling = "_".join(folders + [format_entities(SIBLING), "dwi.nii.gz"])
    for image in (name, sibling):
        stem = image.removesuffix(".gz").removesuffix(".nii")
        for path in (folder / image, folder / f"{stem}.bval", folder / f"{stem}.bvec"):
            path.write_text("0")
    return folder / name


def unit_of(units, path: Path):
    [unit] = [u for u in units if u.dwi == str(path)]
    return unit


@pytest.mark.parametrize("name", VALID)
def test_a_valid_name_is_recorded_as_bids_names_parses_it(tmp_path, name):
    path = dataset(tmp_path / "bids", name)
    units = discover(tmp_path / "bids")
    unit = unit_of(units, path)
    entities, suffix, ext = parse_name(path)
    assert (suffix, unit.problem) == ("dwi", None)
    assert (unit.label, unit.session) == (entities["sub"], entities.get("ses"))
    assert unit.series == {k: v for k, v in entities.items() if k in SERIES_ENTITIES}
    kept = Subject.of(unit).entities                   # what its derivative names carry
    assert kept == {k: v for k, v in entities.items() if k in INPUT_ENTITIES}
    assert kept == input_entities(path)
    assert format_entities(kept) == unit.key           # names and key cannot disagree
    assert len({u.key for u in units}) == len(units) == 2


@pytest.mark.parametrize("name", INVALID)
def test_a_name_outside_the_grammar_is_no_series_and_its_unit_fails_naming_it(tmp_path, name):
    path = dataset(tmp_path / "bids", name)
    with pytest.raises(ValueError):
        parse_name(path)
    assert input_entities(path) == {}
    units = discover(tmp_path / "bids")
    unit = unit_of(units, path)
    assert unit.series == {} and unit.key == "sub-01"   # its folder's subject only
    assert format_entities(Subject.of(unit).entities) == unit.key
    assert unit.problem == f"{path}: {UNNAMED}"
    [sibling] = [u for u in units if u is not unit]
    assert sibling.problem is None and sibling.key == "sub-01_" + format_entities(SIBLING)


def test_the_invalid_names_include_one_bids2table_reads_differently():
    """The contract above is not vacuous: bids2table's parser (which discovery
    used before) reads ``sub-01_acq-multi_extra_dwi`` as a series with
    ``acq-multi``, which bids_names rejects."""
    from bids2table import parse_bids_entities
    name = INVALID[0]
    parsed = parse_bids_entities(Path("sub-01", "dwi", name))
    assert (parsed["sub"], parsed["acq"], parsed["suffix"]) == ("01", "multi", "dwi")
    with pytest.raises(ValueError):
        parse_name(name)
