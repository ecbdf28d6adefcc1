"""What a node learns: the TaskSpec and the task / partition names (torch-free).

Config loading and the command line import this module, so it must not import torch (nor numpy):
everything that needs them lives in the sibling modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from p2pfl.errors import ConfigError

BUILTIN_TASKS = ("digits-mlp", "digits-cnn", "synthetic-logreg")
PARTITION_SCHEMES = ("iid", "dirichlet")


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


@dataclass(frozen=True)
class _TaskName:
    """TaskSpec's own fields. A separate base only so that they come first: dataclass fields follow
    the reversed MRO, and TaskSpec lists this base last, keeping the field order (repr, asdict, the
    [task] section of a config file) name, shard, num_shards, partition, ..."""

    name: str = "digits-mlp"
    shard: int = 0
    num_shards: int = 1


@dataclass(frozen=True)
class TaskSpec(TaskSettings, _TaskName):
    """What to learn and which part of the data this node holds.

    `seed` is federation-wide (same model init and same partition on every node); `shard` is this
    node's index in `range(num_shards)`. `data` optionally names a user .npz file with arrays
    `X` (n, features) and `y` (n,) of integer labels 0..C-1 (optional scalar `num_classes`).
    name, shard and num_shards may be given by position; the shared settings are keyword-only.
    """

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
