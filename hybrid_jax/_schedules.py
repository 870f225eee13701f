"""The wrapped optimizer's schedules, set to count the run's global step."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


_SCHEDULE_STATES = (
    optax.ScaleByScheduleState,
    optax.InjectHyperparamsState,
    optax.InjectStatefulHyperparamsState,
)


def at_step(inner_state: PyTree, step: jax.Array) -> PyTree:
    """``inner_state`` with the step count of every schedule in it (``scale_by_schedule``,
    ``inject_hyperparams``) set to ``step``; other counts (Adam's, for its bias
    correction) are left alone."""

    def fix(node: Any) -> Any:
        if not isinstance(node, _SCHEDULE_STATES):
            return node
        node = node._replace(count=jnp.asarray(step, jnp.result_type(node.count)))
        if hasattr(node, "inner_state"):
            node = node._replace(inner_state=at_step(node.inner_state, step))
        return node

    return jax.tree.map(fix, inner_state, is_leaf=lambda x: isinstance(x, _SCHEDULE_STATES))
