"""Per-node metrics: rejection counters with logged reasons, byte counters, one JSONL record per round.

Every refusal is counted, but its log line is rate-limited (`LogLimiter`): a peer, or a flood of
connections, that makes the node refuse thousands of times a second would otherwise fill the disk
with near-identical lines (~150 B each). Neither a failed metrics write nor a failing log handler
may stop the training: both are swallowed here, the former logged.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pfl.errors import Reason

__all__ = [
    "LogLimiter",
    "Metrics",
    "read_jsonl",
]

log = logging.getLogger("p2pfl.metrics")

LOG_INTERVAL_S = 10.0  # at most one line per reason and peer per this many seconds
KEYS_PER_GROUP = 5  # distinct peers logged per reason per interval; further ones share one line
MAX_KEYS = 1024  # bound on the limiter's memory (peer names can be chosen by an attacker)
MAX_FIELD = 200  # characters of a peer name or detail that reach the log


def _clip(text: str, limit: int = MAX_FIELD) -> str:
    """Attacker-chosen strings reach the log: bound their length and keep them on one line."""
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[:limit] + "..."


def _safe_log(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """Log, never raise: a broken handler (full disk, closed stream, raising filter) must not stop the node."""
    try:
        logger.log(level, msg, *args)
    except Exception:  # noqa: BLE001 - nowhere left to report it
        pass


@dataclass
class _Window:
    start: float  # when this key's last line was logged
    suppressed: int = 0  # lines not logged since


class LogLimiter:
    """At most one line per (group, key) per interval; what is held back is counted and summarised.

    `group` is what happened (a reason), `key` who caused it (a peer). Only `keys_per_group` keys
    of a group get their own lines per interval; further keys share the key "other peers", so an
    attacker who varies its name still adds at most one more line per interval. A sweep, run at
    most once per interval from `log`/`flush`, writes "(N more suppressed)" for keys gone quiet.
    """

    OTHERS = "other peers"

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = LOG_INTERVAL_S,
        *,
        keys_per_group: int = KEYS_PER_GROUP,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval_s
        self._keys_per_group = keys_per_group
        self._max_keys = max_keys
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._per_group: Counter[str] = Counter()  # own-key windows per group
        self._last_sweep = clock()
        self._lock = threading.Lock()  # discovery callbacks may report from zeroconf's threads

    def log(self, level: int, group: str, key: str, msg: str, *args: object) -> bool:
        """Log `msg % args` unless this (group, key) already had its line this interval; True if logged."""
        now = self._clock()
        with self._lock:
            suppressed = self._admit(now, group, _clip(key, 64))  # first: its own line carries its count
            summaries = self._sweep(now)
        for line in summaries:
            _safe_log(self._logger, level, "%s", line)
        if suppressed is None:
            return False
        if suppressed:
            _safe_log(self._logger, level, msg + " (%d more suppressed)", *args, suppressed)
        else:
            _safe_log(self._logger, level, msg, *args)
        return True

    def flush(self, level: int = logging.WARNING) -> None:
        """Write the summaries of keys whose interval has passed (called e.g. once per round)."""
        with self._lock:
            summaries = self._sweep(self._clock())
        for line in summaries:
            _safe_log(self._logger, level, "%s", line)

    def _admit(self, now: float, group: str, key: str) -> int | None:
        """None: hold the line back; else the count of lines held back before it."""
        window = self._windows.get((group, key))
        if window is None:
            crowded = self._per_group[group] >= self._keys_per_group or len(self._windows) >= self._max_keys
            if crowded:
                key = self.OTHERS
                window = self._windows.get((group, key))
        if window is None:
            if len(self._windows) >= self._max_keys + 64:  # even the shared keys: no memory growth
                return None
            self._windows[(group, key)] = _Window(now)
            if key != self.OTHERS:
                self._per_group[group] += 1
            return 0
        if now - window.start >= self._interval:
            held, window.start, window.suppressed = window.suppressed, now, 0
            return held
        window.suppressed += 1
        return None

    def _sweep(self, now: float) -> list[str]:
        """Summarise keys that held lines back for an interval; forget keys quiet for an interval."""
        if now - self._last_sweep < self._interval:
            return []
        self._last_sweep = now
        lines: list[str] = []
        for (group, key), window in list(self._windows.items()):
            age = now - window.start
            if age < self._interval:
                continue
            if window.suppressed:  # the summary counts as this key's line for the next interval
                lines.append(
                    f"{group} from {key}: {window.suppressed} more suppressed in the last {age:.0f} s"
                )
                window.start, window.suppressed = now, 0
                continue
            del self._windows[(group, key)]
            if key != self.OTHERS:
                self._per_group[group] -= 1
                if self._per_group[group] <= 0:
                    del self._per_group[group]
        return lines


class Metrics:
    """Counts what the node refused and moved, and appends round records to a JSONL file."""

    def __init__(
        self,
        path: Path,
        *,
        log_interval_s: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)  # appended to: a restarted node's log goes on
        self.rejected: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self._limiter = LogLimiter(log, log_interval_s, clock=clock)

    def reject(self, reason: Reason, detail: str, peer: str = "?") -> None:
        """Every refusal is counted; its log line is rate-limited per reason and peer (see LogLimiter)."""
        self.rejected[reason.value] += 1
        self._limiter.log(
            logging.WARNING,
            f"rejected {reason.value}",
            peer,
            "rejected from %s: %s (%s)",
            _clip(peer),
            reason.value,
            _clip(detail),
        )

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; a failure is logged, never raised (the training matters more than its log)."""
        self._limiter.flush()
        record = {
            **record,
            "rejected": dict(self.rejected),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }
        try:
            line = json.dumps(record) + "\n"
            with self.path.open("a") as fh:
                fh.write(line)
        except (OSError, TypeError, ValueError) as exc:  # full disk, no fd left, a value json cannot hold
            _safe_log(log, logging.ERROR, "could not append to %s: %s", self.path, exc)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a metrics file, tolerating a half-written last line from a node that is still running."""
    records: list[dict[str, Any]] = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records
