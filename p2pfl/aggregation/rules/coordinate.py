"""Base class of the coordinate-wise rules: per coordinate, the mean of the middle sorted values of
{x_i} U {x_j}. They ignore the MH weights (every vote counts the same) and, on sparse graphs, average
less than gossip even without any attacker; they are the classic robust baselines.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from p2pfl.aggregation.base import ManyResult, ManyStep, MixResult, NodeStep, Rule
from p2pfl.aggregation.mechanics import coordinate_many, coordinate_mix, sparse_step


class CoordinateRule(Rule):
    """Subclasses say which sorted positions [lo, hi) of k votes are averaged (kept_positions).

    MixResult.weights[j] is neighbour j's average coefficient over the coordinates (the share of the
    coordinates where its value was kept, divided by the number of values kept there), so own_weight
    + sum(weights) = 1; clipped[j] is True when that is less than half an equal share (1 / (2k)).
    """

    coordinate_wise = True

    @abstractmethod
    def kept_positions(self, votes: int, trim: int | None) -> tuple[int, int]:
        """[lo, hi) of the sorted values averaged per coordinate, for `votes` values."""

    def mix(self, s: NodeStep) -> MixResult:
        x, weights, clipped = s.x, s.weights, s.clipped
        if not np.isfinite(x).all():  # a broken own model: nothing sensible to sort; leave it (as mix_many)
            return MixResult(x.copy(), 1.0, {nid: 0.0 for nid in weights}, s.distances, clipped, None)
        out, coef = coordinate_mix(
            x, [nb.vector for nb in s.usable], lambda k: self.kept_positions(k, s.trim)
        )
        k = 1 + len(s.usable)
        for nb, c in zip(s.usable, coef[1:], strict=True):
            weights[nb.node_id] = float(c)
            clipped[nb.node_id] = bool(c < 0.5 / k)
        return MixResult(out, float(coef[0]), weights, s.distances, clipped, None)

    def mix_many(self, m: ManyStep) -> ManyResult:
        n, rows = m.n, m.rows
        vectors, coef = coordinate_many(
            m.x, m.src, rows, m.cols, m.usable, lambda k: self.kept_positions(k, m.trim)
        )
        own_weight = 1.0 - np.bincount(rows, weights=coef, minlength=n)
        own_weight[~m.own_finite] = 1.0
        _, _, matrix = sparse_step(coef, rows, m.cols, n, diag=own_weight)
        return ManyResult(vectors, own_weight, None, None, matrix)
