"""The cost of a real step through ``hj.train`` on the CPU, against a plain optax step.

    python benchmarks/cpu_step.py [--model cnn|mlp] [--steps 400] [--repeats 5]

Every arm is ``hj.train`` on the same data (digits, batch 64), compilation excluded:
plain AdamW; the hybrid with no Predict phase (``confidence_threshold=1.0`` and a
predictor that is never confident, so every step is a real step) stepped by
``make_dispatched_step`` (the default: ``observe_every=8``; and with every real step
observed) and by ``make_hybrid_step`` (``stepping="cond"``); and the default without
packing the state's small leaves (``hybrid_jax._packing``; ``hj.train`` packs them).
The figure is seconds per step from the moment the second batch is asked for to the
return of ``hj.train`` (every step's result fetched), the median over repeats (arms
alternating, after one untimed short run of each: the packing programs compile once
per process), its ratio to plain AdamW's median, and the median of the paired ratios
(each repeat's time over AdamW's in the same repeat). The rows' times are when each
step was launched; a plain step never waits for the device, so its launches can run
ahead of it, and the rows would time the host.

Why the ``lax.switch`` step is slow here: XLA:CPU rewrites the backward pass's
convolutions (the gradients of the input and of the filter) into the layout its fast
convolution kernel takes only in a program's entry computation. Inside a conditional's
branch (or a while loop's body) they stay as generic convolutions, which it lowers to a
plain loop nest: the digits CNN's backward pass alone costs about 86 ms there against
3.5 ms outside (jax 0.10.2, 2 cores). The dispatched step runs each kind of step as its
own program, with no conditional around it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import environment, write_jsonl

import hybrid_jax as hj
from hybrid_jax import tasks


def never_confident() -> hj.Predictor:
    """A predictor whose confidence is 0: the hybrid only takes real steps."""

    def init(spec):
        return jnp.zeros((spec.n_groups, spec.basis_size), jnp.float32)

    def observe(state, obs):
        return obs.target_coefs

    def predict(state, ctx):
        return hj.Prediction(state, jnp.float32(0), jnp.float32(0)), state

    return hj.Predictor("never_confident", init, observe, predict)


def seconds_per_step(loss_fn, init_fn, tx, data, steps, stepping, pack=True) -> float:
    """Seconds per step after the first (compiled) one: from the moment the second batch
    is asked for to the moment ``hj.train`` returns, every step's result fetched. (The
    rows' times are when each step was launched: a step that never waits for the device
    could be launched ahead of it, so they would time the host, not the steps.)"""
    hj._train.PACK_STATE = pack
    asked: list[float] = []

    def timed(start):
        for batch in data(start):
            asked.append(time.perf_counter())
            yield batch

    res = hj.train(
        loss_fn, tx, init_fn(jax.random.key(0)), timed, steps=steps, sync_every=steps,
        progress=False, stepping=stepping,
    )  # fmt: skip
    end = time.perf_counter()
    assert len(res.rows) == steps
    return (end - asked[1]) / (steps - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="cnn", choices=("cnn", "mlp"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="", help="append JSON lines here")
    ap.add_argument("--no-cond", action="store_true", help="leave out make_hybrid_step (slow)")
    args = ap.parse_args()
    split = tasks.digits(0)
    loss_fn, init_fn = {
        "cnn": (tasks.cnn_loss, tasks.cnn_init),
        "mlp": (tasks.mlp_loss, tasks.mlp_init),
    }[args.model]

    def data(start):
        return tasks.batches(split.x_train, split.y_train, 64, seed=0, start=start)

    cfg = hj.HybridConfig(warmup_steps=0, confidence_threshold=1.0)
    arms = {
        "adamw": (optax.adamw(1e-3), "dispatched"),
        "hybrid, dispatched, default (observe_every=8)": (
            hj.predictive(optax.adamw(1e-3), cfg, predictor=never_confident()),
            "dispatched",
        ),
        "hybrid, dispatched, every real step observed": (
            hj.predictive(
                optax.adamw(1e-3), cfg.replace(observe_every=1), predictor=never_confident()
            ),
            "dispatched",
        ),
        "hybrid, dispatched, default, state not packed": (
            hj.predictive(optax.adamw(1e-3), cfg, predictor=never_confident()),
            "dispatched",
            False,
        ),
        "hybrid, cond": (
            hj.predictive(optax.adamw(1e-3), cfg, predictor=never_confident()),
            "cond",
        ),
    }
    if args.no_cond:
        del arms["hybrid, cond"]
    times: dict[str, list[float]] = {name: [] for name in arms}
    for tx, stepping, *pack in arms.values():  # untimed: what compiles once per process
        seconds_per_step(loss_fn, init_fn, tx, data, 3, stepping, *pack)
    for _ in range(args.repeats):
        for name, (tx, stepping, *pack) in arms.items():
            t = seconds_per_step(loss_fn, init_fn, tx, data, args.steps, stepping, *pack)
            times[name].append(t)
    base = statistics.median(times["adamw"])
    env, rows = environment(), []
    for name, ts in times.items():
        med = statistics.median(ts)
        spread = (max(ts) - min(ts)) * 1e3
        # paired: each repeat's time over AdamW's in the same repeat (drifts cancel)
        ratios = [t / a for t, a in zip(ts, times["adamw"], strict=True)]
        row = dict(model=args.model, arm=name, steps=args.steps, ms_per_step=med * 1e3)
        row.update(spread_ms=spread, ratio_to_adamw=med / base, **env)
        row.update(paired_ratio=statistics.median(ratios), paired_ratios=ratios)
        rows.append(row)
        print(
            f"{name:46s} {med * 1e3:8.3f} ms/step  x{med / base:.2f}  paired "
            f"x{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]"
        )
    if args.out:
        write_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
