"""A Predict phase run as one program (`fuse_predict=True`): the same steps, the same
parameters up to rounding, every step's metrics row, one program per phase."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hybrid_jax as hj
from hybrid_jax import tasks

CFG = dict(
    warmup_steps=20,
    full_steps=5,
    correct_steps=2,
    min_horizon=2,
    max_horizon=6,
    confidence_threshold=0.0,
    verify_tolerance=0.5,
    predict_cost_ratio=0.25,
    observe_every=1,
)


def _batches(n):
    split = tasks.digits(0)
    it = tasks.batches(split.x_train, split.y_train, 64, 0)
    return [tuple(map(jnp.asarray, next(it))) for _ in range(n)]


def _run(step, tx, batches, keep_at=None):
    """Steps through ``batches``; returns the rows, ``steps_ahead`` after each call, and
    the params and state after call ``keep_at`` (the last call by default)."""
    params = tasks.mlp_init(jax.random.key(0))
    state = tx.init(params)
    rows, ahead, kept = [], [], None
    keep_at = len(batches) - 1 if keep_at is None else keep_at
    for i, b in enumerate(batches):
        params, state, m = step(params, state, b)
        rows.append(m)
        ahead.append(getattr(step, "steps_ahead", 0))
        if i == keep_at:
            kept = jax.device_get((params, state))
    return kept, jax.device_get(rows), ahead


@pytest.mark.parametrize(
    "changes",
    [{}, pytest.param({"predictor": "rssm"}, marks=pytest.mark.slow)],
    ids=["last_update", "rssm"],
)
def test_fused_phases_take_the_same_steps_and_reach_the_same_parameters(changes):
    tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig(**CFG, **changes))
    batches = _batches(160)
    fused = hj.make_dispatched_step(tasks.mlp_loss, tx, fuse_predict=True)
    _, rb, ahead = _run(fused, tx, batches)
    # compare where the fused run's state is not ahead of its calls
    end = max(i for i, a in enumerate(ahead) if a == 0)
    assert end >= 140 and max(ahead) >= 1
    (pb, sb), rb, _ = _run(
        hj.make_dispatched_step(tasks.mlp_loss, tx, fuse_predict=True), tx, batches, end
    )
    (pa, sa), ra, _ = _run(hj.make_dispatched_step(tasks.mlp_loss, tx), tx, batches, end)
    for key in ("step", "phase", "used_gradient", "verified", "rolled_back", "predicted_steps"):
        assert [int(r[key]) for r in ra] == [int(r[key]) for r in rb], key
    np.testing.assert_allclose(
        [float(r["update_norm"]) for r in ra], [float(r["update_norm"]) for r in rb], rtol=1e-4
    )
    assert int(sb.counters.predicted_steps) == int(sa.counters.predicted_steps) > 20
    assert int(sb.step) == int(sa.step) == end + 1
    assert fused.phases_fused >= int(sb.counters.predict_phases) > 3
    assert "predict" not in fused.compiled_kinds and "predict_phase" in fused.compiled_kinds
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), pa, pb)


def test_a_fused_phase_applies_the_whole_phase_on_its_first_call():
    tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig(**CFG))
    step = hj.make_dispatched_step(tasks.mlp_loss, tx, fuse_predict=True)
    params = tasks.mlp_init(jax.random.key(0))
    state = tx.init(params)
    for i, b in enumerate(_batches(120)):
        params, state, m = step(params, state, b)
        if step.steps_ahead:  # the first call of a phase: the state is past all of it
            assert int(m["step"]) == i and int(state.step) == i + 1 + step.steps_ahead
            assert int(state.phase.id) != hj.PREDICT  # the phase fits in one program
            return
    pytest.fail("no Predict phase started")


def test_fuse_predict_refuses_the_monitors_forward_passes():
    tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig(monitor_every=2))
    with pytest.raises(ValueError, match="monitor_every"):
        hj.make_dispatched_step(tasks.mlp_loss, tx, fuse_predict=True)
