"""The optax contract: chain, extra args, jit, tree structure, shapes, dtypes, donation."""

import warnings

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import fast_config, quadratic_batches, quadratic_loss, quadratic_params

import hybrid_jax as hj

_grads = jax.jit(jax.value_and_grad(quadratic_loss))


def _snapshot_loss(tx):
    """``tx.snapshot_loss`` of the quadratic problem, jitted: ``(state, batch) -> loss``."""
    return jax.jit(lambda state, batch: tx.snapshot_loss(quadratic_loss, state, batch))


def test_is_an_optax_extra_args_transformation():
    tx = hj.predictive(optax.adam(1e-3), fast_config())
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    assert callable(tx.needs_gradient) and callable(tx.predicted_update)


def _chain_run(with_snapshot_loss, n=60):
    hybrid = hj.predictive(optax.adam(1e-2), fast_config())
    tx = optax.chain(optax.clip_by_global_norm(1.0), hybrid)
    params = quadratic_params()
    state = tx.init(params)

    @jax.jit
    def update(params, state, batch):
        loss, grads = _grads(params, batch)
        extra = {"unexpected_key": 3}  # other members of a chain get extra args too
        if with_snapshot_loss:
            extra["snapshot_value"] = hybrid.snapshot_loss(quadratic_loss, state[1], batch)
        updates, state = tx.update(grads, state, params, value=loss, **extra)
        return optax.apply_updates(params, updates), state, hj.metrics(state[1])

    rows = []
    for batch in quadratic_batches(n):
        params, state, m = update(params, state, batch)
        rows.append(jax.device_get(m))
    return rows, state[1]


def test_optax_path_verifies_every_predict_phase_given_the_snapshot_loss():
    rows, state = _chain_run(with_snapshot_loss=True)
    phases = [int(r["phase"]) for r in rows]
    ends = [i for i in range(1, len(rows)) if phases[i - 1] == hj.PREDICT != phases[i]]
    assert len(ends) >= 3
    # the first real step after every Predict phase verifies it
    assert all(bool(rows[i]["verified"]) and bool(rows[i]["used_gradient"]) for i in ends)
    assert int(state.counters.verifications) == len(ends)


def test_optax_path_without_the_snapshot_loss_never_predicts_and_warns_once():
    with pytest.warns(UserWarning, match="snapshot_value") as record:
        rows, state = _chain_run(with_snapshot_loss=False)
    assert sum("snapshot_value" in str(w.message) for w in record) == 1
    assert all(int(r["phase"]) != hj.PREDICT for r in rows)
    assert int(state.counters.predicted_steps) == 0
    assert int(state.counters.backward_passes) == len(rows)


@pytest.mark.parametrize(
    "dtype,basis_dtype",
    [
        (jnp.float32, "float32"),
        (jnp.bfloat16, "params"),
        pytest.param(jnp.bfloat16, "float32", marks=pytest.mark.slow),
        pytest.param(jnp.float32, "params", marks=pytest.mark.slow),
    ],
)
def test_update_keeps_state_structure_shapes_and_dtypes(dtype, basis_dtype):
    tx = hj.predictive(optax.adamw(1e-2), fast_config(basis=hj.BasisSettings(dtype=basis_dtype)))
    params = quadratic_params(dtype)
    state0 = tx.init(params)
    update, snapshot_loss = jax.jit(tx.update), _snapshot_loss(tx)
    state = state0
    for batch in quadratic_batches(30):
        loss, grads = _grads(params, batch)
        snap = snapshot_loss(state, batch)
        updates, state = update(grads, state, params, value=loss, snapshot_value=snap)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
        params = optax.apply_updates(params, updates)
        chex.assert_trees_all_equal_shapes_and_dtypes(params, quadratic_params(dtype))
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
    assert int(state.counters.predicted_steps) > 0


def test_update_is_jitted_once():
    tx = hj.predictive(optax.adamw(1e-2), fast_config())
    params = quadratic_params()
    state = tx.init(params)
    update, snapshot_loss = jax.jit(tx.update), _snapshot_loss(tx)
    for batch in quadratic_batches(30):
        loss, grads = _grads(params, batch)
        snap = snapshot_loss(state, batch)
        updates, state = update(grads, state, params, value=loss, snapshot_value=snap)
        params = optax.apply_updates(params, updates)
    assert update._cache_size() == 1
    assert int(state.counters.predicted_steps) > 0


def test_donation_raises_no_warning_and_consumes_inputs():
    tx = hj.predictive(optax.adam(1e-2), fast_config())
    params = quadratic_params()
    state = tx.init(params)
    step = hj.make_hybrid_step(quadratic_loss, tx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in quadratic_batches(25):
            old_params, old_state = params, state
            params, state, _ = step(params, state, batch)
    # the large buffers were really donated: the old ones are gone
    assert all(x.is_deleted() for x in jax.tree.leaves(old_params))
    assert all(x.is_deleted() for x in jax.tree.leaves((old_state.inner, old_state.basis)))


@pytest.mark.slow
def test_optax_path_and_hybrid_step_agree():
    """``tx.update`` in a plain loop gives the same parameters as ``hybrid_step``."""
    cfg = fast_config()
    tx = hj.predictive(optax.adam(1e-2), cfg)
    batches = quadratic_batches(30)

    params = quadratic_params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    for batch in batches:
        loss, grads = _grads(params, batch)
        snap = quadratic_loss(state.snapshot, batch)  # what hybrid_step verifies with
        updates, state = update(grads, state, params, value=loss, snapshot_value=snap)
        params = optax.apply_updates(params, updates)

    p2 = quadratic_params()
    s2 = tx.init(p2)
    step = hj.make_hybrid_step(quadratic_loss, tx)
    for batch in batches:
        p2, s2, _ = step(p2, s2, batch)
    chex.assert_trees_all_close(params, p2, rtol=1e-5, atol=1e-6)
    assert int(state.counters.backward_passes) == int(s2.counters.backward_passes)


@pytest.mark.slow
def test_converges_on_a_quadratic():
    tx = hj.predictive(optax.adam(5e-2), fast_config())
    params = quadratic_params()
    state = tx.init(params)
    step = hj.make_hybrid_step(quadratic_loss, tx)
    batches = quadratic_batches(300)
    start = float(quadratic_loss(params, batches[0]))
    for batch in batches:
        params, state, m = step(params, state, batch)
    assert float(quadratic_loss(params, batches[0])) < 0.05 * start
    assert int(m["predicted_steps"]) > 50


def test_bad_inputs_give_clear_errors():
    tx = hj.predictive(optax.adam(1e-2), fast_config())
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"w": jnp.zeros(2)}, tx.init({"w": jnp.zeros(2)}))
    with pytest.raises(ValueError, match="floating point"):
        tx.init({"w": jnp.zeros(2, jnp.int32)})
    with pytest.raises(TypeError, match="HybridConfig"):
        hj.predictive(optax.adam(1e-2), {"warmup_steps": 3})
    with pytest.raises(TypeError, match="optax"):
        hj.predictive(lambda g: g)
    with pytest.raises(TypeError, match=r"hj\.predictive"):
        hj.make_hybrid_step(quadratic_loss, optax.adam(1e-2))
    step = hj.make_hybrid_step(lambda p, b: jnp.ones(3), tx)
    params = quadratic_params()
    with pytest.raises(TypeError, match="float scalar"):
        step(params, tx.init(params), quadratic_batches(1)[0])
