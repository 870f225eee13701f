"""The cost rule of the verification: a Predict phase must pay for the real steps it
replaced (``HybridConfig.predict_cost_ratio``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._state import HybridState
from .config import HybridConfig

__all__ = ["expected_decrease", "pays"]


def expected_decrease(snapshot_loss: jax.Array, trend: jax.Array, h: jax.Array) -> jax.Array:
    """The loss decrease ``h`` real steps from ``snapshot_loss`` were expected to make:
    ``snapshot_loss * (1 - exp(h * min(trend, 0)))``, with ``trend`` the running
    per-real-step change of the log loss level (0 where it is not negative)."""
    rate = jnp.minimum(jnp.asarray(trend, jnp.float32), 0.0)
    return snapshot_loss * -jnp.expm1(jnp.asarray(h, jnp.float32) * rate)


def pays(cfg: HybridConfig, state: HybridState, snapshot_loss, loss) -> jax.Array:
    """The cost rule: the Predict phase that ended (``state.last.horizon`` steps, its
    planned length) lowered the loss by at least ``predict_cost_ratio`` times what as
    many real steps were expected to (where nothing was expected: it did not raise it).
    Always true with ``predict_cost_ratio == 0``."""
    if cfg.predict_cost_ratio == 0:
        return jnp.asarray(True)
    expected = expected_decrease(snapshot_loss, state.stats.log_loss_trend, state.last.horizon)
    return snapshot_loss - loss >= cfg.predict_cost_ratio * expected
