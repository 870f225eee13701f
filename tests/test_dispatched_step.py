"""`make_dispatched_step`: the same steps as `hybrid_step`, device guards for wrong guesses."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hybrid_jax as hj
from hybrid_jax import _dispatch, tasks


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
    for name in ("backward_passes", "predicted_steps", "rollbacks", "verifications"):
        assert int(getattr(sa.counters, name)) == int(getattr(sb.counters, name)), name
    assert int(sb.counters.idle_steps) == 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), pa, pb)
    return step, sa


def test_same_steps_and_parameters_as_hybrid_step(digits_batches):
    cfg = hj.HybridConfig(
        warmup_steps=20,
        full_steps=5,
        correct_steps=2,
        max_horizon=6,
        min_horizon=3,
        confidence_threshold=0.0,
    )
    tx = hj.predictive(optax.adamw(1e-3), cfg)
    step, state = _compare(tx, digits_batches[:200])
    assert step.compiled_kinds == ["real", "verify", "predict_first", "predict"]
    assert all(n > 0 for n in step.kind_counts[:4]) and step.kind_counts[4] == 0
    assert int(state.counters.predicted_steps) > 50


def test_same_steps_with_rollbacks(digits_batches):
    tx = hj.predictive(optax.adamw(3e-3), hj.HybridConfig(warmup_steps=20))
    _, state = _compare(tx, digits_batches)
    assert int(state.counters.rollbacks) > 0


def _warm_state(tx, batches, n=30):
    params = tasks.mlp_init(jax.random.key(0))
    state = tx.init(params)
    step = hj.make_hybrid_step(tasks.mlp_loss, tx)
    for b in batches[:n]:
        params, state, _ = step(params, state, b)
    return params, state


def _call(step, kind, params, state, batch):
    def copy(tree):  # the programs donate their inputs
        return jax.tree.map(jnp.copy, tree)

    return step._program(kind, params, batch)(copy(params), copy(state), batch)


@pytest.fixture(scope="module")
def warm(digits_batches):
    """A transformation, its state after 30 real steps, and one dispatched step (its
    programs compiled once for the guard tests)."""
    cfg = hj.HybridConfig(warmup_steps=5, confidence_threshold=0.0)
    tx = hj.predictive(optax.adamw(1e-3), cfg)
    params, state = _warm_state(tx, digits_batches)
    return params, state, hj.make_dispatched_step(tasks.mlp_loss, tx)


def test_predicted_program_on_a_state_that_wants_a_real_step_does_nothing(digits_batches, warm):
    params, state, step = warm
    state = state._replace(phase=I32(hj.FULL), phase_step=I32(0), phase_budget=I32(5))
    for kind in (_dispatch.PREDICT, _dispatch.PREDICT_FIRST):
        p, s, m, _, _ = _call(step, kind, params, state, digits_batches[40])
        jax.tree.map(np.testing.assert_array_equal, p, params)
        assert int(s.counters.idle_steps) == int(state.counters.idle_steps) + 1
        assert int(s.step) == int(state.step) + 1 and int(s.phase) == hj.FULL
        assert not bool(m["used_gradient"]) and int(m["idle_steps"]) == 1
        jax.tree.map(np.testing.assert_array_equal, s.snapshot, state.snapshot)


def test_real_program_delays_a_starting_predict_phase(digits_batches, warm):
    params, state, step = warm
    state = state._replace(phase=I32(hj.PREDICT), phase_step=I32(0), phase_budget=I32(5))
    p, s, m, _, _ = _call(step, _dispatch.REAL, params, state, digits_batches[40])
    assert (int(s.phase), int(s.phase_step), int(s.phase_budget)) == (hj.PREDICT, 0, 5)
    assert (
        bool(m["used_gradient"])
        and int(s.counters.backward_passes) == int(state.counters.backward_passes) + 1
    )
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params), strict=True)
    )
    assert int(_dispatch.kind_of(s, step.tx)) == _dispatch.PREDICT_FIRST


def test_real_program_ends_a_predict_phase_under_way_and_verify_checks_it(digits_batches, warm):
    params, state, step = warm
    state = state._replace(
        phase=I32(hj.PREDICT),
        phase_step=I32(2),
        phase_budget=I32(5),
        snapshot=jax.tree.map(jnp.copy, params),
        snapshot_valid=jnp.asarray(True),
        pending_verify=jnp.asarray(False),
    )
    p, s, m, _, _ = _call(step, _dispatch.REAL, params, state, digits_batches[40])
    assert int(s.phase) == hj.CORRECT and bool(s.pending_verify)
    assert not bool(m["rolled_back"]) and not bool(m["verified"])
    assert int(_dispatch.kind_of(s, step.tx)) == _dispatch.VERIFY
    _, s2, m2, _, _ = _call(step, _dispatch.VERIFY, p, s, digits_batches[41])
    assert bool(m2["verified"]) and not bool(s2.pending_verify)


def test_foreign_state_resyncs_and_each_program_compiles_once(digits_batches):
    traces = [0]

    def loss_fn(params, batch):
        traces[0] += 1
        return tasks.mlp_loss(params, batch)

    cfg = hj.HybridConfig(warmup_steps=10, full_steps=4, correct_steps=2, max_horizon=4)
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
        hj.DispatchedStep(tasks.mlp_loss, tx, metrics_fn="metrics")


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
    assert int(state.counters.predicted_steps) > 20
