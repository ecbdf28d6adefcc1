"""Revocation lists travel between real nodes: brokers offer the list they hold, links hand it on.

Three real nodes (each its own amqtt broker, mutual TLS links between all of them as static peers)
and a certified member "M" whose broker offers hostile lists. The admin's new list reaches one node;
the others adopt it from their neighbours, drop the revoked node, and the revoked node stops.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from amqtt.contexts import Action
from amqtt.session import Session
from helpers import certify, node_tls

from p2pfl.config import NodeConfig, validate
from p2pfl.errors import Reason
from p2pfl.federation import FederationAuthority
from p2pfl.learning import TaskSpec
from p2pfl.node import Node
from p2pfl.revocation import MAX_REVOCATION_BYTES, REVOCATION_FILE, RevocationList, load
from p2pfl.tls import peer_node_id
from p2pfl.transport import Outbox, PeerLink
from p2pfl.transport.amqtt_patches import SESSION_NODE
from p2pfl.transport.topics import Kind, Topic, parse_topic, revocations_topic

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


async def until(predicate: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    """Wait for a state (a generous ceiling: the machine may be busy)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not reached: {what}"
        await asyncio.sleep(0.05)


def test_the_revocations_topic_is_the_owners_and_readable_by_any_member() -> None:
    assert revocations_topic("fed", "own") == "p2pfl/fed/own/revocations"
    assert parse_topic("p2pfl/fed/own/revocations") == Topic("fed", "own", Kind.REVOCATIONS)
    assert parse_topic("p2pfl/fed/own/revocations/x").kind is None
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.verify_mode = ssl.CERT_REQUIRED
    outbox = Outbox(
        HOST, 0, "fed", "own", ssl_context=server, verify=lambda o: "x", on_reject=lambda r, d: None
    )
    member = Session()
    member.attributes[SESSION_NODE] = "me"
    for topic, allowed in (
        ("p2pfl/fed/own/revocations", True),
        ("p2pfl/fed/+/revocations", True),
        ("p2pfl/fed/other/revocations", False),
        ("p2pfl/fed/own/revocations/#", False),
    ):
        assert outbox._topic_allowed(member, topic, Action.SUBSCRIBE) is allowed, topic
    assert outbox._topic_allowed(member, "p2pfl/fed/own/revocations", Action.RECEIVE)
    assert not outbox._topic_allowed(member, "p2pfl/fed/own/revocations", Action.PUBLISH)
    assert not outbox._topic_allowed(Session(), "p2pfl/fed/own/revocations", Action.RECEIVE)


def test_a_link_hands_on_only_the_owners_list_within_the_size_cap() -> None:
    offered: list[tuple[str, bytes]] = []
    rejects: list[Reason] = []

    async def ignore(publisher: str, message: bytes) -> None:
        pass

    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    link = PeerLink(
        HOST,
        1,
        "fed",
        "me",
        tls_context=client,
        identify=lambda obj: "own",
        on_certificate=lambda pub, data: None,
        on_update=ignore,
        on_reject=lambda reason, detail: rejects.append(reason),
        max_message_bytes=1 << 20,
        on_revocations=lambda pub, data: offered.append((pub, data)),
    )
    link.peer_id = "own"  # set by _session once the broker's TLS certificate proved it

    async def main() -> None:
        await link._dispatch("p2pfl/fed/other/revocations", b"list")  # not the broker's owner
        await link._dispatch("p2pfl/otherfed/own/revocations", b"list")
        await link._dispatch("p2pfl/fed/own/revocations", b"")  # cleared
        await link._dispatch("p2pfl/fed/own/revocations", b"x" * (MAX_REVOCATION_BYTES + 1))
        await link._dispatch("p2pfl/fed/own/revocations", b"list")

    asyncio.run(main())
    assert offered == [("own", b"list")] and rejects == [Reason.OVERSIZE]


@pytest.mark.timeout(300)
def test_a_revocation_list_spreads_from_node_to_node(tmp_path: Path) -> None:
    asyncio.run(_scenario(tmp_path))


async def _scenario(tmp: Path) -> None:
    authority = FederationAuthority.create(tmp / "fed")
    # M: a certified member whose broker offers junk and a list it signed itself
    m_identity, m_cert = certify(authority, "node-m", tmp / "m")
    root = authority.root
    mallory = Outbox(
        HOST,
        free_port(),
        root.federation_id,
        m_identity.node_id,
        ssl_context=node_tls(authority, m_identity, m_cert).server_context(),
        verify=lambda obj: peer_node_id(obj, root),
        on_reject=lambda reason, detail: None,
    )
    await mallory.start()
    await mallory.publish_certificate(m_cert.to_bytes())

    ports = [free_port() for _ in range(3)]
    nodes = []
    for i, name in enumerate(("a", "b", "c")):
        cfg = NodeConfig()
        cfg.node.name, cfg.node.data_dir, cfg.node.port = f"node-{name}", str(tmp / name), ports[i]
        cfg.discovery.mdns = False
        cfg.discovery.static_peers = [f"{HOST}:{p}" for j, p in enumerate(ports) if j != i]
        if name == "b":
            cfg.discovery.static_peers.append(f"{HOST}:{mallory.port}")
        cfg.task = TaskSpec(name="synthetic-logreg", shard=i, num_shards=3)
        certify(authority, cfg.node.name, cfg.data_dir)
        nodes.append(Node(validate(cfg)))
    a, b, c = nodes
    for node in nodes:
        await node.start()
    try:
        everyone = {n.node_id for n in nodes}
        for node in nodes:
            await until(lambda node=node: everyone <= set(node.members()), f"{node.cfg.node.name} sees all")
        await until(lambda: m_identity.node_id in b.members(), "b links to m")

        # hostile offers on M's broker: counted by b, nothing adopted
        await mallory.publish_revocations(b"\x96junk")
        await until(lambda: b.metrics.rejected["malformed"] >= 1, "junk counted")
        forged = RevocationList(
            federation_id=root.federation_id,
            serial=7,
            issued_at=time.time(),
            revoked=frozenset({a.node_id}),
            signature=m_identity.sign(b"not the root"),
        )
        await mallory.publish_revocations(forged.to_bytes())
        await until(lambda: b.metrics.rejected["bad_signature"] >= 1, "forgery counted")
        assert b.revocations is None and a.node_id in b.members()

        # the admin revokes c; the list reaches a only (copied into its data dir)
        signed = authority.revoke(c.node_id)
        (tmp / "a" / REVOCATION_FILE).write_bytes((authority.directory / REVOCATION_FILE).read_bytes())
        assert a.reload_revocations()
        await until(lambda: b.revocations == signed, "b adopts the list from a")
        assert c.node_id not in b.members() and c.node_id not in a.members()
        assert load(tmp / "b" / REVOCATION_FILE, b.root) == signed  # persisted for b's next start
        await until(lambda: c.stopping.is_set(), "c learns from a neighbour that it is revoked, and stops")
        for node in (a, b):  # links to c (a static peer here) are closed
            assert all(p.link.peer_id != c.node_id for p in node.mesh.peers.values())  # type: ignore[attr-defined]
    finally:
        for node in nodes:
            await node.stop()
        await mallory.stop()
