"""The phase machine: Warmup -> Full -> (Predict -> Correct) x n -> Full -> ...

Pure functions on int32 device scalars, so that the phase is decided on device.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._config import HybridConfig

WARMUP, FULL, PREDICT, CORRECT = 0, 1, 2, 3
PHASE_NAMES = ("warmup", "full", "predict", "correct")


class Phase(NamedTuple):
    """Where the machine is (all int32 scalars)."""

    phase: jax.Array  # WARMUP, FULL, PREDICT or CORRECT
    phase_step: jax.Array  # steps already taken in this phase
    phase_budget: jax.Array  # length of this phase
    consecutive: jax.Array  # Predict phases since the last Full phase


def init(cfg: HybridConfig) -> Phase:
    """The first phase: Warmup, or Full when ``warmup_steps == 0``."""
    if cfg.warmup_steps > 0:
        phase, budget = WARMUP, cfg.warmup_steps
    else:
        phase, budget = FULL, cfg.full_steps
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    return Phase(i32(phase), i32(0), i32(budget), i32(0))


def horizon(cfg: HybridConfig, confidence: jax.Array) -> jax.Array:
    """Length of a Predict phase that would start now (int32)."""
    if cfg.horizon_policy == "fixed":
        return jnp.asarray(cfg.max_horizon, jnp.int32)
    span = max(1.0 - cfg.confidence_threshold, 1e-6)
    frac = jnp.clip((confidence - cfg.confidence_threshold) / span, 0.0, 1.0)
    h = cfg.min_horizon + jnp.round(frac * (cfg.max_horizon - cfg.min_horizon))
    return h.astype(jnp.int32)


def advance(ph: Phase, cfg: HybridConfig, can_predict: jax.Array, next_horizon: jax.Array) -> Phase:
    """The phase after one more step.

    Args:
      ph: the phase the step ran in.
      cfg: the config.
      can_predict: bool, whether a Predict phase may start (confidence and health).
      next_horizon: int32, the length a Predict phase starting now would get.

    Returns:
      The phase for the next step.
    """
    step = ph.phase_step + 1
    done = step >= ph.phase_budget
    may_predict = can_predict & (ph.consecutive < cfg.max_consecutive_predicts)
    to_predict = ((ph.phase == FULL) | (ph.phase == CORRECT)) & may_predict
    nxt = jnp.where(
        ph.phase == PREDICT,
        CORRECT,
        jnp.where(to_predict, PREDICT, FULL),
    ).astype(jnp.int32)
    budget = jnp.select(
        [nxt == PREDICT, nxt == CORRECT],
        [next_horizon, jnp.int32(cfg.correct_steps)],
        jnp.int32(cfg.full_steps),
    ).astype(jnp.int32)
    consecutive = jnp.where(
        nxt == PREDICT, ph.consecutive + 1, jnp.where(nxt == FULL, 0, ph.consecutive)
    ).astype(jnp.int32)
    return Phase(
        phase=jnp.where(done, nxt, ph.phase),
        phase_step=jnp.where(done, 0, step).astype(jnp.int32),
        phase_budget=jnp.where(done, budget, ph.phase_budget),
        consecutive=jnp.where(done, consecutive, ph.consecutive),
    )


def full_phase(n: jax.Array | int) -> Phase:
    """A Full phase of ``n`` real steps (at least 1), starting now."""
    return Phase(
        phase=jnp.full((), FULL, jnp.int32),
        phase_step=jnp.zeros((), jnp.int32),  # distinct buffers, so that they can be donated
        phase_budget=jnp.maximum(jnp.asarray(n, jnp.int32), 1),
        consecutive=jnp.zeros((), jnp.int32),
    )


def observation_due(
    cfg: HybridConfig,
    ph: Phase,
    unobserved: jax.Array,
    pair_open: jax.Array,
    pending_verify: jax.Array,
    confidence: jax.Array,
) -> jax.Array:
    """Whether a real step taken now in phase ``ph`` is observed (``cfg.observe_every``).

    Observations come in pairs of consecutive real steps, so that one-step changes can
    be learnt: a step is observed when ``observe_every - 2`` real steps have gone
    unobserved, when it completes a pair (``pair_open``: the step before it was
    observed, and the one before that was not), when it verifies a Predict phase, and
    when a Predict phase may start after it: the phase ends with it and ``confidence``
    (the last real step's) passes the threshold.
    """
    if cfg.observe_every <= 2:
        return jnp.asarray(True)
    ending = ((ph.phase == FULL) | (ph.phase == CORRECT)) & (ph.phase_step + 1 >= ph.phase_budget)
    ending = ending & (ph.consecutive < cfg.max_consecutive_predicts)
    may_start = ending & jnp.isfinite(confidence) & (confidence >= cfg.confidence_threshold)
    due = unobserved + 2 >= cfg.observe_every
    return due | pair_open | pending_verify | may_start
