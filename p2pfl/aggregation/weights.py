"""The weight formulas of gossip, each in one place (scalar form for one node, vectorised for all).

- Metropolis-Hastings weight of edge (i, j): w_ij = 1 / (1 + max(deg_i, deg_j)); symmetric, so W is
  doubly stochastic for any undirected graph (p2pfl.topology.mixing_matrix uses it too).
- sample acceptance of rule "weighted": min(1, s_j / s_i), 1 when s_i <= 0.
- the reference distance of the clipping rules: the upper median of {0 (the node itself)} U {the
  finite neighbour distances}; the adaptive radius is ADAPTIVE_SLACK times it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

ADAPTIVE_SLACK = 1.5  # tau = slack * median distance: see adaptive_radius


def mh_weight(deg_i: int, deg_j: int) -> float:
    """Metropolis-Hastings weight of edge (i, j); never more than 1/(1+deg_i), whatever j claims."""
    return 1.0 / (1.0 + max(int(deg_i), int(deg_j), 0))


def mh_weights(deg_i: np.ndarray, deg_j: np.ndarray) -> np.ndarray:
    """mh_weight for arrays of degrees (element-wise, float64)."""
    return 1.0 / (1.0 + np.maximum(deg_i, np.maximum(deg_j, 0)))


def sample_accept(own_samples: float, their_samples: float) -> float:
    """min(1, s_j / s_i): how much of the MH weight a neighbour gets under rule "weighted".

    A node without data (s_i <= 0) takes its neighbours fully; a neighbour without data pulls not at all.
    """
    s_i, s_j = max(float(own_samples), 0.0), max(float(their_samples), 0.0)
    return 1.0 if s_i <= 0 else min(1.0, s_j / s_i)


def sample_accepts(own_samples: np.ndarray, their_samples: np.ndarray) -> np.ndarray:
    """sample_accept for arrays of sample counts (element-wise, float64)."""
    s_i = np.maximum(np.asarray(own_samples, dtype=np.float64), 0.0)
    s_j = np.maximum(np.asarray(their_samples, dtype=np.float64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s_i <= 0, 1.0, np.minimum(1.0, s_j / s_i))


def upper_median(values: Iterable[float]) -> float:
    """The upper median of a non-empty collection: sorted(values)[len // 2]."""
    votes = sorted(values)
    return votes[len(votes) // 2]


def median_reference(distances: Iterable[float]) -> float:
    """Upper median of {0 (the node itself)} U {the finite neighbour distances}.

    Counting the node itself as one vote at distance 0 keeps the median an honest distance as long
    as fewer than half of the votes are outliers, also on a ring (votes 0, d1, d2 -> the nearer
    neighbour).
    """
    return upper_median([0.0, *(d for d in distances if math.isfinite(d))])


def median_references(n: int, rows: np.ndarray, d: np.ndarray) -> np.ndarray:
    """median_reference at every node: node i's distances are d[k] for the edges k with rows[k] == i."""
    finite = np.isfinite(d)
    r, dist = rows[finite], d[finite]
    order = np.lexsort((dist, r))
    r, dist = r[order], dist[order]
    counts = np.bincount(r, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    k = (counts + 1) // 2  # index in the sorted votes [0, d_1 <= ... <= d_c]; 0 is the node itself
    med = np.zeros(n)
    has = k > 0
    med[has] = dist[starts[has] + k[has] - 1]
    return med


def adaptive_radius(distances: Sequence[float]) -> float:
    """ADAPTIVE_SLACK x median_reference(distances): the clipping radius of rule "clipped".

    The slack lets honest neighbours somewhat farther than the median through unclipped, so without
    outliers the step is usually exactly plain gossip; a far outlier's pull is bounded by
    w_ij * slack * (a typical honest distance). This is the simple practical stand-in for the
    ClippedGossip paper's adaptive tau (clip the farthest delta-fraction of the weight), which needs
    a known bound delta on the outliers' weight.
    """
    return ADAPTIVE_SLACK * median_reference(distances)


def adaptive_radii(n: int, rows: np.ndarray, d: np.ndarray) -> np.ndarray:
    """adaptive_radius at every node (see median_references)."""
    return ADAPTIVE_SLACK * median_references(n, rows, d)
