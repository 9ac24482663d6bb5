"""Units and types of the BIDS sidecar fields the census reads.

BIDS stores times in seconds and the field strength in tesla as a number;
real sidecars hold milliseconds (EchoTime 89.5) and strings ("3T"). Each
reader returns the value in the census unit and a list of warnings: a value
in the wrong unit is converted with a warning, an unreadable one leaves the
census field empty with a warning. Nothing here raises, so one odd sidecar
never stops the cohort.
"""

from __future__ import annotations

import math
import re

#: A diffusion echo time longer than this (s) is no diffusion sequence
#: (in-vivo TEs are 0.04-0.2 s): the value was written in milliseconds.
MAX_ECHO_TIME_S = 1.0
#: Plausible static field strengths (T) of MR scanners, inclusive.
FIELD_STRENGTH_RANGE_T = (0.01, 21.1)
_FIELD = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(t|tesla)?\s*$", re.IGNORECASE)


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def echo_time_ms(meta: dict) -> tuple[float | None, list[str]]:
    """EchoTime of a sidecar in ms (BIDS: seconds; ms detected and converted)."""
    raw = meta.get("EchoTime")
    if raw is None:
        return None, []
    te = _number(raw)
    if te is None or te <= 0:
        return None, [f"EchoTime {raw!r} is not a positive number of seconds; left empty"]
    if te > MAX_ECHO_TIME_S:
        return round(te, 2), [f"EchoTime {raw!r} is above {MAX_ECHO_TIME_S:g} s: read as "
                              f"milliseconds ({te:g} ms); BIDS times are in seconds"]
    return round(te * 1000.0, 2), []


def field_strength_t(meta: dict) -> tuple[float | None, list[str]]:
    """MagneticFieldStrength in tesla: numbers, or strings like "3T", "3 T", "7 Tesla"."""
    raw = meta.get("MagneticFieldStrength")
    if raw is None:
        return None, []
    value, warnings = _number(raw), []
    if value is None and isinstance(raw, str):
        m = _FIELD.match(raw)
        if m:
            value = float(m.group(1))
            warnings.append(f"MagneticFieldStrength {raw!r} is a string; read as {value:g} T "
                            f"(BIDS: a number in tesla)")
    lo, hi = FIELD_STRENGTH_RANGE_T
    if value is None or not lo <= value <= hi:
        return None, [f"MagneticFieldStrength {raw!r} is not a field strength in tesla "
                      f"({lo:g}-{hi:g} T); left empty"]
    return value, warnings
