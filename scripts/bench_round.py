#!/usr/bin/env python3
"""One gossip round of 5 nodes (full mesh, ResNet-18-sized model), against its floor; with peak memory.

The measured round: 5 node processes, each with its own identity and certificate from one
federation, its own Outbox (embedded amqtt broker) on a free 127.0.0.1 port and a PeerLink to each
of the 4 others (certificates arrive over those links, as in the node). After all links are up,
every node at the same moment packs its parameters with the node's own round core
(`p2pfl.round.RoundCore.pack`: encode + seal for the 4 others), publishes with Outbox.publish_update,
receives the 4 updates through its links, admits each in a worker thread (`RoundCore.admit`: open,
round window, decode, check against the local spec, flatten in local order) and mixes the 5 vectors
(`RoundCore.mix`, rule "mean" on the full graph). Round time = common start -> the LAST node has
its mixed vector. No step of the round is re-implemented here.

The floor, in the same processes and the same run: the same sealed bytes moved over plain TCP
(persistent loopback connections, full mesh, blocking sockets in threads) with the identical
RoundCore pack / admit / mix calls, timed the same way. ratio = MQTT round / floor round.
Rounds of both kinds alternate so that machine noise hits both alike; one warm-up of each is
not counted.

Prints a table with per-phase timings (relative to the common start), then one JSON line (last).

    python scripts/bench_round.py [--rounds 4] [--profile] [--chunk-mib 4]
    python scripts/bench_round.py --model linear:10000x5000 --nodes 3 --topology ring --rounds 1

Memory: every node resets its peak RSS (VmHWM, /proc/self/clear_refs) before each round and reads
it after, so each round has its own per-node peak; the baseline is the node's RSS once it is idle
(imports, model, broker and links up, before any round). The table prints peak, baseline, and
(peak - baseline) as a multiple of the model's bytes, for the MQTT and the floor rounds, and the
RSS peak of each phase of the node's round (pack, publish, receive + admit, mix) from a 2 ms sampler.
--model linear:RxC is a torch nn.Linear(C, R) whose parameters go through learning.get_params /
set_params each round, as in node.py (the default resnet18 shapes are numpy arrays used as they are).

--profile adds one unmeasured MQTT round under cProfile (CPU time of each node's event-loop thread).
--zero-copy-decode / --switch-interval-ms are experiments that change the workers only (candidate
fixes, measured without touching p2pfl/); the JSON line records them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import logging
import multiprocessing as mp
import os
import pstats
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from bench_wire import resnet18_shapes  # same model shapes as the wire benchmark

N_NODES = 5  # the default; --nodes
HOST = "127.0.0.1"
MAX_BYTES = 1 << 30  # the node's default max_update_mb (1024)
SETUP_TIMEOUT_S = 60.0  # processes up, brokers listening, links connected
ROUND_TIMEOUT_S = 60.0  # one round, per node (a round takes 2-12 s on a busy 2-core machine)
COMMAND_TIMEOUT_S = 120.0  # a worker waiting for its next command
TOTAL_BUDGET_S = 210.0  # no new round starts after this (the script must end well under 5 minutes)
HARD_LIMIT_S = 250.0  # every wait of the coordinator ends by then; cleanup takes at most ~25 s more
TARGET_RATIO = 2.0
RSS_SAMPLE_S = 0.002  # the phase sampler's period
PAGE = os.sysconf("SC_PAGE_SIZE")
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# =============================================================================================
# worker (one node process)


class RoundTimeout(Exception):
    pass


def _status_kb(field: str) -> int:
    """One `field:  N kB` line of /proc/self/status (VmRSS, VmHWM), in kB."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(field.encode() + b":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Restart VmHWM from the current RSS (Linux: `echo 5 > /proc/PID/clear_refs`)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _big_mappings(min_rss: int = 16 << 20) -> list[tuple[str, float, float]]:
    """(name, size MB, resident MB) of every mapping of this process holding at least `min_rss`
    (from /proc/self/smaps): which buffers the resident memory is in."""
    out = []
    name, size = "", 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's first line: range, perms, ..., [path]
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                name, size = (head[5] if len(head) > 5 else "[anon]"), hi - lo
            elif head[0] == "Rss:" and int(head[1]) * 1024 >= min_rss:
                out.append((name, size / 1e6, int(head[1]) * 1024 / 1e6))
    return out


class PhaseSampler:
    """RSS every RSS_SAMPLE_S in a thread, keeping the peak of each phase the round names."""

    def __init__(self) -> None:
        self.phase = "idle"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            rss = int(os.pread(self._fd, 128, 0).split()[1]) * PAGE
            phase = self.phase
            if rss > self.peaks.get(phase, 0):
                self.peaks[phase] = rss

    def take(self) -> dict[str, int]:
        peaks, self.peaks = self.peaks, {}
        return peaks


def _recv_into(sock: socket.socket, buf: bytearray) -> float | None:
    """Fill `buf` from the socket; returns when its first part arrived (time.monotonic(); None for an
    empty buffer), which the round's timing needs and the plain reads ignore."""
    view = memoryview(buf)
    got = 0
    first: float | None = None
    while got < len(buf):
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("peer closed the connection")
        if got == 0:
            first = time.monotonic()
        got += k
    return first


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, buf)
    return bytes(buf)


class BenchNode:
    """What a Node does in one round, minus training: its own broker, 4 links, seal/open/mix."""

    def __init__(self, index: int, conn: Connection, setup: dict[str, Any]) -> None:
        import nacl.public
        import nacl.signing
        import numpy as np

        from p2pfl import codec
        from p2pfl.federation import Certificate, FederationRoot
        from p2pfl.identity import Identity
        from p2pfl.round import RoundCore
        from p2pfl.tls import NodeTls
        from p2pfl.topology import parse_topology

        self.index = index
        self.conn = conn
        self.identity = Identity(
            nacl.signing.SigningKey(setup["sign_seed"]), nacl.public.PrivateKey(setup["box_key"])
        )
        self.cert = Certificate.from_bytes(setup["cert"])
        self.root = FederationRoot(setup["root_key"])
        self.tls = NodeTls(self.identity, setup["tls_cert"], setup["tls_ca"])  # every session is mutual TLS
        self.fed = self.root.federation_id
        self.node_id = self.identity.node_id
        self.chunk_bytes = setup["chunk_bytes"]
        self.model: Any = None  # a torch module for --model linear:RxC, else numpy params as they are
        if setup["model"] == "resnet18":
            rng = np.random.default_rng(1000 + index)
            self.params = {
                name: rng.standard_normal(shape, dtype=np.float32)
                for name, shape in resnet18_shapes().items()
            }
        else:
            self.model = build_linear(setup["model"], seed=1000 + index)
            self.params = self._get_params()
        self.param_views = setup["param_views"]
        self.flat: Any = None  # the node's way (--param-views): the model in one buffer, own is a view
        if self.model is not None and self.param_views:
            from p2pfl.learning.params import share_one_buffer

            self.flat = share_one_buffer(self.model)
        self.core = RoundCore(
            identity=self.identity,
            cert=self.cert,
            root=self.root,
            topology=parse_topology(setup["topology"]),
            spec=codec.spec_of(self.params),
            samples=1000,
            rule=setup["rule"],
            max_update_bytes=MAX_BYTES,
        )
        if self.model is not None:
            self.params = None  # an idle node holds its model, not a copy (node.py: params per round)
        self.round_timeout_s = setup["round_timeout_s"]
        self.sampler = PhaseSampler()
        self.baseline_rss = 0
        self.plan: Any = None
        self.round = 0
        self.certs: dict[str, Certificate] = {self.node_id: self.cert}  # filled from the links
        self.others: list[str] = []
        self.links: dict[str, Any] = {}
        self.rejects: list[str] = []
        self.listener: socket.socket | None = None
        self.tcp_in: dict[str, socket.socket] = {}
        self.tcp_out: dict[str, socket.socket] = {}
        # per-round state
        self.vectors: dict[str, Any] = {}
        self.timing: dict[str, dict[str, float]] = {}
        self.errors: list[str] = []
        self.changed: asyncio.Event | None = None
        self.start_at = 0.0

    # -- shared per-round work (identical in both modes): the node's round core -----------------

    def _get_params(self) -> Any:
        from p2pfl.learning import params

        if getattr(self, "param_views", False):
            return params.param_views(self.model)
        return params.get_params(self.model)

    def pack_update(self) -> tuple[Any, float]:
        """Node._round's pack step: (get_params +) flatten + RoundCore.pack (encode + seal)."""
        self.sampler.phase = "pack"
        if self.model is not None:
            self.params = None  # node.py's params live in one _round frame: the last round's are gone
            self.params = self._get_params()  # node.py: params = get_params(self.model)
        if self.flat is not None:
            from p2pfl.learning.params import flat_view

            self.own = flat_view(self.flat)  # node.py: own is a view of the model's one buffer
        else:
            self.own = self.core.flatten(self.params)
        message = self.core.pack(self.params, self.own, self.plan)
        assert message is not None
        self.sampler.phase = "publish"
        return message, time.monotonic()

    def admit(self, publisher: str, message: Any, members: dict[str, Any], tm: dict[str, float]) -> Any:
        """Node._on_update's admit step: RoundCore.admit (open, checks, decode, flatten in local order)."""
        tm["admit0"] = time.monotonic()
        round_, neighbour = self.core.admit(publisher, message, members)
        tm["admitted"] = time.monotonic()
        return round_, neighbour

    def average(self) -> Any:
        """Node._round's mix step: RoundCore.mix (then set_params, as node.py does, for a torch model)."""
        from p2pfl.learning.params import set_params, unflatten

        self.sampler.phase = "mix"
        for round_, neighbour in self.vectors.values():
            self.core.accept(round_, neighbour, time.monotonic())
        self.vectors = {}
        result, staleness = self.core.mix(self.own, self.plan)
        if sorted(staleness) != sorted(self.plan.neighbours):
            raise RuntimeError(f"node {self.index}: mixed only {sorted(staleness)}")
        if self.model is not None:
            set_params(self.model, unflatten(result.vector, self.core.spec))
        self.own = None
        return result.vector

    def _begin_round(self, r: int, start_at: float) -> None:
        self.round = r
        self.plan = self.core.plan(r, self.certs)  # as Node._round: plan first, then train and pack
        self.start_at = start_at
        self.vectors = {}
        self.errors = []
        self.timing = {p: {} for p in self.plan.neighbours}
        self.expected = sorted(self.plan.neighbours)
        self.sampler.take()
        self.sampler.phase = "start"
        self.start_mappings = _big_mappings()  # what is resident as the round begins
        _reset_peak()

    def _result(
        self,
        t0: float,
        t_pack: float,
        t_pub: float,
        t_done: float,
        cpu: float,
        transport_cpu: float,
        message_len: int,
        mean: Any,
    ) -> dict[str, Any]:
        s = self.start_at
        self.sampler.phase = "idle"
        return {
            "peak_rss": _status_kb("VmHWM") * 1024,
            "baseline_rss": self.baseline_rss,
            "phase_rss": self.sampler.take(),
            "start_mappings": self.start_mappings,
            "node": self.index,
            "t0": t0 - s,
            "packed": t_pack - s,
            "published": t_pub - s,
            "done": t_done - s,
            "cpu_s": cpu,
            "transport_cpu_s": transport_cpu,
            "peers": {p: {k: v - s for k, v in tm.items()} for p, tm in self.timing.items()},
            "message_bytes": message_len,
            "bytes_sent": message_len * len(self.expected),
            "checksum": float(mean.sum(dtype="float64")),
            "rejects": list(self.rejects),
        }

    # -- MQTT mode --------------------------------------------------------------------------------

    def _on_certificate(self, publisher: str, data: bytes) -> None:
        from p2pfl.errors import Rejected
        from p2pfl.federation import Certificate

        if publisher == self.node_id:
            return
        try:
            cert = Certificate.from_bytes(data)
            self.root.verify(cert)
            if cert.node_id != publisher:
                self.rejects.append(f"certificate of {cert.node_id} published by {publisher}")
                return
        except Rejected as exc:
            self.rejects.append(f"certificate from {publisher}: {exc}")
            return
        self.certs[publisher] = cert
        assert self.changed is not None
        self.changed.set()

    async def _on_update(self, publisher: str, message: bytes) -> None:
        """Node._on_update: admit in a worker thread; the link waits meanwhile."""
        from p2pfl.errors import Rejected

        tm = self.timing.setdefault(publisher, {})
        tm["reassembled"] = time.monotonic()
        try:
            vector = await asyncio.to_thread(self.admit, publisher, message, dict(self.certs), tm)
        except Rejected as exc:
            self.rejects.append(f"update from {publisher}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - report, do not kill the link
            self.errors.append(f"admit {publisher}: {exc!r}")
            return
        self.vectors[publisher] = vector
        assert self.changed is not None
        self.changed.set()

    def _make_link(self, port: int, expected: str) -> Any:
        from p2pfl.tls import peer_node_id
        from p2pfl.transport import PeerLink

        node = self

        class TimedLink(PeerLink):
            """PeerLink that notes when the first / last part of each update arrives (no other change)."""

            async def _dispatch(self, topic: str, payload: Any) -> None:
                levels = topic.split("/")
                if len(levels) == 6 and levels[3] == "to" and payload:
                    tm = node.timing.setdefault(levels[2], {})
                    now = time.monotonic()
                    tm.setdefault("first_part", now)
                    tm["last_part"] = now
                await super()._dispatch(topic, payload)

        return TimedLink(
            HOST,
            port,
            self.fed,
            self.node_id,
            tls_context=self.tls.client_context(),
            identify=lambda ssl_object: peer_node_id(ssl_object, self.root),
            expected=expected,
            on_certificate=self._on_certificate,
            on_update=self._on_update,
            on_reject=lambda reason, detail: self.rejects.append(f"{reason.value}: {detail}"),
            max_message_bytes=MAX_BYTES,
        )

    async def mqtt_round(self, r: int, start_at: float, profile_path: str | None) -> dict[str, Any]:
        self._begin_round(r, start_at)
        assert self.changed is not None
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        # CPU time of this (event-loop) thread, so waiting in epoll or for the GIL/cores does not count
        prof = cProfile.Profile(time.thread_time) if profile_path else None
        t0, cpu0, lcpu0 = time.monotonic(), time.process_time(), time.thread_time()
        if prof is not None:
            prof.enable()
        message, t_pack = await asyncio.to_thread(self.pack_update)
        await self.outbox.publish_update(message, self.expected)
        self.sampler.phase = "receive+admit"
        t_pub = time.monotonic()
        deadline = t0 + self.round_timeout_s
        while len(self.vectors) < len(self.expected):
            if self.errors:
                raise RuntimeError("; ".join(self.errors))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RoundTimeout(
                    f"node {self.index}: {len(self.vectors)}/{len(self.expected)} updates "
                    f"after {self.round_timeout_s:.0f} s; rejects: {self.rejects[-5:]}"
                )
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=min(remaining, 1.0))
        mean = await asyncio.to_thread(self.average)
        t_done = time.monotonic()
        cpu, lcpu = time.process_time() - cpu0, time.thread_time() - lcpu0
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile_path)
        return self._result(t0, t_pack, t_pub, t_done, cpu, lcpu, len(message), mean)

    # -- floor mode: same bytes and calls over raw TCP ---------------------------------------------

    def _setup_tcp(self, table: list[dict[str, Any]]) -> None:
        """Persistent full mesh: one outgoing connection to each other node, one incoming from each."""
        assert self.listener is not None
        others = [row for row in table if row["node_id"] != self.node_id]
        accepted: dict[str, socket.socket] = {}
        failure: list[BaseException] = []

        def accept_all() -> None:
            try:
                self.listener.settimeout(SETUP_TIMEOUT_S / 2)
                while len(accepted) < len(others):
                    sock, _ = self.listener.accept()
                    sock.settimeout(self.round_timeout_s)
                    hello = _recv_exact(sock, 16).decode("ascii")
                    accepted[hello] = sock
            except BaseException as exc:  # noqa: BLE001 - reported below
                failure.append(exc)

        acceptor = threading.Thread(target=accept_all, daemon=True)
        acceptor.start()
        for row in others:
            sock = socket.create_connection((HOST, row["tcp_port"]), timeout=SETUP_TIMEOUT_S / 2)
            sock.settimeout(self.round_timeout_s)
            sock.sendall(self.node_id.encode("ascii"))
            self.tcp_out[row["node_id"]] = sock
        acceptor.join(SETUP_TIMEOUT_S / 2 + 1)
        if failure or acceptor.is_alive() or set(accepted) != set(self.others):
            raise RuntimeError(f"TCP mesh setup failed: {failure or sorted(accepted)}")
        self.tcp_in = accepted

    def floor_round(self, r: int, start_at: float) -> dict[str, Any]:
        """Blocking; runs in a worker thread while the event loop idles."""
        self._begin_round(r, start_at)
        members = dict(self.certs)
        time.sleep(max(0.0, start_at - time.monotonic()))
        t0, cpu0 = time.monotonic(), time.process_time()
        lock = threading.Lock()
        transport_cpu = [0.0]  # CPU of the send/receive threads, admit excluded

        def receive(publisher: str, sock: socket.socket) -> None:
            tm = self.timing[publisher]
            c0 = time.thread_time()
            try:
                (n,) = struct.unpack("<Q", _recv_exact(sock, 8))
                if n > MAX_BYTES:
                    raise ValueError(f"{n} bytes announced")
                buf = bytearray(n)
                first = _recv_into(sock, buf)
                if first is not None:
                    tm["first_part"] = first
                tm["reassembled"] = tm["last_part"] = time.monotonic()
                with lock:
                    transport_cpu[0] += time.thread_time() - c0
                vector = self.admit(publisher, buf, members, tm)
                with lock:
                    self.vectors[publisher] = vector
            except BaseException as exc:  # noqa: BLE001 - reported by the round
                with lock:
                    self.errors.append(f"receive from {publisher}: {exc!r}")

        def send(peer: str, sock: socket.socket, message: bytes) -> None:
            c0 = time.thread_time()
            try:
                sock.sendall(struct.pack("<Q", len(message)))
                sock.sendall(message)
            except BaseException as exc:  # noqa: BLE001
                with lock:
                    self.errors.append(f"send to {peer}: {exc!r}")
            with lock:
                transport_cpu[0] += time.thread_time() - c0

        receivers = [
            threading.Thread(target=receive, args=(p, self.tcp_in[p]), daemon=True) for p in self.expected
        ]
        for t in receivers:
            t.start()
        message, t_pack = self.pack_update()
        senders = [
            threading.Thread(target=send, args=(p, self.tcp_out[p], message), daemon=True)
            for p in self.expected
        ]
        for t in senders:
            t.start()
        self.sampler.phase = "receive+admit"
        deadline = t0 + self.round_timeout_s
        for t in senders:
            t.join(max(0.0, deadline - time.monotonic()))
        t_pub = time.monotonic()  # every byte handed to the kernel
        for t in receivers:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in senders + receivers):
            raise RoundTimeout(
                f"node {self.index}: floor round not finished after {self.round_timeout_s:.0f} s"
            )
        if self.errors or len(self.vectors) != len(self.expected):
            raise RuntimeError(f"node {self.index}: floor round failed: {self.errors}")
        mean = self.average()
        t_done = time.monotonic()
        cpu = time.process_time() - cpu0
        return self._result(t0, t_pack, t_pub, t_done, cpu, transport_cpu[0], len(message), mean)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def _recv(self, timeout: float) -> Any:
        def blocking() -> Any:
            if not self.conn.poll(timeout):
                raise TimeoutError(f"node {self.index}: no command from the coordinator in {timeout:.0f} s")
            return self.conn.recv()

        return await asyncio.to_thread(blocking)

    async def main(self) -> None:
        from p2pfl.tls import peer_node_id
        from p2pfl.transport import Outbox

        self.changed = asyncio.Event()
        self.outbox = Outbox(
            HOST,
            0,
            self.fed,
            self.node_id,
            ssl_context=self.tls.server_context(),
            verify=lambda ssl_object: peer_node_id(ssl_object, self.root),
            on_reject=lambda reason, detail: self.rejects.append(f"broker {reason.value}: {detail}"),
            chunk_bytes=self.chunk_bytes,
        )
        await self.outbox.start()
        try:
            await self.outbox.publish_certificate(self.cert.to_bytes())
            self.listener = socket.create_server((HOST, 0))
            self.conn.send(
                (
                    "ports",
                    self.index,
                    {
                        "node_id": self.node_id,
                        "mqtt_port": self.outbox.port,
                        "tcp_port": self.listener.getsockname()[1],
                    },
                )
            )
            kind, table = await self._recv(SETUP_TIMEOUT_S)
            assert kind == "peers"
            self.others = sorted(row["node_id"] for row in table if row["node_id"] != self.node_id)
            for row in table:
                if row["node_id"] != self.node_id:
                    link = self._make_link(row["mqtt_port"], row["node_id"])
                    self.links[row["node_id"]] = link
                    await link.start()
            await asyncio.to_thread(self._setup_tcp, table)
            # barrier, our half: every link connected and subscribed, every certificate checked
            deadline = time.monotonic() + SETUP_TIMEOUT_S
            while not (
                all(link.connected for link in self.links.values())
                and all(n in self.certs for n in self.others)
            ):
                if time.monotonic() > deadline:
                    raise RoundTimeout(f"node {self.index}: links not ready; rejects {self.rejects[-5:]}")
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), timeout=0.1)
            self.baseline_rss = _status_kb("VmRSS") * 1024  # idle: imports, model, broker, links
            self.conn.send(("ready", self.index, None))
            while True:
                cmd = await self._recv(COMMAND_TIMEOUT_S)
                if cmd[0] == "stop":
                    # links first, and only then (once every node has dropped its links) the broker,
                    # so no link sees its broker vanish under it
                    await asyncio.gather(
                        *(link.stop() for link in self.links.values()), return_exceptions=True
                    )
                    self.conn.send(("stopped", self.index, None))
                    with contextlib.suppress(TimeoutError, EOFError, OSError):
                        await self._recv(15.0)
                    break
                _, mode, r, start_at, profile_path = cmd
                if mode == "mqtt":
                    result = await self.mqtt_round(r, start_at, profile_path)
                else:
                    result = await asyncio.to_thread(self.floor_round, r, start_at)
                self.conn.send(("done", self.index, result))
        finally:
            await asyncio.gather(*(link.stop() for link in self.links.values()), return_exceptions=True)
            await self.outbox.stop()
            for sock in [self.listener, *self.tcp_in.values(), *self.tcp_out.values()]:
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()


def _install_zero_copy_publish_decoder() -> None:
    """Experiment (--zero-copy-decode), in this worker only: a candidate fix for transport.py.

    paho's decode_publish splits a PUBLISH with struct.unpack("!H{n}s") three times (topic length,
    topic, packet id), copying the whole payload each time. For MQTT 3.1.1 the payload is the tail of
    the packet bytearray paho has just read (and replaces afterwards), so dropping the header in
    place (`del packet[:pos]`, O(1) at the front of a bytearray) hands it over with no copy.
    """
    from paho.mqtt import _packet
    from paho.mqtt.enums import MQTTProtocolVersion

    original = _packet.decode_publish

    def decode_publish(header: int, packet: Any, protocol: Any) -> Any:
        if protocol == MQTTProtocolVersion.MQTTv5 or not isinstance(packet, bytearray):
            return original(header, packet, protocol)
        qos = (header & 0x06) >> 1
        if len(packet) < 2:
            raise _packet.MalformedPacket("PUBLISH shorter than its topic length")
        slen = int.from_bytes(packet[:2], "big")
        pos = 2 + slen + (2 if qos > 0 else 0)
        if slen == 0 or pos > len(packet):
            raise _packet.MalformedPacket("bad PUBLISH topic length")
        topic = bytes(packet[2 : 2 + slen])
        mid = int.from_bytes(packet[pos - 2 : pos], "big") if qos > 0 else 0
        del packet[:pos]
        return _packet.PublishPacket(
            dup=bool(header & 0x08),
            qos=qos,
            retain=bool(header & 0x01),
            topic=topic,
            mid=mid,
            properties=None,
            payload=packet,
        )

    _packet.decode_publish = decode_publish


def linear_shape(model: str) -> tuple[int, int]:
    """(rows, cols) of --model linear:RxC."""
    kind, _, dims = model.partition(":")
    rows, _, cols = dims.partition("x")
    if kind != "linear" or not rows.isdigit() or not cols.isdigit() or int(rows) < 1 or int(cols) < 1:
        raise ValueError(f"--model must be resnet18 or linear:ROWSxCOLS, got {model!r}")
    return int(rows), int(cols)


def model_shapes(model: str) -> dict[str, tuple[int, ...]]:
    if model == "resnet18":
        return resnet18_shapes()
    rows, cols = linear_shape(model)
    return {"weight": (rows, cols), "bias": (rows,)}


def build_linear(model: str, seed: int) -> Any:
    """torch nn.Linear(cols, rows), seeded: the model a node trains, read through get_params."""
    import torch

    rows, cols = linear_shape(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        return torch.nn.Linear(cols, rows)


def worker_entry(index: int, conn: Connection, setup: dict[str, Any]) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"node{index} %(levelname)s %(name)s: %(message)s")
    if setup.get("switch_interval_ms"):
        sys.setswitchinterval(setup["switch_interval_ms"] / 1000)
    if setup.get("zero_copy_decode"):
        _install_zero_copy_publish_decoder()
    try:
        asyncio.run(BenchNode(index, conn, setup).main())
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", index, traceback.format_exc()))
        raise
    finally:
        conn.close()


# =============================================================================================
# coordinator


class Coordinator:
    def __init__(self, args: argparse.Namespace, tmp: Path, began: float) -> None:
        self.hard_deadline = began + args.budget_s + (HARD_LIMIT_S - TOTAL_BUDGET_S)
        self.n = args.nodes
        self.args = args
        self.tmp = tmp
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []

    def start(self) -> None:
        from p2pfl.federation import FederationAuthority
        from p2pfl.identity import Identity

        auth = FederationAuthority.create(self.tmp / "fed")
        ctx = mp.get_context("spawn")
        for i in range(self.n):
            ident = Identity.generate()
            cert = auth.issue(f"n{i}", ident.verify_key_bytes, ident.box_public_bytes, ttl_s=3600)
            setup = {
                "sign_seed": bytes(ident.signing_key),
                "box_key": bytes(ident.box_key),
                "cert": cert.to_bytes(),
                "root_key": auth.root.public_key,
                "tls_cert": auth.x509_pem(cert),
                "tls_ca": auth.ca_pem,
                "chunk_bytes": int(self.args.chunk_mib * (1 << 20)),
                "switch_interval_ms": self.args.switch_interval_ms,
                "zero_copy_decode": self.args.zero_copy_decode,
                "model": self.args.model,
                "topology": self.args.topology,
                "rule": self.args.rule,
                "round_timeout_s": self.args.round_timeout,
                "param_views": self.args.param_views,
            }
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_entry, args=(i, child, setup), name=f"bench-node{i}", daemon=True
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def collect(self, kind: str, timeout: float) -> list[Any]:
        """One `kind` message from every worker, or raise (worker error, death or timeout)."""
        got: dict[int, Any] = {}
        deadline = min(time.monotonic() + timeout, self.hard_deadline)
        while len(got) < self.n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"waiting for {kind!r}: only nodes {sorted(got)} answered in {timeout:.0f} s"
                )
            pending = [c for i, c in enumerate(self.conns) if i not in got]
            for conn in wait(pending, timeout=min(remaining, 1.0)):
                try:
                    msg = conn.recv()
                except EOFError:
                    i = self.conns.index(conn)
                    raise RuntimeError(f"node {i} exited (code {self.procs[i].exitcode})") from None
                if msg[0] == "error":
                    raise RuntimeError(f"node {msg[1]} failed:\n{msg[2]}")
                if msg[0] != kind:
                    raise RuntimeError(f"node {msg[1]} sent {msg[0]!r}, expected {kind!r}")
                got[msg[1]] = msg[2]
            for i, proc in enumerate(self.procs):
                if i not in got and not proc.is_alive():
                    raise RuntimeError(f"node {i} died (exit code {proc.exitcode})")
        return [got[i] for i in range(self.n)]

    def send_all(self, msg: Any) -> None:
        for conn in self.conns:
            conn.send(msg)

    def round(self, mode: str, r: int, profile: bool = False) -> list[dict[str, Any]]:
        start_at = time.monotonic() + 0.3
        for i, conn in enumerate(self.conns):
            path = str(self.tmp / f"prof-{mode}-{r}-{i}.pstats") if profile else None
            conn.send(("round", mode, r, start_at, path))
        results = self.collect("done", self.args.round_timeout + 10)
        sums = [res["checksum"] for res in results]
        # every node ends with the same mean only where every node hears every other
        complete = self.args.topology == "full" or (self.args.topology == "ring" and self.n <= 3)
        if complete and max(sums) - min(sums) > 1e-3 * max(1.0, abs(sums[0])):
            raise RuntimeError(f"{mode} round {r}: nodes disagree on the mean ({sums})")
        rejects = [rej for res in results for rej in res["rejects"]]
        if rejects:
            print(f"warning: rejections so far: {rejects[:5]}", file=sys.stderr)
        return results

    def stop(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.send(("stop",))
        self.hard_deadline = time.monotonic() + 10
        with contextlib.suppress(Exception):
            self.collect("stopped", 10)
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.send(("exit",))
        for grace, end in ((8.0, None), (3.0, "terminate"), (2.0, "kill")):
            alive = [p for p in self.procs if p.is_alive()]
            if end is not None:
                for proc in alive:
                    getattr(proc, end)()
            deadline = time.monotonic() + grace
            for proc in alive:
                proc.join(max(0.05, deadline - time.monotonic()))
        for conn in self.conns:
            conn.close()


# ---------------------------------------------------------------------------------------------
# summary


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def phase_table(rounds: list[list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per phase: median over rounds of (median over nodes, max over nodes), seconds."""

    def per_node(res: dict[str, Any]) -> dict[str, float]:
        peers = list(res["peers"].values())
        out = {
            "pack_end": res["packed"],
            "publish_end": res["published"],
            "first_part_in": min(p["first_part"] for p in peers),
            "all_received": max(p["reassembled"] for p in peers),
            "all_admitted": max(p["admitted"] for p in peers),
            "done": res["done"],
            # durations
            "pack_s": res["packed"] - res["t0"],
            "transfer_per_msg_s": _med([p["reassembled"] - p["first_part"] for p in peers]),
            "queue_before_admit_s": _med([p["admit0"] - p["reassembled"] for p in peers]),
            "admit_sum_s": sum(p["admitted"] - p["admit0"] for p in peers),
            "mix_s": res["done"] - max(p["admitted"] for p in peers),
            "cpu_s": res["cpu_s"],
            "transport_cpu_s": res["transport_cpu_s"],
        }
        return out

    table: dict[str, dict[str, float]] = {}
    per_round = [[per_node(res) for res in rnd] for rnd in rounds]
    for key in per_round[0][0]:
        table[key] = {
            "node_median": _med([_med([n[key] for n in rnd]) for rnd in per_round]),
            "node_max": _med([max(n[key] for n in rnd) for rnd in per_round]),
            "all_nodes_sum": _med([sum(n[key] for n in rnd) for rnd in per_round]),
        }
    return table


def memory_table(measured: dict[str, list[list[dict[str, Any]]]], model_bytes: int) -> dict[str, Any]:
    """Per node: idle baseline, peak RSS of its MQTT / floor rounds, (peak - baseline) / model."""
    nodes = []
    for i in range(len(measured["mqtt"][0])):
        base = measured["mqtt"][0][i]["baseline_rss"]
        row: dict[str, Any] = {"node": i, "baseline_mb": base / 1e6}
        for mode in ("mqtt", "floor"):
            peak = max(rnd[i]["peak_rss"] for rnd in measured[mode])
            row[f"{mode}_peak_mb"] = peak / 1e6
            row[f"{mode}_x_model"] = (peak - base) / model_bytes
        nodes.append(row)
    out: dict[str, Any] = {"nodes": nodes, "phases_x_model": {}}
    for mode in ("mqtt", "floor"):
        out[f"{mode}_peak_mb_max"] = max(r[f"{mode}_peak_mb"] for r in nodes)
        out[f"{mode}_x_model_max"] = max(r[f"{mode}_x_model"] for r in nodes)
        phases: dict[str, float] = {}
        for rnd in measured[mode]:
            for res in rnd:
                for phase, rss in res["phase_rss"].items():
                    x = (rss - res["baseline_rss"]) / model_bytes
                    phases[phase] = round(max(phases.get(phase, x), x), 2)
        out["phases_x_model"][mode] = phases
    return out


def top_profile(paths: list[str], limit: int = 25) -> list[dict[str, Any]]:
    stats = pstats.Stats(paths[0], stream=io.StringIO())
    for path in paths[1:]:
        stats.add(path)
    rows = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        short = "/".join(Path(filename).parts[-2:]) if filename != "~" else "~"
        rows.append(
            {
                "func": f"{short}:{line}({func})",
                "calls": ncalls,
                "tottime_s": round(tottime, 4),
                "cumtime_s": round(cumtime, 4),
            }
        )
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    return rows[:limit]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="measured rounds of each kind (plus 1 warm-up)")
    ap.add_argument("--chunk-mib", type=float, default=4.0, help="Outbox chunk_bytes (transport default: 4)")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after the measured rounds, run one extra MQTT round under cProfile (CPU time of "
        "the event-loop thread of every node) and print the top functions",
    )
    ap.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="experiment: sys.setswitchinterval in every node (Python's default is 5 ms)",
    )
    ap.add_argument(
        "--zero-copy-decode",
        action="store_true",
        help="experiment: replace paho's copying PUBLISH decoder in every node (see "
        "_install_zero_copy_publish_decoder)",
    )
    ap.add_argument("--nodes", type=int, default=N_NODES, help="node processes (default 5)")
    ap.add_argument("--topology", default="full", help="full (default) or ring, or any built-in topology")
    ap.add_argument("--rule", default="mean", help="aggregation rule of every node (default mean)")
    ap.add_argument(
        "--model",
        default="resnet18",
        help="resnet18 (numpy, 46.8 MB; default) or linear:ROWSxCOLS (a torch nn.Linear, e.g. "
        "linear:10000x5000 = 200 MB)",
    )
    ap.add_argument(
        "--param-views",
        action="store_true",
        help="with --model linear: the node's way: the model in one buffer (share_one_buffer), its "
        "own vector a view of it and its tensors read through param_views (no copy), instead of "
        "get_params + flatten (two copies)",
    )
    ap.add_argument("--round-timeout", type=float, default=ROUND_TIMEOUT_S, help="seconds per round")
    ap.add_argument(
        "--budget-s", type=float, default=TOTAL_BUDGET_S, help="no new round starts after this (s)"
    )
    args = ap.parse_args()
    if not 1 <= args.rounds <= 20:
        ap.error("--rounds must be 1..20")
    if not 2 <= args.nodes <= 32:
        ap.error("--nodes must be 2..32")
    try:
        shapes = model_shapes(args.model)
    except ValueError as exc:
        ap.error(str(exc))
    for name in _THREAD_ENV:
        os.environ[name] = "1"  # the spawned workers inherit it before importing numpy

    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_round-") as tmpdir:
        coord = Coordinator(args, Path(tmpdir), began)
        try:
            coord.start()
            ports = coord.collect("ports", SETUP_TIMEOUT_S)
            coord.send_all(("peers", ports))
            coord.collect("ready", SETUP_TIMEOUT_S)
            setup_s = time.monotonic() - began
            print(f"{args.nodes} nodes up, links connected in {setup_s:.1f} s", file=sys.stderr)

            schedule = [("mqtt", True), ("floor", True)]  # warm-ups
            for k in range(args.rounds):
                schedule += (
                    [("mqtt", False), ("floor", False)] if k % 2 == 0 else [("floor", False), ("mqtt", False)]
                )
            measured: dict[str, list[list[dict[str, Any]]]] = {"mqtt": [], "floor": []}
            longest = 0.0
            truncated = False
            r = 0
            for mode, warmup in schedule:
                if time.monotonic() - began + 2 * longest + 5 > args.budget_s:
                    truncated = True
                    print("time budget reached; stopping early", file=sys.stderr)
                    break
                r += 1
                t = time.monotonic()
                results = coord.round(mode, r)
                longest = max(longest, time.monotonic() - t)
                round_s = max(res["done"] for res in results)
                print(
                    f"round {r:2d} {mode:5s}{' (warm-up)' if warmup else ''}: {round_s:.3f} s",
                    file=sys.stderr,
                )
                if not warmup:
                    measured[mode].append(results)
            profile_rows: list[dict[str, Any]] = []
            if args.profile and not truncated and time.monotonic() - began + 2 * longest + 5 < args.budget_s:
                r += 1
                results = coord.round("mqtt", r, profile=True)
                print(
                    f"round {r:2d} mqtt  (cProfile): {max(res['done'] for res in results):.3f} s",
                    file=sys.stderr,
                )
                paths = [str(Path(tmpdir) / f"prof-mqtt-{r}-{i}.pstats") for i in range(args.nodes)]
                profile_rows = top_profile([p for p in paths if Path(p).exists()])
        finally:
            coord.stop()

    if not measured["mqtt"] or not measured["floor"]:
        print(json.dumps({"nodes": args.nodes, "error": "no measured rounds"}))
        return 1
    mq = [max(res["done"] for res in rnd) for rnd in measured["mqtt"]]
    fl = [max(res["done"] for res in rnd) for rnd in measured["floor"]]
    first = measured["mqtt"][0][0]
    n_params = sum(int(_prod(s)) for s in shapes.values())
    model_bytes = n_params * 4
    phases = {"mqtt": phase_table(measured["mqtt"]), "floor": phase_table(measured["floor"])}
    ratio = _med(mq) / _med(fl)

    from p2pfl import envelope

    print()
    print(
        f"{args.nodes} nodes, topology {args.topology}, rule {args.rule} on {HOST}; model {args.model}"
        f"{' (param_views)' if args.param_views else ''}: "
        f"{n_params:,} float32 params in {len(shapes)} "
        f"tensors ({model_bytes / 1e6:.1f} MB); sealed message {first['message_bytes'] / 1e6:.1f} MB; "
        f"sent per node per round {first['bytes_sent'] / 1e6:.1f} MB"
    )
    print(
        f"AEAD {envelope.DEFAULT_AEAD}, Outbox chunk {args.chunk_mib:g} MiB, {os.cpu_count()} CPUs, "
        f"{len(mq)} measured rounds of each kind"
    )
    if args.switch_interval_ms or args.zero_copy_decode:
        print(
            f"EXPERIMENT: switch interval {args.switch_interval_ms or 1000 * sys.getswitchinterval():g} ms, "
            f"zero-copy PUBLISH decode {'on' if args.zero_copy_decode else 'off'}"
        )
    print()
    print(f"{'':<22}{'median s':>10}{'min s':>10}   rounds")
    print(f"{'MQTT round':<22}{_med(mq):>10.3f}{min(mq):>10.3f}   {' '.join(f'{x:.3f}' for x in mq)}")
    print(f"{'floor (raw TCP)':<22}{_med(fl):>10.3f}{min(fl):>10.3f}   {' '.join(f'{x:.3f}' for x in fl)}")
    print(
        f"{'ratio':<22}{ratio:>10.2f}{min(mq) / min(fl):>10.2f}   "
        f"(target <= {TARGET_RATIO:g}: {'met' if ratio <= TARGET_RATIO else 'MISSED'})"
    )
    print()
    print(
        "phases (s; times are since the common start; median over rounds of the node median / node max;"
        " 'sum' = all 5 nodes)"
    )
    print(f"{'phase':<22}{'mqtt med':>10}{'mqtt max':>10}{'floor med':>11}{'floor max':>11}")
    for key in phases["mqtt"]:
        m, f = phases["mqtt"][key], phases["floor"][key]
        print(
            f"{key:<22}{m['node_median']:>10.3f}{m['node_max']:>10.3f}{f['node_median']:>11.3f}{f['node_max']:>11.3f}"
        )
    print(
        "  publish_end: MQTT = publish_update returned (parts queued in the broker); floor = every sendall done."
        "\n  first_part_in / all_received: first byte / last part of the 4 updates; transfer_per_msg_s: first"
        " to last part\n  of one update; admit_sum_s: the 4 RoundCore.admit calls"
        " (wall, concurrent);\n  mix_s: last admit -> mixed vector."
    )
    cpu_m, cpu_f = phases["mqtt"]["cpu_s"]["all_nodes_sum"], phases["floor"]["cpu_s"]["all_nodes_sum"]
    tr_m, tr_f = (
        phases["mqtt"]["transport_cpu_s"]["all_nodes_sum"],
        phases["floor"]["transport_cpu_s"]["all_nodes_sum"],
    )
    print(f"{'CPU s, all nodes':<22}{cpu_m:>10.3f}{'':>10}{cpu_f:>11.3f}   (ratio {cpu_m / cpu_f:.2f})")
    print(f"{'transport CPU s, all':<22}{tr_m:>10.3f}{'':>10}{tr_f:>11.3f}")
    print("  (transport CPU: MQTT = event-loop thread, i.e. publish_update, broker sends, paho reads,")
    print("   reassembly; floor = send/receive threads, admit excluded. Crypto/codec run in other threads.)")
    memory = memory_table(measured, model_bytes)
    print()
    print(
        f"peak RSS per node (MB; max over measured rounds), beside its idle baseline; x model = "
        f"(peak - baseline) / {model_bytes / 1e6:.1f} MB"
    )
    print(f"{'node':<6}{'baseline':>10}{'mqtt peak':>11}{'x model':>9}{'floor peak':>12}{'x model':>9}")
    for row in memory["nodes"]:
        print(
            f"{row['node']:<6}{row['baseline_mb']:>10.0f}{row['mqtt_peak_mb']:>11.0f}{row['mqtt_x_model']:>9.2f}"
            f"{row['floor_peak_mb']:>12.0f}{row['floor_x_model']:>9.2f}"
        )
    last = measured["mqtt"][-1][0]
    print(
        "node 0's mappings of 16 MB or more resident as its last MQTT round began (name, size MB, RSS MB): "
        + "; ".join(f"{n} {s:.0f}/{r:.0f}" for n, s, r in last["start_mappings"])
    )
    print("phase peaks, max over nodes and rounds, (RSS - baseline) / model:")
    for mode in ("mqtt", "floor"):
        cells = "  ".join(f"{k} {v:.2f}" for k, v in memory["phases_x_model"][mode].items())
        print(f"  {mode:<6}{cells}")
    if profile_rows:
        print()
        print(
            f"cProfile (thread CPU time), event-loop threads of all {args.nodes} nodes, one MQTT round, top by own time:"
        )
        print(f"{'tottime s':>10}{'cumtime s':>10}{'calls':>9}  function")
        for row in profile_rows:
            print(f"{row['tottime_s']:>10.3f}{row['cumtime_s']:>10.3f}{row['calls']:>9}  {row['func']}")
    result = {
        "nodes": args.nodes,
        "topology": args.topology,
        "rule": args.rule,
        "model": args.model,
        "param_views": args.param_views,
        "params": n_params,
        "tensors": len(shapes),
        "model_bytes": model_bytes,
        "message_bytes": first["message_bytes"],
        "bytes_sent_per_node": first["bytes_sent"],
        "rounds": len(mq),
        "round_s_median": round(_med(mq), 4),
        "round_s_min": round(min(mq), 4),
        "floor_s_median": round(_med(fl), 4),
        "floor_s_min": round(min(fl), 4),
        "ratio": round(ratio, 3),
        "ratio_min": round(min(mq) / min(fl), 3),
        "target_ratio": TARGET_RATIO,
        "within_target": ratio <= TARGET_RATIO,
        "cpu_ratio": round(cpu_m / cpu_f, 3),  # steadier than the wall ratio on a shared machine
        "cpu_s_all_nodes_mqtt": round(cpu_m, 3),
        "cpu_s_all_nodes_floor": round(cpu_f, 3),
        "transport_cpu_s_all_nodes_mqtt": round(tr_m, 3),
        "transport_cpu_s_all_nodes_floor": round(tr_f, 3),
        "phases_node_max_s": {
            mode: {k: round(v["node_max"], 4) for k, v in t.items()} for mode, t in phases.items()
        },
        "aead": envelope.DEFAULT_AEAD,
        "chunk_bytes": int(args.chunk_mib * (1 << 20)),
        "cpus": os.cpu_count(),
        "switch_interval_ms": args.switch_interval_ms or 1000 * sys.getswitchinterval(),
        "zero_copy_decode": args.zero_copy_decode,
        "peak_rss_mb_max": {m: round(memory[f"{m}_peak_mb_max"], 1) for m in ("mqtt", "floor")},
        "baseline_rss_mb_max": round(max(r["baseline_mb"] for r in memory["nodes"]), 1),
        "peak_x_model_max": {m: round(memory[f"{m}_x_model_max"], 3) for m in ("mqtt", "floor")},
        "phases_x_model": memory["phases_x_model"],
        "truncated": truncated,
        "wall_s": round(time.monotonic() - began, 1),
    }
    if profile_rows:
        result["profile_top"] = [f"{r['func']} {r['tottime_s']}" for r in profile_rows[:10]]
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    sys.exit(main())
