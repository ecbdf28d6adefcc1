"""The node: the asyncio shell that runs rounds of the round core over a mesh.

A round reads top to bottom in `Node._round`: plan (members -> neighbours) -> train -> pack (encode +
seal) -> publish -> collect (wait for the neighbours' updates) -> mix -> evaluate -> metrics. The
pure steps live in `p2pfl.round.RoundCore`; discovery, brokers and links in the `Mesh` (by default
`p2pfl.mesh.MqttMesh`). Training, crypto and aggregation run in worker threads so the broker and the
neighbour links keep serving while a round computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pfl import codec
from p2pfl.aggregation import MixResult
from p2pfl.attacks import make_attack
from p2pfl.config import NodeConfig
from p2pfl.errors import IdentityError, Rejected
from p2pfl.federation import Certificate, FederationRoot
from p2pfl.identity import Identity, load_or_create
from p2pfl.learning import get_params, load_task, set_params, unflatten
from p2pfl.mesh import Mesh, MqttMesh
from p2pfl.metrics import Metrics
from p2pfl.round import Plan, RoundCore
from p2pfl.topology import parse_topology

__all__ = ["Node", "load_credentials", "run_node"]

log = logging.getLogger("p2pfl.node")


def load_credentials(data_dir: Path) -> tuple[Identity, Certificate, FederationRoot]:
    """A node's keys, its certificate and its federation root, consistent with each other."""
    identity = load_or_create(data_dir)
    cert_path, root_path = data_dir / "certificate", data_dir / "federation.pub"
    if not cert_path.exists() or not root_path.exists():
        raise IdentityError(
            f"{data_dir} has no certificate/federation.pub. On the federation admin's machine run "
            f"`p2pfl federation issue NAME --dir FEDERATION_DIR --node-dir {data_dir}`, "
            "or run `python scripts/testbed.py` for a local demo that sets everything up."
        )
    try:
        cert = Certificate.from_bytes(cert_path.read_bytes())
    except Rejected as exc:
        raise IdentityError(f"{cert_path} is not a valid certificate ({exc})") from exc
    root = FederationRoot.load(root_path)
    if cert.node_id != identity.node_id or cert.box_key != identity.box_public_bytes:
        raise IdentityError(f"{cert_path} was issued for other keys than the ones in {data_dir}; re-issue it")
    try:
        root.verify(cert)
    except Rejected as exc:
        raise IdentityError(f"own certificate is not valid for this federation: {exc}") from exc
    return identity, cert, root


class Node:
    """A single federation member: the asyncio shell around the round core, over a mesh."""

    def __init__(self, cfg: NodeConfig, *, mesh: Mesh | None = None) -> None:
        self.cfg = cfg
        self.identity, self.cert, self.root = load_credentials(cfg.data_dir)
        self.node_id = self.identity.node_id
        self.metrics = Metrics(cfg.metrics_path)
        attack = make_attack(cfg.attack.kind, cfg.attack.seed) if cfg.attack.kind else None
        self.task = load_task(cfg.task)
        if attack is not None:
            log.warning("BYZANTINE node for experiments: sending %s updates", cfg.attack.kind)
            self.task = attack.poison_task(self.task)
        torch.set_num_threads(cfg.training.threads)
        self.model = self.task.build_model()
        self.core = RoundCore(
            identity=self.identity,
            cert=self.cert,
            root=self.root,
            topology=parse_topology(cfg.gossip.topology),
            spec=codec.spec_of(get_params(self.model)),
            samples=self.task.num_samples,
            seed=cfg.task.seed,
            rule=cfg.gossip.rule,
            clip_radius=cfg.gossip.clip_radius,
            max_update_bytes=int(cfg.gossip.max_update_mb * (1 << 20)),
            max_skew_s=cfg.security.max_skew_s,
            attack=attack,
        )
        self.mesh: Mesh = mesh or MqttMesh(
            cfg, identity=self.identity, cert=self.cert, root=self.root, metrics=self.metrics
        )
        self.changed = asyncio.Event()  # an update arrived or membership may have changed

    def members(self) -> dict[str, Certificate]:
        """Proven peers we can currently reach, plus ourselves: the input of the topology."""
        return {**self.mesh.members(), self.node_id: self.cert}

    # -- receiving ----------------------------------------------------------------------------------

    async def _on_update(self, publisher: str, message: bytes) -> None:
        """Every failure here is a counted, logged rejection; nothing propagates into the link."""
        self.metrics.bytes_in += len(message)
        try:
            round_, neighbour = await asyncio.to_thread(self.core.admit, publisher, message, self.members())
            self.core.accept(round_, neighbour)  # re-checks the round, which may have closed meanwhile
        except Rejected as exc:
            self.metrics.reject(exc.reason, exc.detail, peer=publisher)
            return
        self.changed.set()

    # -- one round ----------------------------------------------------------------------------------

    async def _collect(self, plan: Plan) -> None:
        """Wait for every neighbour's update of this round, a timeout, or the missing ones to vanish."""
        deadline = time.monotonic() + self.cfg.gossip.round_timeout_s
        while True:
            missing = self.core.missing(plan, self.mesh.members())
            remaining = deadline - time.monotonic()
            if not missing or remaining <= 0:
                if missing:
                    log.warning(
                        "round %d: no update from %s within %.0f s; mixing without them",
                        plan.round,
                        [plan.name(n) for n in missing],
                        self.cfg.gossip.round_timeout_s,
                    )
                return
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=min(remaining, 1.0))

    async def _round(self, round_: int) -> None:
        started = time.monotonic()
        plan = self.core.plan(round_, self.members())
        loss = await asyncio.to_thread(self.task.train, self.model)
        params = get_params(self.model)
        own = self.core.flatten(params)
        message = await asyncio.to_thread(self.core.pack, params, own, plan)
        if message is not None:
            await self.mesh.publish(message, plan.neighbours)
            self.metrics.bytes_out += len(message) * plan.degree
        await self._collect(plan)
        result, missing = await asyncio.to_thread(self.core.mix, own, plan)
        for n, why in result.downweighted.items():
            log.warning(
                "round %d: down-weighting %s (reputation %.2f): %s",
                round_,
                plan.name(n),
                result.reputation.get(n, 0.0),
                why,
            )
        set_params(self.model, unflatten(result.vector, self.core.spec))
        accuracy, test_loss = await asyncio.to_thread(self.task.evaluate, self.model)
        self._save_model(round_, result.vector)
        self.metrics.write(self._record(plan, result, missing, loss, accuracy, test_loss, started))
        log.info(
            "round %d: loss %.4f acc %.4f neighbours %d/%d (%.1f s)",
            round_,
            loss,
            accuracy,
            plan.degree - len(missing),
            plan.degree,
            time.monotonic() - started,
        )

    def _record(
        self,
        plan: Plan,
        result: MixResult,
        missing: list[str],
        loss: float,
        accuracy: float,
        test_loss: float,
        started: float,
    ) -> dict[str, Any]:
        """One metrics.jsonl line: the round's learning figures and what each neighbour weighed."""
        return {
            "round": plan.round,
            "time": time.time(),
            "node": self.cfg.node.name,
            "node_id": self.node_id,
            "train_loss": loss,
            "accuracy": accuracy,
            "test_loss": test_loss,
            "round_s": time.monotonic() - started,
            "epoch": plan.epoch,
            "members": len(plan.members),
            "own_weight": result.own_weight,
            "radius": result.radius,
            "attack": self.cfg.attack.kind or None,
            "missing": [plan.name(n) for n in missing],
            "neighbours": {
                plan.name(n): {
                    "id": n,
                    "weight": result.weights.get(n, 0.0),
                    "distance": result.distances.get(n),
                    "clipped": result.clipped.get(n, False),
                    "reputation": result.reputation.get(n),
                    "downweighted": result.downweighted.get(n),
                }
                for n in plan.neighbours
            },
        }

    def _save_model(self, round_: int, vector: np.ndarray) -> None:
        if self.cfg.metrics.save_models:
            out = self.cfg.data_dir / "models"
            out.mkdir(exist_ok=True)
            np.save(out / f"round_{round_:04d}.npy", vector)

    # -- lifecycle ----------------------------------------------------------------------------------

    async def _wait_for_peers(self) -> None:
        """Start together: until `expect_peers` certified peers are reachable, or `wait_s` passes."""
        want = self.cfg.discovery.expect_peers
        deadline = time.monotonic() + self.cfg.discovery.wait_s
        while len(self.mesh.members()) < want and time.monotonic() < deadline:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=0.5)
        log.info("starting with %d peer(s) (expected %d)", len(self.mesh.members()), want)

    async def start(self) -> None:
        await self.mesh.start(self._on_update, self.changed.set)

    async def stop(self) -> None:
        await self.mesh.stop()

    async def run(self) -> None:
        """Start, run every round, linger so slower neighbours can fetch our last update, stop."""
        try:
            await self.start()
            await self._wait_for_peers()
            for round_ in range(1, self.cfg.training.rounds + 1):
                await self._round(round_)
            await asyncio.sleep(self.cfg.gossip.linger_s)
        finally:
            await self.stop()


def run_node(cfg: NodeConfig) -> None:
    """Run a node to completion; SIGTERM and Ctrl-C both stop it cleanly (broker, links, mDNS goodbye)."""

    async def main() -> None:
        node = Node(cfg)
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await node.run()

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        raise SystemExit(143) from None  # stopped by SIGTERM: not a completed run
