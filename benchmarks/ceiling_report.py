"""Tables and plot of the ceiling study (``python benchmarks/ceiling.py --summarize ...``).

Seeds are pooled per cell as a ratio of means, ``mean(d_jump) / mean(d_real)``, which
stays defined where single seeds' denominators are near zero; a cell whose mean real
decrease is <= 0 (the real steps did not lower the loss there) shows ``n/a``. A cell at or
above break-even is in bold where every seed clears it on its own, in italics where only
the pooled ratio does.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

FAMILY_ORDER = ("last_update", "ema0.9", "ema0.99", "window", "linefit", "snoo")
ZERO_ORDER = ("linefit_denoised", "weight_ema")


def load(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        text = gzip.open(p, "rt").read() if p.endswith(".gz") else Path(p).read_text()
        rows += [json.loads(x) for x in text.splitlines() if x.strip()]
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


def environment(rows: list[dict], wl: str) -> dict:
    """The environment recorded with a workload's runs (``_run`` rows; older files carry it
    in every row)."""
    for r in rows:
        if r["workload"] == wl and "environment" in r:
            return r["environment"]
    return {"device": "?", "jax": "?"}


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


def every_seed(rs: list[dict], sfx: str, be: dict) -> set:
    """``(family, k, t)`` at alpha = 1 where every seed's own ratio clears break-even (its
    real steps lowered the loss and its jump by at least break-even times as much)."""
    by = defaultdict(list)
    for r in rs:
        if r["k"] and r["alpha"] == 1.0:
            by[r["family"], r["k"], r["t"]].append(r)
    return {
        key
        for key, g in by.items()
        if all(
            r.get("d_real" + sfx, 0) > 0 and r["d_jump" + sfx] >= be[key[1]] * r["d_real" + sfx]
            for r in g
        )
    }


def mark(v: float | None, be: float, robust: bool) -> str:
    """Bold: clears break-even pooled and in every seed; italic: pooled only."""
    s = fmt(v)
    if v is None or v < be:
        return s
    return f"**{s}**" if robust else f"*{s}*"


def ratio_table(rs: list[dict], sfx: str, alpha: float | None = 1.0) -> list[str]:
    ts = sorted({r["t"] for r in rs})
    T = rs[0]["steps"]
    ks = sorted({r["k"] for r in rs if r["k"]})
    be = {r["k"]: r["break_even"] for r in rs if r["k"]}
    c = cells(rs, sfx, alpha)
    robust = every_seed(rs, sfx, be) if alpha == 1.0 else set(c)
    head = "| family | k | break-even | " + " | ".join(f"{t / T:.2f}" for t in ts) + " |"
    lines = [head, "|" + "---|" * (3 + len(ts))]
    for f in FAMILY_ORDER:
        for k in ks:
            vals = []
            for t in ts:
                v = c.get((f, k, t))
                vals.append(mark(v, be[k], (f, k, t) in robust))
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
        for f in (*FAMILY_ORDER, "schedule_only")
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
                ok = all(
                    r.get(f"d_realk_R{R}{sfx}", 0) > 0
                    and r[f"gain_R{R}{sfx}"] >= be[k] * r[f"d_realk_R{R}{sfx}"]
                    for r in g
                    if f"gain_R{R}{sfx}" in r
                )
                vals.append(mark(v, be[k], ok))
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


def persist_net_table(rs: list[dict], sfx: str) -> list[str]:
    """Persistence net of the schedule: ``(gain(jump) - gain(schedule_only)) / d_realk``,
    pooled over seeds, per family, k and R (only where the control ran)."""
    ctl = {
        (r["seed"], r["t"], r["k"]): r
        for r in rs
        if r["family"] == "schedule_only" and any(key.startswith("gain_R") for key in r)
    }
    if not ctl:
        return ["(no schedule_only control in these runs)"]
    T = rs[0]["steps"]
    ts = sorted({t for _, t, _ in ctl})
    rkeys = sorted(
        {
            int(key.split("_R")[1].split("_")[0])
            for r in ctl.values()
            for key in r
            if key.startswith("gain_R")
        }
    )
    be = {r["k"]: r["break_even"] for r in rs if r["k"]}
    lines = [
        "| family | k | R | " + " | ".join(f"{t / T:.2f}" for t in ts) + " |",
        "|" + "---|" * (3 + len(ts)),
    ]
    for f in FAMILY_ORDER:
        for k in sorted({k for _, _, k in ctl}):
            for R in rkeys:
                g, vals = f"gain_R{R}{sfx}", []
                for t in ts:
                    pairs = [
                        (r[g] - ctl[r["seed"], t, k][g], r[f"d_realk_R{R}{sfx}"])
                        for r in rs
                        if r["family"] == f
                        and r["k"] == k
                        and r["t"] == t
                        and r["alpha"] == 1.0
                        and g in r
                        and (r["seed"], t, k) in ctl
                    ]
                    if not pairs:
                        vals.append("-")
                        continue
                    n, d = np.mean([p[0] for p in pairs]), np.mean([p[1] for p in pairs])
                    v = float(n / d) if d > 0 else None
                    ok = all(q > 0 and p >= be[k] * q for p, q in pairs)
                    vals.append(mark(v, be[k], ok))
                if any(v != "-" for v in vals):
                    lines.append(f"| {f} | {k} | {R} | " + " | ".join(vals) + " |")
    return lines


def averaging_table(rs: list[dict], sfx: str) -> list[str]:
    """Decrease of the loss (mean over seeds, loss units) from ``w_t``: k real steps, the
    line fit at ``t + k`` and at ``t``, and the weight EMA: how much of linefit's gain is
    averaging (already there at k = 0) and how much extrapolation adds."""
    T = rs[0]["steps"]
    ts = sorted({r["t"] for r in rs})
    ks = sorted({r["k"] for r in rs if r["k"]})

    def mean(f, k, key, t):
        v = [
            r[key]
            for r in rs
            if r["family"] == f
            and r["k"] == k
            and r["t"] == t
            and r["alpha"] == 1.0
            and r.get(key) is not None
        ]
        return f"{np.mean(v):+.4f}" if v else "-"

    lines = [
        "| decrease from w_t | " + " | ".join(f"{t / T:.2f}" for t in ts) + " |",
        "|" + "---|" * (1 + len(ts)),
        "| linefit at t (denoised) | "
        + " | ".join(mean("linefit_denoised", 0, "d_jump" + sfx, t) for t in ts)
        + " |",
        "| weight EMA | " + " | ".join(mean("weight_ema", 0, "d_jump" + sfx, t) for t in ts) + " |",
    ]
    for k in ks:
        lines.append(
            f"| {k} real steps | "
            + " | ".join(mean("linefit", k, "d_real" + sfx, t) for t in ts)
            + " |"
        )
        lines.append(
            f"| linefit at t+{k} | "
            + " | ".join(mean("linefit", k, "d_jump" + sfx, t) for t in ts)
            + " |"
        )
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
            n_ok = sum(
                r.get("d_real" + sfx, 0) > 0 and r["d_jump" + sfx] >= be[k] * r["d_real" + sfx]
                for r in g
            )
            out.append(
                f"{f} k={k} at {t / T:.2f}: pooled ratio {fmt(v)} (break-even {be[k]:.3f}; "
                f"clears in {n_ok} of {len(g)} seeds; "
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
        env = environment(rows, wl)
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
            lines += [f"### Averaging against extrapolation, {what}", ""]
            lines += [*averaging_table(rs, sfx), ""]
            lines += [f"### Persistence, {what}", "", *persist_table(rs, sfx), ""]
            lines += [f"### Persistence net of the schedule control, {what}", ""]
            lines += [*persist_net_table(rs, sfx), ""]
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
        # language models in PATH, the digits MLP (held-out and training set) in PATH_digits
        lm = [r for r in rows if not r["workload"].startswith("digits")]
        dg = [r for r in rows if r["workload"].startswith("digits")]
        stem = Path(plot_path)
        for part, path in ((lm, stem), (dg, stem.with_name(stem.stem + "_digits" + stem.suffix))):
            if any(not r["family"].startswith("_") for r in part):
                plot(part, str(path))


def persist_panel(ax, rs: list[dict], sfx: str, title: str, colors: dict) -> None:
    """Jump of the largest persistence k, then the longest R real steps, against R + k real
    steps (pooled), net of the schedule_only control where it ran."""
    ks = sorted({r["k"] for r in rs if r["k"] and any(key.startswith("gain_R") for key in r)})
    rkeys = sorted(
        {int(key.split("_R")[1].split("_")[0]) for r in rs for key in r if key.startswith("gain_R")}
    )
    if not ks:
        ax.set_visible(False)
        return
    k, R = ks[-1], rkeys[-1]
    g, d = f"gain_R{R}{sfx}", f"d_realk_R{R}{sfx}"
    ctl = {
        (r["seed"], r["t"]): r[g]
        for r in rs
        if r["family"] == "schedule_only" and r["k"] == k and g in r
    }
    T = rs[0]["steps"]
    ts = sorted({r["t"] for r in rs if r["k"] == k and g in r})
    for f in FAMILY_ORDER:
        y = []
        for t in ts:
            pairs = [
                (r[g] - ctl.get((r["seed"], t), 0.0), r[d])
                for r in rs
                if r["family"] == f and r["k"] == k and r["t"] == t and r["alpha"] == 1.0 and g in r
            ]
            den = np.mean([p[1] for p in pairs]) if pairs else 0.0
            y.append(np.mean([p[0] for p in pairs]) / den if den > 0 else np.nan)
        if ts and not all(np.isnan(y)):
            ax.plot([t / T for t in ts], y, "s-", ms=3, lw=1, color=colors[f], label=f)
    be = next(r["break_even"] for r in rs if r["k"] == k)
    ax.axhline(be, color="k", ls="--", lw=1)
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.axhline(0.0, color="gray", lw=0.5)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(-100, 100)
    net = "net of schedule control" if ctl else "no schedule control"
    ax.set_title(f"{title}, k={k} then R={R} real\nvs R+k real ({net})", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for (wl, regime), rs in groups(rows).items():
        env = environment(rows, wl)["device"].split(":")[-1].replace("NVIDIA ", "")
        seeds = len({r["seed"] for r in rs})
        wl = f"{wl} ({env}, {seeds} seed{'s' if seeds > 1 else ''})"
        panels.append((f"{wl} {regime}\nheld-out", rs, ""))
        if any("d_jump_train" in r for r in rs):
            panels.append((f"{wl} {regime}\ntraining set", rs, "_train"))
    ks = sorted({r["k"] for r in rows if not r["family"].startswith("_") and r["k"]})
    fig, axes = plt.subplots(
        len(panels), len(ks) + 1, figsize=(3.6 * (len(ks) + 1), 2.7 * len(panels)), squeeze=False
    )
    colors = dict(
        zip(FAMILY_ORDER, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False)
    )
    for row, (title, rs, sfx) in zip(axes, panels, strict=True):
        c = cells(rs, sfx, 1.0)
        T = rs[0]["steps"]
        ts = sorted({r["t"] for r in rs})
        persist_panel(row[-1], rs, sfx, title, colors)
        for ax, k in zip(row[:-1], ks, strict=True):
            if not any(kk == k for (_, kk, _) in c):
                ax.set_visible(False)
                continue
            be = next(r["break_even"] for r in rs if r["k"] == k)
            for f in FAMILY_ORDER:
                y = [c.get((f, k, t)) for t in ts]
                y = [np.nan if v is None else v for v in y]
                ax.plot([t / T for t in ts], y, "o-", ms=3, lw=1, color=colors[f], label=f)
            ax.axhline(be, color="k", ls="--", lw=1, label="break-even")
            ax.axhline(1.0, color="gray", ls=":", lw=1)
            ax.axhline(0.0, color="gray", lw=0.5)
            ax.set_yscale("symlog", linthresh=0.1)
            ax.set_ylim(-100, 100)
            ax.set_title(f"{title}, k={k} (break-even {be:.3f})", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("jump / k real steps\n(held-out decrease)", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("training progress t/T", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
