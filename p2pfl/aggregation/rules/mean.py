"""Rule "mean": plain Metropolis-Hastings gossip, x_i' = x_i + sum_j w_ij (x_j - x_i)."""

from __future__ import annotations

from p2pfl.aggregation.base import register
from p2pfl.aggregation.rules.linear import LinearRule


@register
class Mean(LinearRule):
    name = "mean"
    summary = "plain Metropolis-Hastings gossip (trusts every neighbour)"
