"""The command line of ``python -m hybrid_jax``: flags, messages, Ctrl-C and exit codes.

Exit codes: 0 done, 2 bad input (a message, never a traceback), 130 stopped by Ctrl-C
(after a checkpoint, with the command that resumes).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import textwrap
import typing
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

from ._job import CLOCK_NOTE, run
from ._settings import Predictors
from ._train import STEPPINGS

PROG = "python3 -m hybrid_jax"
DESCRIPTION = """\
Runs the main job: a small MLP on scikit-learn's digits data (real, offline, with a
held-out split), trained with the hybrid optimizer beside plain AdamW on the same data
order, then prints the comparison.

Writes to --out: metrics.jsonl and metrics.csv (hybrid), baseline_metrics.jsonl (AdamW),
summary.json, PNG plots, and checkpoints of both arms (checkpoints/hybrid,
checkpoints/adamw). Metrics are appended as the run goes. Ctrl-C stops after the
current step, saves a checkpoint and prints the command that resumes (--resume).
"""
EPILOG = textwrap.fill(f"In the printed table, {CLOCK_NOTE}.", width=88)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default, except where the help says it in words (default None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter
    )
    _add_job_flags(ap)
    _add_run_flags(ap)
    return ap


def _add_job_flags(ap: argparse.ArgumentParser) -> None:
    """The flags that say what is trained."""
    ap.add_argument(
        "--steps", type=int, metavar="N", default=1000, help="training steps of each arm"
    )
    ap.add_argument(
        "--seed", type=int, metavar="N", default=0, help="seed of the init, split and data order"
    )
    ap.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="a HybridConfig as .toml or .json (default: the built-in one; see --print-config)",
    )
    ap.add_argument(
        "--predictor",
        choices=typing.get_args(Predictors),
        help="the built-in predictor of the hybrid (default: the config's)",
    )
    ap.add_argument(
        "--stepping",
        choices=STEPPINGS,
        default="dispatched",
        help="how the hybrid steps, as hj.train(stepping=...): one program per kind of step "
        "chosen on the host, or one lax.cond on the device",
    )
    ap.add_argument(
        "--print-config",
        action="store_true",
        help="print the HybridConfig the job would use, as TOML, and exit",
    )
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (both arms)")
    ap.add_argument("--batch-size", type=int, metavar="N", default=64, help="examples per batch")
    ap.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train plain AdamW on the same data",
    )


def _add_run_flags(ap: argparse.ArgumentParser) -> None:
    """The flags that say where results go and how the run is watched."""
    ap.add_argument(
        "--out", type=Path, metavar="DIR", default=Path("runs/hybrid"), help="output folder"
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue each arm from its latest checkpoint in --out",
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh where --out holds an earlier run's checkpoints (they are deleted)",
    )
    ap.add_argument(
        "--eval-every",
        type=int,
        metavar="N",
        default=100,
        help="steps between held-out evaluations",
    )
    ap.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="N",
        default=100,
        help="steps between checkpoints (both arms)",
    )
    ap.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar per arm",
    )


def _check(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "eval_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0; got {args.lr}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out must be a folder; {args.out} is a file")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")


def _check_earlier_run(args: argparse.Namespace) -> None:
    """An earlier run's checkpoints in ``--out`` are never deleted unasked."""
    earlier = args.out / "checkpoints"
    if not (args.resume or args.overwrite) and earlier.is_dir() and any(earlier.iterdir()):
        raise ValueError(
            f"{earlier} holds an earlier run's checkpoints: add --resume to continue that "
            "run, or --overwrite to start again and delete them (or choose another --out)"
        )


class _Interrupt:
    """Ctrl-C (SIGINT) asks the job to stop after the current step; a second one ends
    the process at once (exit 130, after ``message``), without unwinding through
    compilation or a checkpoint being written. A context manager that installs the
    handler (main thread only).

    Args:
      message: the line printed on a second Ctrl-C.
    """

    def __init__(self, message: str) -> None:
        self.message = message
        self.requested = False
        self._previous: Any = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            print(f"\n{self.message}", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        self.requested = True

    def __enter__(self) -> _Interrupt:
        try:
            self._previous = signal.signal(signal.SIGINT, self)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _quiet_logs() -> None:
    """Our messages as plain lines on stdout; warnings as one line each on stderr;
    absl's (orbax's) log noise kept out of the terminal."""
    logger = logging.getLogger("hybrid_jax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover - orbax brings absl
        pass

    def show(message: Any, category: type[Warning], *rest: Any, **kw: Any) -> None:
        print(f"{PROG}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show


def _resume_command(argv: list[str]) -> str:
    """The command line that resumes this run."""
    args = [a for a in argv if a != "--resume"]
    return shlex.join([*PROG.split(), *args, "--resume"])


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (see the module docstring).

    Args:
      argv: the arguments (default ``sys.argv[1:]``).

    Returns:
      0, 2 or 130.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = _parser()
    args = ap.parse_args(argv)
    _quiet_logs()
    again = (
        f"{PROG}: interrupted again: stopped at once, without a checkpoint of the last "
        f"steps; to continue from the last checkpoint: {_resume_command(argv)}"
    )
    with _Interrupt(again) as interrupt:
        try:
            _check(args)
            if args.print_config:
                from ._job import job_config

                print(f"# the HybridConfig of {PROG}; edit it and pass it with --config FILE")
                print(job_config(args).to_toml(), end="")
                return 0
            _check_earlier_run(args)
            outcome = run(args, stop=lambda: interrupt.requested)
        except (ValueError, FileNotFoundError, ImportError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
    if outcome.stopped is not None:
        arm, step, where = outcome.stopped
        print(
            f"{PROG}: interrupted: the {arm} arm stopped at step {step} of {args.steps} "
            f"(checkpoint in {where}); to continue: {_resume_command(argv)}",
            file=sys.stderr,
        )
        return 130
    return 0
