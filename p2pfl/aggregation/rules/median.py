"""Rule "median": per coordinate, the median of {x_i} U {x_j} (the mean of the middle two for an
even number of votes)."""

from __future__ import annotations

from p2pfl.aggregation.base import register
from p2pfl.aggregation.rules.coordinate import CoordinateRule


@register
class Median(CoordinateRule):
    name = "median"
    summary = "coordinate-wise median of own and neighbour values"

    def kept_positions(self, votes: int, trim: int | None) -> tuple[int, int]:
        lo = (votes - 1) // 2
        return lo, votes // 2 + 1
