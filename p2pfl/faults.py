"""Fault schedules for the testbed: a pure parser and trigger logic, no processes or signals here.

A schedule is a `;`-separated list of clauses, each saying what happens to whom and when:

    kill node-2@r20; restart node-2@r30; freeze node-3@r40 for 60s;
    partition 0-2|3-5@r60 for 60s; join node-6@r80

`@rN` means "once the federation's most advanced live node has finished round N" (`@r0`: right after
launch); `for D` (`60s`, `1.5m`, `500ms`, a bare number = seconds) ends a freeze or a partition after
that long, and without it they last until the run ends. Keeping the grammar and the "when" apart from
the executor (`p2pfl.faultlab`) means both can be unit-tested on plain data, with no node running.
The same goes for `--netem` specifications (`delay=20ms,loss=1%,rate=10mbit`, optionally prefixed by
`node-K:`), which are checked here and turned into `tc netem` arguments.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ACTIONS",
    "FaultError",
    "FaultEvent",
    "NETEM_KEYS",
    "Scheduler",
    "Step",
    "check_schedule",
    "frontier",
    "join_indices",
    "last_round",
    "parse_duration",
    "parse_netem",
    "parse_schedule",
]

ACTIONS = ("kill", "restart", "freeze", "partition", "join")
TIMED = ("freeze", "partition")  # the actions that accept `for D`

_CLAUSE = re.compile(
    r"^(?P<action>[a-z]+)\s+(?P<target>[^@]+?)\s*@\s*r(?P<round>\d+)(?:\s+for\s+(?P<duration>\S+))?$"
)
_NODE = re.compile(r"^(?:node-)?(\d+)$")
_RANGE = re.compile(r"^(?:node-)?(\d+)\s*-\s*(?:node-)?(\d+)$")
_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class FaultError(ValueError):
    """A schedule or netem spec that cannot run; the message is one line naming the bad clause."""


@dataclass(frozen=True)
class FaultEvent:
    """One clause of a schedule. `sides` is set for partitions only (node indices per side)."""

    action: str
    at_round: int
    node: int | None = None
    sides: tuple[tuple[int, ...], ...] = ()
    duration_s: float | None = None
    clause: str = ""

    @property
    def target(self) -> str:
        """How the event names whom it hits, for logs and summary.json."""
        if self.node is not None:
            return f"node-{self.node}"
        return "|".join(",".join(str(i) for i in side) for side in self.sides)

    @property
    def nodes(self) -> tuple[int, ...]:
        return (self.node,) if self.node is not None else tuple(i for s in self.sides for i in s)


def parse_duration(text: str) -> float:
    """`60s`, `1.5m`, `500ms`, `2h` or a bare number of seconds; must be > 0."""
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise FaultError(f"duration {text!r} must be a positive number with an optional unit ms/s/m/h")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _node(text: str, clause: str) -> int:
    match = _NODE.match(text.strip())
    if not match:
        raise FaultError(f"fault clause {clause!r}: {text.strip()!r} is not a node (write node-K or K)")
    return int(match.group(1))


def _side(text: str, clause: str) -> tuple[int, ...]:
    """One side of a partition: `0-2`, `0,1,4`, `node-3`, or a mix separated by commas."""
    nodes: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise FaultError(f"fault clause {clause!r}: empty node in partition side {text.strip()!r}")
        span = _RANGE.match(item)
        if span:
            lo, hi = int(span.group(1)), int(span.group(2))
            if lo > hi:
                raise FaultError(f"fault clause {clause!r}: range {item!r} runs backwards")
            nodes.extend(range(lo, hi + 1))
        else:
            nodes.append(_node(item, clause))
    return tuple(nodes)


def _clause(text: str) -> FaultEvent:
    match = _CLAUSE.match(text)
    if not match:
        raise FaultError(
            f"fault clause {text!r}: expected 'ACTION TARGET@rN [for DURATION]', e.g. 'freeze node-3@r40 for 60s'"
        )
    action, target, duration = match.group("action"), match.group("target"), match.group("duration")
    if action not in ACTIONS:
        raise FaultError(f"fault clause {text!r}: unknown action {action!r}; known: {', '.join(ACTIONS)}")
    if duration is not None and action not in TIMED:
        raise FaultError(f"fault clause {text!r}: only {' and '.join(TIMED)} take 'for DURATION'")
    seconds = None
    if duration is not None:
        try:
            seconds = parse_duration(duration)
        except FaultError as exc:
            raise FaultError(f"fault clause {text!r}: {exc}") from None
    at_round = int(match.group("round"))
    if action != "partition":
        return FaultEvent(action, at_round, node=_node(target, text), duration_s=seconds, clause=text)
    sides = tuple(_side(s, text) for s in target.split("|"))
    if len(sides) < 2:
        raise FaultError(f"fault clause {text!r}: a partition needs at least two sides, e.g. 0-2|3-5")
    flat = [i for s in sides for i in s]
    if len(flat) != len(set(flat)):
        raise FaultError(f"fault clause {text!r}: a node appears on more than one side")
    return FaultEvent(action, at_round, sides=sides, duration_s=seconds, clause=text)


def parse_schedule(text: str) -> list[FaultEvent]:
    """Parse a whole schedule; empty clauses (a trailing `;`) are ignored."""
    clauses = [" ".join(c.split()) for c in text.split(";")]
    return [_clause(c) for c in clauses if c]


def join_indices(events: Iterable[FaultEvent]) -> list[int]:
    """The nodes a schedule launches late, in index order."""
    return sorted({e.node for e in events if e.action == "join" and e.node is not None})


def check_schedule(events: list[FaultEvent], nodes: int, *, netns: bool) -> None:
    """Check a parsed schedule against the run: `nodes` are launched at start; `join node-K` adds
    nodes nodes..nodes+J-1 (each joins once); partitions need network namespaces."""
    joins = join_indices(events)
    if joins != list(range(nodes, nodes + len(joins))):
        raise FaultError(
            f"join targets must be node-{nodes} onwards without gaps (--nodes {nodes} launches "
            f"node-0..node-{nodes - 1}); got {', '.join(f'node-{j}' for j in joins)}"
        )
    total = nodes + len(joins)
    seen_join: dict[int, int] = {}
    for e in events:
        bad = [i for i in e.nodes if i >= total]
        if bad:
            raise FaultError(
                f"fault clause {e.clause!r}: node-{bad[0]} does not exist (node-0..node-{total - 1})"
            )
        if e.action == "partition" and not netns:
            raise FaultError(
                f"fault clause {e.clause!r}: partition needs --netns (one network namespace per node)"
            )
        if e.action == "join":
            if e.node in seen_join:
                raise FaultError(f"fault clause {e.clause!r}: node-{e.node} joins twice")
            seen_join[e.node or 0] = e.at_round
    for e in events:
        late = [i for i in e.nodes if i in seen_join and e.action != "join" and e.at_round < seen_join[i]]
        if late:
            raise FaultError(
                f"fault clause {e.clause!r}: node-{late[0]} has not joined by round {e.at_round}"
            )


def last_round(records: Iterable[Mapping[str, Any]]) -> int:
    """The highest round a node reports as finished (0 if none); ignores malformed records."""
    rounds = [r.get("round") for r in records]
    return max((r for r in rounds if isinstance(r, int) and not isinstance(r, bool)), default=0)


def frontier(rounds: Mapping[str, int], live: Collection[str]) -> int:
    """The round the most advanced live node has finished: what `@rN` is compared with. Dead nodes'
    last rounds do not count (a killed node must not move the clock)."""
    return max((r for name, r in rounds.items() if name in live), default=0)


@dataclass(frozen=True)
class Step:
    """One thing the executor must do now: start an event, or end a timed one (thaw, heal)."""

    event: FaultEvent
    phase: Literal["start", "end"]
    index: int  # position of the event in the schedule, so starts and ends can be paired


@dataclass
class Scheduler:
    """Decides which events are due, given the frontier round and the clock; it never sleeps.

    Starts fire in (round, written order); a timed event's end is due `duration_s` after its start.
    """

    events: list[FaultEvent]
    _waiting: list[int] = field(default_factory=list)
    _ends: dict[int, float] = field(default_factory=dict)  # event index -> when its end is due
    fired: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._waiting = sorted(range(len(self.events)), key=lambda i: (self.events[i].at_round, i))

    def due(self, frontier_round: int, now: float) -> list[Step]:
        """Ends that are due first (so a thaw precedes a later kill), then every start now reached."""
        steps = [
            Step(self.events[i], "end", i)
            for i, t in sorted(self._ends.items(), key=lambda x: x[1])
            if t <= now
        ]
        for step in steps:
            del self._ends[step.index]
        while self._waiting and self.events[self._waiting[0]].at_round <= frontier_round:
            i = self._waiting.pop(0)
            steps.append(Step(self.events[i], "start", i))
            self.fired.append(i)
            duration = self.events[i].duration_s
            if duration is not None:
                self._ends[i] = now + duration
        return steps

    def ends_pending(self) -> bool:
        """Whether a freeze or partition is still to be lifted (the run must not end before)."""
        return bool(self._ends)

    def unfired(self) -> list[FaultEvent]:
        return [self.events[i] for i in self._waiting]


_NETEM_VALUE = {
    "delay": re.compile(r"^\d+(\.\d+)?(us|ms|s)(/\d+(\.\d+)?(us|ms|s))?$"),
    "loss": re.compile(r"^\d+(\.\d+)?%$"),
    "duplicate": re.compile(r"^\d+(\.\d+)?%$"),
    "corrupt": re.compile(r"^\d+(\.\d+)?%$"),
    "reorder": re.compile(r"^\d+(\.\d+)?%$"),
    "rate": re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)$"),
}
NETEM_KEYS = tuple(_NETEM_VALUE)


def _netem_args(spec: str, body: str) -> list[str]:
    out: list[str] = []
    for item in body.split(","):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in _NETEM_VALUE:
            raise FaultError(
                f"netem {spec!r}: {item.strip()!r} is not KEY=VALUE with KEY one of {', '.join(NETEM_KEYS)}"
            )
        if not _NETEM_VALUE[key].match(value.lower()):
            raise FaultError(f"netem {spec!r}: bad value {value!r} for {key}")
        out.append(key)
        out.extend(value.lower().split("/"))  # delay=20ms/5ms -> delay 20ms 5ms (jitter)
    return out


def parse_netem(specs: Iterable[str], nodes: int) -> dict[int, list[str]]:
    """Node index -> `tc qdisc ... netem` arguments. A spec without `node-K:` applies to every node;
    a per-node spec replaces the shared one for that node."""
    shared: list[str] = []
    per_node: dict[int, list[str]] = {}
    for spec in specs:
        head, colon, body = spec.partition(":")
        if colon and _NODE.match(head.strip()):
            index = _node(head, spec)
            if index >= nodes:
                raise FaultError(f"netem {spec!r}: node-{index} does not exist (node-0..node-{nodes - 1})")
            per_node[index] = _netem_args(spec, body)
        else:
            shared = _netem_args(spec, spec)
    return {i: per_node.get(i, shared) for i in range(nodes) if per_node.get(i, shared)}
