"""The ceiling study: what could a predicted jump of k steps at best buy?

    python benchmarks/ceiling.py --workload digits --regimes cosine,constant,wsd \
        --sweep-lrs 3e-3,1e-2,3e-2 --seeds 0,1,2 --out benchmarks/results/ceiling_digits_cpu.jsonl
    python benchmarks/ceiling.py --workload lm --size gpu --time-costs --out OUT.jsonl  # one GPU
    python benchmarks/ceiling.py --workload lm --size cpu --out /tmp/c.jsonl  # tiny smoke test
    python benchmarks/ceiling.py --summarize A.jsonl B.jsonl --md T.md --plot P.png  # report

From a tuned AdamW run (the settings of ``end_to_end.py``: digits MLP and the GPU byte LM
"lm25") at >= 10 points ``t`` spread over training, each predictor family proposes a jump
of ``k`` steps computed only from the trajectory up to ``t``:

- ``last_update``: ``w_t + k u_t`` (``u_t = w_t - w_{t-1}``, the last AdamW update);
- ``ema0.9``, ``ema0.99``: ``w_t + k m_t``, ``m`` the (bias-corrected) EMA of real updates;
- ``window``: ``w_t + (w_t - w_{t-W}) k / W`` (Leap+Verify style);
- ``linefit``: per-parameter least-squares line through ``c`` snapshots spaced ``S`` steps
  apart (``w_t, w_{t-S}, ...``), evaluated at ``t + k``; ``linefit_denoised`` is the same
  line at ``t`` itself (k = 0: the averaging effect, no extrapolation);
- ``snoo``: the Nesterov look-ahead of an outer step on the displacements of blocks of
  ``K = k`` steps, ``w_t + mu * sum_i mu^i (w_{t-iK} - w_{t-(i+1)K})`` over ``B`` blocks
  (``mu = 0.5``: the look-ahead is about k steps long);
- ``schedule_only`` (persistence only): no displacement, but the following real steps
  take the schedule at ``t + k + j``, as after a jump; the control for what a jump's
  persistence owes to the schedule moving on (a lower rate under a decaying schedule);
- ``weight_ema`` (k = 0): the EMA of the weights (decay ``min(0.99, n / (n + 1))`` after
  ``n`` steps: a uniform average early on), the fair baseline of the denoised point.

Each jump is also taken at ``alpha`` times its nominal length (0.5, 1, 2; for linefit the
line is evaluated at ``t + alpha k``); picking the best alpha on the same held-out batches
is an optimistic upper bound (an oracle step size), reported separately.

The ratio is ``(L(w_t) - L(jump)) / (L(w_t) - L(w_{t+k}))``, held-out loss on fixed
held-out batches, ``w_{t+k}`` the real run k steps later (the same run: same batches, same
schedule). Break-even is the jump's cost over that of k real steps,
``(k c_pred + c_verify) / k`` (``--c-pred``, ``--c-verify``). Persistence: from the jump,
``R`` real steps (batches ``t..t+R-1``, the schedule at the global step ``t + k + j``, the
AdamW state of ``t``), compared with ``R`` and ``R + k`` real steps from ``t``:
``ratio_persist = (L(t+R) - L(jump, then R)) / (L(t+R) - L(t+k+R))``.

The main run goes past its last step by ``max(k) + R`` steps at the schedule's final rate
so that late points can be measured; everything up to ``T`` is the plain tuned run.
Real steps run in one jitted ``fori_loop`` (dynamic length, batches on the device); every
jump of a point is a linear combination of snapshots and EMA buffers kept on the device,
evaluated by one jitted function (``lax.map`` over the candidates).
Output: JSON lines, one per workload, regime, seed, point, family, k and alpha, plus
``family="_run"`` rows (the run's curve) and ``family="_sweep"`` rows (digits rate sweep).
"""

from __future__ import annotations

import argparse
import gzip
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
from end_to_end import adamw, bytes_workload, digits_workload, with_lr

from hybrid_jax import tasks

FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97)
ALPHAS = (0.5, 1.0, 2.0)
JUMP_FAMILIES = ("last_update", "ema0.9", "ema0.99", "window", "linefit", "snoo")
PERSIST_FAMILIES = ("last_update", "ema0.9", "window", "linefit", "snoo")
ZERO_FAMILIES = ("linefit_denoised", "weight_ema")
EMA_U = (0.9, 0.99)  # decays of the EMAs of real updates
EMA_W = 0.99  # decay of the EMA of the weights
SNOO_MU, SNOO_BLOCKS = 0.5, 4


class Setup(NamedTuple):
    """One workload's run settings and the predictors' history lengths."""

    wl: Any  # end_to_end.Workload
    steps: int
    lr: float  # tuned warmup-cosine peak (end_to_end's sweep)
    ks: tuple[int, ...]
    persist_ks: tuple[int, ...]
    rs: tuple[int, ...]  # persistence lengths (evaluated after each)
    window: int
    line_c: int
    line_s: int
    persist_every: int  # persistence at every n-th point


def setup(workload: str, size: str) -> Setup:
    if workload == "digits":
        wl = digits_workload(1000, 50, (1e-2,))
        return Setup(wl, 1000, 1e-2, (1, 4, 16, 64), (16, 64), (25, 100), 16, 16, 8, 1)
    if workload == "lm" and size == "gpu":
        # end_to_end.py --size gpu: 25.4M parameters, batch 64 x 256, tuned 1.2e-3
        cfg = tasks.GPTConfig(
            seq_len=256, d_model=512, n_layers=8, n_heads=8, compute_dtype="bfloat16"
        )
        wl = bytes_workload(cfg, 64, 8_000_000, 2000, 100, (1.2e-3,))
        return Setup(wl, 2000, 1.2e-3, (1, 4, 16, 64), (16, 64), (25, 100), 32, 16, 16, 2)
    if workload == "lm" and size == "probe":
        # the probe of BENCHMARKS.md (d 64, 2 layers, seq 64, batch 16, 1600 steps, 3e-3)
        cfg = tasks.GPTConfig(seq_len=64, d_model=64, n_layers=2, n_heads=4)
        wl = bytes_workload(cfg, 16, 1_000_000, 1600, 100, (3e-3,), eval_n=16)
        return Setup(wl, 1600, 3e-3, (1, 4, 16, 64), (16, 64), (25, 100), 32, 16, 16, 2)
    if workload == "lm" and size == "cpu":
        cfg = tasks.GPTConfig(seq_len=64, d_model=64, n_layers=2, n_heads=4)
        wl = bytes_workload(cfg, 8, 1_000_000, 300, 30, (3e-3,))
        return Setup(wl, 300, 3e-3, (1, 4, 16), (16,), (10, 30), 8, 8, 4, 3)
    raise SystemExit(f"unknown workload/size {workload}/{size}")


def schedule(regime: str, peak: float, steps: int):
    """``t -> learning rate``: linear warmup (5%) then ``cosine`` decay to 10% (as
    ``end_to_end.lr_at``), ``constant``, or ``wsd`` (stable, then linear decay to 10% over
    the last 20%). Past ``steps`` the rate stays at its final value."""
    warm = float(max(round(steps * 0.05), 1))
    total = float(steps)

    def lr(t):
        t = t.astype(jnp.float32)
        up = peak * (t + 1.0) / warm
        if regime == "cosine":
            frac = jnp.clip((t - warm) / max(total - warm, 1.0), 0.0, 1.0)
            after = peak * (0.1 + 0.9 * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
        elif regime == "constant":
            after = jnp.full_like(t, peak)
        elif regime == "wsd":
            start = 0.8 * total
            frac = jnp.clip((t - start) / (total - start), 0.0, 1.0)
            after = peak * (1.0 - 0.9 * frac)
        else:
            raise ValueError(f"unknown regime {regime!r}")
        return jnp.where(t < warm, up, after)

    return lr


def make_runner(loss_fn, lr_fn):
    """``run(params, opt, emas, batches, b0, s0, n)``: ``n`` real AdamW steps on batches
    ``b0..`` at schedule steps ``s0..``; also carries the EMAs of updates and weights."""
    tx = adamw()

    def run(params, opt, emas, batches, b0, s0, n):
        def body(i, carry):
            params, opt, (m1, m2, mw) = carry
            batch = jax.tree.map(
                lambda x: jax.lax.dynamic_index_in_dim(x, b0 + i, 0, False), batches
            )
            grads = jax.grad(loss_fn)(params, batch)
            upd, opt = tx.update(grads, with_lr(opt, lr_fn(s0 + i)), params)
            params = optax.apply_updates(params, upd)
            ema = lambda m, x, d: jax.tree.map(lambda a, b: d * a + (1 - d) * b, m, x)
            # the weight EMA averages uniformly until its decay reaches EMA_W
            dw = jnp.minimum(EMA_W, (s0 + i + 1.0) / (s0 + i + 2.0))
            emas = (ema(m1, upd, EMA_U[0]), ema(m2, upd, EMA_U[1]), ema(mw, params, dw))
            return params, opt, emas

        return jax.lax.fori_loop(0, n, body, (params, opt, emas))

    return tx, jax.jit(run)


def make_eval(loss_fn):
    """``evaluate(params, held)`` and ``combos(basis, coeffs, held)``: held-out loss of
    ``params``, and of each ``sum_j coeffs[i, j] basis[j]`` (one jit, ``lax.map``)."""

    def held_loss(params, sets):
        return jnp.stack([jnp.mean(jax.lax.map(lambda b: loss_fn(params, b), s)) for s in sets])

    def combine(basis, c):
        # an unrolled elementwise sum in float32 (no matmul: no TF32 on GPUs)
        return jax.tree.map(lambda *xs: sum(c[j] * x for j, x in enumerate(xs)), *basis)

    def combos(basis, coeffs, held):
        return jax.lax.map(lambda c: held_loss(combine(basis, c), held), coeffs)

    return jax.jit(held_loss), jax.jit(combos), jax.jit(combine)


def history(t: int, su: Setup) -> list[int]:
    """Snapshot indices that the families read at point ``t`` (clipped at 0)."""
    idx = {t, max(t - 1, 0), max(t - su.window, 0)}
    idx |= {t - i * su.line_s for i in range(su.line_c) if t - i * su.line_s >= 0}
    for k in su.ks:
        idx |= {t - i * k for i in range(SNOO_BLOCKS + 1) if t - i * k >= 0}
    return sorted(idx)


def line_coeffs(t: int, su: Setup, at: float, pos: dict, nb: int) -> np.ndarray | None:
    """Coefficients of the least-squares line through ``w_{t - iS}`` evaluated at ``at``."""
    taus = np.array([t - i * su.line_s for i in range(su.line_c) if t - i * su.line_s >= 0], float)
    if len(taus) < 3:
        return None
    tb = taus.mean()
    lam = 1.0 / len(taus) + (taus - tb) * (at - tb) / np.sum((taus - tb) ** 2)
    v = np.zeros(nb)
    for tau, weight in zip(taus, lam, strict=True):
        v[pos[int(tau)]] += weight
    return v


def candidates(
    t: int, su: Setup, pos: dict, nb: int
) -> list[tuple[str, int, float, np.ndarray | None]]:
    """``(family, k, alpha, coefficients or None where unavailable)`` for point ``t``;
    the same list (order and length) at every point. Basis: ``pos[i]`` is snapshot ``w_i``;
    positions ``nb-3, nb-2, nb-1`` are the two update EMAs and the weight EMA."""
    e = lambda i: np.eye(nb)[pos[i]]
    base = e(t)
    out = []
    for k in su.ks:
        for a in ALPHAS:
            out.append(("last_update", k, a, base + a * k * (e(t) - e(t - 1)) if t >= 1 else None))
            for j, beta in enumerate(EMA_U):
                v = base.copy()
                v[nb - 3 + j] += a * k / (1.0 - beta**t) if t >= 1 else 0.0
                out.append((f"ema{beta}", k, a, v if t >= 1 else None))
            w = min(su.window, t)
            out.append(("window", k, a, base + a * k / w * (e(t) - e(t - w)) if w else None))
            out.append(("linefit", k, a, line_coeffs(t, su, t + a * k, pos, nb)))
            blocks = min(SNOO_BLOCKS, t // k)
            if blocks:
                d = sum(SNOO_MU**i * (e(t - i * k) - e(t - (i + 1) * k)) for i in range(blocks))
                out.append(("snoo", k, a, base + a * SNOO_MU * d))
            else:
                out.append(("snoo", k, a, None))
    for k in su.persist_ks:  # the control of persistence: no displacement, schedule at t + k
        out.append(("schedule_only", k, 1.0, base))
    out.append(("linefit_denoised", 0, 1.0, line_coeffs(t, su, t, pos, nb)))
    out.append(("weight_ema", 0, 1.0, np.eye(nb)[nb - 1]))
    return out


def eval_sets(su: Setup, args) -> tuple:
    """The fixed evaluation sets: the held-out batches, and for digits the whole training
    set too (its held-out loss stops falling early; the training loss shows optimisation)."""
    sets = (su.wl.eval_batches,)
    if su.wl.name == "digits_mlp":
        split = tasks.digits(0)
        sets += ((split.x_train[None], split.y_train[None]),)
    return sets


def set_names(su: Setup, args) -> list[str]:
    return ["", "_train"][: len(eval_sets(su, args))]


def fill(r, sfx, t, k, lt, lj, ljr, losses, kmax, args) -> None:
    """Adds a row's figures for one evaluation set (key suffix ``sfx``)."""
    rate = (losses[t] - losses[t + kmax]) / kmax
    d_jump = lt - lj
    r["L_t" + sfx], r["L_jump" + sfx], r["d_jump" + sfx] = float(lt), float(lj), float(d_jump)
    r["rate_per_step" + sfx] = float(rate)
    r["worth_steps" + sfx] = float(d_jump / rate) if rate > 0 else None
    if k:
        d_real = lt - losses[t + k]
        r["L_real" + sfx], r["d_real" + sfx] = float(losses[t + k]), float(d_real)
        r["ratio" + sfx] = float(d_jump / d_real) if d_real != 0 else None
        r["break_even"] = break_even(k, args.c_pred, args.c_verify)
        r["break_even_oneshot"] = (args.c_pred + args.c_verify) / k
    for rr, v in ljr.items():
        gain = losses[t + rr] - v
        r[f"L_jump_R{rr}{sfx}"], r[f"L_plain_R{rr}{sfx}"] = float(v), float(losses[t + rr])
        r[f"gain_R{rr}{sfx}"] = float(gain)
        if k:
            ref = losses[t + rr] - losses[t + k + rr]
            r[f"L_realk_R{rr}{sfx}"], r[f"d_realk_R{rr}{sfx}"] = (
                float(losses[t + k + rr]),
                float(ref),
            )
            r[f"ratio_persist_R{rr}{sfx}"] = float(gain / ref) if ref != 0 else None


def break_even(k: int, c_pred: float, c_verify: float) -> float | None:
    return (k * c_pred + c_verify) / k if k else None


def run_one(su: Setup, regime: str, lr: float, seed: int, args, log, env, write) -> None:
    """The study on one run (workload, regime, rate, seed). A point's rows are written
    (``write``) as soon as the real run has passed every step they compare against."""
    wl, T = su.wl, su.steps
    tx, run = make_runner(wl.loss_fn, schedule(regime, lr, T))
    held_loss, combos, combine = make_eval(wl.loss_fn)
    held = jax.device_put(eval_sets(su, args))
    names = set_names(su, args)
    kmax, rmax = max(su.ks), max(su.rs)
    n_total = T + kmax + rmax
    batches = jax.device_put(wl.batches(seed, 0, n_total))
    points = sorted({round(f * T) for f in FRACTIONS[: args.points]})
    if args.persist_fractions:
        persist_at = {round(float(f) * T) for f in args.persist_fractions.split(",")}
        persist_at &= set(points)
    else:
        persist_at = set(points[su.persist_every - 1 :: su.persist_every])
    if args.no_persist:
        persist_at = set()
    hist = {t: history(t, su) for t in points}
    snaps_needed = set().union(*hist.values())
    needs = {t: {t} | {t + k for k in su.ks} for t in points}
    for t in persist_at:
        for r in su.rs:
            needs[t] |= {t + r} | {t + k + r for k in su.persist_ks}
    curve_every = max(T // 20, 1)
    evals_needed = set().union(*needs.values()) | set(range(0, n_total + 1, curve_every)) | {T}
    stops = sorted(snaps_needed | evals_needed | {n_total})
    nb = max(len(h) for h in hist.values()) + 3

    params = wl.init(jax.random.key(seed))
    opt = jax.jit(tx.init)(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    emas = (zeros, zeros, params)
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    t0 = time.perf_counter()
    run(params, opt, emas, batches, i32(0), i32(0), i32(0))  # compile
    first = True
    losses: dict[int, np.ndarray] = {}
    snaps: dict[int, Any] = {}
    pending: dict[int, list[dict]] = {}  # rows waiting for L(w_{t+k}) and persistence refs
    cur = 0
    common = dict(workload=wl.name, regime=regime, lr=lr, seed=seed, steps=T)

    def finish(t: int) -> None:
        rows = []
        for r in pending.pop(t):
            lt, lj = r.pop("_L_t"), r.pop("_L_jump")
            ljr = {rr: r.pop(f"_L_jump_R{rr}") for rr in su.rs if f"_L_jump_R{rr}" in r}
            for q, sfx in enumerate(names):
                ls = {s: v[q] for s, v in losses.items()}
                fill(
                    r,
                    sfx,
                    t,
                    r["k"],
                    lt[q],
                    lj[q],
                    {rr: v[q] for rr, v in ljr.items()},
                    ls,
                    kmax,
                    args,
                )
            rows.append(r)
        write(rows)

    for s in stops:
        if s > cur:
            params, opt, emas = run(params, opt, emas, batches, i32(cur), i32(cur), i32(s - cur))
            cur = s
        if s in snaps_needed:
            snaps[s] = params
        if s in evals_needed:
            losses[s] = np.asarray(held_loss(params, held), float)
        if s in points:
            t = s
            idx = hist[t]
            pos = {i: j for j, i in enumerate(idx)}
            basis = [snaps[i] for i in idx] + [snaps[t]] * (nb - 3 - len(idx)) + list(emas)
            cands = candidates(t, su, pos, nb)
            coeffs = np.stack([c if c is not None else np.eye(nb)[pos[t]] for *_, c in cands])
            c0 = time.perf_counter()
            ls = np.asarray(combos(basis, jnp.asarray(coeffs, jnp.float32), held))
            if first:
                log(
                    f"  {len(cands)} candidates over {nb} basis arrays, first call (compile "
                    f"included): {time.perf_counter() - c0:.1f} s"
                )
                first = False
            prow = []
            for (fam, k, a, c), lj in zip(cands, ls, strict=True):
                if c is None:
                    continue
                r = dict(common, t=t, progress=t / T, family=fam, k=k, alpha=a)
                r["_L_t"], r["_L_jump"] = losses[t], lj
                if (
                    t in persist_at
                    and a == 1.0
                    and (
                        (fam in PERSIST_FAMILIES and k in su.persist_ks)
                        or fam in ZERO_FAMILIES
                        or fam == "schedule_only"
                    )
                ):
                    pj = combine(basis, jnp.asarray(c, jnp.float32))
                    p_opt, p_emas, done = opt, emas, 0
                    for rr in su.rs:
                        pj, p_opt, p_emas = run(
                            pj,
                            p_opt,
                            p_emas,
                            batches,
                            i32(t + done),
                            i32(t + k + done),
                            i32(rr - done),
                        )
                        done = rr
                        r[f"_L_jump_R{rr}"] = np.asarray(held_loss(pj, held), float)
                prow.append(r)
            pending[t] = prow
            later = [hist[p] for p in points if p > t]
            keep = set().union(*later) if later else set()
            for i in list(snaps):
                if i not in keep:
                    del snaps[i]
            log(
                f"  t={t:5d} ({t / T:.2f}) held-out {losses[t][0]:.4f}; {len(prow)} jumps"
                + (" + persistence" if t in persist_at else "")
                + f"  [{time.perf_counter() - t0:.1f} s]"
            )
        for t in [t for t in pending if max(needs[t]) <= cur]:
            finish(t)
    curve = sorted((s, *map(float, losses[s])) for s in losses)
    settings = dict(
        ks=su.ks,
        persist_ks=su.persist_ks,
        rs=su.rs,
        window=su.window,
        line_c=su.line_c,
        line_s=su.line_s,
        snoo=(SNOO_MU, SNOO_BLOCKS),
        ema_u=EMA_U,
        ema_w=EMA_W,
        alphas=ALPHAS,
        c_pred=args.c_pred,
        c_verify=args.c_verify,
    )
    write(
        [
            dict(
                common,
                environment=env,
                family="_run",
                final_loss=float(losses[T][0]),
                curve=curve,
                sets=names,
                seconds=time.perf_counter() - t0,
                points=points,
                persist_at=sorted(persist_at),
                settings=settings,
            )
        ]
    )
    log(
        f"[{wl.name} {regime} lr {lr:g} seed {seed}] held-out at T={T}: {losses[T][0]:.4f}; "
        f"{time.perf_counter() - t0:.1f} s"
    )


def measure_costs(su: Setup, seed: int, env) -> dict:
    """Seconds of a real AdamW step (in a ``fori_loop`` of 50), of one forward pass on a
    training batch (the verification), and of a predicted step ``w + k u`` (one
    parameter-shaped update), each the median of repeats after a warm-up; with the
    break-even ratios they give."""
    from _timing import median_time

    wl = su.wl
    tx, run = make_runner(wl.loss_fn, schedule("cosine", su.lr, su.steps))
    params = wl.init(jax.random.key(seed))
    opt = jax.jit(tx.init)(params)
    z = jax.tree.map(jnp.zeros_like, params)
    b = jax.device_put(wl.batches(seed, 0, 50))
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    n = 50
    real, _ = median_time(
        lambda: run(params, opt, (z, z, params), b, i32(0), i32(100), i32(n)), 5, 1
    )
    batch = jax.tree.map(lambda x: x[0], b)
    fwd = jax.jit(wl.loss_fn)
    verify, _ = median_time(lambda: fwd(params, batch), 20, 2)
    axpy = jax.jit(lambda w, u, k: jax.tree.map(lambda a, c: a + k * c, w, u))
    pred, _ = median_time(lambda: axpy(params, z, jnp.float32(4.0)), 20, 2)
    real /= n
    c_pred, c_verify = pred / real, verify / real
    return dict(
        workload=wl.name,
        family="_costs",
        real_step_s=real,
        verify_forward_s=verify,
        predicted_step_s=pred,
        c_pred=c_pred,
        c_verify=c_verify,
        break_even={k: (k * c_pred + c_verify) / k for k in su.ks},
        note="verify and predicted step timed as single jitted calls (dispatch included)",
        environment=env,
    )


def sweep(
    su: Setup, regime: str, lrs: list[float], seeds: list[int], env
) -> tuple[float, list[dict]]:
    """Final held-out loss of plain AdamW per rate (median over seeds); returns the best."""
    wl, T = su.wl, su.steps
    held_loss, _, _ = make_eval(wl.loss_fn)
    held = jax.device_put((wl.eval_batches,))
    rows, med = [], {}
    for lr in lrs:
        tx, run = make_runner(wl.loss_fn, schedule(regime, lr, T))
        finals = []
        for seed in seeds:
            params = wl.init(jax.random.key(seed))
            opt = tx.init(params)
            z = jax.tree.map(jnp.zeros_like, params)
            b = jax.device_put(wl.batches(seed, 0, T))
            i32 = lambda x: jnp.asarray(x, jnp.int32)
            params, _, _ = run(params, opt, (z, z, params), b, i32(0), i32(0), i32(T))
            finals.append(float(held_loss(params, held)[0]))
        med[lr] = float(np.median(finals))
        rows.append(
            dict(
                workload=wl.name,
                regime=regime,
                family="_sweep",
                lr=lr,
                steps=T,
                final_losses=finals,
                median=med[lr],
                environment=env,
            )
        )
    return min(med, key=med.get), rows


def compact(x: Any) -> Any:
    """Floats to 7 significant digits (float32 precision): smaller files, same figures."""
    if isinstance(x, float):
        return float(f"{x:.7g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: compact(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [compact(v) for v in x]
    return x


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workload", choices=["digits", "lm"], default="digits")
    ap.add_argument("--size", choices=["cpu", "probe", "gpu"], default="cpu", help="lm only")
    ap.add_argument("--regimes", default="cosine", help="comma list of cosine, constant, wsd")
    ap.add_argument(
        "--sweep-lrs",
        default="",
        help="rates swept per regime; the best is used, except for cosine (end_to_end's rate)",
    )
    ap.add_argument("--lr", type=float, default=0.0, help="override the rate of every regime")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--points", type=int, default=len(FRACTIONS))
    ap.add_argument("--no-persist", action="store_true")
    ap.add_argument("--persist-fractions", default="", help="points (t/T) with persistence runs")
    ap.add_argument("--c-pred", type=float, default=0.06, help="predicted step / real step")
    ap.add_argument("--c-verify", type=float, default=1 / 3, help="verification / real step")
    ap.add_argument("--time-costs", action="store_true", help="measure the step costs first")
    ap.add_argument("--deadline", type=float, default=0, help="no new run after S seconds")
    ap.add_argument("--out", default="")
    ap.add_argument("--summarize", nargs="*", default=None)
    ap.add_argument("--md", default="")
    ap.add_argument("--plot", default="")
    args = ap.parse_args()
    if args.summarize is not None:
        from ceiling_report import report

        report(args.summarize, args.md, args.plot)
        return
    if not args.out:
        raise SystemExit("--out is required")
    t_start = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t_start:7.1f} s] {m}", flush=True)
    env = environment()
    log(json.dumps(env))
    su = setup(args.workload, args.size)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    log(f"{su.wl.describe}; {su.wl.n_params:,} parameters")

    def write(rows):  # a path ending in .gz is written gzipped (one member per call)
        with gzip.open(out, "at") if out.suffix == ".gz" else open(out, "a") as f:
            for r in rows:
                f.write(json.dumps(compact(r)) + "\n")

    if args.time_costs:
        costs = measure_costs(su, seeds[0], env)
        write([costs])
        log("costs: " + json.dumps({k: v for k, v in costs.items() if k != "environment"}))
    for regime in args.regimes.split(","):
        lr = args.lr or su.lr
        if args.sweep_lrs and not args.lr:
            best, rows = sweep(
                su, regime, [float(x) for x in args.sweep_lrs.split(",")], seeds, env
            )
            write(rows)
            log(
                f"[{regime}] swept {args.sweep_lrs}: best {best:g} "
                + " ".join(f"{r['lr']:g}:{r['median']:.4f}" for r in rows)
            )
            if regime != "cosine":  # cosine keeps end_to_end's tuned rate (the sweep informs)
                lr = best
        for seed in seeds:
            if args.deadline and time.perf_counter() - t_start > args.deadline:
                log(f"deadline: {regime} seed {seed} not run")
                continue
            run_one(su, regime, lr, seed, args, log, env, write)
    log("done")


if __name__ == "__main__":
    main()
