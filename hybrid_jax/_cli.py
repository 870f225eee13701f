"""``python -m hybrid_jax``: the main job.

Trains the embedded default (an MLP on scikit-learn's real, offline digits data, with a
held-out split) with the hybrid beside plain AdamW on the same data order, prints the
comparison, and writes metrics (JSON lines and CSV), a summary and plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = dict(warmup_steps=50, full_steps=10, correct_steps=3, min_horizon=1, max_horizon=4)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m hybrid_jax",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of init, split and data order")
    ap.add_argument("--config", type=Path, help="a HybridConfig as .toml or .json")
    ap.add_argument("--out", type=Path, default=Path("runs/hybrid"), help="output folder")
    ap.add_argument("--resume", action="store_true", help="continue from --out's checkpoints")
    ap.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train plain AdamW on the same data (default: yes)",
    )
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (both arms)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=100, help="held-out evaluation period")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return ap


def _check(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "eval_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0; got {args.lr}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out must be a folder; {args.out} is a file")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the main job; returns the summaries by arm."""
    import jax
    import optax

    import hybrid_jax as hj
    from hybrid_jax import _report, tasks

    cfg = hj.HybridConfig.load(args.config) if args.config else hj.HybridConfig(**DEFAULT_CONFIG)
    split = tasks.digits(seed=args.seed)
    x_test, y_test = jax.numpy.asarray(split.x_test), jax.numpy.asarray(split.y_test)
    eval_fn = jax.jit(lambda p: tasks.mlp_loss(p, (x_test, y_test)))

    def data(start: int):
        return tasks.batches(split.x_train, split.y_train, args.batch_size, args.seed, start)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    run_config = {
        "hybrid": cfg.to_dict(),
        "task": "digits-mlp",
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    ckpt = hj.Checkpointer(out / "checkpoints", config=run_config, every=args.checkpoint_every)
    memory = hj.MemoryMonitor()
    tx = hj.predictive(optax.adamw(args.lr), cfg)
    res = hj.train(
        tasks.mlp_loss,
        tx,
        tasks.mlp_init(jax.random.key(args.seed)),
        data,
        steps=args.steps,
        eval_fn=eval_fn,
        eval_every=args.eval_every,
        checkpointer=ckpt,
        resume=args.resume,
        memory=memory,
        progress=args.progress,
        desc="hybrid",
    )
    ckpt.close()
    rows = res.rows
    metrics_path = out / "metrics.jsonl"
    if res.start_step > 0 and metrics_path.exists():
        rows = [r for r in _report.read_jsonl(metrics_path) if r["step"] < res.start_step] + rows
    _report.write_jsonl(rows, metrics_path)
    _report.write_csv(rows, out / "metrics.csv")
    summaries = {"hybrid": _report.summary(rows, memory=res.memory)}
    summaries["hybrid"]["compile_seconds"] = res.compile_seconds

    base_rows = None
    if args.baseline:
        base = hj.train(
            tasks.mlp_loss,
            optax.adamw(args.lr),
            tasks.mlp_init(jax.random.key(args.seed)),
            data,
            steps=args.steps,
            eval_fn=eval_fn,
            eval_every=args.eval_every,
            progress=args.progress,
            desc="adamw",
        )
        base_rows = base.rows
        _report.write_jsonl(base_rows, out / "baseline_metrics.jsonl")
        summaries["adamw"] = _report.summary(base_rows)
        summaries["adamw"]["compile_seconds"] = base.compile_seconds
    plots = _report.plot_run(rows, out, baseline_rows=base_rows)
    (out / "summary.json").write_text(json.dumps(summaries, indent=2, default=float))
    print(
        _report.compare(summaries)
        if len(summaries) > 1
        else _report.format_table(summaries["hybrid"])
    )
    print(f"wrote {metrics_path}, {out / 'summary.json'} and {len(plots)} plot(s) to {out}")
    return summaries


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, never a traceback)."""
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        _check(args)
        run(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
