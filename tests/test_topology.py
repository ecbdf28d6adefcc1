"""Topologies: builders, files, neighbours over node ids, Metropolis-Hastings W and spectral gaps."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp

from p2pfl.errors import ConfigError
from p2pfl.topology import (
    BUILTIN_TOPOLOGIES,
    TIME_VARYING,
    build_graph,
    edge_arrays,
    epoch_id,
    is_time_varying,
    mixing_matrix,
    mixing_matrix_sparse,
    neighbours,
    parse_topology,
    spectral_gap,
    topology_gap,
)

TOPOLOGIES = Path(__file__).resolve().parent.parent / "p2pfl" / "topologies"


def edges(graph: nx.Graph) -> list[tuple[int, int]]:
    return sorted(tuple(sorted(e)) for e in graph.edges)


# ---------------------------------------------------------------------------------------- builders


def test_ring_small_cases() -> None:
    assert edges(build_graph("ring", 0)) == []
    g1 = build_graph("ring", 1)
    assert list(g1.nodes) == [0] and edges(g1) == []
    assert edges(build_graph("ring", 2)) == [(0, 1)]
    assert edges(build_graph("ring", 3)) == [(0, 1), (0, 2), (1, 2)]
    g = build_graph("ring", 10)
    assert nx.is_connected(g) and all(d == 2 for _, d in g.degree)
    assert list(g.nodes) == list(range(10))


def test_full_and_others_are_simple_connected_graphs() -> None:
    assert edges(build_graph("full", 4)) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    for name in BUILTIN_TOPOLOGIES:
        for n in (2, 3, 5, 16, 17, 64):
            g = build_graph(name, n, seed=3)
            assert list(g.nodes) == list(range(n))
            assert nx.number_of_selfloops(g) == 0
            if name in TIME_VARYING:  # connected over one period, not in every round
                union = nx.compose_all([build_graph(name, n, seed=3, round=t) for t in range(8)])
                assert nx.is_connected(union), (name, n)
            else:
                assert nx.is_connected(g), (name, n)
    assert all(d == 4 for _, d in build_graph("random-regular", 16, seed=1).degree)
    assert all(d == 3 for _, d in build_graph("random-regular:3", 16, seed=1).degree)
    assert edges(build_graph("random-regular", 16, seed=1)) == edges(
        build_graph("random-regular", 16, seed=1)
    )
    assert edges(build_graph("complete", 5)) == edges(build_graph("full", 5))
    # n*d odd has no d-regular graph (a member left): the next degree up instead of an error
    assert all(d == 4 for _, d in build_graph("random-regular:3", 7, seed=1).degree)


def test_unknown_topology_lists_known_names() -> None:
    with pytest.raises(ConfigError) as err:
        build_graph("hypercube", 8)
    for name in ("ring", "full", "toml"):
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        build_graph("no/such/file.toml", 4)
    with pytest.raises(ConfigError):
        build_graph("random-regular:x", 8)


# ---------------------------------------------------------------------------------------- files


def test_edge_list_toml_by_names(tmp_path) -> None:
    labels = ["node-0", "node-1", "node-2", "node-3"]
    g = build_graph(str(TOPOLOGIES / "edges_4.toml"), 4, labels=labels)
    assert edges(g) == [(0, 1), (0, 2), (0, 3), (1, 2), (2, 3)]
    # labels map names -> indices in any order
    g2 = build_graph(str(TOPOLOGIES / "edges_4.toml"), 4, labels=["node-3", "node-2", "node-1", "node-0"])
    assert edges(g2) == [(0, 1), (0, 3), (1, 2), (1, 3), (2, 3)]  # node-k is index 3-k
    # default labels are node-i; missing members' edges are dropped
    assert edges(build_graph(str(TOPOLOGIES / "edges_4.toml"), 3)) == [(0, 1), (0, 2), (1, 2)]
    assert edges(build_graph("edges_4.toml", 4)) == edges(g), "found in the repo's topologies/ directory"


def test_kind_files_match_builtins() -> None:
    for kind in ("ring", "full"):
        for n in (1, 2, 5, 8):
            assert edges(build_graph(str(TOPOLOGIES / f"{kind}.toml"), n)) == edges(build_graph(kind, n))


def test_toml_variants_and_errors(tmp_path) -> None:
    top = tmp_path / "top.toml"
    top.write_text('kind = "edges"\nedges = [[0, 1], [1, 2], ["b", "a"], ["a", "zz"]]\n')
    assert edges(build_graph(str(top), 4, labels=["x", "y", "a", "b"])) == [(0, 1), (1, 2), (2, 3)]
    reg = tmp_path / "reg.toml"
    reg.write_text('[topology]\nkind = "random-regular"\ndegree = 3\nseed = 9\n')
    assert edges(build_graph(str(reg), 10, seed=0)) == edges(build_graph("random-regular:3", 10, seed=9))
    for text in (
        '[topology]\nkind = "hypercube"\n',
        '[topology]\nkind = "ring"\ndegree = 3\n',
        '[topology]\nkind = "random-regular"\ndegree = 0\n',
        '[topology]\nkind = "erdos-renyi"\np = 1.5\n',
        '[topology]\nkind = "ring"\nseed = "x"\n',
        '[topology]\nkind = "ring"\ntypo = 1\n',
        '[topology]\nkind = "edges"\n',
        '[topology]\nkind = "edges"\nedges = [["a"]]\n',
        "[topology\n",
    ):
        top.write_text(text)
        with pytest.raises(ConfigError):
            build_graph(str(top), 4)


def test_plain_text_edge_list(tmp_path) -> None:
    f = tmp_path / "edges.txt"
    f.write_text("# a path\nnode-0 node-1\n\nnode-1 node-2  # trailing comment\n2 3\n")
    assert edges(build_graph(str(f), 4)) == [(0, 1), (1, 2), (2, 3)]
    f.write_text("node-0 node-1 node-2\n")
    with pytest.raises(ConfigError, match="line 1"):
        build_graph(str(f), 4)


# ---------------------------------------------------------------------------------------- neighbours


def test_ring_neighbours_over_sorted_ids_are_symmetric_and_deterministic() -> None:
    members = ["f0", "a1", "c2", "b3", "e4"]
    order = sorted(members)
    for i, me in enumerate(order):
        nbrs = neighbours("ring", members, me, round=0)
        assert nbrs == sorted([order[(i - 1) % 5], order[(i + 1) % 5]])
        assert neighbours("ring", list(reversed(members)), me, round=3) == nbrs
    for me in members:
        for other in neighbours("full", members, me, 0):
            assert me in neighbours("full", members, other, 0)
    # me not (yet) in members: counted in anyway
    assert neighbours("ring", ["b", "c"], "a", 0) == ["b", "c"]
    assert neighbours("ring", ["a"], "a", 0) == []
    assert neighbours("ring", ["a", "b"], "a", 0) == ["b"]


def test_neighbours_from_named_edge_file() -> None:
    ids = {"9f": "node-0", "3a": "node-1", "77": "node-2", "c1": "node-3"}
    members = list(ids)
    by_name = {v: k for k, v in ids.items()}
    path = str(TOPOLOGIES / "edges_4.toml")
    got = {ids[m]: sorted(ids[x] for x in neighbours(path, members, m, 0, names=ids)) for m in members}
    assert got == {
        "node-0": ["node-1", "node-2", "node-3"],
        "node-1": ["node-0", "node-2"],
        "node-2": ["node-0", "node-1", "node-3"],
        "node-3": ["node-0", "node-2"],
    }
    # node-2 offline: its edges vanish, the rest stays
    present = [m for m in members if m != by_name["node-2"]]
    assert neighbours(path, present, by_name["node-1"], 0, names=ids) == [by_name["node-0"]]


# ---------------------------------------------------------------------------------------- mixing


@pytest.mark.parametrize(
    "graph",
    [
        build_graph("ring", 9),
        build_graph("full", 6),
        build_graph(str(TOPOLOGIES / "edges_4.toml"), 4),
        build_graph("random-regular", 12, seed=4),
        nx.star_graph(5),
        nx.path_graph(2),
        build_graph("ring", 1),
    ],
)
def test_mh_matrix_is_symmetric_doubly_stochastic(graph: nx.Graph) -> None:
    w = mixing_matrix(graph)
    assert np.allclose(w, w.T)
    assert np.allclose(w.sum(axis=1), 1.0)
    assert np.all(w >= 0)
    deg = dict(graph.degree)
    for u, v in graph.edges:
        assert w[u, v] == pytest.approx(1 / (1 + max(deg[u], deg[v])))
    ws = mixing_matrix_sparse(graph)
    assert sp.issparse(ws) and np.allclose(ws.toarray(), w)


def test_edge_file_weights_by_hand() -> None:
    w = mixing_matrix(build_graph(str(TOPOLOGIES / "edges_4.toml"), 4))
    # degrees 3, 2, 3, 2: every edge touches a degree-3 node -> 1/4; diagonals 1/4 and 1/2
    expected = np.array(
        [[0.25, 0.25, 0.25, 0.25], [0.25, 0.5, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25], [0.25, 0.0, 0.25, 0.5]]
    )
    assert np.allclose(w, expected)


@pytest.mark.parametrize(
    "name, n, gap",
    [
        ("ring", 16, 0.051),
        ("ring", 64, 0.0032),
        ("torus", 16, 0.40),
        ("torus", 64, 0.117),
        ("exponential", 16, 0.50),
        ("exponential", 64, 0.33),
        ("full", 16, 1.0),
        ("full", 64, 1.0),
    ],
)
def test_spectral_gap_known_values(name: str, n: int, gap: float) -> None:
    g = build_graph(name, n)
    assert spectral_gap(mixing_matrix(g)) == pytest.approx(gap, rel=0.05)
    assert spectral_gap(mixing_matrix_sparse(g)) == pytest.approx(gap, rel=0.05)


def test_spectral_gap_random_regular_and_edge_cases() -> None:
    gaps = [spectral_gap(mixing_matrix(build_graph("random-regular", 16, seed=s))) for s in range(10)]
    assert 0.15 < float(np.mean(gaps)) < 0.35
    assert spectral_gap(np.ones((1, 1))) == 1.0
    disconnected = nx.Graph([(0, 1), (2, 3)])
    assert spectral_gap(mixing_matrix(disconnected)) == pytest.approx(0.0, abs=1e-12)


def test_spectral_gap_sparse_large_graph() -> None:
    g = build_graph("torus", 2500)  # 50 x 50 torus: MH W = (I + A) / 5, lambda_2 = (3 + 2 cos(2 pi / 50)) / 5
    expected = 1 - (3 + 2 * np.cos(2 * np.pi / 50)) / 5
    assert spectral_gap(mixing_matrix_sparse(g)) == pytest.approx(expected, rel=1e-3)


def test_consensus_decays_with_the_gap() -> None:
    w = mixing_matrix(build_graph("torus", 16))
    gap = spectral_gap(w)
    x = np.random.default_rng(0).normal(size=(16, 5))
    dist0 = np.mean((x - x.mean(axis=0)) ** 2)
    for _ in range(20):
        x = w @ x
    assert np.mean((x - x.mean(axis=0)) ** 2) <= dist0 * (1 - gap) ** 40 * 1.0001


# ---------------------------------------------------------------------------------------- families


def test_star_torus_and_exponential_shapes() -> None:
    star = build_graph("star", 6)
    assert dict(star.degree) == {0: 5, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    torus = build_graph("torus", 12)  # 3 x 4 grid with wrap-around
    assert all(d == 4 for _, d in torus.degree) and torus.number_of_edges() == 24
    assert edges(build_graph("torus", 7)) == edges(build_graph("ring", 7)), "prime n: a 1 x n torus is a ring"
    exp = build_graph("exponential", 16)  # hops 1, 2, 4, 8 (8 = n/2 counted once)
    assert all(d == 7 for _, d in exp.degree)
    assert sorted(exp.neighbors(0)) == [1, 2, 4, 8, 12, 14, 15]


def test_one_peer_exponential_is_a_matching_that_changes_every_round() -> None:
    assert is_time_varying("one-peer-exponential") and not is_time_varying("ring")
    seen = []
    for t in range(4):
        g = build_graph("one-peer-exponential", 16, round=t)
        assert all(d == 1 for _, d in g.degree), "a perfect matching for n a power of two"
        seen.append(sorted(g.neighbors(0)))
    assert seen == [[1], [2], [4], [8]]
    assert edges(build_graph("one-peer-exponential", 16, round=4)) == edges(
        build_graph("one-peer-exponential", 16, round=0)
    ), "period ceil(log2 n)"
    g = build_graph("one-peer-exponential", 6, round=2)  # partner i ^ 4 exists only for i = 0, 1
    assert edges(g) == [(0, 4), (1, 5)]
    members = [f"id{k:02d}" for k in range(16)]
    assert neighbours("one-peer-exponential", members, "id00", round=1) == ["id02"]
    assert neighbours("one-peer-exponential", members, "id00", round=2) == ["id04"]


def test_random_families_are_seeded_connected_and_parametrised() -> None:
    for name in ("random-regular", "erdos-renyi", "small-world", "erdos-renyi:0.2", "small-world:6:0.3"):
        a, b = build_graph(name, 40, seed=5), build_graph(name, 40, seed=5)
        assert edges(a) == edges(b), f"{name}: every node must draw the same graph"
        assert nx.is_connected(a)
        assert edges(build_graph(name, 40, seed=6)) != edges(a), f"{name}: the seed matters"
    ws = build_graph("small-world:6:0.0", 20)  # no rewiring: the ring lattice with 6 neighbours
    assert all(d == 6 for _, d in ws.degree)
    full_er = build_graph("erdos-renyi:1", 10)
    assert full_er.number_of_edges() == 45
    # p below the connectivity threshold: redrawn until connected, unless connected = false
    assert nx.is_connected(build_graph("erdos-renyi:0.15", 30, seed=1))
    assert build_graph("small-world:8", 5).number_of_edges() == 10, "k >= n - 1: everyone"
    for bad in ("erdos-renyi:2", "erdos-renyi:x", "small-world:4:0.1:9", "random-regular:0", "ring:3"):
        with pytest.raises(ConfigError):
            build_graph(bad, 10)


def test_aliases_and_labels() -> None:
    assert parse_topology("ws:6:0.2") == parse_topology("small-world:6:0.2")
    assert parse_topology("er").kind == "erdos-renyi" and parse_topology("exp").kind == "exponential"
    assert parse_topology("small-world:6:0.2").label == "small-world:6:0.2"
    assert parse_topology(str(TOPOLOGIES / "edges_4.toml")).label == "edges_4"
    assert parse_topology("ring.toml").kind == "ring", "bare file names resolve in topologies/"
    assert parse_topology("edges_4").kind == "edges"


def test_one_file_per_family_and_files_match_the_builtins() -> None:
    files = {parse_topology(str(p)).kind: p for p in sorted(TOPOLOGIES.glob("*.toml"))}
    assert set(BUILTIN_TOPOLOGIES) | {"edges"} <= set(files)
    same_as = {
        "random-regular": ("random-regular:4", 0),
        "erdos-renyi": ("erdos-renyi:0.3", 0),
        "small-world": ("small-world:4:0.1", 0),
    }
    for kind, path in files.items():
        if kind == "edges":
            continue
        name, seed = same_as.get(kind, (kind, 7))
        for n in (4, 9, 16):
            for t in (0, 1, 2):
                assert edges(build_graph(str(path), n, seed=7, round=t)) == edges(
                    build_graph(name, n, seed=seed, round=t)
                ), (kind, n, t)


# ---------------------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("name", [*BUILTIN_TOPOLOGIES, "edges_4.toml"])
def test_every_node_derives_the_same_graph_without_a_coordinator(name: str) -> None:
    rng = np.random.default_rng(1)
    ids = [f"{int(v):016x}" for v in rng.integers(0, 2**62, size=11)]
    names = {nid: f"node-{k}" for k, nid in enumerate(ids)}
    topo = parse_topology(name)
    for rnd in (1, 2, 3):
        views = {}
        for me in ids:
            seen_by_me = list(rng.permutation(ids))  # each node learns the members in its own order
            views[me] = topo.view(seen_by_me, me, rnd, seed=4, names=names)
        assert len({v.epoch for v in views.values()}) == 1
        for me, v in views.items():
            assert v.degree == len(v.neighbours) and me not in v.neighbours
            for other in v.neighbours:
                assert me in views[other].neighbours, f"{name}: edge {me}-{other} seen from one side only"
        # the header degrees make every node compute the same MH weight for a shared edge
        order = sorted(ids)
        g = nx.empty_graph(len(ids))
        g.add_edges_from((order.index(a), order.index(b)) for a, v in views.items() for b in v.neighbours)
        w = mixing_matrix(g)
        assert np.allclose(w, w.T) and np.allclose(w.sum(axis=1), 1.0)


def test_membership_change_moves_to_a_new_epoch() -> None:
    ids = [f"n{k}" for k in range(8)]
    ring = parse_topology("ring")
    before = ring.view(ids, "n0", 5)
    after = ring.view(ids[:-1], "n0", 5)  # n7 left
    assert before.epoch == epoch_id(ids) == epoch_id(reversed(ids))
    assert after.epoch == epoch_id(ids[:-1]) != before.epoch
    assert before.neighbours == ["n1", "n7"] and after.neighbours == ["n1", "n6"]
    assert (before.n, after.n, before.index) == (8, 7, 0)
    # the node's former formula for the epoch: blake2b of the sorted ids
    import hashlib

    assert epoch_id(ids) == hashlib.blake2b("\n".join(sorted(ids)).encode(), digest_size=8).hexdigest()


def test_edge_arrays_are_both_directions_sorted_by_row() -> None:
    g = build_graph("ring", 5)
    rows, cols, deg = edge_arrays(g)
    assert list(deg) == [2] * 5 and len(rows) == 10
    assert list(rows) == sorted(rows)
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == {
        (u, v) for a, b in g.edges for u, v in ((a, b), (b, a))
    }


# ---------------------------------------------------------------------------------------- gaps


def test_topology_gap_for_static_time_varying_and_weighted() -> None:
    assert topology_gap("ring", 16) == pytest.approx(0.051, rel=0.05)
    assert topology_gap("one-peer-exponential", 16) == 1.0, "log2(n) rounds average exactly"
    g6 = topology_gap("one-peer-exponential", 12)
    assert 0 < g6 < 1
    assert topology_gap("star", 16) == pytest.approx(spectral_gap(mixing_matrix(build_graph("star", 16))))
    s = np.arange(1, 17)
    w = mixing_matrix(build_graph("exponential", 16), samples=s)
    assert np.allclose(w.sum(axis=1), 1.0) and np.all(w >= 0)
    flow = s[:, None] * w
    assert np.allclose(flow, flow.T), "reversible w.r.t. the sample counts"
    assert np.allclose(s @ w, s), "the sample-weighted average is conserved"
    assert topology_gap("exponential", 16, samples=s) == pytest.approx(spectral_gap(w))
    assert np.allclose(mixing_matrix_sparse(build_graph("exponential", 16), samples=s).toarray(), w)
    assert np.allclose(
        mixing_matrix(build_graph("ring", 8), samples=np.full(8, 5.0)), mixing_matrix(build_graph("ring", 8))
    )


# ---------------------------------------------------------------------------------------- Topology.view


@pytest.mark.parametrize("name", ["ring", "random-regular:3", "one-peer-exponential", "edges_4.toml"])
def test_topology_view_equals_the_graph_and_neighbours(name: str) -> None:
    ids = [f"id{k:02d}" for k in range(9)]
    names = {nid: f"node-{k}" for k, nid in enumerate(ids)}
    topo = parse_topology(name)
    for rnd in range(4):
        g = topo.graph(len(ids), seed=5, round=rnd, labels=[names[m] for m in ids])
        for k, me in enumerate(ids):
            v = topo.view(ids[::-1], me, rnd, seed=5, names=names)
            expect = sorted(ids[j] for j in g.neighbors(k))
            assert (v.index, v.n, v.neighbours, v.degree) == (k, len(ids), expect, len(expect))
            assert v.epoch == epoch_id(ids)
            assert neighbours(name, ids, me, rnd, seed=5, names=names) == expect


def test_topology_view_does_not_read_the_file_again(tmp_path, monkeypatch) -> None:
    f = tmp_path / "line.toml"
    f.write_text('[topology]\nkind = "edges"\nedges = [["a", "b"], ["b", "c"]]\n')
    topo = parse_topology(str(f))
    f.unlink()  # parsed once: later rounds need only the Topology
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("topology file read again"))
    for rnd in range(3):
        assert topo.view(["a", "b", "c"], "b", rnd).neighbours == ["a", "c"]


def test_me_is_a_member_even_when_not_listed() -> None:
    v = parse_topology("full").view(["b", "c"], "a", 0)
    assert (v.index, v.n, v.neighbours, v.epoch) == (0, 3, ["b", "c"], epoch_id(["a", "b", "c"]))


# ---------------------------------------------------------------------------------------- files in the package


def test_topology_files_ship_inside_the_package() -> None:
    import p2pfl
    import p2pfl.topology as topology

    pkg = Path(p2pfl.__file__).resolve().parent / "topologies"
    assert topology._TOPOLOGY_DIR == pkg and (pkg / "torus.toml").is_file()
    assert parse_topology("torus.toml").source == str(pkg / "torus.toml")
    assert parse_topology("edges_4").kind == "edges", "bare names resolve in the package directory"
    top = Path(__file__).resolve().parent.parent / "topologies"
    if top.exists():  # the repo's top-level topologies/ is a link to the package's
        assert top.resolve() == pkg


# ---------------------------------------------------------------------------------------- one weight formula


def test_mixing_matrix_uses_the_aggregation_weights() -> None:
    from p2pfl.aggregation.weights import mh_weight, sample_accept

    g = build_graph("random-regular:3", 10, seed=2)
    g.add_edge(0, 5)  # irregular degrees
    deg = dict(g.degree)
    samples = np.arange(10, dtype=float) * 7.0
    w, ws = mixing_matrix(g), mixing_matrix(g, samples)
    for i, j in g.edges:
        assert w[i, j] == w[j, i] == mh_weight(deg[i], deg[j])
        assert ws[i, j] == mh_weight(deg[i], deg[j]) * sample_accept(samples[i], samples[j])
        assert ws[j, i] == mh_weight(deg[j], deg[i]) * sample_accept(samples[j], samples[i])
