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
    args = testbed.parse_args(["--nodes", "4", "--rounds", str(rounds), "--round-timeout", "10",
                               "--out", str(tmp_path)])
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
