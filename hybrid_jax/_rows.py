"""Reading metric rows on the host: the row type, values as floats, phase names, columns.

Shared by the report (``_report``) and its plots (``_plots``). A *row* is the dict of
one step's metrics as host scalars (see ``hybrid_jax/_report.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._phases import PHASE_NAMES

Row = Mapping[str, Any]


def to_float(v: Any) -> float:
    """``float(v)``, or NaN where ``v`` is ``None`` or not a number."""
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def phase_name(phase: Any) -> str:
    """The name of a phase code (a name passes through; an unknown code as its digits)."""
    if isinstance(phase, str):
        return phase
    i = int(phase)
    return PHASE_NAMES[i] if 0 <= i < len(PHASE_NAMES) else str(i)


def column(rows: Sequence[Row], key: str, default_index: bool = False) -> np.ndarray:
    """The float values of ``key`` over the rows (NaN where missing).

    With ``default_index``, rows none of which has ``key`` give ``0, 1, 2, ...``.
    """
    if default_index and not any(key in r for r in rows):
        return np.arange(len(rows), dtype=float)
    return np.array([to_float(r.get(key)) for r in rows], dtype=float)
