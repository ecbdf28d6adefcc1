"""[gossip] steps_per_round on real Nodes (in-memory mesh): k exchanges per local training step, the
same models as the simulator's gossip_steps = k."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from helpers import certify
from memory_mesh import Hub

from p2pfl.config import NodeConfig, validate
from p2pfl.errors import ConfigError
from p2pfl.federation import FederationAuthority
from p2pfl.learning import TaskSpec, get_params
from p2pfl.metrics import read_jsonl
from p2pfl.node import Node
from p2pfl.sim import SimConfig, simulate

NODES, STEPS, TRAININGS = 4, 3, 2


def make_nodes(tmp: Path, hub: Hub) -> list[Node]:
    authority = FederationAuthority.create(tmp / "federation")
    nodes = []
    for i in range(NODES):
        cfg = NodeConfig()
        cfg.node.name, cfg.node.data_dir = f"node-{i}", str(tmp / f"n{i}")
        cfg.discovery.expect_peers = NODES - 1
        cfg.discovery.wait_s = 120.0
        cfg.task = TaskSpec(name="synthetic-logreg", shard=i, num_shards=NODES, lr=0.5)
        cfg.training.rounds = STEPS * TRAININGS
        cfg.gossip.rule, cfg.gossip.topology = "mean", "ring"
        cfg.gossip.steps_per_round = STEPS
        cfg.gossip.round_timeout_s = 300.0  # a stall would hit pytest's timeout, not this
        cfg.gossip.linger_s = 0.0
        cfg.metrics.save_models = True
        _, cert = certify(authority, cfg.node.name, cfg.data_dir)
        nodes.append(Node(validate(cfg), mesh=hub.mesh(cert)))
    return nodes


@pytest.mark.timeout(300)
def test_nodes_train_every_kth_round_and_match_the_simulator(tmp_path: Path) -> None:
    hub = Hub()
    nodes = make_nodes(tmp_path, hub)
    trained: dict[str, list[int]] = {n.cfg.node.name: [] for n in nodes}
    for node in nodes:
        original = node.task.train

        def counted(model, node=node, original=original):  # type: ignore[no-untyped-def]
            trained[node.cfg.node.name].append(node.core.round)
            return original(model)

        node.task.train = counted  # type: ignore[method-assign]

    async def main() -> None:
        await asyncio.gather(*(node.run() for node in nodes))

    asyncio.run(main())
    assert all(rounds == [1, 1 + STEPS] for rounds in trained.values()), trained
    for node in nodes:
        records = read_jsonl(node.cfg.metrics_path)
        assert [r["round"] for r in records] == list(range(1, STEPS * TRAININGS + 1))
        assert all(r["missing"] == [] for r in records)
        losses = [r["train_loss"] for r in records]
        assert losses[:STEPS] == [losses[0]] * STEPS  # exchange-only rounds report the last training loss
    # the simulator with gossip_steps = k takes the same steps (same ids, so the same ring)
    ids = tuple(n.node_id for n in nodes)
    sim = simulate(
        SimConfig(
            task="synthetic-logreg", nodes=NODES, rounds=TRAININGS, topology="ring", rule="mean", lr=0.5,
            gossip_steps=STEPS, ids=ids, names=tuple(n.cfg.node.name for n in nodes),
        )
    )  # fmt: skip
    final = np.stack([node.core.flatten(get_params(node.model)) for node in nodes])
    assert np.allclose(final, sim.vectors, atol=1e-5)


def test_steps_per_round_is_validated() -> None:
    cfg = NodeConfig()
    cfg.gossip.steps_per_round = 0
    with pytest.raises(ConfigError, match="steps_per_round"):
        validate(cfg)
