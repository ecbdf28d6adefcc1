"""Model files: a trained model in a standard, safe format that needs no p2pfl code to read.

A model file is an uncompressed `.npz` (numpy's zip of `.npy` arrays) holding one float32 array per
named tensor, under its state_dict name (`0.weight`, `0.bias`, ...), plus one entry `__p2pfl_model__`:
a JSON string with

    format, version       "p2pfl-model", 1
    task                  the TaskSpec fields that rebuild the model (name, hidden, num_classes, ...;
                          the site's data paths are left out: the file may travel)
    tensors               [[name, shape], ...] in state_dict order
    meta                  features, num_classes, feature_names, class_names, label_column,
                          feature_mean / feature_std (standardisation), round, accuracy, node, time, ...

so `np.load(path)["0.weight"]` works anywhere, and `load_model` gives back everything needed to
rebuild the model (`build_model`) and scale its inputs (`standardizer`). Files are read with
allow_pickle=False: nothing in them can run code; a file with an object array is refused. Writes are
atomic (temporary file, fsync, rename), like the node's checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from p2pfl.checkpoint import _atomic_write
from p2pfl.errors import ConfigError, P2PFLError
from p2pfl.learning.spec import BUILTIN_TASKS, TaskSpec

if TYPE_CHECKING:
    from torch import nn

    from p2pfl.learning.data import Standardizer

__all__ = [
    "FORMAT",
    "HEADER",
    "VERSION",
    "ModelFileError",
    "build_model",
    "load_model",
    "save_model",
    "standardizer",
    "task_meta",
]

FORMAT = "p2pfl-model"
VERSION = 1
HEADER = "__p2pfl_model__"
PRIVATE_TASK_KEYS = (
    "data",
    "test_data",
    "feature_stats",
)  # paths on the site's machine: not written into the file
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"


class ModelFileError(P2PFLError):
    """A model file is missing, corrupt, foreign or does not fit; the message says which and why."""


# --------------------------------------------------------------------------------------------------
# writing


def task_meta(task: object) -> dict[str, Any]:
    """What a task knows about its inputs and outputs, for save_model's meta: feature count and
    names, classes, the label column and the standardisation statistics (None where the task does
    not say, e.g. a custom task)."""
    spec = getattr(task, "spec", None)
    scaler = getattr(task, "standardizer", None)
    names = getattr(task, "feature_names", None)
    classes = getattr(task, "class_names", None)
    return {
        "features": getattr(task, "features", None),
        "num_classes": getattr(task, "num_classes", None),
        "feature_names": list(names) if names else None,
        "class_names": list(classes) if classes else None,
        "label_column": getattr(spec, "label_column", None),
        "feature_mean": None if scaler is None else [float(v) for v in scaler.mean],
        "feature_std": None if scaler is None else [float(v) for v in scaler.std],
    }


def save_model(
    path: str | Path, params: Mapping[str, np.ndarray], spec: TaskSpec, meta: Mapping[str, Any] | None = None
) -> None:
    """Write a model file atomically: `params` by name (learning.get_params(model)), the `spec` that
    built the model and `meta` (task_meta(task) plus round, accuracy, node, ...; `time` and
    `p2pfl_version` are filled in when absent). Refuses non-finite weights and unserialisable meta."""
    if not isinstance(spec, TaskSpec):
        raise ModelFileError(f"save_model: spec must be a TaskSpec, got {type(spec).__name__}")
    if not params:
        raise ModelFileError("save_model: no tensors to save")
    arrays: dict[str, np.ndarray] = {}
    tensors: list[list[Any]] = []
    for name, value in params.items():
        if not isinstance(name, str) or not name or name == HEADER or name.startswith("__"):
            raise ModelFileError(f"save_model: tensor name {name!r} is not allowed")
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise ModelFileError(f"save_model: tensor {name!r} has dtype {arr.dtype}, not real numbers")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ModelFileError(f"save_model: tensor {name!r} holds NaN or infinite values; not saved")
        arrays[name] = arr
        tensors.append([name, list(arr.shape)])
    task = {k: _jsonable(v) for k, v in dataclasses.asdict(spec).items() if k not in PRIVATE_TASK_KEYS}
    full_meta = {"time": time.time(), "time_utc": _utc_now(), "p2pfl_version": _version()}
    full_meta.update(meta or {})
    header = {"format": FORMAT, "version": VERSION, "task": task, "tensors": tensors, "meta": full_meta}
    try:
        text = json.dumps(header, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"save_model: meta is not JSON-serialisable: {exc}") from None
    arrays[HEADER] = np.array(text)
    out = Path(path)
    try:
        _atomic_write(out, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]
    except OSError as exc:
        raise ModelFileError(f"cannot write model file {str(out)!r}: {exc.strerror or exc}") from None


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays in meta (accuracy from numpy, statistics) become plain JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _version() -> str:
    from p2pfl import __version__

    return str(__version__)


# --------------------------------------------------------------------------------------------------
# reading


def load_model(path: str | Path) -> tuple[dict[str, np.ndarray], TaskSpec, dict[str, Any]]:
    """(tensors by name in state_dict order, the TaskSpec, meta) of a model file; never unpickles.

    ModelFileError for a missing file, something that is not a p2pfl model file (a flat model.npy,
    a checkpoint, another .npz), a file with object (pickled) arrays, or one whose parts disagree.
    """
    p = Path(path).expanduser()
    where = f"model file {str(p)!r}"
    if not p.is_file():
        raise ModelFileError(f"{where} not found" if not p.exists() else f"{where} is not a file")
    try:
        with p.open("rb") as fh:
            magic = fh.read(len(NPY_MAGIC))
    except OSError as exc:
        raise ModelFileError(f"cannot read {where}: {exc.strerror or exc}") from None
    if magic == NPY_MAGIC:
        raise ModelFileError(
            f"{where} is a flat .npy vector (the old model.npy), which has no tensor names or task; "
            "use the node's model.npz instead"
        )
    if not magic.startswith(ZIP_MAGIC):  # np.load would take anything else for a pickle (and refuse it)
        raise ModelFileError(f"{where} is not a readable .npz model file (not a zip archive)")
    try:
        with np.load(p, allow_pickle=False) as z:
            files = list(z.files)
            if HEADER not in files:
                raise ModelFileError(_foreign(where, files))
            header = _header(where, z[HEADER])
            tensors = _tensor_list(where, header)
            missing = [n for n, _ in tensors if n not in files]
            extra = [f for f in files if f != HEADER and f not in {n for n, _ in tensors}]
            if missing or extra:
                raise ModelFileError(
                    f"{where} is inconsistent: tensors listed but absent {missing}, present but unlisted {extra}"
                )
            params = {name: z[name] for name, _ in tensors}
    except ModelFileError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise ModelFileError(
                f"{where} contains pickled (object) arrays; refused: model files hold numbers only"
            ) from None
        raise ModelFileError(f"{where} is corrupt: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ModelFileError(
            f"{where} is not a readable .npz model file ({type(exc).__name__}: {exc})"
        ) from None
    out: dict[str, np.ndarray] = {}
    for name, shape in tensors:
        arr = params[name]
        if arr.dtype.kind != "f" or list(arr.shape) != shape:
            raise ModelFileError(
                f"{where}: tensor {name!r} is {arr.dtype} {list(arr.shape)}, the header says float {shape}"
            )
        if not np.isfinite(arr).all():
            raise ModelFileError(f"{where}: tensor {name!r} holds NaN or infinite values")
        out[name] = arr.astype(np.float32, copy=False)
    return out, _spec(where, header.get("task")), _meta(where, header.get("meta"))


def _foreign(where: str, files: list[str]) -> str:
    if {"model", "meta"} <= set(files):
        return f"{where} is a node checkpoint, not a model file; use the node's model.npz or best_model.npz"
    if {"X"} <= set(files):
        return f"{where} looks like a data file (arrays {files[:6]}), not a model file"
    return f"{where} is an .npz but not a p2pfl model file (no {HEADER} entry; has {files[:6]})"


def _header(where: str, entry: np.ndarray) -> dict[str, Any]:
    if entry.ndim != 0 or entry.dtype.kind != "U":
        raise ModelFileError(f"{where}: {HEADER} must be one JSON string")
    try:
        header = json.loads(str(entry))
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{where}: {HEADER} is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"{where}: not a {FORMAT} header")
    if header.get("version") != VERSION:
        raise ModelFileError(
            f"{where} has model file version {header.get('version')!r}; this p2pfl reads version {VERSION} "
            "(upgrade p2pfl to read newer files)"
        )
    return header


def _tensor_list(where: str, header: dict[str, Any]) -> list[tuple[str, list[int]]]:
    raw = header.get("tensors")
    items: list[Any] = raw if isinstance(raw, list) else []
    ok = bool(items)
    out: list[tuple[str, list[int]]] = []
    for item in items:
        if not (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], list)
            and all(isinstance(d, int) and d >= 0 for d in item[1])
        ):
            ok = False
            break
        out.append((item[0], item[1]))
    if not ok or len({n for n, _ in out}) != len(out):
        raise ModelFileError(f"{where}: the header's tensor list is malformed")
    return out


def _spec(where: str, raw: Any) -> TaskSpec:
    if not isinstance(raw, dict):
        raise ModelFileError(f"{where}: the header has no task")
    known = {f.name for f in dataclasses.fields(TaskSpec)}
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known}
    try:
        return TaskSpec(**fields)
    except (ConfigError, TypeError) as exc:
        raise ModelFileError(f"{where}: its task is not valid here: {exc}") from None


def _meta(where: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ModelFileError(f"{where}: the header has no meta")
    return raw


# --------------------------------------------------------------------------------------------------
# using


def standardizer(meta: Mapping[str, Any]) -> Standardizer | None:
    """The input scaling the model was trained with (None if it was trained on raw features)."""
    mean, std = meta.get("feature_mean"), meta.get("feature_std")
    if mean is None and std is None:
        return None
    from p2pfl.learning.data import Standardizer

    features = meta.get("features")
    try:
        return Standardizer.from_lists(mean or [], std or [], int(features) if features is not None else -1)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"the model file's standardisation statistics are unusable: {exc}") from None


def build_model(params: Mapping[str, np.ndarray], spec: TaskSpec, meta: Mapping[str, Any]) -> nn.Module:
    """The torch model of a model file, weights loaded, in eval mode (built-in tasks only: a custom
    "module:function" task's architecture is the user's code, which the file does not carry)."""
    from p2pfl.learning.params import set_params
    from p2pfl.learning.tasks import model_factory

    if spec.name not in BUILTIN_TASKS:
        raise ModelFileError(
            f"the model was trained by custom task {spec.name!r}: rebuild it with that code and load the "
            "tensors by name (np.load(path)[name]); the commands handle built-in tasks only"
        )
    features, classes = meta.get("features"), meta.get("num_classes")
    if not (_count(features) and _count(classes)):
        raise ModelFileError(
            f"the model file does not say its features / classes ({features!r} / {classes!r})"
        )
    try:
        model = model_factory(spec, features, classes)()
        set_params(model, params)
    except (ConfigError, ValueError) as exc:
        raise ModelFileError(f"the model file's tensors do not fit task {spec.name!r}: {exc}") from None
    model.eval()
    return model


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
