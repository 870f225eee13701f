"""Trajectory predictors: they extrapolate the path of the parameters, seen through the
displacements over ``S = BasisSettings.stride`` real steps that the basis holds.

With ``stride > 1`` the basis is frozen during a Predict phase, so the coefficients a
predictor gives are each predicted step's update over the frozen directions (logical
order: ``0`` the last displacement, ``1`` the EMA of displacements, ``2..`` the older
displacements).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ._predictors import Observation, PredictContext, Prediction, Predictor, PredictorSpec


def line_weights(snapshots: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights of the least-squares line through ``c = snapshots`` positions spaced one
    displacement apart, over the ``c - 1`` displacements between them.

    With ``disp_j`` the ``j``-th newest displacement (``j = 0 .. c-2``), the positions
    relative to the newest one are ``p_0 = 0``, ``p_i = -(disp_0 + ... + disp_{i-1})``
    at time ``-i``. The line's value at time 0 is ``sum_j offset[j] disp_j`` and its
    slope per displacement is ``sum_j slope[j] disp_j``, with
    ``offset[j] = (c-1-j)(3j+2-c) / (c(c+1))`` and
    ``slope[j] = 6(c-1-j)(j+1) / (c(c^2-1))`` (the slopes sum to 1: equal displacements
    give a slope of one displacement and no offset).

    Returns:
      ``(offset, slope)``, float64 arrays of length ``c - 1``.
    """
    c = snapshots
    j = np.arange(c - 1, dtype=np.float64)
    offset = (c - 1 - j) * (3 * j + 2 - c) / (c * (c + 1))
    slope = 6 * (c - 1 - j) * (j + 1) / (c * (c * c - 1))
    return offset, slope


def _stride(spec: PredictorSpec) -> int:
    basis = getattr(spec.config, "basis", None)
    return int(getattr(basis, "stride", 1))


def _confidence(ready: jax.Array, ctx: PredictContext) -> jax.Array:
    return jnp.where(ready, jnp.clip(ctx.accuracy, 0.0, 1.0), 0.0)


def _zero() -> jax.Array:
    return jnp.zeros((), jnp.int32)


def _counted(state: dict, obs: Observation) -> dict:
    """Counts the observed real steps (the state: ``first`` and ``later``, the
    coefficients of a phase's first and later steps; ``seen``; ``needed``)."""
    del obs
    return {**state, "seen": state["seen"] + 1}


def _predict(state: dict, ctx: PredictContext) -> tuple[Prediction, dict]:
    coefs = jnp.where(ctx.k == 0, state["first"], state["later"])
    ready = state["seen"] >= state["needed"]
    return Prediction(coefs, ctx.log_loss_trend, _confidence(ready, ctx)), state


def _with_needed(init, needed):
    """``init`` whose state also records the observed real steps needed before the
    predictor is confident (a function of the stride)."""

    def wrapped(spec: PredictorSpec) -> dict:
        state = init(spec)
        return {**state, "needed": jnp.asarray(needed(_stride(spec)), jnp.int32)}

    return wrapped


def linefit(snapshots: int = 4) -> Predictor:
    """Jumps along a per-parameter least-squares line through the last ``snapshots``
    positions of the trajectory, spaced ``S = BasisSettings.stride`` real steps apart.

    The positions are given by the last ``c - 1`` displacements (logical slots 0, 2, 3,
    ...; see ``line_weights``). The first predicted step of a phase moves from the
    newest position to the line's value there (the denoised point) plus one real step
    along the line (its slope per displacement over ``S``); every later step moves one
    real step along it. All are fixed coefficients over the frozen basis. The real
    updates since the last displacement was pushed are not part of the fit: the phase
    starts where they left the parameters.

    Confidence: the running realised cosine of its first-step prediction against the
    next real update, and 0 until ``(c - 1) * S`` real steps have been observed.

    Memory (parameter-sized buffers besides the parameters and the optimizer's state):
    ``basis.size >= c`` directions, the stride's accumulator and the snapshot, so
    ``c + 2`` at least. Needs ``BasisSettings(size >= snapshots, stride > 1)``.

    Args:
      snapshots: ``c >= 2``, the positions the line is fitted through.

    Returns:
      A ``Predictor``.

    References: the line fit of snapshots of the trajectory, ``benchmarks/ceiling.md``.
    """
    if not (isinstance(snapshots, int) and snapshots >= 2):
        raise ValueError(f"linefit: snapshots must be an int >= 2; got {snapshots!r}")
    c = snapshots
    offset, slope = line_weights(c)
    slots = np.asarray([0, *range(2, c)])

    def init(spec: PredictorSpec) -> dict:
        stride = _stride(spec)
        if spec.basis_size < c:
            raise ValueError(
                f"linefit(snapshots={c}) needs basis.size >= {c} (c - 1 displacements "
                f"and the EMA); got {spec.basis_size}: set BasisSettings(size={c})"
            )
        if stride < 2:
            raise ValueError(
                f"linefit needs a basis of displacements (BasisSettings.stride > 1, so "
                f"that the basis stays frozen during a Predict phase); got stride "
                f"{stride}: set e.g. BasisSettings(stride=8)"
            )
        later = np.zeros((spec.n_groups, spec.basis_size), np.float32)
        later[:, slots] = slope / stride
        first = later.copy()
        first[:, slots] += offset
        return {"first": jnp.asarray(first), "later": jnp.asarray(later), "seen": _zero()}

    return Predictor("linefit", _with_needed(init, lambda s: (c - 1) * s), _counted, _predict)


def snoo(outer_lr: float = 0.7, momentum: float | None = None) -> Predictor:
    """An outer Nesterov step on the displacement of the last ``S`` real steps (SNOO).

    SNOO keeps slow weights ``phi``; after ``S`` inner steps from them the displacement
    is ``D``, the outer momentum ``m <- mu m + D``, and ``phi <- phi + outer_lr (D +
    mu m)``; the fast weights restart from ``phi``. Here the parameters are the fast
    weights after the last displacement ``D`` (logical slot 0), so the jump is
    ``(outer_lr - 1) D + outer_lr mu m``, with ``m = sum_j mu^j D_{t-j} = ema / (1 - mu)``
    read from the basis EMA (slot 1), whose decay must be ``mu``; with ``stride > 1``
    the EMA starts from zero, so this is exact. The jump is applied at the first
    predicted step of a phase and the later steps apply nothing: it is one outer step,
    and a predictor does not know the phase's length. (Only the real updates since the
    last push make the parameters differ from SNOO's fast weights after ``D``.)

    Confidence: the running realised cosine of the jump against the next real update,
    and 0 until ``S`` real steps have been observed.

    Memory (parameter-sized buffers besides the parameters and the optimizer's state):
    ``basis.size >= 2`` directions, the stride's accumulator (``stride > 1``) and the
    snapshot: 4 with the default basis size.

    Args:
      outer_lr: the outer learning rate (> 0; 1 with ``momentum`` 0 is no jump).
      momentum: the outer momentum ``mu`` in [0, 1); ``None`` takes the basis EMA's
        decay. A value that differs from ``BasisSettings.ema_decay`` is an error.

    Returns:
      A ``Predictor``.

    References: Kallusky et al., "SNOO: Step-K Nesterov Outer Optimizer", arXiv
    2510.15830 (2025).
    """
    if not (math.isfinite(outer_lr) and outer_lr > 0):
        raise ValueError(f"snoo: outer_lr must be finite and > 0; got {outer_lr!r}")
    if momentum is not None and not (0 <= momentum < 1):
        raise ValueError(f"snoo: momentum must be in [0, 1) or None; got {momentum!r}")

    def init(spec: PredictorSpec) -> dict:
        decay = float(spec.config.basis.ema_decay)
        if momentum is not None and not math.isclose(momentum, decay, abs_tol=1e-9):
            raise ValueError(
                f"snoo(momentum={momentum}) reads the outer momentum from the basis EMA, "
                f"whose decay is {decay}: set BasisSettings(ema_decay={momentum})"
            )
        jump = np.zeros((spec.n_groups, spec.basis_size), np.float32)
        jump[:, 0] = outer_lr - 1.0
        jump[:, 1] = outer_lr * decay / (1.0 - decay)
        zero = jnp.zeros_like(jnp.asarray(jump))
        return {"first": jnp.asarray(jump), "later": zero, "seen": _zero()}

    return Predictor("snoo", _with_needed(init, lambda s: s), _counted, _predict)
