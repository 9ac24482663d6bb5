"""The environment id: which locked set of dependencies produced a result.

``requirements.lock`` pins every dependency with hashes; its sha256 names the
environment. A result records that id only when the running interpreter's
installed distributions are exactly the lock's pins. Otherwise (an install
from setup.cfg's ranges, a package added by hand) it records ``unlocked``
with the differences, so a sidecar never claims a reproducibility it lacks.

``python -m dmriflow.interfaces.environment [LOCK]`` prints the differences
between this interpreter and a lock (``make check-latest`` uses it).
"""

from __future__ import annotations

import hashlib
import re
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

#: The lock file's name: at the source root (editable installs) and under
#: ``<prefix>/share/dmriflow`` (installs from a wheel: setup.cfg's data_files).
LOCK_NAME = "requirements.lock"
SHARE_DIR = Path("share", "dmriflow")
#: Installed distributions that are not pins of the lock: the installer and dmriflow.
NOT_LOCKED = frozenset({"pip", "dmriflow"})
#: Id of an environment that is not exactly the lock.
UNLOCKED = "unlocked"
#: At most this many differences are written into a sidecar.
MAX_LISTED = 20

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Foo_bar`` == ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, str]:
    """``{name: version}`` of every ``name==version`` requirement of a lock file."""
    return {canonical(name): version for name, version in _PIN.findall(text)}


def lock_path() -> Path | None:
    """The lock this installation was made from, if it can be found."""
    here = Path(__file__).resolve().parent           # .../interfaces (editable: the source)
    for candidate in (here.parent / LOCK_NAME, Path(sys.prefix) / SHARE_DIR / LOCK_NAME):
        if candidate.is_file():
            return candidate
    return None


def installed_versions() -> dict[str, str]:
    """``{name: version}`` of the distributions this interpreter imports from."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in found:        # the first on sys.path wins
            found[canonical(name)] = dist.version
    return found


def differences(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """What separates an installed set from a lock, one line per package."""
    out = []
    for name in sorted(set(pins) | set(installed)):
        if name in NOT_LOCKED:
            continue
        want, got = pins.get(name), installed.get(name)
        if want == got:
            continue
        if got is None:
            out.append(f"{name}: locked {want}, not installed")
        elif want is None:
            out.append(f"{name}: {got} installed, not in the lock")
        else:
            out.append(f"{name}: locked {want}, installed {got}")
    return out


@lru_cache(maxsize=1)
def environment() -> dict:
    """The environment record for sidecars (computed once per process).

    ``EnvironmentId`` is ``sha256:<lock hash>`` when the installed
    distributions are exactly the lock's pins, else ``unlocked``; ``Lock``
    names the lock's hash and lists the differences (at most MAX_LISTED).
    """
    path = lock_path()
    if path is None:
        return {"EnvironmentId": UNLOCKED, "Lock": None}
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    diff = differences(read_pins(data.decode()), installed_versions())
    return {"EnvironmentId": UNLOCKED if diff else f"sha256:{digest}",
            "Lock": {"sha256": digest, "matches": not diff,
                     "differences": diff[:MAX_LISTED], "n_differences": len(diff)}}


def main(argv: list[str] | None = None) -> int:
    """Print how this interpreter differs from a lock; exit 0 (informational)."""
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else lock_path()
    if path is None:
        print(f"no {LOCK_NAME} found")
        return 1
    diff = differences(read_pins(path.read_text()), installed_versions())
    print("\n".join(f"  {line}" for line in diff) if diff else f"  none: exactly {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
