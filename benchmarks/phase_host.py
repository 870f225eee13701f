"""The host's side of a fused Predict phase stepped from Python: arrays in and out, and
microseconds per call.

    python benchmarks/phase_host.py --model tiny     # lm25's tree of arrays, tiny shapes
    python benchmarks/phase_host.py --model lm25     # (counts only with --counts-only)
    python benchmarks/phase_host.py --model tiny --pack --metrics train

Prints JSON lines: the leaves that go in and out of the phase's program and of a real
step's program; the operations of the phase's compiled program (its kernels on a GPU);
the host time of each of the 6 calls of a phase (the first launches the phase, the
others serve its rows) and of a whole phase, phases back to back as in ``step_cost.py
--variants fused``; the same program signature with no work in it (the host's floor for
that call); and a jitted call's floor against the number of arrays it donates and
returns. ``--pack`` packs the state (``pack_state=True``; each phase is then pinned by
one more small program, timed with it); ``--metrics train`` returns the metrics as
``hj.train`` does (one array), so that the phase's program returns every step's row and
the calls serving them do not wait for it (``hybrid_jax._fused``).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import PHASE_STEPS, build, repinner

import hybrid_jax as hj

n_leaves = lambda tree: len(jax.tree.leaves(tree))


def per_call_us(fn, carry, calls: int = 200, repeats: int = 7) -> float:
    """Median microseconds per call of ``carry = fn(*carry)`` (blocking once per loop)."""
    box = [fn(*carry)]
    jax.block_until_ready(box[0])
    times = []
    for _ in range(repeats):
        c = box[0]
        t0 = time.perf_counter()
        for _ in range(calls):
            c = fn(*c)
        jax.block_until_ready(c)
        times.append((time.perf_counter() - t0) / calls)
        box[0] = c
    return statistics.median(times) * 1e6


def floor_curve(sizes=(1, 10, 40, 80, 150)) -> list[dict]:
    """A donated identity-like call (``x + 1`` on ``N`` float32[4]) per ``N``."""
    out = []
    for n in sizes:
        fn = jax.jit(lambda *x: tuple(v + 1 for v in x), donate_argnums=tuple(range(n)))
        xs = tuple(jnp.full((4,), i, jnp.float32) for i in range(n))
        out.append(dict(arrays_in=n, arrays_out=n, us_per_call=round(per_call_us(fn, xs), 1)))
    return out


METRICS = {"all": hj.metrics, "train": lambda s: hj._train._pack(hj.metrics(s))}


def setup(model: str, pack: bool = False, metrics: str = "all"):
    """A dispatched step with fused phases, its basis filled by 3 real steps, compiled."""
    params, loss_fn, batch = build(model)
    cfg = hj.HybridConfig(
        max_horizon=PHASE_STEPS, min_horizon=PHASE_STEPS, monitor=hj.MonitorSettings(warmup=2**30)
    )
    tx = hj.predictive(optax.adamw(3e-4), cfg)
    step = hj.make_dispatched_step(
        loss_fn, tx, fuse_predict=True, pack_state=pack, metrics_fn=METRICS[metrics]
    )
    state = tx.init(params)
    for _ in range(3):
        params, state, _ = step(params, state, batch)
    step.compile(params, state, batch)
    return step, params, state, batch


def counts(step, params, state, batch) -> dict:
    """Leaves in and out of the phase's program and of a real step's program."""
    phase = step._phase_program(params, state, batch)
    args = (params, state.snapshot, state._replace(snapshot=None))
    real = step._program(hj._dispatch.REAL, params, batch)
    return dict(
        params=n_leaves(params),
        state=n_leaves(state),
        phase_in=n_leaves(args),
        phase_donated=2 * n_leaves(params),
        phase_out=n_leaves(jax.eval_shape(phase.jitted, *args)),
        real_in=n_leaves((params, state, batch)),
        real_out=n_leaves(jax.eval_shape(real, params, state, batch)),
    )


def program_ops(step, params, state, batch) -> dict:
    """The operations of the phase's compiled program's entry computation, by name
    (on a GPU each fusion and copy is a kernel the host launches). Reads the program
    ``step.compile`` compiled (``setup``), compiling it only if it was not."""
    phase = step._phase_program(params, state, batch)
    if phase._call is phase.jitted:
        phase.compile(params, state)
    text = phase._call.as_text()
    entry = text[text.index("ENTRY") :]
    entry = entry[: entry.index("\n}\n")]
    # each instruction's operation: the word before "(" after its (maybe tuple) shape
    ops = re.findall(r"^\s*(?:ROOT\s+)?%\S+ = .*?\s([a-z][\w-]*)\(", entry, re.M)
    return dict(collections.Counter(ops).most_common())


def stepped(step, params, state, batch, phases: int = 40, repeats: int = 5):
    """Host microseconds of each call of a phase and of a whole phase (back to back);
    returns them and the params and state after the last phase."""
    repin = repinner(state)
    if isinstance(state, hj._packing.PackedState):
        state = repin(state)
    d = hj._dispatch
    told = [[d.PREDICT_FIRST, 0, -1], [d.PREDICT, PHASE_STEPS, d.VERIFY]]
    box, calls, totals = [(params, state)], [[] for _ in range(PHASE_STEPS)], []
    for _ in range(repeats + 1):
        p, s = box[0]
        t0 = time.perf_counter()
        for _ in range(phases):
            s = repin(s)  # as the step before a phase would leave it
            step._last_state, step._pending = s, collections.deque(np.int32(told))
            step._check = step._phase = None
            for i in range(PHASE_STEPS):
                t1 = time.perf_counter()
                p, s, _ = step(p, s, batch)
                calls[i].append(time.perf_counter() - t1)
        jax.block_until_ready(p)
        totals.append((time.perf_counter() - t0) / phases)
        box[0] = (p, s)
    us = lambda xs: round(statistics.median(xs[phases:]) * 1e6, 1)
    out = dict(
        us_per_phase=round(statistics.median(totals[1:]) * 1e6, 1),
        us_per_call=[us(c) for c in calls],
        phases_fused=step.phases_fused,
    )
    return out, box[0]


def signature_floor(step, params, state, batch) -> float:
    """Microseconds per call of a program with the phase's signature and no work."""
    phase = step._phase_program(params, state, batch)
    args = (params, state.snapshot, state._replace(snapshot=None))
    shapes = jax.eval_shape(phase.jitted, *args)

    def nothing(params, snapshot, rest):
        fill = lambda s: jnp.zeros(s.shape, s.dtype)
        return params, snapshot, *jax.tree.map(fill, shapes[2:])

    fn = jax.jit(nothing, donate_argnums=(0, 1))
    rest = args[2]
    return per_call_us(lambda p, s: fn(p, s, rest)[:2], args[:2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny", choices=["tiny", "lm", "lm25", "gpt2"])
    ap.add_argument("--counts-only", action="store_true", help="leaves in and out only")
    ap.add_argument("--pack", action="store_true", help="pack the state (pack_state=True)")
    ap.add_argument("--metrics", default="all", choices=sorted(METRICS))
    args = ap.parse_args()
    step, params, state, batch = setup(args.model, args.pack, args.metrics)
    row = dict(model=args.model, jax=jax.__version__, device=jax.devices()[0].platform)
    row.update(pack=args.pack, metrics=args.metrics)
    if not args.pack:
        print(json.dumps(dict(**row, **counts(step, params, state, batch))), flush=True)
    if args.counts_only:
        return
    ops = program_ops(step, params, state, batch)
    print(json.dumps(dict(**row, phase_program_ops=ops)), flush=True)
    times, (params, state) = stepped(step, params, state, batch)
    print(json.dumps(dict(**row, **times)), flush=True)
    if args.pack:
        return
    floor = signature_floor(step, params, state, batch)
    print(json.dumps(dict(**row, signature_floor_us=round(floor, 1))), flush=True)
    print(json.dumps(dict(**row, floor_curve=floor_curve())), flush=True)


if __name__ == "__main__":
    main()
