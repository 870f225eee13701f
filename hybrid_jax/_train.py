"""`hj.train`: a small driver around the jitted step, for scripts, notebooks and the CLI.

The loop dispatches one jitted step per batch and keeps each step's metrics on the
device, packed into one small vector; every ``sync_every`` steps it fetches them in one
transfer, so the device is never made to wait on every step. Around that: a progress
bar, periodic held-out evaluation, callbacks, memory sampling with an emergency
checkpoint, orbax checkpoints from which a run resumes exactly, and a clean stop on
request (e.g. Ctrl-C) that checkpoints first.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._checkpoint import Checkpointer
from ._clock import TrainingClock
from ._dispatch import DispatchedStep
from ._donation import TRAIN_FIX, donated_error
from ._kinds import loss_with_aux
from ._memory import MemoryMonitor
from ._metrics import METRIC_NAMES, metrics
from ._nonfinite import NonfiniteWatch, check_max_steps
from ._packing import unpack_state
from ._plain import plain_step
from ._progress import progress_bar
from ._step import hybrid_step
from ._transform import PredictiveTransformation

PyTree = Any
Row = dict[str, Any]
log = logging.getLogger("hybrid_jax")
_Pending = list[tuple[int, float, jax.Array]]  # (step, time, packed metrics on device)


@dataclass
class TrainResult:
    """What ``train`` returns.

    Attributes:
      params, state: after the last step (``state`` is the optax state for a plain
        optimizer).
      rows: one dict of host scalars per step (``METRIC_NAMES`` plus ``time`` and
        ``eval_loss`` on evaluation steps). ``time`` is the training clock when the step
        was dispatched: seconds spent in training steps since the run began, started
        after the first (compiling) step and stopped during evaluations and
        checkpoints; a resumed run goes on from the checkpoint's clock. With
        asynchronous dispatch a step's dispatch waits for the device once its queue is
        full, so the clock follows the device's pace. The last step's time (of the
        run, or where ``stop`` ended it) is taken once its work is done, so that the
        run's wall-clock (the last row's time) counts every step's work, however far
        ahead of the device the launches ran.
      evals: ``(step, held-out loss)`` pairs.
      memory: the memory monitor's summary (``None`` without a monitor).
      start_step: the first step this call ran (after a resume, not 0).
      compile_seconds: wall-clock of the first step (compilation included), summed
        over the calls of a resumed run.
      stopped: ``stop`` asked the run to end early (after a checkpoint, if any).
    """

    params: PyTree
    state: Any
    rows: list[Row] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    memory: dict[str, Any] | None = None
    start_step: int = 0
    compile_seconds: float = 0.0
    stopped: bool = False


def _pack(m: dict[str, jax.Array]) -> jax.Array:
    return jnp.stack([jnp.asarray(m[k], jnp.float32) for k in METRIC_NAMES])


def _unpack(vec: np.ndarray) -> Row:
    row: Row = {}
    for k, v in zip(METRIC_NAMES, vec.tolist(), strict=True):
        if k in ("used_gradient", "verified", "rolled_back"):
            row[k] = bool(v)
        elif k in (
            "loss",
            "predicted_loss",
            "confidence",
            "update_norm",
            "accuracy",
            "horizon_scale",
            "reward",
        ):
            row[k] = float(v)
        else:
            row[k] = int(v)
    return row


STEPPINGS = ("dispatched", "cond")

# The dispatched step packs the HybridState's small leaves (``hybrid_jax._packing``):
# far fewer arrays per call. A module constant, for benchmarks to compare without.
PACK_STATE = True


def make_train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    stepping: str = "dispatched",
    has_aux: bool = False,
) -> Callable[..., tuple[PyTree, Any, jax.Array]]:
    """A jitted step ``(params, carry, batch) -> (params, carry, packed metrics)``.

    For an ``hj.predictive`` transformation it is ``make_dispatched_step``'s programs
    (``stepping="dispatched"``; ``carry`` is then the ``HybridState`` packed, see
    ``hybrid_jax._packing``) or ``hybrid_step`` (``"cond"``; ``carry`` is the
    ``HybridState``); for any other optax optimizer it is the plain optax step of
    ``hybrid_jax._plain`` (the baseline) and ``carry`` is ``(optax state, int32 step)``.
    Params and carry are donated. With ``has_aux``, ``loss_fn`` returns ``(loss, aux)``
    and ``aux`` is dropped.
    """
    if stepping not in STEPPINGS:
        raise ValueError(f"train: stepping must be one of {STEPPINGS}; got {stepping!r}")
    if has_aux:
        with_aux = loss_with_aux(loss_fn, True)
        loss_fn = lambda p, b: with_aux(p, b)[0]
    if isinstance(tx, PredictiveTransformation) and stepping == "dispatched":
        chosen = DispatchedStep(
            loss_fn, tx, metrics_fn=lambda s: _pack(metrics(s)), pack_state=PACK_STATE
        )

        def dispatched_step(params, state, batch):
            if not chosen.compiled_kinds:  # all of them now, inside the first (compile) step
                chosen.compile(params, state, batch)
            return chosen(params, state, batch)

        return dispatched_step
    if isinstance(tx, PredictiveTransformation):

        def step(params, state, batch):
            params, state, m = hybrid_step(loss_fn, tx, params, state, batch)
            return params, state, _pack(m)

    else:
        plain = plain_step(loss_fn, tx)

        def step(params, carry, batch):
            params, carry, m = plain(params, carry, batch)
            return params, carry, _pack(m)

    return jax.jit(step, donate_argnums=(0, 1))


def train(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    params: PyTree,
    data: Callable[[int], Iterator[Any]],
    *,
    steps: int,
    state: Any = None,
    eval_fn: Callable[[PyTree], Any] | None = None,
    eval_every: int = 0,
    sync_every: int = 50,
    callbacks: Sequence[Callable[[Row], None]] = (),
    checkpointer: Checkpointer | None = None,
    resume: bool = False,
    memory: MemoryMonitor | None = None,
    progress: bool = True,
    desc: str = "train",
    stepping: str = "dispatched",
    has_aux: bool = False,
    max_nonfinite_steps: int | None = 100,
    stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Trains for ``steps`` steps with ``tx`` (a hybrid or a plain optax optimizer).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar loss``.
      tx: ``hj.predictive(...)`` or any optax optimizer (then every step is real).
      params: initial parameters (donated: do not reuse them).
      data: ``data(start)`` returns an iterator of batches beginning at batch ``start``;
        batch ``i`` must depend only on ``i`` so that a resumed run sees the same data.
      steps: total steps of the run (a resumed run stops at the same total).
      state: initial optimizer state (default ``tx.init(params)``).
      eval_fn: ``eval_fn(params) -> held-out loss``, run every ``eval_every`` steps and
        after the last step (0: only after the last step).
      sync_every: steps between fetches of the metrics from the device.
      callbacks: called with each step's row (host scalars) after each fetch.
      checkpointer: saves every ``checkpointer.every`` steps, after the last step, and on
        a memory emergency; its config must describe this run.
      resume: continue from the checkpointer's latest good checkpoint (if any).
      memory: sampled at every fetch; its emergency triggers a checkpoint.
      progress: show a progress bar (tqdm when installed, else a line per fetch).
      desc: label of the progress bar.
      stepping: ``"dispatched"`` (``make_dispatched_step``, the default: as fast as a
        plain optax step on the CPU) or ``"cond"`` (``make_hybrid_step``); same steps.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is not used.
      max_nonfinite_steps: non-finite steps (skipped by a hybrid, applied by a plain
        optax optimizer) are reported by ``hj.NonfiniteWarning``s; after this many in a
        row (seen at a fetch) the run stops with a ``FloatingPointError`` naming the
        step. ``None``: never stop.
      stop: called after each step; ``True`` (e.g. a Ctrl-C handler's flag) makes the
        run fetch its metrics, checkpoint and return with ``stopped=True``.

    Returns:
      A ``TrainResult``.
    """
    _check_args(steps=steps, sync_every=sync_every, eval_every=eval_every)
    state = unpack_state(state)  # a packed state (make_dispatched_step(pack_state=True))
    _check_inputs(params, state, max_nonfinite_steps)
    result, clock = _start(
        tx, params, state, checkpointer=checkpointer, resume=resume, desc=desc, steps=steps
    )
    start = result.start_step
    if start >= steps:
        return result
    plain = not isinstance(tx, PredictiveTransformation)
    bar = progress_bar(progress, steps, start, desc, plain=plain)
    watch = NonfiniteWatch.starting_at(max_nonfinite_steps, result.state)
    callbacks = (*callbacks, watch)
    flush = functools.partial(_flush, result=result, callbacks=callbacks, memory=memory, bar=bar)
    when = _When(steps, sync_every, eval_fn, eval_every, checkpointer, stop)
    step_fn = make_train_step(loss_fn, tx, stepping=stepping, has_aux=has_aux)
    _step_loop(step_fn, data(start), when, plain=plain, flush=flush, result=result, clock=clock)
    bar(None, 0)
    watch.finish()
    result.memory = memory.summary() if memory is not None else None
    return result


def _check_inputs(params: PyTree, state: Any, max_nonfinite_steps: int | None) -> None:
    """Raises where ``max_nonfinite_steps`` is invalid or an input was donated before."""
    check_max_steps(max_nonfinite_steps)
    if (err := donated_error("hj.train", params, state, fix=TRAIN_FIX)) is not None:
        raise err


def _check_args(*, steps: int, sync_every: int, eval_every: int) -> None:
    """Raises ``ValueError`` unless ``steps``, ``sync_every`` >= 1 and ``eval_every`` >= 0."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"train: steps must be an int >= 1; got {steps!r}")
    if not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"train: sync_every must be an int >= 1; got {sync_every!r}")
    if not isinstance(eval_every, int) or eval_every < 0:
        raise ValueError(f"train: eval_every must be an int >= 0; got {eval_every!r}")


def _start(
    tx: optax.GradientTransformation,
    params: PyTree,
    state: Any,
    *,
    checkpointer: Checkpointer | None,
    resume: bool,
    desc: str,
    steps: int,
) -> tuple[TrainResult, TrainingClock]:
    """Where the run starts: a ``TrainResult`` holding the first step to run and the
    params and optimizer state it starts from, and the training clock.

    ``state`` defaults to ``tx.init(params)``. With ``resume`` (which needs a
    checkpointer), the latest good checkpoint, if any, replaces both (checkpoint N holds
    the state after N steps, so the run goes on at step N), and the clock and compile
    seconds go on from it. What was found is logged (logger ``"hybrid_jax"``, INFO).
    """
    if resume and checkpointer is None:
        raise ValueError("train: resume=True needs a checkpointer")
    state = jax.jit(tx.init)(params) if state is None else state
    if not resume:
        return TrainResult(params, state), TrainingClock()
    found = checkpointer.all_steps()
    restored = checkpointer.restore(params, state)
    where = checkpointer.directory
    if restored is None:
        what = "no readable checkpoint" if found else "no checkpoint"
        log.info("%s: %s in %s, starting at step 0", desc, what, where)
        return TrainResult(params, state), TrainingClock()
    start, params, state, extra = restored
    if start >= steps:
        log.info("%s: the checkpoint in %s is at step %d: done", desc, where, start)
    else:
        log.info("%s: resuming at step %d from the checkpoint in %s", desc, start, where)
    extra = extra if isinstance(extra, dict) else {}
    result = TrainResult(params, state, start_step=start)
    result.compile_seconds = float(extra.get("compile_seconds", 0.0))
    return result, TrainingClock(extra.get("time", 0.0))


class _When(NamedTuple):
    """When the step loop stops, fetches, evaluates and checkpoints (``train``'s args)."""

    steps: int
    sync_every: int
    eval_fn: Callable[[PyTree], Any] | None
    eval_every: int
    checkpointer: Checkpointer | None
    stop: Callable[[], bool] | None


def _step_loop(
    step_fn: Callable[..., tuple[PyTree, Any, jax.Array]],
    batches: Iterator[Any],
    when: _When,
    *,
    plain: bool,
    flush: Callable[..., bool],
    result: TrainResult,
    clock: TrainingClock,
) -> None:
    """Runs steps ``result.start_step .. steps - 1`` from ``result.params`` and
    ``result.state``, and leaves the params and optimizer state after them there.

    Each step's packed metrics wait on the device in a pending list until ``flush`` (see
    ``_flush``) fetches them: every ``sync_every`` steps, after the last step, on an
    evaluation and on a stop. Checkpoints are saved on a memory emergency, every
    ``checkpointer.every`` steps, after the last step and on a stop. ``clock`` times the
    rows; it stands still during evaluations and checkpoints.
    """
    steps, sync_every, eval_fn, eval_every, checkpointer, stop = when
    start, params, state = result.start_step, result.params, result.state
    carry = (state, jnp.asarray(start, jnp.int32)) if plain else state
    pending: _Pending = []
    save = functools.partial(_save, checkpointer, clock=clock, result=result)
    clock.restart()  # the first step's seconds (compilation) are counted from here
    for i in range(start, steps):
        params, carry, vec = step_fn(params, carry, next(batches))
        state = carry[0] if plain else carry
        if i == start:  # compilation: timed apart, the clock of the rows starts after it
            result.compile_seconds += _end_compile(vec, clock)
        last_step = i == steps - 1
        stopping = stop is not None and not last_step and stop()
        if last_step or stopping:  # a row's time is its launch; the run's, its work done
            jax.block_until_ready(vec)
        pending.append((i, clock.now(), vec))
        eval_loss = None
        if eval_fn is not None and ((eval_every and (i + 1) % eval_every == 0) or last_step):
            with clock.paused(wait_for=params):
                eval_loss = float(eval_fn(params))
        emergency = False
        if len(pending) >= sync_every or last_step or stopping or eval_loss is not None:
            emergency = flush(pending, eval_loss=eval_loss)
        if emergency:
            save(step=i, params=params, state=state, reason="memory emergency")
        on_interval = checkpointer is not None and (i + 1) % checkpointer.every == 0
        if on_interval or last_step or stopping:
            reason = "end" if last_step else "interval" if on_interval else "stopped"
            save(step=i, params=params, state=state, reason=reason)
        if stopping:
            result.stopped = True
            break
    result.params, result.state = params, unpack_state(state)


def _end_compile(vec: jax.Array, clock: TrainingClock) -> float:
    """Waits for the first step; returns its seconds and restarts ``clock`` after it."""
    jax.block_until_ready(vec)
    seconds = clock.now() - clock.offset
    clock.restart()
    return seconds


def _fetch_rows(pending: _Pending) -> list[Row]:
    """The rows of the pending steps, fetched in one transfer, each with its ``time``."""
    vecs = jax.device_get([v for _, _, v in pending])
    rows = []
    for (_, t, _), vec in zip(pending, vecs, strict=True):
        row = _unpack(np.asarray(vec))
        row["time"] = t
        rows.append(row)
    return rows


def _flush(
    pending: _Pending,
    *,
    result: TrainResult,
    callbacks: Sequence[Callable[[Row], None]],
    memory: MemoryMonitor | None,
    bar: Callable[[Row | None, int], None],
    eval_loss: float | None = None,
) -> bool:
    """Fetches and empties ``pending``: its rows go to ``result.rows``, the callbacks and
    the progress bar, and the memory monitor samples once. ``eval_loss``, the held-out
    loss after the last pending step, goes into that step's row (before the callbacks
    see it) and into ``result.evals``.

    Returns:
      Whether that sample started a memory emergency (``False`` with nothing pending).
    """
    if not pending:
        return False
    new_rows = _fetch_rows(pending)
    pending.clear()
    if eval_loss is not None:
        new_rows[-1]["eval_loss"] = eval_loss
        result.evals.append((new_rows[-1]["step"], eval_loss))
    result.rows.extend(new_rows)
    for cb in callbacks:
        for row in new_rows:
            cb(row)
    emergency = False
    if memory is not None:
        last = new_rows[-1]
        sample = memory.sample(last["step"], last["phase"])
        emergency = bool(sample.get("emergency_started"))
    bar(new_rows[-1], len(new_rows))
    return emergency


def _save(
    checkpointer: Checkpointer | None,
    *,
    step: int,
    params: PyTree,
    state: Any,
    reason: str,
    clock: TrainingClock,
    result: TrainResult,
) -> None:
    """Checkpoints the state after step ``step``, as checkpoint ``step + 1`` (steps done),
    before the next step donates its buffers (nothing without a checkpointer). The clock
    stands still meanwhile; the checkpoint keeps its reading and the compile seconds so
    far, from which a resumed run goes on."""
    if checkpointer is None:
        return
    with clock.paused(wait_for=params):
        extra = {"reason": reason, "time": clock.now(), "compile_seconds": result.compile_seconds}
        checkpointer.save(step + 1, params, unpack_state(state), extra=extra, force=True)
