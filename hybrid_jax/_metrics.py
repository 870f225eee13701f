"""The metrics every step returns: names, meanings, and how they are read from the state.

=====================  =======  ==============================================================
name                   dtype    meaning
=====================  =======  ==============================================================
step                   int32    index of the step just taken (0-based; real and predicted)
phase                  int32    phase the step ran in: 0 warmup, 1 full, 2 predict, 3 correct
used_gradient          bool     whether the step ran a backward pass (a real step)
loss                   float32  loss at the parameters the step started from; NaN on a
                                predicted step that ran no forward pass (``monitor_every``)
predicted_loss         float32  the predictor's loss level for the same parameters (the level
                                is an EMA of real-step losses; on a real step: the one-step
                                prediction made at the previous real step); NaN where
                                nothing could be predicted
confidence             float32  the predictor's confidence after the last real step, in [0, 1]
horizon                int32    length of the current Predict phase, or of the next one
verified               bool     a Predict phase was checked at this step: the loss at its
                                snapshot vs at the new parameters, on the same batch
rolled_back            bool     the parameters went back to the snapshot at this step
divergence_level       int32    the monitor's verdict: 0 none, 1 caution, 2 warning,
                                3 critical
backward_passes        int32    backward passes so far
forward_passes         int32    forward passes so far
predicted_steps        int32    predicted steps so far
update_norm            float32  global norm of the update the step applied
accuracy               float32  running realised cosine of the one-step predictions
nonfinite_predictions  int32    predicted steps in which a non-finite value was held back
rollbacks              int32    rollbacks so far
skipped_updates        int32    real steps with a non-finite loss or gradient, not applied
idle_steps             int32    predicted steps that applied nothing: the step before vetoed
                                them (a non-finite step, a rollback, a non-finite prediction
                                or a monitor warning; see ``hybrid_jax._phases``)
cost_rejections        int32    Predict phases so far that passed ``verify_tolerance``
                                but lowered the loss by less than ``predict_cost_ratio``
                                times what the real steps they replaced were expected
                                to (see ``HybridConfig``); those that lowered it at all
                                are kept, not rolled back
divergence_events      int32    monitor events so far (all kinds)
horizon_scale          float32  the monitor's shrink factor of the horizon, in (0, 1]
bandit_arm             int32    arm whose reward was learned at this step (-1: none)
reward                 float32  that reward: verified progress per unit of cost (NaN: none)
=====================  =======  ==============================================================
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._state import HybridState

METRIC_NAMES = (
    "step",
    "phase",
    "used_gradient",
    "loss",
    "predicted_loss",
    "confidence",
    "horizon",
    "verified",
    "rolled_back",
    "divergence_level",
    "backward_passes",
    "forward_passes",
    "predicted_steps",
    "update_norm",
    "accuracy",
    "nonfinite_predictions",
    "rollbacks",
    "skipped_updates",
    "idle_steps",
    "cost_rejections",
    "divergence_events",
    "horizon_scale",
    "bandit_arm",
    "reward",
)


def metrics(state: HybridState) -> dict[str, jax.Array]:
    """The metrics of the step that produced ``state`` (device scalars, no host sync).

    Args:
      state: the ``HybridState`` returned by a step or by ``tx.update``.

    Returns:
      A dict with the keys of ``METRIC_NAMES``; see this module's docstring.
    """
    last, c = state.last, state.counters
    out = {
        "step": state.step - 1,
        "phase": last.phase,
        "used_gradient": last.used_gradient,
        "loss": last.loss,
        "predicted_loss": last.predicted_loss,
        "confidence": state.stats.confidence,
        "horizon": last.horizon,
        "verified": last.verified,
        "rolled_back": last.rolled_back,
        "divergence_level": last.divergence_level,
        "backward_passes": c.backward_passes,
        "forward_passes": c.forward_passes,
        "predicted_steps": c.predicted_steps,
        "update_norm": last.update_norm,
        "accuracy": state.stats.accuracy,
        "nonfinite_predictions": c.nonfinite_predictions,
        "rollbacks": c.rollbacks,
        "skipped_updates": c.skipped_updates,
        "idle_steps": c.idle_steps,
        "cost_rejections": c.cost_rejections,
        "divergence_events": jnp.sum(state.monitor.events),
        "horizon_scale": state.horizon_scale,
        "bandit_arm": last.arm,
        "reward": last.reward,
    }
    assert tuple(out) == METRIC_NAMES
    return out
