"""Host-side memory monitoring: per-device bytes in use, per-phase peaks, growth, emergencies.

A *statistics source* is a callable returning one dict per device (or one for the
process) with the keys ``bytes_in_use``, ``peak_bytes_in_use``, ``bytes_limit``
(ints, bytes; ``bytes_limit`` may be 0 where unknown), ``device`` (a name) and
``source`` (``"device"`` or ``"process"``). ``default_source`` reads
``device.memory_stats()`` for every local device and, where that is ``None`` (the CPU
backend), falls back to the figures of this process (see ``process_memory_stats``).

``MemoryMonitor.sample`` is meant to be called from the training loop every few steps,
outside the jitted step; it never touches device arrays.
"""

from __future__ import annotations

import collections
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from ._phases import PHASE_NAMES

Source = Callable[[], list[dict[str, Any]]]

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def process_memory_stats() -> dict[str, Any]:
    """Memory figures of this process, in the layout of ``device.memory_stats()``.

    ``bytes_in_use`` is the resident set size (``/proc/self/statm`` times the page
    size); ``peak_bytes_in_use`` the peak resident set size (``ru_maxrss``, KiB on
    Linux, bytes on macOS); ``bytes_limit`` the physical memory (``/proc/meminfo``
    MemTotal, else ``os.sysconf``), lowered to the cgroup memory limit where one is set.
    Where ``/proc`` is missing, ``bytes_in_use`` is the peak.

    Returns:
      A dict with ``bytes_in_use``, ``peak_bytes_in_use``, ``bytes_limit``,
      ``device="process"`` and ``source="process"``.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = int(peak) if sys.platform == "darwin" else int(peak) * 1024
    rss = _rss_bytes()
    if rss is None:
        rss = peak
    return {
        "device": "process",
        "source": "process",
        "bytes_in_use": rss,
        "peak_bytes_in_use": max(peak, rss),
        "bytes_limit": _memory_limit_bytes(),
    }


def default_source() -> list[dict[str, Any]]:
    """Memory figures of every local device; the process's where a device reports none.

    Returns:
      One dict per local device that has ``memory_stats()`` (``source="device"``),
      plus one ``source="process"`` dict if any device has none (e.g. on CPU).
    """
    out: list[dict[str, Any]] = []
    missing = False
    for d in jax.local_devices():
        stats = d.memory_stats()
        if not stats:
            missing = True
            continue
        in_use = int(stats.get("bytes_in_use", 0))
        out.append(
            {
                "device": str(d),
                "source": "device",
                "bytes_in_use": in_use,
                "peak_bytes_in_use": int(stats.get("peak_bytes_in_use", in_use)),
                "bytes_limit": int(stats.get("bytes_limit", 0)),
            }
        )
    if missing:
        out.append(process_memory_stats())
    return out


class MemoryMonitor:
    """Samples memory use on the host, per phase, and reacts to high use.

    Each ``sample`` reads the source once. Per device it keeps bytes in use and the
    peak; over devices, the maximum. A device is *in emergency* when its bytes in use
    reach ``emergency_bytes`` or ``emergency_fraction * bytes_limit`` (whichever is
    given and smaller). ``on_emergency`` is called once when the monitor enters
    emergency (any device in emergency) and is re-armed only after a sample with every
    device back below its threshold. *Growth* is flagged on a sample when the maximum
    bytes in use has risen by at least ``growth_bytes`` over the last ``growth_window``
    samples (newest minus oldest of the window).

    Args:
      source: a callable returning per-device stats dicts (see the module docstring);
        ``None`` uses ``default_source``. Injectable for tests.
      emergency_bytes: absolute threshold in bytes (> 0), or ``None``.
      emergency_fraction: threshold as a fraction of ``bytes_limit``, in (0, 1], or
        ``None``; ignored for a device whose ``bytes_limit`` is unknown (0).
      growth_window: samples over which growth is measured (>= 2).
      growth_bytes: rise over the window that counts as growth (> 0).
      on_emergency: called with the sample's record when an emergency starts, e.g. to
        write an emergency checkpoint; exceptions propagate.
    """

    def __init__(
        self,
        source: Source | None = None,
        *,
        emergency_bytes: int | None = None,
        emergency_fraction: float | None = None,
        growth_window: int = 20,
        growth_bytes: int = 256 * 2**20,
        on_emergency: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if source is not None and not callable(source):
            raise ValueError(f"MemoryMonitor: source must be callable or None; got {source!r}")
        if emergency_bytes is not None and (not _is_int(emergency_bytes) or emergency_bytes <= 0):
            raise ValueError(
                "MemoryMonitor: emergency_bytes must be an int > 0 or None; "
                f"got {emergency_bytes!r}"
            )
        if emergency_fraction is not None and (
            not _is_number(emergency_fraction) or not 0.0 < emergency_fraction <= 1.0
        ):
            raise ValueError(
                "MemoryMonitor: emergency_fraction must be in (0, 1] or None; "
                f"got {emergency_fraction!r}"
            )
        if not _is_int(growth_window) or growth_window < 2:
            raise ValueError(
                f"MemoryMonitor: growth_window must be an int >= 2; got {growth_window!r}"
            )
        if not _is_number(growth_bytes) or not growth_bytes > 0:
            raise ValueError(f"MemoryMonitor: growth_bytes must be > 0; got {growth_bytes!r}")
        if on_emergency is not None and not callable(on_emergency):
            raise ValueError(
                f"MemoryMonitor: on_emergency must be callable or None; got {on_emergency!r}"
            )
        self._source: Source = source if source is not None else default_source
        self.emergency_bytes = emergency_bytes
        self.emergency_fraction = emergency_fraction
        self.growth_window = growth_window
        self.growth_bytes = growth_bytes
        self.on_emergency = on_emergency
        self.records: list[dict[str, Any]] = []
        self._window: collections.deque[int] = collections.deque(maxlen=growth_window)
        self._phase_peaks: dict[str, int] = {}
        self._peak = 0
        self._in_emergency = False
        self._emergencies = 0
        self._growth_steps: list[int] = []
        self._sources: set[str] = set()

    def sample(self, step: int, phase: int | str) -> dict[str, Any]:
        """Reads the source once and records the figures.

        Args:
          step: the training step the sample belongs to.
          phase: the phase, as its int (0..3, named by ``hj.PHASE_NAMES``) or a name.

        Returns:
          The record: ``step``, ``phase`` (a name), ``source``, ``bytes_in_use`` and
          ``peak_bytes_in_use`` (max over devices), ``bytes_limit`` (of the fullest
          device), ``devices`` (the per-device dicts), ``growth`` (bool),
          ``emergency`` (bool: above the threshold now) and ``emergency_started``
          (bool: ``on_emergency`` was triggered by this sample).
        """
        devices = [dict(d) for d in self._source()]
        if not devices:
            raise ValueError("MemoryMonitor: the source returned no devices")
        for d in devices:
            for key in ("bytes_in_use", "peak_bytes_in_use"):
                if key not in d:
                    raise ValueError(f"MemoryMonitor: a source entry lacks {key!r}: {d!r}")
            d["bytes_in_use"] = int(d["bytes_in_use"])
            d["peak_bytes_in_use"] = int(d["peak_bytes_in_use"])
            d["bytes_limit"] = int(d.get("bytes_limit") or 0)
            d.setdefault("source", "device")
        fullest = max(devices, key=lambda d: d["bytes_in_use"])
        in_use = fullest["bytes_in_use"]
        peak = max(max(d["peak_bytes_in_use"] for d in devices), in_use)
        kinds = {d["source"] for d in devices}
        self._sources |= kinds
        name = _phase_name(phase)

        self._phase_peaks[name] = max(self._phase_peaks.get(name, 0), in_use)
        self._peak = max(self._peak, peak)

        self._window.append(in_use)
        growth = (
            len(self._window) == self.growth_window
            and self._window[-1] - self._window[0] >= self.growth_bytes
        )
        if growth:
            self._growth_steps.append(int(step))

        emergency = any(self._over_threshold(d) for d in devices)
        started = emergency and not self._in_emergency
        self._in_emergency = emergency
        record = {
            "step": int(step),
            "phase": name,
            "source": kinds.pop() if len(kinds) == 1 else "mixed",
            "bytes_in_use": in_use,
            "peak_bytes_in_use": peak,
            "bytes_limit": fullest["bytes_limit"],
            "devices": devices,
            "growth": growth,
            "emergency": emergency,
            "emergency_started": started,
        }
        self.records.append(record)
        if started:
            self._emergencies += 1
            if self.on_emergency is not None:
                self.on_emergency(record)
        return record

    def summary(self) -> dict[str, Any]:
        """What was observed so far.

        Returns:
          A dict: ``source`` (``"device"``, ``"process"``, ``"mixed"`` or ``None``
          before any sample), ``samples``, ``peak_bytes_in_use`` (overall peak, bytes),
          ``phase_peaks`` (phase name -> largest bytes in use sampled in it),
          ``bytes_limit`` (of the last sample, 0 if unknown), ``emergencies`` (times an
          emergency started), ``growth_detected`` (bool), ``growth_steps`` (steps whose
          sample flagged growth).
        """
        if not self._sources:
            source = None
        elif len(self._sources) == 1:
            source = next(iter(self._sources))
        else:
            source = "mixed"
        return {
            "source": source,
            "samples": len(self.records),
            "peak_bytes_in_use": self._peak,
            "phase_peaks": dict(self._phase_peaks),
            "bytes_limit": self.records[-1]["bytes_limit"] if self.records else 0,
            "emergencies": self._emergencies,
            "growth_detected": bool(self._growth_steps),
            "growth_steps": list(self._growth_steps),
        }

    def _over_threshold(self, d: dict[str, Any]) -> bool:
        limits = []
        if self.emergency_bytes is not None:
            limits.append(self.emergency_bytes)
        if self.emergency_fraction is not None and d["bytes_limit"] > 0:
            limits.append(self.emergency_fraction * d["bytes_limit"])
        return bool(limits) and d["bytes_in_use"] >= min(limits)


def _phase_name(phase: int | str) -> str:
    if isinstance(phase, str):
        return phase
    try:
        index = int(phase)
    except (TypeError, ValueError):
        raise ValueError(f"MemoryMonitor: phase must be an int or a str; got {phase!r}") from None
    return PHASE_NAMES[index] if 0 <= index < len(PHASE_NAMES) else str(index)


def _rss_bytes() -> int | None:
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _memory_limit_bytes() -> int:
    total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        total = 0
    if total <= 0:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (OSError, ValueError):
            total = 0
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < (total or int(text) + 1):
            total = int(text)
    return int(total)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
