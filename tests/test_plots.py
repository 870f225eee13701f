"""Plots: smoothing, phase shares per window, Predict phases, and the figures built from them
(readable at 200 and at 20,000 steps, arm names passed through to the legends)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hybrid_jax import CORRECT, FULL, PREDICT, WARMUP
from hybrid_jax._plot_data import (
    MAX_WINDOWS,
    after_warmup,
    phase_shares,
    predict_phase_windows,
    predict_phases,
    smooth,
)
from hybrid_jax._report import plot_run, run_figures

pytest.importorskip("matplotlib")

CYCLE = [FULL] * 10 + [PREDICT] * 4 + [CORRECT] * 3  # after 50 warmup steps


def synthetic_rows(n, *, warmup=50, seed=0, rollback_every=5):
    """Rows shaped like ``hj.train``'s: a falling, noisy loss; NaN on predicted steps."""
    rng = np.random.default_rng(seed)
    rows, verified = [], 0
    for i in range(n):
        phase = WARMUP if i < warmup else CYCLE[(i - warmup) % len(CYCLE)]
        predicted = phase == PREDICT
        after_predict = i > 0 and rows[-1]["phase"] == PREDICT and not predicted
        verified += after_predict
        loss = 2.0 * math.exp(-i / (n / 4)) * math.exp(0.3 * rng.normal())
        row = {
            "step": i,
            "phase": phase,
            "used_gradient": not predicted,
            "loss": math.nan if predicted else loss,
            "predicted_loss": loss * 1.1 if predicted else math.nan,
            "confidence": 0.99 if i < warmup else 0.9,
            "horizon": 4,
            "verified": after_predict,
            "rolled_back": after_predict and verified % rollback_every == 0,
            "time": 0.001 * (i + 1),
        }
        if i % max(1, n // 20) == 0:
            row["eval_loss"] = loss
        rows.append(row)
    return rows


def baseline_rows(n):
    return [
        {"step": i, "loss": 2.0 * math.exp(-i / (n / 4)), "time": 0.0005 * (i + 1)}
        for i in range(n)
    ]


def legend_texts(fig):
    texts = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    for ax in fig.axes:
        if ax.get_legend() is not None:
            texts += [t.get_text() for t in ax.get_legend().get_texts()]
    return texts


# -- smoothing ---------------------------------------------------------------------
def test_smooth_is_a_debiased_ema_that_skips_nan():
    # alpha = 2 / (3 + 1) = 0.5: [0, 1] -> 0, (0.5 * 0 + 0.5 * 1) / 0.75 = 2/3
    out = smooth(np.array([0.0, math.nan, 1.0]), 3)
    assert out[0] == 0.0 and math.isnan(out[1]) and out[2] == pytest.approx(2 / 3)
    np.testing.assert_allclose(smooth(np.full(3, 5.0), 10), 5.0)  # starts at 5, not near 0
    x = np.array([3.0, 1.0, 4.0, 1.0, 5.0])
    np.testing.assert_array_equal(smooth(x, 1), x)


def test_smooth_in_log_space_is_a_geometric_average():
    out = smooth(np.array([1.0, 100.0, -1.0]), 3, log=True)
    assert out[1] == pytest.approx(100 ** (2 / 3))
    assert math.isnan(out[2])  # a non-positive value is skipped, not averaged in


def test_smooth_reduces_noise():
    rng = np.random.default_rng(0)
    noisy = 1.0 + 0.2 * rng.normal(size=2000)
    assert np.std(smooth(noisy, 50)[200:]) < np.std(noisy) / 4


@pytest.mark.parametrize("span", [0, -3, 2.5])
def test_smooth_rejects_a_bad_span(span):
    with pytest.raises(ValueError, match="span must be an int >= 1"):
        smooth(np.ones(3), span)


# -- phases ------------------------------------------------------------------------
def test_phase_shares_are_exact_phases_on_a_short_run():
    rows = synthetic_rows(200)
    shares = phase_shares(rows, np.arange(200.0), by_step=True)
    assert shares.width == 1 and shares.shares.shape == (4, 200)
    expected = np.array([r["phase"] for r in rows])
    np.testing.assert_array_equal(shares.shares.argmax(axis=0), expected)
    assert set(np.unique(shares.shares)) == {0.0, 1.0}


def test_phase_shares_of_a_long_run_are_bounded_windows_that_sum_to_one():
    rows = synthetic_rows(20_000)
    shares = phase_shares(rows, np.arange(20_000.0), by_step=True)
    assert shares.shares.shape[1] <= MAX_WINDOWS and shares.width == 100
    np.testing.assert_allclose(shares.shares.sum(axis=0), 1.0)
    # the steady state of CYCLE: 10 full, 4 predict, 3 correct of every 17 steps
    np.testing.assert_allclose(shares.shares[PREDICT, 10:].mean(), 4 / 17, atol=0.01)
    on_time = phase_shares(rows, np.array([r["time"] for r in rows]), by_step=False)
    assert on_time.shares.shape[1] <= MAX_WINDOWS and on_time.edges[-1] == rows[-1]["time"]


def test_predict_phases_have_length_and_outcome():
    rows = synthetic_rows(200, rollback_every=3)
    phases = predict_phases(rows)
    assert phases.start[0] == 60 and set(phases.length.tolist()) == {4}
    outcomes = phases.outcome.tolist()
    assert outcomes[2] == "rolled back" and outcomes[0] == outcomes[1] == "kept"
    cut = predict_phases(rows[:62])  # the run ends inside a Predict phase
    assert cut.length.tolist() == [2] and cut.outcome.tolist() == ["unverified"]
    windows = predict_phase_windows(predict_phases(synthetic_rows(20_000)), 100)
    assert len(windows.centers) <= 100
    np.testing.assert_allclose(np.nanmean(windows.rolled_back), 0.2, atol=0.02)


def test_confidence_is_not_drawn_during_warmup():
    rows = synthetic_rows(200)
    conf = after_warmup(rows, "confidence")
    assert np.isnan(conf[:50]).all() and (conf[50:] == 0.9).all()
    fig = run_figures(rows)["confidence_horizon"]
    drawn = [line.get_xdata() for line in fig.axes[0].get_lines()]
    assert drawn and min(np.min(x) for x in drawn) == 50


# -- figures -----------------------------------------------------------------------
def strip_artists(fig):
    """Patches and collections of the phase strip (the loss figure's last axes)."""
    strip = fig.axes[-1]
    return len(strip.patches) + len(strip.collections)


def test_a_long_run_draws_no_more_phase_artists_than_a_short_one():
    short = run_figures(synthetic_rows(200))["loss_vs_step"]
    long = run_figures(synthetic_rows(20_000))["loss_vs_step"]
    assert 0 < strip_artists(long) <= 4  # one stacked band per phase, not one per stripe
    assert strip_artists(long) == strip_artists(short)
    main = long.axes[0]
    assert len(main.patches) == 0 and len(main.collections) == 0  # no shading behind curves


def test_arm_names_pass_through_to_the_legends():
    n = 300
    figs = run_figures(synthetic_rows(n), baseline_rows=baseline_rows(n), baseline_name="adamw")
    texts = legend_texts(figs["loss_vs_step"])
    assert "hybrid train loss" in texts and "adamw train loss" in texts
    assert not any("baseline" in t for t in texts)
    figs = run_figures(synthetic_rows(n), name="mine", baseline_rows=baseline_rows(n))
    assert "mine train loss" in legend_texts(figs["loss_vs_time"])
    with pytest.raises(ValueError, match="name each arm"):
        run_figures(synthetic_rows(n), baseline_rows=baseline_rows(n), baseline_name="hybrid")


def test_arms_differ_in_colour_and_line_style():
    n = 300
    fig = run_figures(synthetic_rows(n), baseline_rows=baseline_rows(n), baseline_name="adamw")
    lines = {line.get_label(): line for line in fig["loss_vs_step"].axes[0].get_lines()}
    a, b = lines["hybrid train loss"], lines["adamw train loss"]
    assert a.get_color() != b.get_color() and a.get_linestyle() != b.get_linestyle()


def test_the_time_axis_says_it_starts_after_compilation():
    fig = run_figures(synthetic_rows(200))["loss_vs_time"]
    assert "after compilation" in fig.axes[-1].get_xlabel()


def test_plot_run_writes_the_figures_of_a_long_run(tmp_path):
    paths = plot_run(synthetic_rows(20_000), tmp_path, baseline_rows=baseline_rows(20_000))
    assert [p.name for p in paths] == [
        "loss_vs_step.png",
        "loss_vs_time.png",
        "confidence_horizon.png",
    ]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
