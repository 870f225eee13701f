"""`hybrid_step`: one ``lax.switch`` (a ``lax.cond`` with an index) over the kinds of step."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from ._donation import DonatingStep
from ._kinds import loss_with_aux, step_kinds, switch
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
    phase, and a rejected phase is rolled back exactly to the snapshot (then, where the
    cost rule alone rejected it, the verifying step's update is applied from there),
    unless the cost rule alone rejected it after it lowered the loss: then it is kept.
    Predicted branch:
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
    kinds = step_kinds(with_aux, tx, aux_shape)
    params, state, aux = switch(tx.config, state, kinds, params, state, batch)
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
        reuse the arrays it passed in: passing one again raises a ``RuntimeError``
        that says so).

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
    jitted = jax.jit(fn, donate_argnums=(0, 1) if donate else ())
    return DonatingStep(jitted, "make_hybrid_step")
