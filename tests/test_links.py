"""Links follow the topology: which links a node holds (pure), who is a member without a link (pure),
the broker's indexed topic matching, a real mesh over mDNS and brokers, and real node processes."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from amqtt.broker import Broker
from helpers import certify

from p2pfl import testbed
from p2pfl.config import NodeConfig, validate
from p2pfl.discovery import PeerAd
from p2pfl.errors import Reason, Rejected
from p2pfl.federation import Certificate, FederationAuthority
from p2pfl.identity import Identity
from p2pfl.linkset import LinkSet, link_targets, period
from p2pfl.membership import AD_MAX_AGE_S, Roster, check_ad, check_certificate, sign_ad
from p2pfl.mesh import MqttMesh
from p2pfl.metrics import Metrics, read_jsonl
from p2pfl.round import Plan
from p2pfl.topology import parse_topology
from p2pfl.transport.amqtt_patches import _SubscriptionTable

HOST = "127.0.0.1"

# -- which links (pure) -------------------------------------------------------------------------------


def _plan(round_: int, ids: list[str], me: str, topology: str) -> Plan:
    members = {i: _cert_stub(i) for i in ids}
    view = parse_topology(topology).view(ids, me, round_)
    return Plan(round_, members, tuple(view.neighbours), view.epoch)


def _cert_stub(node_id: str) -> Certificate:
    return SimpleNamespace(name=node_id, node_id=node_id)  # type: ignore[return-value]


def test_a_static_topology_links_exactly_the_planned_neighbours() -> None:
    ids = [f"n{i:02d}" for i in range(32)]
    for name in ("ring", "exponential", "torus"):
        topology = parse_topology(name)
        plan = _plan(7, ids, "n05", name)
        assert link_targets(topology, plan, "n05", seed=0) == set(plan.neighbours), name
        assert period(topology, 32) == 1


def test_a_time_varying_topology_links_the_partners_of_one_period() -> None:
    ids = [f"n{i}" for i in range(8)]
    topology = parse_topology("one-peer-exponential")
    assert period(topology, 8) == 3
    targets = link_targets(topology, _plan(4, ids, "n0", "one-peer-exponential"), "n0", seed=0)
    partners = set().union(*(topology.view(ids, "n0", r).neighbours for r in (4, 5, 6)))
    assert targets == partners == {"n1", "n2", "n4"}  # index 0 XOR 1, 2, 4: log2(8) links, not 7


def test_an_unwanted_link_closes_only_after_its_grace() -> None:
    links = LinkSet(grace_plans=2, grace_s=5.0)
    assert links.update({"a", "b"}, now=0.0) == {"a", "b"}
    assert links.update({"a"}, now=1.0) == {"a", "b"}  # dropped once: a re-plan must not flap it
    assert links.update({"a"}, now=2.0) == {"a", "b"}  # two plans, but not yet 5 s
    assert links.update({"a"}, now=6.0) == {"a"}  # both graces over: closed
    assert links.update({"a", "b"}, now=6.5) == {"a", "b"}  # wanted again: reopened
    links.forget({"b"})  # revoked: at once
    assert links.kept() == {"a"}


# -- who is a member (pure) ---------------------------------------------------------------------------


def _issue(authority: FederationAuthority, name: str, ttl_s: float = 3600.0) -> tuple[Identity, Certificate]:
    ident = Identity.generate()
    return ident, authority.issue(name, ident.verify_key_bytes, ident.box_public_bytes, ttl_s)


def _ad(ident: Identity, cert: Certificate, port: int = 1, now: float | None = None) -> PeerAd:
    """The advertisement a node with these keys signs (at `now`)."""
    ad = PeerAd(cert.node_id, cert.federation_id, cert.name, HOST, port, cert.fingerprint())
    return sign_ad(ad, ident, cert, now)


def test_members_are_advertised_peers_in_advertisements_their_key_signed(tmp_path: Path) -> None:
    authority = FederationAuthority.create(tmp_path / "fed")
    ia, a = _issue(authority, "a")
    ib, b = _issue(authority, "b")
    roster = Roster(authority.root)
    assert roster.advertise({a.node_id: _ad(ia, a), b.node_id: _ad(ib, b)}) == ([a, b], [])
    assert roster.members() == {a.node_id: a, b.node_id: b}  # no traffic: the advertisement says it

    replayed = {a.node_id: replace(roster.ad(a.node_id), port=7), b.node_id: _ad(ib, b)}  # type: ignore[type-var]
    _, refused = roster.advertise(replayed)  # a's signed advertisement, replayed at another port
    assert [exc.reason for _, exc in refused] == [Reason.BAD_SIGNATURE]
    assert roster.members() == {b.node_id: b}

    roster.advertise({b.node_id: _ad(ib, b)})  # a's advertisement expired (gone without a goodbye)
    assert roster.members() == {b.node_id: b}
    roster.advertise({a.node_id: _ad(ia, a, port=9), b.node_id: _ad(ib, b)})  # back, elsewhere
    assert roster.members() == {a.node_id: a, b.node_id: b}

    roster.root = authority.root.with_revoked(a.node_id)
    assert roster.members() == {b.node_id: b}  # revoked: out at once, without a new advertisement
    roster.root = authority.root
    assert roster.members(now=a.expires + 1) == {}  # expired
    assert roster.members(now=time.time() + AD_MAX_AGE_S + 60) == {}  # not signed afresh: aged out


def _members(tmp: Path) -> tuple[FederationAuthority, dict[str, tuple[Identity, Certificate]]]:
    """A federation with members a, b and c, and x: a member of another federation."""
    authority = FederationAuthority.create(tmp / "fed")
    found = {name: _issue(authority, name) for name in "abc"}
    found["x"] = _issue(FederationAuthority.create(tmp / "other"), "x")
    return authority, found


def test_an_advertisement_is_refused_unless_its_certificate_and_its_signature_hold(tmp_path: Path) -> None:
    """What a host on the LAN can advertise, each refused with its reason, once, and nothing else lost."""
    authority, members = _members(tmp_path)
    (ia, a), (ib, b), (ic, c), (ix, outsider) = members.values()
    good = _ad(ia, a)
    stamp = {"signed_at": good.signed_at + 1}
    cases = {
        "replayed elsewhere": (replace(good, port=2), Reason.BAD_SIGNATURE),
        "re-dated": (replace(good, **stamp), Reason.BAD_SIGNATURE),
        "c's certificate under a's id": (replace(_ad(ic, c), node_id=a.node_id), Reason.PEER_IDENTITY),
        "signed by c": (sign_ad(good, ic, a), Reason.BAD_SIGNATURE),
        "old": (_ad(ia, a, now=time.time() - AD_MAX_AGE_S - 60), Reason.STALE),
        "from the future": (_ad(ia, a, now=time.time() + AD_MAX_AGE_S + 60), Reason.STALE),
        "another federation": (_ad(ix, outsider), Reason.WRONG_FEDERATION),
        "junk certificate": (replace(good, certificate=b"junk"), Reason.MALFORMED),
        "revoked": (_ad(ib, b), Reason.REVOKED),
    }
    fingerprint_of_b = replace(good, fingerprint=b.fingerprint())
    root = authority.root.with_revoked(b.node_id)
    for what, (ad, reason) in cases.items():
        roster = Roster(root)
        accepted, refused = roster.advertise({ad.node_id: ad})
        assert accepted == [], what
        assert [exc.reason for _, exc in refused] == [reason], what
        assert roster.members() == {}, what
        assert roster.advertise({ad.node_id: ad}) == ([], []), what  # reported once
    with pytest.raises(Rejected) as info:
        check_ad(fingerprint_of_b, root)
    assert info.value.reason is Reason.UNCERTIFIED  # the certificate is not the advertised one
    assert check_ad(good, root) == a


def test_a_static_peers_certificate_must_chain_and_name_the_proven_node(tmp_path: Path) -> None:
    authority, members = _members(tmp_path)
    (_, a), (_, b), _, (_, outsider) = members.values()
    root = authority.root
    assert check_certificate(a.to_bytes(), root, a.node_id) == a
    cases = [
        (b.to_bytes(), a.node_id, Reason.PEER_IDENTITY),  # b's certificate on a's broker
        (a.to_bytes(), None, Reason.PEER_IDENTITY),  # nothing proven
        (outsider.to_bytes(), outsider.node_id, Reason.WRONG_FEDERATION),
        (b"junk", a.node_id, Reason.MALFORMED),
    ]
    for data, proven, reason in cases:
        with pytest.raises(Rejected) as info:
            check_certificate(data, root, proven)
        assert info.value.reason is reason
    with pytest.raises(Rejected) as info:
        check_certificate(a.to_bytes(), root.with_revoked(a.node_id), a.node_id)
    assert info.value.reason is Reason.REVOKED


# -- the broker's topic matching ---------------------------------------------------------------------

FILTERS = [
    "#",
    "+",
    "a",
    "a/#",
    "a/+",
    "a/b",
    "a/+/c",
    "+/b/#",
    "+/+/+",
    "$SYS/#",
    "$SYS/+",
    "p2pfl/f/+/to/me/+",
    "p2pfl/f/+/to/you/+",
    "p2pfl/f/own/cert",
    "p2pfl/f/+/cert",
    "a//c",
    "/a",
]
TOPICS = ["a", "a/b", "a/b/c", "a/x/c", "b", "x/b", "x/b/y/z", "$SYS/x", "$SYS", "a//c", "/a", "",
          "p2pfl/f/own/to/me/0", "p2pfl/f/own/to/you/12", "p2pfl/f/own/cert", "p2pfl/f/other/cert"]  # fmt: skip


def test_the_subscription_index_matches_exactly_what_amqtt_matches() -> None:
    stock = SimpleNamespace(logger=logging.getLogger("test"))
    table = _SubscriptionTable()
    for f in FILTERS:
        table[f] = [("session", 1)]
    for topic in TOPICS:
        expected = {f for f in FILTERS if Broker._matches(stock, topic, f)}
        found = dict(table.matching(topic))
        assert set(found) == expected, topic
        assert all(subs == [("session", 1)] for subs in found.values())


def test_a_publish_finds_its_filters_whatever_else_is_subscribed() -> None:
    table = _SubscriptionTable()
    for i in range(5000):  # unrelated subscriptions: other recipients' inboxes
        table[f"p2pfl/f/+/to/r{i}/+"] = [(f"s{i}", 1)]
    table["p2pfl/f/own/cert"] = [("c", 1)]
    assert table.matching("p2pfl/f/own/to/r42/3") == [("p2pfl/f/+/to/r42/+", [("s42", 1)])]
    assert table.matching("p2pfl/f/own/to/nobody/3") == []
    for key in list(table):
        del table[key]
    assert table.matching("p2pfl/f/own/to/r42/3") == [] and not table._tree.children  # pruned
    table["a/b"] = []
    table.clear()
    assert table.matching("a/b") == [] and len(table) == 0


# -- a real mesh: members by mDNS and one certificate fetch, links to neighbours only -----------------


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        await asyncio.sleep(0.05)


def _mesh(authority: FederationAuthority, name: str, directory: Path) -> MqttMesh:
    identity, cert = certify(authority, name, directory)
    cfg = NodeConfig()
    cfg.node.name, cfg.node.data_dir, cfg.node.port = name, str(directory), 0
    cfg.discovery.interfaces = [HOST]
    cfg = validate(cfg)
    return MqttMesh(cfg, identity=identity, cert=cert, root=authority.root, metrics=Metrics(cfg.metrics_path))


@pytest.mark.timeout(180)
def test_a_real_mesh_knows_every_member_but_links_only_its_neighbours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("p2pfl.mesh.AD_RESIGN_S", 1.0)  # the test sees advertisements signed afresh
    asyncio.run(_real_mesh(tmp_path))


async def _real_mesh(tmp: Path) -> None:
    authority = FederationAuthority.create(tmp / "fed")
    meshes = [_mesh(authority, f"m{i}", tmp / f"m{i}") for i in range(4)]
    received: dict[int, list[tuple[str, bytes]]] = {i: [] for i in range(4)}
    for i, mesh in enumerate(meshes):
        mesh.linkset = LinkSet(grace_plans=1, grace_s=0.0)  # close at the next plan: the test's pace

        async def on_update(publisher: str, message: bytes, i: int = i) -> None:
            received[i].append((publisher, message))

        await mesh.start(on_update, lambda: None)
    a, b, c, d = meshes
    try:
        ids = {m.node_id for m in meshes}
        # membership from signed mDNS advertisements alone: no link was ever needed
        await _until(lambda: all(set(m.members()) == ids - {m.node_id} for m in meshes), 120, "members")
        assert all(m.links() == 0 and m.neighbour_links == {} for m in meshes)

        # each node signs its advertisement afresh; the new one is checked and keeps it a member
        first = a.roster.ad(b.node_id)
        assert first is not None

        def resigned() -> bool:
            ad = a.roster.ad(b.node_id)
            return ad is not None and ad.signed_at > first.signed_at and b.node_id in a.members()

        await _until(resigned, 60, "b's advertisement signed afresh")
        assert not a.metrics.rejected  # nothing refused along the way

        # a and b are neighbours: a's link to b's broker carries b's update (and only that link)
        a.follow({b.node_id})
        b.follow({a.node_id})
        assert a.links() == 1 and a.reachable(b.node_id)
        await _until(lambda: a.neighbour_links[b.node_id].connected, 60, "link a -> b")
        broker = b.outbox._broker
        assert broker is not None
        scans: list[str] = []

        def scan(topic: str, topic_filter: str) -> bool:
            if sys._getframe(1).f_code.co_name == "_run_broadcast":  # not the replay on subscribe
                scans.append(topic_filter)
            return Broker._matches(broker, topic, topic_filter)

        broker._matches = scan
        await b.publish(b"update from b", [a.node_id])
        await _until(lambda: received[0] == [(b.node_id, b"update from b")], 30, "update b -> a")
        assert scans == []  # the broadcast found a's subscription through the index, testing no filter
        assert received[2] == received[3] == []

        # the plan moves on: the link closes, membership stays
        a.follow({c.node_id})
        assert set(a.neighbour_links) == {c.node_id} and a.links() == 1
        assert set(a.members()) == ids - {a.node_id}
        await _until(lambda: a.neighbour_links[c.node_id].connected, 60, "link a -> c")

        # c's broker goes away: c is still advertised (until its records expire), but not reachable
        await c.outbox.stop()
        await _until(lambda: not a.reachable(c.node_id), 60, "a dead neighbour seen")
        assert c.node_id in a.members()
        assert d.reachable(c.node_id)  # not d's neighbour: d holds no link to it, and waits on nothing
    finally:
        for mesh in meshes:
            await mesh.stop()


# -- real node processes -----------------------------------------------------------------------------

WAIT_S = 180  # processes import torch and find each other by mDNS on a loaded 2-core machine


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_nodes_on_a_ring_hold_one_link_per_neighbour_and_learn(tmp_path: Path) -> None:
    nodes, rounds = 8, 12
    out = tmp_path / "ring"
    argv = ["--nodes", str(nodes), "--rounds", str(rounds), "--topology", "ring", "--wait", str(WAIT_S),
            "--out", str(out)]  # fmt: skip
    assert testbed.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    for node in summary["nodes"]:
        rows = read_jsonl(out / node["name"] / "metrics.jsonl")
        assert [r["round"] for r in rows] == list(range(1, rounds + 1)), node["name"]
        assert all(r["members"] == nodes for r in rows), node["name"]  # everyone is a member ...
        assert all(len(r["neighbours"]) == 2 for r in rows), node["name"]
        assert rows[-1]["links"] == 2, node["name"]  # ... but links go to the 2 ring neighbours only
        assert max(r["links"] for r in rows) <= 2 + 4, node["name"]  # + certificate fetches at most
        assert sum(len(r["missing"]) for r in rows) <= 0.1 * 2 * rounds, node["name"]
    assert summary["min_accuracy"] > 0.6


def test_a_retained_delivery_that_fails_is_read_not_left_to_asyncio() -> None:
    """A client that leaves before acknowledging a retained message (a certificate fetch may) makes
    that delivery fail; the broker reads the failure (debug log) and delivers the others, instead
    of leaving asyncio to print "Task exception was never retrieved" with a traceback."""
    from amqtt.session import ApplicationMessage

    from p2pfl.transport.amqtt_patches import PatchedBroker

    unretrieved: list[dict] = []
    delivered: list[str] = []

    class Handler:
        async def mqtt_publish(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
            if topic.endswith("gone"):
                raise TimeoutError("Timeout waiting for PUBACK")
            delivered.append(topic)

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: unretrieved.append(context))
        broker = PatchedBroker()
        session = SimpleNamespace(client_id="c1")
        broker._subscriptions["f/#"] = [(session, 1)]
        for topic in ("f/cert", "f/gone", "other/x"):
            broker._retained_messages[topic] = ApplicationMessage(None, topic, 1, b"x", True)
        broker._get_handler = lambda _session: Handler()  # type: ignore[method-assign]
        await broker._publish_retained_messages_for_subscription(("f/#", 1), session)  # type: ignore[arg-type]
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(main())
    assert delivered == ["f/cert"]
    assert not unretrieved, unretrieved
