"""A divergence monitor kept on device.

Every step is observed once: a real step by ``observe_real`` (its loss, gradient norm
and, if there was one, the loss the predictor expected), a predicted step by
``observe_predicted`` (whether the predicted delta was finite, and the loss if it was
measured). Each observation returns a ``Verdict``:

==========  =====  ==============================================================
level       value  action
==========  =====  ==============================================================
none        0      nothing
caution     1      ``shrink_horizon``
warning     2      ``force_real`` (and ``shrink_horizon``)
critical    3      ``rollback`` (and ``force_real``, ``shrink_horizon``)
==========  =====  ==============================================================

The level is the highest of the events raised at that step:

- ``nonfinite_loss``, ``nonfinite_grad``, ``nonfinite_prediction``: critical, always
  (also during warmup);
- ``loss_spike``: ``z = (loss - mean) / max(std, noise_floor * |mean|)`` against the
  running EMA mean and std of real-step losses; caution, warning or critical at
  ``loss_z_caution``, ``loss_z_warning``, ``loss_z_critical``. Only a rise counts: a loss
  decrease is never an alarm;
- ``grad_explosion``: gradient norm ``>= grad_explode`` times the baseline (the
  exponential of an EMA of log gradient norms over real steps): warning;
- ``grad_vanishing``: gradient norm ``<= grad_vanish`` times the baseline: caution;
- ``prediction_error``: ``|loss - predicted| / |loss| >= pred_error_caution``: caution,
  ``>= pred_error_warning``: warning (only when both are finite, after ``warmup``, and
  when the miss is larger than ``loss_z_caution`` noise scales: minibatch noise is no
  prediction error);
- ``oscillation``: the last ``oscillation_window`` real-step loss changes alternated in
  sign, each larger than ``oscillation_amplitude`` times the noise scale above: caution;
- ``escalation``: ``escalate_after`` consecutive steps at warning or above raise that
  step's level by one (capped at critical); the run counter then starts again.

Loss spikes and gradient ratios raise nothing until ``warmup`` real steps have been
observed. Only real steps with a finite loss and gradient norm move the statistics;
predicted steps never do.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .config import MonitorSettings

NONE, CAUTION, WARNING, CRITICAL = 0, 1, 2, 3
LEVEL_NAMES = ("none", "caution", "warning", "critical")

(
    NONFINITE_LOSS,
    NONFINITE_GRAD,
    NONFINITE_PREDICTION,
    LOSS_SPIKE,
    GRAD_EXPLOSION,
    GRAD_VANISHING,
    PREDICTION_ERROR,
    OSCILLATION,
    ESCALATION,
) = range(9)
EVENT_NAMES = (
    "nonfinite_loss",
    "nonfinite_grad",
    "nonfinite_prediction",
    "loss_spike",
    "grad_explosion",
    "grad_vanishing",
    "prediction_error",
    "oscillation",
    "escalation",
)
N_EVENTS = len(EVENT_NAMES)


class MonitorState(NamedTuple):
    """Running statistics (float32/int32 scalars unless noted)."""

    loss_mean: jax.Array  # EMA of real-step losses
    loss_var: jax.Array  # EMA variance of real-step losses
    last_loss: jax.Array  # the last real-step loss
    last_change: jax.Array  # the last real-step loss change
    alternations: jax.Array  # int32: consecutive large alternating loss changes
    grad_log_mean: jax.Array  # EMA of log gradient norms (real steps): the baseline
    warn_run: jax.Array  # int32: consecutive steps at warning or above
    level: jax.Array  # int32: the level of the last verdict
    events: jax.Array  # (N_EVENTS,) int32: events raised so far, per kind
    max_level: jax.Array  # int32: the highest level so far
    n_real: jax.Array  # int32: real steps that moved the statistics


class Verdict(NamedTuple):
    """What one observation concluded; see the module docstring for the mapping."""

    level: jax.Array  # int32: 0 none, 1 caution, 2 warning, 3 critical
    events: jax.Array  # (N_EVENTS,) bool: events raised at this step
    force_real: jax.Array  # bool: level >= warning
    shrink_horizon: jax.Array  # bool: level >= caution
    rollback: jax.Array  # bool: level == critical


def init() -> MonitorState:
    """A monitor that has observed nothing."""
    f32 = lambda: jnp.zeros((), jnp.float32)
    i32 = lambda: jnp.zeros((), jnp.int32)
    return MonitorState(
        loss_mean=f32(),
        loss_var=f32(),
        last_loss=f32(),
        last_change=f32(),
        alternations=i32(),
        grad_log_mean=f32(),
        warn_run=i32(),
        level=i32(),
        events=jnp.zeros((N_EVENTS,), jnp.int32),
        max_level=i32(),
        n_real=i32(),
    )


def _noise_scale(state: MonitorState, s: MonitorSettings) -> jax.Array:
    """``max(std, noise_floor * |mean|)`` of the real-step losses (> 0)."""
    std = jnp.sqrt(jnp.maximum(state.loss_var, 0.0))
    floor = s.noise_floor * jnp.abs(state.loss_mean)
    return jnp.maximum(jnp.maximum(std, floor), jnp.finfo(jnp.float32).tiny)


def _grade(x: jax.Array, *thresholds: float) -> jax.Array:
    """How many of the increasing ``thresholds`` ``x`` reaches (int32)."""
    return sum((x >= t).astype(jnp.int32) for t in thresholds)


def _loss_checks(
    state: MonitorState, s: MonitorSettings, loss: jax.Array, predicted: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(spike, spike_level, error, error_level)`` of a finite-or-not measured loss."""
    finite = jnp.isfinite(loss)
    z = (loss - state.loss_mean) / _noise_scale(state, s)
    armed = finite & (state.n_real >= s.warmup)
    spike_level = jnp.where(
        armed, _grade(z, s.loss_z_caution, s.loss_z_warning, s.loss_z_critical), 0
    )
    miss = jnp.abs(loss - predicted)
    rel = miss / jnp.maximum(jnp.abs(loss), jnp.finfo(jnp.float32).tiny)
    # an error within the loss's own noise (a caution-sized z-score) is no error
    beyond_noise = miss > s.loss_z_caution * _noise_scale(state, s)
    both = finite & jnp.isfinite(predicted) & beyond_noise & armed
    error_level = jnp.where(both, _grade(rel, s.pred_error_caution, s.pred_error_warning), 0)
    return spike_level > 0, spike_level, error_level > 0, error_level


def _conclude(
    state: MonitorState, s: MonitorSettings, raised: jax.Array, level: jax.Array
) -> tuple[MonitorState, Verdict]:
    """Escalates, counts the events and fills the verdict (``raised`` lacks escalation)."""
    level = level.astype(jnp.int32)
    run = jnp.where(level >= WARNING, state.warn_run + 1, 0)
    escalate = run >= s.escalate_after
    level = jnp.where(escalate, jnp.minimum(level + 1, CRITICAL), level).astype(jnp.int32)
    run = jnp.where(escalate, 0, run).astype(jnp.int32)
    raised = raised.at[ESCALATION].set(escalate)
    state = state._replace(
        warn_run=run,
        level=level,
        events=state.events + raised.astype(jnp.int32),
        max_level=jnp.maximum(state.max_level, level),
    )
    verdict = Verdict(
        level=level,
        events=raised,
        force_real=level >= WARNING,
        shrink_horizon=level >= CAUTION,
        rollback=level >= CRITICAL,
    )
    return state, verdict


def calm() -> Verdict:
    """The verdict of a monitor that is off: nothing raised."""
    f = jnp.zeros((), bool)
    return Verdict(jnp.zeros((), jnp.int32), jnp.zeros((N_EVENTS,), bool), f, f, f)


def observe_real(
    state: MonitorState,
    settings: MonitorSettings | None,
    *,
    loss: jax.Array | float,
    grad_norm: jax.Array | float,
    predicted_loss: jax.Array | float,
) -> tuple[MonitorState, Verdict]:
    """Observes a real step.

    The checks use the statistics from before this step; then, if the loss and the
    gradient norm are both finite, the loss mean/variance, the oscillation statistics
    and the gradient baseline take this step in (after ``warmup``, the deviation a step
    feeds in is clipped to ``loss_z_critical`` noise scales for the loss and to
    ``[grad_vanish, grad_explode]`` for the gradient, so that one outlier cannot blind
    the monitor). A non-finite loss or gradient norm changes no statistic.

    Args:
      state: the monitor.
      settings: the thresholds.
      loss: the loss measured at this step.
      grad_norm: the global norm of this step's gradients.
      predicted_loss: the loss the predictor expected for this step; NaN if none.

    Returns:
      ``(state, verdict)``.
    """
    if settings is None:
        return state, calm()
    s = settings
    loss = jnp.asarray(loss, jnp.float32)
    g = jnp.asarray(grad_norm, jnp.float32)
    predicted = jnp.asarray(predicted_loss, jnp.float32)
    loss_ok, grad_ok = jnp.isfinite(loss), jnp.isfinite(g)
    valid = loss_ok & grad_ok
    ready = state.n_real >= s.warmup
    spike, spike_level, error, error_level = _loss_checks(state, s, loss, predicted)

    log_g = jnp.log(jnp.maximum(jnp.where(grad_ok, g, 1.0), jnp.finfo(jnp.float32).tiny))
    log_ratio = log_g - state.grad_log_mean
    lo, hi = jnp.log(jnp.float32(s.grad_vanish)), jnp.log(jnp.float32(s.grad_explode))
    explode = ready & grad_ok & (log_ratio >= hi)
    vanish = ready & grad_ok & (log_ratio <= lo)

    change, alternations, oscillation = _oscillation(state, s, loss, loss_ok, valid, ready)
    state = _take_in(state, s, loss, log_ratio, change, alternations, valid=valid, ready=ready)

    raised = jnp.zeros((N_EVENTS,), bool)
    raised = raised.at[NONFINITE_LOSS].set(~loss_ok)
    raised = raised.at[NONFINITE_GRAD].set(~grad_ok)
    raised = raised.at[LOSS_SPIKE].set(spike)
    raised = raised.at[GRAD_EXPLOSION].set(explode)
    raised = raised.at[GRAD_VANISHING].set(vanish)
    raised = raised.at[PREDICTION_ERROR].set(error)
    raised = raised.at[OSCILLATION].set(oscillation)
    level = jnp.max(
        jnp.stack(
            [
                jnp.where(valid, 0, CRITICAL),
                spike_level,
                jnp.where(explode, WARNING, 0),
                jnp.where(vanish | oscillation, CAUTION, 0),
                error_level,
            ]
        )
    )
    return _conclude(state, s, raised, level)


def _oscillation(state: MonitorState, s: MonitorSettings, loss, loss_ok, valid, ready):
    """The loss change, the run of alternating large changes, and whether it is long
    enough to be an oscillation."""
    scale = _noise_scale(state, s)
    change = jnp.where((state.n_real == 0) | ~loss_ok, 0.0, loss - state.last_loss)
    big = s.oscillation_amplitude * scale
    alternating = (change * state.last_change < 0) & (jnp.abs(change) > big)
    alternating = alternating & (jnp.abs(state.last_change) > big)
    alternations = jnp.where(alternating, state.alternations + 1, 0)
    alternations = jnp.where(valid, alternations, state.alternations).astype(jnp.int32)
    return change, alternations, valid & ready & (alternations >= s.oscillation_window)


def _take_in(
    state: MonitorState, s: MonitorSettings, loss, log_ratio, change, alternations, *, valid, ready
) -> MonitorState:
    """The statistics with a valid real step taken in: plain running averages until
    ``1 / (1 - decay)`` observations, EMAs after (no start-up bias); after ``warmup`` a
    step's deviation is clipped, so that one outlier cannot blind the monitor."""
    n = state.n_real.astype(jnp.float32)
    d = jnp.minimum(s.ema_decay, n / (n + 1.0))
    dv = jnp.minimum(s.var_decay, n / (n + 1.0))
    limit = s.loss_z_critical * _noise_scale(state, s)
    dev = loss - state.loss_mean
    dev = jnp.where(ready, jnp.clip(dev, -limit, limit), dev)
    lo, hi = jnp.log(jnp.float32(s.grad_vanish)), jnp.log(jnp.float32(s.grad_explode))
    gdev = jnp.where(ready, jnp.clip(log_ratio, lo, hi), log_ratio)
    keep = lambda new, old: jnp.where(valid, new, old).astype(old.dtype)
    return state._replace(
        loss_mean=keep(state.loss_mean + (1.0 - d) * dev, state.loss_mean),
        loss_var=keep(dv * (state.loss_var + (1.0 - dv) * jnp.square(dev)), state.loss_var),
        last_loss=keep(loss, state.last_loss),
        last_change=keep(change, state.last_change),
        alternations=alternations,
        grad_log_mean=keep(state.grad_log_mean + (1.0 - d) * gdev, state.grad_log_mean),
        n_real=state.n_real + valid.astype(jnp.int32),
    )


def observe_predicted(
    state: MonitorState,
    settings: MonitorSettings | None,
    *,
    delta_finite: jax.Array | bool,
    loss: jax.Array | float,
    predicted_loss: jax.Array | float,
) -> tuple[MonitorState, Verdict]:
    """Observes a predicted step; the real-step statistics are left as they are.

    Args:
      state: the monitor.
      settings: the thresholds.
      delta_finite: whether every element of the predicted update was finite (if not,
        ``nonfinite_prediction``: critical).
      loss: the loss measured after the predicted step, or NaN if it was not measured
        (so a measured NaN cannot be told apart; an infinite loss is ``nonfinite_loss``).
        A measured loss is checked for a spike against the real-step statistics.
      predicted_loss: the loss the predictor expected; NaN if none.

    Returns:
      ``(state, verdict)``.
    """
    if settings is None:
        return state, calm()
    s = settings
    loss = jnp.asarray(loss, jnp.float32)
    predicted = jnp.asarray(predicted_loss, jnp.float32)
    bad_delta = ~jnp.asarray(delta_finite, bool)
    bad_loss = jnp.isinf(loss)
    spike, spike_level, error, error_level = _loss_checks(state, s, loss, predicted)
    raised = jnp.zeros((N_EVENTS,), bool)
    raised = raised.at[NONFINITE_LOSS].set(bad_loss)
    raised = raised.at[NONFINITE_PREDICTION].set(bad_delta)
    raised = raised.at[LOSS_SPIKE].set(spike)
    raised = raised.at[PREDICTION_ERROR].set(error)
    level = jnp.where(bad_delta | bad_loss, CRITICAL, jnp.maximum(spike_level, error_level))
    return _conclude(state, s, raised, level)
