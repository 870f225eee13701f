"""Where a small model's hybrid step goes: each program alone, the host's part, the device's.

    python benchmarks/step_parts.py [--model cnn|cnn_small|mlp] [--steps 300] [--repeats 5]

On a small model a step is short, and what the hybrid adds per call (more arrays, more
kernels, the host's choice of the next program) can dominate it. In one process, every
arm on the same batch (digits, batch 64; the CNN of ``end_to_end.py --size gpu``,
channels 64 and 128):

- ``adamw``: a jitted, donated AdamW step, called in a loop;
- ``hybrid``: ``make_dispatched_step`` with the defaults (no Predict phase: the
  confidence threshold is 1), the state packed, one metric scalar, as ``end_to_end.py
  --stepping python`` calls it: inside a Full phase the host reads the kind of one
  step in ``PLAN - 1`` (``hybrid_jax._dispatch.PLAN``);
- ``hybrid, kind read every step``: the same, its programs compiled with ``PLAN = 2``
  (no kinds known beyond the next), as before the kinds were planned;
- ``plain program`` / ``real program``: the hybrid's unobserved and observed real-step
  programs alone, called in a loop (no choice on the host);
- ``plain program, outlook read``: the unobserved program alone, each call's outlook
  (the kind of step two calls later) copied to the host and read two calls later, as
  the dispatched step did before the kinds were planned;
- ``programs in turn, 2 observed in 8``: the observed and unobserved programs called
  in the defaults' pattern, with no choice on the host;
- ``plain program, two copies in turn``: two separately compiled copies of the
  unobserved program called in turn (the cost of switching executables alone);
- ``hybrid, quiet (a long warmup)``: ``warmup_steps`` of a million, so every step is a
  quiet one (``hybrid_jax._phases.quiet``), as in most of a backed-off Full phase: the
  unobserved program, the host reading the kinds once;
- ``hybrid, every step observed`` (``observe_every=1``: one program) and ``hybrid,
  few steps observed`` (``observe_every=1000``, ``full_steps=1000``: the unobserved
  program nearly always).

Per arm: milliseconds per step (median of ``--repeats`` loops of ``--steps`` calls,
blocking once per loop); for ``hybrid`` also the host's time per call up to the
last launch, the last results not waited for, and the kinds of step taken; on a GPU,
the device's busy time per step and its number of kernels per step (one profiled
loop). With ``--breakdown``, per arm, where the host's time goes: the Python
functions with the most own time (cProfile) and the host's trace events
(jax.profiler), per call. JSON lines on stdout and, with ``--out``, in a file.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (
    device_timeline,
    environment,
    host_events,
    median_time,
    python_profile,
    write_jsonl,
)

import hybrid_jax as hj
from hybrid_jax import tasks
from hybrid_jax._kinds import PLAIN, REAL


def build(model: str):
    split = tasks.digits(0)
    if model == "cnn":
        init, loss_fn = functools.partial(tasks.cnn_init, channels=(64, 128)), tasks.cnn_loss
    elif model == "cnn_small":  # the CNN of cpu_step.py (channels 16 and 32)
        init, loss_fn = tasks.cnn_init, tasks.cnn_loss
    else:
        init, loss_fn = functools.partial(tasks.mlp_init, sizes=(64, 256, 256, 10)), tasks.mlp_loss
    it = tasks.batches(split.x_train, split.y_train, 64, seed=0, start=0)
    batches = [jax.device_put(next(it)) for _ in range(16)]
    return init, loss_fn, batches


def adamw_loop(init, loss_fn, batches, steps):
    tx = optax.adamw(1e-3)

    def one(params, opt_state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(one, donate_argnums=(0, 1))
    params = init(jax.random.key(0))
    box = [(params, tx.init(params))]

    def run():
        p, o = box[0]
        for i in range(steps):
            p, o = step(p, o, batches[i % len(batches)])
        box[0] = (p, o)
        return p

    return run


def hybrid_step(loss_fn, **changes):
    cfg = hj.HybridConfig(**{"warmup_steps": 0, "confidence_threshold": 1.0, **changes})
    tx = hj.predictive(optax.adamw(1e-3), cfg)
    return tx, hj.make_dispatched_step(loss_fn, tx, pack_state=True, metrics_fn=lambda s: s.step)


def hybrid_loop(init, loss_fn, batches, steps, plan=None, **changes):
    """``plan``: compile the programs with ``hybrid_jax._dispatch.PLAN = plan`` (2: no
    kinds known beyond the next, so the host reads the kind of every step);
    ``changes``: to the config."""
    tx, step = hybrid_step(loss_fn, **changes)
    params = init(jax.random.key(0))
    state = tx.init(params)
    saved = hj._dispatch.PLAN
    hj._dispatch.PLAN = plan or saved
    try:
        step.compile(params, state, batches[0])
    finally:
        hj._dispatch.PLAN = saved
    box = [(params, state)]

    def run():
        p, s = box[0]
        for i in range(steps):
            p, s, _ = step(p, s, batches[i % len(batches)])
        box[0] = (p, s)
        return p

    run.step = step
    return run


def program_loop(init, loss_fn, batches, steps, kind, read_ahead=False, pattern=None, copies=1):
    """One program in a loop; or, with ``pattern`` (a tuple of kinds), the programs of
    those kinds in turn, as the defaults take them in a Full phase; or, with ``copies``,
    that many separately compiled copies of the one program in turn (what switching
    between executables costs, and nothing else)."""
    tx, step = hybrid_step(loss_fn)
    params = init(jax.random.key(0))
    state = hj._packing.packed(tx.init(params))
    programs = [step._program(k, params, batches[0]) for k in pattern or (kind,)]
    for _ in range(copies - 1):
        programs.append(hybrid_step(loss_fn)[1]._program(kind, params, batches[0]))
    box = [(params, state)]

    def run():
        p, s, waiting = *box[0], []
        for i in range(steps):
            program = programs[i % len(programs)]
            p, s, _, _, ahead = program(p, s, batches[i % len(batches)])
            if read_ahead:  # as the dispatched step reads the kind two calls ahead
                ahead.copy_to_host_async()
                waiting.append(ahead)
                if len(waiting) > 2:
                    np.asarray(waiting.pop(0))
        box[0] = (p, s)
        return p

    return run


def host_only(run, steps) -> float:
    """Seconds per call of ``run``'s loop, not counting the wait for its last results."""
    run()
    t0 = time.perf_counter()
    out = run()
    t = (time.perf_counter() - t0) / steps
    jax.block_until_ready(out)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="cnn", choices=("cnn", "cnn_small", "mlp"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", default="/tmp/step_parts_profile")
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also where the host's time goes per call: the top Python functions "
        "(cProfile) and the top host trace events (jax.profiler)",
    )
    args = ap.parse_args()
    init, loss_fn, batches = build(args.model)
    arms = {
        "adamw": adamw_loop(init, loss_fn, batches, args.steps),
        "hybrid": hybrid_loop(init, loss_fn, batches, args.steps),
        "hybrid, kind read every step": hybrid_loop(init, loss_fn, batches, args.steps, plan=2),
        "plain program": program_loop(init, loss_fn, batches, args.steps, PLAIN),
        "real program": program_loop(init, loss_fn, batches, args.steps, REAL),
        "plain program, outlook read": program_loop(
            init, loss_fn, batches, args.steps, PLAIN, read_ahead=True
        ),
        "programs in turn, 2 observed in 8": program_loop(
            init, loss_fn, batches, args.steps, None, pattern=(REAL, REAL) + (PLAIN,) * 6
        ),
        "plain program, two copies in turn": program_loop(
            init, loss_fn, batches, args.steps, PLAIN, copies=2
        ),
        "hybrid, quiet (a long warmup)": hybrid_loop(
            init, loss_fn, batches, args.steps, warmup_steps=10**6
        ),
        "hybrid, every step observed": hybrid_loop(
            init, loss_fn, batches, args.steps, observe_every=1
        ),
        "hybrid, few steps observed": hybrid_loop(
            init, loss_fn, batches, args.steps, observe_every=1000, full_steps=1000
        ),
    }
    env, rows = environment(), []
    base = None
    for name, run in arms.items():
        t, spread = median_time(run, args.repeats)
        t, spread = t / args.steps, spread / args.steps
        base = base or t
        row = dict(model=args.model, arm=name, ms_per_step=t * 1e3, spread_ms=spread * 1e3)
        row["ratio_to_adamw"] = t / base
        if name.startswith("hybrid"):
            row["host_only_ms_per_call"] = host_only(run, args.steps) * 1e3
            row["kind_counts"] = dict(
                zip(hj._dispatch.KIND_NAMES, run.step.kind_counts, strict=True)
            )
        tl = device_timeline(run, f"{args.profile}/{name.replace(' ', '_')}")
        if tl is not None:
            row["device_busy_ms_per_step"] = tl["busy_ms"] / args.steps
            row["device_events_per_step"] = tl["device_events"] / args.steps
            row["gap_ms_over_10us_per_step"] = tl["gap_ms_over_10us"] / args.steps
        if args.breakdown:
            row["python_profile"] = python_profile(run, args.steps)
            row["host_events"] = host_events(
                run, f"{args.profile}/host_{name.replace(' ', '_')}", args.steps
            )
        row.update(env)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        write_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
