"""Held-out loss at an equal number of steps: hybrid vs plain AdamW on scikit-learn digits.

    python benchmarks/digits_equal_steps.py [--steps 1000] [--seeds 3] [--sketch-stride 1]
        [--full-steps 10] [--observe-every 1] [--rssm-train-every 1]

For each learning rate and each hybrid schedule (horizon H, Correct steps C), the same
seeds and the same data order are used for both arms; the table gives the share of
backward passes skipped and the ratio of mean held-out losses (hybrid / AdamW); with
``--observe-every k`` also the share of real steps the hybrid observed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import environment

import hybrid_jax as hj
from hybrid_jax import tasks


def run(split, tx, steps, seed, batch_size=64):
    params = tasks.mlp_init(jax.random.key(seed))
    state = tx.init(params)
    stream = tasks.batches(split.x_train, split.y_train, batch_size, seed=seed)
    if isinstance(tx, hj._transform.PredictiveTransformation):
        step = hj.make_hybrid_step(tasks.mlp_loss, tx)
        for _ in range(steps):
            params, state, m = step(params, state, next(stream))
        backward = int(m["backward_passes"])
        observed = int(state.counters.observed_steps) / max(int(state.counters.real_steps), 1)
    else:

        @jax.jit
        def step(params, state, batch):
            grads = jax.grad(tasks.mlp_loss)(params, batch)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for _ in range(steps):
            params, state = step(params, state, next(stream))
        backward, observed = steps, 1.0
    return float(tasks.mlp_loss(params, (split.x_test, split.y_test))), backward, observed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lrs", default="3e-4,1e-3")
    ap.add_argument("--predictors", default="last_update,extrapolate")
    ap.add_argument("--schedules", default="2x2,3x3,5x5,10x2", help="HxC pairs")
    ap.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="confidence_threshold for every predictor (default: the config's)",
    )
    ap.add_argument("--sketch-stride", type=int, default=1, help="BasisSettings.sketch_stride")
    ap.add_argument("--full-steps", type=int, default=10, help="HybridConfig.full_steps")
    ap.add_argument("--observe-every", type=int, default=1, help="HybridConfig.observe_every")
    ap.add_argument("--rssm-train-every", type=int, default=1, help="RSSMSettings.train_every")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    split = tasks.digits(0)
    seeds = range(args.seeds)
    rows = []
    print(
        f"{'lr':>7} {'predictor':>12} {'HxC':>5} {'skipped':>8} {'observed':>8} {'ratio':>7}"
        "  per-seed ratios"
    )
    for lr in map(float, args.lrs.split(",")):
        base = [run(split, optax.adamw(lr), args.steps, s)[0] for s in seeds]
        for pred in args.predictors.split(","):
            for sched in args.schedules.split(","):
                h, c = map(int, sched.split("x"))
                extra = {} if args.threshold is None else {"confidence_threshold": args.threshold}
                cfg = hj.HybridConfig(
                    warmup_steps=50,
                    full_steps=args.full_steps,
                    correct_steps=c,
                    min_horizon=1,
                    max_horizon=h,
                    predictor=pred,
                    basis=hj.BasisSettings(sketch_stride=args.sketch_stride),
                    observe_every=args.observe_every,
                    rssm=hj.RSSMSettings(train_every=args.rssm_train_every),
                    **extra,
                )
                res = [
                    run(split, hj.predictive(optax.adamw(lr), cfg), args.steps, s) for s in seeds
                ]
                hyb = [r[0] for r in res]
                skipped = 1.0 - np.mean([r[1] for r in res]) / args.steps
                observed = float(np.mean([r[2] for r in res]))
                ratio = float(np.mean(hyb) / np.mean(base))
                per = np.round(np.array(hyb) / np.array(base), 3).tolist()
                print(
                    f"{lr:7.0e} {pred:>12} {sched:>5} {skipped:8.3f} {observed:8.3f} "
                    f"{ratio:7.3f}  {per}",
                    flush=True,
                )
                rows.append(
                    dict(
                        lr=lr,
                        predictor=pred,
                        threshold=cfg.confidence_threshold,
                        horizon=h,
                        correct=c,
                        skipped=skipped,
                        ratio=ratio,
                        per_seed=per,
                        base=base,
                        hybrid=hyb,
                        steps=args.steps,
                        sketch_stride=args.sketch_stride,
                        observe_every=args.observe_every,
                        observed=observed,
                        rssm_train_every=args.rssm_train_every,
                    )
                )
    print(json.dumps(environment()))
    if args.out:
        Path(args.out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
