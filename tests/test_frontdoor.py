"""The front door against real sockets on 127.0.0.1: caps, handshake deadline, no fd growth, TLS, floods.

Every wait is on an event (a stats() value, a socket state) with a generous ceiling; nothing
asserts how long something took. The flood test runs the door in a child process under a
lowered open-file limit, as scripts/bench_frontdoor.py does with the common limit of 1,024.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import math
import os
import resource
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from p2pfl.errors import ConfigError, Reason, Rejected, TransportError
from p2pfl.resources import ensure_fd_headroom, fd_need
from p2pfl.transport.frontdoor import DoorLimits, FrontDoor, source_key

HOST = "127.0.0.1"
CEILING_S = 60.0  # generous: CI machines are busy; a wait that reaches it is a failure, not a timing


# -- helpers -------------------------------------------------------------------------------------


async def until(predicate: Callable[[], bool], ceiling_s: float = CEILING_S) -> None:
    """Wait for a state (not for a time): poll, failing only at the ceiling."""
    deadline = asyncio.get_running_loop().time() + ceiling_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def close_wait_on(port: int) -> int:
    """Sockets in CLOSE-WAIT (state 08) on our side of `port`: what a half-closed pile-up looks like."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "08":
                    count += 1
    return count


@dataclass
class Pki:
    """A throwaway CA (EC P-256) with one server and some client certificates, as PEM files."""

    directory: Path
    ca: Path = field(init=False)

    def __post_init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ser, self._ec, self._oid = x509, hashes, serialization, ec, NameOID
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test federation CA")])
        now = datetime.datetime.now(datetime.UTC)
        self._ca_name = name
        ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca = self.directory / "ca.pem"
        self.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str) -> tuple[Path, Path]:
        """A leaf certificate and key for `common_name`, signed by the CA."""
        x509, ser = self._x509, self._ser
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(self._oid.COMMON_NAME, common_name)]))
            .issuer_name(self._ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self._ca_key, self._hashes.SHA256())
        )
        cert_path, key_path = self.directory / f"{common_name}.pem", self.directory / f"{common_name}.key"
        cert_path.write_bytes(cert.public_bytes(ser.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
        return cert_path, key_path


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Mutual TLS: the server requires a client certificate from the federation CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the peer is identified by its certificate's node id, not a host name
    ctx.load_verify_locations(cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def node_id_of(obj: ssl.SSLObject | None, allowed: frozenset[str] = frozenset({"node-a"})) -> str:
    """The test federation's verify: the certificate's common name, if it is a member's."""
    if obj is None:
        return "plain-peer"
    cert = obj.getpeercert()
    if not cert:
        raise Rejected(Reason.PEER_IDENTITY, "no client certificate")
    subject: tuple[tuple[tuple[str, str], ...], ...] = cert.get("subject", ())  # type: ignore[assignment]
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    if not names or names[0] not in allowed:
        raise Rejected(Reason.PEER_IDENTITY, f"certificate for {names[:1]} is not a member's")
    return names[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pytest.importorskip("cryptography")
    pki = Pki(tmp_path_factory.mktemp("pki"))
    for name in ("server", "node-a", "mallory"):
        pki.issue(name)
    return pki


class Door:
    """A started FrontDoor with what it reported: refusals, sessions (held until the client's EOF)."""

    def __init__(self, ssl_context: ssl.SSLContext | None, limits: DoorLimits) -> None:
        self.rejects: list[tuple[Reason, str]] = []
        self.sessions: list[str] = []
        self.door = FrontDoor(
            HOST,
            0,
            ssl_context,
            verify=node_id_of,
            on_session=self.on_session,
            on_reject=lambda reason, detail: self.rejects.append((reason, detail)),
            limits=limits,
        )

    async def on_session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, node_id: str
    ) -> None:
        self.sessions.append(node_id)
        writer.write(f"hello {node_id}\n".encode())
        await writer.drain()
        await reader.read()  # hold the session until the client goes

    def stat(self, name: str) -> int:
        return self.door.stats()[name]


@contextlib.asynccontextmanager
async def started(
    ssl_context: ssl.SSLContext | None = None, evict_after_s: float = math.inf, **limits: float
) -> AsyncIterator[Door]:
    """A started door; eviction off unless asked for (when it happens depends on the clock)."""
    door = Door(ssl_context, DoorLimits(**limits))  # type: ignore[arg-type]
    door.door.evict_after_s = evict_after_s
    await door.door.start()
    try:
        yield door
    finally:
        await door.door.stop()


async def refused(reader: asyncio.StreamReader) -> bool:
    """A refused client sees a reset or an end of stream, never data."""
    try:
        return await asyncio.wait_for(reader.read(), CEILING_S) == b""
    except (ConnectionResetError, ssl.SSLError, OSError):
        return True


async def greeting(ctx: ssl.SSLContext | None, port: int) -> tuple[bytes, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx)
    return await asyncio.wait_for(reader.readline(), CEILING_S), writer


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# -- caps ------------------------------------------------------------------------------------------


def test_connections_over_each_cap_are_refused_at_once_and_counted(pki: Pki) -> None:
    async def main() -> None:
        # per source: every client here is 127.0.0.1; only connections still in their handshake count
        ctx = server_context(pki.ca, pki.directory / "server.pem", pki.directory / "server.key")
        async with started(ctx, max_per_source=3, handshake_s=CEILING_S) as d:
            idle = [await asyncio.open_connection(HOST, d.door.port) for _ in range(3)]  # no TLS bytes
            await until(lambda: d.stat("pending") == 3)
            reader, writer = await asyncio.open_connection(HOST, d.door.port)
            assert await refused(reader)
            await until(lambda: d.stat("refused_conn_limit") == 1)
            assert d.rejects[0][0] is Reason.CONN_LIMIT and d.rejects[0][1].startswith("127.0.0.1: ")
            assert "max_per_source 3" in d.rejects[0][1]
            await close_all([w for _, w in idle] + [writer])
            await until(lambda: d.stat("pending") == 0)  # the slots come back
        async with started(max_per_source=8, max_sessions_per_node=2) as d:  # one member, many sessions
            held = [await asyncio.open_connection(HOST, d.door.port) for _ in range(2)]
            for reader, _ in held:
                assert await asyncio.wait_for(reader.readline(), CEILING_S) == b"hello plain-peer\n"
            line, newest = await greeting(None, d.door.port)  # admitted: its oldest session is closed
            assert line == b"hello plain-peer\n"
            assert await refused(held[0][0])
            await until(lambda: d.stat("refused_conn_limit") == 1 and d.stat("sessions") == 2)
            assert "closed the oldest of 2 sessions" in d.rejects[-1][1]
            assert "max_sessions_per_node 2" in d.rejects[-1][1]
            await close_all([w for _, w in held] + [newest])
            await until(lambda: d.stat("sessions") == 0)
        async with started(max_per_source=2) as d:  # verified sessions are not held to the source's cap
            held = [await greeting(None, d.door.port) for _ in range(4)]
            assert [line for line, _ in held] == [b"hello plain-peer\n"] * 4
            assert d.stat("sessions") == 4 and d.stat("refused_conn_limit") == 0
            await close_all([w for _, w in held])
            await until(lambda: d.stat("sessions") == 0)
        async with started(max_sessions=2) as d:
            held = [await greeting(None, d.door.port) for _ in range(2)]
            reader, writer = await asyncio.open_connection(HOST, d.door.port)
            assert await refused(reader)
            await until(lambda: d.stat("refused_conn_limit") == 1)
            assert "max_sessions 2" in d.rejects[0][1]
            await close_all([w for _, w in held] + [writer])

    asyncio.run(main())


def test_pending_cap_counts_connections_that_have_not_authenticated(pki: Pki) -> None:
    async def main() -> None:
        ctx = server_context(pki.ca, pki.directory / "server.pem", pki.directory / "server.key")
        async with started(ctx, max_pending=2, handshake_s=CEILING_S) as d:
            idle = [await asyncio.open_connection(HOST, d.door.port) for _ in range(2)]  # no TLS bytes
            await until(lambda: d.stat("pending") == 2)
            reader, writer = await asyncio.open_connection(HOST, d.door.port)
            assert await refused(reader)
            await until(lambda: d.stat("refused_conn_limit") == 1)
            assert "max_pending 2" in d.rejects[0][1]
            await close_all([w for _, w in idle] + [writer])
            await until(lambda: d.stat("pending") == 0)  # a client that leaves mid-handshake frees its slot

    asyncio.run(main())


def test_a_member_evicts_the_oldest_idle_connection_when_pending_is_full(pki: Pki) -> None:
    """Slowloris: idle connections fill the pending slots; a member's handshake must not wait for
    them to reach the deadline."""

    async def main() -> None:
        d_ = pki.directory
        ctx = server_context(pki.ca, d_ / "server.pem", d_ / "server.key")
        member = client_context(pki.ca, d_ / "node-a.pem", d_ / "node-a.key")
        async with started(ctx, evict_after_s=0.0, max_pending=2, handshake_s=CEILING_S) as d:
            idle = [await asyncio.open_connection(HOST, d.door.port) for _ in range(2)]
            await until(lambda: d.stat("pending") == 2)
            line, writer = await greeting(member, d.door.port)
            assert line == b"hello node-a\n"
            assert await refused(idle[0][0])  # the oldest went
            assert d.rejects[0][0] is Reason.HANDSHAKE and "evicted after" in d.rejects[0][1]
            assert d.stat("refused_conn_limit") == 0 and d.stat("pending") == 1
            await close_all([writer] + [w for _, w in idle])
            await until(lambda: d.stat("pending") == 0 and d.stat("sessions") == 0)

    asyncio.run(main())


# -- handshake deadline, fds, CLOSE-WAIT -----------------------------------------------------------


def test_a_silent_client_is_dropped_at_the_handshake_deadline(pki: Pki) -> None:
    async def main() -> None:
        ctx = server_context(pki.ca, pki.directory / "server.pem", pki.directory / "server.key")
        async with started(ctx, handshake_s=0.5) as d:
            reader, writer = await asyncio.open_connection(HOST, d.door.port)  # and says nothing
            await until(lambda: d.stat("pending") == 1 or d.stat("refused_handshake") == 1)
            assert await refused(reader)
            await until(lambda: d.stat("refused_handshake") == 1 and d.stat("pending") == 0)
            assert d.rejects == [(Reason.HANDSHAKE, "127.0.0.1: not authenticated within 0.5 s")]
            assert d.sessions == []
            await close_all([writer])

    asyncio.run(main())


def test_connect_close_cycles_leave_no_fds_and_no_close_wait(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """The attack from the issue: connect, send a few bytes, close, hundreds of times."""
    cycles = 400

    async def cycle(port: int) -> None:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"MQTT\x04\x02")
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def main() -> None:
        ctx = server_context(pki.ca, pki.directory / "server.pem", pki.directory / "server.key")
        client = client_context(pki.ca, pki.directory / "node-a.pem", pki.directory / "node-a.key")
        async with started(ctx, handshake_s=5.0) as d:
            port = d.door.port
            await cycle(port)  # warm up whatever asyncio and ssl allocate once
            await until(lambda: d.stat("pending") == 0)
            before = open_fds()
            caplog.set_level(logging.DEBUG, logger="asyncio")
            for start in range(0, cycles, 20):  # bounded: 20 clients at a time
                await asyncio.gather(*(cycle(port) for _ in range(min(20, cycles - start))))
            await until(lambda: d.stat("pending") == 0 and d.stat("sessions") == 0)
            await until(lambda: open_fds() <= before + 5)
            await until(lambda: close_wait_on(port) == 0)
            stats = d.door.stats()
            assert stats["accepted"] + stats["refused_conn_limit"] == cycles + 1
            assert stats["refused_handshake"] == stats["accepted"]
            assert not [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.WARNING]
            line, writer = await greeting(client, port)  # and the door still serves a member
            assert line == b"hello node-a\n"
            await close_all([writer])

    asyncio.run(main())


# -- TLS identity ----------------------------------------------------------------------------------


def test_tls_only_a_certified_member_reaches_on_session(pki: Pki) -> None:
    async def main() -> None:
        d_ = pki.directory
        ctx = server_context(pki.ca, d_ / "server.pem", d_ / "server.key")
        async with started(ctx, handshake_s=CEILING_S) as d:
            port = d.door.port
            # no client certificate: the server refuses the handshake (with TLS 1.3 the client may
            # only notice at its first read)
            with contextlib.suppress(ssl.SSLError, ConnectionResetError):
                reader, writer = await asyncio.open_connection(HOST, port, ssl=client_context(pki.ca))
                assert await refused(reader)
                await close_all([writer])
            await until(lambda: d.stat("refused_handshake") == 1)
            assert "TLS handshake failed" in d.rejects[0][1]

            # certified by the CA, but verify does not accept this identity
            mallory = client_context(pki.ca, d_ / "mallory.pem", d_ / "mallory.key")
            reader, writer = await asyncio.open_connection(HOST, port, ssl=mallory)
            assert await refused(reader)
            await until(lambda: d.stat("refused_peer_identity") == 1)
            assert d.rejects[1] == (
                Reason.PEER_IDENTITY,
                "127.0.0.1: certificate for ['mallory'] is not a member's",
            )
            await close_all([writer])

            # a member: on_session gets the node id verify returned
            member = client_context(pki.ca, d_ / "node-a.pem", d_ / "node-a.key")
            line, writer = await greeting(member, port)
            assert line == b"hello node-a\n" and d.sessions == ["node-a"]
            assert d.stat("sessions") == 1 and d.stat("pending") == 0
            await close_all([writer])
            await until(lambda: d.stat("sessions") == 0)

    asyncio.run(main())


# -- lifecycle -------------------------------------------------------------------------------------


def test_stop_closes_the_listener_and_every_connection(pki: Pki) -> None:
    async def main() -> None:
        ctx = server_context(pki.ca, pki.directory / "server.pem", pki.directory / "server.key")
        member = client_context(pki.ca, pki.directory / "node-a.pem", pki.directory / "node-a.key")
        d = Door(ctx, DoorLimits(handshake_s=CEILING_S))
        await d.door.start()
        port = d.door.port
        before = open_fds()
        line, session = await greeting(member, port)
        idle_reader, idle = await asyncio.open_connection(HOST, port)
        await until(lambda: d.stat("pending") == 1 and d.stat("sessions") == 1)
        await d.door.stop()
        assert await refused(idle_reader)
        await until(lambda: open_fds() <= before + 2)  # only the two client sockets are left
        with pytest.raises(OSError):
            await asyncio.open_connection(HOST, port)
        await close_all([session, idle])

    asyncio.run(main())


def test_start_says_in_one_line_why_it_cannot_listen() -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind((HOST, 0))
            taken.listen()
            door = FrontDoor(
                HOST,
                taken.getsockname()[1],
                None,
                verify=node_id_of,
                on_session=Door.on_session,  # type: ignore[arg-type]
                on_reject=lambda r, d: None,
            )
            with pytest.raises(TransportError, match="is in use: set \\[node\\] port") as info:
                await door.start()
            assert "\n" not in str(info.value)

    asyncio.run(main())
    with pytest.raises(ConfigError, match="explicit host"):
        FrontDoor("", 0, None, verify=node_id_of, on_session=Door.on_session, on_reject=lambda r, d: None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_per_source"):
        DoorLimits(max_per_source=0)


def test_per_source_counts_an_ipv6_64_as_one_source() -> None:
    assert source_key("2001:db8::1") == source_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert source_key("::ffff:10.0.0.9") == "10.0.0.9"
    assert source_key("10.0.0.9") == "10.0.0.9"


# -- open-file headroom ------------------------------------------------------------------------------


def test_fd_headroom_raises_the_soft_limit_and_warns_when_the_hard_limit_is_too_low() -> None:
    need = fd_need(DoorLimits(), links=8)
    assert need == 64 + 256 + 8 + 128
    code = (
        "import logging, resource, sys\n"
        "logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format='%(message)s')\n"
        "from p2pfl.resources import ensure_fd_headroom\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 600))\n"
        "print(ensure_fd_headroom(400), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        "print(ensure_fd_headroom(1000))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=CEILING_S, check=True
    )
    lines = out.stdout.splitlines()
    assert lines[0] == "400 400"  # raised to what is needed, not beyond
    assert "ulimit -n 1000" in lines[1] and lines[2] == "600"


# -- flood under a low open-file limit (child process) -----------------------------------------------


def fds_or_none() -> int | None:
    """The open-fd count, or None when listing it needs a descriptor that is not there."""
    try:
        return open_fds()
    except OSError:
        return None


def serve_child(pki_dir: Path, soft_limit: int, limits: dict[str, float], free: int) -> None:
    """The door's process in the flood test: lowered open-file limit, then ballast descriptors so that
    only `free` are left (the rest of a node holds fds too); prints its port, answers "stats" lines."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    ctx = server_context(pki_dir / "ca.pem", pki_dir / "server.pem", pki_dir / "server.key")

    async def main() -> None:
        d = Door(ctx, DoorLimits(**limits))  # type: ignore[arg-type]
        d.rejects = _Discard()  # a flood's refusals: counted by the door, not kept
        await d.door.start()
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        ballast = [os.open(os.devnull, os.O_RDONLY) for _ in range(soft_limit - free - open_fds())]
        print(json.dumps({"port": d.door.port, "fds": open_fds(), "ballast": len(ballast)}), flush=True)
        while (await stdin.readline()).strip() not in (b"", b"quit"):
            print(json.dumps({**d.door.stats(), "fds": fds_or_none()}), flush=True)
        await d.door.stop()
        for fd in ballast:
            os.close(fd)

    asyncio.run(main())


class _Discard(list[tuple[Reason, str]]):
    def append(self, item: tuple[Reason, str]) -> None:
        pass


class Child:
    """The door's process, driven over its stdin/stdout."""

    def __init__(self, pki_dir: Path, soft_limit: int, limits: dict[str, float], free: int) -> None:
        args = [
            sys.executable,
            "-u",
            __file__,
            "child",
            str(pki_dir),
            str(soft_limit),
            json.dumps(limits),
            str(free),
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.ready = json.loads(self.proc.stdout.readline())
        self.port = int(self.ready["port"])

    def stats(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def quit(self) -> int:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        return self.proc.wait(timeout=CEILING_S)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_flood_under_a_low_fd_limit_leaves_the_door_alive_and_serving(pki: Pki) -> None:
    """Soft limit 256, most of it held by ballast (the rest of a node), caps far above what is left:
    the door meets EMFILE under 300 idle connections, and must live and serve a member afterwards."""
    ensure_fd_headroom(4096)  # this process holds the idle connections
    limits = {"max_pending": 512, "max_per_source": 512, "max_sessions": 16, "handshake_s": 20.0}
    child = Child(pki.directory, 256, limits, free=48)
    member = client_context(pki.ca, pki.directory / "node-a.pem", pki.directory / "node-a.key")

    async def cycle() -> None:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(HOST, child.port)
            writer.write(b"\x10\x0c\x00\x04MQTT")
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def idle() -> asyncio.StreamWriter | None:
        try:
            return (await asyncio.open_connection(HOST, child.port))[1]
        except OSError:
            return None

    async def served() -> bool:
        try:
            line, writer = await greeting(member, child.port)
        except (OSError, TimeoutError):
            return False
        await close_all([writer])
        return line == b"hello node-a\n"

    async def main() -> None:
        for _ in range(2_000 // 50):  # bounded: 50 clients at a time
            await asyncio.gather(*(cycle() for _ in range(50)))
        held = [w for w in await asyncio.gather(*(idle() for _ in range(300))) if w is not None]
        await until(lambda: child.stats()["accept_errors"] > 0)  # out of fds: the case under test
        assert child.proc.poll() is None
        await close_all(held)  # the door sees them leave mid-handshake and frees their fds
        deadline = asyncio.get_running_loop().time() + CEILING_S
        while not await served():
            assert asyncio.get_running_loop().time() < deadline, f"no member served; door: {child.stats()}"
            await asyncio.sleep(0.2)  # retry pacing; the loop ends on the event (served), not a time
        await until(lambda: child.stats()["pending"] == 0 and child.stats()["sessions"] == 0)
        after = child.stats()
        assert after["established"] == 1
        assert after["refused_handshake"] + after["refused_conn_limit"] >= 2_000
        await until(lambda: (child.stats()["fds"] or 1 << 30) <= child.ready["fds"] + 4)

    try:
        asyncio.run(main())
        assert child.proc.poll() is None, "the door process died"
    finally:
        assert child.quit() == 0


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    serve_child(Path(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5]))
