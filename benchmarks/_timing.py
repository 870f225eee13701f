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
