"""Transport: chunk reassembly (pure) and a real amqtt outbox with real aiomqtt links on 127.0.0.1,
every session mutual TLS between federation-certified keys."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from amqtt.contexts import Action
from amqtt.session import Session

from p2pfl.envelope import ReplayGuard, UpdateMeta, open_envelope, seal
from p2pfl.errors import ConfigError, Reason, TransportError
from p2pfl.federation import Certificate, FederationAuthority, FederationRoot
from p2pfl.identity import Identity
from p2pfl.tls import NodeTls, peer_node_id
from p2pfl.transport import (
    Outbox,
    PeerLink,
    cert_topic,
    split_message,
    update_topic,
)
from p2pfl.transport.amqtt_patches import SESSION_NODE
from p2pfl.transport.outbox import client_id_for
from p2pfl.transport.topics import (
    Kind,
    Topic,
    cert_filter,
    inbox_filter,
    parse_topic,
    part_index,
)

HOST = "127.0.0.1"
MAX_MESSAGE = 64 << 20


# ---------------------------------------------------------------------------------------------
# pure parts (parts and their reassembly: tests/test_framing.py)


def test_broker_broadcast_records_have_a_short_repr() -> None:
    from p2pfl.transport.amqtt_patches import _Broadcast

    record = _Broadcast(session=None, topic="p2pfl/f/n/to/r/0", data=b"x" * (8 << 20))
    assert len(repr(record)) < 100 and len(f"{record}") < 100 and "8388608" in repr(record)
    assert record["data"] is not None and isinstance(record, dict)


def test_split_rejects_empty() -> None:
    with pytest.raises(ValueError):
        split_message(b"", 1024)


def test_update_topic_is_per_recipient() -> None:
    assert update_topic("f", "o", "r", 3) == "p2pfl/f/o/to/r/3"
    assert cert_topic("f", "o") == "p2pfl/f/o/cert"


def test_topics_are_built_and_parsed_in_one_place() -> None:
    assert (cert_filter("f"), inbox_filter("f", "me")) == ("p2pfl/f/+/cert", "p2pfl/f/+/to/me/+")
    assert parse_topic(cert_topic("f", "o")) == Topic("f", "o", Kind.CERT)
    assert parse_topic(update_topic("f", "o", "r", 7)) == Topic("f", "o", Kind.INBOX, "r", "7")
    assert parse_topic(inbox_filter("f", "me")) == Topic("f", "+", Kind.INBOX, "me", "+")
    for odd in (
        "p2pfl/f/o/cert/x",
        "p2pfl/f/o/proof",
        "p2pfl/f/o/proof/c",
        "p2pfl/f/o/to/r",
        "p2pfl/f/o/to/r/0/x",
        "p2pfl/f/o/update/0",
    ):
        parsed = parse_topic(odd)
        assert parsed is not None and parsed.kind is None and parsed.publisher == "o", odd
    for foreign in ("p2pfl/f/o", "x/f/o/cert", "#", ""):
        assert parse_topic(foreign) is None, foreign
    assert [part_index(t) for t in ("0", "42", "999999", "1000000", "1x", "", "+", "\u0663")] == [
        0,
        42,
        999999,
        None,
        None,
        None,
        None,
        None,
    ]


def _server_context() -> ssl.SSLContext:
    """A context with the right shape for tests that never open a connection."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _bare_outbox(host: str = HOST, port: int = 0) -> Outbox:
    return Outbox(
        host,
        port,
        "fed",
        "own",
        ssl_context=_server_context(),
        verify=lambda obj: "x",
        on_reject=lambda r, d: None,
    )


def _acl_outbox() -> Outbox:
    return _bare_outbox()


def _session(node: str | None) -> Session:
    session = Session()
    if node is not None:
        session.attributes[SESSION_NODE] = node
    return session


@pytest.mark.parametrize(
    "topic,allowed",
    [
        ("p2pfl/fed/own/cert", True),
        ("p2pfl/fed/+/cert", True),
        ("p2pfl/fed/own/to/me/+", True),
        ("p2pfl/fed/+/to/me/+", True),
        ("p2pfl/fed/own/to/me/#", True),
        ("p2pfl/fed/+/to/me/#", True),
        ("p2pfl/fed/own/to/other/+", False),  # another recipient's inbox
        ("p2pfl/fed/own/to/+/+", False),  # wildcard recipient
        ("p2pfl/fed/own/to/#", False),
        ("p2pfl/fed/own/to/+/#", False),
        ("p2pfl/fed/own/to/me", False),
        ("p2pfl/fed/own/to/me/+/x", False),
        ("p2pfl/fed/own/to/me/0", False),  # only '+' or '#' after the recipient
        ("p2pfl/fed/own/#", False),
        ("p2pfl/fed/own/+", False),
        ("p2pfl/fed/own/+/me/+", False),
        ("p2pfl/fed/own/cert/#", False),
        ("p2pfl/fed/own/update/+", False),
        ("p2pfl/fed/other/cert", False),  # another publisher
        ("p2pfl/fed/other/to/me/+", False),
        ("p2pfl/fed/#", False),
        ("p2pfl/+/own/cert", False),
        ("p2pfl/otherfed/own/cert", False),
        ("#", False),
        ("+/+/+/cert", False),
        ("$SYS/#", False),
    ],
)
def test_acl_subscribe(topic: str, allowed: bool) -> None:
    assert _acl_outbox()._topic_allowed(_session("me"), topic, Action.SUBSCRIBE) is allowed


def test_acl_receive_publish_and_unauthenticated() -> None:
    outbox = _acl_outbox()
    me = _session("me")
    assert outbox._topic_allowed(me, "p2pfl/fed/own/cert", Action.RECEIVE)
    # inbox parts are delivered live only while the session's node is a current recipient
    assert not outbox._topic_allowed(me, "p2pfl/fed/own/to/me/0", Action.RECEIVE)
    outbox._recipients = frozenset({"me", "other"})
    assert outbox._topic_allowed(me, "p2pfl/fed/own/to/me/0", Action.RECEIVE)
    for topic in (
        "p2pfl/fed/own/to/other/0",
        "p2pfl/fed/own/to/mex/0",
        "p2pfl/fed/own/to/me",
        "p2pfl/fed/other/cert",
        "p2pfl/fed/other/to/me/0",
        "p2pfl/fed/own/update/0",
        "p2pfl/fed/own/cert/x",
    ):
        assert not outbox._topic_allowed(me, topic, Action.RECEIVE), topic
    for topic in ("p2pfl/fed/own/cert", "p2pfl/fed/own/to/me/0"):
        assert not outbox._topic_allowed(me, topic, Action.PUBLISH)
        assert not outbox._topic_allowed(_session(None), topic, Action.RECEIVE)
        assert not outbox._topic_allowed(_session(None), "p2pfl/fed/+/cert", Action.SUBSCRIBE)
        assert not outbox._topic_allowed(None, topic, Action.RECEIVE)
    # an authenticated id that is itself a wildcard cannot widen its inbox
    for odd in ("+", "#", ""):
        assert not outbox._topic_allowed(_session(odd), "p2pfl/fed/own/to/+/+", Action.SUBSCRIBE)
        assert not outbox._topic_allowed(_session(odd), "p2pfl/fed/own/cert", Action.SUBSCRIBE)


def test_peerlink_dispatch_accepts_only_its_own_inbox() -> None:
    sink = Sink()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    link = PeerLink(
        HOST,
        1,
        "fed",
        "me",
        tls_context=ctx,
        identify=lambda obj: "own",
        on_certificate=sink.on_certificate,
        on_update=sink.on_update,
        on_reject=sink.on_reject,
        max_message_bytes=MAX_MESSAGE,
    )
    link.peer_id = "own"  # set by _session once the broker's TLS certificate proved it
    message = os.urandom(5000)
    parts = split_message(message, 2000)

    async def main() -> None:
        for index, part in enumerate(parts):  # addressed to someone else / bad shapes: ignored
            await link._dispatch(f"p2pfl/fed/own/to/other/{index}", part)
            await link._dispatch(f"p2pfl/fed/own/to/me/{index}/x", part)
            await link._dispatch(f"p2pfl/fed/own/update/{index}", part)
            await link._dispatch(f"p2pfl/otherfed/own/to/me/{index}", part)
            await link._dispatch(f"p2pfl/fed/other/to/me/{index}", part)  # not the broker's owner
        await link._dispatch("p2pfl/fed/other/cert", b"cert")
        assert sink.updates == [] and sink.certs == [] and link._reassembler.pending() == 0
        assert {r for r, _ in sink.rejects} == {Reason.UNKNOWN_SENDER}
        sink.rejects.clear()
        for index, part in enumerate(parts):
            await link._dispatch(f"p2pfl/fed/own/to/me/{index}", part)
        assert sink.updates == [("own", message)]
        # the same parts again (retained replay after a reconnect) are not handed out twice
        link._reassembler.drop_incomplete()
        for index, part in enumerate(parts):
            await link._dispatch(f"p2pfl/fed/own/to/me/{index}", part)
        assert len(sink.updates) == 1
        await link._dispatch("p2pfl/fed/own/to/me/0", b"")  # a cleared retained part
        await link._dispatch("p2pfl/fed/own/to/me/1x", parts[1])
        assert [r for r, _ in sink.rejects] == [Reason.MALFORMED]
        assert len(sink.updates) == 1

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# live broker helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Member:
    identity: Identity
    cert: Certificate
    tls: NodeTls

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def client(self, port: int, **kwargs: object) -> aiomqtt.Client:
        """A raw MQTT client of this member over mutual TLS (tests drive it by hand)."""
        options: dict[str, object] = {"identifier": client_id_for(self.node_id), "timeout": 5}
        options.update(kwargs)
        return aiomqtt.Client(HOST, port, tls_context=self.tls.client_context(), **options)  # type: ignore[arg-type]


@dataclass
class Federation:
    authority: FederationAuthority
    members: list[Member]

    @property
    def root(self) -> FederationRoot:
        return self.authority.root

    @property
    def fid(self) -> str:
        return self.root.federation_id

    def identify(self, ssl_object: object) -> str:
        return peer_node_id(ssl_object, self.root)


def make_federation(directory: Path, n: int) -> Federation:
    authority = FederationAuthority.create(directory)
    members = []
    for i in range(n):
        ident = Identity.generate()
        cert = authority.issue(f"n{i}", ident.verify_key_bytes, ident.box_public_bytes, 3600)
        members.append(Member(ident, cert, NodeTls(ident, authority.x509_pem(cert), authority.ca_pem)))
    return Federation(authority, members)


@dataclass
class Sink:
    certs: list[tuple[str, bytes]] = field(default_factory=list)
    updates: list[tuple[str, bytes]] = field(default_factory=list)
    rejects: list[tuple[Reason, str]] = field(default_factory=list)
    arrived: dict[int, float] = field(default_factory=dict)

    def on_certificate(self, node: str, data: bytes) -> None:
        self.certs.append((node, data))

    async def on_update(self, node: str, message: bytes) -> None:
        self.arrived[len(self.updates)] = time.perf_counter()
        self.updates.append((node, message))

    def on_reject(self, reason: Reason, detail: str) -> None:
        self.rejects.append((reason, detail))


def make_outbox(
    fed: Federation,
    owner: Member,
    port: int = 0,
    rejects: list[tuple[Reason, str]] | None = None,
    **kwargs: int,
) -> Outbox:
    """The owner's broker (TLS with the owner's certificate) on 127.0.0.1."""
    return Outbox(
        HOST,
        port,
        fed.fid,
        owner.node_id,
        ssl_context=owner.tls.server_context(),
        verify=fed.identify,
        on_reject=(lambda r, d: None) if rejects is None else (lambda r, d: rejects.append((r, d))),
        **kwargs,
    )


def small_part_outbox(fed: Federation, owner: Member) -> Outbox:
    """The owner's broker on a free port, cutting updates into 64 KiB parts (many parts per test)."""
    return make_outbox(fed, owner, chunk_bytes=64 << 10)


def make_link(
    port: int, fed: Federation, member: Member, sink: Sink, expected: str | None = None
) -> PeerLink:
    return PeerLink(
        HOST,
        port,
        fed.fid,
        member.node_id,
        tls_context=member.tls.client_context(),
        identify=fed.identify,
        on_certificate=sink.on_certificate,
        on_update=sink.on_update,
        on_reject=sink.on_reject,
        max_message_bytes=MAX_MESSAGE,
        expected=expected,
    )


async def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def run(coro_fn: Callable[[], object], timeout: float = 60.0) -> None:
    async def main() -> None:
        await asyncio.wait_for(coro_fn(), timeout)  # type: ignore[arg-type]

    asyncio.run(main())


def sealed_update(
    fed: Federation, sender: Member, recipients: list[Member], size: int
) -> tuple[bytes, bytes]:
    """(payload, real sealed envelope of it for `recipients`)."""
    payload = os.urandom(size)
    meta = UpdateMeta(
        sender=sender.node_id,
        federation=fed.fid,
        round=1,
        seq=1,
        timestamp=time.time(),
        samples=10,
        degree=len(recipients),
    )
    return payload, seal(
        payload, meta, sender.identity, {m.node_id: m.identity.box_public_bytes for m in recipients}
    )


def open_update(fed: Federation, me: Member, message: bytes) -> bytes:
    certs = {m.node_id: m.cert for m in fed.members}
    meta, payload = open_envelope(message, me.identity, fed.root, certs.get, ReplayGuard(), MAX_MESSAGE)
    assert meta.round == 1 and meta.sender == fed.members[0].node_id
    return payload


# ---------------------------------------------------------------------------------------------
# live broker tests


@pytest.mark.timeout(120)
def test_two_certified_clients_receive_10mb_update(tmp_path: Path) -> None:
    fed = make_federation(tmp_path / "fed", 3)
    owner, a, b = fed.members
    rejects: list[tuple[Reason, str]] = []

    async def main() -> None:
        outbox = make_outbox(fed, owner, rejects=rejects)
        await outbox.start()
        assert outbox.port > 0
        sinks = [Sink(), Sink()]
        links = [make_link(outbox.port, fed, m, s) for m, s in zip((a, b), sinks, strict=True)]
        try:
            for link in links:
                await link.start()
            await wait_until(lambda: all(link.connected for link in links), what="links to connect")
            await outbox.publish_certificate(owner.cert.to_bytes())
            await wait_until(lambda: all(s.certs for s in sinks), what="certificates")
            payload, message = sealed_update(fed, owner, [a, b], 10 << 20)
            assert len(message) > 10 << 20
            parts = await outbox.publish_update(message, [a.node_id, b.node_id])
            assert parts == -(-len(message) // outbox.chunk_bytes) >= 3
            await wait_until(lambda: all(s.updates for s in sinks), timeout=30, what="10 MB update")
            for member, sink in zip((a, b), sinks, strict=True):
                assert sink.certs[0] == (owner.node_id, owner.cert.to_bytes())
                assert Certificate.from_bytes(sink.certs[0][1]).node_id == owner.node_id
                assert len(sink.updates) == 1
                node, got = sink.updates[0]
                assert node == owner.node_id
                assert got == message
                assert open_update(fed, member, got) == payload
                assert sink.rejects == []
            assert all(link.bytes_in >= len(message) for link in links)
            assert rejects == []
        finally:
            for link in links:
                await link.stop()
            await outbox.stop()

    run(main, 100)


def count_sessions(link: PeerLink) -> Callable[[], int]:
    """Wrap a link's session attempts with a counter (to wait for retries without sleeping)."""
    attempts = [0]
    real = link._session

    async def counted() -> None:
        attempts[0] += 1
        await real()

    link._session = counted  # type: ignore[method-assign]
    return lambda: attempts[0]


@pytest.mark.timeout(60)
def test_clients_without_a_federation_certificate_never_reach_mqtt(tmp_path: Path) -> None:
    fed = make_federation(tmp_path / "fed", 3)
    other = make_federation(tmp_path / "other", 1)
    owner, a, revoked = fed.members
    stranger = other.members[0]
    rejects: list[tuple[Reason, str]] = []
    root = fed.root.with_revoked(revoked.node_id)

    async def main() -> None:
        outbox = Outbox(
            HOST,
            0,
            fed.fid,
            owner.node_id,
            ssl_context=owner.tls.server_context(),
            verify=lambda obj: peer_node_id(obj, root),
            on_reject=lambda r, d: rejects.append((r, d)),
        )
        await outbox.start()
        no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        no_cert.check_hostname = False
        no_cert.load_verify_locations(cadata=fed.authority.ca_pem.decode())
        # the stranger's own certificate, presented to a client that trusts our CA
        foreign = NodeTls(stranger.identity, stranger.tls.cert_pem, fed.authority.ca_pem).client_context()
        try:
            for name, ctx, reason in [
                ("plain MQTT", None, Reason.HANDSHAKE),
                ("TLS without a client certificate", no_cert, Reason.HANDSHAKE),
                ("another federation's certificate", foreign, Reason.HANDSHAKE),
                ("a revoked member", revoked.tls.client_context(), Reason.REVOKED),
            ]:
                before = len(rejects)
                with pytest.raises(aiomqtt.MqttError):
                    async with aiomqtt.Client(
                        HOST, outbox.port, identifier=client_id_for(a.node_id), tls_context=ctx, timeout=5
                    ):
                        pass
                await wait_until(lambda before=before: len(rejects) > before, what=f"refusal of {name}")
                assert [r for r, _ in rejects[before:]] == [reason], name
                assert outbox._broker is not None and len(outbox._broker.sessions) == 0, name

            # a link that does not trust the broker's CA gives up at the handshake, reported once
            sink = Sink()
            link = make_link(outbox.port, fed, stranger, sink)
            attempts = count_sessions(link)
            await link.start()
            await wait_until(lambda: attempts() >= 3, what="several attempts")
            assert not link.connected and [r for r, _ in sink.rejects] == [Reason.HANDSHAKE]
            await link.stop()
            # a certified member still gets in
            async with a.client(outbox.port):
                pass
        finally:
            await outbox.stop()

    run(main, 50)


@pytest.mark.timeout(60)
def test_a_certified_client_is_admitted_only_as_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fed = make_federation(tmp_path / "fed", 3)
    owner, a, b = fed.members
    rejects: list[tuple[Reason, str]] = []

    async def main() -> None:
        outbox = make_outbox(fed, owner, rejects=rejects)
        await outbox.start()
        try:
            refusals = [
                ({"identifier": client_id_for(b.node_id)}, Reason.PEER_IDENTITY),  # another node's id
                ({"identifier": b.node_id}, Reason.PEER_IDENTITY),
                ({"identifier": f"{a.node_id}x"}, Reason.PEER_IDENTITY),
                ({"identifier": "p2pfl-anything"}, Reason.PEER_IDENTITY),
                ({"clean_session": False}, Reason.AUTH_FAILED),  # persistent sessions never expire
                ({"will": aiomqtt.Will(cert_topic(fed.fid, owner.node_id), b"x")}, Reason.AUTH_FAILED),
            ]
            for options, reason in refusals:
                before = len(rejects)
                with pytest.raises(MqttConnectError):
                    async with a.client(outbox.port, **options):
                        pass
                assert [r for r, _ in rejects[before:]] == [reason], options
                assert outbox._broker is not None and len(outbox._broker.sessions) == 0
            async with a.client(outbox.port, identifier=a.node_id):  # its bare node id is its own too
                pass
            # a link that finds another node than discovery advertised closes and says so, once
            sink = Sink()
            link = make_link(outbox.port, fed, a, sink, expected=b.node_id)
            attempts = count_sessions(link)
            await link.start()
            await wait_until(lambda: attempts() >= 3, what="several attempts")
            assert not link.connected and [r for r, _ in sink.rejects] == [Reason.PEER_IDENTITY]
            assert "discovery advertised" in sink.rejects[0][1]
            await link.stop()
        finally:
            await outbox.stop()

    run(main, 50)
    assert "refused by the auth plugins" not in caplog.text  # counted once by the outbox, not logged again


@pytest.mark.timeout(60)
def test_a_refused_connect_changes_nothing_for_the_neighbour_it_names(tmp_path: Path) -> None:
    """The attacks on stock amqtt, replayed: a certified member B sends CONNECTs carrying neighbour
    A's live client id, with clean_session=1 (stock code deleted A's session and subscriptions) and
    with clean_session=0 plus wills (stock code took A's session over, cut A off and published B's
    will, here on A's inbox and on the owner's certificate topic, retained). Each is refused, and A's
    session, subscriptions and retained messages stay as they were; A keeps receiving and gets no will."""
    fed = make_federation(tmp_path / "fed", 3)
    owner, a, b = fed.members
    rejects: list[tuple[Reason, str]] = []

    async def main() -> None:
        outbox = make_outbox(fed, owner, rejects=rejects)
        await outbox.start()
        sink = Sink()
        link = make_link(outbox.port, fed, a, sink, expected=owner.node_id)
        try:
            await outbox.publish_certificate(owner.cert.to_bytes())
            await link.start()
            first = os.urandom(5000)
            await outbox.publish_update(first, [a.node_id])
            await wait_until(lambda: link.connected and sink.updates, what="a's link and first update")
            broker = outbox._broker
            assert broker is not None
            (victim_id,) = broker.sessions
            victim = broker.sessions[victim_id][0]
            assert victim_id.startswith(a.node_id)
            subscriptions = {t: [s.client_id for s, _ in subs] for t, subs in broker.subscriptions.items()}
            retained = dict(broker.retained_messages)
            forged = split_message(b"forged by a will", 1024)[0]
            attacks = [
                {"clean_session": True},
                {"clean_session": False},
                {
                    "clean_session": False,
                    "will": aiomqtt.Will(update_topic(fed.fid, owner.node_id, a.node_id, 0), forged, 1, True),
                },
                {
                    "clean_session": False,
                    "will": aiomqtt.Will(cert_topic(fed.fid, owner.node_id), b"x", 1, True),
                },
                {
                    "clean_session": True,
                    "will": aiomqtt.Will(cert_topic(fed.fid, owner.node_id), b"x", 1, True),
                },
            ]
            for attack in attacks:
                with pytest.raises(MqttConnectError):
                    async with b.client(outbox.port, identifier=victim_id, **attack):
                        pass
                assert list(broker.sessions) == [victim_id] and broker.sessions[victim_id][0] is victim
                assert victim.transitions.is_connected()
                assert {t: [s.client_id for s, _ in subs] for t, subs in broker.subscriptions.items()} == (
                    subscriptions
                )
                assert dict(broker.retained_messages) == retained
            assert [r for r, _ in rejects] == [Reason.PEER_IDENTITY] * len(attacks)
            # A still receives, and nothing else arrived before this update: a will would have been
            # queued for broadcast ahead of it
            second = os.urandom(5000)
            await outbox.publish_update(second, [a.node_id])
            await wait_until(lambda: len(sink.updates) == 2, what="second update")
            assert sink.updates == [(owner.node_id, first), (owner.node_id, second)]
            assert sink.certs == [(owner.node_id, owner.cert.to_bytes())] and sink.rejects == []
            assert link.connected and link.peer_id == owner.node_id
        finally:
            await link.stop()
            await outbox.stop()

    run(main, 50)


@pytest.mark.timeout(60)
def test_clients_cannot_publish_or_subscribe_outside_owner_namespace(tmp_path: Path) -> None:
    fed = make_federation(tmp_path / "fed", 3)
    owner, a, b = fed.members

    async def main() -> None:
        outbox = make_outbox(fed, owner)
        await outbox.start()
        sink = Sink()
        link = make_link(outbox.port, fed, a, sink)
        try:
            await outbox.publish_certificate(owner.cert.to_bytes())
            await link.start()
            await wait_until(lambda: link.connected and len(sink.certs) == 1, what="link")
            async with b.client(outbox.port) as c:
                refused = [
                    "#",
                    "+/#",
                    f"p2pfl/{fed.fid}/{a.node_id}/#",
                    "p2pfl/otherfed/+/cert",
                    "$SYS/#",
                    f"p2pfl/{fed.fid}/#",
                    f"p2pfl/{fed.fid}/+",
                    f"p2pfl/{fed.fid}/{owner.node_id}/#",
                    f"p2pfl/{fed.fid}/+/to/+/+",
                    f"p2pfl/{fed.fid}/+/to/{a.node_id}/+",
                    f"p2pfl/{fed.fid}/{owner.node_id}/to/#",
                ]
                granted = await c.subscribe([(t, 1) for t in refused])
                assert [getattr(g, "value", g) for g in granted] == [0x80] * len(refused)
                # injection attempts on the owner's own topics, on the intruder's, and elsewhere
                forged_parts = split_message(b"forged update", 1024)
                await c.publish(
                    update_topic(fed.fid, owner.node_id, a.node_id, 0), forged_parts[0], qos=1, retain=True
                )
                await c.publish(
                    update_topic(fed.fid, owner.node_id, b.node_id, 0), forged_parts[0], qos=1, retain=True
                )
                await c.publish(cert_topic(fed.fid, owner.node_id), b"forged cert", qos=1, retain=True)
                await c.publish(cert_topic(fed.fid, b.node_id), b"forged cert", qos=1, retain=True)
                await c.publish(update_topic(fed.fid, b.node_id, a.node_id, 0), forged_parts[0], qos=0)
                await c.publish("anything/else", b"x", qos=1)
                await asyncio.sleep(1.0)
                assert len(c.messages) == 0  # nothing at all reached the intruder's refused filters
                # an allowed filter on the owner's namespace works and shows the real certificate
                ok = await c.subscribe(cert_topic(fed.fid, owner.node_id), qos=1)
                assert getattr(ok[0], "value", ok[0]) == 1
                msg = await asyncio.wait_for(anext(aiter(c.messages)), 5)
                assert msg.payload == owner.cert.to_bytes()
            assert sink.updates == []
            assert sink.certs == [(owner.node_id, owner.cert.to_bytes())]
            # nothing forged was retained either: a late link sees only the genuine certificate
            late = Sink()
            late_link = make_link(outbox.port, fed, b, late)
            await late_link.start()
            await wait_until(lambda: late_link.connected and late.certs, what="late link")
            await asyncio.sleep(0.3)
            assert late.certs == [(owner.node_id, owner.cert.to_bytes())] and late.updates == []
            assert late.rejects == [] and sink.rejects == []
            assert list(outbox._broker.retained_messages) == [cert_topic(fed.fid, owner.node_id)]  # type: ignore[union-attr]
            await late_link.stop()
        finally:
            await link.stop()
            await outbox.stop()

    run(main, 50)


def _retained_updates(outbox: Outbox) -> list[str]:
    assert outbox._broker is not None
    return sorted(t for t in outbox._broker.retained_messages if "/to/" in t)


@pytest.mark.timeout(60)
def test_update_reaches_only_its_recipients(tmp_path: Path) -> None:
    fed = make_federation(tmp_path / "fed", 4)
    owner, a, b, c = fed.members

    async def main() -> None:
        outbox = small_part_outbox(fed, owner)
        await outbox.start()
        sinks = {m.node_id: Sink() for m in (a, b, c)}
        links = {m.node_id: make_link(outbox.port, fed, m, sinks[m.node_id]) for m in (a, b, c)}
        try:
            await outbox.publish_certificate(owner.cert.to_bytes())
            for link in links.values():
                await link.start()
            await wait_until(
                lambda: (
                    all(link.connected for link in links.values()) and all(s.certs for s in sinks.values())
                ),
                what="links and certificates",
            )
            message = os.urandom(300_000)
            assert await outbox.publish_update(message, [a.node_id, b.node_id]) == 5
            await wait_until(lambda: sinks[a.node_id].updates and sinks[b.node_id].updates, what="update")
            await asyncio.sleep(0.3)
            assert sinks[a.node_id].updates == [(owner.node_id, message)]
            assert sinks[b.node_id].updates == [(owner.node_id, message)]
            # c is certified and connected to the same broker, but was not addressed
            assert sinks[c.node_id].updates == [] and links[c.node_id].bytes_in < 10_000
            # c cannot ask for a's (or anyone's) inbox explicitly with its own valid token
            async with c.client(outbox.port) as snoop:
                prefix = f"p2pfl/{fed.fid}"
                refused = [
                    f"{prefix}/{owner.node_id}/to/{a.node_id}/+",
                    f"{prefix}/{owner.node_id}/to/+/+",
                    f"{prefix}/+/to/+/+",
                    f"{prefix}/+/to/{a.node_id}/#",
                    f"{prefix}/{owner.node_id}/to/#",
                    f"{prefix}/{owner.node_id}/#",
                ]
                granted = await snoop.subscribe([(t, 1) for t in refused])
                assert [getattr(g, "value", g) for g in granted] == [0x80] * len(refused)
                await outbox.publish_update(os.urandom(100_000), [a.node_id, b.node_id])
                await wait_until(lambda: len(sinks[a.node_id].updates) == 2, what="second update")
                await asyncio.sleep(0.3)
                assert len(snoop.messages) == 0  # neither the retained nor the live parts
                # its own inbox is granted, and gets exactly what is addressed to c
                own = await snoop.subscribe(f"{prefix}/+/to/{c.node_id}/+", qos=1)
                assert getattr(own[0], "value", own[0]) == 1
                await asyncio.sleep(0.2)
                assert len(snoop.messages) == 0
                third = os.urandom(1000)
                await outbox.publish_update(third, [a.node_id, c.node_id])
                msg = await asyncio.wait_for(anext(aiter(snoop.messages)), 5)
                assert msg.topic.value == update_topic(fed.fid, owner.node_id, c.node_id, 0)
                assert split_message(third, 1024, bytes(msg.payload)[4:20])[0] == msg.payload
            await wait_until(lambda: sinks[c.node_id].updates, what="c addressed")
            assert sinks[c.node_id].updates == [(owner.node_id, third)]
            assert (
                sinks[a.node_id].updates[-1] == (owner.node_id, third) and len(sinks[b.node_id].updates) == 2
            )
            assert all(s.rejects == [] for s in sinks.values())
        finally:
            for link in links.values():
                await link.stop()
            await outbox.stop()

    run(main, 50)


@pytest.mark.timeout(60)
def test_retained_updates_follow_the_recipient_list(tmp_path: Path) -> None:
    fed = make_federation(tmp_path / "fed", 3)
    owner, a, b = fed.members

    async def main() -> None:
        outbox = small_part_outbox(fed, owner)
        await outbox.start()
        started: list[PeerLink] = []

        async def late(member: Member) -> tuple[PeerLink, Sink]:
            sink = Sink()
            link = make_link(outbox.port, fed, member, sink)
            started.append(link)
            await link.start()
            await wait_until(lambda: link.connected and sink.certs, what="late link")
            return link, sink

        def topics(recipient: Member, count: int) -> list[str]:
            return sorted(update_topic(fed.fid, owner.node_id, recipient.node_id, i) for i in range(count))

        try:
            await outbox.publish_certificate(owner.cert.to_bytes())
            big, small = os.urandom(1 << 20), os.urandom(100_000)
            assert await outbox.publish_update(big, [a.node_id, b.node_id]) == 16
            assert _retained_updates(outbox) == sorted(topics(a, 16) + topics(b, 16))
            # b is no longer a recipient: all its parts go; a's stale parts 2..15 go too
            assert await outbox.publish_update(small, [a.node_id]) == 2
            assert _retained_updates(outbox) == topics(a, 2)
            # a late subscriber as b gets nothing retained; as a, the latest update only
            b_link, b_sink = await late(b)
            a_link, a_sink = await late(a)
            await wait_until(lambda: a_sink.updates, what="retained update for a")
            await asyncio.sleep(0.3)
            assert a_sink.updates == [(owner.node_id, small)]
            assert b_sink.updates == [] and b_link.bytes_in < 10_000
            # a new update to both reaches both exactly once, and is retained for both
            newer = os.urandom(300_000)
            assert await outbox.publish_update(newer, [b.node_id, a.node_id, b.node_id]) == 5
            await wait_until(lambda: len(a_sink.updates) == 2 and len(b_sink.updates) == 1, what="newer")
            await asyncio.sleep(0.2)
            assert a_sink.updates[1] == b_sink.updates[0] == (owner.node_id, newer)
            assert len(a_sink.updates) == 2 and len(b_sink.updates) == 1
            assert _retained_updates(outbox) == sorted(topics(a, 5) + topics(b, 5))
            # a second late subscriber as a replays the latest retained parts
            _, a2_sink = await late(a)
            await wait_until(lambda: a2_sink.updates, what="retained for second a")
            assert a2_sink.updates == [(owner.node_id, newer)]
            # no recipients: everything is cleared and nothing is sent
            assert await outbox.publish_update(b"ignored", []) == 0
            assert _retained_updates(outbox) == []
            _, b2_sink = await late(b)
            await asyncio.sleep(0.3)
            assert b2_sink.updates == [] and len(a_sink.updates) == 2
            assert all(s.rejects == [] for s in (a_sink, b_sink, a2_sink, b2_sink))
            with pytest.raises(TypeError):
                await outbox.publish_update(small, a.node_id)
            with pytest.raises(ConfigError):
                await outbox.publish_update(small, ["bad/id"])
        finally:
            for link in started:
                await link.stop()
            await outbox.stop()

    run(main, 50)


@pytest.mark.timeout(60)
def test_peerlink_reconnects_after_broker_restart(tmp_path: Path) -> None:
    fed = make_federation(tmp_path / "fed", 2)
    owner, a = fed.members
    port = free_port()

    async def main() -> None:
        outbox = make_outbox(fed, owner, port)
        await outbox.start()
        sink = Sink()
        link = make_link(port, fed, a, sink)
        try:
            await link.start()
            await wait_until(lambda: link.connected, what="first connect")
            first = os.urandom(50_000)
            await outbox.publish_update(first, [a.node_id])
            await wait_until(lambda: len(sink.updates) == 1, what="first update")
            await outbox.stop()
            await wait_until(lambda: not link.connected, what="disconnect")
            await asyncio.sleep(0.5)  # a few refused reconnects while the broker is down
            outbox = make_outbox(fed, owner, port)
            await outbox.start()
            await wait_until(lambda: link.connected, timeout=15, what="reconnect")
            second = os.urandom(70_000)
            await outbox.publish_update(second, [a.node_id])
            await wait_until(lambda: len(sink.updates) == 2, what="second update")
            assert sink.updates[1] == (owner.node_id, second)
            assert sink.rejects == []
        finally:
            await link.stop()
            await outbox.stop()

    run(main, 50)


@pytest.mark.timeout(60)
def test_multipart_update_reaches_four_subscribers_intact(tmp_path: Path) -> None:
    """Many small parts to several links, twice: each link rebuilds each message exactly once.

    (The throughput figure for a 45 MB update lives in scripts/bench_broker.py.)
    """
    fed = make_federation(tmp_path / "fed", 5)
    owner, *subs = fed.members

    async def main() -> None:
        outbox = small_part_outbox(fed, owner)
        await outbox.start()
        sinks = [Sink() for _ in subs]
        links = [make_link(outbox.port, fed, m, s) for m, s in zip(subs, sinks, strict=True)]
        try:
            for link in links:
                await link.start()
            await wait_until(lambda: all(link.connected for link in links), what="links")
            for rep in range(2):
                message = os.urandom((3 << 20) + 12345)
                parts = await outbox.publish_update(message, [m.node_id for m in subs])
                assert parts == -(-len(message) // (64 << 10)) == 49
                await wait_until(
                    lambda rep=rep: all(len(s.updates) == rep + 1 for s in sinks),
                    timeout=30,
                    what="update to 4 links",
                )
                assert all(s.updates[rep] == (owner.node_id, message) for s in sinks)
            await asyncio.sleep(0.2)
            assert all(len(s.updates) == 2 and s.rejects == [] for s in sinks)
            assert all(link._reassembler.pending() == 0 for link in links)
        finally:
            for link in links:
                await link.stop()
            await outbox.stop()

    run(main, 50)


def test_amqtt_warnings_do_not_format_whole_payloads() -> None:
    import logging

    from amqtt.mqtt.publish import PublishPacket

    from p2pfl.transport.amqtt_patches import tame_amqtt_logging

    tame_amqtt_logging()
    logger = logging.getLogger("amqtt.mqtt.protocol.handler")
    seen: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    grab = Grab()
    logger.addHandler(grab)
    try:
        packet = PublishPacket.build("t/x", b"x" * (4 << 20), 1, True, 0, False)
        logger.warning("DUP flag must set to 0 for QOS 0 message. Message ignored: %r", packet)
    finally:
        logger.removeHandler(grab)
    assert seen and len(seen[0]) < 200
    assert logging.getLogger("amqtt").getEffectiveLevel() >= logging.WARNING


@pytest.mark.timeout(30)
def test_silent_clients_are_dropped_before_and_after_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TCP client that never starts TLS is dropped by the front door's handshake deadline; one that
    finishes TLS but never sends CONNECT, by the broker's CONNECT deadline (both shortened here; the
    ceilings are far below the defaults of 10 s, so the shortened deadlines are what hung up)."""
    from p2pfl.transport import amqtt_patches
    from p2pfl.transport.frontdoor import DoorLimits

    monkeypatch.setattr(amqtt_patches, "CONNECT_TIMEOUT_S", 0.5)
    fed = make_federation(tmp_path / "fed", 2)
    owner, a = fed.members
    rejects: list[tuple[Reason, str]] = []

    async def main() -> None:
        outbox = make_outbox(fed, owner, rejects=rejects, door_limits=DoorLimits(handshake_s=0.5))  # type: ignore[arg-type]
        await outbox.start()
        try:
            reader, writer = await asyncio.open_connection(HOST, outbox.port)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                assert await asyncio.wait_for(reader.read(1), 5) == b""  # the door hung up on us
                raise ConnectionResetError
            writer.close()
            assert [r for r, _ in rejects] == [Reason.HANDSHAKE]
            reader, writer = await asyncio.open_connection(HOST, outbox.port, ssl=a.tls.client_context())
            assert await asyncio.wait_for(reader.read(1), 5) == b""  # TLS, then the broker hung up on us
            writer.close()
            assert outbox._broker is not None and len(outbox._broker.sessions) == 0
        finally:
            await outbox.stop()

    run(main, 20)


def test_a_port_in_use_is_one_clear_error_without_amqtt_traceback(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        outbox = _bare_outbox(HOST, port)
        with pytest.raises(TransportError, match=rf"port {port} on {HOST} is in use: set \[node\] port"):
            asyncio.run(outbox.start())
    assert "Broker startup failed" not in caplog.text


def test_a_host_that_is_not_ours_says_so() -> None:
    outbox = _bare_outbox("10.255.255.1")
    with pytest.raises(TransportError, match=r"\[node\] host 10.255.255.1 is not an address of this machine"):
        asyncio.run(outbox.start())


def test_a_loopback_broker_lets_many_peers_handshake_at_once() -> None:
    """Every peer of a local testbed connects from 127.0.0.1, many at the same moment: there the
    per-source cap on connections still in their handshake is the pending cap."""
    from p2pfl.mesh import _door_limits
    from p2pfl.transport.frontdoor import DoorLimits

    for host in ("127.0.0.1", "::1", "[::1]", "localhost"):
        assert _door_limits(host).max_per_source == DoorLimits().max_pending
    assert _door_limits("10.0.0.5") == DoorLimits()


def test_amqtt_warnings_a_member_can_trigger_per_packet_are_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A member's session can make amqtt warn once per 4-byte packet (PUBACK for nothing): only the
    first of a kind per interval reaches the log; the next one that passes says how many were held."""
    from p2pfl.transport.amqtt_patches import _RateLimit

    limiter = _RateLimit()
    logger = logging.getLogger("amqtt.test.ratelimit")
    logger.addFilter(limiter)
    try:
        with caplog.at_level(logging.WARNING, logger="amqtt.test.ratelimit"):
            for packet_id in range(2000):
                logger.warning(f"Received PUBACK for unknown pending message Id: '{packet_id}'")
        assert len(caplog.records) == 1
        limiter._kinds = {
            k: (last - limiter.RATE_LIMIT_S, held) for k, (last, held) in limiter._kinds.items()
        }
        with caplog.at_level(logging.WARNING, logger="amqtt.test.ratelimit"):
            logger.warning("Received PUBACK for unknown pending message Id: '7'")
        assert "1999 similar held back" in caplog.records[-1].getMessage()
    finally:
        logger.removeFilter(limiter)


@pytest.mark.timeout(90)
def test_a_link_that_gives_up_waiting_for_connack_closes_its_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker too loaded to answer CONNECT in time: the link gives up and closes that connection
    (it used to stay open, a session nobody reads once a late CONNACK arrived), then tries again."""
    from p2pfl.transport import link as link_module

    monkeypatch.setattr(link_module, "CONNACK_TIMEOUT_S", 1.0)
    fed = make_federation(tmp_path / "fed", 2)
    owner, member = fed.members
    connections: list[asyncio.Future[bytes]] = []  # each: what the client sent before it closed

    async def silent_broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        connections.append(done)
        received = b""
        try:
            while chunk := await reader.read(4096):  # read CONNECT, never answer it
                received += chunk
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            done.set_result(received)
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(silent_broker, HOST, 0, ssl=owner.tls.server_context())
        port = server.sockets[0].getsockname()[1]
        link = make_link(port, fed, member, Sink(), expected=owner.node_id)
        try:
            await link.start()
            await wait_until(lambda: len(connections) >= 1, 30, "the link's first connection")
            sent = await asyncio.wait_for(connections[0], 30)  # closed by the link, not by us
            assert sent[:1] == b"\x10", "the link sent CONNECT before giving up"
            await wait_until(lambda: len(connections) >= 2, 30, "a second attempt")
            assert not link.connected
        finally:
            await link.stop()
            server.close()
            await server.wait_closed()

    run(main, 80)
