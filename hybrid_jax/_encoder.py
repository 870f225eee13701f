"""The training-state encoder: a feature vector per real step, normalised online.

Raw features (``FEATURE_NAMES``): log loss, log-loss change, log gradient and update
norms, the log of their ratio (an effective learning rate), the cosine between
consecutive real updates, the R^2 of the last fit onto the basis, log norms of the
inner optimizer's first and second moments (0 where it has none), the phase (one-hot),
log(1 + steps since the previous real step), the position inside the phase, and the
basis coefficients of the last real update averaged over groups.

Each feature is normalised by a running mean and variance (a Welford average that
turns into an EMA after ``1 / (1 - decay)`` observations) and clipped to [-5, 5].
Non-finite raw values count as missing: they become 0 and leave the statistics alone.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._basis import sample_rows

PyTree = Any

BASE_FEATURES = (
    "log_loss",
    "log_loss_change",
    "log_grad_norm",
    "log_update_norm",
    "log_effective_lr",
    "update_cosine",
    "fit_r2",
    "log_first_moment_norm",
    "log_second_moment_norm",
    "phase_warmup",
    "phase_full",
    "phase_predict",
    "phase_correct",
    "log_gap",
    "phase_position",
)


def feature_names(basis_size: int) -> tuple[str, ...]:
    """Names of the features for a basis of ``basis_size`` directions."""
    return BASE_FEATURES + tuple(f"coef_{b}" for b in range(basis_size))


def n_features(basis_size: int) -> int:
    return len(BASE_FEATURES) + basis_size


class EncoderState(NamedTuple):
    """Running normalisation statistics (float32) and where the last observed real step was."""

    mean: jax.Array  # (F,)
    var: jax.Array  # (F,)
    count: jax.Array  # (F,) observations seen per feature
    last_real_step: jax.Array  # int32: step index of the last observed real step
    unobserved: jax.Array  # int32: real steps since then that were not observed
    streak: jax.Array  # int32: observed real steps in a row up to the last real step


def init(basis_size: int) -> EncoderState:
    f = n_features(basis_size)
    return EncoderState(
        jnp.zeros((f,), jnp.float32),
        jnp.ones((f,), jnp.float32),
        jnp.zeros((f,), jnp.float32),
        jnp.full((), -1, jnp.int32),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
    )


def streak_after_observing(state: EncoderState, step: jax.Array) -> jax.Array:
    """``streak`` once the real step at ``step`` is observed: one more when the step
    before it was an observed real step, else 1."""
    consecutive = (step - state.last_real_step == 1) & (state.streak > 0)
    return jnp.where(consecutive, state.streak + 1, 1).astype(jnp.int32)


def after_real_step(
    state: EncoderState, step: jax.Array, observed: jax.Array | bool
) -> EncoderState:
    """The encoder's step counters once the real step at ``step`` is taken."""
    observed = jnp.asarray(observed)
    return state._replace(
        last_real_step=jnp.where(observed, step, state.last_real_step).astype(jnp.int32),
        unobserved=jnp.where(observed, 0, state.unobserved + 1).astype(jnp.int32),
        streak=jnp.where(observed, streak_after_observing(state, step), 0).astype(jnp.int32),
    )


def pair_open(state: EncoderState, step: jax.Array) -> jax.Array:
    """Whether the real step at ``step`` would complete a pair of observed steps."""
    return (state.streak == 1) & (step - state.last_real_step == 1)


def moment_norms(inner_state: PyTree, stride: int = 1) -> tuple[jax.Array, jax.Array]:
    """Global norms of the leaves under fields named ``mu`` and ``nu`` (0 if absent);
    with ``stride > 1`` estimated from every ``stride``-th row (``_basis.sample_rows``)."""
    sums = {"mu": jnp.zeros((), jnp.float32), "nu": jnp.zeros((), jnp.float32)}
    for path, leaf in jax.tree_util.tree_flatten_with_path(inner_state)[0]:
        names = {getattr(k, "name", None) or getattr(k, "key", None) for k in path}
        for field in sums:
            if field in names and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                rows, factor = sample_rows(leaf, stride)
                sums[field] = sums[field] + factor * jnp.sum(jnp.square(rows.astype(jnp.float32)))
    return jnp.sqrt(sums["mu"]), jnp.sqrt(sums["nu"])


def _log(x: jax.Array) -> jax.Array:
    return jnp.log(jnp.maximum(x, 1e-30))


def raw_features(
    *,
    loss: jax.Array,
    log_loss_change: jax.Array,
    grad_norm: jax.Array,
    update_norm: jax.Array,
    cosine: jax.Array,
    fit_r2: jax.Array,
    moments: tuple[jax.Array, jax.Array],
    phase: jax.Array,
    gap: jax.Array,
    phase_position: jax.Array,
    mean_coefs: jax.Array,
) -> jax.Array:
    """The raw feature vector (float32, NaN where unknown)."""
    mu, nu = moments
    scalars = [
        jnp.where(loss > 0, _log(loss), jnp.nan),
        log_loss_change,
        _log(grad_norm),
        _log(update_norm),
        _log(update_norm) - _log(grad_norm),
        cosine,
        fit_r2,
        jnp.where(mu > 0, _log(mu), 0.0),
        jnp.where(nu > 0, _log(nu), 0.0),
        *(jnp.asarray(phase == p, jnp.float32) for p in range(4)),
        jnp.log1p(jnp.maximum(gap, 0).astype(jnp.float32)),
        phase_position,
    ]
    x = jnp.concatenate([jnp.stack([jnp.asarray(s, jnp.float32) for s in scalars]), mean_coefs])
    return x.astype(jnp.float32)


def normalise(state: EncoderState, raw: jax.Array, decay: float) -> tuple[EncoderState, jax.Array]:
    """Updates the running statistics with ``raw`` and returns the normalised features."""
    ok = jnp.isfinite(raw)
    x = jnp.where(ok, raw, 0.0)
    count = state.count + ok
    rate = jnp.where(ok, jnp.maximum(1.0 / jnp.maximum(count, 1.0), 1.0 - decay), 0.0)
    delta = x - state.mean
    mean = state.mean + rate * delta
    var = jnp.where(
        count <= 1, jnp.where(ok, 1.0, state.var), (1.0 - rate) * (state.var + rate * delta**2)
    )
    normed = jnp.where(ok, jnp.clip((x - mean) / jnp.sqrt(var + 1e-8), -5.0, 5.0), 0.0)
    return state._replace(mean=mean, var=var, count=count), normed
