"""`hj.predictive`: an optax transformation that predicts part of its updates."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from . import _bandit, _basis, _encoder, _kinds, _monitor, _phases, _residuals
from . import _stages as S
from ._predicted import predicted_phase, predicted_update
from ._predictors import Predictor, PredictorSpec, builtin
from ._real import real_parts, real_update
from ._state import Counters, HybridState, Stats, StepInfo
from .config import RESIDUAL_BUFFER_SIZE, HybridConfig

PyTree = Any


class PredictiveTransformation(optax.GradientTransformationExtraArgs):
    """An ``optax.GradientTransformationExtraArgs`` with the hybrid's extras.

    ``init`` and ``update`` behave as in optax. The extras (attributes):

    - ``needs_gradient(state) -> bool[]``: whether the next step is a real step;
    - ``kind(state) -> int32[]``: the kind of the next step (``hybrid_jax._kinds``);
    - ``real_update(grads, state, params, *, value=None, snapshot_value=None,
      verify=False, observe=True, **extra_args)``: a real step of a given kind;
    - ``real_parts(...)``: the same, as ``(updates, rollback, state)``: where
      ``rollback`` the parameters go back to the snapshot and ``updates`` apply there;
    - ``predicted_update(state, params, *, first=False, loss=None)``: a predicted step;
    - ``predicted_phase(state, params, *, length, metrics_fn)``: up to ``length`` steps
      of a Predict phase as one program (see ``hybrid_jax._predicted``);
    - ``snapshot_loss(loss_fn, state, batch)``: the loss at the Predict phase's snapshot
      when the next step verifies one (NaN otherwise), for ``update``'s
      ``snapshot_value``;
    - ``config``: the ``HybridConfig``; ``predictor``: the ``Predictor``.
    """

    def __new__(cls, init, update, *, setup: S.Setup) -> PredictiveTransformation:
        self = super().__new__(cls, init, update)
        self.setup = setup
        self.config = setup.cfg
        self.predictor = setup.pred
        self.needs_gradient = lambda state: state.phase.id != _phases.PREDICT
        self.kind = functools.partial(_kinds.kind_of, setup.cfg)
        self.real_update = functools.partial(real_update, setup)
        self.real_parts = functools.partial(real_parts, setup)
        self.predicted_update = functools.partial(predicted_update, setup)
        self.predicted_phase = functools.partial(predicted_phase, setup)
        self.snapshot_loss = snapshot_loss
        return self


def predictive(
    inner: optax.GradientTransformation,
    config: HybridConfig | None = None,
    *,
    predictor: Predictor | None = None,
) -> PredictiveTransformation:
    """Wraps an optax optimizer so that part of its updates are predicted.

    On real steps the wrapped optimizer's update is applied and recorded: it enters
    the basis of directions, and its least-squares fit onto the previous basis trains
    the predictor (with ``config.observe_every = k > 2``, on two consecutive real
    steps of every k, and not in the quiet stretch of a long Full or Warmup phase:
    ``hybrid_jax._phases.quiet``). In a Predict phase the gradient is ignored and the update is
    ``sum_b c_b direction_b`` with coefficients from the predictor.

    Safety: a Predict phase starts from a snapshot of the parameters; the first real
    step after it compares the loss at the snapshot and at the new parameters on the
    same batch and rejects it unless it lowered the loss by ``predict_cost_ratio``
    times what the real steps it replaced were expected to, within ``verify_tolerance``
    (see ``HybridConfig``); a rejected phase is rolled back, unless it lowered the loss
    at all within ``verify_tolerance``. A divergence monitor watches
    every step. A predicted update never makes a parameter non-finite; a real step
    whose loss or gradient is non-finite is not applied.

    Args:
      inner: any optax optimizer (its state advances on real steps only).
      config: the method's constants; ``HybridConfig()`` if omitted.
      predictor: a custom ``Predictor``; by default the built-in named by
        ``config.predictor``.

    Returns:
      A ``PredictiveTransformation``. Its ``update(grads, state, params, *, value=loss,
      snapshot_value=None, **extra_args)`` needs ``params``. A Predict phase is only
      started where it can be verified: pass ``snapshot_value``, the loss at
      ``state.snapshot`` on the same batch when the step verifies
      (``tx.snapshot_loss(loss_fn, state, batch)`` computes it, a forward pass only on
      those steps). Without it ``update`` takes real steps only, and warns once. A
      rollback is returned as the update ``snapshot - params``.

    Example:
      >>> tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig(warmup_steps=10))
      >>> state = tx.init(params)
      >>> loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      >>> snap = tx.snapshot_loss(loss_fn, state, batch)
      >>> updates, state = tx.update(grads, state, params, value=loss, snapshot_value=snap)
    """
    cfg = HybridConfig() if config is None else config
    if not isinstance(cfg, HybridConfig):
        raise TypeError(f"config must be a HybridConfig; got {type(cfg).__name__}")
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"inner must be an optax GradientTransformation; got {type(inner).__name__}"
        )
    pred = builtin(cfg) if predictor is None else predictor
    if not isinstance(pred, Predictor):
        raise TypeError(f"predictor must be an hj.Predictor; got {type(pred).__name__}")
    setup = S.Setup(cfg, optax.with_extra_args_support(inner), pred, cfg.monitor)
    warned: list[bool] = []
    return PredictiveTransformation(
        functools.partial(init, setup), functools.partial(update, setup, warned), setup=setup
    )


def init(setup: S.Setup, params: PyTree) -> HybridState:
    """The state of a run that starts at ``params``."""
    cfg = setup.cfg
    lay = S.layout(cfg, params)
    size, n_feat = cfg.basis.size, _encoder.n_features(cfg.basis.size)
    f32 = lambda x: jnp.full((), x, jnp.float32)
    i32 = lambda x: jnp.full((), x, jnp.int32)
    false = jnp.zeros((), bool)
    state = HybridState(
        inner=setup.inner.init(params),
        phase=_phases.init(cfg),
        pending=_phases.init_pending(),
        step=i32(0),
        basis=_basis.init(params, size, cfg.basis.dtype, lay.n_groups, cfg.basis.stride),
        transport=jnp.broadcast_to(jnp.eye(size, dtype=jnp.float32), (lay.n_groups, size, size)),
        encoder=_encoder.init(size),
        dynamics=setup.pred.init(PredictorSpec(lay.n_groups, size, cfg)),
        stats=Stats(*(f32(jnp.nan if f in _NAN_STATS else 0.0) for f in Stats._fields)),
        counters=Counters(*(i32(0) for _ in Counters._fields)),
        last=StepInfo(
            phase=_phases.init(cfg).id,
            used_gradient=jnp.ones((), bool),
            loss=f32(jnp.nan),
            predicted_loss=f32(jnp.nan),
            horizon=i32(0),
            update_norm=f32(0),
            verified=false,
            rolled_back=false,
            divergence_level=i32(0),
            arm=i32(-1),
            reward=f32(jnp.nan),
        ),
        snapshot=jax.tree.map(jnp.copy, params),  # its own buffers, as under jit
        snapshot_valid=false,
        horizon_scale=f32(cfg.min_horizon / cfg.max_horizon if S.PROBE_AFTER_ROLLBACK else 1.0),
        residuals=_residuals.init_buffer(RESIDUAL_BUFFER_SIZE, lay.n_groups, size, n_feat),
        corrector=_residuals.init_corrector(lay.n_groups, size),
        monitor=_monitor.init(),
        bandit=_bandit.init(len(cfg.bandit.horizons), n_feat + 1, cfg.bandit.ridge),
    )
    # Every leaf its own buffer, so that the state can be donated.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


_NAN_STATS = ("loss", "loss_level", "predicted_log_loss")


def update(
    setup: S.Setup,
    warned: list[bool],
    grads: PyTree,
    state: HybridState,
    params: PyTree | None = None,
    *,
    value: jax.Array | None = None,
    snapshot_value: jax.Array | None = None,
    **extra_args: Any,
) -> tuple[PyTree, HybridState]:
    """The optax ``update``: the kind of step ``state`` wants (``lax.switch``)."""
    if params is None:
        raise ValueError("hj.predictive: update needs params")
    if value is not None:
        value = _kinds.check_loss(value, "hj.predictive: tx.update's value must be")
    if snapshot_value is not None:
        snapshot_value = _kinds.check_loss(snapshot_value, "hj.predictive: snapshot_value must be")
    can_verify = snapshot_value is not None and value is not None
    if not can_verify and not warned:
        warned.append(True)
        warnings.warn(
            "hj.predictive: tx.update was called without value (the loss) and "
            "snapshot_value, so it cannot verify a Predict phase and starts none. Pass "
            "value=loss, snapshot_value=tx.snapshot_loss(loss_fn, state, batch), or step "
            "with hj.make_hybrid_step.",
            stacklevel=2,
        )

    def real(verify: bool, observe: bool) -> Callable[[HybridState], Any]:
        return lambda s: real_update(
            setup,
            grads,
            s,
            params,
            value=value,
            snapshot_value=snapshot_value,
            verify=verify,
            observe=observe,
            can_verify=can_verify,
            **extra_args,
        )

    def predicted(first: bool) -> Callable[[HybridState], Any]:
        return lambda s: predicted_update(setup, s, params, first=first)

    branches = {
        _kinds.REAL: real(False, True),
        _kinds.VERIFY: real(True, True),
        _kinds.PREDICT_FIRST: predicted(True),
        _kinds.PREDICT: predicted(False),
        _kinds.PLAIN: real(False, False),
    }
    return _kinds.switch(setup.cfg, state, branches, state)


def snapshot_loss(loss_fn: Callable[..., Any], state: HybridState, batch: Any) -> jax.Array:
    """``loss_fn(state.snapshot, batch)`` when the next step verifies a Predict phase,
    else NaN: one forward pass, on those steps only (a ``lax.cond``)."""

    def at_snapshot() -> jax.Array:
        out = loss_fn(state.snapshot, batch)
        return jnp.asarray(out[0] if isinstance(out, tuple) else out, jnp.float32)

    return jax.lax.cond(
        state.pending.verify, at_snapshot, lambda: jnp.full((), jnp.nan, jnp.float32)
    )


def force_full(state: HybridState, n: int | jax.Array) -> HybridState:
    """Starts a Full phase of ``n`` real steps now (ends any Predict phase).

    Jit-safe. The usual schedule resumes after the ``n`` steps (if the gate is closed
    then, a backed-off Full phase follows, as after any Full phase), unless a forced
    Full phase (a monitor warning, a rollback) is asked for during them: that one
    follows them; an interrupted Predict phase is still verified by the next real step.

    Args:
      state: a ``HybridState``.
      n: number of real steps (>= 1; a traced value below 1 counts as 1).

    Returns:
      The state with the phase machine reset to Full.
    """
    if isinstance(n, int) and n < 1:
        raise ValueError(f"force_full: n must be >= 1; got {n}")
    return state._replace(
        phase=_phases.make(_phases.FULL, n, 0, state.phase.rejected),
        pending=state.pending._replace(verify=state.pending.verify | state.snapshot_valid),
    )
