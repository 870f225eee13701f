"""Non-finite steps in ``hj.train``: a warning, a summary, and a stop.

A hybrid never writes a non-finite value into the parameters: a real step whose loss or
gradient is NaN or Inf is skipped (the counter ``skipped_updates``), and a predicted
update that is non-finite, or would make a parameter non-finite, is held back
(``nonfinite_predictions``). Skipping keeps the parameters safe but, alone, is silent:
with NaN in every batch a run would finish with parameters that never changed. A plain
optax optimizer (``hj.train``'s baseline, ``hybrid_jax._plain``) applies a non-finite
update like optax does, and its parameters stay NaN from then on.

``NonfiniteWatch`` reads the rows ``hj.train`` fetches anyway (no extra device sync):
the two counters for a hybrid, the loss for a plain optimizer. It warns at the first
non-finite step, sums them up in a second warning at the end of the run, and raises
``FloatingPointError`` once ``max_steps`` of them came with no finite real step between.

A predicted step reads no batch (except for the monitor's forward pass every
``monitor_every`` predicted steps, where a NaN loss counts as not measured), so a bad
batch that falls on a predicted step is not seen; the real steps check theirs.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import jax

from ._state import HybridState

Row = dict[str, Any]

CHECK = (
    "Check the data for NaN or Inf, the loss function (log of 0, division by zero, an "
    "empty batch) and the learning rate (too large a rate makes the loss overflow)"
)
CHECK_PREDICTED = (
    "An occasional one is harmless; many mean the predictions are unstable here: lower "
    "the learning rate or raise confidence_threshold"
)


def check_max_steps(n: int | None) -> None:
    """Raises ``ValueError`` unless ``n`` (``max_nonfinite_steps``) is ``None`` or an int >= 1."""
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"train: max_nonfinite_steps must be an int >= 1 or None; got {n!r}")


class NonfiniteWarning(RuntimeWarning):
    """Steps of ``hj.train`` had a NaN or Inf loss, gradient or predicted update."""


SKIPPED, HELD_BACK, APPLIED = "skipped", "held_back", "applied"
_KINDS = {
    SKIPPED: "real step{s} skipped: non-finite loss or gradient",
    HELD_BACK: "non-finite predicted update{s} held back",
    APPLIED: "step{s} with a non-finite loss, applied by the plain optimizer",
}


@dataclass
class NonfiniteWatch:
    """Counts the non-finite steps in ``hj.train``'s rows; called with each row.

    Attributes:
      max_steps: non-finite steps in a row (no finite real step between them) that
        raise ``FloatingPointError``; ``None``: never.
      plain: the rows are a plain optax optimizer's (read their loss, not the counters).
      skipped, held_back: the hybrid's cumulative ``skipped_updates`` and
        ``nonfinite_predictions`` as last seen.
    """

    max_steps: int | None
    plain: bool = False
    skipped: int = 0
    held_back: int = 0
    rows: int = 0
    total: dict[str, int] = field(default_factory=dict)  # per kind, this run
    run: dict[str, int] = field(default_factory=dict)  # per kind, since a finite real step
    first: int = -1  # first and last non-finite step (-1: none yet)
    last: int = -1

    @classmethod
    def starting_at(cls, max_steps: int | None, state: Any) -> NonfiniteWatch:
        """A watch for a run from ``state`` (a ``HybridState``: its counters are read
        once; anything else: a plain optax state)."""
        if not isinstance(state, HybridState):
            return cls(max_steps, plain=True)
        c = state.counters
        return cls(
            max_steps, skipped=_int(c.skipped_updates), held_back=_int(c.nonfinite_predictions)
        )

    def _kind(self, row: Row) -> str | None:
        """What was not finite at this row's step (``None``: nothing)."""
        if self.plain:
            return None if math.isfinite(row["loss"]) else APPLIED
        skipped = row["skipped_updates"] > self.skipped
        held = row["nonfinite_predictions"] > self.held_back
        self.skipped, self.held_back = row["skipped_updates"], row["nonfinite_predictions"]
        return SKIPPED if skipped else HELD_BACK if held else None

    def __call__(self, row: Row) -> None:
        """Takes one row: warns at the first non-finite step, raises at too many in a row."""
        self.rows += 1
        kind = self._kind(row)
        if kind is None:
            if row["used_gradient"]:  # a finite real step ends a run of bad steps
                self.run.clear()
            return
        if self.first < 0:
            _warn_first(row["step"], kind)
            self.first = row["step"]
        self.last = row["step"]
        self.total[kind] = self.total.get(kind, 0) + 1
        self.run[kind] = self.run.get(kind, 0) + 1
        n = sum(self.run.values())
        if self.max_steps is not None and n >= self.max_steps:
            raise FloatingPointError(
                f"hj.train: {n} steps in a row, up to step {row['step']}, were not finite "
                f"({_counts(self.run)}) with no finite real step between them. {CHECK}. "
                "To go on regardless, pass a larger max_nonfinite_steps to hj.train, or "
                "None to never stop."
            )

    def finish(self) -> None:
        """At the end of the run: a warning summing up its non-finite steps (if more than
        the one already warned about)."""
        n = sum(self.total.values())
        if n <= 1:
            return
        warnings.warn(
            f"hj.train: {n} of the {self.rows} steps of this run were not finite "
            f"({_counts(self.total)}); the first at step {self.first}, the last at step "
            f"{self.last}. {CHECK}.",
            NonfiniteWarning,
            stacklevel=_user_level(),
        )


def _int(x: Any) -> int:
    """A replicated scalar on the host (one local copy: multi-host arrays work too)."""
    local = x.addressable_data(0) if isinstance(x, jax.Array) else x
    return int(jax.device_get(local))


def _counts(tally: dict[str, int]) -> str:
    return "; ".join(
        f"{n} " + _KINDS[k].format(s="" if n == 1 else "s") for k, n in tally.items() if n
    )


def _warn_first(step: int, kind: str) -> None:
    if kind == SKIPPED:
        what = (
            "the loss or gradient was not finite (NaN or Inf), so its update was skipped "
            f"and the parameters kept. {CHECK}"
        )
    elif kind == HELD_BACK:
        what = (
            "the predicted update was not finite, or would have made a parameter "
            f"non-finite, so it was held back and real steps follow. {CHECK_PREDICTED}"
        )
    else:
        what = (
            "the loss was not finite (NaN or Inf); a plain optax optimizer applies its "
            "update regardless, so the parameters are probably no longer finite "
            f"(hj.predictive skips such steps). {CHECK}"
        )
    later = " Later ones are summed up at the end of the run."
    warnings.warn(
        f"hj.train: step {step}: {what}.{later}", NonfiniteWarning, stacklevel=_user_level()
    )


def _user_level() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside this package."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
