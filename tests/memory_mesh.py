"""An in-memory mesh for unit tests of multi-node logic: several Nodes in one event loop, no sockets.

Delivery is a task per (message, recipient), so updates arrive out of order with the sender's own
work, as they would over MQTT. End-to-end tests run the real `MqttMesh` instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence

from p2pfl.federation import Certificate
from p2pfl.mesh import OnUpdate


class Hub:
    """The 'network': which nodes are up, and their delivery callbacks."""

    def __init__(self) -> None:
        self.meshes: dict[str, MemoryMesh] = {}
        self.delivered = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def mesh(self, cert: Certificate) -> MemoryMesh:
        return MemoryMesh(self, cert)

    def join(self, mesh: MemoryMesh) -> None:
        self.meshes[mesh.cert.node_id] = mesh
        self.changed()

    def leave(self, node_id: str) -> None:
        """A node vanishes (crash, cable): it stops sending and receiving, and peers see it go."""
        self.meshes.pop(node_id, None)
        self.changed()

    def send(self, sender: str, message: bytes, recipients: Sequence[str]) -> None:
        if sender not in self.meshes:
            return
        for r in recipients:
            mesh = self.meshes.get(r)
            if mesh is not None and mesh.on_update is not None:
                task = asyncio.get_running_loop().create_task(mesh.on_update(sender, message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                self.delivered += 1

    def changed(self) -> None:
        for mesh in self.meshes.values():
            mesh.on_change()


class MemoryMesh:
    """The Mesh protocol over a Hub: every node on the hub is a proven member."""

    def __init__(self, hub: Hub, cert: Certificate) -> None:
        self.hub, self.cert = hub, cert
        self.on_update: OnUpdate | None = None
        self.on_change: Callable[[], None] = lambda: None
        self.followed: set[str] = set()  # the peers the node asked to be linked to
        self.is_ready = False  # announced ready for round 1

    def reachable(self, node_id: str) -> bool:
        return node_id in self.hub.meshes

    def follow(self, neighbours: Collection[str]) -> None:
        self.followed = set(neighbours)

    def links(self) -> int:
        return len(self.followed)

    def ready(self, node_id: str) -> bool:
        mesh = self.hub.meshes.get(node_id)
        return mesh is not None and mesh.is_ready

    async def announce_ready(self) -> None:
        self.is_ready = True
        self.hub.changed()

    def members(self) -> dict[str, Certificate]:
        if self.cert.node_id not in self.hub.meshes:
            return {}
        return {nid: m.cert for nid, m in self.hub.meshes.items() if nid != self.cert.node_id}

    async def start(self, on_update: OnUpdate, on_change: Callable[[], None]) -> None:
        self.on_update, self.on_change = on_update, on_change
        self.hub.join(self)

    async def publish(self, message: bytes, recipients: Sequence[str]) -> None:
        self.hub.send(self.cert.node_id, message, recipients)

    async def stop(self) -> None:
        self.hub.leave(self.cert.node_id)
