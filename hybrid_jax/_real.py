"""A real step of the hybrid, composed of the stages of ``hybrid_jax._stages``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import _bandit, _phases
from . import _stages as S
from ._state import Counters, HybridState, Stats, StepInfo

PyTree = Any


class Measured(NamedTuple):
    """What the stages of a real step produced."""

    loss: jax.Array
    grad_norm: jax.Array
    peek: S.Peek
    check: S.Check
    level: S.Level
    learned: S.Learned
    accuracy: jax.Array
    cosine: jax.Array
    fit_r2: jax.Array


class RealUpdate(NamedTuple):
    """A real step's outcome before it touches the parameters."""

    updates: PyTree  # the optimizer's update (zero where dropped)
    rollback: jax.Array  # the update applies to the snapshot, not to the parameters
    state: HybridState


def real_parts(
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
) -> RealUpdate:
    """A real step of the kind ``kind_of(state)`` names (``hybrid_jax._kinds``):
    ``verify`` (static) checks the Predict phase that ended, with ``snapshot_value`` (the
    loss at the snapshot on the same batch); ``observe`` (static) teaches the hybrid.
    ``can_verify=False`` starts no Predict phase. Where ``rollback``, the parameters go
    back to ``state.snapshot`` and ``updates`` (zero, or the optimizer's update computed
    from the snapshot: ``_stages.REUSE_VERIFY_GRADIENT``) applies there."""
    if params is None:
        raise ValueError("hj.predictive: update needs params")
    observe = observe or verify
    snap = jnp.asarray(jnp.nan if snapshot_value is None else snapshot_value, jnp.float32)
    updates, inner_state, m = measure(
        setup,
        grads,
        state,
        params,
        value=value,
        snapshot_loss=snap,
        verify=verify,
        observe=observe,
        extra_args=extra_args,
    )
    rw = S.reward(setup, state, snapshot_loss=snap, loss=m.loss, verifying=verify, observe=observe)
    pl = S.plan(setup, state, m.learned, m.check, m.accuracy, m.level.trend, rw.bandit, observe)
    flags = (verify, observe, can_verify, snapshot_value is not None)
    new = after_real(setup, state, inner_state, m, rw, pl, flags)
    return RealUpdate(updates=updates, rollback=m.check.rollback, state=new)


def real_update(
    setup: S.Setup, grads: PyTree, state: HybridState, params: PyTree | None = None, **kw: Any
) -> tuple[PyTree, HybridState]:
    """``real_parts`` as an optax update: a rollback is returned as the update
    ``snapshot - params`` plus the update applied from the snapshot."""
    out = real_parts(setup, grads, state, params, **kw)
    if not kw.get("verify"):
        return out.updates, out.state
    updates = jax.tree.map(
        lambda u, s, p: jnp.where(out.rollback, (s - p).astype(u.dtype) + u, u),
        out.updates,
        state.snapshot,
        params,
    )
    return updates, out.state


def measure(
    setup: S.Setup,
    grads,
    state: HybridState,
    params,
    *,
    value,
    snapshot_loss,
    verify: bool,
    observe: bool,
    extra_args: dict,
) -> tuple[PyTree, PyTree, Measured]:
    """Guard, verification, the optimizer's update, the loss level, and (observed) the
    fit onto the basis and what the hybrid learns from it."""
    st = state.stats
    loss = jnp.asarray(jnp.nan if value is None else value, jnp.float32)
    grad_norm = S.global_norm(grads)
    pk = S.peek(setup, state)
    c = S.check(
        setup,
        state,
        loss=loss,
        loss_given=value is not None,
        grad_norm=grad_norm,
        snapshot_loss=snapshot_loss,
        verifying=verify,
        predicted_loss=pk.loss,
    )
    extra = {**extra_args, "value": value} if value is not None else extra_args
    at = S.choose(c.reuse, state.snapshot, params) if verify else params
    updates, inner_state = S.apply_inner(setup, grads, state, at, c.drop, **extra)
    lv = S.level(setup, state, loss, c.verdict)
    if not observe:
        ln = S.unobserved(setup, state)
        return (
            updates,
            inner_state,
            Measured(loss, grad_norm, pk, c, lv, ln, st.accuracy, st.cosine, st.fit_r2),
        )
    # computed once: otherwise XLA recomputes the optimizer's arithmetic inside every
    # fusion that reads the update
    updates, inner_state = jax.lax.optimization_barrier((updates, inner_state))
    lay = S.layout(setup.cfg, params)
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
    r2 = jnp.where(f.ready, jnp.mean(f.r2), st.fit_r2)
    return (
        updates,
        inner_state,
        Measured(loss, grad_norm, pk, c, lv, ln, f.accuracy, f.cos_last, r2),
    )


def after_real(
    setup: S.Setup, state: HybridState, inner_state, m: Measured, rw: S.Reward, pl: S.Plan, flags
) -> HybridState:
    """The state after a real step: the schedule (from the state it started from), what
    it asks of the next step, the statistics, counters and the step's record."""
    verify, observe, can_verify, measured = flags
    cfg, st, c, ln = setup.cfg, state.stats, m.check, m.learned
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
    remembered = _bandit.remember(rw.bandit, pl.arm, pl.context)
    unhealthy = c.skip | (~jnp.isfinite(ln.update_norm) if observe else False)
    # the back-off's exponent (``_phases.backed_off``; a declined gate counted by the
    # schedule): one more per rejected phase, ACCEPT_FORGIVES less per accepted one
    rejected = _phases.grown(sched.phase.rejected, c.rejected)
    forgiven = jnp.maximum(rejected - _phases.ACCEPT_FORGIVES, 0)
    rejected = jnp.where(c.accepted, forgiven, rejected).astype(jnp.int32)
    return state._replace(
        inner=inner_state,
        phase=sched.phase._replace(rejected=rejected),
        # a rollback backs off: a Full phase follows the next step (or, asked for inside
        # a Full phase, its end: the request is kept until then)
        pending=_phases.Pending(
            verify=sched.verify,
            veto=unhealthy | c.rejected,
            force_full=c.verdict.force_real
            | c.rejected
            | (state.pending.force_full & _phases.deferred(state.phase)),
        ),
        step=state.step + 1,
        basis=ln.basis,
        encoder=ln.encoder,
        dynamics=ln.dynamics,
        stats=Stats(
            loss=jnp.where(jnp.isfinite(m.loss), m.loss, st.loss),
            loss_level=m.level.level,
            log_loss_trend=m.level.trend,
            accuracy=m.accuracy,
            confidence=pl.confidence,
            grad_norm=m.grad_norm,
            update_norm=ln.update_norm if observe else st.update_norm,
            cosine=m.cosine,
            fit_r2=m.fit_r2,
            predicted_log_loss=st.predicted_log_loss,
        ),
        counters=_real_counters(state.counters, verify, measured, observe, c),
        last=StepInfo(
            phase=state.phase.id,
            used_gradient=jnp.asarray(True),
            loss=m.loss,
            predicted_loss=m.peek.loss,
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
        bandit=S.choose(entering & (pl.arm >= 0), remembered, rw.bandit),
    )


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
        cost_rejections=c.cost_rejections + i32(check.short & check.rejected),
    )
