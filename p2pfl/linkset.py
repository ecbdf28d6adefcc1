"""Which peers a node holds MQTT links to: the neighbours its topology gives it, not every member.

Updates are pulled: a node receives a neighbour's update by subscribing, over a link to that
neighbour's broker, to its own inbox there. So the links must cover every neighbour we receive from,
and need cover nothing else (membership comes from signed mDNS advertisements alone, see
`p2pfl.membership`). Connections and broker work then grow with the degree, not with N.

- a static topology: the neighbours of the round just planned;
- a time-varying one (one-peer-exponential): the neighbours of every round of one period from the
  round just planned, so the partner of each coming round is linked before its round starts;
- a link no longer wanted is kept for a grace period (`GRACE_PLANS` plans and `GRACE_S` seconds),
  so a re-plan that drops and re-adds a neighbour (members appearing at start) does not flap it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from p2pfl.round import Plan
from p2pfl.topology import Topology

__all__ = ["GRACE_PLANS", "GRACE_S", "LinkSet", "link_targets", "period"]

GRACE_PLANS = 3  # a link unwanted for fewer plans than this stays open ...
GRACE_S = 5.0  # ... and so does one unwanted for less than this many seconds


def period(topology: Topology, members: int) -> int:
    """Rounds after which a topology's neighbours repeat (1 for a static one): one-peer-exponential
    cycles through ceil(log2 n) hops."""
    if not topology.time_varying:
        return 1
    return max(1, math.ceil(math.log2(max(2, members))))


def link_targets(topology: Topology, plan: Plan, me: str, seed: int) -> set[str]:
    """The peers to hold links to after `plan`: its neighbours, and for a time-varying topology
    those of the rest of the period (computed from the same members, alike on every node)."""
    targets = set(plan.neighbours)
    horizon = period(topology, len(plan.members))
    if horizon > 1:
        members = list(plan.members)
        names = {nid: cert.name for nid, cert in plan.members.items()}
        for round_ in range(plan.round + 1, plan.round + horizon):
            targets.update(topology.view(members, me, round_, seed=seed, names=names).neighbours)
    targets.discard(me)
    return targets


class LinkSet:
    """The peers to keep links to: the latest targets, and earlier ones until their grace ends."""

    def __init__(self, grace_plans: int = GRACE_PLANS, grace_s: float = GRACE_S) -> None:
        self.grace_plans, self.grace_s = grace_plans, grace_s
        self._plans = 0
        self._wanted: dict[str, tuple[int, float]] = {}  # peer -> (plan count, time) last wanted

    def update(self, targets: Iterable[str], now: float) -> set[str]:
        """Record one plan's targets; the set of peers whose links should be open now."""
        self._plans += 1
        for peer in targets:
            self._wanted[peer] = (self._plans, now)
        self._wanted = {
            peer: (plans, when)
            for peer, (plans, when) in self._wanted.items()
            if self._plans - plans < self.grace_plans or now - when < self.grace_s
        }
        return set(self._wanted)

    def forget(self, peers: Iterable[str]) -> None:
        """Drop peers at once, grace or not (revoked)."""
        for peer in peers:
            self._wanted.pop(peer, None)

    def kept(self) -> set[str]:
        return set(self._wanted)
