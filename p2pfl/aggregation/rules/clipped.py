"""Rule "clipped": self-centred clipping (ClippedGossip), x_i' = x_i + sum_j w_ij clip(x_j - x_i, tau).

clip(z, tau) = z * min(1, tau / ||z||), centred on the node's own model (He, Karimireddy & Jaggi
2022): one neighbour can move x_i by at most w_ij * tau per round however far away it is, while
neighbours within tau are averaged exactly as plain gossip would. tau is the given radius, or
adaptive (p2pfl.aggregation.weights.adaptive_radius).
"""

from __future__ import annotations

import numpy as np

from p2pfl.aggregation.base import ManyStep, NodeStep, register
from p2pfl.aggregation.rules.linear import LinearRule
from p2pfl.aggregation.weights import adaptive_radii, adaptive_radius


@register
class Clipped(LinearRule):
    name = "clipped"
    summary = "MH gossip with self-centred clipping of every neighbour's difference"
    clips = True

    def radius(self, s: NodeStep) -> float | None:
        if s.radius is not None:
            return float(s.radius)
        return adaptive_radius([s.distances[nb.node_id] for nb in s.usable])

    def radii(self, m: ManyStep) -> np.ndarray | None:
        if m.radius is not None:
            return np.full(m.n, float(m.radius))
        assert m.d is not None
        return adaptive_radii(m.n, m.rows, m.d)
