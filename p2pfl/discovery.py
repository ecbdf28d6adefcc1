"""Find the other nodes of our federation on the local network with mDNS / DNS-SD (zeroconf).

Each node advertises one `_p2pfl._tcp.local.` service whose address and port are those of its own
MQTT broker, plus a few TXT items (node id, federation id, name, certificate fingerprint). Discovery
is only a hint about where to connect: mDNS is unauthenticated, so anyone on the link can advertise
anything. Trust comes later, from the certificate the peer's broker serves and the signatures on its
updates. Here we just keep the advertisements well-formed, of our federation, and current.

mDNS is bound only to the interfaces the caller names (tests and scripts: ``["127.0.0.1"]``); we
never bind every interface of the host. Several processes on one host share port 5353 (zeroconf
sets SO_REUSEADDR / SO_REUSEPORT), so many nodes can run on loopback, each with its own broker port.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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

from .errors import ConfigError, P2PFLError

__all__ = [
    "Discovery",
    "PeerAd",
    "SERVICE_TYPE",
    "TXT_VERSION",
    "ad_from_info",
]

log = logging.getLogger(__name__)

SERVICE_TYPE = "_p2pfl._tcp.local."
TXT_VERSION = "1"

RESOLVE_TIMEOUT_MS = 3000  # one resolution of an added / updated service, then we give up on it
# Record TTLs we advertise. Short enough that a node which vanished without a goodbye (crash, cable)
# ages out of its peers' caches within a couple of minutes; zeroconf re-queries live records before
# they expire, so healthy peers never drop out because of this.
RECORD_TTL_S = 120
MAX_TXT_BYTES = 512  # whole TXT record; ours is ~100 bytes, anything much bigger is not ours
MAX_NAME_BYTES = 64  # UTF-8; keeps "name=..." well inside one 255-byte TXT item

_HEX16 = re.compile(r"[0-9a-f]{16}")
_REQUIRED_KEYS = ("id", "fed", "name", "fp", "v")


@dataclass(frozen=True)
class PeerAd:
    """One node's advertisement: who it claims to be and where its broker listens."""

    node_id: str
    federation_id: str
    name: str
    host: str
    port: int
    fingerprint: str


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
    if problems:
        raise ConfigError("discovery advertisement invalid: " + "; ".join(problems))


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
        },
        # One host name per node, so several nodes on one machine do not share (and fight over) it.
        server=f"p2pfl-{own.node_id}.local.",
        parsed_addresses=[own.host],
        host_ttl=RECORD_TTL_S,
        other_ttl=RECORD_TTL_S,
    )


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
    )


class Discovery:
    """Advertise our broker and keep the set of our federation's other nodes that are advertised now."""

    def __init__(
        self, own: PeerAd, interfaces: list[str], on_change: Callable[[], None] | None = None
    ) -> None:
        _check_own(own)
        if not interfaces:
            raise ConfigError("discovery needs at least one interface address (e.g. ['127.0.0.1'])")
        self._own = own
        self._interfaces = list(interfaces)
        self._on_change = on_change
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: ServiceInfo | None = None
        self._announce: asyncio.Future[Any] | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}  # service name (lower) -> its running resolution
        self._by_name: dict[str, PeerAd] = {}  # service name (lower) -> accepted advertisement
        self._stopping = False

    def peers(self) -> dict[str, PeerAd]:
        """Other nodes of our federation currently advertised, by node id."""
        return {ad.node_id: ad for ad in self._by_name.values()}

    async def start(self) -> None:
        """Start browsing, then advertise; returns once our name is probed as unique (~1 s)."""
        if self._aiozc is not None:
            return
        self._stopping = False
        try:
            self._aiozc = AsyncZeroconf(interfaces=self._interfaces, ip_version=IPVersion.V4Only)
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
            "discovery: advertising %s (%s) at %s:%d on %s",
            self._own.node_id,
            self._own.name,
            self._own.host,
            self._own.port,
            self._interfaces,
        )

    async def stop(self) -> None:
        """Withdraw our advertisement (goodbye packets) and close the sockets; safe to call twice."""
        self._stopping = True
        aiozc, self._aiozc = self._aiozc, None
        if self._browser is not None:
            browser, self._browser = self._browser, None
            await browser.async_cancel()
        tasks = list(self._tasks.values())
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
        key = name.lower()
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS, question_type=DNSQuestionType.QM):
            log.debug("discovery: %s did not resolve within %d ms", name, RESOLVE_TIMEOUT_MS)
            return  # an update that fails to resolve keeps the last good advertisement
        try:
            ad = ad_from_info(info)
        except ValueError as exc:
            log.debug("discovery: ignoring %s: %s", name, exc)
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
        if self._by_name.get(key) != ad:
            self._by_name[key] = ad
            log.info("discovery: %s (%s) at %s:%d", ad.node_id, ad.name, ad.host, ad.port)
            self._notify()

    def _drop(self, key: str) -> None:
        if self._by_name.pop(key, None) is not None:
            self._notify()

    def _notify(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change()
        except Exception:  # a faulty callback must not break discovery
            log.exception("discovery: on_change callback failed")
