"""Who gossips with whom: graph families, a node's neighbours in a round, mixing weights, spectral gap.

Agreement without a coordinator: every node sorts the certified member ids, numbers them 0..n-1 and
builds the same graph from (topology, n, seed, round). Nothing else is exchanged; random families are
drawn from `seed` with networkx's seeded generators, so every node draws the same graph. When the
member list changes the graph moves to a new epoch (`epoch_id`), which every node computes alike from
the same list. Degrees travel in update headers, so both ends of an edge use the same
Metropolis-Hastings weight 1/(1+max(deg_i, deg_j)) and W stays symmetric and doubly stochastic.

A topology is named by a built-in, optionally with parameters after colons:

    ring | torus | full | star | exponential | one-peer-exponential
    random-regular[:D]         d-regular, D default 4
    erdos-renyi[:P]            G(n, p), p default min(1, 2 ln(n) / n); redrawn until connected
    small-world[:K[:P]]        Watts-Strogatz, K nearest neighbours (default 4), rewiring P (0.1)

or by a file path: a TOML file (`[topology] kind = "ring"` plus the family's parameters and an
optional `seed`, or `kind = "edges"` with `edges = [["node-0", "node-1"], ...]`), or a plain text
edge list ("a b" per line, # comments). Edge-list files name nodes by their human name (`labels[i]`
is the name of index i) or by integer index. Bare file names are also looked up in the package's
`p2pfl/topologies/` directory (installed with the package; the repo's top-level `topologies/` links to it).

"one-peer-exponential" is time-varying: in round t every node has at most one neighbour, its
partner i XOR 2^(t mod ceil(log2 n)) (the undirected, hypercube form of the one-peer exponential
graph of Ying et al. 2021). For n a power of two, log2(n) consecutive rounds average exactly;
nodes whose partner index is >= n sit the round out.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import scipy.sparse as sp

from p2pfl.aggregation.weights import mh_weight, sample_accept
from p2pfl.errors import ConfigError

BUILTIN_TOPOLOGIES = (
    "ring",
    "full",
    "torus",
    "star",
    "exponential",
    "one-peer-exponential",
    "random-regular",
    "erdos-renyi",
    "small-world",
)
TIME_VARYING = frozenset({"one-peer-exponential"})
ALIASES = {
    "complete": "full",
    "cycle": "ring",
    "grid": "torus",
    "torus2d": "torus",
    "exp": "exponential",
    "one-peer-exp": "one-peer-exponential",
    "d-regular": "random-regular",
    "regular": "random-regular",
    "er": "erdos-renyi",
    "erdos-renyi-p": "erdos-renyi",
    "gnp": "erdos-renyi",
    "ws": "small-world",
    "watts-strogatz": "small-world",
}
FILE_KINDS = ("edges",) + BUILTIN_TOPOLOGIES
DEFAULT_REGULAR_DEGREE = 4
DEFAULT_WS_K = 4
DEFAULT_WS_P = 0.1
CONNECT_ATTEMPTS = 100  # redraws of a random family until it is connected (seeds seed, seed+1, ...)
DENSE_EIG_LIMIT = 2000
_PARAMS = {  # family -> parameters a file or a name may set (in name order)
    "random-regular": ("degree",),
    "erdos-renyi": ("p",),
    "small-world": ("k", "p"),
}
_FILE_KEYS = {"kind", "seed", "edges", "degree", "p", "k", "connected", "description", "name"}
_TOPOLOGY_DIR = Path(__file__).resolve().parent / "topologies"  # shipped inside the package


def known_topologies() -> str:
    return (
        f"{', '.join(BUILTIN_TOPOLOGIES)} (random-regular:D, erdos-renyi:P, small-world:K:P), "
        "or a .toml / edge-list file path"
    )


# --------------------------------------------------------------------------------------------------
# parsed topology


@dataclass(frozen=True)
class Topology:
    """A parsed topology: a family with its parameters, or an explicit edge list.

    `seed` (from a file) overrides the seed the caller passes; `edges` is set for kind "edges".
    Parse once with `parse_topology` and call `graph` (the simulator) or `view` (a node) every round:
    a topology file is read once, when parsed.
    """

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    edges: tuple[tuple[str | int, str | int], ...] = ()
    source: str = field(default="", compare=False)

    @property
    def time_varying(self) -> bool:
        return self.kind in TIME_VARYING

    @property
    def label(self) -> str:
        """Short name for tables: the family with its parameters (or the file stem)."""
        if self.kind == "edges":
            return Path(self.source).stem or "edges"
        args = [str(self.params[k]) for k in _PARAMS.get(self.kind, ()) if k in self.params]
        return ":".join([self.kind, *args])

    def graph(self, n: int, seed: int = 0, round: int = 0, labels: Sequence[str] | None = None) -> nx.Graph:
        """Undirected graph on nodes 0..n-1 (inserted in order, no self-loops)."""
        if n < 0:
            raise ConfigError(f"topology needs n >= 0 nodes, got {n}")
        if self.kind == "edges":
            return _edge_graph(self.edges, n, labels)
        return _family(self.kind, n, self.seed if self.seed is not None else seed, round, self.params)

    def view(
        self,
        members: Sequence[str],
        me: str,
        round: int,
        *,
        seed: int = 0,
        names: Mapping[str, str] | None = None,
    ) -> View:
        """Everything a node derives from (certified members, topology, seed, round), alike on every node.

        `members` (me included or not) are sorted by node id and indexed; `names` maps node id -> human
        name so that edge-list files can say "node-0". Members a file does not mention are isolated;
        edges to nodes that are not currently members are dropped.
        """
        order = sorted(set(members) | {me})
        labels = [(names or {}).get(m, m) for m in order]
        graph = self.graph(len(order), seed=seed, round=round, labels=labels)
        index = order.index(me)
        nbrs = sorted(order[j] for j in graph.neighbors(index) if order[j] != me)
        return View(epoch_id(order), index, len(order), nbrs, len(nbrs))


def parse_topology(name: str) -> Topology:
    """A built-in name (with optional ":" parameters) or a topology file; ConfigError otherwise."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"topology must be a non-empty string, got {name!r}")
    base, _, arg = name.partition(":")
    base = ALIASES.get(base, base)
    if base in BUILTIN_TOPOLOGIES:
        return Topology(base, _name_params(base, arg, name), source=name)
    path = _resolve_path(name)
    if path is None:
        raise ConfigError(f"unknown topology {name!r}; known: {known_topologies()}")
    return _from_file(path)


def _name_params(kind: str, arg: str, name: str) -> dict[str, Any]:
    if not arg:
        return {}
    keys = _PARAMS.get(kind, ())
    parts = arg.split(":")
    if len(parts) > len(keys):
        raise ConfigError(f"topology {name!r}: {kind} takes {len(keys)} parameter(s) {keys}, got {arg!r}")
    raw = dict(zip(keys, parts, strict=False))
    return _check_params(kind, {k: _number(v, k, name) for k, v in raw.items()}, name)


def _number(text: str, key: str, where: str) -> int | float:
    try:
        return int(text) if key in ("degree", "k") else float(text)
    except ValueError:
        what = "an integer" if key in ("degree", "k") else "a number"
        raise ConfigError(f"topology {where!r}: {key} must be {what}, got {text!r}") from None


def _check_params(kind: str, params: dict[str, Any], where: str) -> dict[str, Any]:
    for key, value in params.items():
        if key in ("degree", "k"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"topology {where!r}: {key} must be an integer >= 1, got {value!r}")
        elif key == "p":
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"topology {where!r}: p must be a number in [0, 1], got {value!r}")
            params[key] = float(value)
        elif key == "connected":
            if not isinstance(value, bool):
                raise ConfigError(f"topology {where!r}: connected must be true or false")
    return params


# --------------------------------------------------------------------------------------------------
# public entry points (used by the node every round)


def neighbours(
    name: str,
    members: Sequence[str],
    me: str,
    round: int,
    seed: int = 0,
    names: Mapping[str, str] | None = None,
) -> list[str]:
    """Node ids of `me`'s neighbours this round (sorted): parse_topology(name).view(...).neighbours.

    Parses `name` on every call: a node keeps the parsed Topology and calls its `view` instead.
    """
    return parse_topology(name).view(members, me, round, seed=seed, names=names).neighbours


@dataclass(frozen=True)
class View:
    """One node's view of the topology in one round: what it sends to and what goes in its header."""

    epoch: str  # epoch_id(members): changes exactly when the member list changes
    index: int  # my position among the sorted member ids
    n: int
    neighbours: list[str]  # node ids, sorted
    degree: int  # len(neighbours): the header's degree field


def epoch_id(members: Iterable[str]) -> str:
    """16 hex chars naming the member list: blake2b of the sorted, newline-joined node ids."""
    ids = sorted(set(members))
    return hashlib.blake2b("\n".join(ids).encode(), digest_size=8).hexdigest()


def is_time_varying(name: str) -> bool:
    """True when the graph changes from round to round (so it must be rebuilt every round)."""
    return parse_topology(name).time_varying


def build_graph(
    name: str, n: int, seed: int = 0, round: int = 0, labels: Sequence[str] | None = None
) -> nx.Graph:
    """Undirected graph on nodes 0..n-1 (inserted in that order, no self-loops).

    `seed` draws random families (a file's own seed wins); `round` drives time-varying families.
    `labels[i]` names node i for edge-list files (default "node-i").
    """
    return parse_topology(name).graph(n, seed=seed, round=round, labels=labels)


# --------------------------------------------------------------------------------------------------
# families


def _empty(n: int) -> nx.Graph:
    return nx.empty_graph(n)


def _relabelled(n: int, g: nx.Graph) -> nx.Graph:
    """Copy g's edges onto a fresh graph with nodes 0..n-1 in order, without self-loops."""
    out = _empty(n)
    out.add_edges_from((u, v) for u, v in g.edges if u != v)
    return out


def _family(kind: str, n: int, seed: int, round: int, params: Mapping[str, Any]) -> nx.Graph:
    if n <= 1:
        return _empty(n)
    if kind == "ring":
        return _relabelled(n, nx.cycle_graph(n))
    if kind == "full":
        return _relabelled(n, nx.complete_graph(n))
    if kind == "star":
        return _relabelled(n, nx.star_graph(n - 1))  # node 0 is the hub
    if kind == "torus":
        r = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)  # r x c grid, r <= sqrt(n)
        grid = nx.grid_2d_graph(r, n // r, periodic=True)
        return _relabelled(n, nx.convert_node_labels_to_integers(grid, ordering="sorted"))
    if kind == "exponential":
        # i ~ i +- 2^k (mod n): the static symmetric exponential graph, degree ~ 2 log2 n
        g = _empty(n)
        hops = [2**k for k in range(max(1, math.ceil(math.log2(n)))) if 2**k < n]
        g.add_edges_from((i, (i + h) % n) for i in range(n) for h in hops if (i + h) % n != i)
        return g
    if kind == "one-peer-exponential":
        tau = max(1, math.ceil(math.log2(n)))
        hop = 1 << (int(round) % tau)
        g = _empty(n)
        g.add_edges_from((i, i ^ hop) for i in range(n) if i < (i ^ hop) < n)
        return g
    if kind == "random-regular":
        d = int(params.get("degree", DEFAULT_REGULAR_DEGREE))
        if (n * d) % 2:
            d += 1  # no d-regular graph when n*d is odd (membership changes): use the next even total
        if n <= d:
            return _relabelled(n, nx.complete_graph(n))  # too few nodes for degree d: everyone
        return _connected(lambda s: nx.random_regular_graph(d, n, seed=s), n, seed, params)
    if kind == "erdos-renyi":
        p = float(params.get("p", min(1.0, 2.0 * math.log(n) / n)))
        return _connected(lambda s: nx.gnp_random_graph(n, p, seed=s), n, seed, params)
    if kind == "small-world":
        k = int(params.get("k", DEFAULT_WS_K))
        p = float(params.get("p", DEFAULT_WS_P))
        if k >= n - 1:
            return _relabelled(n, nx.complete_graph(n))
        return _connected(lambda s: nx.watts_strogatz_graph(n, k, p, seed=s), n, seed, params)
    raise ConfigError(f"unknown topology {kind!r}; known: {known_topologies()}")  # pragma: no cover


def _connected(draw, n: int, seed: int, params: Mapping[str, Any]) -> nx.Graph:
    """First connected draw among seeds seed, seed+1, ... (or the first draw, if connected = false).

    Deterministic, so every node gets the same graph; a disconnected graph would never reach
    consensus. After CONNECT_ATTEMPTS failures the last draw is returned (p too small to connect).
    """
    g = draw(seed)
    if not params.get("connected", True):
        return _relabelled(n, g)
    for attempt in range(1, CONNECT_ATTEMPTS):
        if nx.is_connected(g):
            break
        g = draw(seed + attempt)
    return _relabelled(n, g)


# --------------------------------------------------------------------------------------------------
# files


def _resolve_path(name: str) -> Path | None:
    """A topology file: as given (relative to the working directory), else in the repo's topologies/."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    if not p.is_absolute() and (_TOPOLOGY_DIR / p).is_file():
        return _TOPOLOGY_DIR / p
    if not p.suffix and (_TOPOLOGY_DIR / f"{name}.toml").is_file():
        return _TOPOLOGY_DIR / f"{name}.toml"
    if p.suffix in (".toml", ".txt", ".edges", ".edgelist") or "/" in name:
        raise ConfigError(f"topology file not found: {name!r}")
    return None


def _from_file(path: Path) -> Topology:
    where = str(path)
    if path.suffix != ".toml":
        return Topology("edges", edges=tuple(_read_edge_list(path)), source=where)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"topology file {where!r}: {exc}") from exc
    table = doc.get("topology", doc)
    if not isinstance(table, dict):
        raise ConfigError(f"topology file {where!r}: [topology] must be a table")
    unknown = sorted(set(table) - _FILE_KEYS)
    if unknown:
        raise ConfigError(f"topology file {where!r}: unknown key(s) {unknown}; known: {sorted(_FILE_KEYS)}")
    raw_kind = str(table.get("kind", "edges"))
    kind = ALIASES.get(raw_kind, raw_kind)
    seed = table.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"topology file {where!r}: seed must be an integer")
    if kind != "edges":
        if kind not in BUILTIN_TOPOLOGIES:
            raise ConfigError(
                f"topology file {where!r}: unknown kind {raw_kind!r}; known: {', '.join(FILE_KINDS)}"
            )
        allowed = set(_PARAMS.get(kind, ())) | {"connected"}
        params = {k: table[k] for k in ("degree", "p", "k", "connected") if k in table}
        extra = sorted(set(params) - allowed)
        if extra:
            raise ConfigError(f"topology file {where!r}: {kind} takes no {extra}")
        return Topology(kind, _check_params(kind, params, where), seed=seed, source=where)
    edges = table.get("edges")
    if not isinstance(edges, list):
        raise ConfigError(f'topology file {where!r}: kind = "edges" needs edges = [[a, b], ...]')
    pairs = []
    for k, e in enumerate(edges):
        if not (isinstance(e, list) and len(e) == 2 and all(isinstance(v, str | int) for v in e)):
            raise ConfigError(
                f"topology file {where!r}: edge #{k} must be a pair of names or indices, got {e!r}"
            )
        pairs.append((e[0], e[1]))
    return Topology("edges", edges=tuple(pairs), seed=seed, source=where)


def _read_edge_list(path: Path) -> list[tuple[str, str]]:
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
    return pairs


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

    graph = _empty(n)
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


def _edge_weights(graph: nx.Graph, samples: Sequence[float] | np.ndarray | None):
    """(rows, cols, values) of the off-diagonal weights, both directions.

    Plain MH: w_ij = 1/(1+max(deg_i, deg_j)). With samples s: w_ij = min(1, s_j/s_i)/(1+max(...)),
    the Metropolis-Hastings chain for the target distribution s (aggregation rule "weighted").
    """
    nodes, deg = _degrees(graph)
    pos = {v: k for k, v in enumerate(nodes)}
    s = None if samples is None else np.maximum(np.asarray(samples, dtype=np.float64), 0.0)
    if s is not None and len(s) != len(nodes):
        raise ValueError(f"{len(s)} sample counts for {len(nodes)} nodes")
    rows, cols, vals = [], [], []
    for u, v in graph.edges:
        if u == v:
            continue
        i, j = pos[u], pos[v]
        base = mh_weight(deg[u], deg[v])
        rows += [i, j]
        cols += [j, i]
        if s is None:
            vals += [base, base]
        else:
            vals += [base * sample_accept(s[i], s[j]), base * sample_accept(s[j], s[i])]
    return len(nodes), rows, cols, vals


def edge_arrays(graph: nx.Graph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, degrees) of a graph on nodes 0..n-1: both directions of every edge, sorted by
    row, and each node's degree; the form aggregation.mix_many takes."""
    n = graph.number_of_nodes()
    e = np.array([(u, v) for u, v in graph.edges if u != v], dtype=np.int64).reshape(-1, 2)
    rows = np.concatenate([e[:, 0], e[:, 1]])
    cols = np.concatenate([e[:, 1], e[:, 0]])
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    return rows, cols, np.bincount(rows, minlength=n)


def mixing_matrix(graph: nx.Graph, samples: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Metropolis-Hastings W (dense, float64, rows/cols in graph.nodes order).

    w_ij = 1/(1+max(deg_i, deg_j)) on edges, w_ii = 1 - sum_j w_ij: symmetric and doubly
    stochastic for any undirected graph, using only what neighbours know about each other.
    With `samples`, the row-stochastic weights of rule "weighted" (reversible w.r.t. samples, so
    the conserved average is the sample-weighted one).
    """
    n, rows, cols, vals = _edge_weights(graph, samples)
    w = np.zeros((n, n))
    w[rows, cols] = vals
    w[np.diag_indices_from(w)] = 1.0 - w.sum(axis=1)
    return w


def mixing_matrix_sparse(
    graph: nx.Graph, samples: Sequence[float] | np.ndarray | None = None
) -> sp.csr_matrix:
    """mixing_matrix as scipy.sparse CSR, for large graphs."""
    n, rows, cols, vals = _edge_weights(graph, samples)
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
        sparse: Any = w
        if n <= DENSE_EIG_LIMIT:
            w = sparse.toarray()
        else:
            from scipy.sparse.linalg import eigs, eigsh

            a = sparse.astype(np.float64)
            sym = abs(a - a.T).max() < 1e-12
            vals = (eigsh if sym else eigs)(a, k=2, which="LM", return_eigenvectors=False)
            return float(1.0 - np.sort(np.abs(vals))[-2])
    w = np.asarray(w, dtype=np.float64)
    vals = np.linalg.eigvalsh(w) if np.allclose(w, w.T) else np.linalg.eigvals(w)
    mods = np.sort(np.abs(vals))[::-1]
    return float(1.0 - mods[1])


def topology_gap(
    name: str,
    n: int,
    seed: int = 0,
    samples: Sequence[float] | np.ndarray | None = None,
    labels: Sequence[str] | None = None,
) -> float:
    """Per-round spectral gap of a topology on n nodes (what the experiments report).

    Static graphs: spectral_gap(W). Time-varying ones: 1 - |lambda_2(W_tau ... W_1)|^(1/tau) over one
    period tau = ceil(log2 n), the per-round rate of the product (1.0 when the period averages
    exactly, as one-peer exponential does for n a power of two).
    """
    top = parse_topology(name)
    if n <= 1:
        return 1.0
    if not top.time_varying:
        g = top.graph(n, seed=seed, labels=labels)
        w = mixing_matrix_sparse(g, samples) if n > DENSE_EIG_LIMIT else mixing_matrix(g, samples)
        return spectral_gap(w)
    tau = max(1, math.ceil(math.log2(n)))
    prod = np.eye(n)
    for t in range(tau):
        prod = mixing_matrix(top.graph(n, seed=seed, round=t, labels=labels), samples) @ prod
    mods = np.sort(np.abs(np.linalg.eigvals(prod)))[::-1]
    lam = max(0.0, float(mods[1]))
    return float(1.0 - lam ** (1.0 / tau)) if lam > 1e-12 else 1.0
