"""What a jitted call costs on the host, by the number of arrays it takes and returns.

    python benchmarks/call_cost.py [--out FILE]

A program that adds one to each of N float32 scalars (donated, so every output reuses an
input's buffer), called in a loop from Python, against the same N values packed in one
array. The figure is microseconds per call, the median over repeats; the device work is
nothing, so this is the host's cost of a call: what a ``HybridState`` of a hundred or
more small leaves pays on every step unless they are packed (``hybrid_jax._packing``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import environment, write_jsonl

CALLS = 300


def per_call(fn, carry, repeats: int) -> float:
    """Median microseconds per call of ``carry = fn(carry)``."""
    carry = jax.block_until_ready(fn(carry))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(CALLS):
            carry = fn(carry)
        jax.block_until_ready(carry)
        times.append((time.perf_counter() - t0) / CALLS * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1,10,30,100,200,300")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="", help="append JSON lines here")
    args = ap.parse_args()
    env, rows = environment(), []
    add = jax.jit(lambda xs: [x + 1 for x in xs], donate_argnums=0)
    add_packed = jax.jit(lambda x: x + 1, donate_argnums=0)
    for n in (int(s) for s in args.sizes.split(",")):
        many = per_call(add, [jnp.zeros((), jnp.float32) for _ in range(n)], args.repeats)
        one = per_call(add_packed, jnp.zeros((n,), jnp.float32), args.repeats)
        rows.append(dict(arrays=n, us_per_call=many, us_per_call_packed=one, **env))
        print(f"{n:4d} arrays in and out: {many:8.1f} us per call; packed in one: {one:6.1f} us")
    if args.out:
        write_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
