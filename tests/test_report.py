"""Metrics export: JSONL/CSV round trips, summary figures on hand-made rows, tables, plots."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hybrid_jax._report import (
    compare,
    format_table,
    plot_run,
    read_csv,
    read_jsonl,
    summary,
    write_csv,
    write_jsonl,
)

NAN = float("nan")
PNG = b"\x89PNG\r\n\x1a\n"

# step, phase, used_gradient, loss, predicted_loss, time, verified, rolled_back, divergence
TABLE = [
    (0, 0, True, 2.0, NAN, 1.0, False, False, 0),
    (1, 0, True, 1.75, NAN, 1.125, False, False, 0),
    (2, 1, True, 1.5, 1.6875, 1.25, False, False, 0),  # rel. error 0.125
    (3, 1, True, 1.5, 1.5, 1.375, False, False, 0),  # 0
    (4, 2, False, NAN, 1.375, 1.5, False, False, 0),
    (5, 2, False, NAN, 1.25, 1.625, False, False, 0),
    (6, 2, False, 1.25, 1.0, 1.75, False, False, 1),  # 0.2 (a monitored forward pass)
    (7, 3, True, 1.25, 1.5, 1.875, True, False, 0),  # 0.2
    (8, 3, True, 1.0, NAN, 2.0, True, True, 2),
    (9, 1, True, 1.0, 1.0, 2.125, False, False, 0),  # 0
]
EVAL = {3: 1.5625, 9: 1.0625}


def hand_rows():
    """Rows shaped like ``jax.device_get(hj.metrics(state))``: 0-d numpy arrays."""
    rows = []
    for step, phase, used, loss, pred, t, ver, rb, div in TABLE:
        row = {
            "step": np.asarray(step, np.int32),
            "phase": np.asarray(phase, np.int32),
            "used_gradient": np.asarray(used),
            "loss": np.asarray(loss, np.float32),
            "predicted_loss": np.asarray(pred, np.float32),
            "confidence": np.asarray(min(1.0, 0.1 * step), np.float32),
            "horizon": np.asarray(3, np.int32),
            "verified": np.asarray(ver),
            "rolled_back": np.asarray(rb),
            "divergence_level": np.asarray(div, np.int32),
            "backward_passes": np.asarray(0, np.int32),
            "time": t,
        }
        if step in EVAL:
            row["eval_loss"] = EVAL[step]
        rows.append(row)
    return rows


def baseline_rows(n=10):
    return [
        {"step": i, "loss": 2.0 / (1 + i), "time": 0.25 * (i + 1)}
        | ({"eval_loss": 2.2 / (1 + i)} if i % 5 == 4 else {})
        for i in range(n)
    ]


def same(a, b):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def test_jsonl_round_trip_keeps_nan_and_types(tmp_path):
    rows = hand_rows()
    path = write_jsonl(rows, tmp_path / "sub" / "m.jsonl")
    back = read_jsonl(path)
    assert len(back) == len(rows)
    for r, b in zip(rows, back, strict=True):
        assert list(b) == list(r)
        for k in r:
            assert same(np.asarray(r[k]).item(), b[k]), k
    assert math.isnan(back[4]["loss"]) and back[0]["used_gradient"] is True
    assert isinstance(back[0]["phase"], int)


def test_csv_round_trip_keeps_nan_and_writes_booleans_as_ints(tmp_path):
    rows = hand_rows()
    path = write_csv(rows, tmp_path / "m.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert header[:3] == ["step", "phase", "used_gradient"] and header[-1] == "eval_loss"
    back = read_csv(path)
    assert len(back) == len(rows)
    for r, b in zip(rows, back, strict=True):
        assert set(b) == set(r)
        for k in r:
            want = np.asarray(r[k]).item()
            want = int(want) if isinstance(want, bool) else want
            assert same(want, b[k]), k
    assert back[2]["used_gradient"] == 1 and back[4]["used_gradient"] == 0
    assert math.isnan(back[4]["loss"]) and "eval_loss" not in back[0]


def test_summary_counts_by_hand():
    mem = {
        "source": "process",
        "peak_bytes_in_use": 300 * 2**20,
        "phase_peaks": {"full": 200 * 2**20, "predict": 300 * 2**20},
        "emergencies": 1,
        "growth_detected": False,
    }
    s = summary(hand_rows(), memory=mem)
    assert s["steps"] == 10
    assert s["phase_counts"] == {"warmup": 2, "full": 3, "predict": 3, "correct": 2}
    assert s["real_steps"] == 7 and s["predicted_steps"] == 3
    assert s["backward_passes"] == 7 and s["backward_skipped"] == 3
    assert s["backward_skipped_share"] == pytest.approx(0.3)
    assert s["prediction_pairs"] == 5
    assert s["prediction_rel_error"] == pytest.approx((0.125 + 0 + 0.2 + 0.2 + 0) / 5)
    # Per-step durations: 1.0 for the first, then 0.125 each; 3 predicted steps.
    assert s["wall_clock_s"] == pytest.approx(2.125)
    assert s["time_predicted_s"] == pytest.approx(3 * 0.125)
    assert s["time_real_s"] == pytest.approx(1.0 + 6 * 0.125)
    assert s["mean_predicted_step_s"] == pytest.approx(0.125)
    assert s["verified"] == 2 and s["rollbacks"] == 1 and s["accept_rate"] == pytest.approx(0.5)
    assert s["divergence_events"] == 2 and s["max_divergence_level"] == 2
    assert s["final_loss"] == 1.0 and s["best_loss"] == 1.0
    assert s["eval_points"] == 2 and s["final_eval_loss"] == 1.0625
    assert s["best_eval_loss"] == 1.0625
    assert s["memory_peak_bytes"] == 300 * 2**20 and s["memory_emergencies"] == 1

    table = format_table(s)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value"] and set(lines[1]) <= {"-", " "}
    assert any(ln.split() == ["phase_counts.predict", "3"] for ln in lines)
    assert any(ln.split() == ["backward_skipped_share", "30.0%"] for ln in lines)
    assert any(ln.split() == ["memory_phase_peaks.predict", "300.0", "MiB"] for ln in lines)
    assert len({len(ln) for ln in lines[:2]}) == 1


def test_summary_of_a_plain_optax_run():
    s = summary(baseline_rows())
    assert "phase_counts" not in s and "verified" not in s
    assert s["backward_passes"] == 10 and s["backward_skipped"] == 0
    assert s["wall_clock_s"] == pytest.approx(2.5) and s["time_predicted_s"] == 0.0
    assert s["best_eval_loss"] == pytest.approx(2.2 / 10)
    assert s["prediction_rel_error"] is None


def test_compare_side_by_side():
    runs = {"hybrid": summary(hand_rows()), "adamw": summary(baseline_rows())}
    text = compare(runs)
    lines = text.splitlines()
    assert lines[0].split() == ["hybrid", "adamw"]
    row = {ln[: ln.index("  ")].strip(): ln.split()[-2:] for ln in lines[2:]}
    assert row["backward passes"] == ["7", "10"]
    assert row["steps"] == ["10", "10"]
    assert row["final eval loss"] == ["1.062", "0.22"]
    assert row["wall-clock (s)"] == ["2.125", "2.500"]
    assert row["rollbacks"] == ["1", "-"]
    both = format_table(runs)
    assert both.splitlines()[0].split() == ["metric", "hybrid", "adamw"]
    with pytest.raises(ValueError, match="empty"):
        compare({})


def test_plots_are_written_as_png(tmp_path):
    paths = plot_run(hand_rows(), tmp_path / "plots", prefix="demo_", baseline_rows=baseline_rows())
    names = [p.name for p in paths]
    assert names == [
        "demo_loss_vs_step.png",
        "demo_loss_vs_time.png",
        "demo_confidence_horizon.png",
    ]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG and len(data) > 2000
    no_time = [{k: v for k, v in r.items() if k != "time"} for r in hand_rows()]
    paths = plot_run(no_time, tmp_path / "plots2")
    assert [p.name for p in paths] == ["loss_vs_step.png", "confidence_horizon.png"]
    assert all(p.read_bytes()[:8] == PNG for p in paths)
