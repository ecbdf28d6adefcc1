"""Round 1 starts together: a node that is ready early waits for its members to say they are ready too
(bounded by [discovery] wait_s), so start-up skew is not paid inside round 1."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from memory_mesh import Hub, MemoryMesh
from test_api import make_node

from p2pfl.config import NodeConfig
from p2pfl.federation import Certificate, FederationAuthority
from p2pfl.metrics import read_jsonl


class EventHub(Hub):
    """A hub that keeps the order of readiness announcements and sends."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def mesh(self, cert: Certificate) -> MemoryMesh:
        return LateMesh(self, cert)

    def send(self, sender: str, message: bytes, recipients: Sequence[str]) -> None:
        self.events.append(("send", sender))
        super().send(sender, message, recipients)


class LateMesh(MemoryMesh):
    """Announces readiness only once `release` is set (a node still certifying its peers)."""

    def __init__(self, hub: EventHub, cert: Certificate) -> None:
        super().__init__(hub, cert)
        self.events = hub.events
        self.release = asyncio.Event()
        self.release.set()

    async def announce_ready(self) -> None:
        await self.release.wait()
        self.events.append(("ready", self.cert.node_id))
        await super().announce_ready()


class Said(logging.Handler):
    """Sets `event` when a log message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.event = text, asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def _watch(text: str) -> Said:
    said = Said(text)
    logger = logging.getLogger("p2pfl.node")
    logger.setLevel(logging.INFO)  # restored by pytest's caplog / next test's setup is not needed here
    logger.addHandler(said)
    return said


@pytest.mark.timeout(240)
def test_early_node_waits_for_late_member_before_round_1(tmp_path: Path) -> None:
    authority, hub = FederationAuthority.create(tmp_path / "federation"), EventHub()
    early, late = (make_node(tmp_path, authority, hub, i, 2) for i in range(2))  # type: ignore[arg-type]
    late_mesh = late.mesh
    assert isinstance(late_mesh, LateMesh)
    waiting = _watch("to be ready for round 1")

    async def main() -> None:
        late_mesh.release.clear()
        runs = [asyncio.ensure_future(n.run()) for n in (early, late)]
        # released once the early node waits (or, with no barrier, once it has sent round 1 anyway)
        sent = asyncio.ensure_future(_first_send(hub, early.node_id))
        await asyncio.wait(
            [asyncio.ensure_future(waiting.event.wait()), sent], timeout=120, return_when="FIRST_COMPLETED"
        )
        sent.cancel()
        late_mesh.release.set()
        await asyncio.gather(*runs)

    try:
        asyncio.run(main())
    finally:
        logging.getLogger("p2pfl.node").removeHandler(waiting)
    assert waiting.event.is_set(), "the early node never waited for the late one"
    first_send = hub.events.index(("send", early.node_id))
    assert hub.events.index(("ready", late.node_id)) < first_send, hub.events


async def _first_send(hub: EventHub, node_id: str) -> None:
    while ("send", node_id) not in hub.events:
        await asyncio.sleep(0.05)


@pytest.mark.timeout(240)
def test_member_never_ready_delays_round_1_by_wait_s_at_most(tmp_path: Path) -> None:
    """A member stuck before readiness (frozen while certifying) cannot stall the others: after
    [discovery] wait_s they start without it, and say so."""
    authority, hub = FederationAuthority.create(tmp_path / "federation"), EventHub()

    def impatient(cfg: NodeConfig) -> None:
        cfg.discovery.wait_s, cfg.gossip.round_timeout_s, cfg.gossip.min_wait_s = 3.0, 3.0, 0.0

    early = make_node(tmp_path, authority, hub, 0, 1, impatient)  # type: ignore[arg-type]
    stuck = make_node(tmp_path, authority, hub, 1, 1)  # type: ignore[arg-type]
    stuck_mesh = stuck.mesh
    assert isinstance(stuck_mesh, LateMesh)
    gave_up = _watch("not ready after [discovery] wait_s")

    async def main() -> None:
        stuck_mesh.release.clear()
        stuck_run = asyncio.ensure_future(stuck.run())
        await early.run()
        stuck.request_stop()
        stuck_run.cancel()
        await asyncio.gather(stuck_run, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        logging.getLogger("p2pfl.node").removeHandler(gave_up)
    assert gave_up.event.is_set()
    assert ("send", early.node_id) in hub.events
    assert ("ready", stuck.node_id) not in hub.events


class BlindMesh(LateMesh):
    """Never sees `blind_to` as ready (its ready flags are lost on the way to this node)."""

    blind_to = ""

    def ready(self, node_id: str) -> bool:
        return node_id != self.blind_to and super().ready(node_id)


@pytest.mark.timeout(240)
def test_a_started_neighbour_ends_the_wait(tmp_path: Path) -> None:
    """One node misses a member's ready flag; a neighbour that saw it starts round 1, and its update
    (over a link) starts the blind node long before [discovery] wait_s."""
    authority, hub = FederationAuthority.create(tmp_path / "federation"), EventHub()

    def three(cfg: NodeConfig) -> None:
        cfg.task = replace(cfg.task, num_shards=3)
        cfg.discovery.expect_peers, cfg.discovery.wait_s = 2, 600.0

    nodes = [make_node(tmp_path, authority, hub, i, 2, three) for i in range(3)]  # type: ignore[arg-type]
    blind = nodes[0]
    blind.mesh.__class__ = BlindMesh
    BlindMesh.blind_to = nodes[2].node_id
    started = _watch("a neighbour has started round 1")

    async def main() -> None:
        await asyncio.gather(*(n.run() for n in nodes))

    try:
        asyncio.run(main())
    finally:
        logging.getLogger("p2pfl.node").removeHandler(started)
    assert started.event.is_set()
    assert [r["round"] for r in read_jsonl(blind.cfg.metrics_path)] == [1, 2]
