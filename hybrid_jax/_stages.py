"""The stages a real step is made of: small pure functions on NamedTuples.

A real step is ``check -> apply -> fit -> level -> learn -> plan`` (see
``hybrid_jax._transform.real_update``); each stage reads the state the step started
from and what the stages before it produced, and returns a NamedTuple.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _bandit, _basis, _encoder, _monitor, _phases, _residuals
from ._basis import Layout, layout  # noqa: F401  (the stages' callers read them here)
from ._carry import choose
from ._cost import pays
from ._predictors import Observation, PredictContext, Prediction, Predictor
from ._schedules import at_step
from ._state import HybridState
from .config import (
    CONFIDENCE_EMA_DECAY,
    CORRECTOR_FORGET,
    FEATURE_EMA_DECAY,
    LOSS_EMA_DECAY,
    HybridConfig,
    MonitorSettings,
)

PyTree = Any

# A phase rejected by the cost rule alone keeps its verifying step's update, applied
# from the snapshot (``check``); False: a rollback applies nothing.
REUSE_VERIFY_GRADIENT = True
# A phase within the guard that lowered the loss, but by less than the cost rule asks,
# keeps its parameters and still counts as rejected (the run backs off); False: it is
# rolled back (``REUSE_VERIFY_GRADIENT`` applies).
KEEP_WHAT_HELPED = True
# The horizon scale starts at its floor (a probe of ``min_horizon`` steps) and falls back
# to it at a rollback (``plan``); False: it starts at 1, a rollback shrinks it.
PROBE_AFTER_ROLLBACK = True


class Setup(NamedTuple):
    """What the stages need that does not change during a run (static)."""

    cfg: HybridConfig
    inner: optax.GradientTransformationExtraArgs
    pred: Predictor
    monitor: MonitorSettings | None  # None: the monitor is off


def ema(old: jax.Array, new: jax.Array, decay: float) -> jax.Array:
    return decay * old + (1.0 - decay) * new


# Up to this many elements in all, a tree's norm is one reduction over its leaves joined
# (one kernel on a GPU, where a small model's step is bound by its kernel launches);
# above it, one reduction per leaf (no joined copy of a large tree).
JOINED_NORM_MAX = 1 << 20


def global_norm(tree: PyTree) -> jax.Array:
    """Euclidean norm of all leaves together, in float32."""
    leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(tree)]
    if 1 < len(leaves) and sum(x.size for x in leaves) <= JOINED_NORM_MAX:
        return jnp.sqrt(jnp.sum(jnp.square(jnp.concatenate([x.ravel() for x in leaves]))))
    sq = [jnp.sum(jnp.square(x)) for x in leaves]
    return jnp.sqrt(sum(sq, jnp.zeros((), jnp.float32)))


def corrected(setup: Setup, state: HybridState, p: Prediction) -> tuple[jax.Array, jax.Array]:
    """The prediction's (coefficients, log-loss change), through the corrector if on."""
    coefs = jnp.asarray(p.coefs, jnp.float32)
    dlog = jnp.asarray(p.log_loss_change, jnp.float32)
    if setup.cfg.correct_predictions:
        return _residuals.correct(state.corrector, coefs, dlog)
    return coefs, dlog


class Peek(NamedTuple):
    """The predictor's one-step prediction before this real step (its ground truth)."""

    raw: Prediction
    coefs: jax.Array  # (G, B), corrected
    dlog: jax.Array  # corrected log-loss change
    loss: jax.Array  # the predicted loss level after one step (NaN if unknown)


def peek(setup: Setup, state: HybridState) -> Peek:
    st = state.stats
    p, _ = setup.pred.predict(
        state.dynamics, PredictContext(jnp.int32(0), st.accuracy, st.log_loss_trend)
    )
    coefs, dlog = corrected(setup, state, p)
    known = jnp.isfinite(st.loss_level) & (st.loss_level > 0)
    return Peek(p, coefs, dlog, jnp.where(known, st.loss_level * jnp.exp(dlog), jnp.nan))


class Check(NamedTuple):
    """Guard, verification and the monitor's verdict on a real step."""

    skip: jax.Array  # non-finite loss or gradient: nothing is applied
    accepted: jax.Array  # the Predict phase being verified passed
    rollback: jax.Array  # the parameters go back to the snapshot
    rejected: jax.Array  # the phase did not pay (rolled back or kept): the run backs off
    reuse: jax.Array  # a rollback that applies this step's update from the snapshot
    drop: jax.Array  # skip, or a rollback without reuse: the optimizer's update is not applied
    verdict: _monitor.Verdict
    monitor: _monitor.MonitorState
    short: jax.Array  # the phase passed the guard but not the cost rule


def check(
    setup: Setup,
    state: HybridState,
    *,
    loss: jax.Array,
    loss_given: bool,
    grad_norm: jax.Array,
    snapshot_loss: jax.Array,
    verifying: bool,
    predicted_loss: jax.Array,
) -> Check:
    """Non-finite guard, verification of the Predict phase that ended, monitor.

    A phase is accepted when the loss at the new parameters is within
    ``verify_tolerance`` of the snapshot's (the guard) and the cost rule holds (``pays``).
    A phase that passed the guard but not the cost rule is ``rejected`` (the run backs
    off). Where it lowered the loss on the verifying batch it keeps its parameters
    (``KEEP_WHAT_HELPED``; unless the monitor rolls back); otherwise it is rolled back
    with ``reuse``: the verifying step's gradient, taken at the predicted parameters at
    most ``max_horizon`` steps from the snapshot (a stale gradient, as in asynchronous
    training), is applied as a real update from the snapshot. After the guard or the
    monitor (a point that may be far off) nothing is.
    """
    loss_ok = jnp.isfinite(loss) if loss_given else jnp.asarray(True)
    skip = ~(loss_ok & jnp.isfinite(grad_norm))
    tolerated = (1.0 + setup.cfg.verify_tolerance) * snapshot_loss
    guarded = verifying & jnp.isfinite(snapshot_loss) & loss_ok & (loss <= tolerated)
    paid = pays(setup.cfg, state, snapshot_loss, loss)
    monitor, verdict = _monitor.observe_real(
        state.monitor, setup.monitor, loss=loss, grad_norm=grad_norm, predicted_loss=predicted_loss
    )
    accepted = guarded & paid & ~verdict.rollback
    kept = accepted | (guarded & (loss < snapshot_loss) if KEEP_WHAT_HELPED else False)
    if verifying:  # only a verifying step has a snapshot to go back to
        rejected = state.snapshot_valid & (~accepted | verdict.rollback)
        rollback = state.snapshot_valid & (~kept | verdict.rollback)
    else:
        rejected = rollback = jnp.asarray(False)
    reuse = rollback & guarded & ~paid & ~verdict.rollback & ~skip
    if not REUSE_VERIFY_GRADIENT:
        reuse = jnp.asarray(False)
    return Check(
        skip=skip,
        accepted=jnp.asarray(accepted),
        rollback=rollback,
        rejected=rejected,
        reuse=reuse,
        drop=skip | (rollback & ~reuse),
        verdict=verdict,
        monitor=monitor,
        short=jnp.asarray(guarded & ~paid),
    )


def apply_inner(
    setup: Setup, grads: PyTree, state: HybridState, params: PyTree, drop: jax.Array, **extra
) -> tuple[PyTree, PyTree]:
    """The wrapped optimizer's update, zero (and its state unchanged) where ``drop``.
    With ``schedule_steps="global"`` its schedules see the global step."""
    inner = state.inner
    if setup.cfg.schedule_steps == "global":
        inner = at_step(inner, state.step)
    updates, inner_state = setup.inner.update(grads, inner, params, **extra)
    # The zero is opaque to XLA: a zero *constant* of a parameter's shape is merged with
    # the backward pass's zero-initialised accumulators (of scanned layers), and is then
    # written out and copied as a whole buffer on every step.
    zero = jax.lax.optimization_barrier(jnp.zeros((), jnp.float32))
    updates = jax.tree.map(lambda u: jnp.where(drop, zero.astype(u.dtype), u), updates)
    return updates, choose(drop, state.inner, inner_state)


class Fit(NamedTuple):
    """The real update against the basis (an observed step)."""

    gram: _basis.Gram
    target: jax.Array  # (G, B): least-squares coefficients of the update
    r2: jax.Array  # (G,)
    ready: jax.Array  # the basis held a direction and the update was applied
    accuracy: jax.Array  # running realised cosine of the one-step predictions
    realised: jax.Array  # this step's realised cosine
    cos_last: jax.Array  # cosine between this update and the last one


def fit(setup: Setup, state: HybridState, updates: PyTree, lay: Layout, drop, pk: Peek) -> Fit:
    cfg, st = setup.cfg, state.stats
    g = _basis.gram(state.basis, updates, lay.groups, lay.n_groups, cfg.basis.sketch_stride)
    target, r2 = _basis.fit(g, cfg.basis.fit_ridge)
    ready = (state.basis.count >= 1) & ~drop
    # the one-step accuracy: measured only where no real step went unobserved
    one_step_ok = ready & (state.encoder.unobserved == 0)
    realised = _basis.cosine(g, pk.coefs)
    first = state.basis.count == 1
    running = jnp.where(first, realised, ema(st.accuracy, realised, CONFIDENCE_EMA_DECAY))
    last_dir = jnp.zeros((lay.n_groups, cfg.basis.size), jnp.float32).at[:, 0].set(1.0)
    return Fit(
        gram=g,
        target=target,
        r2=r2,
        ready=ready,
        accuracy=jnp.where(one_step_ok, running, st.accuracy),
        realised=realised,
        cos_last=jnp.where(ready, _basis.cosine(g, last_dir), 0.0),
    )


class Level(NamedTuple):
    """The loss level: an EMA of real-step losses, and its change."""

    level: jax.Array
    dlog: jax.Array  # change of log(level) over this step (0 if unknown)
    trend: jax.Array  # EMA of that change
    known: jax.Array  # the change is known


def level(setup: Setup, state: HybridState, loss: jax.Array, verdict: _monitor.Verdict) -> Level:
    """Flagged losses are left out; minibatch noise is mostly averaged away."""
    st = state.stats
    fresh = jnp.isfinite(loss) & (verdict.level < _monitor.WARNING)
    started = jnp.isfinite(st.loss_level)
    lvl = jnp.where(
        fresh, jnp.where(started, ema(st.loss_level, loss, LOSS_EMA_DECAY), loss), st.loss_level
    )
    known = fresh & (lvl > 0) & started & (st.loss_level > 0)
    dlog = jnp.where(
        known, jnp.log(jnp.where(known, lvl, 1.0) / jnp.where(known, st.loss_level, 1.0)), 0.0
    )
    trend = jnp.where(known, ema(st.log_loss_trend, dlog, LOSS_EMA_DECAY), st.log_loss_trend)
    return Level(lvl, dlog, trend, known)


class Learned(NamedTuple):
    """What an observed real step teaches the hybrid (unchanged when unobserved)."""

    basis: _basis.Basis
    encoder: _encoder.EncoderState
    dynamics: PyTree
    residuals: _residuals.ResidualBuffer
    corrector: _residuals.Corrector
    features: jax.Array  # (F,) normalised features (zeros when unobserved)
    update_norm: jax.Array  # NaN when unobserved


def features(
    setup: Setup, state: HybridState, f: Fit, lv: Level, *, loss, grad_norm, inner_state, norm
):
    cfg, enc = setup.cfg, state.encoder
    gap = jnp.where(enc.last_real_step >= 0, state.step - enc.last_real_step, 1).astype(jnp.int32)
    raw = _encoder.raw_features(
        loss=loss,
        log_loss_change=jnp.where(lv.known, lv.dlog, jnp.nan),
        grad_norm=grad_norm,
        update_norm=norm,
        cosine=jnp.where(f.ready, f.cos_last, jnp.nan),
        fit_r2=jnp.where(f.ready, jnp.mean(f.r2), jnp.nan),
        moments=_encoder.moment_norms(inner_state, cfg.basis.sketch_stride),
        phase=state.phase.id,
        gap=gap,
        phase_position=state.phase.step / jnp.maximum(state.phase.budget, 1),
        mean_coefs=jnp.where(f.ready, jnp.mean(f.target, axis=0), jnp.nan),
    )
    enc, feats = _encoder.normalise(enc, raw, FEATURE_EMA_DECAY)
    return _encoder.after_real_step(enc, state.step, True), feats, gap


def learn(
    setup: Setup,
    state: HybridState,
    updates,
    f: Fit,
    lv: Level,
    pk: Peek,
    *,
    loss,
    grad_norm,
    inner_state,
    drop,
) -> Learned:
    """Basis, encoder, predictor, residuals and corrector learn from an observed step."""
    cfg = setup.cfg
    norm = jnp.sqrt(jnp.sum(f.gram.uu))
    stale = state.encoder.unobserved >= max(cfg.full_steps, cfg.observe_every)
    b = cfg.basis  # after a quiet stretch (stale) the EMA of real updates starts anew
    basis = _basis.push(state.basis, updates, f.gram, b.ema_decay, ~drop, b.stride, stale)
    enc, feats, gap = features(
        setup, state, f, lv, loss=loss, grad_norm=grad_norm, inner_state=inner_state, norm=norm
    )
    obs = Observation(
        target_coefs=f.target,
        fit_r2=f.r2,
        loss=loss,
        log_loss_change=lv.dlog,
        grad_norm=grad_norm,
        update_norm=norm,
        cosine=f.cos_last,
        step=state.step,
        gap=gap,
        realised_cosine=jnp.where(f.ready, f.realised, jnp.nan),
        features=feats,
    )
    learning = f.ready & (state.phase.id != _phases.WARMUP)
    dynamics = jax.lax.cond(learning, setup.pred.observe, lambda s, o: s, state.dynamics, obs)
    # residuals and the corrector learn from one-step predictions of consecutive steps
    consecutive = f.ready & (gap == 1) & jnp.isfinite(f.realised)
    residuals = _residuals.record(
        state.residuals,
        pred_coefs=pk.coefs,
        true_coefs=f.target,
        pred_dlog=pk.dlog,
        true_dlog=lv.dlog,
        features=feats,
        horizon=jnp.int32(1),
        confidence=state.stats.confidence,
        keep=consecutive,
    )
    if not cfg.correct_predictions:  # nothing reads it: no need to learn it
        return Learned(basis, enc, dynamics, residuals, state.corrector, feats, norm)
    corrector = _residuals.update(
        state.corrector,
        pred_coefs=jnp.asarray(pk.raw.coefs, jnp.float32),
        true_coefs=f.target,
        pred_dlog=jnp.asarray(pk.raw.log_loss_change, jnp.float32),
        true_dlog=lv.dlog,
        forget=CORRECTOR_FORGET,
        keep=consecutive & lv.known,
    )
    return Learned(basis, enc, dynamics, residuals, corrector, feats, norm)


def unobserved(setup: Setup, state: HybridState) -> Learned:
    """An unobserved real step: only the encoder's counters move."""
    n_feat = _encoder.n_features(setup.cfg.basis.size)
    return Learned(
        basis=state.basis,
        encoder=_encoder.after_real_step(state.encoder, state.step, False),
        dynamics=state.dynamics,
        residuals=state.residuals,
        corrector=state.corrector,
        features=jnp.zeros((n_feat,), jnp.float32),
        update_norm=jnp.full((), jnp.nan, jnp.float32),
    )


class Reward(NamedTuple):
    value: jax.Array  # verified progress per unit of cost (NaN: none learned)
    arm: jax.Array  # the arm it was learned for (-1: none)
    bandit: _bandit.BanditState


def reward(
    setup: Setup, state: HybridState, *, snapshot_loss, loss, verifying: bool, observe: bool
) -> Reward:
    """The bandit learns verified progress per unit of cost, in units of the recent
    per-real-step progress."""
    cfg = setup.cfg
    h_done = state.last.horizon.astype(jnp.float32)
    progress = jnp.log(jnp.maximum(snapshot_loss, 1e-30)) - jnp.log(jnp.maximum(loss, 1e-30))
    per_step = jnp.maximum(jnp.abs(state.stats.log_loss_trend), 1e-3)
    cost = h_done * cfg.bandit.predicted_step_cost + cfg.bandit.verify_cost
    r = jnp.clip(progress / per_step / cost, -100.0, 100.0)
    learn_arm = verifying & (state.bandit.last_arm >= 0) & jnp.isfinite(r)
    bandit = state.bandit
    if observe and cfg.horizon_policy == "bandit":  # only the bandit policy reads it
        value = jnp.where(learn_arm, r, jnp.nan)
        bandit = _bandit.update(
            bandit, bandit.last_arm, bandit.last_context, value, cfg.bandit.discount
        )
    return Reward(
        jnp.where(learn_arm, r, jnp.nan), jnp.where(learn_arm, state.bandit.last_arm, -1), bandit
    )


class Plan(NamedTuple):
    """What decides the next Predict phase."""

    confidence: jax.Array
    scale: jax.Array  # the horizon's shrink factor
    horizon: jax.Array  # int32: the length of a Predict phase starting after this step
    arm: jax.Array  # int32: the bandit's arm for it (-1: no bandit)
    context: jax.Array  # the bandit's context


def shrink(setup: Setup, scale: jax.Array, verdict: _monitor.Verdict) -> jax.Array:
    """The horizon scale after a monitor caution (or worse)."""
    return jnp.where(verdict.shrink_horizon, scale * setup.cfg.horizon_shrink, scale)


def floor_scale(setup: Setup, scale: jax.Array) -> jax.Array:
    """The scale never shrinks the horizon below ``min_horizon``."""
    return jnp.maximum(scale, setup.cfg.min_horizon / setup.cfg.max_horizon)


def plan(
    setup: Setup,
    state: HybridState,
    ln: Learned,
    c: Check,
    f_accuracy,
    trend,
    bandit,
    observe: bool,
) -> Plan:
    """Confidence, horizon scale and the horizon (or the bandit's arm) of the next phase."""
    cfg = setup.cfg
    scale = shrink(setup, state.horizon_scale, c.verdict)
    after_rollback = 0.0 if PROBE_AFTER_ROLLBACK else scale * cfg.horizon_shrink
    scale = jnp.where(c.rejected, after_rollback, scale)
    scale = floor_scale(setup, jnp.where(c.accepted, jnp.minimum(scale * 2.0, 1.0), scale))
    if observe:
        ctx = PredictContext(jnp.int32(0), f_accuracy, trend)
        nxt, _ = setup.pred.predict(ln.dynamics, ctx)
        confidence = jnp.clip(jnp.asarray(nxt.confidence, jnp.float32), 0.0, 1.0)
    else:  # the predictor did not move: its confidence stands
        confidence = state.stats.confidence
    context = jnp.concatenate([ln.features, jnp.ones((1,), jnp.float32)])
    if cfg.horizon_policy == "bandit":
        arm, _ = _bandit.select(bandit, context, cfg.bandit.alpha)
        h = jnp.asarray(cfg.bandit.horizons, jnp.int32)[arm]
    else:
        arm, h = jnp.int32(-1), _phases.horizon(cfg, confidence)
    h = jnp.floor(h.astype(jnp.float32) * scale).astype(jnp.int32)
    return Plan(confidence, scale, jnp.clip(h, cfg.min_horizon, cfg.max_horizon), arm, context)
