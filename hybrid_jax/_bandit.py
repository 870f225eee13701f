"""A discounted LinUCB bandit kept entirely on device.

Each arm ``k`` keeps a ridge-regularised linear model of its reward, ``r ~ theta_k . x``,
through the inverse design matrix ``A_k^-1`` and the vector ``b_k``, with
``theta_k = A_k^-1 b_k``. ``A_k^-1`` is never inverted densely: every change of ``A_k``
is a rank-one Sherman-Morrison update.

Discounting (Russac et al., 2019, "Weighted linear bandits for non-stationary
environments"): every ``update`` first forgets a fraction ``1 - gamma`` of *every* arm's
evidence, pulling it back toward the ridge prior ``A = ridge * I, b = 0``::

    A_k <- gamma * A_k + (1 - gamma) * ridge * I        (all arms)
    b_k <- gamma * b_k                                  (all arms)
    counts_k <- gamma * counts_k                        (all arms)

and then adds the new observation to the chosen arm ``a``::

    A_a <- A_a + x x^T,   b_a <- b_a + r x,   counts_a <- counts_a + 1,   pulls_a += 1

An arm that is not pulled therefore drifts back to the prior (its estimate shrinks
toward zero and its exploration bonus grows back), so it is tried again after a change.
``A_k`` stays ``>= ridge * I`` up to rounding, so ``A_k^-1`` stays bounded. The
scaling is ``A^-1 / gamma``; the prior term ``(1 - gamma) * ridge * I`` is added as
``dim`` rank-one updates along the coordinate axes (so an update costs ``O(K d^3)``
flops: meant for a handful of arms and a small context). With ``gamma = 1`` this is
plain LinUCB.

All functions are pure and jit-safe; shapes are fixed by ``init``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class BanditState(NamedTuple):
    """The bandit's posterior; shapes fixed by ``init`` (``K`` arms, ``d`` features)."""

    a_inv: jax.Array  # (K, d, d) float32: A_k^-1, kept by Sherman-Morrison updates
    b: jax.Array  # (K, d) float32: discounted sum of reward * context per arm
    counts: jax.Array  # (K,) float32: discounted pull counts
    pulls: jax.Array  # (K,) int32: raw pull counts
    last_arm: jax.Array  # int32: the arm of the last `remember`/`update` (-1 before any)
    last_context: jax.Array  # (d,) float32: its context
    ridge: jax.Array  # float32: the prior's strength (A = ridge * I), the discount's target


def init(n_arms: int, dim: int, ridge: float = 1.0) -> BanditState:
    """A bandit with no observations: ``A_k = ridge * I`` and ``b_k = 0`` for every arm.

    Args:
      n_arms: number of arms ``K`` (at least 1).
      dim: context dimension ``d`` (at least 1).
      ridge: strength of the ridge prior (finite, > 0).

    Returns:
      A ``BanditState`` whose every leaf is its own buffer (so that it can be donated).

    Raises:
      ValueError: naming the argument that is out of range.
    """
    if isinstance(n_arms, bool) or not isinstance(n_arms, int) or n_arms < 1:
        raise ValueError(f"n_arms must be an int >= 1; got {n_arms!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an int >= 1; got {dim!r}")
    try:
        ridge_value = float(ridge)
    except (TypeError, ValueError):
        ridge_value = math.nan
    if not math.isfinite(ridge_value) or ridge_value <= 0:
        raise ValueError(f"ridge must be a finite number > 0; got {ridge!r}")
    eye = jnp.eye(dim, dtype=jnp.float32) / jnp.float32(ridge_value)
    return BanditState(
        a_inv=jnp.tile(eye[None], (n_arms, 1, 1)),
        b=jnp.zeros((n_arms, dim), jnp.float32),
        counts=jnp.zeros((n_arms,), jnp.float32),
        pulls=jnp.zeros((n_arms,), jnp.int32),
        last_arm=jnp.full((), -1, jnp.int32),
        last_context=jnp.zeros((dim,), jnp.float32),
        ridge=jnp.full((), ridge_value, jnp.float32),
    )


def select(
    state: BanditState, context: jax.Array, alpha: jax.Array | float
) -> tuple[jax.Array, jax.Array]:
    """The arm with the highest upper confidence bound for ``context``.

    ``score_k = theta_k . x + alpha * sqrt(x^T A_k^-1 x)``. Arms never pulled
    (``pulls == 0``) are chosen first, lowest index first; otherwise the highest score
    wins and ties go to the lowest index. A non-finite score (e.g. from a non-finite
    context) never wins over a finite one.

    Args:
      state: the bandit.
      context: ``(d,)`` features of the decision.
      alpha: width of the exploration bonus (>= 0).

    Returns:
      ``(arm, scores)``: the int32 arm and the ``(K,)`` float32 UCB scores (untried
      arms included, with their prior-based score).
    """
    x = jnp.asarray(context, jnp.float32)
    theta = jnp.einsum("kij,kj->ki", state.a_inv, state.b)
    mean = theta @ x
    var = jnp.einsum("i,kij,j->k", x, state.a_inv, x)
    scores = mean + jnp.asarray(alpha, jnp.float32) * jnp.sqrt(jnp.maximum(var, 0.0))
    key = jnp.where(jnp.isfinite(scores), scores, -jnp.inf)
    key = jnp.where(state.pulls == 0, jnp.inf, key)
    return jnp.argmax(key).astype(jnp.int32), scores


def remember(state: BanditState, arm: jax.Array | int, context: jax.Array) -> BanditState:
    """Records a decision awaiting its reward in ``last_arm`` and ``last_context``.

    Args:
      state: the bandit.
      arm: the arm chosen.
      context: ``(d,)`` the context it was chosen for.

    Returns:
      The state with ``last_arm`` and ``last_context`` set; the posterior unchanged.
    """
    x = jnp.asarray(context, jnp.float32).reshape(state.last_context.shape)
    return state._replace(last_arm=jnp.asarray(arm, jnp.int32), last_context=x)


def _rank_one(a_inv: jax.Array, u: jax.Array, c: jax.Array) -> jax.Array:
    """``(A + c u u^T)^-1`` from symmetric ``A^-1`` (Sherman-Morrison)."""
    au = a_inv @ u
    return a_inv - (c / (1.0 + c * (u @ au))) * jnp.outer(au, au)


def _discount(a_inv: jax.Array, gamma: jax.Array, ridge: jax.Array) -> jax.Array:
    """``(gamma A + (1 - gamma) ridge I)^-1`` for every arm, by ``d`` rank-one updates."""
    dim = a_inv.shape[-1]
    c = (1.0 - gamma) * ridge

    def add_axis(j: jax.Array, m: jax.Array) -> jax.Array:
        col = m[:, :, j]  # (K, d): A^-1 e_j per arm
        scale = c / (1.0 + c * m[:, j, j])
        return m - scale[:, None, None] * col[:, :, None] * col[:, None, :]

    return jax.lax.fori_loop(0, dim, add_axis, a_inv / gamma)


def update(
    state: BanditState,
    arm: jax.Array | int,
    context: jax.Array,
    reward: jax.Array | float,
    discount: jax.Array | float,
) -> BanditState:
    """Forgets a fraction of all arms' evidence, then adds ``(context, reward)`` to ``arm``.

    See the module docstring for exactly what is discounted. ``last_arm`` and
    ``last_context`` are set to ``arm`` and ``context``. If ``reward``, ``context`` or
    ``discount`` is not finite, or ``arm`` is outside ``[0, K)``, the state is returned
    unchanged (no NaN ever enters it).

    Args:
      state: the bandit.
      arm: int32, the arm that was pulled.
      context: ``(d,)`` the context it was pulled in.
      reward: the observed reward.
      discount: ``gamma`` in ``(0, 1]``; 1 keeps all evidence (plain LinUCB). A Python
        number outside that range raises ``ValueError``; a traced one is clipped to it.

    Returns:
      The updated state.
    """
    if isinstance(discount, int | float) and not 0.0 < discount <= 1.0:
        raise ValueError(f"discount must be in (0, 1]; got {discount!r}")
    n_arms = state.b.shape[0]
    x = jnp.asarray(context, jnp.float32).reshape(state.last_context.shape)
    r = jnp.asarray(reward, jnp.float32)
    arm = jnp.asarray(arm, jnp.int32)
    gamma = jnp.asarray(discount, jnp.float32)
    ok = (
        jnp.all(jnp.isfinite(x))
        & jnp.isfinite(r)
        & jnp.isfinite(gamma)
        & (gamma > 0)
        & (arm >= 0)
        & (arm < n_arms)
    )
    gamma = jnp.where(ok, jnp.clip(gamma, jnp.finfo(jnp.float32).tiny, 1.0), 1.0)
    x_ok, r_ok = jnp.where(ok, x, 0.0), jnp.where(ok, r, 0.0)
    arm_ok = jnp.clip(arm, 0, n_arms - 1)
    onehot = jnp.arange(n_arms) == arm_ok

    a_inv = _discount(state.a_inv, gamma, state.ridge)
    a_inv = a_inv.at[arm_ok].set(_rank_one(a_inv[arm_ok], x_ok, jnp.float32(1.0)))
    a_inv = 0.5 * (a_inv + jnp.swapaxes(a_inv, -1, -2))  # keep rounding symmetric
    new = BanditState(
        a_inv=a_inv,
        b=gamma * state.b + jnp.where(onehot[:, None], r_ok * x_ok, 0.0),
        counts=gamma * state.counts + onehot.astype(jnp.float32),
        pulls=state.pulls + onehot.astype(jnp.int32),
        last_arm=arm,
        last_context=x_ok,
        ridge=state.ridge,
    )
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
