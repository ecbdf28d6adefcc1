"""The simulator: same task setup as the node, vectorised path == per-node loop, deterministic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from p2pfl import topology
from p2pfl.aggregation import RULES
from p2pfl.errors import ConfigError
from p2pfl.learning import TaskSpec, TensorTask, flatten, get_params, load_task, set_params, unflatten
from p2pfl.learning.batched import BatchedTrainer, GeneratorShuffles, SeededShuffles, batchable
from p2pfl.sim import (
    Network,
    SimConfig,
    SimResult,
    Simulation,
    consensus_distance,
    gossip,
    message_bytes,
    simulate,
    spread,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class WrappedTask(TensorTask):
    """A Task the simulator cannot batch (not exactly a TensorTask): it must use the per-node loop."""


def wrapped_task(spec: TaskSpec) -> WrappedTask:
    task = load_task(TaskSpec(**{**spec.__dict__, "name": "synthetic-logreg"}))
    task.__class__ = WrappedTask
    return task


def test_virtual_nodes_are_set_up_like_real_nodes() -> None:
    cfg = SimConfig(nodes=6, rounds=0, partition="dirichlet", alpha=0.3, seed=4, lr=0.1)
    sim = Simulation(cfg)
    for i, task in enumerate(sim.tasks):
        spec = TaskSpec(
            "p2pfl.sim:digits_logreg", shard=i, num_shards=6, partition="dirichlet", alpha=0.3, seed=4, lr=0.1
        )
        assert task.spec == spec
        real = load_task(spec)  # what a node with task.shard = i loads
        assert torch.equal(task.x_train, real.x_train) and task.num_samples == real.num_samples
        assert np.array_equal(sim.x[i], flatten(get_params(real.build_model())))
    assert list(sim.samples) == [t.num_samples for t in sim.tasks]
    assert sim.samples.sum() == sum(load_task(cfg.task_spec(i)).num_samples for i in range(6))


def test_batched_training_and_evaluation_equal_task_train_and_evaluate() -> None:
    for name in ("digits-logreg", "digits-mlp"):
        cfg = SimConfig(task=name, nodes=5, partition="dirichlet", alpha=0.5, local_epochs=2, batch_size=16)
        tasks = [load_task(cfg.task_spec(i)) for i in range(5)]
        twins = [load_task(cfg.task_spec(i)) for i in range(5)]  # same generators, same seeds
        model = tasks[0].build_model()
        assert batchable(tasks, model)
        spec = {k: (v.shape, v.dtype) for k, v in get_params(model).items()}
        rng = np.random.default_rng(0)
        x = np.stack(
            [
                flatten(get_params(model))
                + 0.1 * rng.normal(size=sum(v.size for v in get_params(model).values()))
                for _ in range(5)
            ]
        ).astype(np.float32)
        reference = x.copy()
        trainer = BatchedTrainer(tasks, model)
        losses = trainer.train(x)
        acc, test_loss = trainer.evaluate(x)
        for i, task in enumerate(twins):
            m = task.build_model()
            set_params(m, unflatten(reference[i], spec))
            loss = task.train(m)
            assert np.allclose(flatten(get_params(m)), x[i], atol=2e-5), (name, i)
            assert loss == pytest.approx(losses[i], rel=1e-4)
            a, l_ = task.evaluate(m)
            assert a == pytest.approx(acc[i], abs=1 / task.num_test + 1e-9) and l_ == pytest.approx(
                test_loss[i], rel=1e-4
            )


def vectorised_and_loop(**overrides) -> tuple[SimResult, SimResult]:
    """Run one config both ways (vectorised, per-node loop) on a lossy random-regular:3 graph.

    The comparison tests differ only in size, rule, seed and attack; keeping the shared knobs here
    makes sure both paths are always exercised with drops and small batches.
    """
    base = dict(topology="random-regular:3", batch_size=16, drop=0.1, **overrides)
    return simulate(SimConfig(**base)), simulate(SimConfig(**base, vectorised=False))


@pytest.mark.parametrize("rule", RULES)
def test_vectorised_run_equals_the_per_node_loop(rule: str) -> None:
    fast, slow = vectorised_and_loop(nodes=7, rounds=3, rule=rule, partition="dirichlet", seed=2)
    assert np.allclose(fast.vectors, slow.vectors, atol=1e-4)
    for a, b in zip(fast.rounds, slow.rounds, strict=True):
        assert np.allclose(a.accuracy, b.accuracy, atol=3 / 450)
        assert np.allclose(a.train_loss, b.train_loss, rtol=1e-3)
        assert a.consensus == pytest.approx(b.consensus, rel=1e-3)
        assert a.bytes_per_node == b.bytes_per_node
    if rule == "push-sum":
        assert np.allclose(fast.mass, slow.mass) and fast.mass.sum() <= fast.samples.sum() + 1e-6


def test_unbatchable_tasks_fall_back_to_the_loop_and_time_varying_topologies_work() -> None:
    cfg = SimConfig(task="test_sim:wrapped_task", nodes=4, rounds=4, topology="one-peer-exponential")
    sim = Simulation(cfg)
    assert sim.trainer is None and len(sim.models) == 4
    res = sim.run()
    assert res.spectral_gap == 1.0 and res.final.accuracy.shape == (4,)
    ref = simulate(SimConfig(task="synthetic-logreg", nodes=4, rounds=4, topology="one-peer-exponential"))
    assert np.allclose(res.vectors, ref.vectors, atol=1e-5)


def test_deterministic_under_the_seed() -> None:
    cfg = SimConfig(
        nodes=12, rounds=4, topology="erdos-renyi", partition="dirichlet", rule="clipped", seed=3, drop=0.2
    )
    a, b = simulate(cfg), simulate(cfg)
    assert np.array_equal(a.vectors, b.vectors)
    assert [r.row()["mean_accuracy"] for r in a.rounds] == [r.row()["mean_accuracy"] for r in b.rounds]
    c = simulate(SimConfig(**{**cfg.__dict__, "seed": 4}))
    assert not np.array_equal(a.vectors, c.vectors)


def test_node_ids_order_the_graph_like_real_nodes() -> None:
    ids = ("f3", "0a", "9c", "41", "d7", "22")
    names = tuple(f"node-{i}" for i in range(6))
    net = Network("ring", 6, ids=ids, names=names)
    rows, cols, deg = net.edges(1)
    for i, me in enumerate(ids):
        expect = topology.neighbours("ring", list(ids), me, 1, names=dict(zip(ids, names, strict=True)))
        assert sorted(ids[j] for j in cols[rows == i]) == expect
        assert deg[i] == len(expect)
    # an edge-list file by names sees the node names
    net = Network("edges_4.toml", 4, ids=("z", "y", "x", "w"), names=("node-0", "node-1", "node-2", "node-3"))
    rows, cols, _ = net.edges(1)
    assert sorted(cols[rows == 1].tolist()) == [0, 2]  # node-1 ~ node-0, node-2
    with pytest.raises(ConfigError):
        SimConfig(nodes=3, ids=("a", "a", "b"))


def test_message_bytes_match_a_real_sealed_update_and_are_counted_per_neighbour() -> None:
    from p2pfl import codec
    from p2pfl.envelope import UpdateMeta, seal
    from p2pfl.identity import Identity

    params = {"w": np.zeros((10, 64), dtype=np.float32), "b": np.zeros(10, dtype=np.float32)}
    me = Identity.generate()
    peers = {Identity.generate().node_id: Identity.generate().box_public_bytes for _ in range(5)}
    meta = UpdateMeta(
        sender=me.node_id, federation="ab" * 8, round=3, seq=17, timestamp=1.5e9, samples=120, degree=5
    )
    real = len(seal(codec.encode(params), meta, me, peers))
    assert abs(message_bytes(params, 5) - real) <= 16  # header integers vary by a few bytes
    res = simulate(SimConfig(nodes=8, rounds=2, topology="ring"))
    assert res.rounds[1].bytes_per_node == pytest.approx(
        2 * 2 * message_bytes(get_params(torch.nn.Linear(64, 10)), 2)
    )


def test_bytes_are_counted_per_node_with_its_own_degree_and_message_kind() -> None:
    from p2pfl.compression import DIFF, KEYFRAME

    params = get_params(torch.nn.Linear(64, 10))
    deg = np.array([7, 1, 1, 1, 1, 1, 1, 1])  # star: the hub and its leaves
    plain = Simulation(SimConfig(nodes=8, rounds=3, topology="star"))
    plain.run(gap=False)
    assert plain.sent.tolist() == [3 * message_bytes(params, d) * d for d in deg.tolist()]
    topk = Simulation(SimConfig(nodes=8, rounds=3, topology="star", compression="topk:0.1", keyframe_every=2))
    topk.run(gap=False)  # rounds 1 and 3 send keyframes, round 2 a diff
    expect = [d * (2 * topk._message(d, KEYFRAME) + topk._message(d, DIFF)) for d in deg.tolist()]
    assert topk.sent.tolist() == expect and topk._message(7, DIFF) != topk._message(7, KEYFRAME)


def test_averaging_only_and_consensus_distance() -> None:
    x0 = np.random.default_rng(0).normal(size=(16, 3))
    assert consensus_distance(x0) == pytest.approx(np.mean(np.sum((x0 - x0.mean(0)) ** 2, axis=1)))
    x, dist, _ = gossip(x0, "full", 1)
    assert dist[-1] < 1e-10 and np.allclose(x, x0.mean(0), atol=1e-6)
    cfg = SimConfig(nodes=16, rounds=3, topology="exponential", train=False)
    start = Simulation(cfg).x + np.random.default_rng(1).normal(size=(16, 650)).astype(np.float32)
    sim = Simulation(cfg, x0=start).run()
    assert sim.rounds[0].train_loss.size == 0
    _, expect, _ = gossip(start, "exponential", 3)
    assert [r.consensus for r in sim.rounds] == pytest.approx(expect[1:], rel=1e-5)


def test_many_nodes_smoke() -> None:
    res = simulate(
        SimConfig(nodes=300, rounds=2, topology="exponential", partition="dirichlet", eval_every=2)
    )
    assert res.rounds[0].accuracy is None and res.final.accuracy.shape == (300,)
    assert res.samples.sum() == 1348 and res.samples.min() >= 1


@pytest.mark.parametrize("rule", ["robust", "median", "mean"])
def test_attacked_vectorised_run_equals_the_per_node_loop(rule: str) -> None:
    fast, slow = vectorised_and_loop(nodes=8, rounds=4, rule=rule, seed=1, attack="dissensus", byzantine=2)
    assert fast.byzantine == (0, 4) and np.allclose(fast.vectors, slow.vectors, atol=1e-4)
    for a, b in zip(fast.rounds, slow.rounds, strict=True):
        assert a.honest_mean_accuracy == pytest.approx(b.honest_mean_accuracy, abs=3 / 450)
        assert a.downweighted == b.downweighted
        assert list(a.honest) == [i not in (0, 4) for i in range(8)]
    if rule == "robust":
        assert fast.reputation == slow.reputation and len(fast.reputation) == 8
    else:
        assert fast.reputation is None and fast.rounds[-1].downweighted is None


def test_byzantine_nodes_send_crafted_vectors_and_keep_their_own_model_honest() -> None:
    cfg = SimConfig(nodes=6, rounds=3, topology="ring", attack="sign-flip", byzantine=(2,), rule="mean")
    sim = Simulation(cfg)
    sent = []
    original = sim._craft

    def spy(round: int):
        out = original(round)
        sent.append((sim.x.copy(), out.copy()))
        return out

    sim._craft = spy
    sim.run(gap=False)
    for own, out in sent:
        assert np.array_equal(out[2], -own[2]) and np.array_equal(np.delete(out, 2, 0), np.delete(own, 2, 0))
    # what node 2 heard last round: what its ring neighbours 1 and 3 sent (as a real node hears it)
    heard = sim.mixers[2].heard
    assert len(heard) == 2 and np.array_equal(heard[0], sent[-1][0][1])
    # with label-flip, only the Byzantine node's task is poisoned
    lf = Simulation(SimConfig(nodes=4, rounds=0, attack="label-flip", byzantine=1))
    assert np.array_equal(lf.tasks[0].train_labels, 9 - load_task(lf.cfg.task_spec(0)).train_labels)
    assert np.array_equal(lf.tasks[1].train_labels, load_task(lf.cfg.task_spec(1)).train_labels)
    assert lf.trainer is not None, "a poisoned TensorTask still trains batched"


def test_spread_places_byzantine_nodes_evenly() -> None:
    assert spread(16, 0) == () and spread(16, 1) == (0,) and spread(16, 2) == (0, 8)
    assert spread(16, 3) == (0, 5, 10) and spread(4, 4) == (0, 1, 2, 3)
    assert SimConfig(nodes=16, attack="alie", byzantine=3).byzantine == (0, 5, 10)
    assert SimConfig(nodes=16, attack="alie", byzantine=(9, 2)).byzantine == (2, 9)
    with pytest.raises(ConfigError):
        spread(4, 5)


def test_config_errors() -> None:
    for bad in (
        dict(nodes=0),
        dict(rule="no-such-rule"),
        dict(eval_every=0),
        dict(drop=1.0),
        dict(names=("a",)),
    ):
        with pytest.raises(ConfigError):
            SimConfig(**bad)
    with pytest.raises(ConfigError):
        Simulation(SimConfig(nodes=2, topology="no-such-topology"))
    for bad in (
        dict(attack="nope", byzantine=1),
        dict(byzantine=2),  # Byzantine nodes without an attack
        dict(attack="alie", byzantine=(1, 1)),
        dict(attack="alie", byzantine=(0, 99)),
        dict(attack="alie", byzantine=99),
        dict(reputation=(("accept", -1.0),)),
        dict(reputation=(("no_such_option", 1.0),)),
    ):
        with pytest.raises(ConfigError):
            SimConfig(nodes=4, **bad)


def test_sim_config_shares_the_task_settings_and_keeps_its_field_order() -> None:
    names = [f.name for f in dataclasses.fields(SimConfig)]
    assert names[:23] == [
        "task", "nodes", "rounds", "topology", "rule", "radius", "partition", "alpha", "seed",
        "local_epochs", "batch_size", "lr", "data", "train", "eval_every", "vectorised", "drop", "ids",
        "names", "attack", "byzantine", "trim", "reputation",
    ]  # fmt: skip
    assert {"gossip_steps", "gossip_momentum", "eval_nodes"} <= set(names[23:])
    cfg = SimConfig(
        task="digits-mlp", nodes=3, partition="dirichlet", alpha=0.2, seed=9, lr=0.05, batch_size=8
    )
    assert cfg.task_spec(2) == TaskSpec(
        "digits-mlp", 2, 3, partition="dirichlet", alpha=0.2, seed=9, lr=0.05, batch_size=8
    )
    assert SimConfig().task_spec(0).name == "p2pfl.sim:digits_logreg"
    with pytest.raises(TypeError):
        SimConfig("digits-mlp")  # type: ignore[misc]


# ---------------------------------------------------------------------------------------- at scale


def test_resampled_population_equals_the_per_node_tasks_and_the_loop() -> None:
    cfg = SimConfig(task="digits-resampled", nodes=5, rounds=3, partition="dirichlet", alpha=0.3, seed=2)
    sim = Simulation(cfg)
    assert sim.population is not None and sim.trainer is not None
    for i in range(5):  # node i's rows are what a real node with shard i loads
        real = load_task(cfg.task_spec(i))
        rows = torch.from_numpy(sim.population.shards[i])
        assert torch.equal(sim.population.x[rows], real.x_train)
        assert torch.equal(sim.population.y[rows], real.y_train) and sim.samples[i] == real.num_samples
    fast = sim.run()
    slow = simulate(dataclasses.replace(cfg, vectorised=False))
    assert np.allclose(fast.vectors, slow.vectors, atol=1e-5)
    assert [r.consensus for r in fast.rounds] == pytest.approx([r.consensus for r in slow.rounds], rel=1e-4)


def test_resampled_task_scales_past_the_training_split_and_digits_says_what_to_do() -> None:
    res = simulate(SimConfig(task="digits-resampled", nodes=2000, rounds=2, eval_nodes=50))
    assert res.samples.sum() == 2000 * 16 and res.final.accuracy.shape == (2000,)
    first = res.rounds[0]
    assert first.accuracy.shape == (50,) and first.evaluated.shape == (50,)
    assert first.row()["evaluated_nodes"] == 50 and res.rounds[-1].row()["evaluated_nodes"] == "all"
    with pytest.raises(ConfigError, match="at most 1348 nodes.*digits-resampled"):
        Simulation(SimConfig(nodes=1349, rounds=0))


def test_sampled_evaluation_is_the_full_evaluation_of_those_nodes() -> None:
    cfg = SimConfig(nodes=20, rounds=3, topology="exponential", eval_nodes=6, seed=5)
    sampled = simulate(cfg)
    full = simulate(dataclasses.replace(cfg, eval_nodes=0))
    for a, b in zip(sampled.rounds[:-1], full.rounds[:-1], strict=True):
        assert list(a.evaluated) == sorted(set(a.evaluated.tolist())) and len(a.evaluated) == 6
        assert np.array_equal(a.accuracy, b.accuracy[a.evaluated])
    assert np.array_equal(sampled.rounds[-1].accuracy, full.rounds[-1].accuracy)


def test_shards_are_one_flat_array_and_lookups_copy_one_shard() -> None:
    from p2pfl.learning.data import PartitionCache, Shards, partition_indices

    labels = np.random.default_rng(0).integers(0, 4, size=500)
    cache = PartitionCache()
    shards = cache.shards(labels, 7, scheme="dirichlet", alpha=0.4, seed=1)
    assert (
        isinstance(shards, Shards)
        and cache.shards(labels, 7, scheme="dirichlet", alpha=0.4, seed=1) is shards
    )
    expected = partition_indices(labels, 7, scheme="dirichlet", alpha=0.4, seed=1)
    assert len(shards) == 7 and all(np.array_equal(a, b) for a, b in zip(shards, expected, strict=True))
    one = shards[3]
    one[:] = -1  # a copy: the cache is untouched
    assert np.array_equal(shards[3], expected[3]) and not shards.view(3).flags.writeable
    assert shards.sizes.tolist() == [len(e) for e in expected]


def test_seeded_shuffles_draw_what_torch_randperm_draws() -> None:
    """Draw for draw, over epochs and state refills (a 1,300-sample node uses 1,299 of its 624-word
    state per epoch), in chunks that do not line up, for seeds past 2^32 and below 0."""
    rng = np.random.default_rng(1)
    seeds = np.concatenate([[0, 1, 2**32 + 7, -3], rng.integers(0, 2**40, size=60)])
    sizes = np.concatenate([[1, 2, 16, 1300], rng.integers(1, 40, size=60)]).tolist()
    torch_gens = GeneratorShuffles([torch.Generator().manual_seed(int(s)) for s in seeds])
    seeded = SeededShuffles(seeds)
    for _ in range(4):
        expect = torch.cat([torch_gens.permutations(0, sizes[:30]), torch_gens.permutations(30, sizes[30:])])
        got = torch.cat([seeded.permutations(0, sizes[:45]), seeded.permutations(45, sizes[45:])])
        assert torch.equal(got, expect)


def test_consensus_distance_in_chunks_equals_the_dense_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    import p2pfl.sim as sim_module

    x = np.random.default_rng(3).normal(size=(37, 5)).astype(np.float32)
    dense = float(np.mean(np.sum((x.astype(np.float64) - x.astype(np.float64).mean(0)) ** 2, axis=1)))
    monkeypatch.setattr(sim_module, "CONSENSUS_ROWS_PER_CHUNK", 4)
    assert consensus_distance(x) == pytest.approx(dense, rel=1e-12)


def test_gossip_steps_are_extra_exchanges_per_local_step() -> None:
    x0 = np.random.default_rng(2).normal(size=(12, 650)).astype(np.float32)
    cfg = SimConfig(nodes=12, rounds=2, topology="ring", train=False, gossip_steps=3)
    res = Simulation(cfg, x0=x0).run()
    _, expect, _ = gossip(x0, "ring", 6)
    assert [r.consensus for r in res.rounds] == pytest.approx([expect[3], expect[6]], rel=1e-5)
    one = simulate(SimConfig(nodes=12, rounds=2, topology="ring"))
    three = simulate(SimConfig(nodes=12, rounds=2, topology="ring", gossip_steps=3))
    assert three.rounds[-1].bytes_per_node == pytest.approx(3 * one.rounds[-1].bytes_per_node)
    assert three.rounds[-1].consensus < one.rounds[-1].consensus
    # the node's form: train in round 1 of every k, mix in every round
    k1 = simulate(SimConfig(nodes=6, rounds=2, topology="ring", gossip_steps=2, seed=1))
    sim = Simulation(SimConfig(nodes=6, rounds=2, topology="ring", seed=1))
    for r in (1, 2):
        sim._train()
        sim._mix(2 * r - 1)
        sim._mix(2 * r)
    assert np.allclose(k1.vectors, sim.x, atol=1e-6)


def test_accelerated_gossip_keeps_the_mean_and_converges_faster() -> None:
    x0 = np.random.default_rng(4).normal(size=(32, 650)).astype(np.float32)
    plain = Simulation(
        SimConfig(nodes=32, rounds=1, topology="ring", train=False, gossip_steps=30), x0=x0
    ).run()
    fast = Simulation(
        SimConfig(nodes=32, rounds=1, topology="ring", train=False, gossip_steps=30, gossip_momentum=0.6),
        x0=x0,
    ).run()
    assert np.allclose(fast.vectors.mean(0), x0.mean(0), atol=1e-4)
    assert fast.rounds[-1].consensus < 0.5 * plain.rounds[-1].consensus
    with pytest.raises(ConfigError, match="linear averaging"):
        SimConfig(rule="median", gossip_momentum=0.5)
    with pytest.raises(ConfigError):
        SimConfig(gossip_steps=0)


def test_rounds_bytes_and_time_to_a_target() -> None:
    res = simulate(SimConfig(nodes=8, rounds=6, topology="ring", gossip_steps=2))
    target = res.rounds[3].mean_accuracy
    r = res.rounds_to(target)
    assert r is not None and r <= 4
    assert res.bytes_to(target) == res.rounds[r - 1].bytes_per_node
    assert res.time_to(target) == pytest.approx(sum(s.seconds for s in res.rounds[:r]))
    assert res.time_to(target, train_s=0.5, exchange_s=0.25) == pytest.approx(r * (0.5 + 2 * 0.25))
    assert res.rounds_to(2.0) is None and res.bytes_to(2.0) is None and res.time_to(2.0) is None
    assert res.rounds_to(target, stat="min") is None or res.rounds_to(target, stat="min") >= r
