"""The phase machine: Warmup -> Full -> (Predict -> Correct) x n -> Full -> ...

Pure functions on int32 device scalars, so that the phase is decided on device.

**The one rule.** The phase after a step is a function of the state the step started
from, never of what the step measures. What a step measures that should change the
schedule (a non-finite loss, a rollback, a monitor warning) is recorded in
``Pending`` and acts on the step after it. So the kind of step ``t + 2`` is known as
soon as step ``t`` has finished: ``make_dispatched_step`` picks its programs a step
ahead without ever guessing wrong, and it takes exactly the steps ``make_hybrid_step``
takes.

**Inside a Full phase nothing measured changes the course.** A forced Full phase (a
monitor warning, a rollback) asked for inside a Full or Warmup phase waits for that
phase's end (``deferred``): the phase runs its budget, and the backed-off Full phase
follows it. So the kinds of every step up to a Full phase's end are known when it
starts (``hybrid_jax._kinds.kinds_ahead``), and the host need not read the kind of
every step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .config import HybridConfig

WARMUP, FULL, PREDICT, CORRECT = 0, 1, 2, 3
PHASE_NAMES = ("warmup", "full", "predict", "correct")


class Phase(NamedTuple):
    """Where the machine is (all int32 scalars)."""

    id: jax.Array  # WARMUP, FULL, PREDICT or CORRECT
    step: jax.Array  # steps already taken in this phase
    budget: jax.Array  # length of this phase
    consecutive: jax.Array  # Predict phases since the last Full phase
    rejected: jax.Array = 0  # the back-off's exponent (``backed_off``)


class Pending(NamedTuple):
    """What the last step asks of the next one (bool scalars)."""

    verify: jax.Array  # the next real step verifies the Predict phase that ended
    veto: jax.Array  # the next step does not predict (a predicted one applies nothing)
    force_full: jax.Array  # a monitor warning or a rollback: a Full phase follows (``deferred``)


def _i32(x: int | jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.int32)


# What an accepted Predict phase takes off the back-off's exponent (rejected phases and
# Full phases that ended with the confidence too low, at most MAX_BACKOFF): one, so that
# a predictor accepted now and then but mostly rejected stays backed off. (A large
# value: an accepted phase resets the back-off.)
ACCEPT_FORGIVES = 1
MAX_BACKOFF = 5  # a backed-off Full phase is at most 2**5 = 32 times full_steps long


def make(phase_id: int | jax.Array, budget: int | jax.Array, consecutive=0, rejected=0) -> Phase:
    """A phase starting now (distinct buffers, so that a state can be donated)."""
    return Phase(
        id=jnp.full((), phase_id, jnp.int32),
        step=jnp.zeros((), jnp.int32),
        budget=jnp.maximum(_i32(budget), 1),
        consecutive=jnp.asarray(consecutive, jnp.int32) + jnp.zeros((), jnp.int32),
        rejected=jnp.asarray(rejected, jnp.int32) + jnp.zeros((), jnp.int32),
    )


def init(cfg: HybridConfig) -> Phase:
    """The first phase: Warmup, or Full when ``warmup_steps == 0``."""
    if cfg.warmup_steps > 0:
        return make(WARMUP, cfg.warmup_steps)
    return make(FULL, cfg.full_steps)


def init_pending() -> Pending:
    return Pending(*(jnp.zeros((), bool) for _ in Pending._fields))


def full_phase(n: jax.Array | int) -> Phase:
    """A Full phase of ``n`` real steps (at least 1), starting now."""
    return make(FULL, n)


def horizon(cfg: HybridConfig, confidence: jax.Array) -> jax.Array:
    """Length of a Predict phase that would start now, before the monitor's scale."""
    if cfg.horizon_policy == "fixed":
        return jnp.asarray(cfg.max_horizon, jnp.int32)
    span = max(1.0 - cfg.confidence_threshold, 1e-6)
    frac = jnp.clip((confidence - cfg.confidence_threshold) / span, 0.0, 1.0)
    h = cfg.min_horizon + jnp.round(frac * (cfg.max_horizon - cfg.min_horizon))
    return h.astype(jnp.int32)


def advance(
    ph: Phase,
    cfg: HybridConfig,
    can_predict: jax.Array,
    next_horizon: jax.Array,
    declinable: jax.Array | bool = True,
) -> Phase:
    """The phase after one more ordinary step. A Full phase that ends with no Predict
    phase starting, where only the confidence kept one from starting (``declinable``),
    is followed by a backed-off one: the back-off's exponent grows by one
    (``backed_off``), so that a predictor that is rarely confident enough costs, once
    backed off, little more than the wrapped optimizer (``quiet``).

    Args:
      ph: the phase the step ran in.
      cfg: the config.
      can_predict: bool, whether a Predict phase may start after this step.
      next_horizon: int32, the length a Predict phase starting now would get.
      declinable: bool, nothing but the confidence can close the gate after this step
        (no verification or veto pending).
    """
    step = ph.step + 1
    done = step >= ph.budget
    may_predict = can_predict & (ph.consecutive < cfg.max_consecutive_predicts)
    to_predict = ((ph.id == FULL) | (ph.id == CORRECT)) & may_predict
    nxt = jnp.where(ph.id == PREDICT, CORRECT, jnp.where(to_predict, PREDICT, FULL))
    budget = jnp.select(
        [nxt == PREDICT, nxt == CORRECT],
        [_i32(next_horizon), _i32(cfg.correct_steps)],
        _i32(cfg.full_steps),
    )
    consecutive = jnp.where(
        nxt == PREDICT, ph.consecutive + 1, jnp.where(nxt == FULL, 0, ph.consecutive)
    )
    # a Full phase that ends with the gate closed backs off like a rejected phase
    declined = done & (ph.id == FULL) & (nxt == FULL) & jnp.asarray(declinable)
    rejected = grown(ph.rejected, declined)
    budget = jnp.where(declined, cfg.full_steps * _backoff_factor(rejected), budget)
    return Phase(
        id=jnp.where(done, nxt, ph.id).astype(jnp.int32),
        step=jnp.where(done, 0, step).astype(jnp.int32),
        budget=jnp.maximum(jnp.where(done, budget, ph.budget), 1).astype(jnp.int32),
        consecutive=jnp.where(done, consecutive, ph.consecutive).astype(jnp.int32),
        rejected=rejected,
    )


def grown(exponent: jax.Array, by: jax.Array) -> jax.Array:
    """The back-off's exponent grown by ``by`` (bool or int32), at most MAX_BACKOFF, so
    that each accepted phase shortens the next backed-off Full phase again."""
    total = jnp.asarray(exponent, jnp.int32) + jnp.asarray(by, jnp.int32)
    return jnp.minimum(total, MAX_BACKOFF).astype(jnp.int32)


def _backoff_factor(exponent: jax.Array) -> jax.Array:
    """2 to the back-off's exponent, at most 2**MAX_BACKOFF."""
    return jnp.left_shift(1, jnp.minimum(jnp.asarray(exponent, jnp.int32), MAX_BACKOFF))


def gate(cfg: HybridConfig, confidence: jax.Array, pending: Pending) -> jax.Array:
    """Whether a Predict phase may start after the coming step: the last real step's
    confidence passes the threshold, the step before asked for nothing else, and no
    Predict phase awaits its verification."""
    ok = jnp.isfinite(confidence) & (confidence >= cfg.confidence_threshold)
    return ok & ~pending.veto & ~pending.force_full & ~pending.verify


def backed_off(cfg: HybridConfig, ph: Phase) -> Phase:
    """The Full phase forced after a rollback or a monitor warning: ``full_steps`` times
    2 to the back-off's exponent ``ph.rejected`` (at most 2**MAX_BACKOFF): each rejected
    phase and each Full phase that ends with the gate closed (``advance``) adds one,
    each accepted phase takes ``ACCEPT_FORGIVES`` off, so that a predictor that does not
    pay, or is not confident enough to try, is tried less and less often."""
    return make(FULL, cfg.full_steps * _backoff_factor(ph.rejected), 0, ph.rejected)


def deferred(ph: Phase) -> jax.Array:
    """Whether a forced Full phase, asked for by the step before a step in ``ph``, waits:
    asked for inside a Full or Warmup phase (so not at its first step: the request was
    made before it began), before its last step, it starts when that phase ends (the
    request stays in ``Pending.force_full`` until then)."""
    steady = (ph.id == FULL) | (ph.id == WARMUP)
    return steady & (ph.step > 0) & (ph.step + 1 < ph.budget)


def after_real(
    cfg: HybridConfig, ph: Phase, pending: Pending, can_predict: jax.Array, next_horizon
) -> Phase:
    """The phase after a real step that started in ``ph`` with ``pending``: a forced
    Full phase starts now, unless it is ``deferred`` (it backs off by the exponent as it
    is: the gate closed for the warning or the rejection, not for the confidence)."""
    declinable = ~pending.verify & ~pending.veto
    regular = advance(ph, cfg, can_predict, next_horizon, declinable)
    return _choose(pending.force_full & ~deferred(ph), backed_off(cfg, ph), regular)


def after_predicted(cfg: HybridConfig, ph: Phase, pending: Pending) -> Phase:
    """The phase after a predicted step. A veto ends the Predict phase (a Correct phase
    follows); a forced Full phase replaces it."""
    regular = advance(ph, cfg, jnp.asarray(False), ph.budget)
    ended = make(CORRECT, cfg.correct_steps, ph.consecutive, ph.rejected)
    out = _choose(pending.veto, ended, regular)
    return _choose(pending.force_full, backed_off(cfg, ph), out)


def may_end_into_predict(cfg: HybridConfig, ph: Phase) -> jax.Array:
    """Whether a step in ``ph`` ends a Full or Correct phase after which a Predict phase
    may start (the confidence aside)."""
    ending = ((ph.id == FULL) | (ph.id == CORRECT)) & (ph.step + 1 >= ph.budget)
    return ending & (ph.consecutive < cfg.max_consecutive_predicts)


def observation_due(
    cfg: HybridConfig, ph: Phase, unobserved: jax.Array, pair_open: jax.Array
) -> jax.Array:
    """Whether a real (not verifying) step taken now in phase ``ph`` is observed.

    With ``observe_every = k > 2`` observations come in pairs of consecutive real
    steps, so that one-step changes can be learnt: a step is observed when ``k - 2``
    real steps have gone unobserved, unless it is ``quiet``; when it completes a pair
    (``pair_open``); and when a Predict phase may start after it (only observed steps
    start one).
    """
    if cfg.observe_every <= 2:
        return jnp.asarray(True)
    due = (unobserved + 2 >= cfg.observe_every) & ~quiet(cfg, ph)
    return due | pair_open | may_end_into_predict(cfg, ph)


def quiet(cfg: HybridConfig, ph: Phase) -> jax.Array:
    """Whether a step of ``ph`` is too far from the phase's end for observing it to
    matter: all but the last ``full_steps`` steps of a longer Full or Warmup phase (a
    backed-off one, the warmup). What decides the next Predict phase (the confidence,
    the basis, the predictor's state) is learnt from the observations just before it,
    as in a Full phase of ``full_steps``; with ``observe_every > 2`` a quiet step is the
    optimizer's step with the safety checks, so a predictor that does not pay, once
    backed off, costs little more than the wrapped optimizer."""
    steady = (ph.id == FULL) | (ph.id == WARMUP)
    return steady & (ph.budget - ph.step > cfg.full_steps)


def _choose(cond: jax.Array, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


class Schedule(NamedTuple):
    """The part of the state after a step that decides the kind of the step after it."""

    phase: Phase
    verify: jax.Array  # bool: the next real step verifies
    snapshot_valid: jax.Array  # bool: a Predict phase awaits its verification


def schedule_after(
    cfg: HybridConfig,
    ph: Phase,
    pending: Pending,
    snapshot_valid: jax.Array,
    *,
    real: jax.Array | bool,
    verifying: jax.Array | bool,
    first: jax.Array | bool,
    may_predict: jax.Array | bool,
    next_horizon: jax.Array | int,
) -> Schedule:
    """The schedule after a step, from the state it started from (the one rule).

    Args:
      cfg: the config.
      ph, pending, snapshot_valid: the state's.
      real: the step is a real one (else predicted).
      verifying: the step verifies a Predict phase.
      first: the step is the first of a Predict phase.
      may_predict: a Predict phase may start after this real step (``gate``, and the
        step is observed).
      next_horizon: the length of a Predict phase starting after it.
    """
    real = jnp.asarray(real)
    idle = pending.veto | pending.force_full
    ph_real = after_real(cfg, ph, pending, jnp.asarray(may_predict), next_horizon)
    nxt = _choose(real, ph_real, after_predicted(cfg, ph, pending))
    valid = jnp.where(
        real,
        snapshot_valid & ~jnp.asarray(verifying),
        snapshot_valid | (jnp.asarray(first) & ~idle),
    )
    verify = jnp.where(real, pending.verify & ~jnp.asarray(verifying), (nxt.id != PREDICT) & valid)
    return Schedule(phase=nxt, verify=verify, snapshot_valid=valid)
