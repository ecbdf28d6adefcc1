"""The Python API: a Node embedded in another asyncio program, with a callback per round."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import certify
from memory_mesh import Hub

from p2pfl import reporting, testbed
from p2pfl.config import NodeConfig, validate
from p2pfl.federation import FederationAuthority
from p2pfl.learning.spec import TaskSpec
from p2pfl.metrics import read_jsonl
from p2pfl.node import Node


def make_node(
    tmp: Path,
    authority: FederationAuthority,
    hub: Hub,
    i: int,
    rounds: int,
    tweak: Callable[[NodeConfig], None] = lambda cfg: None,
    **kw: object,
) -> Node:
    """Node `i` of 2 on the hub; `tweak(cfg)` changes its settings before the node is built."""
    cfg = NodeConfig()
    cfg.node.name, cfg.node.data_dir = f"node-{i}", str(tmp / f"n{i}")
    cfg.discovery.expect_peers, cfg.discovery.wait_s = 1, 120.0
    cfg.task = TaskSpec(name="synthetic-logreg", shard=i, num_shards=max(2, i + 1), lr=0.5)
    cfg.training.rounds = rounds
    cfg.gossip.round_timeout_s, cfg.gossip.linger_s = 300.0, 0.0
    tweak(cfg)
    _, cert = certify(authority, cfg.node.name, cfg.data_dir)
    return Node(validate(cfg), mesh=hub.mesh(cert), **kw)  # type: ignore[arg-type]


@pytest.mark.timeout(240)
def test_on_round_sees_every_record_and_can_stop_the_node(tmp_path: Path) -> None:
    """The host program's callback gets each round's record as written; asking the node to stop
    from it ends run() normally, with the final model saved."""
    authority, hub = FederationAuthority.create(tmp_path / "federation"), Hub()
    seen: list[dict] = []
    holder: list[Node] = []

    def on_round(record: dict) -> None:
        seen.append(record)
        if record["round"] == 3:
            holder[0].request_stop()

    host = make_node(tmp_path, authority, hub, 0, 0, on_round=on_round)  # rounds 0: until stopped
    holder.append(host)
    peer = make_node(tmp_path, authority, hub, 1, 0)

    async def main() -> None:
        peer_run = asyncio.ensure_future(peer.run())
        await host.run()
        peer.request_stop()
        await peer_run

    asyncio.run(main())
    assert [r["round"] for r in seen] == [1, 2, 3]
    assert seen == read_jsonl(host.cfg.metrics_path)
    assert {"accuracy", "train_loss", "round_s", "bytes_out", "neighbours"} <= set(seen[-1])
    assert (host.cfg.data_dir / "model.npz").exists()


@pytest.mark.timeout(240)
def test_a_raising_callback_does_not_stop_the_training(tmp_path: Path) -> None:
    authority, hub = FederationAuthority.create(tmp_path / "federation"), Hub()

    def on_round(record: dict) -> None:
        raise RuntimeError("bug in the host program")

    nodes = [
        make_node(tmp_path, authority, hub, 0, 2, on_round=on_round),
        make_node(tmp_path, authority, hub, 1, 2),
    ]

    async def main() -> None:
        await asyncio.gather(*(n.run() for n in nodes))

    asyncio.run(main())
    assert [r["round"] for r in read_jsonl(nodes[0].cfg.metrics_path)] == [1, 2]


# -- the example: one node embedded in a host program, beside real node processes ---------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embed_node.py"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_embedding_example_runs_a_node_beside_two_node_processes(tmp_path: Path) -> None:
    """What examples/embed_node.py's docstring tells a user to do, on 127.0.0.1: prepare a
    federation with the testbed's code, start two `p2pfl node` processes, run the third node in the
    host program, which prints each round from its callback and stops the node after round 3."""
    out = tmp_path / "fed"
    options = ["--rounds", "6", "--task", "synthetic-logreg", "--wait", "240", "--round-timeout", "60"]
    python = [sys.executable, str(EXAMPLE)]
    subprocess.run([*python, "--prepare", str(out), *options], check=True, capture_output=True, timeout=300)
    procs = [testbed.launch_node(out / f"node-{i}" / "node.toml") for i in (0, 1)]
    try:
        host = subprocess.run(
            [*python, str(out / "node-2" / "node.toml"), "--stop-after", "3"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert host.returncode == 0, host.stderr[-3000:]
        lines = [line for line in host.stdout.splitlines() if line.startswith("host: round")]
        assert [line.split()[2] for line in lines] == ["1", "2", "3"]
        assert "host: node stopped after round 3" in host.stdout
        for p in procs:  # the two others finish their rounds without it
            assert p.proc.wait(timeout=600) == 0, (p.directory / "node.log").read_text()[-3000:]
    finally:
        testbed.stop_all(procs)
    assert (out / "node-2" / "model.npz").exists()
    summary = reporting.summarize(reporting.find_node_runs(out))
    assert [(n["name"], n["rounds_completed"]) for n in summary["nodes"]] == [
        ("node-0", 6),
        ("node-1", 6),
        ("node-2", 3),
    ]


@pytest.mark.timeout(240)
def test_a_node_with_tensorboard_on_writes_its_rounds(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    authority, hub = FederationAuthority.create(tmp_path / "federation"), Hub()
    nodes = [make_node(tmp_path, authority, hub, i, 2) for i in (0, 1)]
    nodes[0].cfg.metrics.tensorboard = True  # as [metrics] tensorboard = true would
    nodes[0] = Node(nodes[0].cfg, mesh=hub.mesh(nodes[0].cert))

    async def main() -> None:
        await asyncio.gather(*(n.run() for n in nodes))

    asyncio.run(main())
    events = EventAccumulator(str(nodes[0].cfg.data_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("accuracy/test")] == [1, 2]
    assert [e.step for e in events.Scalars("time/round_s")] == [1, 2]
