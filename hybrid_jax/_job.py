"""The main job of ``python -m hybrid_jax``: the hybrid beside plain AdamW, timed alike.

Both arms train the digits MLP on the same data order, each with its own checkpoints
(``checkpoints/hybrid``, ``checkpoints/adamw``) saved at the same steps, a memory
monitor and a metrics file written as the run goes. The wall-clock of both counts only
the training steps (see ``hybrid_jax._clock``). A stop request ends the arm in progress
after a checkpoint; ``--resume`` continues each arm from its own checkpoint, and the
summary and plots always cover every step of the run, read back from the metrics files.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What the main job's hybrid uses unless --config is given (a short run reaches Predict).
DEFAULT_CONFIG = dict(warmup_steps=50, full_steps=10, correct_steps=3, min_horizon=1, max_horizon=4)
ARMS = ("hybrid", "adamw")
METRICS_FILES = {"hybrid": "metrics.jsonl", "adamw": "baseline_metrics.jsonl"}
CLOCK_NOTE = (
    "wall-clock: seconds spent in training steps after compilation; evaluations and "
    "checkpoints are not counted; both arms are timed the same way"
)

log = logging.getLogger("hybrid_jax")


@dataclass
class Outcome:
    """How the job ended.

    Attributes:
      summaries: arm name -> summary (empty when stopped).
      stopped: ``(arm, checkpoint step, checkpoint folder)`` of a stop, else ``None``.
    """

    summaries: dict[str, Any] = field(default_factory=dict)
    stopped: tuple[str, int, Path] | None = None


def job_config(args: argparse.Namespace) -> Any:
    """The ``HybridConfig`` of the hybrid arm: ``--config`` or the built-in one, with
    ``--predictor`` applied."""
    import hybrid_jax as hj

    cfg = hj.HybridConfig.load(args.config) if args.config else hj.HybridConfig(**DEFAULT_CONFIG)
    return cfg.replace(predictor=args.predictor) if args.predictor else cfg


class MetricsLog:
    """Appends each row to a JSON lines file as the run goes.

    The first row fixes where the file starts over: rows of earlier steps already in
    the file are kept (a resumed run), later ones dropped. Lines are flushed as written.

    Args:
      path: the JSON lines file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def __call__(self, row: dict[str, Any]) -> None:
        if self._file is None:
            self._open(int(row["step"]))
        self._file.write(json.dumps(row) + "\n")

    def _open(self, start: int) -> None:
        from ._report import read_jsonl, write_jsonl

        kept = []
        if start > 0 and self.path.exists():
            try:
                kept = [r for r in read_jsonl(self.path) if r["step"] < start]
            except (ValueError, KeyError, TypeError) as e:
                warnings.warn(f"cannot read {self.path} ({e})", RuntimeWarning, stacklevel=2)
        if [r["step"] for r in kept] != list(range(start)):
            warnings.warn(
                f"{self.path} holds {len(kept)} rows of the {start} steps before step "
                f"{start}; the summary and plots cover only the steps it holds",
                RuntimeWarning,
                stacklevel=2,
            )
        write_jsonl(kept, self.path)
        self._file = self.path.open("a", buffering=1)

    def close(self) -> None:
        """Closes the file (if a row was written)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def run(args: argparse.Namespace, stop: Callable[[], bool] | None = None) -> Outcome:
    """Runs the main job; returns the summaries by arm, or where it stopped.

    Args:
      args: the parsed command line (see ``hybrid_jax._cli``).
      stop: polled after each step; ``True`` ends the arm in progress after a checkpoint.

    Returns:
      An ``Outcome``.
    """
    import jax

    from hybrid_jax import tasks

    cfg = job_config(args)
    split = tasks.digits(seed=args.seed)
    x_test, y_test = jax.numpy.asarray(split.x_test), jax.numpy.asarray(split.y_test)
    eval_fn = jax.jit(lambda p: tasks.mlp_loss(p, (x_test, y_test)))
    args.out.mkdir(parents=True, exist_ok=True)
    arms = ARMS if args.baseline else ARMS[:1]
    results = {}
    for arm in arms:
        res, ckpt_dir, kept = _train_arm(arm, args, cfg, split, eval_fn, stop)
        if res.stopped:
            return Outcome(stopped=(arm, res.rows[-1]["step"] + 1, ckpt_dir))
        results[arm] = (res, kept)
    return Outcome(summaries=_report_run(args, results))


def _train_arm(
    arm: str, args: argparse.Namespace, cfg: Any, split: Any, eval_fn: Any, stop: Any
) -> tuple[Any, Path, list[int]]:
    """Trains one arm with its checkpointer, memory monitor and metrics file; returns
    the ``TrainResult``, the checkpoint folder and the checkpoint steps kept there."""
    import jax
    import optax

    import hybrid_jax as hj
    from hybrid_jax import tasks

    run_config = {"task": "digits-mlp", "lr": args.lr, "batch_size": args.batch_size}
    run_config |= {"seed": args.seed, "optimizer": "adamw"}
    tx = optax.adamw(args.lr)
    if arm == "hybrid":
        run_config["hybrid"] = cfg.to_dict()
        tx = hj.predictive(tx, cfg)
    ckpt_dir = args.out / "checkpoints" / arm
    if not args.resume and ckpt_dir.exists():  # --overwrite (the command line checked)
        shutil.rmtree(ckpt_dir)
        log.info("%s: starting afresh; removed an earlier run's checkpoints in %s", arm, ckpt_dir)

    def data(start: int):
        return tasks.batches(split.x_train, split.y_train, args.batch_size, args.seed, start)

    metrics = MetricsLog(args.out / METRICS_FILES[arm])
    ckpt = hj.Checkpointer(ckpt_dir, config=run_config, every=args.checkpoint_every)
    try:
        res = hj.train(
            tasks.mlp_loss,
            tx,
            tasks.mlp_init(jax.random.key(args.seed)),
            data,
            steps=args.steps,
            eval_fn=eval_fn,
            eval_every=args.eval_every,
            callbacks=[metrics],
            checkpointer=ckpt,
            resume=args.resume,
            memory=hj.MemoryMonitor(),
            progress=args.progress,
            desc=arm,
            stepping=args.stepping,
            stop=stop,
        )
        kept = ckpt.all_steps()
    finally:
        metrics.close()
        ckpt.close()
    return res, ckpt_dir, kept


def _report_run(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """Summaries and plots of every step of each arm (read back from the metrics
    files), written to ``--out`` and printed."""
    from hybrid_jax import _report

    rows, summaries = {}, {}
    for arm, (res, kept) in results.items():
        rows[arm] = _report.read_jsonl(args.out / METRICS_FILES[arm])
        _check_coverage(arm, rows[arm], args.steps)
        summaries[arm] = _report.summary(rows[arm], memory=res.memory)
        summaries[arm]["compile_seconds"] = res.compile_seconds
        summaries[arm]["checkpoint_steps_kept"] = kept
    _report.write_csv(rows["hybrid"], args.out / "metrics.csv")
    plots = _report.plot_run(
        rows["hybrid"], args.out, baseline_rows=rows.get("adamw"), baseline_name="adamw"
    )
    (args.out / "summary.json").write_text(json.dumps(summaries, indent=2, default=float))
    table = summaries["hybrid"] if len(summaries) == 1 else summaries
    print(_report.compare(summaries) if len(summaries) > 1 else _report.format_table(table))
    compile_s = ", ".join(f"{a} {s['compile_seconds']:.1f} s" for a, s in summaries.items())
    print(f"{CLOCK_NOTE} (compilation: {compile_s})")
    print(
        f"wrote {args.out / 'metrics.jsonl'}, {args.out / 'summary.json'} and "
        f"{len(plots)} plot(s) to {args.out}"
    )
    return summaries


def _check_coverage(arm: str, rows: list[dict[str, Any]], steps: int) -> None:
    """Warns unless the rows are those of steps ``0 .. steps - 1``, once each."""
    if [r["step"] for r in rows] != list(range(steps)):
        warnings.warn(
            f"the {arm} metrics hold {len(rows)} rows for a run of {steps} steps; the "
            "summary covers only those",
            RuntimeWarning,
            stacklevel=2,
        )
