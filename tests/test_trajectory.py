"""The basis of displacements (``BasisSettings.stride``) and the trajectory predictors
(``hybrid_jax.predictors.linefit``, ``snoo``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SAFETY_OFF

import hybrid_jax as hj
from hybrid_jax import _basis, _phases
from hybrid_jax import predictors as P


@pytest.mark.parametrize("c", [2, 3, 4, 5, 8])
def test_line_weights_match_numpy_polyfit(c):
    rng = np.random.default_rng(c)
    disp = rng.normal(size=(c - 1, 5))  # newest first
    positions = np.concatenate([np.zeros((1, 5)), -np.cumsum(disp, axis=0)])  # at t = 0, -1, ..
    slope_ref, value_ref = np.polyfit(-np.arange(c, dtype=np.float64), positions, 1)
    offset, slope = P.line_weights(c)
    np.testing.assert_allclose(offset @ disp, value_ref, atol=1e-12)
    np.testing.assert_allclose(slope @ disp, slope_ref, atol=1e-12)
    # equal displacements: a slope of one displacement through the newest position
    assert np.isclose(slope.sum(), 1.0) and np.isclose(offset.sum(), 0.0)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_with_a_stride_the_newest_direction_is_the_sum_of_the_last_updates():
    rng = np.random.default_rng(0)
    params = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((5,))}
    groups, stride, decay = (0, 1), 3, 0.5
    basis = _basis.init(params, 3, "float32", 2, stride)
    updates = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)]
    for _ in range(2 * stride - 1):
        updates.append(jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params))
    for i, u in enumerate(updates):
        basis = _basis.push(basis, u, _basis.gram(basis, u, groups, 2), decay, stride=stride)
        assert int(basis.count) == (i + 1) // stride and int(basis.acc.n) == (i + 1) % stride
    first = jax.tree.map(lambda *u: sum(u), *updates[:stride])
    second = jax.tree.map(lambda *u: sum(u), *updates[stride:])
    idx = np.asarray(_basis.physical_index(basis.head, 3))
    dirs = [[np.asarray(s) for s in leaf] for leaf in _basis.slots(basis)]
    for leaf, d1, d2 in zip(dirs, _leaves(first), _leaves(second), strict=True):
        np.testing.assert_allclose(leaf[idx[0]], d2, rtol=1e-5)  # the last displacement
        np.testing.assert_allclose(leaf[idx[2]], d1, rtol=1e-5)  # the one before
        # the EMA starts from zero: ema / (1 - d) = sum_j d^j disp_{t-j}
        np.testing.assert_allclose(leaf[idx[1]] / (1 - decay), d2 + decay * d1, rtol=1e-5)
    assert all(np.all(a == 0) for a in _leaves(basis.acc.total))  # emptied by the push
    # the tracked Gram matrix is that of the directions
    for g, leaf in enumerate(dirs):
        flat = np.stack([leaf[i].ravel() for i in idx])
        np.testing.assert_allclose(np.asarray(basis.gram[g]), flat @ flat.T, rtol=1e-4)


C = np.asarray([0.5, -1.0, 2.0, 0.25], np.float32)  # a linear loss: constant updates
LR, STRIDE = 0.01, 4


def linear_loss(params, batch):
    del batch
    return 100.0 + jnp.dot(C, params["x"])  # positive, so that its log is defined


def test_linefit_predicts_the_real_steps_on_a_straight_trajectory():
    """SGD on ``c . x`` moves by ``-lr c`` on every step; the positions lie on a line, so
    every predicted step of ``linefit`` is that step too, and the run ends where 300 real
    steps would."""
    cfg = hj.HybridConfig(
        warmup_steps=3 * STRIDE,
        full_steps=STRIDE,
        correct_steps=2,
        min_horizon=5,
        max_horizon=5,
        confidence_threshold=0.0,
        predictor="linefit",
        basis=hj.BasisSettings(size=4, stride=STRIDE),
        observe_every=1,
        **SAFETY_OFF,
    )
    tx = hj.predictive(optax.sgd(LR), cfg)
    step = hj.make_hybrid_step(linear_loss, tx)
    params = {"x": jnp.zeros((4,), jnp.float32)}
    state = tx.init(params)
    deltas, used = [], []
    for _ in range(300):
        before = np.asarray(params["x"])
        params, state, m = step(params, state, jnp.zeros(()))
        deltas.append(np.asarray(params["x"]) - before)
        used.append(bool(m["used_gradient"]))
    deltas, used = np.asarray(deltas), np.asarray(used)
    assert int((~used).sum()) >= 100  # many predicted steps
    want = np.broadcast_to(-LR * C, deltas[~used].shape)
    np.testing.assert_allclose(deltas[~used], want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(params["x"]), -300 * LR * C, rtol=1e-4)


def quadratic(params, batch):
    return 0.5 * jnp.sum(batch * jnp.square(params["x"] - 1.0))


@pytest.mark.filterwarnings("ignore:hj.predictive")  # real steps only: nothing to verify
def test_snoo_jumps_by_a_snoo_outer_step():
    """After ``k`` displacements of ``S`` real steps the jump is ``(eta - 1) D + eta mu m``
    with ``D`` the last displacement and ``m = sum_j mu^j D_{t-j}``, computed here from the
    recorded parameters: SNOO's slow weights ``phi + eta (D + mu m)``, ``phi = x - D``."""
    eta, mu, k = 0.7, 0.8, 5
    cfg = hj.HybridConfig(
        warmup_steps=1000,
        predictor="snoo",
        basis=hj.BasisSettings(stride=STRIDE, ema_decay=mu),
        observe_every=1,
        monitor=None,
    )
    tx = hj.predictive(optax.adam(0.05), cfg, predictor=P.snoo(outer_lr=eta, momentum=mu))
    params = {"x": jnp.asarray([0.0, 2.0, -1.0, 0.5], jnp.float32)}
    state = tx.init(params)
    rng = np.random.default_rng(0)
    positions = [np.asarray(params["x"])]

    @jax.jit
    def real_step(params, state, batch):
        loss, grads = jax.value_and_grad(quadratic)(params, batch)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    for _ in range(k * STRIDE):
        batch = jnp.asarray(rng.uniform(0.5, 2.0, size=4), jnp.float32)
        params, state = real_step(params, state, batch)
        positions.append(np.asarray(params["x"]))
    disp = [positions[(i + 1) * STRIDE] - positions[i * STRIDE] for i in range(k)][::-1]
    m = sum(mu**j * d for j, d in enumerate(disp))
    phi = positions[-1] - disp[0]
    slow = phi + eta * (disp[0] + mu * m)
    state = state._replace(phase=_phases.make(hj.PREDICT, 3))
    jump, state = tx.predicted_update(state, params, first=True)
    np.testing.assert_allclose(np.asarray(params["x"] + jump["x"]), slow, rtol=1e-5, atol=1e-6)
    later, _ = tx.predicted_update(state, params, first=False)
    assert np.all(np.asarray(later["x"]) == 0.0)  # one outer step per phase


def test_trajectory_predictors_name_what_they_need():
    with pytest.raises(ValueError, match="stride"):
        hj.HybridConfig(predictor="linefit")
    with pytest.raises(ValueError, match="observe_every"):
        hj.HybridConfig(observe_every=4, basis=hj.BasisSettings(stride=4))
    params = {"x": jnp.zeros((3,))}
    small = hj.HybridConfig(basis=hj.BasisSettings(size=3, stride=4), observe_every=1)
    with pytest.raises(ValueError, match=r"basis\.size >= 4"):
        hj.predictive(optax.sgd(0.1), small, predictor=P.linefit(snapshots=4)).init(params)
    with pytest.raises(ValueError, match="stride"):
        hj.predictive(optax.sgd(0.1), hj.HybridConfig(), predictor=P.linefit(2)).init(params)
    with pytest.raises(ValueError, match=r"ema_decay=0\.5"):
        hj.predictive(optax.sgd(0.1), hj.HybridConfig(), predictor=P.snoo(momentum=0.5)).init(
            params
        )
    with pytest.raises(ValueError, match="snapshots"):
        P.linefit(1)
    with pytest.raises(ValueError, match="outer_lr"):
        P.snoo(outer_lr=0.0)


def test_the_fixed_predictors_apply_one_real_step_of_a_displacement():
    cfg = hj.HybridConfig(basis=hj.BasisSettings(stride=4), observe_every=1)
    spec = hj.PredictorSpec(n_groups=2, basis_size=2, config=cfg)
    for factory, slot in ((P.last_update, 0), (P.extrapolate, 1)):
        coefs = np.asarray(factory().init(spec))
        assert np.all(coefs[:, slot] == 0.25) and np.all(coefs[:, 1 - slot] == 0.0)
