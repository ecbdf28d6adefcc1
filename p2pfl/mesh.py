"""The node's view of the network: who is a proven member, and how an update reaches its recipients.

`Mesh` is what the node needs from a transport; the node is handed one, so multi-node logic can be
tested with an in-memory mesh while end-to-end tests run `MqttMesh`, the real thing:

- its own broker (the outbox), where it publishes its certificate and one copy of each update per
  recipient, on that recipient's inbox topic; every client connects with mutual TLS and is known by
  the node id its certificate proves;
- a link to every advertised peer's broker (mDNS, or static peers), over mutual TLS: the broker's
  certificate must prove the node id discovery advertised; the link fetches the peer's p2pfl
  certificate (it carries the box key updates are sealed to) and subscribes to its updates for us;
- membership: the peers whose broker proved its node id in the TLS handshake and whose p2pfl
  certificate chains to the federation root, names that node, and matches what discovery advertised.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from p2pfl.config import NodeConfig
from p2pfl.discovery import Discovery, PeerAd
from p2pfl.errors import Reason, Rejected
from p2pfl.federation import Certificate, FederationRoot
from p2pfl.identity import Identity
from p2pfl.metrics import Metrics
from p2pfl.resources import ensure_fd_headroom, fd_need
from p2pfl.tls import NodeTls, load_node_tls, peer_node_id
from p2pfl.transport import Outbox, PeerLink
from p2pfl.transport.frontdoor import DoorLimits

__all__ = ["Mesh", "MqttMesh", "OnUpdate"]

log = logging.getLogger("p2pfl.mesh")

OnUpdate = Callable[[str, bytes], Awaitable[None]]  # (publisher node id, message)


class Mesh(Protocol):
    """What the node needs from the network; `on_change` fires whenever membership may have changed."""

    def members(self) -> dict[str, Certificate]:
        """Proven members reachable now (the node itself not included)."""
        ...

    async def start(self, on_update: OnUpdate, on_change: Callable[[], None]) -> None: ...

    async def publish(self, message: bytes, recipients: Sequence[str]) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class Peer:
    """One neighbour broker we hold a link to; `cert` is set once its certificate checks out."""

    link: PeerLink
    cert: Certificate | None = None
    fingerprint: str | None = None  # what mDNS advertised; the certificate must match it


class MqttMesh:
    """Own embedded broker + links to peers' brokers + mDNS discovery, all sessions mutual TLS."""

    def __init__(
        self,
        cfg: NodeConfig,
        *,
        identity: Identity,
        cert: Certificate,
        root: FederationRoot,
        metrics: Metrics,
        tls: NodeTls | None = None,
    ) -> None:
        """`tls`: the node's TLS credentials; read from the data dir (node.crt, ca.crt) when omitted,
        and a data dir without them stops the node with the command that creates them."""
        self.cfg = cfg
        self.identity, self.cert, self.root, self.metrics = identity, cert, root, metrics
        self.node_id = identity.node_id
        self.fed = root.federation_id
        self.tls = tls or load_node_tls(cfg.data_dir, identity, cert, root)
        self._client_tls = self.tls.client_context()
        self.peers: dict[str, Peer] = {}  # by "host:port"
        self.door_limits = _door_limits(cfg.node.host)
        self.outbox = Outbox(
            cfg.node.host,
            cfg.node.port,
            self.fed,
            self.node_id,
            ssl_context=self.tls.server_context(),
            verify=self._identify,
            on_reject=lambda reason, detail: metrics.reject(reason, detail, peer="broker client"),
            door_limits=self.door_limits,
        )
        self.discovery: Discovery | None = None
        self._on_update: OnUpdate | None = None
        self._on_change: Callable[[], None] = lambda: None
        self._tasks: set[asyncio.Task[None]] = set()  # link starts/stops: kept so none is lost

    # -- Mesh ---------------------------------------------------------------------------------------

    def members(self) -> dict[str, Certificate]:
        return {
            p.cert.node_id: p.cert
            for p in self.peers.values()
            if p.cert and p.link.connected and p.link.peer_id == p.cert.node_id
        }

    async def start(self, on_update: OnUpdate, on_change: Callable[[], None]) -> None:
        self._on_update, self._on_change = on_update, on_change
        # before the door reads its fd budget; a node links to at most as many peers as may link to it
        ensure_fd_headroom(fd_need(self.door_limits, links=self.door_limits.max_sessions))
        await self.outbox.start()
        await self.outbox.publish_certificate(self.cert.to_bytes())
        for peer in self.cfg.discovery.static_peers:
            host, _, port = peer.rpartition(":")
            self._add_link(host, int(port), None, None)
        if self.cfg.discovery.mdns:
            node = self.cfg.node
            ad = PeerAd(
                self.node_id, self.fed, node.name, node.host, self.outbox.port, self.cert.fingerprint()
            )
            self.discovery = Discovery(
                ad,
                self.cfg.discovery.interfaces,
                on_change=self._sync_links,
                on_reject=lambda reason, detail: self.metrics.reject(reason, detail, peer="mdns"),
            )
            await self.discovery.start()

    async def publish(self, message: bytes, recipients: Sequence[str]) -> None:
        await self.outbox.publish_update(message, list(recipients))

    async def stop(self) -> None:
        t0 = time.monotonic()
        if self.discovery is not None:
            await self.discovery.stop()
        t1 = time.monotonic()
        await asyncio.gather(
            *(p.link.stop() for p in self.peers.values()), *self._tasks, return_exceptions=True
        )
        t2 = time.monotonic()
        await self.outbox.stop()
        log.info(
            "stopped: discovery %.2f s, links %.2f s, broker %.2f s", t1 - t0, t2 - t1, time.monotonic() - t2
        )

    # -- links --------------------------------------------------------------------------------------

    def _identify(self, ssl_object: object) -> str:
        """The node id a TLS peer's certificate proves (Rejected if revoked or not ours)."""
        return peer_node_id(ssl_object, self.root)

    def _add_link(self, host: str, port: int, node_id: str | None, fingerprint: str | None) -> None:
        address = f"{host}:{port}"
        if (host, port) == (self.cfg.node.host, self.outbox.port):
            return
        known = self.peers.get(address)
        if known is not None:
            if node_id is not None and known.link.expected != node_id:
                # another node advertises this address now: the link must prove the new id
                log.info("peer at %s now advertises node %s", address, node_id)
                known.link.expected, known.fingerprint, known.cert = node_id, fingerprint, None
            return
        link = PeerLink(
            host,
            port,
            self.fed,
            self.node_id,
            tls_context=self._client_tls,
            identify=self._identify,
            on_certificate=lambda pub, data: self._on_certificate(address, pub, data),
            on_update=lambda pub, msg: self._deliver(pub, msg),
            on_reject=lambda reason, detail: self.metrics.reject(reason, detail, peer=address),
            max_message_bytes=int(self.cfg.gossip.max_update_mb * (1 << 20)),
            expected=node_id,
        )
        self.peers[address] = Peer(link=link, fingerprint=fingerprint)
        self._spawn(link.start())

    async def _deliver(self, publisher: str, message: bytes) -> None:
        if self._on_update is not None:
            await self._on_update(publisher, message)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _sync_links(self) -> None:
        """Follow discovery: link to new peers, drop vanished ones (static peers always stay)."""
        assert self.discovery is not None
        advertised = {f"{a.host}:{a.port}": a for a in self.discovery.peers().values()}
        for ad in advertised.values():
            self._add_link(ad.host, ad.port, ad.node_id, ad.fingerprint)
        for address in list(self.peers):
            if address not in advertised and address not in self.cfg.discovery.static_peers:
                peer = self.peers.pop(address)
                log.info("peer at %s vanished", address)
                self._spawn(peer.link.stop())
        self._on_change()

    # -- who a broker is ----------------------------------------------------------------------------

    def _on_certificate(self, address: str, publisher: str, data: bytes) -> None:
        """The p2pfl certificate on a broker whose TLS certificate proved `publisher`: it must chain to
        the root, name that node, and match what discovery advertised."""
        peer = self.peers.get(address)
        if peer is None or publisher == self.node_id:
            return
        try:
            cert = Certificate.from_bytes(data)
            self.root.verify(cert)
            if cert.node_id != publisher or publisher != peer.link.peer_id:
                raise Rejected(
                    Reason.PEER_IDENTITY,
                    f"certificate of {cert.node_id} on the broker of {peer.link.peer_id} at {address}",
                )
            if peer.fingerprint and cert.fingerprint() != peer.fingerprint:
                raise Rejected(Reason.UNCERTIFIED, "certificate does not match the advertised fingerprint")
        except Rejected as exc:
            self.metrics.reject(exc.reason, exc.detail, peer=address)
            return
        if peer.cert is None or peer.cert.node_id != cert.node_id:
            log.info("peer %s (%s) at %s certified, identity proven by TLS", cert.name, cert.node_id, address)
        peer.cert = cert
        self._on_change()


def _door_limits(host: str) -> DoorLimits:
    """The front door's caps. On a loopback broker every peer (a local testbed: many nodes start and
    link at once) comes from the same address, so there the per-source cap on connections still in
    their handshake is the pending cap instead."""
    defaults = DoorLimits()
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return replace(defaults, max_per_source=defaults.max_pending) if loopback else defaults
