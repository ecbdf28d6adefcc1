"""Rule "trimmed-mean": per coordinate, the mean of {x_i} U {x_j} without the b smallest and the b
largest values (b = trim, default min(floor((k-1)/2), ceil(TRIM_FRACTION * k)) for k votes)."""

from __future__ import annotations

from p2pfl.aggregation.base import register
from p2pfl.aggregation.mechanics import trim_count
from p2pfl.aggregation.rules.coordinate import CoordinateRule


@register
class TrimmedMean(CoordinateRule):
    name = "trimmed-mean"
    summary = "coordinate-wise trimmed mean of own and neighbour values"

    def kept_positions(self, votes: int, trim: int | None) -> tuple[int, int]:
        b = trim_count(votes, trim)
        return b, votes - b
