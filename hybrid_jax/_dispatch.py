"""`make_dispatched_step`: the kinds of step as separate programs, chosen on the host.

On a GPU a ``lax.switch`` around a whole training step is not free: the host reads the
predicate before it launches the branch, and the branches' outputs cannot always be
written in place, so XLA copies parameter-sized buffers around the conditional. Here
each kind of step (``hybrid_jax._kinds``) is its own straight-line compiled program.

The kind of step ``t + 1`` must be known before step ``t`` has finished, or the host
would wait for the device on every step. Every program therefore also returns
``kind_after_next`` of its output state, and the host reads the one made at step
``t - 1`` while step ``t`` runs. By the phase machine's one rule (``hybrid_jax._phases``)
that kind is exact, so this step takes the same steps as ``make_hybrid_step`` and
reaches the same parameters up to rounding (tested).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import jax

from ._donation import donated_error
from ._kinds import (
    KIND_NAMES,
    PLAIN,
    PREDICT,
    PREDICT_FIRST,
    REAL,
    VERIFY,
    kind_after_next,
    kind_of,
    kinds_used,
    loss_with_aux,
    step_kinds,
)
from ._metrics import metrics
from ._state import HybridState
from ._transform import PredictiveTransformation

PyTree = Any

__all__ = ["KIND_NAMES", "PLAIN", "PREDICT", "PREDICT_FIRST", "REAL", "VERIFY", "DispatchedStep"]


class DispatchedStep:
    """A training step whose branch the host chooses one step ahead (see the module).

    Call it like the function from ``make_hybrid_step``:
    ``params, state, metrics = step(params, state, batch)`` (``metrics[, aux]`` with
    ``has_aux``). ``prepare(state, *extra) -> state``, if given, runs at the start of
    every program on the ``extra`` arguments of the call (e.g. to set a learning rate
    from the global step: ``step(params, state, batch, t)``); it must leave the
    phase machine, ``pending``, ``step`` and the encoder's step counters as they are
    (they decide the kinds of step). ``metrics_fn(state)`` (default ``hj.metrics``)
    gives what each call returns as its metrics, computed inside the programs. Each program is
    compiled once, on first use, or all of them up front by ``compile(params, state,
    batch)``; ``compiled_kinds`` lists those compiled so far and ``kind_counts`` how
    often each ran. The host reads one int32
    per step, a step late, so it never waits for the step it has just launched (but it
    does wait for the one before: at most two steps are queued on the device); it
    reads one more, at once, whenever it is given a state it did not return itself
    (the first call, a restored checkpoint).
    """

    def __init__(
        self,
        loss_fn: Callable[..., Any],
        tx: PredictiveTransformation,
        *,
        has_aux: bool = False,
        donate: bool = True,
        prepare: Callable[..., HybridState] | None = None,
        metrics_fn: Callable[[HybridState], Any] = metrics,
    ):
        if not isinstance(tx, PredictiveTransformation):
            raise TypeError(f"tx must come from hj.predictive; got {type(tx).__name__}")
        for name, fn in (("prepare", prepare), ("metrics_fn", metrics_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable; got {type(fn).__name__}")
        self.tx = tx
        self._prepare = prepare
        self._metrics_fn = metrics_fn
        self.has_aux = has_aux
        self._donate = (0, 1) if donate else ()
        self._with_aux = loss_with_aux(loss_fn, has_aux)
        self._programs: dict[int, Callable[..., Any]] = {}
        self._compiled: dict[int, Any] = {}
        self._pending: collections.deque = collections.deque()
        self._last_state: HybridState | None = None
        self.kind_counts = [0] * len(KIND_NAMES)

    @property
    def compiled_kinds(self) -> list[str]:
        return [KIND_NAMES[k] for k in sorted(self._programs)]

    def _program(self, kind: int, params: PyTree, batch: Any) -> Callable[..., Any]:
        if kind not in self._programs:
            tx, cfg = self.tx, self.tx.config
            aux_shape = jax.eval_shape(self._with_aux, params, batch)[1]
            body = step_kinds(self._with_aux, tx, aux_shape)[kind]

            prepare, metrics_fn = self._prepare, self._metrics_fn

            def program(params, state, batch, *extra):
                if prepare is not None:
                    state = prepare(state, *extra)
                params, state, aux = body(params, state, batch)
                return params, state, metrics_fn(state), aux, kind_after_next(cfg, state)

            self._programs[kind] = jax.jit(program, donate_argnums=self._donate)
        return self._programs[kind]

    def compile(self, params: PyTree, state: HybridState, batch: Any, *extra: Any) -> float:
        """Compiles every program the transformation can need (``kinds_used``) now for
        these shapes (nothing runs, nothing is donated), so that no compilation happens
        mid-run; returns the seconds taken."""
        t0 = time.perf_counter()
        for kind in kinds_used(self.tx.config):
            program = self._program(kind, params, batch)
            self._compiled[kind] = program.lower(params, state, batch, *extra).compile()
        return time.perf_counter() - t0

    def __call__(self, params: PyTree, state: HybridState, batch: Any, *extra: Any):
        try:
            return self._step(params, state, batch, *extra)
        except (RuntimeError, ValueError) as e:  # a donated input passed again?
            err = donated_error("make_dispatched_step", params, state)
            if err is None:
                raise
            raise err from e

    def _step(self, params: PyTree, state: HybridState, batch: Any, *extra: Any):
        if state is not self._last_state or not self._pending:
            # a state from outside: its kind and the guess after it, read now
            cfg = self.tx.config
            now, ahead = jax.device_get((kind_of(cfg, state), kind_after_next(cfg, state)))
            self._pending = collections.deque([int(ahead)])
            kind = int(now)
        else:
            kind = int(self._pending.popleft())  # made a step ago: ready, or nearly
        self.kind_counts[kind] += 1
        program = self._compiled.get(kind) or self._program(kind, params, batch)
        params, state, m, aux, ahead = program(params, state, batch, *extra)
        self._pending.append(ahead)
        self._last_state = state
        if self.has_aux:
            return params, state, m, aux
        return params, state, m


def make_dispatched_step(
    loss_fn: Callable[..., Any],
    tx: PredictiveTransformation,
    *,
    has_aux: bool = False,
    donate: bool = True,
    prepare: Callable[..., HybridState] | None = None,
) -> DispatchedStep:
    """Like ``make_hybrid_step``, without a ``lax.switch`` around the step: the host picks
    one of four compiled programs (five with ``observe_every > 2``), one per kind of
    step, a step ahead (see ``hybrid_jax._dispatch``). Same steps, same results.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss``, or ``-> (loss, aux)`` with ``has_aux``.
      tx: a transformation from ``hj.predictive``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      donate: donate the params and state buffers.
      prepare: ``prepare(state, *extra) -> state`` run first in every program, on the
        extra arguments of each call (see ``DispatchedStep``).

    Returns:
      A ``DispatchedStep``: ``step(params, state, batch) -> (params, state, metrics[, aux])``.
    """
    return DispatchedStep(loss_fn, tx, has_aux=has_aux, donate=donate, prepare=prepare)
