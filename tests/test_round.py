"""The round core, directly (plan, pack, admit, mix) and as several Nodes over an in-memory mesh."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import certify, members_of, round_cores
from memory_mesh import Hub

from p2pfl import codec
from p2pfl.config import NodeConfig, validate
from p2pfl.errors import Rejected
from p2pfl.federation import FederationAuthority
from p2pfl.learning import TaskSpec
from p2pfl.metrics import read_jsonl
from p2pfl.node import Node, PeersMissing, load_credentials
from p2pfl.round import MAX_ROUNDS_AHEAD, STALENESS, Pace, RoundCore

SPEC = {"w": ((3, 2), np.dtype(np.float32)), "b": ((2,), np.dtype(np.float32))}


def params(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((3, 2), value, np.float32), "b": np.full(2, value, np.float32)}


@pytest.fixture
def cores(tmp_path: Path) -> list[RoundCore]:
    """Four cores of one federation on a ring, rule "mean" so mixing is easy to check by hand."""
    return round_cores(tmp_path, SPEC, 4)


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
            a.accept(round_, nb, arrived=0.0)
    assert a.missing(plans[a.node_id], plans[a.node_id].neighbours) == []
    result, staleness = a.mix(a.flatten(params(0.0)), plans[a.node_id])
    assert staleness == {n: 0 for n in plans[a.node_id].neighbours}
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

    a.plan(10, members)
    reasons = []
    for message, publisher in [
        (update(10 - STALENESS - 1), b.node_id),
        (update(MAX_ROUNDS_AHEAD + 1), b.node_id),
        (update(10), next(c.node_id for c in cores if c not in (a, b))),
        (b"\x00" * 64, b.node_id),
    ]:
        with pytest.raises(Rejected) as info:
            a.admit(publisher, message, members)
        reasons.append(info.value.reason.value)
    assert reasons == ["late", "round_window", "unknown_sender", "malformed"]
    for r in (10 - STALENESS, 10 + STALENESS + 5):  # stale within the bound, and far ahead: both kept
        round_, nb = a.admit(b.node_id, update(r), members)
        a.accept(round_, nb, arrived=0.0)
        assert (newest := a.inbox.newest(b.node_id)) is not None and newest.round == r


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
    result, staleness = a.mix(a.flatten(params(3.0)), plan)
    assert staleness == {} and np.all(result.vector == 3.0)


def deliver(sender: RoundCore, receiver: RoundCore, round_: int, value: float, members: dict) -> None:
    """`sender` packs an update for `round_` and `receiver` admits and files it."""
    sender.round = round_
    p = params(value)
    message = sender.pack(p, sender.flatten(p), sender.plan(round_, members))
    assert message is not None
    r, nb = receiver.admit(sender.node_id, message, members)
    receiver.accept(r, nb, arrived=0.0)


def test_a_stale_update_is_mixed_once_within_the_bound(cores: list[RoundCore]) -> None:
    members = members_of(cores)
    a, b = pair(cores)
    a.plan(6, members)
    deliver(b, a, 4, 1.0, members)  # two rounds old: still mixed, with its staleness
    plan = a.plan(6, members)
    assert a.missing(plan, [b.node_id]) == [b.node_id]  # not fresh: the round may wait for a newer one
    result, staleness = a.mix(a.flatten(params(0.0)), plan)
    assert staleness == {b.node_id: 2} and result.weights[b.node_id] > 0
    result, staleness = a.mix(a.flatten(params(0.0)), a.plan(7, members))
    assert staleness == {}, "an update is mixed once, never again in a later round"


def test_an_update_from_ahead_waits_for_its_round(cores: list[RoundCore]) -> None:
    """A neighbour one round ahead: its next update does not replace the one for our round."""
    members = members_of(cores)
    a, b = pair(cores)
    a.plan(5, members)
    deliver(b, a, 5, 1.0, members)
    deliver(b, a, 6, 3.0, members)
    result, staleness = a.mix(a.flatten(params(0.0)), a.plan(5, members))
    assert staleness == {b.node_id: 0}
    np.testing.assert_allclose(result.vector, 1.0 / 3, rtol=1e-6)  # round 5's update, MH 1/3
    result, staleness = a.mix(a.flatten(params(0.0)), a.plan(6, members))
    assert staleness == {b.node_id: 0}
    np.testing.assert_allclose(result.vector, 1.0, rtol=1e-6)  # round 6's, in round 6


def test_pace_waits_as_long_as_neighbours_usually_take() -> None:
    pace = Pace(ceiling_s=30.0, factor=4.0, floor_s=1.0, miss_limit=2, min_history=8, warmup_floor_s=5.0)
    assert pace.wait_s() == 30.0  # nothing known yet: the ceiling
    assert pace.wait_s([0.5]) == 5.0  # warming up: this round's arrivals stand in, generously
    assert pace.wait_s([3.0]) == 12.0
    for d in [0.5] * 9 + [5.0]:  # one slow outlier does not set the pace
        pace.arrived("x", d)
    assert pace.wait_s() == pytest.approx(2.0) and pace.wait_s([9.0]) == pytest.approx(2.0)
    pace.missed("y")
    assert pace.expected(["x", "y"]) == ["x", "y"]
    pace.missed("y")
    assert pace.expected(["x", "y"]) == ["x"]  # missed twice in a row: not waited for ...
    pace.heard("y")
    assert pace.expected(["x", "y"]) == ["x", "y"]  # ... until it is heard again


def test_a_node_behind_its_neighbours_catches_up(cores: list[RoundCore]) -> None:
    members = members_of(cores)
    a = cores[0]
    plan = a.plan(3, members)
    n1, n2 = (next(c for c in cores if c.node_id == n) for n in plan.neighbours)
    deliver(n1, a, 50, 1.0, members)
    deliver(n2, a, 52, 3.0, members)
    jump = a.catch_up(plan)
    assert jump is not None and (jump.from_round, jump.to_round) == (3, 50)
    np.testing.assert_allclose(jump.vector, 2.0)  # the mean of the neighbours' models
    assert a.round == 50 and all(not rounds for rounds in a.inbox.pending.values())


def test_one_neighbour_claiming_a_far_round_does_not_drag_a_node_along(cores: list[RoundCore]) -> None:
    members = members_of(cores)
    a = cores[0]
    plan = a.plan(3, members)
    honest, liar = (next(c for c in cores if c.node_id == n) for n in plan.neighbours)
    deliver(honest, a, 3, 1.0, members)
    deliver(liar, a, 10**9, 1.0, members)
    assert a.catch_up(plan) is None and a.round == 3


def test_after_a_partition_the_side_behind_resyncs_its_round_counter(cores: list[RoundCore]) -> None:
    members = members_of(cores)
    a = cores[0]
    plan = a.plan(100, members)
    same, far = (next(c for c in cores if c.node_id == n) for n in plan.neighbours)
    deliver(same, a, 100, 1.0, members)
    deliver(far, a, 130, 3.0, members)  # the other side of a healed partition: no majority ahead
    assert a.catch_up(plan) is None
    a.ran = 200  # it has run rounds enough to skip the whole gap at once
    assert a.resync(plan) == 129  # its next round is the far side's round
    result, staleness = a.mix(a.flatten(params(2.0)), plan)  # the model is mixed, not adopted
    assert staleness == {same.node_id: 0}  # the far update waits for its round (or a catch-up)
    np.testing.assert_allclose(result.vector, 2.0 + (1.0 - 2.0) / 3, rtol=1e-6)  # MH 1/3 on a ring


def test_a_neighbour_lying_about_its_round_can_at_most_double_a_nodes_pace(cores: list[RoundCore]) -> None:
    members = members_of(cores)
    a = cores[0]
    honest, liar = (next(c for c in cores if c.node_id == n) for n in a.plan(1, members).neighbours)
    for round_ in range(1, 41):  # a.round moves by resync: each round plans the next number
        plan = a.plan(a.round + 1, members)
        deliver(honest, a, plan.round, 1.0, members)
        deliver(liar, a, 10**9 + round_, 1.0, members)
        a.resync(plan)
        a.mix(a.flatten(params(1.0)), plan)
    assert 40 < a.round <= 2 * a.ran  # it was dragged, but no faster than its own rounds run


# -- several real Nodes in one loop, over the in-memory mesh ------------------------------------------


def node_config(tmp: Path, i: int, n: int, rounds: int, expect: int | None = None) -> NodeConfig:
    cfg = NodeConfig()
    cfg.node.name, cfg.node.data_dir = f"node-{i}", str(tmp / f"n{i}")
    cfg.discovery.expect_peers = n - 1 if expect is None else expect  # discovery is the hub here
    cfg.discovery.wait_s = 120.0
    cfg.task = TaskSpec(name="synthetic-logreg", shard=i, num_shards=n, lr=0.5)
    cfg.training.rounds = rounds
    cfg.gossip.round_timeout_s = 300.0  # a stall would hit pytest's timeout, not this
    cfg.gossip.linger_s = 0.0
    return validate(cfg)


def make_nodes(tmp: Path, n: int, rounds: int, hub: Hub, expect: int | None = None) -> list[Node]:
    authority = FederationAuthority.create(tmp / "federation")
    nodes = []
    for i in range(n):
        cfg = node_config(tmp, i, n, rounds, expect)
        _, cert = certify(authority, cfg.node.name, cfg.data_dir)
        nodes.append(Node(cfg, mesh=hub.mesh(cert)))
    return nodes


async def run_until_crash(node: Node, rounds: int) -> None:
    """Run `node` and let it die right after round `rounds` (its checkpoint of that round is written):
    run()'s cleanup takes it off the mesh, as a crash takes a node off the network."""
    original = node._round

    async def counted(round_: int) -> None:
        await original(round_)
        if round_ == rounds:
            raise asyncio.CancelledError

    node._round = counted  # type: ignore[method-assign]
    with contextlib.suppress(asyncio.CancelledError):
        await node.run()


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

    async def main() -> None:
        survivors = [node.run() for node in nodes[:3]]
        results = await asyncio.gather(*survivors, run_until_crash(leaver, 2), return_exceptions=True)
        assert all(r is None for r in results[:3]), results

    asyncio.run(main())
    for node in nodes[:3]:
        records = read_jsonl(node.cfg.metrics_path)
        assert [r["round"] for r in records] == list(range(1, 7))
        assert records[-1]["members"] == 3


async def until(predicate: Callable[[], bool], ceiling_s: float = 120.0) -> None:
    """Wait for a state of the federation (a generous ceiling: the machine may be busy)."""
    deadline = asyncio.get_running_loop().time() + ceiling_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(240)
def test_a_late_joiner_catches_up_and_nobody_waits_for_it(tmp_path: Path) -> None:
    hub = Hub()
    nodes = make_nodes(tmp_path, 4, 16, hub, expect=2)
    first, late = nodes[:3], nodes[3]

    async def join_late() -> None:
        await until(lambda: first[0].core.round >= 8)
        await late.run()

    async def main() -> None:
        await asyncio.gather(*(node.run() for node in first), join_late())

    asyncio.run(main())
    records = read_jsonl(late.cfg.metrics_path)
    jumps = [r for r in records if "caught_up_from" in r]
    assert jumps and jumps[0]["caught_up_from"] == 1 and jumps[0]["round"] >= 8
    assert records[-1]["round"] == 16
    others = [read_jsonl(n.cfg.metrics_path)[-1]["accuracy"] for n in first]
    assert records[-1]["accuracy"] >= min(others) - 0.1
    for node in first:  # nobody refused the newcomer's catch-up or stalled on it
        assert read_jsonl(node.cfg.metrics_path)[-1]["round"] == 16


@pytest.mark.timeout(240)
def test_a_restarted_node_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    hub = Hub()
    nodes = make_nodes(tmp_path, 4, 12, hub)
    victim = nodes[3]

    async def main() -> None:
        survivors = [asyncio.ensure_future(node.run()) for node in nodes[:3]]
        await run_until_crash(victim, 4)
        await until(lambda: nodes[0].core.round >= 7)
        restarted = Node(victim.cfg, mesh=hub.mesh(victim.cert))
        assert restarted.core.round == 4  # from the checkpoint, not from scratch
        await asyncio.gather(*survivors, restarted.run())

    asyncio.run(main())
    rounds = [r["round"] for r in read_jsonl(victim.cfg.metrics_path)]
    assert rounds[:4] == [1, 2, 3, 4], "metrics of the first life are kept (appended, not truncated)"
    assert rounds[-1] == 12 and rounds[4] > 4
    assert (victim.cfg.data_dir / "model.npy").exists()


@pytest.mark.timeout(240)
def test_rounds_zero_runs_until_stopped(tmp_path: Path) -> None:
    """An edge device's service: no last round; a stop request ends it cleanly, with its state saved."""
    hub = Hub()
    nodes = make_nodes(tmp_path, 2, 0, hub)

    async def main() -> None:
        running = [asyncio.ensure_future(node.run()) for node in nodes]
        await until(lambda: all(node.core.round >= 6 for node in nodes))  # round 5 done, 6 running
        for node in nodes:
            node.request_stop()
        await asyncio.gather(*running)  # run() returns normally after a requested stop

    asyncio.run(main())
    for node in nodes:
        assert len(read_jsonl(node.cfg.metrics_path)) >= 5
        assert (node.cfg.data_dir / "checkpoint.npz").exists() and (node.cfg.data_dir / "model.npy").exists()


def test_a_node_that_finds_too_few_peers_stops_instead_of_training_alone(tmp_path: Path) -> None:
    hub = Hub()
    (node,) = make_nodes(tmp_path, 1, 3, hub, expect=2)
    node.cfg.discovery.wait_s = 0.2
    with pytest.raises(PeersMissing, match=r"found 0 of the 2 peers .* start_alone = true"):
        asyncio.run(node.run())
    assert not node.cfg.metrics_path.exists() or read_jsonl(node.cfg.metrics_path) == []
    node.cfg.discovery.start_alone = True  # told otherwise: it trains with whoever it found
    asyncio.run(node.run())
    assert [r["round"] for r in read_jsonl(node.cfg.metrics_path)] == [1, 2, 3]


def test_an_unnamed_node_takes_the_name_its_certificate_gives(tmp_path: Path) -> None:
    authority = FederationAuthority.create(tmp_path / "federation")
    cfg = node_config(tmp_path, 0, 1, 1)
    cfg.node.name = NodeConfig().node.name  # not set in the config file
    certify(authority, "hospital-a", cfg.data_dir)
    assert Node(cfg, mesh=Hub().mesh(load_credentials(cfg.data_dir)[1])).cfg.node.name == "hospital-a"


def test_inbox_files_while_a_worker_thread_takes() -> None:
    """The event loop files updates while the mixing thread takes them (a real node crashed at round
    926 with 'dictionary changed size during iteration'); both sides must see a consistent inbox."""
    import threading

    from p2pfl.aggregation import Neighbour
    from p2pfl.round import Inbox, Pending

    inbox, errors, rounds = Inbox(), [], 4000
    vector = np.zeros(2, dtype=np.float32)

    def filer() -> None:
        try:
            for r in range(rounds):
                inbox.put(Pending(r, Neighbour("n", vector, 1, 1), float(r)))
        except Exception as exc:  # noqa: BLE001 - any exception here is the failure
            errors.append(exc)

    thread = threading.Thread(target=filer)
    thread.start()
    taken = 0
    while thread.is_alive() or inbox.newest("n") is not None:
        try:
            got = inbox.take(["n"], rounds, oldest=0)
            inbox.arrival("n", 0)
            inbox.drop_older(0)
        except RuntimeError as exc:
            errors.append(exc)
            break
        taken += len(got)
    thread.join()
    assert errors == [] and taken > 0


def test_the_node_whose_model_fits_no_neighbour_stops_before_training_alone(tmp_path: Path) -> None:
    """A site configured with another model (here another task) gets only updates it must refuse; it
    stops in its first rounds with the settings to fix, while the others, who fit each other, go on."""
    from p2pfl.node import ModelMismatch

    hub, authority, nodes = Hub(), FederationAuthority.create(tmp_path / "federation"), []
    for i in range(3):
        cfg = node_config(tmp_path, i, 3, 4)
        if i == 2:
            cfg.task = TaskSpec(name="digits-mlp", lr=0.3)
        cfg.gossip.topology = "full"
        _, cert = certify(authority, cfg.node.name, cfg.data_dir)
        nodes.append(Node(validate(cfg), mesh=hub.mesh(cert)))

    async def main() -> list[BaseException | None]:
        results = await asyncio.gather(*(node.run() for node in nodes), return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]

    outcome = asyncio.run(main())
    assert outcome[:2] == [None, None], outcome
    assert isinstance(outcome[2], ModelMismatch), outcome
    assert "num_classes" in str(outcome[2]) and "node-0" in str(outcome[2])
    for node in nodes[:2]:
        assert [r["round"] for r in read_jsonl(node.cfg.metrics_path)] == [1, 2, 3, 4]
        assert node.metrics.rejected.get("too_many_tensors", 0) >= 1  # the bigger model's updates
