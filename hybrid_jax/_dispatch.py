"""`make_dispatched_step`: the step's branch chosen on the host, one step ahead.

On a GPU a ``lax.cond`` around a whole training step is not free: the host reads the
predicate before it launches the branch, and the branches' outputs cannot always be
written in place, so XLA copies parameter-sized buffers around the conditional. Here
each kind of step is its own straight-line compiled program:

=============  ==============================================================
kind           program
=============  ==============================================================
real           ``value_and_grad`` and the transformation's real update
verify         the same, plus the forward pass at the snapshot that checks the
               Predict phase that just ended
predict_first  the first predicted step of a Predict phase: writes the snapshot
predict        a predicted step
plain          a real step the transformation does not observe (only with
               ``HybridConfig.observe_every > 2``): the optimizer's step, the
               non-finite check, the loss statistics and the monitor
=============  ==============================================================

The kind of step ``t + 1`` must be known before step ``t`` has finished, or the host
would wait for the device on every step. So every program also returns its guess of
the kind of the step after the next one (the phase machine advanced by one more
ordinary step: a Predict phase runs to its length, a real step enters Predict when the
confidence allows), and the host reads the guess made at step ``t - 1`` while step
``t`` runs. To keep the guess right, a dispatched real step decides whether a Predict
phase starts on the confidence of the real step before it (``hybrid_step`` uses its
own): the decision is made a step early. The guess is then wrong only around unusual
events (a monitor verdict, a rollback when ``correct_steps == 1``, a non-finite
update); each program checks on the device what the state wants:

- a predicted program on a state that wants a real step does nothing (the batch is
  skipped; counted in ``idle_steps``);
- a real program on a state whose Predict phase is about to start delays that phase by
  this one real step; in the middle of a Predict phase it ends the phase, which the next
  ``verify`` step checks;
- a ``real`` step on a state that awaits verification leaves the check to the next step;
- a ``plain`` step on a state that wants an observation takes the step unobserved (the
  observation, and any Predict phase, waits for the next real step), and a ``real``
  step on a state that wants none observes it anyway.

Without such events, and where the confidence does not cross the threshold between two
real steps, the sequence of steps is the one ``hybrid_step`` takes, and so are the
results up to rounding (tested).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _encoder, _phases
from ._metrics import metrics
from ._state import HybridState
from ._step import _missing, loss_with_aux, predicted_branch, real_branch
from ._transform import PredictiveTransformation

PyTree = Any

REAL, VERIFY, PREDICT_FIRST, PREDICT, PLAIN = 0, 1, 2, 3, 4
KIND_NAMES = ("real", "verify", "predict_first", "predict", "plain")


def kinds_used(tx: PredictiveTransformation) -> tuple[int, ...]:
    """The kinds of program ``tx`` can need (``plain`` only with ``observe_every > 2``)."""
    return (REAL, VERIFY, PREDICT_FIRST, PREDICT) + (
        (PLAIN,) if tx.config.observe_every > 2 else ()
    )


def kind_of(state: HybridState, tx: PredictiveTransformation) -> jax.Array:
    """The kind of step that ``state`` wants next (int32, one of ``KIND_NAMES``)."""
    in_predict = state.phase == _phases.PREDICT
    real = jnp.where(tx.observes(state), REAL, PLAIN)
    return jnp.where(
        in_predict,
        jnp.where(state.phase_step == 0, PREDICT_FIRST, PREDICT),
        jnp.where(state.pending_verify, VERIFY, real),
    ).astype(jnp.int32)


def kind_after_next(state: HybridState, tx: PredictiveTransformation) -> jax.Array:
    """A guess of the kind of the step after the next one: the next step taken as usual
    (and the last real step's confidence taken to be the next one's)."""
    cfg = tx.config
    kind = kind_of(state, tx)
    predicting = (kind == PREDICT_FIRST) | (kind == PREDICT)
    predicted_next = jnp.where(state.phase_step + 1 < state.phase_budget, PREDICT, VERIFY)
    conf = state.stats.confidence
    can_predict = jnp.isfinite(conf) & (conf >= cfg.confidence_threshold) & (kind != PLAIN)
    ph = _phases.Phase(state.phase, state.phase_step, state.phase_budget, state.consecutive)
    ph = _phases.advance(ph, cfg, can_predict, state.phase_budget)
    enc = state.encoder
    seen = kind != PLAIN  # the next step is observed
    unobserved = jnp.where(seen, 0, enc.unobserved + 1)
    streak = jnp.where(seen, _encoder.streak_after_observing(enc, state.step), 0)
    observed = _phases.observation_due(cfg, ph, unobserved, streak == 1, jnp.asarray(False), conf)
    real_next = jnp.where(
        ph.phase == _phases.PREDICT, PREDICT_FIRST, jnp.where(observed, REAL, PLAIN)
    )
    return jnp.where(predicting, predicted_next, real_next).astype(jnp.int32)


def _choose(cond: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def _real_program(with_aux, tx, verify: bool, observe: bool = True):
    cfg = tx.config

    def program(params: PyTree, state: HybridState, batch: Any):
        in_predict = state.phase == _phases.PREDICT
        starting = in_predict & (state.phase_step == 0)
        # a Predict phase already under way ends here; the next verify step checks it
        ended = state._replace(
            phase=jnp.full((), _phases.CORRECT, jnp.int32),
            phase_step=jnp.zeros((), jnp.int32),
            phase_budget=jnp.full((), cfg.correct_steps, jnp.int32),
            pending_verify=state.pending_verify | state.snapshot_valid,
        )
        start = _choose(in_predict & ~starting, ended, state)
        snap_loss = None
        if verify:
            snap_loss = with_aux(start.snapshot, batch)[0].astype(jnp.float32)
        params, new, aux = real_branch(
            with_aux, tx, params, start, batch, snap_loss, dispatched=True, observe=observe
        )
        # a Predict phase about to start starts one step later
        kept = (state.phase, state.phase_step, state.phase_budget, state.consecutive)
        phase = _choose(
            starting, kept, (new.phase, new.phase_step, new.phase_budget, new.consecutive)
        )
        new = new._replace(
            phase=phase[0], phase_step=phase[1], phase_budget=phase[2], consecutive=phase[3]
        )
        return params, new, aux

    return program


def _predicted_program(with_aux, tx, first: bool, aux_shape):
    def program(params: PyTree, state: HybridState, batch: Any):
        fresh = state.phase_step == 0
        ok = (state.phase == _phases.PREDICT) & (~fresh if not first else True)
        start = state
        if first:
            start = state._replace(
                snapshot=_choose(fresh & ok, params, state.snapshot),
                snapshot_valid=jnp.where(fresh & ok, True, state.snapshot_valid),
            )
        new_params, new, aux = predicted_branch(with_aux, tx, params, start, batch, aux_shape)
        c, last = state.counters, state.last
        nan = jnp.full((), jnp.nan, jnp.float32)
        idle = state._replace(
            step=state.step + 1,
            counters=c._replace(idle_steps=c.idle_steps + 1),
            last=last._replace(
                used_gradient=jnp.asarray(False),
                loss=nan,
                predicted_loss=nan,
                update_norm=jnp.zeros((), jnp.float32),
                verified=jnp.asarray(False),
                rolled_back=jnp.asarray(False),
                arm=jnp.full((), -1, jnp.int32),
                reward=nan,
            ),
        )
        params = _choose(ok, new_params, params)
        return params, _choose(ok, new, idle), _choose(ok, aux, _missing(aux_shape))

    return program


class DispatchedStep:
    """A training step whose branch the host chooses one step ahead (see the module).

    Call it like the function from ``make_hybrid_step``:
    ``params, state, metrics = step(params, state, batch)`` (``metrics[, aux]`` with
    ``has_aux``). ``prepare(state, *extra) -> state``, if given, runs at the start of
    every program on the ``extra`` arguments of the call (e.g. to set a learning rate
    from the global step: ``step(params, state, batch, t)``); it must leave the phase
    machine as it is. ``metrics_fn(state)`` (default ``hj.metrics``) gives what each call
    returns as its metrics, computed inside the programs. Each program is
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
            tx, with_aux = self.tx, self._with_aux
            if kind in (REAL, VERIFY, PLAIN):
                body = _real_program(with_aux, tx, verify=kind == VERIFY, observe=kind != PLAIN)
            else:
                aux_shape = jax.eval_shape(with_aux, params, batch)[1]
                body = _predicted_program(with_aux, tx, kind == PREDICT_FIRST, aux_shape)

            prepare, metrics_fn = self._prepare, self._metrics_fn

            def program(params, state, batch, *extra):
                if prepare is not None:
                    state = prepare(state, *extra)
                params, state, aux = body(params, state, batch)
                return params, state, metrics_fn(state), aux, kind_after_next(state, tx)

            self._programs[kind] = jax.jit(program, donate_argnums=self._donate)
        return self._programs[kind]

    def compile(self, params: PyTree, state: HybridState, batch: Any, *extra: Any) -> float:
        """Compiles every program the transformation can need (``kinds_used``) now for
        these shapes (nothing runs, nothing is donated), so that no compilation happens
        mid-run; returns the seconds taken."""
        t0 = time.perf_counter()
        for kind in kinds_used(self.tx):
            program = self._program(kind, params, batch)
            self._compiled[kind] = program.lower(params, state, batch, *extra).compile()
        return time.perf_counter() - t0

    def __call__(self, params: PyTree, state: HybridState, batch: Any, *extra: Any):
        if state is not self._last_state or not self._pending:
            # a state from outside: its kind and the guess after it, read now
            now, ahead = jax.device_get((kind_of(state, self.tx), kind_after_next(state, self.tx)))
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
    """Like ``make_hybrid_step``, without a ``lax.cond`` around the step: the host picks
    one of four compiled programs (five with ``observe_every > 2``) a step ahead (see
    ``hybrid_jax._dispatch``).

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
