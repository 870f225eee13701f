"""The kinds of step, described once.

=============  ==============================================================
kind           what it does
=============  ==============================================================
real           forward, backward, the wrapped optimizer's update, observed
verify         the same, plus the forward pass at the snapshot that checks the
               Predict phase that just ended (rolled back if it fails)
predict_first  the first predicted step of a Predict phase: takes the snapshot
predict        a predicted step: no forward pass, no backward pass
plain          a real step the hybrid does not observe (``observe_every > 2``):
               the optimizer's step with the safety checks
=============  ==============================================================

``kind_of(cfg, state)`` says which kind ``state`` wants next. The on-device step
(``make_hybrid_step``: one ``lax.switch`` over the kinds), the host-dispatched step
(``make_dispatched_step``: one compiled program per kind) and the sharded step all
compose these same kinds, so they take the same steps. By the phase machine's one
rule (``hybrid_jax._phases``), ``kind_after_next(cfg, state)`` is exact: the kind of
the step after the next is known from the state before the next; and inside a Full
phase those of the steps up to its end (``kinds_ahead``; ``quiet_run`` counts a long
stretch of unobserved steps at once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _encoder, _phases
from ._state import HybridState
from .config import HybridConfig

PyTree = Any

REAL, VERIFY, PREDICT_FIRST, PREDICT, PLAIN = 0, 1, 2, 3, 4
KIND_NAMES = ("real", "verify", "predict_first", "predict", "plain")


def kinds_used(cfg: HybridConfig) -> tuple[int, ...]:
    """The kinds a run can need (``plain`` only with ``observe_every > 2``)."""
    return (REAL, VERIFY, PREDICT_FIRST, PREDICT) + ((PLAIN,) if cfg.observe_every > 2 else ())


def kind_of(cfg: HybridConfig, state: HybridState) -> jax.Array:
    """The kind of step ``state`` wants next (int32, an index into ``KIND_NAMES``)."""
    ph = state.phase
    real = _real_kind(cfg, ph, state.encoder, state.step, state.pending.verify)
    predicted = jnp.where(ph.step == 0, PREDICT_FIRST, PREDICT)
    return jnp.where(ph.id == _phases.PREDICT, predicted, real).astype(jnp.int32)


def _real_kind(
    cfg: HybridConfig, ph: _phases.Phase, enc: Any, step: jax.Array, verify
) -> jax.Array:
    """The kind of a real step taken at ``step`` in ``ph``: verify, observed or plain."""
    observed = _phases.observation_due(cfg, ph, enc.unobserved, _encoder.pair_open(enc, step))
    return jnp.where(verify, VERIFY, jnp.where(observed, REAL, PLAIN))


def _after_next(cfg: HybridConfig, state: HybridState) -> HybridState:
    """``state`` with the small parts that decide kinds of step moved past its next step
    (the phase machine's one rule)."""
    kind = kind_of(cfg, state)
    real = (kind == REAL) | (kind == VERIFY) | (kind == PLAIN)
    observed = (kind == REAL) | (kind == VERIFY)
    may = _phases.gate(cfg, state.stats.confidence, state.pending) & observed
    sched = _phases.schedule_after(
        cfg,
        state.phase,
        state.pending,
        state.snapshot_valid,
        real=real,
        verifying=kind == VERIFY,
        first=kind == PREDICT_FIRST,
        may_predict=may,
        next_horizon=1,
    )
    moved = _encoder.after_real_step(state.encoder, state.step, observed)
    encoder = jax.tree.map(lambda a, b: jnp.where(real, a, b), moved, state.encoder)
    return state._replace(
        phase=sched.phase,
        pending=state.pending._replace(verify=sched.verify),
        encoder=encoder,
        step=state.step + 1,
    )


def kind_after_next(cfg: HybridConfig, state: HybridState) -> jax.Array:
    """The kind of the step after the next one, from ``state`` alone (exact)."""
    return kind_of(cfg, _after_next(cfg, state))


def kinds_ahead(cfg: HybridConfig, state: HybridState, n: int) -> jax.Array:
    """int32[max(n, 2)]: the kinds of the steps from ``state``'s next one on, each as far
    as it is certain whatever the steps before it measure, and -1 from the first that
    is not. The first two are always certain (``kind_of``, ``kind_after_next``); the
    kinds of a Full phase's steps are certain up to its last one: inside a Full or
    Warmup phase nothing a step measures changes the course (``_phases.deferred``), so
    each step moves the phase one step on and the encoder's counters as it is observed."""
    s = _after_next(cfg, state)
    kind = kind_of(cfg, s)
    kinds = [kind_of(cfg, state), kind]
    real = (kind == REAL) | (kind == VERIFY) | (kind == PLAIN)
    ph, enc, step, verify = s.phase, s.encoder, s.step, s.pending.verify
    certain = jnp.asarray(True)
    for _ in range(2, n):
        certain = certain & real & _phases.deferred(ph)  # the step before is steady
        enc = _encoder.after_real_step(enc, step, (kind == REAL) | (kind == VERIFY))
        ph, step, verify = ph._replace(step=ph.step + 1), step + 1, verify & (kind != VERIFY)
        kind, real = _real_kind(cfg, ph, enc, step, verify), True
        kinds.append(jnp.where(certain, kind, -1))
    return jnp.stack(kinds).astype(jnp.int32)


def quiet_run(cfg: HybridConfig, state: HybridState) -> jax.Array:
    """int32: how many steps after the step after next are certain to be unobserved real
    steps, as the rest of a quiet stretch of a Full or Warmup phase (``_phases.quiet``;
    0 where the step after next does not begin one). Inside a Full phase nothing
    measured changes the course (``_phases.deferred``), and a quiet step observes
    nothing, so each one leaves the next quiet until the last ``full_steps`` steps."""
    s = _after_next(cfg, state)
    ph = s.phase
    certain = (kind_of(cfg, s) == PLAIN) & _phases.deferred(ph) & _phases.quiet(cfg, ph)
    return jnp.where(certain, ph.budget - cfg.full_steps - ph.step - 1, 0).astype(jnp.int32)


def switch(cfg: HybridConfig, state: HybridState, branches: dict[int, Callable], *operands):
    """``branches[kind_of(cfg, state)](*operands)`` on the device (one ``lax.switch``
    over the kinds this config can need)."""
    used = kinds_used(cfg)
    index = jnp.zeros((), jnp.int32)
    kind = kind_of(cfg, state)
    for i, k in enumerate(used):
        index = jnp.where(kind == k, i, index)
    return jax.lax.switch(index, [branches[k] for k in used], *operands)


def loss_with_aux(loss_fn: Callable[..., Any], has_aux: bool) -> Callable[..., Any]:
    """``loss_fn`` as ``(params, batch) -> (float scalar loss, aux or None)``, checked."""

    def with_aux(p: PyTree, b: Any) -> tuple[jax.Array, Any]:
        out = loss_fn(p, b)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"loss_fn must return (loss, aux) when has_aux=True; it returned "
                    f"{describe(out)}. If it returns only the loss, pass has_aux=False "
                    "(the default)"
                )
            loss, aux = out
        else:
            if isinstance(out, tuple):
                raise TypeError(
                    f"loss_fn returned a tuple of {len(out)}: if it returns (loss, aux), "
                    "pass has_aux=True"
                )
            loss, aux = out, None
        return check_loss(loss, "loss_fn must return"), aux

    return with_aux


def describe(x: Any) -> str:
    """What a loss function returned, for error messages: ``float32[4]``, ``a tuple of 3``."""
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}"
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        return f"{x.dtype}{list(x.shape)}"
    return f"a {type(x).__name__}"


def check_loss(loss: Any, what: str) -> jax.Array:
    """``loss`` as an array, or a ``TypeError`` (``what`` begins it) unless it is a float
    scalar."""
    if isinstance(loss, (tuple, list)):
        raise TypeError(
            f"{what} the loss, a float scalar; got {describe(loss)}: if loss_fn returns "
            "(loss, aux), pass its first element"
        )
    arr = jnp.asarray(loss)
    if arr.shape != () or not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(
            f"{what} a float scalar; got {describe(arr)}: reduce a per-example loss to one "
            "number (e.g. jnp.mean), and compute it in a float dtype"
        )
    return arr


def missing(shape: Any) -> Any:
    """NaN (floats) or zeros (other dtypes) shaped like ``shape`` (from ``eval_shape``)."""

    def fill(s: jax.ShapeDtypeStruct) -> jax.Array:
        if jnp.issubdtype(s.dtype, jnp.inexact):
            return jnp.full(s.shape, jnp.nan, s.dtype)
        return jnp.zeros(s.shape, s.dtype)

    return jax.tree.map(fill, shape)


def real_step(with_aux: Callable, tx: Any, *, verify: bool, observe: bool) -> Callable:
    """A real kind as ``(params, state, batch) -> (params, state, aux)``."""

    def run(params: PyTree, state: HybridState, batch: Any):
        snap = None
        if verify:
            snap = with_aux(state.snapshot, batch)[0].astype(jnp.float32)
        (loss, aux), grads = jax.value_and_grad(with_aux, has_aux=True)(params, batch)
        out = tx.real_parts(
            grads, state, params, value=loss, snapshot_value=snap, verify=verify, observe=observe
        )
        base = params
        if verify:  # a rollback restores the snapshot exactly, then applies its update
            base = jax.tree.map(lambda p, s: jnp.where(out.rollback, s, p), params, state.snapshot)
        stepped = jax.tree.map(lambda b, u: (b + u).astype(b.dtype), base, out.updates)
        return stepped, out.state, aux

    return run


def predicted_step(with_aux: Callable, tx: Any, *, first: bool, aux_shape: Any) -> Callable:
    """A predicted kind as ``(params, state, batch) -> (params, state, aux)``: the
    predicted update, plus the monitor's forward pass every ``monitor_every`` steps."""
    cfg = tx.config

    def run(params: PyTree, state: HybridState, batch: Any):
        aux, loss = missing(aux_shape), None
        if cfg.monitor_every > 0:

            def forward(_: Any) -> tuple[jax.Array, Any]:
                loss, aux = with_aux(params, batch)
                return loss.astype(jnp.float32), aux

            def skip(_: Any) -> tuple[jax.Array, Any]:
                return jnp.full((), jnp.nan, jnp.float32), aux

            due = (state.phase.step + 1) % cfg.monitor_every == 0
            loss, aux = jax.lax.cond(due, forward, skip, None)
        updates, new = tx.predicted_update(state, params, first=first, loss=loss)
        return jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates), new, aux

    return run


def step_kinds(with_aux: Callable, tx: Any, aux_shape: Any) -> dict[int, Callable]:
    """Every kind of step as ``(params, state, batch) -> (params, state, aux)``."""
    return {
        REAL: real_step(with_aux, tx, verify=False, observe=True),
        VERIFY: real_step(with_aux, tx, verify=True, observe=True),
        PREDICT_FIRST: predicted_step(with_aux, tx, first=True, aux_shape=aux_shape),
        PREDICT: predicted_step(with_aux, tx, first=False, aux_shape=aux_shape),
        PLAIN: real_step(with_aux, tx, verify=False, observe=False),
    }
