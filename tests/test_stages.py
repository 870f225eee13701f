"""Each stage of a step on its own: the phase machine's one rule, the checks, the loss
level, the optimizer's guarded update, the plan, the non-finite guard, the kinds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    SAFETY_OFF,
    fast_config,
    quadratic_batches,
    quadratic_loss,
    quadratic_params,
    quadratic_run_until_predict,
)

import hybrid_jax as hj
from hybrid_jax import _cost, _kinds, _phases, _predicted, _stages

T, F = jnp.asarray(True), jnp.asarray(False)


def _setup(**changes):
    tx = hj.predictive(optax.sgd(0.1), fast_config(**changes))
    params = quadratic_params()
    return tx.setup, tx.init(params), params


def _pending(verify=False, veto=False, force_full=False):
    return _phases.Pending(jnp.asarray(verify), jnp.asarray(veto), jnp.asarray(force_full))


def _phase(phase_id, step, budget, consecutive=0):
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    return _phases.Phase(i32(phase_id), i32(step), i32(budget), i32(consecutive))


def _ids(ph):
    return tuple(int(x) for x in ph[:4])  # id, step, budget, consecutive


# -- the phase machine ------------------------------------------------------------------


def test_a_real_step_ending_a_full_phase_starts_a_predict_phase_when_allowed():
    cfg = fast_config()
    end_of_full = _phase(hj.FULL, 2, 3)
    kw = dict(real=True, verifying=False, first=False, next_horizon=4)
    s = _phases.schedule_after(cfg, end_of_full, _pending(), F, may_predict=T, **kw)
    assert _ids(s.phase) == (hj.PREDICT, 0, 4, 1) and not bool(s.verify)
    # the gate closed: a backed-off Full phase follows (the back-off's exponent grows)
    s = _phases.schedule_after(cfg, end_of_full, _pending(), F, may_predict=F, **kw)
    assert _ids(s.phase) == (hj.FULL, 0, 2 * cfg.full_steps, 0) and int(s.phase.rejected) == 1
    twice = end_of_full._replace(rejected=jnp.int32(1))
    s = _phases.schedule_after(cfg, twice, _pending(), F, may_predict=F, **kw)
    assert _ids(s.phase) == (hj.FULL, 0, 4 * cfg.full_steps, 0) and int(s.phase.rejected) == 2
    # not after a Correct phase (the Predict phases before it were accepted)
    end_of_correct = _phase(hj.CORRECT, 2, 3, consecutive=1)
    s = _phases.schedule_after(cfg, end_of_correct, _pending(), F, may_predict=F, **kw)
    assert _ids(s.phase) == (hj.FULL, 0, cfg.full_steps, 0) and int(s.phase.rejected) == 0
    # a monitor warning of the step before: a Full phase follows, whatever else
    s = _phases.schedule_after(cfg, end_of_full, _pending(force_full=True), F, may_predict=T, **kw)
    assert _ids(s.phase) == (hj.FULL, 0, cfg.full_steps, 0)


def test_a_closed_gate_backs_off_up_to_the_cap_and_only_for_the_confidence():
    cfg = fast_config(full_steps=3)
    kw = dict(real=True, verifying=False, first=False, next_horizon=4, may_predict=F)
    end_of_full = _phase(hj.FULL, 2, 3)
    for exponent, grown in ((4, 5), (5, 5), (9, 5)):  # at most MAX_BACKOFF
        ph = end_of_full._replace(rejected=jnp.int32(exponent))
        s = _phases.schedule_after(cfg, ph, _pending(), F, **kw)
        assert int(s.phase.rejected) == grown == _phases.MAX_BACKOFF
        assert _ids(s.phase) == (hj.FULL, 0, 3 * 2**_phases.MAX_BACKOFF, 0)
    # a verification or a veto pending closes the gate, not the confidence: no back-off
    for pending in (_pending(verify=True), _pending(veto=True)):
        s = _phases.schedule_after(cfg, end_of_full, pending, F, **kw)
        assert _ids(s.phase) == (hj.FULL, 0, 3, 0) and int(s.phase.rejected) == 0
    assert int(_phases.grown(jnp.int32(5), True)) == 5
    assert int(_phases.grown(jnp.int32(5), jnp.int32(0))) == 5


def test_a_forced_full_phase_doubles_with_each_rejected_predict_phase():
    cfg = fast_config(full_steps=3)
    kw = dict(real=True, verifying=False, first=False, next_horizon=4, may_predict=T)
    for rejected, budget in ((0, 3), (1, 6), (3, 24), (9, 3 * 2**_phases.MAX_BACKOFF)):
        ph = _phase(hj.CORRECT, 0, 2)._replace(rejected=jnp.int32(rejected))
        s = _phases.schedule_after(cfg, ph, _pending(force_full=True), F, **kw)
        assert _ids(s.phase) == (hj.FULL, 0, budget, 0) and int(s.phase.rejected) == rejected


def test_a_forced_full_phase_asked_for_inside_a_full_phase_waits_for_its_end():
    """Inside a Full or Warmup phase a forced Full phase changes nothing until the
    phase's last step (so the kinds of its steps are known when it starts); after a
    Correct phase's step it starts at once."""
    cfg = fast_config(full_steps=3)
    kw = dict(real=True, verifying=False, first=False, next_horizon=4, may_predict=F)
    for phase_id in (hj.FULL, hj.WARMUP):
        mid = _phase(phase_id, 2, 10)
        assert bool(_phases.deferred(mid))
        s = _phases.schedule_after(cfg, mid, _pending(force_full=True), F, **kw)
        assert _ids(s.phase) == (phase_id, 3, 10, 0)
    # asked for by the phase before (the request acts on a Full phase's first step): at once
    first = _phase(hj.FULL, 0, 10)
    assert not bool(_phases.deferred(first))
    s = _phases.schedule_after(cfg, first, _pending(force_full=True), F, **kw)
    assert _ids(s.phase) == (hj.FULL, 0, 3, 0)
    last = _phase(hj.FULL, 9, 10)._replace(rejected=jnp.int32(1))
    assert not bool(_phases.deferred(last))
    s = _phases.schedule_after(cfg, last, _pending(force_full=True), F, **kw)
    assert _ids(s.phase) == (hj.FULL, 0, 6, 0)  # backed off: 3 x 2**1
    correct = _phase(hj.CORRECT, 0, 5)
    assert not bool(_phases.deferred(correct))
    s = _phases.schedule_after(cfg, correct, _pending(force_full=True), F, **kw)
    assert _ids(s.phase) == (hj.FULL, 0, 3, 0)


def test_a_held_back_forced_full_phase_is_kept_until_its_full_phase_ends():
    """A real step keeps a held-back request in ``pending.force_full``; at the Full phase's
    end the backed-off Full phase follows, though the gate would start a Predict phase."""
    cfg = fast_config(warmup_steps=0, **SAFETY_OFF)  # the program test_phases compiles
    tx = hj.predictive(optax.sgd(0.01), cfg)
    step = hj.make_hybrid_step(quadratic_loss, tx)
    params, batches = quadratic_params(), iter(quadratic_batches(20))
    state = hj.force_full(tx.init(params), 6)  # a Full phase of 6 steps
    params, state, _ = step(params, state, next(batches))  # the Full phase's first step
    state = state._replace(pending=state.pending._replace(force_full=jnp.asarray(True)))
    for k in range(1, 5):  # held back, kept
        params, state, _ = step(params, state, next(batches))
        assert int(state.phase.id) == hj.FULL and int(state.phase.step) == k + 1
        assert bool(state.pending.force_full)
    params, state, _ = step(params, state, next(batches))  # the phase's last step
    backed_off = (hj.FULL, 0, cfg.full_steps, 0)
    assert _ids(state.phase) == backed_off and not bool(state.pending.force_full)
    params, state, _ = step(params, state, next(batches))  # no request: the gate decides
    assert int(state.phase.id) == hj.FULL and int(state.phase.step) == 1
    for _ in range(cfg.full_steps - 1):
        params, state, _ = step(params, state, next(batches))
    assert int(state.phase.id) == hj.PREDICT  # confidence_threshold 0: a Predict phase


def test_the_gate_reads_the_confidence_and_the_step_before():
    cfg = fast_config(confidence_threshold=0.5)
    assert bool(_phases.gate(cfg, jnp.float32(0.6), _pending()))
    assert not bool(_phases.gate(cfg, jnp.float32(0.4), _pending()))
    assert not bool(_phases.gate(cfg, jnp.float32(jnp.nan), _pending()))
    assert not bool(_phases.gate(cfg, jnp.float32(0.9), _pending(veto=True)))
    assert not bool(_phases.gate(cfg, jnp.float32(0.9), _pending(force_full=True)))


def test_a_vetoed_predicted_step_ends_its_phase_and_asks_for_verification():
    cfg = fast_config()
    mid = _phase(hj.PREDICT, 1, 4, 1)
    kw = dict(real=False, verifying=False, may_predict=F, next_horizon=4)
    s = _phases.schedule_after(cfg, mid, _pending(veto=True), T, first=False, **kw)
    assert _ids(s.phase) == (hj.CORRECT, 0, cfg.correct_steps, 1)
    assert bool(s.verify) and bool(s.snapshot_valid)
    # a vetoed first step takes no snapshot: nothing to verify
    s = _phases.schedule_after(
        cfg, _phase(hj.PREDICT, 0, 4, 1), _pending(veto=True), F, first=True, **kw
    )
    assert int(s.phase.id) == hj.CORRECT and not bool(s.verify) and not bool(s.snapshot_valid)
    # undisturbed: the phase runs to its length, then the next real step verifies
    s = _phases.schedule_after(cfg, _phase(hj.PREDICT, 3, 4, 1), _pending(), T, first=False, **kw)
    assert int(s.phase.id) == hj.CORRECT and bool(s.verify)
    s = _phases.schedule_after(cfg, _phase(hj.PREDICT, 0, 4, 1), _pending(), F, first=True, **kw)
    assert _ids(s.phase) == (hj.PREDICT, 1, 4, 1) and bool(s.snapshot_valid)


def test_kind_of_reads_the_phase_and_the_pending_verification():
    cfg = fast_config()
    _, state, _ = _setup()
    with_phase = lambda ph, **p: state._replace(phase=ph, pending=_pending(**p))
    assert int(_kinds.kind_of(cfg, with_phase(_phase(hj.FULL, 0, 3)))) == _kinds.REAL
    assert (
        int(_kinds.kind_of(cfg, with_phase(_phase(hj.CORRECT, 0, 2), verify=True))) == _kinds.VERIFY
    )
    assert int(_kinds.kind_of(cfg, with_phase(_phase(hj.PREDICT, 0, 3)))) == _kinds.PREDICT_FIRST
    assert int(_kinds.kind_of(cfg, with_phase(_phase(hj.PREDICT, 2, 3)))) == _kinds.PREDICT
    # what the step before measured never changes the kind
    assert (
        int(_kinds.kind_of(cfg, with_phase(_phase(hj.PREDICT, 2, 3), veto=True))) == _kinds.PREDICT
    )


# -- the real step's stages -------------------------------------------------------------


def _check(setup, state, loss, snap, verifying, grad_norm=1.0):
    return _stages.check(
        setup,
        state,
        loss=jnp.float32(loss),
        loss_given=True,
        grad_norm=jnp.float32(grad_norm),
        snapshot_loss=jnp.float32(snap),
        verifying=verifying,
        predicted_loss=jnp.float32(jnp.nan),
    )


def test_check_rolls_back_a_phase_worse_than_the_tolerance_and_skips_non_finite_steps():
    # the guard alone (the cost rule is tested below)
    setup, state, _ = _setup(verify_tolerance=0.02, predict_cost_ratio=0.0)
    state = state._replace(snapshot_valid=T)
    assert not bool(_check(setup, state, 1.01, 1.0, True).rollback)  # within 2%
    c = _check(setup, state, 1.03, 1.0, True)
    assert bool(c.rollback) and bool(c.drop) and not bool(c.accepted)
    assert not bool(_check(setup, state, 5.0, 1.0, False).rollback)  # only verifying steps
    for loss, norm in ((jnp.nan, 1.0), (1.0, jnp.inf)):
        c = _check(setup, state, loss, 1.0, False, grad_norm=norm)
        assert bool(c.skip) and bool(c.drop)


def test_apply_inner_drops_the_update_and_keeps_the_optimizer_state():
    setup, state, params = _setup()
    setup = setup._replace(inner=optax.with_extra_args_support(optax.adam(0.1)))
    state = state._replace(inner=setup.inner.init(params))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, inner = _stages.apply_inner(setup, grads, state, params, T)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    jax.tree.map(np.testing.assert_array_equal, inner, state.inner)
    updates, inner = _stages.apply_inner(setup, grads, state, params, F)
    assert all(bool(jnp.all(u != 0)) for u in jax.tree.leaves(updates))


def test_the_loss_level_is_an_ema_that_ignores_flagged_losses():
    setup, state, _ = _setup()
    calm = hj._monitor.calm()
    lv = _stages.level(setup, state, jnp.float32(2.0), calm)
    assert float(lv.level) == 2.0 and not bool(lv.known)  # the first loss sets the level
    state = state._replace(stats=state.stats._replace(loss_level=lv.level))
    lv = _stages.level(setup, state, jnp.float32(1.0), calm)
    decay = hj.config.LOSS_EMA_DECAY
    assert float(lv.level) == pytest.approx(decay * 2.0 + (1 - decay) * 1.0)
    assert bool(lv.known) and float(lv.dlog) == pytest.approx(np.log(float(lv.level) / 2.0))
    warning = calm._replace(level=jnp.int32(hj._monitor.WARNING))
    assert float(_stages.level(setup, state, jnp.float32(9.0), warning).level) == 2.0
    assert float(_stages.level(setup, state, jnp.float32(jnp.nan), calm).level) == 2.0


def test_plan_falls_back_to_a_probe_at_a_rollback_and_grows_when_accepted():
    setup, state, _ = _setup(horizon_shrink=0.5, min_horizon=1, max_horizon=8)
    assert float(state.horizon_scale) == 0.125  # the first phase is a probe: min / max
    ln = _stages.unobserved(setup, state)
    calm = hj._monitor.calm()
    c = _stages.Check(
        skip=F,
        accepted=F,
        rollback=T,
        rejected=T,
        reuse=F,
        drop=T,
        verdict=calm,
        monitor=state.monitor,
        short=F,
    )
    acc, trend = state.stats.accuracy, state.stats.log_loss_trend
    state = state._replace(horizon_scale=jnp.float32(1.0))
    back = _stages.plan(setup, state, ln, c, acc, trend, state.bandit, observe=False)
    assert float(back.scale) == 0.125 and int(back.horizon) == 1  # min_horizon / max_horizon
    state = state._replace(horizon_scale=back.scale)
    ok = c._replace(accepted=T, rollback=F, rejected=F, drop=F)
    for want in (2, 4, 8, 8):  # doubles with each accepted phase, up to max_horizon
        up = _stages.plan(setup, state, ln, ok, acc, trend, state.bandit, observe=False)
        assert int(up.horizon) == want
        state = state._replace(horizon_scale=up.scale)
    # a monitor caution still shrinks by horizon_shrink
    caution = ok._replace(accepted=F, verdict=calm._replace(shrink_horizon=T))
    shrunk = _stages.plan(setup, state, ln, caution, acc, trend, state.bandit, observe=False)
    assert float(shrunk.scale) == 0.5
    # a rejected phase kept (not rolled back) falls back to a probe as well
    kept = c._replace(rollback=F, drop=F)
    again = _stages.plan(setup, state, ln, kept, acc, trend, state.bandit, observe=False)
    assert float(again.scale) == 0.125 and int(again.horizon) == 1


def test_guard_keeps_non_finite_values_out_and_an_idle_step_applies_nothing():
    params = {"a": jnp.array([1.0, 3e38, 2.0]), "b": jnp.array([0.5])}
    delta = {"a": jnp.array([0.1, 3e38, jnp.nan]), "b": jnp.array([0.2])}
    safe, held = _predicted.guard_nonfinite(params, delta, F)
    np.testing.assert_array_equal(safe["a"], np.float32([0.1, 0.0, 0.0]))
    np.testing.assert_array_equal(safe["b"], np.float32([0.2]))
    assert bool(held)
    safe, _ = _predicted.guard_nonfinite(params, delta, T)
    assert all(bool(jnp.all(d == 0)) for d in jax.tree.leaves(safe))


def _schedule_count(inner_state):
    states = [
        s
        for s in jax.tree.leaves(
            inner_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)
        )
        if isinstance(s, optax.ScaleByScheduleState)
    ]
    assert len(states) == 1
    return int(states[0].count)


@pytest.mark.parametrize("schedule_steps", ["global", "real"])
def test_a_schedule_inside_the_optimizer_follows_the_global_step(schedule_steps):
    """``optax.adamw(schedule)`` inside ``optax.chain``: with ``schedule_steps="global"``
    the schedule's count is the run's step, predicted steps included, so it reaches its
    end value at the run's last step; with ``"real"`` it lags by the predicted steps."""
    n = 60
    sched = optax.linear_schedule(1e-2, 0.0, n)
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched))
    cfg = fast_config(schedule_steps=schedule_steps, **SAFETY_OFF)
    tx = hj.predictive(inner, cfg)
    step = hj.make_hybrid_step(quadratic_loss, tx)
    params = quadratic_params()
    state = tx.init(params)
    batches = quadratic_batches(n)
    for batch in batches[:-1]:
        params, state, _ = step(params, state, batch)
    state = hj.force_full(state, 1)  # the run's last step (global step n - 1) is real
    params, state, m = step(params, state, batches[-1])
    assert bool(m["used_gradient"]) and int(m["step"]) == n - 1
    c = state.counters
    assert int(c.predicted_steps) > 10
    count, real = _schedule_count(state.inner), int(c.real_steps)
    if schedule_steps == "global":
        assert count == n and float(sched(count - 1)) == pytest.approx(1e-2 / n)
        assert float(sched(count)) == 0.0  # the end value, reached with the run
    else:
        assert count == real < n
    # Adam's own count (bias correction) counts the updates its moments have seen
    adam = [
        s
        for s in jax.tree.leaves(
            state.inner, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
        )
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert int(adam[0].count) == real


# -- the cost rule of the verification ----------------------------------------------------


def _after_phase(state, trend, horizon):
    """``state`` as on the real step after a Predict phase of ``horizon`` steps, with the
    running per-real-step change of the log loss level ``trend``."""
    return state._replace(
        snapshot_valid=T,
        stats=state.stats._replace(log_loss_trend=jnp.float32(trend)),
        last=state.last._replace(horizon=jnp.int32(horizon)),
    )


def test_expected_decrease_is_what_h_real_steps_at_the_trend_make():
    got = _cost.expected_decrease(jnp.float32(2.0), jnp.float32(-0.01), jnp.int32(4))
    assert np.isclose(float(got), 2.0 * (1.0 - np.exp(-0.04)), rtol=1e-6)
    # a rising or flat loss level expects nothing
    assert float(_cost.expected_decrease(jnp.float32(2.0), jnp.float32(0.3), 4)) == 0.0


def test_check_accepts_a_phase_only_when_it_pays_for_the_real_steps_it_replaced(monkeypatch):
    setup, state, _ = _setup(verify_tolerance=0.02, predict_cost_ratio=0.25)
    snap, trend, h = 2.0, -0.01, 4
    required = 0.25 * snap * (1.0 - np.exp(h * trend))  # ~0.0196
    state = _after_phase(state, trend, h)
    c = _check(setup, state, snap - required * 1.001, snap, True)
    assert bool(c.accepted) and not bool(c.rollback) and not bool(c.short)
    c = _check(setup, state, snap - required * 0.999, snap, True)  # just short: rejected,
    assert not bool(c.accepted) and bool(c.rejected) and bool(c.short)
    # but it lowered the loss: its parameters are kept, and the update applies from them
    assert not bool(c.rollback) and not bool(c.reuse) and not bool(c.drop)
    # within the tolerance, but no progress: rolled back by the cost rule, and the
    # verifying step's update is applied from the snapshot (reused)
    c = _check(setup, state, snap * 1.01, snap, True)
    assert bool(c.short) and bool(c.rejected) and bool(c.rollback)
    assert bool(c.reuse) and not bool(c.drop)
    # beyond the tolerance: rejected by the guard (not counted as a cost rejection)
    c = _check(setup, state, snap * 1.03, snap, True)
    assert bool(c.rollback) and bool(c.rejected) and not bool(c.short)
    assert not bool(c.reuse) and bool(c.drop)  # a point that may be far off: nothing applied
    # a longer phase must buy more
    longer = _after_phase(state, trend, 3 * h)
    c = _check(setup, longer, snap - required * 1.001, snap, True)
    assert bool(c.rejected) and not bool(c.accepted)
    # only verifying steps are judged
    c = _check(setup, state, snap * 1.01, snap, False)
    assert not bool(c.rollback) and not bool(c.rejected)
    # without KEEP_WHAT_HELPED a phase short of the cost rule is rolled back, with reuse
    monkeypatch.setattr(_stages, "KEEP_WHAT_HELPED", False)
    c = _check(setup, state, snap - required * 0.999, snap, True)
    assert bool(c.rollback) and bool(c.rejected) and bool(c.reuse)


def test_without_expected_progress_a_phase_must_not_raise_the_loss():
    setup, state, _ = _setup(verify_tolerance=0.02, predict_cost_ratio=0.25)
    for trend in (0.0, 0.05):  # a flat or rising loss level: nothing expected
        s = _after_phase(state, trend, 4)
        assert bool(_check(setup, s, 1.0, 1.0, True).accepted)
        c = _check(setup, s, 1.001, 1.0, True)
        assert bool(c.rollback) and bool(c.short)  # within 2%, but the loss went up
        assert bool(_check(setup, s, 1.03, 1.0, True).rollback)


def test_a_cost_ratio_of_zero_leaves_only_the_guard():
    setup, state, _ = _setup(verify_tolerance=0.02, predict_cost_ratio=0.0)
    falling = _after_phase(state, -0.05, 4)
    c = _check(setup, falling, 1.01, 1.0, True)
    assert bool(c.accepted) and not bool(c.short)
    assert bool(_check(setup, falling, 1.03, 1.0, True).rollback)


# -- a rollback that keeps its verifying step ----------------------------------------------


def _at_verification(cfg, lr=0.1, inner=None):
    """A quadratic run with ``inner`` (default ``optax.sgd(lr)``) stopped at the step that
    verifies its first Predict phase, with a falling loss level (so that the cost rule
    expects progress)."""
    tx = hj.predictive(inner or optax.sgd(lr), cfg)
    step, params, state, batches = quadratic_run_until_predict(tx, 40)
    while int(tx.kind(state)) != _kinds.VERIFY:
        params, state, _ = step(params, state, next(batches))
    state = state._replace(stats=state.stats._replace(log_loss_trend=jnp.float32(-0.05)))
    return tx, step, params, state, next(batches)


def _expected_from_snapshot(state, params, batch, lr=0.1):
    """The snapshot plus the SGD update of the gradient taken at ``params``."""
    grads = jax.grad(quadratic_loss)(params, batch)
    return jax.tree.map(lambda s, g: s - lr * g, state.snapshot, grads)


# the guard always passes; the cost rule asks a phase for far more than it can do
_COST_REJECTS = dict(verify_tolerance=1e9, predict_cost_ratio=1e6, monitor=None)


def _no_gain(params):
    """The predicted point moved off the quadratic's minimum: a higher loss than the
    snapshot's on every batch (within the guard's tolerance of 1e9)."""
    return jax.tree.map(lambda p: p + 10.0, params)


def test_a_phase_rejected_by_the_cost_rule_keeps_its_verifying_steps_update():
    """A phase that did not lower the loss goes back to the snapshot, then the
    optimizer's update of the verifying step's gradient (taken at the predicted
    parameters) is applied there."""
    _, step, params, state, batch = _at_verification(fast_config(**_COST_REJECTS))
    params = _no_gain(params)
    want = _expected_from_snapshot(state, params, batch)
    snapshot = jax.device_get(state.snapshot)
    new_params, new_state, m = step(params, state, batch)
    assert bool(m["verified"]) and bool(m["rolled_back"])
    assert int(new_state.counters.cost_rejections) == 1
    for got, w, s in zip(
        jax.tree.leaves(new_params), jax.tree.leaves(want), jax.tree.leaves(snapshot), strict=True
    ):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)
        assert not np.allclose(got, s)  # not the snapshot alone


def test_the_optax_path_returns_the_same_kept_update_after_a_rollback():
    tx, _, params, state, batch = _at_verification(fast_config(**_COST_REJECTS))
    params = _no_gain(params)
    want = _expected_from_snapshot(state, params, batch)
    loss, grads = jax.value_and_grad(quadratic_loss)(params, batch)
    snap = tx.snapshot_loss(quadratic_loss, state, batch)
    updates, new = tx.update(grads, state, params, value=loss, snapshot_value=snap)
    assert bool(new.last.rolled_back)
    got = optax.apply_updates(params, updates)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_a_phase_rejected_by_the_guard_returns_exactly_to_the_snapshot():
    """With the default tolerance and cost rule (the fast tests' common step)."""
    _, step, params, state, batch = _at_verification(fast_config(), inner=optax.adam(1e-2))
    # the predicted point is made far worse than the snapshot (beyond any tolerance)
    params = jax.tree.map(lambda p: p + 10.0, params)
    snapshot, inner = jax.device_get((state.snapshot, state.inner))  # the step donates
    new_params, new_state, m = step(params, state, batch)
    assert bool(m["rolled_back"]) and int(new_state.counters.cost_rejections) == 0
    for got, s in zip(jax.tree.leaves(new_params), jax.tree.leaves(snapshot), strict=True):
        np.testing.assert_array_equal(got, s)
    jax.tree.map(np.testing.assert_array_equal, new_state.inner, inner)  # Adam's moments


def test_an_accepted_phase_takes_one_rejection_off_the_back_off():
    accept = fast_config(**SAFETY_OFF)  # every phase accepted; test_phases' program
    _, step, params, state, batch = _at_verification(accept, lr=0.01)
    state = state._replace(phase=state.phase._replace(rejected=jnp.int32(3)))
    _, new, m = step(params, state, batch)
    assert bool(m["verified"]) and not bool(m["rolled_back"])
    assert int(new.phase.rejected) == 3 - _phases.ACCEPT_FORGIVES == 2
    # a phase that did not pay adds one: kept where it lowered the loss, else rolled back
    _, step, params, state, batch = _at_verification(fast_config(**_COST_REJECTS))
    state = state._replace(
        phase=state.phase._replace(rejected=jnp.int32(3)), horizon_scale=jnp.float32(1.0)
    )
    for move, rolled_back in ((lambda p: p, False), (_no_gain, True)):
        p, s = jax.tree.map(jnp.array, (params, state))  # copies: the step donates its inputs
        _, new, m = step(move(p), s, batch)
        assert bool(m["rolled_back"]) == rolled_back and int(new.phase.rejected) == 4
        # either way the run backs off: no prediction next, a Full phase, a probe after it
        assert bool(new.pending.veto) and bool(new.pending.force_full)
        assert int(new.counters.cost_rejections) == int(state.counters.cost_rejections) + 1
        assert float(new.horizon_scale) == pytest.approx(2 / 4)  # min / max horizon


@pytest.mark.parametrize("joined_max", [0, 1 << 20], ids=["leaf_by_leaf", "joined"])
def test_the_global_norm_is_the_norm_of_every_leaf_together(monkeypatch, joined_max):
    monkeypatch.setattr(_stages, "JOINED_NORM_MAX", joined_max)
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.asarray([-3.0, 4.0], jnp.bfloat16)}
    want = np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in tree.values()))
    np.testing.assert_allclose(float(jax.jit(_stages.global_norm)(tree)), want, rtol=1e-6)
    assert _stages.global_norm({"only": jnp.asarray([3.0, 4.0])}) == 5.0
