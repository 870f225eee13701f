"""Shared timing helpers: warm up (compile) first, block on results, report medians."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def timed_compile(jitted: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Compiles ``jitted`` for ``args``; returns ``(compiled, seconds)``."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def median_time(run: Callable[[], Any], repeats: int = 7, warmup: int = 2) -> tuple[float, float]:
    """Median and spread (max - min) in seconds of ``run()``, blocking on its result."""
    for _ in range(warmup):
        jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times) - min(times)


def environment() -> dict[str, Any]:
    """Device, versions and host, for the results file."""
    import flax
    import optax

    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '?')}",
        "n_devices": jax.device_count(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "host": platform.machine(),
    }


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def device_timeline(run: Callable[[], Any], logdir: str, top: int = 5) -> dict[str, Any]:
    """Profiles one ``run()`` (already compiled and warm) and summarises the device side.

    Returns the span from the first device activity to the last, the time the device
    was busy (union of its kernels and copies), the number of device events, and the
    idle gaps between them (count and total of those over 10 us, and the ``top``
    largest with the events around them). ``None`` when the trace has no device plane
    (e.g. on the CPU).
    """
    data = _trace(run, logdir)
    if data is None:
        return None
    events = []
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            events += [(e.start_ns, e.end_ns, e.name) for e in line.events]
    if not events:
        return None
    events.sort()
    busy, gaps, end, prev = 0.0, [], events[0][0], events[0][2]
    by_name: dict[str, float] = {}
    for s, e, name in events:
        by_name[name] = by_name.get(name, 0.0) + (e - s) / 1e6
        if s > end:
            gaps.append((s - end, prev, name))
        busy += max(0.0, e - max(s, end))
        if e > end:
            end, prev = e, name
    big = [g for g in gaps if g[0] > 1e4]
    big.sort(reverse=True)
    return {
        "span_ms": (end - events[0][0]) / 1e6,
        "busy_ms": busy / 1e6,
        "device_events": len(events),
        "gaps_over_10us": len(big),
        "gap_ms_over_10us": sum(g[0] for g in big) / 1e6,
        "largest_gaps": [
            {"us": round(g / 1e3, 1), "after": a[:60], "before": b[:60]} for g, a, b in big[:top]
        ],
        "ms_by_name": by_name,
    }


def timeline_diff(a: dict[str, Any], b: dict[str, Any], top: int = 12) -> list[tuple[str, float]]:
    """Device event names whose total time grows most from timeline ``a`` to ``b`` (ms)."""
    names = set(a["ms_by_name"]) | set(b["ms_by_name"])
    d = {n: b["ms_by_name"].get(n, 0.0) - a["ms_by_name"].get(n, 0.0) for n in names}
    return sorted(d.items(), key=lambda kv: -abs(kv[1]))[:top]


def show_timeline(label: str, t: dict[str, Any] | None) -> None:
    """Prints a ``device_timeline`` summary without its per-name table."""
    if t is not None:
        t = {k: v for k, v in t.items() if k != "ms_by_name"}
    print(f"  {label}: {t}", flush=True)


def python_profile(run: Callable[[], Any], calls: int, top: int = 8) -> list[dict[str, Any]]:
    """The ``top`` functions by own time in one ``run()`` (cProfile), in microseconds per
    call of the step (``calls`` calls a run). The compiled program's call
    (``stages.py:__call__``, or the jitted function's) holds the launch's C++ work; a
    ``numpy.asarray`` there is a read of a device array, waiting for it."""
    import cProfile
    import pstats

    jax.block_until_ready(run())
    prof = cProfile.Profile()
    prof.enable()
    jax.block_until_ready(run())
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = [
        (tt, f"{fn[0].rsplit('/', 1)[-1]}:{fn[1]}({fn[2]})", nc)
        for fn, (_, nc, tt, _, _) in stats.items()
    ]
    rows.sort(reverse=True)
    return [
        {"fn": name[:70], "us_per_step": round(tt / calls * 1e6, 2), "n": n}
        for tt, name, n in rows[:top]
    ]


def host_events(run: Callable[[], Any], logdir: str, calls: int, top: int = 14) -> list[Any]:
    """The host-side trace events of one ``run()`` (jax.profiler, the host's planes):
    the ``top`` names by total time, in microseconds per call of the step (events nest,
    so totals overlap). Empty when the trace has no host plane."""
    data = _trace(run, logdir)
    if data is None:
        return []
    total: dict[str, list[float]] = {}
    for plane in data.planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            for e in line.events:
                if "profiler.py" in e.name or "contextlib.py" in e.name:
                    continue  # the trace's own frames
                name = e.name.split("#", 1)[0][:70]
                t = total.setdefault(name, [0.0, 0])
                t[0] += (e.end_ns - e.start_ns) / 1e3
                t[1] += 1
    ranked = sorted(total.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"event": k, "us_per_step": round(v[0] / calls, 2), "n": v[1]} for k, v in ranked]


def _trace(run: Callable[[], Any], logdir: str) -> Any:
    """The profile (``jax.profiler.ProfileData``) of one ``run()``, already compiled and
    warm; ``None`` when no trace was written."""
    import glob
    import shutil

    from jax.profiler import ProfileData

    shutil.rmtree(logdir, ignore_errors=True)
    jax.block_until_ready(run())
    with jax.profiler.trace(logdir):
        jax.block_until_ready(run())
    files = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
    return ProfileData.from_file(files[0]) if files else None
