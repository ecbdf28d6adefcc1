"""Base class of the linear rules: x_i' = x_i + sum_j c_ij clip(x_j - x_i, tau_i).

A linear rule picks the clipping radius (`radius` / `radii`, None: no clipping) and turns the MH
weights into its coefficients (`reweight` / `reweight_many`); the step itself, the sparse matrix and
the result are the same for all of them.
"""

from __future__ import annotations

import numpy as np

from p2pfl.aggregation.base import ManyResult, ManyStep, MixResult, NodeStep, Rule
from p2pfl.aggregation.mechanics import apply_step, clip_coefficients, linear_mix, sparse_step


class LinearRule(Rule):
    """A weighted sum of the neighbours' differences; subclasses override the hooks below."""

    # -- one node

    def radius(self, s: NodeStep) -> float | None:
        """The clipping radius of this node's step (None: no clipping)."""
        return None

    def reweight(self, s: NodeStep, tau: float | None) -> None:  # noqa: B027 (hook)
        """Turn s.weights (the MH weights) into this rule's coefficients, in place."""

    def finish(self, s: NodeStep, out: np.ndarray) -> None:  # noqa: B027 (hook)
        """Called with the mixed vector (e.g. to remember it)."""

    def mix(self, s: NodeStep) -> MixResult:
        tau = self.radius(s)
        self.reweight(s, tau)
        out = linear_mix(s, tau)
        self.finish(s, out)
        return s.result(out, tau)

    # -- every node

    def radii(self, m: ManyStep) -> np.ndarray | None:
        """Every node's clipping radius (None: no clipping)."""
        return None

    def reweight_many(
        self, m: ManyStep, coef: np.ndarray, tau: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(coefficients applied, coefficients reported) of every edge before clipping, from coef
        (the MH weights, 0 on unusable edges); tau may be filled in here."""
        return coef, coef.copy()

    def finish_many(self, m: ManyStep, vectors: np.ndarray) -> None:  # noqa: B027 (hook)
        """Called with the mixed vectors."""

    def mix_many(self, m: ManyStep) -> ManyResult:
        n, rows, x = m.n, m.rows, m.x
        tau = self.radii(m)
        coef, shown = self.reweight_many(m, np.where(m.usable, m.w, 0.0), tau)
        if tau is not None:
            assert m.d is not None
            coef = clip_coefficients(coef, m.d, tau, rows, m.usable)
        own_weight = 1.0 - np.bincount(rows, weights=shown, minlength=n)
        off, diag, matrix = sparse_step(coef, rows, m.cols, n)
        vectors = apply_step(off, diag, matrix, x, m.src)
        if not self.clips and not m.own_finite.all():
            broken = ~m.own_finite  # mix() at a node whose own model is broken: untouched rows
            vectors[broken] = x[broken]
        self.finish_many(m, vectors)
        return ManyResult(vectors, own_weight, tau, m.new_mass, matrix, m.reputation, m.downweighted)
