"""The data side of a task: sources, the shared test split, and partitioning among shards.

Data sources give (X float32 (n, features), y int64 (n,)): sklearn's digits, a constant-seeded
synthetic softmax-regression set, or a user file: .npz (load_npz) or .csv with a header row
(read_table reads both, by column name for CSV). The test split is fixed by a constant seed so all
nodes evaluate on the same examples (split_test); the training split is partitioned among
`num_shards` by partition_indices ("iid" or Dirichlet label skew), optionally through a
PartitionCache when one process loads many shards of the same split (the simulator).
Feature standardisation (Standardizer) and the class-count checks (check_classes) live here too,
so the node, the model file and the `evaluate` / `predict` commands treat data the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import functools
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pfl.errors import ConfigError
from p2pfl.learning.spec import MAX_CLASSES, PARTITION_SCHEMES

TEST_FRACTION = 0.25
SPLIT_SEED = 20240917  # constant: every node must hold the same test split whatever its spec.seed
SYNTHETIC_SEED = 1234  # constant: the synthetic data set is the same for every node
SYNTHETIC_SAMPLES = 2000
SYNTHETIC_FEATURES = 20
SYNTHETIC_CLASSES = 4
DIGITS_CLASSES = 10
DIRICHLET_MIN_SAMPLES = 10  # resample the Dirichlet draw until every shard has this many (when possible)
DIRICHLET_ATTEMPTS = 100
MIN_STD = 1e-6  # a feature this flat (constant in the shard) is centred, not blown up
DATA_SUFFIXES = (".csv", ".npz")
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})  # how exports spell "no value"


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
        raise DatasetTooSmall(n, num_shards)
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


class DatasetTooSmall(ConfigError):
    """More shards (nodes) than training samples: a partition cannot give every node one sample."""

    def __init__(self, samples: int, shards: int) -> None:
        self.samples, self.shards = samples, shards
        super().__init__(
            f"cannot split {samples} training samples into {shards} non-empty shards (one per node): "
            f"use at most {samples} nodes, a larger data set ([task] data), or, in the simulator, a task "
            "whose data grows with the nodes (task 'digits-resampled': every node draws its own samples "
            "with replacement from the digits training split)"
        )


class Shards(Sequence[np.ndarray]):
    """All shards of one partition, stored once as a flat index array cut at `offsets`.

    shards[i] is a fresh copy of shard i (callers may keep or modify it) and costs O(len(shard)),
    not O(all shards): loading N shards one by one is O(N) in all. `view(i)` gives the read-only
    slice itself, without copying.
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat = np.asarray(flat, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.flat.flags.writeable = False
        self.offsets.flags.writeable = False

    @classmethod
    def of(cls, shards: Sequence[np.ndarray]) -> Shards:
        sizes = np.fromiter((len(s) for s in shards), dtype=np.int64, count=len(shards))
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        flat = np.concatenate(list(shards)) if len(shards) else np.zeros(0, dtype=np.int64)
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def view(self, i: int) -> np.ndarray:
        """Shard i as a read-only view into the flat array (no copy)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"shard {i} out of range for {len(self)} shards")
        i %= len(self)
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self.view(int(i)).copy()


class PartitionCache:
    """Remembers partition_indices results, for code that builds many shards of one split.

    Every task load partitions the whole training set and keeps one shard, so loading the N shards
    of a federation in one process (the simulator) computes the same partition N times: about a
    second each for a Dirichlet split at N = 1024. partition_indices is pure, so computing it once
    per (labels, num_shards, scheme, alpha, seed) gives the same shards. The result is a Shards
    (one flat index array): indexing it returns a fresh copy of one shard, so callers may keep or
    modify it, and N loads cost O(N) in all (copying every shard on every lookup was O(N^2): 255 s
    of setup at 10,000 nodes).

    Use `cache.shards(...)` directly, or `with cache.active():` to have the task loaders
    (load_task's built-ins and `tasks.tensor_task`) use it for the tasks loaded inside the block.
    Entries live as long as the cache object; make one per batch of loads.
    """

    def __init__(self) -> None:
        self._shards: dict[tuple, Shards] = {}

    def shards(
        self, labels: np.ndarray, num_shards: int, *, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
    ) -> Shards:
        """partition_indices(labels, num_shards, scheme, alpha, seed), computed once per key."""
        arr = np.asarray(labels)
        digest = hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()
        key = (digest, arr.dtype.str, arr.shape, num_shards, scheme, float(alpha), seed)
        if key not in self._shards:
            self._shards[key] = Shards.of(
                partition_indices(labels, num_shards, scheme=scheme, alpha=alpha, seed=seed)
            )
        return self._shards[key]

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
) -> Sequence[np.ndarray]:
    """partition_indices, through the active PartitionCache when there is one (then a Shards:
    indexing it copies one shard only)."""
    cache = _ACTIVE_PARTITION_CACHE.get()
    if cache is None:
        return partition_indices(labels, num_shards, scheme=scheme, alpha=alpha, seed=seed)
    return cache.shards(labels, num_shards, scheme=scheme, alpha=alpha, seed=seed)


def resample_indices(
    labels: np.ndarray,
    count: int,
    *,
    shard: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    by_class: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """`count` sample indices drawn WITH replacement for one shard (sorted): not a partition, so any
    number of shards can draw from a small data set, each in O(count) from its own generator
    (seed, shard): shard i draws the same indices whichever process asks.

    "iid": uniform over all samples. "dirichlet": label skew; the shard's class proportions are
    drawn from Dir(alpha) (small alpha = strong skew), then each sample uniformly within its class.
    by_class (the indices of each class, in label order) saves recomputing it per shard.
    """
    labels = np.asarray(labels)
    if count < 1 or not len(labels):
        raise ConfigError(f"need at least one sample to draw from and count >= 1, got {len(labels)}, {count}")
    rng = np.random.default_rng([seed, shard, 0x5E5A])
    if scheme == "iid":
        return np.sort(rng.integers(0, len(labels), size=count))
    if scheme != "dirichlet":
        raise ConfigError(f"unknown partition scheme {scheme!r}; known: {', '.join(PARTITION_SCHEMES)}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"dirichlet alpha must be > 0, got {alpha!r}")
    groups = (
        list(by_class) if by_class is not None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    )
    p = rng.dirichlet(np.full(len(groups), float(alpha)))
    if not np.all(np.isfinite(p)):  # degenerate draw for tiny alpha: fall back to uniform
        p = np.full(len(groups), 1.0 / len(groups))
    counts = rng.multinomial(count, p)
    picked = [g[rng.integers(0, len(g), size=c)] for g, c in zip(groups, counts, strict=True) if c]
    return np.sort(np.concatenate(picked)).astype(np.int64)


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


def split_test(n: int, fraction: float = TEST_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (constant-seeded) train / test index split shared by every node; at least one of each."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = min(n - 1, max(1, round(fraction * n)))
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
    table = read_table(path)
    assert table.y is not None  # labels are required by default
    classes = int(table.y.max()) + 1
    if table.declared_classes is not None:
        classes = _declared_classes(table.declared_classes, classes, "task.data")
    return table.x, table.y, max(classes, 2)


# --------------------------------------------------------------------------------------------------
# own data: .csv and .npz files, read the same way by the node and by `evaluate` / `predict`


@dataclass(frozen=True)
class Table:
    """A user data file, parsed and checked: float32 features, int64 labels (None when the file has
    no label column and labels were optional), the feature column names (CSV, or an .npz's
    `feature_names`), and the class count the file declares (.npz `num_classes`), if any."""

    x: np.ndarray
    y: np.ndarray | None
    feature_names: tuple[str, ...] | None
    declared_classes: np.ndarray | None = None
    ignored_columns: tuple[str, ...] = ()


def read_table(
    path: str | Path,
    *,
    label_column: str = "label",
    features: Sequence[str] = (),
    class_names: Sequence[str] = (),
    labels: bool | None = True,
    what: str = "task.data",
    label_hint: str = "set [task] label_column to the column holding the class",
) -> Table:
    """Read a .csv (header row, numeric features, by column name) or .npz (X, y) file.

    labels: True = the label column / y array is required, None = read it if present, False =
    ignore it. Errors are ConfigErrors that start with `what` (the config key or the command's
    argument) and say which row / column is wrong and how to fix it (label_hint: how to name another
    label column); nothing is unpickled.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what}: no such file {str(p)!r}")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return _read_csv(p, label_column, tuple(features), tuple(class_names), labels, what, label_hint)
    if suffix == ".npz":
        if features:
            raise ConfigError(f"{what}: [task] features selects CSV columns; {str(p)!r} is an .npz file")
        return _read_npz(p, labels, what)
    raise ConfigError(f"{what}: {str(p)!r} must be a .csv (header row) or .npz file (by its name's suffix)")


def _read_npz(p: Path, labels: bool | None, what: str) -> Table:
    try:
        with np.load(p, allow_pickle=False) as z:
            need = ["X"] + (["y"] if labels else [])
            if any(k not in z.files for k in need):
                raise ConfigError(
                    f"{what} {str(p)!r} must contain arrays {' and '.join(repr(k) for k in need)} (has {z.files})"
                )
            x = z["X"]
            y = z["y"] if labels is not False and "y" in z.files else None
            declared = z["num_classes"] if "num_classes" in z.files else None
            names = z["feature_names"] if "feature_names" in z.files else None
    except ConfigError:
        raise
    except Exception as exc:  # zip / format errors, object arrays refused by allow_pickle=False, ...
        raise ConfigError(f"{what} {str(p)!r} is not a readable .npz file: {exc}") from exc
    x = _features(x, y if y is not None else np.zeros(len(x)), what)
    y = _labels(y, what) if y is not None else None
    feature_names = None
    if names is not None:
        if names.ndim != 1 or names.dtype.kind != "U" or len(names) != x.shape[1]:
            raise ConfigError(
                f"{what}: feature_names must be {x.shape[1]} strings, got {names.shape} {names.dtype}"
            )
        feature_names = tuple(str(n) for n in names)
    return Table(x, y, feature_names, declared)


def _delimiter(line: str) -> str:
    """Comma, else semicolon (spreadsheets in many locales), else tab, as the header line uses."""
    for d in (",", ";", "\t"):
        if d in line:
            return d
    return ","


def _read_csv(
    p: Path,
    label_column: str,
    features: tuple[str, ...],
    class_names: tuple[str, ...],
    labels: bool | None,
    what: str,
    label_hint: str,
) -> Table:
    try:
        with p.open(encoding="utf-8-sig", newline="") as fh:
            first = fh.readline()
            fh.seek(0)
            reader = csv.reader(fh, delimiter=_delimiter(first))
            header = next(reader, None)
            if header is None:
                raise ConfigError(f"{what} {str(p)!r} is empty; it needs a header row naming the columns")
            header = [h.strip() for h in header]
            cols = _columns(p, header, label_column, features, labels, what, label_hint)
            rows: list[list[str]] = []
            lines: list[int] = []
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue  # blank lines (often one at the end)
                if len(row) != len(header):
                    raise ConfigError(
                        f"{what} {str(p)!r} line {reader.line_num}: {len(row)} values, but the header has "
                        f"{len(header)} columns; every row needs one value per column"
                    )
                rows.append(row)
                lines.append(reader.line_num)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {str(p)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV"
        ) from None
    except csv.Error as exc:
        raise ConfigError(f"{what} {str(p)!r} is not valid CSV: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {str(p)!r}: {exc.strerror or exc}") from None
    if len(rows) < 1:
        raise ConfigError(f"{what} {str(p)!r} has a header but no data rows")
    feature_idx, label_idx, ignored = cols
    x = _csv_features(p, rows, lines, header, feature_idx, what)
    y = None
    if label_idx is not None:
        y = _csv_labels(p, [r[label_idx] for r in rows], lines, header[label_idx], class_names, what)
    names = tuple(header[i] for i in feature_idx)
    return Table(_features(x, np.zeros(len(x)), what), y, names, None, ignored)


def _columns(
    p: Path,
    header: list[str],
    label_column: str,
    features: tuple[str, ...],
    labels: bool | None,
    what: str,
    label_hint: str,
) -> tuple[list[int], int | None, tuple[str, ...]]:
    """(feature column indices in model order, label column index or None, ignored column names)."""
    if any(not h for h in header):
        raise ConfigError(f"{what} {str(p)!r}: column {header.index('') + 1} has no name in the header row")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise ConfigError(f"{what} {str(p)!r}: column name(s) {dup} appear more than once in the header")
    label_idx = header.index(label_column) if label_column in header and labels is not False else None
    if labels and label_idx is None:
        raise ConfigError(
            f"{what} {str(p)!r} has no label column {label_column!r} (columns: {_short(header)}); {label_hint}"
        )
    if features:
        missing = [f for f in features if f not in header]
        if missing:
            raise ConfigError(
                f"{what} {str(p)!r} lacks feature column(s) {_short(missing)} (columns: {_short(header)}); "
                "the features must be named as when the model was trained ([task] features)"
            )
        idx = [header.index(f) for f in features]
    else:
        idx = [i for i, h in enumerate(header) if h != label_column]
    ignored = tuple(h for i, h in enumerate(header) if i not in idx and h != label_column)
    if not idx:
        raise ConfigError(f"{what} {str(p)!r} has no feature columns besides the label {label_column!r}")
    return idx, label_idx, ignored


def _short(items: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _csv_features(
    p: Path, rows: list[list[str]], lines: list[int], header: list[str], idx: list[int], what: str
) -> np.ndarray:
    cells = [[r[i] for i in idx] for r in rows]
    try:
        x = np.array(cells, dtype=np.float64)
    except ValueError:
        x = None
    if x is not None:
        bad = np.argwhere(~np.isfinite(x) | (np.abs(x) > np.finfo(np.float32).max))
        if not len(bad):
            return x
        r, c = bad[0]
        cell, line, column = cells[r][c], lines[r], header[idx[c]]
        if cell.strip().lower() in MISSING_TOKENS:
            raise ConfigError(_missing(what, p, line, column, cell))
        raise ConfigError(
            f"{what} {str(p)!r} line {line}, column {column!r}: {cell!r} is infinite or too large for float32"
        )
    for row, line in zip(cells, lines, strict=True):  # find the first bad cell, to name it
        for value, i in zip(row, idx, strict=True):
            text = value.strip()
            if text.lower() in MISSING_TOKENS:
                raise ConfigError(_missing(what, p, line, header[i], value))
            try:
                float(text)
            except ValueError:
                raise ConfigError(
                    f"{what} {str(p)!r} line {line}, column {header[i]!r}: {value!r} is not a number; "
                    "features must be numeric (encode categories as numbers, or leave the column out "
                    "with [task] features)"
                ) from None
    raise ConfigError(f"{what} {str(p)!r}: the feature values are not all numbers")  # pragma: no cover


def _missing(what: str, p: Path, line: int, column: str, cell: str) -> str:
    shown = "empty value" if not cell.strip() else f"missing value {cell!r}"
    return (
        f"{what} {str(p)!r} line {line}, column {column!r}: {shown}; missing values are not supported: "
        "fill them in or drop the row"
    )


def _csv_labels(
    p: Path, cells: list[str], lines: list[int], column: str, class_names: tuple[str, ...], what: str
) -> np.ndarray:
    out = np.empty(len(cells), dtype=np.int64)
    index = {name: i for i, name in enumerate(class_names)}
    for k, (cell, line) in enumerate(zip(cells, lines, strict=True)):
        text = cell.strip()
        if text in index:
            out[k] = index[text]
            continue
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value.is_integer() and 0 <= value < MAX_CLASSES):
            known = f"one of {list(class_names)} or " if class_names else ""
            raise ConfigError(
                f"{what} {str(p)!r} line {line}, column {column!r}: label {cell!r} is not {known}a class "
                f"index 0..{MAX_CLASSES - 1}"
                + ("" if class_names else "; name the classes with [task] class_names to use text labels")
            )
        out[k] = int(value)
    return out


def _features(x: np.ndarray, y: np.ndarray, what: str = "task.data") -> np.ndarray:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ConfigError(
            f"{what}: need X of shape (n, features) and y of shape (n,), got {x.shape} and {y.shape}"
        )
    if len(y) < 1 or x.shape[1] < 1:
        raise ConfigError(f"{what}: need at least 1 sample and 1 feature")
    if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
        raise ConfigError(f"{what}: X must be real numbers, got dtype {x.dtype}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
        x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ConfigError(
            f"{what}: X contains NaN or infinite values (or values too large for float32), first at "
            f"row {bad[0]} (0-based), feature {bad[1]}"
        )
    return x


def _labels(y: np.ndarray, what: str = "task.data") -> np.ndarray:
    """Integer class labels, checked in their own dtype: a cast first would wrap huge values."""
    if y.ndim != 1:
        raise ConfigError(f"{what}: y must have shape (n,), got {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ConfigError(f"{what}: y must hold integer class labels (found NaN, inf or fractions)")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{what}: y must hold integer class labels, got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise ConfigError(f"{what}: labels must be >= 0, found {y.min()}")
    if len(y) and y.max() >= MAX_CLASSES:
        raise ConfigError(
            f"{what}: label {y.max()} is too large; labels must be class indices 0..{MAX_CLASSES - 1}"
        )
    return y.astype(np.int64)


def _declared_classes(declared: np.ndarray, needed: int, what: str) -> int:
    value = declared.item() if declared.ndim == 0 else None
    if not (isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()):
        raise ConfigError(f"{what}: num_classes must be a single integer, got {declared!r}")
    classes = int(value)
    if not needed <= classes <= MAX_CLASSES:
        raise ConfigError(
            f"{what}: num_classes={classes} must be in {needed}..{MAX_CLASSES} (labels go up to {needed - 1})"
        )
    return classes


def check_classes(
    labels: Sequence[np.ndarray | None], *, declared: int, file_declared: np.ndarray | None = None, what: str
) -> int:
    """The federation's class count for these labels: `declared` ([task] num_classes) when set, else
    the file's own `num_classes`, else max label + 1 (at least 2). A label outside a declared range
    is refused here, at start, with the key to change; a site that lacks a class still gets the
    declared count, so its model has the federation's shape."""
    nonempty = [y for y in labels if y is not None and len(y)]
    needed = max((int(y.max()) + 1 for y in nonempty), default=0)
    if file_declared is not None:
        from_file = _declared_classes(file_declared, needed, what)
        if declared and from_file != declared:
            raise ConfigError(
                f"{what}: the file declares num_classes = {from_file} but [task] num_classes = {declared}; "
                "make them agree"
            )
        declared = declared or from_file
    if declared:
        if needed > declared:
            y = np.concatenate(nonempty)
            outside = np.unique(y[y >= declared])
            raise ConfigError(
                f"{what}: label(s) {outside[:10].tolist()} ({int((y >= declared).sum())} rows) are outside "
                f"0..{declared - 1} ([task] num_classes = {declared}); fix those labels or raise num_classes"
            )
        return declared
    return max(needed, 2)


def label_histogram(y: np.ndarray, classes: int) -> list[int]:
    """How many examples of each class 0..classes-1."""
    return np.bincount(np.asarray(y, dtype=np.int64), minlength=classes)[:classes].astype(int).tolist()


@dataclass(frozen=True)
class Standardizer:
    """Per-feature (x - mean) / std with statistics of one node's training shard; a feature that is
    (nearly) constant there is only centred. Kept with the model so predictions scale the same way."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        x64 = np.asarray(x, dtype=np.float64)
        std = x64.std(axis=0)
        std[~(std > MIN_STD)] = 1.0
        return cls(x64.mean(axis=0).astype(np.float32), std.astype(np.float32))

    @classmethod
    def from_lists(cls, mean: Sequence[float], std: Sequence[float], features: int) -> Standardizer:
        m, s = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        if m.shape != (features,) or s.shape != (features,) or not (np.isfinite(m).all() and (s > 0).all()):
            raise ValueError(f"standardisation statistics must be {features} finite means and positive stds")
        return cls(m, s)

    def apply(self, x: np.ndarray) -> np.ndarray:
        if x.shape[1:] != self.mean.shape:
            raise ValueError(f"expected {self.mean.shape[0]} features, got {x.shape[1:]}")
        return ((np.asarray(x, dtype=np.float32) - self.mean) / self.std).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# federation-wide standardisation: sites share summary statistics, never rows

STATS_FORMAT = "p2pfl-feature-stats"
STATS_VERSION = 1


def feature_stats(x: np.ndarray, feature_names: Sequence[str] | None = None) -> dict[str, object]:
    """One site's summary of its features: count, per-feature mean and sum of squared deviations
    (m2). Sites send these (not rows) to whoever combines them (combine_feature_stats)."""
    x64 = np.asarray(x, dtype=np.float64)
    mean = x64.mean(axis=0)
    return {
        "format": STATS_FORMAT,
        "version": STATS_VERSION,
        "features": list(feature_names) if feature_names else None,
        "count": int(len(x64)),
        "mean": mean.tolist(),
        "m2": ((x64 - mean) ** 2).sum(axis=0).tolist(),
    }


def combine_feature_stats(
    parts: Sequence[dict[str, object]], what: str = "feature statistics"
) -> dict[str, object]:
    """The pooled statistics of several sites' feature_stats (Chan et al.'s parallel update: exact,
    as if computed over all rows at once). All parts must name the same features in the same order."""
    if not parts:
        raise ConfigError(f"{what}: nothing to combine")
    checked = [_check_stats(p, what) for p in parts]
    names = checked[0][0]
    for other, _, _, _ in checked[1:]:
        if other != names:
            raise ConfigError(f"{what}: the parts name different features ({names} vs {other})")
    counts = np.array([c for _, c, _, _ in checked], dtype=np.float64)
    means = np.stack([m for _, _, m, _ in checked])
    total = counts.sum()
    mean = (counts[:, None] * means).sum(axis=0) / total
    m2 = sum(m for _, _, _, m in checked) + (counts[:, None] * (means - mean) ** 2).sum(axis=0)
    return {
        "format": STATS_FORMAT,
        "version": STATS_VERSION,
        "features": list(names) if names else None,
        "count": int(total),
        "mean": mean.tolist(),
        "m2": np.asarray(m2).tolist(),
    }


def _check_stats(raw: object, what: str) -> tuple[tuple[str, ...] | None, int, np.ndarray, np.ndarray]:
    if not isinstance(raw, dict) or raw.get("format") != STATS_FORMAT:
        raise ConfigError(f"{what}: not a {STATS_FORMAT} file (write one with `p2pfl stats DATA --out FILE`)")
    if raw.get("version") != STATS_VERSION:
        raise ConfigError(f"{what}: version {raw.get('version')!r}, this p2pfl reads {STATS_VERSION}")
    count = raw.get("count")
    try:
        mean = np.asarray(raw.get("mean"), dtype=np.float64)
        m2 = np.asarray(raw.get("m2"), dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: mean and m2 must be lists of numbers") from None
    names = raw.get("features")
    ok = (
        isinstance(count, int)
        and not isinstance(count, bool)
        and count >= 1
        and mean.ndim == 1
        and mean.shape == m2.shape
        and len(mean) >= 1
        and bool(np.isfinite(mean).all() and np.isfinite(m2).all() and (m2 >= 0).all())
        and (names is None or (isinstance(names, list) and len(names) == len(mean)))
    )
    if not ok:
        raise ConfigError(f"{what}: count, mean, m2 (and features) do not fit together")
    assert isinstance(count, int)
    return (tuple(str(n) for n in names) if names else None), count, mean, m2


def load_feature_stats(
    path: str | Path,
    *,
    features: int,
    feature_names: Sequence[str] | None,
    what: str = "[task] feature_stats",
) -> Standardizer:
    """The Standardizer of a shared statistics file, checked against this site's features (by name
    when both know them)."""
    import json

    p = Path(path).expanduser()
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file {str(p)!r}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what}: {str(p)!r} is not a readable JSON file ({exc})") from None
    names, count, mean, m2 = _check_stats(raw, f"{what} {str(p)!r}")
    if len(mean) != features:
        raise ConfigError(
            f"{what} {str(p)!r} has statistics of {len(mean)} features; this data has {features}"
        )
    if names and feature_names and tuple(feature_names) != names:
        raise ConfigError(
            f"{what} {str(p)!r} describes features {_short(list(names))}, but this data's are "
            f"{_short(list(feature_names))}; use the same columns in the same order ([task] features)"
        )
    std = np.sqrt(m2 / count)
    std[~(std > MIN_STD)] = 1.0
    return Standardizer(mean.astype(np.float32), std.astype(np.float32))
