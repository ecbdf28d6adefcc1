"""Shared mechanics of the rules: norms and distances, the clipped linear step (one node, and all
nodes as one sparse matrix), and the coordinate-wise sort (trimmed mean, median).

The rules (p2pfl.aggregation.rules) combine these; nothing here knows a rule by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from p2pfl.aggregation.base import NodeStep

TRIM_FRACTION = 0.2  # default trimmed-mean cut on each side (at least 1 value once there are 3 votes)
_NORM_CHUNK = 1 << 20
STEP_CHUNK = 1 << 20  # values per chunk of one node's step: its scratch is 4 MiB, not a model's size
_MANY_CHUNK = 1 << 22  # values per chunk of edge differences in mix_many (16 MiB of float32)

KeptPositions = Callable[[int], tuple[int, int]]  # votes -> [lo, hi) of the sorted values kept


# --------------------------------------------------------------------------------------------------
# distances


def vector_norm(v: np.ndarray) -> float:
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


def difference_norm(v: np.ndarray, x: np.ndarray, tmp: np.ndarray) -> float:
    """||v - x|| chunk by chunk through the scratch `tmp` (STEP_CHUNK values), so no model-sized
    difference is ever held; inf when it is not finite (NaN/inf values, or a float32 overflow)."""
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for lo in range(0, x.size, STEP_CHUNK):
            t = tmp[: min(x.size, lo + STEP_CHUNK) - lo]
            np.subtract(v[lo : lo + t.size], x[lo : lo + t.size], out=t)
            part = vector_norm(t)
            total += part * part
    return math.sqrt(total) if math.isfinite(total) else math.inf


def edge_distances(
    x: np.ndarray, rows: np.ndarray, cols: np.ndarray, sent: np.ndarray | None = None
) -> np.ndarray:
    """||sent[cols[k]] - x[rows[k]]|| for every edge k (sent defaults to x; float64; inf where
    non-finite), in chunks."""
    src = x if sent is None else sent
    out = np.empty(len(rows), dtype=np.float64)
    step = max(1, _MANY_CHUNK // max(1, x.shape[1]))
    with np.errstate(over="ignore", invalid="ignore"):
        for a in range(0, len(rows), step):
            diff = src[cols[a : a + step]] - x[rows[a : a + step]]
            sq = np.einsum("ij,ij->i", diff, diff, dtype=np.float64)
            out[a : a + step] = np.sqrt(sq)
    out[~np.isfinite(out)] = np.inf
    return out


# --------------------------------------------------------------------------------------------------
# the linear step: x_i' = x_i + sum_j c_ij clip(x_j - x_i, tau_i)


def linear_mix(s: NodeStep, tau: float | None) -> np.ndarray:
    """One node's step with the coefficients s.weights, each neighbour's difference clipped at tau
    (None: no clipping); marks the clipped neighbours in s.clipped. One P-sized float32 buffer (the
    result, or none: s.out, an owned neighbour's vector, each chunk written once every term has read
    it), filled chunk by chunk through the scratch s.tmp; every value is computed exactly as a
    whole-vector x + sum_j c_j (x_j - x) would, in the same order."""
    x = s.x
    terms: list[tuple[np.ndarray, np.float32]] = []
    for nb in s.usable:
        d = s.distances[nb.node_id]
        scale = 1.0
        if tau is not None and d > tau:
            scale = tau / d
            s.clipped[nb.node_id] = True
        coef = s.weights[nb.node_id] * scale
        if coef != 0.0:
            terms.append((np.asarray(nb.vector, dtype=np.float32), np.float32(coef)))
    out = np.empty_like(x) if s.out is None else s.out
    acc = np.empty(min(x.size, STEP_CHUNK), dtype=np.float32)
    for lo in range(0, x.size, STEP_CHUNK):
        a = acc[: min(x.size, lo + STEP_CHUNK) - lo]
        a[:] = x[lo : lo + a.size]
        t = s.tmp[: a.size]
        for v, c in terms:
            np.subtract(v[lo : lo + a.size], x[lo : lo + a.size], out=t)
            t *= c
            a += t
        out[lo : lo + a.size] = a
    return out


def clip_coefficients(
    coef: np.ndarray, d: np.ndarray, tau: np.ndarray, rows: np.ndarray, usable: np.ndarray
) -> np.ndarray:
    """coef x min(1, tau_i / d_k) on every edge k = (i, j); 0 on the unusable edges."""
    t = tau[rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(d > t, t / d, 1.0)
    return coef * np.where(usable, scale, 0.0)


def sparse_step(
    coef: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int, diag: np.ndarray | None = None
) -> tuple[sp.csr_matrix, np.ndarray, sp.csr_matrix]:
    """(off-diagonal part, diagonal, whole N x N matrix) of a step with edge coefficients coef.

    diag defaults to 1 - the row sums of the off-diagonal part (a row-stochastic step).
    """
    off = sp.csr_matrix((coef, (rows, cols)), shape=(n, n))
    off.eliminate_zeros()  # an explicit 0 times a non-finite neighbour row would still give NaN
    if diag is None:
        diag = 1.0 - np.asarray(off.sum(axis=1)).ravel()
    matrix = (off + sp.diags(diag)).tocsr()
    return off, diag, matrix


def apply_step(
    off: sp.csr_matrix, diag: np.ndarray, matrix: sp.csr_matrix, x: np.ndarray, src: np.ndarray
) -> np.ndarray:
    """The linear step at every node: matrix @ x, or diag x + off @ src when neighbours sent src."""
    if src is x:
        return np.asarray(matrix.astype(np.float32) @ x, dtype=np.float32)
    vectors = np.asarray(off.astype(np.float32) @ src, dtype=np.float32)
    vectors += diag.astype(np.float32)[:, None] * x
    return vectors


# --------------------------------------------------------------------------------------------------
# coordinate-wise rules: per coordinate, the mean of the sorted votes [lo, hi)


def trim_count(votes: int, trim: int | None = None) -> int:
    """Values cut from each end per coordinate for rule "trimmed-mean" with `votes` values.

    Default min(floor((k-1)/2), ceil(TRIM_FRACTION k)): 1 for 3..5 votes (degree 2..4), 2 for 6..10;
    an explicit trim is capped at floor((k-1)/2) so at least one value is kept.
    """
    cap = max(0, (votes - 1) // 2)
    if trim is None:
        return min(cap, math.ceil(TRIM_FRACTION * votes - 1e-9))
    return min(cap, max(0, int(trim)))


def coordinate_step(stack: np.ndarray, lo: int, hi: int, counts: np.ndarray) -> np.ndarray:
    """Mean of the sorted values [lo, hi) along axis -2 of stack (..., k, c); adds to counts (..., k)
    how many coordinates each vote had kept. float64 sums of sorted values: same result per node."""
    order = np.argsort(stack, axis=-2, kind="stable")
    ordered = np.take_along_axis(stack, order, axis=-2)
    k = stack.shape[-2]
    kept = order[..., lo:hi, :]
    for v in range(k):
        counts[..., v] += (kept == v).sum(axis=(-2, -1))
    return ordered[..., lo:hi, :].astype(np.float64).mean(axis=-2).astype(np.float32)


def coordinate_mix(
    x: np.ndarray, vectors: Sequence[np.ndarray], kept: KeptPositions
) -> tuple[np.ndarray, np.ndarray]:
    """A coordinate-wise rule at one node: (new vector, coefficient of each vote, own first)."""
    k = 1 + len(vectors)
    lo, hi = kept(k)
    counts = np.zeros(k, dtype=np.float64)
    out = np.empty_like(x)
    step = max(1, _NORM_CHUNK // k)
    for a in range(0, x.size, step):
        stack = np.stack([x[a : a + step], *(np.asarray(v[a : a + step], dtype=np.float32) for v in vectors)])
        out[a : a + step] = coordinate_step(stack, lo, hi, counts)
    coef = counts / (max(x.size, 1) * (hi - lo))
    if x.size == 0:
        coef[:] = 1.0 / k
    return out, coef


def coordinate_many(
    x: np.ndarray,
    src: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    usable: np.ndarray,
    kept: KeptPositions,
) -> tuple[np.ndarray, np.ndarray]:
    """A coordinate-wise rule at every node (nodes grouped by their number of votes, sorted together).
    Returns (vectors, coefficient of every edge); the own coefficient is 1 - the node's edge sum."""
    n, p = x.shape
    vectors = x.copy()
    edge_coef = np.zeros(len(rows))
    e_ok = np.flatnonzero(usable)
    order = e_ok[np.argsort(rows[e_ok], kind="stable")]  # usable edges grouped by receiver, edge order kept
    got = np.bincount(rows[order], minlength=n)
    starts = np.concatenate([[0], np.cumsum(got)])
    own_ok = np.isfinite(x).all(axis=1)
    for k_nb in np.unique(got):
        nodes = np.flatnonzero((got == k_nb) & own_ok)
        if not len(nodes):
            continue
        k = int(k_nb) + 1
        lo, hi = kept(k)
        edges = (
            np.stack([order[starts[i] : starts[i + 1]] for i in nodes])
            if k_nb
            else np.zeros((len(nodes), 0), dtype=np.int64)
        )
        counts = np.zeros((len(nodes), k))
        step = max(1, _MANY_CHUNK // max(1, k * len(nodes)))
        for a in range(0, p, step):
            stack = np.concatenate([x[nodes, None, a : a + step], src[cols[edges], a : a + step]], axis=1)
            vectors[nodes, a : a + step] = coordinate_step(stack, lo, hi, counts)
        coef = counts / (max(p, 1) * (hi - lo)) if p else np.full((len(nodes), k), 1.0 / k)
        if k_nb:
            edge_coef[edges.ravel()] = coef[:, 1:].ravel()
    return vectors, edge_coef
