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

A read waits for a program and costs the host tens of microseconds, which on a small
model is a large part of a step. Inside a Full phase nothing a step measures changes
the kinds of the steps after it (``_phases.deferred``), so a program also returns
the kinds it can be certain of beyond that one (``kinds_ahead``, up to ``PLAN - 2``
more; the observed and unobserved real steps' programs only), and the host reads
nothing while it has kinds in hand: one read per ``PLAN - 1`` steps of a Full phase,
and one per quiet stretch of a long one (``quiet_run``: its unobserved steps, counted).

With ``fuse_predict=True`` a Predict phase needs no data and runs as one program
(``hybrid_jax._predicted.predicted_phase``): its first call applies the whole phase
(up to ``max_horizon`` steps) in one pass over the parameters and the basis, and the
calls after it, one per step of the phase, return that phase's metrics rows one by one
without launching anything (their batches are not used) and, unless ``metrics_fn``
returns many arrays (``hybrid_jax._fused.ROW_OUTPUTS``), without waiting for it. The
host learns the phase's length without waiting for it: a phase's small state does not
depend on the parameters, so the program before it already works out (``outlook``)
how many steps it will take and which kind of step follows, and the host reads that a
step late as usual.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from ._donation import donated_error
from ._fused import FusedPhase, PhaseResult, outlook
from ._kinds import (
    KIND_NAMES,
    PLAIN,
    PREDICT,
    PREDICT_FIRST,
    REAL,
    VERIFY,
    kind_after_next,
    kind_of,
    kinds_ahead,
    kinds_used,
    loss_with_aux,
    missing,
    quiet_run,
    step_kinds,
)
from ._metrics import metrics
from ._packing import PackedState, StateLayout, packed, signature, unpack_state
from ._state import HybridState
from ._transform import PredictiveTransformation

PyTree = Any

# Not a kind of step: the key of the fused Predict phase's program.
PHASE = len(KIND_NAMES)

__all__ = ["KIND_NAMES", "PLAIN", "PREDICT", "PREDICT_FIRST", "REAL", "VERIFY", "DispatchedStep"]


class _Phase(NamedTuple):
    """A fused Predict phase the host is stepping through."""

    result: PhaseResult  # its metrics rows and what it found, on their way to the host
    served: int  # calls answered so far (the first is the one that ran it)
    taken: int | None  # its length, once read
    after: int | None  # the kind of the step after it, once read


def _host(entry: Any) -> np.ndarray:
    """A pending entry (an int32 array, or the phase whose outlook it is) on the host."""
    if isinstance(entry, PhaseResult):
        return entry.outlook()
    return np.atleast_1d(np.asarray(entry))  # its copy to the host began at its launch


class DispatchedStep:
    """A training step whose branch the host chooses one step ahead (see the module).

    Call it like the function from ``make_hybrid_step``:
    ``params, state, metrics = step(params, state, batch)`` (``metrics[, aux]`` with
    ``has_aux``). ``prepare(state, *extra) -> state``, if given, runs at the start of
    every program on the ``extra`` arguments of the call (e.g. to set a learning rate
    from the global step: ``step(params, state, batch, t)``); it must leave the
    phase machine, ``pending``, ``step`` and the encoder's step counters as they are
    (they decide the kinds of step). ``metrics_fn(state)`` (default ``hj.metrics``)
    gives what each call returns as its metrics, computed inside the programs. Each
    program is compiled once, on first use, or all of them up front by
    ``compile(params, state, batch)``; ``compiled_kinds`` lists those compiled so far
    and ``kind_counts`` how often each kind of step ran. The host reads a few int32 a
    step late (inside a Full phase, once every few steps), so it never waits for the
    step it has just launched (a read waits for the one before it); it reads
    them at once whenever it is given a state it did not return itself (the first
    call, a restored checkpoint).

    ``fuse_predict=True`` runs each Predict phase as one program (see the module): the
    params and state returned by its first call are those after the whole phase, and
    ``steps_ahead`` says by how many of the coming calls (each returns the same params
    and state and the next step's metrics: device arrays the phase's program returned,
    so the call does not wait for the phase; or, where ``metrics_fn`` returns many
    arrays, numpy values, the first such call waiting for the phase). Checkpoint or evaluate where
    ``steps_ahead == 0``. It needs ``config.monitor_every == 0`` (the monitor's forward
    passes need each step's batch), and it does not run ``prepare`` (a Predict phase
    reads no step arguments).

    ``pack_state=True`` returns the state as a ``PackedState`` (``hybrid_jax._packing``):
    its small leaves packed into one buffer per dtype, so that a call moves a few arrays
    instead of a hundred or more. Pass it back as the state; its attributes read through
    to the ``HybridState`` (``state.counters``), and ``state.unpacked()`` is that state.
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
        fuse_predict: bool = False,
        pack_state: bool = False,
    ):
        _check_args(tx, prepare, metrics_fn, fuse_predict)
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
        self._fuse = bool(fuse_predict)
        self._phase: _Phase | None = None
        self._check: tuple[PhaseResult, int, int] | None = None
        self.phases_fused = 0
        self._pack = bool(pack_state)
        self._signature: StateLayout | None = None  # the shapes of the states seen last
        cfg = tx.config
        self._planned: collections.deque = collections.deque()  # kinds known ahead
        self._quiet = 0  # unobserved steps known ahead, before those (a quiet stretch)
        self._width = 3 if self._fuse else 1  # the entry's part before its plan
        self._look = (
            (lambda s: outlook(tx, s)) if self._fuse else (lambda s: kind_after_next(cfg, s)[None])
        )
        # only the programs a Full phase runs plan its kinds (the plan costs compile time)
        self._look_planned = lambda s: _with_plan(cfg, s, self._look(s))
        self._read_jit = jax.jit(lambda s: (kind_of(cfg, _tree(s)), self._look(_tree(s))))
        self._read = self._read_jit

    @property
    def compiled_kinds(self) -> list[str]:
        names = (*KIND_NAMES, "predict_phase")
        return [names[k] for k in sorted(self._programs)]

    @property
    def steps_ahead(self) -> int:
        """Coming calls already applied by a fused Predict phase (0 without one); reading
        it inside a phase waits for the step before the phase."""
        if self._phase is None:
            return 0
        ph = self._phase_read()
        return ph.taken - ph.served

    def _program(self, kind: int, params: PyTree, batch: Any) -> Callable[..., Any]:
        if kind not in self._programs:
            aux_shape = jax.eval_shape(self._with_aux, params, batch)[1]
            body = step_kinds(self._with_aux, self.tx, aux_shape)[kind]
            prepare, metrics_fn = self._prepare, self._metrics_fn
            look = self._look_planned if kind in (REAL, PLAIN) else self._look

            def program(params, state, batch, *extra):
                layout = state.layout if isinstance(state, PackedState) else None
                state = _tree(state)
                if prepare is not None:
                    state = prepare(state, *extra)
                params, state, aux = body(params, state, batch)
                out = state if layout is None else layout.pack(state)
                return params, out, metrics_fn(state), aux, look(state)

            self._programs[kind] = jax.jit(program, donate_argnums=self._donate)
        return self._programs[kind]

    def compile(self, params: PyTree, state: HybridState, batch: Any, *extra: Any) -> float:
        """Compiles every program the transformation can need (``kinds_used``) now for
        these shapes (nothing runs, nothing is donated; ``jax.eval_shape`` structures
        will do), so that no compilation happens mid-run; returns the seconds taken."""
        t0 = time.perf_counter()
        state = self._state_in(state)
        for kind in kinds_used(self.tx.config):
            if self._fuse and kind in (PREDICT_FIRST, PREDICT):
                continue
            program = self._program(kind, params, batch)
            self._compiled[kind] = program.lower(params, state, batch, *extra).compile()
        if self._fuse:
            self._phase_program(params, state, batch).compile(params, state)
        self._read = self._read_jit.lower(state).compile()  # again: a second compile works
        return time.perf_counter() - t0

    def __call__(self, params: PyTree, state: HybridState, batch: Any, *extra: Any):
        try:
            return self._step(params, state, batch, *extra)
        except (RuntimeError, ValueError) as e:  # a donated input passed again?
            self._last_state = None  # the kinds in hand may be a step out: read anew
            err = donated_error("make_dispatched_step", params, state)
            if err is None:
                raise
            raise err from e
        except BaseException:  # a bad batch, Ctrl-C: the next call reads the kinds anew
            self._last_state = None
            raise

    def _step(self, params: PyTree, state: HybridState, batch: Any, *extra: Any):
        if state is not self._last_state or not self._pending:
            state = self._state_in(state)
            kind = self._restart(state)
        elif self._phase is not None:
            ph = self._phase_read()
            if ph.served < ph.taken:  # a step the fused phase took: its row, on the host
                self._phase = ph._replace(served=ph.served + 1)
                self.kind_counts[PREDICT] += 1
                return self._out(params, state, ph.result.row(ph.served))
            kind, self._phase = ph.after, None
        else:
            kind = self._entry()
        self.kind_counts[kind] += 1
        if self._fuse and kind in (PREDICT_FIRST, PREDICT):
            return self._run_phase(params, state, batch)
        program = self._compiled.get(kind) or self._program(kind, params, batch)
        params, state, m, aux, ahead = program(params, state, batch, *extra)
        if self._quiet + len(self._planned) < 2:  # read two calls later: on its way by then
            ahead.copy_to_host_async()
        self._pending.append(ahead)
        return self._out(params, state, m, aux)

    def _state_in(self, state: Any) -> Any:
        """``state`` as this step's programs take it: packed with ``pack_state`` (a
        ``HybridState`` of any shapes is packed anew), else as a ``HybridState``. A state
        of other shapes than the last one drops the programs compiled for those."""
        state = packed(state) if self._pack else unpack_state(state)
        sig = signature(state)
        if sig != self._signature:
            if self._signature is not None:  # what was compiled is for other shapes
                self._compiled.clear()
                self._programs.pop(PHASE, None)
                self._read = self._read_jit
            self._signature = sig
        return state

    def _restart(self, state: HybridState) -> int:
        """The kind ``state`` wants, read now, and the entry for the call after it."""
        now, look = jax.device_get(self._read(state))
        self._pending = collections.deque([look])
        self._planned.clear()
        self._quiet = 0
        self._phase = self._check = None
        return int(now)

    def _entry(self) -> int:
        """The kind of this call: known ahead, or made two calls ago (waits for that
        program, and keeps the kinds it found certain after this one)."""
        if self._quiet or self._planned:
            self._pending.popleft()  # not read: the plan has it
            if self._quiet:
                self._quiet -= 1
                return PLAIN
            return self._planned.popleft()
        entry = _host(self._pending.popleft())
        kind = int(entry[0])
        if len(entry) > self._width:  # a plan: a quiet stretch, or the kinds certain
            quiet, plan = int(entry[self._width]), entry[self._width + 1 :]
            certain = [int(k) for k in itertools.takewhile(lambda k: k >= 0, plan)]
            if quiet > len(certain):
                self._quiet = quiet
            else:
                self._planned.extend(certain)
        if self._check is not None:  # the fused phase before has run: was it as told?
            result, taken, after = self._check
            self._check = None
            actual = tuple(int(x) for x in result.actual())
            if actual != (taken, after):
                raise RuntimeError(
                    "hybrid_jax: a fused Predict phase took a different course than its "
                    f"outlook said ({actual} vs {(taken, after)}); "
                    "please report this, and use fuse_predict=False meanwhile"
                )
        return kind

    def _phase_read(self) -> _Phase:
        """The running phase with its length and the kind after it (read from the
        entry the program before it made, which waits for that program only)."""
        ph = self._phase
        if ph.taken is None:
            _, taken, after = (int(x) for x in _host(self._pending.popleft())[:3])
            ph = self._phase = ph._replace(taken=taken, after=after)
            self._check = (ph.result, taken, after)
        return ph

    def _out(self, params: PyTree, state: HybridState, m: Any, aux: Any = None):
        self._last_state = state
        if self.has_aux:
            return params, state, m, self._missing_aux if aux is None else aux
        return params, state, m

    def _phase_program(self, params: PyTree, state: HybridState, batch: Any) -> FusedPhase:
        """The program of a fused Predict phase (see ``hybrid_jax._fused``)."""
        if PHASE not in self._programs:
            aux_shape = jax.eval_shape(self._with_aux, params, batch)[1]
            self._missing_aux = missing(aux_shape)
            self._programs[PHASE] = FusedPhase(
                self.tx, self._metrics_fn, params, state, donate=bool(self._donate)
            )
        return self._programs[PHASE]

    def _run_phase(self, params: PyTree, state: HybridState, batch: Any):
        """Launches the Predict phase ``state`` is in as one program; returns its first step."""
        phase = self._phase_program(params, state, batch)
        params, state, first, result = phase(params, state)
        self._phase = _Phase(result=result, served=1, taken=None, after=None)
        self._pending.append(result)
        self.phases_fused += 1
        return self._out(params, state, first, self._missing_aux)


# How many kinds, from the step after a real step's program on, that program works out
# (``kinds_ahead``): inside a Full phase the host reads the kind of one step in PLAN - 1
# (more makes XLA split the scalar work into several kernels, and compile for longer).
PLAN = 8


def _with_plan(cfg: Any, state: HybridState, look: jax.Array) -> jax.Array:
    """``look``, then how many unobserved steps are certain after the step after next
    (``quiet_run``), then the kinds certain after it (-1 where not)."""
    quiet = quiet_run(cfg, state)[None]
    return jax.numpy.concatenate([look, quiet, kinds_ahead(cfg, state, PLAN)[2:]])


def _tree(state: Any) -> HybridState:
    """Inside a program: the ``HybridState`` a (possibly packed) state argument holds."""
    return state.layout.unpack(state) if isinstance(state, PackedState) else state


def _check_args(tx: Any, prepare: Any, metrics_fn: Any, fuse_predict: bool) -> None:
    if not isinstance(tx, PredictiveTransformation):
        raise TypeError(f"tx must come from hj.predictive; got {type(tx).__name__}")
    for name, fn in (("prepare", prepare), ("metrics_fn", metrics_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable; got {type(fn).__name__}")
    if fuse_predict and tx.config.monitor_every > 0:
        raise ValueError(
            "fuse_predict=True needs HybridConfig(monitor_every=0): the monitor's "
            f"forward passes need each step's batch (got monitor_every="
            f"{tx.config.monitor_every}); pass fuse_predict=False or monitor_every=0"
        )


def make_dispatched_step(
    loss_fn: Callable[..., Any],
    tx: PredictiveTransformation,
    *,
    has_aux: bool = False,
    donate: bool = True,
    prepare: Callable[..., HybridState] | None = None,
    fuse_predict: bool = False,
    pack_state: bool = False,
    metrics_fn: Callable[[HybridState], Any] = metrics,
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
      fuse_predict: run each Predict phase as one program, applied on its first call
        (see ``DispatchedStep``; needs ``monitor_every == 0``).
      pack_state: return the state as a ``PackedState``, its small leaves packed into
        one buffer per dtype, so that each call moves a few arrays instead of a hundred
        or more (``hybrid_jax._packing``): much less host time per step on a small
        model. Pass it back as the state; its attributes read through
        (``state.counters``), and ``state.unpacked()`` is the ``HybridState``.
      metrics_fn: ``metrics_fn(state)`` is what each call returns as its metrics
        (default ``hj.metrics``, a dict of device scalars: one array each per call; a
        loop that reads none of them can return less, e.g. ``lambda s: s.step``).

    Returns:
      A ``DispatchedStep``: ``step(params, state, batch) -> (params, state, metrics[, aux])``.
    """
    return DispatchedStep(
        loss_fn,
        tx,
        has_aux=has_aux,
        donate=donate,
        prepare=prepare,
        fuse_predict=fuse_predict,
        pack_state=pack_state,
        metrics_fn=metrics_fn,
    )
