"""A real node behind a real broker refuses hostile updates, counts each reason, and keeps working.

The test plays a certified neighbour "A" (its own real amqtt broker, which the node links to) and an
outsider from another federation "C", and pushes good, replayed, forged, malformed, non-finite,
mis-shaped, late and foreign updates through the real MQTT path.
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
from helpers import certify

from p2pfl import codec
from p2pfl.config import NodeConfig, validate
from p2pfl.envelope import SIGN_DOMAIN, UpdateMeta, seal
from p2pfl.federation import FederationAuthority, make_broker_proof, make_token, verify_token
from p2pfl.identity import Identity
from p2pfl.learning import get_params
from p2pfl.node import Node
from p2pfl.round import MAX_ROUNDS_AHEAD, STALENESS
from p2pfl.transport import Outbox

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
        self, authority: FederationAuthority, name: str, directory: Path, prover: Identity | None = None
    ) -> None:
        """`prover`: whose key answers the broker proof (an impostor serving a public certificate
        does not hold the certified key)."""
        self.identity, self.cert = certify(authority, name, directory)
        root = authority.root
        prover = prover or self.identity
        self.outbox = Outbox(
            HOST,
            free_port(),
            root.federation_id,
            self.identity.node_id,
            authenticate=lambda u, p: verify_token(root, u, p).node_id,
            on_reject=lambda reason, detail: None,
            prove=lambda client, pw: make_broker_proof(prover, root.federation_id, client, pw),
        )
        self.seq = 0

    async def start(self) -> None:
        await self.outbox.start()
        await self.outbox.publish_certificate(self.cert.to_bytes())

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
    # An uncertified host serving the public certificate of member D, who is offline.
    impostor = Neighbour(authority, "node-d", tmp / "d", prover=Identity.generate())
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
        await until(lambda: node.metrics.rejected["bad_signature"] == 1)  # the impostor's proof (see below)
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
        await until(lambda: rejected("bad_signature") == 2)

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

        # The outsider's broker refuses the node, and the node never counts the outsider as a member;
        # the impostor serves a valid certificate but cannot sign our token with its key.
        await until(lambda: rejected("bad_signature") == 2)
        assert c.identity.node_id not in node.members()
        assert impostor.identity.node_id not in node.members()
        await impostor.outbox.publish_update(
            seal(codec.encode(good), impostor.meta(10), impostor.identity, {b_id: b_box}), [b_id]
        )
        await asyncio.sleep(2)  # the link never subscribed to the unproven broker's inbox: nothing arrives
        assert node.core.inbox.newest(impostor.identity.node_id) is None
        impostor_link = next(p.link for p in node.mesh.peers.values() if p.cert and p.cert.name == "node-d")
        assert impostor_link.trusted_publisher is None

        # Nothing was lost: the next honest update is still accepted.
        node.core.round = 11
        await send(sealed(good, a.meta(11)))
        await until(
            lambda: (newest := node.core.inbox.newest(a.identity.node_id)) is not None and newest.round == 11
        )

        # A plain MQTT client without credentials can neither connect to subscribe nor publish.
        with pytest.raises(MqttConnectError):
            async with aiomqtt.Client(HOST, cfg.node.port, identifier="anon", timeout=5):
                pass
        assert rejected("auth_failed") >= 1  # the anonymous attempt was counted
        # A certified member can connect but cannot overwrite what the node publishes.
        cert_topic = f"p2pfl/{node.root.federation_id}/{b_id}/cert"
        async with aiomqtt.Client(
            HOST,
            cfg.node.port,
            username=a.identity.node_id,
            password=make_token(a.identity, a.cert),
            identifier="member",
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
