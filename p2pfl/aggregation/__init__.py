"""Gossip averaging on flat float32 vectors: plain, clipped (ClippedGossip), sample-weighted, push-sum,
and the robust rules (trimmed mean, median, clipping with reputation).

One gossip step at node i with the neighbour models x_j that arrived this round:

  mean:         x_i' = x_i + sum_j w_ij (x_j - x_i)                 = (1 - sum_j w_ij) x_i + sum_j w_ij x_j
  clipped:      x_i' = x_i + sum_j w_ij clip(x_j - x_i, tau),  clip(z, tau) = z * min(1, tau / ||z||)
  weighted:     x_i' = x_i + sum_j w_ij min(1, s_j / s_i) (x_j - x_i)
  push-sum:     m_i' = a_i m_i + sum_j w_ij m_j,   x_i' = (a_i m_i x_i + sum_j w_ij m_j x_j) / m_i'
  trimmed-mean: x_i' = per coordinate, the mean of {x_i} U {x_j} without the b smallest and b largest
  median:       x_i' = per coordinate, the median of {x_i} U {x_j}
  robust:       x_i' = x_i + sum_j r_j w_ij clip(x_j - x_i, tau)       (the default rule, DEFAULT_RULE)

with Metropolis-Hastings weights w_ij = 1/(1+max(deg_i, deg_j)) (degrees travel in update headers)
and a_i = 1 - sum_j w_ij. A neighbour that did not arrive contributes nothing and its weight stays on
x_i. r_j is neighbour j's reputation (class Reputation, kept by the node across rounds).

Layout:
  weights.py     the weight formulas, each once: mh_weight, sample_accept, the median reference/radius
  reputation.py  Reputation (per-neighbour trust of rule "robust") and sketch_index
  base.py        Neighbour, MixResult, ManyResult, the step contexts, class Rule and the rule registry
  mechanics.py   shared mechanics: norms, edge distances, clipping, the sparse step, coordinate sorting
  rules/         one module per rule (each a registered Rule class); linear.py / coordinate.py are
                 the two families' base classes
  mixing.py      mix (one node: the real node) and mix_many (every node at once: the simulator),
                 which compute the same numbers

The registry: RULES / rule_names() (every rule, registry order), node_rules() (those a real node may
run: not push-sum), get_rule(name) (the Rule object; ConfigError listing the known rules otherwise).
"""

from __future__ import annotations

from p2pfl.aggregation import rules as _rules  # noqa: F401  (registers the rules)
from p2pfl.aggregation.base import (
    DEFAULT_RULE,
    ManyResult,
    MixResult,
    Neighbour,
    Rule,
    get_rule,
    node_rules,
    register,
    rule_names,
)
from p2pfl.aggregation.mechanics import TRIM_FRACTION, edge_distances, trim_count, vector_norm
from p2pfl.aggregation.mixing import mix, mix_many
from p2pfl.aggregation.reputation import (
    REPUTATION_ACCEPT,
    REPUTATION_CONFIRM,
    REPUTATION_CONFIRM_WINDOW,
    REPUTATION_FLAGRANT,
    REPUTATION_HISTORY,
    REPUTATION_MAX_TRACKED,
    REPUTATION_MIN_NEIGHBOURS,
    REPUTATION_PENALTY,
    REPUTATION_PERSISTENT,
    REPUTATION_PERSISTENT_CAP,
    REPUTATION_RECOVERY,
    REPUTATION_SKETCH,
    REPUTATION_STALE,
    REPUTATION_STEP_CAP,
    REPUTATION_SUSPECT_FLOOR,
    REPUTATION_WINDOW,
    Reputation,
    sketch_index,
)
from p2pfl.aggregation.weights import (
    ADAPTIVE_SLACK,
    adaptive_radius,
    median_reference,
    mh_weight,
    mh_weights,
    sample_accept,
    sample_accepts,
)

RULES = rule_names()  # every registered rule, registry order (the simulator may run all of them)
COORDINATE_RULES = tuple(name for name in RULES if get_rule(name).coordinate_wise)

__all__ = [
    "ADAPTIVE_SLACK",
    "COORDINATE_RULES",
    "DEFAULT_RULE",
    "REPUTATION_ACCEPT",
    "REPUTATION_CONFIRM",
    "REPUTATION_CONFIRM_WINDOW",
    "REPUTATION_FLAGRANT",
    "REPUTATION_HISTORY",
    "REPUTATION_MAX_TRACKED",
    "REPUTATION_MIN_NEIGHBOURS",
    "REPUTATION_PENALTY",
    "REPUTATION_PERSISTENT",
    "REPUTATION_PERSISTENT_CAP",
    "REPUTATION_RECOVERY",
    "REPUTATION_SKETCH",
    "REPUTATION_STALE",
    "REPUTATION_STEP_CAP",
    "REPUTATION_SUSPECT_FLOOR",
    "REPUTATION_WINDOW",
    "RULES",
    "TRIM_FRACTION",
    "ManyResult",
    "MixResult",
    "Neighbour",
    "Reputation",
    "Rule",
    "adaptive_radius",
    "edge_distances",
    "get_rule",
    "median_reference",
    "mh_weight",
    "mh_weights",
    "mix",
    "mix_many",
    "node_rules",
    "register",
    "rule_names",
    "sample_accept",
    "sample_accepts",
    "sketch_index",
    "trim_count",
    "vector_norm",
]
