"""Non-finite steps in ``hj.train``: a warning, a summary, and a stop.

No step writes a non-finite value into the parameters: a real step whose loss or
gradient is NaN or Inf is skipped (the counter ``skipped_updates``), and a predicted
update that is non-finite, or would make a parameter non-finite, is held back
(``nonfinite_predictions``); ``hj.train``'s step for a plain optax optimizer skips in
the same way. Skipping keeps the parameters safe but, alone, is silent: with NaN in
every batch a run would finish with parameters that never changed. ``NonfiniteWatch``
reads those counters from the metrics rows ``hj.train`` fetches anyway (no extra device
sync): it warns at the first non-finite step it sees, sums them up in a second warning
at the end of the run, and raises ``FloatingPointError`` once ``max_steps`` non-finite
steps came with no applied real step between them.

A predicted step reads no batch (except for the monitor's forward pass every
``monitor_every`` predicted steps, where a NaN loss counts as not measured), so a bad
batch that falls on a predicted step is not seen; the real steps check theirs.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
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
    """Steps of ``hj.train`` were not applied because a value was NaN or Inf."""


@dataclass
class NonfiniteWatch:
    """Counts the non-finite steps in ``hj.train``'s rows; called with each row.

    Attributes:
      max_steps: non-finite steps in a row (no applied real step between them) that
        raise ``FloatingPointError``; ``None``: never.
      skipped, held_back: the cumulative counters ``skipped_updates`` and
        ``nonfinite_predictions`` as last seen.
    """

    max_steps: int | None
    skipped: int = 0
    held_back: int = 0
    rows: int = 0
    n_skipped: int = 0  # this run's totals
    n_held_back: int = 0
    first: int = -1  # first and last non-finite step (-1: none yet)
    last: int = -1
    run_skipped: int = 0  # since the last applied real step
    run_held_back: int = 0

    @classmethod
    def starting_at(cls, max_steps: int | None, state: Any) -> NonfiniteWatch:
        """A watch whose counters start at ``state``'s (zero for a plain optax state)."""
        if not isinstance(state, HybridState):
            return cls(max_steps)
        c = state.counters
        skipped, held = jax.device_get((c.skipped_updates, c.nonfinite_predictions))
        return cls(max_steps, skipped=int(skipped), held_back=int(held))

    def __call__(self, row: Row) -> None:
        """Takes one row: warns at the first non-finite step, raises at too many in a row."""
        skipped = row["skipped_updates"] > self.skipped
        held = row["nonfinite_predictions"] > self.held_back
        self.skipped, self.held_back = row["skipped_updates"], row["nonfinite_predictions"]
        self.rows += 1
        if not (skipped or held):
            if row["used_gradient"]:  # an applied real step ends a run of bad steps
                self.run_skipped = self.run_held_back = 0
            return
        if self.first < 0:
            _warn_first(row["step"], skipped)
            self.first = row["step"]
        self.last = row["step"]
        self.n_skipped += int(skipped)
        self.n_held_back += int(held)
        self.run_skipped += int(skipped)
        self.run_held_back += int(held)
        run = self.run_skipped + self.run_held_back
        if self.max_steps is not None and run >= self.max_steps:
            raise FloatingPointError(
                f"hj.train: {run} steps in a row, up to step {row['step']}, were not "
                f"finite ({_counts(self.run_skipped, self.run_held_back)}) with no applied "
                f"real step between them. {CHECK}. To go on regardless, pass a larger "
                "max_nonfinite_steps to hj.train, or None to never stop."
            )

    def finish(self) -> None:
        """At the end of the run: a warning summing up its non-finite steps (if more than
        the one already warned about)."""
        if self.n_skipped + self.n_held_back <= 1:
            return
        warnings.warn(
            f"hj.train: {self.n_skipped + self.n_held_back} of the {self.rows} steps of this "
            f"run were not applied ({_counts(self.n_skipped, self.n_held_back)}); the first "
            f"at step {self.first}, the last at step {self.last}. {CHECK}.",
            NonfiniteWarning,
            stacklevel=_user_level(),
        )


def _counts(skipped: int, held_back: int) -> str:
    s = lambda n: "" if n == 1 else "s"
    parts = []
    if skipped:
        parts.append(f"{skipped} real step{s(skipped)} skipped: non-finite loss or gradient")
    if held_back:
        parts.append(f"{held_back} non-finite predicted update{s(held_back)} held back")
    return "; ".join(parts)


def _warn_first(step: int, skipped: bool) -> None:
    if skipped:
        msg = (
            f"hj.train: step {step}: the loss or gradient was not finite (NaN or Inf), so "
            f"its update was skipped and the parameters kept. {CHECK}."
        )
    else:
        msg = (
            f"hj.train: step {step}: the predicted update was not finite, or would have "
            f"made a parameter non-finite, so it was held back and real steps follow. "
            f"{CHECK_PREDICTED}."
        )
    later = " Later ones are summed up at the end of the run."
    warnings.warn(msg + later, NonfiniteWarning, stacklevel=_user_level())


def _user_level() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside this package."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
