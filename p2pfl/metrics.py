"""Per-node metrics: rejection counters with logged reasons, byte counters, one JSONL record per round."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from p2pfl.errors import Reason

__all__ = [
    "Metrics",
    "read_jsonl",
]

log = logging.getLogger("p2pfl.metrics")


class Metrics:
    """Counts what the node refused and moved, and appends round records to a JSONL file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)  # appended to: a restarted node's log goes on
        self.rejected: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0

    def reject(self, reason: Reason, detail: str, peer: str = "?") -> None:
        """Every refusal is both counted and logged with its reason; none passes silently."""
        self.rejected[reason.value] += 1
        log.warning("rejected update from %s: %s (%s)", peer, reason.value, detail)

    def write(self, record: dict[str, Any]) -> None:
        record = {
            **record,
            "rejected": dict(self.rejected),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }
        try:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk or no file descriptor left must not stop the training
            log.error("could not append to %s: %s", self.path, exc)


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
