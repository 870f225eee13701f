"""Residuals of the predictor and the corrector that learns its systematic bias.

Every real step that directly follows another real step gives a record of the
predictor's one-step prediction against what happened: coefficients over the basis
and the change of log loss, with the features, the horizon index and the confidence.
Records go to a ring buffer (for inspection and calibration plots).

The corrector is an affine map per output, ``y ~ w0 * prediction + w1``, fitted by
recursive least squares with forgetting (one 2x2 inverse covariance per coefficient and
one for the loss change). It starts at the identity (``w = [1, 0]``), so it changes
nothing until the residuals show a bias, and it learns scale errors (a predictor that
overshoots by a factor 2 is scaled back by 1/2) and offsets. Predictions are corrected
before they are applied.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ResidualBuffer(NamedTuple):
    """Ring buffer of prediction-vs-reality records."""

    pred_coefs: jax.Array  # (N, G, B)
    true_coefs: jax.Array  # (N, G, B)
    pred_dlog: jax.Array  # (N,)
    true_dlog: jax.Array  # (N,)
    features: jax.Array  # (N, F)
    horizon: jax.Array  # (N,) int32: how many steps ahead the prediction was
    confidence: jax.Array  # (N,)
    head: jax.Array  # int32: newest slot
    count: jax.Array  # int32: records written


class Corrector(NamedTuple):
    """Per-output affine RLS: ``w`` (..., 2) and inverse covariances ``p`` (..., 2, 2)."""

    coef_w: jax.Array  # (G, B, 2)
    coef_p: jax.Array  # (G, B, 2, 2)
    dlog_w: jax.Array  # (2,)
    dlog_p: jax.Array  # (2, 2)
    updates: jax.Array  # int32


def init_buffer(size: int, n_groups: int, basis_size: int, n_features: int) -> ResidualBuffer:
    z = lambda *s: jnp.zeros(s, jnp.float32)
    return ResidualBuffer(
        z(size, n_groups, basis_size),
        z(size, n_groups, basis_size),
        z(size),
        z(size),
        z(size, n_features),
        jnp.zeros((size,), jnp.int32),
        z(size),
        jnp.full((), size - 1, jnp.int32),
        jnp.zeros((), jnp.int32),
    )


def record(
    buf: ResidualBuffer,
    *,
    pred_coefs: jax.Array,
    true_coefs: jax.Array,
    pred_dlog: jax.Array,
    true_dlog: jax.Array,
    features: jax.Array,
    horizon: jax.Array,
    confidence: jax.Array,
    keep: jax.Array,
) -> ResidualBuffer:
    """Writes one record when ``keep`` (a bool) is true."""
    head = jnp.mod(buf.head + 1, buf.pred_dlog.shape[0])
    new = ResidualBuffer(
        buf.pred_coefs.at[head].set(pred_coefs),
        buf.true_coefs.at[head].set(true_coefs),
        buf.pred_dlog.at[head].set(pred_dlog),
        buf.true_dlog.at[head].set(true_dlog),
        buf.features.at[head].set(features),
        buf.horizon.at[head].set(horizon),
        buf.confidence.at[head].set(confidence),
        head,
        buf.count + 1,
    )
    return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, buf)


def init_corrector(n_groups: int, basis_size: int, prior: float = 1.0) -> Corrector:
    """The identity correction with an RLS prior of strength ``1 / prior``."""
    w = jnp.asarray([1.0, 0.0], jnp.float32)
    p = jnp.eye(2, dtype=jnp.float32) * prior
    return Corrector(
        jnp.broadcast_to(w, (n_groups, basis_size, 2)),
        jnp.broadcast_to(p, (n_groups, basis_size, 2, 2)),
        w,
        p,
        jnp.zeros((), jnp.int32),
    )


def _rls(w: jax.Array, p: jax.Array, x: jax.Array, y: jax.Array, forget: float):
    """One RLS step for a batch of independent 2-input models (inputs ``x`` (..., 2))."""
    px = jnp.einsum("...ij,...j->...i", p, x)
    gain = px / (forget + jnp.sum(x * px, -1, keepdims=True))
    err = y - jnp.sum(w * x, -1)
    w = w + gain * err[..., None]
    p = (p - gain[..., :, None] * px[..., None, :]) / forget
    return w, p


def update(
    c: Corrector,
    *,
    pred_coefs: jax.Array,
    true_coefs: jax.Array,
    pred_dlog: jax.Array,
    true_dlog: jax.Array,
    forget: float,
    keep: jax.Array,
) -> Corrector:
    """Learns from one record (when ``keep`` and the record is finite)."""
    ones = jnp.ones_like(pred_coefs)
    cw, cp = _rls(c.coef_w, c.coef_p, jnp.stack([pred_coefs, ones], -1), true_coefs, forget)
    dw, dp = _rls(c.dlog_w, c.dlog_p, jnp.stack([pred_dlog, 1.0]), true_dlog, forget)
    ok = keep & jnp.all(jnp.isfinite(cw)) & jnp.all(jnp.isfinite(cp))
    ok_d = keep & jnp.isfinite(true_dlog) & jnp.all(jnp.isfinite(dw))
    return Corrector(
        jnp.where(ok, cw, c.coef_w),
        jnp.where(ok, cp, c.coef_p),
        jnp.where(ok_d, dw, c.dlog_w),
        jnp.where(ok_d, dp, c.dlog_p),
        c.updates + ok.astype(jnp.int32),
    )


def correct(c: Corrector, coefs: jax.Array, dlog: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The corrected coefficients (G, B) and change of log loss."""
    return (
        c.coef_w[..., 0] * coefs + c.coef_w[..., 1],
        c.dlog_w[0] * dlog + c.dlog_w[1],
    )
