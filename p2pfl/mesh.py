"""The node's view of the network: who is a member, which links it holds, and how an update reaches
its recipients.

`Mesh` is what the node needs from a transport; the node is handed one, so multi-node logic can be
tested with an in-memory mesh while end-to-end tests run `MqttMesh`, the real thing:

- its own broker (the outbox), where it publishes its certificate and one copy of each update per
  recipient, on that recipient's inbox topic; every client connects with mutual TLS and is known by
  the node id its certificate proves;
- membership without links (`p2pfl.membership`): the peers discovery advertises now in an
  advertisement signed by their own key, carrying a certificate that chains to the federation root;
  our own advertisement is signed afresh every AD_RESIGN_S;
- links only to the neighbours the topology gives (`follow`, `p2pfl.linkset`): a link to a
  neighbour's broker subscribes to our inbox there, which is how its updates reach us; a link no
  longer needed is closed after a grace period, and closing it leaves membership as it is;
- static peers (no mDNS) keep a link each for as long as the node runs: nothing else says they are up.

`reachable(n)` is False for a neighbour whose link failed or dropped, so a round does not wait for a
peer that is gone while discovery still advertises it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from p2pfl.config import NodeConfig
from p2pfl.discovery import Discovery, PeerAd
from p2pfl.errors import Rejected, TransportError
from p2pfl.federation import Certificate, FederationRoot
from p2pfl.identity import Identity
from p2pfl.linkset import LinkSet
from p2pfl.membership import AD_RESIGN_S, Roster, check_certificate, sign_ad
from p2pfl.metrics import Metrics
from p2pfl.resources import ensure_fd_headroom, fd_need
from p2pfl.tls import NodeTls, load_node_tls, peer_node_id
from p2pfl.transport import Outbox, PeerLink
from p2pfl.transport.frontdoor import DoorLimits

__all__ = ["Mesh", "MqttMesh", "OnUpdate"]

log = logging.getLogger("p2pfl.mesh")

OnUpdate = Callable[[str, bytes], Awaitable[None]]  # (publisher node id, message)


class Mesh(Protocol):
    """What the node needs from the network; `on_change` fires whenever membership or a neighbour's
    reachability may have changed."""

    def members(self) -> dict[str, Certificate]:
        """Certified peers advertised now (the node itself not included); no link needed."""
        ...

    def reachable(self, node_id: str) -> bool:
        """False once the link to this neighbour failed or dropped (until it is up again)."""
        ...

    def ready(self, node_id: str) -> bool:
        """The peer says it is ready for round 1 (warmed up, peers certified, round-1 links open)."""
        ...

    async def announce_ready(self) -> None:
        """Tell the peers we are ready for round 1."""
        ...

    def follow(self, neighbours: Collection[str]) -> None:
        """Hold links to these peers (the coming rounds' neighbours); close others after a grace."""
        ...

    def links(self) -> int:
        """Links open now (neighbours, static peers)."""
        ...

    async def start(self, on_update: OnUpdate, on_change: Callable[[], None]) -> None: ...

    async def publish(self, message: bytes, recipients: Sequence[str]) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class Peer:
    """A static peer's broker (no mDNS): linked for as long as the node runs; `cert` once checked."""

    link: PeerLink
    cert: Certificate | None = None


class MqttMesh:
    """Own embedded broker + links to neighbours' brokers + mDNS discovery, all sessions mutual TLS."""

    def __init__(
        self,
        cfg: NodeConfig,
        *,
        identity: Identity,
        cert: Certificate,
        root: FederationRoot,
        metrics: Metrics,
        tls: NodeTls | None = None,
        revocations: bytes | None = None,
        on_revocations: Callable[[bytes, str], bool] | None = None,
    ) -> None:
        """`tls`: the node's TLS credentials; read from the data dir (node.crt, ca.crt) when omitted,
        and a data dir without them stops the node with the command that creates them.
        `revocations`: the root-signed list the node holds, offered on its broker; `on_revocations(data,
        source)`: the node's adopt method, handed the lists linked neighbours offer (p2pfl.revocation)."""
        self.cfg = cfg
        self.identity, self.cert, self.root, self.metrics = identity, cert, root, metrics
        self.node_id = identity.node_id
        self.fed = root.federation_id
        self.tls = tls or load_node_tls(cfg.data_dir, identity, cert, root)
        self._client_tls = self.tls.client_context()
        self.roster = Roster(root)
        self.peers: dict[str, Peer] = {}  # static peers, by "host:port"
        self.neighbour_links: dict[str, PeerLink] = {}  # by node id
        self.linkset = LinkSet()
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
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()  # link starts/stops, re-signing: kept so none is lost
        self._revocations = revocations
        self._adopt = on_revocations

    # -- Mesh ---------------------------------------------------------------------------------------

    def members(self) -> dict[str, Certificate]:
        found = self.roster.members()
        for peer in self.peers.values():
            c = peer.cert
            if (
                c
                and peer.link.connected
                and peer.link.peer_id == c.node_id
                and c.node_id not in self.root.revoked
            ):
                found.setdefault(c.node_id, c)
        found.pop(self.node_id, None)
        return found

    def reachable(self, node_id: str) -> bool:
        link = self.neighbour_links.get(node_id)
        return link is None or not link.down

    def ready(self, node_id: str) -> bool:
        ad = self.roster.ad(node_id)
        return ad is None or ad.ready  # a static peer has no advertisement to say it: not waited for

    async def announce_ready(self) -> None:
        if self.discovery is not None:
            await self.discovery.set_ready()

    def linked(self, node_id: str) -> bool:
        """True once the link to this neighbour is connected and subscribed (round 1 may start)."""
        link = self.neighbour_links.get(node_id)
        return link is not None and link.connected

    def follow(self, neighbours: Collection[str]) -> None:
        keep = self.linkset.update(neighbours, time.monotonic())
        static = {p.cert.node_id for p in self.peers.values() if p.cert is not None}
        for node_id in sorted(keep - static - set(self.neighbour_links)):
            ad = self.roster.ad(node_id)
            if ad is not None:
                self._open(ad)
        for node_id in [n for n in self.neighbour_links if n not in keep or n in static]:
            self._close(node_id)

    def links(self) -> int:
        return len(self.neighbour_links) + len(self.peers)

    async def start(self, on_update: OnUpdate, on_change: Callable[[], None]) -> None:
        self._on_update, self._on_change = on_update, on_change
        # before the door reads its fd budget; a node links to at most as many peers as may link to it
        ensure_fd_headroom(fd_need(self.door_limits, links=self.door_limits.max_sessions))
        await self.outbox.start()
        await self.outbox.publish_certificate(self.cert.to_bytes())
        if self._revocations:
            await self.outbox.publish_revocations(self._revocations)
        for peer in self.cfg.discovery.static_peers:
            host, _, port = peer.rpartition(":")
            self._add_static(host, int(port))
        if self.cfg.discovery.mdns:
            self.discovery = Discovery(
                self._signed_ad(),
                self.cfg.discovery.interfaces,
                on_change=self._sync_ads,
                on_reject=lambda reason, detail: self.metrics.reject(reason, detail, peer="mdns"),
            )
            await self.discovery.start()
            self._spawn(self._keep_signing(self.discovery))

    def _signed_ad(self) -> PeerAd:
        node = self.cfg.node
        ad = PeerAd(self.node_id, self.fed, node.name, node.host, self.outbox.port, self.cert.fingerprint())
        return sign_ad(ad, self.identity, self.cert)

    async def _keep_signing(self, discovery: Discovery) -> None:
        """Sign our advertisement afresh before peers would find it too old (membership.AD_MAX_AGE_S)."""
        while not self._stopping:
            await asyncio.sleep(AD_RESIGN_S)
            await discovery.readvertise(self._signed_ad())

    async def publish(self, message: bytes, recipients: Sequence[str]) -> None:
        await self.outbox.publish_update(message, list(recipients))

    async def stop(self) -> None:
        self._stopping = True
        t0 = time.monotonic()
        if self.discovery is not None:
            await self.discovery.stop()
        t1 = time.monotonic()
        links = [p.link for p in self.peers.values()]
        links += list(self.neighbour_links.values())
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(link.stop() for link in links), *self._tasks, return_exceptions=True)
        t2 = time.monotonic()
        await self.outbox.stop()
        log.info(
            "stopped: discovery %.2f s, links %.2f s, broker %.2f s", t1 - t0, t2 - t1, time.monotonic() - t2
        )

    def set_root(self, root: FederationRoot, revocations: bytes | None = None) -> None:
        """A newer root (revocations): revoked peers leave membership and lose their links at once;
        `revocations`, the signed list it came from, is offered to the neighbours in turn."""
        self.root = root
        self.roster.root = root
        self.linkset.forget(root.revoked)
        for node_id in [n for n in self.neighbour_links if n in root.revoked]:
            self._close(node_id)
        for address, peer in list(self.peers.items()):
            if {peer.link.peer_id, peer.cert.node_id if peer.cert else None} & root.revoked:
                log.warning("static peer %s is revoked: link closed", address)
                del self.peers[address]
                self._spawn(peer.link.stop())
        if revocations is not None:
            self._revocations = revocations
            if self._on_update is not None:  # started (else start() offers it)
                self._spawn(self._offer(revocations))
        self._on_change()

    async def _offer(self, revocations: bytes) -> None:
        with contextlib.suppress(TransportError):  # stopping: nobody to offer it to
            await self.outbox.publish_revocations(revocations)

    def _offered(self, publisher: str, data: bytes) -> None:
        """A linked neighbour offers its revocation list: the node adopts it if the root signed it and
        it is newer (and then offers it on through set_root)."""
        if self._adopt is not None:
            self._adopt(data, publisher)

    # -- links --------------------------------------------------------------------------------------

    def _identify(self, ssl_object: object) -> str:
        """The node id a TLS peer's certificate proves (Rejected if revoked or not ours)."""
        return peer_node_id(ssl_object, self.root)

    def _link(
        self,
        host: str,
        port: int,
        expected: str | None,
        on_certificate: Callable[[str, bytes], None] | None,
    ) -> PeerLink:
        address = f"{host}:{port}"
        return PeerLink(
            host,
            port,
            self.fed,
            self.node_id,
            tls_context=self._client_tls,
            identify=self._identify,
            on_certificate=on_certificate,
            on_update=self._deliver,
            on_reject=lambda reason, detail: self.metrics.reject(reason, detail, peer=address),
            max_message_bytes=int(self.cfg.gossip.max_update_mb * (1 << 20)),
            expected=expected,
            on_state=self._changed,
            on_revocations=self._offered if self._adopt else None,
        )

    def _open(self, ad: PeerAd) -> None:
        """A link to a neighbour's broker: our inbox there carries its updates to us."""
        # its certificate came with its advertisement; the link's TLS proves the advertised node id
        link = self._link(ad.host, ad.port, ad.node_id, None)
        self.neighbour_links[ad.node_id] = link
        log.info("link to neighbour %s (%s) at %s:%d", ad.name, ad.node_id, ad.host, ad.port)
        self._spawn(link.start())

    def _close(self, node_id: str) -> None:
        link = self.neighbour_links.pop(node_id, None)
        if link is not None:
            log.info("link to %s at %s closed: no longer a neighbour", node_id, link.name)
            self._spawn(link.stop())

    def _add_static(self, host: str, port: int) -> None:
        address = f"{host}:{port}"
        if (host, port) == (self.cfg.node.host, self.outbox.port) or address in self.peers:
            return
        link = self._link(host, port, None, lambda pub, data: self._take_static_cert(address, pub, data))
        self.peers[address] = Peer(link=link)
        self._spawn(link.start())

    async def _deliver(self, publisher: str, message: bytes) -> None:
        if self._on_update is not None:
            await self._on_update(publisher, message)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _changed(self) -> None:
        if not self._stopping:
            self._on_change()

    def _sync_ads(self) -> None:
        """Follow discovery: new advertisements are checked (once each); a neighbour that moved is
        re-linked."""
        assert self.discovery is not None
        ads = self.discovery.peers()
        accepted, refused = self.roster.advertise(ads)
        for cert in accepted:
            log.info("peer %s (%s) certified by its signed advertisement", cert.name, cert.node_id)
        for ad, exc in refused:
            self.metrics.reject(exc.reason, exc.detail, peer=f"mdns {ad.host}:{ad.port}")
        for node_id, link in list(self.neighbour_links.items()):
            moved = ads.get(node_id)
            if moved is not None and (moved.host, moved.port) != (link.host, link.port):
                log.info("neighbour %s moved to %s:%d", node_id, moved.host, moved.port)
                self._close(node_id)
                self._open(moved)
        self._changed()

    def _take_static_cert(self, address: str, publisher: str, data: bytes) -> None:
        """A static peer's certificate: it must chain to the root and name the node its TLS proved."""
        peer = self.peers.get(address)
        if peer is None or publisher == self.node_id:
            return
        proven = peer.link.peer_id
        try:
            cert = check_certificate(data, self.root, proven if proven == publisher else None)
        except Rejected as exc:
            self.metrics.reject(exc.reason, exc.detail, peer=address)
            return
        if peer.cert is None or peer.cert.node_id != cert.node_id:
            log.info("peer %s (%s) at %s certified, identity proven by TLS", cert.name, cert.node_id, address)
        peer.cert = cert
        self._changed()


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
