"""The end-to-end benchmark's bookkeeping: schedule, learning-rate injection, and the
figures it derives from curves (time to target, loss at equal wall-clock / batches)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

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


def test_the_rate_is_chosen_on_the_validation_split_and_the_edge_is_flagged():
    recs = [dict(_rec("adamw@0.1", s, 1.2), val_loss=0.5) for s in range(3)]
    recs += [dict(_rec("adamw@0.3", s, 1.0), val_loss=0.6) for s in range(3)]
    recs += [dict(_rec("adamw@1", s, 1.1), val_loss=0.7) for s in range(3)]
    s = e2e.summarize(recs)["w"]
    assert s["tuned"] == "adamw@0.1" and s["tuned_by"] == "val_loss"  # not the held-out best
    assert not s["bracketed"]
    assert "at the edge of the sweep" in e2e.markdown({"w": s}, {})
    sweep = {0.1: recs[:3], 0.3: recs[3:6], 1.0: recs[6:]}
    assert e2e.tuned_rate(sweep) == 0.1


def test_paired_ratios_are_per_seed():
    recs = [_rec("adamw@0.1", s, 1.0 + s, wall=2.0) for s in range(3)]
    recs += [_rec("h", s, 1.1 * (1.0 + s), wall=2.2) for s in range(3)]
    r = e2e.paired(recs, "h", "adamw@0.1")
    assert r["loss_ratio"]["median"] == pytest.approx(1.1)
    assert r["loss_ratio"]["hi"] - r["loss_ratio"]["lo"] == pytest.approx(0.0, abs=1e-12)
    assert r["wall_ratio"]["median"] == pytest.approx(1.1)


def test_unstack_splits_arrays_and_tuples():
    xs, ys = np.arange(6).reshape(3, 2), np.arange(3)
    parts = e2e.unstack((xs, ys))
    assert len(parts) == 3 and parts[1][0].tolist() == [2, 3] and int(parts[2][1]) == 2
    assert [p.tolist() for p in e2e.unstack(xs)] == [[0, 1], [2, 3], [4, 5]]


def test_halves_split_validation_from_held_out():
    val, test = e2e.halves(np.arange(7))
    assert val.tolist() == [0, 1, 2] and test.tolist() == [3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.parametrize("stepping", ["fused", "python"])
def test_run_arm_trains_and_counts(stepping):
    wl = e2e.digits_workload("mlp", steps=20, eval_every=10, lrs=(1e-3,))
    cfg = hj.HybridConfig(
        warmup_steps=2,
        full_steps=2,
        correct_steps=1,
        max_horizon=2,
        confidence_threshold=0.0,
        predict_cost_ratio=0.0,
    )
    arm = e2e.Arm("hybrid:last_update", "hybrid", hj.predictive(e2e.adamw(), cfg), 1e-2, 20, 10)
    evaluate = e2e.make_evaluate(wl)
    cache: dict = {}
    rec, *_ = e2e.run_arm(wl, arm, 0, evaluate, lambda m: None, cache, stepping)
    rec2, *_ = e2e.run_arm(wl, arm, 0, evaluate, lambda m: None, cache, stepping)
    assert math.isfinite(rec["val_loss"]) and rec["val_loss"] != rec["final_loss"]  # two splits
    last = rec["curve"][-1]
    assert [p["step"] for p in rec["curve"]] == [0, 10, 20]
    assert last["backward"] + last["predicted"] + last["idle"] == 20 and last["predicted"] > 0
    assert rec["final_loss"] < rec["curve"][0]["loss"]
    assert rec2["final_loss"] == rec["final_loss"]  # same seed, same data order, same result
