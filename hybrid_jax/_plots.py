"""PNG plots of a run's metric rows (matplotlib, Agg canvas; no pyplot state is touched).

``plot_run`` and ``run_figures`` are re-exported by ``hybrid_jax._report``
(``hj.report.plot_run``); rows are as described there. The figures read at 200 steps
and at 20,000: train losses are smoothed (the raw curve faint), each arm has its own
colour and line style, and the phases are a thin strip of per-window shares below the
axes instead of one stripe per phase.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ._phases import PHASE_NAMES
from ._plot_data import (
    after_warmup,
    default_span,
    phase_shares,
    predict_phase_windows,
    predict_phases,
    smooth,
)
from ._rows import Row, column

PHASE_COLORS = ("#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c")  # warmup, full, predict, correct
MAX_MARKERS = 25  # evaluation points drawn with markers, at most
MAX_DOTS = 600  # predicted losses drawn as dots, at most (else their smoothed curve)
MAX_PHASE_POINTS = 150  # Predict phases drawn one point each, at most (else per window)
PHASE_WINDOWS = 100  # windows of the per-window summary of the Predict phases


class ArmStyle(NamedTuple):
    """How one arm (a run) is drawn."""

    color: str
    line: str  # matplotlib line style
    marker: str
    predicted: str  # colour of the predictor's loss on predicted steps


ARM_STYLES = (
    # the run (e.g. "hybrid"): red, solid; its predicted losses in the Predict phase's orange
    ArmStyle(color="#c0392b", line="-", marker="o", predicted="#ff7f0e"),
    # the baseline: dark blue, dashed; predicted losses (a hybrid baseline) in purple
    ArmStyle(color="#1a5276", line="--", marker="s", predicted="#9467bd"),
)


class _Arm(NamedTuple):
    """One run to draw: its name, rows and style."""

    name: str
    rows: list[Row]
    style: ArmStyle


def plot_run(
    rows: Sequence[Row],
    out_dir: str | Path,
    *,
    prefix: str = "",
    baseline_rows: Sequence[Row] | None = None,
    name: str = "hybrid",
    baseline_name: str = "baseline",
    span: int | None = None,
) -> list[Path]:
    """Writes PNG plots of a run, and of a baseline beside it (see ``run_figures``).

    Files: ``<prefix>loss_vs_step.png``; ``<prefix>loss_vs_time.png`` (only if the rows
    have ``time``); ``<prefix>confidence_horizon.png`` (only if the rows have
    ``confidence`` or ``horizon`` and a ``phase``).

    Args:
      rows: per-step metric dicts of the run.
      out_dir: directory for the files (created).
      prefix: prepended to every file name.
      baseline_rows: rows of a baseline run (e.g. plain AdamW) to draw beside.
      name: the run's name in the legends (e.g. ``"hybrid"``).
      baseline_name: the baseline's name in the legends (e.g. ``"adamw"``).
      span: steps of the train loss's moving average (default: 1/40 of the run).

    Returns:
      The paths written.
    """
    figures = run_figures(
        rows, baseline_rows=baseline_rows, name=name, baseline_name=baseline_name, span=span
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [_save(fig, out / f"{prefix}{stem}.png") for stem, fig in figures.items()]


def run_figures(
    rows: Sequence[Row],
    *,
    baseline_rows: Sequence[Row] | None = None,
    name: str = "hybrid",
    baseline_name: str = "baseline",
    span: int | None = None,
) -> dict[str, Any]:
    """The figures of a run (matplotlib ``Figure`` objects on Agg canvases).

    ``"loss_vs_step"``: each arm's train loss, smoothed by an EMA (raw curve faint), its
    held-out loss where rows have ``eval_loss``, and the predictor's loss on predicted
    steps; below, a strip of the phases' shares per window. ``"loss_vs_time"``: the same
    against wall-clock after compilation (the rows' ``time``). ``"confidence_horizon"``:
    the predictor's confidence after warmup (nothing is observed before), each Predict
    phase's length in steps and whether its check kept it or rolled it back.

    Args:
      rows: per-step metric dicts of the run.
      baseline_rows: rows of a baseline run to draw beside.
      name: the run's name in the legends.
      baseline_name: the baseline's name in the legends.
      span: steps of the train loss's moving average (default: 1/40 of the run).

    Returns:
      Figure name -> figure, in the order above (figures without data left out).
    """
    rows = list(rows)
    if not rows:
        raise ValueError("plot_run: rows is empty")
    if name == baseline_name and baseline_rows:
        raise ValueError(f"plot_run: name and baseline_name are both {name!r}; name each arm")
    span = default_span(len(rows)) if span is None else span
    mpl = _matplotlib()
    arms = [_Arm(name, rows, ARM_STYLES[0])]
    if baseline_rows:
        arms.append(_Arm(baseline_name, list(baseline_rows), ARM_STYLES[1]))
    figures = {"loss_vs_step": _loss_figure(mpl, arms, kind="step", span=span)}
    if any("time" in r for r in rows):
        figures["loss_vs_time"] = _loss_figure(mpl, arms, kind="time", span=span)
    if any("phase" in r for r in rows) and any("confidence" in r or "horizon" in r for r in rows):
        figures["confidence_horizon"] = _confidence_figure(mpl, arms[0])
    return figures


class _Matplotlib(NamedTuple):
    """The matplotlib classes the plots use, imported on demand."""

    canvas: Any  # FigureCanvasAgg
    figure: Any  # matplotlib.figure.Figure
    patch: Any  # matplotlib.patches.Patch
    ticker: Any  # matplotlib.ticker


def _matplotlib() -> _Matplotlib:
    """Imports the Agg canvas, ``Figure`` and ``Patch``; a clear error without matplotlib."""
    try:
        from matplotlib import ticker
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise ImportError("plot_run needs matplotlib: python3 -m pip install matplotlib") from None
    return _Matplotlib(canvas=FigureCanvasAgg, figure=Figure, patch=Patch, ticker=ticker)


def _new_figure(mpl: _Matplotlib, heights: Sequence[float]) -> tuple[Any, list[Any]]:
    """A figure on its own Agg canvas with stacked axes sharing x (the last is the strip)."""
    fig = mpl.figure(figsize=(9, 1.0 + 0.75 * sum(heights)), dpi=100, layout="constrained")
    mpl.canvas(fig)
    axes = fig.subplots(len(heights), 1, sharex=True, gridspec_kw={"height_ratios": heights})
    return fig, list(np.atleast_1d(axes))


def _save(fig: Any, path: Path) -> Path:
    """Writes and clears ``fig``; returns ``path``."""
    fig.savefig(path)
    fig.clear()
    return path


def _x(rows: Sequence[Row], kind: str) -> np.ndarray:
    """The x value of each row: its step, or its ``time``."""
    return column(rows, "step", default_index=True) if kind == "step" else column(rows, "time")


def _loss_figure(mpl: _Matplotlib, arms: Sequence[_Arm], *, kind: str, span: int) -> Any:
    """Losses of every arm against ``kind`` (``"step"`` or ``"time"``), the phase strip below."""
    fig, (ax, strip) = _new_figure(mpl, (5.0, 0.55))
    log = _wants_log(arms)
    for arm in arms:
        if kind == "step" or any("time" in r for r in arm.rows):
            _draw_arm(ax, arm, _x(arm.rows, kind), span=span, log=log)
    if log:
        _log_axis(ax, mpl.ticker)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.25, lw=0.5)
    where = "step" if kind == "step" else "wall-clock"
    ax.set_title(f"loss vs {where} (train loss: EMA over {span} steps, raw faint)", fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    _phase_strip(strip, arms[0].rows, _x(arms[0].rows, kind), kind=kind, patch=mpl.patch)
    strip.set_xlabel("step" if kind == "step" else "wall-clock after compilation (s)")
    return fig


def _draw_arm(ax: Any, arm: _Arm, x: np.ndarray, *, span: int, log: bool) -> None:
    """One arm: raw train loss (faint), its EMA, the predicted and the held-out loss."""
    color, line = arm.style.color, arm.style.line
    loss = column(arm.rows, "loss")
    ok = np.isfinite(loss) & np.isfinite(x)
    if ok.any():
        ax.plot(x[ok], loss[ok], line, color=color, lw=0.6, alpha=0.22)
        ema = smooth(loss[ok], span, log=log)
        ax.plot(x[ok], ema, line, color=color, lw=1.8, label=f"{arm.name} train loss")
    _draw_predicted(ax, arm, x, span=span, log=log)
    ev = column(arm.rows, "eval_loss")
    ok = np.isfinite(ev) & np.isfinite(x)
    if ok.any():
        ax.plot(
            x[ok],
            ev[ok],
            "-",
            color=color,
            lw=1.0,
            marker=arm.style.marker,
            markevery=max(1, int(ok.sum()) // MAX_MARKERS + 1),
            ms=5,
            mfc="white",
            mew=1.2,
            label=f"{arm.name} held-out loss",
        )


def _draw_predicted(ax: Any, arm: _Arm, x: np.ndarray, *, span: int, log: bool) -> None:
    """The predictor's loss on predicted steps: dots, or their EMA when there are many."""
    if not any("used_gradient" in r for r in arm.rows):
        return
    pred = column(arm.rows, "predicted_loss")
    predicted = np.array([not bool(r.get("used_gradient", True)) for r in arm.rows])
    ok = predicted & np.isfinite(pred) & np.isfinite(x)
    if not ok.any():
        return
    label = f"{arm.name} predictor's loss (predicted steps)"
    if ok.sum() <= MAX_DOTS:
        ax.plot(x[ok], pred[ok], ".", color=arm.style.predicted, ms=3, alpha=0.8, label=label)
    else:
        ema = smooth(pred[ok], max(1, span // 3), log=log)
        ax.plot(x[ok], ema, ":", color=arm.style.predicted, lw=1.5, label=f"{label}, EMA")


def _phase_strip(strip: Any, rows: Sequence[Row], x: np.ndarray, *, kind: str, patch: Any) -> None:
    """The phases' shares per window as one stacked band per phase, and their legend."""
    strip.set_yticks([])
    strip.set_ylim(0, 1)
    shares = phase_shares(rows, x, by_step=kind == "step")
    if shares is None:
        strip.set_visible(False)
        return
    left = np.repeat(shares.edges, 2)[1:-1]
    bottom = np.zeros_like(left)
    handles = []
    for p, name in enumerate(PHASE_NAMES):
        if not shares.shares[p].any():
            continue
        top = bottom + np.repeat(shares.shares[p], 2)
        color = PHASE_COLORS[p % len(PHASE_COLORS)]
        strip.fill_between(left, bottom, top, facecolor=color, alpha=0.8, lw=0)
        handles.append(patch(facecolor=color, alpha=0.8, label=name))
        bottom = top
    width = "step" if shares.width == 1 else f"{shares.width} steps"
    label = "phases" if width == "step" else f"phases\n(share per\n{width})"
    strip.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    strip.figure.legend(handles=handles, loc="outside right lower", fontsize=8, title="phases")


def _confidence_figure(mpl: _Matplotlib, arm: _Arm) -> Any:
    """Confidence after warmup, each Predict phase's length and outcome, the phase strip."""
    fig, (ax_c, ax_h, strip) = _new_figure(mpl, (2.6, 2.2, 0.55))
    x = _x(arm.rows, "step")
    conf = after_warmup(arm.rows, "confidence")
    ok = np.isfinite(conf) & np.isfinite(x)
    if ok.any():
        faint = int(ok.sum()) > 4 * MAX_DOTS  # a long run: the raw trace faint, its EMA on top
        ax_c.plot(
            x[ok],
            conf[ok],
            "-",
            color=arm.style.color,
            lw=0.6 if faint else 1.2,
            alpha=0.3 if faint else 1.0,
        )
        if faint:
            ax_c.plot(
                x[ok], smooth(conf[ok], default_span(len(x))), "-", color=arm.style.color, lw=1.6
            )
    ax_c.set_ylim(-0.02, 1.02)
    ax_c.set_ylabel("confidence")
    ax_c.grid(alpha=0.25, lw=0.5)
    ax_c.set_title(
        f"{arm.name}: predictor confidence (from the end of warmup) and Predict phases",
        fontsize=10,
    )
    _draw_predict_phases(ax_h, arm.rows)
    _phase_strip(strip, arm.rows, x, kind="step", patch=mpl.patch)
    strip.set_xlabel("step")
    return fig


_OUTCOME_STYLE = {  # outcome -> (marker, colour)
    "kept": ("o", "#2ca02c"),
    "rolled back": ("x", "#d62728"),
    "unverified": ("o", "#9e9e9e"),
}


def _draw_predict_phases(ax: Any, rows: Sequence[Row]) -> None:
    """The Predict phases: one point each (start, length, outcome), or per-window figures
    when there are more than ``MAX_PHASE_POINTS``."""
    phases = predict_phases(rows)
    n = len(phases.start)
    ax.grid(alpha=0.25, lw=0.5)
    ax.set_ylabel("steps of each\nPredict phase")
    if not n:
        ax.text(0.5, 0.5, "no Predict phase", ha="center", va="center", transform=ax.transAxes)
        return
    if n > MAX_PHASE_POINTS:
        _draw_phase_windows(ax, phases)
    else:
        for outcome, (marker, color) in _OUTCOME_STYLE.items():
            m = phases.outcome == outcome
            if m.any():
                ax.scatter(
                    phases.start[m],
                    phases.length[m],
                    s=16,
                    marker=marker,
                    color=color,
                    lw=1.2 if marker == "x" else 0,
                    label=f"{outcome} ({int(m.sum())})",
                )
        ax.legend(fontsize=8, loc="best", ncol=3, framealpha=0.9)
    ax.set_ylim(0, int(phases.length.max()) + 0.8)
    ax.yaxis.get_major_locator().set_params(integer=True)


def _draw_phase_windows(ax: Any, phases: Any) -> None:
    """Mean length of the Predict phases per window, and the share rolled back (right axis)."""
    w = predict_phase_windows(phases, PHASE_WINDOWS)
    rolled = int(np.sum(phases.outcome == "rolled back"))
    ax.step(w.centers, w.mean_length, where="mid", color="#2ca02c", lw=1.2)
    ax.set_ylabel(f"mean steps of a\nPredict phase\n(per {w.width} steps)", color="#2ca02c")
    ax.tick_params(axis="y", colors="#2ca02c")
    right = ax.twinx()
    right.step(w.centers, w.rolled_back, where="mid", color="#d62728", lw=0.9, alpha=0.8)
    right.set_ylim(-0.02, 1.02)
    right.set_ylabel("share rolled back", color="#d62728")
    right.tick_params(axis="y", colors="#d62728")
    ax.set_title(
        f"{len(phases.start)} Predict phases, {rolled} rolled back", fontsize=9, loc="right"
    )


def _log_axis(ax: Any, ticker: Any) -> None:
    """A log y axis with plain labels; ticks at 1, 2, 5 x 10^k where it spans few decades."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    if hi / lo < 1000:
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _wants_log(arms: Sequence[_Arm]) -> bool:
    """A log loss axis where the finite, positive losses span more than a factor of 10."""
    values = np.concatenate([column(a.rows, k) for a in arms for k in ("loss", "eval_loss")])
    values = values[np.isfinite(values)]
    return bool(values.size and values.min() > 0 and values.max() / values.min() > 10)
