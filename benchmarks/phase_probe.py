"""Where a Predict phase's time goes: host and device, for each way to run it (a GPU).

    python benchmarks/phase_probe.py lm25     # or gpt2, mlp (no device profile on a CPU)

Prints one JSON line per way: a predicted step as its own program, a phase of 6 steps
as one program (scan, and unrolled), a jitted identity over the whole state (the host's
cost of a call alone) and the read of the next kinds; wall-clock and device busy time
per call, device events, and the kernels that take the most time.
"""

import functools
import json
import os
import sys
from pathlib import Path

import jax
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import device_timeline, median_time
from step_cost import build, forced, pinned_phase

import hybrid_jax as hj

model = sys.argv[1] if len(sys.argv) > 1 else "lm25"
out = os.environ.get("OUT", "/tmp")
params, loss_fn, batch = build(model)
cfg = hj.HybridConfig(max_horizon=6, min_horizon=6, monitor=hj.MonitorSettings(warmup=2**30))
tx = hj.predictive(optax.adamw(3e-4), cfg)
step = hj.make_dispatched_step(loss_fn, tx)
state = tx.init(params)
for _ in range(3):
    params, state, _ = step(params, state, batch)
jax.block_until_ready(params)


def report(label, fn, carry, calls):
    box = [carry]

    def run():
        c = box[0]
        for _ in range(calls):
            c = fn(*c)
        box[0] = c
        return c

    t, _ = median_time(run, 5)
    tl = device_timeline(run, f"{out}/prof_{label}") or dict(
        ms_by_name={}, busy_ms=0.0, device_events=0, gap_ms_over_10us=0.0
    )
    names = sorted(tl["ms_by_name"].items(), key=lambda kv: -kv[1])[:12]
    row = dict(
        label=label,
        wall_ms_per_call=t / calls * 1e3,
        calls=calls,
        busy_ms_per_call=tl["busy_ms"] / calls,
        events_per_call=tl["device_events"] / calls,
        gap_ms_per_call=tl["gap_ms_over_10us"] / calls,
        top={k[:70]: round(v / calls, 4) for k, v in names},
    )
    print(json.dumps(row), flush=True)
    return box[0]


program = step._program(hj._dispatch.PREDICT, params, batch)
carry = (params, forced(state, hj.PREDICT), batch)
c = report("predict_step", lambda p, s, b: (*program(p, s, b)[:2], b), carry, 12)
params, state = c[0], c[1]


def phase(unroll, p, s):
    return tx.predicted_phase(pinned_phase(s), p, length=6, metrics_fn=hj.metrics, unroll=unroll)[
        :2
    ]


for unroll in (1, True):
    fn = jax.jit(functools.partial(phase, unroll), donate_argnums=(0, 1))
    params, state = report(f"phase_unroll_{unroll}", fn, (params, state), 6)

ident = jax.jit(lambda p, s: (p, s), donate_argnums=(0, 1))
params, state = report("identity_call", ident, (params, state), 12)
small = jax.jit(lambda s: (hj._kinds.kind_of(cfg, s), hj._kinds.kind_after_next(cfg, s)))
report("kind_read", lambda s: (small(s), s)[1:], (state,), 12)
