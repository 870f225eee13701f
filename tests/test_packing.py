"""A state's small leaves packed by dtype (``hybrid_jax._packing``) and the steps that use it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import DIGITS_PHASES, few_metrics

import hybrid_jax as hj
from hybrid_jax import tasks
from hybrid_jax._packing import PackedState, StateLayout, packed, unpack_state


@pytest.fixture(scope="module")
def digits_batches():
    split = tasks.digits(0)
    it = tasks.batches(split.x_train, split.y_train, 64, 0)
    return [tuple(map(jnp.asarray, next(it))) for _ in range(160)]


def _state(predictor="last_update"):
    """``tx.init`` of the digits MLP's params; for the RSSM, a state of the shapes and
    dtypes of its init with random values (what is packed is only shapes and values;
    its init runs a hundred small programs, each compiled on first use)."""
    params = tasks.mlp_init(jax.random.PRNGKey(0))
    tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig(predictor=predictor))
    if predictor == "rssm":
        return _random_like(jax.eval_shape(tx.init, params))
    return tx.init(params)


def _random_like(shapes, seed=0):
    """Host-made random arrays of the shapes and dtypes in ``shapes``, different from
    leaf to leaf (so that a leaf unpacked in another's place shows)."""
    rng = np.random.default_rng(seed)

    def leaf(x):
        if x.dtype == jnp.bool_:
            value = rng.random(x.shape) < 0.5
        elif jnp.issubdtype(x.dtype, jnp.integer):
            value = rng.integers(0, 1 << 16, x.shape)
        else:
            value = rng.normal(size=x.shape)
        return jax.device_put(np.asarray(value, x.dtype))

    return jax.tree.map(leaf, shapes)


def _same(a, b, exact=True):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)  # rounding


@pytest.mark.parametrize("predictor", ["last_update", "rssm"])
def test_round_trip_keeps_every_leaf_and_leaves_few_arrays(predictor):
    state = _state(predictor)
    layout = StateLayout(state)
    assert layout.arrays < len(jax.tree.leaves(state)) / 4
    p = packed(state, layout)
    assert len(jax.tree.leaves(p)) == layout.arrays
    _same(state, p.unpacked())
    _same(state, jax.jit(layout.unpack)(p))
    _same(state, unpack_state(jax.jit(layout.pack)(state)))
    big = [x for x in jax.tree.leaves(state) if x.size > 1 << 16]
    assert all(any(k is x for k in p.kept) for x in big)  # kept leaves are not copied


def test_layout_is_hashable_and_equal_for_equal_shapes():
    a, b = StateLayout(_state()), StateLayout(_state())
    assert a == b and hash(a) == hash(b)
    assert StateLayout(_state("rssm")) != a
    with pytest.raises(TypeError, match="expected a PackedState of StateLayout"):
        a.unpack(_state())


def test_equal_layouts_are_one_object():
    from hybrid_jax._packing import layout_of

    a, b = layout_of(_state()), layout_of(_state())
    assert a is b and packed(_state()).layout is a
    assert layout_of(_state("rssm")) is not a and layout_of(_state("rssm")) != a


def test_fields_read_through_and_the_state_is_read_only():
    state = _state()
    p = packed(state)
    assert isinstance(p.unpacked(), hj.HybridState)
    _same(p.counters, state.counters)
    _same(p.basis, state.basis)
    assert int(p.step) == 0
    layout = p.layout
    big = [i for i, s in enumerate(layout.slots) if not s.packed]
    assert all(any(x is k for k in p.kept) for x in jax.tree.leaves(p.snapshot)
               if x.size > 1 << 16)  # fmt: skip
    assert len(big) == layout.kept
    with pytest.raises(AttributeError, match=r"unpacked\(\)\._replace"):
        p._replace(step=1)
    with pytest.raises(AttributeError):
        p._private  # noqa: B018
    with pytest.raises(AttributeError):
        p.no_such_field  # noqa: B018
    assert packed(p) is p and unpack_state(state) is state


def test_typed_keys_are_kept_and_abstract_states_pack_to_shapes():
    params = tasks.mlp_init(jax.random.PRNGKey(0))
    tx = hj.predictive(optax.chain(optax.add_noise(0.01, 0.55, 0), optax.adamw(1e-3)))
    state = tx.init(params)
    p = packed(state)
    keys = [x for x in p.kept if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended)]
    assert len(keys) == 1
    leaves = zip(jax.tree.leaves(state), jax.tree.leaves(p.unpacked()), strict=True)
    assert all(a is b for a, b in leaves if jax.dtypes.issubdtype(a.dtype, jax.dtypes.extended))
    abstract = packed(jax.eval_shape(lambda: state))
    assert abstract.layout == p.layout
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))


def test_a_leaf_of_other_shape_or_dtype_is_named():
    state = _state()
    layout = StateLayout(state)
    grown = state._replace(step=jnp.zeros((2,), jnp.int32))
    with pytest.raises(TypeError, match=r"state\.step is int32\[2\]"):
        layout.pack(grown)
    cast = state._replace(step=jnp.float32(0))
    with pytest.raises(TypeError, match=r"state\.step is float32"):
        jax.jit(layout.pack)(cast)
    assert StateLayout(grown) != layout  # a step given it would pack it anew


def test_a_donated_packed_state_says_so():
    p = packed(_state())
    p.step  # noqa: B018  (read once: the cache must not outlive the donation)
    jax.jit(lambda s: s, donate_argnums=0)(p)
    with pytest.raises(RuntimeError, match="donated"):
        p.step  # noqa: B018
    with pytest.raises(RuntimeError, match="donated"):
        p.unpacked()


def _run(digits_batches, *, pack, fuse):
    """100 digits steps of the run the fused tests take (``DIGITS_PHASES``,
    ``few_metrics``); returns the params, the state, each step's phase and the step."""
    params = tasks.mlp_init(jax.random.key(0))
    tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig(**DIGITS_PHASES))
    state = tx.init(params)
    step = hj.make_dispatched_step(
        tasks.mlp_loss, tx, pack_state=pack, fuse_predict=fuse, metrics_fn=few_metrics
    )
    phases = []
    for batch in digits_batches[:100]:
        params, state, m = step(params, state, batch)
        phases.append(int(m["phase"]))
    return params, state, phases, step


def test_packed_steps_take_the_same_steps_and_reach_the_same_parameters(
    digits_batches, digits_hybrid_run
):
    """Every kind of step, quiet stretches included, with the state packed: the phases
    of ``make_hybrid_step``'s run, its parameters and state up to rounding."""
    params, state, phases, step = _run(digits_batches, pack=True, fuse=False)
    (want_params, want_state), rows = digits_hybrid_run
    assert isinstance(state, PackedState) and step.phases_fused == 0
    assert all(n > 0 for n in step.kind_counts)  # every kind of step, packed
    assert int(want_state.counters.predicted_steps) > 0
    assert phases == [int(r["phase"]) for r in rows]
    _same(params, want_params, exact=False)
    _same(state.unpacked(), want_state, exact=False)  # its counters too


@pytest.mark.slow
def test_packed_fused_phases_take_the_same_steps_and_reach_the_same_parameters(digits_batches):
    """With ``fuse_predict=True`` too: packed and unpacked, the same phases and kinds,
    the same parameters and state up to rounding."""
    a = _run(digits_batches, pack=False, fuse=True)
    b = _run(digits_batches, pack=True, fuse=True)
    assert isinstance(b[1], PackedState)
    assert int(a[1].counters.predicted_steps) > 0 and b[3].phases_fused > 0
    assert a[2] == b[2] and a[3].kind_counts == b[3].kind_counts
    _same(a[0], b[0], exact=False)
    _same(a[1], b[1].unpacked(), exact=False)


@pytest.mark.slow
def test_a_packed_step_resumes_from_a_plain_state_and_a_plain_step_from_a_packed_one(
    digits_batches,
):
    cfg = hj.HybridConfig(monitor_every=0, confidence_threshold=0.0)
    tx = hj.predictive(optax.adamw(1e-3), cfg)
    step = hj.make_dispatched_step(tasks.mlp_loss, tx, pack_state=True, donate=False)
    params = tasks.mlp_init(jax.random.PRNGKey(0))
    state = tx.init(params)
    for batch in digits_batches[:100]:
        params, state, _ = step(params, state, batch)

    def go_on(p, s):  # 60 more steps from (p, s)
        for batch in digits_batches[100:160]:
            p, s, _ = step(p, s, batch)
        return p, s

    a = go_on(params, state)  # the packed state the step returned
    b = go_on(params, state.unpacked())  # as after a restore: packed anew
    _same(a, b)
    assert int(a[1].counters.predicted_steps) > int(state.counters.predicted_steps)
    plain = hj.make_dispatched_step(tasks.mlp_loss, tx)
    _, out, _ = plain(params, state, digits_batches[100])
    assert isinstance(out, hj.HybridState) and int(out.step) == 101


def test_a_consumed_packed_state_names_donation(digits_batches):
    params = tasks.mlp_init(jax.random.PRNGKey(0))
    tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig(**DIGITS_PHASES))
    step = hj.make_dispatched_step(  # the packed run's step: its programs compiled once
        tasks.mlp_loss, tx, pack_state=True, metrics_fn=few_metrics
    )
    state = packed(tx.init(params))
    new_params, _, _ = step(params, state, digits_batches[0])
    with pytest.raises(RuntimeError, match="donat"):
        step(new_params, state, digits_batches[1])


@pytest.mark.slow
def test_train_returns_and_checkpoints_a_plain_state(tmp_path, digits_batches):
    params = tasks.mlp_init(jax.random.PRNGKey(0))
    tx = hj.predictive(optax.adamw(1e-3))
    ckpt = hj.Checkpointer(tmp_path / "ckpt", config=hj.HybridConfig().to_dict(), every=5)
    data = lambda start: iter(digits_batches[start:])
    result = hj.train(tasks.mlp_loss, tx, params, data, steps=10, checkpointer=ckpt)
    assert isinstance(result.state, hj.HybridState)
    like = tx.init(tasks.mlp_init(jax.random.PRNGKey(0)))
    step, _, state, _ = ckpt.restore(jax.tree.map(jnp.zeros_like, result.params), like)
    assert step == 10 and isinstance(state, hj.HybridState)
    _same(result.state, state)


@pytest.mark.slow
def test_compile_from_shapes_then_step_and_prepare_sees_the_state(digits_batches):
    params = tasks.mlp_init(jax.random.PRNGKey(0))
    tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig(monitor_every=0))
    seen = []

    def prepare(state, t):
        seen.append(type(state).__name__)  # at trace time
        return state

    step = hj.make_dispatched_step(tasks.mlp_loss, tx, pack_state=True, prepare=prepare)
    shapes = jax.eval_shape(lambda: (params, tx.init(params), digits_batches[0]))
    step.compile(*shapes, jax.ShapeDtypeStruct((), jnp.int32))
    compiled = len(step.compiled_kinds)
    assert compiled >= 3 and set(seen) == {"HybridState"}
    state = tx.init(params)
    for batch in digits_batches[:30]:
        params, state, _ = step(params, state, batch, jnp.int32(0))
    assert len(seen) == compiled  # nothing traced again
    assert int(state.step) == 30
