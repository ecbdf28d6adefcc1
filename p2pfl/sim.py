"""Many virtual nodes in one process: the node's round (train, gossip, evaluate) for topology experiments.

Each virtual node i is set up exactly as a real node with `task.shard = i`, `task.num_shards = N`:
`load_task(TaskSpec(name, shard=i, num_shards=N, partition, alpha, seed, ...))`, its initial model
from `task.build_model()`, its neighbours from `topology` over the same member order, and every round

    train locally (task.train)  ->  mix with the neighbours' trained models (aggregation rule)  ->  evaluate

as `p2pfl.node.Node._round` does. The topology and aggregation code is the real node's:
`topology.parse_topology(...).graph(...)` and `aggregation.mix_many`, which computes at every node
exactly what `aggregation.mix` computes at one (tests check it); `vectorised=False` runs the plain
per-node loop instead (task.train, aggregation.mix and task.evaluate node by node), which is the
reference and the benchmark baseline.

The fast path keeps all models as one N x P float32 matrix (rows = `learning.flatten` of each node's
state_dict) and, for the in-memory built-in tasks (`learning.TensorTask`), trains all nodes at once
with `learning.batched.BatchedTrainer`: torch.func (vmap of the gradient of the task's own model and
loss), drawing each node's minibatch order from that node's own task generator, so it takes the same
SGD steps as task.train. Evaluation runs every model on the shared test split in one batched call. Any other Task falls back
to the per-node loop for training and evaluation (mixing stays vectorised).

Attacks (p2pfl.attacks): `SimConfig(attack="sign-flip", byzantine=3)` makes 3 nodes Byzantine
(`byzantine` = a count, placed by `spread`, or explicit shard indices). A Byzantine node runs the same
round as everyone (its task poisoned by attack.poison_task for "label-flip"; it mixes what it
receives, other attackers' crafted vectors included, with the federation's rule) and keeps its own
model honest, but sends `attack.craft(own trained vector, the honest vectors it received last round,
round)` to its neighbours, as a Byzantine real node would. Every rule runs with every attack; rule
"robust" keeps one aggregation.Reputation per node across rounds (a per-node loop of small dict
updates; the step itself stays vectorised). Accuracy statistics of the honest nodes alone are in
RoundStats.honest_mean_accuracy / honest_min_accuracy; `consensus` is over the honest nodes.

Deterministic under the seed: the data partition, initial model, minibatch orders, random graphs,
dropped updates and the attacks' random draws are all drawn from it.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from p2pfl import codec, compression
from p2pfl.aggregation import RULES, Neighbour, Reputation, mix_many
from p2pfl.attacks import ATTACKS, Attack, make_attack
from p2pfl.errors import ConfigError
from p2pfl.learning.batched import BatchedTrainer, batchable, share_test_split
from p2pfl.learning.data import (
    DIGITS_CLASSES,
    PartitionCache,
    Shards,
    load_digits,
    load_npz,
    resample_indices,
    split_test,
)
from p2pfl.learning.params import flatten, get_params, set_params, unflatten
from p2pfl.learning.spec import PARTITION_SCHEMES, TaskSettings, TaskSpec
from p2pfl.learning.tasks import Task, TensorTask, load_task, tensor_task
from p2pfl.round import Mixer
from p2pfl.topology import Topology, edge_arrays, parse_topology, topology_gap

DIGITS_LOGREG = "p2pfl.sim:digits_logreg"
DIGITS_RESAMPLED = "p2pfl.sim:digits_resampled"
TASK_ALIASES = {"digits-logreg": DIGITS_LOGREG, "digits-resampled": DIGITS_RESAMPLED}
RESAMPLED_MIN_SAMPLES = 16  # digits-resampled: samples per node when N exceeds the training split / 16
LINEAR_RULES = ("mean", "weighted")  # rules whose step is a fixed doubly/row-stochastic average
CONSENSUS_ROWS_PER_CHUNK = 4096  # consensus_distance converts this many rows to float64 at a time
T = TypeVar("T")
HEADER_ESTIMATE = 512  # bytes, used only when a real envelope cannot be sealed for the estimate


def spread(n: int, count: int) -> tuple[int, ...]:
    """`count` node indices evenly spread over 0..n-1: floor(k n / count) for k < count.

    n = 16: 1 -> (0,), 2 -> (0, 8), 3 -> (0, 5, 10). Deterministic and independent of the topology
    (so the same nodes are Byzantine on every graph); on a torus the three sit on a diagonal, not
    side by side.
    """
    if not 0 <= count <= n:
        raise ConfigError(f"byzantine: cannot place {count} nodes among {n}")
    return tuple(k * n // count for k in range(count))


def digits_logreg(spec: TaskSpec) -> TensorTask:
    """Multinomial logistic regression (one nn.Linear) on sklearn digits, or on spec.data's .npz.

    A Task like the built-ins (same split, partition and training), usable by a real node too as
    task = "p2pfl.sim:digits_logreg".
    """
    if spec.data:
        x, y, classes = load_npz(spec.data)
    else:
        x, y = load_digits()
        classes = DIGITS_CLASSES
    features = x.shape[1]
    return tensor_task(spec, x, y, make_model=lambda: nn.Linear(features, classes), classes=classes)


@dataclass(frozen=True)
class _Resampling:
    """digits-resampled's shared data: the training split every node draws from, the test split."""

    x: np.ndarray
    y: np.ndarray
    by_class: tuple[np.ndarray, ...]
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int

    def per_node(self, num_shards: int) -> int:
        """Samples each node draws: what an even partition would give, at least RESAMPLED_MIN_SAMPLES."""
        return max(RESAMPLED_MIN_SAMPLES, round(len(self.y) / max(num_shards, 1)))

    def indices(self, spec: TaskSpec) -> np.ndarray:
        return resample_indices(
            self.y,
            self.per_node(spec.num_shards),
            shard=spec.shard,
            scheme=spec.partition,
            alpha=spec.alpha,
            seed=spec.seed,
            by_class=self.by_class,
        )


@functools.lru_cache(maxsize=4)
def _resampling(data: str) -> _Resampling:
    if data:
        x, y, classes = load_npz(data)
    else:
        x, y = load_digits()
        classes = DIGITS_CLASSES
    train, test = split_test(len(y))
    xt, yt = x[train], y[train]
    by_class = tuple(np.flatnonzero(yt == c) for c in np.unique(yt))
    return _Resampling(xt, yt, by_class, x[test], y[test], classes)


def digits_resampled(spec: TaskSpec) -> TensorTask:
    """Logistic regression on digits (or spec.data's .npz), every node's samples drawn WITH
    replacement from the training split instead of partitioned: any number of nodes (shards overlap,
    unlike a partition's). Node i draws max(16, train / N) samples from its own generator (seed, i),
    uniformly ("iid") or with Dir(alpha) class proportions ("dirichlet"); the test split is the
    shared one of digits-logreg. Usable by a real node as task = "p2pfl.sim:digits_resampled"."""
    r = _resampling(spec.data)
    own = r.indices(spec)
    features, classes = r.x.shape[1], r.classes
    return TensorTask(
        spec,
        x_train=r.x[own],
        y_train=r.y[own],
        x_test=r.x_test,
        y_test=r.y_test,
        make_model=lambda: nn.Linear(features, classes),
        num_classes=classes,
    )


@dataclass(frozen=True)
class Population:
    """Every virtual node's training rows as indices into one shared array (no per-node copies):
    node i trains on x[shards.view(i)], exactly the rows `load_task(cfg.task_spec(i))` holds."""

    x: torch.Tensor
    y: torch.Tensor
    shards: Shards
    x_test: torch.Tensor
    y_test: torch.Tensor


def _resampled_population(cfg: SimConfig) -> Population:
    r = _resampling(cfg.data)
    spec = cfg.task_spec(0)
    k = r.per_node(cfg.nodes)
    flat = np.empty(cfg.nodes * k, dtype=np.int64)
    for i in range(cfg.nodes):  # each node's own draw, O(k): what digits_resampled gives shard i
        flat[i * k : (i + 1) * k] = resample_indices(
            r.y, k, shard=i, scheme=spec.partition, alpha=spec.alpha, seed=spec.seed, by_class=r.by_class
        )
    return Population(
        x=torch.from_numpy(np.array(r.x)),
        y=torch.from_numpy(np.array(r.y)),
        shards=Shards(flat, np.arange(cfg.nodes + 1, dtype=np.int64) * k),
        x_test=torch.from_numpy(np.array(r.x_test)),
        y_test=torch.from_numpy(np.array(r.y_test)),
    )


# tasks whose N shards the simulator can build at once without N task objects
POPULATIONS: dict[str, Callable[[SimConfig], Population]] = {DIGITS_RESAMPLED: _resampled_population}


# --------------------------------------------------------------------------------------------------
# configuration and results


@dataclass(frozen=True, kw_only=True)
class _Federation:
    """SimConfig's leading fields. A separate base only to keep SimConfig's field order (asdict in the
    command line's summary): SimConfig lists it last, and dataclass fields follow the reversed MRO."""

    task: str = "digits-logreg"
    nodes: int = 16
    rounds: int = 20
    topology: str = "ring"
    rule: str = "mean"
    radius: float | None = None  # "clipped": None = adaptive


@dataclass(frozen=True, kw_only=True)
class SimConfig(TaskSettings, _Federation):
    """One simulated federation (keyword-only). Field names follow the node's [training] / [gossip]
    sections; partition, alpha, seed, local_epochs, batch_size, lr and data are the TaskSettings every
    virtual node's TaskSpec gets (task_spec).

    ids / names optionally give each virtual node (shard i) the node id and human name a real node
    would have: the topology then numbers nodes by sorted id, as real nodes do, and edge-list files
    see the names. By default node i has id and name "node-i" (zero-padded ids, so graph position
    = shard). drop is the probability that one update does not reach one neighbour in a round
    (its weight stays home, as in the node's round timeout).
    attack / byzantine: see the module docstring (byzantine as a count is turned into spread(nodes,
    count) indices). trim: values cut per side for rule "trimmed-mean" (None: aggregation default).
    """

    train: bool = True  # False: averaging only
    eval_every: int = 1
    vectorised: bool = True  # False: per-node loop (the reference / baseline)
    drop: float = 0.0
    ids: tuple[str, ...] | None = None
    names: tuple[str, ...] | None = None
    attack: str = ""
    byzantine: tuple[int, ...] | int = ()
    trim: int | None = None
    reputation: tuple[tuple[str, float], ...] = ()  # rule "robust": Reputation(**dict(reputation))
    # update compression, as the nodes' [gossip] compression / keyframe_every (p2pfl.compression)
    compression: str = "none"
    keyframe_every: int = 10
    # gossip exchanges per local training step: a round trains once, then mixes gossip_steps times
    # (a real node with [gossip] steps_per_round = k trains only in every k-th of its rounds)
    gossip_steps: int = 1
    # heavy-ball acceleration of the exchanges within a round (0: plain gossip); see _accelerate
    gossip_momentum: float = 0.0
    # evaluate only this many nodes (a fixed seeded sample) in the rounds before the last; 0 = all
    eval_nodes: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.nodes, int) or self.nodes < 1:
            raise ConfigError(f"nodes must be an integer >= 1, got {self.nodes!r}")
        if not isinstance(self.rounds, int) or self.rounds < 0:
            raise ConfigError(f"rounds must be an integer >= 0, got {self.rounds!r}")
        if self.rule not in RULES:
            raise ConfigError(f"unknown aggregation rule {self.rule!r}; known: {', '.join(RULES)}")
        if not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ConfigError(f"eval_every must be an integer >= 1, got {self.eval_every!r}")
        if not 0.0 <= self.drop < 1.0:
            raise ConfigError(f"drop must be in [0, 1), got {self.drop!r}")
        if not isinstance(self.gossip_steps, int) or self.gossip_steps < 1:
            raise ConfigError(f"gossip_steps must be an integer >= 1, got {self.gossip_steps!r}")
        if not 0.0 <= self.gossip_momentum < 1.0:
            raise ConfigError(f"gossip_momentum must be in [0, 1), got {self.gossip_momentum!r}")
        if self.gossip_momentum and self.rule not in LINEAR_RULES:
            raise ConfigError(
                f"gossip_momentum extrapolates linear averaging; use rule {' or '.join(LINEAR_RULES)}, "
                f"not {self.rule!r}"
            )
        if not isinstance(self.eval_nodes, int) or self.eval_nodes < 0:
            raise ConfigError(f"eval_nodes must be an integer >= 0 (0: every node), got {self.eval_nodes!r}")
        for what, seq in (("ids", self.ids), ("names", self.names)):
            if seq is not None and len(seq) != self.nodes:
                raise ConfigError(f"{what}: {len(seq)} entries for {self.nodes} nodes")
        if self.ids is not None and len(set(self.ids)) != len(self.ids):
            raise ConfigError("ids must be distinct")
        byz = self.byzantine
        if isinstance(byz, int | np.integer):
            byz = spread(self.nodes, int(byz))
        byz = tuple(sorted(int(b) for b in byz))
        if len(set(byz)) != len(byz) or any(not 0 <= b < self.nodes for b in byz):
            raise ConfigError(f"byzantine must be distinct node indices in 0..{self.nodes - 1}, got {byz}")
        object.__setattr__(self, "byzantine", byz)
        try:
            self.make_reputation()
        except TypeError as exc:
            raise ConfigError(f"reputation: {exc}") from exc
        check_compression(self.compression, self.keyframe_every, self.rule, self.topology)
        if self.attack:
            make_attack(self.attack)  # ConfigError for unknown names, listing them
        elif byz:
            raise ConfigError(f"byzantine nodes {byz} need an attack (one of {', '.join(ATTACKS)})")

    def make_reputation(self) -> Reputation:
        """A fresh aggregation.Reputation with this config's options (rule "robust")."""
        options: dict[str, Any] = dict(self.reputation)
        return Reputation(**options)

    def task_spec(self, shard: int) -> TaskSpec:
        """What a real node with `shard` loads (learning.TaskSpec, as NodeConfig.task_spec builds it)."""
        return TaskSpec(
            name=TASK_ALIASES.get(self.task, self.task),
            shard=shard,
            num_shards=self.nodes,
            **self.task_settings(),
        )


@dataclass(kw_only=True)
class RoundStats:
    """One round across all nodes; accuracy / test_loss are None in rounds that were not evaluated."""

    round: int
    train_loss: np.ndarray
    accuracy: np.ndarray | None
    test_loss: np.ndarray | None
    consensus: float  # mean over (honest) nodes of ||x_i - mean_j x_j||^2
    bytes_per_node: float  # cumulative mean bytes sent per node, as the node's metrics count them
    seconds: float
    honest: np.ndarray | None = None  # bool mask of the honest nodes (None: every node is honest)
    # rule "robust": edges (honest receiver, sender) whose reputation is below 1 after this round,
    # as (from Byzantine senders, from honest senders); None for the other rules
    downweighted: tuple[int, int] | None = None
    # rule "robust": edges (honest receiver, sender) judged this round (the update arrived), as
    # (from Byzantine senders, from honest senders): downweighted[1] / judged[1] is the round's
    # false-positive rate, downweighted[0] / judged[0] its detection rate
    judged: tuple[int, int] | None = None
    # the node indices accuracy / test_loss belong to, when only a sample was evaluated
    # (SimConfig.eval_nodes); None: every node, in node order
    evaluated: np.ndarray | None = None

    @property
    def false_positive_rate(self) -> float | None:
        """Share of the honest edges judged this round that were down-weighted (None: no such edge
        or not rule "robust")."""
        if self.downweighted is None or self.judged is None or not self.judged[1]:
            return None
        return self.downweighted[1] / self.judged[1]

    @property
    def detection_rate(self) -> float | None:
        """Share of the edges from Byzantine senders judged this round that were down-weighted."""
        if self.downweighted is None or self.judged is None or not self.judged[0]:
            return None
        return self.downweighted[0] / self.judged[0]

    @property
    def mean_accuracy(self) -> float | None:
        return None if self.accuracy is None else float(self.accuracy.mean())

    @property
    def min_accuracy(self) -> float | None:
        return None if self.accuracy is None else float(self.accuracy.min())

    def _honest_acc(self) -> np.ndarray | None:
        if self.accuracy is None:
            return None
        if self.honest is None:
            return self.accuracy
        mask = self.honest if self.evaluated is None else self.honest[self.evaluated]
        return self.accuracy[mask]

    @property
    def honest_mean_accuracy(self) -> float | None:
        a = self._honest_acc()
        return None if a is None or not a.size else float(a.mean())

    @property
    def honest_min_accuracy(self) -> float | None:
        a = self._honest_acc()
        return None if a is None or not a.size else float(a.min())

    def row(self) -> dict:
        return {
            "round": self.round,
            "mean_accuracy": self.mean_accuracy,
            "min_accuracy": self.min_accuracy,
            "honest_mean_accuracy": self.honest_mean_accuracy,
            "honest_min_accuracy": self.honest_min_accuracy,
            "downweighted_byzantine": None if self.downweighted is None else self.downweighted[0],
            "downweighted_honest": None if self.downweighted is None else self.downweighted[1],
            "judged_byzantine": None if self.judged is None else self.judged[0],
            "judged_honest": None if self.judged is None else self.judged[1],
            "mean_train_loss": float(self.train_loss.mean()) if self.train_loss.size else None,
            "mean_test_loss": None if self.test_loss is None else float(self.test_loss.mean()),
            "consensus": self.consensus,
            "bytes_per_node": self.bytes_per_node,
            "seconds": self.seconds,
            "evaluated_nodes": None
            if self.accuracy is None
            else (len(self.accuracy) if self.evaluated is not None else "all"),
        }


@dataclass(kw_only=True)
class SimResult:
    config: SimConfig
    rounds: list[RoundStats]
    spectral_gap: float
    params: int
    samples: np.ndarray
    vectors: np.ndarray  # final N x P models
    timings: dict[str, float] = field(default_factory=dict)
    mass: np.ndarray | None = None  # push-sum masses at the end
    byzantine: tuple[int, ...] = ()
    reputation: list[dict[str, float]] | None = None  # rule "robust": every node's scores at the end

    def reached(self, target: float, stat: str = "mean") -> RoundStats | None:
        """The first evaluated round whose accuracy across nodes (stat "mean", or "min": every node)
        reaches `target`; None if none does. With eval_nodes, over the evaluated sample."""
        if stat not in ("mean", "min"):
            raise ValueError(f"stat must be 'mean' or 'min', got {stat!r}")
        for r in self.rounds:
            value = r.mean_accuracy if stat == "mean" else r.min_accuracy
            if value is not None and value >= target:
                return r
        return None

    def rounds_to(self, target: float, stat: str = "mean") -> int | None:
        """First round whose mean (or min) accuracy across nodes reaches `target` (None: never)."""
        r = self.reached(target, stat)
        return None if r is None else r.round

    def bytes_to(self, target: float, stat: str = "mean") -> float | None:
        """Mean bytes each node had sent when the accuracy first reached `target` (None: never)."""
        r = self.reached(target, stat)
        return None if r is None else r.bytes_per_node

    def time_to(
        self,
        target: float,
        stat: str = "mean",
        *,
        train_s: float | None = None,
        exchange_s: float | None = None,
    ) -> float | None:
        """Seconds until the accuracy first reached `target` (None: never).

        Without a cost model, the simulator's own seconds (its rounds' compute, summed): comparable
        between runs of one machine only. With train_s (one local training step) and exchange_s
        (one gossip exchange: seal, send, wait, open, mix), what a real federation would take:
        rounds x (train_s + gossip_steps x exchange_s), the node's round made of k exchanges.
        """
        r = self.reached(target, stat)
        if r is None:
            return None
        if train_s is None and exchange_s is None:
            return float(sum(s.seconds for s in self.rounds if s.round <= r.round))
        k = self.config.gossip_steps
        return r.round * ((train_s or 0.0) + k * (exchange_s or 0.0))

    def _edge_share(self, kind: int) -> float | None:
        flagged = sum(r.downweighted[kind] for r in self.rounds if r.downweighted is not None)
        judged = sum(r.judged[kind] for r in self.rounds if r.judged is not None)
        return flagged / judged if judged else None

    @property
    def false_positive_rate(self) -> float | None:
        """Rule "robust": share of all (honest node, honest neighbour, round) triples, over every
        round, in which the honest neighbour's reputation was below 1 (None: other rules)."""
        return self._edge_share(1)

    @property
    def detection_rate(self) -> float | None:
        """Rule "robust": share of all (honest node, Byzantine neighbour, round) triples in which
        the Byzantine neighbour's reputation was below 1 (None: other rules, or no attacker)."""
        return self._edge_share(0)

    @property
    def final(self) -> RoundStats | None:
        evaluated = [r for r in self.rounds if r.accuracy is not None]
        return evaluated[-1] if evaluated else None


class _Lazy(Sequence[T]):
    """A list of n items built on first access by make(i) and kept (set items replace them): the
    simulator's per-node objects that most runs never touch (tasks and mixers at 100,000 nodes)."""

    def __init__(self, n: int, make: Callable[[int], T]) -> None:
        self._n, self._make = n, make
        self._items: dict[int, T] = {}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(f"node {i} out of range for {self._n} nodes")
        i %= self._n
        if i not in self._items:
            self._items[i] = self._make(i)
        return self._items[i]

    def __setitem__(self, i: int, value: T) -> None:
        self._items[i % self._n] = value


# --------------------------------------------------------------------------------------------------
# topology over the virtual nodes


class Network:
    """The topology as the nodes see it: graph per round (cached unless time-varying), in shard order."""

    def __init__(
        self,
        topology: str | Topology,
        n: int,
        *,
        seed: int = 0,
        ids: Sequence[str] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        self.topology = parse_topology(topology) if isinstance(topology, str) else topology
        self.n, self.seed = n, seed
        width = len(str(max(n - 1, 0)))
        ids = list(ids) if ids is not None else [f"node-{i:0{width}d}" for i in range(n)]
        names = list(names) if names is not None else [f"node-{i}" for i in range(n)]
        order = sorted(range(n), key=lambda i: ids[i])  # graph position k holds shard order[k]
        self.shard_at = np.array(order, dtype=np.int64)
        self.labels = [names[i] for i in order]
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def edges(self, round: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, degrees) in shard indices: rows[k] receives from cols[k] this round."""
        if self._cache is not None and not self.topology.time_varying:
            return self._cache
        g = self.topology.graph(self.n, seed=self.seed, round=round, labels=self.labels)
        rows, cols, deg = edge_arrays(g)
        rows, cols = self.shard_at[rows], self.shard_at[cols]
        order = np.lexsort((cols, rows))
        degrees = np.zeros(self.n, dtype=np.int64)
        degrees[self.shard_at] = deg
        self._cache = (rows[order], cols[order], degrees)
        return self._cache

    def gap(self, samples: np.ndarray | None = None) -> float:
        s = None if samples is None else np.asarray(samples)[self.shard_at]
        return (
            topology_gap(
                self.topology.source or self.topology.kind, self.n, self.seed, samples=s, labels=self.labels
            )
            if self.n <= 4096
            else float("nan")
        )


def consensus_distance(x: np.ndarray) -> float:
    """Mean over nodes of ||x_i - mean||^2, in float64 a chunk of rows at a time (no N x P float64
    copy: 520 MB at 100,000 nodes of 650 parameters)."""
    x = np.asarray(x)
    n = x.shape[0]
    if not n:
        return float("nan")
    mean = np.zeros(x.shape[1:], dtype=np.float64)
    for a in range(0, n, CONSENSUS_ROWS_PER_CHUNK):
        mean += x[a : a + CONSENSUS_ROWS_PER_CHUNK].sum(axis=0, dtype=np.float64)
    mean /= n
    total = 0.0
    buf = np.empty((min(n, CONSENSUS_ROWS_PER_CHUNK), *x.shape[1:]), dtype=np.float64)
    for a in range(0, n, CONSENSUS_ROWS_PER_CHUNK):
        chunk = x[a : a + CONSENSUS_ROWS_PER_CHUNK]
        d = np.subtract(chunk, mean, out=buf[: len(chunk)], dtype=np.float64)  # exact float32 -> 64
        total += float(np.einsum("ij,ij->", d, d))
    return total / n


def gossip(
    x0: np.ndarray,
    topology: str,
    rounds: int,
    *,
    rule: str = "mean",
    seed: int = 0,
    samples: np.ndarray | None = None,
    radius: float | None = None,
    compress: str = "none",
    keyframe_every: int = 10,
) -> tuple[np.ndarray, list[float], np.ndarray | None]:
    """Averaging only: `rounds` gossip steps from x0 (N x P). Returns (x, consensus per round
    including round 0, push-sum masses or None). `compress`: a [gossip] compression setting, the
    nodes (ids node-0, node-1, ...) then mix their public estimates (p2pfl.compression)."""
    x = np.array(x0, dtype=np.float32)
    net = Network(topology, x.shape[0], seed=seed)
    mass = None if samples is None else np.asarray(samples, dtype=np.float64).copy()
    dist = [consensus_distance(x)]
    c = compression.Compression.parse(compress)
    rg = _row_gossip(c, [f"node-{i}" for i in range(x.shape[0])], seed, x.shape[1], keyframe_every)
    for t in range(1, rounds + 1):
        rows, cols, deg = net.edges(t)
        if rg is not None:
            rg.send(x, deg > 0, t)
            y = mix_many(rg.estimates, rows, cols, deg, rule, radius, samples=samples).vectors
            x = compression.step(x, rg.estimates, y, c.gamma)
        else:
            res = mix_many(x, rows, cols, deg, rule, radius, samples=samples, mass=mass)
            x, mass = res.vectors, res.mass if res.mass is not None else mass
        dist.append(consensus_distance(x))
    return x, dist, (mass if rule == "push-sum" else None)


def check_compression(setting: str, keyframe_every: int, rule: str, topology: str | Topology) -> None:
    """ConfigError unless a simulated federation can run this compression (as a node's config)."""
    c = compression.Compression.parse(setting)
    if not c.enabled:
        return
    if not isinstance(keyframe_every, int) or keyframe_every < 1:
        raise ConfigError(f"keyframe_every must be an integer >= 1, got {keyframe_every!r}")
    if rule == "push-sum":
        raise ConfigError("compression mixes public estimates; use a rule other than push-sum")
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    if c.diff and topo.time_varying:
        raise ConfigError(
            f"compression {setting!r} sends differences that every neighbour must see; the time-varying "
            f"topology {topo.kind!r} changes neighbours each round: use a static topology, or fp16, bf16 "
            "or int8"
        )


def _row_gossip(
    c: compression.Compression, ids: Sequence[str], seed: int, d: int, keyframe_every: int
) -> compression.RowGossip | None:
    """Every node's compression state at once (None: no compression); node i's key from ids[i]."""
    if not c.enabled:
        return None
    keys = np.array([compression.node_key(nid, seed) for nid in ids], dtype=np.uint64)
    return compression.RowGossip.start(c, keys, d, compression.chunk_starts(c, d), keyframe_every)


# --------------------------------------------------------------------------------------------------
# message size (what the node's bytes_out counts)


@functools.lru_cache(maxsize=64)
def _sealed_size(spec_key: tuple, recipients: int) -> int:
    from p2pfl.envelope import UpdateMeta, seal
    from p2pfl.identity import Identity

    params = {name: np.zeros(shape, dtype=np.dtype(dt)) for name, shape, dt in spec_key}
    payload = codec.encode(params)
    me = Identity.generate()
    peers = {f"{k:016x}": Identity.generate().box_public_bytes for k in range(recipients)}
    meta = UpdateMeta(
        sender=me.node_id,
        federation="0" * 16,
        round=1,
        seq=time.time_ns() // 1000,
        timestamp=time.time(),
        samples=100,
        degree=recipients,
    )
    return len(seal(payload, meta, me, peers))


def message_bytes(params: dict[str, np.ndarray], recipients: int) -> int:
    """Bytes of one sealed update of `params` for `recipients` neighbours (codec frame + envelope).

    Measured by sealing a real envelope for 1 and 2 recipients and extrapolating linearly (each
    recipient adds one wrapped key), so it costs two seals whatever the degree.
    """
    key = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in params.items())
    try:
        one, two = _sealed_size(key, 1), _sealed_size(key, 2)
    except Exception:  # pragma: no cover - no crypto available: the issue's approximation
        size = sum(int(np.prod(s)) * 4 for _, s, _ in key)
        return size + HEADER_ESTIMATE
    return one + (two - one) * (max(recipients, 1) - 1) if recipients > 0 else one - (two - one)


# --------------------------------------------------------------------------------------------------
# the simulation


class Simulation:
    """N virtual nodes; `run()` plays cfg.rounds rounds and returns a SimResult."""

    def __init__(self, cfg: SimConfig, x0: np.ndarray | None = None) -> None:
        started = time.perf_counter()
        self.cfg = cfg
        n = cfg.nodes
        self.net = Network(cfg.topology, n, seed=cfg.seed, ids=cfg.ids, names=cfg.names)
        self.byzantine: tuple[int, ...] = tuple(cfg.byzantine)  # type: ignore[arg-type]
        self.population = self._population()
        self.tasks: Sequence[Task]
        if self.population is not None:  # node i's task is built only if asked for (tests, attacks)
            self.tasks = _Lazy(n, lambda i: load_task(cfg.task_spec(i)))
        else:
            # every shard's load_task partitions the same labels the same way: compute that once
            with PartitionCache().active():
                loaded: list[Task] = []
                for i in range(n):
                    loaded.append(share_test_split(load_task(cfg.task_spec(i)), loaded[:1]))
            self.tasks = loaded
        self.honest = np.ones(n, dtype=bool)
        self.honest[list(self.byzantine)] = False
        self.attacks: dict[int, Attack] = {
            b: make_attack(
                cfg.attack, seed=int(np.random.SeedSequence([cfg.seed, b, 11]).generate_state(1)[0])
            )
            for b in self.byzantine
        }
        for b, attack in self.attacks.items():
            self.tasks[b] = attack.poison_task(self.tasks[b])
        self.reputations = [cfg.make_reputation() for _ in range(n)] if cfg.rule == "robust" else None
        self._flagged: tuple[int, int] | None = None
        self._judged: tuple[int, int] | None = None
        # every node builds its own initial model, as the real node does (the population's nodes
        # build the same one: build_model is seeded by spec.seed alone)
        self.trainer: BatchedTrainer | None = None
        if self.population is not None:
            self.models = [self.tasks[0].build_model()]
            self.samples = self.population.shards.sizes.astype(np.int64)
            self.trainer = self._population_trainer(self.population, self.models[0])
        else:
            self.models = [t.build_model() for t in self.tasks]
            self.samples = np.array([t.num_samples for t in self.tasks], dtype=np.int64)
        params0 = get_params(self.models[0])
        self.spec = codec.spec_of(params0)
        if x0 is not None:
            self.x = np.array(x0, dtype=np.float32)
        elif self.population is not None:
            self.x = np.repeat(flatten(get_params(self.models[0]))[None, :], n, axis=0)
        else:
            self.x = np.stack([flatten(get_params(m)) for m in self.models])
        if self.x.shape != (n, sum(v.size for v in params0.values())):
            raise ValueError(f"x0 must be {n} x P, got {self.x.shape}")
        self.mass = self.samples.astype(np.float64)  # push-sum masses start at the sample counts
        # each virtual node's mixing state, as a real node's round core holds it (built when used)
        self.mixers: Sequence[Mixer] = _Lazy(n, self._mixer)
        if self.trainer is None and cfg.vectorised and batchable(self.tasks, self.models[0]):
            self.trainer = BatchedTrainer(self.tasks, self.models[0])
            self.models = self.models[:1]  # only the template is needed; frees N-1 modules
        self._eval_sample = self._sample_nodes()
        self._previous: np.ndarray | None = None  # gossip_momentum: the exchange before the last
        self._params0 = params0
        self._bytes: dict[int, int] = {}
        self.sent = np.zeros(n, dtype=np.float64)
        self.timings = {"setup": time.perf_counter() - started, "train": 0.0, "mix": 0.0, "eval": 0.0}

    def _population(self) -> Population | None:
        """All nodes' data at once, for tasks that have a POPULATIONS builder, when the batched
        path applies (vectorised, no Byzantine node, a batchable task); else None."""
        cfg = self.cfg
        build = POPULATIONS.get(TASK_ALIASES.get(cfg.task, cfg.task))
        if build is None or not cfg.vectorised or self.byzantine:
            return None
        first = load_task(cfg.task_spec(0))
        if not batchable([first], first.build_model()):
            return None
        return build(cfg)

    def _population_trainer(self, pop: Population, model: nn.Module) -> BatchedTrainer:
        spec = self.cfg.task_spec(0)
        return BatchedTrainer.from_shards(
            model,
            x=pop.x,
            y=pop.y,
            flat=pop.shards.flat,
            offsets=pop.shards.offsets,
            seeds=spec.seed + np.arange(self.cfg.nodes),  # TensorTask's generator: spec.seed + shard
            test=(pop.x_test, pop.y_test),
            lr=spec.lr,
            batch_size=spec.batch_size,
            local_epochs=spec.local_epochs,
        )

    def _mixer(self, i: int) -> Mixer:
        cfg = self.cfg
        return Mixer(
            rule=cfg.rule,
            samples=int(self.samples[i]),
            clip_radius=cfg.radius,
            reputation=None if self.reputations is None else self.reputations[i],
            attack=self.attacks.get(i),
            trim=cfg.trim,
        )

    def _sample_nodes(self) -> np.ndarray | None:
        """The nodes evaluated before the last round (SimConfig.eval_nodes): a sorted sample drawn
        once from the seed, None for every node."""
        k = self.cfg.eval_nodes
        if not k or k >= self.cfg.nodes:
            return None
        rng = np.random.default_rng([self.cfg.seed, 0xE7A1])
        return np.sort(rng.choice(self.cfg.nodes, size=k, replace=False))

    # -- the three phases of a round ------------------------------------------------------------

    def _train(self) -> np.ndarray:
        if not self.cfg.train:
            return np.zeros(0)
        if self.trainer is not None:
            return self.trainer.train(self.x)
        losses = np.empty(self.cfg.nodes)
        for i, (task, model) in enumerate(zip(self.tasks, self.models, strict=True)):
            set_params(model, unflatten(self.x[i], self.spec))
            losses[i] = task.train(model)
            self.x[i] = flatten(get_params(model))
        return losses

    def _craft(self, round: int) -> np.ndarray | None:
        """What every node sends this round: its model, or for a Byzantine node its crafted vector."""
        if not self.attacks:
            return None
        sent = self.x.copy()
        for b in self.attacks:
            crafted = self.mixers[b].craft(self.x[b], round)
            assert crafted is not None
            sent[b] = crafted
        return sent

    def _mix(self, round: int) -> None:
        cfg = self.cfg
        if self._compression().enabled:
            self._mix_compressed(round)
            return
        rows, cols, deg = self.net.edges(round)
        if cfg.drop > 0 and len(rows):
            keep = np.random.default_rng([cfg.seed, round, 7]).random(len(rows)) >= cfg.drop
            rows, cols = rows[keep], cols[keep]
        self._count_sent(deg)
        sent = self._craft(round)
        src = self.x if sent is None else sent
        ids = list(cfg.ids) if cfg.ids is not None else None
        if cfg.vectorised:
            for b in self.byzantine:  # what the attacker received this round (Mixer.mix records it per node)
                self.mixers[b].heard = [src[j] for j in cols[rows == b].tolist()]
            many = mix_many(
                self.x,
                rows,
                cols,
                deg,
                cfg.rule,
                cfg.radius,
                samples=self.samples,
                mass=self.mass,
                sent=sent,
                reputations=self.reputations,
                ids=ids,
                trim=cfg.trim,
            )
            self.x = many.vectors
            if many.mass is not None:
                self.mass = many.mass
            self._note_reputation(many.reputation, ids)
            return
        new = np.empty_like(self.x)
        new_mass = self.mass.copy()
        starts = np.searchsorted(rows, np.arange(cfg.nodes + 1))
        reps: list[dict[str, float]] = []
        for i in range(cfg.nodes):
            got = [
                Neighbour(
                    str(j) if ids is None else ids[j],
                    src[j],
                    int(deg[j]),
                    int(self.samples[j]),
                    float(self.mass[j]),
                )
                for j in cols[starts[i] : starts[i + 1]].tolist()
            ]
            one = self.mixers[i].mix(self.x[i], int(deg[i]), got, own_mass=float(self.mass[i]))
            new[i] = one.vector
            if one.mass is not None:
                new_mass[i] = one.mass
            reps.append(one.reputation)
        self.x, self.mass = new, new_mass
        self._note_reputation(reps if self.reputations is not None else None, ids)

    def _compression(self) -> compression.Compression:
        return compression.Compression.parse(self.cfg.compression)

    def _gossip_state(self) -> compression.RowGossip:
        """The nodes' public estimates (built at the first compressed exchange)."""
        rg: compression.RowGossip | None = self.__dict__.get("_rows")
        if rg is None:
            cfg, d = self.cfg, self.x.shape[1]
            width = len(str(max(cfg.nodes - 1, 0)))  # Network's default ids
            ids = list(cfg.ids) if cfg.ids is not None else [f"node-{i:0{width}d}" for i in range(cfg.nodes)]
            rg = _row_gossip(self._compression(), ids, cfg.seed, d, cfg.keyframe_every)
            assert rg is not None
            rg.starts = compression.chunk_starts(
                self._compression(), d, [int(np.prod(s)) for s, _ in self.spec.values()]
            )
            self.__dict__["_rows"] = rg
        return rg

    def _mix_compressed(self, round: int) -> None:
        """One exchange of compressed updates: every node sends Q(x) or Q(x - x̂) and the rule runs on
        the public estimates x̂ (what the neighbours hold), then x += gamma (y - x̂), as RoundCore.mix
        on a node. A lost diff leaves its receiver out of sync with that sender until a keyframe."""
        cfg, c = self.cfg, self._compression()
        rows, cols, deg = self.net.edges(round)
        lost_rows = lost_cols = np.zeros(0, dtype=np.int64)
        if cfg.drop > 0 and len(rows):
            keep = np.random.default_rng([cfg.seed, round, 7]).random(len(rows)) >= cfg.drop
            lost_rows, lost_cols, rows, cols = rows[~keep], cols[~keep], rows[keep], cols[keep]
        rg = self._gossip_state()
        crafted = self._craft(round)
        kinds = rg.send(self.x if crafted is None else crafted, deg > 0, round)
        self._count_sent(deg, kinds)
        usable = rg.deliver(rows, cols, lost_rows, lost_cols, kinds)
        rows, cols, est = rows[usable], cols[usable], rg.estimates
        ids = list(cfg.ids) if cfg.ids is not None else None
        if cfg.vectorised:
            for b in self.byzantine:
                self.mixers[b].heard = [est[j] for j in cols[rows == b].tolist()]
            many = mix_many(
                est,
                rows,
                cols,
                deg,
                cfg.rule,
                cfg.radius,
                samples=self.samples,
                reputations=self.reputations,
                ids=ids,
                trim=cfg.trim,
            )
            mixed, reps = many.vectors, many.reputation
        else:
            mixed = np.empty_like(est)
            starts = np.searchsorted(rows, np.arange(cfg.nodes + 1))
            reps = []
            for i in range(cfg.nodes):
                name = (lambda j: str(j)) if ids is None else ids.__getitem__
                got = [  # in node id order, as a node's plan lists its neighbours (same float sums)
                    Neighbour(name(j), est[j], int(deg[j]), int(self.samples[j]))
                    for j in sorted(cols[starts[i] : starts[i + 1]].tolist(), key=name)
                ]
                one = self.mixers[i].mix(est[i], int(deg[i]), got)
                mixed[i] = one.vector
                reps.append(one.reputation)
        self.x = compression.step(self.x, est, mixed, c.gamma)
        self._note_reputation(reps if self.reputations is not None else None, ids)

    def _note_reputation(self, reps: list[dict[str, float]] | None, ids: list[str] | None) -> None:
        """Count the edges at honest receivers judged this round and those down-weighted, each as
        (from Byzantine, from honest senders)."""
        if reps is None:
            self._flagged = self._judged = None
            return
        index = {(str(j) if ids is None else ids[j]): j for j in range(self.cfg.nodes)}
        flagged, judged = [0, 0], [0, 0]
        for i, scores in enumerate(reps):
            if not self.honest[i]:
                continue
            for nid, score in scores.items():
                kind = int(self.honest[index[nid]])
                judged[kind] += 1
                flagged[kind] += score < 1.0
        self._flagged, self._judged = (flagged[0], flagged[1]), (judged[0], judged[1])

    def _count_sent(self, deg: np.ndarray, kinds: np.ndarray | None = None) -> None:
        """Add this exchange's bytes to every node's count: one update (of kinds[i] when compressed)
        sealed for its deg[i] neighbours, sent to each; a node without neighbours sends nothing.
        One message size per distinct (degree, kind), not a Python step per node."""
        deg = np.asarray(deg, dtype=np.int64)
        kind = np.full(len(deg), -1, dtype=np.int64) if kinds is None else np.asarray(kinds, dtype=np.int64)
        span = int(kind.max(initial=-1)) + 2  # kind + 1 in 0..span-1
        keys, inverse = np.unique(deg * span + kind + 1, return_inverse=True)
        sizes = [self._message(d, r - 1) * d if d else 0 for d, r in (divmod(int(key), span) for key in keys)]
        self.sent += np.asarray(sizes, dtype=np.float64)[inverse.reshape(-1)]

    def _message(self, degree: int, kind: int = -1) -> int:
        """Bytes of one sealed update for `degree` neighbours (a compressed one of `kind`)."""
        key = degree if kind < 0 else -(4 * degree + kind + 1)  # compressed kinds: negative keys
        if key not in self._bytes:
            c = self._compression()
            params = (
                self._params0
                if kind < 0 or not c.enabled
                else compression.wire_template(c, self.x.shape[1], kind, len(self._gossip_state().starts))
            )
            self._bytes[key] = message_bytes(params, degree)
        return self._bytes[key]

    def _evaluate(self, nodes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(accuracy, test loss) of the given nodes (default: every node, in node order)."""
        if self.trainer is not None:
            return self.trainer.evaluate(self.x if nodes is None else self.x[nodes])
        which = range(self.cfg.nodes) if nodes is None else nodes.tolist()
        acc, loss = np.empty(len(which)), np.empty(len(which))
        for k, i in enumerate(which):
            model = self.models[i]
            set_params(model, unflatten(self.x[i], self.spec))
            acc[k], loss[k] = self.tasks[i].evaluate(model)
        return acc, loss

    def _exchange(self, round: int) -> None:
        """One gossip exchange (numbered like the node's rounds), accelerated when configured."""
        before = self.x if self.cfg.gossip_momentum else None
        self._mix(round)
        if before is not None:
            self._accelerate(before)

    def _accelerate(self, before: np.ndarray) -> None:
        """Accelerated ("shift-register") gossip: x_{t+1} = (1 + beta) W x_t - beta x_{t-1}.

        W x_t is what the exchange just mixed; x_{t-1} is this node's own vector before the previous
        exchange of the round (the first exchange of a round is a plain one). The mean is kept (W
        is stochastic and the extrapolation is a difference of two vectors with the same mean), and
        beta = (1 - sqrt(1 - l2^2)) / (1 + sqrt(1 - l2^2)) (l2: W's second largest eigenvalue
        modulus) turns the decay of the disagreement from l2^t into about sqrt(beta)^t. A real node
        would keep only its own previous vector: a purely local change after mixing.
        """
        if self._previous is not None:
            mixed = self.x
            self.x = mixed + np.float32(self.cfg.gossip_momentum) * (mixed - self._previous)
        self._previous = before

    # -- rounds -----------------------------------------------------------------------------------

    def step(self, round: int) -> RoundStats:
        """One round, numbered like the node's (1, 2, ...): local training, then gossip_steps
        exchanges (numbered (round - 1) k + 1 .. round k, as a real node with [gossip]
        steps_per_round = k numbers its own rounds)."""
        k = self.cfg.gossip_steps
        t0 = time.perf_counter()
        losses = self._train()
        t1 = time.perf_counter()
        self._previous = None  # acceleration restarts after local training moved the models
        for e in range((round - 1) * k + 1, round * k + 1):
            self._exchange(e)
        self._previous = None
        t2 = time.perf_counter()
        acc = test_loss = None
        evaluated = None
        if round == self.cfg.rounds:
            acc, test_loss = self._evaluate()  # the last round: every node
        elif round % self.cfg.eval_every == 0:
            evaluated = self._eval_sample
            acc, test_loss = self._evaluate(evaluated)
        t3 = time.perf_counter()
        self.timings["train"] += t1 - t0
        self.timings["mix"] += t2 - t1
        self.timings["eval"] += t3 - t2
        return RoundStats(
            round=round,
            train_loss=losses,
            accuracy=acc,
            test_loss=test_loss,
            evaluated=evaluated,
            consensus=consensus_distance(self.x if not self.byzantine else self.x[self.honest]),
            bytes_per_node=float(self.sent.mean()),
            seconds=t3 - t0,
            honest=None if not self.byzantine else self.honest.copy(),
            downweighted=self._flagged,
            judged=self._judged,
        )

    def run(self, on_round: Callable[[RoundStats], None] | None = None, gap: bool = True) -> SimResult:
        history = []
        for r in range(1, self.cfg.rounds + 1):
            stats = self.step(r)
            history.append(stats)
            if on_round is not None:
                on_round(stats)
        g = float("nan")
        if gap:
            t0 = time.perf_counter()
            g = self.net.gap(self.samples if self.cfg.rule == "weighted" else None)
            self.timings["gap"] = time.perf_counter() - t0
        return SimResult(
            config=self.cfg,
            rounds=history,
            spectral_gap=g,
            params=self.x.shape[1],
            samples=self.samples,
            vectors=self.x,
            timings=dict(self.timings),
            mass=self.mass if self.cfg.rule == "push-sum" else None,
            byzantine=self.byzantine,
            reputation=None if self.reputations is None else [r.scores() for r in self.reputations],
        )


def simulate(cfg: SimConfig, on_round: Callable[[RoundStats], None] | None = None) -> SimResult:
    """Build and run one simulation."""
    return Simulation(cfg).run(on_round)


# --------------------------------------------------------------------------------------------------
# command line: python -m p2pfl.sim --nodes 64 --topology exponential --rounds 50


def set_torch_threads(threads: int) -> None:
    """Apply a --threads option: threads > 0 sets torch's intra-op thread count, 0 (or less) keeps
    torch's default. The batched steps are small, so the command lines default to 1: extra threads
    only spin when other work shares the cores."""
    if threads > 0:
        torch.set_num_threads(threads)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> SimConfig:
    """A SimConfig from the command-line options named like its fields, then `overrides`.

    The command lines (this module's and the scripts') spell their options as SimConfig's field
    names, so copying them one by one would repeat the field list in every script. Options that
    are not fields are ignored; pass per-run values, and options whose command-line form differs
    from the field (a comma list, a negated flag), as overrides.
    """
    names = {f.name for f in fields(SimConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return SimConfig(**{**given, **overrides})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m p2pfl.sim", description=__doc__.split("\n")[0])
    p.add_argument(
        "--task", default="digits-logreg", help="digits-logreg, digits-mlp, ... or module:function"
    )
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--topology", default="ring", help="a built-in name or a topology file")
    p.add_argument("--rule", default="mean", choices=RULES)
    p.add_argument("--radius", type=float, default=None)
    p.add_argument("--partition", default="iid", choices=PARTITION_SCHEMES)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--drop", type=float, default=0.0)
    p.add_argument("--attack", default="", help=f"one of {', '.join(ATTACKS)} (optionally name:key=value)")
    p.add_argument(
        "--byzantine",
        default="0",
        help="number of Byzantine nodes (spread evenly) or comma-separated indices",
    )
    p.add_argument("--trim", type=int, default=None, help='values cut per side for rule "trimmed-mean"')
    p.add_argument("--loop", action="store_true", help="per-node loop instead of the vectorised path")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    set_torch_threads(a.threads)
    cfg = config_from_args(
        a,
        vectorised=not a.loop,
        byzantine=int(a.byzantine)
        if "," not in a.byzantine
        else tuple(int(v) for v in a.byzantine.split(",")),
    )
    res = simulate(cfg, lambda s: print(json.dumps(s.row())))
    final = res.final
    print(
        json.dumps(
            {
                "config": asdict(cfg),
                "spectral_gap": res.spectral_gap,
                "params": res.params,
                "final_mean_accuracy": final.mean_accuracy if final else None,
                "final_min_accuracy": final.min_accuracy if final else None,
                "final_honest_mean_accuracy": final.honest_mean_accuracy if final else None,
                "final_honest_min_accuracy": final.honest_min_accuracy if final else None,
                "byzantine": list(res.byzantine),
                "timings": res.timings,
            }
        )
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
