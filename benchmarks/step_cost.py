"""Step cost: a real hybrid step vs a predicted hybrid step, against plain AdamW.

    python benchmarks/step_cost.py --model mlp      # digits MLP (CPU-sized)
    python benchmarks/step_cost.py --model lm       # a small byte-level GPT (CPU-sized)
    python benchmarks/step_cost.py --model tiny     # lm25's tree of arrays, tiny (host cost)
    python benchmarks/step_cost.py --model lm25     # the end-to-end GPU workload, batch 64 x 256
    python benchmarks/step_cost.py --model gpt2     # GPT-2-small shapes, batch 8 x 1024 (GPU)

Every mode is one jitted step with its inputs donated, timed over a loop of steps after
compiling and warming up; the figure is the median over repeats. The hybrid's phase is
forced (a real phase or a Predict phase with a huge budget: ``forced``) so that one compiled step
is timed in each branch (``--variants dispatched``: each of the programs of
``hj.make_dispatched_step``, chosen on the host; ``--sketch-strides 1,16`` times each
variant with each ``HybridConfig.sketch_stride``; ``--observe-every 1,4`` with each
``HybridConfig.observe_every``, where a loop of real steps is then the mix of observed
and unobserved real steps that the setting gives; ``dispatched_packed`` and
``fused_packed`` are ``dispatched`` and ``fused`` with ``pack_state=True``, the state's
small leaves packed into one buffer per dtype). ``--fused`` also times ``lax.scan``
loops of steps, which take Python dispatch out of the figures for small models.
"""

from __future__ import annotations

import argparse
import collections
import functools
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
from _timing import (
    device_timeline,
    environment,
    median_time,
    show_timeline,
    timed_compile,
    timeline_diff,
)

import hybrid_jax as hj
from hybrid_jax import tasks


def build(model: str, seed: int = 0, attention: str = "auto"):
    """``(params, loss_fn, batch)`` of a model; ``attention`` as in ``tasks.GPTConfig``."""
    key = jax.random.key(seed)
    if model == "mlp":
        split = tasks.digits(seed)
        batch = next(tasks.batches(split.x_train, split.y_train, 64, seed))
        return tasks.mlp_init(key), tasks.mlp_loss, tuple(map(jnp.asarray, batch))
    text = tasks.stdlib_text(2_000_000)
    train, _ = tasks.byte_split(text)
    if model == "lm":
        cfg = tasks.GPTConfig(seq_len=128, d_model=128, n_layers=2, n_heads=4)
        bs = 16
    elif model == "tiny":  # lm25's and GPT-2's tree of arrays, tiny: the host's cost alone
        cfg = tasks.GPTConfig(seq_len=16, d_model=32, n_layers=2, n_heads=2)
        bs = 4
    elif model == "lm25":  # the end-to-end benchmark's GPU workload (25.4M parameters)
        cfg = tasks.GPTConfig(
            seq_len=256, d_model=512, n_layers=8, n_heads=8, compute_dtype="bfloat16"
        )
        bs = 64
    elif model == "gpt2":
        cfg, bs = tasks.GPT2_SMALL, 8
    else:
        raise SystemExit(f"unknown model {model!r}")
    cfg = cfg._replace(attention=attention)
    tokens = jnp.asarray(next(tasks.token_batches(train, bs, cfg.seq_len, seed)))
    return tasks.gpt_init(key, cfg), functools.partial(tasks.gpt_loss, cfg=cfg), tokens


def forced(state: hj.HybridState, phase: int) -> hj.HybridState:
    """The state with its phase pinned for a very long time. A Full phase is pinned as a
    Correct phase: the same real steps, 2 of every ``observe_every`` observed, where a
    Full phase this long would be quiet (``hybrid_jax._phases.quiet``: nothing observed)."""
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    phase = hj.CORRECT if phase == hj.FULL else phase
    pinned = state.phase._replace(id=i32(phase), step=i32(1), budget=i32(2**30))
    return state._replace(phase=pinned)


def big_copies(compiled) -> int:
    """Copies of arrays of at least 2**20 elements in the optimised HLO."""
    n = 0
    for line in compiled.as_text().splitlines():
        m = re.search(r"= [a-z0-9]+\[([0-9,]+)\]\S* copy(?:-start)?\(", line)
        if m and np.prod([int(d) for d in m.group(1).split(",") if d]) >= 2**20:
            n += 1
    return n


def delta_cond_step(loss_fn, tx):
    """A variant: the cond returns the update; it is applied outside the cond."""

    def step(params, state, batch):
        def real(params, state):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            return tx.real_update(grads, state, params, value=loss, verify=False, observe=True)

        def predicted(params, state):
            return tx.predicted_update(state, params, first=False)

        updates, state = jax.lax.cond(tx.needs_gradient(state), real, predicted, params, state)
        return optax.apply_updates(params, updates), state, hj.metrics(state)

    return jax.jit(step, donate_argnums=(0, 1))


def while_step(loss_fn, tx):
    """A variant: two while loops of 0 or 1 trips instead of one cond."""

    def step(params, state, batch):
        is_real = tx.needs_gradient(state).astype(jnp.int32)

        def real(c):
            i, params, state = c
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, state = tx.real_update(
                grads, state, params, value=loss, verify=False, observe=True
            )
            return i + 1, optax.apply_updates(params, updates), state

        def predicted(c):
            i, params, state = c
            updates, state = tx.predicted_update(state, params, first=False)
            return i + 1, optax.apply_updates(params, updates), state

        zero = jnp.zeros((), jnp.int32)
        _, params, state = jax.lax.while_loop(lambda c: c[0] < is_real, real, (zero, params, state))
        _, params, state = jax.lax.while_loop(
            lambda c: c[0] < 1 - is_real, predicted, (zero, params, state)
        )
        return params, state, hj.metrics(state)

    return jax.jit(step, donate_argnums=(0, 1))


PHASE_STEPS = 6


def pinned_phase(state: hj.HybridState) -> hj.HybridState:
    """The state at the start of a Predict phase of ``PHASE_STEPS`` steps, nothing pending."""
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    no = jnp.asarray(False)
    phase = state.phase._replace(id=i32(hj.PREDICT), step=i32(0), budget=i32(PHASE_STEPS))
    pending = state.pending._replace(verify=no, veto=no, force_full=no)
    return state._replace(phase=phase, pending=pending, snapshot_valid=no)


def repinner(state):
    """``repin(state) -> state`` at the start of a Predict phase of ``PHASE_STEPS`` steps
    (``pinned_phase``'s small arrays); for a ``PackedState``, a jitted program that
    donates it."""
    pinned = pinned_phase(hj._packing.unpack_state(state))
    small = dict(phase=pinned.phase, pending=pinned.pending, snapshot_valid=pinned.snapshot_valid)
    if not isinstance(state, hj._packing.PackedState):
        return lambda s: s._replace(**small)
    layout = state.layout
    return jax.jit(lambda s: layout.pack(layout.unpack(s)._replace(**small)), donate_argnums=0)


def ahead_of_time(step, pinned, n: int) -> list:
    """``n`` packed states at the start of a phase, made before a timed loop: copies of
    the leaves of ``pinned`` that the phase's program donates, the others shared."""
    phase = step._programs[hj._dispatch.PHASE]
    leaves, treedef = jax.tree.flatten(pinned)
    moving = set(phase.moving)
    copy = lambda: [jnp.copy(x) if i in moving else x for i, x in enumerate(leaves)]
    states = [jax.tree.unflatten(treedef, copy()) for _ in range(n)]
    return jax.block_until_ready(states)


def median_prepared(loop, prepare, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median and spread in seconds of ``loop(prepare())``, ``prepare()`` not timed."""
    times = []
    for i in range(warmup + repeats):
        args = prepare()
        t0 = time.perf_counter()
        jax.block_until_ready(loop(args))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times) - min(times)


PHASE_METRICS = {"all": hj.metrics, "train": lambda s: hj._train._pack(hj.metrics(s))}


def time_fused_phases(
    inner, cfg, loss_fn, batch, fresh, record, repeats: int, pack: bool = False, metrics="train"
) -> None:
    """Predict phases of ``PHASE_STEPS`` steps, each run as one program and stepped from
    Python (``fuse_predict=True``: one call per step, the first runs the phase and reads
    its rows). Each phase starts from the same small pinned arrays (the program neither
    donates nor changes them), handed to the step as its own state, so that no call
    but the step's own runs. With ``pack``, the state is packed and donated whole, so
    each phase is pinned by one more (small) program, timed apart as "re-pin alone", and
    the phases are timed again from states pinned before the loop ("pinned ahead": the
    leaves the program donates copied per phase, untimed), as a run's phase starts from
    the state its real step before left, with no re-pin, and as a run meets them, each
    after a real step (``time_in_run``).
    ``metrics``: ``"train"``, every metric in one array as ``hj.train`` returns them (the
    program then returns each step's row: no call waits for the phase), or ``"all"``,
    ``hj.metrics``' 24 arrays (the rows are read on the host, the phase's second call
    waits for it). Also the device's busy time per phase (a profile)."""
    tx = hj.predictive(inner, cfg.replace(max_horizon=PHASE_STEPS, min_horizon=PHASE_STEPS))
    step = hj.make_dispatched_step(
        loss_fn, tx, fuse_predict=True, pack_state=pack, metrics_fn=PHASE_METRICS[metrics]
    )
    p = fresh()
    state = tx.init(p)
    for _ in range(3):  # fill the basis with real updates
        p, state, _ = step(p, state, batch)
    t0 = time.perf_counter()
    step.compile(p, state, batch)
    cs = time.perf_counter() - t0
    phases, box = 10, [(p, state)]
    d = hj._dispatch
    told = [
        np.asarray(k, np.int32)
        for k in ([d.PREDICT_FIRST, 0, -1], [d.PREDICT, PHASE_STEPS, d.VERIFY])
    ]

    repin = repinner(state)
    if pack:
        box[0] = (p, repin(state))

    def one_phase(p, state):
        # as the step before a phase would leave it: this kind, then the phase's outlook
        step._last_state, step._pending = state, collections.deque(told)
        step._check = step._phase = None
        for _ in range(PHASE_STEPS):
            p, state, _ = step(p, state, batch)
        return p, state

    def python_loop():
        p, state = box[0]
        for _ in range(phases):
            p, state = one_phase(p, repin(state))
        box[0] = (p, state)
        return p

    label = f"predict phase of {PHASE_STEPS}" + (" (packed)" if pack else "")
    label += f" (metrics {metrics})"  # train: one array, as hj.train; all: hj.metrics'
    t, s = median_time(python_loop, repeats)
    record(f"{label}, stepped", t / phases, s / phases, cs)
    if pack:

        def repin_loop():
            p, state = box[0]
            for _ in range(phases):
                state = repin(state)
            box[0] = (p, state)
            return state

        t, s = median_time(repin_loop, repeats)
        record(f"{label}, re-pin alone", t / phases, s / phases, 0.0)
        pinned = lambda: ahead_of_time(step, repin(box[0][1]), phases)

        def prepared_loop(states):
            p = box[0][0]
            for state in states:
                p, state = one_phase(p, state)
            box[0] = (p, state)
            return p

        t, s = median_prepared(prepared_loop, pinned, repeats)
        record(f"{label}, stepped, pinned ahead", t / phases, s / phases, cs)
        in_run = dict(inner=inner, loss_fn=loss_fn, batch=batch, fresh=fresh)
        time_in_run(one_phase, repin, box, phases, repeats, record, label, cs, **in_run)
    timeline = device_timeline(python_loop, "/tmp/fused_phase_profile")
    if timeline is not None:
        busy = timeline["busy_ms"] / phases / 1e3
        record(f"{label}, device busy", busy, 0.0, cs)
    assert step.phases_fused >= phases * repeats, step.phases_fused


def time_in_run(one_phase, repin, box, phases, repeats, record, label, cs, **real) -> None:
    """A phase as a run meets it: after a real step. Each loop runs ``phases`` times an
    AdamW step of the same model and batch (on its own parameters; the real step before
    a phase is an observed one of the hybrid, which keeps the device a few percent
    longer) and the re-pin, with the phase after them or without; the two loops
    alternate (ABBA, ``2 * repeats`` pairs) and the median of their paired differences
    is what a phase adds to a run. The host launches the phase while the device runs the
    step before it."""
    inner, loss_fn, batch = real["inner"], real["loss_fn"], real["batch"]

    def adamw_step(params, opt_state):
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = inner.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    adamw = jax.jit(adamw_step, donate_argnums=(0, 1))
    q = real["fresh"]()
    busy = [(q, inner.init(q))]

    def loop(with_phase: bool):
        (p, state), (q, o) = box[0], busy[0]
        for _ in range(phases):
            q, o = adamw(q, o)
            state = repin(state)
            if with_phase:
                p, state = one_phase(p, state)
        box[0], busy[0] = (p, state), (q, o)
        return p, state, q, o

    times = {True: [], False: []}
    for i in range(2 + 2 * repeats):
        for with_phase in (True, False) if i % 2 == 0 else (False, True):
            t0 = time.perf_counter()
            jax.block_until_ready(loop(with_phase))
            if i >= 2:
                times[with_phase].append(time.perf_counter() - t0)
    diffs = [a - b for a, b in zip(times[True], times[False], strict=True)]
    base = statistics.median(times[False]) / phases
    record(f"{label}, in a run: real step + re-pin", base, 0.0, 0.0)
    spread = (max(diffs) - min(diffs)) / phases
    record(f"{label}, in a run: what the phase adds", statistics.median(diffs) / phases, spread, cs)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", choices=["mlp", "tiny", "lm", "lm25", "gpt2"], default="mlp")
    ap.add_argument("--steps", type=int, default=0, help="steps per timed loop (0: by model)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--basis-dtype", default="float32")
    ap.add_argument(
        "--sketch-strides", default="1", help="comma list of BasisSettings.sketch_stride values"
    )
    ap.add_argument("--predictor", default="last_update", help="last_update, extrapolate, rssm")
    ap.add_argument("--rssm-train-every", type=int, default=1, help="RSSMSettings.train_every")
    ap.add_argument(
        "--observe-every", default="1", help="comma list of HybridConfig.observe_every values"
    )
    ap.add_argument(
        "--variants",
        default="cond",
        help="comma list: cond,delta_cond,while,dispatched,dispatched_packed,fused,"
        "fused_packed (fused: Predict phases of 6 steps run as one program each; packed: "
        "pack_state=True)",
    )
    ap.add_argument("--skip-baselines", action="store_true", help="only the hybrid variants")
    ap.add_argument(
        "--phase-metrics",
        default="train",
        choices=sorted(PHASE_METRICS),
        help="the fused variants' metrics: as hj.train returns them (one array) or all of "
        "hj.metrics' (24 arrays)",
    )
    ap.add_argument("--fused", action="store_true", help="also time lax.scan loops")
    ap.add_argument("--out", default="", help="append JSON lines here")
    ap.add_argument("--profile", default="", help="trace a loop of each mode here")
    ap.add_argument("--dump-hlo", default="", help="write each hybrid variant's optimised HLO here")
    args = ap.parse_args()
    n = args.steps or {"mlp": 200, "tiny": 200, "lm": 50, "lm25": 20, "gpt2": 20}[args.model]

    params0, loss_fn, batch = build(args.model)
    n_params = sum(x.size for x in jax.tree.leaves(params0))
    inner = optax.adamw(3e-4)
    # the monitor stays silent, so that its verdicts cannot move the pinned phase
    cfg = hj.HybridConfig(
        basis=hj.BasisSettings(dtype=args.basis_dtype),
        predictor=args.predictor,
        rssm=hj.RSSMSettings(train_every=args.rssm_train_every),
        monitor=hj.MonitorSettings(warmup=2**30),
    )
    strides = [int(x) for x in args.sketch_strides.split(",")]
    tx = hj.predictive(inner, cfg)
    fresh = lambda: jax.tree.map(jnp.copy, params0)
    rows = []

    def record(mode, seconds, spread, compile_s, copies=None, stride=1, observe_every=1):
        rows.append(
            dict(
                model=args.model,
                mode=mode,
                ms=seconds * 1e3,
                spread_ms=spread * 1e3,
                compile_s=compile_s,
                big_copies=copies,
                n_params=int(n_params),
                basis_dtype=args.basis_dtype,
                predictor=args.predictor,
                sketch_stride=stride,
                rssm_train_every=args.rssm_train_every,
                observe_every=observe_every,
                steps_per_loop=n,
            )
        )
        print(
            f"{mode:28s} {seconds * 1e3:9.3f} ms  (spread {spread * 1e3:.3f}, "
            f"compile {compile_s:.1f} s, big copies {copies})",
            flush=True,
        )

    timelines = {}

    def time_loop(compiled, carry, batches, label=""):
        """Median seconds per step of ``carry = compiled(*carry, batch)`` loops; final carry.
        With ``--profile`` and a ``label``, one more loop is traced."""
        box = [carry]

        def run():
            c = box[0]
            for b in batches:
                c = compiled(*c, b)[:2]
            box[0] = c
            return c

        t, s = median_time(run, args.repeats)
        if args.profile and label:
            slug = re.sub(r"\W+", "_", label)
            timelines[label] = device_timeline(run, f"{args.profile}/{slug}")
            show_timeline(f"device timeline of {label}", timelines[label])
        return t / len(batches), s / len(batches), box[0]

    batches = [batch] * n

    # plain AdamW
    def adamw_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = inner.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if not args.skip_baselines:
        p = fresh()
        compiled, cs = timed_compile(
            jax.jit(adamw_step, donate_argnums=(0, 1)), p, inner.init(p), batch
        )
        t, s, _ = time_loop(compiled, (p, inner.init(p)), batches, "adamw")
        record("adamw", t, s, cs, big_copies(compiled))

        # forward only
        p = fresh()
        compiled, cs = timed_compile(jax.jit(loss_fn), p, batch)
        t, s = median_time(lambda: [compiled(p, b) for b in batches][-1], args.repeats)
        record("forward", t / n, s / n, cs)

        # floor of a predicted step: params + c0 * b0 + c1 * b1 (basis_size 2), params donated
        def floor(params, basis, c):
            out = jax.tree.map(
                lambda x, b: x + (c[0] * b[0] + c[1] * b[1]).astype(x.dtype), params, basis
            )
            return out, basis

        b = tx.init(p).basis
        basis = jax.tree.map(lambda e, r: jnp.stack([e, r[0]]), b.ema, b.ring)
        cvec = jnp.asarray([0.5, 0.25], jnp.float32)
        compiled, cs = timed_compile(jax.jit(floor, donate_argnums=(0,)), fresh(), basis, cvec)
        t, s, _ = time_loop(lambda p, b, c: compiled(p, b, c), (fresh(), basis), [cvec] * n)
        record("floor(params+basis combo)", t, s, cs)
        del basis

    makers = {
        "cond": lambda tx: hj.make_hybrid_step(loss_fn, tx),
        "delta_cond": lambda tx: delta_cond_step(loss_fn, tx),
        "while": lambda tx: while_step(loss_fn, tx),
        "dispatched": lambda tx: hj.make_dispatched_step(loss_fn, tx),
        "dispatched_packed": lambda tx: hj.make_dispatched_step(loss_fn, tx, pack_state=True),
    }
    observe = [int(x) for x in args.observe_every.split(",")]
    hybrid_runs = [(v, k, o) for o in observe for k in strides for v in args.variants.split(",")]
    for variant, stride, every in [r for r in hybrid_runs if not r[0].startswith("fused")]:
        tx = hj.predictive(
            inner, cfg.replace(basis=cfg.basis.replace(sketch_stride=stride), observe_every=every)
        )
        if stride != 1:
            variant = f"{variant}/{stride}"
        if every != 1:  # a timed loop of real steps then mixes observed and plain ones
            variant = f"{variant}/observe{every}"
        p = fresh()
        state = tx.init(p)
        if variant.startswith("dispatched"):  # four programs, compiled on first use of each
            compiled, copies = makers[variant.split("/")[0]](tx), None
            t0 = time.perf_counter()
            p, state, _ = compiled(p, state, batch)
            cs = time.perf_counter() - t0
        else:
            compiled, cs = timed_compile(makers[variant.split("/")[0]](tx), p, state, batch)
            copies = big_copies(compiled)
        if args.dump_hlo:
            slug = re.sub(r"\W+", "_", f"{args.model}_{variant}")
            if copies is None:  # the dispatched step's real program
                text = compiled._program(0, p, batch).lower(p, state, batch).compile().as_text()
            else:
                text = compiled.as_text()
            Path(args.dump_hlo, f"{slug}.hlo.txt").write_text(text)
        for _ in range(3):  # fill the basis with real updates
            p, state, _ = compiled(p, state, batch)
        for phase, label in [(hj.FULL, "real"), (hj.PREDICT, "predicted")]:
            mode = f"hybrid[{variant}] {label}"
            pinned = forced(hj._packing.unpack_state(state), phase)
            t, s, (p, state) = time_loop(compiled, (p, pinned), batches, mode)
            record(mode, t, s, cs, copies, stride, every)
        if copies is None:  # the dispatched step: how often each program ran
            counts = dict(zip(hj._dispatch.KIND_NAMES, compiled.kind_counts, strict=True))
            rows[-1]["kind_counts"] = counts
            print(f"  programs run (all loops): {counts}", flush=True)
        if timelines.get("adamw") and f"hybrid[{variant}] real" in timelines:
            print(f"device time that hybrid[{variant}] real adds to adamw, by kernel (ms/loop):")
            for k, v in timeline_diff(timelines["adamw"], timelines[f"hybrid[{variant}] real"], 25):
                print(f"  {v:+9.3f}  {k}")

    for variant in [v for v in args.variants.split(",") if v in ("fused", "fused_packed")]:
        pack = variant == "fused_packed"
        time_fused_phases(
            inner, cfg, loss_fn, batch, fresh, record, args.repeats, pack, args.phase_metrics
        )

    if args.fused:
        stacked = jax.tree.map(lambda x: jnp.stack([x] * n), batch)

        def fused_hybrid(params, state, batches):
            def body(c, b):
                p, s, _ = hj.hybrid_step(loss_fn, tx, *c, b)
                return (p, s), None

            return jax.lax.scan(body, (params, state), batches)[0]

        def fused_adamw(params, opt_state, batches):
            return jax.lax.scan(
                lambda c, b: (adamw_step(*c, b)[:2], None), (params, opt_state), batches
            )[0]

        p = fresh()
        compiled, cs = timed_compile(
            jax.jit(fused_adamw, donate_argnums=(0, 1)), p, inner.init(p), stacked
        )
        t, s, _ = time_loop(compiled, (p, inner.init(p)), [stacked])
        record("fused adamw", t / n, s / n, cs)
        p = fresh()
        state = tx.init(p)
        compiled, cs = timed_compile(
            jax.jit(fused_hybrid, donate_argnums=(0, 1)), p, state, stacked
        )
        p, state = compiled(p, state, stacked)
        for phase, label in [(hj.FULL, "real"), (hj.PREDICT, "predicted")]:
            t, s, (p, state) = time_loop(compiled, (p, forced(state, phase)), [stacked])
            record(f"fused hybrid {label}", t / n, s / n, cs)

    env = environment()
    print(json.dumps(env))
    by = {r["mode"]: r["ms"] for r in rows}
    for variant in {r["mode"].split("]")[0][7:] for r in rows if r["mode"].startswith("hybrid[")}:
        if "adamw" not in by:
            continue
        real, pred = by[f"hybrid[{variant}] real"], by[f"hybrid[{variant}] predicted"]
        print(
            f"[{variant}] predicted/real = {pred / real:.4f}; "
            f"real/adamw = {real / by['adamw']:.4f}; "
            f"predicted/adamw = {pred / by['adamw']:.4f}"
        )
    if args.profile:
        by_name = {k: t["ms_by_name"] for k, t in timelines.items() if t}
        Path(args.profile, "ms_by_name.json").write_text(json.dumps(by_name, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, **env}) + "\n")


if __name__ == "__main__":
    main()
