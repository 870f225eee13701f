"""What a ``lax.cond`` around a whole AdamW step costs on its own (GPU).

    python benchmarks/cond_overhead.py [gpt2|lm25|lm|mlp] [--attention xla] [--hlo] [--profile DIR]

Times the plain AdamW step and the same step inside ``jax.lax.cond`` whose other branch
passes everything through (the predicate is always true), both jitted with donation.
The difference is a floor under the hybrid's real-step overhead that no bookkeeping
change can remove. Two more variants choose the step on the host from a flag the
device computes (``isfinite(loss)``): read before the next step is launched (a host
sync per step), or read one step late (the device always has the next step queued).
``--profile`` traces one loop of each variant and reports the device's busy time and
idle gaps. ``--hlo`` also counts the kernels and copies of both optimised
programs, to tell extra work from the cost of the conditional itself.
"""

from __future__ import annotations

import argparse
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
from _timing import (
    device_timeline,
    environment,
    median_time,
    show_timeline,
    timed_compile,
    timeline_diff,
)


def hlo_counts(compiled) -> dict[str, int]:
    """Kernels by fusion kind, custom calls, and copies (with elements) in optimised HLO."""
    text = compiled.as_text()
    out = dict(Counter(re.findall(r"fusion\([^)]*\), kind=(k\w+)", text)))
    out["custom-call"] = len(re.findall(r" custom-call\(", text))
    sizes = [
        int(np.prod([int(d) for d in m.split(",") if d]))
        for m in re.findall(r"= \w+\[([0-9,]*)\]\S* copy(?:-start)?\(", text)
    ]
    out["copies"], out["copied_elements"] = len(sizes), int(sum(sizes))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model", nargs="?", default="gpt2", choices=["mlp", "lm", "lm25", "gpt2"])
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    ap.add_argument("--hlo", action="store_true", help="count kernels and copies")
    ap.add_argument("--profile", default="", help="trace one timed loop per variant here")
    args = ap.parse_args()
    params0, loss_fn, batch = step_cost.build(args.model, attention=args.attention)
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

    def host_loop(c, box, lag):
        """AdamW steps chosen on the host from a device flag: read at once, or one step late."""
        q, t = box[0]
        flags = []
        for _ in range(n):
            if len(flags) > lag:
                assert bool(flags.pop(0))  # blocks until that step has finished
            q, t, loss = c(q, t, batch)
            flags.append(jnp.isfinite(loss))
        box[0] = (q, t)
        return q

    variants = [
        ("adamw", adamw_step, None),
        ("adamw inside lax.cond", cond_step, None),
        ("adamw, host reads flag", adamw_step, 0),
        ("adamw, host reads flag 1 late", adamw_step, 1),
    ]
    timelines = {}
    for name, f, lag in variants:
        p = jax.tree.map(jnp.copy, params0)
        c, _ = timed_compile(jax.jit(f, donate_argnums=(0, 1)), p, inner.init(p), batch)
        if args.hlo and lag is None:
            print(f"{name:24s} optimised HLO: {hlo_counts(c)}", flush=True)
        box = [(p, inner.init(p))]

        def run(c=c, box=box, lag=lag):
            if lag is not None:
                return host_loop(c, box, lag)
            q, t = box[0]
            for _ in range(n):
                q, t, _ = c(q, t, batch)
            box[0] = (q, t)
            return q

        t, spread = median_time(run, 5)
        print(f"{name:30s} {t / n * 1e3:8.3f} ms (spread {spread / n * 1e3:.3f})", flush=True)
        if args.profile:
            slug = re.sub(r"\W+", "_", name)
            timelines[name] = device_timeline(run, f"{args.profile}/{slug}")
            show_timeline(f"device timeline of {n} steps", timelines[name])
    if args.profile and timelines.get("adamw"):
        print("device time that the cond adds, by kernel (ms over the loop):")
        for k, v in timeline_diff(timelines["adamw"], timelines["adamw inside lax.cond"]):
            print(f"  {v:+9.3f}  {k}")
    print(environment())


if __name__ == "__main__":
    main()
