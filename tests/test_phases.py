"""The phase sequence follows the documented schedule, step by step."""

import jax.numpy as jnp
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
from hybrid_jax import _phases


def documented_schedule(cfg, n, may_predict=lambda step: True):
    """The schedule of ``HybridConfig``'s docstring, in plain Python.

    ``may_predict(step)`` says whether a Predict phase may follow step ``step``. Every
    phase is accepted here: the horizon scale starts at ``min_horizon / max_horizon``
    (a probe) and doubles, up to 1, at each verification, which also takes
    ``ACCEPT_FORGIVES`` off the back-off's exponent; a Full phase that ends with no
    Predict phase starting adds one to it, and the Full phase after it is ``full_steps``
    times 2 to the exponent (at most ``2**MAX_BACKOFF``).
    """
    phases = []
    scale = cfg.min_horizon / cfg.max_horizon
    exponent = 0
    if cfg.warmup_steps > 0:
        phase, budget = hj.WARMUP, cfg.warmup_steps
    else:
        phase, budget = hj.FULL, cfg.full_steps
    k = consecutive = 0
    for step in range(n):
        phases.append(phase)
        k += 1
        if k < budget:
            continue
        k = 0
        if phase == hj.WARMUP:
            phase, budget = hj.FULL, cfg.full_steps
        elif phase == hj.PREDICT:
            phase, budget = hj.CORRECT, cfg.correct_steps
            scale = min(2.0 * scale, 1.0)  # accepted at the Correct phase's first step
            exponent = max(exponent - _phases.ACCEPT_FORGIVES, 0)
        elif may_predict(step) and consecutive < cfg.max_consecutive_predicts:
            h = min(max(int(cfg.max_horizon * scale), cfg.min_horizon), cfg.max_horizon)
            phase, budget, consecutive = hj.PREDICT, h, consecutive + 1
        else:  # a Full phase follows; backed off if the gate closed at a Full phase's end
            declined = phase == hj.FULL
            exponent = min(exponent + declined, _phases.MAX_BACKOFF)
            budget = cfg.full_steps * (2**exponent if declined else 1)
            phase, consecutive = hj.FULL, 0
    return phases


def run_phases(tx, n):
    params = quadratic_params()
    state = tx.init(params)
    step = hj.make_hybrid_step(quadratic_loss, tx)
    out = []
    for batch in quadratic_batches(n):
        params, state, m = step(params, state, batch)
        out.append(m)
    return out, state


ONE_PREDICT_A_TIME = {"max_consecutive_predicts": 1, "correct_steps": 1}
FIXED_HORIZON = {"max_horizon": 7, "min_horizon": 7, "full_steps": 5}


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"warmup_steps": 0},  # the same program (the warmup is the initial state's)
        ONE_PREDICT_A_TIME | FIXED_HORIZON,  # both in one program
        pytest.param(ONE_PREDICT_A_TIME, marks=pytest.mark.slow),
        pytest.param(FIXED_HORIZON, marks=pytest.mark.slow),
    ],
)
def test_phase_sequence_matches_documented_schedule(changes):
    cfg = fast_config(**changes, **SAFETY_OFF)
    metrics, _ = run_phases(hj.predictive(optax.sgd(0.01), cfg), 80)
    got = [int(m["phase"]) for m in metrics]
    assert got == documented_schedule(cfg, 80)
    assert [bool(m["used_gradient"]) for m in metrics] == [p != hj.PREDICT for p in got]
    assert int(metrics[-1]["backward_passes"]) == sum(p != hj.PREDICT for p in got)
    assert int(metrics[-1]["predicted_steps"]) == sum(p == hj.PREDICT for p in got)
    assert [int(m["step"]) for m in metrics] == list(range(80))


def gated_predictor(open_from_step, closed_from_step=2**30):
    """Confident only once a real step at or after ``open_from_step``, and before
    ``closed_from_step``, was observed."""

    def init(spec):
        return jnp.zeros((), jnp.int32)

    def observe(state, obs):
        return obs.step

    def predict(state, ctx):
        coefs = jnp.zeros((2, 2), jnp.float32).at[:, 0].set(1.0)
        conf = ((state >= open_from_step) & (state < closed_from_step)).astype(jnp.float32)
        return hj.Prediction(coefs, jnp.float32(0), conf), state

    return hj.Predictor("gated", init, observe, predict)


@pytest.mark.parametrize("open_from, closed_from, n", [(20, 2**30, 60), (16, 60, 120)])
def test_predict_phases_wait_for_confidence(open_from, closed_from, n):
    """Full phases that end with the gate closed back off (3, 6, 12 steps); accepted
    phases take the back-off down again, and a Full phase after a Correct phase is
    ``full_steps`` long whatever the back-off (the second case: one after two accepted
    phases, with the exponent still 1)."""
    cfg = fast_config(confidence_threshold=0.5, **SAFETY_OFF)
    tx = hj.predictive(optax.sgd(0.01), cfg, predictor=gated_predictor(open_from, closed_from))
    metrics, _ = run_phases(tx, n)
    got = [int(m["phase"]) for m in metrics]
    # the decision at the end of a phase reads the confidence of the real step before
    open_ = lambda step: open_from <= step - 1 < closed_from
    assert got == documented_schedule(cfg, n, may_predict=open_)
    first = got.index(hj.PREDICT)
    assert first > open_from and got[first - 12 : first] == [hj.FULL] * 12  # backed off
    after = got[first:]
    assert hj.CORRECT in after and [hj.CORRECT, hj.FULL, hj.FULL, hj.FULL, hj.PREDICT] in [
        after[i : i + 5] for i in range(len(after) - 5)
    ]


def test_confidence_horizon_policy_scales_with_confidence():
    cfg = fast_config(horizon_policy="confidence", confidence_threshold=0.5, min_horizon=1)
    got = [int(hj._phases.horizon(cfg, jnp.float32(c))) for c in (0.4, 0.5, 0.75, 0.9, 1.0)]
    assert got == [1, 1, 3, 3, 4]


def test_force_full_interrupts_a_predict_phase():
    cfg = fast_config()
    tx = hj.predictive(optax.adam(1e-2), cfg)  # the fast tests' common step: compiled once
    step, params, state, batches = quadratic_run_until_predict(tx, 40)
    state = hj.force_full(state, 5)
    phases = []
    for _ in range(5):
        params, state, m = step(params, state, next(batches))
        phases.append(int(m["phase"]))
    assert phases == [hj.FULL] * 5
    with pytest.raises(ValueError, match="n must be >= 1"):
        hj.force_full(state, 0)
