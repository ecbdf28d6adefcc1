"""Rule "weighted": x_i' = x_i + sum_j w_ij min(1, s_j / s_i) (x_j - x_i), s = sample counts.

The Metropolis-Hastings chain whose stationary distribution is s: s_i p_ij = s_j p_ji, so
sum_i s_i x_i is conserved and averaging converges to the sample-weighted average. Stateless (needs
only the s_j and degrees already in the headers), and a neighbour cannot pull harder than plain MH
whatever sample count it claims. The price: a node with much more data than its neighbours moves
slowly, so the spectral gap shrinks as sizes get more skewed (topology.mixing_matrix(graph, samples)).
"""

from __future__ import annotations

import numpy as np

from p2pfl.aggregation.base import ManyStep, NodeStep, register
from p2pfl.aggregation.rules.linear import LinearRule
from p2pfl.aggregation.weights import sample_accept, sample_accepts


@register
class Weighted(LinearRule):
    name = "weighted"
    summary = "MH chain towards the sample-weighted average (min(1, s_j / s_i) of each MH weight)"

    def check(self, s: NodeStep) -> None:
        if s.own_samples is None:
            raise ValueError('rule "weighted" needs own_samples (this node\'s sample count)')

    def check_many(self, m: ManyStep) -> None:
        if m.samples is None:
            raise ValueError('rule "weighted" needs samples')

    def reweight(self, s: NodeStep, tau: float | None) -> None:
        assert s.own_samples is not None
        for nb in s.usable:
            s.weights[nb.node_id] *= sample_accept(float(s.own_samples), nb.samples)

    def reweight_many(
        self, m: ManyStep, coef: np.ndarray, tau: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        assert m.samples is not None
        s = np.asarray(m.samples, dtype=np.float64)
        coef = coef * sample_accepts(s[m.rows], s[m.cols])
        return coef, coef
