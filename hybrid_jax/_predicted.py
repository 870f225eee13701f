"""A predicted step of the hybrid, and a whole Predict phase as one program.

A predicted step is two parts: ``propose`` and ``advance`` work on the small state
(the predictor, the virtual basis's transport, statistics, the monitor, the phase
machine) and give the step's update as coefficients over the frozen basis; one pass
over the parameters and the basis (``_basis.combine``, guarded) applies them.
``predicted_update`` is one step; ``predicted_phase`` runs the small part for up to
``length`` steps of a Predict phase (``lax.scan``) and then applies their summed
coefficients in a single pass, so that a phase costs about one pass over the
parameters and the basis however long it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import _basis, _monitor, _phases
from . import _stages as S
from ._carry import scan_changing
from ._predictors import PredictContext
from ._state import Counters, HybridState, StepInfo

PyTree = Any


class Proposal(NamedTuple):
    """A predicted step's update, before it touches the parameters."""

    coefs: jax.Array  # (G, B): the update over the frozen basis (logical order)
    step_map: jax.Array  # (G, B, B): how the virtual basis moves with this update
    transport: jax.Array  # (G, B, B): frozen basis -> virtual basis before this step
    dlog: jax.Array  # predicted change of log(loss) over the step
    dynamics: PyTree  # the predictor's state after predicting
    idle: jax.Array  # vetoed by the step before: applies nothing


def propose(setup: S.Setup, state: HybridState, *, first: jax.Array | bool) -> Proposal:
    """The predictor's update for the step ``state`` wants (no parameter is read)."""
    cfg, st = setup.cfg, state.stats
    eye = jnp.broadcast_to(jnp.eye(cfg.basis.size, dtype=jnp.float32), state.transport.shape)
    transport = jnp.where(first, eye, state.transport)  # the virtual basis starts as the real one
    p, dynamics = setup.pred.predict(
        state.dynamics, PredictContext(state.phase.step, st.accuracy, st.log_loss_trend)
    )
    one_step, dlog = S.corrected(setup, state, p)
    return Proposal(
        coefs=jnp.einsum("gb,gbc->gc", one_step, transport),
        step_map=_basis.transition(one_step, cfg.basis.ema_decay, cfg.basis.stride),
        transport=transport,
        dlog=dlog,
        dynamics=dynamics,
        idle=state.pending.veto | state.pending.force_full,
    )


def predicted_update(
    setup: S.Setup,
    state: HybridState,
    params: PyTree,
    *,
    first: jax.Array | bool,
    loss: jax.Array | None = None,
) -> tuple[PyTree, HybridState]:
    """A predicted step (``first``: the first of its Predict phase, which takes the
    snapshot). A step vetoed by the one before (``state.pending``) applies nothing."""
    prop = propose(setup, state, first=first)
    lay = S.layout(setup.cfg, params)
    delta = _basis.combine(state.basis, prop.coefs, lay.groups, params)
    updates, held = guard_nonfinite(params, delta, prop.idle)
    new = advance(setup, state, prop, held=held, first=first, loss=loss)
    take = jnp.asarray(first) & ~prop.idle
    return updates, new._replace(snapshot=S.choose(take, params, state.snapshot))


def advance(
    setup: S.Setup,
    state: HybridState,
    prop: Proposal,
    *,
    held: jax.Array,
    first: jax.Array | bool,
    loss: jax.Array | None,
) -> HybridState:
    """The state after a predicted step whose update was ``prop`` (``held``: part of it
    was held back as non-finite). The snapshot is left to the caller."""
    cfg, st, idle = setup.cfg, state.stats, prop.idle
    bad = (held | ~jnp.all(jnp.isfinite(prop.coefs))) & ~idle
    log_pred = jnp.where(first, jnp.log(st.loss_level), st.predicted_log_loss) + prop.dlog
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
        transport=jnp.einsum("gij,gjk->gik", prop.step_map, prop.transport),
        dynamics=prop.dynamics,
        stats=st._replace(predicted_log_loss=log_pred),
        monitor=monitor,
        horizon_scale=S.floor_scale(setup, S.shrink(setup, state.horizon_scale, verdict)),
    )
    kept = {name: getattr(state, name) for name in moved}
    norm = jnp.where(bad, jnp.nan, _basis.norm(state.basis, prop.coefs))
    return state._replace(
        **S.choose(idle, kept, moved),
        phase=sched.phase,
        pending=_phases.Pending(
            verify=sched.verify,
            veto=(bad | verdict.force_real) & ~idle,
            force_full=jnp.asarray(False),
        ),
        step=state.step + 1,
        counters=_predicted_counters(state.counters, idle, bad, measured, first),
        last=_predicted_info(state, idle, measured, jnp.exp(log_pred), verdict.level, norm),
        snapshot_valid=sched.snapshot_valid,
    )


def _predicted_counters(c: Counters, idle, bad, measured, first: jax.Array | bool) -> Counters:
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


# The parts of the state a predicted step changes, apart from the snapshot (and the params).
MOVING = (
    "phase",
    "pending",
    "step",
    "transport",
    "dynamics",
    "stats",
    "counters",
    "last",
    "snapshot_valid",
    "monitor",
    "horizon_scale",
)


def phase_steps(
    setup: S.Setup,
    state: HybridState,
    *,
    length: int,
    metrics_fn: Callable[[HybridState], Any] | None = None,
    unroll: int | bool = True,
) -> tuple[dict[str, Any], jax.Array, jax.Array, Any]:
    """The small state through up to ``length`` steps of the Predict phase ``state`` is
    in (no parameter is read): ``(moving, total, taken, rows)``, the ``MOVING`` fields
    after them, their summed coefficients over the frozen basis, how many steps were
    taken (the phase stops where it ends) and ``metrics_fn`` of each step's state
    (``None`` without ``metrics_fn``). The steps' held-back check is left to the pass.
    The fields a step leaves as they are come back as the very values given."""

    def body(carry, _):
        moving, total, taken = carry
        st = state._replace(**moving)
        on = st.phase.id == _phases.PREDICT  # the phase goes on
        is_first = st.phase.step == 0
        prop = propose(setup, st, first=is_first)
        new = advance(setup, st, prop, held=jnp.asarray(False), first=is_first, loss=None)
        moving = S.choose(on, {k: getattr(new, k) for k in MOVING}, moving)
        total = total + jnp.where(on & ~prop.idle, prop.coefs, 0.0)
        row = None if metrics_fn is None else metrics_fn(new)
        return (moving, total, taken + on.astype(jnp.int32)), row

    zero = jnp.zeros((), jnp.int32)
    start = ({k: getattr(state, k) for k in MOVING}, jnp.zeros_like(state.basis.gram[..., 0]), zero)
    (moving, total, taken), rows = scan_changing(body, start, length=length, unroll=unroll)
    return moving, total, taken, rows


def predicted_phase(
    setup: S.Setup,
    state: HybridState,
    params: PyTree,
    *,
    length: int,
    metrics_fn: Callable[[HybridState], Any],
    unroll: int | bool = True,
) -> tuple[PyTree, HybridState, Any, jax.Array]:
    """Up to ``length`` predicted steps of the Predict phase ``state`` is in, as one
    program: the small state steps through them (``phase_steps``: the parameters, the
    basis and the optimizer's state are read, never carried), then one guarded pass
    applies their summed update. It stops where the phase ends.

    Same steps as ``predicted_update`` called step by step with ``monitor_every = 0``,
    and the same parameters up to rounding, except where a parameter would become
    non-finite: here that is found once, on the phase's summed update (held back,
    counted as one non-finite prediction, and vetoing the next step).

    Returns:
      ``(params, state, rows, taken)``: the new parameters and state; ``rows``,
      ``metrics_fn`` of the state after each step, stacked (``length`` rows, of which
      the first ``taken`` are steps that were taken); ``taken``, int32 in ``1..length``.
    """
    take_snapshot = (state.phase.step == 0) & ~(state.pending.veto | state.pending.force_full)
    moving, total, taken, rows = phase_steps(
        setup, state, length=length, metrics_fn=metrics_fn, unroll=unroll
    )
    lay = S.layout(setup.cfg, params)
    delta = _basis.combine(state.basis, total, lay.groups, params)
    updates, held = guard_nonfinite(params, delta, jnp.asarray(False))
    new = state._replace(**moving, snapshot=S.choose(take_snapshot, params, state.snapshot))
    new = new._replace(
        pending=new.pending._replace(veto=new.pending.veto | held),
        counters=new.counters._replace(
            nonfinite_predictions=new.counters.nonfinite_predictions + held.astype(jnp.int32)
        ),
    )
    last_row = jax.tree.map(lambda r, f: r.at[taken - 1].set(f), rows, metrics_fn(new))
    stepped = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
    return stepped, new, last_row, taken
