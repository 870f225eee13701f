"""A predicted step of the hybrid: the update composed over the basis, guarded."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from . import _basis, _monitor, _phases
from . import _stages as S
from ._predictors import PredictContext
from ._state import Counters, HybridState, StepInfo

PyTree = Any


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
    step_map = _basis.transition(one_step, cfg.basis.ema_decay, cfg.basis.stride)
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
