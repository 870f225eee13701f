"""Shared helpers for the tests: a tiny quadratic problem and the digits MLP."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hybrid_jax as hj
from hybrid_jax import tasks

# The fast tier compiles many small programs; XLA:CPU compiles them about twice as fast
# without LLVM's optimisations (the fast tier in two processes: 213 s -> 131 s on 2
# cores, jax 0.10). Its tests compare programs compiled alike. The slow tier keeps the
# usual optimisations: it compares hundreds of steps of different programs to rounding,
# and unoptimised code rounds differently enough to show there (the RSSM's fused phases:
# 5e-3 relative in 160 steps). A flag this XLA does not know would abort the process,
# so it is probed first.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def _compile_fast():
    """Sets ``XLA_FLAGS`` to ``FAST_COMPILE_FLAGS`` where this XLA accepts them, unless
    the environment sets ``XLA_FLAGS`` already (test workers inherit what this sets)."""
    if "XLA_FLAGS" in os.environ:
        return
    probe = [sys.executable, "-c", "import jax.numpy as j; j.ones(2).sum().block_until_ready()"]
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE_FLAGS, "JAX_PLATFORMS": "cpu"}
    try:
        run = subprocess.run(probe, env=env, capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        run = None
    os.environ["XLA_FLAGS"] = FAST_COMPILE_FLAGS if run and run.returncode == 0 else ""


def pytest_configure(config):
    """The fast tier alone (``-m "not slow"``) compiles fast (before any test runs: XLA
    reads its flags when the first computation starts)."""
    if " ".join((config.getoption("markexpr") or "").split()) != "not slow":
        return
    from jax._src import xla_bridge

    if getattr(xla_bridge, "_backends", None):  # too late: XLA has read its flags
        msg = "the fast tier's compile flags come too late: XLA already started"
        warnings.warn(msg, stacklevel=1)
        return
    _compile_fast()


# Test processes run on the CPU and share the machine: no GPU memory reserved by each.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _share_compilations():
    """Tests that compile the same program (the same step for the same config, loss and
    shapes) compile it once per test process: a compilation cache in a fresh temporary
    folder per process (removed at exit; one shared by several processes could be read
    half-written), unless the environment configures one already."""
    if jax.config.jax_compilation_cache_dir:
        return
    path = tempfile.mkdtemp(prefix="hybrid-jax-tests-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


_share_compilations()


def quadratic_params(dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w": jax.random.normal(k1, (4, 3), jnp.float32).astype(dtype),
        "b": jax.random.normal(k2, (3,), jnp.float32).astype(dtype),
    }


def quadratic_loss(params, batch):
    """A least-squares problem; ``batch`` is a (n, 4) input whose targets are fixed."""
    x = batch
    target = jnp.ones((x.shape[0], 3), jnp.float32)
    pred = x @ params["w"].astype(jnp.float32) + params["b"].astype(jnp.float32)
    return jnp.mean(jnp.square(pred - target))


def quadratic_batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(8, 4)), jnp.float32) for _ in range(n)]


# The safety layer never changes the schedule: the monitor off, every phase accepted
# (no tolerance, no cost rule).
# What the tests written before the defaults were chosen assume: every real step observed,
# a phase kept if it does a quarter of what the real steps it replaced were expected to.
EARLIER_DEFAULTS = dict(observe_every=1, predict_cost_ratio=0.25)
SAFETY_OFF = dict(horizon_shrink=1.0, verify_tolerance=1e9, predict_cost_ratio=0.0, monitor=None)


def quadratic_run_until_predict(tx, n_batches):
    """A jitted quadratic run stopped at its first Predict phase.

    Returns ``(step, params, state, remaining batches)``.
    """
    params = quadratic_params()
    state = tx.init(params)
    step = hj.make_hybrid_step(quadratic_loss, tx)
    batches = iter(quadratic_batches(n_batches))
    while int(state.phase.id) != hj.PREDICT:
        params, state, _ = step(params, state, next(batches))
    return step, params, state, batches


def fast_config(**changes):
    """A config that reaches every phase within a few dozen steps, every real step
    observed (``observe_every=1``)."""
    base = dict(
        observe_every=1,
        warmup_steps=4,
        full_steps=3,
        correct_steps=2,
        max_consecutive_predicts=2,
        min_horizon=2,
        max_horizon=4,
        confidence_threshold=0.0,
    )
    base.update(changes)
    return hj.HybridConfig(**base)


# A digits MLP run (``tasks.mlp_loss``, ``optax.adamw(1e-3)``, batches of 64) that takes
# every kind of step within a hundred steps, quiet stretches and unobserved steps
# included (observe_every=4). The dispatched-step tests (fused, packed) run it with
# ``few_metrics`` and compare it with one ``make_hybrid_step`` run
# (``digits_hybrid_run``): each program is compiled once in a test process.
DIGITS_PHASES = dict(
    warmup_steps=20,
    full_steps=5,
    correct_steps=2,
    min_horizon=2,
    max_horizon=6,
    confidence_threshold=0.0,
    verify_tolerance=0.5,
    predict_cost_ratio=0.25,
    observe_every=4,
)


def first_digits_batches(n):
    """The first ``n`` digits training batches of 64 (seed 0), on the device."""
    split = tasks.digits(0)
    it = tasks.batches(split.x_train, split.y_train, 64, 0)
    return [tuple(map(jnp.asarray, next(it))) for _ in range(n)]


def few_metrics(s):
    """A ``metrics_fn`` of few arrays: a fused Predict phase's program returns every
    step's row as device arrays (``hybrid_jax._fused.ROW_OUTPUTS``)."""
    return {
        "step": s.step,
        "phase": s.phase.id,
        "used": s.last.used_gradient,
        "verified": s.last.verified,
        "norm": s.last.update_norm,
    }


@pytest.fixture(scope="session")
def digits_hybrid_run():
    """``make_hybrid_step``'s run of ``DIGITS_PHASES`` on ``first_digits_batches(100)`` (one
    program, every kind of step in a ``lax.switch``): what the dispatched runs (fused,
    packed) are compared with. Returns ``((params, state), rows)`` on the host, each row
    ``few_metrics`` of the state after its step."""
    tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig(**DIGITS_PHASES))
    step = hj.make_hybrid_step(tasks.mlp_loss, tx)
    params = tasks.mlp_init(jax.random.key(0))
    state, rows = tx.init(params), []
    for batch in first_digits_batches(100):
        params, state, _ = step(params, state, batch)
        rows.append(jax.device_get(few_metrics(state)))
    return jax.device_get((params, state)), rows


def monitored_config():
    """``fast_config`` with the monitor's forward pass every 2nd predicted step and the
    confidence horizon policy: the quadratic tests that step it share its program."""
    return fast_config(horizon_policy="confidence", confidence_threshold=0.3, monitor_every=2)


@pytest.fixture(scope="session")
def digits_split():
    return tasks.digits(seed=0)


def run_digits(split, tx, steps, seed, batch_size=64):
    """Trains the digits MLP with ``tx`` (a hybrid or a plain optax optimizer) through
    ``hj.train``; returns ``(params, state, last metrics row, held-out loss)``."""

    def data(start):
        return tasks.batches(split.x_train, split.y_train, batch_size, seed=seed, start=start)

    res = hj.train(
        tasks.mlp_loss,
        tx,
        tasks.mlp_init(jax.random.key(seed)),
        data,
        steps=steps,
        sync_every=steps,
        progress=False,
    )
    held_out = float(tasks.mlp_loss(res.params, (split.x_test, split.y_test)))
    return res.params, res.state, res.rows[-1], held_out


def run_command_line(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python3 -m hybrid_jax ARGS``, a process of its own."""
    cmd = [sys.executable, "-m", "hybrid_jax", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(params=["in_process", pytest.param("process", marks=pytest.mark.slow)])
def command_line(request, capsys):
    """Runs the command line ``python3 -m hybrid_jax ARGS``; returns a
    ``subprocess.CompletedProcess`` (exit status, stdout, stderr).

    In this process (the fast tier): ``hybrid_jax._cli.main(ARGS)``, whose return value,
    or argparse's ``SystemExit``, is the exit status, as ``python3 -m hybrid_jax`` calls
    it (an exception escaping ``main``, a traceback in a process, fails the test). As a
    process of its own in the slow tier.
    """
    if request.param == "process":
        return run_command_line

    from hybrid_jax import _cli

    def run(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        logger = logging.getLogger("hybrid_jax")  # main sets it up as a process would
        handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
        capsys.readouterr()
        try:
            status = _cli.main(list(args))
        except SystemExit as e:  # argparse: --help, an unknown flag
            status = 0 if e.code is None else e.code
        finally:
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["python3", "-m", "hybrid_jax", *args], status, out, err)

    return run


def pytest_collection_modifyitems(items):
    """The notebooks run in the slow tier (``pytest -m "not slow"`` leaves them out)."""
    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.slow)
