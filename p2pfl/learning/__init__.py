"""Learning: what a node learns (spec), its data (data), its task (tasks), parameter plumbing (params),
and many tasks trained at once (batched, for the simulator).

    spec     TaskSpec, TaskSettings, TaskOptions, BUILTIN_TASKS, PARTITION_SCHEMES, OPTIMIZERS, LR_SCHEDULES
             (no torch, no numpy)
    data     data sources, own .csv / .npz files (read_table), the shared test split,
             partition_indices, PartitionCache, Standardizer, check_classes
    tasks    the Task protocol, TensorTask, the built-in models (model_factory), load_task
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
        Standardizer,
        Table,
        check_classes,
        label_histogram,
        load_digits,
        load_npz,
        load_synthetic,
        partition_indices,
        read_table,
        split_test,
    )
    from p2pfl.learning.params import SpecLike, flatten, get_params, set_params, unflatten
    from p2pfl.learning.spec import (
        BUILTIN_TASKS,
        LR_SCHEDULES,
        OPTIMIZERS,
        PARTITION_SCHEMES,
        TaskOptions,
        TaskSettings,
        TaskSpec,
    )
    from p2pfl.learning.tasks import (
        SmallCNN,
        Task,
        TensorTask,
        load_task,
        mlp,
        model_factory,
        tensor_task,
    )

__all__ = [
    "BUILTIN_TASKS",
    "BatchedTrainer",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "PARTITION_SCHEMES",
    "PartitionCache",
    "SmallCNN",
    "SpecLike",
    "Standardizer",
    "Table",
    "Task",
    "TaskOptions",
    "TaskSettings",
    "TaskSpec",
    "TensorTask",
    "batchable",
    "check_classes",
    "flatten",
    "get_params",
    "label_histogram",
    "load_digits",
    "load_npz",
    "load_synthetic",
    "load_task",
    "mlp",
    "model_factory",
    "partition_indices",
    "read_table",
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
