"""End to end: real node processes find each other by mDNS on 127.0.0.1 and train digits together."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from p2pfl import testbed
from p2pfl.metrics import read_jsonl

NODES, ROUNDS = 3, 8


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_three_processes_discover_each_other_and_learn_together(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert testbed.main(["--nodes", str(NODES), "--rounds", str(ROUNDS), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = {n["name"]: read_jsonl(out / n["name"] / "metrics.jsonl") for n in summary["nodes"]}

    # Every node ran every round with the whole federation as members (found by mDNS: no static peers),
    # and heard from its neighbours in the last round.
    for name, rows in records.items():
        assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), name
        assert all(r["members"] == NODES for r in rows), name
        assert rows[-1]["missing"] == [], name
        assert rows[-1]["rejected"] == {}, name

    # Accuracy rises well above chance (10 classes).
    first = np.mean([rows[0]["accuracy"] for rows in records.values()])
    assert summary["min_accuracy"] > 0.5
    assert summary["mean_accuracy"] > first + 0.05

    # Gossip pulls the models together: after mixing, the nodes' spread is far below the spread of
    # the models they exchanged (reconstructed from the pre-mix distances each node reports).
    last = [rows[-1] for rows in records.values()]
    pairs = {tuple(sorted((r["node"], nb))): info["distance"] ** 2
             for r in last for nb, info in r["neighbours"].items()}
    before_mixing = sum(pairs.values()) / NODES**2  # complete graph: mean squared distance from the average
    after_mixing = summary["consensus_distance"]["last"]
    assert after_mixing < 0.5 * before_mixing


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_peer_does_not_stall_the_others(tmp_path: Path) -> None:
    """SIGKILL one of 4 nodes mid-run: the rest drop it from the ring and finish every round."""
    rounds = 12
    args = testbed.parse_args(
        ["--nodes", "4", "--rounds", str(rounds), "--round-timeout", "10", "--out", str(tmp_path)]
    )
    procs = testbed.launch(testbed.prepare(args, tmp_path))
    victim, survivors = procs[-1], procs[:-1]
    try:
        deadline = time.monotonic() + 120
        while len(victim.metrics) < 3:
            assert time.monotonic() < deadline, "nodes did not start training"
            assert victim.proc.poll() is None
            time.sleep(0.2)
        victim.proc.kill()
        for p in survivors:
            assert p.proc.wait(timeout=200) == 0, p.name
    finally:
        testbed.stop_all(procs)
    for p in survivors:
        rows = p.metrics
        assert [r["round"] for r in rows] == list(range(1, rounds + 1)), p.name
        assert rows[-1]["members"] == 3, p.name  # the dead node left the membership...
        assert rows[-1]["missing"] == [], p.name  # ...so the ring re-formed without waiting on it
        assert rows[-1]["accuracy"] > 0.5, p.name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_nodes_follow_time_varying_and_file_topologies(tmp_path: Path) -> None:
    """One-peer exponential pairs nodes anew every round; an edge-list file names neighbours by node name."""
    out = tmp_path / "one-peer"
    assert (
        testbed.main(
            ["--nodes", "4", "--rounds", "3", "--topology", "one-peer-exponential", "--out", str(out)]
        )
        == 0
    )
    rows = {f"node-{i}": read_jsonl(out / f"node-{i}" / "metrics.jsonl") for i in range(4)}
    partners = [{name: set(r[k]["neighbours"]) for name, r in rows.items()} for k in range(3)]
    for pairing in partners:  # every node has exactly one partner, and partnership is mutual
        assert all(len(p) == 1 and name in pairing[next(iter(p))] for name, p in pairing.items())
    assert partners[0] != partners[1] and partners[0] == partners[2]  # period log2(4) = 2
    assert all(r[k]["missing"] == [] for r in rows.values() for k in range(3))

    out = tmp_path / "edges"
    assert (
        testbed.main(
            ["--nodes", "4", "--rounds", "2", "--topology", "topologies/edges_4.toml", "--out", str(out)]
        )
        == 0
    )
    expected = {
        "node-0": {"node-1", "node-2", "node-3"},
        "node-1": {"node-0", "node-2"},
        "node-2": {"node-0", "node-1", "node-3"},
        "node-3": {"node-0", "node-2"},
    }
    for name, neighbours in expected.items():
        row = read_jsonl(out / name / "metrics.jsonl")[-1]
        assert set(row["neighbours"]) == neighbours and row["missing"] == [], name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_honest_neighbours_down_weight_a_byzantine_node(tmp_path: Path) -> None:
    """1 of 6 real nodes sends sign-flipped models: every honest neighbour cuts its weight within a few rounds."""
    assert testbed.main(["--nodes", "6", "--rounds", "6", "--byzantine", "1", "--attack", "sign-flip",
                         "--out", str(tmp_path)]) == 0
    attacker = f"node-{testbed.byzantine_indices(6, 1)[0]}"
    judged = 0
    for i in range(6):
        rows = read_jsonl(tmp_path / f"node-{i}" / "metrics.jsonl")
        if f"node-{i}" == attacker or attacker not in rows[0]["neighbours"]:
            continue
        judged += 1
        first, later = rows[0]["neighbours"][attacker], rows[3]["neighbours"][attacker]
        assert later["reputation"] < 0.2 and later["weight"] < 0.25 * first["weight"], f"node-{i}"
        assert later["downweighted"], f"node-{i}"  # and it says why
    assert judged == 2  # a ring: both neighbours judged it
