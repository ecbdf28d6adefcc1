#!/usr/bin/env python3
"""Front door under the LAN attack from the issue: a flood of connect/close cycles and idle connections.

The server runs in a child process under the common open-file limit (soft RLIMIT_NOFILE 1024, set
with resource.setrlimit in the child); this process is the attacker (its own soft limit raised
first) and, afterwards, a good client. Three servers, each measured in the same run:

- baseline: a raw asyncio echo server (asyncio.start_server), what a listener without a door does;
- door: a FrontDoor with mutual TLS and its default caps;
- door, per-source cap off: every connection reaches the TLS handshake (the costlier path).

For each: the connect/send/close cycles per second the attacker achieved (accept rate, and its
ratio to the baseline), then `--idle` connections held open: is the server alive, does it still
serve a good client (within --ceiling s), what did it refuse and why, how many bytes it logged
(its stderr), and its open fds. One JSON
line last. 127.0.0.1 only; every loop is bounded.

    python scripts/bench_frontdoor.py [--cycles 5000] [--idle 2000] [--limit 1024] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
CONNECT_S = 30.0  # one connect may wait out SYN retries when a backlog is full
IDLE_CONNECT_S = 3.0  # an idle connection not made by then is not held
CYCLE_BYTES = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c"  # the start of an MQTT CONNECT


# -- certificates ------------------------------------------------------------------------------------


def make_pki(directory: Path) -> None:
    """A throwaway EC P-256 CA with a server and one member ("node-a") certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])

    def build(subject: x509.Name, key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )

    (directory / "ca.pem").write_bytes(build(ca_name, ca_key, True).public_bytes(serialization.Encoding.PEM))
    for name in ("server", "node-a"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key, False)
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


def server_context(directory: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(directory / "server.pem", directory / "server.key")
    ctx.load_verify_locations(cafile=directory / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def member_context(directory: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # a member is known by its certificate, not a host name
    ctx.load_verify_locations(cafile=directory / "ca.pem")
    ctx.load_cert_chain(directory / "node-a.pem", directory / "node-a.key")
    return ctx


# -- the server process --------------------------------------------------------------------------------


def open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # out of descriptors, or no /proc
        return None


def child_main(kind: str, limit: int, directory: Path, limits: dict[str, Any]) -> None:
    """Serve under `limit` open files; print {"port"}; answer each "stats" line on stdin with JSON."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if kind == "echo":
            counts = {"accepted": 0}

            async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                counts["accepted"] += 1
                with contextlib.suppress(OSError, asyncio.CancelledError):  # cancelled at exit: end quietly
                    while data := await reader.read(4096):
                        writer.write(data)
                        await writer.drain()
                writer.close()

            server = await asyncio.start_server(echo, HOST, 0)
            port = server.sockets[0].getsockname()[1]

            def report() -> dict[str, Any]:
                return dict(counts)

            async def stop() -> None:
                server.close()
                for task in asyncio.all_tasks() - {asyncio.current_task()}:
                    task.cancel()  # the echo handlers still reading: quietly, before asyncio.run does
                await asyncio.sleep(0)

        else:
            from p2pfl.errors import Reason, Rejected
            from p2pfl.transport.frontdoor import DoorLimits, FrontDoor

            def verify(obj: ssl.SSLObject | None) -> str:
                cert = obj.getpeercert() if obj is not None else None
                if not cert:
                    raise Rejected(Reason.PEER_IDENTITY, "no client certificate")
                subject: Any = cert.get("subject", ())
                return next(str(v) for rdn in subject for k, v in rdn if k == "commonName")

            async def on_session(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, node_id: str
            ) -> None:
                writer.write(f"hello {node_id}\n".encode())
                await writer.drain()
                await reader.read()

            door = FrontDoor(
                HOST,
                0,
                server_context(directory),
                verify=verify,
                on_session=on_session,
                on_reject=lambda reason, detail: None,  # counted in stats(); a node logs via Metrics
                limits=DoorLimits(**limits),
            )
            await door.start()
            port = door.port

            def report() -> dict[str, Any]:
                return door.stats()

            async def stop() -> None:
                await door.stop()

        print(json.dumps({"port": port}), flush=True)
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        while (await stdin.readline()).strip() == b"stats":
            print(json.dumps({**report(), "fds": open_fds()}), flush=True)
        await stop()

    asyncio.run(main())


class Server:
    """The server's process, driven over its stdin/stdout."""

    def __init__(self, kind: str, limit: int, directory: Path, limits: dict[str, Any]) -> None:
        args = [
            sys.executable,
            "-u",
            __file__,
            "--child",
            kind,
            str(limit),
            str(directory),
            json.dumps(limits),
        ]
        self.log = tempfile.TemporaryFile()  # the server's stderr: its log under attack is measured
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        assert self.proc.stdout is not None
        self.port = int(json.loads(self.proc.stdout.readline())["port"])

    def stats(self) -> dict[str, Any] | None:
        """None when the process is gone or does not answer."""
        if self.proc.poll() is not None:
            return None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write("stats\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError:
            return None
        return dict(json.loads(line)) if line else None

    def log_bytes(self) -> int:
        """Bytes the server logged so far."""
        return os.fstat(self.log.fileno()).st_size

    def quit(self) -> int | None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None
        finally:
            self.log.close()


# -- the attacker and the good client --------------------------------------------------------------------


async def cycles(port: int, count: int, concurrency: int) -> tuple[float, int]:
    """`count` connect / send a few bytes / close cycles, `concurrency` at a time: (cycles/s, errors).

    Raw non-blocking sockets, not streams: the attacker's own cost per cycle stays small, so the
    rate says more about the server."""
    loop = asyncio.get_running_loop()
    errors = 0
    todo = iter(range(count))

    async def worker() -> None:
        nonlocal errors
        for _ in todo:
            sock = socket.socket()
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (HOST, port)), CONNECT_S)
                sock.send(CYCLE_BYTES)
            except (OSError, TimeoutError):
                errors += 1  # reset by a refusing server, or no connection in time
            finally:
                sock.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - start), errors


async def hold_idle(port: int, count: int) -> list[socket.socket]:
    """Open `count` connections (200 at a time) that send nothing, and keep them; a connection not
    made within IDLE_CONNECT_S (a full backlog drops SYNs) is not counted."""
    loop = asyncio.get_running_loop()

    async def one() -> socket.socket | None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (HOST, port)), IDLE_CONNECT_S)
            return sock
        except (OSError, TimeoutError):
            sock.close()
            return None

    held: list[socket.socket] = []
    for start in range(0, count, 200):
        batch = await asyncio.gather(*(one() for _ in range(min(200, count - start))))
        held.extend(s for s in batch if s is not None)
    return held


async def served(port: int, ctx: ssl.SSLContext | None, ceiling_s: float) -> float | None:
    """Seconds until a good client got its answer (retrying), or None within the ceiling."""
    start = time.perf_counter()
    while time.perf_counter() - start < ceiling_s:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port, ssl=ctx), ceiling_s)
            if ctx is None:
                writer.write(b"ping\n")
            line = await asyncio.wait_for(reader.readline(), ceiling_s)
            writer.close()
            if line in (b"ping\n", b"hello node-a\n"):
                return time.perf_counter() - start
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.25)  # retry pacing only
    return None


async def run_one(
    name: str, kind: str, limits: dict[str, Any], args: argparse.Namespace, pki: Path
) -> dict[str, Any]:
    server = Server(kind, args.limit, pki, limits)
    ctx = member_context(pki) if kind == "door" else None
    try:
        rate, cycle_errors = await cycles(server.port, args.cycles, args.concurrency)
        held = await hold_idle(server.port, args.idle)
        alive = server.stats() is not None
        wait = await served(server.port, ctx, args.ceiling)
        during = server.stats()
        logged = server.log_bytes()
        for sock in held:
            sock.close()
        return {
            "server": name,
            "accept_rate": round(rate, 1),
            "cycle_errors": cycle_errors,
            "idle_opened": len(held),
            "alive": alive and during is not None,
            "served": wait is not None,
            "served_after_s": None if wait is None else round(wait, 2),
            "log_bytes": logged,
            "stats": during,
        }
    finally:
        server.quit()


async def bench(args: argparse.Namespace, pki: Path) -> list[dict[str, Any]]:
    from p2pfl.transport.frontdoor import DoorLimits

    defaults = DoorLimits()
    no_source_cap = {"max_per_source": defaults.max_pending}
    return [
        await run_one("baseline (asyncio echo)", "echo", {}, args, pki),
        await run_one("door (defaults)", "door", {}, args, pki),
        await run_one("door (per-source cap off)", "door", no_source_cap, args, pki),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=5000)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--limit", type=int, default=1024, help="the server's soft open-file limit")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--ceiling", type=float, default=30.0, help="seconds a good client keeps trying")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, limit, directory, limits = args.child
        child_main(kind, int(limit), Path(directory), json.loads(limits))
        return

    from p2pfl.resources import ensure_fd_headroom

    need = args.idle + args.concurrency + 256
    have = ensure_fd_headroom(need)
    if have < need:
        sys.exit(
            f"this process needs {need} open files for the attack (has {have}): run `ulimit -n {need}` first"
        )
    with tempfile.TemporaryDirectory() as tmp:
        make_pki(Path(tmp))
        rows = asyncio.run(bench(args, Path(tmp)))
    base = rows[0]["accept_rate"]
    print(
        f"server soft open-file limit {args.limit}; attacker: {args.cycles} connect/close cycles "
        f"({args.concurrency} at a time), then {args.idle} idle connections held"
    )
    for row in rows:
        stats = row["stats"] or {}
        refused = {k.removeprefix("refused_"): v for k, v in stats.items() if k.startswith("refused_")}
        after = f" (after {row['served_after_s']} s)" if row["served"] else ""
        print(f"\n{row['server']}")
        print(
            f"  accept rate       {row['accept_rate']:.0f} cycles/s  (x{row['accept_rate'] / base:.2f} of baseline)"
        )
        print(f"  alive             {'yes' if row['alive'] else 'no'}")
        print(
            f"  good client       {'yes' if row['served'] else 'no'}{after}, while {row['idle_opened']} idle held"
        )
        if refused:
            print(f"  refused           {', '.join(f'{k} {v}' for k, v in refused.items())}")
        print(f"  log written       {row['log_bytes']} bytes")
        print(f"  open fds          {stats.get('fds')}  (server stats: {json.dumps(stats)})")
    print(json.dumps({"limit": args.limit, "cycles": args.cycles, "idle": args.idle, "rows": rows}))


if __name__ == "__main__":
    main()
