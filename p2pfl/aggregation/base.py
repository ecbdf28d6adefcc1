"""What every rule shares: the inputs and results of a step, the Rule interface and the rule registry.

A rule is one class registered with @register: its `name`, what it needs (`needs_reputation`), where
it may run (`node_capable`: False for rules only the simulator may run), and the two forms of its step:
`mix` (one node, p2pfl.aggregation.mix) and `mix_many` (every node at once, p2pfl.aggregation.mix_many).
Adding a rule is one new class in p2pfl/aggregation/rules/ (imported by rules/__init__.py) + its tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, TypeVar

import numpy as np
import scipy.sparse as sp

from p2pfl.errors import ConfigError

if TYPE_CHECKING:
    from p2pfl.aggregation.reputation import Reputation

DEFAULT_RULE = "robust"  # clipping + reputation: what a node should run unless it trusts every peer


@dataclass(frozen=True)
class Neighbour:
    """One neighbour's model this round, as received (vector is the flattened float32 model).

    degree and samples come from the update header; mass too, for rule "push-sum" (None: use samples,
    which is the right value in a neighbour's first round). owned: the vector is a buffer nobody else
    holds (RoundCore.admit made it for this step), so a linear step may write its result there instead
    of allocating another model-sized one; the vector must not be read after the step.
    """

    node_id: str
    vector: np.ndarray
    degree: int
    samples: int
    mass: float | None = None
    owned: bool = False


@dataclass(frozen=True)
class MixResult:
    """The mixed vector plus what the metrics and reputation need.

    weights are the neighbours' weights in the step: the MH weights w_ij for "mean" and "clipped" (a
    clipped neighbour's actual pull is weights[j] * min(1, radius / distances[j])), w_ij min(1, s_j/s_i)
    for "weighted", w_ij m_j / m_i' for "push-sum". own_weight = 1 - sum(weights).
    radius is None except for "clipped" and "robust". mass is the node's new push-sum mass (None for
    other rules): keep it for the next round and send it in the next update.

    Rule "robust": weights are w_ij * reputation[j] (the reputation after this round's update), so a
    distrusted neighbour's lost weight shows up in own_weight; reputation maps every neighbour that
    arrived to its score in [0, 1], downweighted maps those with a score below 1 to a short reason
    ("distance 8.3x reference, clipped 4/5 rounds"). Both are empty for the other rules.
    Rules "trimmed-mean" / "median": weights[j] is neighbour j's average coefficient over the
    coordinates (the share of the coordinates where its value was kept, divided by the number of
    values kept there), so own_weight + sum(weights) = 1; clipped[j] is True when that is less than
    half an equal share (1 / (2k) for k votes), i.e. its values were mostly trimmed away.
    """

    vector: np.ndarray
    own_weight: float
    weights: dict[str, float]
    distances: dict[str, float]
    clipped: dict[str, bool]
    radius: float | None
    mass: float | None = None
    reputation: dict[str, float] = field(default_factory=dict)
    downweighted: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ManyResult:
    """mix_many's output: row i is what mix() returns at node i.

    matrix is the sparse N x N step actually applied (vectors = matrix @ x, or with `sent`:
    diag(matrix) x + offdiag(matrix) @ sent), useful for spectral analysis; for the coordinate-wise
    rules it holds each vote's average coefficient (as MixResult.weights) and the step itself is not
    linear. radius (clipped, robust) and mass (push-sum) are None for the other rules. For rule
    "robust", reputation[i] and downweighted[i] are node i's MixResult.reputation / .downweighted
    (keyed by ids); None for the other rules.
    """

    vectors: np.ndarray
    own_weight: np.ndarray
    radius: np.ndarray | None
    mass: np.ndarray | None
    matrix: sp.csr_matrix
    reputation: list[dict[str, float]] | None = None
    downweighted: list[dict[str, str]] | None = None


# --------------------------------------------------------------------------------------------------
# a step in progress (what mix / mix_many prepared for the rule)


@dataclass
class NodeStep:
    """One node's step, prepared by mix(): the rule reads the inputs and fills in the outputs.

    weights start as the MH weights (0 for an unusable neighbour), distances are ||x_j - x_i|| (inf
    when unusable), usable are the neighbours that count; tmp is a float32 scratch of at most STEP_CHUNK values.
    """

    x: np.ndarray
    neighbours: Sequence[Neighbour]
    usable: list[Neighbour]
    weights: dict[str, float]
    distances: dict[str, float]
    clipped: dict[str, bool]
    tmp: np.ndarray
    out: np.ndarray | None = None  # where a linear step may write its result (an owned neighbour's)
    radius: float | None = None
    own_samples: float | None = None
    own_mass: float | None = None
    reputation: Reputation | None = None
    trim: int | None = None
    # filled in by the rule
    mass: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    downweighted: dict[str, str] = field(default_factory=dict)
    own_step: float | None = None

    def result(self, vector: np.ndarray, radius: float | None) -> MixResult:
        """The MixResult of a linear step (own weight = 1 - the neighbours' weights)."""
        return MixResult(
            vector,
            1.0 - sum(self.weights.values()),
            self.weights,
            self.distances,
            self.clipped,
            radius,
            self.mass,
            self.scores,
            self.downweighted,
        )


@dataclass
class ManyStep:
    """Every node's step, prepared by mix_many(): edge k means node rows[k] received cols[k]'s update.

    x: own models (N x P float32); src: what the nodes sent (x itself unless an attacker's differs);
    w: the MH weight of every edge; d: edge distances (None unless the rule clips); usable: edges
    that count; own_finite: nodes whose own model is finite; names: node ids (for reputations).
    """

    x: np.ndarray
    src: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    w: np.ndarray
    d: np.ndarray | None
    usable: np.ndarray
    own_finite: np.ndarray
    names: list[str]
    radius: float | None = None
    samples: np.ndarray | None = None
    mass: np.ndarray | None = None
    reputations: Sequence[Reputation] | None = None
    trim: int | None = None
    # filled in by the rule
    new_mass: np.ndarray | None = None
    reputation: list[dict[str, float]] | None = None
    downweighted: list[dict[str, str]] | None = None

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


# --------------------------------------------------------------------------------------------------
# rules and their registry


class Rule(ABC):
    """One aggregation rule. Subclasses set the class attributes and implement both forms of the step.

    name: what configs and the CLI call it. node_capable: a real node may run it (False: simulator
    only, e.g. push-sum, whose masses a node cannot verify). needs_reputation: mix needs a
    Reputation (mix_many one per node). clips: neighbours are judged by their distance (a
    neighbour counts when its distance is finite, and its difference may be clipped), otherwise a
    neighbour counts when its vector is finite. coordinate_wise: a per-coordinate rule, not a
    weighted sum.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    node_capable: ClassVar[bool] = True
    needs_reputation: ClassVar[bool] = False
    clips: ClassVar[bool] = False
    coordinate_wise: ClassVar[bool] = False

    def check(self, s: NodeStep) -> None:  # noqa: B027 (a hook: most rules need nothing more)
        """Refuse (ValueError) a node step without what this rule needs; may fill in defaults."""

    def check_many(self, m: ManyStep) -> None:  # noqa: B027
        """Refuse (ValueError) an all-nodes step without what this rule needs."""

    def excludes(self, nb: Neighbour) -> bool:
        """True when a neighbour must be ignored whatever its vector (e.g. an invalid push-sum mass)."""
        return False

    @abstractmethod
    def mix(self, s: NodeStep) -> MixResult:
        """One node's step (what p2pfl.aggregation.mix returns)."""

    @abstractmethod
    def mix_many(self, m: ManyStep) -> ManyResult:
        """Every node's step (what p2pfl.aggregation.mix_many returns); row i equals mix at node i."""

    def __repr__(self) -> str:
        return f"<rule {self.name!r}>"


_REGISTRY: dict[str, Rule] = {}
R = TypeVar("R", bound=type[Rule])


def register(cls: R) -> R:
    """Class decorator: add one instance of the rule to the registry under cls.name."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}: a rule needs a non-empty name")
    if name in _REGISTRY:
        raise ValueError(f"aggregation rule {name!r} registered twice")
    _REGISTRY[name] = cls()
    return cls


def rule_names() -> tuple[str, ...]:
    """Every registered rule, in registration order."""
    return tuple(_REGISTRY)


def node_rules() -> tuple[str, ...]:
    """The rules a real node may run (node_capable), in registration order."""
    return tuple(name for name, rule in _REGISTRY.items() if rule.node_capable)


def get_rule(name: str) -> Rule:
    """The registered rule called `name`; ConfigError listing the known rules otherwise."""
    rule = _REGISTRY.get(name) if isinstance(name, str) else None
    if rule is None:
        raise ConfigError(f"unknown aggregation rule {name!r}; known: {', '.join(_REGISTRY)}")
    return rule
