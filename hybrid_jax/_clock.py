"""The clock of ``hj.train``'s rows: seconds spent in training steps.

It starts after the first (compiling) step and stops while the driver evaluates or
checkpoints, so that two runs that evaluate and checkpoint differently are timed alike.
A resumed run starts it where the checkpoint left it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import jax


class TrainingClock:
    """Seconds of training since the run began (steps only).

    Args:
      offset: seconds already spent before this call (a resumed run's checkpoint).
    """

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = float(offset)
        self._t0 = time.perf_counter()

    def restart(self) -> None:
        """Starts counting now (after the compiling step), from ``offset``."""
        self._t0 = time.perf_counter()

    def now(self) -> float:
        """Seconds of training so far."""
        return self.offset + time.perf_counter() - self._t0

    @contextlib.contextmanager
    def paused(self, wait_for: Any = None) -> Iterator[None]:
        """Stops the clock inside the ``with`` block.

        Args:
          wait_for: arrays the steps so far produce (e.g. the params); the clock waits
            for them first, so that the steps queued on the device stay counted.
        """
        if wait_for is not None:
            jax.block_until_ready(wait_for)
        t = time.perf_counter()
        try:
            yield
        finally:
            self._t0 += time.perf_counter() - t
