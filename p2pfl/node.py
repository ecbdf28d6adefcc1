"""The node: the asyncio shell that runs rounds of the round core over a mesh.

A round reads top to bottom in `Node._round`: plan (members -> neighbours) -> train -> pack (encode +
seal) -> publish -> collect (wait for the neighbours' updates) -> mix -> evaluate -> metrics. The
pure steps live in `p2pfl.round.RoundCore`; discovery, brokers and links in the `Mesh` (by default
`p2pfl.mesh.MqttMesh`). Training, crypto and aggregation run in worker threads so the broker and the
neighbour links keep serving while a round computes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from p2pfl import checkpoint, codec, model_file, revocation
from p2pfl.aggregation import MixResult
from p2pfl.attacks import make_attack
from p2pfl.config import NodeConfig, NodeSection
from p2pfl.errors import IdentityError, P2PFLError, Reason, Rejected
from p2pfl.federation import Certificate, FederationRoot
from p2pfl.identity import Identity, load_or_create
from p2pfl.learning import get_params, load_task, set_params, unflatten
from p2pfl.learning.params import flat_view, param_views, share_one_buffer
from p2pfl.learning.privacy import attach_privacy
from p2pfl.linkset import link_targets
from p2pfl.mesh import Mesh, MqttMesh
from p2pfl.metrics import Metrics, RoundSink
from p2pfl.round import CatchUp, Pace, Plan, RoundCore
from p2pfl.topology import parse_topology
from p2pfl.warmup import warm_up

__all__ = ["ModelMismatch", "Node", "TrainingDiverged", "load_credentials", "run_node"]

T = TypeVar("T")

PARENT_PID_ENV = "P2PFL_PARENT_PID"  # set by a launcher (the testbed): stop when that process is gone
PARENT_POLL_S = 1.0
DIVERGED_LOSS = 1e6  # a mean training loss above this (or not finite) stops the node
FINAL_MODEL_FILE = "model.npz"  # the model a node ends with (p2pfl predict / evaluate / export)
BEST_MODEL_FILE = "best_model.npz"  # the round with the best local test accuracy
FIRST_LINKS_S = 10.0  # the longest a node waits for round 1's links before starting it anyway
WARMUP_WAIT_S = 10.0  # the least a round waits before neighbours' usual delays are known (start-up skew)

CPU_STEPS = ("train", "seal", "open", "mix")  # the work a round does, timed in metrics.jsonl

log = logging.getLogger("p2pfl.node")


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """`fn(*args)` and the CPU seconds the calling thread spent on it (run in the worker thread)."""
    start = time.thread_time()
    result = fn(*args)
    return result, time.thread_time() - start


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
    signed = revocation.load(data_dir / revocation.REVOCATION_FILE, root)  # next to federation.pub
    if signed is not None:
        root = signed.apply(root)
    if cert.node_id != identity.node_id or cert.box_key != identity.box_public_bytes:
        raise IdentityError(f"{cert_path} was issued for other keys than the ones in {data_dir}; re-issue it")
    try:
        root.verify(cert)
    except Rejected as exc:
        raise IdentityError(f"own certificate is not valid for this federation: {exc}") from exc
    return identity, cert, root


def _saved_accuracy(path: Path) -> float:
    """The accuracy recorded in a model file from an earlier run (a restarted node keeps its best)."""
    if not path.exists():
        return -1.0
    try:
        accuracy = model_file.load_model(path)[2].get("accuracy")
    except P2PFLError:
        return -1.0
    return float(accuracy) if isinstance(accuracy, (int, float)) else -1.0


class PeersMissing(P2PFLError):
    """Fewer peers than `expect_peers` were reachable in time: starting would mean training alone."""


class TrainingDiverged(P2PFLError):
    """Local training produced a non-finite or exploding loss: going on would only spread it."""


class ModelMismatch(P2PFLError):
    """Every neighbour that spoke sends a model of another shape: this node's [task] disagrees with
    the federation's, and it would only ever train alone."""


MISFIT_REASONS = (Reason.SHAPE_MISMATCH, Reason.DTYPE_MISMATCH, Reason.TOO_MANY_TENSORS)
FIT_CHECK_ROUNDS = 3  # the first rounds in which a node whose model fits no neighbour stops


class Node:
    """A single federation member: the asyncio shell around the round core, over a mesh."""

    def __init__(
        self, cfg: NodeConfig, *, mesh: Mesh | None = None, on_round: RoundSink | None = None
    ) -> None:
        """`on_round(record)` is called in the event loop after each round's metrics record is written
        (the dict of one metrics.jsonl line); an exception in it is logged, never stops the node."""
        self.cfg = cfg
        self.identity, self.cert, self.root = load_credentials(cfg.data_dir)
        self.revocations = revocation.load(cfg.data_dir / revocation.REVOCATION_FILE, self.root)
        if cfg.node.name == NodeSection.name:  # not set: the name the federation certified
            cfg.node.name = self.cert.name
        self.node_id = self.identity.node_id
        self.metrics = Metrics.for_node(cfg, on_round)  # + TensorBoard when [metrics] tensorboard
        attack = make_attack(cfg.attack.kind, cfg.attack.seed) if cfg.attack.kind else None
        self.task = load_task(cfg.task)
        if attack is not None:
            log.warning("BYZANTINE node for experiments: sending %s updates", cfg.attack.kind)
            self.task = attack.poison_task(self.task)
        self.task = attach_privacy(self.task, cfg)  # DP-SGD when [privacy] enabled (else unchanged)
        torch.set_num_threads(cfg.training.threads)
        self.model = self.task.build_model()
        # One-time costs (torch's compiler stack on the first optimizer step, kernels, crypto): paid
        # before the federation waits on us, not in round 1, where neighbours would take them for our pace.
        warm_up(self.task, self.model, self.identity, self.cert, self.root)
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
            staleness=cfg.gossip.staleness,
            silent=cfg.attack.silent,
            compression=cfg.gossip.compression,
            keyframe_every=cfg.gossip.keyframe_every,
        )
        # the model in one buffer: a round's own vector is a view of it, not a model-sized copy
        self._flat = share_one_buffer(self.model)
        if cfg.attack.silent:
            log.warning("SILENT member for experiments: this node never sends an update")
        gossip = cfg.gossip
        self.pace = Pace(
            ceiling_s=gossip.round_timeout_s,
            factor=gossip.wait_factor,
            floor_s=gossip.min_wait_s,
            miss_limit=gossip.miss_limit,
            warmup_floor_s=max(WARMUP_WAIT_S, gossip.min_wait_s),
        )
        self.mesh: Mesh = mesh or MqttMesh(
            cfg,
            identity=self.identity,
            cert=self.cert,
            root=self.root,
            metrics=self.metrics,
            revocations=self.revocations.to_bytes() if self.revocations else None,
            on_revocations=self.adopt_revocations,
        )
        self.changed = asyncio.Event()  # an update arrived or membership may have changed
        self.stopping = asyncio.Event()  # a stop was asked for (signal, parent gone)
        self.checkpoint_path = cfg.data_dir / "checkpoint.npz"
        self.last_eval: tuple[float, float] | None = None  # (accuracy, test loss) of the last round
        self.best_accuracy = _saved_accuracy(cfg.data_dir / BEST_MODEL_FILE)
        self._last_loss: float | None = None  # [gossip] steps_per_round: the last training loss
        self.cpu_s = dict.fromkeys(CPU_STEPS, 0.0)  # this round's CPU seconds per step (metrics)
        self.fits: set[str] = set()  # neighbours whose updates fit our model
        self.misfits: dict[str, str] = {}  # neighbours whose model has another shape -> why
        self._resume()

    def members(self) -> dict[str, Certificate]:
        """Certified peers discovery advertises now, plus ourselves: the input of the topology (a peer
        revoked since its certificate was checked is out at once). No link to them is needed."""
        peers = {n: c for n, c in self.mesh.members().items() if n not in self.root.revoked}
        return {**peers, self.node_id: self.cert}

    # -- revocation ---------------------------------------------------------------------------------

    def adopt_revocations(self, data: bytes, source: str = "peer") -> bool:
        """Take a revocation list from a peer (or the admin) if the root signed it for our federation
        and it is newer than ours: persist it, revoke its ids everywhere, drop those peers.

        Hostile bytes are counted rejections; an older or equal list (every neighbour relays the one
        we hold) is ignored quietly. Returns True when the list was adopted.
        """
        try:
            incoming = revocation.RevocationList.accept(data, self.root)
        except Rejected as exc:
            self.metrics.reject(exc.reason, f"revocation list: {exc.detail}", peer=source)
            return False
        if not incoming.newer_than(self.revocations):
            return False
        try:
            revocation.save(self.cfg.data_dir / revocation.REVOCATION_FILE, incoming)
        except OSError as exc:  # still adopted in memory; the next start reads federation.pub only
            log.error("could not save the revocation list in %s: %s", self.cfg.data_dir, exc)
        self.revocations = incoming
        root = incoming.apply(self.root)
        fresh = sorted(root.revoked - self.root.revoked)
        self._set_root(root, incoming.to_bytes())
        log.warning(
            "revocation list %d from %s adopted: %d node(s) revoked%s",
            incoming.serial,
            source,
            len(root.revoked),
            f", newly {', '.join(fresh)}" if fresh else "",
        )
        if self.node_id in root.revoked:
            log.error("this node's certificate is revoked by the federation admin; stopping")
            self.request_stop()
        self.changed.set()  # membership changed: the round in progress stops waiting on them
        return True

    def reload_revocations(self) -> bool:
        """Adopt the data dir's revocations.bin if it is newer than ours: an admin may copy a new list
        into any running node (once per round is soon enough; its neighbours then relay it)."""
        try:
            with open(self.cfg.data_dir / revocation.REVOCATION_FILE, "rb") as fh:
                data = fh.read(revocation.MAX_REVOCATION_BYTES + 1)
        except OSError:
            return False
        if self.revocations is not None and data == self.revocations.to_bytes():
            return False
        return self.adopt_revocations(data, source=revocation.REVOCATION_FILE)

    def _set_root(self, root: FederationRoot, revocations: bytes) -> None:
        """FederationRoot is immutable: hand the new one to every holder (the round core checks
        updates with it; the mesh checks TLS peers and certificates with it)."""
        self.root = root
        self.core.root = root
        set_root = getattr(self.mesh, "set_root", None)
        if callable(set_root):
            set_root(root, revocations)  # drops revoked peers' links, offers the list to neighbours
        elif isinstance(getattr(self.mesh, "root", None), FederationRoot):
            self.mesh.root = root  # type: ignore[attr-defined]

    # -- receiving ----------------------------------------------------------------------------------

    async def _on_update(self, publisher: str, message: bytes) -> None:
        """Every failure here is a counted, logged rejection; nothing propagates into the link."""
        self.metrics.bytes_in += len(message)
        try:
            (round_, neighbour), cpu = await asyncio.to_thread(
                _timed, self.core.admit, publisher, message, self.members()
            )
            self.cpu_s["open"] += cpu
            self.core.accept(round_, neighbour, time.monotonic())  # it may have gone stale meanwhile
        except Rejected as exc:
            self.metrics.reject(exc.reason, exc.detail, peer=publisher)
            if exc.reason in MISFIT_REASONS and publisher not in self.misfits:
                self.misfits[publisher] = exc.detail
                cert = self.members().get(publisher)
                log.error(
                    "%s sends a model of another shape (%s): every node needs the same [task] model "
                    "settings (name, num_classes / class_names, features, hidden)",
                    cert.name if cert is not None else publisher,
                    exc.detail,
                )
                self.changed.set()  # not worth waiting for any more
            return
        self.fits.add(neighbour.node_id)
        self.misfits.pop(neighbour.node_id, None)  # it was fixed and restarted
        self.pace.heard(neighbour.node_id)  # alive and within the bound: wait for it again
        self.changed.set()

    # -- one round ----------------------------------------------------------------------------------

    async def _collect(self, plan: Plan, started: float) -> float:
        """Wait for the expected neighbours' updates of this round, as long as Pace allows.

        Never waits on a neighbour that is gone, or that missed its last rounds (until it is heard
        again); returns how long the round was allowed to wait.
        """
        while True:
            members = self.mesh.members()
            expected = [
                n
                for n in self.pace.expected(plan.neighbours)
                if n in members and self.mesh.reachable(n) and n not in self.misfits  # it never fits
            ]
            missing = self.core.missing(plan, expected)
            arrivals = [
                t - started
                for n in plan.neighbours
                if (t := self.core.inbox.arrival(n, plan.round)) is not None
            ]
            allowed = self.pace.wait_s(arrivals)
            remaining = started + allowed - time.monotonic()
            if not missing or remaining <= 0:
                return allowed
            await self._wait(min(remaining, 1.0))

    def _note_pace(self, plan: Plan, started: float) -> None:
        for n in plan.neighbours:
            arrived = self.core.inbox.arrival(n, plan.round)
            if arrived is not None:
                self.pace.arrived(n, arrived - started)
            else:
                self.pace.missed(n)

    async def _round(self, round_: int) -> None:
        started = time.monotonic()
        self.reload_revocations()
        plan = self.core.plan(round_, self.members())
        # links to this round's neighbours (and the coming rounds' of a time-varying topology) only
        self.mesh.follow(link_targets(self.core.topology, plan, self.node_id, self.core.seed))
        # [gossip] steps_per_round = k: k gossip exchanges per local training step (a sparse topology
        # averages further per epoch); rounds count exchanges and only every k-th one trains
        k = self.cfg.gossip.steps_per_round
        if (round_ - 1) % k == 0 or self._last_loss is None:
            if hasattr(self.task, "set_round"):  # a learning-rate schedule follows the training round
                self.task.set_round((round_ - 1) // k + 1)
            loss, self.cpu_s["train"] = await asyncio.to_thread(_timed, self.task.train, self.model)
            self._check_loss(round_, loss)
            self._last_loss = loss
        else:  # an exchange-only round: mix the current model again
            loss, self.cpu_s["train"] = self._last_loss, 0.0
        params = param_views(self.model)  # read-only views: only read until set_params below
        own = self.core.flatten(params) if self._flat is None else flat_view(self._flat)
        message, self.cpu_s["seal"] = await asyncio.to_thread(_timed, self.core.pack, params, own, plan)
        if message is not None:
            await self.mesh.publish(message, plan.neighbours)
            self.metrics.bytes_out += len(message) * plan.degree
        allowed = await self._collect(plan, started)
        self._check_model_fits(plan)
        self._note_pace(plan, started)
        jump = self.core.catch_up(plan)
        if jump is not None:
            await self._adopt(plan, jump, loss, started)
            return
        resynced = self.core.resync(plan)
        (result, staleness), self.cpu_s["mix"] = await asyncio.to_thread(_timed, self.core.mix, own, plan)
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
        await asyncio.to_thread(self._persist, round_, result.vector)
        await asyncio.to_thread(self._keep_best, round_, accuracy, test_loss)
        record = self._record(plan, result, staleness, loss, accuracy, test_loss, started)
        self.metrics.write(
            {**record, **self._cpu_record(), "wait_allowed_s": allowed, "resynced_to": resynced}
        )
        log.info(
            "round %d: loss %.4f acc %.4f neighbours %d/%d (%.1f s)",
            round_,
            loss,
            accuracy,
            len(staleness),
            plan.degree,
            time.monotonic() - started,
        )

    async def _adopt(self, plan: Plan, jump: CatchUp, loss: float, started: float) -> None:
        """We were behind: take the neighbours' round and model instead of mixing our stale one."""
        log.warning(
            "round %d: behind the federation; caught up to round %d with the models of %s",
            jump.from_round,
            jump.to_round,
            ", ".join(plan.name(n) for n in jump.sources),
        )
        set_params(self.model, unflatten(jump.vector, self.core.spec))
        accuracy, test_loss = await asyncio.to_thread(self.task.evaluate, self.model)
        await asyncio.to_thread(self._persist, jump.to_round, jump.vector)
        await asyncio.to_thread(self._keep_best, jump.to_round, accuracy, test_loss)
        self.metrics.write(
            {
                **self._base_record(plan, loss, accuracy, test_loss, started),
                "round": jump.to_round,
                "caught_up_from": jump.from_round,
                "adopted_from": [plan.name(n) for n in jump.sources],
            }
        )

    def _cpu_record(self) -> dict[str, float]:
        """CPU seconds of this round's work (train, seal, mix; open: every update opened since the last
        record), so a benchmark can set round time against the work floor. Then start afresh."""
        record = {f"{k}_cpu_s": round(v, 6) for k, v in self.cpu_s.items()}
        self.cpu_s = dict.fromkeys(CPU_STEPS, 0.0)
        return record

    def _check_model_fits(self, plan: Plan) -> None:
        """Stop in the first rounds if neighbours spoke and none sent a model of our shape: then this
        node is the odd one out (one Byzantine member cannot stop a node that has an honest neighbour)."""
        if self.fits or not self.misfits or self.core.ran > FIT_CHECK_ROUNDS:
            return
        examples = "; ".join(f"{plan.name(n)}: {why}" for n, why in list(self.misfits.items())[:3])
        raise ModelMismatch(
            f"no neighbour's model has this node's shape ({examples}); set the same [task] model "
            "settings (name, num_classes or class_names, features, hidden) on every node, then restart"
        )

    def _check_loss(self, round_: int, loss: float) -> None:
        if not math.isfinite(loss) or loss > DIVERGED_LOSS:
            raise TrainingDiverged(
                f"local training diverged in round {round_} (mean loss {loss}); lower [task] lr "
                f"(now {self.cfg.task.lr}) or check the data for extreme values, then restart"
            )

    def _base_record(
        self, plan: Plan, loss: float, accuracy: float, test_loss: float, started: float
    ) -> dict[str, Any]:
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
            "links": self.mesh.links(),  # MQTT links held now: the neighbours (+ static peers)
            "attack": self.cfg.attack.kind or None,
            "epsilon": getattr(self.task, "epsilon", None),  # DP spent so far ([privacy]); None: off
        }

    def _record(
        self,
        plan: Plan,
        result: MixResult,
        staleness: dict[str, int],
        loss: float,
        accuracy: float,
        test_loss: float,
        started: float,
    ) -> dict[str, Any]:
        """One metrics.jsonl line: the round's learning figures and what each neighbour weighed."""
        return {
            **self._base_record(plan, loss, accuracy, test_loss, started),
            "own_weight": result.own_weight,
            "radius": result.radius,
            "missing": [plan.name(n) for n in plan.neighbours if n not in staleness],
            "staleness": {plan.name(n): s for n, s in staleness.items()},
            "neighbours": {
                plan.name(n): {
                    "id": n,
                    "weight": result.weights.get(n, 0.0),
                    "distance": result.distances.get(n),
                    "clipped": result.clipped.get(n, False),
                    "reputation": result.reputation.get(n),
                    "downweighted": result.downweighted.get(n),
                    "staleness": staleness.get(n),
                }
                for n in plan.neighbours
            },
        }

    # -- state on disk ------------------------------------------------------------------------------

    def _persist(self, round_: int, vector: np.ndarray) -> None:
        """Checkpoint (every round, atomically) and, if asked, keep this round's model too."""
        rep = self.core.mixer.reputation
        values, arrays = rep.state() if rep is not None else ({}, {})
        state = checkpoint.Checkpoint(
            round=round_,
            seq=self.core.seq,
            model=vector,
            spec=checkpoint.spec_shapes(self.core.spec),
            reputation=values,
            reputation_arrays=arrays,
            replay=self.core.replay.state(),
        )
        checkpoint.save(self.checkpoint_path, state)
        if self.cfg.metrics.save_models:
            checkpoint.atomic_save_array(self.cfg.data_dir / "models" / f"round_{round_:04d}.npy", vector)

    def _resume(self) -> None:
        """Continue from the last checkpoint, if this data dir has one (then catch up as needed)."""
        state = checkpoint.load(self.checkpoint_path)
        if state is None:
            return
        if state.spec != checkpoint.spec_shapes(self.core.spec):
            raise checkpoint.CheckpointError(
                f"{self.checkpoint_path} holds a model of another shape than [task] {self.cfg.task.name!r} "
                "builds; move it away to start this node from scratch"
            )
        set_params(self.model, unflatten(state.model, self.core.spec))
        self.core.round = state.round
        self.core.seq = max(self.core.seq, state.seq)
        self.core.replay.restore(state.replay)
        rep = self.core.mixer.reputation
        if rep is not None and state.reputation:
            rep.restore(state.reputation, state.reputation_arrays)
        log.info("resuming from the checkpoint of round %d", state.round)

    def _model_meta(self, round_: int, accuracy: float | None, test_loss: float | None) -> dict[str, Any]:
        return {
            **model_file.task_meta(self.task),
            "round": round_,
            "accuracy": accuracy,
            "test_loss": test_loss,
            "node": self.cfg.node.name,
            "node_id": self.node_id,
        }

    def _save_model(self, name: str, round_: int, accuracy: float | None, test_loss: float | None) -> None:
        """A model file `p2pfl predict` / `export` read; a failed save is logged, never ends the node."""
        try:
            model_file.save_model(
                self.cfg.data_dir / name,
                get_params(self.model),
                self.cfg.task,
                self._model_meta(round_, accuracy, test_loss),
            )
        except P2PFLError as exc:
            log.error("could not save %s: %s", name, exc)

    def _keep_best(self, round_: int, accuracy: float, test_loss: float) -> None:
        """best_model.npz: the model of the round with the best local test accuracy so far."""
        self.last_eval = (accuracy, test_loss)
        if accuracy > self.best_accuracy:
            self.best_accuracy = accuracy
            self._save_model(BEST_MODEL_FILE, round_, accuracy, test_loss)

    def save_final_model(self) -> None:
        """The model this node ends with, always: model.npz (for `p2pfl predict` / `export`) and the
        flat model.npy beside the checkpoint."""
        vector = self.core.flatten(get_params(self.model))
        if not np.isfinite(vector).all():
            log.error("the model is not finite; %s keeps the last good one", self.checkpoint_path)
            return
        checkpoint.atomic_save_array(self.cfg.data_dir / "model.npy", vector)
        accuracy, test_loss = self.last_eval if self.last_eval is not None else (None, None)
        self._save_model(FINAL_MODEL_FILE, self.core.round, accuracy, test_loss)

    # -- lifecycle ----------------------------------------------------------------------------------

    async def _wait(self, timeout: float) -> None:
        """Until something changed, `timeout` passes, or a stop is asked for (then raise Cancelled).

        No asyncio.wait_for here: on Python 3.11 it can swallow a cancellation that lands while the
        awaited event fires, and the node would train on after SIGTERM.
        """
        self.changed.clear()
        waiters = [asyncio.ensure_future(self.changed.wait()), asyncio.ensure_future(self.stopping.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if self.stopping.is_set():
            raise asyncio.CancelledError

    async def _wait_for_peers(self) -> None:
        """Start together: until `expect_peers` certified peers are reachable, or `wait_s` passes;
        then too few is an error (a node training alone would look like success), unless
        `start_alone`. A node resuming from a checkpoint rejoins a running federation: it starts
        with whoever it found."""
        want = self.cfg.discovery.expect_peers
        deadline = time.monotonic() + self.cfg.discovery.wait_s
        while len(self.mesh.members()) < want and time.monotonic() < deadline:
            await self._wait(0.5)
        found = len(self.mesh.members())
        if found < want and not self.cfg.discovery.start_alone and self.core.round == 0:
            raise PeersMissing(
                f"found {found} of the {want} peers [discovery] expect_peers asks for within "
                f"{self.cfg.discovery.wait_s:g} s: check that they run, share this federation and can reach "
                f"{self.cfg.node.host} (interfaces {', '.join(self.cfg.discovery.interfaces)}); raise "
                "[discovery] wait_s, or set start_alone = true to start with fewer"
            )
        log.info("starting with %d peer(s) (expected %d)", found, want)

    async def _link_first_neighbours(self) -> None:
        """Open round 1's links before its clock starts: their TLS handshakes are a one-time cost, like
        the warm-up, and in round 1 they would count as this node's pace. Bounded by FIRST_LINKS_S;
        a link still coming up then is waited for by round 1 as before."""
        linked = getattr(self.mesh, "linked", None)
        members = self.members()
        round_ = self.core.round + 1
        names = {n: c.name for n, c in members.items()}
        view = self.core.topology.view(list(members), self.node_id, round_, seed=self.core.seed, names=names)
        plan = Plan(round_, members, tuple(view.neighbours), view.epoch)
        targets = link_targets(self.core.topology, plan, self.node_id, self.core.seed)
        self.mesh.follow(targets)
        deadline = time.monotonic() + FIRST_LINKS_S
        while callable(linked) and not all(linked(n) for n in targets) and time.monotonic() < deadline:
            await self._wait(min(0.5, max(0.0, deadline - time.monotonic())))

    async def _start_together(self, started: float) -> None:
        """Say we are ready, then, on a fresh start, wait until every member says so too (or until a
        neighbour's round-1 update shows the federation has started), up to the end of
        [discovery] wait_s (counted from our start). Nodes finish warming up and certifying
        their peers at different times (minutes apart at 100+ nodes on a busy machine); a node that
        began round 1 early would spend it waiting for the late ones. A resumed node joins at once."""
        await self.mesh.announce_ready()
        if self.core.round > 0:
            return
        deadline = started + self.cfg.discovery.wait_s
        waiting = self._not_ready()
        if waiting:
            log.info("waiting for %d member(s) to be ready for round 1", len(waiting))
        while waiting and self.core.inbox.empty() and time.monotonic() < deadline:
            await self._wait(min(0.5, max(0.0, deadline - time.monotonic())))
            waiting = self._not_ready()
        if waiting and not self.core.inbox.empty():
            # a neighbour started round 1, so it saw everyone ready: its update, sent over a link, is
            # here sooner than the last ready flags over a loaded host's lossy multicast
            log.info("a neighbour has started round 1; starting")
        elif waiting:
            log.warning(
                "starting round 1 while %d member(s) are not ready after [discovery] wait_s = %g s: %s",
                len(waiting),
                self.cfg.discovery.wait_s,
                ", ".join(sorted(waiting)[:8]),
            )

    def _not_ready(self) -> list[str]:
        return [n for n in self.mesh.members() if not self.mesh.ready(n)]

    def _finished(self) -> bool:
        rounds = self.cfg.training.rounds
        return self.stopping.is_set() or (rounds > 0 and self.core.round >= rounds)

    async def start(self) -> None:
        await self.mesh.start(self._on_update, self.changed.set)

    async def stop(self) -> None:
        await self.mesh.stop()

    def request_stop(self) -> None:
        """Ask the node to stop at the next wait (signal handlers and the parent watchdog call it)."""
        self.stopping.set()
        self.changed.set()

    async def run(self) -> None:
        """Start, run rounds until `rounds` (0: until stopped), linger so slower neighbours can fetch
        our last update, save the final model, stop."""
        started = time.monotonic()
        try:
            await self.start()
            await self._wait_for_peers()
            await self._link_first_neighbours()
            await self._start_together(started)
            await self._link_first_neighbours()  # members that arrived meanwhile may change round 1
            while not self._finished():
                await self._round(self.core.round + 1)
            linger_until = time.monotonic() + self.cfg.gossip.linger_s
            while not self.stopping.is_set() and time.monotonic() < linger_until:
                await self._wait(linger_until - time.monotonic())
        except asyncio.CancelledError:
            if not self.stopping.is_set():
                raise  # cancelled from outside, not a stop we were asked for
        finally:
            if self.core.round > 0:  # a node that never trained has no model worth keeping
                await asyncio.shield(asyncio.to_thread(self.save_final_model))
            await self.stop()


async def _watch_parent(node: Node, parent: int) -> None:
    """Stop when the process that launched us is gone (a killed testbed leaves no node behind)."""
    while os.getppid() == parent:
        await asyncio.sleep(PARENT_POLL_S)
    log.warning("parent process %d is gone; stopping", parent)
    node.request_stop()


def run_node(cfg: NodeConfig) -> int:
    """Run a node to completion; SIGTERM and Ctrl-C both stop it cleanly (broker, links, mDNS goodbye).

    The signal only sets a flag that every wait checks (and cancels the main task, for the steps in
    between), so a stop is never lost. Returns the exit status: 0 when every round ran, 143 when
    stopped before.
    """

    async def main() -> bool:
        node = Node(cfg)
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def stop() -> None:
            node.request_stop()
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, stop)
        loop.add_signal_handler(signal.SIGINT, stop)
        parent = os.environ.get(PARENT_PID_ENV, "")
        watchdog = loop.create_task(_watch_parent(node, int(parent))) if parent.isdigit() else None
        try:
            await node.run()
        except asyncio.CancelledError:
            pass  # a signal landed between two waits: node.run() has cleaned up
        finally:
            if watchdog is not None:
                watchdog.cancel()
        return not node.stopping.is_set()

    return 0 if asyncio.run(main()) else 143  # 143: stopped by a signal, not a completed run
