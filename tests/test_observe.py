"""`HybridConfig.observe_every`: which real steps the hybrid observes, and what the others do."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import SAFETY_OFF, quadratic_batches, quadratic_loss, quadratic_params

import hybrid_jax as hj
from hybrid_jax import _dispatch


def _full(state, budget=10_000):
    """The state pinned in a long Full phase."""
    return state._replace(phase=hj._phases.full_phase(budget))


def test_pairs_of_observed_steps_and_plain_steps_in_between():
    """In a long Full phase (no longer than ``full_steps``, so not quiet),
    observe_every=5 observes 2 consecutive real steps of every 5; an unobserved step
    leaves the basis, the encoder statistics and the predictor alone and still applies
    exactly the inner optimizer's update."""
    cfg = hj.HybridConfig(warmup_steps=0, full_steps=10_000, observe_every=5, **SAFETY_OFF)
    inner = optax.adam(1e-2)
    tx = hj.predictive(inner, cfg)
    params = quadratic_params()
    state = _full(tx.init(params))
    ref_params, ref_state = quadratic_params(), inner.init(quadratic_params())
    update = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
    pattern = []
    for batch in quadratic_batches(15):
        loss, grads = jax.value_and_grad(quadratic_loss)(params, batch)
        updates, new = update(grads, state, params, loss)
        observed = int(new.counters.observed_steps) - int(state.counters.observed_steps)
        pattern.append(observed)
        if not observed:
            assert int(new.basis.count) == int(state.basis.count)
            jax.tree.map(np.testing.assert_array_equal, new.basis, state.basis)
            np.testing.assert_array_equal(new.encoder.mean, state.encoder.mean)
            assert np.isnan(float(new.last.update_norm))
        else:
            assert int(new.basis.count) == int(state.basis.count) + 1
        params, state = optax.apply_updates(params, updates), new
        # the same as the inner optimizer alone, observed or not
        ref_grads = jax.grad(quadratic_loss)(ref_params, batch)
        ref_updates, ref_state = inner.update(ref_grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, ref_updates)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, ref_params)
    assert pattern == [0, 0, 0, 1, 1] * 3
    assert int(state.counters.real_steps) == 15 and int(state.counters.observed_steps) == 6


def _update_at_loss_one(tx):
    """``tx.update`` jitted, given a loss and a snapshot loss of 1 (the tests below with
    the same config share its program)."""
    return jax.jit(lambda g, s, p: tx.update(g, s, p, value=1.0, snapshot_value=1.0))


def _observed_pattern(tx, state, n):
    """Which of ``n`` real steps from ``state`` the hybrid observes (1) or not (0)."""
    params, pattern = quadratic_params(), []
    update = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
    for batch in quadratic_batches(n):
        loss, grads = jax.value_and_grad(quadratic_loss)(params, batch)
        updates, new = update(grads, state, params, loss)
        pattern.append(int(new.counters.observed_steps) - int(state.counters.observed_steps))
        params, state = optax.apply_updates(params, updates), new
    return pattern


def test_a_long_full_phase_observes_only_its_last_full_steps():
    """A Full phase longer than ``full_steps`` (a backed-off one) observes nothing
    before its last ``full_steps`` steps (``_phases.quiet``); then pairs as usual, and
    its last step. With ``observe_every <= 2`` every step is observed still."""
    cfg = hj.HybridConfig(warmup_steps=0, full_steps=6, observe_every=5, **SAFETY_OFF)
    tx = hj.predictive(optax.adam(1e-2), cfg)
    state = _full(tx.init(quadratic_params()), budget=14)
    assert _observed_pattern(tx, state, 14) == [0] * 8 + [1, 1, 0, 0, 0, 1]
    every = hj.HybridConfig(warmup_steps=0, full_steps=6, observe_every=2, **SAFETY_OFF)
    tx = hj.predictive(optax.adam(1e-2), every)
    assert _observed_pattern(tx, _full(tx.init(quadratic_params()), budget=14), 14) == [1] * 14


def test_one_and_two_observe_every_real_step():
    for k in (1, 2):
        cfg = hj.HybridConfig(warmup_steps=0, observe_every=k)
        tx = hj.predictive(optax.adam(1e-2), cfg)
        state = _full(tx.init(quadratic_params()))
        assert int(hj._kinds.kind_of(cfg, state)) == _dispatch.REAL
        assert hj._kinds.kinds_used(cfg) == (0, 1, 2, 3)


def test_unobserved_step_skips_a_nonfinite_gradient():
    cfg = hj.HybridConfig(warmup_steps=0, observe_every=8)
    tx = hj.predictive(optax.adam(1e-2), cfg)
    params = quadratic_params()
    state = _full(tx.init(params))
    assert int(hj._kinds.kind_of(cfg, state)) == _dispatch.PLAIN
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    grads["w"] = grads["w"].at[2, 1].set(jnp.inf)
    updates, new = _update_at_loss_one(tx)(grads, state, params)
    assert int(new.counters.skipped_updates) == 1 and int(new.counters.observed_steps) == 0
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    jax.tree.map(np.testing.assert_array_equal, new.inner, state.inner)


def test_verification_and_the_step_before_a_predict_phase_are_observed():
    cfg = hj.HybridConfig(warmup_steps=0, observe_every=50, full_steps=7, confidence_threshold=0.0)
    tx = hj.predictive(optax.adam(1e-2), cfg)
    state = tx.init(quadratic_params())
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    mid = state._replace(phase=state.phase._replace(id=i32(hj.FULL), step=i32(2), budget=i32(7)))
    last = mid._replace(phase=mid.phase._replace(step=i32(6)))
    kind = lambda s: int(hj._kinds.kind_of(cfg, s))
    assert kind(mid) == hj._kinds.PLAIN
    # the phase ends and a Predict phase may follow: observed, whatever the confidence
    # (the kind of a step never depends on what the step before it measured)
    assert kind(last) == hj._kinds.REAL
    no_more = last._replace(
        phase=last.phase._replace(consecutive=i32(cfg.max_consecutive_predicts))
    )
    assert kind(no_more) == hj._kinds.PLAIN
    verifying = mid._replace(pending=mid.pending._replace(verify=jnp.asarray(True)))
    assert kind(verifying) == hj._kinds.VERIFY


def test_a_pending_verification_is_always_an_observed_verifying_step():
    cfg = hj.HybridConfig(warmup_steps=0, observe_every=8)
    tx = hj.predictive(optax.adam(1e-2), cfg)
    params = quadratic_params()
    state = _full(tx.init(params))
    state = state._replace(pending=state.pending._replace(verify=jnp.asarray(True)))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    _, new = _update_at_loss_one(tx)(grads, state, params)
    assert not bool(new.pending.verify)
    assert int(new.counters.verifications) == 1 and int(new.counters.observed_steps) == 1
