"""The simulator is faithful to the real thing: same seed, task, topology, partition and rounds give
the same final mean accuracy (within 2 points) as a testbed run of real node processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2pfl import testbed
from p2pfl.metrics import read_jsonl
from p2pfl.sim import SimConfig, simulate

NODES, ROUNDS = 4, 8


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_simulator_matches_real_nodes(tmp_path: Path, partition: str) -> None:
    args = [
        "--nodes",
        str(NODES),
        "--rounds",
        str(ROUNDS),
        "--topology",
        "ring",
        "--task",
        "digits-mlp",
        "--rule",
        "clipped",
        "--partition",
        partition,
        "--alpha",
        "0.5",
        "--seed",
        "3",
        "--out",
        str(tmp_path),
    ]
    assert testbed.main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    ids = tuple(read_jsonl(tmp_path / f"node-{i}" / "metrics.jsonl")[0]["node_id"] for i in range(NODES))

    sim = simulate(
        SimConfig(
            task="digits-mlp",
            nodes=NODES,
            rounds=ROUNDS,
            topology="ring",
            rule="clipped",
            partition=partition,
            alpha=0.5,
            seed=3,
            ids=ids,
            names=tuple(f"node-{i}" for i in range(NODES)),
        )
    )
    assert sim.final is not None
    assert abs(sim.final.mean_accuracy - summary["mean_accuracy"]) <= 0.02
