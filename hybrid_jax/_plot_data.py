"""What the plots draw, as arrays: smoothed curves, phase shares per window, Predict phases.

Pure numpy on metric rows (see ``hybrid_jax._report``); the drawing is in ``_plots``.
Everything here is sized for a run of any length: a 20,000-step run gives at most
``MAX_WINDOWS`` windows, not 20,000 stripes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ._phases import PHASE_NAMES, PREDICT, WARMUP
from ._rows import Row, column

MAX_WINDOWS = 200  # windows of the phase strip, at most


def smooth(values: np.ndarray, span: int, *, log: bool = False) -> np.ndarray:
    """Exponential moving average with span ``span``, skipping non-finite values.

    ``alpha = 2 / (span + 1)``; the average is debiased (divided by the weight seen so
    far, as in Adam), so it starts at the first finite value rather than at 0.

    Args:
      values: a 1-d series; NaN and infinities are skipped (they do not pull the average).
      span: the EMA's span in samples (>= 1; 1 returns the values unchanged).
      log: average ``log(values)`` and return its ``exp`` (a geometric average, for
        losses on a log axis); needs positive values (others are skipped).

    Returns:
      The smoothed series, NaN where ``values`` is not finite (or not positive with
      ``log``).
    """
    if not isinstance(span, int | np.integer) or span < 1:
        raise ValueError(f"smooth: span must be an int >= 1; got {span!r}")
    x = np.asarray(values, dtype=float)
    ok = np.isfinite(x) & (x > 0 if log else True)
    y = np.log(np.where(ok, x, 1.0)) if log else x
    alpha = 2.0 / (span + 1.0)
    out = np.full(x.shape, np.nan)
    avg = weight = 0.0
    for i in np.flatnonzero(ok):
        avg = (1.0 - alpha) * avg + alpha * y[i]
        weight = (1.0 - alpha) * weight + alpha
        out[i] = avg / weight
    return np.exp(out) if log else out


def default_span(n: int) -> int:
    """The smoothing span for a run of ``n`` steps: 1/40 of the run, at least 1 step."""
    return max(1, round(n / 40))


class PhaseShares(NamedTuple):
    """The share of steps in each phase, per window of consecutive steps."""

    edges: np.ndarray  # (W + 1,) where the windows start and end on the x axis
    shares: np.ndarray  # (len(PHASE_NAMES), W): share of the window's steps per phase
    width: int  # steps per window


def phase_shares(rows: Sequence[Row], x: np.ndarray, *, by_step: bool) -> PhaseShares | None:
    """Shares of the phases per window of ``ceil(n / MAX_WINDOWS)`` consecutive steps.

    A run of up to ``MAX_WINDOWS`` steps has windows of one step: the exact phases. On a
    step axis a window spans its steps; on a time axis it spans from the end of the
    window before (the first: from its first step) to the end of its last step, so a
    stall widens the window it happened in.

    Args:
      rows: metric rows with ``phase`` (``None`` is returned without).
      x: the x value of each row (step, or seconds, non-decreasing).
      by_step: whether ``x`` is the step axis.

    Returns:
      A ``PhaseShares``, or ``None`` where no row has both a phase and a finite ``x``.
    """
    if not any("phase" in r for r in rows):
        return None
    phase = column(rows, "phase")
    ok = np.isfinite(phase) & np.isfinite(x)
    if not ok.any():
        return None
    x, phase = x[ok], phase[ok].astype(int)
    width = math.ceil(len(x) / MAX_WINDOWS)
    index = np.arange(len(x)) // width
    n_windows = int(index[-1]) + 1
    counts = np.zeros((len(PHASE_NAMES), n_windows))
    valid = (phase >= 0) & (phase < len(PHASE_NAMES))
    np.add.at(counts, (phase[valid], index[valid]), 1.0)
    shares = counts / np.maximum(counts.sum(axis=0), 1.0)
    last = np.minimum(np.arange(1, n_windows + 1) * width, len(x)) - 1
    if by_step:
        edges = np.concatenate([[x[0] - 0.5], x[last] + 0.5])
    else:
        edges = np.concatenate([[x[0]], x[last]])
    return PhaseShares(edges=edges, shares=shares, width=width)


class PredictPhases(NamedTuple):
    """The Predict phases of a run, one entry per phase."""

    start: np.ndarray  # step of the phase's first predicted step
    length: np.ndarray  # predicted steps it ran
    outcome: np.ndarray  # "kept", "rolled back" or "unverified" (the run ended first)


def predict_phases(rows: Sequence[Row]) -> PredictPhases:
    """Each Predict phase: where it started, how many steps it ran, what its check said.

    A phase is a run of consecutive ``phase == PREDICT`` rows; the row after it is the
    verifying real step (``verified``), which either keeps it or rolls it back
    (``rolled_back``).

    Args:
      rows: metric rows of a hybrid run.

    Returns:
      A ``PredictPhases`` (empty arrays when there is no Predict phase).
    """
    steps = column(rows, "step", default_index=True)
    starts, lengths, outcomes = [], [], []
    i, n = 0, len(rows)
    while i < n:
        if int(rows[i].get("phase", -1)) != PREDICT:
            i += 1
            continue
        j = i
        while j < n and int(rows[j].get("phase", -1)) == PREDICT:
            j += 1
        starts.append(steps[i])
        lengths.append(j - i)
        outcomes.append(_outcome(rows[j]) if j < n else "unverified")
        i = j
    return PredictPhases(
        start=np.asarray(starts, dtype=float),
        length=np.asarray(lengths, dtype=int),
        outcome=np.asarray(outcomes, dtype=object),
    )


def _outcome(row: Row) -> str:
    """What the step after a Predict phase said of it."""
    if bool(row.get("rolled_back", False)):
        return "rolled back"
    return "kept" if bool(row.get("verified", False)) else "unverified"


def after_warmup(rows: Sequence[Row], key: str) -> np.ndarray:
    """``column(rows, key)`` with NaN on warmup steps (nothing observed yet)."""
    values = column(rows, key)
    phase = column(rows, "phase")
    values[~(np.isfinite(phase) & (phase != WARMUP))] = np.nan
    return values


class PhaseWindows(NamedTuple):
    """The Predict phases summarised per window of steps (NaN where a window has none)."""

    centers: np.ndarray  # (W,) the windows' middle steps
    mean_length: np.ndarray  # (W,) mean predicted steps per phase started in the window
    rolled_back: np.ndarray  # (W,) share of the window's verified phases rolled back
    width: int  # steps per window


def predict_phase_windows(phases: PredictPhases, windows: int) -> PhaseWindows:
    """``predict_phases`` per window: the phases' mean length and their rollback share.

    Args:
      phases: the Predict phases of a run (not empty).
      windows: the number of windows over the steps the phases span (>= 1).

    Returns:
      A ``PhaseWindows``.
    """
    lo, hi = float(phases.start.min()), float(phases.start.max())
    width = max(1, math.ceil((hi - lo + 1) / windows))
    index = ((phases.start - lo) // width).astype(int)
    n = int(index.max()) + 1
    count = np.bincount(index, minlength=n).astype(float)
    length = np.bincount(index, weights=phases.length, minlength=n)
    verified = phases.outcome != "unverified"
    checked = np.bincount(index, weights=verified, minlength=n)
    rolled = np.bincount(index, weights=phases.outcome == "rolled back", minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return PhaseWindows(
            centers=lo - 0.5 + width * (np.arange(n) + 0.5),
            mean_length=np.where(count > 0, length / count, np.nan),
            rolled_back=np.where(checked > 0, rolled / checked, np.nan),
            width=width,
        )
