"""The step ``hj.train`` takes with a plain optax optimizer (the baseline).

``value_and_grad``, the optimizer's update and ``apply_updates``, exactly as optax does
them, with the metrics in the hybrid's names. Like a bare optax step it applies a
non-finite update. Guarding it on the device (checking every gradient and keeping the
old params and state) made this step 1.9x slower on the CPU and 1.3x on an H100 for the
digits MLP (``benchmarks/plain_guard.py``), which would tilt every comparison with the
hybrid. ``hj.train`` reads the loss of every step on the host instead
(``hybrid_jax._nonfinite``): it warns at the first non-finite one and stops the run
after ``max_nonfinite_steps`` of them in a row.
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
Carry = tuple[Any, jax.Array]  # (optax state, int32 step)


def plain_metrics(step: jax.Array, loss: jax.Array) -> dict[str, jax.Array]:
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


def plain_step(
    loss_fn: Callable[..., Any], tx: optax.GradientTransformation
) -> Callable[[PyTree, Carry, Any], tuple[PyTree, Carry, dict[str, jax.Array]]]:
    """``step(params, carry, batch) -> (params, carry, metrics)`` for ``tx``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> float scalar loss``.
      tx: any optax optimizer.

    Returns:
      The step (not jitted); ``carry`` starts as ``(tx.init(params), int32 0)``.
    """
    with_aux = loss_with_aux(loss_fn, False)  # its errors name has_aux

    def step(params: PyTree, carry: Carry, batch: Any):
        state, i = carry
        (loss, _), grads = jax.value_and_grad(with_aux, has_aux=True)(params, batch)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return params, (state, i + 1), plain_metrics(i, loss)

    return step
