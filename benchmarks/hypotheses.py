"""The measured hypotheses behind the method, on the digits MLP (held-out split).

    python benchmarks/hypotheses.py [--steps 1500] [--lr 1e-3] [--seed 0]

The run takes real steps only (``confidence_threshold`` 1 and a Full phase longer than
the run), so that every step has ground truth,
while each predictor is trained and queried as in a hybrid run. Reported:

- the cosine between consecutive real updates (mean, quartiles);
- the R^2 of the predicted change of log loss over k = 1, 5 and 15 steps (the RSSM's
  rollout; for the trivial predictors, the running trend) against the realised change
  of the training loss level (the EMA of minibatch losses that the predictors learn) and
  of the held-out loss;
- the cosine between predicted and actual one-step updates (the realised cosine) for
  ``last_update``, ``extrapolate`` and ``rssm``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import environment

import hybrid_jax as hj
from hybrid_jax import tasks

HORIZONS = (1, 5, 15)


def run(predictor: str, args) -> dict:
    split = tasks.digits(args.seed)
    cfg = hj.HybridConfig(
        warmup_steps=10,
        full_steps=10**9,
        predictor=predictor,
        max_horizon=max(HORIZONS),
        confidence_threshold=1.0,
    )
    tx = hj.predictive(optax.adamw(args.lr), cfg)
    params = tasks.mlp_init(jax.random.key(args.seed))
    state = jax.jit(tx.init)(params)
    xt, yt = jnp.asarray(split.x_test), jnp.asarray(split.y_test)

    @jax.jit
    def step(params, state, batch):
        params, state, m = hj.hybrid_step(tasks.mlp_loss, tx, params, state, batch)
        held = tasks.mlp_loss(params, (xt, yt))
        dyn = state.dynamics
        rollout = (
            dyn.rollout_dlog
            if predictor == "rssm"
            else jnp.full((max(HORIZONS),), state.stats.log_loss_trend)
        )
        return params, state, (m, held, rollout, state.stats.cosine, state.stats.loss_level)

    batches = tasks.batches(split.x_train, split.y_train, 64, args.seed)
    held, rollouts, cosines, realised, levels = [], [], [], [], []
    prev_acc = None
    for _ in range(args.steps):
        params, state, (m, h, r, c, lv) = step(params, state, next(batches))
        held.append(float(h))
        levels.append(float(lv))
        rollouts.append(np.asarray(r))
        cosines.append(float(c))
        acc = float(m["accuracy"])
        if prev_acc is not None:  # undo the EMA to get each step's realised cosine
            d = hj.config.CONFIDENCE_EMA_DECAY
            realised.append((acc - d * prev_acc) / (1 - d))
        prev_acc = acc
    held = np.log(np.asarray(held))
    levels = np.log(np.asarray(levels))
    rollouts = np.stack(rollouts)
    start = 100  # leave out the first steps, while the models warm up

    def r2(series):
        out = {}
        for k in HORIZONS:
            t = np.arange(start, len(series) - k)
            actual = series[t + k] - series[t]
            predicted = rollouts[t, :k].sum(1)  # the predictions made after step t
            ss = np.sum((actual - predicted) ** 2)
            out[k] = round(float(1 - ss / np.sum((actual - actual.mean()) ** 2)), 4)
        return out

    cos = np.asarray(cosines[start:])
    return {
        "predictor": predictor,
        "r2_loss_level": r2(levels),
        "r2_held_out": r2(held),
        "update_cosine_mean": float(cos.mean()),
        "update_cosine_quartiles": np.percentile(cos, [25, 50, 75]).round(4).tolist(),
        "realised_cosine_mean": float(np.mean(realised[start:])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = [run(p, args) for p in ("last_update", "extrapolate", "rssm")]
    for r in rows:
        print(json.dumps(r))
    print(json.dumps(environment()))
    if args.out:
        Path(args.out).write_text("\n".join(json.dumps({**r, **vars(args)}) for r in rows) + "\n")


if __name__ == "__main__":
    main()
