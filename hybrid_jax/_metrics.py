"""The metrics every step returns: names, meanings, and how they are read from the state.

=====================  =======  ==============================================================
name                   dtype    meaning
=====================  =======  ==============================================================
step                   int32    index of the step just taken (0-based; real and predicted)
phase                  int32    phase the step ran in: 0 warmup, 1 full, 2 predict, 3 correct
used_gradient          bool     whether the step ran a backward pass (a real step)
loss                   float32  loss at the parameters the step started from; NaN on a
                                predicted step that ran no forward pass (``monitor_every``)
predicted_loss         float32  the predictor's loss for the same parameters (on a real step:
                                its one-step prediction from the previous real step); NaN
                                where nothing could be predicted
confidence             float32  the predictor's confidence after the last real step, in [0, 1]
horizon                int32    length of the current Predict phase, or of the next one
verified               bool     a Predict phase was checked against real losses at this step
                                (neutral, False, until verification exists)
rolled_back            bool     the parameters were rolled back at this step (neutral, False)
divergence_level       int32    0 none, 1 caution, 2 warning, 3 critical (neutral, 0)
backward_passes        int32    backward passes so far
forward_passes         int32    forward passes so far
predicted_steps        int32    predicted steps so far
update_norm            float32  global norm of the update the step applied
accuracy               float32  running realised cosine of the one-step predictions
nonfinite_predictions  int32    predicted steps in which a non-finite value was held back
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
        "verified": jnp.asarray(False),
        "rolled_back": jnp.asarray(False),
        "divergence_level": jnp.asarray(0, jnp.int32),
        "backward_passes": c.backward_passes,
        "forward_passes": c.forward_passes,
        "predicted_steps": c.predicted_steps,
        "update_norm": last.update_norm,
        "accuracy": state.stats.accuracy,
        "nonfinite_predictions": c.nonfinite_predictions,
    }
    assert tuple(out) == METRIC_NAMES
    return out
