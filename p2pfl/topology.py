"""Who gossips with whom: graph builders, a node's neighbours in a round, Metropolis-Hastings weights.

A topology is named by a built-in ("ring", "full", "torus", "exponential", "random-regular[:D]")
or by a file path: a TOML file (`[topology] kind = "ring"`, or `kind = "edges"` with
`edges = [["node-0", "node-1"], ...]`) or a plain text edge list ("a b" per line, # comments).
Nodes are indices 0..n-1 of the members sorted by node id; edge-list files name nodes by their
human name (`labels[i]` is the name of index i), or by integer index.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import networkx as nx
import numpy as np
import scipy.sparse as sp

from p2pfl.errors import ConfigError

BUILTIN_TOPOLOGIES = ("ring", "full", "torus", "exponential", "random-regular")
ALIASES = {"complete": "full", "cycle": "ring"}
FILE_KINDS = ("edges",) + BUILTIN_TOPOLOGIES
DEFAULT_REGULAR_DEGREE = 4
DENSE_EIG_LIMIT = 2000
_TOPOLOGY_DIR = Path(__file__).resolve().parent.parent / "topologies"


def known_topologies() -> str:
    return (
        f"{', '.join(BUILTIN_TOPOLOGIES)} (random-regular:D for degree D), or a .toml / edge-list file path"
    )


def neighbours(
    name: str,
    members: Sequence[str],
    me: str,
    round: int,
    seed: int = 0,
    names: Mapping[str, str] | None = None,
) -> list[str]:
    """Node ids of `me`'s neighbours this round (sorted, deterministic on every node).

    `members` (me included or not) are sorted by node id and indexed; `names` maps node id -> human
    name so that edge-list files can say "node-0". Members a file does not mention are isolated;
    edges to nodes that are not currently members are dropped.
    """
    order = sorted(set(members) | {me})
    labels = [(names or {}).get(m, m) for m in order]
    graph = build_graph(name, len(order), seed=seed, round=round, labels=labels)
    return sorted(order[j] for j in graph.neighbors(order.index(me)) if order[j] != me)


def build_graph(
    name: str, n: int, seed: int = 0, round: int = 0, labels: Sequence[str] | None = None
) -> nx.Graph:
    """Undirected graph on nodes 0..n-1 (inserted in that order, no self-loops).

    `seed` draws random topologies; `round` is accepted for time-varying topologies (the built-ins
    are static). `labels[i]` names node i for edge-list files (default "node-i").
    """
    if n < 0:
        raise ConfigError(f"topology needs n >= 0 nodes, got {n}")
    key = ALIASES.get(name, name)
    base, _, arg = key.partition(":")
    if base in BUILTIN_TOPOLOGIES and (not arg or base == "random-regular"):
        return _builtin(base, n, seed, arg)
    path = _resolve_path(name)
    if path is None:
        raise ConfigError(f"unknown topology {name!r}; known: {known_topologies()}")
    return _from_file(path, n, seed, round, labels)


def _builtin(kind: str, n: int, seed: int, arg: str = "", degree: int | None = None) -> nx.Graph:
    graph = nx.empty_graph(n)
    if kind == "ring":
        graph.add_edges_from((i, (i + 1) % n) for i in range(n) if n >= 2 and i != (i + 1) % n)
    elif kind == "full":
        graph.add_edges_from(nx.complete_graph(n).edges)
    elif kind == "torus":
        graph.add_edges_from(_torus_edges(n))
    elif kind == "exponential":
        # i ~ i +- 2^k (mod n): the symmetric exponential graph, degree ~ 2 log2 n
        hops = [2**k for k in range(max(1, math.ceil(math.log2(n)))) if 2**k < n] if n >= 2 else []
        graph.add_edges_from((i, (i + h) % n) for i in range(n) for h in hops if (i + h) % n != i)
    elif kind == "random-regular":
        if arg:
            try:
                degree = int(arg)
            except ValueError:
                raise ConfigError(f"random-regular:D needs an integer degree, got {arg!r}") from None
        d = DEFAULT_REGULAR_DEGREE if degree is None else degree
        if d < 1:
            raise ConfigError(f"random-regular degree must be >= 1, got {d}")
        if (n * d) % 2:
            d += 1  # no d-regular graph when n*d is odd (membership changes): use the next even total
        if n <= d:
            graph.add_edges_from(nx.complete_graph(n).edges)  # too few nodes for degree d: everyone
        else:
            graph.add_edges_from(nx.random_regular_graph(d, n, seed=seed).edges)
    else:  # pragma: no cover - guarded by callers
        raise ConfigError(f"unknown topology {kind!r}; known: {known_topologies()}")
    return graph


def _torus_edges(n: int) -> list[tuple[int, int]]:
    """2-D torus on an r x c grid, r the largest divisor of n with r <= sqrt(n) (r = 1: a ring)."""
    if n < 2:
        return []
    r = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    c = n // r
    edges = set()
    for i in range(r):
        for j in range(c):
            v = i * c + j
            for w in (i * c + (j + 1) % c, ((i + 1) % r) * c + j):
                if w != v:
                    edges.add((min(v, w), max(v, w)))
    return sorted(edges)


def _resolve_path(name: str) -> Path | None:
    """A topology file: as given (relative to the working directory), else in the repo's topologies/."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    if not p.is_absolute() and (_TOPOLOGY_DIR / p).is_file():
        return _TOPOLOGY_DIR / p
    if p.suffix in (".toml", ".txt", ".edges", ".edgelist") or "/" in name:
        raise ConfigError(f"topology file not found: {name!r}")
    return None


def _from_file(path: Path, n: int, seed: int, round: int, labels: Sequence[str] | None) -> nx.Graph:
    if path.suffix == ".toml":
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"topology file {str(path)!r}: {exc}") from exc
        table = doc.get("topology", doc)
        if not isinstance(table, dict):
            raise ConfigError(f"topology file {str(path)!r}: [topology] must be a table")
        kind = ALIASES.get(str(table.get("kind", "edges")), str(table.get("kind", "edges")))
        if kind != "edges":
            if kind not in BUILTIN_TOPOLOGIES:
                raise ConfigError(
                    f"topology file {str(path)!r}: unknown kind {kind!r}; known: {', '.join(FILE_KINDS)}"
                )
            degree = table.get("degree")
            if degree is not None and not isinstance(degree, int):
                raise ConfigError(f"topology file {str(path)!r}: degree must be an integer")
            return _builtin(kind, n, int(table.get("seed", seed)), degree=degree)
        edges = table.get("edges")
        if not isinstance(edges, list):
            raise ConfigError(f'topology file {str(path)!r}: kind = "edges" needs edges = [[a, b], ...]')
        pairs = []
        for k, e in enumerate(edges):
            if not (isinstance(e, list) and len(e) == 2 and all(isinstance(v, str | int) for v in e)):
                raise ConfigError(
                    f"topology file {str(path)!r}: edge #{k} must be a pair of names or indices, got {e!r}"
                )
            pairs.append((e[0], e[1]))
    else:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"topology file {str(path)!r}: {exc}") from exc
        pairs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ConfigError(
                    f"topology file {str(path)!r} line {lineno}: expected 'a b', got {line.strip()!r}"
                )
            pairs.append((fields[0], fields[1]))
    return _edge_graph(pairs, n, labels)


def _edge_graph(
    pairs: Iterable[tuple[str | int, str | int]], n: int, labels: Sequence[str] | None
) -> nx.Graph:
    """Edges by name (or integer index); endpoints that are not among the n nodes are dropped."""
    names = list(labels) if labels is not None else [f"node-{i}" for i in range(n)]
    if len(names) != n:
        raise ConfigError(f"topology: {len(names)} labels for {n} nodes")
    index = {name: i for i, name in enumerate(names)}

    def lookup(v: str | int) -> int | None:
        if isinstance(v, str) and v in index:
            return index[v]
        if isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
            i = int(v)
            return i if 0 <= i < n else None
        return None

    graph = nx.empty_graph(n)
    for a, b in pairs:
        i, j = lookup(a), lookup(b)
        if i is not None and j is not None and i != j:
            graph.add_edge(i, j)
    return graph


# --------------------------------------------------------------------------------------------------
# mixing weights and spectral gap


def _degrees(graph: nx.Graph) -> tuple[list, dict]:
    nodes = list(graph.nodes)
    deg = {v: sum(1 for u in graph.neighbors(v) if u != v) for v in nodes}
    return nodes, deg


def mixing_matrix(graph: nx.Graph) -> np.ndarray:
    """Metropolis-Hastings W (dense, float64, rows/cols in graph.nodes order).

    w_ij = 1/(1+max(deg_i, deg_j)) on edges, w_ii = 1 - sum_j w_ij: symmetric and doubly
    stochastic for any undirected graph, using only what neighbours know about each other.
    """
    nodes, deg = _degrees(graph)
    pos = {v: k for k, v in enumerate(nodes)}
    w = np.zeros((len(nodes), len(nodes)))
    for u, v in graph.edges:
        if u != v:
            i, j = pos[u], pos[v]
            w[i, j] = w[j, i] = 1.0 / (1.0 + max(deg[u], deg[v]))
    w[np.diag_indices_from(w)] = 1.0 - w.sum(axis=1)
    return w


def mixing_matrix_sparse(graph: nx.Graph) -> sp.csr_matrix:
    """mixing_matrix as scipy.sparse CSR, for large graphs."""
    nodes, deg = _degrees(graph)
    pos = {v: k for k, v in enumerate(nodes)}
    rows, cols, vals = [], [], []
    for u, v in graph.edges:
        if u != v:
            i, j = pos[u], pos[v]
            x = 1.0 / (1.0 + max(deg[u], deg[v]))
            rows += [i, j]
            cols += [j, i]
            vals += [x, x]
    n = len(nodes)
    off = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    diag = 1.0 - np.asarray(off.sum(axis=1)).ravel()
    return (off + sp.diags(diag)).tocsr()


def spectral_gap(w: np.ndarray | sp.spmatrix) -> float:
    """1 - |lambda_2|: second largest eigenvalue modulus of W (1.0 for a single node).

    Consensus distance under plain gossip decays about like (1 - gap)^(2t).
    """
    n = w.shape[0]
    if n <= 1:
        return 1.0
    if sp.issparse(w):
        if n <= DENSE_EIG_LIMIT:
            w = w.toarray()
        else:
            from scipy.sparse.linalg import eigsh

            vals = eigsh(w.astype(np.float64), k=2, which="LM", return_eigenvectors=False)
            return float(1.0 - np.sort(np.abs(vals))[-2])
    w = np.asarray(w, dtype=np.float64)
    vals = np.linalg.eigvalsh(w) if np.allclose(w, w.T) else np.linalg.eigvals(w)
    mods = np.sort(np.abs(vals))[::-1]
    return float(1.0 - mods[1])
