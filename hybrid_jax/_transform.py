"""`hj.predictive`: an optax transformation that predicts part of its updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from . import _bandit, _basis, _encoder, _monitor, _phases, _residuals
from ._config import HybridConfig
from ._predictors import (
    Observation,
    PredictContext,
    Prediction,
    Predictor,
    PredictorSpec,
    builtin,
)
from ._state import Counters, HybridState, Stats, StepInfo

PyTree = Any


class PredictiveTransformation(optax.GradientTransformationExtraArgs):
    """An ``optax.GradientTransformationExtraArgs`` with the hybrid's extras.

    ``init`` and ``update`` behave as in optax. The extras (attributes):

    - ``needs_gradient(state) -> bool[]``: whether the next step is a real step;
    - ``observes(state) -> bool[]``: whether a real step taken now is observed
      (``HybridConfig.observe_every``);
    - ``real_update(grads, state, params, *, value=None, snapshot_value=None,
      **extra_args)``: a real step (``snapshot_value``: the loss at ``state.snapshot`` on
      the same batch, for verification);
    - ``predicted_update(state, params, *, loss=None) -> (updates, state)``: a predicted
      step (``loss``: the loss at ``params`` if one was measured, for the monitor);
    - ``config``: the ``HybridConfig``; ``predictor``: the ``Predictor``.
    """

    def __new__(
        cls,
        init: Callable[..., Any],
        update: Callable[..., Any],
        *,
        needs_gradient: Callable[[HybridState], jax.Array],
        observes: Callable[[HybridState], jax.Array],
        real_update: Callable[..., Any],
        predicted_update: Callable[..., Any],
        config: HybridConfig,
        predictor: Predictor,
    ) -> PredictiveTransformation:
        self = super().__new__(cls, init, update)
        self.needs_gradient = needs_gradient
        self.observes = observes
        self.real_update = real_update
        self.predicted_update = predicted_update
        self.config = config
        self.predictor = predictor
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
    steps of every k; the others only apply the update, see ``HybridConfig``). In a
    Predict phase the gradient is ignored and the update is ``sum_b c_b direction_b``
    with coefficients from the predictor.

    Safety: a Predict phase starts from a snapshot of the parameters; the first real
    step after it compares the loss at the snapshot and at the new parameters on the
    same batch (``snapshot_value``) and rolls back beyond ``verify_tolerance``. A
    divergence monitor watches every step (its warnings force real steps, its cautions
    shrink the horizon, its critical events roll back). A predicted update never makes
    a parameter non-finite: such elements keep their value, the event is counted and
    the phase ends. A real step whose loss or gradient is non-finite is not applied.

    Args:
      inner: any optax optimizer (its state advances on real steps only).
      config: the method's constants; ``HybridConfig()`` if omitted.
      predictor: a custom ``Predictor``; by default the built-in named by
        ``config.predictor``.

    Returns:
      A ``PredictiveTransformation``. Its ``update(grads, state, params, *, value=loss,
      snapshot_value=None, **extra_args)`` needs ``params``; ``value`` (the loss) feeds
      the statistics and the monitor; ``snapshot_value`` (the loss at ``state.snapshot``
      on the same batch) enables verification on the first real step after a Predict
      phase (``hybrid_step`` computes it). A rollback is returned as the update
      ``snapshot - params`` (exact up to rounding; ``hybrid_step`` restores exactly).
      ``real_update`` also takes ``dispatched=True`` (used by ``make_dispatched_step``):
      the snapshot is then written by the Predict phase's first step, a step without
      ``snapshot_value`` neither verifies nor rolls back (the phase stays pending), and
      a Predict phase starts on the previous real step's confidence. ``observe=True`` or
      ``False`` fixes whether the real step is observed (see ``observe_every``; by
      default ``observes(state)`` decides, with a ``lax.cond`` when ``observe_every > 2``).

    Example:
      >>> tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig(warmup_steps=10))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(grads, state, params, value=loss)
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
    inner = optax.with_extra_args_support(inner)
    size = cfg.basis_size
    n_feat = _encoder.n_features(size)
    monitor_settings = _monitor.MonitorSettings(
        **{f: getattr(cfg, "monitor_" + f) for f in _monitor.MonitorSettings._fields}
    )
    arms = jnp.asarray(cfg.bandit_horizons, jnp.int32)
    scale_floor = cfg.min_horizon / cfg.max_horizon  # the shrunk horizon is min_horizon

    def layout(params: PyTree) -> tuple[tuple[int, ...], int]:
        leaves = jax.tree.leaves(params)
        if not leaves:
            raise ValueError("hj.predictive: params has no leaves")
        for leaf in leaves:
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                raise ValueError(f"hj.predictive: params must be floating point; got {leaf.dtype}")
        if cfg.coef_groups == "global":
            return (0,) * len(leaves), 1
        return tuple(range(len(leaves))), len(leaves)

    def init(params: PyTree) -> HybridState:
        _, n_groups = layout(params)
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        i32 = lambda x: jnp.asarray(x, jnp.int32)
        nan = f32(jnp.nan)
        false = jnp.asarray(False)
        ph = _phases.init(cfg)
        state = HybridState(
            inner=inner.init(params),
            phase=ph.phase,
            phase_step=ph.phase_step,
            phase_budget=ph.phase_budget,
            consecutive=ph.consecutive,
            step=i32(0),
            basis=_basis.init(params, size, cfg.basis_dtype, n_groups),
            transport=jnp.broadcast_to(jnp.eye(size, dtype=jnp.float32), (n_groups, size, size)),
            encoder=_encoder.init(size),
            dynamics=pred.init(PredictorSpec(n_groups, size, cfg)),
            stats=Stats(nan, nan, f32(0), f32(0), f32(0), f32(0), f32(0), f32(0), f32(0), nan),
            counters=Counters(*(i32(0) for _ in Counters._fields)),
            last=StepInfo(
                ph.phase,
                jnp.asarray(True),
                nan,
                nan,
                i32(0),
                f32(0),
                false,
                false,
                i32(0),
                i32(-1),
                nan,
            ),
            snapshot=params,
            snapshot_valid=false,
            pending_verify=false,
            horizon_scale=f32(1.0),
            residuals=_residuals.init_buffer(cfg.residual_buffer_size, n_groups, size, n_feat),
            corrector=_residuals.init_corrector(n_groups, size),
            monitor=_monitor.init(),
            bandit=_bandit.init(len(cfg.bandit_horizons), n_feat + 1, cfg.bandit_ridge),
        )
        # Every leaf its own buffer, so that the state can be donated.
        return jax.tree.map(lambda x: jnp.array(x, copy=True), state)

    def needs_gradient(state: HybridState) -> jax.Array:
        return state.phase != _phases.PREDICT

    def observes(state: HybridState) -> jax.Array:
        enc = state.encoder
        pair_open = (enc.streak == 1) & (state.step - enc.last_real_step == 1)
        return _phases.observation_due(
            cfg,
            phase_of(state),
            enc.unobserved,
            pair_open,
            state.pending_verify,
            state.stats.confidence,
        )

    def phase_of(state: HybridState) -> _phases.Phase:
        return _phases.Phase(state.phase, state.phase_step, state.phase_budget, state.consecutive)

    def with_phase(state: HybridState, ph: _phases.Phase) -> HybridState:
        return state._replace(
            phase=ph.phase,
            phase_step=ph.phase_step,
            phase_budget=ph.phase_budget,
            consecutive=ph.consecutive,
            step=state.step + 1,
        )

    def choose(cond: jax.Array, a: PyTree, b: PyTree) -> PyTree:
        return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)

    def ema(old: jax.Array, new: jax.Array, decay: float) -> jax.Array:
        return decay * old + (1.0 - decay) * new

    def corrected(state: HybridState, p: Prediction) -> tuple[jax.Array, jax.Array]:
        coefs = jnp.asarray(p.coefs, jnp.float32)
        dlog = jnp.asarray(p.log_loss_change, jnp.float32)
        if cfg.correct_predictions:
            return _residuals.correct(state.corrector, coefs, dlog)
        return coefs, dlog

    def plan_horizon(state: HybridState, confidence: jax.Array, context: jax.Array):
        """(horizon, bandit arm) for a Predict phase that would start now."""
        if cfg.horizon_policy == "bandit":
            arm, _ = _bandit.select(state.bandit, context, cfg.bandit_alpha)
            h = arms[arm]
        else:
            arm, h = jnp.int32(-1), _phases.horizon(cfg, confidence)
        h = jnp.floor(h.astype(jnp.float32) * state.horizon_scale).astype(jnp.int32)
        return jnp.clip(h, cfg.min_horizon, cfg.max_horizon), arm

    def real_update(
        grads: PyTree,
        state: HybridState,
        params: PyTree | None = None,
        *,
        value: jax.Array | None = None,
        snapshot_value: jax.Array | None = None,
        dispatched: bool = False,
        observe: bool | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, HybridState]:
        if params is None:
            raise ValueError("hj.predictive: update needs params")
        if observe is None and cfg.observe_every > 2:

            def branch(seen: bool) -> Callable[[HybridState], Any]:
                return lambda s: real_update(
                    grads,
                    s,
                    params,
                    value=value,
                    snapshot_value=snapshot_value,
                    dispatched=dispatched,
                    observe=seen,
                    **extra_args,
                )

            return jax.lax.cond(observes(state), branch(True), branch(False), state)
        observe = True if observe is None else bool(observe)
        groups, n_groups = layout(params)
        st = state.stats
        loss = jnp.asarray(jnp.nan if value is None else value, jnp.float32)
        grad_norm = _global_norm(grads)
        loss_ok = jnp.isfinite(loss) if value is not None else jnp.asarray(True)
        skip = ~(loss_ok & jnp.isfinite(grad_norm))  # never applied

        # verification of the Predict phase that just ended, and the monitor's verdict
        peek, _ = pred.predict(
            state.dynamics, PredictContext(jnp.int32(0), st.accuracy, st.log_loss_trend)
        )
        peek_coefs, peek_dlog = corrected(state, peek)
        prev_known = jnp.isfinite(st.loss_level) & (st.loss_level > 0)
        one_step = jnp.where(prev_known, st.loss_level * jnp.exp(peek_dlog), jnp.nan)
        # an unobserved step never verifies: the check waits for an observed one
        verifying = state.pending_verify & (snapshot_value is not None) & observe
        snap = jnp.asarray(jnp.nan if snapshot_value is None else snapshot_value, jnp.float32)
        tolerated = (1.0 + cfg.verify_tolerance) * snap
        accepted = verifying & jnp.isfinite(snap) & loss_ok & (loss <= tolerated)
        monitor, verdict = _monitor.observe_real(
            state.monitor, monitor_settings, loss=loss, grad_norm=grad_norm, predicted_loss=one_step
        )
        rollback = state.snapshot_valid & ((verifying & ~accepted) | verdict.rollback)
        # a dispatched step without the snapshot's loss leaves any rollback to the verify
        # step that follows it, and so never reads the snapshot
        can_roll_back = not (dispatched and snapshot_value is None)
        if not can_roll_back:
            rollback = jnp.asarray(False)

        # a rolled-back or non-finite step applies nothing and leaves the optimizer as it was
        drop = skip | rollback
        if value is not None:
            extra_args = {**extra_args, "value": value}
        # a select, not a cond: no branch copies, and it fuses into the optimizer's update
        updates, inner_state = inner.update(grads, state.inner, params, **extra_args)
        # the zero is opaque to XLA: a zero *constant* of a parameter's shape is merged with
        # the backward pass's zero-initialised accumulators (of scanned layers), and is then
        # written out and copied as a whole buffer on every step
        zero = jax.lax.optimization_barrier(jnp.zeros((), jnp.float32))
        updates = jax.tree.map(lambda u: jnp.where(drop, zero.astype(u.dtype), u), updates)
        inner_state = choose(drop, state.inner, inner_state)
        if observe:
            # computed once: otherwise XLA recomputes the optimizer's arithmetic (reading
            # the gradient and both moments again) inside every fusion that reads the
            # update. An unobserved step only adds the update to the parameters: there
            # the optimizer's pass, the select and that addition fuse into one.
            updates, inner_state = jax.lax.optimization_barrier((updates, inner_state))
            g = _basis.gram(state.basis, updates, groups, n_groups, cfg.sketch_stride)
            target, r2 = _basis.fit(g, cfg.fit_ridge)
            ready = (state.basis.count >= 1) & ~drop
            # the one-step accuracy: measured only where no real step went unobserved
            one_step_ok = ready & (state.encoder.unobserved == 0)
            realised = _basis.cosine(g, peek_coefs)
            first = state.basis.count == 1
            running = jnp.where(
                first, realised, ema(st.accuracy, realised, cfg.confidence_ema_decay)
            )
            accuracy = jnp.where(one_step_ok, running, st.accuracy)
            last_dir = jnp.zeros((n_groups, size), jnp.float32).at[:, 0].set(1.0)
            cos_last = jnp.where(ready, _basis.cosine(g, last_dir), 0.0)
        else:  # an unobserved step: the statistics of the last observed one stand
            ready, accuracy, cos_last = jnp.asarray(False), st.accuracy, st.cosine

        # The loss level: an EMA of real-step losses (flagged losses left out). Its change is
        # what the predictors learn and predict: minibatch noise mostly averaged away.
        fresh_loss = jnp.isfinite(loss) & (verdict.level < _monitor.WARNING)
        level = jnp.where(
            fresh_loss,
            jnp.where(
                jnp.isfinite(st.loss_level), ema(st.loss_level, loss, cfg.loss_ema_decay), loss
            ),
            st.loss_level,
        )
        known = fresh_loss & (level > 0) & jnp.isfinite(st.loss_level) & (st.loss_level > 0)
        ratio = jnp.where(known, level, 1.0) / jnp.where(known, st.loss_level, 1.0)
        dlog = jnp.where(known, jnp.log(ratio), 0.0)
        trend = jnp.where(
            known, ema(st.log_loss_trend, dlog, cfg.loss_ema_decay), st.log_loss_trend
        )

        if observe:
            update_norm = jnp.sqrt(jnp.sum(g.uu))
            basis = _basis.push(state.basis, updates, g, cfg.basis_ema_decay, keep=~drop)
            enc = state.encoder
            gap = jnp.where(enc.last_real_step >= 0, state.step - enc.last_real_step, 1).astype(
                jnp.int32
            )
            raw = _encoder.raw_features(
                loss=loss,
                log_loss_change=jnp.where(known, dlog, jnp.nan),
                grad_norm=grad_norm,
                update_norm=update_norm,
                cosine=jnp.where(ready, cos_last, jnp.nan),
                fit_r2=jnp.where(ready, jnp.mean(r2), jnp.nan),
                moments=_encoder.moment_norms(inner_state, cfg.sketch_stride),
                phase=state.phase,
                gap=gap,
                phase_position=state.phase_step / jnp.maximum(state.phase_budget, 1),
                mean_coefs=jnp.where(ready, jnp.mean(target, axis=0), jnp.nan),
            )
            enc, features = _encoder.normalise(enc, raw, cfg.feature_ema_decay)
            enc = enc._replace(
                last_real_step=state.step,
                unobserved=jnp.zeros((), jnp.int32),
                streak=_encoder.streak_after_observing(state.encoder, state.step),
            )
            obs = Observation(
                target_coefs=target,
                fit_r2=r2,
                loss=loss,
                log_loss_change=dlog,
                grad_norm=grad_norm,
                update_norm=update_norm,
                cosine=cos_last,
                step=state.step,
                gap=gap,
                realised_cosine=jnp.where(ready, realised, jnp.nan),
                features=features,
            )
            learning = ready & (state.phase != _phases.WARMUP)
            dynamics = jax.lax.cond(learning, pred.observe, lambda s, o: s, state.dynamics, obs)

            # residuals and the corrector learn from one-step predictions of consecutive steps
            consecutive = ready & (gap == 1) & jnp.isfinite(realised)
            residuals = _residuals.record(
                state.residuals,
                pred_coefs=peek_coefs,
                true_coefs=target,
                pred_dlog=peek_dlog,
                true_dlog=dlog,
                features=features,
                horizon=jnp.int32(1),
                confidence=st.confidence,
                keep=consecutive,
            )
            raw_coefs = jnp.asarray(peek.coefs, jnp.float32)
            corrector = _residuals.update(
                state.corrector,
                pred_coefs=raw_coefs,
                true_coefs=target,
                pred_dlog=jnp.asarray(peek.log_loss_change, jnp.float32),
                true_dlog=dlog,
                forget=cfg.corrector_forget,
                keep=consecutive & known,
            )
        else:
            update_norm = jnp.full((), jnp.nan, jnp.float32)
            basis, dynamics = state.basis, state.dynamics
            residuals, corrector = state.residuals, state.corrector
            enc = state.encoder._replace(
                unobserved=state.encoder.unobserved + 1, streak=jnp.zeros((), jnp.int32)
            )
            features = jnp.zeros((n_feat,), jnp.float32)

        # bandit: verified progress per unit of cost, in units of recent real-step progress
        h_done = state.last.horizon.astype(jnp.float32)
        progress = jnp.log(jnp.maximum(snap, 1e-30)) - jnp.log(jnp.maximum(loss, 1e-30))
        per_step = jnp.maximum(jnp.abs(st.log_loss_trend), 1e-3)
        cost = h_done * cfg.predicted_step_cost + cfg.verify_cost
        reward = jnp.clip(progress / per_step / cost, -100.0, 100.0)
        learn_arm = verifying & (state.bandit.last_arm >= 0) & jnp.isfinite(reward)
        bandit = state.bandit
        if observe:
            bandit = _bandit.update(
                bandit,
                bandit.last_arm,
                bandit.last_context,
                jnp.where(learn_arm, reward, jnp.nan),
                cfg.bandit_discount,
            )
        scale = jnp.where(
            verdict.shrink_horizon, state.horizon_scale * cfg.horizon_shrink, state.horizon_scale
        )
        scale = jnp.where(rollback, scale * cfg.horizon_shrink, scale)
        scale = jnp.where(accepted, jnp.minimum(scale * 2.0, 1.0), scale)
        scale = jnp.maximum(scale, scale_floor)

        if observe:
            nxt, _ = pred.predict(dynamics, PredictContext(jnp.int32(0), accuracy, trend))
            confidence = jnp.clip(jnp.asarray(nxt.confidence, jnp.float32), 0.0, 1.0)
            fresh_ok = jnp.isfinite(nxt.confidence)
        else:  # the predictor did not move: its confidence stands
            confidence, fresh_ok = st.confidence, jnp.isfinite(st.confidence)
        context = jnp.concatenate([features, jnp.ones((1,), jnp.float32)])
        planned = state._replace(horizon_scale=scale, bandit=bandit)
        next_h, arm = plan_horizon(planned, confidence, context)
        healthy = ~skip & (jnp.isfinite(update_norm) if observe else True)
        # a dispatched step decides on the confidence of the real step before it, which
        # is what the host's guess a step earlier was based on (and what decides whether
        # a step is observed: so too with ``observe_every > 2``)
        early = dispatched or cfg.observe_every > 2
        gate = st.confidence if early else confidence
        gate_ok = jnp.isfinite(st.confidence) if early else fresh_ok
        can_predict = healthy & gate_ok & (gate >= cfg.confidence_threshold)
        can_predict = can_predict & ~verdict.force_real & ~rollback & observe

        ph = _phases.advance(phase_of(state), cfg, can_predict, next_h)
        ph = choose(verdict.force_real, _phases.full_phase(cfg.full_steps), ph)
        entering = ph.phase == _phases.PREDICT
        bandit = choose(entering & (arm >= 0), _bandit.remember(bandit, arm, context), bandit)

        stats = Stats(
            loss=jnp.where(jnp.isfinite(loss), loss, st.loss),
            loss_level=level,
            log_loss_trend=trend,
            accuracy=accuracy,
            confidence=confidence,
            grad_norm=grad_norm,
            update_norm=update_norm if observe else st.update_norm,
            cosine=cos_last,
            fit_r2=jnp.where(ready, jnp.mean(r2), st.fit_r2) if observe else st.fit_r2,
            predicted_log_loss=st.predicted_log_loss,
        )
        i32 = lambda b: b.astype(jnp.int32)
        c = state.counters
        counters = c._replace(
            backward_passes=c.backward_passes + 1,
            forward_passes=c.forward_passes + 1 + i32(verifying),
            real_steps=c.real_steps + 1,
            observed_steps=c.observed_steps + int(observe),
            verifications=c.verifications + i32(verifying),
            rollbacks=c.rollbacks + i32(rollback),
            skipped_updates=c.skipped_updates + i32(skip),
        )
        last = StepInfo(
            state.phase,
            jnp.asarray(True),
            loss,
            one_step,
            next_h,
            update_norm,
            verifying,
            rollback,
            verdict.level,
            jnp.where(learn_arm, state.bandit.last_arm, -1),
            jnp.where(learn_arm, reward, jnp.nan),
        )
        if can_roll_back:
            updates = jax.tree.map(
                lambda u, s, p: jnp.where(rollback, (s - p).astype(u.dtype), u),
                updates,
                state.snapshot,
                params,
            )
        # the snapshot of a Predict phase: the parameters this step produces, written only
        # when one starts (a branch over the snapshot's buffers alone: one passes them
        # through). Dispatched steps leave it to the Predict phase's first step.
        if dispatched:
            snapshot, entering = state.snapshot, jnp.asarray(False)
        else:
            snapshot = jax.lax.cond(
                entering,
                lambda: jax.tree.map(
                    lambda s, p, u: (p + u).astype(s.dtype), state.snapshot, params, updates
                ),
                lambda: state.snapshot,
            )
        new = state._replace(
            inner=inner_state,
            basis=basis,
            encoder=enc,
            dynamics=dynamics,
            stats=stats,
            counters=counters,
            last=last,
            snapshot=snapshot,
            snapshot_valid=entering | (state.snapshot_valid & ~verifying & ~rollback),
            # a dispatched real step without the snapshot's loss, or an unobserved one,
            # leaves the check to the next
            pending_verify=(state.pending_verify & ~verifying)
            if dispatched or not observe
            else jnp.asarray(False),
            horizon_scale=scale,
            residuals=residuals,
            corrector=corrector,
            monitor=monitor,
            bandit=bandit,
        )
        return updates, with_phase(new, ph)

    def predicted_update(
        state: HybridState, params: PyTree, *, loss: jax.Array | None = None
    ) -> tuple[PyTree, HybridState]:
        groups, _ = layout(params)
        st = state.stats
        fresh = state.phase_step == 0
        eye = jnp.eye(size, dtype=jnp.float32)
        transport = jnp.where(fresh, eye, state.transport)
        ctx = PredictContext(state.phase_step, st.accuracy, st.log_loss_trend)
        p, dynamics = pred.predict(state.dynamics, ctx)
        one_step, dlog = corrected(state, p)
        coefs = jnp.einsum("gb,gbc->gc", one_step, transport)
        step_map = _basis.transition(one_step, cfg.basis_ema_decay)
        transport = jnp.einsum("gij,gjk->gik", step_map, transport)
        delta = _basis.combine(state.basis, coefs, groups, params)
        updates, bad = _guard(params, delta)
        bad = bad | ~jnp.all(jnp.isfinite(coefs))

        log_pred = jnp.where(fresh, jnp.log(st.loss_level), st.predicted_log_loss) + dlog
        measured = jnp.asarray(jnp.nan if loss is None else loss, jnp.float32)
        monitor, verdict = _monitor.observe_predicted(
            state.monitor,
            monitor_settings,
            delta_finite=~bad,
            loss=measured,
            predicted_loss=jnp.exp(log_pred),
        )
        i32 = lambda b: b.astype(jnp.int32)
        c = state.counters
        counters = c._replace(
            predicted_steps=c.predicted_steps + 1,
            predict_phases=c.predict_phases + i32(fresh),
            nonfinite_predictions=c.nonfinite_predictions + i32(bad),
            forward_passes=c.forward_passes + i32(jnp.isfinite(measured)),
        )
        upd_norm = jnp.where(bad, jnp.nan, _basis.norm(state.basis, coefs))
        last = StepInfo(
            state.phase,
            jnp.asarray(False),
            measured,
            jnp.exp(log_pred),
            state.phase_budget,
            upd_norm,
            jnp.asarray(False),
            jnp.asarray(False),
            verdict.level,
            jnp.int32(-1),
            jnp.asarray(jnp.nan, jnp.float32),
        )
        scale = jnp.where(
            verdict.shrink_horizon, state.horizon_scale * cfg.horizon_shrink, state.horizon_scale
        )
        scale = jnp.maximum(scale, scale_floor)
        ph = _phases.advance(phase_of(state), cfg, jnp.asarray(False), state.phase_budget)
        # a non-finite prediction or a monitor warning ends the phase now: verification next
        stop = bad | verdict.force_real
        correct = _phases.Phase(
            jnp.full((), _phases.CORRECT, jnp.int32),
            jnp.zeros((), jnp.int32),
            jnp.full((), cfg.correct_steps, jnp.int32),
            state.consecutive,
        )
        ph = choose(stop, correct, ph)
        new = state._replace(
            transport=transport,
            dynamics=dynamics,
            stats=st._replace(predicted_log_loss=log_pred),
            counters=counters,
            last=last,
            pending_verify=ph.phase != _phases.PREDICT,
            horizon_scale=scale,
            monitor=monitor,
        )
        return updates, with_phase(new, ph)

    def update(
        grads: PyTree,
        state: HybridState,
        params: PyTree | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, HybridState]:
        if params is None:
            raise ValueError("hj.predictive: update needs params")
        return jax.lax.cond(
            needs_gradient(state),
            lambda s: real_update(grads, s, params, **extra_args),
            lambda s: predicted_update(s, params),
            state,
        )

    return PredictiveTransformation(
        init,
        update,
        needs_gradient=needs_gradient,
        observes=observes,
        real_update=real_update,
        predicted_update=predicted_update,
        config=cfg,
        predictor=pred,
    )


def _global_norm(tree: PyTree) -> jax.Array:
    """Euclidean norm of all leaves together, in float32."""
    sq = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(sq, jnp.zeros((), jnp.float32)))


def _guard(params: PyTree, delta: PyTree) -> tuple[PyTree, jax.Array]:
    """Zeroes every element of ``delta`` that would make its parameter non-finite.

    Returns:
      ``(safe_delta, any_held_back)``.
    """
    safe, held = [], []
    leaves, treedef = jax.tree.flatten(params)
    for p, d in zip(leaves, jax.tree.leaves(delta), strict=True):
        ok = jnp.isfinite(p + d)
        safe.append(jnp.where(ok, d, jnp.zeros_like(d)))
        held.append(~jnp.all(ok))
    return jax.tree.unflatten(treedef, safe), jnp.any(jnp.stack(held))


def force_full(state: HybridState, n: int | jax.Array) -> HybridState:
    """Starts a Full phase of ``n`` real steps now (ends any Predict phase).

    Jit-safe. The usual schedule resumes after the ``n`` steps.

    Args:
      state: a ``HybridState``.
      n: number of real steps (>= 1; a traced value below 1 counts as 1).

    Returns:
      The state with the phase machine reset to Full.
    """
    if isinstance(n, int) and n < 1:
        raise ValueError(f"force_full: n must be >= 1; got {n}")
    ph = _phases.full_phase(n)
    return state._replace(
        phase=ph.phase,
        phase_step=ph.phase_step,
        phase_budget=ph.phase_budget,
        consecutive=ph.consecutive,
        # an interrupted Predict phase is still verified by the next real step
        pending_verify=state.pending_verify | state.snapshot_valid,
    )
