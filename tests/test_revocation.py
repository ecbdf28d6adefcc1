"""Signed revocation lists: strict parsing, the root's signature, serials, and a node adopting one."""

from __future__ import annotations

import asyncio
import random
import shutil
from pathlib import Path

import msgpack
import nacl.signing
import pytest
from helpers import certify
from memory_mesh import Hub

from p2pfl.config import NodeConfig, validate
from p2pfl.errors import IdentityError, Reason, Rejected
from p2pfl.federation import FederationAuthority
from p2pfl.identity import Identity
from p2pfl.learning import TaskSpec, get_params
from p2pfl.revocation import (
    MAX_REVOCATION_BYTES,
    MAX_REVOKED,
    REVOCATION_FILE,
    RevocationList,
    load,
    save,
)

IDS = ["0123456789abcdef", "fedcba9876543210"]


@pytest.fixture()
def authority(tmp_path: Path) -> FederationAuthority:
    return FederationAuthority.create(tmp_path / "fed")


def _signed(authority: FederationAuthority, serial: int = 1, ids: list[str] = IDS) -> RevocationList:
    return RevocationList.sign(authority._key, serial, frozenset(ids))


def _reason(data: object, authority: FederationAuthority) -> Reason:
    with pytest.raises(Rejected) as err:
        RevocationList.accept(data, authority.root)
    return err.value.reason


# ---------------------------------------------------------------- the list itself


def test_a_signed_list_round_trips_and_verifies(authority: FederationAuthority) -> None:
    signed = _signed(authority, 3)
    again = RevocationList.accept(signed.to_bytes(), authority.root)
    assert again == signed and again.revoked == frozenset(IDS) and again.serial == 3
    assert again.federation_id == authority.root.federation_id
    root = again.apply(authority.root.with_revoked("1111111111111111"))
    assert root.revoked == frozenset([*IDS, "1111111111111111"])  # adds, never removes


def test_forged_foreign_and_tampered_lists_are_refused(
    tmp_path: Path, authority: FederationAuthority
) -> None:
    other = FederationAuthority.create(tmp_path / "other")
    assert _reason(_signed(other).to_bytes(), authority) is Reason.WRONG_FEDERATION
    # a member (or anyone) signing a list that names our federation: not the root's signature
    mallory = nacl.signing.SigningKey.generate()
    forged = RevocationList(
        federation_id=authority.root.federation_id,
        serial=99,
        issued_at=0.0,
        revoked=frozenset(IDS),
        signature=mallory.sign(b"x").signature,
    )
    assert _reason(forged.to_bytes(), authority) is Reason.BAD_SIGNATURE
    # the root's list with an id removed or the serial raised: the signature no longer covers it
    body = msgpack.unpackb(_signed(authority).to_bytes(), raw=False)
    for index, value in ((4, IDS[:1]), (2, 1000), (3, 12.0)):
        edited = list(body)
        edited[index] = value
        assert _reason(msgpack.packb(edited, use_bin_type=True), authority) is Reason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "index, value",
    [
        (0, "p2pfl-cert-1"),  # a certificate's tag
        (1, "not-hex-federation"),
        (2, 0),  # serial must be positive
        (2, True),
        (2, 2**60),
        (3, float("inf")),
        (3, "now"),
        (4, ["short"]),
        (4, [IDS[1], IDS[0]]),  # unsorted
        (4, [IDS[0], IDS[0]]),  # duplicate
        (4, {"a": 1}),
        (5, b"\x00" * 63),
    ],
)
def test_wrong_fields_are_malformed(authority: FederationAuthority, index: int, value: object) -> None:
    body = msgpack.unpackb(_signed(authority).to_bytes(), raw=False)
    body[index] = value
    assert _reason(msgpack.packb(body, use_bin_type=True), authority) is Reason.MALFORMED


def test_garbage_and_oversized_bytes_are_refused_with_a_reason(authority: FederationAuthority) -> None:
    rng = random.Random(7)
    good = _signed(authority).to_bytes()
    samples: list[object] = [b"", b"\xc1", good[:-1], good + b"\x00", msgpack.packb([1] * 6), "text", None]
    samples += [rng.randbytes(rng.randrange(1, 400)) for _ in range(300)]
    samples += [
        bytes(b ^ (1 << rng.randrange(8)) if i == rng.randrange(len(good)) else b for i, b in enumerate(good))
        for _ in range(200)
    ]
    samples.append(
        msgpack.packb(["p2pfl-revocations-1", "0" * 16, 1, 0.0, ["0" * 16] * (MAX_REVOKED + 1), b""])
    )
    for data in samples:
        try:
            RevocationList.accept(data, authority.root)
        except Rejected as exc:
            assert exc.reason in {Reason.MALFORMED, Reason.BAD_SIGNATURE, Reason.WRONG_FEDERATION}
        except Exception as exc:  # pragma: no cover - the failure says which input
            pytest.fail(f"accept raised {type(exc).__name__} on {data!r:.60}")
    assert _reason(b"\x00" * (MAX_REVOCATION_BYTES + 1), authority) is Reason.OVERSIZE


def test_the_admin_cannot_sign_what_nodes_would_refuse(authority: FederationAuthority) -> None:
    with pytest.raises(ValueError, match="node ids"):
        _signed(authority, ids=["alice"])
    with pytest.raises(ValueError, match="serial"):
        _signed(authority, serial=0)


def test_newer_than_follows_the_serial(authority: FederationAuthority) -> None:
    one, two = _signed(authority, 1), _signed(authority, 2)
    assert one.newer_than(None) and two.newer_than(one)
    assert not one.newer_than(two) and not one.newer_than(one)


def test_load_and_save(tmp_path: Path, authority: FederationAuthority) -> None:
    path = tmp_path / REVOCATION_FILE
    assert load(path, authority.root) is None
    save(path, _signed(authority, 5))
    loaded = load(path, authority.root)
    assert loaded is not None and loaded.serial == 5
    path.write_bytes(b"junk")
    with pytest.raises(IdentityError, match="copy revocations.bin again"):
        load(path, authority.root)


# ---------------------------------------------------------------- the admin's side


def test_revoke_signs_a_list_with_a_growing_serial(authority: FederationAuthority) -> None:
    a, b = Identity.generate(), Identity.generate()
    authority.issue("a", a.verify_key_bytes, a.box_public_bytes, 3600)
    authority.issue("b", b.verify_key_bytes, b.box_public_bytes, 3600)
    first = authority.revoke(a.node_id)
    assert first.serial == 1 and first.revoked == {a.node_id}
    assert authority.revoke(a.node_id) == first  # already on the list: nothing new signed
    second = authority.revoke(b.node_id)
    assert second.serial == 2 and second.revoked == {a.node_id, b.node_id}
    on_disk = load(authority.directory / REVOCATION_FILE, authority.root)
    assert on_disk == second
    assert {e.name: e.status.value for e in authority.registry().entries} == {"a": "revoked", "b": "revoked"}
    assert authority.registry().revocation_serial == 2
    # a node certified afterwards gets the list with its other files
    c = Identity.generate()
    authority.issue("c", c.verify_key_bytes, c.box_public_bytes, 3600, node_dir=authority.directory / "c")
    assert load(authority.directory / "c" / REVOCATION_FILE, authority.root) == second


def test_the_serial_keeps_growing_when_revocations_bin_is_lost(authority: FederationAuthority) -> None:
    authority.revoke("0123456789abcdef")
    (authority.directory / REVOCATION_FILE).unlink()
    again = FederationAuthority.load(authority.directory).revoke("fedcba9876543210")
    assert again.serial == 2 and again.revoked == frozenset(IDS)  # federation.pub kept the first


# ---------------------------------------------------------------- a node adopting a list


def _config(tmp: Path, i: int) -> NodeConfig:
    cfg = NodeConfig()
    cfg.node.name, cfg.node.data_dir = f"node-{i}", str(tmp / f"n{i}")
    cfg.discovery.expect_peers = 2
    cfg.task = TaskSpec(name="synthetic-logreg", shard=i, num_shards=3, lr=0.5)
    cfg.training.rounds = 1
    return validate(cfg)


def test_a_node_adopts_a_newer_list_and_drops_the_revoked_peer(tmp_path: Path) -> None:
    from p2pfl.node import Node

    authority = FederationAuthority.create(tmp_path / "fed")
    hub = Hub()
    nodes = []
    for i in range(3):
        cfg = _config(tmp_path, i)
        _, cert = certify(authority, cfg.node.name, cfg.data_dir)
        nodes.append(Node(cfg, mesh=hub.mesh(cert)))
    me, bystander, revoked = nodes
    signed = authority.revoke(revoked.node_id)
    data = signed.to_bytes()

    async def scenario() -> None:
        for node in nodes:
            await node.start()
        assert set(me.members()) == {n.node_id for n in nodes}
        assert me.adopt_revocations(data, source="test")
        assert set(me.members()) == {me.node_id, bystander.node_id}
        assert me.root.revoked == {revoked.node_id}
        assert me.core.root is me.root and me.revocations == signed
        # an update the revoked node sends is refused (it is no member any more)
        params = get_params(revoked.model)
        plan = revoked.core.plan(1, revoked.members())
        message = revoked.core.pack(params, revoked.core.flatten(params), plan)
        assert message is not None
        before = sum(me.metrics.rejected.values())
        await me._on_update(revoked.node_id, message)
        assert sum(me.metrics.rejected.values()) == before + 1
        # the same list again (every neighbour relays it), or an older one: ignored, not counted
        assert not me.adopt_revocations(data)
        assert not me.adopt_revocations(RevocationList.sign(authority._key, 1, frozenset()).to_bytes())
        assert sum(me.metrics.rejected.values()) == before + 1
        # hostile bytes: counted rejections with their reason
        other = FederationAuthority.create(tmp_path / "other")
        assert not me.adopt_revocations(RevocationList.sign(other._key, 9, frozenset()).to_bytes())
        assert not me.adopt_revocations(b"\x93garbage")
        assert not me.adopt_revocations(b"\x00" * (MAX_REVOCATION_BYTES + 1))
        assert me.metrics.rejected["wrong_federation"] == 1
        assert me.metrics.rejected["malformed"] == 1
        assert me.metrics.rejected["oversize"] == 1
        # the revoked node itself, handed the list, stops
        assert revoked.adopt_revocations(data)
        assert revoked.stopping.is_set()
        for node in nodes:
            await node.stop()

    asyncio.run(scenario())
    assert load(me.cfg.data_dir / REVOCATION_FILE, me.root) == signed  # persisted
    # at the next start the node reads it next to federation.pub; the revoked node cannot start
    again = Node(me.cfg, mesh=hub.mesh(me.cert))
    assert revoked.node_id in again.root.revoked and again.revocations == signed
    shutil.copy(me.cfg.data_dir / REVOCATION_FILE, revoked.cfg.data_dir / REVOCATION_FILE)
    with pytest.raises(IdentityError, match="revoked"):
        Node(revoked.cfg, mesh=hub.mesh(revoked.cert))


def test_a_running_node_picks_up_a_list_the_admin_copies_into_its_data_dir(tmp_path: Path) -> None:
    from p2pfl.node import Node

    authority = FederationAuthority.create(tmp_path / "fed")
    hub = Hub()
    cfg = _config(tmp_path, 0)
    _, cert = certify(authority, cfg.node.name, cfg.data_dir)
    node = Node(cfg, mesh=hub.mesh(cert))
    assert not node.reload_revocations()  # no file yet
    outsider = Identity.generate().node_id
    authority.revoke(outsider)
    shutil.copy(authority.directory / REVOCATION_FILE, cfg.data_dir / REVOCATION_FILE)
    assert node.reload_revocations() and outsider in node.root.revoked
    assert not node.reload_revocations()  # the same list: nothing to do
    (cfg.data_dir / REVOCATION_FILE).write_bytes(b"x" * (MAX_REVOCATION_BYTES + 10))
    assert not node.reload_revocations() and node.metrics.rejected["oversize"] == 1
    assert outsider in node.root.revoked
