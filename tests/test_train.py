"""The driver, exact resume, checkpoint failures, memory emergencies and the CLI."""

import json
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from conftest import EARLIER_DEFAULTS

import hybrid_jax as hj
from hybrid_jax import tasks

CFG = hj.HybridConfig(
    warmup_steps=20,
    full_steps=8,
    correct_steps=3,
    max_horizon=5,
    predictor="rssm",
    rssm=hj.RSSMSettings(hidden=32, mlp=32, members=2, window=8),
    **EARLIER_DEFAULTS,
)


def _setup(split):
    def data(start):
        return tasks.batches(split.x_train, split.y_train, 32, seed=3, start=start)

    tx = hj.predictive(optax.adamw(1e-3), CFG)
    return tx, data


@pytest.mark.slow
def test_train_returns_rows_evals_and_matches_a_bare_loop(digits_split):
    tx, data = _setup(digits_split)
    res = hj.train(
        tasks.mlp_loss,
        tx,
        tasks.mlp_init(jax.random.key(0)),
        data,
        steps=120,
        eval_fn=lambda p: tasks.mlp_loss(p, (digits_split.x_test, digits_split.y_test)),
        eval_every=40,
        sync_every=16,
        progress=False,
    )
    assert [r["step"] for r in res.rows] == list(range(120))
    assert [s for s, _ in res.evals] == [39, 79, 119]
    assert {r["phase"] for r in res.rows} >= {hj.WARMUP, hj.FULL, hj.PREDICT}
    # the same run with a bare loop over the jitted step gives the same parameters
    params = tasks.mlp_init(jax.random.key(0))
    state = tx.init(params)
    step = hj.make_hybrid_step(tasks.mlp_loss, tx)
    it = data(0)
    for _ in range(120):
        params, state, _ = step(params, state, next(it))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), res.params, params)


@pytest.mark.slow
def test_train_steppings_take_the_same_steps(digits_split):
    _, data = _setup(digits_split)
    tx = hj.predictive(optax.adamw(1e-3), CFG)
    runs = [
        hj.train(
            tasks.mlp_loss,
            tx,
            tasks.mlp_init(jax.random.key(0)),
            data,
            steps=100,
            sync_every=16,
            progress=False,
            stepping=stepping,
        )
        for stepping in ("cond", "dispatched")
    ]
    a, b = ([(r["phase"], r["used_gradient"], r["verified"]) for r in x.rows] for x in runs)
    assert a == b and {p for p, _, _ in a} >= {hj.WARMUP, hj.FULL, hj.PREDICT}
    assert runs[1].rows[-1]["idle_steps"] == 0
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
        runs[0].params,
        runs[1].params,
    )


def _run_resume(out, steps, split_at, digits_split):
    """300 steps straight vs split_at + restore in a fresh process + the rest."""
    code = f"""
import jax, optax, json, sys
sys.path.insert(0, {str(__file__.rsplit("/", 1)[0])!r})
import hybrid_jax as hj
from hybrid_jax import tasks
from test_train import CFG
split = tasks.digits(0)
data = lambda start: tasks.batches(split.x_train, split.y_train, 32, seed=3, start=start)
tx = hj.predictive(optax.adamw(1e-3), CFG)
ck = hj.Checkpointer({str(out)!r}, config=CFG.to_dict(), every=1000)
res = hj.train(tasks.mlp_loss, tx, tasks.mlp_init(jax.random.key(0)), data,
               steps=int(sys.argv[1]), checkpointer=ck, resume=True, progress=False)
ck.close()
hj.report.write_jsonl(res.rows, sys.argv[2])
"""

    def go(n, path):
        subprocess.run([sys.executable, "-c", code, str(n), str(path)], check=True)
        return hj.report.read_jsonl(path)

    return go


@pytest.mark.slow
def test_resume_is_exact_across_processes(tmp_path, digits_split):
    go = _run_resume(tmp_path / "a", 300, 150, digits_split)
    straight = go(300, tmp_path / "straight.jsonl")
    go_split = _run_resume(tmp_path / "b", 300, 150, digits_split)
    first = go_split(150, tmp_path / "first.jsonl")
    second = go_split(300, tmp_path / "second.jsonl")
    assert [r["step"] for r in second] == list(range(150, 300))
    assert hj.PREDICT in {r["phase"] for r in first + second}
    drop = lambda r: {k: v for k, v in r.items() if k != "time"}
    assert [drop(r) for r in first + second] == [drop(r) for r in straight]
    ck_a = hj.Checkpointer(tmp_path / "a", config=CFG.to_dict())
    ck_b = hj.Checkpointer(tmp_path / "b", config=CFG.to_dict())
    like = tasks.mlp_init(jax.random.key(0))
    tx, _ = _setup(digits_split)
    _, pa, sa, _ = ck_a.restore(like, tx.init(like))
    _, pb, sb, _ = ck_b.restore(like, tx.init(like))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), (pa, sa), (pb, sb))


@pytest.mark.slow
def test_memory_emergency_triggers_a_checkpoint(tmp_path, digits_split):
    tx, data = _setup(digits_split)
    level = {"bytes": 10}

    def fake():
        return [
            {
                "device": "fake:0",
                "source": "device",
                "bytes_in_use": level["bytes"],
                "peak_bytes_in_use": level["bytes"],
                "bytes_limit": 1000,
            }
        ]

    mem = hj.MemoryMonitor(fake, emergency_fraction=0.5)
    seen = []

    def grow(row):
        seen.append(row["step"])
        if row["step"] == 40:
            level["bytes"] = 900

    ck = hj.Checkpointer(tmp_path / "ck", config=CFG.to_dict(), every=10_000)
    hj.train(
        tasks.mlp_loss,
        tx,
        tasks.mlp_init(jax.random.key(0)),
        data,
        steps=80,
        sync_every=10,
        callbacks=[grow],
        checkpointer=ck,
        memory=mem,
        progress=False,
    )
    steps = ck.all_steps()
    ck.close()
    assert 50 in steps  # the fetch after step 40 saw the emergency and saved after step 49
    assert mem.summary()["emergencies"] == 1


def test_bad_arguments_raise(digits_split):
    tx, data = _setup(digits_split)
    p = tasks.mlp_init(jax.random.key(0))
    with pytest.raises(ValueError, match="steps"):
        hj.train(tasks.mlp_loss, tx, p, data, steps=0)
    with pytest.raises(ValueError, match="checkpointer"):
        hj.train(tasks.mlp_loss, tx, p, data, steps=5, resume=True)


@pytest.mark.slow
def test_cli_main_job_writes_metrics_plots_and_comparison(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "hybrid_jax", "--steps", "200", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "hybrid" in proc.stdout and "adamw" in proc.stdout
    rows = hj.report.read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 200
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hybrid"]["backward_passes"] < 200


@pytest.mark.parametrize(
    "args,message",
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--config", "/nonexistent.toml"], "no such config file"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_cli_bad_input_exits_nonzero_without_traceback(tmp_path, command_line, args, message):
    proc = command_line("--out", str(tmp_path), *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_bad_config_value_is_reported(tmp_path, command_line):
    cfg = tmp_path / "c.toml"
    cfg.write_text("full_steps = 0\n")
    proc = command_line("--config", str(cfg), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "HybridConfig.full_steps" in proc.stderr


def test_the_last_rows_time_is_taken_once_the_last_step_is_done(monkeypatch, digits_split):
    """A row's time is its step's launch; a plain step's launches can run ahead of the
    device, so the run's wall-clock (the last row's time) must wait for the last step."""
    from hybrid_jax._clock import TrainingClock
    from hybrid_jax._metrics import METRIC_NAMES

    events, block, now = [], jax.block_until_ready, TrainingClock.now

    def spy(x):
        if getattr(x, "shape", None) == (len(METRIC_NAMES),):  # a step's metrics
            events.append(("wait", int(np.asarray(x)[METRIC_NAMES.index("step")])))
        return block(x)

    def clock_now(self):
        events.append(("clock", None))
        return now(self)

    monkeypatch.setattr(jax, "block_until_ready", spy)
    monkeypatch.setattr(TrainingClock, "now", clock_now)
    data = lambda start: tasks.batches(digits_split.x_train, digits_split.y_train, 32, 0, start)
    res = hj.train(
        tasks.mlp_loss, optax.adamw(1e-3), tasks.mlp_init(jax.random.key(0)), data,
        steps=6, progress=False,
    )  # fmt: skip
    last = res.rows[-1]["step"]
    assert len(res.rows) == 6
    waited = [i for i, e in enumerate(events) if e == ("wait", last)]
    assert waited, "the last step's metrics were not waited for"
    assert ("clock", None) in events[waited[-1] :]  # its time was read after the wait
