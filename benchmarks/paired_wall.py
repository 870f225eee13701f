"""Whole runs' wall-clock: tuned AdamW and a hybrid arm in turn, paired (GPU or CPU).

    python benchmarks/paired_wall.py --size gpu --workload digits_cnn --lr 3e-2 --steps 5000
    python benchmarks/paired_wall.py --size gpu --workload bytes_gpt --lr 6e-4 --pairs 2

On a small model the host's speed drifts by more than the hybrid's overhead: in one
call AdamW's own three runs of the GPU digits CNN took 1.70 to 2.91 s. So each seed's
runs come in pairs, AdamW and the hybrid back to back, in alternating order (ABBA), and
the figure is the median of the pairs' ratios. Every run is ``end_to_end.py``'s
(``--stepping python``: one call per step, the hybrid through ``hj.make_dispatched_step``,
the same initial parameters, batches and learning-rate schedule for both, held-out loss
between chunks, not timed); each arm is compiled once. Printed per seed: each pair's
seconds and ratio; then the median ratio per seed and over all pairs, with its range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import environment
from end_to_end import Arm, adamw, hybrid_config, make_evaluate, run_arm, workloads

import hybrid_jax as hj


def pairs_of(
    wl, arms: tuple[Arm, Arm], seed: int, n: int, log, cache: dict, start: int = 0
) -> list[dict]:
    """``n`` pairs of whole runs of ``arms`` (AdamW, hybrid) with ``seed``, in
    alternating order (AdamW first in pairs ``start``, ``start + 2``, ...); each pair's
    seconds and its ratio hybrid / AdamW."""
    evaluate = make_evaluate(wl)
    out = []
    for i in range(n):
        order = arms if (start + i) % 2 == 0 else arms[::-1]
        walls = {}
        for arm in order:
            rec = run_arm(wl, arm, seed, evaluate, lambda _: None, cache, "python")[0]
            walls[arm.kind] = rec["wall"]
            if arm.kind == "hybrid":
                walls["skipped"] = 1 - rec["curve"][-1]["backward"] / arm.steps
                walls["loss"] = rec["final_loss"]
            else:
                walls["adamw_loss"] = rec["final_loss"]
        walls.update(seed=seed, pair=i, first=order[0].kind, ratio=walls["hybrid"] / walls["adamw"])
        log(
            f"  seed {seed} pair {i} ({order[0].kind} first): AdamW {walls['adamw']:.3f} s, "
            f"hybrid {walls['hybrid']:.3f} s, ratio {walls['ratio']:.4f} "
            f"(skipped {100 * walls['skipped']:.1f}%)"
        )
        out.append(walls)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--workload", default="digits_cnn", help="a name of end_to_end.py's")
    ap.add_argument("--lr", type=float, required=True, help="AdamW's tuned peak rate")
    ap.add_argument("--steps", type=int, default=0, help="0: the workload's")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--arm", default="default", help="a hybrid arm of end_to_end.py")
    ap.add_argument(
        "--hybrid",
        default="{}",
        help="JSON of HybridConfig fields replacing the arm's, e.g. "
        "'{\"confidence_threshold\": 1.0}' (a hybrid that never predicts)",
    )
    ap.add_argument("--out", default="", help="append JSON lines here")
    args = ap.parse_args()
    wl = next(w for w in workloads(args.size, args.steps or None) if w.name == args.workload)
    steps, chunk = wl.steps, wl.eval_every
    arms = (
        Arm(f"adamw@{args.lr:g}", "adamw", adamw(), args.lr, steps, chunk),
        Arm(
            f"hybrid:{args.arm}",
            "hybrid",
            hj.predictive(adamw(), hybrid_config(args.arm, json.loads(args.hybrid))),
            args.lr,
            steps,
            chunk,
        ),
    )
    env = environment()
    print(json.dumps(env), flush=True)
    print(
        f"[{wl.name}] {wl.describe}; {steps} steps; {args.pairs} pairs per seed; "
        f"hybrid arm {args.arm}, changes {args.hybrid}",
        flush=True,
    )
    cache: dict = {}
    pairs_of(wl, arms, 0, 1, lambda s: print(f"{s} (warm-up, not counted)", flush=True), cache)
    rows = []
    log = lambda s: print(s, flush=True)
    for seed in range(args.seeds):
        rows += pairs_of(wl, arms, seed, args.pairs, log, cache, start=len(rows))
        ratios = [r["ratio"] for r in rows if r["seed"] == seed]
        print(f"seed {seed}: median ratio {statistics.median(ratios):.4f}", flush=True)
    ratios = [r["ratio"] for r in rows]
    print(
        f"all pairs ({len(ratios)}): median ratio {statistics.median(ratios):.4f} "
        f"[{min(ratios):.4f}, {max(ratios):.4f}]",
        flush=True,
    )
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "workload": wl.name, "lr": args.lr, **env}) + "\n")


if __name__ == "__main__":
    main()
