"""`HybridConfig.observe_every`: which real steps the hybrid observes, and what the others do."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SAFETY_OFF, quadratic_batches, quadratic_loss, quadratic_params

import hybrid_jax as hj
from hybrid_jax import _dispatch


def _full(state, budget=10_000):
    """The state pinned in a long Full phase."""
    return state._replace(phase=hj._phases.full_phase(budget))


# Observations in pairs (observe_every=5); a Full phase longer than 15 steps is quiet
# before its last 15. The tests below step it through one jitted ``tx.update``.
PAIRS = hj.HybridConfig(warmup_steps=0, full_steps=15, observe_every=5, **SAFETY_OFF)


@pytest.fixture(scope="module")
def pairs():
    """``(tx, update)``: ``hj.predictive(optax.adam(1e-2), PAIRS)`` and its ``tx.update``
    jitted, given the loss ``v`` as the value and the snapshot's value:
    ``update(grads, state, params, v)`` (compiled once for the tests below)."""
    tx = hj.predictive(optax.adam(1e-2), PAIRS)
    update = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v, snapshot_value=v))
    return tx, update


def test_pairs_of_observed_steps_and_plain_steps_in_between(pairs):
    """In a Full phase no longer than ``full_steps`` (so not quiet), observe_every=5
    observes 2 consecutive real steps of every 5, and the phase's last; an unobserved
    step leaves the basis, the encoder statistics and the predictor alone and still
    applies exactly the inner optimizer's update."""
    tx, update = pairs
    inner = optax.adam(1e-2)
    params = quadratic_params()
    state = _full(tx.init(params), budget=15)
    ref_params, ref_state = quadratic_params(), inner.init(quadratic_params())
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


def _observed_pattern(pairs, state, n):
    """Which of ``n`` real steps from ``state`` the hybrid observes (1) or not (0)."""
    _, update = pairs
    params, pattern = quadratic_params(), []
    for batch in quadratic_batches(n):
        loss, grads = jax.value_and_grad(quadratic_loss)(params, batch)
        updates, new = update(grads, state, params, loss)
        pattern.append(int(new.counters.observed_steps) - int(state.counters.observed_steps))
        params, state = optax.apply_updates(params, updates), new
    return pattern


def test_a_long_full_phase_observes_only_its_last_full_steps(pairs):
    """A Full phase longer than ``full_steps`` (a backed-off one) observes nothing
    before its last ``full_steps`` steps (``_phases.quiet``); then pairs as usual, and
    its last step. (With ``observe_every <= 2`` every step is observed still: the test
    after this one.)"""
    tx, _ = pairs
    state = _full(tx.init(quadratic_params()), budget=23)
    pairs_then_last = [1, 1, 0, 0, 0] * 2 + [1, 1, 0, 0, 1]
    assert _observed_pattern(pairs, state, 23) == [0] * 8 + pairs_then_last


def test_one_and_two_observe_every_real_step():
    """With observe_every <= 2 every real step is observed: each step of a long (quiet)
    Full phase, and of its last ``full_steps``, is of the observed kind."""
    for k in (1, 2):
        cfg = hj.HybridConfig(warmup_steps=0, full_steps=6, observe_every=k)
        tx = hj.predictive(optax.adam(1e-2), cfg)
        state = _full(tx.init(quadratic_params()), budget=14)
        for i in range(14):
            at = state._replace(phase=state.phase._replace(step=jnp.asarray(i, jnp.int32)))
            assert int(hj._kinds.kind_of(cfg, at)) == _dispatch.REAL, (k, i)
        assert hj._kinds.kinds_used(cfg) == (0, 1, 2, 3)


def test_unobserved_step_skips_a_nonfinite_gradient(pairs):
    tx, update = pairs
    params = quadratic_params()
    state = _full(tx.init(params), budget=15)
    assert int(hj._kinds.kind_of(PAIRS, state)) == _dispatch.PLAIN
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    grads["w"] = grads["w"].at[2, 1].set(jnp.inf)
    updates, new = update(grads, state, params, jnp.float32(1.0))
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


def test_a_pending_verification_is_always_an_observed_verifying_step(pairs):
    tx, update = pairs
    params = quadratic_params()
    state = _full(tx.init(params), budget=15)
    state = state._replace(pending=state.pending._replace(verify=jnp.asarray(True)))
    assert int(hj._kinds.kind_of(PAIRS, state)) == _dispatch.VERIFY  # not a plain step
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    _, new = update(grads, state, params, jnp.float32(1.0))
    assert not bool(new.pending.verify)
    assert int(new.counters.verifications) == 1 and int(new.counters.observed_steps) == 1
