"""The errors and warnings a user meets name the cause, and the fix where there is one."""

from __future__ import annotations

import dataclasses
import typing
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import fast_config, quadratic_batches, quadratic_loss, quadratic_params

import hybrid_jax as hj

CHECK = r"Check the data for NaN or Inf.*learning rate"


def _data(bad: typing.Callable[[int], bool]):
    """Quadratic batches; batch ``i`` holds a NaN where ``bad(i)``."""

    def data(start):
        i = start
        while True:
            x = np.random.default_rng(i).normal(size=(8, 4)).astype(np.float32)
            if bad(i):
                x[0, 0] = np.nan
            yield jnp.asarray(x)
            i += 1

    return data


def _train(tx, bad, steps, **kw):
    """``hj.train`` on quadratic batches, with its default stepping: the runs of
    ``_hybrid()`` below share its compiled programs."""
    kw.setdefault("sync_every", 10)
    return hj.train(
        quadratic_loss, tx, quadratic_params(), _data(bad), steps=steps, progress=False, **kw
    )


def _hybrid():
    return hj.predictive(optax.adam(1e-2), fast_config())


PLAIN = pytest.param(lambda: optax.adam(1e-2), id="plain")
HYBRID = pytest.param(_hybrid, id="hybrid")
HYBRID_SLOW = pytest.param(_hybrid, id="hybrid", marks=pytest.mark.slow)  # one more compile


def _messages(record):
    return [str(w.message) for w in record if issubclass(w.category, hj.NonfiniteWarning)]


# -- non-finite steps in hj.train -----------------------------------------------------


def test_nan_in_every_batch_stops_a_hybrid_run_naming_the_step_and_what_to_check():
    with pytest.warns(hj.NonfiniteWarning, match=r"step 0: the loss or gradient was not finite"):
        with pytest.raises(FloatingPointError) as info:
            _train(_hybrid(), lambda i: True, steps=60, max_nonfinite_steps=25)
    msg = str(info.value)
    assert "25 steps in a row, up to step 24, were not finite" in msg
    assert "25 real steps skipped: non-finite loss or gradient" in msg
    assert "max_nonfinite_steps" in msg and "None to never stop" in msg
    assert "Check the data for NaN or Inf" in msg and "learning rate" in msg


def test_a_plain_optimizer_that_applies_a_nan_is_warned_about_and_stopped():
    """A plain optax step applies the NaN (as optax does); the run says so at once and
    stops once the parameters, NaN from then on, give max_nonfinite_steps NaN losses."""
    with pytest.warns(hj.NonfiniteWarning, match=r"step 3: the loss was not finite.*applies"):
        with pytest.raises(FloatingPointError) as info:
            _train(optax.adam(1e-2), lambda i: i == 3, steps=60, max_nonfinite_steps=10)
    msg = str(info.value)
    assert "10 steps in a row, up to step 12, were not finite" in msg
    assert "10 steps with a non-finite loss, applied by the plain optimizer" in msg
    assert "Check the data for NaN or Inf" in msg


@pytest.mark.parametrize("make_tx", [HYBRID_SLOW, PLAIN])
def test_without_a_limit_every_nonfinite_step_is_counted_in_a_warning(make_tx):
    with pytest.warns(hj.NonfiniteWarning) as record:
        res = _train(make_tx(), lambda i: i >= 2, steps=30, max_nonfinite_steps=None)
    first, summary = _messages(record)
    assert "step 2:" in first and "summed up at the end" in first
    assert "28 of the 30 steps of this run were not finite" in summary
    assert "first at step 2, the last at step 29" in summary
    if isinstance(res.state, hj.HybridState):
        assert "28 real steps skipped" in summary and res.rows[-1]["skipped_updates"] == 28
        assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(res.params))
    else:
        assert "28 steps with a non-finite loss, applied by the plain optimizer" in summary


def test_occasional_nan_batches_warn_with_their_count_and_do_not_stop_the_run():
    bad = lambda i: i >= 12 and i % 3 == 0  # never 3 in a row: the run goes on
    with pytest.warns(hj.NonfiniteWarning) as record:
        res = _train(_hybrid(), bad, steps=60, max_nonfinite_steps=3)
    skipped = res.rows[-1]["skipped_updates"]
    assert skipped >= 2  # those that fell on real steps (predicted steps read no batch)
    first, summary = _messages(record)
    assert "the loss or gradient was not finite" in first
    assert f"{skipped} of the 60 steps of this run were not finite" in summary


def test_a_clean_run_gives_no_nonfinite_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", hj.NonfiniteWarning)
        res = _train(_hybrid(), lambda i: False, steps=30)
    assert res.rows[-1]["skipped_updates"] == 0


def _nan_after_first_step():
    """``last_update`` whose predictions after a Predict phase's first step are NaN."""
    base = hj.last_update()

    def predict(state, ctx):
        p, state = base.predict(state, ctx)
        coefs = jnp.where(ctx.k >= 1, jnp.nan, p.coefs)
        return p._replace(coefs=coefs), state

    return base._replace(predict=predict)


def test_nonfinite_predictions_are_warned_about_with_their_count():
    tx = hj.predictive(optax.adam(1e-2), fast_config(), predictor=_nan_after_first_step())
    with pytest.warns(hj.NonfiniteWarning) as record:
        res = _train(tx, lambda i: False, steps=60, stepping="cond")  # one program, its own
    held = res.rows[-1]["nonfinite_predictions"]
    assert held >= 2
    first, summary = _messages(record)
    assert "the predicted update was not finite" in first and "held back" in first
    assert f"{held} non-finite predicted updates held back" in summary
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(res.params))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_max_nonfinite_steps_is_checked(bad):
    with pytest.raises(ValueError, match=r"max_nonfinite_steps must be an int >= 1 or None"):
        _train(optax.adam(1e-2), lambda i: False, steps=2, max_nonfinite_steps=bad)


# -- has_aux ----------------------------------------------------------------------------


def _with_aux(params, batch):
    return quadratic_loss(params, batch), {"n": jnp.float32(batch.shape[0])}


def _step_through(maker, loss_fn, has_aux):
    tx = _hybrid()
    params = quadratic_params()
    step = maker(loss_fn, tx, has_aux=has_aux)
    return step(params, tx.init(params), quadratic_batches(1)[0])


@pytest.mark.parametrize("maker", [hj.make_hybrid_step, hj.make_dispatched_step])
def test_a_loss_returning_loss_and_aux_without_has_aux_says_to_pass_it(maker):
    with pytest.raises(
        TypeError, match=r"tuple of 2: if it returns \(loss, aux\), pass has_aux=True"
    ):
        _step_through(maker, _with_aux, has_aux=False)


@pytest.mark.parametrize("maker", [hj.make_hybrid_step, hj.make_dispatched_step])
def test_has_aux_with_a_scalar_loss_says_to_drop_it(maker):
    with pytest.raises(
        TypeError, match=r"when has_aux=True; it returned float32\[\].*has_aux=False"
    ):
        _step_through(maker, quadratic_loss, has_aux=True)


@pytest.mark.parametrize("make_tx", [HYBRID_SLOW, PLAIN])
def test_train_names_has_aux_and_accepts_it(make_tx):
    data = _data(lambda i: False)
    params = quadratic_params()
    with pytest.raises(TypeError, match=r"pass has_aux=True"):
        hj.train(_with_aux, make_tx(), params, data, steps=2, progress=False)
    res = hj.train(
        _with_aux, make_tx(), params, data, steps=2, progress=False, has_aux=True, stepping="cond"
    )
    assert np.isfinite(res.rows[-1]["loss"])


def test_tx_update_given_the_loss_and_aux_tuple_says_to_pass_the_loss():
    tx = _hybrid()
    params = quadratic_params()
    batch = quadratic_batches(1)[0]
    (loss, aux), grads = jax.value_and_grad(_with_aux, has_aux=True)(params, batch)
    with pytest.raises(TypeError, match=r"value must be the loss.*tuple of 2.*first element"):
        tx.update(grads, tx.init(params), params, value=(loss, aux))
    with pytest.raises(TypeError, match=r"value must be a float scalar; got float32\[3\]"):
        tx.update(grads, tx.init(params), params, value=jnp.ones(3))


def test_a_per_example_loss_says_to_reduce_it():
    with pytest.raises(TypeError, match=r"float scalar; got float32\[8\].*jnp\.mean"):
        _step_through(hj.make_hybrid_step, lambda p, b: jnp.sum(b @ p["w"], axis=1), False)


# -- donation ---------------------------------------------------------------------------


@pytest.mark.parametrize("maker", [hj.make_hybrid_step, hj.make_dispatched_step])
def test_reusing_donated_inputs_names_donation_and_the_fix(maker):
    tx = _hybrid()
    params = quadratic_params()
    state = tx.init(params)
    step = maker(quadratic_loss, tx)
    batch = quadratic_batches(1)[0]
    new_params, new_state, _ = step(params, state, batch)
    for args, leaf in (
        ((params, new_state), "params['b'] (float32[3])"),
        ((new_params, state), "state.inner[0].count (int32[])"),
    ):
        with pytest.raises(RuntimeError) as info:
            step(*args, batch)
        msg = str(info.value)
        assert msg.startswith(f"{maker.__name__}: {leaf} was deleted")
        assert "donates its params and state" in msg and "donate=False" in msg
        assert "keep using the params and state the step returns" in msg
        assert info.value.__cause__ is not None  # JAX's own error, chained
    step(new_params, new_state, batch)  # the returned ones still work


def test_train_given_consumed_params_names_donation_and_the_fix():
    params = quadratic_params()
    data = _data(lambda i: False)
    res = hj.train(quadratic_loss, optax.adam(1e-2), params, data, steps=2, progress=False)
    with pytest.raises(
        RuntimeError, match=r"hj\.train: params\['b'\].*was deleted.*result\.params"
    ):
        hj.train(quadratic_loss, optax.adam(1e-2), params, data, steps=2, progress=False)
    hj.train(quadratic_loss, optax.adam(1e-2), res.params, data, steps=2, progress=False)


def test_other_errors_of_a_step_pass_through_unchanged():
    tx = _hybrid()
    params = quadratic_params()
    step = hj.make_hybrid_step(quadratic_loss, tx)
    with pytest.raises(TypeError, match="dot_general"):  # a batch of the wrong shape
        step(params, tx.init(params), jnp.ones((8, 5)))


# -- the config -------------------------------------------------------------------------


def test_an_unknown_field_lists_the_valid_ones_and_names_the_closest():
    with pytest.raises(ValueError, match=r"unknown field 'foo'\. Valid fields: warmup_steps"):
        hj.HybridConfig(foo=1)
    with pytest.raises(ValueError, match=r"unknown field 'max_horizn'; did you mean 'max_horizon'"):
        hj.HybridConfig(max_horizn=3)


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: hj.HybridConfig(warmup_steps=2.5),
            r"warmup_steps must be an int; got 2\.5 \(float\)",
        ),
        (lambda: hj.HybridConfig(warmup_steps=True), r"must be an int; got True \(bool\)"),
        (lambda: hj.HybridConfig(confidence_threshold="0.9"), r"a float; got '0\.9' \(str\)"),
        (lambda: hj.HybridConfig(correct_predictions=1), r"a bool \(True or False\); got 1"),
        (lambda: hj.HybridConfig(predictor="rssn"), r"got 'rssn' \(str\); did you mean 'rssm'"),
        (lambda: hj.HybridConfig(monitor=3), r"an hj\.MonitorSettings or None \(off\); got 3"),
        (lambda: hj.HybridConfig(rssm={"hidden": 8}), r"build it with hj\.RSSMSettings\(\.\.\.\)"),
        (lambda: hj.BanditSettings(horizons=[1, 2]), r"tuple of ints; got \[1, 2\] \(list\)"),
    ],
)
def test_type_errors_name_the_field_the_expected_type_and_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


_GROUPS = [
    hj.HybridConfig,
    hj.BasisSettings,
    hj.RSSMSettings,
    hj.MonitorSettings,
    hj.BanditSettings,
]


@pytest.mark.parametrize(
    "cls,name",
    [(c, f.name) for c in _GROUPS for f in dataclasses.fields(c)],
)
def test_every_settings_field_explains_a_wrong_type(cls, name):
    with pytest.raises(ValueError) as info:
        cls(**{name: object()})
    msg = str(info.value)
    assert msg.startswith(f"{cls.__name__}.{name} must be ")
    assert " a int" not in msg and " a hj." not in msg
    assert msg.endswith("(object)")


def test_a_malformed_toml_file_is_named_with_the_cause(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("warmup_steps = = 3\n")
    with pytest.raises(ValueError, match=r"run\.toml: HybridConfig: invalid TOML"):
        hj.HybridConfig.load(path)
    path.write_text("[basis]\nsiz = 3\n")
    with pytest.raises(ValueError, match=r"run\.toml: BasisSettings: unknown field 'siz'.*'size'"):
        hj.HybridConfig.load(path)
    path.write_text("warmup_steps = 2.5\n")
    with pytest.raises(ValueError, match=r"run\.toml: .*warmup_steps must be an int; got 2\.5"):
        hj.HybridConfig.load(path)
