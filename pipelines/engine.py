"""What the Pydra engine hands back, read the same by every phase of a run."""

from __future__ import annotations

from pathlib import Path

#: Pydra's crash file in a failed node folder.
ERROR_FILE = "_error.pklz"


def errors_of(res, root: Path) -> list[str]:
    """The engine's own error text (crashes, not subject-level failures)."""
    errors = res.errors or {}
    text = "".join(str(e) for e in errors.get("error message", [])).strip()
    return [text or f"engine error: see {ERROR_FILE} files under {root}"]
