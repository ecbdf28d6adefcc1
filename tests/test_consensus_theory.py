"""Theory check: with averaging only, consensus distance decays per round like (1 - gap)^2.

For symmetric doubly stochastic W, x_t - mean = W^t (x_0 - mean) and, once the faster modes have
died out, ||x_t - mean||^2 shrinks by lambda_2^2 = (1 - gap)^2 per round. We run the simulator's
gossip (aggregation.mix_many, the vectorised form of the node's aggregation.mix) from random models
and compare the measured per-round decay exponent with -2 ln(1 - gap) (within 10%).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from p2pfl.sim import gossip
from p2pfl.topology import build_graph, mixing_matrix, spectral_gap, topology_gap

CASES = [(name, n) for name in ("ring", "torus", "exponential") for n in (16, 64)]


def _windows(gap: float) -> tuple[int, int]:
    """Rounds where the slowest mode dominates but float32 noise does not: burn in until the
    predicted distance fell 1e-2, measure until it falls another 1e-5."""
    rate = -2.0 * math.log(1.0 - gap)
    start = math.ceil(math.log(1e2) / rate) + 2
    return start, start + math.ceil(math.log(1e5) / rate)


@pytest.mark.parametrize("name, n", CASES)
def test_consensus_distance_decays_at_the_rate_the_gap_predicts(name: str, n: int) -> None:
    w = mixing_matrix(build_graph(name, n))
    gap = spectral_gap(w)
    assert np.allclose(w, w.T)
    start, stop = _windows(gap)
    x0 = np.random.default_rng(n).normal(size=(n, 8))
    _, dist, _ = gossip(x0, name, stop, rule="mean")
    measured = -math.log(dist[stop] / dist[start]) / (stop - start)
    predicted = -2.0 * math.log(1.0 - gap)
    assert measured == pytest.approx(predicted, rel=0.10), (name, n, gap, measured, predicted)
    # and (1 - gap)^(2t) bounds the distance from the start (float32 slack)
    for t in (1, start, stop):
        assert dist[t] <= dist[0] * (1.0 - gap) ** (2 * t) * 1.01 + 1e-9


@pytest.mark.parametrize("n", [16, 64])
def test_one_peer_exponential_averages_exactly_in_log2_n_rounds(n: int) -> None:
    x0 = np.random.default_rng(0).normal(size=(n, 8))
    rounds = int(math.log2(n))
    _, dist, _ = gossip(x0, "one-peer-exponential", rounds)
    assert dist[rounds] < 1e-10 * dist[0]
    assert all(dist[t] > 1e-6 * dist[0] for t in range(rounds)), "not earlier: one peer per round"
    assert topology_gap("one-peer-exponential", n) == 1.0


def test_clipped_gossip_still_reaches_consensus_but_not_faster_than_plain() -> None:
    x0 = np.random.default_rng(3).normal(size=(16, 8))
    _, plain, _ = gossip(x0, "torus", 30, rule="mean")
    _, clipped, _ = gossip(x0, "torus", 30, rule="clipped")
    # adaptive clipping trims the farthest of scattered starting points, so it mixes somewhat slower
    assert clipped[-1] < 1e-4 * clipped[0] and clipped[-1] >= plain[-1] * 0.99
