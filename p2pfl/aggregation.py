"""Gossip averaging on flat float32 vectors: plain, clipped (ClippedGossip), sample-weighted, push-sum.

One gossip step at node i with the neighbour models x_j that arrived this round:

  mean:      x_i' = x_i + sum_j w_ij (x_j - x_i)                 = (1 - sum_j w_ij) x_i + sum_j w_ij x_j
  clipped:   x_i' = x_i + sum_j w_ij clip(x_j - x_i, tau),  clip(z, tau) = z * min(1, tau / ||z||)
  weighted:  x_i' = x_i + sum_j w_ij min(1, s_j / s_i) (x_j - x_i)
  push-sum:  m_i' = a_i m_i + sum_j w_ij m_j,   x_i' = (a_i m_i x_i + sum_j w_ij m_j x_j) / m_i'

with Metropolis-Hastings weights w_ij = 1/(1+max(deg_i, deg_j)) (degrees travel in update headers)
and a_i = 1 - sum_j w_ij. A neighbour that did not arrive contributes nothing and its weight stays on
x_i. Clipping is centred on the node's own model (He, Karimireddy & Jaggi 2022, "Byzantine-robust
decentralized learning via ClippedGossip"): one neighbour can move x_i by at most w_ij * tau per round
however far away it is, while neighbours within tau are averaged exactly as plain gossip would.

Weighting by data size (s_i = the node's sample count, carried in every update header):
- "weighted" is the Metropolis-Hastings chain whose stationary distribution is s: the weights satisfy
  s_i p_ij = s_j p_ji, so sum_i s_i x_i is conserved and plain averaging converges to the
  sample-weighted average sum_i s_i x_i / sum_i s_i. It is stateless (needs only the s_j and degrees
  already in the headers), it keeps weighting every round's local training by s_i, and a neighbour
  cannot pull harder than plain MH whatever sample count it claims (min(1, .) caps it). The price:
  a node with much more data than its neighbours moves slowly (s_i p_ij <= s_j w_ij), so the
  spectral gap shrinks as sizes get more skewed (topology.mixing_matrix(graph, samples) shows it).
- "push-sum" (weighted gossip, Kempe et al. 2003) starts each node's scalar mass m_i at s_i and mixes
  numerators m_i x_i and masses with the symmetric MH weights: x_i' is again a convex combination and
  its fixed point is the sample-weighted average. The node must keep m_i between rounds and send it
  with every update; it mixes as fast as plain MH, but masses tend to the mean sample count, so
  later training steps count equally.
  A neighbour lying about its mass can dominate the mix: use it only among trusted nodes.

`mix` runs one node's step (the real node); `mix_many` runs every node's step at once on an N x P
matrix with sparse weights (the simulator) and computes the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from p2pfl.errors import ConfigError

RULES = ("clipped", "mean", "weighted", "push-sum")
ADAPTIVE_SLACK = 1.5  # tau = slack * median distance: see _adaptive_radius
_NORM_CHUNK = 1 << 20
_MANY_CHUNK = 1 << 22  # values per chunk of edge differences in mix_many (16 MiB of float32)


def mh_weight(deg_i: int, deg_j: int) -> float:
    """Metropolis-Hastings weight of edge (i, j); never more than 1/(1+deg_i), whatever j claims."""
    return 1.0 / (1.0 + max(int(deg_i), int(deg_j), 0))


def sample_accept(own_samples: float, their_samples: float) -> float:
    """min(1, s_j / s_i): how much of the MH weight a neighbour gets under rule "weighted".

    A node without data (s_i <= 0) takes its neighbours fully; a neighbour without data pulls not at all.
    """
    s_i, s_j = max(float(own_samples), 0.0), max(float(their_samples), 0.0)
    return 1.0 if s_i <= 0 else min(1.0, s_j / s_i)


@dataclass(frozen=True)
class Neighbour:
    """One neighbour's model this round, as received (vector is the flattened float32 model).

    degree and samples come from the update header; mass too, for rule "push-sum" (None: use samples,
    which is the right value in a neighbour's first round).
    """

    node_id: str
    vector: np.ndarray
    degree: int
    samples: int
    mass: float | None = None


@dataclass(frozen=True)
class MixResult:
    """The mixed vector plus what the metrics and reputation need.

    weights are the neighbours' weights in the step: the MH weights w_ij for "mean" and "clipped" (a
    clipped neighbour's actual pull is weights[j] * min(1, radius / distances[j])), w_ij min(1, s_j/s_i)
    for "weighted", w_ij m_j / m_i' for "push-sum". own_weight = 1 - sum(weights).
    radius is None except for "clipped". mass is the node's new push-sum mass (None for other rules):
    keep it for the next round and send it in the next update.
    """

    vector: np.ndarray
    own_weight: float
    weights: dict[str, float]
    distances: dict[str, float]
    clipped: dict[str, bool]
    radius: float | None
    mass: float | None = None


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


def _check_rule(rule: str, radius: float | None) -> None:
    if rule not in RULES:
        raise ConfigError(f"unknown aggregation rule {rule!r}; known: {', '.join(RULES)}")
    if radius is not None and not (radius >= 0):  # also refuses NaN
        raise ConfigError(f"clipping radius must be >= 0, got {radius!r}")


def _valid_mass(m: float | None) -> bool:
    return m is not None and math.isfinite(m) and m >= 0


def mix(
    own: np.ndarray,
    own_degree: int,
    neighbours: Sequence[Neighbour],
    rule: str = "clipped",
    radius: float | None = None,
    *,
    own_samples: float | None = None,
    own_mass: float | None = None,
) -> MixResult:
    """One gossip step of `own` with the neighbours that arrived (see the module docstring).

    own_degree is this node's degree in the current topology (raised to len(neighbours) if smaller,
    so the own weight never goes negative). radius None with rule "clipped" means adaptive
    (_adaptive_radius). Rule "weighted" needs own_samples; "push-sum" needs own_mass (the mass kept
    from the previous round; defaults to own_samples in the first round). A neighbour with
    non-finite values, or whose difference from own overflows float32, is ignored (weight 0 so it
    stays home, distance inf, clipped True); so is a push-sum neighbour with a negative or non-finite
    mass. Works in float32 with two P-sized buffers whatever the number of neighbours.
    """
    _check_rule(rule, radius)
    x = np.asarray(own, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"own vector must be flat, got shape {x.shape}")
    ids = [nb.node_id for nb in neighbours]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate neighbour ids: {ids}")
    for nb in neighbours:
        if np.shape(nb.vector) != x.shape:
            raise ValueError(f"neighbour {nb.node_id}: shape {np.shape(nb.vector)} != own {x.shape}")
    if rule == "weighted" and own_samples is None:
        raise ValueError('rule "weighted" needs own_samples (this node\'s sample count)')
    if rule == "push-sum":
        own_mass = own_samples if own_mass is None else own_mass
        if own_mass is None or not _valid_mass(float(own_mass)):
            raise ValueError(f'rule "push-sum" needs own_mass >= 0 (or own_samples), got {own_mass!r}')
    deg_i = max(int(own_degree), len(neighbours))

    weights = {nb.node_id: mh_weight(deg_i, nb.degree) for nb in neighbours}
    tmp = np.empty_like(x)
    distances: dict[str, float] = {}
    usable: list[Neighbour] = []
    for nb in neighbours:
        with np.errstate(over="ignore", invalid="ignore"):
            np.subtract(np.asarray(nb.vector, dtype=np.float32), x, out=tmp)
        d = _norm(tmp)
        bad_mass = rule == "push-sum" and not _valid_mass(_mass_of(nb))
        if not math.isfinite(d) or bad_mass:  # NaN / inf (or a float32-overflowing difference)
            weights[nb.node_id] = 0.0
            distances[nb.node_id] = math.inf if not math.isfinite(d) else d
            continue
        distances[nb.node_id] = d
        usable.append(nb)
    clipped = {nid: not math.isfinite(d) or weights[nid] == 0.0 for nid, d in distances.items()}

    tau: float | None = None
    if rule == "clipped":
        tau = (
            float(radius)
            if radius is not None
            else _adaptive_radius([distances[nb.node_id] for nb in usable])
        )
    new_mass: float | None = None
    if rule == "weighted":
        for nb in usable:
            weights[nb.node_id] *= sample_accept(float(own_samples), nb.samples)  # type: ignore[arg-type]
    elif rule == "push-sum":
        keep = 1.0 - sum(weights[nb.node_id] for nb in usable)  # missing neighbours' weight stays home
        incoming = sum(weights[nb.node_id] * _mass_of(nb) for nb in usable)
        new_mass = keep * float(own_mass) + incoming  # type: ignore[arg-type]
        for nb in usable:
            weights[nb.node_id] = weights[nb.node_id] * _mass_of(nb) / new_mass if new_mass > 0 else 0.0

    out = x.copy()
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
    return MixResult(out, own_weight, weights, distances, clipped, tau, new_mass)


def _mass_of(nb: Neighbour) -> float:
    return float(nb.samples if nb.mass is None else nb.mass)


# --------------------------------------------------------------------------------------------------
# every node at once (the simulator)


@dataclass(frozen=True)
class ManyResult:
    """mix_many's output: row i is what mix() returns at node i.

    matrix is the sparse N x N step actually applied (vectors = matrix @ x), useful for spectral
    analysis; radius (clipped) and mass (push-sum) are None for the other rules.
    """

    vectors: np.ndarray
    own_weight: np.ndarray
    radius: np.ndarray | None
    mass: np.ndarray | None
    matrix: sp.csr_matrix


def edge_distances(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """||x[cols[k]] - x[rows[k]]|| for every edge k (float64; inf where non-finite), in chunks."""
    out = np.empty(len(rows), dtype=np.float64)
    step = max(1, _MANY_CHUNK // max(1, x.shape[1]))
    with np.errstate(over="ignore", invalid="ignore"):
        for a in range(0, len(rows), step):
            diff = x[cols[a : a + step]] - x[rows[a : a + step]]
            sq = np.einsum("ij,ij->i", diff, diff, dtype=np.float64)
            out[a : a + step] = np.sqrt(sq)
    out[~np.isfinite(out)] = np.inf
    return out


def _adaptive_radii(n: int, rows: np.ndarray, d: np.ndarray) -> np.ndarray:
    """_adaptive_radius for every node: upper median of {0} U {its finite edge distances}."""
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
    return ADAPTIVE_SLACK * med


def mix_many(
    x: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    degrees: np.ndarray,
    rule: str = "clipped",
    radius: float | None = None,
    *,
    samples: np.ndarray | None = None,
    mass: np.ndarray | None = None,
) -> ManyResult:
    """One gossip step at every node: row i of the result equals mix() at node i.

    x is N x P float32 (one model per row). Edge k means node rows[k] received cols[k]'s update this
    round (give both directions of an undirected edge; leave out what did not arrive). degrees are
    the degrees the nodes announce in their headers; samples (N,) are needed for "weighted", mass
    (N,) for "push-sum" (default: samples). The step is assembled as one sparse N x N matrix.
    Outside "clipped" a neighbour is skipped when its row is non-finite (mix() also skips one whose
    difference from own overflows float32, which only hostile values can do).
    """
    _check_rule(rule, radius)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be N x P, got shape {x.shape}")
    n = x.shape[0]
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    deg = np.asarray(degrees, dtype=np.int64)
    if rows.shape != cols.shape or deg.shape != (n,):
        raise ValueError("rows/cols must have the same length and degrees one entry per node")
    received = np.bincount(rows, minlength=n)
    deg_i = np.maximum(deg, received)
    w = 1.0 / (1.0 + np.maximum(deg_i[rows], np.maximum(deg[cols], 0)))
    row_finite = np.isfinite(x).all(axis=1) if rule != "clipped" else None
    d = edge_distances(x, rows, cols) if rule == "clipped" else None
    usable = np.isfinite(d) if d is not None else row_finite[cols] & row_finite[rows]  # type: ignore[index]

    tau = None
    new_mass = None
    coef = np.where(usable, w, 0.0)
    shown = coef.copy()  # the weights mix() reports (clipping scale not included)
    if rule == "clipped":
        assert d is not None
        tau = np.full(n, float(radius)) if radius is not None else _adaptive_radii(n, rows, d)
        t = tau[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(d > t, t / d, 1.0)  # type: ignore[operator]
        coef = coef * np.where(usable, scale, 0.0)
    elif rule == "weighted":
        if samples is None:
            raise ValueError('rule "weighted" needs samples')
        s = np.maximum(np.asarray(samples, dtype=np.float64), 0.0)
        si, sj = s[rows], s[cols]
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = np.where(si <= 0, 1.0, np.minimum(1.0, sj / si))
        coef = shown = coef * acc
    elif rule == "push-sum":
        m = np.asarray(samples if mass is None else mass, dtype=np.float64)
        if m is None or m.shape != (n,):
            raise ValueError('rule "push-sum" needs mass (or samples), one per node')
        ok = np.isfinite(m) & (m >= 0)
        coef = np.where(ok[cols], coef, 0.0)
        keep = 1.0 - np.bincount(rows, weights=coef, minlength=n)
        new_mass = keep * m + np.bincount(rows, weights=coef * np.where(ok, m, 0.0)[cols], minlength=n)
        with np.errstate(divide="ignore", invalid="ignore"):
            coef = np.where(new_mass[rows] > 0, coef * np.where(ok, m, 0.0)[cols] / new_mass[rows], 0.0)
        shown = coef

    own_weight = 1.0 - np.bincount(rows, weights=shown, minlength=n)
    off = sp.csr_matrix((coef, (rows, cols)), shape=(n, n))
    off.eliminate_zeros()  # an explicit 0 times a non-finite neighbour row would still give NaN
    diag = 1.0 - np.asarray(off.sum(axis=1)).ravel()
    matrix = (off + sp.diags(diag)).tocsr()
    vectors = np.asarray(matrix.astype(np.float32) @ x, dtype=np.float32)
    if row_finite is not None and not row_finite.all():
        vectors[~row_finite] = x[~row_finite]  # mix() at a node whose own model is broken: untouched rows
    return ManyResult(vectors, own_weight, tau, new_mass, matrix)
