"""Wall-clock of whole runs through ``hj.train``: AdamW vs the hybrid stepped by
``make_hybrid_step`` (one ``lax.cond``) vs ``make_dispatched_step`` (host-chosen programs).

    python benchmarks/dispatch_wallclock.py --size cpu     # tiny byte-level GPT, 300 steps
    python benchmarks/dispatch_wallclock.py --size gpu     # the end-to-end GPU workload

The workload and the hybrid's settings are those of ``end_to_end.py``; every arm uses
``optax.adamw`` at one constant learning rate (the largest of the workload's sweep),
the same seed and the same batches, stepped from Python by ``hj.train`` (metrics fetched
every 50 steps). Reported per arm: seconds after compilation, compile seconds, backward
passes, predicted and idle steps, and the held-out loss at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import environment, write_jsonl
from end_to_end import hybrid_config, workloads

import hybrid_jax as hj


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--steps", type=int, default=0, help="0: the workload's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--predictor", default="last_update")
    ap.add_argument("--out", default="", help="append JSON lines here")
    args = ap.parse_args()
    wl = workloads(args.size, args.steps or None)[-1]  # the byte-level GPT
    lr = max(wl.lrs)
    stacked = wl.batches(args.seed, 0, wl.steps)
    held = jnp.asarray(wl.eval_batches)
    evaluate = jax.jit(lambda p: jnp.mean(jax.lax.map(lambda b: wl.loss_fn(p, b), held)))
    cfg = hybrid_config(args.predictor, wl.steps)
    arms = [
        ("adamw", optax.adamw(lr), "cond"),
        ("hybrid, make_hybrid_step", hj.predictive(optax.adamw(lr), cfg), "cond"),
        ("hybrid, make_dispatched_step", hj.predictive(optax.adamw(lr), cfg), "dispatched"),
    ]
    env, rows = environment(), []
    for name, tx, stepping in arms:
        res = hj.train(
            wl.loss_fn,
            tx,
            wl.init(jax.random.key(args.seed)),
            lambda start: (np.asarray(b) for b in stacked[start:]),
            steps=wl.steps,
            progress=False,
            stepping=stepping,
        )
        last = res.rows[-1]
        row = dict(
            workload=wl.name,
            arm=name,
            steps=wl.steps,
            lr=lr,
            seconds=last["time"],
            compile_s=res.compile_seconds,
            backward_passes=last["backward_passes"],
            predicted_steps=last["predicted_steps"],
            idle_steps=last["idle_steps"],
            heldout_loss=float(evaluate(res.params)),
            seed=args.seed,
            **env,
        )
        rows.append(row)
        print(
            f"{name:30s} {row['seconds']:8.2f} s  compile {row['compile_s']:5.1f} s  "
            f"backward {row['backward_passes']:5d}  predicted {row['predicted_steps']:5d}  "
            f"idle {row['idle_steps']:3d}  held-out {row['heldout_loss']:.4f}",
            flush=True,
        )
    print(json.dumps(env))
    if args.out:
        write_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
