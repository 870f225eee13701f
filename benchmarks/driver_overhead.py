"""Steps per second of ``hj.train`` against a bare loop over the same jitted step (CPU).

    python benchmarks/driver_overhead.py [--steps 2000] [--repeats 5]

Both run the digits MLP with the hybrid (same config, same data); the bare loop calls
``hj.make_hybrid_step`` and blocks once at the end; the driver fetches the metrics every
``sync_every`` steps. Compilation is excluded from both (a warm-up run first). The
figure is the median over repeats, the runs alternating.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import environment

import hybrid_jax as hj
from hybrid_jax import tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sync-every", type=int, default=50)
    args = ap.parse_args()
    split = tasks.digits(0)
    cfg = hj.HybridConfig(warmup_steps=50, full_steps=10, correct_steps=3, max_horizon=4)
    tx = hj.predictive(optax.adamw(1e-3), cfg)
    batches = tasks.batches(split.x_train, split.y_train, 64, 0)
    data_list = [next(batches) for _ in range(args.steps)]
    data = lambda start: iter(data_list[start:])

    step = hj.make_hybrid_step(tasks.mlp_loss, tx)

    def bare() -> float:
        params = tasks.mlp_init(jax.random.key(0))
        state = tx.init(params)
        params, state, _ = step(params, state, data_list[0])  # compiled already after warm-up
        jax.block_until_ready(params)
        t0 = time.perf_counter()
        for b in data_list[1:]:
            params, state, m = step(params, state, b)
        jax.block_until_ready((params, m))
        return (len(data_list) - 1) / (time.perf_counter() - t0)

    def driver() -> float:
        t0 = time.perf_counter()
        res = hj.train(
            tasks.mlp_loss,
            tx,
            tasks.mlp_init(jax.random.key(0)),
            data,
            steps=args.steps,
            sync_every=args.sync_every,
            progress=False,
        )
        jax.block_until_ready(res.params)
        # the first step (its compilation, if any, included) is left out, as in bare()
        return (args.steps - 1) / (time.perf_counter() - t0 - res.compile_seconds)

    bare(), driver()  # warm-up: compile both
    b, d = [], []
    for _ in range(args.repeats):
        b.append(bare())
        d.append(driver())
    mb, md = statistics.median(b), statistics.median(d)
    print(f"bare loop   {mb:8.1f} steps/s  (runs {[round(x) for x in b]})")
    print(f"hj.train    {md:8.1f} steps/s  (runs {[round(x) for x in d]})")
    print(f"driver / bare = {md / mb:.3f}")
    print(json.dumps(environment()))


if __name__ == "__main__":
    main()
