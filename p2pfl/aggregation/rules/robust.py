"""Rule "robust" (the default): x_i' = x_i + sum_j r_j w_ij clip(x_j - x_i, tau).

Self-centred clipping (as "clipped") whose MH weights are first scaled by a per-neighbour reputation
r_j in [0, 1] (p2pfl.aggregation.reputation.Reputation, kept by the node across rounds): the weight a
distrusted neighbour loses stays with the node itself. The adaptive radius is the reputation's
(Reputation.radius: its reference distance, floored by the node's history and capped by its recent
training steps; with two neighbours wide enough not to clip what its distance test accepts).
Clipping bounds what one neighbour can do in any single round (also while its evidence is being
confirmed, and for attackers that stay within the tests); the reputation stops a persistent outlier
from pulling at all.
"""

from __future__ import annotations

import numpy as np

from p2pfl.aggregation.base import ManyStep, NodeStep, register
from p2pfl.aggregation.mechanics import vector_norm
from p2pfl.aggregation.reputation import Reputation, sketch_index
from p2pfl.aggregation.rules.linear import LinearRule


@register
class Robust(LinearRule):
    name = "robust"
    summary = "clipping plus per-neighbour reputation (the default)"
    clips = True
    needs_reputation = True

    # -- one node

    def check(self, s: NodeStep) -> None:
        if not isinstance(s.reputation, Reputation):
            raise ValueError('rule "robust" needs reputation= (this node\'s Reputation, kept across rounds)')

    def radius(self, s: NodeStep) -> float | None:
        assert s.reputation is not None
        s.own_step = s.reputation.own_step(s.x)
        if s.radius is not None:
            return float(s.radius)
        return s.reputation.radius([s.distances[nb.node_id] for nb in s.usable], s.own_step)

    def reweight(self, s: NodeStep, tau: float | None) -> None:
        rep = s.reputation
        assert rep is not None
        sketches = (
            {nb.node_id: sk for nb in s.usable if (sk := rep.sketch_of(nb.vector)) is not None}
            if rep.sketch
            else None
        )
        s.scores = rep.update(
            s.distances,
            tau,
            vector_norm(s.x) if rep.needs_norm else None,
            sketches,
            rep.sketch_of(s.x),
            s.own_step,
        )
        for nid, score in s.scores.items():
            s.weights[nid] *= score
            if score < 1.0:
                s.downweighted[nid] = rep.reason(nid)

    def finish(self, s: NodeStep, out: np.ndarray) -> None:
        assert s.reputation is not None
        s.reputation.remember_output(out)

    # -- every node

    def check_many(self, m: ManyStep) -> None:
        if m.reputations is None or len(m.reputations) != m.n:
            raise ValueError('rule "robust" needs reputations, one Reputation per node')

    def radii(self, m: ManyStep) -> np.ndarray | None:
        # without a fixed radius, reweight_many fills in every node's own (Reputation.radius)
        return np.full(m.n, float(m.radius)) if m.radius is not None else np.zeros(m.n)

    def reweight_many(
        self, m: ManyStep, coef: np.ndarray, tau: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Update every node's Reputation in node order (dicts of a few entries) and scale the MH
        weights by the scores."""
        reputations, d, x, src, names = m.reputations, m.d, m.x, m.src, m.names
        assert reputations is not None and d is not None and tau is not None
        n, rows, cols, usable = m.n, m.rows, m.cols, m.usable
        score = np.ones(len(rows))
        reps: list[dict[str, float]] = [{} for _ in range(n)]
        downs: list[dict[str, str]] = [{} for _ in range(n)]
        order = np.argsort(rows, kind="stable")
        bounds = np.searchsorted(rows[order], np.arange(n + 1))
        sizes = {r.sketch for r in reputations if r.sketch}
        idx = {k: sketch_index(x.shape[1], k) for k in sizes}
        sk_src = {k: src[:, i] for k, i in idx.items()}
        sk_own = {k: x[:, i] for k, i in idx.items()}
        for i in range(n):
            edges = order[bounds[i] : bounds[i + 1]]
            rep = reputations[i]
            dist = {names[j]: float(d[e]) for e, j in zip(edges.tolist(), cols[edges].tolist(), strict=True)}
            own_norm = vector_norm(x[i]) if rep.needs_norm else None
            step = rep.own_step(x[i])
            if m.radius is None:
                tau[i] = rep.radius(list(dist.values()), step)
            sk = own_sk = None
            if rep.sketch:
                ok_edges = [
                    (e, j) for e, j in zip(edges.tolist(), cols[edges].tolist(), strict=True) if usable[e]
                ]
                sk = {names[j]: sk_src[rep.sketch][j] for _, j in ok_edges}
                own_sk = sk_own[rep.sketch][i]
            scores = rep.update(dist, float(tau[i]), own_norm, sk, own_sk, step)
            score[edges] = [scores[names[j]] for j in cols[edges].tolist()]
            reps[i] = scores
            downs[i] = {nid: rep.reason(nid) for nid, v in scores.items() if v < 1.0}
        m.reputation, m.downweighted = reps, downs
        coef = coef * score
        return coef, coef.copy()

    def finish_many(self, m: ManyStep, vectors: np.ndarray) -> None:
        assert m.reputations is not None
        for i, rep in enumerate(m.reputations):
            rep.remember_output(vectors[i])
