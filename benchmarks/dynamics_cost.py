"""Cost of the dynamics model's pieces, alone and as a share of a real training step.

    python benchmarks/dynamics_cost.py [--groups 10] [--members 5] [--hidden 256]

Times (median of repeats, after compiling): a rollout of the RSSM ensemble through its
prior for horizons 1, 5, 15, 25, 50 and 75 (per horizon step), one online training
update (``observe``: window BPTT, optimizer step and the rollout it stores), the feature
encoding, and one bandit select + update. ``--real-step-ms`` gives the real step to
divide by (e.g. the GPT-2-small figure from ``step_cost.py``). ``--rollout kernel`` times
the rollout with the Pallas step kernel (``RSSMSettings.rollout_kernel``) instead
of XLA operations; ``--profile DIR`` also prints the device's busy time per step, the
span from its first to its last event per step, and the busy time per horizon step added
between consecutive horizons (the rollout's fixed part, its first step, heads and
summary, cancels there). Profile without XLA's command buffers for loops: kernels that
run inside a captured graph do not appear in the trace, so busy time undercounts there
(the span does not). ``--horizons`` and ``--rollout-only`` narrow the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import device_timeline, environment, median_time, show_timeline

from hybrid_jax import _bandit, _encoder, _rssm
from hybrid_jax._predictors import Observation, PredictorSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--groups", type=int, default=10, help="coefficient groups (param leaves)")
    ap.add_argument("--basis", type=int, default=2)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--real-step-ms", type=float, default=0.0)
    ap.add_argument("--out", default="")
    ap.add_argument("--profile", default="", help="trace the rollouts here (device gaps)")
    ap.add_argument(
        "--rollout",
        choices=["xla", "kernel"],
        default="xla",
        help="rollout steps as XLA ops or the Pallas kernel (RSSMSettings.rollout_kernel)",
    )
    ap.add_argument("--horizons", default="1,5,15,25,50,75")
    ap.add_argument("--rollout-only", action="store_true", help="skip the other pieces")
    args = ap.parse_args()
    g, b = args.groups, args.basis
    base = _rssm.sizes(members=args.members, hidden=args.hidden, window=args.window)
    f = _encoder.n_features(b)
    rows, busy, span = [], {}, {}

    def record(name, seconds, per=1, **extra):
        ms = seconds * 1e3 / per
        share = ms / args.real_step_ms if args.real_step_ms else None
        row = dict(name=name, ms=ms, share_of_real_step=share, rollout=args.rollout, **extra)
        rows.append(row)
        tail = f"  ({100 * share:.3f}% of a real step)" if share else ""
        print(f"{name:34s} {ms * 1e3:10.2f} us{tail}", flush=True)

    def rollout_seconds(horizon: int) -> float:
        s = base._replace(horizon=horizon)
        state = _rssm.rssm(s).init(PredictorSpec(g, b, None))
        full = s._replace(n_features=f, n_groups=g, basis_size=b)
        gd = _rssm._graphdef(full)
        h = jnp.zeros((s.members, s.hidden), jnp.float32)
        z = jnp.zeros((s.members, s.latent_groups * s.latent_classes), jnp.float32)

        kernel = args.rollout == "kernel"

        @jax.jit
        def roll(params, h, z):
            outs = _rssm._rollout(params, gd, full, h, z, kernel=kernel)
            return _rssm.rollout_summary(outs, full)

        def run():
            return roll(state.params, h, z)

        seconds = median_time(run, args.repeats)[0]
        if args.profile:
            t = device_timeline(run, f"{args.profile}/h{horizon}")
            show_timeline(f"H={horizon}", t)
            if t:
                busy[horizon], span[horizon] = t["busy_ms"], t["span_ms"]
                bu, sp = (f"{1e3 * t[k] / horizon:.2f}" for k in ("busy_ms", "span_ms"))
                print(f"  H={horizon}: device busy {bu} us, span {sp} us per step")
                top = sorted(t["ms_by_name"].items(), key=lambda kv: -kv[1])[:4]
                print("  longest events (ms in all):", [(k[:40], round(v, 4)) for k, v in top])
        return seconds

    for horizon in map(int, args.horizons.split(",")):
        seconds = rollout_seconds(horizon)
        extra = {"busy_ms": busy[horizon], "span_ms": span[horizon]} if horizon in busy else {}
        record(f"rollout per horizon step (H={horizon})", seconds, horizon, **extra)
    # what one more horizon step costs the device: the rollout's fixed part cancels
    for lo, hi in zip(sorted(busy), sorted(busy)[1:], strict=False):
        us = 1e3 * (busy[hi] - busy[lo]) / (hi - lo)
        print(f"device busy per added horizon step, H={lo}..{hi}: {us:.2f} us")
        rows.append(dict(name=f"busy per added horizon step (H={lo}..{hi})", ms=us / 1e3))
    if not args.rollout_only:
        other_pieces(args, record)
    env = environment()
    print(json.dumps(env))
    if args.out:
        with open(args.out, "a") as fh:
            for r in rows:
                fh.write(json.dumps({**r, **vars(args), **env}) + "\n")


def other_pieces(args, record):
    """The online training update, the feature encoding and the bandit."""
    g, b = args.groups, args.basis
    base = _rssm.sizes(members=args.members, hidden=args.hidden, window=args.window)
    f = _encoder.n_features(b)

    pred = _rssm.rssm(base)
    state = pred.init(PredictorSpec(g, b, None))
    obs = Observation(
        target_coefs=jnp.ones((g, b)),
        fit_r2=jnp.ones((g,)),
        loss=jnp.float32(1.0),
        log_loss_change=jnp.float32(-0.01),
        grad_norm=jnp.float32(1.0),
        update_norm=jnp.float32(0.1),
        cosine=jnp.float32(0.9),
        step=jnp.int32(3),
        gap=jnp.int32(1),
        realised_cosine=jnp.float32(0.9),
        features=jnp.zeros((f,)),
    )
    observe = jax.jit(pred.observe, donate_argnums=(0,))
    box = [observe(state, obs)]

    def run_observe():
        box[0] = observe(box[0], obs)
        return box[0]

    t, _ = median_time(run_observe, args.repeats)
    record("online training update (observe)", t)

    enc = _encoder.init(b)

    @jax.jit
    def encode(enc, x):
        raw = _encoder.raw_features(
            loss=x,
            log_loss_change=x,
            grad_norm=x,
            update_norm=x,
            cosine=x,
            fit_r2=x,
            moments=(x, x),
            phase=jnp.int32(1),
            gap=jnp.int32(1),
            phase_position=x,
            mean_coefs=jnp.ones((b,)) * x,
        )
        return _encoder.normalise(enc, raw, 0.99)

    t, _ = median_time(lambda: encode(enc, jnp.float32(0.5)), args.repeats)
    record("feature encoding (scalars in)", t)

    bandit = _bandit.init(4, f + 1)
    ctx = jnp.ones((f + 1,), jnp.float32)

    @jax.jit
    def select_update(bandit, ctx):
        arm, _ = _bandit.select(bandit, ctx, 1.0)
        return _bandit.update(bandit, arm, ctx, jnp.float32(0.5), 0.98)

    t, _ = median_time(lambda: select_update(bandit, ctx), args.repeats)
    record("bandit select + update", t)


if __name__ == "__main__":
    main()
