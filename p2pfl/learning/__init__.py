"""Learning: what a node learns (spec), its data (data), its task (tasks), parameter plumbing (params),
and many tasks trained at once (batched, for the simulator).

    spec     TaskSpec, TaskSettings, BUILTIN_TASKS, PARTITION_SCHEMES          (no torch, no numpy)
    data     data sources, the shared test split, partition_indices, PartitionCache
    tasks    the Task protocol, TensorTask, the built-in models, load_task
    params   get_params / set_params (torch modules) <-> flatten / unflatten (numpy)
    batched  BatchedTrainer, batchable, share_test_split

The names below are re-exported lazily: `from p2pfl.learning import TaskSpec` imports only the
torch-free spec module (config loading and the command line rely on that), while names such as
load_task or get_params import their submodule, and torch, on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the lazily imported names, for type checkers
    from p2pfl.learning.batched import BatchedTrainer, batchable, share_test_split
    from p2pfl.learning.data import (
        PartitionCache,
        load_digits,
        load_npz,
        load_synthetic,
        partition_indices,
        split_test,
    )
    from p2pfl.learning.params import SpecLike, flatten, get_params, set_params, unflatten
    from p2pfl.learning.spec import BUILTIN_TASKS, PARTITION_SCHEMES, TaskSettings, TaskSpec
    from p2pfl.learning.tasks import SmallCNN, Task, TensorTask, load_task, mlp, tensor_task

__all__ = [
    "BUILTIN_TASKS",
    "BatchedTrainer",
    "PARTITION_SCHEMES",
    "PartitionCache",
    "SmallCNN",
    "SpecLike",
    "Task",
    "TaskSettings",
    "TaskSpec",
    "TensorTask",
    "batchable",
    "flatten",
    "get_params",
    "load_digits",
    "load_npz",
    "load_synthetic",
    "load_task",
    "mlp",
    "partition_indices",
    "set_params",
    "share_test_split",
    "split_test",
    "tensor_task",
    "unflatten",
]

# where __getattr__ looks, in this order: spec first, so the torch-free names never import torch
_SUBMODULES = ("spec", "data", "params", "tasks", "batched")


def __getattr__(name: str) -> Any:
    if name in __all__:
        for module in _SUBMODULES:
            sub = importlib.import_module(f"{__name__}.{module}")
            if name in vars(sub):
                value = vars(sub)[name]
                globals()[name] = value  # later lookups skip __getattr__
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
