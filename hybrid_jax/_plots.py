"""PNG plots of a run's metric rows (matplotlib, Agg canvas; no pyplot state is touched).

``plot_run`` is re-exported by ``hybrid_jax._report`` (``hj.report.plot_run``); rows are
as described there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ._rows import Row, column, phase_name

PHASE_COLORS = ("#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c")  # warmup, full, predict, correct


class _Matplotlib(NamedTuple):
    """The matplotlib classes the plots use, imported on demand."""

    canvas: Any  # FigureCanvasAgg
    figure: Any  # matplotlib.figure.Figure
    patch: Any  # matplotlib.patches.Patch


def plot_run(
    rows: Sequence[Row],
    out_dir: str | Path,
    *,
    prefix: str = "",
    baseline_rows: Sequence[Row] | None = None,
) -> list[Path]:
    """Writes PNG plots of a run (matplotlib, Agg canvas; no pyplot state is touched).

    (a) ``<prefix>loss_vs_step.png``: train loss (finite values), the predictor's loss
    on predicted steps, eval loss where present and the baseline's losses if given,
    with the phases shaded; (b) ``<prefix>loss_vs_time.png``: the same against
    wall-clock (only if the rows have ``time``); (c) ``<prefix>confidence_horizon.png``:
    confidence and horizon vs step (only if the rows have them).

    Args:
      rows: per-step metric dicts of the run.
      out_dir: directory for the files (created).
      prefix: prepended to every file name.
      baseline_rows: rows of a baseline run (e.g. plain AdamW) to draw beside.

    Returns:
      The paths written.
    """
    mpl = _matplotlib()
    rows = list(rows)
    if not rows:
        raise ValueError("plot_run: rows is empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = list(baseline_rows) if baseline_rows else []
    xs = {"step": column(rows, "step", default_index=True)}
    if any("time" in r for r in rows):
        xs["time"] = column(rows, "time")
    paths = []
    for kind, x in xs.items():
        fig = _loss_figure(mpl, rows=rows, base=base, x=x, kind=kind)
        paths.append(_save(fig, out / f"{prefix}loss_vs_{kind}.png"))
    if any("confidence" in r or "horizon" in r for r in rows):
        fig = _confidence_figure(mpl, rows=rows, x=xs["step"])
        paths.append(_save(fig, out / f"{prefix}confidence_horizon.png"))
    return paths


def _matplotlib() -> _Matplotlib:
    """Imports the Agg canvas, ``Figure`` and ``Patch``; a clear error without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise ImportError("plot_run needs matplotlib: python3 -m pip install matplotlib") from None
    return _Matplotlib(canvas=FigureCanvasAgg, figure=Figure, patch=Patch)


def _new_axes(mpl: _Matplotlib) -> tuple[Any, Any]:
    """A fresh figure on its own Agg canvas, and its one axes."""
    fig = mpl.figure(figsize=(8, 4.5), dpi=110)
    mpl.canvas(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, path: Path) -> Path:
    """Lays out, writes and clears ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path)
    fig.clear()
    return path


def _loss_figure(
    mpl: _Matplotlib, *, rows: Sequence[Row], base: Sequence[Row], x: np.ndarray, kind: str
) -> Any:
    """Losses of the run (and of the baseline) against ``kind``: ``"step"`` or ``"time"``."""
    fig, ax = _new_axes(mpl)
    handles = _shade_phases(ax, rows, x, kind, mpl.patch)
    _draw_losses(ax, rows, x, "hybrid" if base else "run")
    if base and (kind == "step" or any("time" in r for r in base)):
        bx = column(base, "step", default_index=True) if kind == "step" else column(base, "time")
        _draw_losses(ax, base, bx, "baseline", color="#555555", style="--")
    _log_scale_if_wide(ax, rows, base)
    ax.set_xlabel("step" if kind == "step" else "wall-clock (s)")
    ax.set_ylabel("loss")
    ax.set_title(f"loss vs {'step' if kind == 'step' else 'wall-clock'}")
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], *handles], fontsize=8)
    return fig


def _confidence_figure(mpl: _Matplotlib, *, rows: Sequence[Row], x: np.ndarray) -> Any:
    """Confidence (left axis) and horizon (right axis, a step line) against step."""
    fig, ax = _new_axes(mpl)
    handles = _shade_phases(ax, rows, x, "step", mpl.patch)
    ax.plot(x, column(rows, "confidence"), color="#d62728", lw=1.2, label="confidence")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("confidence")
    ax2 = ax.twinx()
    ax2.step(x, column(rows, "horizon"), where="post", color="#9467bd", lw=1.0, label="horizon")
    ax2.set_ylabel("horizon (steps)")
    top = np.nanmax(column(rows, "horizon"), initial=0.0)
    ax2.set_ylim(0, (top if np.isfinite(top) else 0.0) + 1)
    ax2.yaxis.get_major_locator().set_params(integer=True)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=[*lines, *handles], fontsize=8, loc="lower right")
    ax.set_title("confidence and horizon")
    return fig


def _draw_losses(
    ax: Any,
    rows: Sequence[Row],
    x: np.ndarray,
    label: str,
    color: str = "#111111",
    style: str = "-",
) -> None:
    """Train loss (finite), predicted loss on predicted steps and eval loss, if present."""
    loss = column(rows, "loss")
    ok = np.isfinite(loss) & np.isfinite(x)
    if ok.any():
        ax.plot(x[ok], loss[ok], style, color=color, lw=1.0, label=f"{label} train loss")
    if any("used_gradient" in r for r in rows):
        pred = column(rows, "predicted_loss")
        predicted = np.array([not bool(r.get("used_gradient", True)) for r in rows])
        ok = predicted & np.isfinite(pred) & np.isfinite(x)
        if ok.any():
            ax.plot(x[ok], pred[ok], ".", color="#ff7f0e", ms=2.5, label=f"{label} predicted loss")
    if any("eval_loss" in r for r in rows):
        ev = column(rows, "eval_loss")
        ok = np.isfinite(ev) & np.isfinite(x)
        if ok.any():
            ax.plot(
                x[ok],
                ev[ok],
                "o" + style,
                color=color if label == "baseline" else "#8c564b",
                ms=3.5,
                lw=1.0,
                label=f"{label} eval loss",
            )


def _shade_phases(ax: Any, rows: Sequence[Row], x: np.ndarray, kind: str, patch: Any) -> list:
    """One ``broken_barh`` per phase over merged runs of steps; returns legend patches."""
    if not any("phase" in r for r in rows):
        return []
    phases = [int(r["phase"]) if "phase" in r else -1 for r in rows]
    if kind == "step":
        lo, hi = x - 0.5, x + 0.5
    else:
        lo, hi = np.concatenate([[0.0], x[:-1]]), x
    ranges: dict[int, list[tuple[float, float]]] = {}
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or phases[i] != phases[start]:
            a, b = lo[start], hi[i - 1]
            if phases[start] >= 0 and np.isfinite(a) and np.isfinite(b):
                ranges.setdefault(phases[start], []).append((float(a), float(b - a)))
            start = i
    handles = []
    for p, spans in sorted(ranges.items()):
        color = PHASE_COLORS[p % len(PHASE_COLORS)]
        ax.broken_barh(
            spans, (0, 1), transform=ax.get_xaxis_transform(), facecolor=color, alpha=0.15, lw=0
        )
        handles.append(patch(facecolor=color, alpha=0.3, label=phase_name(p)))
    return handles


def _log_scale_if_wide(ax: Any, rows: Sequence[Row], base: Sequence[Row]) -> None:
    """A log loss axis where the finite, positive losses span more than a factor of 10."""
    values = np.concatenate(
        [column(rs, k) for rs in (rows, base) if rs for k in ("loss", "eval_loss")]
    )
    values = values[np.isfinite(values)]
    if values.size and values.min() > 0 and values.max() / values.min() > 10:
        ax.set_yscale("log")
