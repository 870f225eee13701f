"""The cost rule and the trajectory predictors on scikit-learn digits (CPU).

    python benchmarks/digits_acceptance.py [--model mlp|cnn] [--steps 1200] [--seeds 3]
        [--lrs 3e-4,1e-3] [--arms default,...] [--out FILE]

For each learning rate and seed, every arm trains the digits MLP (``--model cnn``: the
digits CNN of ``hybrid_jax.tasks``) for ``--steps`` steps
with the same initialisation and data order; plain AdamW runs once per (lr, seed) and
its held-out loss is recorded after every number of steps an arm needs. Printed per arm:
the share of backward passes skipped, kept / verified Predict phases (kept: not rolled
back; accepted, or rejected by the cost rule after lowering the loss), rejections by the
cost rule, the real steps observed, and the ratio of mean held-out losses to AdamW
after the same number of steps (``equal steps``) and after as many steps as the arm ran
backward passes (``equal backward``: the hybrid's predicted steps against nothing).

A single final iterate is noisy at a constant learning rate: AdamW's own held-out loss
moves by several percent between steps N - 10 and N (printed as ``AdamW N-10 / N``, the
noise floor of ``equal steps``). So ``tail`` also compares the mean held-out loss over
the last ``--tail`` steps (evaluated every 10 steps; ``0``: off), the same steps for both.

Arms: ``default`` (``HybridConfig()``); ``extrapolate`` and ``rssm`` (the defaults with
that predictor); ``never`` (the defaults with ``confidence_threshold=1``: a control that
should predict nothing and match AdamW); ``ratioR-hH``, the earlier defaults (every real
step observed) with ``predict_cost_ratio`` R and ``max_horizon`` H (``ratio0``: acceptance
by ``verify_tolerance`` alone); and ``last_update``, ``linefit``, ``snoo`` on one schedule
(warmup 100, Full 20, Correct 5, horizon 8, ``confidence_threshold`` 0, cost ratio 0.25,
so that every predictor gets the same chances; the trajectory predictors with
``BasisSettings(size=4, stride=8)``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import environment

import hybrid_jax as hj
from hybrid_jax import tasks

SCHEDULE = dict(
    warmup_steps=100,
    full_steps=20,
    correct_steps=5,
    max_horizon=8,
    confidence_threshold=0.0,
    predict_cost_ratio=0.25,
    observe_every=1,
)
TRAJECTORY = hj.BasisSettings(size=4, stride=8)
# The defaults before they were chosen: cost ratio 0.25, horizon 15, every real step observed.
EARLIER = dict(predict_cost_ratio=0.25, max_horizon=15, observe_every=1)


def arms() -> dict[str, hj.HybridConfig]:
    def earlier(**changes):
        return hj.HybridConfig(**{**EARLIER, **changes})

    return {
        "default": hj.HybridConfig(),
        "extrapolate": hj.HybridConfig(predictor="extrapolate"),
        "rssm": hj.HybridConfig(predictor="rssm"),
        "never": hj.HybridConfig(confidence_threshold=1.0),
        "ratio0.25-h15": earlier(),
        "ratio0-h15": earlier(predict_cost_ratio=0.0),
        "ratio1-h15": earlier(predict_cost_ratio=1.0),
        "ratio1-h4": earlier(predict_cost_ratio=1.0, max_horizon=4),
        "ratio0.5-h4": earlier(predict_cost_ratio=0.5, max_horizon=4),
        "last_update": hj.HybridConfig(predictor="last_update", **SCHEDULE),
        "linefit": hj.HybridConfig(predictor="linefit", basis=TRAJECTORY, **SCHEDULE),
        "snoo": hj.HybridConfig(predictor="snoo", basis=TRAJECTORY, **SCHEDULE),
    }


MODELS = {"mlp": (tasks.mlp_loss, tasks.mlp_init), "cnn": (tasks.cnn_loss, tasks.cnn_init)}
MODEL = "mlp"  # set by --model


def held_out(split, params) -> float:
    return float(MODELS[MODEL][0](params, (split.x_test, split.y_test)))


TAIL_EVERY = 10


def tail_steps(steps: int, tail: int) -> list[int]:
    """The steps whose held-out losses ``tail`` averages: every 10th of the last ``tail``."""
    return [s for s in range(steps - tail + TAIL_EVERY, steps + 1, TAIL_EVERY)] if tail else []


def hybrid_run(split, lr, cfg, steps, seed, tail=0) -> dict:
    def data(start):
        return tasks.batches(split.x_train, split.y_train, 64, seed=seed, start=start)

    tx = hj.predictive(optax.adamw(lr), cfg)
    loss_fn, init = MODELS[MODEL]
    res = hj.train(
        loss_fn,
        tx,
        init(jax.random.key(seed)),
        data,
        steps=steps,
        sync_every=steps,
        progress=False,
        eval_fn=(lambda p: held_out(split, p)) if tail else None,
        eval_every=TAIL_EVERY if tail else 0,
    )
    c = jax.device_get(res.state.counters)
    evals = {step + 1: loss for step, loss in res.evals}  # keyed by steps taken
    tail_losses = [evals[s] for s in tail_steps(steps, tail)]
    rows = res.rows
    verified = sum(r["verified"] for r in rows)
    return dict(
        loss=held_out(split, res.params),
        backward=int(c.backward_passes),
        verified=int(verified),
        kept=int(verified - sum(r["rolled_back"] and r["verified"] for r in rows)),
        cost_rejections=int(c.cost_rejections),
        observed=int(c.observed_steps),
        real=int(c.real_steps),
        tail=float(np.mean(tail_losses)) if tail_losses else None,
    )


def adamw_curve(split, lr, steps, seed, at: set[int]) -> dict[int, float]:
    tx = optax.adamw(lr)
    loss_fn, init = MODELS[MODEL]

    @jax.jit
    def step(params, state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = init(jax.random.key(seed))
    state = tx.init(params)
    stream = tasks.batches(split.x_train, split.y_train, 64, seed=seed)
    out = {}
    for i in range(1, steps + 1):
        params, state = step(params, state, next(stream))
        if i in at:
            out[i] = held_out(split, params)
    return out


def ablate(spec: str) -> None:
    """Sets module constants of ``hybrid_jax._stages`` / ``_phases`` (read when a step is
    traced) from ``NAME=VALUE,...``."""
    from hybrid_jax import _phases, _stages

    for item in filter(None, spec.split(",")):
        name, value = item.split("=")
        mod = _stages if hasattr(_stages, name) else _phases
        if not hasattr(mod, name):
            raise SystemExit(f"--set: no constant {name} in hybrid_jax._stages or _phases")
        setattr(mod, name, type(getattr(mod, name))(int(value)))


def summary(args, lr: float, name: str, rs: list[dict], base: list[dict]) -> dict:
    """One arm's figures at one learning rate, over the seeds (``base``: AdamW's curves)."""
    steps = args.steps
    hyb = [r["loss"] for r in rs]
    tail = None
    if args.tail:
        adamw_tail = [np.mean([b[s] for s in tail_steps(steps, args.tail)]) for b in base]
        tail = np.mean([r["tail"] for r in rs]) / np.mean(adamw_tail)
    verified = sum(r["verified"] for r in rs)
    if name == "never" and verified:
        raise SystemExit(f"the never arm verified {verified} Predict phases: not a control")
    return dict(
        lr=lr,
        arm=name,
        skipped=1.0 - np.mean([r["backward"] for r in rs]) / steps,
        kept=sum(r["kept"] for r in rs),
        verified=verified,
        cost_rejections=sum(r["cost_rejections"] for r in rs),
        observed=f"{sum(r['observed'] for r in rs)}/{sum(r['real'] for r in rs)}",
        equal_steps=np.mean(hyb) / np.mean([b[steps] for b in base]),
        equal_backward=np.mean(hyb)
        / np.mean([b[r["backward"]] for b, r in zip(base, rs, strict=True)]),
        tail=tail,
        tail_steps=args.tail,
        adamw_noise=np.mean([b[steps - 10] for b in base]) / np.mean([b[steps] for b in base]),
        runs=rs,
        adamw=[{str(k): v for k, v in b.items()} for b in base],
        steps=steps,
        model=args.model,
        set=args.set,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="mlp", choices=sorted(MODELS))
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lrs", default="3e-4,1e-3")
    ap.add_argument("--arms", default=",".join(arms()))
    ap.add_argument("--tail", type=int, default=100, help="steps the tail mean covers (0: off)")
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--set",
        default="",
        help="ablations: NAME=VALUE,... of the module constants of hybrid_jax._stages and "
        "hybrid_jax._phases (e.g. REUSE_VERIFY_GRADIENT=0,PROBE_AFTER_ROLLBACK=0,"
        "ACCEPT_FORGIVES=99: the behaviour before they were added)",
    )
    args = ap.parse_args()
    if args.tail and (args.steps % TAIL_EVERY or not TAIL_EVERY <= args.tail <= args.steps):
        raise SystemExit(f"--tail needs --steps a multiple of {TAIL_EVERY} and 10 <= tail <= steps")
    ablate(args.set)
    global MODEL
    MODEL = args.model
    split = tasks.digits(0)
    configs = {k: v for k, v in arms().items() if k in args.arms.split(",")}
    rows = []
    print(
        f"{'lr':>7} {'arm':>17} {'skipped':>8} {'kept/ver':>8} {'cost rej':>8} "
        f"{'observed':>11} {'equal steps':>11} {'equal backward':>14} {'tail':>6} "
        f"{'AdamW N-10 / N':>14}"
    )
    for lr in map(float, args.lrs.split(",")):
        runs = {name: [] for name in configs}
        for seed in range(args.seeds):
            for name, cfg in configs.items():
                runs[name].append(hybrid_run(split, lr, cfg, args.steps, seed, args.tail))
        base = []
        for seed in range(args.seeds):
            at = {args.steps, args.steps - 10} | {runs[n][seed]["backward"] for n in configs}
            at |= set(tail_steps(args.steps, args.tail))
            base.append(adamw_curve(split, lr, args.steps, seed, at))
        for name, rs in runs.items():
            row = summary(args, lr, name, rs, base)
            print(
                f"{lr:7.0e} {name:>17} {row['skipped']:8.3f} "
                f"{row['kept']:>4}/{row['verified']:<3} {row['cost_rejections']:8d} "
                f"{row['observed']:>11} {row['equal_steps']:11.3f} {row['equal_backward']:14.3f} "
                f"{row['tail'] if row['tail'] is not None else float('nan'):6.3f} "
                f"{row['adamw_noise']:14.3f}",
                flush=True,
            )
            rows.append(row)
    print(json.dumps(environment()))
    if args.out:
        Path(args.out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
