"""The predictor interface and the built-in trivial predictors.

A predictor maps what was observed on real steps to the next update, expressed as
coefficients over the basis of real updates (see ``_basis``). It is three pure
functions over a fixed-shape pytree state:

- ``init(spec) -> state``
- ``observe(state, obs) -> state``: called on every real step after warmup, with the
  least-squares fit of the real update onto the basis as ground truth;
- ``predict(state, ctx) -> (Prediction, state)``: the one-step prediction for the
  ``ctx.k``-th step of a Predict phase (``k = 0`` is also used, with the state
  discarded, to score the predictor on real steps and to decide whether to predict).

Coefficients are *one-step*: ``update_{t+1} = sum_b coefs[g, b] * basis_t[b]``. Over a
Predict phase the library composes them through the virtual basis (``_basis.transition``),
so a predictor never needs to know how many steps ago the real basis was frozen. With
``BasisSettings.stride > 1`` the basis is frozen instead (the transition is the
identity): coefficients are each predicted step's update over it
(``hybrid_jax._trajectory``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class PredictorSpec(NamedTuple):
    """Static sizes a predictor is built for."""

    n_groups: int  # coefficient groups (parameter leaves, or 1)
    basis_size: int
    config: Any  # the HybridConfig


class Observation(NamedTuple):
    """What a real step showed (float32 scalars unless noted)."""

    target_coefs: jax.Array  # (G, B): least-squares fit of the update onto the basis
    fit_r2: jax.Array  # (G,): R^2 of that fit
    loss: jax.Array  # loss before the update (NaN if not given)
    log_loss_change: jax.Array  # change of log(loss level) over this real step; 0 if unknown
    grad_norm: jax.Array
    update_norm: jax.Array
    cosine: jax.Array  # between this real update and the previous one
    step: jax.Array  # int32: global step
    gap: jax.Array  # int32: steps since the previous real step (1 in a run of real steps)
    realised_cosine: jax.Array  # cosine of the predictor's last one-step prediction vs this update
    features: jax.Array  # (F,): the encoder's normalised features (see ``_encoder``)


class PredictContext(NamedTuple):
    """What the library tells a predictor when it asks for a prediction."""

    k: jax.Array  # int32: index of the step inside the Predict phase
    accuracy: jax.Array  # running mean of the realised one-step cosine (scale-free)
    log_loss_trend: jax.Array  # running mean of the per-real-step change of log loss


class Prediction(NamedTuple):
    """One-step prediction."""

    coefs: jax.Array  # (G, B) float32
    log_loss_change: jax.Array  # predicted change of log(loss) over this step
    confidence: jax.Array  # in [0, 1]


class Predictor(NamedTuple):
    """A predictor: ``init``, ``observe`` and ``predict`` (see the module docstring)."""

    name: str
    init: Callable[[PredictorSpec], PyTree]
    observe: Callable[[PyTree, Observation], PyTree]
    predict: Callable[[PyTree, PredictContext], tuple[Prediction, PyTree]]


def _fixed(name: str, logical_index: int, doc: str) -> Callable[[], Predictor]:
    """A predictor whose coefficients are one fixed basis direction (its state), over
    ``S = BasisSettings.stride`` (a direction spans ``S`` real steps)."""

    def factory() -> Predictor:
        def init(spec: PredictorSpec) -> PyTree:
            stride = getattr(getattr(spec.config, "basis", None), "stride", 1)
            coefs = jnp.zeros((spec.n_groups, spec.basis_size), jnp.float32)
            return coefs.at[:, logical_index].set(1.0 / stride)

        def observe(state: PyTree, obs: Observation) -> PyTree:
            del obs
            return state

        def predict(state: PyTree, ctx: PredictContext) -> tuple[Prediction, PyTree]:
            confidence = jnp.clip(ctx.accuracy, 0.0, 1.0)
            return Prediction(state, ctx.log_loss_trend, confidence), state

        return Predictor(name, init, observe, predict)

    factory.__name__ = name
    factory.__qualname__ = name
    factory.__doc__ = doc
    return factory


last_update = _fixed(
    "last_update",
    0,
    """Repeats the last real update on every predicted step (with
    ``BasisSettings.stride = S > 1``: the last displacement over ``S``, the mean real
    update of its ``S`` steps).

    Confidence: the running cosine between consecutive real updates.

    Returns:
      A ``Predictor``.
    """,
)

extrapolate = _fixed(
    "extrapolate",
    1,
    """Extrapolates the parameter trajectory linearly with its smoothed velocity:
    every predicted step applies the EMA of real updates (over ``S`` with
    ``BasisSettings.stride = S > 1``).

    Confidence: the running cosine between each real update and the EMA before it.

    Returns:
      A ``Predictor``.
    """,
)


def builtin(config: Any) -> Predictor:
    """The built-in predictor named by ``config.predictor`` (a ``HybridConfig``)."""
    name = config.predictor
    if name == "rssm":
        from ._rssm import rssm

        return rssm(config.rssm, horizon=config.max_horizon)
    if name == "last_update":
        return last_update()
    if name == "extrapolate":
        return extrapolate()
    if name in ("linefit", "snoo"):
        from . import _trajectory

        return getattr(_trajectory, name)()
    raise ValueError(f"unknown predictor {name!r}")
