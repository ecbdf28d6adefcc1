"""Model parameters <-> numpy: state_dict copies, flat float32 vectors and their (shape, dtype) specs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

SpecLike = Mapping[str, Any]


def get_params(model: nn.Module) -> dict[str, np.ndarray]:
    """float32 numpy copies of every state_dict entry, in state_dict order."""
    return {
        name: t.detach().to(device="cpu", dtype=torch.float32).numpy().copy()
        for name, t in model.state_dict().items()
    }


def param_views(model: nn.Module) -> dict[str, np.ndarray]:
    """get_params without the copy where it can: read-only numpy views of the float32 CPU entries
    (float32 copies of the others), in state_dict order.

    For a round that only reads the parameters (flatten, seal) until set_params writes the model
    again: that saves one model-sized copy. The views follow the model, so training or set_params
    changes what they show."""
    out = {}
    for name, t in model.state_dict().items():
        if t.device.type == "cpu" and t.dtype == torch.float32:
            view = t.detach().numpy().view()
            view.flags.writeable = False
            out[name] = view
        else:
            out[name] = t.detach().to(device="cpu", dtype=torch.float32).numpy().copy()
    return out


def share_one_buffer(model: nn.Module) -> torch.Tensor | None:
    """Move every state_dict entry of `model` into one contiguous float32 tensor, in state_dict
    order, and return it; None (model untouched) unless every entry is its own float32 CPU tensor.

    Why: a round's own vector is then a view of the model (`flat_view`) instead of a model-sized
    copy, one model less at a big model's peak. The parameters keep their identity (only their
    `.data` moves), so modules, hooks and optimizers created later see nothing different."""
    state = model.state_dict(keep_vars=True)
    tensors = list(state.values())
    if not tensors or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    if len({t.untyped_storage().data_ptr() for t in tensors}) != len(tensors):
        return None  # tied weights or entries that are views of one another: leave them as they are
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=torch.float32)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            part = flat[offset : offset + t.numel()].view(t.shape)
            part.copy_(t)
            t.data = part
            offset += t.numel()
    return flat


def flat_view(flat: torch.Tensor) -> np.ndarray:
    """A read-only numpy view of the buffer `share_one_buffer` returned: the model as one vector in
    state_dict order, valid until the model is next written."""
    view = flat.detach().numpy().view()
    view.flags.writeable = False
    return view


def set_params(model: nn.Module, params: Mapping[str, np.ndarray]) -> None:
    """Copy `params` into the model's own tensors (values are cast to each tensor's dtype).

    The names must be exactly the state_dict's and every shape must match; read-only inputs
    (e.g. zero-copy decoded buffers) are fine since nothing aliases them afterwards.
    """
    state = model.state_dict()
    if set(state) != set(params):
        missing, extra = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise ValueError(f"parameter names differ from the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, t in state.items():
            arr = np.asarray(params[name])
            if tuple(arr.shape) != tuple(t.shape):
                raise ValueError(f"parameter {name!r}: shape {arr.shape} != model {tuple(t.shape)}")
            if t.device.type == "cpu" and t.dtype != torch.bfloat16:
                np.copyto(t.numpy(), arr, casting="unsafe")
            else:
                t.copy_(torch.tensor(np.array(arr)))


def flatten(params: Mapping[str, np.ndarray]) -> np.ndarray:
    """One contiguous float32 vector of all entries, in mapping (state_dict) order."""
    if not params:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(a).ravel() for a in params.values()], dtype=np.float32)


def unflatten(vec: np.ndarray, spec: SpecLike) -> dict[str, np.ndarray]:
    """Inverse of flatten. `spec` maps name -> (shape, dtype) in flatten() order (as codec.spec_of
    gives) or name -> template array. float32 entries are views into `vec` (no copy); others are cast."""
    vec = np.asarray(vec)
    if vec.ndim != 1:
        raise ValueError(f"expected a flat vector, got shape {vec.shape}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, entry in spec.items():
        if isinstance(entry, np.ndarray):
            shape, dtype = tuple(entry.shape), entry.dtype
        else:
            shape, dtype = tuple(entry[0]), np.dtype(entry[1])
        size = math.prod(shape)
        if offset + size > vec.size:
            raise ValueError(f"vector of {vec.size} values is too short for the spec at {name!r}")
        piece = vec[offset : offset + size].reshape(shape)
        if piece.dtype == dtype:
            out[name] = piece
        elif np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            out[name] = np.rint(piece).astype(dtype)  # averaged counters: round, do not truncate
        else:
            out[name] = piece.astype(dtype)
        offset += size
    if offset != vec.size:
        raise ValueError(f"vector has {vec.size} values but the spec needs {offset}")
    return out
