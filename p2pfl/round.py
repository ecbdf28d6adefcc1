"""The gossip round, sans IO: plan -> pack -> admit -> mix, written once.

The node (asyncio, brokers, discovery), the simulator's per-node path and `scripts/bench_round.py`
all drive this one copy; nothing here waits, sleeps or touches a socket, so every step is a plain
function call that a unit test (or an in-memory mesh) can make directly.

One round at node i:

  plan   members (certified, reachable ids) + topology + seed + round -> neighbours, degree, epoch
  pack   own parameters -> codec.encode -> envelope.seal for the neighbours' box keys (an attacker
         in an experiment crafts its vector first)
  admit  a message from a neighbour's broker -> open (signature, recipient, replay, digests) ->
         round window -> decode -> check against the local tensor spec -> flatten in LOCAL order
  mix    own vector + the admitted neighbours of this round -> the aggregation rule (with the
         node's reputation record) -> the new own vector

The epoch (a hash of the member list) is local bookkeeping: it names the membership view a round
was planned on in the metrics, and is not sent. Two members may briefly disagree about the member
list (one has seen a newcomer, the other not yet); refusing each other's updates then would only
make a round wait for nothing, and the degree in the header already keeps the MH weights right.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from p2pfl import codec
from p2pfl.aggregation import DEFAULT_RULE, MixResult, Neighbour, Reputation, mix
from p2pfl.attacks import Attack
from p2pfl.envelope import ReplayGuard, UpdateMeta, open_envelope, seal
from p2pfl.errors import Reason, Rejected
from p2pfl.federation import Certificate, FederationRoot
from p2pfl.identity import Identity
from p2pfl.learning.params import flatten, unflatten
from p2pfl.topology import Topology

__all__ = ["ROUNDS_AHEAD", "Inbox", "Mixer", "Plan", "RoundCore", "TensorSpec"]

ROUNDS_AHEAD = 2  # a neighbour may run this many rounds ahead of us; its updates wait in the inbox

TensorSpec = Mapping[str, tuple[tuple[int, ...], np.dtype]]


@dataclass(frozen=True)
class Plan:
    """What one node derives for one round from the members it can reach: alike on every node."""

    round: int
    members: Mapping[str, Certificate]  # node id -> certificate, the node itself included
    neighbours: tuple[str, ...]  # sorted node ids
    epoch: str  # names the member list (topology.epoch_id)

    @property
    def degree(self) -> int:
        return len(self.neighbours)

    def name(self, node_id: str) -> str:
        cert = self.members.get(node_id)
        return cert.name if cert is not None else node_id


@dataclass
class Inbox:
    """Admitted updates by round: the newest per neighbour, until the round is closed."""

    updates: dict[int, dict[str, Neighbour]] = field(default_factory=dict)

    def put(self, round_: int, neighbour: Neighbour) -> None:
        self.updates.setdefault(round_, {})[neighbour.node_id] = neighbour

    def of(self, round_: int) -> Mapping[str, Neighbour]:
        return self.updates.get(round_, {})

    def close(self, round_: int) -> dict[str, Neighbour]:
        """Take this round's updates and forget everything older."""
        taken = self.updates.pop(round_, {})
        for old in [r for r in self.updates if r <= round_]:
            del self.updates[old]
        return taken


class Mixer:
    """One node's mixing step and what it keeps across rounds: rule, reputation, and (experiments
    only) the attack with what it last heard. The node's core and the simulator's nodes use it alike.
    """

    def __init__(
        self,
        *,
        rule: str = DEFAULT_RULE,
        samples: int = 1,
        clip_radius: float | None = None,
        reputation: Reputation | None = None,
        attack: Attack | None = None,
        trim: int | None = None,
    ) -> None:
        self.rule = rule
        self.samples = samples
        self.clip_radius = clip_radius or None
        self.reputation = reputation
        self.attack = attack
        self.trim = trim
        self.heard: list[np.ndarray] = []  # last round's neighbour vectors (only an attack uses them)

    def craft(self, own: np.ndarray, round_: int) -> np.ndarray | None:
        """What a Byzantine node sends instead of its model this round; None for an honest node."""
        return None if self.attack is None else self.attack.craft(own, self.heard, round_)

    def mix(
        self, own: np.ndarray, degree: int, got: Sequence[Neighbour], *, own_mass: float | None = None
    ) -> MixResult:
        """One gossip step with the neighbours that arrived (a missing one's weight stays home)."""
        self.heard = [nb.vector for nb in got]
        return mix(
            own,
            degree,
            got,
            self.rule,
            self.clip_radius,
            own_samples=self.samples,
            own_mass=own_mass,
            reputation=self.reputation,
            trim=self.trim,
        )


class RoundCore:
    """One node's round logic and the state it keeps across rounds (seq, replay, reputation).

    `round` is the round being played; `admit` may run in a worker thread while the loop plays it
    (it only reads `round`, and the replay guard locks itself).
    """

    def __init__(
        self,
        *,
        identity: Identity,
        cert: Certificate,
        root: FederationRoot,
        topology: Topology,
        spec: TensorSpec,
        samples: int,
        seed: int = 0,
        rule: str = DEFAULT_RULE,
        clip_radius: float | None = None,
        max_update_bytes: int = 1 << 30,
        max_skew_s: float = 300.0,
        attack: Attack | None = None,
    ) -> None:
        self.identity, self.cert, self.root = identity, cert, root
        self.node_id = identity.node_id
        self.topology = topology
        self.spec = spec
        self.samples = samples
        self.seed = seed
        self.max_update_bytes = max_update_bytes
        self.replay = ReplayGuard(max_skew_s)
        self.mixer = Mixer(
            rule=rule, samples=samples, clip_radius=clip_radius, reputation=Reputation(), attack=attack
        )
        self.inbox = Inbox()
        self.round = 0
        self.seq = time.time_ns() // 1000  # monotonic across restarts: receivers never see a reused seq

    # -- plan ---------------------------------------------------------------------------------------

    def plan(self, round_: int, members: Mapping[str, Certificate]) -> Plan:
        """Enter `round_` and derive its neighbours from the current members (self included)."""
        self.round = round_
        everyone = {**members, self.node_id: self.cert}
        names = {nid: c.name for nid, c in everyone.items()}
        view = self.topology.view(list(everyone), self.node_id, round_, seed=self.seed, names=names)
        return Plan(round_, everyone, tuple(view.neighbours), view.epoch)

    # -- pack ---------------------------------------------------------------------------------------

    def flatten(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
        """A parameter dict as one vector in the local spec's order (whatever order it came in)."""
        return flatten({name: params[name] for name in self.spec})

    def pack(self, params: Mapping[str, np.ndarray], own: np.ndarray, plan: Plan) -> bytes | None:
        """The sealed update for this round's neighbours; None when the round has no neighbour."""
        if not plan.neighbours:
            return None
        crafted = self.mixer.craft(own, plan.round)
        sent = params if crafted is None else unflatten(crafted, self.spec)
        self.seq += 1
        meta = UpdateMeta(
            sender=self.node_id,
            federation=self.root.federation_id,
            round=plan.round,
            seq=self.seq,
            timestamp=time.time(),
            samples=self.samples,
            degree=plan.degree,
        )
        keys = {n: plan.members[n].box_key for n in plan.neighbours}
        return seal(codec.encode(sent), meta, self.identity, keys)

    # -- admit --------------------------------------------------------------------------------------

    def admit(
        self, publisher: str, message: bytes | bytearray | memoryview, members: Mapping[str, Certificate]
    ) -> tuple[int, Neighbour]:
        """Open, check and flatten one update; (its round, the neighbour) or Rejected with the reason.

        `members` is the caller's snapshot of who is certified and reachable.
        """
        meta, payload = open_envelope(
            message, self.identity, self.root, members.get, self.replay, max_bytes=self.max_update_bytes
        )
        if meta.sender != publisher:
            raise Rejected(
                Reason.UNKNOWN_SENDER, f"update signed by {meta.sender} arrived on {publisher}'s topic"
            )
        self.check_round(meta.round)
        params = codec.decode(payload)
        codec.check_against(params, self.spec)
        return meta.round, Neighbour(meta.sender, self.flatten(params), max(meta.degree, 1), meta.samples)

    def check_round(self, round_: int) -> None:
        """Refuse an update for a round already closed or too far ahead (also re-checked after opening)."""
        if round_ < self.round:
            raise Rejected(Reason.LATE, f"update for round {round_} arrived in round {self.round}")
        if round_ > self.round + ROUNDS_AHEAD:
            raise Rejected(Reason.ROUND_WINDOW, f"update for round {round_}, we are in round {self.round}")

    def accept(self, round_: int, neighbour: Neighbour) -> None:
        """File an admitted update, unless its round closed while it was being opened."""
        self.check_round(round_)
        self.inbox.put(round_, neighbour)

    def missing(self, plan: Plan, reachable: Sequence[str] | Mapping[str, object]) -> list[str]:
        """Neighbours still reachable whose update for the round has not arrived."""
        have = self.inbox.of(plan.round)
        return [n for n in plan.neighbours if n not in have and n in reachable]

    # -- mix ----------------------------------------------------------------------------------------

    def mix(self, own: np.ndarray, plan: Plan) -> tuple[MixResult, list[str]]:
        """Close the round's inbox and mix; (the result, the neighbours that did not arrive)."""
        received = self.inbox.close(plan.round)
        got = [received[n] for n in plan.neighbours if n in received]
        result = self.mixer.mix(own, plan.degree, got)
        return result, [n for n in plan.neighbours if n not in received]
