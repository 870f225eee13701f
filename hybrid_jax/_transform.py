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
from ._predictors import PredictContext, Predictor, PredictorSpec, builtin
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
    - ``predicted_update(state, params, *, first=False, loss=None)``: a predicted step;
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
        self.predicted_update = functools.partial(predicted_update, setup)
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
    steps of every k). In a Predict phase the gradient is ignored and the update is
    ``sum_b c_b direction_b`` with coefficients from the predictor.

    Safety: a Predict phase starts from a snapshot of the parameters; the first real
    step after it compares the loss at the snapshot and at the new parameters on the
    same batch and rolls back beyond ``verify_tolerance``. A divergence monitor watches
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
        raise TypeError(f"predictor must be a hj.Predictor; got {type(pred).__name__}")
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
        basis=_basis.init(params, size, cfg.basis.dtype, lay.n_groups),
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
        snapshot=params,
        snapshot_valid=false,
        horizon_scale=f32(1.0),
        residuals=_residuals.init_buffer(RESIDUAL_BUFFER_SIZE, lay.n_groups, size, n_feat),
        corrector=_residuals.init_corrector(lay.n_groups, size),
        monitor=_monitor.init(),
        bandit=_bandit.init(len(cfg.bandit.horizons), n_feat + 1, cfg.bandit.ridge),
    )
    # Every leaf its own buffer, so that the state can be donated.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


_NAN_STATS = ("loss", "loss_level", "predicted_log_loss")


def real_update(
    setup: S.Setup,
    grads: PyTree,
    state: HybridState,
    params: PyTree | None = None,
    *,
    verify: bool,
    observe: bool,
    value: jax.Array | None = None,
    snapshot_value: jax.Array | None = None,
    can_verify: bool = True,
    **extra_args: Any,
) -> tuple[PyTree, HybridState]:
    """A real step of the kind ``kind_of(state)`` names (``hybrid_jax._kinds``):
    ``verify`` (static) checks the Predict phase that ended, with ``snapshot_value`` (the
    loss at the snapshot on the same batch); ``observe`` (static) teaches the hybrid.
    ``can_verify=False`` starts no Predict phase."""
    if params is None:
        raise ValueError("hj.predictive: update needs params")
    cfg, lay, st = setup.cfg, S.layout(setup.cfg, params), state.stats
    observe = observe or verify
    loss = jnp.asarray(jnp.nan if value is None else value, jnp.float32)
    snap = jnp.asarray(jnp.nan if snapshot_value is None else snapshot_value, jnp.float32)
    grad_norm = S.global_norm(grads)
    pk = S.peek(setup, state)
    c = S.check(
        setup,
        state,
        loss=loss,
        loss_given=value is not None,
        grad_norm=grad_norm,
        snapshot_loss=snap,
        verifying=verify,
        predicted_loss=pk.loss,
    )
    extra = {**extra_args, "value": value} if value is not None else extra_args
    updates, inner_state = S.apply_inner(setup, grads, state, params, c.drop, **extra)
    lv = S.level(setup, state, loss, c.verdict)
    if observe:
        # computed once: otherwise XLA recomputes the optimizer's arithmetic inside
        # every fusion that reads the update
        updates, inner_state = jax.lax.optimization_barrier((updates, inner_state))
        f = S.fit(setup, state, updates, lay, c.drop, pk)
        ln = S.learn(
            setup,
            state,
            updates,
            f,
            lv,
            pk,
            loss=loss,
            grad_norm=grad_norm,
            inner_state=inner_state,
            drop=c.drop,
        )
        accuracy, cos_last, r2 = (
            f.accuracy,
            f.cos_last,
            jnp.where(f.ready, jnp.mean(f.r2), st.fit_r2),
        )
    else:
        ln = S.unobserved(setup, state)
        accuracy, cos_last, r2 = st.accuracy, st.cosine, st.fit_r2
    rw = S.reward(setup, state, snapshot_loss=snap, loss=loss, verifying=verify, observe=observe)
    pl = S.plan(setup, state, ln, c, accuracy, lv.trend, rw.bandit, observe)
    may_predict = _phases.gate(cfg, st.confidence, state.pending) & observe & can_verify
    sched = _phases.schedule_after(
        cfg,
        state.phase,
        state.pending,
        state.snapshot_valid,
        real=True,
        verifying=verify,
        first=False,
        may_predict=may_predict,
        next_horizon=pl.horizon,
    )
    entering = (sched.phase.id == _phases.PREDICT) & (state.phase.id != _phases.PREDICT)
    bandit = S.choose(
        entering & (pl.arm >= 0), _bandit.remember(rw.bandit, pl.arm, pl.context), rw.bandit
    )
    unhealthy = c.skip | (~jnp.isfinite(ln.update_norm) if observe else False)
    if verify:
        updates = jax.tree.map(
            lambda u, s, p: jnp.where(c.rollback, (s - p).astype(u.dtype), u),
            updates,
            state.snapshot,
            params,
        )
    new = state._replace(
        inner=inner_state,
        phase=sched.phase,
        # a rollback backs off: a Full phase follows the next step
        pending=_phases.Pending(
            verify=sched.verify,
            veto=unhealthy | c.rollback,
            force_full=c.verdict.force_real | c.rollback,
        ),
        step=state.step + 1,
        basis=ln.basis,
        encoder=ln.encoder,
        dynamics=ln.dynamics,
        stats=Stats(
            loss=jnp.where(jnp.isfinite(loss), loss, st.loss),
            loss_level=lv.level,
            log_loss_trend=lv.trend,
            accuracy=accuracy,
            confidence=pl.confidence,
            grad_norm=grad_norm,
            update_norm=ln.update_norm if observe else st.update_norm,
            cosine=cos_last,
            fit_r2=r2,
            predicted_log_loss=st.predicted_log_loss,
        ),
        counters=_real_counters(state.counters, verify, snapshot_value is not None, observe, c),
        last=StepInfo(
            phase=state.phase.id,
            used_gradient=jnp.asarray(True),
            loss=loss,
            predicted_loss=pk.loss,
            horizon=pl.horizon,
            update_norm=ln.update_norm,
            verified=jnp.asarray(verify),
            rolled_back=c.rollback,
            divergence_level=c.verdict.level,
            arm=rw.arm,
            reward=rw.value,
        ),
        snapshot_valid=sched.snapshot_valid,
        horizon_scale=pl.scale,
        residuals=ln.residuals,
        corrector=ln.corrector,
        monitor=c.monitor,
        bandit=bandit,
    )
    return updates, new


def _real_counters(c: Counters, verify: bool, measured: bool, observe: bool, check) -> Counters:
    i32 = lambda b: jnp.asarray(b).astype(jnp.int32)
    return c._replace(
        backward_passes=c.backward_passes + 1,
        forward_passes=c.forward_passes + 1 + int(verify and measured),
        real_steps=c.real_steps + 1,
        observed_steps=c.observed_steps + int(observe),
        verifications=c.verifications + int(verify),
        rollbacks=c.rollbacks + i32(check.rollback),
        skipped_updates=c.skipped_updates + i32(check.skip),
    )


def predicted_update(
    setup: S.Setup,
    state: HybridState,
    params: PyTree,
    *,
    first: bool,
    loss: jax.Array | None = None,
) -> tuple[PyTree, HybridState]:
    """A predicted step (``first``: the first of its Predict phase, which takes the
    snapshot). A step vetoed by the one before (``state.pending``) applies nothing."""
    cfg, lay, st = setup.cfg, S.layout(setup.cfg, params), state.stats
    idle = state.pending.veto | state.pending.force_full
    if first:  # the virtual basis starts as the real one
        transport = jnp.broadcast_to(
            jnp.eye(cfg.basis.size, dtype=jnp.float32), state.transport.shape
        )
    else:
        transport = state.transport
    p, dynamics = setup.pred.predict(
        state.dynamics, PredictContext(state.phase.step, st.accuracy, st.log_loss_trend)
    )
    one_step, dlog = S.corrected(setup, state, p)
    coefs = jnp.einsum("gb,gbc->gc", one_step, transport)
    step_map = _basis.transition(one_step, cfg.basis.ema_decay)
    delta = _basis.combine(state.basis, coefs, lay.groups, params)
    updates, bad = guard_nonfinite(params, delta, idle)
    bad = (bad | ~jnp.all(jnp.isfinite(coefs))) & ~idle
    start = jnp.log(st.loss_level) if first else st.predicted_log_loss
    log_pred = start + dlog
    measured = jnp.asarray(jnp.nan if loss is None else loss, jnp.float32)
    monitor, verdict = _monitor.observe_predicted(
        state.monitor,
        setup.monitor,
        delta_finite=~bad,
        loss=measured,
        predicted_loss=jnp.exp(log_pred),
    )
    sched = _phases.schedule_after(
        cfg,
        state.phase,
        state.pending,
        state.snapshot_valid,
        real=False,
        verifying=False,
        first=first,
        may_predict=False,
        next_horizon=state.phase.budget,
    )
    moved = dict(
        transport=jnp.einsum("gij,gjk->gik", step_map, transport),
        dynamics=dynamics,
        stats=st._replace(predicted_log_loss=log_pred),
        monitor=monitor,
        horizon_scale=S.floor_scale(setup, S.shrink(setup, state.horizon_scale, verdict)),
    )
    kept = {name: getattr(state, name) for name in moved}
    new = state._replace(
        **S.choose(idle, kept, moved),
        phase=sched.phase,
        pending=_phases.Pending(
            verify=sched.verify,
            veto=(bad | verdict.force_real) & ~idle,
            force_full=jnp.asarray(False),
        ),
        step=state.step + 1,
        counters=_predicted_counters(state.counters, idle, bad, measured, first),
        last=_predicted_info(
            state,
            idle,
            measured,
            jnp.exp(log_pred),
            verdict.level,
            jnp.where(bad, jnp.nan, _basis.norm(state.basis, coefs)),
        ),
        snapshot=S.choose(~idle, params, state.snapshot) if first else state.snapshot,
        snapshot_valid=sched.snapshot_valid,
    )
    return updates, new


def _predicted_counters(c: Counters, idle, bad, measured, first: bool) -> Counters:
    i32 = lambda b: jnp.asarray(b).astype(jnp.int32)
    return c._replace(
        predicted_steps=c.predicted_steps + i32(~idle),
        predict_phases=c.predict_phases + i32(~idle & first),
        nonfinite_predictions=c.nonfinite_predictions + i32(bad),
        forward_passes=c.forward_passes + i32(jnp.isfinite(measured)),
        idle_steps=c.idle_steps + i32(idle),
    )


def _predicted_info(state: HybridState, idle, measured, predicted, level, norm) -> StepInfo:
    nan = jnp.full((), jnp.nan, jnp.float32)
    return StepInfo(
        phase=state.phase.id,
        used_gradient=jnp.asarray(False),
        loss=measured,
        predicted_loss=jnp.where(idle, nan, predicted),
        horizon=state.phase.budget,
        update_norm=jnp.where(idle, 0.0, norm),
        verified=jnp.asarray(False),
        rolled_back=jnp.asarray(False),
        divergence_level=jnp.where(idle, 0, level).astype(jnp.int32),
        arm=jnp.full((), -1, jnp.int32),
        reward=nan,
    )


def guard_nonfinite(params: PyTree, delta: PyTree, idle: jax.Array) -> tuple[PyTree, jax.Array]:
    """Zeroes every element of ``delta`` that would make its parameter non-finite (and
    all of it where ``idle``). Returns ``(safe_delta, any_held_back)``."""
    safe, held = [], []
    leaves, treedef = jax.tree.flatten(params)
    for p, d in zip(leaves, jax.tree.leaves(delta), strict=True):
        ok = jnp.isfinite(p + d)
        safe.append(jnp.where(ok & ~idle, d, jnp.zeros_like(d)))
        held.append(~jnp.all(ok))
    return jax.tree.unflatten(treedef, safe), jnp.any(jnp.stack(held))


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

    Jit-safe. The usual schedule resumes after the ``n`` steps; an interrupted Predict
    phase is still verified by the next real step.

    Args:
      state: a ``HybridState``.
      n: number of real steps (>= 1; a traced value below 1 counts as 1).

    Returns:
      The state with the phase machine reset to Full.
    """
    if isinstance(n, int) and n < 1:
        raise ValueError(f"force_full: n must be >= 1; got {n}")
    return state._replace(
        phase=_phases.full_phase(n),
        pending=state.pending._replace(verify=state.pending.verify | state.snapshot_valid),
    )
