"""Gossip mixing: MH weights, plain averaging, and self-centred clipping bounding an outlier's pull."""

from __future__ import annotations

import json

import numpy as np
import pytest

from p2pfl.aggregation import ADAPTIVE_SLACK, MixResult, Neighbour, Reputation, mh_weight, mix
from p2pfl.errors import ConfigError
from p2pfl.topology import build_graph, mixing_matrix

P = 1000


def vec(rng: np.random.Generator, scale: float = 1.0, around: np.ndarray | None = None) -> np.ndarray:
    base = np.zeros(P, dtype=np.float32) if around is None else around
    return (base + scale * rng.normal(size=P)).astype(np.float32)


def nb(node_id: str, vector: np.ndarray, degree: int = 3) -> Neighbour:
    return Neighbour(node_id=node_id, vector=vector, degree=degree, samples=100)


def test_mh_weight() -> None:
    assert mh_weight(2, 2) == pytest.approx(1 / 3)
    assert mh_weight(2, 5) == pytest.approx(1 / 6)
    assert mh_weight(5, 2) == pytest.approx(1 / 6)
    assert mh_weight(3, 0) == pytest.approx(1 / 4), (
        "a neighbour cannot raise its weight by claiming a low degree"
    )
    assert mh_weight(0, 0) == 1.0


@pytest.mark.parametrize("rule", ["mean", "clipped"])
def test_equal_neighbours_leave_the_model_unchanged(rule: str) -> None:
    x = vec(np.random.default_rng(0))
    res = mix(x, 3, [nb(str(k), x.copy()) for k in range(3)], rule=rule)
    assert isinstance(res, MixResult)
    assert np.array_equal(res.vector, x)
    assert res.vector is not x and res.vector.dtype == np.float32
    assert res.own_weight == pytest.approx(0.25)
    assert res.distances == {"0": 0.0, "1": 0.0, "2": 0.0}
    assert not any(res.clipped.values())


def test_mean_matches_mh_formula_and_missing_weight_stays_home() -> None:
    rng = np.random.default_rng(1)
    x, a, b = vec(rng), vec(rng), vec(rng)
    res = mix(x, 3, [nb("a", a, degree=2), nb("b", b, degree=4)], rule="mean")
    wa, wb = 1 / 4, 1 / 5  # third neighbour missing: its 1/4 stays on x
    assert res.weights == {"a": pytest.approx(wa), "b": pytest.approx(wb)}
    assert res.own_weight == pytest.approx(1 - wa - wb)
    assert np.allclose(res.vector, (1 - wa - wb) * x + wa * a + wb * b, atol=1e-5)
    assert res.radius is None
    assert res.distances["a"] == pytest.approx(float(np.linalg.norm(a - x)), rel=1e-5)
    assert np.array_equal(mix(x, 2, [], rule="mean").vector, x)


def test_one_gossip_step_everywhere_equals_w_times_x() -> None:
    g = build_graph("random-regular:3", 10, seed=2)
    g.add_edge(0, 5)  # irregular degrees
    w = mixing_matrix(g)
    rng = np.random.default_rng(3)
    xs = [vec(rng) for _ in range(10)]
    deg = dict(g.degree)
    for i in range(10):
        res = mix(xs[i], deg[i], [nb(str(j), xs[j], deg[j]) for j in g.neighbors(i)], rule="mean")
        assert np.allclose(res.vector, w[i] @ np.stack(xs), atol=1e-5)
        assert res.own_weight == pytest.approx(w[i, i])


def test_clipped_equals_mean_when_no_neighbour_exceeds_the_radius() -> None:
    rng = np.random.default_rng(4)
    x = vec(rng)
    nbs = [nb(str(k), vec(rng, 0.1, x), degree=4) for k in range(4)]
    mean = mix(x, 4, nbs, rule="mean")
    fixed = mix(x, 4, nbs, rule="clipped", radius=max(mean.distances.values()) * 1.01)
    assert np.array_equal(fixed.vector, mean.vector)
    assert not any(fixed.clipped.values())
    # adaptive: honest neighbours at similar distances all pass unclipped
    adaptive = mix(x, 4, nbs, rule="clipped")
    assert adaptive.radius is not None and adaptive.radius >= max(mean.distances.values())
    assert not any(adaptive.clipped.values())
    assert np.array_equal(adaptive.vector, mean.vector)


@pytest.mark.parametrize("radius", [None, 0.5])
@pytest.mark.parametrize("degree", [2, 4])
def test_clipping_bounds_the_pull_of_a_far_neighbour(radius: float | None, degree: int) -> None:
    rng = np.random.default_rng(5)
    x = vec(rng)
    honest = [nb(f"h{k}", vec(rng, 0.02, x), degree=degree) for k in range(degree - 1)]
    direction = rng.normal(size=P)
    far = (x + 1e6 * direction / np.linalg.norm(direction)).astype(np.float32)
    attacker = nb("bad", far, degree=degree)

    res = mix(x, degree, [*honest, attacker], rule="clipped", radius=radius)
    without = mix(x, degree, honest, rule="clipped", radius=res.radius)
    w = res.weights["bad"]
    tau = res.radius
    assert tau is not None and tau < 10.0, "the adaptive radius follows the honest distances"
    if radius is None:
        votes = sorted([0.0, *res.distances.values()])  # the node itself votes at distance 0
        assert tau == pytest.approx(ADAPTIVE_SLACK * votes[len(votes) // 2])
    assert res.clipped["bad"] and res.distances["bad"] == pytest.approx(1e6, rel=1e-3)
    pull = float(np.linalg.norm(res.vector - without.vector))
    assert pull <= w * tau * (1 + 1e-4)
    assert float(np.linalg.norm(res.vector - x)) <= sum(res.weights.values()) * tau * (1 + 1e-4)

    mean = mix(x, degree, [*honest, attacker], rule="mean")
    assert float(np.linalg.norm(mean.vector - x)) > 1e5 * w, "plain averaging is dragged away"


def test_adaptive_radius_on_a_ring_uses_the_nearer_honest_neighbour() -> None:
    rng = np.random.default_rng(6)
    x = vec(rng)
    honest = vec(rng, 0.05, x)
    res = mix(x, 2, [nb("h", honest, 2), nb("bad", x + 1000.0, 2)], rule="clipped")
    assert res.radius == pytest.approx(ADAPTIVE_SLACK * res.distances["h"], rel=1e-6)
    assert not res.clipped["h"] and res.clipped["bad"] and res.radius is not None
    assert float(np.linalg.norm(res.vector - x)) <= (2 / 3) * res.radius * (1 + 1e-5)


def test_far_outlier_with_huge_values_does_not_overflow() -> None:
    x = np.zeros(P, dtype=np.float32)
    huge = np.full(P, 1e30, dtype=np.float32)  # ||huge||^2 overflows float32
    res = mix(x, 3, [nb("a", x + 0.1), nb("b", x - 0.1), nb("bad", huge)], rule="clipped")
    assert np.isfinite(res.distances["bad"]) and res.distances["bad"] == pytest.approx(
        1e30 * np.sqrt(P), rel=1e-3
    )
    assert np.all(np.isfinite(res.vector)) and res.radius is not None
    assert float(np.linalg.norm(res.vector)) <= 0.75 * res.radius * 1.0001


def test_non_finite_neighbour_is_ignored() -> None:
    x = np.ones(P, dtype=np.float32)
    bad = x.copy()
    bad[3] = np.nan
    res = mix(x, 2, [nb("ok", x + 1.0, 2), nb("nan", bad, 2)], rule="mean")
    assert res.weights["nan"] == 0.0 and res.clipped["nan"] and res.distances["nan"] == float("inf")
    assert np.allclose(res.vector, x + 1.0 / 3.0)
    assert res.own_weight == pytest.approx(2 / 3)


def test_own_degree_below_the_number_of_neighbours_keeps_weights_convex() -> None:
    x = np.zeros(10, dtype=np.float32)
    res = mix(x, 1, [nb(str(k), x + 1.0, degree=1) for k in range(4)], rule="mean")
    assert res.own_weight >= 0 and sum(res.weights.values()) <= 1.0
    assert np.allclose(res.vector, 4 / 5)


def test_zero_radius_means_no_movement_and_errors() -> None:
    x = np.zeros(10, dtype=np.float32)
    assert np.array_equal(mix(x, 1, [nb("a", x + 1.0, 1)], rule="clipped", radius=0.0).vector, x)
    with pytest.raises(ConfigError, match="clipped, mean, weighted, push-sum, trimmed-mean, median, robust"):
        mix(x, 1, [], rule="no-such-rule")
    with pytest.raises(ConfigError):
        mix(x, 1, [], rule="clipped", radius=-1.0)
    with pytest.raises(ValueError):
        mix(x, 1, [nb("a", np.zeros(9, dtype=np.float32), 1)])
    with pytest.raises(ValueError, match="duplicate"):
        mix(x, 2, [nb("a", x, 1), nb("a", x, 1)])


# ---------------------------------------------------------------------------------------- mix_many

from p2pfl.aggregation import RULES, mix_many, sample_accept  # noqa: E402
from p2pfl.topology import edge_arrays  # noqa: E402


def _one_by_one(x, rows, cols, deg, rule, samples, mass, radius=None, sent=None, reps=None):
    """mix() at every node, as real nodes would run it with the header fields they received."""
    out, ws, masses, radii, results = [], [], [], [], []
    sent = x if sent is None else sent
    for i in range(len(x)):
        got = [
            Neighbour(str(j), sent[j], int(deg[j]), int(samples[j]), float(mass[j])) for j in cols[rows == i]
        ]
        r = mix(
            x[i],
            int(deg[i]),
            got,
            rule,
            radius,
            own_samples=int(samples[i]),
            own_mass=float(mass[i]),
            reputation=None if reps is None else reps[i],
        )
        out.append(r.vector)
        ws.append(r.own_weight)
        masses.append(r.mass)
        radii.append(r.radius)
        results.append(r)
    return np.stack(out), np.array(ws), masses, radii, results


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("radius", [None, 2.0])
def test_mix_many_equals_mix_at_every_node(rule: str, radius: float | None) -> None:
    g = build_graph("erdos-renyi:0.3", 20, seed=1)
    g.add_edge(0, 19)
    rows, cols, deg = edge_arrays(g)
    keep = np.random.default_rng(9).random(len(rows)) > 0.2  # some updates did not arrive
    rows, cols = rows[keep], cols[keep]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 50)).astype(np.float32)
    x[3] += 5.0  # one far node, so clipping bites
    x[7, 4] = np.nan  # one broken node: ignored by its neighbours
    samples = rng.integers(1, 100, 20)
    mass = rng.uniform(1, 50, 20)
    sent = x.copy()
    sent[11] = -10.0 * x[11]  # one node sends something other than its own model (an attacker)
    reps_many = [Reputation() for _ in range(20)]
    reps_one = [Reputation() for _ in range(20)]
    for _ in range(3):  # a few rounds, so the reputations have history
        many = mix_many(
            x, rows, cols, deg, rule, radius, samples=samples, mass=mass, sent=sent, reputations=reps_many
        )
        one, own_w, masses, radii, results = _one_by_one(
            x, rows, cols, deg, rule, samples, mass, radius, sent=sent, reps=reps_one
        )
    ok = np.arange(20) != 7
    assert np.allclose(many.vectors[ok], one[ok], atol=1e-5)
    if rule != "robust":
        assert np.array_equal(many.vectors[7], x[7], equal_nan=True)
    assert np.allclose(many.own_weight[ok], own_w[ok], atol=1e-9)
    if rule == "push-sum":
        assert many.mass is not None
        assert np.allclose(many.mass[ok], np.array(masses)[ok], rtol=1e-12)
    if rule in ("clipped", "robust"):
        assert many.radius is not None
        assert np.allclose(many.radius[ok], np.array(radii, dtype=float)[ok], rtol=1e-5)
    if rule == "robust":
        assert many.reputation is not None and many.downweighted is not None
        for i in np.flatnonzero(ok):
            assert many.reputation[i] == pytest.approx(results[i].reputation)
            assert many.downweighted[i] == results[i].downweighted
        assert any("11" in r for r in many.downweighted), "the far sender is down-weighted"
    else:
        assert many.reputation is None and many.downweighted is None
    if rule in ("trimmed-mean", "median"):
        for i in np.flatnonzero(ok):
            row = many.matrix[i].toarray().ravel()
            for nid, wgt in results[i].weights.items():
                assert row[int(nid)] == pytest.approx(wgt, abs=1e-12)


def test_mix_many_mean_is_the_mh_matrix() -> None:
    g = build_graph("torus", 16)
    rows, cols, deg = edge_arrays(g)
    x = np.random.default_rng(1).normal(size=(16, 4)).astype(np.float32)
    res = mix_many(x, rows, cols, deg, "mean")
    assert np.allclose(res.matrix.toarray(), mixing_matrix(g))
    assert np.allclose(res.vectors, mixing_matrix(g) @ x, atol=1e-6)


# ---------------------------------------------------------------------------------------- weighting by data size


def test_sample_accept() -> None:
    assert sample_accept(100, 50) == 0.5 and sample_accept(50, 100) == 1.0
    assert sample_accept(0, 10) == 1.0 and sample_accept(10, 0) == 0.0 and sample_accept(10, -5) == 0.0


def test_weighted_rule_caps_a_neighbour_at_the_mh_weight_whatever_samples_it_claims() -> None:
    x = np.zeros(10, dtype=np.float32)
    big = mix(x, 2, [nb("a", x + 1.0, 2), Neighbour("b", x - 1.0, 2, 10**9)], "weighted", own_samples=100)
    assert big.weights == {"a": pytest.approx(1 / 3), "b": pytest.approx(1 / 3)}
    small = mix(x, 2, [Neighbour("a", x + 1.0, 2, 25)], "weighted", own_samples=100)
    assert small.weights["a"] == pytest.approx(1 / 3 * 0.25)
    assert np.allclose(small.vector, 1 / 12) and small.own_weight == pytest.approx(1 - 1 / 12)
    with pytest.raises(ValueError, match="own_samples"):
        mix(x, 1, [], "weighted")


def _gossip_per_node(rule: str, x0: np.ndarray, samples: np.ndarray, graph, rounds: int):
    """Averaging only, every node running mix() with what its neighbours sent (vector, degree,
    samples and, for push-sum, its mass), exactly as node.py would."""
    deg = dict(graph.degree)
    x, mass = x0.copy(), samples.astype(float)
    for _ in range(rounds):
        new, new_mass = np.empty_like(x), mass.copy()
        for i in graph.nodes:
            got = [
                Neighbour(str(j), x[j], deg[j], int(samples[j]), float(mass[j])) for j in graph.neighbors(i)
            ]
            r = mix(x[i], deg[i], got, rule, own_samples=int(samples[i]), own_mass=float(mass[i]))
            new[i] = r.vector
            if r.mass is not None:
                new_mass[i] = r.mass
        x, mass = new, new_mass
    return x, mass


@pytest.mark.parametrize("rule", ["weighted", "push-sum"])
def test_weighted_rules_converge_to_the_sample_weighted_average_where_mh_gives_the_plain_one(
    rule: str,
) -> None:
    g = build_graph("erdos-renyi:0.4", 10, seed=3)
    samples = np.array([5, 100, 20, 20, 60, 10, 80, 7, 90, 33])
    rounds = 800  # "weighted" mixes slower when sizes are skewed: gap 0.021 here against 0.216 for MH
    x0 = np.random.default_rng(2).normal(size=(10, 6)).astype(np.float32)
    plain_avg = x0.astype(np.float64).mean(axis=0)
    weighted_avg = (samples[:, None] * x0.astype(np.float64)).sum(axis=0) / samples.sum()
    assert np.abs(plain_avg - weighted_avg).max() > 0.1, "the two averages must be told apart"

    mh, _ = _gossip_per_node("mean", x0, samples, g, rounds)
    assert np.abs(mh - plain_avg).max() < 1e-4
    assert np.abs(mh - weighted_avg).max() > 0.1

    x, mass = _gossip_per_node(rule, x0, samples, g, rounds)
    assert np.abs(x - weighted_avg).max() < 1e-4, f"{rule} reaches the sample-weighted average"
    if rule == "push-sum":
        assert mass.sum() == pytest.approx(samples.sum()), "push-sum conserves the total mass"
        assert np.allclose(mass, samples.mean(), rtol=1e-4)

    # the vectorised form (the simulator) reaches the same fixed point
    rows, cols, deg = edge_arrays(g)
    xv, m = x0.copy(), samples.astype(float)
    for _ in range(rounds):
        res = mix_many(xv, rows, cols, deg, rule, samples=samples, mass=m)
        xv, m = res.vectors, res.mass if res.mass is not None else m
    assert np.abs(xv - weighted_avg).max() < 1e-4


def test_push_sum_step_by_hand_and_its_state() -> None:
    x = np.zeros(4, dtype=np.float32)
    # own mass 10 with degree 1, one neighbour of degree 1 with mass 30 at x = 1: w = 1/2
    r = mix(x, 1, [Neighbour("a", x + 1.0, 1, 999, mass=30.0)], "push-sum", own_mass=10.0)
    assert r.mass == pytest.approx(20.0)  # 0.5 * 10 + 0.5 * 30
    assert np.allclose(r.vector, 15.0 / 20.0)  # (0.5*10*0 + 0.5*30*1) / 20
    assert r.weights["a"] == pytest.approx(0.75) and r.own_weight == pytest.approx(0.25)
    # first round: mass defaults to the sample counts
    first = mix(x, 1, [Neighbour("a", x + 1.0, 1, 30)], "push-sum", own_samples=10)
    assert first.mass == pytest.approx(20.0) and np.allclose(first.vector, 0.75)
    # a missing neighbour's share of the mass stays home
    alone = mix(x, 2, [Neighbour("a", x + 1.0, 2, 30, mass=30.0)], "push-sum", own_mass=10.0)
    assert alone.mass == pytest.approx(10 * (2 / 3) + 30 / 3)
    # a neighbour with a broken mass is ignored
    bad = mix(x, 1, [Neighbour("a", x + 1.0, 1, 30, mass=float("nan"))], "push-sum", own_mass=10.0)
    assert np.array_equal(bad.vector, x) and bad.mass == pytest.approx(10.0) and bad.clipped["a"]
    with pytest.raises(ValueError, match="own_mass"):
        mix(x, 1, [], "push-sum")
    assert mix(x, 1, [], "mean").mass is None


def test_neighbour_and_result_stay_backward_compatible() -> None:
    n = Neighbour("a", np.zeros(3, dtype=np.float32), 2, 10)  # the node's positional form
    assert n.mass is None
    r = MixResult(np.zeros(3), 1.0, {}, {}, {}, None)
    assert r.mass is None


# ---------------------------------------------------------------------------------------- robust rules

from p2pfl.aggregation import (  # noqa: E402
    DEFAULT_RULE,
    REPUTATION_ACCEPT,
    REPUTATION_FLAGRANT,
    REPUTATION_PENALTY,
    REPUTATION_RECOVERY,
    REPUTATION_SUSPECT_FLOOR,
    sketch_index,
    trim_count,
)


def test_default_rule_is_robust() -> None:
    assert DEFAULT_RULE == "robust" and {"robust", "trimmed-mean", "median"} <= set(RULES)


def test_trimmed_mean_and_median_on_small_vectors() -> None:
    x = np.array([0.0, 10.0, -1.0], dtype=np.float32)
    others = [
        np.array([1.0, 20.0, -2.0], dtype=np.float32),
        np.array([2.0, 30.0, -3.0], dtype=np.float32),
        np.array([3.0, 40.0, -4.0], dtype=np.float32),
        np.array([100.0, -1000.0, 7.0], dtype=np.float32),  # an outlier in every coordinate
    ]
    got = [nb(str(k), v, degree=4) for k, v in enumerate(others)]
    tm = mix(x, 4, got, rule="trimmed-mean")  # 5 votes: drop 1 on each side, average 3
    assert np.allclose(tm.vector, [2.0, 20.0, -2.0])
    assert tm.radius is None and tm.reputation == {} and tm.downweighted == {}
    assert tm.own_weight + sum(tm.weights.values()) == pytest.approx(1.0)
    assert tm.weights["3"] == 0.0 and tm.clipped["3"], "the outlier was trimmed everywhere"
    assert tm.weights["1"] == pytest.approx(1 / 3) and not tm.clipped["1"]
    med = mix(x, 4, got, rule="median")
    assert np.allclose(med.vector, [2.0, 20.0, -2.0])
    assert med.weights == {"0": pytest.approx(2 / 3), "1": pytest.approx(1 / 3), "2": 0.0, "3": 0.0}
    even = mix(x, 4, got[:3], rule="median")  # 4 votes: mean of the middle two
    assert np.allclose(even.vector, [1.5, 25.0, -2.5])
    assert np.allclose(
        mix(x, 4, got, rule="trimmed-mean", trim=0).vector, np.mean([x, *others], 0), atol=1e-4
    )
    assert np.allclose(mix(x, 4, got, rule="trimmed-mean", trim=9).vector, med.vector)  # capped: the median
    assert np.array_equal(mix(x, 4, [], rule="median").vector, x)
    assert [trim_count(k) for k in (1, 2, 3, 5, 6, 10, 11, 17)] == [0, 0, 1, 1, 2, 2, 3, 4]
    bad = x.copy()
    bad[0] = np.inf
    res = mix(x, 4, [*got[:2], nb("nan", bad)], rule="median")  # a non-finite vote is ignored
    assert np.allclose(res.vector, [1.0, 20.0, -2.0]) and res.weights["nan"] == 0.0 and res.clipped["nan"]


def test_robust_needs_a_reputation_and_equals_mean_without_attacker() -> None:
    rng = np.random.default_rng(7)
    x = vec(rng)
    with pytest.raises(ValueError, match="reputation"):
        mix(x, 3, [nb("a", x)], rule="robust")
    rep = Reputation()
    for r in range(30):  # honest neighbours: similar distances, every model changes every round
        x = vec(rng, 0.05, x)
        got = [nb(str(k), vec(rng, 0.1, x), degree=4) for k in range(4)]
        res = mix(x, 4, got, rule="robust", reputation=rep)
        mean = mix(x, 4, got, rule="mean")
        assert res.reputation == {str(k): 1.0 for k in range(4)}, r
        assert res.downweighted == {} and res.radius is not None
        assert np.allclose(res.vector, mean.vector, atol=1e-6) and res.weights == mean.weights
    assert mix(x, 4, got, rule="clipped").reputation == {}, "other rules leave the new fields empty"


def test_reputation_drops_a_persistent_outlier_within_a_few_rounds_and_recovers_slowly() -> None:
    rng = np.random.default_rng(8)
    x = vec(rng)
    rep = Reputation()
    history = []
    for _ in range(10):  # "bad" sends its sign-flipped model
        x = vec(rng, 0.05, x)
        honest = [nb(f"h{k}", vec(rng, 0.1, x), degree=4) for k in range(3)]
        res = mix(x, 4, [*honest, nb("bad", -x, degree=4)], rule="robust", reputation=rep)
        history.append(res.reputation["bad"])
        assert all(res.reputation[f"h{k}"] == 1.0 for k in range(3))
    # flagrant (its model is farther from ours than ours from zero): held back one round (clipping
    # bounds its pull meanwhile), then both failures count
    assert history[:3] == [1.0, REPUTATION_PENALTY**2, REPUTATION_PENALTY**3] and history[-1] < 0.01
    assert res.weights["bad"] == pytest.approx(0.2 * history[-1])
    assert res.own_weight == pytest.approx(1 - 3 * 0.2 - res.weights["bad"]), "its weight stays home"
    reason = res.downweighted["bad"]
    assert reason.startswith("distance ") and "x reference, clipped 8/8 rounds, failed 8/8" in reason
    # pull of the outlier is now negligible: the step is (almost) honest gossip
    honest_only = mix(x, 4, honest, rule="mean")
    assert float(np.linalg.norm(res.vector - honest_only.vector)) < 1e-2 * float(np.linalg.norm(x))

    after = []
    for _ in range(25):  # it behaves again
        x = vec(rng, 0.05, x)
        got = [nb(f"h{k}", vec(rng, 0.1, x), degree=4) for k in range(3)]
        res = mix(x, 4, [*got, nb("bad", vec(rng, 0.1, x), degree=4)], rule="robust", reputation=rep)
        after.append(res.reputation["bad"])
    assert after[4] < 0.3, "slowly: a quarter after 5 good rounds"
    # + recovery per clean round, once the window no longer shows it clipped most of the time
    assert history[-1] + 7 * REPUTATION_RECOVERY <= after[9] <= history[-1] + 10 * REPUTATION_RECOVERY + 1e-9
    assert after[-1] == 1.0 and "bad" not in res.downweighted


def test_reputation_catches_a_replayed_stale_vector_and_ignores_clipping_with_two_neighbours() -> None:
    rng = np.random.default_rng(9)
    x = vec(rng)
    stale = vec(rng, 0.1, x)
    rep = Reputation()
    for _ in range(6):
        x = vec(rng, 0.05, x)
        got = [nb(f"h{k}", vec(rng, 0.1, x), degree=4) for k in range(3)]
        res = mix(x, 4, [*got, nb("old", stale, degree=4)], rule="robust", reputation=rep)
    assert res.reputation["old"] < 0.1 and "unchanged 5/6" in res.downweighted["old"]
    assert all(res.reputation[f"h{k}"] == 1.0 for k in range(3))
    assert Reputation(sketch=0).sketch_of(x) is None
    assert np.array_equal(sketch_index(1000), sketch_index(1000)) and len(sketch_index(1000)) == 128
    assert np.array_equal(sketch_index(50), np.arange(50))

    ring = Reputation()  # two neighbours: the farther one is clipped every round, which is no evidence
    for _ in range(20):
        s = ring.update({"near": 1.0, "far": 2.0})  # radius 1.5 x 1.0: "far" clipped, ratio 2 < 3
    assert s == {"near": 1.0, "far": 1.0}
    four = Reputation(persistent_cap=0.5)  # with four neighbours, persistent clipping can cap the score
    for _ in range(20):
        s = four.update({"a": 1.0, "b": 1.1, "c": 1.2, "far": 2.0})
    assert s["far"] == 0.5 and s["a"] == 1.0
    assert Reputation().update({"a": 1.0, "b": 1.1, "c": 1.2, "far": 2.0})["far"] == 1.0, "off by default"


def test_reputation_state_is_bounded_and_forgettable_and_checks_its_options() -> None:
    rep = Reputation(max_tracked=3)
    for k in range(5):
        rep.update({f"n{k}": 1.0, f"m{k}": 1.0})
    assert len(rep) == 3 and "n4" in rep and "m4" in rep and "n0" not in rep
    for _ in range(3):
        rep.update({"n4": 1.0, "a": 1.0, "b": 100.0})  # "b" fails: 100x the reference, three times
    assert rep.score("b") == REPUTATION_PENALTY**3 and rep.score("never-seen") == 1.0
    rep.forget("b")
    assert "b" not in rep and rep.score("b") == 1.0 and rep.reason("b") == "unknown"
    rep.forget("not-there")
    assert rep.update({"x": float("nan"), "y": 1.0, "z": 1.0}) == {"x": 0.5, "y": 1.0, "z": 1.0}
    assert "unusable vector" in rep.reason("x")
    same = Reputation()  # every vote equal to the node's own model: no scale, no evidence
    assert same.update({"a": 0.0, "b": 0.0, "c": 5.0}) == {"a": 1.0, "b": 1.0, "c": 1.0}
    for bad in (
        dict(accept=0),
        dict(penalty=1.0),
        dict(window=0),
        dict(gamma=-1.0),
        dict(max_tracked=0),
        dict(confirm=0),
        dict(confirm=5),  # more than the confirmation window
        dict(confirm_window=9),  # more than the window
        dict(history=-1),
        dict(flagrant=0.5),
        dict(suspect_floor=2.0),
    ):
        with pytest.raises(ConfigError):
            Reputation(**bad)


def test_balance_test_with_time_decay() -> None:
    # BALANCE (Fang et al.): accept iff d <= gamma * exp(-kappa t / T) * ||x_i||
    rep = Reputation(gamma=0.5, kappa=2.0, horizon=10, accept=100.0, warmup=0, suspect_floor=0.0)
    assert rep.needs_norm and Reputation().threshold(1.0) is None
    assert rep.update({"a": 0.4, "b": 0.4, "c": 0.4}, own_norm=1.0) == {"a": 1.0, "b": 1.0, "c": 1.0}
    # t = 1 now: threshold 0.5 * exp(-0.2) = 0.41; at t = 5 it is 0.5 * exp(-1) = 0.18
    for _ in range(4):
        s = rep.update({"a": 0.4, "b": 0.4, "c": 0.4}, own_norm=1.0)
    assert rep.threshold(1.0) == pytest.approx(0.5 * np.exp(-1.0))
    assert s["a"] < 1.0, "the same distance fails once the threshold has decayed"
    x = np.ones(P, dtype=np.float32)
    res = mix(
        x,
        3,
        [nb("a", x * 1.01), nb("b", x * 0.99), nb("c", x * 3)],
        "robust",
        reputation=Reputation(gamma=0.5, confirm=1),  # confirm=1: one failed round counts at once
    )
    assert res.reputation["c"] == 0.5 and res.reputation["a"] == 1.0


MODERATE = REPUTATION_ACCEPT * (1 + REPUTATION_FLAGRANT) / 2  # a ratio beyond accept, not flagrant


def test_reputation_forgives_one_off_spikes_and_waits_for_repetition() -> None:
    # an honest neighbour with a spiky update now and then (late, or a noisy local step) keeps its
    # weight; the same distance in 3 of 4 rounds is a pattern (then every held-back round counts,
    # here down to the floor of a moderate outlier, which by default is no cut at all)
    rep = Reputation(warmup=0, suspect_floor=0.5)
    spiky = MODERATE
    for spike in [1, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0]:  # never 3 failures within 4 rounds
        s = rep.update({"a": 1.0, "b": 1.1, "spiky": spiky if spike else 1.2})
        assert s["spiky"] == 1.0 and "spiky" in rep
    assert [rep.update({"a": 1.0, "b": 1.1, "spiky": spiky})["spiky"] for _ in range(4)] == [
        1.0,
        1.0,
        0.5,
        0.5,
    ]
    assert "failed 4/8" in rep.reason("spiky")
    # flagrant evidence (far beyond flagrant x accept) has no floor; a forgiven spike leaves no debt
    rep = Reputation(warmup=0)
    for spike in [1, 0, 0, 0, 1, 0, 0, 0]:
        assert rep.update({"a": 1.0, "b": 1.1, "far": 100.0 if spike else 1.2})["far"] == 1.0
    assert [rep.update({"a": 1.0, "b": 1.1, "far": 100.0})["far"] for _ in range(3)] == [
        1.0,
        1.0,
        REPUTATION_PENALTY**3,
    ]
    # what no honest model does (farther from our model than our model is from zero) needs only
    # two rounds in four
    rep = Reputation(warmup=0)
    norm = 10.0
    got = [rep.update({"a": 1.0, "b": 1.1, "flip": 2 * norm}, own_norm=norm)["flip"] for _ in range(3)]
    assert got == [1.0, REPUTATION_PENALTY**2, REPUTATION_PENALTY**3]


def test_reputation_reference_does_not_collapse_with_the_training_step() -> None:
    # near convergence a single training step can shrink a hundredfold while honest neighbours stay
    # where they were: the reference keeps to the node's recent references and typical step
    earlier = Reputation(history=0, step_cap=4.0, accept=3.0, confirm=1, suspect_floor=0.0)
    now = Reputation(history=32)
    honest = {"a": 0.3, "b": 0.35}
    for r in range(40):
        step = 0.1 if r < 30 else 0.001  # the step collapses for the last 10 rounds
        s_earlier, s_now = earlier.update(honest, own_step=step), now.update(honest, own_step=step)
    assert s_now == {"a": 1.0, "b": 1.0}
    assert now.reference(list(honest.values()), 0.001) == pytest.approx(0.3)
    # the one-round cap: 75x "too far" (both neighbours only keep their weight because, all being
    # far at once, the distances single no one out)
    assert earlier.reference(list(honest.values()), 0.001) == pytest.approx(0.004)
    assert s_earlier == {"a": 1.0, "b": 1.0}
    # the floor only holds the reference up: a Byzantine majority still meets the typical-step cap
    rep = Reputation(history=8)
    for _ in range(8):
        rep.update({"h": 1.0, "b1": 500.0, "b2": 500.0}, own_step=0.5)
    assert rep.reference([1.0, 500.0, 500.0], 0.5) == pytest.approx(rep.step_cap * 0.5)
    assert rep.score("b1") < 0.1 and rep.score("h") == 1.0


def test_a_node_that_moved_itself_does_not_blame_its_neighbours() -> None:
    # a spiky local step (or a restart) puts this node far from everyone at once: no one is singled out
    rep = Reputation(warmup=0)
    for _ in range(6):
        rep.update({"a": 1.0, "b": 1.1, "c": 0.9})
    for _ in range(5):
        s = rep.update({"a": 20.0, "b": 21.0, "c": 19.0})
    assert s == {"a": 1.0, "b": 1.0, "c": 1.0}
    for _ in range(3):  # one neighbour far while the others are near: that one
        s = rep.update({"a": 1.0, "b": 1.1, "c": 19.0})
    assert s == {"a": 1.0, "b": 1.0, "c": REPUTATION_PENALTY**3}


def test_radius_with_two_neighbours_does_not_clip_what_the_test_accepts() -> None:
    # with two neighbours the reference is the nearer one; the farther honest one under label skew
    # is often twice as far and must not be clipped every round (that loop pulled rings apart)
    rep = Reputation()
    assert rep.radius([1.0, 2.0]) == pytest.approx(REPUTATION_ACCEPT * 1.0)
    assert rep.radius([1.0, 2.0, 2.5]) == pytest.approx(ADAPTIVE_SLACK * 2.0)
    rng = np.random.default_rng(5)
    x = vec(rng)
    near, far = x + 0.01 * vec(rng), x + 0.02 * vec(rng)
    res = mix(x, 2, [nb("near", near, 2), nb("far", far, 2)], rule="robust", reputation=Reputation())
    assert res.clipped == {"near": False, "far": False}
    assert mix(x, 2, [nb("near", near, 2), nb("far", far, 2)], rule="clipped").clipped["far"]


def test_moderately_far_neighbour_keeps_its_weight_and_a_flagrant_one_loses_it() -> None:
    # a neighbour persistently beyond the acceptance ratio but not flagrantly far (e.g. an honest one
    # with very different data) keeps its weight by default (suspect_floor 1: clipping bounds its
    # pull, and cutting it makes the two models drift apart, which makes it look farther still);
    # a flagrant one loses everything
    flagrant = 2 * REPUTATION_FLAGRANT * REPUTATION_ACCEPT
    for floor in (REPUTATION_SUSPECT_FLOOR, 0.5):
        rep = Reputation(suspect_floor=floor)
        for _ in range(12):
            s = rep.update({"a": 1.0, "b": 1.0, "c": 1.0, "odd": MODERATE, "bad": flagrant})
        assert s["odd"] == floor and s["bad"] < 1e-3 and s["a"] == 1.0
        assert "failed" in rep.reason("odd") and "failed 0/8" not in rep.reason("odd"), "it is on record"
        for _ in range(10):
            s = rep.update({"a": 1.0, "b": 1.0, "c": 1.0, "odd": 1.0, "bad": 1.0})
        assert s["odd"] == 1.0 and s["bad"] < 0.6, "both recover, the flagrant one from much lower"
    assert REPUTATION_SUSPECT_FLOOR == 1.0


def test_reputation_state_round_trips_and_reads_the_earlier_format() -> None:
    rng = np.random.default_rng(4)
    x = vec(rng)
    a = Reputation()

    def play(rep: Reputation, rounds: int, seed: int) -> list[dict[str, float]]:
        g = np.random.default_rng(seed)
        y, out = x.copy(), []
        for _ in range(rounds):
            y = vec(g, 0.05, y)
            got = [nb(f"h{k}", vec(g, 0.1, y), degree=4) for k in range(3)]
            out.append(mix(y, 4, [*got, nb("bad", -y, degree=4)], rule="robust", reputation=rep).reputation)
        return out

    play(a, 6, 1)
    values, arrays = a.state()
    values = json.loads(json.dumps(values))  # as a checkpoint stores it
    b = Reputation()
    b.restore(values, arrays)
    assert b.scores() == a.scores() and b.rounds == a.rounds and b.reason("bad") == a.reason("bad")
    assert play(b, 4, 2) == play(a, 4, 2), "a resumed node judges exactly as one that never stopped"
    earlier = {  # a checkpoint written before held-back failures and the node's history existed
        "rounds": 5,
        "records": {
            "n": {"score": 0.5, "seen": 5, "failures": 1, "clipped_bits": 0, "failed_bits": 1,
                  "stale_bits": 0, "ratio": 4.0, "last": 5, "retired_field": 1},
        },
    }  # fmt: skip
    c = Reputation()
    c.restore(earlier, {})
    assert c.score("n") == 0.5 and c.rounds == 5 and c.update({"n": 1.0, "m": 1.0})["n"] == 0.55


# ---------------------------------------------------------------------------------------- registry

from p2pfl.aggregation import (  # noqa: E402
    COORDINATE_RULES,
    Rule,
    get_rule,
    node_rules,
    register,
    rule_names,
)
from p2pfl.aggregation import base as agg_base  # noqa: E402
from p2pfl.aggregation import weights as agg_weights  # noqa: E402


def test_registry_names_and_attributes() -> None:
    assert (
        RULES
        == rule_names()
        == ("clipped", "mean", "weighted", "push-sum", "trimmed-mean", "median", "robust")
    )
    assert DEFAULT_RULE in RULES
    for name in RULES:
        rule = get_rule(name)
        assert isinstance(rule, Rule) and rule.name == name
    assert [r for r in RULES if get_rule(r).needs_reputation] == ["robust"]
    assert [r for r in RULES if get_rule(r).clips] == ["clipped", "robust"]
    assert COORDINATE_RULES == ("trimmed-mean", "median")


def test_node_rules_exclude_push_sum() -> None:
    assert "push-sum" in RULES and "push-sum" not in node_rules()
    assert node_rules() == tuple(r for r in RULES if r != "push-sum")
    assert not get_rule("push-sum").node_capable


def test_unknown_rule_is_a_config_error_listing_the_known_rules() -> None:
    with pytest.raises(ConfigError) as err:
        get_rule("krum")
    assert "krum" in str(err.value) and all(name in str(err.value) for name in RULES)
    x = np.zeros(3, dtype=np.float32)
    with pytest.raises(ConfigError, match="known: clipped, mean"):
        mix(x, 1, [], rule="krum")
    with pytest.raises(ConfigError, match="unknown aggregation rule"):
        mix_many(x[None, :], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(1), "krum")


def test_a_new_rule_is_one_registered_class(monkeypatch) -> None:
    """A rule registered with @register is found by name and run by mix / mix_many."""
    from p2pfl.aggregation.rules.linear import LinearRule

    monkeypatch.setattr(agg_base, "_REGISTRY", dict(agg_base._REGISTRY))

    @register
    class Lazy(LinearRule):  # keeps half of every MH weight at home
        name = "lazy"
        node_capable = False

        def reweight(self, s, tau):
            for nb in s.usable:
                s.weights[nb.node_id] *= 0.5

        def reweight_many(self, m, coef, tau):
            coef = coef * 0.5
            return coef, coef

    assert rule_names()[-1] == "lazy" and "lazy" not in node_rules()
    with pytest.raises(ValueError, match="twice"):
        register(Lazy)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    rows, cols, deg = edge_arrays(build_graph("ring", 6))
    many = mix_many(x, rows, cols, deg, "lazy")
    for i in range(6):
        got = [nb(str(j), x[j], int(deg[j])) for j in cols[rows == i]]
        one = mix(x[i], int(deg[i]), got, "lazy")
        assert np.allclose(one.vector, many.vectors[i], atol=1e-6)
        assert one.own_weight == pytest.approx(1 - 0.5 * 2 / 3)


# ---------------------------------------------------------------------------------------- weight formulas


def test_vectorised_weights_equal_the_scalar_ones() -> None:
    di, dj = np.array([0, 1, 3, 5, 2, 7]), np.array([0, 4, 3, -1, 9, 2])
    assert agg_weights.mh_weights(di, dj).tolist() == [mh_weight(a, b) for a, b in zip(di, dj, strict=True)]
    si = np.array([0.0, 10.0, 10.0, -3.0, 5.0, 100.0])
    sj = np.array([7.0, 5.0, 20.0, 4.0, -1.0, 100.0])
    acc = agg_weights.sample_accepts(si, sj)
    assert acc.tolist() == [sample_accept(a, b) for a, b in zip(si, sj, strict=True)]
    assert acc.tolist() == [1.0, 0.5, 1.0, 1.0, 0.0, 1.0]


def test_median_reference_scalar_and_vectorised_agree() -> None:
    ref = agg_weights.median_reference
    assert ref([]) == 0.0 and ref([1.0]) == 1.0 and ref([3.0, 1.0]) == 1.0  # votes 0, 1, 3
    assert ref([2.0, 1.0, 5.0]) == 2.0 and ref([1.0, np.inf, np.nan, 2.0]) == 1.0
    assert agg_weights.adaptive_radius([2.0, 1.0, 5.0]) == ADAPTIVE_SLACK * 2.0
    rng = np.random.default_rng(2)
    rows, _, _ = edge_arrays(build_graph("erdos-renyi:0.3", 15, seed=2))
    d = rng.exponential(size=len(rows))
    d[::7] = np.inf
    per_node = [ref(d[rows == i].tolist()) for i in range(15)]
    assert agg_weights.median_references(15, rows, d).tolist() == per_node
    assert agg_weights.adaptive_radii(15, rows, d).tolist() == [ADAPTIVE_SLACK * v for v in per_node]
    rep = Reputation(step_cap=0, min_neighbours=1)  # with fewer neighbours its radius is wider
    assert [rep.radius(d[rows == i].tolist()) for i in range(15)] == [ADAPTIVE_SLACK * v for v in per_node]


@pytest.mark.parametrize("weighted", [False, True])
def test_topology_matrix_and_mix_many_use_the_same_weights(weighted: bool) -> None:
    g = build_graph("random-regular:3", 12, seed=4)
    g.add_edge(0, 6)
    rows, cols, deg = edge_arrays(g)
    samples = np.arange(1, 13, dtype=float) * 11.0
    x = np.random.default_rng(5).normal(size=(12, 4)).astype(np.float32)
    res = mix_many(x, rows, cols, deg, "weighted" if weighted else "mean", samples=samples)
    w = mixing_matrix(g, samples if weighted else None)
    got = res.matrix.toarray()
    off = ~np.eye(12, dtype=bool)
    assert np.array_equal(got[off], w[off]), "bit-identical edge weights: one formula"
    assert np.allclose(np.diag(got), np.diag(w))
