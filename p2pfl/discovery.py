"""Find the other nodes of our federation on the local network with mDNS / DNS-SD (zeroconf).

Each node advertises one `_p2pfl._tcp.local.` service whose address and port are those of its own
MQTT broker, plus TXT items: node id, federation id, name, certificate fingerprint, the certificate
itself, and the node's signature over all that with the time it signed. mDNS is unauthenticated, so
anyone on the link can advertise anything: here we only keep the advertisements well-formed, of our
federation, and current. Whether one is a member's is for `p2pfl.membership` to check (root-signed
certificate, the node's own signature); links prove identity again by mutual TLS.

mDNS is scoped to the interfaces the caller names (tests and scripts: ``["127.0.0.1"]``); nothing
is ever bound to 0.0.0.0. Stock zeroconf receives on a wildcard socket (0.0.0.0:5353), which takes
unicast from anyone who can route to the host and, on Linux, multicast joined on *any* interface.
We hand zeroconf our own sockets instead (see `open_zeroconf`):

- one receiving socket bound to the group, 224.0.0.251:5353, so unicast cannot reach it, with the
  group joined only on the configured interface addresses and IP_MULTICAST_ALL off, so multicast
  from other interfaces is not delivered to it either; a kernel socket filter (classic BPF) drops
  datagrams whose IPv4 source lies outside the configured networks (each interface address with
  its prefix; 127.0.0.1 gives 127.0.0.0/8) before zeroconf parses a byte;
- one sending socket per interface, bound to interface-address:5353 (mDNS wants source port 5353),
  with a drop-everything socket filter, so unsolicited unicast sent to it is never read.

So no mDNS arrives by unicast at all. We ask only QM questions, whose answers are multicast; what
is lost is zeroconf's unicast answers to its QU name probes, so a clash of instance names (random
node ids) is detected from multicast answers only.

zeroconf does not tell its listeners which address a record came from, so on top of the kernel
filter `Discovery` checks the advertised address (the one we would connect to) against the same
networks and ignores, counts (Reason.FOREIGN_ADVERT) and logs once per address what falls outside.
Several processes on one host share port 5353 (SO_REUSEADDR / SO_REUSEPORT), so many nodes can run
on loopback, each with its own broker port. The kernel filters are Linux-only; elsewhere only the
advertised-address check applies (logged as a warning at start).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import ipaddress
import logging
import random
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import ifaddr
import zeroconf._core as _zc_core  # only to hand Zeroconf our sockets; see open_zeroconf
from zeroconf import (
    BadTypeInNameException,
    DNSQuestionType,
    IPVersion,
    NonUniqueNameException,
    ServiceInfo,
    Zeroconf,
)
from zeroconf import ServiceStateChange as Change
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .errors import ConfigError, P2PFLError, Reason

__all__ = [
    "Discovery",
    "MDNS_GROUP",
    "MDNS_PORT",
    "PeerAd",
    "SERVICE_TYPE",
    "TXT_VERSION",
    "ad_from_info",
    "allowed_networks",
    "open_zeroconf",
]

log = logging.getLogger(__name__)

SERVICE_TYPE = "_p2pfl._tcp.local."
TXT_VERSION = "2"  # 2: the certificate and the node's signature ride in the TXT record

RESOLVE_TIMEOUT_MS = 3000  # one resolution of an added / updated service, then we give up on it
# Record TTLs we advertise (the host's A and the SRV and TXT records). zeroconf raises a received PTR's TTL
# to at least 1125 s (_DNS_PTR_MIN_TTL) and its browser drops a service only when the PTR expires or a
# goodbye arrives, so a node gone without one (kill -9, power, cable) would stay advertised ~20 min.
# Liveness is ours instead, and passive: every node multicasts its own records every ~ANNOUNCE_S (one
# packet, which refreshes every node's cache), and a liveness pass every LIVENESS_S only reads each peer's
# records from our cache; nothing is queried. So each node receives N packets per ANNOUNCE_S whatever
# happens. (Asking each peer once its records expired cost O(N^2) queries and answers per TTL, and a
# lost answer a retry: at 128 nodes on 2 cores that was ~1,100 packets/s sent, 96,000 deliveries/s
# dropped by full socket buffers, and a quarter of each node's CPU.) A peer whose records expired
# (RECORD_TTL_S: about three announcements missed), LIVENESS_STRIKES passes in a row over at least
# LIVENESS_SILENCE_S, is dropped if its broker port refuses connections (the process is gone: ~2.5 min
# after a kill -9) or has not answered for LIVENESS_GONE_S (host down, cable); one whose port still
# accepts (busy, frozen) is kept. A dropped peer is back as soon as its next announcement arrives.
ANNOUNCE_S = 20.0
RECORD_TTL_S = 75
LIVENESS_S = 15.0
LIVENESS_STRIKES = 3
LIVENESS_SILENCE_S = 60.0  # ...and its records expired this long: then its broker port is tried
LIVENESS_GONE_S = 180.0  # a port that neither accepts nor refuses: gone after this much silence
PROBE_TIMEOUT_S = 3.0
RECEIVE_BUFFER_BYTES = 4 << 20
MAX_SILENT = 1024  # dropped peers still looked up in our cache; bounds what forged ads can make us keep
MAX_TXT_BYTES = 1024  # whole TXT record; ours is ~370 bytes, anything much bigger is not ours
MAX_TXT_ITEM = 250  # bytes of a value in one TXT item (an item, "key=value", is at most 255 bytes)
MAX_CERT_PARTS = 3  # the certificate is cut into items c0, c1, ... of at most MAX_TXT_ITEM bytes
SIGNATURE_BYTES = 64
MAX_NAME_BYTES = 64  # UTF-8; keeps "name=..." well inside one 255-byte TXT item

MAX_INTERFACES = 16  # bounds the socket filter program (3 instructions a network) and the group joins
MAX_FOREIGN_TRACKED = 1024  # distinct foreign addresses counted / logged; beyond that, ignored silently

MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353

_HEX16 = re.compile(r"[0-9a-f]{16}")
_REQUIRED_KEYS = ("id", "fed", "name", "fp", "v", "t")
_STAMP = re.compile(r"[0-9]{1,12}")
READY_KEY = "r"  # optional TXT item: "1" once the node has warmed up, certified its peers, linked round 1


@dataclass(frozen=True)
class PeerAd:
    """One node's advertisement: who it claims to be and where its broker listens."""

    node_id: str
    federation_id: str
    name: str
    host: str
    port: int
    fingerprint: str
    ready: bool = False  # waits for nobody but the others to start round 1 (TXT "r=1"); a hint, unsigned
    certificate: bytes = b""  # the node's p2pfl certificate (TXT c0, c1, ...), root-signed
    signed_at: int = 0  # when the node signed this advertisement, Unix seconds (TXT t)
    signature: bytes = b""  # the node's Ed25519 signature (TXT s); see p2pfl.membership


def _valid_name(name: str) -> bool:
    return 0 < len(name.encode("utf-8")) <= MAX_NAME_BYTES and name.isprintable()


def _check_own(own: PeerAd) -> None:
    """Refuse to advertise something our own peers would discard; better to fail loudly at start."""
    problems = []
    for field in ("node_id", "federation_id", "fingerprint"):
        if not _HEX16.fullmatch(getattr(own, field)):
            problems.append(f"{field} must be 16 lowercase hex chars")
    if not _valid_name(own.name):
        problems.append(f"name must be printable, 1-{MAX_NAME_BYTES} bytes of UTF-8")
    try:
        if ipaddress.ip_address(own.host).version != 4:
            problems.append("host must be an IPv4 address")
    except ValueError:
        problems.append(f"host {own.host!r} must be an IPv4 address, not a host name")
    if not 0 < own.port < 65536:
        problems.append("port must be 1-65535")
    if not 0 < len(own.certificate) <= MAX_TXT_ITEM * MAX_CERT_PARTS:
        problems.append(f"certificate must be 1-{MAX_TXT_ITEM * MAX_CERT_PARTS} bytes")
    if len(own.signature) != SIGNATURE_BYTES or not _STAMP.fullmatch(str(own.signed_at)):
        problems.append("the advertisement must be signed (p2pfl.membership.sign_ad)")
    if problems:
        raise ConfigError("discovery advertisement invalid: " + "; ".join(problems))


def _in_networks(address: str, networks: Sequence[ipaddress.IPv4Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _service_name(node_id: str) -> str:
    return f"{node_id}.{SERVICE_TYPE}"


def _own_info(own: PeerAd) -> ServiceInfo:
    return ServiceInfo(
        SERVICE_TYPE,
        _service_name(own.node_id),
        port=own.port,
        properties={
            "id": own.node_id,
            "fed": own.federation_id,
            "name": own.name,
            "fp": own.fingerprint,
            "v": TXT_VERSION,
            "t": str(own.signed_at),
            "s": own.signature,
            **_certificate_items(own.certificate),
            **({READY_KEY: "1"} if own.ready else {}),
        },
        # One host name per node, so several nodes on one machine do not share (and fight over) it.
        server=f"p2pfl-{own.node_id}.local.",
        parsed_addresses=[own.host],
        host_ttl=RECORD_TTL_S,
        other_ttl=RECORD_TTL_S,
    )


def _certificate_items(certificate: bytes) -> dict[str, bytes]:
    """The certificate cut into TXT items c0, c1, ... (raw bytes: TXT values are binary)."""
    parts = range(0, len(certificate), MAX_TXT_ITEM)
    return {f"c{i}": certificate[at : at + MAX_TXT_ITEM] for i, at in enumerate(parts)}


def _certificate_from(props: dict[bytes, bytes | None]) -> bytes:
    parts: list[bytes] = []
    for i in range(MAX_CERT_PARTS):
        part = props.get(f"c{i}".encode())
        if not part:
            break
        parts.append(part)
    if not parts:
        raise ValueError("TXT item 'c0' (the certificate) missing or empty")
    return b"".join(parts)


def ad_from_info(info: ServiceInfo) -> PeerAd:
    """Turn a resolved service into a PeerAd, or raise ValueError saying why it is not acceptable.

    Everything here came off the network from anyone on the link, so check every field.
    """
    if len(info.text) > MAX_TXT_BYTES:
        raise ValueError(f"TXT record of {len(info.text)} bytes")
    props = info.properties
    txt: dict[str, str] = {}
    for key in _REQUIRED_KEYS:
        raw = props.get(key.encode())
        if raw is None:
            raise ValueError(f"TXT item {key!r} missing or empty")
        try:
            txt[key] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"TXT item {key!r} is not UTF-8") from None
    if txt["v"] != TXT_VERSION:
        raise ValueError(f"unsupported TXT version {txt['v'][:8]!r}")
    for key in ("id", "fed", "fp"):
        if not _HEX16.fullmatch(txt[key]):
            raise ValueError(f"TXT item {key!r} is not 16 hex chars")
    if not _STAMP.fullmatch(txt["t"]):
        raise ValueError("TXT item 't' is not a time in seconds")
    signature = props.get(b"s")
    if signature is None or len(signature) != SIGNATURE_BYTES:
        raise ValueError(f"TXT item 's' is not a {SIGNATURE_BYTES}-byte signature")
    if not _valid_name(txt["name"]):
        raise ValueError("TXT item 'name' empty, too long or not printable")
    if info.name.lower() != _service_name(txt["id"]):
        raise ValueError("instance name does not match the advertised node id")
    port = info.port
    if port is None or not 0 < port < 65536:
        raise ValueError(f"bad port {port!r}")
    host = None
    for addr in info.parsed_addresses(IPVersion.V4Only):
        ip = ipaddress.ip_address(addr)
        if not (ip.is_unspecified or ip.is_multicast or ip.is_reserved):
            host = addr
            break
    if host is None:
        raise ValueError("no usable IPv4 address")
    return PeerAd(
        node_id=txt["id"],
        federation_id=txt["fed"],
        name=txt["name"],
        host=host,
        port=port,
        fingerprint=txt["fp"],
        ready=props.get(READY_KEY.encode()) == b"1",
        certificate=_certificate_from(props),
        signed_at=int(txt["t"]),
        signature=signature,
    )


def _log_failure(task: asyncio.Task[None]) -> None:
    """A background task that died must say so: discovery would go on without its liveness checks
    or announcements."""
    if not task.cancelled() and task.exception() is not None:
        log.error("discovery: %s stopped: %r", task.get_name(), task.exception())


_SAYS = {True: "its broker port accepts connections", None: "its broker port does not answer yet"}


async def _listening(host: str, port: int) -> bool | None:
    """Does anything accept TCP connections at host:port? False when refused (nothing listens there:
    the process is gone), None when no answer (host down or unreachable, or a full backlog). The
    connection is reset at once; the peer's front door counts it as a failed handshake."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return False
    except (TimeoutError, OSError):
        return None
    writer.transport.abort()
    return True


# --- sockets scoped to the configured interfaces ---------------------------------------------------

_IS_LINUX = sys.platform.startswith("linux")
# Linux values; Python's socket module lacks both names
_IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
# classic BPF opcodes (linux/filter.h) and the offset that addresses the IP header from a UDP socket
_BPF_LD_W_ABS = 0x00 | 0x00 | 0x20
_BPF_ALU_AND_K = 0x04 | 0x50 | 0x00
_BPF_JMP_JEQ_K = 0x05 | 0x10 | 0x00
_BPF_RET_K = 0x06 | 0x00
_SKF_NET_OFF = -0x100000
_IPV4_SRC_OFFSET = 12


def allowed_networks(interfaces: Sequence[str]) -> list[ipaddress.IPv4Network]:
    """Each configured interface address with the prefix this host gives it (127.0.0.1 -> 127.0.0.0/8).

    These are the networks whose members may advertise to us; an address the host does not have is a
    configuration error (we could not join the group there anyway).
    """
    if not 0 < len(interfaces) <= MAX_INTERFACES:
        raise ConfigError(f"discovery needs 1-{MAX_INTERFACES} interface addresses, got {len(interfaces)}")
    prefixes: dict[str, int] = {}
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and isinstance(ip.ip, str):
                prefixes.setdefault(ip.ip, ip.network_prefix)
    networks: list[ipaddress.IPv4Network] = []
    for address in interfaces:
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f"discovery interface {address!r} is not an IPv4 address") from None
        if parsed.version != 4 or parsed.is_unspecified or parsed.is_multicast:
            raise ConfigError(f"discovery interface {address!r} must be one IPv4 address of this host")
        if address not in prefixes:
            raise ConfigError(f"discovery interface {address} is not an address of this host")
        network = ipaddress.IPv4Network(f"{address}/{prefixes[address]}", strict=False)
        if network not in networks:
            networks.append(network)
    return networks


def _source_filter(networks: Sequence[ipaddress.IPv4Network]) -> bytes:
    """A classic BPF program that keeps datagrams whose IPv4 source is in `networks`, drops the rest.

    No networks: drop everything (the sending sockets, which must never read anything).
    """
    program: list[tuple[int, int, int, int]] = []
    count = len(networks)
    for i, network in enumerate(networks):
        program.append((_BPF_LD_W_ABS, 0, 0, (_SKF_NET_OFF + _IPV4_SRC_OFFSET) & 0xFFFFFFFF))
        program.append((_BPF_ALU_AND_K, 0, 0, int(network.netmask)))
        # on a match skip the remaining networks and the drop, landing on the accept
        program.append((_BPF_JMP_JEQ_K, 3 * (count - i - 1) + 1, 0, int(network.network_address)))
    program.append((_BPF_RET_K, 0, 0, 0))  # drop
    if networks:
        program.append((_BPF_RET_K, 0, 0, 0xFFFFFFFF))  # accept the whole datagram
    return b"".join(struct.pack("HBBI", *ins) for ins in program)


def _attach_filter(sock: socket.socket, program: bytes) -> None:
    """Attach a classic BPF program (SO_ATTACH_FILTER): the kernel copies it, so the buffer can go."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buffer))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


def _udp_socket() -> socket.socket:
    """A UDP socket that can share port 5353 with other mDNS stacks and nodes on this host."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def _listen_socket(interfaces: Sequence[str], networks: Sequence[ipaddress.IPv4Network]) -> socket.socket:
    """The one receiving socket: bound to the group, member only on `interfaces`, sources filtered.

    Filters are set before bind, so no datagram is ever queued unfiltered.
    """
    sock = _udp_socket()
    try:
        # a busy node (TLS handshakes at start, training) reads late; a deeper queue loses fewer
        # announcements and answers (the kernel caps it at net.core.rmem_max)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        if _IS_LINUX:
            # else a socket receives every group joined by any socket of the host, on any interface
            sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
            _attach_filter(sock, _source_filter(networks))
        sock.bind((MDNS_GROUP, MDNS_PORT))  # the group address: unicast to this host never matches
        for address in interfaces:
            membership = socket.inet_aton(MDNS_GROUP) + socket.inet_aton(address)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    except BaseException:
        sock.close()
        raise
    return sock


def _respond_socket(address: str) -> socket.socket:
    """A sending socket for one interface: source address:5353, multicast out of that interface only.

    It is bound to a unicast address, so it would take unicast from anyone; its filter drops all of it.
    """
    sock = _udp_socket()
    try:
        if _IS_LINUX:
            _attach_filter(sock, _source_filter([]))
        sock.bind((address, MDNS_PORT))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, struct.pack("B", 255))  # RFC 6762 11
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, struct.pack("B", 1))  # same-host nodes
    except BaseException:
        sock.close()
        raise
    return sock


_zc_patch_lock = threading.Lock()


async def open_zeroconf(
    interfaces: Sequence[str], networks: Sequence[ipaddress.IPv4Network] | None = None
) -> AsyncZeroconf:
    """An AsyncZeroconf on the running loop that uses only our scoped sockets (see the module doc).

    zeroconf 0.154 has no way to pass sockets in; its constructor calls `create_sockets` from
    `zeroconf._core`, which we swap for one returning ours while (synchronously) constructing, for
    this thread only. If a zeroconf version ignores the swap and opens sockets itself, the check
    at the end refuses to go on rather than run on a wildcard socket.
    """
    interfaces = list(dict.fromkeys(interfaces))  # one sending socket per address
    if networks is None:
        networks = allowed_networks(interfaces)
    if not _IS_LINUX:
        log.warning("discovery: no kernel filters on %s; only advertised addresses are checked", sys.platform)
    listen = _listen_socket(interfaces, networks)
    respond: list[socket.socket] = []
    try:
        for address in interfaces:
            respond.append(_respond_socket(address))
    except BaseException:
        for sock in (listen, *respond):
            sock.close()
        raise
    ours = [listen, *respond]
    owner = threading.get_ident()

    def create_sockets(*args: Any, **kwargs: Any) -> tuple[socket.socket | None, list[socket.socket]]:
        if threading.get_ident() != owner:
            return original(*args, **kwargs)
        return listen, list(respond)

    with _zc_patch_lock:
        original = _zc_core.create_sockets
        _zc_core.create_sockets = create_sockets
        try:
            zc = Zeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only)  # on our loop
        except BaseException:
            for sock in ours:
                sock.close()
            raise
        finally:
            _zc_core.create_sockets = original
    aiozc = AsyncZeroconf(zc=zc)
    try:
        await zc.async_wait_for_start()
        # zeroconf reads every socket it holds: ours are the group socket plus the (filtered) senders
        read = {wrapped.sock.getsockname() for wrapped in zc.engine.readers}
        sent = {wrapped.sock.getsockname() for wrapped in zc.engine.senders}
        senders = {(address, MDNS_PORT) for address in interfaces}
        if read != {(MDNS_GROUP, MDNS_PORT)} | senders or sent != senders:
            raise P2PFLError(f"zeroconf is not using our scoped sockets: reads {read}, sends {sent}")
    except BaseException:
        await aiozc.async_close()
        raise
    return aiozc


class Discovery:
    """Advertise our broker and keep the set of our federation's other nodes that are advertised now.

    `on_reject(reason, detail)` hears about each foreign advertisement once per advertised address
    (Reason.FOREIGN_ADVERT), so the owner can count and log it (without one, we log a warning); ads
    that are merely malformed or of another federation are only debug-logged, as before.
    """

    def __init__(
        self,
        own: PeerAd,
        interfaces: list[str],
        on_change: Callable[[], None] | None = None,
        on_reject: Callable[[Reason, str], None] | None = None,
    ) -> None:
        _check_own(own)
        if not interfaces:
            raise ConfigError("discovery needs at least one interface address (e.g. ['127.0.0.1'])")
        self._own = own
        self._interfaces = list(dict.fromkeys(interfaces))
        self._on_change = on_change
        self._on_reject = on_reject
        self._networks: list[ipaddress.IPv4Network] = []
        self._foreign_seen: set[str] = set()  # advertised addresses already counted, bounded
        self._foreign_full = False
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: ServiceInfo | None = None
        self._announce: asyncio.Future[Any] | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}  # service name (lower) -> its running resolution
        self._by_name: dict[str, PeerAd] = {}  # service name (lower) -> accepted advertisement
        self._strikes: dict[str, tuple[int, float]] = {}  # service -> (failed passes in a row, since)
        self._silent: set[str] = set()  # dropped for silence; looked up again until its PTR goes too
        self._kept: dict[str, float] = {}  # silent, but its broker port accepted: when it last did
        self._loops: list[asyncio.Task[None]] = []  # the liveness checks and our announcements
        self._stopping = False

    def peers(self) -> dict[str, PeerAd]:
        """Other nodes of our federation currently advertised, by node id."""
        return {ad.node_id: ad for ad in self._by_name.values()}

    async def start(self) -> None:
        """Start browsing, then advertise; returns once our name is probed as unique (~1 s)."""
        if self._aiozc is not None:
            return
        self._stopping = False
        networks = allowed_networks(self._interfaces)
        if not _in_networks(self._own.host, networks):
            nets = ", ".join(map(str, networks))
            raise ConfigError(
                f"node host {self._own.host} is outside the discovery interfaces' networks ({nets}); "
                "peers would ignore our advertisement"
            )
        self._networks = networks
        try:
            self._aiozc = await open_zeroconf(self._interfaces, networks)
        except OSError as exc:
            raise P2PFLError(f"cannot open mDNS sockets on {self._interfaces}: {exc}") from exc
        try:
            # QM questions are answered by multicast, which reaches every process sharing port 5353;
            # a unicast (QU) answer would be delivered to only one of them.
            self._browser = AsyncServiceBrowser(
                self._aiozc.zeroconf,
                SERVICE_TYPE,
                handlers=[self._on_service_state_change],
                question_type=DNSQuestionType.QM,
            )
            info = _own_info(self._own)
            # a future: stop() cancels it if the announcement is still going out
            self._announce = asyncio.ensure_future(await self._aiozc.async_register_service(info))
            self._info = info  # only now is there something to withdraw in stop()
            loop = asyncio.get_running_loop()
            self._loops = [
                loop.create_task(self._check_liveness(), name="liveness checks"),
                loop.create_task(self._keep_announcing(), name="announcements"),
            ]
            for task in self._loops:
                task.add_done_callback(_log_failure)
        except NonUniqueNameException as exc:
            await self.stop()
            raise ConfigError(f"another node already advertises node id {self._own.node_id}") from exc
        except BadTypeInNameException as exc:
            await self.stop()
            raise ConfigError(f"bad service name for node id {self._own.node_id}: {exc}") from exc
        except BaseException:
            await self.stop()
            raise
        log.info(
            "discovery: advertising %s (%s) at %s:%d; mDNS received on %s:%d joined on %s, "
            "from %s only; sent from %s",
            self._own.node_id,
            self._own.name,
            self._own.host,
            self._own.port,
            MDNS_GROUP,
            MDNS_PORT,
            self._interfaces,
            ", ".join(map(str, networks)),
            ", ".join(f"{a}:{MDNS_PORT}" for a in self._interfaces),
        )

    async def stop(self) -> None:
        """Withdraw our advertisement (goodbye packets) and close the sockets; safe to call twice."""
        self._stopping = True
        aiozc, self._aiozc = self._aiozc, None
        if self._browser is not None:
            browser, self._browser = self._browser, None
            await browser.async_cancel()
        tasks = [*self._tasks.values(), *self._loops]
        self._loops = []
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._announce is not None:
            announce, self._announce = self._announce, None
            announce.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await announce
        if aiozc is not None:
            if self._info is not None:
                info, self._info = self._info, None
                try:
                    goodbye = await aiozc.async_unregister_service(info)
                    await asyncio.wait_for(goodbye, timeout=2.0)
                except Exception as exc:  # closing anyway; peers age us out by TTL
                    log.debug("discovery: goodbye failed: %s", exc)
            await aiozc.async_close()
        self._by_name.clear()  # no on_change here: the owner is shutting down and knows it

    async def set_ready(self) -> None:
        """Advertise that we are ready for round 1 (TXT r=1); peers waiting to start together see it."""
        await self.readvertise(replace(self._own, ready=True))

    async def readvertise(self, own: PeerAd) -> None:
        """Advertise `own` instead (signed afresh, or ready); once ready, a node stays ready."""
        _check_own(own)
        own = replace(own, ready=own.ready or self._own.ready)
        if self._aiozc is None or self._info is None or own == self._own:
            return
        self._own = own
        info = _own_info(own)
        self._info = info
        await self._aiozc.async_update_service(info)  # rebroadcasts go on in the background

    # --- liveness: a peer must keep announcing itself, not just stay in zeroconf's PTR cache ---

    async def _keep_announcing(self) -> None:
        """Every ~ANNOUNCE_S (jittered, so nodes do not send in step), multicast our records once."""
        while not self._stopping:
            await asyncio.sleep(ANNOUNCE_S * random.uniform(0.7, 1.3))
            aiozc, info = self._aiozc, self._info
            if aiozc is None or info is None:
                return
            aiozc.zeroconf.async_send(aiozc.zeroconf.generate_service_broadcast(info, None))

    async def _check_liveness(self) -> None:
        """Every ~LIVENESS_S, read every peer's records from our cache (fresh while it announces)."""
        while not self._stopping:
            await asyncio.sleep(LIVENESS_S * random.uniform(0.7, 1.3))
            aiozc = self._aiozc
            if aiozc is None:
                return
            suspects = []
            for key in [k for k in dict.fromkeys((*self._by_name, *self._silent)) if k not in self._tasks]:
                info = AsyncServiceInfo(SERVICE_TYPE, key)
                if self._liveness_result(key, info if info.load_from_cache(aiozc.zeroconf) else None):
                    suspects.append(key)
            ads = {key: self._by_name[key] for key in suspects if key in self._by_name}
            verdicts = await asyncio.gather(*(_listening(ad.host, ad.port) for ad in ads.values()))
            for (key, ad), listening in zip(ads.items(), verdicts, strict=True):
                self._judge(key, ad, listening)

    @staticmethod
    async def _request(zeroconf: Zeroconf, info: AsyncServiceInfo) -> bool:
        """Complete `info` from fresh cached records, or by asking the network (QM: the multicast
        answer refreshes every node's cache); False if it stays incomplete for RESOLVE_TIMEOUT_MS."""
        return await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS, question_type=DNSQuestionType.QM)

    def _liveness_result(self, key: str, info: AsyncServiceInfo | None) -> bool:
        """`info`: the peer's fresh records, or None if they expired. True: silent long enough that
        its broker port should be asked whether anything still listens."""
        if self._stopping or key in self._tasks:
            return False  # a resolution started meanwhile has the newer word
        if key in self._silent:
            if info is not None:
                log.info("discovery: %s announces itself again", key)
                self._take(key, info)
            return False
        if key not in self._by_name:
            return False  # withdrawn while we asked
        if info is not None:
            self._strikes.pop(key, None)
            self._kept.pop(key, None)
            self._take(key, info)  # also catches an update whose announcement we missed
            return False
        now = time.monotonic()
        strikes, since = self._strikes.get(key, (0, now))
        self._strikes[key] = (strikes + 1, since)
        probed = self._kept.get(key)  # a port that accepted is asked again after as long a silence
        return (
            strikes + 1 >= LIVENESS_STRIKES
            and now - since >= LIVENESS_SILENCE_S
            and (probed is None or now - probed >= LIVENESS_SILENCE_S)
        )

    def _judge(self, key: str, ad: PeerAd, listening: bool | None) -> None:
        """Silent on mDNS: gone if nothing listens at its broker's port (refused), or if that port has
        not answered either for LIVENESS_GONE_S; kept while it accepts connections (a busy or frozen
        process is slow, not gone, and a loaded host loses multicast)."""
        if self._stopping or self._by_name.get(key) != ad or key not in self._strikes:
            return
        silent_s = time.monotonic() - self._strikes[key][1]
        if listening or (listening is None and silent_s < LIVENESS_GONE_S):
            if key not in self._kept:  # once a silence
                log.info("discovery: %s silent on mDNS for %.0f s, kept: %s", key, silent_s, _SAYS[listening])
            self._kept[key] = time.monotonic()
            return
        self._kept.pop(key, None)
        self._strikes.pop(key, None)
        if len(self._silent) < MAX_SILENT:  # beyond, forgotten: zeroconf's next announcement brings it back
            self._silent.add(key)
        why = "nothing listens at" if listening is False else "no answer either from"
        log.warning(
            "discovery: %s stopped announcing itself on mDNS %.0f s ago and %s %s:%d; dropped until it does",
            key,
            silent_s,
            why,
            ad.host,
            ad.port,
        )
        self._drop(key)

    # --- zeroconf callbacks (run in the event loop zeroconf is attached to, which is ours) ---

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: Change
    ) -> None:
        if self._stopping or service_type != SERVICE_TYPE:
            return
        key = name.lower()
        if key == _service_name(self._own.node_id):
            return  # ourselves
        previous = self._tasks.pop(key, None)
        if previous is not None:
            previous.cancel()  # a newer event supersedes it; a late result must not undo a removal
        if state_change is Change.Removed:
            self._silent.discard(key)
            self._kept.pop(key, None)
            self._strikes.pop(key, None)
            if self._by_name.pop(key, None) is not None:
                log.info("discovery: %s withdrawn", name)
                self._notify()
            return
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, name, state_change))
        self._tasks[key] = task
        task.add_done_callback(functools.partial(self._task_done, key))

    def _task_done(self, key: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled() and task.exception() is not None:
            log.warning("discovery: resolving %s failed: %r", key, task.exception())

    async def _resolve(self, zeroconf: Zeroconf, name: str, state_change: Change) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await self._request(zeroconf, info):
            log.debug("discovery: %s did not resolve within %d ms", name, RESOLVE_TIMEOUT_MS)
            return  # an update that fails to resolve keeps the last good advertisement
        self._take(name.lower(), info)

    def _take(self, key: str, info: ServiceInfo) -> None:
        """Accept a resolved advertisement of our federation, or drop what it replaces."""
        name = info.name
        try:
            ad = ad_from_info(info)
        except ValueError as exc:
            log.debug("discovery: ignoring %s: %s", name, exc)
            self._drop(key)
            return
        if not _in_networks(ad.host, self._networks):
            self._foreign(name, ad.host)
            self._drop(key)
            return
        if ad.node_id == self._own.node_id:
            log.debug("discovery: ignoring %s: claims our own node id", name)
            self._drop(key)
            return
        if ad.federation_id != self._own.federation_id:
            log.debug("discovery: ignoring %s: federation %s", name, ad.federation_id)
            self._drop(key)
            return
        self._silent.discard(key)
        before = self._by_name.get(key)
        if before is not None and before.ready and replace(ad, ready=True) == before:
            ad = before  # ready holds for a node's lifetime (same address and key); an older TXT is stale
        if before != ad:
            self._by_name[key] = ad
            log.info("discovery: %s (%s) at %s:%d", ad.node_id, ad.name, ad.host, ad.port)
            self._notify()

    def _foreign(self, name: str, host: str) -> None:
        """Count and log a foreign advertisement once per address; an attacker can vary the name."""
        if host in self._foreign_seen:
            return
        if len(self._foreign_seen) >= MAX_FOREIGN_TRACKED:  # still ignored, no longer counted
            if not self._foreign_full:
                self._foreign_full = True
                log.warning("discovery: over %d foreign addresses, no longer counted", MAX_FOREIGN_TRACKED)
            return
        self._foreign_seen.add(host)
        detail = f"{name} advertises {host}, outside {', '.join(map(str, self._networks))}"
        if self._on_reject is None:
            log.warning("discovery: ignoring %s", detail)
            return
        try:
            self._on_reject(Reason.FOREIGN_ADVERT, detail)  # the owner counts and logs it
        except Exception:  # a faulty callback must not break discovery
            log.exception("discovery: on_reject callback failed")

    def _drop(self, key: str) -> None:
        self._strikes.pop(key, None)
        if self._by_name.pop(key, None) is not None:
            self._notify()

    def _notify(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change()
        except Exception:  # a faulty callback must not break discovery
            log.exception("discovery: on_change callback failed")
