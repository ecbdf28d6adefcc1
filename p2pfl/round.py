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

Rounds are not lock-step (bounded-staleness synchronous gossip). Each node keeps its own round
counter and, in round r, mixes each neighbour's update for round r, or if none came in time, that
neighbour's newest older update at most `staleness` rounds old (each update once; the staleness of
each is in the metrics). A round
waits only for the neighbours that are expected (not those that missed `miss_limit` rounds in a
row, until they are heard again), and only as long as `Pace` says neighbours usually take, with
`round_timeout_s` as the ceiling. A node that finds most of its neighbours ahead of it (it was
restarted, frozen, or joined late) catches up: it adopts the round and a mix of the models of those
neighbours instead of sending them its stale one. After a partition heals, the two sides have
counted rounds apart; the side behind moves its round counter (not its model) up to the other
side's (`resync`), so each side accepts the other's updates again. A node skips in all at most as
many round numbers as it has run, so no neighbour, lying or honest, can make a counter run away.

The epoch (a hash of the member list) is local bookkeeping: it names the membership view a round
was planned on in the metrics, and is not sent. Two members may briefly disagree about the member
list (one has seen a newcomer, the other not yet); refusing each other's updates then would only
make a round wait for nothing, and the degree in the header already keeps the MH weights right.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from p2pfl import codec
from p2pfl.aggregation import DEFAULT_RULE, MixResult, Neighbour, Reputation, mix
from p2pfl.attacks import Attack
from p2pfl.compression import (
    HEAD,
    MAX_WIRE_TENSORS,
    Compression,
    Estimates,
    OwnEstimate,
    chunk_starts,
    node_key,
    read_wire,
    step,
)
from p2pfl.envelope import Owned, ReplayGuard, UpdateMeta, open_envelope, seal
from p2pfl.errors import Reason, Rejected
from p2pfl.federation import Certificate, FederationRoot
from p2pfl.identity import Identity
from p2pfl.learning.params import flatten, unflatten
from p2pfl.topology import Topology

__all__ = [
    "MAX_ROUNDS_AHEAD",
    "STALENESS",
    "CatchUp",
    "Inbox",
    "Mixer",
    "Pace",
    "Pending",
    "Plan",
    "RoundCore",
    "TensorSpec",
]

STALENESS = 4  # an update at most this many rounds old is still mixed (once)
MAX_ROUNDS_AHEAD = 1 << 40  # a round number no honest node reaches: refused as a round-window lie

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


@dataclass(frozen=True)
class Pending:
    """An admitted update waiting to be mixed: its round and when it arrived (monotonic seconds)."""

    round: int
    neighbour: Neighbour
    arrived: float


MAX_PENDING = 16  # updates kept per neighbour (a neighbour far ahead only needs its newest ones)


@dataclass
class Inbox:
    """Admitted, not yet mixed updates of each neighbour, by round (an update is mixed once).

    In round r a node mixes a neighbour's update for r if it has one, else its newest older one
    within the staleness bound; updates for later rounds wait for their round. So when every update
    arrives in time, rounds mix exactly as lock-step gossip would.

    The event loop files updates while a worker thread mixes (and takes), so every method holds the
    lock: iterating a neighbour's rounds while the other thread files one would raise.
    """

    pending: dict[str, dict[int, Pending]] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def put(self, p: Pending) -> None:
        """File an update (a later one for the same round replaces the earlier)."""
        with self._lock:
            rounds = self.pending.setdefault(p.neighbour.node_id, {})
            rounds[p.round] = p
            while len(rounds) > MAX_PENDING:
                del rounds[min(rounds)]

    def empty(self) -> bool:
        """No update filed yet (the first one from a neighbour means the federation has started)."""
        with self._lock:
            return not self.pending

    def newest(self, node_id: str) -> Pending | None:
        with self._lock:
            rounds = self.pending.get(node_id)
            return rounds[max(rounds)] if rounds else None

    def fresh(self, node_id: str, round_: int) -> bool:
        """Has `node_id` an update for `round_` or a later one waiting?"""
        p = self.newest(node_id)
        return p is not None and p.round >= round_

    def arrival(self, node_id: str, round_: int) -> float | None:
        """When the update of `node_id` that round `round_` would mix arrived (None: none yet)."""
        with self._lock:
            rounds = self.pending.get(node_id, {})
            usable = [r for r in rounds if r >= round_]
            return rounds[min(usable)].arrived if usable else None

    def take(self, node_ids: Iterable[str], round_: int, oldest: int) -> dict[str, Pending]:
        """Remove and return, per neighbour, the update for `round_`, else its newest older one that
        is not older than `oldest`; what it supersedes is dropped, later rounds stay."""
        out = {}
        with self._lock:
            for nid in node_ids:
                rounds = self.pending.get(nid, {})
                usable = [r for r in rounds if oldest <= r <= round_]
                if usable:
                    chosen = max(usable)
                    out[nid] = rounds[chosen]
                    for r in [r for r in rounds if r <= chosen]:
                        del rounds[r]
        return out

    def take_newest(self, node_ids: Iterable[str]) -> dict[str, Pending]:
        """Remove every waiting update of `node_ids` and return the newest of each (a catch-up)."""
        out = {}
        with self._lock:
            for nid in node_ids:
                p = self.newest(nid)
                if p is not None:
                    out[nid] = p
                    del self.pending[nid]
        return out

    def drop_older(self, oldest: int) -> None:
        with self._lock:
            for rounds in self.pending.values():
                for r in [r for r in rounds if r < oldest]:
                    del rounds[r]


class Pace:
    """How long neighbours usually take to deliver a round's update, and who has stopped delivering.

    A round waits for the expected neighbours at most `factor` x the 90th percentile of recent
    arrival delays (at least `floor_s`, at most `ceiling_s` = round_timeout_s). Until `min_history`
    delays were observed (the first rounds, when nodes start apart and warm up), the arrivals of the
    current round count too and the wait is at least `warmup_floor_s`; with no arrival at all, the
    ceiling applies.
    A neighbour that missed `miss_limit` rounds in a row is not waited for until it is heard again.
    """

    def __init__(
        self,
        *,
        ceiling_s: float,
        factor: float = 4.0,
        floor_s: float = 1.0,
        window: int = 32,
        miss_limit: int = 2,
        min_history: int = 8,
        warmup_floor_s: float = 5.0,
    ) -> None:
        self.ceiling_s, self.factor, self.floor_s, self.miss_limit = ceiling_s, factor, floor_s, miss_limit
        self.min_history, self.warmup_floor_s = min_history, warmup_floor_s
        self.delays: deque[float] = deque(maxlen=window)
        self.misses: dict[str, int] = {}

    def heard(self, node_id: str) -> None:
        """Any admitted update proves a neighbour is alive: wait for it again."""
        self.misses.pop(node_id, None)

    def arrived(self, node_id: str, delay_s: float) -> None:
        self.delays.append(max(0.0, delay_s))
        self.heard(node_id)

    def missed(self, node_id: str) -> None:
        self.misses[node_id] = self.misses.get(node_id, 0) + 1

    def expected(self, neighbours: Iterable[str]) -> list[str]:
        return [n for n in neighbours if self.misses.get(n, 0) < self.miss_limit]

    def wait_s(self, current: Sequence[float] = ()) -> float:
        """How long this round may wait for missing neighbours, from its start."""
        warm = len(self.delays) >= self.min_history
        pool = sorted([*self.delays] if warm else [*self.delays, *(max(0.0, d) for d in current)])
        if not pool:
            return self.ceiling_s
        typical = pool[min(len(pool) - 1, math.ceil(0.9 * len(pool)) - 1)]
        floor = self.floor_s if warm else self.warmup_floor_s
        return min(self.ceiling_s, max(floor, self.factor * typical))


@dataclass(frozen=True)
class CatchUp:
    """A node found itself behind: the round it jumps to and the model it adopts."""

    from_round: int
    to_round: int
    vector: np.ndarray
    sources: tuple[str, ...]  # the neighbours whose models were adopted


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
        """One gossip step with the neighbours that arrived (a missing one's weight stays home).

        Only an attack keeps the vectors until the next round (so the step must not overwrite
        them); an honest node lets them go."""
        if self.attack is not None:
            got = [dataclasses.replace(nb, owned=False) for nb in got]
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


def _flat_view(
    params: Mapping[str, np.ndarray], spec: TensorSpec, payload: bytearray | memoryview
) -> np.ndarray | None:
    """The decoded tensors as one float32 vector in the local order without a copy: a view of
    `payload` when they lie in it back to back, in `spec`'s order, all float32; else None."""
    if list(params) != list(spec) or not params:
        return None
    base = np.frombuffer(payload, dtype=np.uint8)
    start = end = base.ctypes.data
    first = True
    for arr in params.values():
        if arr.dtype != np.float32:
            return None
        address = arr.ctypes.data if arr.size else end
        if first:
            start = end = address
            first = False
        if address != end:
            return None
        end = address + arr.nbytes
    offset = start - base.ctypes.data
    if offset < 0 or end - base.ctypes.data > base.size or offset % 4:
        return None
    return np.frombuffer(payload, dtype=np.float32, count=(end - start) // 4, offset=offset)


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
        staleness: int = STALENESS,
        silent: bool = False,
        compression: Compression | str = "none",
        keyframe_every: int = 10,
    ) -> None:
        self.identity, self.cert, self.root = identity, cert, root
        self.node_id = identity.node_id
        self.topology = topology
        self.spec = spec
        self.samples = samples
        self.seed = seed
        self.max_update_bytes = max_update_bytes
        self.staleness = staleness
        self.silent = silent  # experiments: a member that never sends
        self.replay = ReplayGuard(max_skew_s)
        self.mixer = Mixer(
            rule=rule, samples=samples, clip_radius=clip_radius, reputation=Reputation(), attack=attack
        )
        self.inbox = Inbox()
        self.round = 0
        self.ran = 0  # rounds this process entered, and round numbers it skipped by resync: the
        self.skipped = 0  # skips never outnumber the rounds run
        self.seq = time.time_ns() // 1000  # monotonic across restarts: receivers never see a reused seq
        self.compression = (
            compression if isinstance(compression, Compression) else Compression.parse(compression)
        )
        sizes = [math.prod(shape) for shape, _ in spec.values()]
        self.dim = sum(sizes)
        starts = chunk_starts(self.compression, self.dim, sizes)
        self.starts = starts
        # compressed updates: our public estimate (a new process starts with a keyframe) and our
        # neighbours' (rebuilt from their keyframes after a restart)
        self.own_estimate = OwnEstimate(
            self.compression, node_key(self.node_id, seed), starts, keyframe_every
        )
        self.estimates = Estimates(self.compression)

    # -- plan ---------------------------------------------------------------------------------------

    def plan(self, round_: int, members: Mapping[str, Certificate]) -> Plan:
        """Enter `round_` and derive its neighbours from the current members (self included)."""
        self.round = round_
        self.ran += 1
        everyone = {**members, self.node_id: self.cert}
        names = {nid: c.name for nid, c in everyone.items()}
        view = self.topology.view(list(everyone), self.node_id, round_, seed=self.seed, names=names)
        return Plan(round_, everyone, tuple(view.neighbours), view.epoch)

    # -- pack ---------------------------------------------------------------------------------------

    def flatten(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
        """A parameter dict as one vector in the local spec's order (whatever order it came in)."""
        return flatten({name: params[name] for name in self.spec})

    def pack(self, params: Mapping[str, np.ndarray], own: np.ndarray, plan: Plan) -> bytes | None:
        """The sealed update for this round's neighbours; None when the round has no neighbour.

        The tensors are sealed chunk by chunk straight from `params` (codec.frame): the encoded
        frame never exists whole, so packing holds the message and nothing else of the model's size."""
        if not plan.neighbours or self.silent:
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
        if self.compression.enabled:
            vector = own if crafted is None else crafted
            message = seal(codec.frame(self.own_estimate.pack(vector, plan.round)), meta, self.identity, keys)
        else:
            message = seal(codec.frame(sent), meta, self.identity, keys)
        # a bytearray (sealed in place); Mesh.publish is annotated bytes and reads it as a buffer
        return cast(bytes, message)

    # -- admit --------------------------------------------------------------------------------------

    def admit(
        self, publisher: str, message: bytes | bytearray | memoryview, members: Mapping[str, Certificate]
    ) -> tuple[int, Neighbour]:
        """Open, check and flatten one update; (its round, the neighbour) or Rejected with the reason.

        `members` is the caller's snapshot of who is certified and reachable. Updates from rounds
        ahead of ours are admitted: they are how a node that fell behind learns it did.
        An `Owned` message (the link's, held by nobody else) is decrypted in place, and when
        its tensors already lie in the local order as one float32 run, the neighbour's vector is a
        view of that same memory: an update is then held once from arrival to mixing.
        """
        meta, payload = open_envelope(
            message,
            self.identity,
            self.root,
            members.get,
            self.replay,
            max_bytes=self.max_update_bytes,
            in_place=isinstance(message, Owned),
        )
        if meta.sender != publisher:
            raise Rejected(
                Reason.UNKNOWN_SENDER, f"update signed by {meta.sender} arrived on {publisher}'s topic"
            )
        if self.compression.enabled:
            return meta.round, Neighbour(
                meta.sender,
                self._admit_compressed(meta.sender, meta.round, payload),
                max(meta.degree, 1),
                meta.samples,
            )
        self.check_round(meta.round)
        params = self._decode_plain(payload)
        vector = _flat_view(params, self.spec, payload)
        if vector is None:
            vector = self.flatten(params)
        return meta.round, Neighbour(meta.sender, vector, max(meta.degree, 1), meta.samples, owned=True)

    def _decode_plain(self, payload: bytes | bytearray | memoryview) -> Mapping[str, np.ndarray]:
        """An uncompressed update's tensors, checked against the local model (a compressed frame is
        refused as a compression mismatch, which says what to change)."""
        try:
            params = codec.decode(payload, expected_tensors=len(self.spec))
            codec.check_against(params, self.spec)
        except Rejected as exc:
            if exc.reason in (Reason.TOO_MANY_TENSORS, Reason.SHAPE_MISMATCH, Reason.DTYPE_MISMATCH):
                self._refuse_compressed(payload)
            raise
        return params

    def _refuse_compressed(self, payload: bytes | bytearray | memoryview) -> None:
        try:
            arrays = codec.decode(payload, max_tensors=MAX_WIRE_TENSORS)
        except Rejected:
            return
        if HEAD in arrays:
            raise Rejected(
                Reason.COMPRESSION,
                "update is compressed, this node uses compression 'none'; every node of a federation "
                "needs the same [gossip] compression",
            )

    def _admit_compressed(
        self, sender: str, round_: int, payload: bytes | bytearray | memoryview
    ) -> np.ndarray:
        """Check and decode a compressed update, fold it into the sender's estimate (before the
        staleness check: a diff chain needs every message), and return the estimate to mix."""
        if round_ > MAX_ROUNDS_AHEAD:
            self.check_round(round_)
        arrays = codec.decode(payload, max_tensors=max(MAX_WIRE_TENSORS, len(self.spec)))
        message = read_wire(self.compression, arrays, self.dim, self.starts)
        vector = self.estimates.apply(sender, round_, message)
        self.check_round(round_)
        return vector

    def check_round(self, round_: int) -> None:
        """Refuse an update older than the staleness bound (also re-checked after opening)."""
        if round_ < self.round - self.staleness:
            raise Rejected(
                Reason.LATE,
                f"update for round {round_} is more than {self.staleness} rounds behind our round {self.round}",
            )
        if round_ > MAX_ROUNDS_AHEAD:
            raise Rejected(Reason.ROUND_WINDOW, f"update for round {round_}: no federation gets that far")

    def accept(self, round_: int, neighbour: Neighbour, arrived: float) -> None:
        """File an admitted update, unless it went stale while it was being opened."""
        self.check_round(round_)
        self.inbox.put(Pending(round_, neighbour, arrived))

    def missing(self, plan: Plan, expected: Iterable[str]) -> list[str]:
        """Expected neighbours whose update for this round (or a later one) has not arrived."""
        return [n for n in expected if not self.inbox.fresh(n, plan.round)]

    # -- catch up -----------------------------------------------------------------------------------

    def catch_up(self, plan: Plan) -> CatchUp | None:
        """Jump ahead when most neighbours that sent something are more than `staleness` rounds ahead
        (then our updates are too stale for them: we would only train alone). A few rounds of lag are
        normal jitter, which mixing within the staleness bound absorbs.

        The target is the lower median of their rounds (one neighbour lying about its round cannot
        drag a node with honest neighbours forward); the adopted model is the mean of the models of
        the neighbours at or beyond it (coordinate-wise median from three on). Their updates are
        consumed: they were not mixed against a stale model, and reputation saw no distance.
        """
        waiting = {n: p for n in plan.neighbours if (p := self.inbox.newest(n)) is not None}
        ahead = sorted((p.round, n) for n, p in waiting.items() if p.round > plan.round + self.staleness)
        if 2 * len(ahead) <= len(waiting):
            return None
        target = ahead[(len(ahead) - 1) // 2][0]
        sources = tuple(n for r, n in ahead if r >= target)
        stack = np.stack([waiting[n].neighbour.vector for n in sources])
        vector = stack.mean(axis=0) if len(sources) < 3 else np.median(stack, axis=0)
        vector = np.asarray(vector, dtype=np.float32)
        self.inbox.take_newest(sources)
        self.own_estimate.force_keyframe = True  # our model jumps: neighbours get it whole
        self.round = target
        self.inbox.drop_older(target - self.staleness)
        if self.mixer.reputation is not None:
            self.mixer.reputation.remember_output(vector)  # our next step is measured from here
        return CatchUp(plan.round, target, vector, sources)

    def resync(self, plan: Plan) -> int | None:
        """Move the round counter (not the model) up to a neighbour beyond the staleness bound.

        After a partition heals, each side has counted its own rounds; the side that counted fewer
        sends updates the other refuses as too stale, while its models are as current as theirs. So
        a node with a neighbour more than `staleness` rounds ahead (and no majority ahead, or it
        would catch up instead) skips to just below that neighbour's round: its next update is for
        the same round as the neighbour's. Skips are budgeted: in all, a node skips at most as many
        round numbers as it has run, so a neighbour lying about its round can at most double a
        node's pace, and honest nodes following each other cannot make counters run away.
        Returns the new round, or None.
        """
        furthest = max(
            (p.round for n in plan.neighbours if (p := self.inbox.newest(n)) is not None), default=0
        )
        budget = self.ran - self.skipped
        if furthest - plan.round <= self.staleness or budget <= 0:
            return None
        step = min(furthest - 1 - plan.round, budget)
        self.skipped += step
        self.round = plan.round + step
        return self.round

    # -- mix ----------------------------------------------------------------------------------------

    def mix(self, own: np.ndarray, plan: Plan) -> tuple[MixResult, dict[str, int]]:
        """Mix each neighbour's update for this round (else its newest older one within the bound).

        Returns the result and the staleness (our round - its round) of each neighbour mixed; a
        neighbour not in it contributed nothing and its weight stayed home.
        """
        taken = self.inbox.take(plan.neighbours, plan.round, oldest=plan.round - self.staleness)
        got = [taken[n].neighbour for n in plan.neighbours if n in taken]
        staleness = {n: plan.round - p.round for n, p in taken.items()}
        if not self.compression.enabled:
            return self.mixer.mix(own, plan.degree, got), staleness
        # compressed: the rule runs on the public estimates, the model takes gamma x that step
        estimate = self.own_estimate.estimate
        estimate = own if estimate is None else estimate
        result = self.mixer.mix(estimate, plan.degree, got)
        moved = step(own, estimate, result.vector, self.compression.gamma)
        return dataclasses.replace(result, vector=moved), staleness
