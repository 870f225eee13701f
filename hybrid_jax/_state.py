"""`HybridState` and its parts: pure pytrees of arrays, shapes and dtypes fixed by ``init``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from ._basis import Basis
from ._encoder import EncoderState

PyTree = Any


class Stats(NamedTuple):
    """Running statistics of real steps (float32 scalars)."""

    loss: jax.Array  # loss of the last real step (NaN until known)
    log_loss_trend: jax.Array  # EMA of the per-real-step change of log(loss)
    accuracy: jax.Array  # EMA of the realised one-step cosine of the predictor
    confidence: jax.Array  # the predictor's confidence after the last real step
    grad_norm: jax.Array
    update_norm: jax.Array
    cosine: jax.Array  # between the last two real updates
    fit_r2: jax.Array  # mean R^2 of the last fit of a real update onto the basis
    predicted_log_loss: jax.Array  # running prediction of log(loss) inside a Predict phase


class Counters(NamedTuple):
    """Event counters (int32 scalars)."""

    backward_passes: jax.Array
    forward_passes: jax.Array
    real_steps: jax.Array
    predicted_steps: jax.Array
    predict_phases: jax.Array
    nonfinite_predictions: jax.Array  # predicted steps in which a non-finite value was held back


class StepInfo(NamedTuple):
    """What the last step did; ``metrics`` reads it."""

    phase: jax.Array  # int32: the phase the step ran in
    used_gradient: jax.Array  # bool
    loss: jax.Array  # measured loss (NaN on a predicted step without a forward pass)
    predicted_loss: jax.Array  # the predictor's loss for this step (NaN on real steps)
    horizon: jax.Array  # int32: length of the current (or next) Predict phase
    update_norm: jax.Array  # global norm of the update applied


class HybridState(NamedTuple):
    """State of ``hj.predictive``: a pytree of arrays only.

    Attributes:
      inner: the wrapped optax optimizer's state (advances on real steps only).
      phase, phase_step, phase_budget, consecutive: the phase machine (int32).
      step: steps taken, real and predicted (int32).
      basis: parameter-shaped directions built from real updates.
      transport: (G, B, B) map from the frozen basis to the virtual basis of a Predict phase.
      encoder: running normalisation of the training-state features.
      dynamics: the predictor's state.
      stats: running statistics of real steps.
      counters: event counters.
      last: what the last step did.
    """

    inner: PyTree
    phase: jax.Array
    phase_step: jax.Array
    phase_budget: jax.Array
    consecutive: jax.Array
    step: jax.Array
    basis: Basis
    transport: jax.Array
    encoder: EncoderState
    dynamics: PyTree
    stats: Stats
    counters: Counters
    last: StepInfo
