"""Per-node metrics: rejection counters with logged reasons, byte counters, one JSONL record per round.

Every refusal is counted, but its log line is rate-limited (`LogLimiter`): a peer, or a flood of
connections, that makes the node refuse thousands of times a second would otherwise fill the disk
with near-identical lines (~150 B each). Neither a failed metrics write nor a failing log handler
may stop the training: both are swallowed here, the former logged.

Each round record goes to metrics.jsonl and then to the sinks: callables that receive the record
(an embedding program's `on_round` callback, the optional TensorBoard writer). A sink that raises
is logged and skipped; it never stops the node. The first record a node process writes carries
`settings` (task, topology, rule, rounds), so `p2pfl report` can title its plots from the metrics
alone, even when the node.toml stayed on another machine.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pfl.errors import ConfigError, Reason

if TYPE_CHECKING:
    from p2pfl.config import NodeConfig

__all__ = [
    "TENSORBOARD_INSTALL",
    "LogLimiter",
    "Metrics",
    "RoundSink",
    "TensorBoardSink",
    "read_jsonl",
    "run_settings",
    "tensorboard_dir",
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


RoundSink = Callable[[dict[str, Any]], None]  # receives each round record, after it is on disk

TENSORBOARD_INSTALL = 'pip install "p2pfl-mesh[tensorboard]"'
TENSORBOARD_SCALARS = {  # record key -> TensorBoard tag
    "accuracy": "accuracy/test",
    "test_loss": "loss/test",
    "train_loss": "loss/train",
    "round_s": "time/round_s",
    "bytes_out": "bytes/sent_total",
    "bytes_in": "bytes/received_total",
    "epsilon": "privacy/epsilon",
    "members": "mesh/members",
    "own_weight": "mixing/own_weight",
}


class Metrics:
    """Counts what the node refused and moved, appends round records to a JSONL file and hands each
    record to the sinks."""

    def __init__(
        self,
        path: Path,
        *,
        log_interval_s: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        sinks: Sequence[RoundSink] = (),
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)  # appended to: a restarted node's log goes on
        self.rejected: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.sinks = list(sinks)
        self._settings = settings  # written into the first record only
        self._limiter = LogLimiter(log, log_interval_s, clock=clock)

    @classmethod
    def for_node(cls, cfg: NodeConfig, on_round: RoundSink | None = None) -> Metrics:
        """The node's metrics: its JSONL file, TensorBoard when [metrics] tensorboard is on (a
        ConfigError at start if the package is missing), then the embedding program's callback."""
        sinks: list[RoundSink] = []
        if cfg.metrics.tensorboard:
            sinks.append(TensorBoardSink(tensorboard_dir(cfg)))
        if on_round is not None:
            sinks.append(on_round)
        return cls(cfg.metrics_path, sinks=sinks, settings=run_settings(cfg))

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
        """Append one record, then hand it to each sink; a failure is logged, never raised (the
        training matters more than its log)."""
        self._limiter.flush()
        record = {
            **record,
            "rejected": dict(self.rejected),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }
        if self._settings is not None:
            record["settings"], self._settings = self._settings, None
        try:
            line = json.dumps(record) + "\n"
            with self.path.open("a") as fh:
                fh.write(line)
        except (OSError, TypeError, ValueError) as exc:  # full disk, no fd left, a value json cannot hold
            _safe_log(log, logging.ERROR, "could not append to %s: %s", self.path, exc)
        for sink in self.sinks:
            try:
                sink(dict(record))  # a copy: a sink that edits it cannot reach the next one
            except Exception as exc:  # noqa: BLE001 - a callback or writer must not stop the node
                _safe_log(log, logging.ERROR, "metrics sink %r failed: %r", sink, exc)


def run_settings(cfg: NodeConfig) -> dict[str, Any]:
    """What a report's titles say about the run: the federation-wide choices in this node's config."""
    return {
        "task": cfg.task.name,
        "partition": cfg.task.partition,
        "topology": cfg.gossip.topology,
        "rule": cfg.gossip.rule,
        "rounds": cfg.training.rounds,
        "expect_peers": cfg.discovery.expect_peers,
    }


def tensorboard_dir(cfg: NodeConfig) -> Path:
    """[metrics] tensorboard_dir, or <data_dir>/tensorboard (one folder per node: point
    `tensorboard --logdir` at a folder above several nodes' to compare them)."""
    return Path(cfg.metrics.tensorboard_dir) if cfg.metrics.tensorboard_dir else cfg.data_dir / "tensorboard"


class TensorBoardSink:
    """Scalars per round (accuracy, losses, round time, bytes, epsilon when DP is on) in a
    TensorBoard event file, through torch.utils.tensorboard; flushed every round, so a node killed
    at any point leaves every finished round readable."""

    def __init__(self, log_dir: Path) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                f"[metrics] tensorboard = true needs the tensorboard package: {TENSORBOARD_INSTALL} "
                "(or set tensorboard = false)"
            )
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, record: dict[str, Any]) -> None:
        step = record.get("round")
        if not isinstance(step, int):
            return
        for key, tag in TENSORBOARD_SCALARS.items():
            value = record.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(tag, value, global_step=step)
        rejected = record.get("rejected")
        if isinstance(rejected, dict):
            self._writer.add_scalar("mesh/rejected_total", sum(rejected.values()), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __repr__(self) -> str:
        return f"TensorBoardSink({str(self.log_dir)!r})"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every well-formed record of a metrics file. Lines that do not parse (a last line cut short by
    a kill -9 during a write, or such a fragment followed by a restarted node's records) are skipped."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return []
    records: list[dict[str, Any]] = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
