"""The learning task a node runs: model, local data shard, local training and evaluation.

Every node of a federation loads the same TaskSpec except for `shard`: its training shard of the
partition (data.partition_indices with seed=spec.seed) and the shared test split (data.split_test).
Models are initialised from `spec.seed`, so all nodes start gossiping from the same point.

Local training runs the spec's optimizer (SGD, optionally with momentum, or Adam) at the rate its
schedule gives for the round (constant, step or cosine over rounds). Gossip carries only the model's
state_dict: optimizer state (momentum buffers, Adam moments) stays on the node. With
optimizer_state = "keep" (the default) it survives mixing, as in decentralized SGD with local
momentum: mixing overwrites the weights in place, and the next round's steps keep the local
moments; "reset" starts every round's optimizer afresh. It is not checkpointed: a restarted node
starts with fresh moments. The built-ins are TensorTasks (in-memory tensors); a custom task is any
object with the Task protocol, named "module:function" in the spec.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p2pfl.errors import ConfigError
from p2pfl.learning.data import (
    _ACTIVE_PARTITION_CACHE,
    DIGITS_CLASSES,
    MIN_STD,
    SYNTHETIC_CLASSES,
    Standardizer,
    check_classes,
    label_histogram,
    load_digits,
    load_feature_stats,
    load_synthetic,
    read_table,
    shards_for,
    split_test,
)
from p2pfl.learning.spec import BUILTIN_TASKS, TaskSpec

if TYPE_CHECKING:
    from p2pfl.learning.privacy import DPTraining

EVAL_BATCH = 4096
HIDDEN = 64
MLP_TASKS = ("digits-mlp", "mlp")
LINEAR_TASKS = ("synthetic-logreg", "logreg")

log = logging.getLogger("p2pfl.learning")


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

    Tensors are built once; `train` runs `local_epochs` of minibatches shuffled by a generator seeded
    from spec.seed + spec.shard, with the spec's optimizer at the rate its schedule gives for the
    round (`set_round` tells the task which federation round comes next; otherwise it counts its own
    train calls). Code that trains or evaluates the same way elsewhere (learning.batched) reads the
    tensors and the generator through the read-only properties x_train, y_train, x_test, y_test and
    generator. feature_names, class_names and standardizer describe the inputs for the model file.
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
        feature_names: tuple[str, ...] | None = None,
        standardizer: Standardizer | None = None,
    ) -> None:
        self.spec = spec
        self.num_classes = num_classes
        self.num_samples = len(y_train)
        self.features = int(np.shape(x_train)[1]) if np.ndim(x_train) == 2 else None
        self.feature_names = feature_names
        self.class_names = spec.class_names or None
        self.standardizer = standardizer
        self._x = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
        self._y = torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64))
        self._x_test = torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32))
        self._y_test = torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64))
        self._make_model = make_model
        self._gen = torch.Generator().manual_seed(spec.seed + spec.shard)
        self._next_round = 1
        # one optimizer per model trained (the simulator trains one model per virtual node)
        self._optimizers: weakref.WeakKeyDictionary[nn.Module, torch.optim.Optimizer] = (
            weakref.WeakKeyDictionary()
        )
        self.privacy: DPTraining | None = None  # DP-SGD instead of plain minibatches (privacy.attach_privacy)

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
        """Same initial weights on every node: seeded by spec.seed, without touching the global RNG.
        A FederatedStandardize layer starts from this shard's own statistics (gossip then agrees them)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.seed)
            model = self._make_model()
        for layer in model.modules():
            if isinstance(layer, FederatedStandardize):
                layer.fit_(self._x)
        return model

    @property
    def next_round(self) -> int:
        """The federation round the next `train` call trains for (its learning rate)."""
        return self._next_round

    def set_round(self, round_: int) -> None:
        """The next `train` call is federation round `round_` (1-based): after a resume or a catch-up,
        so the learning-rate schedule follows the federation's round, not this process's calls."""
        self._next_round = max(1, int(round_))

    def reset_optimizer(self, model: nn.Module | None = None) -> None:
        """Forget optimizer state (momentum, Adam moments) for `model`, or for every model."""
        if model is None:
            self._optimizers.clear()
        else:
            self._optimizers.pop(model, None)

    def lr(self, round_: int | None = None) -> float:
        """The learning rate of `round_` (default: the next round) under the spec's schedule."""
        return self.spec.lr_at(self._next_round if round_ is None else round_)

    def _optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        spec = self.spec
        opt = self._optimizers.get(model) if spec.optimizer_state == "keep" else None
        if opt is None:
            params = [p for p in model.parameters() if p.requires_grad]
            if spec.optimizer == "adam":
                opt = torch.optim.Adam(params, lr=lr, weight_decay=spec.weight_decay)
            else:
                opt = torch.optim.SGD(params, lr=lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
            if spec.optimizer_state == "keep":
                self._optimizers[model] = opt
        for group in opt.param_groups:
            group["lr"] = lr
        return opt

    @property
    def epsilon(self) -> float | None:
        """The differential-privacy epsilon spent so far (None without [privacy])."""
        return None if self.privacy is None else self.privacy.epsilon

    def train(self, model: nn.Module) -> float:
        """Run local_epochs over the own shard at this round's rate; returns the mean training loss.
        With `privacy` set the epochs are DP-SGD (Poisson batches, clipped and noised gradients)."""
        model.train()
        opt = self._optimizer(model, self.lr())
        self._next_round += 1
        if self.privacy is not None:
            return self.privacy.train(self, model, opt)
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
        opt.zero_grad(set_to_none=True)  # the gradients are a model-sized buffer the round never reads
        return total / max(count, 1)

    def warm_up(self, model: nn.Module) -> None:
        """One step of the configured optimizer on the first batch and one evaluation, on `model` as
        given (pass a throwaway copy: it is trained). The task's own optimizers, round counter and
        shuffling generator are untouched (p2pfl.warmup: round 1 then pays no one-time cost)."""
        opt = self._optimizer(model, self.lr())
        self._optimizers.pop(model, None)
        bs = min(self.spec.batch_size, self.num_samples)
        if bs > 0:
            model.train()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(self._x[:bs]), self._y[:bs]).backward()
            opt.step()
        self.evaluate(model)

    def label_histogram(self) -> dict[str, list[int]]:
        """Examples per class in the training shard and the test split (index = class)."""
        return {
            "train": label_histogram(self._y.numpy(), self.num_classes),
            "test": label_histogram(self._y_test.numpy(), self.num_classes),
        }

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


class FederatedStandardize(nn.Module):
    """Per-feature (x - mean) / std whose statistics the federation agrees on by gossip.

    Why a layer: its statistics are buffers of the model, so they travel in every update and the
    gossip averaging that mixes the weights also drives every node's statistics to one consensus,
    with no extra protocol and no rows leaving a site. They are buffers, not parameters: no
    optimizer (nor DP-SGD) touches them; only mixing changes them, and every forward pass (training
    included) scales with the current, mixed values. Each node starts from its own shard's
    statistics (build_model), so before mixing a lone node is exactly standardize = true.

    Why compressed statistics: the buffers hold shift = asinh(mean) and log_scale = log(std), and
    the consensus is sinh(average shift), exp(average log_scale): one transform, the same on every
    node, within the range of the sites' own. Raw means and mean squares would carry the features'
    raw scale (a lab count of 3,000 at one hospital and 3,300 at another) into the exchanged vector,
    where the robust rule measures whole-vector distances: an honest site with another population
    would look far off and be clipped or down-weighted. A mean of squares also cancels
    catastrophically in float32 (the wire format) when a feature's mean dwarfs its spread; asinh and
    log do not. A feature with std <= data.MIN_STD is only centred, as in data.Standardizer.
    """

    shift: torch.Tensor
    log_scale: torch.Tensor

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(features))
        self.register_buffer("log_scale", torch.zeros(features))

    @property
    def mean(self) -> torch.Tensor:
        return torch.sinh(self.shift)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(self.log_scale)

    @torch.no_grad()
    def fit_(self, x: torch.Tensor) -> None:
        """Start from these rows' statistics (this node's training shard, raw features)."""
        x64 = x.to(torch.float64)
        std = x64.std(dim=0, unbiased=False) if len(x64) else torch.ones(x64.shape[1], dtype=torch.float64)
        std = torch.where(std > MIN_STD, std, torch.ones_like(std))
        mean = x64.mean(dim=0) if len(x64) else torch.zeros(x64.shape[1], dtype=torch.float64)
        self.shift.copy_(torch.asinh(mean))
        self.log_scale.copy_(torch.log(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def mlp(features: int, classes: int, hidden: int | tuple[int, ...] = HIDDEN) -> nn.Module:
    """Linear -> ReLU per hidden width, then Linear -> classes (state_dict names 0., 2., 4., ...)."""
    widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
    layers: list[nn.Module] = []
    width = features
    for h in widths:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, classes))


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


def model_factory(spec: TaskSpec, features: int, classes: int) -> Callable[[], nn.Module]:
    """How a built-in task builds its model for `features` inputs and `classes` outputs (the model
    file rebuilds models with this, without the data). With [task] standardize_federated the model
    is Sequential(scale = FederatedStandardize, net = the task's model)."""
    inner = _inner_factory(spec, features, classes)
    if not spec.standardize_federated:
        return inner
    return lambda: nn.Sequential(OrderedDict(scale=FederatedStandardize(features), net=inner()))


def _inner_factory(spec: TaskSpec, features: int, classes: int) -> Callable[[], nn.Module]:
    if spec.name in MLP_TASKS:
        hidden = spec.hidden
        return lambda: mlp(features, classes, hidden)
    if spec.name in LINEAR_TASKS:
        return lambda: nn.Linear(features, classes)
    if spec.name == "digits-cnn":
        side = math.isqrt(features)
        if side * side != features or side < 4:
            raise ConfigError(
                f"digits-cnn needs square images of side >= 4 (features = side*side), got {features} features"
            )
        return lambda: SmallCNN(side, classes)
    raise ConfigError(f"task {spec.name!r} is not a built-in; built-ins: {', '.join(BUILTIN_TASKS)}")


def tensor_task(
    spec: TaskSpec,
    x: np.ndarray,
    y: np.ndarray,
    *,
    make_model: Callable[[], nn.Module],
    classes: int,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    feature_names: tuple[str, ...] | None = None,
) -> TensorTask:
    """This node's TensorTask over the data set (x, y): its shard of the training split (partitioned
    as spec says, through the active data.PartitionCache if any) and the test examples: `test` when
    given (a separate file), else the shared split holding out spec.test_fraction. With
    spec.standardize the features are scaled with the training shard's own statistics, or with the
    shared ones of spec.feature_stats (the same scaling on every site)."""
    if test is None:
        if len(y) < 2:
            raise ConfigError("[task] data: need at least 2 samples (one to train on, one to test on)")
        train_idx, test_idx = split_test(len(y), spec.test_fraction)
        x_test, y_test = x[test_idx], y[test_idx]
        x, y = x[train_idx], y[train_idx]
    else:
        x_test, y_test = test
    shards = shards_for(y, spec.num_shards, scheme=spec.partition, alpha=spec.alpha, seed=spec.seed)
    own = shards[spec.shard]
    x_train, y_train = x[own], y[own]
    standardizer = None
    if spec.standardize_federated:
        pass  # the model's FederatedStandardize layer scales (statistics agreed by gossip)
    elif spec.feature_stats:
        standardizer = load_feature_stats(
            spec.feature_stats, features=x.shape[1], feature_names=feature_names
        )
    elif spec.standardize:
        standardizer = Standardizer.fit(x_train)
    if standardizer is not None:
        x_train, x_test = standardizer.apply(x_train), standardizer.apply(x_test)
    return TensorTask(
        spec,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        make_model=make_model,
        num_classes=classes,
        feature_names=feature_names,
        standardizer=standardizer,
    )


def _builtin(spec: TaskSpec) -> TensorTask:
    if spec.lr_schedule == "cosine" and spec.lr_rounds < 1:
        raise ConfigError(
            "[task] lr_schedule = cosine needs [task] lr_rounds (rounds to anneal over), e.g. [training] rounds"
        )
    if spec.data:
        return _own_data(spec)
    if spec.name == "synthetic-logreg":
        x, y = load_synthetic()
        classes = SYNTHETIC_CLASSES
    else:
        x, y = load_digits()
        classes = DIGITS_CLASSES
    if spec.num_classes not in (0, classes):
        raise ConfigError(
            f"[task] num_classes = {spec.num_classes}, but the built-in data of {spec.name!r} has {classes} "
            "classes; remove num_classes or point [task] data at your own file"
        )
    task = tensor_task(spec, x, y, make_model=model_factory(spec, x.shape[1], classes), classes=classes)
    # one line per node; a process loading many shards at once (the simulator) keeps them at debug
    _log_data(spec, task, (), level=logging.DEBUG if _ACTIVE_PARTITION_CACHE.get() else logging.INFO)
    return task


def _own_data(spec: TaskSpec) -> TensorTask:
    """A site's own file(s): read by column name, classes checked against [task] num_classes, the
    label histogram logged (a missing class is worth knowing before round 1)."""
    kwargs: dict[str, Any] = {
        "label_column": spec.label_column,
        "features": spec.features,
        "class_names": spec.class_names,
    }
    train = read_table(spec.data, what="[task] data", **kwargs)
    test = None
    if spec.test_data:
        names = train.feature_names if Path(spec.test_data).suffix.lower() == ".csv" else ()
        if names and Path(spec.data).suffix.lower() == ".csv":
            kwargs["features"] = names  # the same columns in the same order, whatever the file's order
        test = read_table(spec.test_data, what="[task] test_data", **kwargs)
        if test.x.shape[1] != train.x.shape[1]:
            raise ConfigError(
                f"[task] test_data has {test.x.shape[1]} features but [task] data has {train.x.shape[1]}; "
                "both files need the same feature columns"
            )
    held_out = None if test is None or test.y is None else (test.x, test.y)  # labels are required here
    classes = check_classes(
        [train.y] + ([held_out[1]] if held_out is not None else []),
        declared=len(spec.class_names) or spec.num_classes,
        file_declared=train.declared_classes,
        what="[task] data",
    )
    assert train.y is not None  # labels are required here
    task = tensor_task(
        spec,
        train.x,
        train.y,
        make_model=model_factory(spec, train.x.shape[1], classes),
        classes=classes,
        test=held_out,
        feature_names=train.feature_names,
    )
    _log_data(spec, task, train.ignored_columns)
    return task


def _log_data(spec: TaskSpec, task: TensorTask, ignored: tuple[str, ...], level: int = logging.INFO) -> None:
    """The label histogram and the test split size, before round 1 (every task, built-in or own)."""
    hist = task.label_histogram()
    names = task.class_names or tuple(str(c) for c in range(task.num_classes))
    counts = ", ".join(f"{n}: {c}" for n, c in zip(names, hist["train"], strict=True))
    source = f"own data {spec.data}" if spec.data else f"{spec.name} shard {spec.shard}/{spec.num_shards}"
    log.log(
        level,
        "%s: %d features, %d classes; training examples per class: %s; %d test examples",
        source,
        task.features,
        task.num_classes,
        counts,
        task.num_test,
    )
    missing = [n for n, c in zip(names, hist["train"], strict=True) if c == 0]
    if missing:
        log.warning(
            "this site has no training examples of class(es) %s; the model keeps the federation's %d "
            "outputs and learns them from the neighbours",
            ", ".join(missing),
            task.num_classes,
        )
    if spec.data and not spec.num_classes and not spec.class_names:
        log.warning(
            "[task] num_classes is not set: %d classes inferred from the labels here; a site missing the "
            "highest class would build a model of another shape, so declare num_classes on every node",
            task.num_classes,
        )
    if ignored:
        log.info("[task] data: columns not used as features: %s", ", ".join(ignored))


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
