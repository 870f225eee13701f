"""End to end: does the hybrid reach the same held-out loss sooner than what a user would pick?

    python benchmarks/end_to_end.py --size cpu --out benchmarks/results/e2e_cpu  # < 10 min
    python benchmarks/end_to_end.py --size gpu --out DIR                         # one GPU
    python benchmarks/end_to_end.py --summarize DIR/runs.jsonl --out DIR         # again

``--deadline S`` stops before a run would start after S seconds (exit 3) and ``--resume``
goes on from ``OUT/runs.jsonl`` (a run is reused when its workload, arm, seed, learning
rate, steps and hybrid settings match); ``--lrs`` replaces the sweep, ``--hybrid JSON``
changes the hybrid arms' settings, ``--arms`` and ``--workloads`` select.

In one process, with the same seeds and the same data order (batch ``i`` of seed ``s`` is
the same array for every arm). Each workload's held-out data is halved: a validation
split, on which the learning rate is chosen, and the held-out split, whose loss is
reported.

- ``adamw@LR``: ``optax.adamw`` (weight decay 1e-4) with linear warmup (5%) and cosine
  decay to 10%, for each rate of a sweep; the best median final *validation* loss is the
  *tuned* AdamW, and its median final held-out loss the target;
- ``hybrid:default`` (``HybridConfig()``), ``hybrid:rssm`` (the defaults with the RSSM) and
  ``hybrid:linefit`` (the ceiling study's best family: a line fit over 4 snapshots 8 real
  steps apart, gated by the cost rule alone): ``hj.predictive`` around the tuned AdamW;
- ``matched``: AdamW at the tuned rate given ``hybrid:default``'s measured wall-clock
  (fewer or more steps, the schedule compressed or stretched to fit);
- ``schedule_free``: optax's schedule-free AdamW at the tuned rate (evaluated at its
  averaged weights), a reference;
- ``lookahead`` (only when asked): ``optax.lookahead`` around the tuned AdamW.

By default (``--stepping python``) every arm calls one jitted step per batch from Python,
as ``hj.train`` does (the hybrids through ``hj.make_dispatched_step``; every program
compiled before the clock starts); each run's wall-clock is its actual mix of steps.
``--stepping fused`` runs ``lax.scan`` chunks of ``eval_every`` steps instead;
``--timeline`` also times every call and sums the seconds by the kind of step taken. The
learning rate is set from the global step for every arm, so that the hybrid's schedule
follows the steps taken, real and predicted. The held-out loss is measured between
chunks and not timed.

Outputs under ``--out``: ``runs.jsonl`` (one line per arm and seed, with its curve),
``summary.json``, ``summary.md`` (the tables of ``end_to_end.md``, targets first) and
``curves.png``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import environment
from step_cost import forced

import hybrid_jax as hj
from hybrid_jax import tasks
from hybrid_jax._kinds import KIND_NAMES


class Deadline(Exception):
    """``--deadline`` passed: stop before the next run (``--resume`` goes on)."""


class Workload(NamedTuple):
    name: str
    init: Any  # key -> params
    loss_fn: Any  # (params, batch) -> loss
    batches: Any  # (seed, start, n) -> stacked numpy batches
    eval_batches: Any  # stacked held-out batches (numpy): the loss reported
    val_batches: Any  # stacked validation batches (numpy): the learning rate is chosen on them
    steps: int
    eval_every: int
    lrs: tuple[float, ...]
    n_params: int
    describe: str


def halves(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validation (first half) and held-out (second half) of a held-out array."""
    return x[: len(x) // 2], x[len(x) // 2 :]


def digits_workload(
    model: str, steps: int, eval_every: int, lrs: tuple[float, ...], batch_size: int = 64
) -> Workload:
    """The digits MLP (``model="mlp"``) or CNN (``"cnn"``); the 20% held out by
    ``tasks.digits`` is halved into validation and held-out images."""
    split = tasks.digits(0)
    if model == "mlp":
        sizes = (64, 256, 256, 10)
        init = functools.partial(tasks.mlp_init, sizes=sizes)
        loss_fn, arch = tasks.mlp_loss, f"MLP {sizes}"
    else:
        channels = (64, 128)
        init = functools.partial(tasks.cnn_init, channels=channels)
        loss_fn, arch = tasks.cnn_loss, f"CNN, channels {channels}"

    def batches(seed, start, n):
        it = tasks.batches(split.x_train, split.y_train, batch_size, seed=seed, start=start)
        xs, ys = zip(*(next(it) for _ in range(n)), strict=True)
        return np.stack(xs), np.stack(ys)

    (x_val, x_test), (y_val, y_test) = halves(split.x_test), halves(split.y_test)
    n = sum(x.size for x in jax.tree.leaves(jax.eval_shape(init, jax.random.key(0))))
    return Workload(
        name=f"digits_{model}",
        init=init,
        loss_fn=loss_fn,
        batches=batches,
        eval_batches=(x_test[None], y_test[None]),
        val_batches=(x_val[None], y_val[None]),
        steps=steps,
        eval_every=eval_every,
        lrs=lrs,
        n_params=n,
        describe=f"scikit-learn digits, {arch}, batch {batch_size}; the 20% held out is "
        f"halved: {len(y_val)} validation images (choose the rate), {len(y_test)} held-out",
    )


def bytes_workload(
    cfg: tasks.GPTConfig,
    batch_size: int,
    text_bytes: int,
    steps: int,
    eval_every: int,
    lrs: tuple[float, ...],
    eval_n: int = 8,
) -> Workload:
    """A byte-level GPT; the text's last 10% is halved into validation and held-out text."""
    train, rest = tasks.byte_split(tasks.stdlib_text(text_bytes))
    val, test = halves(rest)

    def batches(seed, start, n):
        it = tasks.token_batches(train, batch_size, cfg.seq_len, seed=seed, start=start)
        return np.stack([next(it) for _ in range(n)])

    def fixed(data):
        it = tasks.token_batches(data, batch_size, cfg.seq_len, seed=12345)
        return np.stack([next(it) for _ in range(eval_n)])

    init = functools.partial(tasks.gpt_init, cfg=cfg)
    n = sum(x.size for x in jax.tree.leaves(jax.eval_shape(init, jax.random.key(0))))
    return Workload(
        name=f"bytes_gpt_d{cfg.d_model}_l{cfg.n_layers}",
        init=init,
        loss_fn=functools.partial(tasks.gpt_loss, cfg=cfg),
        batches=batches,
        eval_batches=fixed(test),
        val_batches=fixed(val),
        steps=steps,
        eval_every=eval_every,
        lrs=lrs,
        n_params=n,
        describe=f"byte-level GPT on Python stdlib source ({text_bytes / 1e6:.0f} MB; of its "
        f"last 10%, the first half is validation, the second held out), {cfg}, "
        f"batch {batch_size}; {eval_n} fixed batches each",
    )


def workloads(size: str, steps: int | None) -> list[Workload]:
    if size == "cpu":
        tiny = tasks.GPTConfig(seq_len=64, d_model=64, n_layers=2, n_heads=4)
        return [
            digits_workload("mlp", steps or 1000, 50, (1e-3, 3e-3, 1e-2)),
            bytes_workload(tiny, 8, 1_000_000, steps or 300, 30, (1e-3, 3e-3, 1e-2)),
        ]
    if size == "gpu":
        cfg = tasks.GPTConfig(
            seq_len=256, d_model=512, n_layers=8, n_heads=8, compute_dtype="bfloat16"
        )
        return [
            bytes_workload(cfg, 64, 8_000_000, steps or 2000, 100, (3e-4, 6e-4, 1.2e-3, 2.4e-3)),
            digits_workload("cnn", steps or 1000, 50, (1e-3, 3e-3, 1e-2, 3e-2, 0.1)),
        ]
    raise SystemExit(f"unknown size {size!r}")


# The hybrid arms: the defaults, the defaults with the RSSM, and the family the ceiling
# study found best (a line fit over spaced snapshots; ``ceiling.md``), gated by the cost
# rule alone.
HYBRIDS = {
    "default": {},
    "rssm": dict(predictor="rssm"),
    "linefit": dict(
        predictor="linefit",
        basis=dict(size=4, stride=8),
        confidence_threshold=0.0,
        observe_every=1,  # a displacement basis sums every real update
    ),
}
ARMS = (*HYBRIDS, "matched", "schedule_free", "lookahead")
DEFAULT_ARMS = (*HYBRIDS, "matched", "schedule_free")


def hybrid_config(name: str, overrides: dict | None = None) -> hj.HybridConfig:
    """The hybrid arm ``name``'s settings (``HYBRIDS``); ``overrides`` (``--hybrid``)
    replaces any of them."""
    return hj.HybridConfig.from_dict({**HYBRIDS[name], **(overrides or {})})


def lr_at(t: jax.Array, hyper: jax.Array) -> jax.Array:
    """Linear warmup then cosine decay to 10%; ``hyper = [peak, warmup, total]``."""
    peak, warm, total = hyper[0], hyper[1], hyper[2]
    t = t.astype(jnp.float32)
    frac = jnp.clip((t - warm) / jnp.maximum(total - warm, 1.0), 0.0, 1.0)
    decay = 0.1 + 0.9 * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return peak * jnp.where(t < warm, (t + 1.0) / warm, decay)


def adamw() -> optax.GradientTransformation:
    return optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=1e-4)


def with_lr(opt_state: Any, lr: jax.Array) -> Any:
    return optax.tree_utils.tree_set(opt_state, learning_rate=lr)


def schedule_free(lr: float, steps: int) -> optax.GradientTransformation:
    """optax's schedule-free AdamW at a constant peak rate with its own warmup (5%)."""
    return optax.contrib.schedule_free_adamw(
        learning_rate=lr, warmup_steps=max(round(steps * 0.05), 1), weight_decay=1e-4
    )


def set_lr(arm: Arm, opt_state: Any, lr: jax.Array) -> Any:
    """The step's learning rate into the state; schedule-free AdamW keeps its own."""
    return opt_state if arm.kind == "schedule_free" else with_lr(opt_state, lr)


class Arm(NamedTuple):
    name: str
    kind: str  # adamw | hybrid | lookahead | schedule_free
    tx: Any
    lr: float
    steps: int
    chunk: int


def make_chunk(arm: Arm, loss_fn):
    """A jitted ``(params, state, batches, t0, hyper) -> (params, state)`` over a chunk."""
    tx = arm.tx

    def body(carry, batch):
        params, state, t, hyper = carry
        lr = lr_at(t, hyper)
        if arm.kind == "hybrid":
            state = state._replace(inner=with_lr(state.inner, lr))
            params, state, _ = hj.hybrid_step(loss_fn, tx, params, state, batch)
        elif arm.kind == "lookahead":
            grads = jax.grad(loss_fn)(params.fast, batch)
            updates, state = tx.update(grads, with_lr(state, lr), params)
            params = optax.apply_updates(params, updates)
        else:
            grads = jax.grad(loss_fn)(params, batch)
            updates, state = tx.update(grads, set_lr(arm, state, lr), params)
            params = optax.apply_updates(params, updates)
        return (params, state, t + 1, hyper), None

    def chunk(params, state, batches, t0, hyper):
        (params, state, _, _), _ = jax.lax.scan(body, (params, state, t0, hyper), batches)
        return params, state

    return jax.jit(chunk, donate_argnums=(0, 1))


def make_stepper(arm: Arm, loss_fn):
    """``step(params, state, batch, t, hyper) -> (params, state)``, one step per call
    (``--stepping python``): a jitted step for AdamW and Lookahead, and for a hybrid
    ``hj.make_dispatched_step`` with the learning rate set from the global step, its state
    packed and its metrics one scalar (the loop reads none), as AdamW's step returns
    none."""
    if arm.kind == "hybrid":

        def prepare(state, t, hyper):
            return state._replace(inner=with_lr(state.inner, lr_at(t, hyper)))

        dispatched = hj.make_dispatched_step(
            loss_fn, arm.tx, prepare=prepare, pack_state=True, metrics_fn=lambda s: s.step
        )

        def step(params, state, batch, t, hyper):
            return dispatched(params, state, batch, t, hyper)[:2]

        step.compile = dispatched.compile
        step.kind_counts = dispatched.kind_counts  # updated in place by each call
        return step

    def one(params, state, batch, t, hyper):
        lr = lr_at(t, hyper)
        grads = jax.grad(loss_fn)(params.fast if arm.kind == "lookahead" else params, batch)
        updates, state = arm.tx.update(grads, set_lr(arm, state, lr), params)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(one, donate_argnums=(0, 1))
    box = {}

    def step(params, state, batch, t, hyper):
        return box.get("c", jitted)(params, state, batch, t, hyper)

    def compile_(*args):
        t0 = time.perf_counter()
        box["c"] = jitted.lower(*args).compile()
        return time.perf_counter() - t0

    step.compile = compile_
    return step


def init_arm(arm: Arm, params: Any) -> tuple[Any, Any]:
    params = jax.tree.map(jnp.copy, params)
    if arm.kind == "lookahead":
        params = optax.LookaheadParams(params, jax.tree.map(jnp.copy, params))
    state = jax.jit(arm.tx.init)(params)
    return params, state


def eval_params(arm: Arm, params: Any, state: Any) -> Any:
    """The weights evaluated: Lookahead's slow weights, schedule-free AdamW's average."""
    if arm.kind == "lookahead":
        return params.slow
    if arm.kind == "schedule_free":
        return optax.contrib.schedule_free_eval_params(state, params)
    return params


def counters(arm: Arm, state: Any, steps: int) -> dict[str, int]:
    if arm.kind != "hybrid":
        return dict(
            backward=steps,
            forward=steps,
            predicted=0,
            idle=0,
            phases=0,
            rollbacks=0,
            batches=steps,
        )
    c = jax.device_get(state.counters)
    return dict(
        backward=int(c.backward_passes),
        forward=int(c.forward_passes),
        predicted=int(c.predicted_steps),
        idle=int(c.idle_steps),  # vetoed predicted steps: applied nothing
        phases=int(c.predict_phases),
        rollbacks=int(c.rollbacks),
        batches=int(c.backward_passes),  # a predicted step reads no batch
    )


def memory(compiled) -> dict[str, int | None]:
    """Compiled step's memory plan; the device's peak so far (process-wide; GPU only)."""
    out: dict[str, int | None] = {}
    try:
        m = compiled.memory_analysis()
        out["compiled_bytes"] = int(
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
        )
    except Exception:
        out["compiled_bytes"] = None
    stats = jax.devices()[0].memory_stats()
    out["device_peak_bytes"] = int(stats["peak_bytes_in_use"]) if stats else None
    return out


def unstack(batches: Any) -> list[Any]:
    """A stacked batch pytree as a list of single batches (arrays or tuples of arrays)."""
    n = len(jax.tree.leaves(batches)[0])
    return [jax.tree.map(lambda x, i=i: x[i], batches) for i in range(n)]


def timed_calls(step, params, state, batches, ts, hyper, calls: dict):
    """Steps through ``batches`` one call at a time (``--timeline``), adding each call's
    seconds (launch to launch: the host's time where the host is the bound) to
    ``calls[kind] = [calls, seconds]``, by the kind of step a hybrid took ("step" else)."""
    counts = getattr(step, "kind_counts", None)
    names = (*KIND_NAMES, "predict_phase") if counts is not None else ()
    for batch, t in zip(batches, ts, strict=False):
        before = list(counts) if counts is not None else None
        t0 = time.perf_counter()
        params, state = step(params, state, batch, t, hyper)
        seconds = time.perf_counter() - t0
        kind = "step" if before is None else names[_changed(before, counts)]
        entry = calls.setdefault(kind, [0, 0.0])
        entry[0], entry[1] = entry[0] + 1, entry[1] + seconds
    return params, state


def bookkeeping(calls: dict) -> str:
    """What a hybrid's calls took beyond as many of its own unobserved (``plain``) steps:
    the sum over the other kinds of their calls times their mean excess over a plain
    call, in ms and as a share of the run's calls at the plain call's mean ("" without
    plain calls). It leaves out what a plain call itself costs beyond the wrapped
    optimizer's step, and a call that waits on a read of the kinds carries the wait."""
    if "plain" not in calls:
        return ""
    n_plain, s_plain = calls["plain"]
    plain = s_plain / n_plain
    extra = sum(n * (sec / n - plain) for k, (n, sec) in calls.items() if k != "plain")
    total = sum(n for n, _ in calls.values()) * plain
    return f"; beyond plain calls: {1e3 * extra:.1f} ms ({100 * extra / total:.2f}%)"


def _changed(before: list[int], after: list[int]) -> int:
    return next(i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b)


def run_arm(
    wl: Workload,
    arm: Arm,
    seed: int,
    evaluate,
    log,
    cache: dict,
    stepping: str = "fused",
    timeline: bool = False,
) -> tuple[dict, Any, Any, Any]:
    """Trains one arm with one seed; returns its record, compiled chunk (``None`` with
    ``stepping="python"``), params and state.

    The step (a ``lax.scan`` chunk, or with ``stepping="python"`` one step per call) is
    compiled once per arm (``cache``: name -> (compiled, seconds)); every seed of the
    arm reuses it. A chunk's batches are on the device before its clock starts.
    """
    params, state = init_arm(arm, wl.init(jax.random.key(seed)))
    hyper = jnp.asarray([arm.lr, max(round(arm.steps * 0.05), 1), arm.steps], jnp.float32)
    fused = stepping == "fused"
    if arm.name not in cache:
        t0 = time.perf_counter()
        if fused:
            first = jax.device_put(wl.batches(seed, 0, arm.chunk))
            chunk = make_chunk(arm, wl.loss_fn)
            cache[arm.name] = chunk.lower(params, state, first, jnp.int32(0), hyper).compile()
        else:
            cache[arm.name] = make_stepper(arm, wl.loss_fn)
            one = unstack(jax.device_put(wl.batches(seed, 0, 1)))[0]
            cache[arm.name].compile(params, state, one, jnp.int32(0), hyper)
        cache[arm.name, "s"] = time.perf_counter() - t0
    compiled, compile_s = cache[arm.name], cache[arm.name, "s"]
    ts = [jnp.int32(t) for t in range(0, arm.steps)]
    calls: dict = {}

    def train_chunk(params, state, start):
        """Runs the chunk from ``start``; returns params, state and its seconds."""
        batches = jax.device_put(wl.batches(seed, start, arm.chunk))
        if not fused:
            batches = unstack(batches)
        jax.block_until_ready(batches)
        t0 = time.perf_counter()
        if fused:
            params, state = compiled(params, state, batches, ts[start], hyper)
        elif timeline:
            span = ts[start : start + len(batches)]
            params, state = timed_calls(compiled, params, state, batches, span, hyper, calls)
        else:
            for i, batch in enumerate(batches):
                params, state = compiled(params, state, batch, ts[start + i], hyper)
        jax.block_until_ready((params, state))
        return params, state, time.perf_counter() - t0

    curve = [dict(step=0, wall=0.0, loss=evaluate(eval_params(arm, params, state)))]
    curve[0].update(counters(arm, state, 0))
    wall = 0.0
    for start in range(0, arm.steps, arm.chunk):
        params, state, seconds = train_chunk(params, state, start)
        wall += seconds
        done = start + arm.chunk
        loss = evaluate(eval_params(arm, params, state))
        curve.append(dict(step=done, wall=wall, loss=loss, **counters(arm, state, done)))
    rec = dict(
        workload=wl.name,
        arm=arm.name,
        kind=arm.kind,
        seed=seed,
        lr=arm.lr,
        steps=arm.steps,
        chunk=arm.chunk,
        stepping=stepping,
        compile_s=compile_s,
        final_loss=curve[-1]["loss"],
        val_loss=evaluate(eval_params(arm, params, state), "val"),
        wall=wall,
        curve=curve,
        **(memory(compiled) if fused else {}),
    )
    if calls:
        rec["calls"] = {k: dict(calls=n, ms=1e3 * sec) for k, (n, sec) in calls.items()}
        per = ", ".join(f"{k} {n} x {1e6 * sec / n:.0f} us" for k, (n, sec) in calls.items())
        log(f"    calls by kind (launch to launch): {per}{bookkeeping(calls)}")
    log(
        f"  {arm.name:22s} seed {seed}: held-out {rec['final_loss']:.4f}  "
        f"validation {rec['val_loss']:.4f}  "
        f"train {wall:7.2f} s  compile {compile_s:5.1f} s  "
        f"backward {curve[-1]['backward']}/{arm.steps}  rollbacks {curve[-1]['rollbacks']}"
    )
    return rec, compiled if fused else None, params, state


def step_costs(wl: Workload, arm: Arm, compiled, params, state, repeats: int = 5) -> dict:
    """Seconds per step of the compiled chunk with the phase pinned to Full / to Predict.

    The phase is pinned again before every timed chunk; ``*_pinned`` is the share of the
    timed steps that ran in the pinned branch (a monitor verdict can end a pinned phase).
    """
    batch = jax.device_put(wl.batches(0, 0, arm.chunk))
    hyper = jnp.asarray([arm.lr, 1.0, arm.steps], jnp.float32)
    out = {}
    for phase, label in ((hj.FULL, "real_step_s"), (hj.PREDICT, "predicted_step_s")):
        times, pinned = [], []
        for _ in range(repeats + 1):
            state = forced(state, phase)
            before = int(state.counters.backward_passes)
            t0 = time.perf_counter()
            params, state = compiled(params, state, batch, jnp.int32(arm.steps), hyper)
            jax.block_until_ready((params, state))
            times.append(time.perf_counter() - t0)
            real = (int(state.counters.backward_passes) - before) / arm.chunk
            pinned.append(real if phase == hj.FULL else 1.0 - real)
        out[label] = float(np.median(times[1:])) / arm.chunk
        out[label.removesuffix("_s") + "_pinned"] = float(np.mean(pinned[1:]))
    return out


def tuned_rate(sweep: dict[float, list[dict]]) -> float:
    """The sweep's rate with the best median final loss on the validation split."""
    return min(sweep, key=lambda lr: np.median([r["val_loss"] for r in sweep[lr]]))


def matched_arm(wl: Workload, tuned: float, records: list[dict], ref: str) -> Arm:
    """AdamW at the tuned rate given the hybrid arm ``ref``'s median wall-clock, at the
    tuned AdamW's measured speed (its schedule compressed or stretched to fit)."""
    hyb = np.median([r["wall"] for r in records if r["arm"] == ref])
    adam = np.median([r["wall"] for r in records if r["arm"] == f"adamw@{tuned:g}"])
    n_evals = wl.steps // wl.eval_every
    chunk = max(round(wl.steps * hyb / adam / n_evals), 1)
    return Arm("matched", "adamw", adamw(), tuned, chunk * n_evals, chunk)


def other_arm(name: str, wl: Workload, tuned: float, records: list[dict]) -> Arm:
    """``matched``, ``schedule_free`` or ``lookahead`` at the tuned rate."""
    if name == "matched":
        return matched_arm(wl, tuned, records, "hybrid:default")
    if name == "schedule_free":
        tx = schedule_free(tuned, wl.steps)
        return Arm(name, "schedule_free", tx, tuned, wl.steps, wl.eval_every)
    la = optax.lookahead(adamw(), sync_period=6, slow_step_size=0.5)
    return Arm(name, "lookahead", la, tuned, wl.steps, wl.eval_every)


def make_evaluate(wl: Workload):
    """``evaluate(params, split="test")``: the mean loss over the held-out (``"test"``) or
    validation (``"val"``) batches."""
    splits = dict(test=jax.device_put(wl.eval_batches), val=jax.device_put(wl.val_batches))

    @jax.jit
    def _eval(params, held):
        return jnp.mean(jax.lax.map(lambda b: wl.loss_fn(params, b), held))

    return lambda params, split="test": float(_eval(params, splits[split]))


def run_workload(wl: Workload, args, log) -> list[dict]:
    """Every arm with every seed; returns the records (also appended to runs.jsonl)."""
    seeds = list(range(args.seeds))
    records: list[dict] = []
    evaluate = make_evaluate(wl)
    cache: dict = {}

    def run(arm: Arm, seed: int) -> dict:
        """A stored record of this arm and seed (``--resume``), or a fresh run."""
        cfg = json.loads(json.dumps(arm.tx.config.to_dict())) if arm.kind == "hybrid" else None
        for r in args.done:
            key = (r["workload"], r["arm"], r["seed"], r["lr"], r["steps"], r.get("hybrid_config"))
            if key == (wl.name, arm.name, seed, arm.lr, arm.steps, cfg):
                records.append(r)
                return r
        if args.deadline and time.perf_counter() - args.t0 > args.deadline:
            raise Deadline
        rec, compiled, params, state = run_arm(
            wl, arm, seed, evaluate, log, cache, args.stepping, args.timeline
        )
        if arm.kind == "hybrid":
            rec["hybrid_config"] = cfg
            if seed == seeds[0] and compiled is not None:
                rec.update(step_costs(wl, arm, compiled, params, state))
        rec["environment"] = args.env
        records.append(rec)
        with open(Path(args.out) / "runs.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    log(f"[{wl.name}] {wl.describe}; {wl.n_params:,} parameters, {wl.steps} steps")
    sweep = {}
    for lr in wl.lrs:
        arm = Arm(f"adamw@{lr:g}", "adamw", adamw(), lr, wl.steps, wl.eval_every)
        sweep[lr] = [run(arm, s) for s in seeds]
    tuned = tuned_rate(sweep)
    log(f"  tuned learning rate (validation split): {tuned:g}")
    for name in args.arms:
        if name in HYBRIDS:
            tx = hj.predictive(adamw(), hybrid_config(name, args.hybrid))
            arm = Arm(f"hybrid:{name}", "hybrid", tx, tuned, wl.steps, wl.eval_every)
        else:
            arm = other_arm(name, wl, tuned, records)
        for s in seeds:
            run(arm, s)
    return records


# -- analysis ----------------------------------------------------------------------------


def _at(curve: list[dict], key: str, x: float) -> float:
    """Held-out loss of the last evaluation with ``curve[key] <= x`` (the state then)."""
    best = curve[0]["loss"]
    for p in curve:
        if p[key] <= x + 1e-12:
            best = p["loss"]
    return best


def _time_to(curve: list[dict], target: float) -> float:
    """Wall-clock when the held-out loss first reaches ``target``, linearly interpolated."""
    for a, b in itertools.pairwise(curve):
        if b["loss"] <= target:
            if a["loss"] <= target:
                return a["wall"]
            w = (a["loss"] - target) / max(a["loss"] - b["loss"], 1e-12)
            return a["wall"] + w * (b["wall"] - a["wall"])
    return math.nan


def _ms(xs: list[float]) -> dict:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return dict(median=math.nan, lo=math.nan, hi=math.nan, n=0)
    return dict(median=float(np.median(xs)), lo=float(min(xs)), hi=float(max(xs)), n=len(xs))


def paired(rs: list[dict], arm: str, tuned: str) -> dict:
    """Per-seed ratios to the tuned AdamW of the same seed: final held-out loss (at equal
    steps when the arm runs as many) and training wall-clock; medians, [min, max]."""
    base = {r["seed"]: r for r in rs if r["arm"] == tuned}
    ar = [r for r in rs if r["arm"] == arm and r["seed"] in base]
    return dict(
        loss_ratio=_ms([r["final_loss"] / base[r["seed"]]["final_loss"] for r in ar]),
        wall_ratio=_ms([r["wall"] / base[r["seed"]]["wall"] for r in ar]),
    )


def summarize(records: list[dict]) -> dict:
    """Per workload: target, tuned arm, and per arm the figures of BENCHMARKS.md."""
    out = {}
    for wl in dict.fromkeys(r["workload"] for r in records):
        rs = [r for r in records if r["workload"] == wl]
        arms = list(dict.fromkeys(r["arm"] for r in rs))
        sweep = sorted((a for a in arms if a.startswith("adamw@")), key=lambda a: float(a[6:]))
        by = "val_loss" if all("val_loss" in r for r in rs) else "final_loss"
        median = lambda a, k, rs=rs: float(np.median([r[k] for r in rs if r["arm"] == a]))
        tuned = min(sweep, key=lambda a: median(a, by))
        target = median(tuned, "final_loss")
        t_wall = float(np.median([r["wall"] for r in rs if r["arm"] == tuned]))
        t_batches = min(r["curve"][-1]["batches"] for r in rs)
        base_ttt = _ms([_time_to(r["curve"], target) for r in rs if r["arm"] == tuned])["median"]
        table = {}
        for a in arms:
            ar = [r for r in rs if r["arm"] == a]
            last = [r["curve"][-1] for r in ar]
            ttt = _ms([_time_to(r["curve"], target) for r in ar])
            row = dict(
                seeds=len(ar),
                steps=ar[0]["steps"],
                final_loss=_ms([r["final_loss"] for r in ar]),
                wall=_ms([r["wall"] for r in ar]),
                time_to_target=ttt,
                speedup_vs_tuned=base_ttt / ttt["median"] if ttt["n"] else math.nan,
                loss_at_tuned_wall=_ms([_at(r["curve"], "wall", t_wall) for r in ar]),
                loss_at_equal_batches=_ms([_at(r["curve"], "batches", t_batches) for r in ar]),
                backward=_ms([p["backward"] for p in last]),
                forward=_ms([p["forward"] for p in last]),
                batches=_ms([p["batches"] for p in last]),
                predicted=_ms([p["predicted"] for p in last]),
                rollbacks=_ms([p["rollbacks"] for p in last]),
                phases=_ms([p.get("phases", math.nan) for p in last]),
                skipped_share=_ms(
                    [1 - p["backward"] / r["steps"] for p, r in zip(last, ar, strict=True)]
                ),
                compile_s=_ms([r["compile_s"] for r in ar]),
                compiled_bytes=ar[0].get("compiled_bytes"),
                device_peak_bytes=max((r.get("device_peak_bytes") or 0) for r in ar) or None,
                ms_per_step=_ms([1e3 * r["wall"] / r["steps"] for r in ar]),
            )
            for k in ("real_step_s", "predicted_step_s"):
                vals = [r[k] for r in ar if k in r]
                if vals:
                    row[k] = vals[0]
            table[a] = row
        for a, row in table.items():
            row.update(paired(rs, a, tuned))
        out[wl] = dict(
            tuned=tuned,
            tuned_by=by,
            bracketed=len(sweep) > 2 and tuned not in (sweep[0], sweep[-1]),
            target=target,
            tuned_wall=t_wall,
            equal_batches=t_batches,
            arms=table,
        )
    return out


def _fmt(d: dict, digits: int = 4) -> str:
    if not d["n"]:
        return "not reached"
    f = f"{{:.{digits}g}}"
    s = f.format(d["median"]) + f" [{f.format(d['lo'])}, {f.format(d['hi'])}]"
    return s if d["n"] == 3 or d["n"] == 0 else s + f" ({d['n']} seeds)"


def _num(x: float, spec: str) -> str:
    return "-" if math.isnan(x) else format(x, spec)


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def targets_md(s: dict) -> list[str]:
    """The issue's targets for each hybrid arm, met or missed, with their figures."""
    arms, lines = s["arms"], ["| target | arm | figure | verdict |", "|---|---|---|---|"]
    d = arms.get("hybrid:default")
    if d:
        lr, wr = d["loss_ratio"], d["wall_ratio"]
        lines.append(
            f"| held-out within 1% of tuned AdamW at equal steps | hybrid:default "
            f"| {_fmt(lr)} | {_verdict(lr['median'] <= 1.01)} |"
        )
        lines.append(
            f"| at most 3% more training wall-clock | hybrid:default | {_fmt(wr)} "
            f"| {_verdict(wr['median'] <= 1.03)} |"
        )
    m = arms.get("matched")
    if d and m:
        h, c = d["final_loss"], m["final_loss"]
        spread = max(h["hi"] - h["lo"], c["hi"] - c["lo"])
        margin = c["median"] - h["median"]
        lines.append(
            f"| better than compute-matched AdamW by more than the seeds' spread "
            f"| hybrid:default | {h['median']:.4f} vs {c['median']:.4f}: margin {margin:+.4f}, "
            f"spread {spread:.4f} | {_verdict(margin > spread)} |"
        )
    for a, r in arms.items():
        if a.startswith("hybrid:"):
            x = r["speedup_vs_tuned"]
            lines.append(
                f"| time to tuned AdamW's loss at least 1.5x shorter | {a} "
                f"| {_num(x, '.2f')}x | {_verdict(not math.isnan(x) and x >= 1.5)} |"
            )
    return [*lines, ""]


def markdown(summary: dict, env: dict) -> str:
    lines = []
    for wl, s in summary.items():
        tuned_ms = s["arms"][s["tuned"]]["ms_per_step"]["median"]
        chosen = "validation split" if s.get("tuned_by") == "val_loss" else "held-out loss"
        lines += [
            f"### {wl}",
            "",
            f"Tuned AdamW: `{s['tuned']}`, chosen on the {chosen} "
            f"({'bracketed' if s.get('bracketed') else '**at the edge of the sweep**'}); "
            f"target (its median final held-out loss): "
            f"{s['target']:.4f}; its median training wall-clock {s['tuned_wall']:.2f} s. "
            f"Equal batches: {s['equal_batches']}. Medians over seeds, [min, max].",
            "",
            *targets_md(s),
            "| arm | final held-out | time to target (s) | speedup | held-out at tuned wall-clock "
            "| held-out at equal batches | train wall (s) | backward | forward | predicted "
            "| rollbacks | skipped | compile (s) | compiled MB | peak MB |",
            "|" + "---|" * 15,
        ]
        for a, r in s["arms"].items():
            peak = r["device_peak_bytes"]
            lines.append(
                f"| {a} | {_fmt(r['final_loss'])} | {_fmt(r['time_to_target'], 3)} "
                f"| {_num(r['speedup_vs_tuned'], '.2f')} | {_fmt(r['loss_at_tuned_wall'])} "
                f"| {_fmt(r['loss_at_equal_batches'])} | {_fmt(r['wall'], 3)} "
                f"| {r['backward']['median']:.0f} | {r['forward']['median']:.0f} "
                f"| {r['predicted']['median']:.0f} | {r['rollbacks']['median']:.0f} "
                f"| {r['skipped_share']['median']:.1%} | {r['compile_s']['median']:.1f} "
                f"| {(r['compiled_bytes'] or 0) / 2**20:.1f} "
                f"| {'-' if peak is None else f'{peak / 2**20:.0f}'} |"
            )
        lines += [
            "",
            "| hybrid arm | real step (ms) | predicted step (ms) | predicted / real "
            "| real / AdamW step | Predict phases | rolled back | wall if real steps cost "
            "AdamW's (s) | measured wall (s) |",
            "|" + "---|" * 9,
        ]
        for a, r in s["arms"].items():
            if "real_step_s" in r:
                real, pred = 1e3 * r["real_step_s"], 1e3 * r["predicted_step_s"]
                phases, rb = r["phases"]["median"], r["rollbacks"]["median"]
                ideal = (r["backward"]["median"] * tuned_ms + r["predicted"]["median"] * pred) / 1e3
                lines.append(
                    f"| {a} | {real:.3f} | {pred:.3f} | {pred / real:.3f} "
                    f"| {real / tuned_ms:.3f} | {_num(phases, '.0f')} "
                    f"| {_num(rb / max(phases, 1), '.0%')} "
                    f"| {ideal:.3g} | {r['wall']['median']:.3g} |"
                )
        lines.append(f"AdamW step (tuned arm, training wall-clock / steps): {tuned_ms:.3f} ms.")
        lines.append("")
    lines.append(f"Environment: `{json.dumps(env)}`")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    wls = list(dict.fromkeys(r["workload"] for r in records))
    fig, axes = plt.subplots(len(wls), 2, figsize=(12, 4.2 * len(wls)), squeeze=False)
    for row, wl in zip(axes, wls, strict=True):
        rs = [r for r in records if r["workload"] == wl]
        for a in dict.fromkeys(r["arm"] for r in rs):
            ar = [r for r in rs if r["arm"] == a]
            n = min(len(r["curve"]) for r in ar)
            med = lambda k, ar=ar, n=n: np.median(
                [[p[k] for p in r["curve"][:n]] for r in ar], axis=0
            )
            style = "-" if a.startswith(("hybrid", "matched", "lookahead")) else ":"
            for ax, key in zip(row, ("wall", "batches"), strict=True):
                ax.plot(med(key), med("loss"), style, label=a)
        for ax, xl in zip(row, ("training wall-clock (s)", "batches consumed"), strict=True):
            ax.set_xlabel(xl)
            ax.set_ylabel("held-out loss (median over seeds)")
            ax.set_yscale("log")
            ax.set_title(wl)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def report(records: list[dict], out: Path, env: dict) -> None:
    summary = summarize(records)
    (out / "summary.json").write_text(json.dumps(dict(summary=summary, environment=env), indent=1))
    md = markdown(summary, env)
    (out / "summary.md").write_text(md)
    print(md)
    plot(records, out / "curves.png")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=0, help="override every workload's steps")
    ap.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help=f"comma list, in order, after the AdamW sweep; of {', '.join(ARMS)}",
    )
    ap.add_argument("--workloads", default="", help="comma list of names to keep (prefixes)")
    ap.add_argument("--lrs", default="", help="comma list: replaces every workload's sweep")
    ap.add_argument(
        "--hybrid",
        default="{}",
        help="JSON of HybridConfig fields for the hybrid arms, e.g. '{\"max_horizon\": 2}'",
    )
    ap.add_argument(
        "--stepping",
        choices=["fused", "python"],
        default="python",
        help="python: one call per step (hybrids through make_dispatched_step, as hj.train); "
        "fused: lax.scan chunks of hybrid_step",
    )
    ap.add_argument(
        "--timeline",
        action="store_true",
        help="with --stepping python: time each call and sum the seconds by kind of step "
        "(adds a list copy per call)",
    )
    ap.add_argument("--out", default="runs/end_to_end")
    ap.add_argument("--summarize", default="", help="only summarise this runs.jsonl")
    ap.add_argument(
        "--resume", action="store_true", help="keep OUT/runs.jsonl and skip the runs it holds"
    )
    ap.add_argument(
        "--deadline", type=float, default=0, help="seconds after which no new run starts (exit 3)"
    )
    args = ap.parse_args()
    if args.timeline and args.stepping != "python":
        raise SystemExit("--timeline times the calls of --stepping python")
    args.arms = tuple(a for a in args.arms.split(",") if a)
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; expected some of {ARMS}")
    if "matched" in args.arms and "default" not in args.arms[: args.arms.index("matched")]:
        raise SystemExit("--arms: 'matched' takes the wall-clock of 'default': list it first")
    try:
        args.hybrid = json.loads(args.hybrid)
        if not isinstance(args.hybrid, dict):
            raise ValueError("not a JSON object")
        hybrid_config("default", args.hybrid)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"--hybrid: {e}") from e
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        recs = [json.loads(x) for x in Path(args.summarize).read_text().splitlines() if x]
        env = recs[0].get("environment", {}) if recs else {}
        report(recs, out, env)
        return
    runs = out / "runs.jsonl"
    args.done = []
    if args.resume and runs.exists():
        args.done = [json.loads(x) for x in runs.read_text().splitlines() if x]
    else:
        runs.unlink(missing_ok=True)
    env = args.env = environment()
    t0 = args.t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)
    log(json.dumps(env))
    records = []
    try:
        for wl in workloads(args.size, args.steps or None):
            if args.lrs:
                wl = wl._replace(lrs=tuple(float(x) for x in args.lrs.split(",")))
            if args.workloads and not wl.name.startswith(tuple(args.workloads.split(","))):
                continue
            records += run_workload(wl, args, log)
    except Deadline:
        log(f"deadline: stopped; run again with --resume to go on ({runs})")
        sys.exit(3)
    runs.write_text("".join(json.dumps(r) + "\n" for r in records))  # the runs used, only
    report(records, out, env)
    log("done")


if __name__ == "__main__":
    main()
