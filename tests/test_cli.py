"""The main job (``python -m hybrid_jax``): flags and help, the printed config, what
``--resume`` says it found, Ctrl-C (checkpoint, metrics, exit 130, resume) and a fair
comparison (both arms checkpointed and timed alike); and the driver features it rests
on (the training clock, the stop request)."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
import types
import typing
from pathlib import Path

import numpy as np
import optax
import pytest
from conftest import (
    fast_config,
    quadratic_batches,
    quadratic_loss,
    quadratic_params,
    run_command_line,
)

import hybrid_jax as hj
from hybrid_jax import _cli, _clock, _job
from hybrid_jax.config import Predictors

CLI = [sys.executable, "-m", "hybrid_jax"]
_cli_run = run_command_line


def _first_line_with(proc: subprocess.Popen, text: str, timeout: float = 180) -> str:
    """Reads the process's stdout until a line contains ``text`` (killed after ``timeout``)."""
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            if text in line:
                return line
    finally:
        timer.cancel()
    raise AssertionError(f"no line with {text!r} before the process ended")


def _stop(proc: subprocess.Popen) -> str:
    """Kills the process; returns its stderr."""
    proc.kill()
    _, err = proc.communicate(timeout=60)
    return err


# -- flags, help, config -------------------------------------------------------------
def test_python_m_hybrid_jax_runs_the_command_line(tmp_path):
    """``python3 -m hybrid_jax`` is ``_cli.main`` with its exit status (the other tests of
    the command line run it in this process; the slow tier runs them as processes too)."""
    proc = _cli_run("--out", str(tmp_path), "--steps", "0")
    assert proc.returncode == 2
    assert "--steps must be >= 1" in proc.stderr and "Traceback" not in proc.stderr


def test_every_flag_has_help_and_help_shows_the_defaults(command_line):
    for action in _cli._parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
    proc = command_line("--help")
    assert proc.returncode == 0
    out = " ".join(proc.stdout.split())  # argparse wraps lines
    for shown in (
        "--steps N training steps of each arm (default: 1000)",
        "(default: runs/hybrid)",
        "(default: 0.001)",
        "(default: 64)",
        "--stepping {dispatched,cond}",
        "--predictor {" + ",".join(typing.get_args(Predictors)) + "}",
        "--print-config",
        "(default: dispatched)",
    ):
        assert shown in out, shown
    assert "``" not in proc.stdout  # plain text, no reST markup


def test_print_config_is_the_jobs_config_as_toml(command_line):
    proc = command_line("--print-config")
    assert proc.returncode == 0, proc.stderr
    assert hj.HybridConfig.from_toml(proc.stdout) == hj.HybridConfig(**_job.DEFAULT_CONFIG)
    proc = command_line("--print-config", "--predictor", "extrapolate")
    cfg = hj.HybridConfig.from_toml(proc.stdout)
    assert cfg.predictor == "extrapolate"
    assert cfg.max_horizon == _job.DEFAULT_CONFIG["max_horizon"]


def test_print_config_applies_the_config_file(tmp_path, command_line):
    path = tmp_path / "c.toml"
    path.write_text("warmup_steps = 7\nmax_horizon = 6\n")
    proc = command_line("--print-config", "--config", str(path))
    assert proc.returncode == 0, proc.stderr
    cfg = hj.HybridConfig.from_toml(proc.stdout)
    assert (cfg.warmup_steps, cfg.max_horizon) == (7, 6)


# -- what --resume finds ---------------------------------------------------------------
def test_resume_says_what_it_found_in_the_checkpoint_folder(tmp_path):
    """What ``--resume`` reports comes from ``hj.train``: no checkpoint, or none that can
    be read (named in a warning: there is no earlier one to fall back to). The two tests
    below check the whole job's output, as a process."""
    bad = tmp_path / "garbage" / "100"
    bad.mkdir(parents=True)
    (bad / "junk").write_text("not a checkpoint")

    def resume(ckpt):
        return hj.train(
            quadratic_loss,
            optax.adam(1e-2),
            quadratic_params(),
            _quadratic_data,
            steps=1,
            checkpointer=ckpt,
            resume=True,
            progress=False,
            desc="hybrid",
        )

    logger = logging.getLogger("hybrid_jax")
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        with hj.Checkpointer(tmp_path / "empty", config={}) as ckpt:
            assert resume(ckpt).start_step == 0
        with hj.Checkpointer(tmp_path / "garbage", config={}) as ckpt:
            found = r"checkpoint at step 100 .*no earlier checkpoint to fall back to"
            with pytest.warns(RuntimeWarning, match=found):
                assert resume(ckpt).start_step == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert lines == [
        f"hybrid: no checkpoint in {tmp_path / 'empty'}, starting at step 0",
        f"hybrid: no readable checkpoint in {tmp_path / 'garbage'}, starting at step 0",
    ]


@pytest.mark.slow  # a process of its own
def test_resume_on_an_empty_folder_says_so(tmp_path):
    proc = subprocess.Popen(
        [*CLI, "--resume", "--out", str(tmp_path), "--steps", "5", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = _first_line_with(proc, "starting at step 0")
    err = _stop(proc)
    assert line.strip() == (
        f"hybrid: no checkpoint in {tmp_path / 'checkpoints' / 'hybrid'}, starting at step 0"
    )
    assert "Traceback" not in err and "absl" not in err


def test_an_earlier_runs_checkpoints_are_not_deleted_unasked(tmp_path):
    kept = tmp_path / "checkpoints" / "hybrid" / "100"
    kept.mkdir(parents=True)
    assert _cli.main(["--out", str(tmp_path), "--steps", "5", "--no-progress"]) == 2
    assert kept.is_dir()
    assert _cli.main(["--out", str(tmp_path), "--resume", "--overwrite"]) == 2


def test_an_earlier_runs_checkpoints_error_names_resume_and_overwrite(tmp_path, capsys):
    (tmp_path / "checkpoints" / "adamw").mkdir(parents=True)
    (tmp_path / "checkpoints" / "adamw" / "7").mkdir()
    assert _cli.main(["--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "Traceback" not in err


@pytest.mark.slow  # a process of its own
def test_resume_on_a_garbage_folder_says_what_it_found(tmp_path):
    bad = tmp_path / "checkpoints" / "hybrid" / "100"
    bad.mkdir(parents=True)
    (bad / "junk").write_text("not a checkpoint")
    (tmp_path / "metrics.jsonl").write_text("garbage\n")
    proc = subprocess.Popen(
        [*CLI, "--resume", "--out", str(tmp_path), "--steps", "5", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = _first_line_with(proc, "starting at step 0")
    err = _stop(proc)
    assert "no readable checkpoint in" in line
    assert "checkpoint at step 100" in err and "no earlier checkpoint" in err
    assert "previous checkpoint" not in err  # no fallback claimed where there is none
    assert "absl" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # one warning line, no log noise


# -- the driver features the job rests on ----------------------------------------------
@pytest.fixture
def jumpy_clock(monkeypatch):
    """The training clock's time source, plus a jump that tests add to."""
    jump = [0.0]
    real = time.perf_counter
    fake = types.SimpleNamespace(perf_counter=lambda: real() + jump[0])
    monkeypatch.setattr(_clock, "time", fake)
    return jump


class _SlowCheckpointer(hj.Checkpointer):
    """A checkpointer whose saves seem to take 1000 s to the training clock."""

    def __init__(self, *args, jump, **kwargs):
        super().__init__(*args, **kwargs)
        self.jump = jump

    def save(self, *args, **kwargs):
        self.jump[0] += 1000.0
        return super().save(*args, **kwargs)


def _quadratic_data(start):
    return iter(quadratic_batches(40)[start:])


@pytest.mark.parametrize("arm", [pytest.param("hybrid", marks=pytest.mark.slow), "adamw"])
def test_the_clock_of_both_arms_leaves_out_checkpoints_and_evaluations(tmp_path, jumpy_clock, arm):
    """The main job's arms are timed alike: neither arm's clock includes a checkpoint or
    an evaluation, however long they take."""
    tx = optax.adamw(1e-2)
    if arm == "hybrid":
        tx = hj.predictive(tx, fast_config())

    def eval_fn(params):
        jumpy_clock[0] += 1000.0
        return quadratic_loss(params, quadratic_batches(1, seed=9)[0])

    ckpt = _SlowCheckpointer(tmp_path, config={}, every=4, jump=jumpy_clock)
    res = hj.train(
        quadratic_loss,
        tx,
        quadratic_params(),
        _quadratic_data,
        steps=12,
        eval_fn=eval_fn,
        eval_every=4,
        sync_every=3,
        checkpointer=ckpt,
        progress=False,
    )
    assert ckpt.all_steps() == [4, 8, 12] and len(res.evals) == 3
    assert jumpy_clock[0] == 6000.0  # the saves and evaluations did take "time"
    times = [r["time"] for r in res.rows]
    assert times == sorted(times) and times[-1] < 1000.0
    ckpt.close()


def test_stop_checkpoints_and_a_resumed_run_goes_on_with_the_clock(tmp_path):
    calls = []

    def stop():
        calls.append(1)
        return len(calls) == 5  # asked after the 5th step

    rows = []
    with hj.Checkpointer(tmp_path, config={}, every=100) as ckpt:
        first = hj.train(
            quadratic_loss,
            optax.adam(1e-2),
            quadratic_params(),
            _quadratic_data,
            steps=12,
            eval_fn=lambda p: quadratic_loss(p, quadratic_batches(1)[0]),
            eval_every=5,
            callbacks=[rows.append],
            checkpointer=ckpt,
            progress=False,
            stop=stop,
        )
        assert first.stopped and ckpt.all_steps() == [5]
        assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # fetched before stopping
        assert rows[-1]["eval_loss"] == first.evals[-1][1]  # callbacks see evaluations
        extra = ckpt.restore(first.params, first.state)[3]
        assert extra["reason"] == "stopped" and extra["time"] >= rows[-1]["time"]
        second = hj.train(
            quadratic_loss,
            optax.adam(1e-2),
            quadratic_params(),
            _quadratic_data,
            steps=12,
            checkpointer=ckpt,
            resume=True,
            progress=False,
        )
    assert second.start_step == 5 and not second.stopped
    assert [r["step"] for r in second.rows] == list(range(5, 12))
    assert second.rows[0]["time"] >= extra["time"]  # the clock goes on
    assert second.compile_seconds > first.compile_seconds


def test_metrics_log_keeps_the_steps_before_a_resume_and_drops_later_ones(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = _job.MetricsLog(path)
    for step in range(6):  # a run killed after step 5, checkpointed at step 4
        log({"step": step, "loss": float(step)})
    assert len(path.read_text().splitlines()) == 6  # on disk as written
    log.close()
    resumed = _job.MetricsLog(path)
    resumed({"step": 4, "loss": 40.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in _rows(path)] == [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]


# -- the whole job ---------------------------------------------------------------------
def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_both_arms_checkpoint_alike_and_the_output_says_what_wall_clock_measures(tmp_path):
    args = ["--out", str(tmp_path), "--steps", "40", "--checkpoint-every", "10", "--no-progress"]
    proc = _cli_run(*args, "--eval-every", "10", timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["hybrid"]["checkpoint_steps_kept"] == [20, 30, 40]
    assert summary["adamw"]["checkpoint_steps_kept"] == [20, 30, 40]
    assert _job.CLOCK_NOTE in " ".join(proc.stdout.split())
    assert summary["hybrid"]["steps"] == summary["adamw"]["steps"] == 40


@pytest.mark.slow
def test_ctrl_c_checkpoints_flushes_metrics_and_resume_covers_every_step(tmp_path):
    steps = 3000
    args = ["--out", str(tmp_path), "--steps", str(steps), "--checkpoint-every", "500"]
    args += ["--no-progress"]
    proc = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (metrics.exists() and metrics.stat().st_size > 0):  # appended as it goes
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no metrics written"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in out + err and "absl" not in out + err
    [message] = [line for line in err.splitlines() if "--resume" in line]
    assert message.endswith(
        f"--out {tmp_path} --steps {steps} --checkpoint-every 500 --no-progress --resume"
    )
    stopped_at = len(_rows(metrics))
    assert stopped_at > 0 and f"stopped at step {stopped_at} " in message

    proc = _cli_run(*args, "--resume", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"hybrid: resuming at step {stopped_at} " in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["hybrid"]["steps"] == summary["adamw"]["steps"] == steps
    for name in ("metrics.jsonl", "baseline_metrics.jsonl"):
        rows = _rows(tmp_path / name)
        assert [r["step"] for r in rows] == list(range(steps))
        assert np.all(np.diff([r["time"] for r in rows]) >= 0)  # one clock over the run
