"""The end-to-end benchmark's bookkeeping: schedule, learning-rate injection, and the
figures it derives from curves (time to target, loss at equal wall-clock / batches)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import end_to_end as e2e

import hybrid_jax as hj


def test_schedule_warms_up_then_decays_to_a_tenth():
    hyper = jnp.asarray([1e-3, 10.0, 110.0])
    lr = np.array([float(e2e.lr_at(jnp.int32(t), hyper)) for t in range(120)])
    np.testing.assert_allclose(lr[:10], 1e-3 * np.arange(1, 11) / 10, rtol=1e-6)
    assert lr[10] == pytest.approx(1e-3)
    assert np.all(np.diff(lr[10:111]) <= 1e-12)
    assert lr[110] == pytest.approx(1e-4) and lr[119] == pytest.approx(1e-4)


def test_learning_rate_is_injected_into_every_arm():
    params = {"w": jnp.ones((3,))}
    grads = {"w": jnp.ones((3,))}
    tx = e2e.adamw()
    state = e2e.with_lr(tx.init(params), jnp.float32(0.0))
    upd, _ = tx.update(grads, state, params)
    assert float(jnp.abs(upd["w"]).max()) == pytest.approx(0.0)  # lr 0: no step
    upd, _ = tx.update(grads, e2e.with_lr(state, jnp.float32(0.5)), params)
    assert float(upd["w"][0]) < -0.4  # lr 0.5: a real step (Adam's first step is ~ -lr)
    la = optax.lookahead(e2e.adamw(), sync_period=2, slow_step_size=0.5)
    la_state = e2e.with_lr(la.init(optax.LookaheadParams(params, params)), jnp.float32(0.25))
    assert float(la_state.fast_state.hyperparams["learning_rate"]) == 0.25
    hstate = hj.predictive(e2e.adamw(), hj.HybridConfig()).init(params)
    hstate = hstate._replace(inner=e2e.with_lr(hstate.inner, jnp.float32(0.125)))
    assert float(hstate.inner.hyperparams["learning_rate"]) == 0.125


CURVE = [
    dict(wall=0.0, loss=4.0, batches=0),
    dict(wall=1.0, loss=2.0, batches=10),
    dict(wall=2.0, loss=1.0, batches=20),
]


def test_time_to_target_interpolates_and_is_nan_when_never_reached():
    assert e2e._time_to(CURVE, 3.0) == pytest.approx(0.5)
    assert e2e._time_to(CURVE, 1.5) == pytest.approx(1.5)
    assert e2e._time_to(CURVE, 1.0) == pytest.approx(2.0)
    assert math.isnan(e2e._time_to(CURVE, 0.5))


def test_loss_at_is_the_last_evaluation_not_after_x():
    assert e2e._at(CURVE, "wall", 0.5) == 4.0
    assert e2e._at(CURVE, "wall", 1.0) == 2.0
    assert e2e._at(CURVE, "batches", 15) == 2.0
    assert e2e._at(CURVE, "wall", 99.0) == 1.0


def _rec(arm, seed, scale, steps=20, wall=2.0):
    curve = [
        dict(
            p,
            loss=p["loss"] * scale,
            wall=p["wall"] * wall / 2.0,
            backward=p["batches"],
            forward=p["batches"],
            predicted=0,
            phases=0,
            rollbacks=0,
        )
        for p in CURVE
    ]
    return dict(
        workload="w",
        arm=arm,
        seed=seed,
        steps=steps,
        wall=wall,
        compile_s=1.0,
        final_loss=curve[-1]["loss"],
        curve=curve,
    )


def test_summary_picks_the_tuned_arm_and_measures_speedup_against_it():
    recs = [_rec("adamw@0.1", s, 1.2 + 0.01 * s) for s in range(3)]
    recs += [_rec("adamw@0.3", s, 1.0 + 0.01 * s) for s in range(3)]
    recs += [_rec("fast", s, 1.0 + 0.01 * s, wall=1.0) for s in range(3)]
    s = e2e.summarize(recs)["w"]
    assert s["tuned"] == "adamw@0.3"
    assert s["target"] == pytest.approx(1.01)
    fast, tuned = s["arms"]["fast"], s["arms"]["adamw@0.3"]
    assert fast["speedup_vs_tuned"] == pytest.approx(2.0, rel=1e-6)
    assert tuned["speedup_vs_tuned"] == pytest.approx(1.0)
    assert tuned["time_to_target"]["n"] == 2  # the seed above the median never reaches it
    assert s["arms"]["adamw@0.1"]["time_to_target"]["n"] == 0
    # at the tuned arm's wall-clock (2 s) the fast arm has finished: its final loss
    assert fast["loss_at_tuned_wall"]["median"] == pytest.approx(1.01)
    assert "| fast |" in e2e.markdown(e2e.summarize(recs), {})


@pytest.mark.slow
def test_run_arm_trains_and_counts(tmp_path):
    wl = e2e.digits_workload(steps=20, eval_every=10, lrs=(1e-3,))
    cfg = hj.HybridConfig(
        warmup_steps=2, full_steps=2, correct_steps=1, max_horizon=2, confidence_threshold=0.0
    )
    arm = e2e.Arm("hybrid:last_update", "hybrid", hj.predictive(e2e.adamw(), cfg), 1e-2, 20, 10)
    held = jax.device_put(wl.eval_batches)
    evaluate = lambda p: float(jnp.mean(jax.vmap(wl.loss_fn, (None, 0))(p, held)))
    cache: dict = {}
    rec, *_ = e2e.run_arm(wl, arm, 0, evaluate, lambda m: None, cache)
    rec2, *_ = e2e.run_arm(wl, arm, 0, evaluate, lambda m: None, cache)
    last = rec["curve"][-1]
    assert [p["step"] for p in rec["curve"]] == [0, 10, 20]
    assert last["backward"] + last["predicted"] + last["idle"] == 20 and last["predicted"] > 0
    assert rec["final_loss"] < rec["curve"][0]["loss"]
    assert rec2["final_loss"] == rec["final_loss"]  # same seed, same data order, same result
