"""Per-process memory of a testbed's nodes: RSS, PSS and USS, sampled while they run.

RSS counts every page a process maps, shared or not, so summing it over nodes that share code (and,
with the fork server, torch's imported heap) counts those pages once per node. PSS divides each shared
page among the processes that map it, so PSS sums to what the machine really holds; USS is what a
process holds alone (what killing it would free). Sampling reads /proc/PID/smaps_rollup, which costs
the kernel a walk of the page tables, so the watch samples at most as often as keeps that a small
share of one core.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil

__all__ = ["MemoryWatch", "sample"]

MB = 1e6
MIN_INTERVAL_S = 2.0
BUDGET = 0.05  # at most this share of the wall time is spent sampling


def sample(pid: int) -> dict[str, float] | None:
    """(rss, pss, uss) of one process in MB; None when it is gone or not readable."""
    with contextlib.suppress(psutil.Error, OSError):
        info = psutil.Process(pid).memory_full_info()
        return {
            "rss_mb": info.rss / MB,
            "pss_mb": getattr(info, "pss", info.uss) / MB,
            "uss_mb": info.uss / MB,
        }
    return None


@dataclass
class MemoryWatch:
    """Peak RSS/PSS/USS per named process, and the peak of their sums at one sampling instant."""

    peaks: dict[str, dict[str, float]] = field(default_factory=dict)
    total_peaks: dict[str, float] = field(default_factory=dict)
    _next: float = 0.0

    def poll(self, procs: Iterable[tuple[str, int]], extra: Iterable[tuple[str, int]] = ()) -> None:
        """Sample when due: `procs` are the nodes (in the sums), `extra` helpers (the fork server)
        whose memory is reported beside them (and in the sums: they hold the shared pages)."""
        now = time.monotonic()
        if now < self._next:
            return
        totals: dict[str, float] = {}
        for name, pid in [*procs, *extra]:
            got = sample(pid)
            if got is None:
                continue
            peak = self.peaks.setdefault(name, {})
            for key, value in got.items():
                peak[key] = max(peak.get(key, 0.0), value)
                totals[key] = totals.get(key, 0.0) + value
        for key, value in totals.items():
            self.total_peaks[key] = max(self.total_peaks.get(key, 0.0), value)
        took = time.monotonic() - now
        self._next = time.monotonic() + max(MIN_INTERVAL_S, took / BUDGET)

    def summary(self, nodes: Iterable[str]) -> dict[str, Any]:
        """Median and max over `nodes` of each one's peak, the peak sums, and the others' peaks."""
        names = [n for n in nodes if n in self.peaks]
        out: dict[str, Any] = {"nodes_sampled": len(names)}
        for key in ("rss_mb", "pss_mb", "uss_mb"):
            values = [self.peaks[n][key] for n in names if key in self.peaks[n]]
            out[f"{key}_median"] = statistics.median(values) if values else None
            out[f"{key}_max"] = max(values) if values else None
            out[f"{key}_sum_peak"] = self.total_peaks.get(key)
        out["others"] = {n: v for n, v in self.peaks.items() if n not in set(names)}
        return out
