#!/usr/bin/env python3
"""Broker throughput: one update (default 45 MiB) from an Outbox to 4 subscribed PeerLinks on loopback.

Everything runs in one process and one event loop, as in a node: the owner's embedded amqtt broker
(split into retained parts, one copy per recipient) and the links that rebuild the message. The
baseline, measured in the same run, sends the same bytes over raw loopback TCP (blocking sockets:
one sender thread writes to each receiver in turn, receiver threads read into preallocated
buffers), so the ratio shows what MQTT framing, the broker and the reassembly cost on top of
moving the bytes (the MQTT sessions are mutual TLS, as in a node, so that includes encryption; the
baseline is plain TCP). Each figure is the time from the start of the publish
until the last receiver holds the whole message; medians over the reps are printed, then one JSON
line (the last line).

    python scripts/bench_broker.py [--mib 45] [--subscribers 4] [--reps 3] [--chunk-mib 4]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from p2pfl.errors import Reason
from p2pfl.federation import FederationAuthority
from p2pfl.identity import Identity
from p2pfl.tls import NodeTls, peer_node_id
from p2pfl.transport import Outbox, PeerLink

HOST = "127.0.0.1"
TTL_S = 3600.0


class Receiver:
    """One link's sink: records when each whole update arrived."""

    def __init__(self) -> None:
        self.updates: list[bytes] = []
        self.arrived: list[float] = []
        self.rejects: list[str] = []

    def on_certificate(self, node: str, data: bytes) -> None:
        pass

    async def on_update(self, node: str, message: bytes) -> None:
        self.arrived.append(time.perf_counter())
        self.updates.append(message)

    def on_reject(self, reason: Reason, detail: str) -> None:
        self.rejects.append(f"{reason.value}: {detail}")


def make_members(directory: Path, n: int) -> tuple[FederationAuthority, list[NodeTls]]:
    """Certified members with their TLS credentials (every MQTT session is mutual TLS)."""
    authority = FederationAuthority.create(directory)
    members = []
    for i in range(n):
        ident = Identity.generate()
        cert = authority.issue(f"n{i}", ident.verify_key_bytes, ident.box_public_bytes, TTL_S)
        members.append(NodeTls(ident, authority.x509_pem(cert), authority.ca_pem))
    return authority, members


def all_received(sinks: list[Receiver], count: int) -> bool:
    return all(len(s.updates) >= count for s in sinks)


async def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def bench_mqtt(
    directory: Path, size: int, subscribers: int, reps: int, chunk_bytes: int
) -> list[float]:
    authority, (owner, *subs) = make_members(directory, subscribers + 1)
    root = authority.root
    outbox = Outbox(
        HOST,
        0,
        root.federation_id,
        owner.node_id,
        ssl_context=owner.server_context(),
        verify=functools.partial(peer_node_id, root=root),
        on_reject=lambda reason, detail: print(f"broker refused: {reason.value}: {detail}", file=sys.stderr),
        chunk_bytes=chunk_bytes,
    )
    await outbox.start()
    sinks = [Receiver() for _ in subs]
    links = [
        PeerLink(
            HOST,
            outbox.port,
            root.federation_id,
            member.node_id,
            tls_context=member.client_context(),
            identify=functools.partial(peer_node_id, root=root),
            on_certificate=sink.on_certificate,
            on_update=sink.on_update,
            on_reject=sink.on_reject,
            max_message_bytes=size + (1 << 20),
        )
        for member, sink in zip(subs, sinks, strict=True)
    ]
    times = []
    try:
        for link in links:
            await link.start()
        await wait_until(lambda: all(link.connected for link in links), 30, "links")
        await asyncio.sleep(0.3)  # let the subscriptions settle
        recipients = [member.node_id for member in subs]
        for rep in range(reps):
            message = os.urandom(size)
            t0 = time.perf_counter()
            await outbox.publish_update(message, recipients)
            await wait_until(functools.partial(all_received, sinks, rep + 1), 120, "update")
            times.append(max(s.arrived[rep] for s in sinks) - t0)
            if not all(s.updates[rep] == message for s in sinks):
                raise AssertionError("a subscriber rebuilt a different message")
            for s in sinks:
                s.updates[rep] = b""  # keep memory flat across reps
        if any(s.rejects for s in sinks):
            raise AssertionError(f"rejects: {[s.rejects for s in sinks]}")
    finally:
        for link in links:
            await link.stop()
        await outbox.stop()
    return times


def _receive(sock: socket.socket, size: int, reps: int, arrived: list[float]) -> None:
    buf = bytearray(size)
    view = memoryview(buf)
    with sock:
        for _ in range(reps):
            got = 0
            while got < size:
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("sender hung up early")
                got += n
            arrived.append(time.perf_counter())


def bench_tcp(size: int, receivers: int, reps: int) -> list[float]:
    """The floor: the same bytes over raw loopback TCP, one sender thread `sendall`ing to each
    receiver in turn (as one broker loop does), receiver threads reading into preallocated buffers."""
    arrivals: list[list[float]] = [[] for _ in range(receivers)]
    senders, threads = [], []
    with socket.create_server((HOST, 0)) as server:
        port = server.getsockname()[1]
        for arrived in arrivals:
            sender = socket.create_connection((HOST, port))
            conn, _ = server.accept()
            senders.append(sender)
            thread = threading.Thread(target=_receive, args=(conn, size, reps, arrived), daemon=True)
            thread.start()
            threads.append(thread)
    times = []
    try:
        for rep in range(reps):
            message = os.urandom(size)
            t0 = time.perf_counter()
            for sender in senders:
                sender.sendall(message)
            deadline = time.monotonic() + 120
            while not all(len(a) > rep for a in arrivals):
                if time.monotonic() > deadline:
                    raise TimeoutError("raw TCP receivers did not finish")
                time.sleep(0.0005)
            times.append(max(a[rep] for a in arrivals) - t0)
    finally:
        for sender in senders:
            sender.close()
        for thread in threads:
            thread.join(5)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, default=45.0, help="update size in MiB")
    ap.add_argument("--subscribers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-mib", type=float, default=4.0, help="Outbox chunk_bytes in MiB")
    args = ap.parse_args()
    size = int(args.mib * (1 << 20))
    chunk = int(args.chunk_mib * (1 << 20))
    with tempfile.TemporaryDirectory() as tmp:
        mqtt = asyncio.run(bench_mqtt(Path(tmp), size, args.subscribers, args.reps, chunk))
    tcp = bench_tcp(size, args.subscribers, args.reps)
    m, t = statistics.median(mqtt), statistics.median(tcp)
    n_parts = -(-size // chunk)
    print(
        f"{args.mib:g} MiB -> {args.subscribers} subscribers, {n_parts} parts of <= {args.chunk_mib:g} MiB, "
        f"{args.reps} reps, {os.cpu_count()} CPUs"
    )
    print(f"  broker (Outbox -> PeerLinks): median {m:.3f} s  reps {', '.join(f'{x:.3f}' for x in mqtt)}")
    print(f"  raw loopback TCP baseline:    median {t:.3f} s  reps {', '.join(f'{x:.3f}' for x in tcp)}")
    print(f"  broker / baseline: {m / t:.1f}x")
    print(
        json.dumps(
            {
                "mib": args.mib,
                "subscribers": args.subscribers,
                "chunk_mib": args.chunk_mib,
                "broker_s": mqtt,
                "tcp_s": tcp,
                "broker_median_s": round(m, 4),
                "tcp_median_s": round(t, 4),
                "ratio": round(m / t, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
