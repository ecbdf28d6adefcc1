"""End to end: real node processes find each other by mDNS on 127.0.0.1 and train digits together."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfl import testbed
from p2pfl.metrics import read_jsonl

NODES, ROUNDS = 3, 8
# Node processes import torch and find each other by mDNS: on a loaded 2-core machine that can take
# far longer than the testbed's 30 s default wait, and a node that gave up waiting would start round
# 1 without the full membership the tests check. They start as soon as all peers are found, so a
# generous wait costs nothing on a fast machine.
WAIT_S = 180
CHANGE_S = 120  # ceiling for a membership change to show in the metrics
DEPART_S = 420  # ceiling for a node killed without a goodbye to leave (mDNS TTL + liveness checks)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_three_processes_discover_each_other_and_learn_together(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert (
        testbed.main(
            ["--nodes", str(NODES), "--rounds", str(ROUNDS), "--wait", str(WAIT_S), "--out", str(out)]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    records = {n["name"]: read_jsonl(out / n["name"] / "metrics.jsonl") for n in summary["nodes"]}

    # Every node ran every round with the whole federation as members (found by mDNS: no static peers),
    # and mixed nearly every neighbour's update of nearly every round.
    for name, rows in records.items():
        assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), name
        assert all(r["members"] == NODES for r in rows), name
        assert missed_share(rows) <= 0.1, name  # bounded staleness: a late update waits for the next round
        assert rows[-1]["rejected"] == {}, name

    # Accuracy rises well above chance (10 classes).
    first = np.mean([rows[0]["accuracy"] for rows in records.values()])
    assert summary["min_accuracy"] > 0.5
    assert summary["mean_accuracy"] > first + 0.05

    # Gossip pulls the models together: after mixing, the nodes' spread is far below the spread of
    # the models they exchanged (reconstructed from the pre-mix distances each node reports).
    last = [rows[-1] for rows in records.values()]
    pairs = {
        tuple(sorted((r["node"], nb))): info["distance"] ** 2
        for r in last
        for nb, info in r["neighbours"].items()
    }
    before_mixing = sum(pairs.values()) / NODES**2  # complete graph: mean squared distance from the average
    after_mixing = summary["consensus_distance"]["last"]
    assert after_mixing < 0.5 * before_mixing


def missed_share(rows: list[dict[str, Any]]) -> float:
    """Share of (round, neighbour) pairs in which the neighbour's update was not mixed."""
    planned = sum(len(r["neighbours"]) for r in rows)
    return sum(len(r["missing"]) for r in rows) / max(planned, 1)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` (a look at the nodes' metrics files) until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        time.sleep(0.2)


def left_after_joining(rows: list[dict[str, Any]]) -> int | None:
    """Index of the first round with 3 members after one with all 4 (None: not seen yet)."""
    joined = next((i for i, r in enumerate(rows) if r["members"] == 4), None)
    if joined is None:
        return None
    return next((i for i, r in enumerate(rows) if i > joined and r["members"] == 3), None)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_peer_does_not_stall_the_others_and_leaves(tmp_path: Path) -> None:
    """SIGKILL one of 4 nodes mid-run: the rest go on without waiting for it, and it leaves.

    Synchronised on what the test is about, never on round counts or sleeps: the kill comes once
    every node has run a round with all 4 members. Its neighbours' links to it fail at once, so no
    round waits for it; with no goodbye, discovery's liveness check drops it once its mDNS records
    expire and it stays silent (~2.5 min), and every survivor then runs rounds with 3 members.
    """
    args = testbed.parse_args(
        ["--nodes", "4", "--rounds", "0", "--round-timeout", "10", "--wait", str(WAIT_S),
         "--out", str(tmp_path)]
    )  # fmt: skip
    procs = testbed.launch(testbed.prepare(args, tmp_path))
    victim, survivors = procs[-1], procs[:-1]
    try:

        def formed() -> bool:
            for p in procs:
                assert p.proc.poll() is None, f"{p.name} exited before the federation formed"
            return all(any(r["members"] == 4 for r in p.metrics) for p in procs)

        wait_until(formed, WAIT_S + CHANGE_S, "the 4 nodes did not run a round together")
        victim.proc.kill()

        def left() -> bool:
            for p in survivors:
                assert p.proc.poll() is None, f"{p.name} exited after the kill"
            return all(any(r["members"] == 3 for r in p.metrics) for p in survivors)

        wait_until(left, DEPART_S, "the killed node is still a member of some survivor")
    finally:
        testbed.stop_all(procs)
    for p in survivors:
        rows = p.metrics
        assert [r["round"] for r in rows] == list(range(1, len(rows) + 1)), p.name
        gone = next(i for i, r in enumerate(rows) if r["members"] == 3)
        dead_rounds = [r for r in rows[:gone] if victim.name in r["missing"]]
        for r in dead_rounds:  # a neighbour of the dead node, before it left: nothing from it, no wait
            assert r["neighbours"][victim.name]["weight"] == 0.0, p.name
        assert all(victim.name not in r["neighbours"] for r in rows[gone:]), p.name
        assert rows[-1]["accuracy"] > 0.5, p.name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_nodes_follow_time_varying_and_file_topologies(tmp_path: Path) -> None:
    """One-peer exponential pairs nodes anew every round; an edge-list file names neighbours by node name."""
    out = tmp_path / "one-peer"
    assert (
        testbed.main(
            [
                "--nodes",
                "4",
                "--rounds",
                "3",
                "--topology",
                "one-peer-exponential",
                "--wait",
                str(WAIT_S),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = {f"node-{i}": read_jsonl(out / f"node-{i}" / "metrics.jsonl") for i in range(4)}
    partners = [{name: set(r[k]["neighbours"]) for name, r in rows.items()} for k in range(3)]
    for pairing in partners:  # every node has exactly one partner, and partnership is mutual
        assert all(len(p) == 1 and name in pairing[next(iter(p))] for name, p in pairing.items())
    assert partners[0] != partners[1] and partners[0] == partners[2]  # period log2(4) = 2
    assert all(sum(len(r[k]["staleness"]) for k in range(3)) >= 1 for r in rows.values())  # partners mixed

    out = tmp_path / "edges"
    assert (
        testbed.main(
            # a bare file name: looked up among the topologies shipped with the package
            [
                "--nodes",
                "4",
                "--rounds",
                "2",
                "--topology",
                "edges_4.toml",
                "--wait",
                str(WAIT_S),
                "--out",
                str(out),
            ]
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
        rows_of = read_jsonl(out / name / "metrics.jsonl")
        assert all(set(row["neighbours"]) == neighbours for row in rows_of), name
        assert sum(len(row["staleness"]) for row in rows_of) >= 1, name  # neighbours' updates were mixed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_honest_neighbours_down_weight_a_byzantine_node(tmp_path: Path) -> None:
    """1 of 6 real nodes sends sign-flipped models: every honest neighbour cuts its weight within a few rounds."""
    assert (
        testbed.main(
            [
                "--nodes",
                "6",
                "--rounds",
                "6",
                "--byzantine",
                "1",
                "--attack",
                "sign-flip",
                "--wait",
                str(WAIT_S),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
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
