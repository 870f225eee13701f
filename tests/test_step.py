"""hybrid_step details: has_aux, monitored forward passes, metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import (
    fast_config,
    monitored_config,
    quadratic_batches,
    quadratic_loss,
    quadratic_params,
)

import hybrid_jax as hj


def test_metrics_have_every_documented_name():
    tx = hj.predictive(optax.adam(1e-2), fast_config())
    params = quadratic_params()
    step = hj.make_hybrid_step(quadratic_loss, tx)
    _, _, m = step(params, tx.init(params), quadratic_batches(1)[0])
    assert set(m) == set(hj.METRIC_NAMES)
    for name in (
        "step",
        "phase",
        "used_gradient",
        "loss",
        "predicted_loss",
        "confidence",
        "horizon",
        "verified",
        "rolled_back",
        "divergence_level",
        "backward_passes",
    ):
        assert name in m and m[name].shape == ()


def test_has_aux_returns_aux_on_real_steps_and_nan_on_predicted_steps():
    def loss_fn(params, batch):
        loss = quadratic_loss(params, batch)
        return loss, {"twice": 2.0 * loss, "count": jnp.int32(7)}

    tx = hj.predictive(optax.adam(1e-2), fast_config())
    params = quadratic_params()
    state = tx.init(params)
    step = hj.make_hybrid_step(loss_fn, tx, has_aux=True)
    for batch in quadratic_batches(20):
        params, state, m, aux = step(params, state, batch)
        if bool(m["used_gradient"]):
            np.testing.assert_allclose(aux["twice"], 2.0 * m["loss"], rtol=1e-6)
            assert int(aux["count"]) == 7
        else:
            assert bool(jnp.isnan(aux["twice"])) and bool(jnp.isnan(m["loss"]))


def test_monitor_every_measures_the_loss_every_k_predicted_steps():
    tx = hj.predictive(optax.adamw(1e-2), monitored_config())  # monitor_every=2
    params = quadratic_params()
    state = tx.init(params)
    step = hj.make_hybrid_step(quadratic_loss, tx)
    forward_before = 0
    k = 0
    measured_predicted = 0
    for batch in quadratic_batches(40):
        start_params = params
        expected = float(quadratic_loss(start_params, batch))
        params, state, m = step(params, state, batch)
        fwd = int(m["forward_passes"])
        if bool(m["used_gradient"]):
            k = 0
            assert fwd == forward_before + 1 + int(m["verified"])
            np.testing.assert_allclose(float(m["loss"]), expected, rtol=1e-5)
        else:
            k += 1
            measured = k % 2 == 0
            assert fwd == forward_before + int(measured)
            if measured:
                np.testing.assert_allclose(float(m["loss"]), expected, rtol=1e-5)
                measured_predicted += 1
            else:
                assert bool(jnp.isnan(m["loss"]))
        forward_before = fwd
    assert measured_predicted >= 2


def test_predicted_steps_move_the_parameters_by_the_reported_norm():
    tx = hj.predictive(optax.adam(1e-2), fast_config())
    params = quadratic_params()
    state = tx.init(params)
    step = hj.make_hybrid_step(quadratic_loss, tx)  # the fast tests' common step
    moved = 0
    for batch in quadratic_batches(30):
        before = jax.tree.map(jnp.copy, params)  # the step donates params
        params, state, m = step(params, state, batch)
        diff = jax.tree.map(lambda a, b: a - b, params, before)
        norm = float(jnp.sqrt(sum(jnp.sum(d**2) for d in jax.tree.leaves(diff))))
        np.testing.assert_allclose(norm, float(m["update_norm"]), rtol=1e-3, atol=1e-7)
        if not bool(m["used_gradient"]):
            moved += norm > 0
    assert moved > 5
