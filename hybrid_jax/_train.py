"""`hj.train`: a small driver around the jitted step, for scripts, notebooks and the CLI.

The loop dispatches one jitted step per batch and keeps each step's metrics on the
device, packed into one small vector; every ``sync_every`` steps it fetches them in one
transfer, so the device is never made to wait on every step. Around that: a progress
bar, periodic held-out evaluation, callbacks, memory sampling with an emergency
checkpoint, and orbax checkpoints from which a run resumes exactly.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._checkpoint import Checkpointer
from ._dispatch import DispatchedStep
from ._memory import MemoryMonitor
from ._metrics import METRIC_NAMES, metrics
from ._phases import FULL
from ._progress import progress_bar
from ._step import hybrid_step
from ._transform import PredictiveTransformation

PyTree = Any
Row = dict[str, Any]
_Pending = list[tuple[int, float, jax.Array]]  # (step, time, packed metrics on device)


@dataclass
class TrainResult:
    """What ``train`` returns.

    Attributes:
      params, state: after the last step (``state`` is the optax state for a plain
        optimizer).
      rows: one dict of host scalars per step (``METRIC_NAMES`` plus ``time``, seconds
        since the end of the first step, i.e. after compilation, when the step was
        dispatched, and ``eval_loss`` on evaluation steps). With asynchronous dispatch a
        step's dispatch waits for the device once its queue is full, so the clock follows
        the device's pace; evaluations and checkpoints are inside it.
      evals: ``(step, held-out loss)`` pairs.
      memory: the memory monitor's summary (``None`` without a monitor).
      start_step: the first step this call ran (after a resume, not 0).
      compile_seconds: wall-clock of the first step (compilation included).
    """

    params: PyTree
    state: Any
    rows: list[Row] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    memory: dict[str, Any] | None = None
    start_step: int = 0
    compile_seconds: float = 0.0


def _plain_metrics(step: jax.Array, loss: jax.Array) -> dict[str, jax.Array]:
    """The metrics of a plain optax step, in the hybrid's names."""
    n = step + 1
    nan = jnp.full((), jnp.nan, jnp.float32)
    zero = jnp.zeros((), jnp.int32)
    values = {
        "step": step,
        "phase": jnp.full((), FULL, jnp.int32),
        "used_gradient": jnp.asarray(True),
        "loss": loss.astype(jnp.float32),
        "predicted_loss": nan,
        "confidence": jnp.zeros((), jnp.float32),
        "horizon": zero,
        "verified": jnp.asarray(False),
        "rolled_back": jnp.asarray(False),
        "divergence_level": zero,
        "backward_passes": n,
        "forward_passes": n,
        "predicted_steps": zero,
        "update_norm": nan,
        "accuracy": nan,
        "nonfinite_predictions": zero,
        "rollbacks": zero,
        "skipped_updates": zero,
        "idle_steps": zero,
        "cost_rejections": zero,
        "divergence_events": zero,
        "horizon_scale": jnp.ones((), jnp.float32),
        "bandit_arm": jnp.full((), -1, jnp.int32),
        "reward": nan,
    }
    return {k: values[k] for k in METRIC_NAMES}


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


def make_train_step(
    loss_fn: Callable[..., Any], tx: optax.GradientTransformation, *, stepping: str = "dispatched"
) -> Callable[..., tuple[PyTree, Any, jax.Array]]:
    """A jitted step ``(params, carry, batch) -> (params, carry, packed metrics)``.

    For an ``hj.predictive`` transformation it is ``make_dispatched_step``'s programs
    (``stepping="dispatched"``) or ``hybrid_step`` (``"cond"``) and ``carry`` is the
    ``HybridState``; for any other optax optimizer it is the plain ``value_and_grad`` +
    update step (the baseline) and ``carry`` is ``(optax state, int32 step)``. Params
    and carry are donated.
    """
    if stepping not in STEPPINGS:
        raise ValueError(f"train: stepping must be one of {STEPPINGS}; got {stepping!r}")
    if isinstance(tx, PredictiveTransformation) and stepping == "dispatched":
        chosen = DispatchedStep(loss_fn, tx, metrics_fn=lambda s: _pack(metrics(s)))

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

        def step(params, carry, batch):
            state, i = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, state = tx.update(grads, state, params)
            m = _plain_metrics(i, loss)
            return optax.apply_updates(params, updates), (state, i + 1), _pack(m)

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
      stepping: how a hybrid steps: ``"dispatched"`` (``make_dispatched_step``: one
        program per kind of step, chosen on the host a step ahead; the default, as fast
        as a plain optax step on the CPU and faster on a GPU) or ``"cond"``
        (``make_hybrid_step``: one ``lax.switch`` on the device). Both take the same
        steps and reach the same parameters.

    Returns:
      A ``TrainResult``.
    """
    _check_args(steps=steps, sync_every=sync_every, eval_every=eval_every)
    start, params, state = _start(tx, params, state, checkpointer=checkpointer, resume=resume)
    result = TrainResult(params, state, start_step=start)
    if start >= steps:
        return result

    step_fn = make_train_step(loss_fn, tx, stepping=stepping)
    batches = data(start)
    bar = progress_bar(progress, steps, start, desc)
    flush = functools.partial(_flush, result=result, callbacks=callbacks, memory=memory, bar=bar)
    params, state = _step_loop(
        step_fn,
        params,
        state,
        batches,
        plain=not isinstance(tx, PredictiveTransformation),
        start=start,
        steps=steps,
        sync_every=sync_every,
        eval_fn=eval_fn,
        eval_every=eval_every,
        checkpointer=checkpointer,
        flush=flush,
        result=result,
    )
    bar(None, 0)
    result.params, result.state = params, state
    result.memory = memory.summary() if memory is not None else None
    return result


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
) -> tuple[int, PyTree, Any]:
    """The first step to run, and the params and optimizer state it starts from.

    ``state`` defaults to ``tx.init(params)``. With ``resume`` (which needs a
    checkpointer), the latest good checkpoint, if any, replaces both: checkpoint N holds
    the state after N steps, so the run goes on at step N.
    """
    if resume and checkpointer is None:
        raise ValueError("train: resume=True needs a checkpointer")
    state = jax.jit(tx.init)(params) if state is None else state
    if resume:
        restored = checkpointer.restore(params, state)
        if restored is not None:
            start, params, state, _ = restored
            return start, params, state
    return 0, params, state


def _step_loop(
    step_fn: Callable[..., tuple[PyTree, Any, jax.Array]],
    params: PyTree,
    state: Any,
    batches: Iterator[Any],
    *,
    plain: bool,
    start: int,
    steps: int,
    sync_every: int,
    eval_fn: Callable[[PyTree], Any] | None,
    eval_every: int,
    checkpointer: Checkpointer | None,
    flush: Callable[[_Pending], bool],
    result: TrainResult,
) -> tuple[PyTree, Any]:
    """Runs steps ``start .. steps - 1``; returns the params and optimizer state after them.

    Each step's packed metrics wait on the device in a pending list until ``flush`` (see
    ``_flush``) fetches them: every ``sync_every`` steps, after the last step and before an
    evaluation. Evaluations go into ``result``; checkpoints are saved on a memory
    emergency, every ``checkpointer.every`` steps and after the last step.
    """
    carry = (state, jnp.asarray(start, jnp.int32)) if plain else state
    pending: _Pending = []
    emergency = False
    t0 = time.perf_counter()
    for i in range(start, steps):
        batch = next(batches)
        params, carry, vec = step_fn(params, carry, batch)
        state = carry[0] if plain else carry
        if i == start:  # compilation: timed apart, the clock of the rows starts after it
            result.compile_seconds, t0 = _end_compile(vec, t0)
        pending.append((i, time.perf_counter() - t0, vec))
        last_step = i == steps - 1
        if len(pending) >= sync_every or last_step:
            emergency |= flush(pending)
        if eval_fn is not None and ((eval_every and (i + 1) % eval_every == 0) or last_step):
            emergency |= flush(pending)
            _evaluate(eval_fn, params, step=i, result=result)
        if emergency:
            _save(checkpointer, step=i, params=params, state=state, reason="memory emergency")
            emergency = False
        if checkpointer is not None and ((i + 1) % checkpointer.every == 0 or last_step):
            reason = "end" if last_step else "interval"
            _save(checkpointer, step=i, params=params, state=state, reason=reason)
    return params, state


def _end_compile(vec: jax.Array, t0: float) -> tuple[float, float]:
    """Waits for the first step; returns its seconds since ``t0`` and the rows' new t0."""
    jax.block_until_ready(vec)
    compile_seconds = time.perf_counter() - t0
    return compile_seconds, time.perf_counter()


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
) -> bool:
    """Fetches and empties ``pending``: its rows go to ``result.rows``, the callbacks and
    the progress bar, and the memory monitor samples once.

    Returns:
      Whether that sample started a memory emergency (``False`` with nothing pending).
    """
    if not pending:
        return False
    new_rows = _fetch_rows(pending)
    pending.clear()
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


def _evaluate(
    eval_fn: Callable[[PyTree], Any], params: PyTree, *, step: int, result: TrainResult
) -> None:
    """Runs ``eval_fn`` after ``step``: into ``result.evals`` and the last row's ``eval_loss``."""
    loss = float(eval_fn(params))
    result.evals.append((step, loss))
    result.rows[-1]["eval_loss"] = loss


def _save(
    checkpointer: Checkpointer | None, *, step: int, params: PyTree, state: Any, reason: str
) -> None:
    """Checkpoints the state after step ``step``, as checkpoint ``step + 1`` (steps done),
    before the next step donates its buffers (nothing without a checkpointer)."""
    if checkpointer is not None:
        checkpointer.save(step + 1, params, state, extra={"reason": reason}, force=True)
