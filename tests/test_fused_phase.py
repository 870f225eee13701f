"""A Predict phase run as one program (`fuse_predict=True`): the same steps, the same
parameters up to rounding, every step's metrics row, one program per phase."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import DIGITS_PHASES, few_metrics, first_digits_batches

import hybrid_jax as hj
from hybrid_jax import _kinds, tasks
from hybrid_jax._packing import PackedState

# The slow test's run: every real step observed (the fast tests run ``DIGITS_PHASES``).
CFG = {**DIGITS_PHASES, "observe_every": 1}


def _run(step, tx, batches, keep_at=None):
    """Steps through ``batches``; returns the rows, ``steps_ahead`` after each call, and
    the params and state after call ``keep_at`` (the last call by default)."""
    params = tasks.mlp_init(jax.random.key(0))
    state = tx.init(params)
    rows, ahead, kept = [], [], None
    keep_at = len(batches) - 1 if keep_at is None else keep_at
    for i, b in enumerate(batches):
        params, state, m = step(params, state, b)
        rows.append(m)
        ahead.append(getattr(step, "steps_ahead", 0))
        if i == keep_at:
            kept = jax.device_get((params, state))
    return kept, jax.device_get(rows), ahead


@pytest.mark.slow  # 160 digits steps, three times, through nine programs
@pytest.mark.parametrize("changes", [{}, {"predictor": "rssm"}], ids=["last_update", "rssm"])
def test_fused_phases_take_the_same_steps_and_reach_the_same_parameters(changes):
    tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig(**CFG, **changes))
    batches = first_digits_batches(160)
    fused = hj.make_dispatched_step(tasks.mlp_loss, tx, fuse_predict=True)
    _, rb, ahead = _run(fused, tx, batches)
    # compare where the fused run's state is not ahead of its calls
    end = max(i for i, a in enumerate(ahead) if a == 0)
    assert end >= 140 and max(ahead) >= 1
    (pb, sb), rb, _ = _run(fused, tx, batches, end)  # again, from a fresh state
    (pa, sa), ra, _ = _run(hj.make_dispatched_step(tasks.mlp_loss, tx), tx, batches, end)
    for key in ("step", "phase", "used_gradient", "verified", "rolled_back", "predicted_steps"):
        assert [int(r[key]) for r in ra] == [int(r[key]) for r in rb], key
    np.testing.assert_allclose(
        [float(r["update_norm"]) for r in ra], [float(r["update_norm"]) for r in rb], rtol=1e-4
    )
    assert int(sb.counters.predicted_steps) == int(sa.counters.predicted_steps) > 20
    assert int(sb.step) == int(sa.step) == end + 1
    assert fused.phases_fused >= int(sb.counters.predict_phases) > 3
    assert "predict" not in fused.compiled_kinds and "predict_phase" in fused.compiled_kinds
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), pa, pb)


def test_fuse_predict_refuses_the_monitors_forward_passes():
    tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig(monitor_every=2))
    with pytest.raises(ValueError, match="monitor_every"):
        hj.make_dispatched_step(tasks.mlp_loss, tx, fuse_predict=True)


def test_packed_rows_unpack_exactly():
    from hybrid_jax._fused import RowLayout, pack_rows, unpack_rows

    rows = {
        "f": jnp.asarray([1.5, jnp.nan, -jnp.inf, 3e-38], jnp.float32),
        "i": jnp.asarray([0, -1, 2**31 - 1, -(2**31)], jnp.int32),
        "b": jnp.asarray([True, False, True, False]),
        "v": jnp.arange(12, dtype=jnp.float32).reshape(4, 3) / 7,
    }
    like = jax.tree.map(lambda r: r[0], rows)
    packed = np.asarray(pack_rows(rows))
    assert packed.dtype == np.int32 and packed.shape == (4, 6)
    host = RowLayout(like).unpack(packed)
    for i, row in enumerate(host):
        for k, v in row.items():
            want = np.asarray(rows[k][i])
            assert v.dtype == want.dtype and v.shape == want.shape, k
            assert np.asarray(v).tobytes() == want.tobytes(), k
    stacked = unpack_rows(packed, like)
    assert all(np.asarray(stacked[k]).tobytes() == np.asarray(rows[k]).tobytes() for k in rows)


def test_a_scan_carries_only_what_changes_and_passes_the_rest_through():
    from hybrid_jax._carry import scan_changing, unchanged_leaves

    def body(c, _):
        return {"a": c["a"] + 1.0, "b": c["b"], "n": c["n"] * 2}, c["a"]

    start = {"a": jnp.zeros(3), "b": jnp.ones(2), "n": jnp.asarray(1)}
    assert unchanged_leaves(lambda c: body(c, None)[0], start) == (False, True, False)
    got, ys = jax.jit(lambda c: scan_changing(body, c, length=4))(start)
    want, wys = jax.lax.scan(body, start, None, length=4)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), (got, ys), (want, wys))
    passed = jax.make_jaxpr(lambda c: scan_changing(body, c, length=4)[0]["b"])(start)
    assert passed.jaxpr.outvars[0] is passed.jaxpr.invars[1]  # "b": not carried, not copied


def _fused_run(pack):
    """A fused run of 100 digits steps (``DIGITS_PHASES``, ``few_metrics``) and what the
    tests below read of it: every call's row and ``steps_ahead``, the state's step and
    phase after each call that ran a phase, the state before and after the first phase
    (the one the first call applied), and whether every call a phase served returned
    device arrays without the phase read on the host."""
    tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig(**DIGITS_PHASES))
    batches = first_digits_batches(100)
    fused = hj.make_dispatched_step(
        tasks.mlp_loss, tx, fuse_predict=True, metrics_fn=few_metrics, pack_state=pack
    )
    params = tasks.mlp_init(jax.random.key(0))
    state, rows, ahead, states = tx.init(params), [], [], []
    served, first_phase = [], None
    for b in batches:
        before = state
        params, state, m = fused(params, state, b)
        ahead.append(fused.steps_ahead)
        if ahead[-1] and first_phase is None:
            first_phase = (before, state)
        if fused._phase is not None and fused._phase.served > 1:  # a call the phase served
            on_device = all(isinstance(x, jax.Array) for x in jax.tree.leaves(m))
            served.append(fused._phase.result._host is None and on_device)
        rows.append(m)
        states.append((int(state.step), int(state.phase.id)) if ahead[-1] else None)
    return SimpleNamespace(
        tx=tx,
        batches=batches,
        step=fused,
        rows=rows,
        ahead=ahead,
        states=states,
        first_phase=first_phase,
        served=served,
    )


@pytest.fixture(scope="module")
def fused_run():
    """The fused run of the fast tests (the state unpacked): run once, read by several."""
    return _fused_run(pack=False)


def test_a_fused_phase_returns_only_the_leaves_it_changes(fused_run):
    """The first phase's program returned few of the state's small leaves: the parts a
    Predict phase does not change are the very arrays passed in."""
    before, state = fused_run.first_phase
    phase = fused_run.step._programs[hj._dispatch.PHASE]
    n_rest = len(jax.tree.leaves(state._replace(snapshot=None)))
    assert 0 < len(phase.changed) < n_rest // 2
    for name in ("inner", "basis", "encoder", "residuals", "bandit", "corrector"):
        old, new = jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(state, name))
        assert len(old) == len(new) and all(x is y for x, y in zip(old, new, strict=True)), name


def _first_phase_applies_it_all(rows, ahead, states):
    """At the first fused phase: its first call returned the state after all of it; the
    calls it took returned its rows; then the real step that verifies it."""
    i = next(i for i, a in enumerate(ahead) if a > 0)
    n = ahead[i]
    assert int(states[i][0]) == i + 1 + n  # the state's step: past the whole phase
    assert states[i][1] != hj.PREDICT  # the phase fitted in one program
    assert [int(r["step"]) for r in rows[i : i + n + 3]] == list(range(i + 1, i + n + 4))
    used = [bool(r["used"]) for r in rows[i : i + n + 2]]
    assert used == [False] * (n + 1) + [True] and bool(rows[i + n + 1]["verified"])


@pytest.mark.parametrize("pack", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_fused_phase_is_applied_at_once_and_serves_its_rows_without_waiting(
    request, pack, digits_hybrid_run
):
    """A phase's first call applies the whole phase (the state returned is past it);
    with a small ``metrics_fn`` the phase's program returns every step's row as device
    arrays (``_fused.ROW_OUTPUTS``): the calls serving them read nothing on the host,
    and every row matches the unfused step's (``make_hybrid_step``'s)."""
    run = _fused_run(pack=True) if pack else request.getfixturevalue("fused_run")
    fused = run.step
    assert run.served and all(run.served)
    phase = fused._programs[hj._dispatch.PHASE]
    assert isinstance(run.first_phase[1], PackedState) == pack
    assert fused.phases_fused > 3 and phase.every_row and phase.packed == pack
    assert "predict" not in fused.compiled_kinds and "predict_phase" in fused.compiled_kinds
    assert fused.kind_counts[_kinds.PLAIN] > 0  # unobserved steps between the phases
    end = max(i for i, a in enumerate(run.ahead) if a == 0)
    got = jax.device_get(run.rows[: end + 1])
    want = digits_hybrid_run[1][: end + 1]
    _first_phase_applies_it_all(got, run.ahead, run.states)
    steps = list(range(1, end + 2))  # each row: the state after its step
    assert [int(r["step"]) for r in got] == [int(r["step"]) for r in want] == steps
    for key in ("phase", "used", "verified"):
        assert [int(r[key]) for r in got] == [int(r[key]) for r in want], key
    np.testing.assert_allclose([r["norm"] for r in got], [r["norm"] for r in want], rtol=1e-4)
