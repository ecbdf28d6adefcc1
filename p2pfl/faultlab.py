"""The fault lab's executor: process signals, network namespaces, `tc netem`, and applying schedule events.

Everything with side effects lives here; what a schedule means and when an event is due is decided by
the pure `p2pfl.faults`. Network safety: with `--netns` every node gets its own namespace whose only
interface is a veth into a bridge that lives in a further "hub" namespace the lab creates, on a private
/24 (10.213.X.0/24). Nothing is created in the host's own namespace: no bridge, no address, no route, no
NAT, so lab traffic (mDNS included) cannot reach a real interface. Every name starts with
`p2pfl-lab-<testbed pid>-`, so leftovers of a killed testbed are identifiable and are removed by the
next lab's `cleanup_stale`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from p2pfl.faults import FaultEvent, Scheduler, Step

__all__ = [
    "LAB_PREFIX",
    "FaultRunner",
    "LabError",
    "NetLab",
    "Proc",
    "child_setup",
    "cleanup_stale",
    "netns_unavailable",
    "pid_alive",
    "signal_group",
]

LAB_PREFIX = "p2pfl-lab-"
PARENT_PID_ENV = "P2PFL_PARENT_PID"
_PR_SET_PDEATHSIG = 1
IP_TIMEOUT_S = 20.0


class LabError(RuntimeError):
    """A lab setup step failed; the message names the command and what it said."""


# -- processes ---------------------------------------------------------------------------------------


def child_setup(parent_pid: int) -> Callable[[], None]:
    """A `preexec_fn` that makes the kernel send SIGTERM to the child when the testbed dies (Linux), and
    covers the race where the testbed died before the prctl took effect."""

    def setup() -> None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


def signal_group(pid: int, sig: int) -> bool:
    """Signal a node's whole process group (each node leads its own session); False if it is gone."""
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class Proc(Protocol):
    """What the runner needs of a node process (the testbed's NodeProcess)."""

    name: str
    directory: Path
    proc: subprocess.Popen[bytes]


# -- network namespaces ------------------------------------------------------------------------------


def netns_unavailable() -> str | None:
    """Why `--netns` cannot run here (None when it can): it needs root and iproute2."""
    if shutil.which("ip") is None:
        return "--netns needs the iproute2 `ip` command, which is not installed"
    if os.geteuid() != 0:
        return "--netns needs root (it creates network namespaces, veths and bridges)"
    return None


def _ip(*args: str, check: bool = True) -> str:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"`ip {' '.join(args)}` failed: {exc}") from exc
    if check and done.returncode != 0:
        raise LabError(f"`ip {' '.join(args)}` failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace(name: str) -> None:
    """SIGKILL whatever still runs inside one of our namespaces, then delete it."""
    for pid in _ip("netns", "pids", name, check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGCONT)
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", name, check=False)


def _lab_namespaces() -> list[str]:
    names = [line.split()[0] for line in _ip("netns", "list", check=False).splitlines() if line.strip()]
    return [n for n in names if n.startswith(LAB_PREFIX)]


def cleanup_stale() -> list[str]:
    """Delete namespaces left by labs whose testbed is gone (its pid is in every name)."""
    removed = []
    for name in _lab_namespaces():
        owner = name[len(LAB_PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not pid_alive(int(owner)):
            _kill_namespace(name)
            removed.append(name)
    return removed


@dataclass
class NetLab:
    """One namespace per node, veths into bridges inside a hub namespace, optional netem per node."""

    nodes: int
    run_id: str = field(default_factory=lambda: str(os.getpid()))
    created: list[str] = field(default_factory=list)
    bridges: int = 1

    @property
    def subnet(self) -> str:
        return f"10.213.{int(self.run_id) % 200 + 20}"

    @property
    def hub(self) -> str:
        return f"{LAB_PREFIX}{self.run_id}-hub"

    def namespace(self, index: int) -> str:
        return f"{LAB_PREFIX}{self.run_id}-n{index}"

    def address(self, index: int) -> str:
        return f"{self.subnet}.{index + 10}"

    def exec_prefix(self, index: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(index)]

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def setup(self) -> None:
        """Hub with bridge br0 (multicast snooping off so mDNS floods), then each node's namespace."""
        self._add_namespace(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i in range(self.nodes):
            ns, port = self.namespace(i), f"v{i}"
            self._add_namespace(ns)
            _ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "multicast", "on", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def netem(self, index: int, args: Sequence[str]) -> None:
        """Shape what node `index` sends (its veth's egress)."""
        cmd = [*self.exec_prefix(index), "tc", "qdisc", "replace", "dev", "eth0", "root", "netem", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
        if "kind is unknown" in done.stderr:
            raise LabError("--netem: this kernel has no sch_netem module, so tc netem is unavailable here")
        if done.returncode != 0:
            raise LabError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.returncode}")

    def _bridge(self, k: int) -> str:
        while self.bridges <= k:
            name = f"br{self.bridges}"
            _ip("-n", self.hub, "link", "add", name, "type", "bridge", "mcast_snooping", "0")
            _ip("-n", self.hub, "link", "set", name, "up")
            self.bridges += 1
        return f"br{k}"

    def partition(self, sides: Sequence[Sequence[int]]) -> None:
        """Side 0 (and every unlisted node) stays on br0; side k moves onto its own bridge brk."""
        for k, side in enumerate(sides[1:], start=1):
            bridge = self._bridge(k)
            for i in side:
                _ip("-n", self.hub, "link", "set", f"v{i}", "master", bridge)

    def heal(self) -> None:
        for i in range(self.nodes):
            _ip("-n", self.hub, "link", "set", f"v{i}", "master", "br0")

    def teardown(self) -> None:
        """Kill anything left inside our namespaces and delete them (veths and bridges go with them)."""
        for name in reversed(self.created):
            _kill_namespace(name)
        self.created.clear()


# -- applying events ---------------------------------------------------------------------------------


@dataclass
class FaultRunner:
    """Applies due schedule steps to the running nodes and records each one.

    `procs` is the testbed's live list (the runner replaces or appends entries on restart and join);
    `launch_node(index)` starts node `index` with its prepared config and returns its process.
    """

    scheduler: Scheduler
    procs: list[Any]
    launch_node: Callable[[int], Any]
    lab: NetLab | None = None
    log: Callable[[str], None] = print
    started: float = field(default_factory=time.monotonic)
    frozen: set[str] = field(default_factory=set)
    records: list[dict[str, Any]] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)

    def step(self, frontier_round: int) -> None:
        for step in self.scheduler.due(frontier_round, time.monotonic()):
            self._record(step, frontier_round, self._apply(step))

    def _find(self, index: int) -> Any | None:
        return next((p for p in self.procs if p.name == f"node-{index}"), None)

    def _apply(self, step: Step) -> str | None:
        """Do one step; returns a note when it could not do what was asked (e.g. node not running)."""
        e = step.event
        if e.action == "partition":
            assert self.lab is not None  # check_schedule refuses partitions without --netns
            if step.phase == "start":
                self.lab.partition(e.sides)
            else:
                self.lab.heal()
            return None
        assert e.node is not None
        p = self._find(e.node)
        if e.action == "join":
            if p is not None:
                return "already running"
            self.procs.append(self.launch_node(e.node))
            return None
        if e.action == "restart":
            return self._restart(e.node, p)
        if p is None or p.proc.poll() is not None:
            return "not running"
        self._signal(e, step, p)
        return None

    def _signal(self, e: FaultEvent, step: Step, p: Any) -> None:
        if e.action == "kill":
            signal_group(p.proc.pid, signal.SIGKILL)
            self.frozen.discard(p.name)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(timeout=10)
        elif step.phase == "start":  # freeze
            signal_group(p.proc.pid, signal.SIGSTOP)
            self.frozen.add(p.name)
        else:
            signal_group(p.proc.pid, signal.SIGCONT)
            self.frozen.discard(p.name)

    def _restart(self, index: int, p: Any | None) -> str | None:
        """Relaunch with the same data dir and config; the previous metrics are kept beside it."""
        note = None
        if p is not None:
            if p.proc.poll() is None:
                note = "was running: killed first"
                signal_group(p.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.proc.wait(timeout=10)
            self.frozen.discard(p.name)
            self.procs.remove(p)
        name = f"node-{index}"
        count = self.restarts[name] = self.restarts.get(name, 0) + 1
        metrics = (p.directory if p is not None else Path()) / "metrics.jsonl"
        if p is not None and metrics.exists():
            shutil.copyfile(metrics, metrics.with_name(f"metrics.before-restart-{count}.jsonl"))
        self.procs.append(self.launch_node(index))
        return note

    def _record(self, step: Step, frontier_round: int, note: str | None) -> None:
        e = step.event
        action = e.action if step.phase == "start" else {"freeze": "thaw", "partition": "heal"}[e.action]
        record: dict[str, Any] = {
            "at_round": frontier_round,
            "time": time.time(),
            "elapsed_s": round(time.monotonic() - self.started, 3),
            "action": action,
            "node": e.target,
            "clause": e.clause,
        }
        if step.phase == "start" and e.duration_s is not None:
            record["duration_s"] = e.duration_s
        if note:
            record["note"] = note
        self.records.append(record)
        extra = f" ({note})" if note else ""
        self.log(
            f"fault: {action} {e.target} at round {frontier_round}, t={record['elapsed_s']:.1f} s{extra}"
        )

    def release(self) -> None:
        """Thaw every node we froze, so that stopping them works (a stopped process ignores SIGTERM)."""
        for p in self.procs:
            if p.name in self.frozen:
                signal_group(p.proc.pid, signal.SIGCONT)
        self.frozen.clear()
