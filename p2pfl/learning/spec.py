"""What a node learns: the TaskSpec and the task / partition / optimizer names (torch-free).

Config loading and the command line import this module, so it must not import torch (nor numpy):
everything that needs them lives in the sibling modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from p2pfl.errors import ConfigError

# "mlp" and "logreg" are the plain names for own tabular data; "digits-mlp" and "synthetic-logreg"
# build the same models and stay for existing configs. Without [task] data they all train on digits,
# except synthetic-logreg (its constant-seeded synthetic set).
BUILTIN_TASKS = ("digits-mlp", "digits-cnn", "synthetic-logreg", "mlp", "logreg")
PARTITION_SCHEMES = ("iid", "dirichlet")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "step", "cosine")
OPTIMIZER_STATES = ("keep", "reset")
MAX_CLASSES = 10_000  # the output layer has one row per class: a stray huge label must not size it
MAX_ADAM_LR = 0.1  # Adam's steps are ~lr per weight whatever the gradient: 0.3 (the SGD default) diverges
MAX_HIDDEN_LAYERS = 8
MAX_HIDDEN_WIDTH = 65_536


@dataclass(frozen=True, kw_only=True)
class TaskSettings:
    """The training settings every node of a federation shares (keyword-only).

    TaskSpec adds the task name and this node's shard; the simulator's SimConfig adds the simulated
    federation around them. `seed` drives the model init and the partition, so it is federation-wide.
    """

    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.3
    data: str = ""

    def task_settings(self) -> dict[str, Any]:
        """The TaskSettings fields only, by name (to build a TaskSpec from a subclass)."""
        return {f.name: getattr(self, f.name) for f in fields(TaskSettings)}


@dataclass(frozen=True, kw_only=True)
class TaskOptions:
    """A node's own data and its local optimizer (keyword-only; issue 11).

    TaskSpec has these, the simulator's SimConfig does not: its vectorised trainer runs plain SGD on
    the built-in data. The defaults keep the earlier behaviour: plain SGD at a constant rate, 25% of
    a file held out, classes inferred from the labels, raw features, one hidden layer of 64.
    """

    # own data: where the test examples come from, what the columns mean, how many classes there are
    test_data: str = ""  # a separate test file; "" = hold out test_fraction of `data`
    test_fraction: float = 0.25
    label_column: str = "label"  # CSV only
    features: tuple[str, ...] = ()  # CSV only: the feature columns, in model order; () = all but the label
    num_classes: int = 0  # 0 = max label + 1 (or the .npz's num_classes); declare it for own data
    class_names: tuple[str, ...] = ()  # CSV labels may be these names (index = class); sets num_classes
    standardize: bool = False  # scale each feature to mean 0, std 1 with the training shard's statistics
    feature_stats: str = ""  # ... or with these shared statistics (`p2pfl stats`), the same on every site
    standardize_federated: bool = False  # ... or with statistics the federation agrees on by gossip
    hidden: tuple[int, ...] = (64,)  # hidden layer widths of the mlp tasks
    # the local optimizer and its learning rate over rounds
    optimizer: str = "sgd"
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    optimizer_state: str = "keep"  # keep momentum / Adam moments across rounds, or reset every round
    lr_schedule: str = "constant"
    lr_step_rounds: int = 10  # "step": multiply the rate by lr_gamma every this many rounds
    lr_gamma: float = 0.5
    lr_min: float = 0.0  # "cosine": the rate after lr_rounds rounds
    lr_rounds: int = 0  # "cosine": rounds to anneal over; 0 = [training] rounds (filled in by the config)


@dataclass(frozen=True)
class _TaskName:
    """TaskSpec's own fields. A separate base only so that they come first: dataclass fields follow
    the reversed MRO, and TaskSpec lists this base last, keeping the field order (repr, asdict, the
    [task] section of a config file) name, shard, num_shards, partition, ..."""

    name: str = "digits-mlp"
    shard: int = 0
    num_shards: int = 1


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TaskSpec(TaskOptions, TaskSettings, _TaskName):
    """What to learn and which part of the data this node holds.

    `seed` is federation-wide (same model init and same partition on every node); `shard` is this
    node's index in `range(num_shards)`. `data` optionally names a user .csv (header row, numeric
    features, an integer or class-name label column) or .npz file (arrays `X` (n, features) and `y`
    (n,) of integer labels 0..C-1, optional scalar `num_classes`).
    name, shard and num_shards may be given by position; the shared settings and the options are
    keyword-only. Field order: name, shard, num_shards, the TaskSettings, then the TaskOptions.
    """

    @property
    def plain_sgd(self) -> bool:
        """Constant-rate SGD without momentum or decay: the only training the batched trainer runs."""
        return (
            self.optimizer == "sgd"
            and self.momentum == 0
            and self.weight_decay == 0
            and self.lr_schedule == "constant"
        )

    def lr_at(self, round_: int) -> float:
        """The learning rate of federation round `round_` (1-based; round 1 trains at `lr`)."""
        k = max(0, int(round_) - 1)
        if self.lr_schedule == "step":
            return float(self.lr * self.lr_gamma ** (k // self.lr_step_rounds))
        if self.lr_schedule == "cosine":
            horizon = max(1, self.lr_rounds)
            frac = min(k, horizon) / horizon
            return float(self.lr_min + (self.lr - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * frac)))
        return float(self.lr)

    def __post_init__(self) -> None:
        # tuples, also when a caller passes lists (config files do): a frozen spec stays hashable
        for name in ("features", "class_names", "hidden"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
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
        self._check_data()
        self._check_training()

    def _check_data(self) -> None:
        """The own-data keys: each message names the key and what to write instead."""
        for key in ("data", "test_data", "label_column", "feature_stats"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"[task] {key} must be a string, got {getattr(self, key)!r}")
        if not self.label_column.strip():
            raise ConfigError(
                '[task] label_column must name the CSV column holding the class (default "label")'
            )
        if not (_number(self.test_fraction) and 0 < self.test_fraction < 1):
            raise ConfigError(
                f"[task] test_fraction must be a number between 0 and 1 (e.g. 0.25), got {self.test_fraction!r}"
            )
        if self.test_data and not self.data:
            raise ConfigError("[task] test_data needs [task] data (the training file) as well")
        if not _integer(self.num_classes) or not (
            self.num_classes == 0 or 2 <= self.num_classes <= MAX_CLASSES
        ):
            raise ConfigError(
                f"[task] num_classes must be 0 (infer from the labels) or 2..{MAX_CLASSES}, "
                f"got {self.num_classes!r}"
            )
        for key in ("features", "class_names"):
            names = getattr(self, key)
            if not (isinstance(names, tuple) and all(isinstance(n, str) and n.strip() for n in names)):
                raise ConfigError(
                    f"[task] {key} must be a list of non-empty column / class names, got {names!r}"
                )
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ConfigError(f"[task] {key} lists {duplicates} more than once; name each once")
        if self.class_names:
            if len(self.class_names) < 2:
                raise ConfigError("[task] class_names must list at least 2 classes (or leave it empty)")
            if self.num_classes not in (0, len(self.class_names)):
                raise ConfigError(
                    f"[task] num_classes = {self.num_classes} but class_names lists {len(self.class_names)}; "
                    "make them agree (or drop num_classes)"
                )
        if self.label_column in self.features:
            raise ConfigError(f"[task] features must not include the label column {self.label_column!r}")
        if not isinstance(self.standardize, bool):
            raise ConfigError(f"[task] standardize must be true or false, got {self.standardize!r}")
        if self.feature_stats and not self.standardize:
            raise ConfigError(
                "[task] feature_stats scales the features: set [task] standardize = true as well"
            )
        if not isinstance(self.standardize_federated, bool):
            raise ConfigError(
                f"[task] standardize_federated must be true or false, got {self.standardize_federated!r}"
            )
        if self.standardize_federated and not self.standardize:
            raise ConfigError(
                "[task] standardize_federated agrees the scaling statistics by gossip: set [task] standardize = true as well"
            )
        if self.standardize_federated and self.feature_stats:
            raise ConfigError(
                "[task] standardize_federated and feature_stats are two sources of the same statistics; "
                "keep one (feature_stats: a shared file; standardize_federated: agreed by gossip)"
            )
        hidden = self.hidden
        if not (
            isinstance(hidden, tuple)
            and 1 <= len(hidden) <= MAX_HIDDEN_LAYERS
            and all(_integer(h) and 1 <= h <= MAX_HIDDEN_WIDTH for h in hidden)
        ):
            raise ConfigError(
                f"[task] hidden must list 1..{MAX_HIDDEN_LAYERS} layer widths of 1..{MAX_HIDDEN_WIDTH} "
                f"(e.g. [64] or [128, 64]), got {hidden!r}"
            )

    def _check_training(self) -> None:
        """The optimizer and schedule keys."""
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"[task] optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if not (_number(self.momentum) and 0 <= self.momentum < 1):
            raise ConfigError(f"[task] momentum must be 0 <= momentum < 1 (e.g. 0.9), got {self.momentum!r}")
        if self.momentum and self.optimizer != "sgd":
            raise ConfigError(
                f"[task] momentum applies to optimizer = sgd only (adam keeps its own moments); "
                f'remove it or set optimizer = "sgd" (got optimizer = {self.optimizer!r})'
            )
        if self.optimizer == "adam" and self.lr > MAX_ADAM_LR:
            raise ConfigError(
                f"[task] lr = {self.lr:g} is too large for optimizer = adam; set [task] lr to 0.001..0.01 "
                f"(at most {MAX_ADAM_LR:g})"
            )
        if not (_number(self.weight_decay) and 0 <= self.weight_decay < 1):
            raise ConfigError(f"[task] weight_decay must be 0 <= weight_decay < 1, got {self.weight_decay!r}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ConfigError(
                f"[task] optimizer_state must be one of {', '.join(OPTIMIZER_STATES)}, got {self.optimizer_state!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"[task] lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if not _integer(self.lr_step_rounds) or self.lr_step_rounds < 1:
            raise ConfigError(f"[task] lr_step_rounds must be an integer >= 1, got {self.lr_step_rounds!r}")
        if not (_number(self.lr_gamma) and 0 < self.lr_gamma <= 1):
            raise ConfigError(f"[task] lr_gamma must be 0 < lr_gamma <= 1 (e.g. 0.5), got {self.lr_gamma!r}")
        if not (_number(self.lr_min) and 0 <= self.lr_min <= self.lr):
            raise ConfigError(f"[task] lr_min must be 0 <= lr_min <= lr ({self.lr:g}), got {self.lr_min!r}")
        if not _integer(self.lr_rounds) or self.lr_rounds < 0:
            raise ConfigError(
                f"[task] lr_rounds must be an integer >= 0 (0: anneal over [training] rounds), got {self.lr_rounds!r}"
            )
