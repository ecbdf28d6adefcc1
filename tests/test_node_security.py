"""A real node behind a real broker refuses hostile updates, counts each reason, and keeps working.

The test plays a certified neighbour "A" (its own real amqtt broker, which the node links to), an
outsider from another federation "C", and a certified member "E" whose broker poses as member "D",
and pushes good, replayed, forged, malformed, non-finite, mis-shaped, late and foreign updates
through the real MQTT path (mutual TLS on every session).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import numpy as np
import pytest
from aiomqtt.exceptions import MqttConnectError
from helpers import certify, node_tls

from p2pfl import codec
from p2pfl.config import NodeConfig, validate
from p2pfl.envelope import SIGN_DOMAIN, UpdateMeta, seal
from p2pfl.federation import FederationAuthority
from p2pfl.identity import Identity
from p2pfl.learning import get_params
from p2pfl.node import Node
from p2pfl.round import MAX_ROUNDS_AHEAD, STALENESS
from p2pfl.tls import peer_node_id
from p2pfl.transport import Outbox
from p2pfl.transport.outbox import client_id_for

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def forge(message: bytes, signer: Identity) -> bytes:
    """Replace an envelope's header signature with one made by another key."""
    (header_len,) = struct.unpack_from("<I", message, 4)
    header = message[8 : 8 + header_len]
    return message[: 8 + header_len] + signer.sign(SIGN_DOMAIN + header) + message[8 + header_len + 64 :]


async def until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


class Neighbour:
    """A hand-driven certified peer: its own broker, its own keys, updates crafted by the test."""

    def __init__(
        self, authority: FederationAuthority, name: str, directory: Path, poses_as: Neighbour | None = None
    ) -> None:
        """`poses_as`: a member whose certificate and topics this neighbour's broker serves, behind its
        own TLS certificate (it cannot show the other member's: it lacks that key)."""
        self.identity, self.cert = certify(authority, name, directory)
        self.tls = node_tls(authority, self.identity, self.cert)
        root = authority.root
        self.shown = poses_as or self
        self.outbox = Outbox(
            HOST,
            free_port(),
            root.federation_id,
            self.shown.identity.node_id,
            ssl_context=self.tls.server_context(),
            verify=lambda obj: peer_node_id(obj, root),
            on_reject=lambda reason, detail: None,
        )
        self.seq = 0

    async def start(self) -> None:
        await self.outbox.start()
        await self.outbox.publish_certificate(self.shown.cert.to_bytes())

    def meta(self, round_: int, **changes: object) -> UpdateMeta:
        self.seq += 1
        fields = dict(
            sender=self.identity.node_id,
            federation=self.cert.federation_id,
            round=round_,
            seq=self.seq,
            timestamp=time.time(),
            samples=100,
            degree=1,
        )
        fields.update(changes)
        return UpdateMeta(**fields)  # type: ignore[arg-type]


@pytest.mark.timeout(120)
def test_node_refuses_hostile_updates_and_keeps_running(tmp_path: Path) -> None:
    asyncio.run(_scenario(tmp_path))


async def _scenario(tmp: Path) -> None:
    authority = FederationAuthority.create(tmp / "federation")
    outsider_authority = FederationAuthority.create(tmp / "other-federation")
    a = Neighbour(authority, "node-a", tmp / "a")
    c = Neighbour(outsider_authority, "node-c", tmp / "c")
    # Member E's broker serves the public certificate (and topics) of member D, who is offline.
    d = Neighbour(authority, "node-d", tmp / "d")
    impostor = Neighbour(authority, "node-e", tmp / "e", poses_as=d)
    for peer in (a, c, impostor):
        await peer.start()

    cfg = NodeConfig()
    cfg.node.name, cfg.node.data_dir, cfg.node.port = "node-b", str(tmp / "b"), free_port()
    cfg.discovery.mdns = False
    cfg.discovery.static_peers = [f"{HOST}:{p.outbox.port}" for p in (a, c, impostor)]
    certify(authority, "node-b", tmp / "b")
    node = Node(validate(cfg))
    await node.start()
    try:
        await until(lambda: a.identity.node_id in node.members())
        # the outsider's broker shows a certificate of another federation: the link's handshake fails
        await until(lambda: node.metrics.rejected["handshake"] >= 1)
        node.core.round = 10
        b_id, b_box = node.node_id, node.identity.box_public_bytes
        good = get_params(node.model)

        async def send(message: bytes, to: list[str] | None = None) -> None:
            await a.outbox.publish_update(message, to or [b_id])

        def sealed(params: dict[str, np.ndarray], meta: UpdateMeta) -> bytes:
            return seal(codec.encode(params), meta, a.identity, {b_id: b_box})

        def rejected(reason: str) -> int:
            return node.metrics.rejected[reason]

        first = sealed(good, a.meta(10))
        await send(first)
        await until(lambda: node.core.inbox.newest(a.identity.node_id) is not None)

        await send(first)  # captured and replayed later
        await until(lambda: rejected("replay") == 1)

        await send(
            forge(sealed(good, a.meta(10)), c.identity)
        )  # re-signed by a key A's certificate does not hold
        await until(lambda: rejected("bad_signature") == 1)

        await send(b"\x00garbage" * 100)
        await until(lambda: rejected("malformed") == 1)

        poisoned = {k: v.copy() for k, v in good.items()}
        next(iter(poisoned.values())).flat[0] = np.nan
        await send(sealed(poisoned, a.meta(10)))
        await until(lambda: rejected("non_finite") == 1)

        reshaped = {k: (v.reshape(-1) if v.ndim > 1 else v) for k, v in good.items()}
        await send(sealed(reshaped, a.meta(10)))
        await until(lambda: rejected("shape_mismatch") == 1)

        await send(sealed(good, a.meta(10 - STALENESS - 1)))  # older than the staleness bound
        await until(lambda: rejected("late") == 1)

        await send(sealed(good, a.meta(MAX_ROUNDS_AHEAD + 1)))  # a round no federation reaches
        await until(lambda: rejected("round_window") == 1)

        await send(sealed(good, a.meta(10, federation=c.cert.federation_id)))
        await until(lambda: rejected("wrong_federation") == 1)

        stranger = Identity.generate()
        await send(
            seal(codec.encode(good), a.meta(10), a.identity, {stranger.node_id: stranger.box_public_bytes})
        )
        await until(lambda: rejected("not_recipient") == 1)

        # The node never counts the outsider as a member. The impostor's TLS certificate proves E, so
        # the link follows only E's certificate and E's parts there: D's are refused, whoever signed them.
        assert c.identity.node_id not in node.members()
        assert d.identity.node_id not in node.members()
        assert impostor.identity.node_id not in node.members()
        impostor_link = next(p.link for p in node.mesh.peers.values() if p.link.port == impostor.outbox.port)
        await until(lambda: impostor_link.connected and impostor_link.peer_id == impostor.identity.node_id)
        await impostor.outbox.publish_update(
            seal(codec.encode(good), d.meta(10), d.identity, {b_id: b_box}), [b_id]
        )
        await until(lambda: rejected("unknown_sender") >= 1)
        assert node.core.inbox.newest(d.identity.node_id) is None
        assert d.identity.node_id not in node.members()

        # Nothing was lost: the next honest update is still accepted.
        node.core.round = 11
        await send(sealed(good, a.meta(11)))
        await until(
            lambda: (newest := node.core.inbox.newest(a.identity.node_id)) is not None and newest.round == 11
        )

        # A plain MQTT client without a certificate cannot even finish the TLS handshake.
        handshakes = rejected("handshake")
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(HOST, cfg.node.port, identifier="anon", timeout=5):
                pass
        await until(lambda: rejected("handshake") > handshakes)  # the attempt was counted
        # A certified member cannot connect under another node's client id ...
        with pytest.raises(MqttConnectError):
            async with aiomqtt.Client(
                HOST,
                cfg.node.port,
                identifier=client_id_for(b_id),
                tls_context=a.tls.client_context(),
                timeout=5,
            ):
                pass
        assert rejected("peer_identity") >= 1
        # ... and as itself it can connect but cannot overwrite what the node publishes.
        cert_topic = f"p2pfl/{node.root.federation_id}/{b_id}/cert"
        async with aiomqtt.Client(
            HOST,
            cfg.node.port,
            identifier=client_id_for(a.identity.node_id),
            tls_context=a.tls.client_context(),
            timeout=5,
        ) as client:
            await client.publish(cert_topic, b"forged", qos=1, retain=True)
            await client.subscribe(cert_topic, qos=1)
            message = await asyncio.wait_for(anext(aiter(client.messages)), timeout=10)
            assert bytes(message.payload) == node.cert.to_bytes()
    finally:
        await node.stop()
        await a.outbox.stop()
        await c.outbox.stop()
        await impostor.outbox.stop()
