"""A predicted step never writes a non-finite value into the parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import fast_config, quadratic_run_until_predict

import hybrid_jax as hj


def _poison(state, value, where):
    def bad(v):
        v = np.array(v)
        if where == "all":
            v[...] = value
        else:
            v.reshape(-1)[:: max(1, v.size // 3)] = value
        return jnp.asarray(v)

    return state._replace(
        basis=state.basis._replace(vectors=jax.tree.map(bad, state.basis.vectors))
    )


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["all", "some"])
def test_poisoned_basis_never_reaches_params(value, where):
    cfg = fast_config()
    tx = hj.predictive(optax.adam(1e-2), cfg)
    step, params, state, batches = quadratic_run_until_predict(tx, 60)
    state = _poison(state, value, where)
    params, state, m = step(params, state, next(batches))
    assert not bool(m["used_gradient"])
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
    assert int(m["nonfinite_predictions"]) == 1
    assert int(state.phase) == hj.CORRECT  # real steps follow at once, verifying first
    assert bool(state.pending_verify)
    for batch in batches:
        params, state, m = step(params, state, batch)
        assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


def test_huge_but_finite_prediction_is_held_back_where_it_would_overflow():
    cfg = fast_config()
    tx = hj.predictive(optax.adam(1e-2), cfg)
    step, params, state, batches = quadratic_run_until_predict(tx, 60)
    params = jax.tree.map(lambda p: p.at[0].set(3e38), params)
    state = _poison(state, 3e38, "all")
    params, state, m = step(params, state, next(batches))
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
    assert int(m["nonfinite_predictions"]) == 1
