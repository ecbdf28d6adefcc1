"""The front door: a bounded TCP listener that admits a connection to the broker only once it is a peer.

Why: a node's broker used to accept every TCP connection and keep it until MQTT gave up on it. A
machine on the LAN could exhaust the node's file descriptors (1,800 connect/close cycles in 3 s,
or 1,500 idle connections, at the usual limit of 1,024), and sockets closed by the client before
CONNECT sat in CLOSE-WAIT until garbage collection. The door bounds every stage before a peer is
known:

- at most `max_pending` connections between accept and a verified peer, `max_per_source` of them
  from one address (an IPv6 /64 counts as one address: a LAN host picks any address in its /64;
  verified members behind one address are not limited by it), and `max_sessions` verified sessions; a connection over a cap is reset at accept (SO_LINGER 0, closed
  before any asyncio object exists), so a flood costs one accept and one close per connection;
- the TLS handshake and the `verify` callback finish within `handshake_s` of the accept, or the
  socket is aborted (an idle or half-open connection is held `handshake_s` at most);
- when the pending cap (or a source's cap) is full, a newcomer evicts the oldest unauthenticated
  connection (of that source) that has waited more than `evict_after_s` (1 s), rather than being
  refused: a member's handshake takes milliseconds, so idle connections cannot lock members out
  for `handshake_s` (slowloris); connections younger than that are not evicted, so a connect
  flood is refused and does not evict members mid-handshake;
- the door never holds more connections than the open-file limit allows less a reserve for the
  rest of the node (links, files): with caps above what the limit allows, the limit wins;
- out of file descriptors at accept anyway (EMFILE/ENFILE: something else holds them), the door
  keeps one spare descriptor to accept-and-reset the waiting client, so the backlog drains with
  refusals and the node lives on.

Every refusal is reported once through `on_reject(reason, detail)` (detail starts with the source
address); the door logs no line per refusal itself. With `ssl_context` None the door is plain TCP
(unit tests, a federation without TLS): `verify(None)` is called at once, and an idle connection
is the session layer's to time out.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from p2pfl.errors import ConfigError, Reason, Rejected, TransportError
from p2pfl.metrics import LogLimiter
from p2pfl.resources import FILES_MARGIN

__all__ = [
    "DoorLimits",
    "FrontDoor",
    "fd_budget",
    "source_key",
]

log = logging.getLogger("p2pfl.transport.frontdoor")

BACKLOG = 128  # kernel queue of completed handshakes; the door drains it faster than a flood fills it
ACCEPT_BURST = 32  # accepts in a row before yielding to the handshakes in progress
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_GONE_BEFORE_ACCEPT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN})
_LINGER_RESET = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close sends RST, frees the fd at once
MAX_BACKOFF_S = 1.0
EVICT_AFTER_S = 1.0  # an unauthenticated connection this old may give its slot to a newcomer
FD_RESERVE = FILES_MARGIN  # descriptors the door leaves to the rest of the node


@dataclass(frozen=True)
class DoorLimits:
    """Caps on what unauthenticated (and authenticated) connections may hold."""

    max_pending: int = 64  # connections accepted but not yet authenticated (TLS done + verified), in all
    max_per_source: int = 8  # unauthenticated connections from one source IP
    handshake_s: float = 10.0  # accept -> TLS handshake done and peer verified
    max_sessions: int = 256  # established (authenticated) sessions in all
    max_sessions_per_node: int = 4  # established sessions of one verified node id (a link and its retries)

    def __post_init__(self) -> None:
        for name in ("max_pending", "max_per_source", "max_sessions", "max_sessions_per_node"):
            if getattr(self, name) < 1:
                raise ConfigError(f"front door {name} must be at least 1, not {getattr(self, name)}")
        if not self.handshake_s > 0:
            raise ConfigError(f"front door handshake_s must be positive, not {self.handshake_s}")


def source_key(host: str) -> str:
    """The address a per-source cap counts: the IPv4 address, or the /64 of an IPv6 address."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _reset(sock: socket.socket) -> None:
    """Close with RST (no FIN_WAIT/TIME_WAIT on our side); the fd is free when this returns."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # already reset by the peer: a plain close frees it just as well
    sock.close()


def _abort(transport: asyncio.WriteTransport) -> None:
    """Abort a connection with RST; asyncio closes its socket on the next loop iteration."""
    try:
        raw = transport.get_extra_info("socket")
    except AttributeError:  # an SSL transport already closed has no socket to ask any more
        raw = None
    if raw is not None:
        try:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    transport.abort()


def fd_budget() -> int:
    """Connections the door may hold under the current open-file limit, leaving FD_RESERVE (or half
    of a small limit) to the rest of the node."""
    try:
        import resource
    except ImportError:
        return 1 << 30
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(soft // 2, soft - FD_RESERVE)


def _spare_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


class FrontDoor:
    """A bounded listener: admits a connection to `on_session` only as a verified peer, within caps."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        *,
        verify: Callable[[ssl.SSLObject | None], str],
        on_session: Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[None]],
        on_reject: Callable[[Reason, str], None],
        limits: DoorLimits = DoorLimits(),  # noqa: B008 - frozen, shared safely
    ) -> None:
        """`verify(ssl object)` returns the peer's node id or raises Rejected; `on_session` owns the
        streams until it returns; `on_reject` hears every refusal (and must not block)."""
        if not host:
            raise ConfigError("the front door needs an explicit host address to bind (no wildcard default)")
        if not 0 <= port <= 65535:
            raise ConfigError(f"port {port} out of range")
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._verify = verify
        self._on_session = on_session
        self._on_reject = on_reject
        self.limits = limits
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._fresh: set[socket.socket] = set()  # accepted, not yet handed to asyncio
        self._spare: int | None = None
        self._stopping = False
        # pending connections, oldest first: when accepted, source, socket
        self._waiting: dict[asyncio.Task[None], tuple[float, str, socket.socket]] = {}
        self._evicted: set[asyncio.Task[None]] = set()
        self._sessions = 0
        self._per_source: Counter[str] = Counter()
        self._per_node: Counter[str] = Counter()  # established sessions by verified node id
        self._node_sessions: dict[str, list[asyncio.StreamWriter]] = {}  # by node id, oldest first
        self._refused: Counter[str] = Counter()
        self._accepted = 0
        self._established = 0
        self._accept_errors = 0
        self._fd_budget = 1 << 30
        self._logs = LogLimiter(log)
        # pending connections this old may be evicted for a newcomer when a cap is full (math.inf: never)
        self.evict_after_s = min(EVICT_AFTER_S, limits.handshake_s / 2)

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0), else the configured one."""
        if self._listener is not None:
            return int(self._listener.getsockname()[1])
        return self._port

    async def start(self) -> None:
        """Bind and listen on the explicit host; a failure is a TransportError of one line."""
        if self._listener is not None:
            return
        self._listener = await self._bind()
        self._stopping = False
        self._fd_budget = fd_budget()  # read now: raise the limit (ensure_fd_headroom) before start
        if self._fd_budget < self.limits.max_pending + self.limits.max_sessions:
            log.warning(
                "front door: the open-file limit allows %d connections, less than max_pending + max_sessions "
                "= %d; raise it (ulimit -n) or lower the caps",
                self._fd_budget,
                self.limits.max_pending + self.limits.max_sessions,
            )
        self._spare = _spare_fd()
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(self._listener))
        log.info(
            "front door listening on %s:%d (%s)",
            self._host,
            self.port,
            "TLS" if self._ssl is not None else "plain TCP",
        )

    async def _bind(self) -> socket.socket:
        where = f"port {self._port} on {self._host}"
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise TransportError(
                f"[node] host {self._host!r} is not an address of this machine ({exc.strerror}); set it to one"
            ) from None
        family, kind, proto, _, address = infos[0]
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise TransportError(f"cannot open a socket for {where}: {exc.strerror or exc}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart despite TIME_WAIT
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                message = f"{where} is in use: set [node] port to a free port (or stop the process using it)"
            elif exc.errno == errno.EADDRNOTAVAIL:
                message = f"[node] host {self._host} is not an address of this machine: set it to one of its own addresses"
            elif exc.errno == errno.EACCES:
                message = f"{where} needs privileges to bind: set [node] port to 1024 or above"
            else:
                message = f"cannot listen on {where}: {exc.strerror or exc}"
            raise TransportError(message) from None
        return sock

    async def stop(self) -> None:
        """Close the listener and every connection the door holds, handshaking or established."""
        self._stopping = True
        accepting, self._accepting = self._accepting, None
        if accepting is not None:
            accepting.cancel()
            await asyncio.gather(accepting, return_exceptions=True)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=self.limits.handshake_s)
            if stuck:  # an on_session that swallows cancellation: its socket is already aborted
                log.warning("front door: %d session handlers ignored the stop", len(stuck))
        for sock in self._fresh:  # cancelled before their handler ran: never handed to asyncio
            _reset(sock)
        self._fresh.clear()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        self._waiting.clear()
        self._evicted.clear()
        self._sessions = 0
        self._per_source.clear()
        self._per_node.clear()
        self._node_sessions.clear()

    def stats(self) -> dict[str, int]:
        """Now: pending, sessions, fd_budget (connections the door may hold); since it was made:
        accepted, established, accept_errors (EMFILE and the like), refused_<reason>."""
        out = {
            "pending": len(self._waiting),
            "sessions": self._sessions,
            "accepted": self._accepted,
            "established": self._established,
            "accept_errors": self._accept_errors,
            "fd_budget": min(self._fd_budget, self.limits.max_pending + self.limits.max_sessions),
        }
        for reason in (Reason.CONN_LIMIT, Reason.HANDSHAKE, Reason.PEER_IDENTITY):
            out[f"refused_{reason.value}"] = 0
        for name, count in self._refused.items():
            out[f"refused_{name}"] = count
        return out

    # -- accepting -----------------------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        burst = 0
        backoff = 0.0
        while True:
            burst += 1
            if burst >= ACCEPT_BURST:  # sock_accept does not yield while the backlog is full
                burst = 0
                await asyncio.sleep(0)
            try:
                conn, address = await loop.sock_accept(listener)
            except OSError as exc:
                if exc.errno in _GONE_BEFORE_ACCEPT:
                    continue
                self._accept_errors += 1
                if exc.errno in _OUT_OF_RESOURCES:
                    self._logs.log(
                        logging.WARNING,
                        "front door out of file descriptors",
                        self._host,
                        "front door: accept failed (%s), refusing new connections; raise the open-file limit "
                        "(ulimit -n) or lower the door's limits",
                        exc.strerror,
                    )
                    if self._shed(listener):
                        continue
                else:
                    self._logs.log(
                        logging.ERROR,
                        "front door accept error",
                        self._host,
                        "front door: accept failed: %s",
                        exc,
                    )
                backoff = min(max(backoff * 2, 0.05), MAX_BACKOFF_S)
                await asyncio.sleep(backoff)  # a back-off, not a wait for an event: nothing signals fds freed
                continue
            backoff = 0.0
            try:
                self._admit(conn, address)
            except Exception as exc:  # noqa: BLE001 - a bug here must not end accepting for good
                self._logs.log(
                    logging.ERROR, "front door admit failed", type(exc).__name__, "front door: %r", exc
                )
                if conn in self._fresh or conn.fileno() == -1:
                    continue  # its handler owns it (or it is closed already)
                _reset(conn)

    def _shed(self, listener: socket.socket) -> bool:
        """Out of fds: spend the spare one to accept a waiting client and reset it, then take the spare
        back. The backlog drains with refusals instead of hanging clients, and the loop does not spin
        on a listener that stays readable. False when there was no spare or no client waiting."""
        if self._spare is None:
            self._spare = _spare_fd()  # lost when the limit was reached with it closed: take it back
            if self._spare is None:
                return False
        os.close(self._spare)
        self._spare = None
        try:
            conn, address = listener.accept()
        except OSError:
            self._spare = _spare_fd()
            return False
        _reset(conn)
        self._spare = _spare_fd()  # after the reset: that freed the descriptor it needs
        self._refuse(Reason.CONN_LIMIT, self._source(address), "out of file descriptors")
        return True

    @staticmethod
    def _source(address: object) -> str:
        return source_key(str(address[0])) if isinstance(address, tuple) and address else str(address)

    def _admit(self, conn: socket.socket, address: object) -> None:
        """Refuse at once when over a cap (the fd is freed before this returns), else start the handshake."""
        source = self._source(address)
        limits = self.limits
        over = ""
        if len(self._waiting) >= limits.max_pending and not self._evict(None):
            over = (
                f"{len(self._waiting)} connections awaiting authentication (max_pending {limits.max_pending})"
            )
        elif self._per_source[source] >= limits.max_per_source and not self._evict(source):
            over = f"{self._per_source[source]} connections from this source (max_per_source {limits.max_per_source})"
        elif self._sessions >= limits.max_sessions:
            over = f"{self._sessions} sessions (max_sessions {limits.max_sessions})"
        elif len(self._waiting) + self._sessions >= self._fd_budget:
            over = f"{len(self._waiting) + self._sessions} connections held (open-file limit allows {self._fd_budget})"
        if over:
            _reset(conn)
            self._refuse(Reason.CONN_LIMIT, source, over)
            return
        self._accepted += 1
        self._per_source[source] += 1
        self._fresh.add(conn)
        task = asyncio.get_running_loop().create_task(self._serve(conn, source))
        self._waiting[task] = (time.monotonic(), source, conn)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._evicted.discard)

    def _evict(self, source: str | None) -> bool:
        """Free the slot of the oldest pending connection (from `source`, or any) if it has waited over
        evict_after_s; it is cancelled, reported as a HANDSHAKE refusal, and its fd freed next iteration."""
        now = time.monotonic()
        for task, (accepted_at, its_source, conn) in self._waiting.items():
            if now - accepted_at < self.evict_after_s:
                return False  # oldest first: all the others are younger still
            if source is None or its_source == source:
                self._release(task)
                self._evicted.add(task)
                task.cancel()
                if conn in self._fresh:  # its handler never ran: asyncio never saw the socket
                    self._fresh.discard(conn)
                    _reset(conn)
                self._refuse(
                    Reason.HANDSHAKE,
                    its_source,
                    f"evicted after {now - accepted_at:.1f} s without authenticating (pending slots full)",
                )
                return True
        return False

    def _release(self, task: asyncio.Task[None]) -> None:
        """Give back a pending connection's slots (at most once: eviction and the handler both call it)."""
        entry = self._waiting.pop(task, None)
        if entry is not None:
            self._drop_source(entry[1])

    def _drop_source(self, source: str) -> None:
        self._per_source[source] -= 1
        if self._per_source[source] <= 0:
            del self._per_source[source]

    def _refuse(self, reason: Reason, source: str, detail: str) -> None:
        self._refused[reason.value] += 1
        try:
            self._on_reject(reason, f"{source}: {detail}")
        except Exception as exc:  # noqa: BLE001 - a reporting bug must not stop the door
            self._logs.log(
                logging.ERROR,
                "front door on_reject failed",
                type(exc).__name__,
                "front door: on_reject raised %r",
                exc,
            )

    # -- one connection ------------------------------------------------------------------------

    async def _serve(self, conn: socket.socket, source: str) -> None:
        """Handshake and verify within handshake_s, then hand the streams to on_session."""
        self._fresh.discard(conn)
        me = asyncio.current_task()
        assert me is not None
        try:
            streams = await self._authenticate(conn, source)
        except asyncio.CancelledError:
            self._release(me)
            if me in self._evicted:  # evicted for a newcomer: already reported; asyncio closed the socket
                return
            raise
        if me not in self._waiting:  # evicted after its handshake had completed
            if streams is not None:
                _abort(streams[1].transport)
            return
        if streams is None:
            self._release(me)
            return
        reader, writer, node_id = streams
        if len(self._node_sessions.get(node_id, ())) >= self.limits.max_sessions_per_node:  # one member, many
            self._close_oldest(node_id, source)
        elif self._sessions >= self.limits.max_sessions:  # others finished their handshakes first
            self._release(me)
            _abort(writer.transport)
            over = f"{self._sessions} sessions (max_sessions {self.limits.max_sessions})"
            self._refuse(Reason.CONN_LIMIT, source, over)
            return
        self._release(me)  # a verified member counts against max_sessions, not its source's cap
        self._sessions += 1
        self._per_node[node_id] += 1
        self._node_sessions.setdefault(node_id, []).append(writer)
        self._established += 1
        try:
            await self._on_session(reader, writer, node_id)
        except Exception as exc:  # noqa: BLE001 - one session's failure is not the door's
            self._logs.log(
                logging.WARNING,
                "front door session failed",
                node_id,
                "front door: session of %s ended: %r",
                node_id,
                exc,
            )
        finally:
            try:
                await self._close(writer)
            finally:
                self._sessions -= 1
                self._per_node[node_id] -= 1
                if self._per_node[node_id] <= 0:
                    del self._per_node[node_id]
                mine = self._node_sessions.get(node_id, [])
                if writer in mine:
                    mine.remove(writer)
                if not mine:
                    self._node_sessions.pop(node_id, None)

    def _close_oldest(self, node_id: str, source: str) -> None:
        """A member at its session cap opens another: close its oldest session, not the new one. Its
        old sessions may be dead without our knowing (a client that gave up mid-connect and left its
        socket open), and refusing the newcomer would lock the member out for good; the cap still
        holds, and only the member's own sessions pay."""
        held = self._node_sessions.get(node_id) or []
        if not held:
            return
        _abort(held.pop(0).transport)  # its session ends and gives its slots back
        cap = self.limits.max_sessions_per_node
        detail = f"closed the oldest of {len(held) + 1} sessions of {node_id} to admit a newer one (max_sessions_per_node {cap})"
        self._refuse(Reason.CONN_LIMIT, source, detail)

    async def _authenticate(
        self, conn: socket.socket, source: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str] | None:
        """The streams and the peer's node id, or None after refusing (reported, socket aborted)."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        reason = Reason.HANDSHAKE
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            async with asyncio.timeout(limits.handshake_s):
                if self._ssl is not None:
                    transport, _ = await loop.connect_accepted_socket(
                        lambda: protocol,
                        conn,
                        ssl=self._ssl,
                        ssl_handshake_timeout=limits.handshake_s,
                        ssl_shutdown_timeout=limits.handshake_s,  # a closing session holds its fd this long at most
                    )
                else:
                    transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn)
        except TimeoutError:
            detail = f"not authenticated within {limits.handshake_s:g} s"
        except Exception as exc:  # noqa: BLE001 - ssl.SSLError, reset, EOF: all one refusal
            detail = f"TLS handshake failed: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc!r}"
        else:
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            try:
                return reader, writer, self._verify(writer.get_extra_info("ssl_object"))
            except Rejected as exc:
                reason, detail = exc.reason, exc.detail or "peer not accepted"
            except Exception as exc:  # noqa: BLE001 - a verify bug refuses the peer, never leaks its socket
                detail = f"verify failed: {exc!r}"
            _abort(transport)
            self._refuse(reason, source, detail[:200])
            return None
        # asyncio aborted the transport it made; its close happens on the next iteration: make it a reset
        try:
            if conn.fileno() != -1:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
        self._refuse(reason, source, detail[:200])
        return None

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        """End a session: a graceful close bounded by handshake_s; an abort when stopping or stuck."""
        if self._stopping:
            _abort(writer.transport)
            return
        try:
            writer.close()
            async with asyncio.timeout(self.limits.handshake_s):
                await writer.wait_closed()
        except asyncio.CancelledError:
            _abort(writer.transport)
            raise
        except Exception:  # noqa: BLE001 - timed out or reset: the abort frees the fd
            _abort(writer.transport)
