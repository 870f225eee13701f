"""MemoryMonitor: emergencies fire once and re-arm, per-phase peaks, growth, real CPU figures."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from hybrid_jax._memory import MemoryMonitor, default_source, process_memory_stats

MB = 2**20


class FakeSource:
    """Returns the next of the given bytes-in-use figures; one or two devices."""

    def __init__(self, values, limit=1000 * MB, second=None):
        self.values = list(values)
        self.second = second
        self.limit = limit
        self.i = 0
        self.peak = 0

    def __call__(self):
        v = self.values[self.i]
        self.i += 1
        self.peak = max(self.peak, v)
        out = [
            {
                "device": "fake:0",
                "bytes_in_use": v,
                "peak_bytes_in_use": self.peak,
                "bytes_limit": self.limit,
            }
        ]
        if self.second is not None:
            out.append(
                {
                    "device": "fake:1",
                    "bytes_in_use": self.second,
                    "peak_bytes_in_use": self.second,
                    "bytes_limit": self.limit,
                }
            )
        return out


def test_emergency_fires_once_and_rearms():
    mb = [100, 500, 950, 960, 990, 700, 400, 920, 930]
    calls = []
    mon = MemoryMonitor(
        FakeSource([v * MB for v in mb]), emergency_fraction=0.9, on_emergency=calls.append
    )
    records = [mon.sample(step, 1) for step in range(len(mb))]
    # Crosses at step 2 (950 >= 900), stays above until step 4, drops at 5, crosses at 7.
    assert [c["step"] for c in calls] == [2, 7]
    assert [r["emergency"] for r in records] == [v >= 900 for v in mb]
    assert [r["emergency_started"] for r in records] == [
        False,
        False,
        True,
        False,
        False,
        False,
        False,
        True,
        False,
    ]
    assert mon.summary()["emergencies"] == 2


def test_emergency_bytes_and_fraction_take_the_smaller_and_any_device():
    calls = []
    mon = MemoryMonitor(
        FakeSource([100 * MB, 100 * MB], second=300 * MB),
        emergency_bytes=250 * MB,
        emergency_fraction=0.9,
        on_emergency=calls.append,
    )
    r = mon.sample(0, "predict")
    assert r["emergency"] and r["bytes_in_use"] == 300 * MB and len(r["devices"]) == 2
    mon.sample(1, "predict")
    assert len(calls) == 1


def test_phase_peaks_and_overall_peak():
    seq = [(0, 10), (0, 30), (1, 20), (2, 50), (2, 40), (3, 25), (1, 45), ("eval", 5)]
    mon = MemoryMonitor(FakeSource([v * MB for _, v in seq]))
    for step, (phase, _) in enumerate(seq):
        mon.sample(step, phase)
    s = mon.summary()
    assert s["phase_peaks"] == {
        "warmup": 30 * MB,
        "full": 45 * MB,
        "predict": 50 * MB,
        "correct": 25 * MB,
        "eval": 5 * MB,
    }
    assert s["peak_bytes_in_use"] == 50 * MB
    assert s["samples"] == len(seq) and s["source"] == "device"
    assert s["emergencies"] == 0 and not s["growth_detected"]


def test_growth_detection_over_the_window():
    flat = [100, 104, 98, 101, 103, 99]
    rising = [100, 120, 140, 160, 180, 200]
    mon = MemoryMonitor(
        FakeSource([v * MB for v in flat + rising]), growth_window=4, growth_bytes=50 * MB
    )
    flags = [mon.sample(i, 1)["growth"] for i in range(len(flat) + len(rising))]
    # Windows of 4 samples; growth where newest - oldest >= 50 MB: 160-100, 180-120, 200-140.
    assert flags == [False] * 6 + [False, False, False, True, True, True]
    s = mon.summary()
    assert s["growth_detected"] and s["growth_steps"] == [9, 10, 11]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"emergency_bytes": 0}, "emergency_bytes"),
        ({"emergency_bytes": 1.5}, "emergency_bytes"),
        ({"emergency_fraction": 1.5}, "emergency_fraction"),
        ({"emergency_fraction": 0.0}, "emergency_fraction"),
        ({"growth_window": 1}, "growth_window"),
        ({"growth_bytes": 0}, "growth_bytes"),
        ({"on_emergency": 3}, "on_emergency"),
        ({"source": "nvidia"}, "source"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MemoryMonitor(**kwargs)


@pytest.mark.skipif(
    jax.devices()[0].memory_stats() is not None, reason="device reports its own memory stats"
)
def test_default_source_on_cpu_gives_real_process_figures():
    ballast = np.ones(8 * MB, np.uint8)  # make sure something is resident
    stats = default_source()
    proc = [d for d in stats if d["source"] == "process"]
    assert len(proc) == 1
    p = proc[0]
    assert p["bytes_in_use"] > 10 * MB
    assert p["peak_bytes_in_use"] >= p["bytes_in_use"]
    assert p["bytes_limit"] > p["bytes_in_use"]
    mon = MemoryMonitor()
    r = mon.sample(0, 0)
    assert r["source"] == "process" and r["bytes_in_use"] > 10 * MB
    assert mon.summary()["source"] == "process"
    assert process_memory_stats()["bytes_in_use"] > 10 * MB
    del ballast
