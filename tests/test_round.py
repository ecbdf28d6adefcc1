"""The round core, directly (plan, pack, admit, mix) and as several Nodes over an in-memory mesh."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from memory_mesh import Hub

from p2pfl import codec
from p2pfl.config import NodeConfig, validate
from p2pfl.errors import Rejected
from p2pfl.federation import Certificate, FederationAuthority
from p2pfl.identity import Identity, load_or_create
from p2pfl.learning import TaskSpec
from p2pfl.metrics import read_jsonl
from p2pfl.node import Node
from p2pfl.round import ROUNDS_AHEAD, RoundCore
from p2pfl.topology import parse_topology

YEAR = 365 * 86400.0
SPEC = {"w": ((3, 2), np.dtype(np.float32)), "b": ((2,), np.dtype(np.float32))}


def certify(authority: FederationAuthority, name: str, directory: Path) -> tuple[Identity, Certificate]:
    identity = load_or_create(directory)
    cert = authority.issue(name, identity.verify_key_bytes, identity.box_public_bytes, YEAR)
    (directory / "certificate").write_bytes(cert.to_bytes())
    authority.root.save(directory / "federation.pub")
    return identity, cert


def params(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((3, 2), value, np.float32), "b": np.full(2, value, np.float32)}


@pytest.fixture
def cores(tmp_path: Path) -> list[RoundCore]:
    """Four cores of one federation on a ring, rule "mean" so mixing is easy to check by hand."""
    authority = FederationAuthority.create(tmp_path / "federation")
    out = []
    for i in range(4):
        identity, cert = certify(authority, f"node-{i}", tmp_path / f"n{i}")
        out.append(
            RoundCore(
                identity=identity,
                cert=cert,
                root=authority.root,
                topology=parse_topology("ring"),
                spec=SPEC,
                samples=10,
                rule="mean",
            )
        )
    return out


def members_of(cores: list[RoundCore]) -> dict[str, Certificate]:
    return {c.node_id: c.cert for c in cores}


def pair(cores: list[RoundCore]) -> tuple[RoundCore, RoundCore]:
    """Two ring neighbours (ring order follows the sorted node ids, which are random)."""
    a = cores[0]
    first = a.plan(1, members_of(cores)).neighbours[0]
    return a, next(c for c in cores if c.node_id == first)


def test_every_core_plans_the_same_graph(cores: list[RoundCore]) -> None:
    members = members_of(cores)
    plans = {c.node_id: c.plan(1, members) for c in cores}
    assert len({p.epoch for p in plans.values()}) == 1
    for nid, plan in plans.items():
        assert plan.degree == 2
        for n in plan.neighbours:
            assert nid in plans[n].neighbours  # undirected: both ends agree


def test_pack_admit_mix_round_trip(cores: list[RoundCore]) -> None:
    members = members_of(cores)
    a = cores[0]
    plans = {c.node_id: c.plan(1, members) for c in cores}
    for c in cores:
        if c.node_id in plans[a.node_id].neighbours:
            own = params(1.0)
            message = c.pack(own, c.flatten(own), plans[c.node_id])
            assert message is not None
            round_, nb = a.admit(c.node_id, message, members)
            a.accept(round_, nb)
    assert a.missing(plans[a.node_id], members) == []
    result, missing = a.mix(a.flatten(params(0.0)), plans[a.node_id])
    assert missing == []
    # MH on a ring: 1/3 per neighbour, both neighbours at 1.0 -> 2/3 everywhere
    np.testing.assert_allclose(result.vector, np.full(8, 2 / 3, np.float32), rtol=1e-6)


def test_admit_flattens_in_local_order(cores: list[RoundCore]) -> None:
    """A sender whose tensors come in another order still lands in the receiver's own layout."""
    members = members_of(cores)
    a, b = pair(cores)
    for c in (a, b):
        c.plan(1, members)
    sender_params = {"b": np.array([7, 8], np.float32), "w": np.arange(6, dtype=np.float32).reshape(3, 2)}
    message = b.pack(sender_params, b.flatten(sender_params), b.plan(1, members))
    assert message is not None
    _, nb = a.admit(b.node_id, message, members)
    np.testing.assert_array_equal(nb.vector, np.array([0, 1, 2, 3, 4, 5, 7, 8], np.float32))


def test_admit_refuses_by_round_and_publisher(cores: list[RoundCore]) -> None:
    members = members_of(cores)
    a, b = pair(cores)

    def update(round_: int) -> bytes:
        p = params(1.0)
        b.round = round_
        message = b.pack(p, b.flatten(p), b.plan(round_, members))
        assert message is not None
        return message

    a.plan(5, members)
    reasons = []
    for message, publisher in [
        (update(4), b.node_id),
        (update(5 + ROUNDS_AHEAD + 1), b.node_id),
        (update(5), next(c.node_id for c in cores if c not in (a, b))),
        (b"\x00" * 64, b.node_id),
    ]:
        with pytest.raises(Rejected) as info:
            a.admit(publisher, message, members)
        reasons.append(info.value.reason.value)
    assert reasons == ["late", "round_window", "unknown_sender", "malformed"]
    round_, nb = a.admit(b.node_id, update(5 + ROUNDS_AHEAD), members)  # ahead, inside the window
    a.accept(round_, nb)
    assert nb.node_id in a.inbox.of(5 + ROUNDS_AHEAD)


def test_shape_mismatch_is_refused(cores: list[RoundCore]) -> None:
    members = members_of(cores)
    a, b = pair(cores)
    plan_b = b.plan(1, members)
    a.plan(1, members)
    wrong = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}
    sealed = b.pack(wrong, np.zeros(8, np.float32), plan_b)
    assert sealed is not None
    with pytest.raises(Rejected) as info:
        a.admit(b.node_id, sealed, members)
    assert info.value.reason.value == "shape_mismatch"
    assert codec.spec_of(wrong) != dict(SPEC)


def test_a_round_without_neighbours_sends_nothing(cores: list[RoundCore]) -> None:
    a = cores[0]
    plan = a.plan(1, {})
    assert plan.neighbours == () and a.pack(params(1.0), a.flatten(params(1.0)), plan) is None
    result, missing = a.mix(a.flatten(params(3.0)), plan)
    assert missing == [] and np.all(result.vector == 3.0)


# -- several real Nodes in one loop, over the in-memory mesh ------------------------------------------


def node_config(tmp: Path, i: int, n: int, rounds: int) -> NodeConfig:
    cfg = NodeConfig()
    cfg.node.name, cfg.node.data_dir = f"node-{i}", str(tmp / f"n{i}")
    cfg.discovery.expect_peers, cfg.discovery.wait_s = n - 1, 120.0  # discovery is the hub here
    cfg.task = TaskSpec(name="synthetic-logreg", shard=i, num_shards=n, lr=0.5)
    cfg.training.rounds = rounds
    cfg.gossip.round_timeout_s = 300.0  # a stall would hit pytest's timeout, not this
    cfg.gossip.linger_s = 0.0
    return validate(cfg)


def make_nodes(tmp: Path, n: int, rounds: int, hub: Hub) -> list[Node]:
    authority = FederationAuthority.create(tmp / "federation")
    nodes = []
    for i in range(n):
        cfg = node_config(tmp, i, n, rounds)
        _, cert = certify(authority, cfg.node.name, cfg.data_dir)
        nodes.append(Node(cfg, mesh=hub.mesh(cert)))
    return nodes


@pytest.mark.timeout(240)
def test_nodes_over_an_in_memory_mesh_learn_together(tmp_path: Path) -> None:
    hub = Hub()
    nodes = make_nodes(tmp_path, 4, 6, hub)

    async def main() -> None:
        await asyncio.gather(*(node.run() for node in nodes))

    asyncio.run(main())
    for node in nodes:
        records = read_jsonl(node.cfg.metrics_path)
        assert [r["round"] for r in records] == list(range(1, 7))
        assert all(r["missing"] == [] and len(r["neighbours"]) == 2 for r in records)
        assert records[-1]["accuracy"] > 0.5
        assert sum(node.metrics.rejected.values()) == 0
    assert hub.delivered == 4 * 2 * 6


@pytest.mark.timeout(240)
def test_a_node_that_leaves_does_not_stall_the_others(tmp_path: Path) -> None:
    """Node 3 leaves after its round 2; the others finish every round (round timeout is 300 s)."""
    hub = Hub()
    nodes = make_nodes(tmp_path, 4, 6, hub)
    leaver = nodes[3]

    async def leave_after(rounds: int) -> None:
        original = leaver._round

        async def counted(round_: int) -> None:
            await original(round_)
            if round_ == rounds:
                raise asyncio.CancelledError  # the node dies here; run()'s finally leaves the hub

        leaver._round = counted  # type: ignore[method-assign]
        await leaver.run()

    async def main() -> None:
        survivors = [node.run() for node in nodes[:3]]
        results = await asyncio.gather(*survivors, leave_after(2), return_exceptions=True)
        assert all(r is None for r in results[:3]), results

    asyncio.run(main())
    for node in nodes[:3]:
        records = read_jsonl(node.cfg.metrics_path)
        assert [r["round"] for r in records] == list(range(1, 7))
        assert records[-1]["members"] == 3
