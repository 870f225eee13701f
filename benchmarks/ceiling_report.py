"""Tables and plot of the ceiling study (``python benchmarks/ceiling.py --summarize ...``).

Seeds are pooled per cell as a ratio of means, ``mean(d_jump) / mean(d_real)``, which
stays defined where single seeds' denominators are near zero; a cell whose mean real
decrease is <= 0 (the real steps did not lower the loss there) shows ``n/a``. A cell at or
above break-even is in bold.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

FAMILY_ORDER = ("last_update", "ema0.9", "ema0.99", "window", "linefit", "snoo")
ZERO_ORDER = ("linefit_denoised", "weight_ema")


def load(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        rows += [json.loads(x) for x in Path(p).read_text().splitlines() if x.strip()]
    return rows


def fmt(x: float | None) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:.0e}".replace("e+0", "e")
    if abs(x) >= 10:
        return f"{x:.0f}"
    return f"{x:.2f}"


def pooled(rs: list[dict], num: str, den: str) -> float | None:
    """``mean(num) / mean(den)`` over the rows that have both; None where mean(den) <= 0."""
    pairs = [(r[num], r[den]) for r in rs if r.get(num) is not None and r.get(den) is not None]
    if not pairs:
        return None
    n, d = np.mean([p[0] for p in pairs]), np.mean([p[1] for p in pairs])
    return float(n / d) if d > 0 else None


def groups(rows: list[dict]) -> dict:
    g = defaultdict(list)
    for r in rows:
        if not r["family"].startswith("_"):
            g[r["workload"], r["regime"]].append(r)
    return g


def runs(rows: list[dict], wl: str, regime: str) -> list[dict]:
    return [
        r for r in rows if r["family"] == "_run" and r["workload"] == wl and r["regime"] == regime
    ]


def cells(rs: list[dict], sfx: str, alpha: float | None = 1.0) -> dict:
    """``(family, k, t) -> pooled ratio``; ``alpha=None``: the best alpha per cell (oracle)."""
    by = defaultdict(list)
    for r in rs:
        if r["k"]:
            by[r["family"], r["k"], r["t"], r["alpha"]].append(r)
    out: dict = {}
    for (f, k, t, a), group in by.items():
        v = pooled(group, "d_jump" + sfx, "d_real" + sfx)
        if alpha is not None:
            if a == alpha:
                out[f, k, t] = v
        elif v is not None and (out.get((f, k, t)) is None or v > out[f, k, t]):
            out[f, k, t] = v
        else:
            out.setdefault((f, k, t), None)
    return out


def ratio_table(rs: list[dict], sfx: str, alpha: float | None = 1.0) -> list[str]:
    ts = sorted({r["t"] for r in rs})
    T = rs[0]["steps"]
    ks = sorted({r["k"] for r in rs if r["k"]})
    be = {r["k"]: r["break_even"] for r in rs if r["k"]}
    c = cells(rs, sfx, alpha)
    head = "| family | k | break-even | " + " | ".join(f"{t / T:.2f}" for t in ts) + " |"
    lines = [head, "|" + "---|" * (3 + len(ts))]
    for f in FAMILY_ORDER:
        for k in ks:
            vals = []
            for t in ts:
                v = c.get((f, k, t))
                s = fmt(v)
                vals.append(f"**{s}**" if v is not None and v >= be[k] else s)
            lines.append(f"| {f} | {k} | {be[k]:.3f} | " + " | ".join(vals) + " |")
    return lines


def zero_table(rs: list[dict], sfx: str) -> list[str]:
    """The k = 0 points: held-out decrease (loss units, mean over seeds) and its worth in
    real steps (decrease / the local real rate per step, pooled)."""
    ts = sorted({r["t"] for r in rs})
    T = rs[0]["steps"]
    lines = [
        "| point | " + " | ".join(f"{t / T:.2f}" for t in ts) + " |",
        "|" + "---|" * (1 + len(ts)),
    ]
    for f in ZERO_ORDER:
        dec, worth = [], []
        for t in ts:
            g = [r for r in rs if r["family"] == f and r["t"] == t]
            dec.append(f"{np.mean([r['d_jump' + sfx] for r in g]):+.4f}" if g else "-")
            w = pooled(g, "d_jump" + sfx, "rate_per_step" + sfx)
            worth.append(fmt(w))
        lines.append(f"| {f}: decrease | " + " | ".join(dec) + " |")
        lines.append(f"| {f}: worth (steps) | " + " | ".join(worth) + " |")
    return lines


def persist_table(rs: list[dict], sfx: str) -> list[str]:
    """Jump then R real steps against R + k real steps (pooled ratio), per R; for k = 0 the
    held-out gain over R plain steps (loss units, mean over seeds)."""
    rkeys = sorted(
        {int(key.split("_R")[1].split("_")[0]) for r in rs for key in r if key.startswith("gain_R")}
    )
    ts = sorted({r["t"] for r in rs if any(key.startswith("gain_R") for key in r)})
    if not ts:
        return ["(no persistence runs)"]
    T = rs[0]["steps"]
    lines = [
        "| family | k | R | " + " | ".join(f"{t / T:.2f}" for t in ts) + " |",
        "|" + "---|" * (3 + len(ts)),
    ]
    be = {r["k"]: r["break_even"] for r in rs if r["k"]}
    fams = [
        (f, k)
        for f in FAMILY_ORDER
        for k in sorted(
            {r["k"] for r in rs if r.get(f"gain_R{rkeys[0]}{sfx}") is not None and r["k"]}
        )
    ]
    for f, k in fams:
        for R in rkeys:
            vals = []
            for t in ts:
                g = [
                    r
                    for r in rs
                    if r["family"] == f and r["k"] == k and r["t"] == t and r["alpha"] == 1.0
                ]
                v = pooled(g, f"gain_R{R}{sfx}", f"d_realk_R{R}{sfx}")
                if not any(f"gain_R{R}{sfx}" in r for r in g):
                    vals.append("-")
                    continue
                vals.append(f"**{fmt(v)}**" if v is not None and v >= be[k] else fmt(v))
            if any(v != "-" for v in vals):
                lines.append(f"| {f} | {k} | {R} | " + " | ".join(vals) + " |")
    for f in ZERO_ORDER:
        for R in rkeys:
            vals = []
            for t in ts:
                g = [
                    r[f"gain_R{R}{sfx}"]
                    for r in rs
                    if r["family"] == f and r["t"] == t and f"gain_R{R}{sfx}" in r
                ]
                vals.append(f"{np.mean(g):+.4f}" if g else "-")
            lines.append(f"| {f} (gain, loss units) | 0 | {R} | " + " | ".join(vals) + " |")
    return lines


def clears(rs: list[dict], sfx: str) -> list[str]:
    """Every (family, k, point) at or above break-even with alpha = 1, with its persistence."""
    c = cells(rs, sfx, 1.0)
    be = {r["k"]: r["break_even"] for r in rs if r["k"]}
    T = rs[0]["steps"]
    out = []
    for (f, k, t), v in sorted(c.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        if v is not None and v >= be[k]:
            g = [
                r
                for r in rs
                if r["family"] == f and r["k"] == k and r["t"] == t and r["alpha"] == 1.0
            ]
            per = [r.get("ratio" + sfx) for r in g]
            rk = sorted(
                {
                    key
                    for r in g
                    for key in r
                    if key.startswith("gain_R")
                    and key.endswith(sfx)
                    and (sfx or "_train" not in key)
                }
            )
            pers = ", ".join(
                f"R={key.split('_R')[1].split('_')[0]}: "
                + fmt(pooled(g, key, key.replace("gain", "d_realk")))
                for key in rk
            )
            out.append(
                f"{f} k={k} at {t / T:.2f}: pooled ratio {fmt(v)} (break-even {be[k]:.3f}; "
                f"per seed {', '.join(fmt(x) for x in per)})"
                + (f"; persistence {pers}" if pers else "")
            )
    return out


def report(paths: list[str], md: str, plot_path: str) -> None:
    rows = load(paths)
    lines = []
    for (wl, regime), rs in groups(rows).items():
        rr = runs(rows, wl, regime)  # absent for a run cut short: its finished points stay
        seeds = sorted({r["seed"] for r in rs})
        lr = rs[0]["lr"]
        finals = ", ".join(f"{r['final_loss']:.4f}" for r in rr) or "(run cut short)"
        env = rs[0]["environment"]
        sfxs = [""] + (["_train"] if any("d_jump_train" in r for r in rs) else [])
        lines += [f"## {wl}, {regime} (peak rate {lr:g}, seeds {seeds})", ""]
        lines += [
            f"Held-out loss at T={rs[0]['steps']}: {finals}. "
            f"Device: {env['device']}, jax {env['jax']}.",
            "",
        ]
        for sfx in sfxs:
            what = "held-out loss" if not sfx else "training-set loss (all 1,438 training images)"
            lines += [f"### Ratio, {what}, nominal jumps (columns: training progress t/T)", ""]
            lines += [*ratio_table(rs, sfx, 1.0), ""]
            lines += [
                f"### Ratio, {what}, best of alpha in (0.5, 1, 2) per cell "
                "(oracle: an upper bound)",
                "",
            ]
            lines += [*ratio_table(rs, sfx, None), ""]
            lines += [f"### k = 0 points, {what}", "", *zero_table(rs, sfx), ""]
            lines += [f"### Persistence, {what}", "", *persist_table(rs, sfx), ""]
            cl = clears(rs, sfx)
            lines += [f"### Cells at or above break-even, {what} (alpha = 1)", ""]
            lines += [f"- {x}" for x in cl] if cl else ["- none"]
            lines += [""]
        sw = [
            r
            for r in rows
            if r["family"] == "_sweep" and r["workload"] == wl and r["regime"] == regime
        ]
        if sw:
            lines += [
                "Rate sweep (final held-out, median over seeds): "
                + ", ".join(f"{r['lr']:g}: {r['median']:.4f}" for r in sw),
                "",
            ]
    text = "\n".join(lines) + "\n"
    if md:
        Path(md).write_text(text)
        print(f"wrote {md}")
    else:
        print(text)
    if plot_path:
        plot(rows, plot_path)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for (wl, regime), rs in groups(rows).items():
        panels.append((f"{wl} {regime}\nheld-out", rs, ""))
        if any("d_jump_train" in r for r in rs):
            panels.append((f"{wl} {regime}\ntraining set", rs, "_train"))
    ks = sorted({r["k"] for r in rows if not r["family"].startswith("_") and r["k"]})
    fig, axes = plt.subplots(
        len(panels), len(ks), figsize=(3.6 * len(ks), 2.7 * len(panels)), squeeze=False
    )
    colors = dict(
        zip(FAMILY_ORDER, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False)
    )
    for row, (title, rs, sfx) in zip(axes, panels, strict=True):
        c = cells(rs, sfx, 1.0)
        T = rs[0]["steps"]
        ts = sorted({r["t"] for r in rs})
        for ax, k in zip(row, ks, strict=True):
            if not any(kk == k for (_, kk, _) in c):
                ax.set_visible(False)
                continue
            be = next(r["break_even"] for r in rs if r["k"] == k)
            for f in FAMILY_ORDER:
                y = [c.get((f, k, t)) for t in ts]
                y = [np.nan if v is None else v for v in y]
                ax.plot([t / T for t in ts], y, "o-", ms=3, lw=1, color=colors[f], label=f)
            ax.axhline(be, color="k", ls="--", lw=1, label=f"break-even {be:.3f}")
            ax.axhline(1.0, color="gray", ls=":", lw=1)
            ax.axhline(0.0, color="gray", lw=0.5)
            ax.set_yscale("symlog", linthresh=0.1)
            ax.set_ylim(-100, 10)
            ax.set_title(f"{title}, k={k}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("jump / k real steps\n(held-out decrease)", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("training progress t/T", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
