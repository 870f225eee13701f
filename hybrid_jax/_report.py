"""Metrics export on the host: JSON lines / CSV, a run summary, comparison tables, plots.

The plots live in ``_plots`` (``plot_run``, ``run_figures`` and ``smooth`` are re-exported
here, e.g. as ``hj.report.plot_run``).

A *row* is the dict of one step's metrics as host scalars, e.g.
``jax.device_get(hj.metrics(state))`` (names in ``hybrid_jax/_metrics.py``), optionally
with ``"time"`` (training seconds since the start when the step was launched; for the
last step, once its work was done) and
``"eval_loss"`` on the steps that were evaluated. Rows of a plain optax run (no
``phase`` or ``used_gradient``) are accepted too: every step counts as a real step.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._phases import PHASE_NAMES
from ._plot_data import smooth as smooth  # hj.report.smooth
from ._plots import PHASE_COLORS as PHASE_COLORS  # hj.report.PHASE_COLORS
from ._plots import plot_run as plot_run  # hj.report.plot_run
from ._plots import run_figures as run_figures  # hj.report.run_figures
from ._rows import Row as Row  # hj.report.Row
from ._rows import phase_name as _phase_name
from ._rows import to_float as _f

# Rows of ``compare``: (summary key, label).
COMPARE_KEYS = (
    ("steps", "steps"),
    ("final_loss", "final train loss"),
    ("best_loss", "best train loss"),
    ("final_eval_loss", "final eval loss"),
    ("best_eval_loss", "best eval loss"),
    ("backward_passes", "backward passes"),
    ("backward_skipped", "backward passes saved"),
    ("backward_skipped_share", "share saved"),
    ("wall_clock_s", "wall-clock (s)"),
    ("time_predicted_s", "time in predicted steps (s)"),
    ("prediction_rel_error", "loss prediction rel. error"),
    ("rollbacks", "rollbacks"),
    ("memory_peak_bytes", "memory peak"),
)


# -- files -------------------------------------------------------------------------
def write_jsonl(rows: Iterable[Row], path: str | Path) -> Path:
    """Writes one JSON object per row (NaN and infinities as ``NaN``/``Infinity``).

    Args:
      rows: per-step metric dicts of host scalars (numpy, JAX or Python).
      path: the file to write; parent directories are created.

    Returns:
      The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps({k: _py(v) for k, v in row.items()}) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Reads rows written by ``write_jsonl`` (blank lines skipped).

    Args:
      path: a JSON lines file.

    Returns:
      The rows, as dicts of Python values.
    """
    rows = []
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"read_jsonl: {path}:{n}: invalid JSON: {e}") from None
    return rows


def write_csv(rows: Sequence[Row], path: str | Path) -> Path:
    """Writes the rows as CSV: one column per key (in order of first appearance).

    Floats are written with full precision, NaN as ``nan`` (read back as NaN by
    ``read_csv``, pandas and numpy), booleans as 0/1, a missing value as an empty cell.

    Args:
      rows: per-step metric dicts of host scalars.
      path: the file to write; parent directories are created.

    Returns:
      The path written.
    """
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(_csv_cell(row[c]) if c in row else "" for c in columns)
    return path


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Reads rows written by ``write_csv``: ints and floats parsed, empty cells left out.

    Args:
      path: a CSV file with a header row.

    Returns:
      The rows; booleans come back as the ints 0/1.
    """
    with Path(path).open(newline="") as f:
        return [{k: _parse_cell(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


# -- summary -----------------------------------------------------------------------
def summary(rows: Sequence[Row], *, memory: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Figures of one run, counted over the given rows (one row per step).

    Args:
      rows: per-step metric dicts (see the module docstring).
      memory: ``MemoryMonitor.summary()``, to include memory peaks.

    Returns:
      A dict with ``steps``, ``phase_counts`` (phase name -> steps), ``real_steps``,
      ``predicted_steps``, ``backward_passes``, ``backward_skipped`` and
      ``backward_skipped_share`` (steps without a backward pass), ``final_loss`` /
      ``best_loss`` (finite train losses), ``final_eval_loss`` / ``best_eval_loss``
      (where ``eval_loss`` is present), ``prediction_rel_error`` (mean of
      ``|predicted_loss - loss| / |loss|`` where both are finite and ``loss != 0``) with
      ``prediction_pairs``; with ``time``: ``wall_clock_s`` and the split of the per-step
      durations (``time[i] - time[i-1]``, the first from 0) into ``time_real_s`` and
      ``time_predicted_s`` and their per-step means; with ``verified``: ``verified``,
      ``rollbacks`` and ``accept_rate`` (``1 - rollbacks / verified``); with
      ``divergence_level``: ``divergence_events`` (steps with level > 0) and
      ``max_divergence_level``; with ``memory``: ``memory_source``,
      ``memory_peak_bytes``, ``memory_phase_peaks``, ``memory_emergencies``,
      ``memory_growth_detected``. Figures that cannot be computed are ``None``.
    """
    rows = list(rows)
    real = [bool(r.get("used_gradient", True)) for r in rows]
    losses = [_f(r.get("loss")) for r in rows]
    out: dict[str, Any] = {"steps": len(rows)}
    if any("phase" in r for r in rows):
        out["phase_counts"] = _phase_counts(rows)
    out |= _step_counts(real)
    out |= _loss_figures(rows, losses)
    out |= _prediction_error(rows, losses)
    if any("time" in r for r in rows):
        out |= _time_split(rows, real)
    if any("verified" in r for r in rows):
        out |= _verification(rows)
    if any("divergence_level" in r for r in rows):
        out |= _divergence(rows)
    if rows and "nonfinite_predictions" in rows[-1]:
        out["nonfinite_predictions"] = int(rows[-1]["nonfinite_predictions"])
    if memory is not None:
        out |= _memory_figures(memory)
    return out


def _phase_counts(rows: Sequence[Row]) -> dict[str, int]:
    """Steps per phase name (every phase of ``PHASE_NAMES`` listed, 0 if absent)."""
    counts = dict.fromkeys(PHASE_NAMES, 0)
    for r in rows:
        if "phase" in r:
            name = _phase_name(r["phase"])
            counts[name] = counts.get(name, 0) + 1
    return counts


def _step_counts(real: Sequence[bool]) -> dict[str, Any]:
    """Real and predicted steps; a step without a backward pass counts as skipped."""
    n, n_real = len(real), sum(real)
    return {
        "real_steps": n_real,
        "predicted_steps": n - n_real,
        "backward_passes": n_real,
        "backward_skipped": n - n_real,
        "backward_skipped_share": (n - n_real) / n if n else None,
    }


def _loss_figures(rows: Sequence[Row], losses: Sequence[float]) -> dict[str, Any]:
    """Final and best finite train loss; number, final and best of the finite eval losses."""
    finite = [x for x in losses if math.isfinite(x)]
    evals = [_f(r["eval_loss"]) for r in rows if "eval_loss" in r]
    evals = [x for x in evals if math.isfinite(x)]
    return {
        "final_loss": finite[-1] if finite else None,
        "best_loss": min(finite) if finite else None,
        "eval_points": len(evals),
        "final_eval_loss": evals[-1] if evals else None,
        "best_eval_loss": min(evals) if evals else None,
    }


def _prediction_error(rows: Sequence[Row], losses: Sequence[float]) -> dict[str, Any]:
    """Mean ``|predicted_loss - loss| / |loss|`` over steps where both are finite, loss != 0."""
    errors = []
    for r, loss in zip(rows, losses, strict=True):
        pred = _f(r.get("predicted_loss"))
        if math.isfinite(loss) and math.isfinite(pred) and loss != 0.0:
            errors.append(abs(pred - loss) / abs(loss))
    return {
        "prediction_pairs": len(errors),
        "prediction_rel_error": float(np.mean(errors)) if errors else None,
    }


def _verification(rows: Sequence[Row]) -> dict[str, Any]:
    """Verified steps, rollbacks among them and the accept rate (the share of verified
    Predict phases not rolled back: accepted, or kept after lowering the loss)."""
    verified = sum(bool(r.get("verified", False)) for r in rows)
    rollbacks = sum(bool(r.get("rolled_back", False)) for r in rows)
    return {
        "verified": verified,
        "rollbacks": rollbacks,
        "accept_rate": 1.0 - rollbacks / verified if verified else None,
    }


def _divergence(rows: Sequence[Row]) -> dict[str, Any]:
    """Steps with a divergence level above 0, and the highest level."""
    levels = [int(r.get("divergence_level", 0)) for r in rows]
    return {
        "divergence_events": sum(level > 0 for level in levels),
        "max_divergence_level": max(levels) if levels else 0,
    }


def _memory_figures(memory: Mapping[str, Any]) -> dict[str, Any]:
    """The memory figures of a ``MemoryMonitor.summary()``."""
    return {
        "memory_source": memory.get("source"),
        "memory_peak_bytes": memory.get("peak_bytes_in_use"),
        "memory_phase_peaks": dict(memory.get("phase_peaks", {})),
        "memory_emergencies": memory.get("emergencies"),
        "memory_growth_detected": memory.get("growth_detected"),
    }


def _time_split(rows: Sequence[Row], real: Sequence[bool]) -> dict[str, Any]:
    """Wall-clock, and the per-step durations split into real and predicted steps."""
    spent = {True: 0.0, False: 0.0}
    steps = {True: 0, False: 0}
    previous = 0.0
    last = None
    for r, is_real in zip(rows, real, strict=True):
        t = _f(r.get("time"))
        if not math.isfinite(t):
            continue
        spent[is_real] += t - previous
        steps[is_real] += 1
        previous = last = t
    return {
        "wall_clock_s": last,
        "time_real_s": spent[True],
        "time_predicted_s": spent[False],
        "mean_real_step_s": spent[True] / steps[True] if steps[True] else None,
        "mean_predicted_step_s": spent[False] / steps[False] if steps[False] else None,
    }


# -- tables ------------------------------------------------------------------------
def format_table(summary_or_comparison: Mapping[str, Any]) -> str:
    """A fixed-width text table of a ``summary`` or of ``{run name: summary}``.

    Args:
      summary_or_comparison: one summary (nested dicts are shown as ``key.sub``), or
        a dict whose values are all summaries (one column per run).

    Returns:
      The table, lines joined by newlines.
    """
    d = summary_or_comparison
    if d and all(isinstance(v, Mapping) for v in d.values()):
        names = list(d)
        keys: dict[str, None] = {}
        flat = {name: _flatten(d[name]) for name in names}
        for f in flat.values():
            keys.update(dict.fromkeys(f))
        body = [[k, *(_fmt(k, flat[name].get(k)) for name in names)] for k in keys]
        return _table(["metric", *names], body)
    flat = _flatten(d)
    return _table(["metric", "value"], [[k, _fmt(k, v)] for k, v in flat.items()])


def compare(named_summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """A side-by-side table of several runs (e.g. ``"hybrid"`` vs ``"adamw"``).

    Args:
      named_summaries: run name -> ``summary(...)`` of that run.

    Returns:
      A fixed-width table: final/best train and eval loss, steps, backward passes,
      wall-clock and the other figures of ``COMPARE_KEYS`` that any run has.
    """
    if not named_summaries:
        raise ValueError("compare: named_summaries is empty")
    for name, s in named_summaries.items():
        if not isinstance(s, Mapping):
            raise ValueError(f"compare: the summary of {name!r} is not a dict")
    names = list(named_summaries)
    body = [
        [label, *(_fmt(key, named_summaries[n].get(key)) for n in names)]
        for key, label in COMPARE_KEYS
        if any(named_summaries[n].get(key) is not None for n in names)
    ]
    return _table(["", *names], body)


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= _flatten(v, f"{name}.")
        else:
            out[name] = v
    return out


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if not _is_number(v):
        return str(v)
    if "bytes" in key or key.startswith("memory_phase_peaks"):
        return f"{float(v) / 2**20:.1f} MiB"
    if isinstance(v, int | np.integer):
        return str(int(v))
    x = float(v)
    if not math.isfinite(x):
        return str(x)
    if key.endswith(("_share", "_rate")):
        return f"{100 * x:.1f}%"
    if key.endswith("_s"):
        return f"{x:.3f}"
    return f"{x:.4g}"


# -- helpers -----------------------------------------------------------------------
def _py(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _py(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_py(x) for x in v]
    if hasattr(v, "tolist") and callable(v.tolist):  # numpy / JAX scalars and arrays
        return np.asarray(v).tolist()
    return v


def _csv_cell(v: Any) -> Any:
    v = _py(v)
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list | dict):
        return json.dumps(v)
    return v


def _parse_cell(s: str) -> Any:
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
