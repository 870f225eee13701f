"""`make_dispatched_step`: the same steps as `hybrid_step`, chosen a step ahead exactly."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    fast_config,
    quadratic_batches,
    quadratic_loss,
    quadratic_params,
    quadratic_run_until_predict,
)

import hybrid_jax as hj
from hybrid_jax import _dispatch, _kinds, _phases, _train, predictors, tasks


def I32(x):
    return jnp.asarray(x, jnp.int32)


@pytest.fixture(scope="module")
def digits_batches():
    split = tasks.digits(0)
    it = tasks.batches(split.x_train, split.y_train, 64, 0)
    return [tuple(map(jnp.asarray, next(it))) for _ in range(300)]


def _run(step, tx, batches, seed=0):
    params = tasks.mlp_init(jax.random.key(seed))
    state = tx.init(params)
    rows = []
    for b in batches:
        params, state, m = step(params, state, b)
        rows.append(m)
    return params, state, jax.device_get(rows)


def _compare(tx, batches):
    pa, sa, ra = _run(hj.make_hybrid_step(tasks.mlp_loss, tx), tx, batches)
    step = hj.make_dispatched_step(tasks.mlp_loss, tx)
    pb, sb, rb = _run(step, tx, batches)
    keys = ("phase", "used_gradient", "verified", "rolled_back")
    assert [tuple(int(r[k]) for k in keys) for r in ra] == [
        tuple(int(r[k]) for k in keys) for r in rb
    ]
    counted = ("backward_passes", "observed_steps", "predicted_steps", "rollbacks", "verifications")
    for name in counted:
        assert int(getattr(sa.counters, name)) == int(getattr(sb.counters, name)), name
    assert int(sb.counters.idle_steps) == 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), pa, pb)
    return step, sa


@pytest.mark.slow
@pytest.mark.parametrize(
    "changes",
    [{}, {"predictor": "rssm"}, {"observe_every": 8}],
    ids=["default", "rssm", "observe_every_8"],
)
def test_500_digits_steps_same_phases_and_parameters_as_hybrid_step(changes):
    """The two stepping modes take the same steps (the default confidence gate included)
    and reach the same parameters, to a relative 1e-5."""
    split = tasks.digits(0)
    it = tasks.batches(split.x_train, split.y_train, 64, 0)
    batches = [tuple(map(jnp.asarray, next(it))) for _ in range(500)]
    tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig(**changes))
    pa, sa, ra = _run(hj.make_hybrid_step(tasks.mlp_loss, tx), tx, batches)
    pb, sb, rb = _run(hj.make_dispatched_step(tasks.mlp_loss, tx), tx, batches)
    assert [int(r["phase"]) for r in ra] == [int(r["phase"]) for r in rb]
    assert [bool(r["used_gradient"]) for r in ra] == [bool(r["used_gradient"]) for r in rb]
    assert int(sa.counters.predicted_steps) == int(sb.counters.predicted_steps) > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), pa, pb)


@pytest.mark.slow
def test_same_steps_and_parameters_as_hybrid_step(digits_batches):
    cfg = hj.HybridConfig(
        warmup_steps=20,
        full_steps=5,
        correct_steps=2,
        max_horizon=6,
        min_horizon=3,
        confidence_threshold=0.0,
        observe_every=1,  # four kinds of step, no plain one
        predict_cost_ratio=0.25,
    )
    tx = hj.predictive(optax.adamw(1e-3), cfg)
    step, state = _compare(tx, digits_batches[:200])
    assert step.compiled_kinds == ["real", "verify", "predict_first", "predict"]
    assert all(n > 0 for n in step.kind_counts[:4]) and step.kind_counts[4] == 0
    assert int(state.counters.predicted_steps) > 50


def _confident_between(first: int, last: int) -> hj.Predictor:
    """``last_update`` whose confidence is 1 after a real step observed in [first, last)
    and 0 otherwise."""
    inner = predictors.last_update()

    def init(spec):
        return inner.init(spec), jnp.zeros((), jnp.int32)

    def observe(state, obs):
        return inner.observe(state[0], obs), obs.step

    def predict(state, ctx):
        pred, inner_state = inner.predict(state[0], ctx)
        conf = ((state[1] >= first) & (state[1] < last)).astype(jnp.float32)
        return pred._replace(confidence=conf), (inner_state, state[1])

    return hj.Predictor("confident_between", init, observe, predict)


@pytest.mark.slow
def test_same_steps_when_a_closed_gate_backs_off(digits_batches):
    """Full phases that end with the gate closed back off (the host plans their quiet
    stretches): the dispatched step, packed and fused or not, takes the same steps."""
    cfg = hj.HybridConfig(
        warmup_steps=20, full_steps=5, correct_steps=2, max_horizon=3, observe_every=4
    )
    tx = hj.predictive(optax.adamw(1e-3), cfg, predictor=_confident_between(90, 170))
    step, state = _compare(tx, digits_batches[:300])
    _, _, rows = _run(hj.make_hybrid_step(tasks.mlp_loss, tx), tx, digits_batches[:300])
    phases = [int(r["phase"]) for r in rows]
    first = phases.index(hj.PREDICT)
    assert 90 < first < 170 and phases[first - 20 : first] == [hj.FULL] * 20  # backed off
    assert phases[-40:] == [hj.FULL] * 40  # closed again: backed off again
    assert step.kind_counts[_kinds.PLAIN] > 150
    fused = hj.make_dispatched_step(tasks.mlp_loss, tx, pack_state=True, fuse_predict=True)
    _, packed_state, packed_rows = _run(fused, tx, digits_batches[:300])
    assert [int(r["phase"]) for r in packed_rows] == phases
    assert int(packed_state.counters.observed_steps) == int(state.counters.observed_steps)


@pytest.mark.slow
def test_same_steps_with_rollbacks(digits_batches):
    tx = hj.predictive(optax.adamw(3e-3), hj.HybridConfig(warmup_steps=20))
    _, state = _compare(tx, digits_batches)
    assert int(state.counters.rollbacks) > 0


def _kinds_of_a_run(tx, batches, poison=()):
    """Steps ``make_hybrid_step``; returns, per step, (kind taken, kind_after_next of the
    state before it, kind_of the state after it)."""
    cfg = tx.config
    step = hj.make_hybrid_step(tasks.mlp_loss, tx)
    params = tasks.mlp_init(jax.random.key(0))
    state = tx.init(params)
    out, ahead = [], None
    for i, (x, y) in enumerate(batches):
        if i in poison:
            x = x.at[0, 0].set(jnp.nan)
        kind = int(_dispatch.kind_of(cfg, state))
        out.append((kind, ahead))
        ahead = int(_dispatch.kind_after_next(cfg, state))
        params, state, _ = step(params, state, (x, y))
    return out, state


# Runs with rollbacks and non-finite batches: unobserved steps; a monitor that warns often.
OBSERVE_4 = dict(observe_every=4, confidence_threshold=0.0)
TIGHT_MONITOR = dict(
    monitor_every=2,
    confidence_threshold=0.0,
    monitor=hj.MonitorSettings(loss_z_caution=0.5, loss_z_warning=1.0, loss_z_critical=2.0),
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "changes", [dict(confidence_threshold=0.0, correct_steps=1), OBSERVE_4, TIGHT_MONITOR]
)
def test_the_kind_after_next_is_exact_even_around_vetoes(digits_batches, changes):
    """The kind of step t + 1 is known from the state before step t, also around
    non-finite batches, rollbacks and monitor warnings (which act a step late)."""
    cfg = hj.HybridConfig(warmup_steps=10, full_steps=3, max_horizon=4, **changes)
    tx = hj.predictive(optax.adamw(3e-3), cfg)
    poison = {25, 33, 47, 60, 61, 90}
    rows, state = _kinds_of_a_run(tx, digits_batches[:150], poison)
    assert all(ahead is None or ahead == kind for kind, ahead in rows)
    c = state.counters
    assert int(c.predicted_steps) >= 8 and int(c.skipped_updates) >= 1
    assert int(c.idle_steps) + int(c.rollbacks) + int(jnp.sum(state.monitor.events)) > 0


def _plans_of_a_run(tx, batches, poison, n):
    """Steps ``make_hybrid_step``; returns the kind of each step, ``kinds_ahead`` and
    ``quiet_run`` of the state before it, and how many steps began with a forced Full
    phase held back."""
    cfg = tx.config
    step = hj.make_hybrid_step(tasks.mlp_loss, tx)
    ahead = jax.jit(lambda s: (_kinds.kinds_ahead(cfg, s, n), _kinds.quiet_run(cfg, s)))
    params = tasks.mlp_init(jax.random.key(0))
    state = tx.init(params)
    kinds, plans, held = [], [], 0
    for i, (x, y) in enumerate(batches):
        if i in poison:
            x = x.at[0, 0].set(jnp.nan)
        kinds.append(int(_kinds.kind_of(cfg, state)))
        plans.append(jax.device_get(ahead(state)))
        held += int(state.pending.force_full & _phases.deferred(state.phase))
        params, state, _ = step(params, state, (x, y))
    return kinds, plans, held


@pytest.mark.slow
@pytest.mark.parametrize("changes", [OBSERVE_4, TIGHT_MONITOR])
def test_the_kinds_a_plan_calls_certain_are_the_kinds_taken(digits_batches, changes):
    """``kinds_ahead``'s certain kinds are those the run then takes, around non-finite
    batches, rollbacks and monitor warnings; inside a Full phase they reach its end; the
    steps ``quiet_run`` counts are unobserved ones."""
    cfg = hj.HybridConfig(warmup_steps=10, full_steps=12, max_horizon=4, **changes)
    tx = hj.predictive(optax.adamw(3e-3), cfg)
    n = 16
    kinds, plans, held = _plans_of_a_run(tx, digits_batches[:200], {25, 33, 47, 60, 61, 90}, n)
    certain = quiet_steps = 0
    for i, (plan, quiet) in enumerate(plans):
        quiet = int(quiet)
        # a quiet stretch: its unobserved steps, after the step after next; then, once
        # enough went unobserved, an observed one (the count is not short)
        assert kinds[i + 2 : i + 2 + quiet] == [_kinds.PLAIN] * min(quiet, len(kinds) - i - 2)
        if quiet + 1 >= cfg.observe_every - 2 and i + 2 + quiet < len(kinds):
            assert kinds[i + 2 + quiet] == _kinds.REAL, (i, quiet, kinds[i : i + quiet + 4])
        quiet_steps += quiet > 0
        known = int(np.argmin(plan >= 0)) if (plan < 0).any() else n
        assert (plan[:known] >= 0).all() and (plan[known:] < 0).all()  # a prefix
        assert known >= 2  # the next step's kind and the one after: always
        for j in range(min(known, len(kinds) - i)):
            assert plan[j] == kinds[i + j], (i, j, plan, kinds[i : i + n])
        certain += known
    assert certain / len(plans) > 4  # the plans reach well ahead on average
    if cfg.observe_every > 2:
        assert quiet_steps > 10  # long (backed-off) Full phases begin quiet
    if cfg.monitor_every:
        assert held > 0  # a warning inside a Full phase waited for its end


@pytest.mark.slow
def test_inside_full_phases_the_host_reads_one_kind_in_many(monkeypatch):
    """Inside a Full phase the host reads the kinds of its steps at once (``kinds_ahead``),
    not one per step, and still takes the steps ``make_hybrid_step`` takes."""
    cfg = fast_config(
        warmup_steps=8, full_steps=60, observe_every=4, confidence_threshold=0.0, correct_steps=3
    )
    tx = hj.predictive(optax.adam(1e-2), cfg)
    batches = quadratic_batches(150)
    reads = []
    host = _dispatch._host
    monkeypatch.setattr(_dispatch, "_host", lambda e: reads.append(1) or host(e))
    runs = []
    for step in (
        hj.make_hybrid_step(quadratic_loss, tx),
        hj.make_dispatched_step(quadratic_loss, tx),
    ):
        params, state, phases = quadratic_params(), tx.init(quadratic_params()), []
        for b in batches:
            phases.append((int(state.phase.id), int(state.phase.step)))
            params, state, _ = step(params, state, b)
        runs.append((params, phases, int(state.counters.predicted_steps)))
    (pa, phases_a, predicted), (pb, phases_b, _) = runs
    assert phases_a == phases_b and predicted > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), pa, pb)
    steps_in_full = sum(p in (hj.WARMUP, hj.FULL) for p, _ in phases_a)
    full_phases = sum(p in (hj.WARMUP, hj.FULL) and k == 0 for p, k in phases_a)
    assert steps_in_full >= 100 and full_phases >= 2
    # one read per PLAN - 1 steps of a Full phase (and two at its start), one per step elsewhere
    most = len(batches) - steps_in_full + steps_in_full / (_dispatch.PLAN - 1) + 2 * full_phases
    assert len(reads) <= most + 2


@pytest.mark.slow
def test_a_quiet_stretch_is_read_once(monkeypatch):
    """The unobserved steps of a long warmup (``_phases.quiet``) are counted when the
    stretch begins (``quiet_run``): the host reads the kinds a few times, not once per
    ``PLAN - 1`` steps, and takes the steps ``make_hybrid_step`` takes."""
    cfg = fast_config(warmup_steps=300, full_steps=5, observe_every=4)
    tx = hj.predictive(optax.adam(1e-2), cfg)
    reads = []
    host = _dispatch._host
    monkeypatch.setattr(_dispatch, "_host", lambda e: reads.append(1) or host(e))
    step = hj.make_dispatched_step(quadratic_loss, tx)
    params, state = quadratic_params(), tx.init(quadratic_params())
    for b in quadratic_batches(300):
        params, state, _ = step(params, state, b)
    assert step.kind_counts[_kinds.PLAIN] >= 290 and len(reads) <= 6, (step.kind_counts, reads)


@pytest.mark.slow
def test_a_call_that_raises_leaves_the_kinds_in_step():
    """A call that fails (a batch of the wrong shape) makes the next call read the kinds
    anew: the run then takes the steps ``make_hybrid_step`` takes."""
    cfg = fast_config(full_steps=12, observe_every=4)
    tx = hj.predictive(optax.adam(1e-2), cfg)
    batches = quadratic_batches(60)
    runs = []
    for step in (
        hj.make_hybrid_step(quadratic_loss, tx),
        hj.make_dispatched_step(quadratic_loss, tx),
    ):
        params, state, phases = quadratic_params(), tx.init(quadratic_params()), []
        for i, b in enumerate(batches):
            if i in (12, 31):
                with pytest.raises(TypeError):
                    step(params, state, jnp.zeros((8, 5)))
            phases.append(int(state.phase.id))
            params, state, _ = step(params, state, b)
        runs.append((phases, int(state.counters.predicted_steps)))
    assert runs[0] == runs[1] and runs[0][1] > 0


def test_a_vetoed_predicted_step_applies_nothing():
    cfg = fast_config()
    tx = hj.predictive(optax.adam(1e-2), cfg)
    step, params, state, batches = quadratic_run_until_predict(tx, 60)
    params, state, _ = step(params, state, next(batches))  # the phase's first step
    assert int(state.phase.id) == hj.PREDICT and int(state.phase.step) == 1
    state = state._replace(pending=state.pending._replace(veto=jnp.asarray(True)))
    before = jax.tree.map(jnp.copy, params)
    params, new, m = step(params, state, next(batches))
    jax.tree.map(np.testing.assert_array_equal, params, before)
    assert not bool(m["used_gradient"]) and int(m["idle_steps"]) == 1
    assert int(new.phase.id) == hj.CORRECT and bool(new.pending.verify)
    assert int(_dispatch.kind_of(cfg, new)) == _dispatch.VERIFY


@pytest.mark.slow
def test_foreign_state_resyncs_and_each_program_compiles_once(digits_batches):
    traces = [0]

    def loss_fn(params, batch):
        traces[0] += 1
        return tasks.mlp_loss(params, batch)

    cfg = hj.HybridConfig(
        warmup_steps=10, full_steps=4, correct_steps=2, max_horizon=4, observe_every=1
    )
    tx = hj.predictive(optax.adamw(1e-3), cfg.replace(confidence_threshold=0.0))
    step = hj.make_dispatched_step(loss_fn, tx)
    params = tasks.mlp_init(jax.random.key(1))
    state = tx.init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "donated buffers were not usable"
        for b in digits_batches[:120]:
            params, state, _ = step(params, state, b)
        seen = traces[0]
        assert step.compiled_kinds == ["real", "verify", "predict_first", "predict"]
        for b in digits_batches[120:180]:
            params, state, _ = step(params, state, b)
    assert traces[0] == seen
    # a state the step did not return (e.g. restored): its kind is read at once
    fresh = tx.init(params)
    _, _, m = step(jax.tree.map(jnp.copy, params), fresh, digits_batches[0])
    assert int(m["phase"]) == hj.WARMUP and bool(m["used_gradient"])


@pytest.mark.slow
def test_has_aux(digits_batches):
    def loss_fn(params, batch):
        loss = tasks.mlp_loss(params, batch)
        return loss, {"twice": 2.0 * loss}

    cfg = hj.HybridConfig(warmup_steps=5, full_steps=3, confidence_threshold=0.0)
    tx = hj.predictive(optax.adamw(1e-3), cfg)
    step = hj.make_dispatched_step(loss_fn, tx, has_aux=True)
    params = tasks.mlp_init(jax.random.key(0))
    state = tx.init(params)
    kinds = set()
    for b in digits_batches[:40]:
        out = step(params, state, b)
        assert len(out) == 4
        params, state, m, aux = out
        kinds.add(bool(m["used_gradient"]))
        twice = float(aux["twice"])
        if bool(m["used_gradient"]):
            assert twice == pytest.approx(2.0 * float(m["loss"]), rel=1e-6)
        else:
            assert np.isnan(twice)
    assert kinds == {True, False}


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match=r"hj\.predictive"):
        hj.make_dispatched_step(tasks.mlp_loss, optax.adamw(1e-3))
    tx = hj.predictive(optax.adamw(1e-3))
    with pytest.raises(TypeError, match="prepare must be callable"):
        hj.make_dispatched_step(tasks.mlp_loss, tx, prepare=3)
    with pytest.raises(TypeError, match="metrics_fn must be callable"):
        _dispatch.DispatchedStep(tasks.mlp_loss, tx, metrics_fn="metrics")


@pytest.mark.slow
def test_prepare_sets_the_learning_rate_from_the_global_step(digits_batches):
    inner = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0)
    cfg = hj.HybridConfig(warmup_steps=5, full_steps=3, confidence_threshold=0.0)
    tx = hj.predictive(inner, cfg)

    def with_lr(state, t):
        lr = 1e-3 / (1.0 + 0.05 * t.astype(jnp.float32))
        return state._replace(inner=optax.tree_utils.tree_set(state.inner, learning_rate=lr))

    dispatched = hj.make_dispatched_step(tasks.mlp_loss, tx, prepare=with_lr)
    plain = jax.jit(lambda p, s, b, t: hj.hybrid_step(tasks.mlp_loss, tx, p, with_lr(s, t), b))
    runs = []
    for step in (dispatched, plain):
        params = tasks.mlp_init(jax.random.key(0))
        state = tx.init(params)
        for t, b in enumerate(digits_batches[:40]):
            params, state, _ = step(params, state, b, jnp.int32(t))
        runs.append((params, state))
    (pa, sa), (pb, _) = runs
    lr = optax.tree_utils.tree_get(sa.inner, "learning_rate")
    assert float(lr) == pytest.approx(1e-3 / (1.0 + 0.05 * 39))
    assert int(sa.counters.predicted_steps) > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), pa, pb)


@pytest.mark.slow
def test_same_steps_with_unobserved_real_steps(digits_batches):
    cfg = hj.HybridConfig(
        warmup_steps=20,
        full_steps=8,
        correct_steps=5,
        max_horizon=4,
        min_horizon=3,
        confidence_threshold=0.0,
        observe_every=4,
    )
    tx = hj.predictive(optax.adamw(1e-3), cfg)
    step, state = _compare(tx, digits_batches[:150])
    assert step.kind_counts[_dispatch.PLAIN] > 20
    assert 0 < int(state.counters.observed_steps) < int(state.counters.real_steps)
    assert int(state.counters.predicted_steps) > 10  # several Predict phases compared too


def test_compile_twice_then_step():
    """``compile`` may be called again (it compiled its state reader the first time).
    The step is the one ``hj.train`` runs (packed state, packed metrics), whose programs
    the ``hj.train`` tests compile too: once in a session."""
    tx = hj.predictive(optax.adam(1e-2), fast_config())
    step = hj.make_dispatched_step(
        quadratic_loss,
        tx,
        pack_state=_train.PACK_STATE,
        metrics_fn=lambda s: _train._pack(hj.metrics(s)),
    )
    params = quadratic_params()
    state = tx.init(params)
    batch = quadratic_batches(1)[0]
    assert step.compile(params, state, batch) >= 0.0
    assert step.compile(params, state, batch) >= 0.0
    params, state, _ = step(params, state, batch)
    assert int(state.step) == 1
