"""The learning task a node runs: model, local data shard, local training and evaluation.

Every node of a federation loads the same TaskSpec except for `shard`: its training shard of the
partition (data.partition_indices with seed=spec.seed) and the shared test split (data.split_test).
Models are initialised from `spec.seed`, so all nodes start gossiping from the same point.

Local training is plain SGD without momentum or other optimizer state: the whole state that gossip
has to carry is the model's state_dict. The built-ins are TensorTasks (in-memory tensors); a custom
task is any object with the Task protocol, named "module:function" in the spec.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p2pfl.errors import ConfigError
from p2pfl.learning.data import (
    DIGITS_CLASSES,
    SYNTHETIC_CLASSES,
    load_digits,
    load_npz,
    load_synthetic,
    shards_for,
    split_test,
)
from p2pfl.learning.spec import BUILTIN_TASKS, TaskSpec

EVAL_BATCH = 4096
HIDDEN = 64


@runtime_checkable
class Task(Protocol):
    """What a node needs from a learning task; custom tasks implement this ("module:function")."""

    num_samples: int

    def build_model(self) -> torch.nn.Module: ...

    def train(self, model: torch.nn.Module) -> float: ...

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float]: ...


# --------------------------------------------------------------------------------------------------
# the in-memory classification task used by every built-in


class TensorTask:
    """Classification over in-memory tensors: this node's training shard plus the shared test split.

    Tensors are built once; `train` runs `local_epochs` of minibatch SGD (no momentum, so the model's
    state_dict is the whole state) shuffled by a generator seeded from spec.seed + spec.shard.
    Code that trains or evaluates the same way elsewhere (learning.batched) reads the tensors and the
    generator through the read-only properties x_train, y_train, x_test, y_test and generator.
    """

    def __init__(
        self,
        spec: TaskSpec,
        *,
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
    def x_train(self) -> torch.Tensor:
        """Features of this node's shard, (num_samples, features) float32 (do not modify)."""
        return self._x

    @property
    def y_train(self) -> torch.Tensor:
        """Labels of this node's shard, (num_samples,) int64 (do not modify; see with_train_labels)."""
        return self._y

    @property
    def x_test(self) -> torch.Tensor:
        """Features of the shared test split, (num_test, features) float32 (do not modify)."""
        return self._x_test

    @property
    def y_test(self) -> torch.Tensor:
        """Labels of the shared test split, (num_test,) int64 (do not modify)."""
        return self._y_test

    @property
    def generator(self) -> torch.Generator:
        """The generator `train` draws each epoch's minibatch order from (torch.randperm). Drawing
        from it advances the task's own order: batched training draws exactly what train would."""
        return self._gen

    @property
    def train_labels(self) -> np.ndarray:
        """Labels of this node's shard (for statistics and tests)."""
        return self._y.numpy()

    @property
    def num_test(self) -> int:
        return len(self._y_test)

    def with_train_labels(self, labels: np.ndarray | torch.Tensor) -> TensorTask:
        """A shallow copy training on `labels` instead of the shard's (data poisoning, e.g. the
        label-flip attack). Everything else, the minibatch generator included, is shared."""
        y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        if y.shape != self._y.shape:
            raise ValueError(f"labels: expected shape {tuple(self._y.shape)}, got {tuple(y.shape)}")
        other = copy.copy(self)
        other._y = y
        return other

    def same_test_split(self, other: TensorTask) -> bool:
        """True when `other` evaluates on exactly the same test examples and labels."""
        return (
            self._x_test.shape == other._x_test.shape
            and torch.equal(self._x_test, other._x_test)
            and torch.equal(self._y_test, other._y_test)
        )

    def share_test_split(self, other: TensorTask) -> bool:
        """Use `other`'s test tensors when they equal this task's (the built-ins' test split is the
        same on every node): one copy instead of N in one process. Returns whether it did."""
        if other is self or not self.same_test_split(other):
            return False
        self._x_test, self._y_test = other._x_test, other._y_test
        return True

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
# loading


def tensor_task(
    spec: TaskSpec, x: np.ndarray, y: np.ndarray, *, make_model: Callable[[], nn.Module], classes: int
) -> TensorTask:
    """This node's TensorTask over the data set (x, y): its shard of the training split (partitioned
    as spec says, through the active data.PartitionCache if any) and the shared test split."""
    train_idx, test_idx = split_test(len(y))
    shards = shards_for(
        y[train_idx], spec.num_shards, scheme=spec.partition, alpha=spec.alpha, seed=spec.seed
    )
    own = train_idx[shards[spec.shard]]
    return TensorTask(
        spec,
        x_train=x[own],
        y_train=y[own],
        x_test=x[test_idx],
        y_test=y[test_idx],
        make_model=make_model,
        num_classes=classes,
    )


def _builtin(spec: TaskSpec) -> TensorTask:
    if spec.data:
        x, y, classes = load_npz(spec.data)
    elif spec.name == "synthetic-logreg":
        x, y = load_synthetic()
        classes = SYNTHETIC_CLASSES
    else:
        x, y = load_digits()
        classes = DIGITS_CLASSES
    features = x.shape[1]
    if spec.name == "digits-mlp":
        return tensor_task(spec, x, y, make_model=lambda: mlp(features, classes), classes=classes)
    if spec.name == "synthetic-logreg":
        return tensor_task(spec, x, y, make_model=lambda: nn.Linear(features, classes), classes=classes)
    side = math.isqrt(features)
    if side * side != features or side < 4:
        raise ConfigError(
            f"digits-cnn needs square images of side >= 4 (features = side*side), got {features} features"
        )
    return tensor_task(spec, x, y, make_model=lambda: SmallCNN(side, classes), classes=classes)


def load_task(spec: TaskSpec) -> Task:
    """Build this node's task: a built-in name, or "module:function" called as function(spec) -> Task."""
    if spec.name in BUILTIN_TASKS:
        return _builtin(spec)
    if ":" in spec.name:
        return _custom(spec)
    raise ConfigError(
        f"unknown task {spec.name!r}; built-ins: {', '.join(BUILTIN_TASKS)}, or 'module:function' returning a Task"
    )


def _custom(spec: TaskSpec) -> Task:
    """Import and call a user's task function. Anything it raises is the user's code failing, so it
    becomes one ConfigError naming the function, not a traceback through the node."""
    module_name, _, func_name = spec.name.partition(":")
    where = f"task.name {spec.name!r}"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, but also whatever the module's own top level raises
        raise ConfigError(f"{where}: cannot import module {module_name!r}: {_describe(exc)}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"{where}: module {module_name!r} has no callable {func_name!r}")
    try:
        task = func(spec)
    except Exception as exc:
        raise ConfigError(f"{where}: {func_name}(spec) raised {_describe(exc)}") from exc
    _check_task(where, func_name, task)
    return task


def _check_task(where: str, func_name: str, task: Any) -> None:
    """The node calls these on every round: a wrong return value is refused here, at start."""
    missing = [a for a in ("build_model", "train", "evaluate") if not callable(getattr(task, a, None))]
    if not hasattr(task, "num_samples"):
        missing.append("num_samples")
    if missing:
        raise ConfigError(
            f"{where}: {func_name}(spec) returned {type(task).__name__}, not a Task "
            f"(missing {', '.join(missing)})"
        )
    samples = task.num_samples
    if not isinstance(samples, int | np.integer) or isinstance(samples, bool) or samples < 1:
        raise ConfigError(f"{where}: the task's num_samples must be an integer >= 1, got {samples!r}")


def _describe(exc: BaseException) -> str:
    """One line: the exception type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
