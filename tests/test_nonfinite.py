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

    b = state.basis
    return state._replace(
        basis=b._replace(ema=jax.tree.map(bad, b.ema), ring=jax.tree.map(bad, b.ring))
    )


@pytest.mark.parametrize(
    "value,where",
    [
        (np.nan, "all"),
        (np.inf, "some"),
        pytest.param(np.inf, "all", marks=pytest.mark.slow),
        pytest.param(-np.inf, "all", marks=pytest.mark.slow),
        pytest.param(np.nan, "some", marks=pytest.mark.slow),
        pytest.param(-np.inf, "some", marks=pytest.mark.slow),
    ],
)
def test_poisoned_basis_never_reaches_params(value, where):
    cfg = fast_config()
    tx = hj.predictive(optax.adam(1e-2), cfg)
    step, params, state, batches = quadratic_run_until_predict(tx, 60)
    state = _poison(state, value, where)
    params, state, m = step(params, state, next(batches))
    assert not bool(m["used_gradient"])
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
    assert int(m["nonfinite_predictions"]) == 1
    assert bool(state.pending.veto)  # the next step applies nothing and ends the phase
    if int(state.phase.id) == hj.PREDICT:
        params_before = jax.tree.map(jnp.copy, params)
        params, state, m = step(params, state, next(batches))
        assert not bool(m["used_gradient"]) and int(m["idle_steps"]) == 1
        jax.tree.map(np.testing.assert_array_equal, params, params_before)
    assert int(state.phase.id) == hj.CORRECT  # real steps follow, verifying first
    assert bool(state.pending.verify)
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


def test_nonfinite_gradient_outside_the_sketched_rows_is_still_skipped():
    """With ``sketch_stride`` the inner products read every 4th row; the gradient check
    still reads everything, so a NaN in row 1 (never sampled) skips the update."""
    cfg = fast_config(basis=hj.BasisSettings(sketch_stride=4), warmup_steps=0)
    tx = hj.predictive(optax.adam(1e-2), cfg)
    params = {"w": jnp.ones((16, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
    state = tx.init(params)
    grads = {"w": jnp.full((16, 3), 0.1).at[1, 2].set(jnp.nan), "b": jnp.full((3,), 0.1)}
    updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, value=1.0))(grads, state, params)
    assert int(state.counters.skipped_updates) == 1
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
