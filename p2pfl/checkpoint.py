"""A node's state on disk, written atomically every round so a restarted node resumes where it was.

One `.npz` file (numpy's zip of arrays, read back with allow_pickle=False: nothing in it can run
code): the model vector, the reputation sketches, and one JSON document with the round, the own
sequence number, the reputation records and the replay guard's last sequence number per sender.
Writes go to a temporary file in the same directory, are fsynced, then renamed over the old one,
so a kill at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.errors import P2PFLError

__all__ = ["Checkpoint", "CheckpointError", "atomic_save_array", "load", "save", "spec_shapes"]

FORMAT = 1


class CheckpointError(P2PFLError):
    """A checkpoint exists but cannot be used; the message says what to do."""


@dataclass
class Checkpoint:
    """Everything a node needs to go on after a restart."""

    round: int
    seq: int
    model: np.ndarray
    spec: dict[str, list[int]]  # tensor name -> shape, to refuse a checkpoint of another model
    reputation: dict[str, Any] = field(default_factory=dict)
    reputation_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    replay: dict[str, int] = field(default_factory=dict)


def _atomic_write(path: Path, write: Any) -> None:
    """Write through `write(fileobj)` to a temporary sibling, fsync, rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_array(path: Path, array: np.ndarray) -> None:
    """np.save, atomically (a model file is either the old one or the new one)."""
    _atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))


def save(path: Path, ckpt: Checkpoint) -> None:
    meta = {
        "format": FORMAT,
        "round": ckpt.round,
        "seq": ckpt.seq,
        "spec": ckpt.spec,
        "reputation": ckpt.reputation,
        "replay": ckpt.replay,
    }
    arrays: dict[str, Any] = {f"rep:{k}": v for k, v in ckpt.reputation_arrays.items()}
    arrays["model"] = ckpt.model
    arrays["meta"] = np.array(json.dumps(meta))
    _atomic_write(path, lambda fh: np.savez(fh, **arrays))


def load(path: Path) -> Checkpoint | None:
    """The checkpoint at `path`, None if there is none; CheckpointError if it is unusable."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            model = np.asarray(data["model"], dtype=np.float32)
            rep_arrays = {k[4:]: np.asarray(data[k]) for k in data.files if k.startswith("rep:")}
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
        return Checkpoint(
            round=int(meta["round"]),
            seq=int(meta["seq"]),
            model=model,
            spec={str(k): [int(d) for d in v] for k, v in meta["spec"].items()},
            reputation=meta["reputation"],
            reputation_arrays=rep_arrays,
            replay={str(k): int(v) for k, v in meta["replay"].items()},
        )
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); move it away to start this "
            "node from scratch (it will catch up with the federation)"
        ) from None


def spec_shapes(spec: Mapping[str, tuple[tuple[int, ...], Any]]) -> dict[str, list[int]]:
    """The part of a tensor spec a checkpoint records: names and shapes, in order."""
    return {name: list(shape) for name, (shape, _) in spec.items()}
