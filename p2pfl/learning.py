"""The learning task: model, local data shard, local training, evaluation, and parameter plumbing.

Every node of a federation loads the same TaskSpec except for `shard`. The test split is fixed by a
constant seed so all nodes evaluate on the same examples; the training split is partitioned among
`num_shards` by `partition_indices(seed=spec.seed)` and a node keeps only its own shard. Models are
initialised from `spec.seed`, so all nodes start gossiping from the same point.

Local training is plain SGD without momentum or other optimizer state: the whole state that gossip
has to carry is the model's state_dict.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import importlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p2pfl.errors import ConfigError

BUILTIN_TASKS = ("digits-mlp", "digits-cnn", "synthetic-logreg")
PARTITION_SCHEMES = ("iid", "dirichlet")

TEST_FRACTION = 0.25
SPLIT_SEED = 20240917  # constant: every node must hold the same test split whatever its spec.seed
SYNTHETIC_SEED = 1234  # constant: the synthetic data set is the same for every node
SYNTHETIC_SAMPLES = 2000
SYNTHETIC_FEATURES = 20
SYNTHETIC_CLASSES = 4
DIRICHLET_MIN_SAMPLES = 10  # resample the Dirichlet draw until every shard has this many (when possible)
DIRICHLET_ATTEMPTS = 100
EVAL_BATCH = 4096
HIDDEN = 64


@dataclass(frozen=True)
class TaskSpec:
    """What to learn and which part of the data this node holds.

    `seed` is federation-wide (same model init and same partition on every node); `shard` is this
    node's index in `range(num_shards)`. `data` optionally names a user .npz file with arrays
    `X` (n, features) and `y` (n,) of integer labels 0..C-1 (optional scalar `num_classes`).
    """

    name: str = "digits-mlp"
    shard: int = 0
    num_shards: int = 1
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.3
    data: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.num_shards, int) or self.num_shards < 1:
            raise ConfigError(f"task.num_shards must be an integer >= 1, got {self.num_shards!r}")
        if not isinstance(self.shard, int) or not 0 <= self.shard < self.num_shards:
            raise ConfigError(f"task.shard must be in 0..{self.num_shards - 1}, got {self.shard!r}")
        if self.partition not in PARTITION_SCHEMES:
            raise ConfigError(
                f"task.partition must be one of {', '.join(PARTITION_SCHEMES)}, got {self.partition!r}"
            )
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"task.alpha must be a finite number > 0, got {self.alpha!r}")
        if not isinstance(self.local_epochs, int) or self.local_epochs < 1:
            raise ConfigError(f"task.local_epochs must be an integer >= 1, got {self.local_epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"task.batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"task.lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"task.seed must be an integer, got {self.seed!r}")


@runtime_checkable
class Task(Protocol):
    """What a node needs from a learning task; custom tasks implement this ("module:function")."""

    num_samples: int

    def build_model(self) -> torch.nn.Module: ...

    def train(self, model: torch.nn.Module) -> float: ...

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float]: ...


# --------------------------------------------------------------------------------------------------
# data partitioning


def partition_indices(
    labels: np.ndarray, num_shards: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Split sample indices 0..n-1 into `num_shards` disjoint, covering, non-empty sorted shards.

    "iid": a seeded permutation cut into near-equal parts (sizes differ by at most one).
    "dirichlet": label skew; for each class the proportions going to each shard are drawn from
    Dir(alpha) (small alpha = strong skew). Draws are repeated until every shard has at least
    min(10, n // num_shards) samples; if that keeps failing, samples are moved from the largest
    shards into the short ones, so no shard is ever empty.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {labels.shape}")
    n = len(labels)
    if not isinstance(num_shards, int | np.integer) or num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {num_shards!r}")
    if n < num_shards:
        raise ConfigError(f"cannot split {n} training samples into {num_shards} non-empty shards")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        shards = np.array_split(rng.permutation(n), num_shards)
    elif scheme == "dirichlet":
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"dirichlet alpha must be > 0, got {alpha!r}")
        shards = _dirichlet_shards(labels, num_shards, float(alpha), rng)
    else:
        raise ConfigError(f"unknown partition scheme {scheme!r}; known: {', '.join(PARTITION_SCHEMES)}")
    return [np.sort(s).astype(np.int64) for s in shards]


class PartitionCache:
    """Remembers partition_indices results, for code that builds many shards of one split.

    Every task load partitions the whole training set and keeps one shard, so loading the N shards
    of a federation in one process (the simulator) computes the same partition N times: about a
    second each for a Dirichlet split at N = 1024. partition_indices is pure, so computing it once
    per (labels, num_shards, scheme, alpha, seed) gives the same shards. Each call returns fresh
    copies, as partition_indices does, so callers may keep or modify them.

    Use `cache.shards(...)` directly, or `with cache.active():` to have the task loaders
    (load_task's built-ins and `_tensor_task`) use it for the tasks loaded inside the block.
    Entries live as long as the cache object; make one per batch of loads.
    """

    def __init__(self) -> None:
        self._shards: dict[tuple, list[np.ndarray]] = {}

    def shards(
        self, labels: np.ndarray, num_shards: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
    ) -> list[np.ndarray]:
        """partition_indices(labels, num_shards, scheme, alpha, seed), computed once per key."""
        arr = np.asarray(labels)
        digest = hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()
        key = (digest, arr.dtype.str, arr.shape, num_shards, scheme, float(alpha), seed)
        if key not in self._shards:
            self._shards[key] = partition_indices(labels, num_shards, scheme, alpha, seed)
        return [s.copy() for s in self._shards[key]]

    @contextlib.contextmanager
    def active(self) -> Iterator[PartitionCache]:
        """Make this the cache the task loaders use in this context (thread / task local)."""
        token = _ACTIVE_PARTITION_CACHE.set(self)
        try:
            yield self
        finally:
            _ACTIVE_PARTITION_CACHE.reset(token)


_ACTIVE_PARTITION_CACHE: contextvars.ContextVar[PartitionCache | None] = contextvars.ContextVar(
    "p2pfl_partition_cache", default=None
)


def _shards_for(
    labels: np.ndarray, num_shards: int, scheme: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """partition_indices, through the active PartitionCache when there is one."""
    cache = _ACTIVE_PARTITION_CACHE.get()
    if cache is None:
        return partition_indices(labels, num_shards, scheme, alpha, seed)
    return cache.shards(labels, num_shards, scheme, alpha, seed)


def _dirichlet_shards(labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    n = len(labels)
    target = max(1, min(DIRICHLET_MIN_SAMPLES, n // k))
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    shards: list[np.ndarray] = []
    for _ in range(DIRICHLET_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(k, alpha))
            if not np.all(np.isfinite(p)):  # degenerate draw for tiny alpha: fall back to uniform
                p = np.full(k, 1.0 / k)
            cuts = np.minimum((np.cumsum(p)[:-1] * len(idx)).astype(np.int64), len(idx))
            for bucket, piece in zip(parts, np.split(idx, cuts), strict=True):
                bucket.append(piece)
        shards = [np.concatenate(b) for b in parts]
        if min(len(s) for s in shards) >= target:
            return shards
    # Could not draw a partition with `target` samples everywhere: top up the short shards from the
    # largest ones (terminates because target * k <= n).
    while True:
        sizes = np.array([len(s) for s in shards])
        short = int(np.argmin(sizes))
        if sizes[short] >= target:
            return shards
        big = int(np.argmax(sizes))
        move = rng.integers(len(shards[big]))
        shards[short] = np.append(shards[short], shards[big][move])
        shards[big] = np.delete(shards[big], move)


def _split_test(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (constant-seeded) train / test index split shared by every node."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = min(n - 1, max(1, round(TEST_FRACTION * n)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# --------------------------------------------------------------------------------------------------
# the in-memory classification task used by every built-in


class TensorTask:
    """Classification over in-memory tensors: this node's training shard plus the shared test split.

    Tensors are built once; `train` runs `local_epochs` of minibatch SGD (no momentum, so the model's
    state_dict is the whole state) shuffled by a generator seeded from spec.seed + spec.shard.
    """

    def __init__(
        self,
        spec: TaskSpec,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        make_model: Callable[[], nn.Module],
        num_classes: int,
    ) -> None:
        self.spec = spec
        self.num_classes = num_classes
        self.num_samples = len(y_train)
        self._x = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
        self._y = torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64))
        self._x_test = torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32))
        self._y_test = torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64))
        self._make_model = make_model
        self._gen = torch.Generator().manual_seed(spec.seed + spec.shard)

    @property
    def train_labels(self) -> np.ndarray:
        """Labels of this node's shard (for statistics and tests)."""
        return self._y.numpy()

    @property
    def num_test(self) -> int:
        return len(self._y_test)

    def build_model(self) -> nn.Module:
        """Same initial weights on every node: seeded by spec.seed, without touching the global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.seed)
            return self._make_model()

    def train(self, model: nn.Module) -> float:
        """Run local_epochs of SGD over the own shard; returns the mean training loss."""
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.spec.lr, momentum=0.0)
        n, bs = self.num_samples, self.spec.batch_size
        total, count = 0.0, 0
        for _ in range(self.spec.local_epochs):
            perm = torch.randperm(n, generator=self._gen)
            for start in range(0, n, bs):
                idx = perm[start : start + bs]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(self._x[idx]), self._y[idx])
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """(accuracy, mean cross-entropy loss) on the shared test split."""
        model.eval()
        correct, loss_sum = 0, 0.0
        for start in range(0, self.num_test, EVAL_BATCH):
            xb = self._x_test[start : start + EVAL_BATCH]
            yb = self._y_test[start : start + EVAL_BATCH]
            out = model(xb)
            loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(dim=1) == yb).sum())
        model.train()
        return correct / self.num_test, loss_sum / self.num_test


# --------------------------------------------------------------------------------------------------
# models


def mlp(features: int, classes: int, hidden: int = HIDDEN) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class SmallCNN(nn.Module):
    """conv 1->16 3x3 pad 1, ReLU, conv 16->32 3x3, ReLU, 2x2 max-pool, linear -> classes."""

    def __init__(self, side: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.side = side
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3)
        pooled = (side - 2) // 2
        self.fc = nn.Linear(32 * pooled * pooled, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, self.side, self.side)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


# --------------------------------------------------------------------------------------------------
# data sources


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits, pixels 0..16 scaled to [0, 1] (cached; callers index, so never mutate)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _synthetic() -> tuple[np.ndarray, np.ndarray]:
    """Softmax-regression data from a constant-seeded generator (same on every node)."""
    rng = np.random.default_rng(SYNTHETIC_SEED)
    w = rng.normal(size=(SYNTHETIC_FEATURES, SYNTHETIC_CLASSES))
    b = rng.normal(scale=0.5, size=SYNTHETIC_CLASSES)
    x = rng.normal(size=(SYNTHETIC_SAMPLES, SYNTHETIC_FEATURES))
    logits = x @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    u = rng.random((SYNTHETIC_SAMPLES, 1))
    y = np.minimum((p.cumsum(axis=1) < u).sum(axis=1), SYNTHETIC_CLASSES - 1)
    return x.astype(np.float32), y.astype(np.int64)


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Read a user data set: X (n, features) finite numbers, y (n,) integer labels >= 0.

    Never unpickles (allow_pickle=False). The class count is max(y)+1 unless the file carries a
    scalar `num_classes` (useful when nodes hold different files that must agree on the model).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"task.data: no such file {str(p)!r}")
    try:
        with np.load(p, allow_pickle=False) as z:
            if "X" not in z.files or "y" not in z.files:
                raise ConfigError(f"task.data {str(p)!r} must contain arrays 'X' and 'y' (has {z.files})")
            x, y = z["X"], z["y"]
            declared = int(z["num_classes"]) if "num_classes" in z.files else None
    except ConfigError:
        raise
    except Exception as exc:  # zip / format errors, object arrays refused by allow_pickle=False, ...
        raise ConfigError(f"task.data {str(p)!r} is not a readable .npz file: {exc}") from exc
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ConfigError(
            f"task.data: need X of shape (n, features) and y of shape (n,), got {x.shape} and {y.shape}"
        )
    if len(y) < 2 or x.shape[1] < 1:
        raise ConfigError("task.data: need at least 2 samples and 1 feature")
    if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
        raise ConfigError(f"task.data: X must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ConfigError("task.data: X contains NaN or infinite values")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ConfigError("task.data: y must hold integer class labels")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"task.data: y must hold integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise ConfigError("task.data: labels must be >= 0")
    classes = int(y.max()) + 1
    if declared is not None:
        if declared < classes:
            raise ConfigError(f"task.data: num_classes={declared} but labels go up to {classes - 1}")
        classes = declared
    return x, y, max(classes, 2)


def _tensor_task(
    spec: TaskSpec, x: np.ndarray, y: np.ndarray, make_model: Callable[[], nn.Module], classes: int
):
    train_idx, test_idx = _split_test(len(y))
    shards = _shards_for(y[train_idx], spec.num_shards, spec.partition, spec.alpha, spec.seed)
    own = train_idx[shards[spec.shard]]
    return TensorTask(spec, x[own], y[own], x[test_idx], y[test_idx], make_model, classes)


def _builtin(spec: TaskSpec) -> TensorTask:
    if spec.data:
        x, y, classes = load_npz(spec.data)
    elif spec.name == "synthetic-logreg":
        x, y = _synthetic()
        classes = SYNTHETIC_CLASSES
    else:
        x, y = _digits()
        classes = 10
    features = x.shape[1]
    if spec.name == "digits-mlp":
        return _tensor_task(spec, x, y, lambda: mlp(features, classes), classes)
    if spec.name == "synthetic-logreg":
        return _tensor_task(spec, x, y, lambda: nn.Linear(features, classes), classes)
    side = math.isqrt(features)
    if side * side != features or side < 4:
        raise ConfigError(
            f"digits-cnn needs square images of side >= 4 (features = side*side), got {features} features"
        )
    return _tensor_task(spec, x, y, lambda: SmallCNN(side, classes), classes)


def load_task(spec: TaskSpec) -> Task:
    """Build this node's task: a built-in name, or "module:function" called as function(spec) -> Task."""
    if spec.name in BUILTIN_TASKS:
        return _builtin(spec)
    if ":" in spec.name:
        module_name, _, func_name = spec.name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(
                f"task.name {spec.name!r}: cannot import module {module_name!r}: {exc}"
            ) from exc
        func = getattr(module, func_name, None)
        if not callable(func):
            raise ConfigError(
                f"task.name {spec.name!r}: module {module_name!r} has no callable {func_name!r}"
            )
        task = func(spec)
        missing = [a for a in ("num_samples", "build_model", "train", "evaluate") if not hasattr(task, a)]
        if missing:
            raise ConfigError(
                f"task.name {spec.name!r} returned {type(task).__name__} without {', '.join(missing)}"
            )
        return task
    raise ConfigError(
        f"unknown task {spec.name!r}; built-ins: {', '.join(BUILTIN_TASKS)}, or 'module:function' returning a Task"
    )


# --------------------------------------------------------------------------------------------------
# parameters <-> numpy


def get_params(model: nn.Module) -> dict[str, np.ndarray]:
    """float32 numpy copies of every state_dict entry, in state_dict order."""
    return {
        name: t.detach().to(device="cpu", dtype=torch.float32).numpy().copy()
        for name, t in model.state_dict().items()
    }


def set_params(model: nn.Module, params: Mapping[str, np.ndarray]) -> None:
    """Copy `params` into the model's own tensors (values are cast to each tensor's dtype).

    The names must be exactly the state_dict's and every shape must match; read-only inputs
    (e.g. zero-copy decoded buffers) are fine since nothing aliases them afterwards.
    """
    state = model.state_dict()
    if set(state) != set(params):
        missing, extra = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise ValueError(f"parameter names differ from the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, t in state.items():
            arr = np.asarray(params[name])
            if tuple(arr.shape) != tuple(t.shape):
                raise ValueError(f"parameter {name!r}: shape {arr.shape} != model {tuple(t.shape)}")
            if t.device.type == "cpu" and t.dtype != torch.bfloat16:
                np.copyto(t.numpy(), arr, casting="unsafe")
            else:
                t.copy_(torch.tensor(np.array(arr)))


SpecLike = Mapping[str, Any]


def flatten(params: Mapping[str, np.ndarray]) -> np.ndarray:
    """One contiguous float32 vector of all entries, in mapping (state_dict) order."""
    if not params:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(a).ravel() for a in params.values()], dtype=np.float32)


def unflatten(vec: np.ndarray, spec: SpecLike) -> dict[str, np.ndarray]:
    """Inverse of flatten. `spec` maps name -> (shape, dtype) in flatten() order (as codec.spec_of
    gives) or name -> template array. float32 entries are views into `vec` (no copy); others are cast."""
    vec = np.asarray(vec)
    if vec.ndim != 1:
        raise ValueError(f"expected a flat vector, got shape {vec.shape}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, entry in spec.items():
        if isinstance(entry, np.ndarray):
            shape, dtype = tuple(entry.shape), entry.dtype
        else:
            shape, dtype = tuple(entry[0]), np.dtype(entry[1])
        size = math.prod(shape)
        if offset + size > vec.size:
            raise ValueError(f"vector of {vec.size} values is too short for the spec at {name!r}")
        piece = vec[offset : offset + size].reshape(shape)
        if piece.dtype == dtype:
            out[name] = piece
        elif np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            out[name] = np.rint(piece).astype(dtype)  # averaged counters: round, do not truncate
        else:
            out[name] = piece.astype(dtype)
        offset += size
    if offset != vec.size:
        raise ValueError(f"vector has {vec.size} values but the spec needs {offset}")
    return out
