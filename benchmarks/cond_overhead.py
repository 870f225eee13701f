"""What a ``lax.cond`` around a whole AdamW step costs on its own (GPT-2-small shapes, GPU).

    python benchmarks/cond_overhead.py

Times the plain AdamW step and the same step inside ``jax.lax.cond`` whose other branch
passes everything through (the predicate is always true), both jitted with donation.
The difference is a floor under the hybrid's real-step overhead that no bookkeeping
change can remove.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_cost
from _timing import environment, median_time, timed_compile


def main() -> None:
    params0, loss_fn, batch = step_cost.build(sys.argv[1] if len(sys.argv) > 1 else "gpt2")
    n = 20
    inner = optax.adamw(3e-4)

    def adamw_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = inner.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def cond_step(params, opt_state, batch):
        return jax.lax.cond(
            opt_state[0].count >= 0,
            lambda p, s: adamw_step(p, s, batch),
            lambda p, s: (p, s, jnp.float32(0)),
            params,
            opt_state,
        )

    for name, f in [("adamw", adamw_step), ("adamw inside lax.cond", cond_step)]:
        p = jax.tree.map(jnp.copy, params0)
        c, _ = timed_compile(jax.jit(f, donate_argnums=(0, 1)), p, inner.init(p), batch)
        box = [(p, inner.init(p))]

        def run(c=c, box=box):
            q, t = box[0]
            for _ in range(n):
                q, t, _ = c(q, t, batch)
            box[0] = (q, t)
            return q

        t, spread = median_time(run, 5)
        print(f"{name:24s} {t / n * 1e3:8.3f} ms (spread {spread / n * 1e3:.3f})", flush=True)
    print(environment())


if __name__ == "__main__":
    main()
