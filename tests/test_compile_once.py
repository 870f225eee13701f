"""A whole run through every phase compiles exactly once."""

import optax
from conftest import monitored_config, quadratic_batches, quadratic_loss, quadratic_params

import hybrid_jax as hj


def test_300_steps_through_every_phase_trace_once():
    traces = []

    def loss_fn(params, batch):
        traces.append(1)  # runs only while tracing
        return quadratic_loss(params, batch)

    tx = hj.predictive(optax.adamw(1e-2), monitored_config())
    params = quadratic_params()
    state = tx.init(params)
    step = hj.make_hybrid_step(loss_fn, tx)
    seen = set()
    for batch in quadratic_batches(320):
        params, state, m = step(params, state, batch)
        seen.add(int(m["phase"]))
    traces_after_first_compile = len(traces)
    assert seen == {hj.WARMUP, hj.FULL, hj.PREDICT, hj.CORRECT}
    assert step._cache_size() == 1
    # within one trace of the step, loss_fn is traced by eval_shape and once per kind of
    # step (real; verify: twice, at the snapshot and at the params; the two predicted
    # kinds: the monitor's forward); more calls would mean a retrace.
    assert traces_after_first_compile <= 6
    params, state, m = step(params, state, quadratic_batches(1, seed=5)[0])
    assert len(traces) == traces_after_first_compile
