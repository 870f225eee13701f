"""The step ``hj.train`` takes with a plain optax optimizer (the baseline).

``value_and_grad`` and the optimizer's update, with the hybrid's metrics names, and the
hybrid's rule for non-finite values: a step whose loss or gradient is NaN or Inf leaves
the parameters and the optimizer state as they were and counts a skipped update (a bare
optax step would write the NaN into the parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ._kinds import loss_with_aux
from ._metrics import METRIC_NAMES
from ._phases import FULL

PyTree = Any
Carry = tuple[Any, jax.Array, jax.Array]  # (optax state, int32 step, int32 skipped so far)


def init_carry(state: Any, start: int) -> Carry:
    """The carry of a run that starts at step ``start`` from the optax state ``state``."""
    return state, jnp.asarray(start, jnp.int32), jnp.zeros((), jnp.int32)


def plain_metrics(step: jax.Array, loss: jax.Array, skipped: jax.Array) -> dict[str, jax.Array]:
    """The metrics of a plain optax step, in the hybrid's names (``skipped``: the steps
    not applied so far)."""
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
        "skipped_updates": skipped,
        "idle_steps": zero,
        "divergence_events": zero,
        "horizon_scale": jnp.ones((), jnp.float32),
        "bandit_arm": jnp.full((), -1, jnp.int32),
        "reward": nan,
    }
    return {k: values[k] for k in METRIC_NAMES}


def plain_step(
    loss_fn: Callable[..., Any], tx: optax.GradientTransformation
) -> Callable[[PyTree, Carry, Any], tuple[PyTree, Carry, dict[str, jax.Array]]]:
    """``step(params, carry, batch) -> (params, carry, metrics)`` for ``tx``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> float scalar loss``.
      tx: any optax optimizer.

    Returns:
      The step (not jitted); ``carry`` starts as ``init_carry(tx.init(params), 0)``.
    """
    with_aux = loss_with_aux(loss_fn, False)

    def step(params: PyTree, carry: Carry, batch: Any):
        state, i, skipped = carry
        (loss, _), grads = jax.value_and_grad(with_aux, has_aux=True)(params, batch)
        updates, new_state = tx.update(grads, state, params)
        finite = jnp.isfinite(loss)
        for g in jax.tree.leaves(grads):
            finite &= jnp.all(jnp.isfinite(g))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params = keep(optax.apply_updates(params, updates), params)
        skipped = skipped + (~finite).astype(jnp.int32)
        carry = (keep(new_state, state), i + 1, skipped)
        return params, carry, plain_metrics(i, loss, skipped)

    return step
