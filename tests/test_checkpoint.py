"""Checkpointer: bit-exact round trips of params + HybridState, retention, fallback, config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import fast_config, quadratic_batches, quadratic_loss, quadratic_params

import hybrid_jax as hj
from hybrid_jax._checkpoint import Checkpointer

CFG = fast_config()  # the quadratic tests' common config: their step compiles once


@pytest.fixture(scope="module")
def trained():
    """Params and a HybridState after 10 steps (a Predict phase among them), the step fn
    (the fast tests' common step: ``optax.adam(1e-2)``, ``CFG``) and later batches."""
    tx = hj.predictive(optax.adam(1e-2), CFG)
    params = quadratic_params()
    state = tx.init(params)
    step = hj.make_hybrid_step(quadratic_loss, tx)
    batches = quadratic_batches(13)
    for b in batches[:10]:
        params, state, _ = step(params, state, b)
    return jax.device_get(params), jax.device_get(state), step, batches[10:]


def _with_h(params):
    """``params`` and a bfloat16 leaf ``"h"`` (the step does not take it)."""
    return params | {"h": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.bfloat16)}


def _without_h(params):
    return {k: v for k, v in params.items() if k != "h"}


def _device(tree):
    """On the device and committed to it, as the checkpointer restores arrays."""
    return jax.device_put(tree, jax.devices()[0])


def _bits(x):
    a = np.asarray(x)
    return a.dtype, a.shape, a.tobytes()


def assert_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert _bits(x) == _bits(y)


def _ckpt(path, **kw):
    return Checkpointer(path, config=CFG.to_dict(), **kw)


def test_round_trip_is_bit_exact_and_keeps_types(tmp_path, trained):
    params, state, step_fn, later = trained
    assert int(state.counters.backward_passes) > 0 and int(state.step) == 10
    assert int(state.counters.predicted_steps) > 0
    params = _with_h(params)
    key_data = np.asarray(jax.random.key_data(jax.random.key(7)))
    extra = {
        "data_position": 10,
        "rng": key_data,
        "typed_key": jax.random.key(3),
        "np_rng": np.random.default_rng(0).bit_generator.state,
        "time": 12.5,
        "reason": "emergency",
    }
    with _ckpt(tmp_path / "ck") as ck:
        assert ck.save(10, _device(params), _device(state), extra=extra, force=True)
        assert ck.all_steps() == [10] and ck.latest_step() == 10
    with _ckpt(tmp_path / "ck") as ck:
        for params_like, state_like in [
            (_device(params), _device(state)),
            (jax.eval_shape(lambda: _device(params)), jax.eval_shape(lambda: _device(state))),
        ]:
            step, p2, s2, extra2 = ck.restore(params_like, state_like)
            assert step == 10
            assert type(s2) is type(state_like) is hj.HybridState
            assert type(s2.stats) is hj._state.Stats and type(s2.last) is hj._state.StepInfo
            assert type(s2.inner[0]) is type(state.inner[0])
            assert p2["h"].dtype == jnp.bfloat16
            assert_bit_equal(p2, params)
            assert_bit_equal(s2, state)
    assert extra2["data_position"] == 10 and extra2["reason"] == "emergency"
    assert extra2["time"] == 12.5
    np.testing.assert_array_equal(extra2["rng"], key_data)
    assert extra2["rng"].dtype == np.uint32
    np.testing.assert_array_equal(
        jax.random.key_data(extra2["typed_key"]), jax.random.key_data(jax.random.key(3))
    )
    rng = np.random.default_rng()
    rng.bit_generator.state = extra2["np_rng"]
    assert rng.random() == np.random.default_rng(0).random()

    # Resuming continues bit-exactly. (Both from the host: the step takes them alike, as
    # uncommitted arrays, so the common step's program serves them.)
    pa, sa = _without_h(params), state
    pb, sb = jax.device_get((_without_h(p2), s2))
    for b in later:
        pa, sa, _ = step_fn(pa, sa, b)
        pb, sb, _ = step_fn(pb, sb, b)
    assert_bit_equal(jax.device_get((pa, sa)), jax.device_get((pb, sb)))


def test_typed_and_raw_prng_keys_in_the_state(tmp_path):
    state = {
        "key": jax.random.key(1),
        "keys": jax.random.split(jax.random.key(2), 3),
        "rbg": jax.random.key(0, impl="rbg"),
        "raw": jax.random.PRNGKey(3),
        "x": jnp.arange(4.0),
    }
    with _ckpt(tmp_path) as ck:
        ck.save(0, {"w": jnp.ones(2)}, state)
        for like in (state, jax.eval_shape(lambda: state)):
            _, _, s2, _ = ck.restore({"w": jnp.ones(2)}, like)
            for k in ("key", "keys", "rbg"):
                assert jax.dtypes.issubdtype(s2[k].dtype, jax.dtypes.prng_key)
                assert jax.random.key_impl(s2[k]) == jax.random.key_impl(state[k])
                np.testing.assert_array_equal(
                    jax.random.key_data(s2[k]), jax.random.key_data(state[k])
                )
            assert s2["raw"].dtype == jnp.uint32
            np.testing.assert_array_equal(s2["raw"], state["raw"])


def test_keep_last_n(tmp_path):
    p, s = {"w": jnp.zeros(3)}, {"n": jnp.int32(0)}
    with _ckpt(tmp_path, keep=2, every=1) as ck:
        for i in range(1, 6):
            assert ck.save(i, p, {"n": jnp.int32(i)})
        assert ck.all_steps() == [4, 5]
        assert sorted(d.name for d in tmp_path.iterdir() if d.is_dir()) == ["4", "5"]
        step, _, s2, _ = ck.restore(p, s)
        assert step == 5 and int(s2["n"]) == 5


def test_every_interval_and_force(tmp_path):
    p, s = {"w": jnp.zeros(3)}, {"n": jnp.int32(0)}
    with _ckpt(tmp_path, keep=10, every=3) as ck:
        written = [ck.save(i, p, s) for i in range(8)]
        assert written == [True, False, False, True, False, False, True, False]
        assert ck.save(7, p, s, force=True, extra={"reason": "emergency"})
        assert ck.all_steps() == [0, 3, 6, 7]
        step, _, _, extra = ck.restore(p, s)
        assert step == 7 and extra == {"reason": "emergency"}


def _truncate_arrays(step_dir):
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and "/d/" in str(f)]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(7)


def _delete_manifest(step_dir):
    (step_dir / "params" / "manifest.ocdbt").unlink()


def _delete_extra(step_dir):
    (step_dir / "extra" / "metadata").unlink()


@pytest.mark.parametrize("damage", [_truncate_arrays, _delete_manifest, _delete_extra])
def test_corrupted_latest_falls_back_with_a_warning(tmp_path, damage):
    p = {"w": jnp.arange(200.0).reshape(10, 20)}
    with _ckpt(tmp_path, every=1) as ck:
        ck.save(2, p, {"n": jnp.int32(2)})
        ck.save(4, p, {"n": jnp.int32(4)})
    damage(tmp_path / "4")
    with _ckpt(tmp_path, every=1) as ck:
        with pytest.warns(RuntimeWarning, match="step 4"):
            step, p2, s2, _ = ck.restore(p, {"n": jnp.int32(0)})
        assert step == 2 and int(s2["n"]) == 2
        np.testing.assert_array_equal(p2["w"], p["w"])
        assert ck.all_steps() == [2] and (tmp_path / "4.corrupt").is_dir()
        assert ck.save(4, p, {"n": jnp.int32(5)})  # training goes on from step 2
        assert ck.restore(p, {"n": jnp.int32(0)})[0] == 4


def test_other_config_raises_naming_the_field(tmp_path):
    p, s = {"w": jnp.zeros(3)}, {"n": jnp.int32(0)}
    with _ckpt(tmp_path) as ck:
        ck.save(0, p, s)
    other = CFG.replace(warmup_steps=3).to_dict() | {"seed": 1}
    with Checkpointer(tmp_path, config=other) as ck:
        with pytest.raises(ValueError, match=r"warmup_steps: stored 4, current 3") as e:
            ck.restore(p, s)
        assert "seed: stored <missing>, current 1" in str(e.value)


def test_other_structure_raises_naming_the_leaf(tmp_path):
    s = {"n": jnp.int32(0)}
    with _ckpt(tmp_path) as ck:
        ck.save(0, {"w": jnp.zeros(3)}, s)
        with pytest.raises(ValueError, match=r"\['w'\]: stored float32\[3\], target float32\[4\]"):
            ck.restore({"w": jnp.zeros(4)}, s)


def test_empty_directory_gives_none(tmp_path):
    with _ckpt(tmp_path / "nothing_yet") as ck:
        assert ck.restore({"w": jnp.zeros(3)}, {}) is None
        assert ck.all_steps() == [] and ck.latest_step() is None
        assert ck.directory.is_absolute()


def test_async_save_then_wait(tmp_path):
    p, s = {"w": jnp.arange(3.0)}, {"n": jnp.int32(1)}
    ck = _ckpt(tmp_path, async_save=True)
    assert ck.save(50, p, s)
    ck.wait()
    assert ck.all_steps() == [50]
    assert ck.restore(p, s)[0] == 50
    ck.close()


@pytest.mark.parametrize(
    "kwargs, name",
    [({"keep": 0}, "keep"), ({"every": 0}, "every"), ({"config": [1]}, "config")],
)
def test_invalid_arguments(tmp_path, kwargs, name):
    kw = {"config": CFG.to_dict()} | kwargs
    with pytest.raises(ValueError, match=name):
        Checkpointer(tmp_path, **kw)


def test_invalid_save_arguments(tmp_path):
    with _ckpt(tmp_path) as ck:
        with pytest.raises(ValueError, match="step"):
            ck.save(-1, {}, {})
        with pytest.raises(ValueError, match="extra"):
            ck.save(0, {}, {}, extra={"f": object()})
