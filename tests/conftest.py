"""Shared fixtures: paths to the real data beside the project; system parts."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA} (../shared/data)")
    return SHARED_DATA


def system_part_missing(reason: str, require_env: str):
    """Skip a test whose system part (SLURM, Docker) is missing, with the reason;
    fail instead where ``require_env`` is set to 1 (CI provisions the part)."""
    if os.environ.get(require_env) == "1":
        pytest.fail(f"{reason} ({require_env}=1)")
    pytest.skip(reason)


#: Group-table columns that name the run (code version) rather than hold a result.
RUN_COLUMNS = ("pipeline_version",)


def assert_same_group_table(got: pd.DataFrame, want: pd.DataFrame, rtol: float, atol: float):
    """Same columns, subjects, statuses and text fields; numbers within tolerance."""
    assert list(got.columns) == list(want.columns)
    assert got["subject"].tolist() == want["subject"].tolist()
    for col in want.columns:
        if col in RUN_COLUMNS:
            continue
        if pd.api.types.is_numeric_dtype(want[col]):
            np.testing.assert_allclose(got[col].to_numpy(float), want[col].to_numpy(float),
                                       rtol=rtol, atol=atol, err_msg=col)
        else:
            assert got[col].fillna("").tolist() == want[col].fillna("").tolist(), col


def uri(path: Path, root: Path) -> str:
    """How OUTPUT names an input file: its BIDS URI."""
    return "bids:raw:" + path.relative_to(root).as_posix()
