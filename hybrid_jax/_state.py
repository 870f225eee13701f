"""`HybridState` and its parts: pure pytrees of arrays, shapes and dtypes fixed by ``init``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from ._bandit import BanditState
from ._basis import Basis
from ._encoder import EncoderState
from ._monitor import MonitorState
from ._phases import Pending, Phase
from ._residuals import Corrector, ResidualBuffer

PyTree = Any


class Stats(NamedTuple):
    """Running statistics of real steps (float32 scalars)."""

    loss: jax.Array  # loss of the last real step (NaN until known)
    loss_level: jax.Array  # EMA of real-step losses: the level predictions start from
    log_loss_trend: jax.Array  # EMA of the per-real-step change of log(loss_level)
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
    observed_steps: jax.Array  # real steps the hybrid observed (see ``observe_every``)
    predicted_steps: jax.Array
    predict_phases: jax.Array
    nonfinite_predictions: jax.Array  # predicted steps in which a non-finite value was held back
    verifications: jax.Array  # Predict phases checked against real losses
    rollbacks: jax.Array  # times the parameters went back to a snapshot
    skipped_updates: jax.Array  # real steps whose non-finite loss or gradient was not applied
    idle_steps: jax.Array  # predicted steps that applied nothing (vetoed by the step before)
    cost_rejections: jax.Array  # phases within verify_tolerance that did not pay (kept or not)


class StepInfo(NamedTuple):
    """What the last step did; ``metrics`` reads it."""

    phase: jax.Array  # int32: the phase the step ran in
    used_gradient: jax.Array  # bool
    loss: jax.Array  # measured loss (NaN on a predicted step without a forward pass)
    predicted_loss: jax.Array  # the predictor's loss for this step (NaN on real steps)
    horizon: jax.Array  # int32: length of the current (or next) Predict phase
    update_norm: jax.Array  # global norm of the update applied
    verified: jax.Array  # bool: a Predict phase was checked against real losses
    rolled_back: jax.Array  # bool: the parameters went back to the snapshot
    divergence_level: jax.Array  # int32: the monitor's verdict (0 none .. 3 critical)
    arm: jax.Array  # int32: bandit arm whose reward was learned at this step (-1: none)
    reward: jax.Array  # that reward (NaN: none)


class HybridState(NamedTuple):
    """State of ``hj.predictive``: a pytree of arrays only.

    Attributes:
      inner: the wrapped optax optimizer's state (advances on real steps only).
      phase: the phase machine (``Phase``: id, step, budget, consecutive).
      pending: what the last step asks of the next (``Pending``: verify, veto,
        force_full); see ``hybrid_jax._phases``.
      step: steps taken, real and predicted (int32).
      basis: parameter-shaped directions built from real updates.
      transport: (G, B, B) map from the frozen basis to the virtual basis of a Predict phase.
      encoder: running normalisation of the training-state features.
      dynamics: the predictor's state.
      stats: running statistics of real steps.
      counters: event counters.
      last: what the last step did.
      snapshot: the parameters at the start of the last Predict phase (for rollback).
      snapshot_valid: whether a Predict phase awaits its verification or outcome.
      horizon_scale: the monitor's shrink factor of the horizon, in (0, 1].
      residuals: prediction-vs-reality records.
      corrector: the learned affine correction of the predictor.
      monitor: the divergence monitor.
      bandit: the LinUCB posterior over horizons.
    """

    inner: PyTree
    phase: Phase
    pending: Pending
    step: jax.Array
    basis: Basis
    transport: jax.Array
    encoder: EncoderState
    dynamics: PyTree
    stats: Stats
    counters: Counters
    last: StepInfo
    snapshot: PyTree
    snapshot_valid: jax.Array
    horizon_scale: jax.Array
    residuals: ResidualBuffer
    corrector: Corrector
    monitor: MonitorState
    bandit: BanditState
