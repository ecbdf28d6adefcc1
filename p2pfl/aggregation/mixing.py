"""The two entry points: `mix` (one node's step, the real node) and `mix_many` (every node's step on an
N x P matrix, the simulator). They check the inputs, compute what every rule needs (MH weights,
distances, which neighbours count) and hand the step to the rule (p2pfl.aggregation.rules)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from p2pfl.aggregation.base import ManyResult, ManyStep, MixResult, Neighbour, NodeStep, get_rule
from p2pfl.aggregation.mechanics import STEP_CHUNK, difference_norm, edge_distances
from p2pfl.aggregation.reputation import Reputation
from p2pfl.aggregation.weights import mh_weight, mh_weights
from p2pfl.errors import ConfigError


def _check_radius(radius: float | None) -> None:
    if radius is not None and not (radius >= 0):  # also refuses NaN
        raise ConfigError(f"clipping radius must be >= 0, got {radius!r}")


def mix(
    own: np.ndarray,
    own_degree: int,
    neighbours: Sequence[Neighbour],
    rule: str = "clipped",
    radius: float | None = None,
    *,
    own_samples: float | None = None,
    own_mass: float | None = None,
    reputation: Reputation | None = None,
    trim: int | None = None,
) -> MixResult:
    """One gossip step of `own` with the neighbours that arrived (see p2pfl.aggregation).

    own_degree is this node's degree in the current topology (raised to len(neighbours) if smaller,
    so the own weight never goes negative). radius None with rule "clipped" or "robust" means
    adaptive (weights.adaptive_radius). Rule "weighted" needs own_samples; "push-sum" needs own_mass
    (the mass kept from the previous round; defaults to own_samples in the first round). Rule
    "robust" needs `reputation`, this node's Reputation kept across rounds: mix updates it with this
    round's distances and scales each neighbour's MH weight by its score before clipping (other rules
    ignore it). trim: values cut from each end per coordinate for "trimmed-mean" (see trim_count).
    A neighbour with non-finite values, or whose difference from own overflows float32, is ignored
    (weight 0 so it stays home, distance inf, clipped True; for "robust" it also counts as a failed
    round); so is a push-sum neighbour with a negative or non-finite mass. Works in float32 with one
    P-sized buffer (the result) and a 4 MiB scratch whatever the number of neighbours (the
    coordinate-wise rules sort chunks of the k = 1 + neighbours votes: about k x 4 MiB).
    """
    chosen = get_rule(rule)
    _check_radius(radius)
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
    s = NodeStep(
        x=x,
        neighbours=neighbours,
        usable=[],
        weights={nb.node_id: mh_weight(deg_i, nb.degree) for nb in neighbours},
        distances={},
        clipped={},
        tmp=np.empty(min(x.size, STEP_CHUNK), dtype=np.float32),
        radius=radius,
        own_samples=own_samples,
        own_mass=own_mass,
        reputation=reputation,
        trim=trim,
    )
    chosen.check(s)

    for nb in neighbours:
        d = difference_norm(np.asarray(nb.vector, dtype=np.float32), x, s.tmp)
        if not math.isfinite(d) or chosen.excludes(nb):  # NaN / inf (or a float32-overflowing difference)
            s.weights[nb.node_id] = 0.0
            s.distances[nb.node_id] = math.inf if not math.isfinite(d) else d
            continue
        s.distances[nb.node_id] = d
        s.usable.append(nb)
    s.clipped.update({nid: not math.isfinite(d) or s.weights[nid] == 0.0 for nid, d in s.distances.items()})
    s.out = _spare(x, neighbours)
    return chosen.mix(s)


def _spare(x: np.ndarray, neighbours: Sequence[Neighbour]) -> np.ndarray | None:
    """An owned neighbour's vector the step may overwrite with its result (None: allocate one)."""
    for nb in neighbours:
        v = nb.vector
        if (
            nb.owned
            and isinstance(v, np.ndarray)
            and v.dtype == np.float32
            and v.shape == x.shape
            and v.flags.c_contiguous
            and v.flags.writeable
            and not np.may_share_memory(v, x)
        ):
            return v
    return None


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
    sent: np.ndarray | None = None,
    reputations: Sequence[Reputation] | None = None,
    ids: Sequence[str] | None = None,
    trim: int | None = None,
) -> ManyResult:
    """One gossip step at every node: row i of the result equals mix() at node i.

    x is N x P float32 (one model per row). Edge k means node rows[k] received cols[k]'s update this
    round (give both directions of an undirected edge; leave out what did not arrive). degrees are
    the degrees the nodes announce in their headers; samples (N,) are needed for "weighted", mass
    (N,) for "push-sum" (default: samples). sent (N x P, default x) is what each node sent this
    round, when that differs from its own model (an attacker's crafted vector): neighbours are
    taken from sent, each node's own model from x. Rule "robust" needs reputations, node i's
    Reputation at index i (updated in place, in node order), keyed by ids (default str(j)).
    The linear rules are assembled as one sparse N x N matrix; "robust" updates the reputations
    node by node (dicts of a few entries); the coordinate-wise rules sort all nodes with the same
    number of votes together. Outside "clipped" and "robust" a neighbour is skipped when its row is
    non-finite (mix() also skips one whose difference from own overflows float32, which only hostile
    values can do).
    """
    chosen = get_rule(rule)
    _check_radius(radius)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be N x P, got shape {x.shape}")
    src = x if sent is None else np.asarray(sent, dtype=np.float32)
    if src.shape != x.shape:
        raise ValueError(f"sent must have the shape of x {x.shape}, got {src.shape}")
    n = x.shape[0]
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    deg = np.asarray(degrees, dtype=np.int64)
    if rows.shape != cols.shape or deg.shape != (n,):
        raise ValueError("rows/cols must have the same length and degrees one entry per node")
    names = [str(j) for j in range(n)] if ids is None else [str(v) for v in ids]
    received = np.bincount(rows, minlength=n)
    deg_i = np.maximum(deg, received)
    own_finite = np.isfinite(x).all(axis=1)
    m = ManyStep(
        x=x,
        src=src,
        rows=rows,
        cols=cols,
        w=mh_weights(deg_i[rows], deg[cols]),
        d=None,
        usable=own_finite[rows],
        own_finite=own_finite,
        names=names,
        radius=radius,
        samples=samples,
        mass=mass,
        reputations=reputations,
        trim=trim,
    )
    chosen.check_many(m)
    if len(names) != n:
        raise ValueError(f"ids: {len(names)} entries for {n} nodes")
    if chosen.clips:
        m.d = edge_distances(x, rows, cols, src)
        m.usable = np.isfinite(m.d)
    else:
        src_finite = own_finite if src is x else np.isfinite(src).all(axis=1)
        m.usable = src_finite[cols] & own_finite[rows]
    return chosen.mix_many(m)
