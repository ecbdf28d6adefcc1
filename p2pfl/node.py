"""The node: discovery -> certified members -> topology -> train -> seal -> publish -> collect -> mix.

One asyncio loop orchestrates; training, crypto and aggregation run in worker threads so the
broker and the neighbour links keep serving while a round computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pfl import codec, topology
from p2pfl.aggregation import Neighbour, Reputation, mix
from p2pfl.attacks import make_attack
from p2pfl.config import NodeConfig
from p2pfl.discovery import Discovery, PeerAd
from p2pfl.envelope import ReplayGuard, UpdateMeta, open_envelope, seal
from p2pfl.errors import IdentityError, Reason, Rejected
from p2pfl.federation import (
    Certificate,
    FederationRoot,
    make_broker_proof,
    make_token,
    verify_broker_proof,
    verify_token,
)
from p2pfl.identity import Identity, load_or_create
from p2pfl.learning import flatten, get_params, load_task, set_params, unflatten
from p2pfl.metrics import Metrics
from p2pfl.transport import Outbox, PeerLink

log = logging.getLogger("p2pfl.node")

ROUNDS_AHEAD = 2  # a neighbour may run this many rounds ahead of us; its updates wait in the inbox


@dataclass
class Peer:
    """One neighbour broker we hold a link to; `cert` is set once its certificate checks out."""

    link: PeerLink
    cert: Certificate | None = None
    fingerprint: str | None = None  # what mDNS advertised; the certificate must match it
    proof: tuple[str, bytes, str] | None = None  # (publisher, proof, session password) awaiting the cert


@dataclass
class Inbox:
    """Accepted updates by round, and an event that fires on every arrival or membership change."""

    updates: dict[int, dict[str, Neighbour]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, round_: int, neighbour: Neighbour) -> None:
        self.updates.setdefault(round_, {})[neighbour.node_id] = neighbour
        self.changed.set()

    def close(self, round_: int) -> dict[str, Neighbour]:
        """Take this round's updates and forget everything older."""
        taken = self.updates.pop(round_, {})
        for old in [r for r in self.updates if r <= round_]:
            del self.updates[old]
        return taken


def load_credentials(data_dir: Path) -> tuple[Identity, Certificate, FederationRoot]:
    """A node's keys, its certificate and its federation root, consistent with each other."""
    identity = load_or_create(data_dir)
    cert_path, root_path = data_dir / "certificate", data_dir / "federation.pub"
    if not cert_path.exists() or not root_path.exists():
        raise IdentityError(
            f"{data_dir} has no certificate/federation.pub. On the federation admin's machine run "
            f"`p2pfl federation issue NAME --dir FEDERATION_DIR --node-dir {data_dir}`, "
            "or run `python scripts/testbed.py` for a local demo that sets everything up."
        )
    try:
        cert = Certificate.from_bytes(cert_path.read_bytes())
    except Rejected as exc:
        raise IdentityError(f"{cert_path} is not a valid certificate ({exc})") from exc
    root = FederationRoot.load(root_path)
    if cert.node_id != identity.node_id or cert.box_key != identity.box_public_bytes:
        raise IdentityError(f"{cert_path} was issued for other keys than the ones in {data_dir}; re-issue it")
    try:
        root.verify(cert)
    except Rejected as exc:
        raise IdentityError(f"own certificate is not valid for this federation: {exc}") from exc
    return identity, cert, root


class Node:
    """A single federation member: owns its broker, links to neighbours, and runs synchronous rounds."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.identity, self.cert, self.root = load_credentials(cfg.data_dir)
        self.node_id = self.identity.node_id
        self.fed = self.root.federation_id
        self.metrics = Metrics(cfg.metrics_path)
        self.attack = make_attack(cfg.attack.kind, cfg.attack.seed) if cfg.attack.kind else None
        self.task = load_task(cfg.task)
        if self.attack is not None:
            log.warning("BYZANTINE node for experiments: sending %s updates", cfg.attack.kind)
            self.task = self.attack.poison_task(self.task)
        torch.set_num_threads(cfg.training.threads)
        self.model = self.task.build_model()
        self.spec = codec.spec_of(get_params(self.model))
        self.replay = ReplayGuard(cfg.security.max_skew_s)
        self.reputation = Reputation()  # evidence about each neighbour, kept across rounds
        self.heard: list[np.ndarray] = []  # last round's neighbour vectors (only an attack uses them)
        self.inbox = Inbox()
        self.peers: dict[str, Peer] = {}  # by "host:port"
        self.round = 0
        self.seq = time.time_ns() // 1000  # monotonic across restarts, so receivers never see a reused seq
        self.outbox = Outbox(cfg.node.host, cfg.node.port, self.fed, self.node_id,
                             authenticate=self._authenticate, on_reject=self._reject_client,
                             prove=lambda client, password: make_broker_proof(
                                 self.identity, self.fed, client, password))
        self.discovery: Discovery | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # link starts/stops: kept so none is lost

    # -- membership -------------------------------------------------------------------------------

    def _authenticate(self, username: str, password: str) -> str:
        return verify_token(self.root, username, password).node_id

    def _reject_client(self, reason: Reason, detail: str) -> None:
        self.metrics.reject(reason, detail, peer="broker client")

    def _credentials(self) -> tuple[str, str]:
        return self.node_id, make_token(self.identity, self.cert)

    def members(self) -> dict[str, Certificate]:
        """Proven peers we can currently reach, plus ourselves: the input of the topology."""
        found = {p.cert.node_id: p.cert for p in self.peers.values()
                 if p.cert and p.link.connected and p.link.trusted_publisher == p.cert.node_id}
        found[self.node_id] = self.cert
        return found

    def _on_certificate(self, address: str, publisher: str, data: bytes) -> None:
        peer = self.peers.get(address)
        if peer is None or publisher == self.node_id:
            return
        try:
            cert = Certificate.from_bytes(data)
            self.root.verify(cert)
            if cert.node_id != publisher:
                raise Rejected(Reason.UNCERTIFIED, f"certificate of {cert.node_id} published by {publisher}")
            if peer.fingerprint and cert.fingerprint() != peer.fingerprint:
                raise Rejected(Reason.UNCERTIFIED, "certificate does not match the advertised fingerprint")
        except Rejected as exc:
            self.metrics.reject(exc.reason, exc.detail, peer=address)
            return
        peer.cert = cert
        self._check_proof(address, peer)

    def _on_proof(self, address: str, publisher: str, proof: bytes, password: str) -> None:
        peer = self.peers.get(address)
        if peer is not None:
            peer.proof = (publisher, proof, password)
            self._check_proof(address, peer)

    def _check_proof(self, address: str, peer: Peer) -> None:
        """Trust a link only once its broker signed our fresh token with the certificate's key:
        certificates are public, so serving one proves nothing by itself."""
        if peer.cert is None or peer.proof is None:
            return
        (publisher, proof, password), peer.proof = peer.proof, None
        if publisher != peer.cert.node_id or not verify_broker_proof(peer.cert, self.node_id, password, proof):
            self.metrics.reject(Reason.BAD_SIGNATURE, f"broker at {address} could not prove it holds the key "
                                f"of {peer.cert.name} ({peer.cert.node_id})", peer=address)
            return
        if peer.link.trusted_publisher is None:
            log.info("peer %s (%s) at %s certified and proven", peer.cert.name, peer.cert.node_id, address)
        peer.link.trusted_publisher = peer.cert.node_id
        self.inbox.changed.set()

    def _add_link(self, host: str, port: int, fingerprint: str | None) -> None:
        address = f"{host}:{port}"
        if address in self.peers or (host, port) == (self.cfg.node.host, self.cfg.node.port):
            return
        link = PeerLink(
            host, port, self.fed, self._credentials,
            on_certificate=lambda pub, data: self._on_certificate(address, pub, data),
            on_update=lambda pub, msg: self._on_update(address, pub, msg),
            on_reject=lambda reason, detail: self.metrics.reject(reason, detail, peer=address),
            max_message_bytes=int(self.cfg.gossip.max_update_mb * (1 << 20)),
            on_proof=lambda pub, proof, password: self._on_proof(address, pub, proof, password),
        )
        self.peers[address] = Peer(link=link, fingerprint=fingerprint)
        self._spawn(link.start())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _sync_links(self) -> None:
        """Follow discovery: link to new peers, drop vanished ones (static peers always stay)."""
        assert self.discovery is not None
        ads = self.discovery.peers()
        advertised = {f"{a.host}:{a.port}": a for a in ads.values()}
        for ad in advertised.values():
            self._add_link(ad.host, ad.port, ad.fingerprint)
        for address in list(self.peers):
            if address not in advertised and address not in self.cfg.discovery.static_peers:
                peer = self.peers.pop(address)
                log.info("peer at %s vanished", address)
                self._spawn(peer.link.stop())
        self.inbox.changed.set()

    # -- receiving --------------------------------------------------------------------------------

    async def _on_update(self, address: str, publisher: str, message: bytes) -> None:
        """Every failure here is a counted, logged rejection; nothing propagates into the link."""
        self.metrics.bytes_in += len(message)
        try:
            meta, neighbour = await asyncio.to_thread(self._admit, publisher, message, self.members())
        except Rejected as exc:
            self.metrics.reject(exc.reason, exc.detail, peer=publisher)
            return
        if meta.round < self.round:  # the round closed while this update was being opened
            self.metrics.reject(Reason.LATE, f"update for round {meta.round} finished opening in round "
                                f"{self.round}", peer=publisher)
            return
        self.inbox.put(meta.round, neighbour)

    def _admit(self, publisher: str, message: bytes,
               members: dict[str, Certificate]) -> tuple[UpdateMeta, Neighbour]:
        """Open, check and flatten one update (worker thread; `members` is a snapshot from the loop)."""
        meta, payload = open_envelope(
            message, self.identity, self.root, members.get, self.replay,
            max_bytes=int(self.cfg.gossip.max_update_mb * (1 << 20)),
        )
        if meta.sender != publisher:
            raise Rejected(Reason.UNKNOWN_SENDER, f"update signed by {meta.sender} arrived on {publisher}'s topic")
        if meta.round < self.round:
            raise Rejected(Reason.LATE, f"update for round {meta.round} arrived in round {self.round}")
        if meta.round > self.round + ROUNDS_AHEAD:
            raise Rejected(Reason.ROUND_WINDOW, f"update for round {meta.round}, we are in round {self.round}")
        params = codec.decode(payload)
        codec.check_against(params, self.spec)
        vector = flatten({name: params[name] for name in self.spec})  # local order, whatever the sender's
        return meta, Neighbour(meta.sender, vector, max(meta.degree, 1), meta.samples)

    # -- one round --------------------------------------------------------------------------------

    def _topology_view(self) -> tuple[dict[str, Certificate], list[str], str]:
        members = self.members()
        names = {nid: c.name for nid, c in members.items()}
        view = topology.view(self.cfg.gossip.topology, list(members), self.node_id, self.round,
                             seed=self.cfg.task.seed, names=names)
        return members, view.neighbours, view.epoch

    def _seal(self, vector_params: dict[str, np.ndarray], members: dict[str, Certificate],
              nbrs: list[str], epoch: str) -> bytes:
        self.seq += 1
        meta = UpdateMeta(sender=self.node_id, federation=self.fed, round=self.round, seq=self.seq,
                          timestamp=time.time(), epoch=epoch, samples=self.task.num_samples, degree=len(nbrs))
        payload = codec.encode(vector_params)
        return seal(payload, meta, self.identity, {n: members[n].box_key for n in nbrs})

    async def _collect(self, nbrs: list[str]) -> dict[str, Neighbour]:
        """Wait for every neighbour's update of this round, a timeout, or the missing ones to vanish."""
        deadline = time.monotonic() + self.cfg.gossip.round_timeout_s
        while True:
            have = self.inbox.updates.get(self.round, {})
            alive = self.members()
            missing = [n for n in nbrs if n not in have and n in alive]
            remaining = deadline - time.monotonic()
            if not missing or remaining <= 0:
                if missing:
                    log.warning("round %d: no update from %s within %.0f s; mixing without them",
                                self.round, missing, self.cfg.gossip.round_timeout_s)
                return self.inbox.close(self.round)
            self.inbox.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.inbox.changed.wait(), timeout=min(remaining, 1.0))

    async def _round(self) -> None:
        started = time.monotonic()
        members, nbrs, epoch = self._topology_view()
        loss = await asyncio.to_thread(self.task.train, self.model)
        params = get_params(self.model)
        own = flatten({name: params[name] for name in self.spec})
        if nbrs:  # a time-varying topology can leave a node without a partner for a round
            sent = params if self.attack is None else unflatten(
                self.attack.craft(own, self.heard, self.round), self.spec)
            message = await asyncio.to_thread(self._seal, sent, members, nbrs, epoch)
            await self.outbox.publish_update(message, nbrs)
            self.metrics.bytes_out += len(message) * len(nbrs)
        received = await self._collect(nbrs)
        got = [received[n] for n in nbrs if n in received]
        self.heard = [nb.vector for nb in got]
        radius = self.cfg.gossip.clip_radius or None
        result = await asyncio.to_thread(mix, own, len(nbrs), got, self.cfg.gossip.rule, radius,
                                         own_samples=self.task.num_samples, reputation=self.reputation)
        for n, why in result.downweighted.items():
            log.warning("round %d: down-weighting %s (reputation %.2f): %s", self.round, members[n].name,
                        result.reputation.get(n, 0.0), why)
        set_params(self.model, unflatten(result.vector, self.spec))
        accuracy, test_loss = await asyncio.to_thread(self.task.evaluate, self.model)
        self._save_model(result.vector)
        self.metrics.write({
            "round": self.round, "time": time.time(), "node": self.cfg.node.name, "node_id": self.node_id,
            "train_loss": loss, "accuracy": accuracy, "test_loss": test_loss,
            "round_s": time.monotonic() - started, "epoch": epoch, "members": len(members),
            "own_weight": result.own_weight, "radius": result.radius, "attack": self.cfg.attack.kind or None,
            "missing": [members[n].name for n in nbrs if n not in received],
            "neighbours": {members[n].name: {"id": n, "weight": result.weights.get(n, 0.0),
                                             "distance": result.distances.get(n),
                                             "clipped": result.clipped.get(n, False),
                                             "reputation": result.reputation.get(n),
                                             "downweighted": result.downweighted.get(n)} for n in nbrs},
        })
        log.info("round %d: loss %.4f acc %.4f neighbours %d/%d (%.1f s)", self.round, loss, accuracy,
                 len(got), len(nbrs), time.monotonic() - started)

    def _save_model(self, vector: np.ndarray) -> None:
        if self.cfg.metrics.save_models:
            out = self.cfg.data_dir / "models"
            out.mkdir(exist_ok=True)
            np.save(out / f"round_{self.round:04d}.npy", vector)

    # -- lifecycle --------------------------------------------------------------------------------

    async def _wait_for_peers(self) -> None:
        """Start together: until `expect_peers` certified peers are reachable, or `wait_s` passes."""
        want = self.cfg.discovery.expect_peers
        deadline = time.monotonic() + self.cfg.discovery.wait_s
        while len(self.members()) - 1 < want and time.monotonic() < deadline:
            self.inbox.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.inbox.changed.wait(), timeout=0.5)
        log.info("starting with %d peer(s) (expected %d)", len(self.members()) - 1, want)

    async def start(self) -> None:
        await self.outbox.start()
        await self.outbox.publish_certificate(self.cert.to_bytes())
        for peer in self.cfg.discovery.static_peers:
            host, _, port = peer.rpartition(":")
            self._add_link(host, int(port), None)
        if self.cfg.discovery.mdns:
            ad = PeerAd(self.node_id, self.fed, self.cfg.node.name, self.cfg.node.host, self.cfg.node.port,
                        self.cert.fingerprint())
            self.discovery = Discovery(ad, self.cfg.discovery.interfaces, on_change=self._sync_links)
            await self.discovery.start()

    async def stop(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
        await asyncio.gather(*(p.link.stop() for p in self.peers.values()), *self._tasks,
                             return_exceptions=True)
        await self.outbox.stop()

    async def run(self) -> None:
        """Start, run every round, linger so slower neighbours can fetch our last update, stop."""
        try:
            await self.start()
            await self._wait_for_peers()
            for round_ in range(1, self.cfg.training.rounds + 1):
                self.round = round_
                await self._round()
            await asyncio.sleep(self.cfg.gossip.linger_s)
        finally:
            await self.stop()


def run_node(cfg: NodeConfig) -> None:
    """Run a node to completion; SIGTERM and Ctrl-C both stop it cleanly (broker, links, mDNS goodbye)."""

    async def main() -> None:
        node = Node(cfg)
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await node.run()

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        raise SystemExit(143) from None  # stopped by SIGTERM: not a completed run
