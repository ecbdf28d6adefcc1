"""Discovery over mDNS on loopback only: separate OS processes find each other and notice departures.

Also what mDNS is bound to (the group and the configured interface, never 0.0.0.0) and what it
ignores (unicast, foreign sources, foreign advertised addresses); the one test that needs other
interfaces builds its own network namespaces (root only, marked slow).

Run as a script (``python tests/test_discovery.py child AD [INTERFACES [TIMINGS]]``) this file is the
child node the multi-process tests spawn: it advertises, prints its peer set as JSON lines on every
change, says it is ready on a "ready" line and stops on any other line (or EOF) on stdin. TIMINGS
(JSON) overrides the record TTL and liveness period, so a departure shows in seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from zeroconf import DNSOutgoing, ServiceInfo

from p2pfl import discovery
from p2pfl.discovery import (
    MAX_TXT_BYTES,
    MDNS_GROUP,
    MDNS_PORT,
    SERVICE_TYPE,
    Discovery,
    PeerAd,
    _own_info,
    ad_from_info,
    allowed_networks,
    open_zeroconf,
)
from p2pfl.errors import ConfigError, Reason

LOOPBACK = ["127.0.0.1"]
FIND_TIMEOUT_S = 15.0
DROP_TIMEOUT_S = 10.0
FAST = {"RECORD_TTL_S": 3, "ANNOUNCE_S": 1.0, "LIVENESS_S": 1.0, "LIVENESS_SILENCE_S": 2.0}
SILENT_DROP_TIMEOUT_S = 150.0  # FAST TTL + silence + a restart, with room for a loaded machine
# what the kernel has bound / dropped is read from /proc; the socket filters are Linux-only too
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (/proc, BPF)")


def hex16() -> str:
    return secrets.token_hex(8)


def make_ad(federation_id: str, port: int, name: str = "node") -> PeerAd:
    return PeerAd(
        node_id=hex16(),
        federation_id=federation_id,
        name=name,
        host="127.0.0.1",
        port=port,
        fingerprint=hex16(),
        certificate=secrets.token_bytes(203),  # discovery carries these; p2pfl.membership checks them
        signed_at=int(time.time()),
        signature=secrets.token_bytes(64),
    )


def ad_json(ad: PeerAd) -> dict:
    """An advertisement as JSON (bytes as hex), to hand to and read from a child process."""
    return {k: v.hex() if isinstance(v, bytes) else v for k, v in asdict(ad).items()}


def ad_from_json(fields: dict) -> PeerAd:
    binary = ("certificate", "signature")
    return PeerAd(**{k: bytes.fromhex(v) if k in binary else v for k, v in fields.items()})


# ---------------------------------------------------------------- child process (script mode)


async def _child_main(ad: PeerAd, interfaces: list[str], timings: dict[str, float]) -> None:
    def emit(event: str, **fields: object) -> None:
        print(json.dumps({"event": event, **fields}), flush=True)

    def changed() -> None:
        emit("peers", peers={k: ad_json(v) for k, v in disc.peers().items()})

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stdin() -> None:  # "ready" says so; any other line or EOF (parent gone) means stop
        if os.read(sys.stdin.fileno(), 4096).strip() == b"ready":
            loop.create_task(disc.set_ready())
        else:
            stop.set()

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    for name, value in timings.items():
        setattr(discovery, name, value)
    loop.add_reader(sys.stdin.fileno(), on_stdin)
    # the advertised port accepts connections, as a node's broker would (liveness probes it)
    broker = await asyncio.start_server(lambda _, writer: writer.close(), ad.host, ad.port)
    disc = Discovery(ad, interfaces, on_change=changed)
    await disc.start()
    emit("started")
    changed()
    try:
        await asyncio.wait_for(stop.wait(), timeout=90)  # never outlive a broken test run
    except TimeoutError:
        pass
    loop.remove_reader(sys.stdin.fileno())
    broker.close()
    began = time.monotonic()
    await disc.stop()
    emit("stopped", seconds=time.monotonic() - began)


class Child:
    """One node in its own OS process; its latest peer set is mirrored here by a reader thread."""

    def __init__(
        self,
        ad: PeerAd,
        log_dir: Path,
        interfaces: list[str] = LOOPBACK,
        prefix: list[str] | None = None,
        timings: dict[str, float] | None = None,
    ) -> None:
        self.ad = ad
        self.peers: dict[str, dict] = {}
        self.events: list[str] = []
        self._cond = threading.Condition()
        self._stderr = open(log_dir / f"child-{ad.port}.log", "w")  # noqa: SIM115 - closed in close()
        args = [sys.executable, "-u", __file__, "child", json.dumps(ad_json(ad)), json.dumps(interfaces)]
        args.append(json.dumps(timings or {}))
        self.proc = subprocess.Popen(
            [*(prefix or []), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(msg["event"])
                if msg["event"] == "peers":
                    self.peers = msg["peers"]
                self._cond.notify_all()

    def wait_for(self, predicate, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def request_stop(self) -> None:
        self.say("stop")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._stderr.close()

    def log_text(self) -> str:
        self._stderr.flush()
        return Path(self._stderr.name).read_text()


@pytest.fixture
def spawn(tmp_path):
    children: list[Child] = []

    def _spawn(
        ad: PeerAd,
        interfaces: list[str] = LOOPBACK,
        prefix: list[str] | None = None,
        timings: dict[str, float] | None = None,
    ) -> Child:
        child = Child(ad, tmp_path, interfaces, prefix, timings)
        children.append(child)
        return child

    yield _spawn
    for child in children:
        child.close()


def sees(other: Child):
    return lambda me: other.ad.node_id in me.peers


# ---------------------------------------------------------------- multi-process tests


@pytest.mark.slow
def test_processes_find_own_federation_only(spawn):
    fed, other_fed = hex16(), hex16()
    began = time.monotonic()
    a = spawn(make_ad(fed, 21001, "alice"))
    b = spawn(make_ad(fed, 21002, "bob"))
    c = spawn(make_ad(other_fed, 21003, "carol"))
    d = spawn(make_ad(other_fed, 21004, "dave"))

    for me, other in ((a, b), (b, a), (c, d), (d, c)):
        assert me.wait_for(sees(other), FIND_TIMEOUT_S), (
            f"{me.ad.name} did not find {other.ad.name}; events={me.events}\n{me.log_text()}"
        )
    print(f"\nmutual discovery of 4 processes after {time.monotonic() - began:.2f} s from spawn")

    # The other federation's ads demonstrably circulate on this link (c and d found each other),
    # yet a and b report only each other, with exactly the advertised data; no one reports itself.
    assert a.peers == {b.ad.node_id: ad_json(b.ad)}
    assert b.peers == {a.ad.node_id: ad_json(a.ad)}
    assert c.peers == {d.ad.node_id: ad_json(d.ad)}
    assert d.peers == {c.ad.node_id: ad_json(c.ad)}


@pytest.mark.slow
def test_stopped_process_drops_out(spawn):
    fed = hex16()
    a = spawn(make_ad(fed, 21011, "alice"))
    b = spawn(make_ad(fed, 21012, "bob"))
    assert a.wait_for(sees(b), FIND_TIMEOUT_S), a.log_text()
    assert b.wait_for(sees(a), FIND_TIMEOUT_S), b.log_text()

    began = time.monotonic()
    b.request_stop()
    assert a.wait_for(lambda me: b.ad.node_id not in me.peers, DROP_TIMEOUT_S), (
        f"a still reports b; events={a.events}\n{a.log_text()}"
    )
    print(f"\npeer dropped {time.monotonic() - began:.3f} s after stop was requested")
    assert b.wait_for(lambda me: "stopped" in me.events, 10.0), b.log_text()
    assert b.proc.wait(timeout=10) == 0, b.log_text()
    assert a.peers == {}


@pytest.mark.slow
def test_ready_flag_reaches_peers(spawn):
    fed = hex16()
    a = spawn(make_ad(fed, 21021, "alice"))
    b = spawn(make_ad(fed, 21022, "bob"))
    assert b.wait_for(sees(a), FIND_TIMEOUT_S), b.log_text()
    assert b.peers[a.ad.node_id]["ready"] is False
    a.say("ready")
    assert b.wait_for(lambda me: me.peers.get(a.ad.node_id, {}).get("ready") is True, FIND_TIMEOUT_S), (
        f"b never saw a ready; events={b.events}\n{b.log_text()}"
    )


@pytest.mark.slow
def test_killed_peer_dropped_then_back(spawn):
    """A peer killed without a goodbye leaves once its records expired, it stayed silent and nothing
    listens at its port, not after the ~20 min zeroconf keeps its PTR; restarted, it is back."""
    fed = hex16()
    a = spawn(make_ad(fed, 21031, "alice"), timings=FAST)
    bob = make_ad(fed, 21032, "bob")
    b = spawn(bob, timings=FAST)
    assert a.wait_for(sees(b), FIND_TIMEOUT_S), a.log_text()
    b.proc.send_signal(signal.SIGKILL)
    assert a.wait_for(lambda me: bob.node_id not in me.peers, SILENT_DROP_TIMEOUT_S), (
        f"a still reports killed b; events={a.events}\n{a.log_text()}"
    )
    assert "nothing listens at 127.0.0.1:21032" in a.log_text()
    b = spawn(bob, timings=FAST)
    assert a.wait_for(sees(b), SILENT_DROP_TIMEOUT_S), f"b is not back; events={a.events}\n{a.log_text()}"


@pytest.mark.slow
def test_frozen_peer_is_kept(spawn):
    """A frozen (SIGSTOP) peer stops answering mDNS but its port still accepts connections: slow, not
    gone, so it stays (rounds stop waiting for it on their own); resumed, it answers again."""
    fed = hex16()
    a = spawn(make_ad(fed, 21041, "alice"), timings=FAST)
    bob = make_ad(fed, 21042, "bob")
    b = spawn(bob, timings=FAST)
    assert a.wait_for(sees(b), FIND_TIMEOUT_S), a.log_text()
    b.proc.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + SILENT_DROP_TIMEOUT_S
        while "accepts connections" not in a.log_text() and time.monotonic() < deadline:
            time.sleep(0.2)  # polling the child's log file for the verdict
        assert "accepts connections" in a.log_text(), a.log_text()
        assert bob.node_id in a.peers
    finally:
        b.proc.send_signal(signal.SIGCONT)


# ---------------------------------------------------------------- in-process tests


def test_malformed_ads_are_ignored_in_process(caplog):
    """A rogue responder on the link with bad TXT data is never reported; the good peer is."""
    caplog.set_level(logging.DEBUG, logger="p2pfl.discovery")
    rogue_id = asyncio.run(asyncio.wait_for(_rogue_scenario(), timeout=30))
    # it was received and refused (debug log), not merely missed
    assert any(rogue_id in r.getMessage() and "ignoring" in r.getMessage() for r in caplog.records)


async def _rogue_scenario() -> str:
    fed = hex16()
    me_changes: list[dict] = []
    me = Discovery(make_ad(fed, 21021, "me"), LOOPBACK, on_change=lambda: me_changes.append(me.peers()))
    good_ad = make_ad(fed, 21022, "good")
    good = Discovery(good_ad, LOOPBACK)
    rogue_zc = await open_zeroconf(LOOPBACK)  # never a stock zeroconf: it would bind 0.0.0.0
    rogue_id = hex16()
    bad_props = {"id": rogue_id, "fed": fed, "name": "x" * 200, "fp": hex16(), "v": "1"}  # name too long
    rogue = ServiceInfo(
        SERVICE_TYPE,
        f"{rogue_id}.{SERVICE_TYPE}",
        port=21023,
        properties=bad_props,
        server=f"rogue-{rogue_id}.local.",
        parsed_addresses=["127.0.0.1"],
    )
    try:
        await rogue_zc.async_register_service(rogue)
        await asyncio.gather(me.start(), good.start())
        deadline = time.monotonic() + FIND_TIMEOUT_S
        while good_ad.node_id not in me.peers() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # the rogue was announced before either of us started, so it had every chance to show up
        assert me.peers() == {good_ad.node_id: good_ad}
        assert me_changes and all(rogue_id not in seen for seen in me_changes)
    finally:
        await good.stop()
        await me.stop()
        await rogue_zc.async_close()
    assert me.peers() == {}
    return rogue_id


# ---------------------------------------------------------------- what is bound, what is ignored


class Changes:
    """A Discovery callback as an asyncio event, so tests wait on a condition instead of sleeping."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def __call__(self, *_: object) -> None:
        self._event.set()

    async def until(self, predicate: Callable[[], bool], timeout: float = FIND_TIMEOUT_S) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), remaining)
            except TimeoutError:
                return predicate()
        return True


def _udp_table(text: str) -> dict[int, tuple[str, int, int]]:
    """Rows of a /proc/net/udp table by socket inode: (local address, local port, drops)."""
    rows = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        address, port = fields[1].split(":")
        local = socket.inet_ntoa(struct.pack("=I", int(address, 16)))  # the kernel prints it in host order
        rows[int(fields[9])] = (local, int(port, 16), int(fields[12]))
    return rows


def _mdns_sockets_of_this_process() -> dict[int, tuple[int, str, int]]:
    """What the kernel says this process has on port 5353: inode -> (fd, local address, drops)."""
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            match = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/self/fd/{fd}"))
            if match:
                fds[int(match.group(1))] = int(fd)
    table = _udp_table(Path("/proc/net/udp").read_text())
    return {
        inode: (fds[inode], local, drops)
        for inode, (local, port, drops) in table.items()
        if inode in fds and port == MDNS_PORT
    }


def _advert_packet(ad: PeerAd) -> bytes:
    """An unsolicited mDNS response announcing `ad`, exactly as a node's announcement looks."""
    info = _info(ad)
    out = DNSOutgoing(0x8400)  # QR (a response) | AA
    for record in (info.dns_pointer(), info.dns_service(), info.dns_text(), *info.dns_addresses()):
        out.add_answer_at_time(record, 0)
    (packet,) = out.packets()
    return packet


@linux_only
def test_instances_find_each_other_on_scoped_sockets():
    """Two instances find each other; the kernel shows only the group and 127.0.0.1 bound, never 0.0.0.0."""
    asyncio.run(asyncio.wait_for(_scoped_scenario(), timeout=60))


async def _scoped_scenario() -> None:
    before = set(_mdns_sockets_of_this_process())
    fed = hex16()
    a_ad, b_ad = make_ad(fed, 21031, "a"), make_ad(fed, 21032, "b")
    a_changes, b_changes = Changes(), Changes()
    a = Discovery(a_ad, LOOPBACK, on_change=a_changes)
    b = Discovery(b_ad, LOOPBACK, on_change=b_changes)
    try:
        await asyncio.gather(a.start(), b.start())
        new = {k: v for k, v in _mdns_sockets_of_this_process().items() if k not in before}
        bound = sorted(local for _, local, _ in new.values())
        assert "0.0.0.0" not in bound
        # each instance: one receiving socket on the group, one sending socket on the interface
        assert bound == sorted([MDNS_GROUP, "127.0.0.1"] * 2)
        for fd, local, _ in new.values():
            if local == MDNS_GROUP:  # and it takes only groups it joined itself (Linux)
                with socket.socket(fileno=os.dup(fd)) as sock:
                    assert sock.getsockopt(socket.IPPROTO_IP, 49) == 0  # IP_MULTICAST_ALL
        assert await a_changes.until(lambda: a.peers() == {b_ad.node_id: b_ad}), a.peers()
        assert await b_changes.until(lambda: b.peers() == {a_ad.node_id: a_ad}), b.peers()
    finally:
        await asyncio.gather(a.stop(), b.stop())
    assert not set(_mdns_sockets_of_this_process()) - before  # stop() closed them all


def test_live_peer_stays_fresh_from_its_announcements_alone(monkeypatch):
    """A live peer's records are renewed by its periodic announcements alone: our cached copy keeps
    being replaced well past its TTL and liveness (which only reads the cache, never asks: a query per
    peer and TTL was O(N^2) packets that 128 nodes on 2 cores could not carry) never suspects it."""
    for name, value in {**FAST, "RECORD_TTL_S": 6}.items():
        monkeypatch.setattr(discovery, name, value)
    assert asyncio.run(asyncio.wait_for(_announce_scenario(), timeout=120)) >= 4


async def _announce_scenario() -> int:
    fed = hex16()
    a_ad, b_ad = make_ad(fed, 21035, "a"), make_ad(fed, 21036, "b")
    b_changes = Changes()
    a = Discovery(a_ad, LOOPBACK)
    b = Discovery(b_ad, LOOPBACK, on_change=b_changes)
    suspected: list[str] = []
    real = b._liveness_result

    def watched(key: str, info: ServiceInfo | None) -> bool:
        if info is None:
            suspected.append(key)
        return real(key, info)

    b._liveness_result = watched  # type: ignore[method-assign]
    try:
        await asyncio.gather(a.start(), b.start())
        assert await b_changes.until(lambda: b.peers() == {a_ad.node_id: a_ad}), b.peers()
        assert b._aiozc is not None
        cache = b._aiozc.zeroconf.cache
        name = f"{a_ad.node_id}.{SERVICE_TYPE}"
        renewed: set[float] = set()
        while len(renewed) < 20:  # over 3 TTLs of announcements, each a fresh record in our cache
            record = cache.get_by_details(name, 33, 1)  # SRV, IN
            if record is not None:
                renewed.add(record.created)
            await asyncio.sleep(0.2)
        assert not suspected, f"a live peer was suspected: {suspected}"
        assert b.peers() == {a_ad.node_id: a_ad}
        return len(renewed)
    finally:
        await asyncio.gather(a.stop(), b.stop())


def test_foreign_advertised_address_ignored_and_counted():
    """A well-formed ad of our federation from loopback that points outside 127.0.0.0/8 is not a peer."""
    rejects, peers, rogue_id = asyncio.run(asyncio.wait_for(_foreign_scenario(), timeout=60))
    assert [reason for reason, _ in rejects] == [Reason.FOREIGN_ADVERT]
    assert "198.51.100.7" in rejects[0][1] and rogue_id in rejects[0][1]
    assert rogue_id not in peers


async def _foreign_scenario() -> tuple[list[tuple[Reason, str]], dict[str, PeerAd], str]:
    fed = hex16()
    changes = Changes()
    rejects: list[tuple[Reason, str]] = []

    def on_reject(reason: Reason, detail: str) -> None:
        rejects.append((reason, detail))
        changes()

    me = Discovery(make_ad(fed, 21041, "me"), LOOPBACK, on_change=changes, on_reject=on_reject)
    good_ad = make_ad(fed, 21042, "good")
    good = Discovery(good_ad, LOOPBACK)
    rogue_zc = await open_zeroconf(LOOPBACK)
    rogue_ad = replace(make_ad(fed, 21043, "rogue"), host="198.51.100.7")  # TEST-NET-2, off this host
    try:
        await rogue_zc.async_register_service(_info(rogue_ad, addresses=(rogue_ad.host,)))
        await asyncio.gather(me.start(), good.start())
        assert await changes.until(lambda: bool(rejects) and good_ad.node_id in me.peers()), (
            rejects,
            me.peers(),
        )
        peers = me.peers()
        assert peers == {good_ad.node_id: good_ad}
    finally:
        await asyncio.gather(good.stop(), me.stop())
        await rogue_zc.async_close()
    return rejects, peers, rogue_ad.node_id


@linux_only
def test_unsolicited_unicast_advert_dropped_multicast_one_accepted():
    """The attack as found: an advert sent by unicast to port 5353 never reaches zeroconf.

    The same bytes sent the way mDNS works (multicast, from inside 127.0.0.0/8) are accepted, which
    shows the packet itself is good and only the unicast path is closed.
    """
    asyncio.run(asyncio.wait_for(_unicast_scenario(), timeout=60))


async def _unicast_scenario() -> None:
    fed = hex16()
    changes = Changes()
    me = Discovery(make_ad(fed, 21051, "me"), LOOPBACK, on_change=changes)
    before = set(_mdns_sockets_of_this_process())
    await me.start()
    try:
        mine = {k: v for k, v in _mdns_sockets_of_this_process().items() if k not in before}
        (sender,) = [inode for inode, (_, local, _) in mine.items() if local == "127.0.0.1"]
        drops_before = mine[sender][2]
        intruder = make_ad(fed, 21052, "intruder")
        packet = _advert_packet(intruder)
        # Other processes may share 127.0.0.1:5353 (SO_REUSEPORT picks one socket per source), so send
        # from 32 source ports: all but certainly at least one lands on ours. Bounded in count and time.
        for _ in range(32):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
                attacker.bind(("127.0.0.1", 0))
                attacker.sendto(packet, ("127.0.0.1", MDNS_PORT))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DROP_TIMEOUT_S
        while _mdns_sockets_of_this_process()[sender][2] == drops_before and loop.time() < deadline:
            await asyncio.sleep(0.05)  # polling a kernel counter; there is no event to wait on
        assert _mdns_sockets_of_this_process()[sender][2] > drops_before, "no unicast reached our socket"
        assert intruder.node_id not in me.peers()

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as neighbour:
            neighbour.bind(("127.0.0.1", 0))
            neighbour.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            neighbour.sendto(packet, (MDNS_GROUP, MDNS_PORT))
        assert await changes.until(lambda: intruder.node_id in me.peers()), me.peers()
        assert me.peers()[intruder.node_id] == intruder
    finally:
        await me.stop()


@linux_only
def test_source_filter_drops_other_sources():
    """The kernel filter on the receiving socket keeps allowed IPv4 sources only (checked on loopback)."""
    from p2pfl.discovery import _attach_filter, _source_filter  # the mechanism itself

    def drops(sock: socket.socket) -> int:
        return _udp_table(Path("/proc/net/udp").read_text())[os.fstat(sock.fileno()).st_ino][2]

    def send_from(source: str, to: tuple[str, int]) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.bind((source, 0))
            sender.sendto(source.encode(), to)

    allowed = [ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv4Network("127.0.0.2/32")]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        _attach_filter(receiver, _source_filter(allowed))
        receiver.bind(("127.0.0.1", 0))
        for source in ("127.0.0.1", "127.0.0.3", "127.0.0.2"):  # the allowed one last
            send_from(source, receiver.getsockname())
        receiver.settimeout(DROP_TIMEOUT_S)  # a ceiling: the allowed datagram arrives at once
        data, (address, _) = receiver.recvfrom(64)
        assert (data, address) == (b"127.0.0.2", "127.0.0.2")  # the two sent before it were dropped...
        assert drops(receiver) == 2  # ...by the filter, as the kernel counts
        receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            receiver.recvfrom(64)

        _attach_filter(receiver, _source_filter([]))  # no networks (the sending sockets): drop all
        send_from("127.0.0.2", receiver.getsockname())
        deadline = time.monotonic() + DROP_TIMEOUT_S
        while drops(receiver) == 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a kernel counter
        assert drops(receiver) == 3
        with pytest.raises(BlockingIOError):
            receiver.recvfrom(64)


def test_allowed_networks():
    assert allowed_networks(["127.0.0.1"]) == [ipaddress.IPv4Network("127.0.0.0/8")]
    assert allowed_networks(["127.0.0.1", "127.0.0.1"]) == [ipaddress.IPv4Network("127.0.0.0/8")]
    for bad in (["198.51.100.7"], ["0.0.0.0"], ["224.0.0.251"], ["::1"], ["eth0"], []):
        with pytest.raises(ConfigError):
            allowed_networks(bad)


def test_own_host_outside_interfaces_refused():
    """Peers would ignore our ad as foreign, so say so at start (before any socket is opened)."""
    disc = Discovery(replace(make_ad(hex16(), 1883), host="198.51.100.7"), LOOPBACK)
    with pytest.raises(ConfigError, match="outside"):
        asyncio.run(disc.start())


def test_foreign_counted_once_per_address(caplog):
    import p2pfl.discovery as discovery

    caplog.set_level(logging.WARNING, logger="p2pfl.discovery")
    rejects: list[tuple[Reason, str]] = []
    disc = Discovery(make_ad(hex16(), 1883), LOOPBACK, on_reject=lambda r, d: rejects.append((r, d)))
    disc._networks = allowed_networks(LOOPBACK)
    for name in ("a", "b", "c"):  # one address under several names: counted once
        disc._foreign(name, "198.51.100.7")
    disc._foreign("d", "198.51.100.8")
    assert len(rejects) == 2
    assert "198.51.100.7" in rejects[0][1] and "198.51.100.8" in rejects[1][1]
    assert {r for r, _ in rejects} == {Reason.FOREIGN_ADVERT}
    for i in range(discovery.MAX_FOREIGN_TRACKED + 10):  # memory and log lines stay bounded
        disc._foreign("x", str(ipaddress.IPv4Address("10.0.0.0") + i))
    assert len(rejects) == discovery.MAX_FOREIGN_TRACKED
    assert sum("no longer counted" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow
def test_netns_bridge_scoped_and_outsider_dropped(spawn):
    """Three namespaces on one bridge: two nodes in 10.213.X.0/24 find each other; a third on the same
    bridge but in another subnet (a LAN attacker outside the configured network) is dropped by the
    kernel filter of both (its datagrams show in their sockets' drop counters) and never listed.
    """
    from p2pfl.faultlab import NetLab, netns_unavailable

    why = netns_unavailable()
    if why is not None:
        pytest.skip(f"needs network namespaces: {why}")
    lab = NetLab(nodes=3)
    outsider = f"10.214.{int(lab.run_id) % 200 + 20}.10"

    def ns_run(index: int, *cmd: str) -> str:
        done = subprocess.run([*lab.exec_prefix(index), *cmd], capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def group_drops(index: int) -> int:
        rows = _udp_table(ns_run(index, "cat", "/proc/net/udp")).values()
        return sum(drops for local, port, drops in rows if (local, port) == (MDNS_GROUP, MDNS_PORT))

    try:
        lab.setup()
        for i in range(3):  # no reverse-path filtering: only our filter stands between them
            for conf in ("all", "eth0"):
                ns_run(i, "sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=0")
        ns_run(2, "ip", "addr", "flush", "dev", "eth0")
        ns_run(2, "ip", "addr", "add", f"{outsider}/24", "dev", "eth0")
        ns_run(2, "ip", "route", "replace", "224.0.0.0/4", "dev", "eth0")

        fed = hex16()
        hosts = [lab.address(0), lab.address(1), outsider]
        nodes = [
            spawn(replace(make_ad(fed, 21061 + i, f"n{i}"), host=host), [host], lab.exec_prefix(i))
            for i, host in enumerate(hosts)
        ]
        a, b, c = nodes
        assert a.wait_for(sees(b), FIND_TIMEOUT_S), a.log_text()
        assert b.wait_for(sees(a), FIND_TIMEOUT_S), b.log_text()

        for i in range(2):  # the outsider's browsing queries reach both and are dropped in the kernel
            deadline = time.monotonic() + FIND_TIMEOUT_S
            while group_drops(i) == 0 and time.monotonic() < deadline:
                time.sleep(0.2)  # polling a kernel counter in another namespace
            assert group_drops(i) > 0, f"node {i} saw no datagram from the outsider"
            bound = sorted(
                (local, port) for local, port, _ in _udp_table(ns_run(i, "cat", "/proc/net/udp")).values()
            )
            assert bound == sorted([(MDNS_GROUP, MDNS_PORT), (hosts[i], MDNS_PORT)])
        assert a.peers == {b.ad.node_id: ad_json(b.ad)}
        assert b.peers == {a.ad.node_id: ad_json(a.ad)}
        assert c.peers == {}  # and the outsider, filtering by its own subnet, lists neither
    finally:
        lab.teardown()


# ---------------------------------------------------------------- TXT validation (no network)


def _info(
    ad: PeerAd, *, service_name: str | None = None, addresses=("127.0.0.1",), **overrides
) -> ServiceInfo:
    props: dict = {"id": ad.node_id, "fed": ad.federation_id, "name": ad.name, "fp": ad.fingerprint, "v": "2"}
    props |= {
        "t": str(ad.signed_at),
        "s": ad.signature,
        "c0": ad.certificate[:250],
        "c1": ad.certificate[250:],
    }
    props.update(overrides)
    props = {k: v for k, v in props.items() if v is not None}
    return ServiceInfo(
        SERVICE_TYPE,
        service_name or f"{ad.node_id}.{SERVICE_TYPE}",
        port=ad.port,
        properties=props,
        server="host.local.",
        parsed_addresses=list(addresses),
    )


def test_ready_holds_against_a_stale_txt_until_the_node_changes():
    """A late copy of a peer's older TXT (no r=1) must not undo its readiness; a restart elsewhere does."""
    fed = hex16()
    disc = Discovery(make_ad(fed, 1883), LOOPBACK)
    disc._networks = allowed_networks(LOOPBACK)
    peer = make_ad(fed, 1884)
    key = f"{peer.node_id}.{SERVICE_TYPE}"
    disc._take(key, _info(peer))
    assert disc.peers()[peer.node_id].ready is False
    disc._take(key, _info(peer, r="1"))
    assert disc.peers()[peer.node_id].ready is True
    disc._take(key, _info(peer))  # stale
    assert disc.peers()[peer.node_id].ready is True
    moved = replace(peer, port=1885)
    disc._take(key, _info(moved))  # restarted on another port: not ready until it says so
    assert disc.peers()[peer.node_id] == moved


def test_valid_ad_round_trips():
    ad = make_ad(hex16(), 1883, "worker-7")
    assert ad_from_info(_info(ad)) == ad


@pytest.mark.parametrize("cert_bytes", [1, 203, 250, 251, 600])
def test_our_own_txt_record_carries_the_certificate_in_items_that_fit(cert_bytes):
    """A certificate longer than one TXT item (a long name) is cut into several and put back whole."""
    ad = replace(make_ad(hex16(), 1883, "n" * 64), certificate=secrets.token_bytes(cert_bytes), ready=True)
    info = _own_info(ad)
    assert all(len(k) + 1 + len(v or b"") <= 255 for k, v in info.properties.items())
    assert len(info.text) <= MAX_TXT_BYTES
    assert ad_from_info(info) == ad


@pytest.mark.parametrize(
    "overrides",
    [
        {"id": None},
        {"fed": None},
        {"fp": None},
        {"name": None},
        {"v": None},
        {"v": "1"},
        {"t": None},
        {"t": "-5"},
        {"t": "soon"},
        {"s": None},
        {"s": b"x" * 63},
        {"c0": None},
        {"c0": b""},
        {"id": "not-hex-at-all!!"},
        {"id": "ABCDEF0123456789"},
        {"fed": "abc"},
        {"fp": "0" * 17},
        {"name": ""},
        {"name": "x" * 65},
        {"name": "bad\nname"},
        {"name": b"\xff\xfe"},
    ],
)
def test_malformed_txt_rejected(overrides):
    ad = make_ad(hex16(), 1883)
    with pytest.raises(ValueError):
        ad_from_info(_info(ad, **overrides))


def test_oversized_txt_rejected():
    ad = make_ad(hex16(), 1883)
    info = _info(ad, **{f"pad{i}": "y" * 200 for i in range(4)})
    with pytest.raises(ValueError, match="TXT record"):
        ad_from_info(info)


def test_name_must_match_id_and_address_must_be_usable():
    ad = make_ad(hex16(), 1883)
    with pytest.raises(ValueError, match="instance name"):
        ad_from_info(_info(ad, service_name=f"{hex16()}.{SERVICE_TYPE}"))
    with pytest.raises(ValueError, match="IPv4"):
        ad_from_info(_info(ad, addresses=()))
    with pytest.raises(ValueError, match="IPv4"):
        ad_from_info(_info(ad, addresses=("0.0.0.0",)))
    with pytest.raises(ValueError, match="port"):
        ad_from_info(_info(replace(ad, port=0)))


@pytest.mark.parametrize(
    "change",
    [
        {"node_id": "short"},
        {"federation_id": "Z" * 16},
        {"fingerprint": ""},
        {"name": "n" * 65},
        {"host": "localhost"},
        {"host": "::1"},
        {"port": 0},
        {"certificate": b""},
        {"signature": b""},
        {"signed_at": -1},
    ],
)
def test_invalid_own_ad_refused(change):
    with pytest.raises(ConfigError):
        Discovery(replace(make_ad(hex16(), 1883), **change), LOOPBACK)


def test_interfaces_required():
    with pytest.raises(ConfigError):
        Discovery(make_ad(hex16(), 1883), [])


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    asyncio.run(
        _child_main(
            ad_from_json(json.loads(sys.argv[2])),
            json.loads(sys.argv[3]) if sys.argv[3:] else LOOPBACK,
            json.loads(sys.argv[4]) if sys.argv[4:] else {},
        )
    )
