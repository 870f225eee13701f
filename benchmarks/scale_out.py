"""Throughput of real and predicted steps on 1 vs N devices (data parallel and FSDP).

    python benchmarks/scale_out.py --model lm25 --devices 1,2            # GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python benchmarks/scale_out.py --model lm --devices 1,2          # a CPU smoke run

For each device count and sharding rule (``replicated``: data parallel; ``fsdp``:
parameters, optimizer moments, basis and snapshot sharded over the mesh), the hybrid's
step from ``hj.make_sharded_hybrid_step`` is timed with its phase pinned to a Full phase
(real steps) and to a Predict phase (predicted steps), beside plain AdamW under the same
shardings. The batch per device is fixed (the model's batch), so the global batch grows
with the device count (weak scaling); tokens per second count the global batch. The
collectives of a predicted step are read from the optimised HLO of the predicted update
alone (``tx.predicted_update`` + apply, jitted with the same shardings): their kinds and
the elements they move.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_cost
from _timing import environment, median_time, write_jsonl

import hybrid_jax as hj
from hybrid_jax import sharding as hs


def collectives(text: str) -> dict[str, int]:
    """Collective ops in optimised HLO text and the elements each kind moves."""
    out: Counter = Counter()
    kinds = "all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute"
    pattern = rf"= \(?([a-z0-9]+)\[([0-9,]*)\][^=]*? ({kinds})(?:-start)?\("
    for _, dims, kind in re.findall(pattern, text):
        out[kind] += 1
        out[f"{kind}_elements"] += int(np.prod([int(d) for d in dims.split(",") if d]))
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="lm25", choices=["mlp", "lm", "lm25", "gpt2"])
    ap.add_argument("--devices", default="1,2", help="comma list of device counts")
    ap.add_argument("--rules", default="replicated,fsdp")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed loop")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="", help="append JSON lines here")
    args = ap.parse_args()
    counts = [int(c) for c in args.devices.split(",")]
    if max(counts) > jax.device_count():
        raise SystemExit(f"asked for {max(counts)} devices; {jax.device_count()} present")
    params0, loss_fn, batch1 = step_cost.build(args.model)
    n_params = sum(x.size for x in jax.tree.leaves(params0))
    inner = optax.adamw(3e-4)
    tx = hj.predictive(inner, hj.HybridConfig(monitor=hj.MonitorSettings(warmup=2**30)))
    env, rows = environment(), []

    def adamw_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = inner.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def predicted_only(params, state):
        updates, state = tx.predicted_update(state, params, first=False)
        return optax.apply_updates(params, updates), state

    def config(n: int, rule: str) -> None:
        mesh = hs.data_mesh(jax.devices()[:n])
        batch = jax.tree.map(lambda x: jnp.concatenate([x] * n), batch1)
        tokens = int(np.prod(batch.shape)) if hasattr(batch, "shape") else None
        b_sh = hs.batch_sharding(mesh)
        p_sh = hs.param_shardings(params0, mesh, rule)
        s_sh = hs.state_shardings(tx, params0, p_sh, mesh)
        gb = jax.device_put(batch, b_sh)

        def record(mode, seconds, spread, **extra):
            row = dict(
                model=args.model,
                n_params=int(n_params),
                devices=n,
                rule=rule,
                mode=mode,
                ms=seconds * 1e3,
                spread_ms=spread * 1e3,
                tokens_per_s=(tokens / seconds) if tokens and mode != "predicted" else None,
                **extra,
                **env,
            )
            rows.append(row)
            tps = f"  {row['tokens_per_s']:12.0f} tokens/s" if row["tokens_per_s"] else ""
            print(f"{n} dev {rule:10s} {mode:10s} {row['ms']:9.3f} ms{tps}", flush=True)

        def loop(fn, carry):
            box = [carry]

            def run():
                c = box[0]
                for _ in range(args.steps):
                    c = fn(*c)
                box[0] = c
                return c

            t, s = median_time(run, args.repeats)
            return t / args.steps, s / args.steps, box[0]

        # plain AdamW, optimizer state sharded like the hybrid's inner state
        params = jax.device_put(jax.tree.map(jnp.copy, params0), p_sh)
        opt = jax.jit(inner.init, out_shardings=s_sh.inner)(params)
        adam = jax.jit(
            adamw_step,
            in_shardings=(p_sh, s_sh.inner, b_sh),
            out_shardings=(p_sh, s_sh.inner, hs.NamedSharding(mesh, hs.PartitionSpec())),
            donate_argnums=(0, 1),
        )
        t, s, _ = loop(lambda p, o: adam(p, o, gb)[:2], (params, opt))
        record("adamw", t, s)

        # the hybrid, pinned to each branch
        params = jax.device_put(jax.tree.map(jnp.copy, params0), p_sh)
        state = jax.jit(tx.init, out_shardings=s_sh)(params)
        step = hs.make_sharded_hybrid_step(loss_fn, tx, p_sh, s_sh, b_sh)
        for _ in range(3):  # fill the basis
            params, state, _ = step(params, state, gb)
        pin = jax.jit(step_cost.forced, static_argnums=1, out_shardings=s_sh)
        for phase, mode in [(hj.FULL, "real"), (hj.PREDICT, "predicted")]:
            t, s, (params, state) = loop(
                lambda p, st: step(p, st, gb)[:2], (params, pin(state, phase))
            )
            record(mode, t, s)
        text = (
            jax.jit(
                predicted_only,
                in_shardings=(p_sh, s_sh),
                out_shardings=(p_sh, s_sh),
            )
            .lower(params, state)
            .compile()
            .as_text()
        )
        c = collectives(text)
        print(f"  predicted update's collectives: {c} (parameters: {n_params})")
        rows.append(
            dict(
                model=args.model,
                devices=n,
                rule=rule,
                mode="predicted_collectives",
                n_params=int(n_params),
                **c,
                **env,
            )
        )
        del params, state

    for n in counts:
        for rule in args.rules.split(","):
            config(n, rule)
    print(json.dumps(env))
    if args.out:
        write_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
