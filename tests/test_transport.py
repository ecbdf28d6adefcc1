"""Transport: chunk reassembly (pure) and a real amqtt outbox with real aiomqtt links on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
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
from p2pfl.errors import ConfigError, Reason, Rejected, TransportError
from p2pfl.federation import Certificate, FederationAuthority, FederationRoot, make_token, verify_token
from p2pfl.identity import Identity
from p2pfl.transport import (
    PART_HEADER_BYTES,
    Outbox,
    PeerLink,
    Reassembler,
    cert_topic,
    split_message,
    update_topic,
)
from p2pfl.transport.amqtt_patches import SESSION_NODE
from p2pfl.transport.topics import (
    Kind,
    Topic,
    cert_filter,
    inbox_filter,
    parse_topic,
    part_index,
    proof_filter,
    proof_topic,
)

HOST = "127.0.0.1"
MAX_MESSAGE = 64 << 20


# ---------------------------------------------------------------------------------------------
# Reassembler / split_message (pure)


def _parts(message: bytes, chunk: int, mid: bytes | None = None) -> list[bytes]:
    return split_message(message, chunk, mid)


@pytest.mark.parametrize(
    "total,chunk", [(1, 1024), (1000, 1024), (1024, 1024), (1025, 1024), (10_000, 1024), (9, 4), (4097, 100)]
)
def test_split_and_reassemble_roundtrip(total: int, chunk: int) -> None:
    message = os.urandom(total)
    parts = _parts(message, chunk)
    assert len(parts) == -(-total // chunk)
    assert all(len(p) - PART_HEADER_BYTES <= chunk for p in parts)
    r = Reassembler(MAX_MESSAGE)
    out = None
    for i, p in enumerate(reversed(parts)):  # order must not matter
        out = r.add("a", p, len(parts) - 1 - i)
        if i < len(parts) - 1:
            assert out is None
    assert out == message
    assert r.pending() == 0


def test_reassembler_duplicates_and_completed_replays_are_ignored() -> None:
    message = os.urandom(5000)
    parts = _parts(message, 1000)
    r = Reassembler(MAX_MESSAGE)
    assert r.add("a", parts[0]) is None
    assert r.add("a", parts[0]) is None  # duplicate part
    outs = [r.add("a", p) for p in parts[1:]]
    assert outs[-1] == message
    # the same message delivered again (retained + live) does not start a new one or re-emit
    assert all(r.add("a", p) is None for p in parts)
    assert r.pending() == 0
    single = _parts(b"xyz", 1000)
    assert r.add("a", single[0]) == b"xyz"
    assert r.add("a", single[0]) is None


def test_reassembler_publishers_are_separate() -> None:
    m1, m2 = os.urandom(3000), os.urandom(3000)
    p1, p2 = _parts(m1, 1000), _parts(m2, 1000)
    r = Reassembler(MAX_MESSAGE)
    assert r.add("a", p1[0]) is None
    assert r.add("b", p2[0]) is None
    assert r.add("a", p1[1]) is None
    assert r.add("b", p2[1]) is None
    assert r.add("b", p2[2]) == m2
    assert r.add("a", p1[2]) == m1


def test_reassembler_keeps_at_most_two_incomplete_per_publisher() -> None:
    msgs = [os.urandom(2000) for _ in range(3)]
    parts = [_parts(m, 1000) for m in msgs]
    r = Reassembler(MAX_MESSAGE)
    for p in parts:
        assert r.add("a", p[0]) is None
    assert r.pending("a") == 2  # the oldest (msgs[0]) was dropped
    assert r.add("a", parts[0][1]) is None  # restarts msgs[0], evicting msgs[1]
    assert r.pending("a") == 2
    assert r.add("a", parts[2][1]) == msgs[2]
    assert r.pending_bytes() <= 2 * 1000


def test_reassembler_bounds_publishers() -> None:
    r = Reassembler(MAX_MESSAGE, max_publishers=3)
    for i in range(10):
        r.add(f"p{i}", _parts(os.urandom(2000), 1000)[0])
    assert r.pending() == 3


def test_reassembler_rejects_short_and_bad_magic() -> None:
    r = Reassembler(MAX_MESSAGE)
    with pytest.raises(Rejected) as e:
        r.add("a", b"\x00" * (PART_HEADER_BYTES - 1))
    assert e.value.reason is Reason.MALFORMED
    part = bytearray(_parts(b"hello", 100)[0])
    part[0] ^= 0xFF
    with pytest.raises(Rejected) as e:
        r.add("a", bytes(part))
    assert e.value.reason is Reason.MALFORMED


def _forge(mid: bytes, index: int, count: int, total: int, body: bytes) -> bytes:
    import struct

    return struct.pack(">4s16sIIQ", b"P2U1", mid, index, count, total) + body


def test_reassembler_rejects_oversize_before_buffering() -> None:
    r = Reassembler(1000)
    with pytest.raises(Rejected) as e:
        r.add("a", _forge(b"m" * 16, 0, 2, 1001, b"x" * 501))
    assert e.value.reason is Reason.OVERSIZE
    with pytest.raises(Rejected) as e:  # a real split of an oversize message
        r.add("a", _parts(os.urandom(2000), 1000)[0])
    assert e.value.reason is Reason.OVERSIZE
    assert r.pending() == 0


@pytest.mark.parametrize(
    "index,count,total,body_len",
    [
        (0, 0, 10, 10),  # zero parts
        (2, 2, 10, 5),  # index beyond count
        (0, 11, 10, 1),  # more parts than bytes
        (0, 1, 0, 0),  # empty message
        (0, 2, 10, 4),  # wrong part length (expected 5)
        (1, 3, 10, 3),  # wrong part length (expected 4)
        (2, 3, 10, 4),  # wrong last part length (expected 2)
        (0, 4, 5, 2),  # count inconsistent with total (last part would be empty)
        (0, 1 << 20, 1 << 20, 1),  # absurd part count
    ],
)
def test_reassembler_rejects_inconsistent_numbering(
    index: int, count: int, total: int, body_len: int
) -> None:
    r = Reassembler(MAX_MESSAGE)
    with pytest.raises(Rejected) as e:
        r.add("a", _forge(b"m" * 16, index, count, total, b"x" * body_len))
    assert e.value.reason is Reason.MALFORMED


def test_reassembler_rejects_parts_that_disagree_and_topic_mismatch() -> None:
    r = Reassembler(MAX_MESSAGE)
    mid = b"k" * 16
    assert r.add("a", _forge(mid, 0, 2, 10, b"x" * 5)) is None
    with pytest.raises(Rejected) as e:  # same id, different shape
        r.add("a", _forge(mid, 1, 3, 12, b"x" * 4))
    assert e.value.reason is Reason.MALFORMED
    with pytest.raises(Rejected) as e:  # header says part 1, topic said part 0
        r.add("a", _forge(mid, 1, 2, 10, b"x" * 5), index=0)
    assert e.value.reason is Reason.MALFORMED
    assert r.add("a", _forge(mid, 1, 2, 10, b"y" * 5), index=1) == b"x" * 5 + b"y" * 5


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
    assert proof_topic("f", "o", "c") == "p2pfl/f/o/proof/c"
    assert (cert_filter("f"), proof_filter("f", "me"), inbox_filter("f", "me")) == (
        "p2pfl/f/+/cert",
        "p2pfl/f/+/proof/me",
        "p2pfl/f/+/to/me/+",
    )
    assert parse_topic(cert_topic("f", "o")) == Topic("f", "o", Kind.CERT)
    assert parse_topic(proof_topic("f", "o", "c")) == Topic("f", "o", Kind.PROOF, "c")
    assert parse_topic(update_topic("f", "o", "r", 7)) == Topic("f", "o", Kind.INBOX, "r", "7")
    assert parse_topic(inbox_filter("f", "me")) == Topic("f", "+", Kind.INBOX, "me", "+")
    for odd in (
        "p2pfl/f/o/cert/x",
        "p2pfl/f/o/proof",
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


def _acl_outbox() -> Outbox:
    return Outbox(HOST, 0, "fed", "own", authenticate=lambda u, p: u, on_reject=lambda r, d: None)


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
    link = make_link(1, "fed", lambda: ("me", "x"), sink)
    link._me = "me"  # set by _session on connect
    message = os.urandom(5000)
    parts = split_message(message, 2000)

    async def main() -> None:
        for index, part in enumerate(parts):  # addressed to someone else / bad shapes: ignored
            await link._dispatch(f"p2pfl/fed/own/to/other/{index}", part)
            await link._dispatch(f"p2pfl/fed/own/to/me/{index}/x", part)
            await link._dispatch(f"p2pfl/fed/own/update/{index}", part)
            await link._dispatch(f"p2pfl/otherfed/own/to/me/{index}", part)
        assert sink.updates == [] and link._reassembler.pending() == 0
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

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def credentials(self) -> tuple[str, str]:
        return self.identity.node_id, make_token(self.identity, self.cert)


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

    def authenticate(self, username: str, password: str) -> str:
        return verify_token(self.root, username, password).node_id


def make_federation(directory: Path, n: int) -> Federation:
    authority = FederationAuthority.create(directory)
    members = []
    for i in range(n):
        ident = Identity.generate()
        cert = authority.issue(f"n{i}", ident.verify_key_bytes, ident.box_public_bytes, 3600)
        members.append(Member(ident, cert))
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


def small_part_outbox(fed: Federation, owner: str) -> Outbox:
    """The owner's broker on a free port, cutting updates into 64 KiB parts (many parts per test)."""
    return Outbox(
        HOST,
        0,
        fed.fid,
        owner,
        authenticate=fed.authenticate,
        on_reject=lambda r, d: None,
        chunk_bytes=64 << 10,
    )


def make_link(port: int, fid: str, credentials: Callable[[], tuple[str, str]], sink: Sink) -> PeerLink:
    return PeerLink(
        HOST,
        port,
        fid,
        credentials,
        on_certificate=sink.on_certificate,
        on_update=sink.on_update,
        on_reject=sink.on_reject,
        max_message_bytes=MAX_MESSAGE,
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
        outbox = Outbox(
            HOST,
            0,
            fed.fid,
            owner.node_id,
            authenticate=fed.authenticate,
            on_reject=lambda r, d: rejects.append((r, d)),
        )
        await outbox.start()
        assert outbox.port > 0
        sinks = [Sink(), Sink()]
        links = [
            make_link(outbox.port, fed.fid, m.credentials, s) for m, s in zip((a, b), sinks, strict=True)
        ]
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


@pytest.mark.timeout(60)
def test_anonymous_and_foreign_clients_are_refused(tmp_path: Path) -> None:
    fed = make_federation(tmp_path / "fed", 2)
    other = make_federation(tmp_path / "other", 1)
    owner, a = fed.members
    stranger = other.members[0]
    rejects: list[tuple[Reason, str]] = []

    async def main() -> None:
        outbox = Outbox(
            HOST,
            free_port(),
            fed.fid,
            owner.node_id,
            authenticate=fed.authenticate,
            on_reject=lambda r, d: rejects.append((r, d)),
        )
        await outbox.start()
        try:
            # no username / password at all
            with pytest.raises(aiomqtt.MqttError) as e:
                async with aiomqtt.Client(HOST, outbox.port, identifier="anon-1", timeout=5):
                    pass
            assert isinstance(e.value, MqttConnectError)
            # a username without a password
            with pytest.raises(MqttConnectError):
                async with aiomqtt.Client(
                    HOST, outbox.port, username=a.node_id, identifier="anon-2", timeout=5
                ):
                    pass
            # garbage token
            with pytest.raises(MqttConnectError):
                async with aiomqtt.Client(
                    HOST, outbox.port, username=a.node_id, password="bm9wZQ==", identifier="anon-3", timeout=5
                ):
                    pass
            # a valid token of another federation
            user, token = stranger.credentials()
            with pytest.raises(MqttConnectError):
                async with aiomqtt.Client(
                    HOST, outbox.port, username=user, password=token, identifier="foreign", timeout=5
                ):
                    pass
            assert len(rejects) == 4 and all(r is Reason.AUTH_FAILED for r, _ in rejects)
            assert any("anonymous" in d for _, d in rejects)
            # refused sessions are not kept by the broker
            assert outbox._broker is not None and len(outbox._broker.sessions) == 0

            # a PeerLink with foreign credentials keeps retrying but reports the refusal once
            sink = Sink()
            link = make_link(outbox.port, fed.fid, stranger.credentials, sink)
            await link.start()
            before = len(rejects)
            await wait_until(lambda: len(rejects) - before >= 3, what="several refused attempts")
            assert not link.connected
            assert [r for r, _ in sink.rejects] == [Reason.AUTH_FAILED]
            await link.stop()
            # a certified member still gets in
            async with aiomqtt.Client(
                HOST,
                outbox.port,
                username=a.node_id,
                password=a.credentials()[1],
                identifier="member",
                timeout=5,
            ):
                pass
        finally:
            await outbox.stop()

    run(main, 50)


@pytest.mark.timeout(60)
def test_clients_cannot_publish_or_subscribe_outside_owner_namespace(tmp_path: Path) -> None:
    fed = make_federation(tmp_path / "fed", 3)
    owner, a, b = fed.members

    async def main() -> None:
        outbox = Outbox(
            HOST, 0, fed.fid, owner.node_id, authenticate=fed.authenticate, on_reject=lambda r, d: None
        )
        await outbox.start()
        sink = Sink()
        link = make_link(outbox.port, fed.fid, a.credentials, sink)
        try:
            await outbox.publish_certificate(owner.cert.to_bytes())
            await link.start()
            await wait_until(lambda: link.connected and len(sink.certs) == 1, what="link")
            user, token = b.credentials()
            async with aiomqtt.Client(
                HOST, outbox.port, username=user, password=token, identifier="intruder", timeout=5
            ) as c:
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
            late_link = make_link(outbox.port, fed.fid, b.credentials, late)
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
        outbox = small_part_outbox(fed, owner.node_id)
        await outbox.start()
        sinks = {m.node_id: Sink() for m in (a, b, c)}
        links = {
            m.node_id: make_link(outbox.port, fed.fid, m.credentials, sinks[m.node_id]) for m in (a, b, c)
        }
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
            user, token = c.credentials()
            async with aiomqtt.Client(
                HOST, outbox.port, username=user, password=token, identifier="snoop", timeout=5
            ) as snoop:
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
        outbox = small_part_outbox(fed, owner.node_id)
        await outbox.start()
        started: list[PeerLink] = []

        async def late(member: Member) -> tuple[PeerLink, Sink]:
            sink = Sink()
            link = make_link(outbox.port, fed.fid, member.credentials, sink)
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
        outbox = Outbox(
            HOST, port, fed.fid, owner.node_id, authenticate=fed.authenticate, on_reject=lambda r, d: None
        )
        await outbox.start()
        sink = Sink()
        link = make_link(port, fed.fid, a.credentials, sink)
        try:
            await link.start()
            await wait_until(lambda: link.connected, what="first connect")
            first = os.urandom(50_000)
            await outbox.publish_update(first, [a.node_id])
            await wait_until(lambda: len(sink.updates) == 1, what="first update")
            await outbox.stop()
            await wait_until(lambda: not link.connected, what="disconnect")
            await asyncio.sleep(0.5)  # a few refused reconnects while the broker is down
            outbox = Outbox(
                HOST, port, fed.fid, owner.node_id, authenticate=fed.authenticate, on_reject=lambda r, d: None
            )
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
        outbox = small_part_outbox(fed, owner.node_id)
        await outbox.start()
        sinks = [Sink() for _ in subs]
        links = [make_link(outbox.port, fed.fid, m.credentials, s) for m, s in zip(subs, sinks, strict=True)]
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
def test_silent_tcp_client_is_dropped_without_connect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2pfl.transport import amqtt_patches

    monkeypatch.setattr(amqtt_patches, "CONNECT_TIMEOUT_S", 0.5)
    fed = make_federation(tmp_path / "fed", 1)

    async def main() -> None:
        outbox = Outbox(
            HOST,
            0,
            fed.fid,
            fed.members[0].node_id,
            authenticate=fed.authenticate,
            on_reject=lambda r, d: None,
        )
        await outbox.start()
        try:
            reader, writer = await asyncio.open_connection(HOST, outbox.port)
            t0 = time.monotonic()
            assert await asyncio.wait_for(reader.read(1), 5) == b""  # the broker hung up on us
            assert time.monotonic() - t0 < 3
            writer.close()
        finally:
            await outbox.stop()

    run(main, 20)


def test_a_port_in_use_is_one_clear_error_without_amqtt_traceback(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        outbox = Outbox(HOST, port, "fed", "own", authenticate=lambda u, p: u, on_reject=lambda r, d: None)
        with pytest.raises(TransportError, match=rf"port {port} on {HOST} is in use: set \[node\] port"):
            asyncio.run(outbox.start())
    assert "Broker startup failed" not in caplog.text


def test_a_host_that_is_not_ours_says_so() -> None:
    outbox = Outbox("10.255.255.1", 0, "fed", "own", authenticate=lambda u, p: u, on_reject=lambda r, d: None)
    with pytest.raises(TransportError, match=r"\[node\] host 10.255.255.1 is not an address of this machine"):
        asyncio.run(outbox.start())
