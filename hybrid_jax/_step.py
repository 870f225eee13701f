"""`hybrid_step`: one ``lax.cond`` between a real gradient step and a predicted step."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ._metrics import metrics
from ._state import HybridState
from ._transform import PredictiveTransformation

PyTree = Any


def hybrid_step(
    loss_fn: Callable[..., Any],
    tx: PredictiveTransformation,
    params: PyTree,
    state: HybridState,
    batch: Any,
    *,
    has_aux: bool = False,
) -> tuple[PyTree, HybridState, dict[str, jax.Array]] | tuple[PyTree, HybridState, dict, Any]:
    """One training step; the phase machine in ``state`` picks real or predicted.

    Real branch: ``value_and_grad(loss_fn)``, the wrapped optimizer's update, and what
    the transformation learns from it; on the first real step after a Predict phase, one
    more forward pass (the loss at the phase's snapshot, on the same batch) verifies the
    phase, and a rejected phase is rolled back exactly to the snapshot. Predicted branch:
    the predicted update only, no backward pass and no forward pass, except a forward
    pass (the loss at the step's starting parameters, which the divergence monitor
    checks) every ``config.monitor_every`` predicted steps when that is > 0.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (a float scalar), or
        ``-> (loss, aux)`` with ``has_aux=True``.
      tx: a transformation from ``hj.predictive``.
      params: the parameters (a pytree of floating arrays).
      state: ``tx.init(params)`` or a state returned by a previous step.
      batch: anything ``loss_fn`` takes.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``. On a predicted step without a
        forward pass, ``aux`` is filled with NaN (floats) or zeros (other dtypes).

    Returns:
      ``(params, state, metrics)``, or ``(params, state, metrics, aux)`` with ``has_aux``;
      ``metrics`` is described in ``hybrid_jax._metrics``.
    """
    if not isinstance(tx, PredictiveTransformation):
        raise TypeError(f"tx must come from hj.predictive; got {type(tx).__name__}")
    with_aux = loss_with_aux(loss_fn, has_aux)
    aux_shape = jax.eval_shape(with_aux, params, batch)[1]

    def real(params: PyTree, state: HybridState) -> tuple[PyTree, HybridState, Any]:
        snap_loss = jax.lax.cond(
            state.pending_verify,
            lambda: with_aux(state.snapshot, batch)[0].astype(jnp.float32),
            lambda: jnp.full((), jnp.nan, jnp.float32),
        )
        return real_branch(with_aux, tx, params, state, batch, snap_loss)

    def predicted(params: PyTree, state: HybridState) -> tuple[PyTree, HybridState, Any]:
        return predicted_branch(with_aux, tx, params, state, batch, aux_shape)

    params, state, aux = jax.lax.cond(tx.needs_gradient(state), real, predicted, params, state)
    if has_aux:
        return params, state, metrics(state), aux
    return params, state, metrics(state)


def make_hybrid_step(
    loss_fn: Callable[..., Any],
    tx: PredictiveTransformation,
    *,
    has_aux: bool = False,
    donate: bool = True,
) -> Callable[..., Any]:
    """``hybrid_step`` jitted once for ``loss_fn`` and ``tx``, params and state donated.

    Args:
      loss_fn: see ``hybrid_step``.
      tx: a transformation from ``hj.predictive``.
      has_aux: see ``hybrid_step``.
      donate: donate the params and state buffers (the default; the caller must not
        reuse the arrays it passed in).

    Returns:
      ``step(params, state, batch) -> (params, state, metrics[, aux])``.

    Example:
      >>> step = hj.make_hybrid_step(loss_fn, tx)
      >>> for batch in batches:
      ...     params, state, m = step(params, state, batch)
    """
    if not isinstance(tx, PredictiveTransformation):
        raise TypeError(f"tx must come from hj.predictive; got {type(tx).__name__}")
    fn = functools.partial(hybrid_step, loss_fn, tx, has_aux=has_aux)
    return jax.jit(fn, donate_argnums=(0, 1) if donate else ())


def loss_with_aux(loss_fn: Callable[..., Any], has_aux: bool) -> Callable[..., Any]:
    """``loss_fn`` as ``(params, batch) -> (float scalar loss, aux or None)``, checked."""

    def with_aux(p: PyTree, b: Any) -> tuple[jax.Array, Any]:
        out = loss_fn(p, b)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError("loss_fn must return (loss, aux) when has_aux=True")
            loss, aux = out
        else:
            loss, aux = out, None
        loss = jnp.asarray(loss)
        if loss.shape != () or not jnp.issubdtype(loss.dtype, jnp.floating):
            raise TypeError(f"loss_fn must return a float scalar; got {loss.dtype}{loss.shape}")
        return loss, aux

    return with_aux


def real_branch(
    with_aux: Callable[..., Any],
    tx: PredictiveTransformation,
    params: PyTree,
    state: HybridState,
    batch: Any,
    snap_loss: jax.Array | None,
    *,
    dispatched: bool = False,
    observe: bool | None = None,
) -> tuple[PyTree, HybridState, Any]:
    """A real step: gradient, the transformation's real update, rollback applied exactly."""
    (loss, aux), grads = jax.value_and_grad(with_aux, has_aux=True)(params, batch)
    snapshot = state.snapshot
    updates, state = tx.real_update(
        grads,
        state,
        params,
        value=loss,
        snapshot_value=snap_loss,
        dispatched=dispatched,
        observe=observe,
    )
    if dispatched and snap_loss is None:  # cannot roll back (see ``real_update``)
        return jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates), state, aux
    back = state.last.rolled_back
    params = jax.tree.map(
        lambda p, u, s: jnp.where(back, s, (p + u).astype(p.dtype)), params, updates, snapshot
    )
    return params, state, aux


def predicted_branch(
    with_aux: Callable[..., Any],
    tx: PredictiveTransformation,
    params: PyTree,
    state: HybridState,
    batch: Any,
    aux_shape: Any,
) -> tuple[PyTree, HybridState, Any]:
    """A predicted step: the predicted update, plus the monitor's forward pass when due."""
    cfg = tx.config
    aux = _missing(aux_shape)
    loss = None
    if cfg.monitor_every > 0:

        def forward(_: Any) -> tuple[jax.Array, Any]:
            loss, aux = with_aux(params, batch)
            return loss.astype(jnp.float32), aux

        def skip(_: Any) -> tuple[jax.Array, Any]:
            return jnp.full((), jnp.nan, jnp.float32), aux

        measure = (state.phase_step + 1) % cfg.monitor_every == 0
        loss, aux = jax.lax.cond(measure, forward, skip, None)
    updates, state = tx.predicted_update(state, params, loss=loss)
    return optax.apply_updates(params, updates), state, aux


def _missing(shape: Any) -> Any:
    """NaN (floats) or zeros (other dtypes) shaped like ``shape`` (from ``eval_shape``)."""

    def fill(s: jax.ShapeDtypeStruct) -> jax.Array:
        if jnp.issubdtype(s.dtype, jnp.inexact):
            return jnp.full(s.shape, jnp.nan, s.dtype)
        return jnp.zeros(s.shape, s.dtype)

    return jax.tree.map(fill, shape)
