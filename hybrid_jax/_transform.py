"""`hj.predictive`: an optax transformation that predicts part of its updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from . import _basis, _encoder, _phases
from ._config import HybridConfig
from ._predictors import Observation, PredictContext, Predictor, PredictorSpec, builtin
from ._state import Counters, HybridState, Stats, StepInfo

PyTree = Any


class PredictiveTransformation(optax.GradientTransformationExtraArgs):
    """An ``optax.GradientTransformationExtraArgs`` with the hybrid's extras.

    ``init`` and ``update`` behave as in optax. The extras (attributes):

    - ``needs_gradient(state) -> bool[]``: whether the next step is a real step;
    - ``real_update(grads, state, params, *, value=None, **extra_args)``: a real step;
    - ``predicted_update(state, params) -> (updates, state)``: a predicted step;
    - ``config``: the ``HybridConfig``; ``predictor``: the ``Predictor``.
    """

    def __new__(
        cls,
        init: Callable[..., Any],
        update: Callable[..., Any],
        *,
        needs_gradient: Callable[[HybridState], jax.Array],
        real_update: Callable[..., Any],
        predicted_update: Callable[..., Any],
        config: HybridConfig,
        predictor: Predictor,
    ) -> PredictiveTransformation:
        self = super().__new__(cls, init, update)
        self.needs_gradient = needs_gradient
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
    the predictor. In a Predict phase the gradient is ignored and the update is
    ``sum_b c_b direction_b`` with coefficients from the predictor. A predicted update
    never makes a parameter non-finite: such elements keep their value, the event is
    counted and a Full phase starts.

    Args:
      inner: any optax optimizer (its state advances on real steps only).
      config: the method's constants; ``HybridConfig()`` if omitted.
      predictor: a custom ``Predictor``; by default the built-in named by
        ``config.predictor``.

    Returns:
      A ``PredictiveTransformation``. Its ``update(grads, state, params, *, value=loss,
      **extra_args)`` needs ``params``; ``value`` (the loss) feeds the loss statistics.

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
            stats=Stats(nan, f32(0), f32(0), f32(0), f32(0), f32(0), f32(0), f32(0), nan),
            counters=Counters(*(i32(0) for _ in Counters._fields)),
            last=StepInfo(ph.phase, jnp.asarray(True), nan, nan, i32(0), f32(0)),
        )
        # Every leaf its own buffer, so that the state can be donated.
        return jax.tree.map(lambda x: jnp.array(x, copy=True), state)

    def needs_gradient(state: HybridState) -> jax.Array:
        return state.phase != _phases.PREDICT

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

    def ema(old: jax.Array, new: jax.Array, decay: float) -> jax.Array:
        return decay * old + (1.0 - decay) * new

    def real_update(
        grads: PyTree,
        state: HybridState,
        params: PyTree | None = None,
        *,
        value: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, HybridState]:
        if params is None:
            raise ValueError("hj.predictive: update needs params")
        groups, n_groups = layout(params)
        if value is not None:
            extra_args = {**extra_args, "value": value}
        updates, inner_state = inner.update(grads, state.inner, params, **extra_args)
        st = state.stats
        loss = jnp.asarray(jnp.nan if value is None else value, jnp.float32)

        g = _basis.gram(state.basis, updates, groups, n_groups)
        target, r2 = _basis.fit(g, cfg.fit_ridge)
        ready = state.basis.count >= 1
        ctx = PredictContext(jnp.int32(0), st.accuracy, st.log_loss_trend)
        peek, _ = pred.predict(state.dynamics, ctx)
        realised = _basis.cosine(g, peek.coefs)
        first = state.basis.count == 1
        running = jnp.where(first, realised, ema(st.accuracy, realised, cfg.confidence_ema_decay))
        accuracy = jnp.where(ready, running, st.accuracy)
        last_dir = jnp.zeros((n_groups, size), jnp.float32).at[:, 0].set(1.0)
        cos_last = jnp.where(ready, _basis.cosine(g, last_dir), 0.0)

        known = jnp.isfinite(loss) & (loss > 0) & jnp.isfinite(st.loss) & (st.loss > 0)
        ratio = jnp.where(known, loss, 1.0) / jnp.where(known, st.loss, 1.0)
        dlog = jnp.where(known, jnp.log(ratio), 0.0)
        trend = jnp.where(
            known, ema(st.log_loss_trend, dlog, cfg.loss_ema_decay), st.log_loss_trend
        )
        one_step = jnp.where(known, st.loss * jnp.exp(peek.log_loss_change), jnp.nan)

        grad_norm = _global_norm(grads)
        update_norm = jnp.sqrt(jnp.sum(g.uu))
        basis = _basis.push(state.basis, updates, g, cfg.basis_ema_decay)
        enc = state.encoder
        gap = jnp.where(enc.last_real_step >= 0, state.step - enc.last_real_step, 1)
        raw = _encoder.raw_features(
            loss=loss,
            log_loss_change=jnp.where(known, dlog, jnp.nan),
            grad_norm=grad_norm,
            update_norm=update_norm,
            cosine=jnp.where(ready, cos_last, jnp.nan),
            fit_r2=jnp.where(ready, jnp.mean(r2), jnp.nan),
            moments=_encoder.moment_norms(inner_state),
            phase=state.phase,
            gap=gap,
            phase_position=state.phase_step / jnp.maximum(state.phase_budget, 1),
            mean_coefs=jnp.where(ready, jnp.mean(target, axis=0), jnp.nan),
        )
        enc, features = _encoder.normalise(enc, raw, cfg.feature_ema_decay)
        enc = enc._replace(last_real_step=state.step)
        obs = Observation(
            target_coefs=target,
            fit_r2=r2,
            loss=loss,
            log_loss_change=dlog,
            grad_norm=grad_norm,
            update_norm=update_norm,
            cosine=cos_last,
            step=state.step,
            gap=gap.astype(jnp.int32),
            realised_cosine=jnp.where(ready, realised, jnp.nan),
            features=features,
        )
        learning = ready & (state.phase != _phases.WARMUP)
        dynamics = jax.lax.cond(learning, pred.observe, lambda s, o: s, state.dynamics, obs)
        nxt, _ = pred.predict(dynamics, PredictContext(jnp.int32(0), accuracy, trend))
        confidence = jnp.clip(jnp.asarray(nxt.confidence, jnp.float32), 0.0, 1.0)
        loss_ok = jnp.isfinite(loss) if value is not None else jnp.asarray(True)
        healthy = jnp.isfinite(update_norm) & jnp.isfinite(grad_norm) & loss_ok
        can_predict = (
            healthy & jnp.isfinite(nxt.confidence) & (confidence >= cfg.confidence_threshold)
        )
        next_h = _phases.horizon(cfg, confidence)

        stats = Stats(
            loss=jnp.where(jnp.isfinite(loss), loss, st.loss),
            log_loss_trend=trend,
            accuracy=accuracy,
            confidence=confidence,
            grad_norm=grad_norm,
            update_norm=update_norm,
            cosine=cos_last,
            fit_r2=jnp.where(ready, jnp.mean(r2), st.fit_r2),
            predicted_log_loss=st.predicted_log_loss,
        )
        c = state.counters
        counters = c._replace(
            backward_passes=c.backward_passes + 1,
            forward_passes=c.forward_passes + 1,
            real_steps=c.real_steps + 1,
        )
        last = StepInfo(state.phase, jnp.asarray(True), loss, one_step, next_h, update_norm)
        new = state._replace(
            inner=inner_state,
            basis=basis,
            encoder=enc,
            dynamics=dynamics,
            stats=stats,
            counters=counters,
            last=last,
        )
        ph = _phases.advance(phase_of(state), cfg, can_predict, next_h)
        return updates, with_phase(new, ph)

    def predicted_update(state: HybridState, params: PyTree) -> tuple[PyTree, HybridState]:
        groups, _ = layout(params)
        st = state.stats
        fresh = state.phase_step == 0
        eye = jnp.eye(size, dtype=jnp.float32)
        transport = jnp.where(fresh, eye, state.transport)
        ctx = PredictContext(state.phase_step, st.accuracy, st.log_loss_trend)
        p, dynamics = pred.predict(state.dynamics, ctx)
        one_step = jnp.asarray(p.coefs, jnp.float32)
        coefs = jnp.einsum("gb,gbc->gc", one_step, transport)
        step_map = _basis.transition(one_step, cfg.basis_ema_decay)
        transport = jnp.einsum("gij,gjk->gik", step_map, transport)
        delta = _basis.combine(state.basis, coefs, groups, params)
        updates, bad = _guard(params, delta)
        bad = bad | ~jnp.all(jnp.isfinite(coefs))

        log_pred = jnp.where(fresh, jnp.log(st.loss), st.predicted_log_loss) + p.log_loss_change
        c = state.counters
        counters = c._replace(
            predicted_steps=c.predicted_steps + 1,
            predict_phases=c.predict_phases + fresh.astype(jnp.int32),
            nonfinite_predictions=c.nonfinite_predictions + bad.astype(jnp.int32),
        )
        upd_norm = jnp.where(bad, jnp.nan, _basis.norm(state.basis, coefs))
        nan = jnp.asarray(jnp.nan, jnp.float32)
        last = StepInfo(
            state.phase, jnp.asarray(False), nan, jnp.exp(log_pred), state.phase_budget, upd_norm
        )
        new = state._replace(
            transport=transport,
            dynamics=dynamics,
            stats=st._replace(predicted_log_loss=log_pred),
            counters=counters,
            last=last,
        )
        ph = _phases.advance(phase_of(state), cfg, jnp.asarray(False), state.phase_budget)
        ph = jax.tree.map(lambda a, b: jnp.where(bad, a, b), _phases.full_phase(cfg.full_steps), ph)
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
    )
