"""The data side of a task: sources, the shared test split, and partitioning among shards.

Data sources give (X float32 (n, features), y int64 (n,)): sklearn's digits, a constant-seeded
synthetic softmax-regression set, or a user .npz file (load_npz). The test split is fixed by a
constant seed so all nodes evaluate on the same examples (split_test); the training split is
partitioned among `num_shards` by partition_indices ("iid" or Dirichlet label skew), optionally
through a PartitionCache when one process loads many shards of the same split (the simulator).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from p2pfl.errors import ConfigError
from p2pfl.learning.spec import PARTITION_SCHEMES

TEST_FRACTION = 0.25
SPLIT_SEED = 20240917  # constant: every node must hold the same test split whatever its spec.seed
SYNTHETIC_SEED = 1234  # constant: the synthetic data set is the same for every node
SYNTHETIC_SAMPLES = 2000
SYNTHETIC_FEATURES = 20
SYNTHETIC_CLASSES = 4
DIGITS_CLASSES = 10
DIRICHLET_MIN_SAMPLES = 10  # resample the Dirichlet draw until every shard has this many (when possible)
DIRICHLET_ATTEMPTS = 100
MAX_CLASSES = 10_000  # the output layer has one row per class: a stray huge label must not size it


# --------------------------------------------------------------------------------------------------
# partitioning


def partition_indices(
    labels: np.ndarray, num_shards: int, *, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
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
    (load_task's built-ins and `tasks.tensor_task`) use it for the tasks loaded inside the block.
    Entries live as long as the cache object; make one per batch of loads.
    """

    def __init__(self) -> None:
        self._shards: dict[tuple, list[np.ndarray]] = {}

    def shards(
        self, labels: np.ndarray, num_shards: int, *, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
    ) -> list[np.ndarray]:
        """partition_indices(labels, num_shards, scheme, alpha, seed), computed once per key."""
        arr = np.asarray(labels)
        digest = hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()
        key = (digest, arr.dtype.str, arr.shape, num_shards, scheme, float(alpha), seed)
        if key not in self._shards:
            self._shards[key] = partition_indices(labels, num_shards, scheme=scheme, alpha=alpha, seed=seed)
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


def shards_for(
    labels: np.ndarray, num_shards: int, *, scheme: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """partition_indices, through the active PartitionCache when there is one."""
    cache = _ACTIVE_PARTITION_CACHE.get()
    if cache is None:
        return partition_indices(labels, num_shards, scheme=scheme, alpha=alpha, seed=seed)
    return cache.shards(labels, num_shards, scheme=scheme, alpha=alpha, seed=seed)


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


# --------------------------------------------------------------------------------------------------
# the shared test split and the data sources


def split_test(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (constant-seeded) train / test index split shared by every node."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = min(n - 1, max(1, round(TEST_FRACTION * n)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits (DIGITS_CLASSES classes), pixels 0..16 scaled to [0, 1] (cached; callers
    index, so never mutate)."""
    from sklearn import datasets

    d = datasets.load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def load_synthetic() -> tuple[np.ndarray, np.ndarray]:
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
    """Read a user data set: X (n, features) finite numbers, y (n,) integer labels 0..MAX_CLASSES-1.

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
            declared = z["num_classes"] if "num_classes" in z.files else None
    except ConfigError:
        raise
    except Exception as exc:  # zip / format errors, object arrays refused by allow_pickle=False, ...
        raise ConfigError(f"task.data {str(p)!r} is not a readable .npz file: {exc}") from exc
    x = _features(x, y)
    y = _labels(y)
    classes = int(y.max()) + 1
    if declared is not None:
        classes = _declared_classes(declared, classes)
    return x, y, max(classes, 2)


def _features(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ConfigError(
            f"task.data: need X of shape (n, features) and y of shape (n,), got {x.shape} and {y.shape}"
        )
    if len(y) < 2 or x.shape[1] < 1:
        raise ConfigError("task.data: need at least 2 samples and 1 feature")
    if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
        raise ConfigError(f"task.data: X must be real numbers, got dtype {x.dtype}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
        x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ConfigError("task.data: X contains NaN or infinite values (or values too large for float32)")
    return x


def _labels(y: np.ndarray) -> np.ndarray:
    """Integer class labels, checked in their own dtype: a cast first would wrap huge values."""
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ConfigError("task.data: y must hold integer class labels (found NaN, inf or fractions)")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"task.data: y must hold integer class labels, got dtype {y.dtype}")
    if y.min() < 0:
        raise ConfigError(f"task.data: labels must be >= 0, found {y.min()}")
    if y.max() >= MAX_CLASSES:
        raise ConfigError(
            f"task.data: label {y.max()} is too large; labels must be class indices 0..{MAX_CLASSES - 1}"
        )
    return y.astype(np.int64)


def _declared_classes(declared: np.ndarray, needed: int) -> int:
    value = declared.item() if declared.ndim == 0 else None
    if not (isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()):
        raise ConfigError(f"task.data: num_classes must be a single integer, got {declared!r}")
    classes = int(value)
    if not needed <= classes <= MAX_CLASSES:
        raise ConfigError(
            f"task.data: num_classes={classes} must be in {needed}..{MAX_CLASSES} (labels go up to {needed - 1})"
        )
    return classes
