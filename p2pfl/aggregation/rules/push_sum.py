"""Rule "push-sum" (weighted gossip, Kempe et al. 2003), simulator only.

  m_i' = a_i m_i + sum_j w_ij m_j,   x_i' = (a_i m_i x_i + sum_j w_ij m_j x_j) / m_i'

with a_i = 1 - sum_j w_ij. Each node's mass starts at its sample count; x_i' is a convex combination
whose fixed point is the sample-weighted average. The node must keep m_i between rounds and send it
with every update; a neighbour lying about its mass can dominate the mix, so a real node does not
offer it (node_capable = False).
"""

from __future__ import annotations

import math

import numpy as np

from p2pfl.aggregation.base import ManyStep, Neighbour, NodeStep, register
from p2pfl.aggregation.rules.linear import LinearRule


def _valid_mass(m: float | None) -> bool:
    return m is not None and math.isfinite(m) and m >= 0


def _mass_of(nb: Neighbour) -> float:
    return float(nb.samples if nb.mass is None else nb.mass)


@register
class PushSum(LinearRule):
    name = "push-sum"
    summary = "push-sum on masses starting at the sample counts (simulator only: masses are unverifiable)"
    node_capable = False

    def check(self, s: NodeStep) -> None:
        s.own_mass = s.own_samples if s.own_mass is None else s.own_mass
        if s.own_mass is None or not _valid_mass(float(s.own_mass)):
            raise ValueError(f'rule "push-sum" needs own_mass >= 0 (or own_samples), got {s.own_mass!r}')

    def excludes(self, nb: Neighbour) -> bool:
        return not _valid_mass(_mass_of(nb))

    def reweight(self, s: NodeStep, tau: float | None) -> None:
        assert s.own_mass is not None
        weights, usable = s.weights, s.usable
        keep = 1.0 - sum(weights[nb.node_id] for nb in usable)  # missing neighbours' weight stays home
        incoming = sum(weights[nb.node_id] * _mass_of(nb) for nb in usable)
        new_mass = keep * float(s.own_mass) + incoming
        for nb in usable:
            weights[nb.node_id] = weights[nb.node_id] * _mass_of(nb) / new_mass if new_mass > 0 else 0.0
        s.mass = new_mass

    def reweight_many(
        self, m: ManyStep, coef: np.ndarray, tau: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        rows, cols, n = m.rows, m.cols, m.n
        mass = np.asarray(m.samples if m.mass is None else m.mass, dtype=np.float64)
        if mass.shape != (n,):
            raise ValueError('rule "push-sum" needs mass (or samples), one per node')
        ok = np.isfinite(mass) & (mass >= 0)
        coef = np.where(ok[cols], coef, 0.0)
        keep = 1.0 - np.bincount(rows, weights=coef, minlength=n)
        sent = np.where(ok, mass, 0.0)[cols]
        new_mass = keep * mass + np.bincount(rows, weights=coef * sent, minlength=n)
        with np.errstate(divide="ignore", invalid="ignore"):
            coef = np.where(new_mass[rows] > 0, coef * sent / new_mass[rows], 0.0)
        m.new_mass = new_mass
        return coef, coef
