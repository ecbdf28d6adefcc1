"""Gossip averaging on flat float32 vectors, plain or with self-centred clipping (ClippedGossip).

One gossip step at node i with the neighbour models x_j that arrived this round:

  mean:     x_i' = x_i + sum_j w_ij (x_j - x_i)                  = (1 - sum_j w_ij) x_i + sum_j w_ij x_j
  clipped:  x_i' = x_i + sum_j w_ij clip(x_j - x_i, tau),  clip(z, tau) = z * min(1, tau / ||z||)

with Metropolis-Hastings weights w_ij = 1/(1+max(deg_i, deg_j)). A neighbour that did not arrive
contributes nothing and its weight stays on x_i. Clipping is centred on the node's own model
(He, Karimireddy & Jaggi 2022, "Byzantine-robust decentralized learning via ClippedGossip"): one
neighbour can move x_i by at most w_ij * tau per round however far away it is, while neighbours
within tau are averaged exactly as plain gossip would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from p2pfl.errors import ConfigError

RULES = ("clipped", "mean")
ADAPTIVE_SLACK = 1.5  # tau = slack * median distance: see _adaptive_radius
_NORM_CHUNK = 1 << 20


def mh_weight(deg_i: int, deg_j: int) -> float:
    """Metropolis-Hastings weight of edge (i, j); never more than 1/(1+deg_i), whatever j claims."""
    return 1.0 / (1.0 + max(int(deg_i), int(deg_j), 0))


@dataclass(frozen=True)
class Neighbour:
    """One neighbour's model this round, as received (vector is the flattened float32 model)."""

    node_id: str
    vector: np.ndarray
    degree: int
    samples: int


@dataclass(frozen=True)
class MixResult:
    """The mixed vector plus what the metrics and reputation need.

    weights are the MH weights w_ij; a clipped neighbour's actual pull is
    weights[j] * min(1, radius / distances[j]). own_weight = 1 - sum(weights).
    radius is None for the "mean" rule.
    """

    vector: np.ndarray
    own_weight: float
    weights: dict[str, float]
    distances: dict[str, float]
    clipped: dict[str, bool]
    radius: float | None


def _norm(v: np.ndarray) -> float:
    """Euclidean norm of a float32 vector without float32 overflow for huge (hostile) values."""
    with np.errstate(over="ignore", invalid="ignore"):
        s = float(np.dot(v, v))
    if math.isfinite(s):
        return math.sqrt(s)
    total = 0.0
    for start in range(0, v.size, _NORM_CHUNK):
        c = v[start : start + _NORM_CHUNK].astype(np.float64)
        total += float(np.dot(c, c))
    return math.sqrt(total)


def _adaptive_radius(distances: Sequence[float]) -> float:
    """ADAPTIVE_SLACK x the median of {0 (the node itself)} U {neighbour distances} (upper median).

    Counting the node itself as one vote at distance 0 keeps the median an honest distance as long
    as fewer than half of the votes are outliers, also on a ring (votes 0, d1, d2 -> the nearer
    neighbour). The slack lets honest neighbours somewhat farther than the median through
    unclipped, so without outliers the step is usually exactly plain gossip; a far outlier's pull
    is bounded by w_ij * slack * (a typical honest distance). This is the simple practical stand-in
    for the paper's adaptive tau (clip the farthest delta-fraction of the weight), which needs a
    known bound delta on the outliers' weight.
    """
    votes = sorted([0.0, *distances])
    return ADAPTIVE_SLACK * votes[len(votes) // 2]


def mix(
    own: np.ndarray,
    own_degree: int,
    neighbours: Sequence[Neighbour],
    rule: str = "clipped",
    radius: float | None = None,
) -> MixResult:
    """One gossip step of `own` with the neighbours that arrived (see the module docstring).

    own_degree is this node's degree in the current topology (raised to len(neighbours) if smaller,
    so the own weight never goes negative). radius None with rule "clipped" means adaptive
    (_adaptive_radius). A neighbour with non-finite values, or whose difference from own overflows
    float32, is ignored (weight 0 so it stays home, distance inf, clipped True). Works in float32 with two P-sized buffers whatever the number of neighbours.
    """
    if rule not in RULES:
        raise ConfigError(f"unknown aggregation rule {rule!r}; known: {', '.join(RULES)}")
    if radius is not None and not (radius >= 0):  # also refuses NaN
        raise ConfigError(f"clipping radius must be >= 0, got {radius!r}")
    x = np.asarray(own, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"own vector must be flat, got shape {x.shape}")
    ids = [nb.node_id for nb in neighbours]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate neighbour ids: {ids}")
    for nb in neighbours:
        if np.shape(nb.vector) != x.shape:
            raise ValueError(f"neighbour {nb.node_id}: shape {np.shape(nb.vector)} != own {x.shape}")
    deg_i = max(int(own_degree), len(neighbours))

    weights = {nb.node_id: mh_weight(deg_i, nb.degree) for nb in neighbours}
    tmp = np.empty_like(x)
    distances: dict[str, float] = {}
    usable: list[Neighbour] = []
    for nb in neighbours:
        with np.errstate(over="ignore", invalid="ignore"):
            np.subtract(np.asarray(nb.vector, dtype=np.float32), x, out=tmp)
        d = _norm(tmp)
        if not math.isfinite(d):  # NaN / inf (or a float32-overflowing difference): codec refuses most
            weights[nb.node_id] = 0.0
            distances[nb.node_id] = math.inf
            continue
        distances[nb.node_id] = d
        usable.append(nb)

    tau: float | None = None
    if rule == "clipped":
        tau = (
            float(radius)
            if radius is not None
            else _adaptive_radius([distances[nb.node_id] for nb in usable])
        )

    out = x.copy()
    clipped = {nid: not math.isfinite(d) for nid, d in distances.items()}
    for nb in usable:
        d = distances[nb.node_id]
        scale = 1.0
        if tau is not None and d > tau:
            scale = tau / d
            clipped[nb.node_id] = True
        coef = weights[nb.node_id] * scale
        if coef == 0.0:
            continue
        np.subtract(np.asarray(nb.vector, dtype=np.float32), x, out=tmp)
        tmp *= np.float32(coef)
        out += tmp
    own_weight = 1.0 - sum(weights.values())
    return MixResult(out, own_weight, weights, distances, clipped, tau)
