"""Byzantine attacks for robustness experiments: what a misbehaving node sends instead of its model.

A Byzantine node keeps its own model honest: it trains normally (on poisoned data for "label-flip")
and mixes what it receives with the federation's rule like every node; only the vector it SENDS each
round is crafted: `attack.craft(own, heard, round_)`, where own is its honestly trained vector of
this round and heard the vectors it received from its neighbours last round (empty in the first
round, and whenever nothing arrived). The node and the simulator call it the same way.

  sign-flip   -scale * own                                   (scale 1: He et al.'s "bit flip")
  gaussian    own + sigma * N(0, I)                          (fresh noise every round)
  label-flip  own, trained on the shard with labels y -> C-1-y (poison_task wraps the task)
  alie        mu - z * sigma, per coordinate over heard + own  (Baruch et al. 2019, "A little is
              enough"; z = 1.0 fixed by default: Baruch's z_max for n = 16, f = 3 is only 0.32, and
              He et al.'s decentralized variant gives 0.10; set z=None and n, f to use the formula)
  ipm         -epsilon * mean(heard + own)                   (Xie et al. 2020, inner product
              manipulation, applied to models as in He et al. 2022; epsilon 0.5)
  dissensus   own - epsilon * sum_k (heard_k - own)          (He et al. 2022: pushes its receivers
              away from their neighbours' mean instead of towards it; with one broadcast vector the
              attacker's own honestly mixed model stands in for each target's; epsilon 1)
  replay      own vector from `lag` rounds ago, or (lag None, default) the first one it ever had:
              a stale model sent forever
  free-rider  one of the heard vectors, unchanged (echoes a neighbour's model of last round)

Fallbacks without anything heard: alie and dissensus send the sign flip of own (no statistics to hide
in), free-rider sends own, ipm uses own alone. Every crafted vector is finite float32 of own's shape
(non-finite values are a different defence: the node's codec refuses them).

`make_attack("alie")`, `make_attack("alie:z=2")`, `make_attack("gaussian:sigma=0.5", seed=3)`:
parameters after a colon, comma separated.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from p2pfl.errors import ConfigError

ATTACKS: tuple[str, ...] = (
    "sign-flip",
    "gaussian",
    "label-flip",
    "alie",
    "ipm",
    "dissensus",
    "replay",
    "free-rider",
)
_F32_MAX = float(np.finfo(np.float32).max)


def _finite32(v: np.ndarray) -> np.ndarray:
    """float32, NaN -> 0 and +-inf / overflow -> +-float32 max: always a vector the codec accepts."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.nan_to_num(np.asarray(v, dtype=np.float64), nan=0.0, posinf=_F32_MAX, neginf=-_F32_MAX)
        return np.clip(out, -_F32_MAX, _F32_MAX).astype(np.float32)


def _flat(own: np.ndarray) -> np.ndarray:
    x = np.asarray(own, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"own vector must be flat, got shape {x.shape}")
    return x


def _usable(heard: Sequence[np.ndarray], shape: tuple[int, ...]) -> list[np.ndarray]:
    """The heard vectors of the right shape with finite values (others say nothing useful)."""
    out = []
    for h in heard:
        a = np.asarray(h, dtype=np.float32)
        if a.shape == shape and np.isfinite(a).all():
            out.append(a)
    return out


class Attack:
    """Base class: an honest sender (craft returns own) that poisons nothing."""

    name = "honest"

    def craft(self, own: np.ndarray, heard: Sequence[np.ndarray], round_: int) -> np.ndarray:
        """What the Byzantine node sends in round `round_` (finite float32, own's shape)."""
        return _flat(own).copy()

    def poison_task(self, task: Any) -> Any:
        """The task the Byzantine node trains on: the same one except for data-poisoning attacks."""
        return task

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class SignFlip(Attack):
    name = "sign-flip"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)

    def craft(self, own, heard, round_):
        return _finite32(-self.scale * _flat(own).astype(np.float64))


class GaussianNoise(Attack):
    name = "gaussian"

    def __init__(self, sigma: float = 1.0, seed: int = 0) -> None:
        self.sigma = float(sigma)
        self._rng = np.random.default_rng(seed)

    def craft(self, own, heard, round_):
        x = _flat(own)
        return _finite32(x + self.sigma * self._rng.standard_normal(x.shape))


class LabelFlip(Attack):
    """Data poisoning: trains on its shard with every label y replaced by C-1-y; sends that model."""

    name = "label-flip"

    def poison_task(self, task: Any) -> Any:
        """A copy of the task whose training labels are flipped (the test split is untouched).

        Works for tasks with `train_labels` (integer array), `num_classes` and
        `with_train_labels(labels)` returning the relabelled copy, as learning.TensorTask and every
        built-in task have; the copy is a TensorTask again, so the simulator still trains it
        batched. Other tasks: ConfigError.
        """
        labels = getattr(task, "train_labels", None)
        classes = getattr(task, "num_classes", None)
        relabel = getattr(task, "with_train_labels", None)
        if labels is None or not isinstance(classes, int) or not callable(relabel):
            raise ConfigError(
                f"attack label-flip needs a task with train_labels, num_classes and with_train_labels "
                f"(learning.TensorTask, all built-ins); {type(task).__name__} has not"
            )
        poisoned = relabel((classes - 1) - np.asarray(labels))
        poisoned.poisoned = self.name
        return poisoned


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z_max: s = floor(n/2 + 1) - f supporters needed, z = Phi^-1((n - s) / n)."""
    from statistics import NormalDist

    s = math.floor(n / 2 + 1) - f
    p = min(max((n - s) / n, 1e-6), 1 - 1e-6)
    return NormalDist().inv_cdf(p)


class ALIE(Attack):
    name = "alie"

    def __init__(self, z: float | None = 1.0, n: int = 16, f: int = 3) -> None:
        self.z = float(z) if z is not None else alie_z(int(n), int(f))

    def craft(self, own, heard, round_):
        x = _flat(own)
        got = _usable(heard, x.shape)
        if not got:
            return _finite32(-x.astype(np.float64))
        stack = np.stack([x, *got]).astype(np.float64)
        return _finite32(stack.mean(axis=0) - self.z * stack.std(axis=0, ddof=1))


class IPM(Attack):
    name = "ipm"

    def __init__(self, epsilon: float = 0.5) -> None:
        self.epsilon = float(epsilon)

    def craft(self, own, heard, round_):
        x = _flat(own)
        stack = np.stack([x, *_usable(heard, x.shape)]).astype(np.float64)
        return _finite32(-self.epsilon * stack.mean(axis=0))


class Dissensus(Attack):
    name = "dissensus"

    def __init__(self, epsilon: float = 1.0) -> None:
        self.epsilon = float(epsilon)

    def craft(self, own, heard, round_):
        x = _flat(own).astype(np.float64)
        got = _usable(heard, (x.size,))
        if not got:
            return _finite32(-x)
        pull = np.sum(np.stack(got).astype(np.float64) - x, axis=0)
        return _finite32(x - self.epsilon * pull)


class Replay(Attack):
    """Sends a stale copy of its own model: from `lag` rounds ago, or (lag None) its first one."""

    name = "replay"

    def __init__(self, lag: int | None = None) -> None:
        if lag is not None and int(lag) < 1:
            raise ConfigError(f"attack replay: lag must be >= 1 (or None: the first model), got {lag!r}")
        self.lag = None if lag is None else int(lag)
        self._history: deque[np.ndarray] = deque(maxlen=1 if lag is None else int(lag) + 1)

    def craft(self, own, heard, round_):
        x = _flat(own)
        if self.lag is None:
            if not self._history:
                self._history.append(_finite32(x))
        else:
            self._history.append(_finite32(x))
        return self._history[0].copy()


class FreeRider(Attack):
    """Echoes one of the vectors it heard last round (chosen at random) instead of its own."""

    name = "free-rider"

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    def craft(self, own, heard, round_):
        x = _flat(own)
        got = _usable(heard, x.shape)
        if not got:
            return x.copy()
        return got[int(self._rng.integers(len(got)))].copy()


_CLASSES: dict[str, type[Attack]] = {
    "sign-flip": SignFlip,
    "gaussian": GaussianNoise,
    "label-flip": LabelFlip,
    "alie": ALIE,
    "ipm": IPM,
    "dissensus": Dissensus,
    "replay": Replay,
    "free-rider": FreeRider,
}
_SEEDED = {"gaussian", "free-rider"}


def _value(text: str) -> Any:
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError as exc:
        raise ValueError(f"not a number: {text!r}") from exc


def make_attack(name: str, seed: int = 0, **params: Any) -> Attack:
    """The attack called `name` (one of ATTACKS), optionally "name:key=value,key=value".

    seed drives the attacks that draw random numbers (gaussian, free-rider); params (or the ones
    after the colon) go to the attack's constructor, e.g. make_attack("sign-flip", scale=4).
    """
    base, _, spec = str(name).strip().partition(":")
    if base not in _CLASSES:
        raise ConfigError(f"unknown attack {base!r}; known: {', '.join(ATTACKS)}")
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ConfigError(f"attack {name!r}: parameter {item!r} must be key=value")
        try:
            options[key.strip()] = _value(val)
        except ValueError as exc:
            raise ConfigError(f"attack {name!r}: {exc}") from exc
    options.update(params)
    if base in _SEEDED:
        options.setdefault("seed", seed)
    try:
        return _CLASSES[base](**options)
    except TypeError as exc:
        raise ConfigError(f"attack {base!r}: bad parameters {sorted(options)}: {exc}") from exc
