"""Differential privacy of a node's shared updates: DP-SGD local training (Opacus) and its accountant.

What the guarantee covers. With [privacy] enabled, every local step clips each example's gradient
to `max_grad_norm` and adds Gaussian noise of std `noise_multiplier * max_grad_norm` to their sum
(Opacus' DPOptimizer over a GradSampleModule), on minibatches drawn by Poisson sampling: each
example of the node's training shard joins a step's batch independently with probability
q = batch_size / n_local (Opacus' DPDataLoader). The accountant (RDP by default, or PRV) composes
every step the node has taken, across rounds and restarts, into (epsilon, delta): the sequence of
model updates this node sends is (epsilon, delta)-differentially private with respect to adding or
removing one record of its local training set, under the accountant's assumptions: Poisson
sampling with the recorded q, the noise independent of everything the adversary sees, the model
each round starts from (the mixed model: a function of neighbours' updates and of this node's own
earlier, already accounted releases) treated by adaptive composition, and the preprocessing not
itself depending on the records. Everything a node shares is post-processing of those updates,
except what this module cannot cover and the node still sends or keeps:

- the update's sample count (used for weighting) is sent in the clear: it reveals n_local;
- statistics computed from the records: [task] standardize with the site's own statistics scales
  each example with the others' mean (a warning is logged), a `p2pfl stats` file was computed from
  them, and the federated standardisation layer would send the local means as they are (refused);
- local files (metrics, model files, the test-split accuracy) are not shared, hence not covered.

The noise and the Poisson sampling draw from a torch.Generator seeded with 63 bits from the OS's
entropy source (never from the federation-wide [task] seed, which every member knows: an adversary
could replay the noise and subtract it). Opacus' secure_mode (a cryptographic generator, resistant
to floating-point attacks on the Gaussian sampler) is not used.

The accountant's history (noise multiplier, sample rate, steps) is written to `privacy.json` in the
node's data dir after every round's training, before the update leaves the node, so a restart
continues from the epsilon already spent (a crash between the two only over-counts: safe).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from p2pfl.errors import ConfigError, P2PFLError

if TYPE_CHECKING:
    from p2pfl.config import NodeConfig
    from p2pfl.learning.tasks import TensorTask

__all__ = [
    "ACCOUNTANTS",
    "STATE_FILE",
    "DPTraining",
    "PrivacyBudgetSpent",
    "attach_privacy",
    "auto_delta",
    "check_model",
    "sample_rate",
]

ACCOUNTANTS = ("rdp", "prv")
STATE_FILE = "privacy.json"
STATE_FORMAT = "p2pfl-privacy"
STATE_VERSION = 1
DEFAULT_DELTA = 1e-5
BUDGET_TOLERANCE = 1e-3  # the accountant's own rounding: epsilon may end a hair above the target

log = logging.getLogger("p2pfl.privacy")


class PrivacyBudgetSpent(P2PFLError):
    """Another round would take epsilon past [privacy] target_epsilon: the node stops instead."""


def sample_rate(num_samples: int, batch_size: int) -> float:
    """Poisson sampling rate giving the spec's batch size on average (1.0 on shards smaller than it)."""
    return min(1.0, batch_size / max(1, num_samples))


def steps_per_epoch(rate: float) -> int:
    """What Opacus' sampler draws per epoch (int(1 / q)); the accountant counts exactly these."""
    return max(1, int(1.0 / rate))


def auto_delta(num_samples: int) -> float:
    """delta when [privacy] delta = 0: at most 1e-5 and below 1 / (2 n_local) (delta must stay well
    under 1/n, or 'leak one record outright' fits the guarantee)."""
    return min(DEFAULT_DELTA, 1.0 / (2 * max(1, num_samples)))


def _opacus() -> Any:
    try:
        import opacus
    except ImportError:  # pragma: no cover - opacus is a dev dependency
        raise ConfigError(
            "[privacy] enabled = true needs Opacus: pip install 'p2pfl-mesh[privacy]' (or set enabled = false)"
        ) from None
    return opacus


def _accountant(kind: str) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if kind == "prv":
        return PRVAccountant()
    if kind == "rdp":
        return RDPAccountant()
    raise ConfigError(f"[privacy] accountant must be one of {', '.join(ACCOUNTANTS)}, got {kind!r}")


def check_model(model: nn.Module) -> None:
    """Refuse, with what to change, a model Opacus cannot compute per-example gradients for (batch
    norm mixes examples; some layers have no per-sample rule). Checked once at start, not mid-round."""
    _opacus()
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    was_training = model.training
    model.train()
    try:
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            listed = "; ".join(str(e) for e in errors[:5])
            raise ConfigError(
                f"[privacy] DP-SGD cannot train this model: {listed}. Replace those layers (batch norm -> "
                "group norm: opacus.validators.ModuleValidator.fix(model)) or set [privacy] enabled = false"
            )
        try:
            probe = GradSampleModule(model, loss_reduction="sum")
        except (NotImplementedError, ValueError) as exc:
            raise ConfigError(
                f"[privacy] DP-SGD cannot compute per-example gradients of this model ({exc}); "
                "use layers Opacus supports or set [privacy] enabled = false"
            ) from None
        probe._close()
    finally:
        model.train(was_training)


@dataclass
class _Wrapped:
    model: nn.Module
    gsm: nn.Module


class DPTraining:
    """DP-SGD for one TensorTask's local training, with its accountant (see the module docstring).

    TensorTask.train hands over here when `task.privacy` is set: the same optimizer (the task keeps
    it across rounds or resets it, as [task] optimizer_state says), wrapped each round in a
    DPOptimizer; the model wrapped once in a GradSampleModule, which hooks the model's own modules
    and shares its parameter tensors, so set_params after mixing writes straight into what DP-SGD
    trains, and the optimizer's moments stay attached to the same tensors.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        batch_size: int,
        noise_multiplier: float,
        max_grad_norm: float,
        delta: float = 0.0,
        accountant: str = "rdp",
        target_epsilon: float = 0.0,
        state_path: Path | None = None,
        seed: int | None = None,
    ) -> None:
        _opacus()
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ConfigError(f"[privacy] noise_multiplier must be > 0, got {noise_multiplier!r}")
        if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ConfigError(f"[privacy] max_grad_norm must be > 0, got {max_grad_norm!r}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate(num_samples, batch_size)
        self.expected_batch = max(1, round(self.sample_rate * num_samples))
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.delta = float(delta) if delta > 0 else auto_delta(num_samples)
        self.kind = accountant
        self.target_epsilon = float(target_epsilon)
        self.state_path = state_path
        # never the federation's seed: the noise must be unpredictable (seed: experiments and tests)
        self._gen = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
        self.accountant = _accountant(accountant)
        self._wrapped: _Wrapped | None = None
        self._eps_cache: tuple[tuple[Any, ...], float] | None = None
        if state_path is not None:
            self._load(state_path)

    # -- accounting ---------------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """DP-SGD steps taken so far (all runs of this node)."""
        return sum(int(s) for _, _, s in self.accountant.history)

    @property
    def epsilon(self) -> float:
        """epsilon spent so far at this delta (0.0 before the first step; cached per history: the
        RDP conversion takes ~0.1 s)."""
        key = tuple(tuple(h) for h in self.accountant.history)
        if self._eps_cache is None or self._eps_cache[0] != key:
            self._eps_cache = (key, self._epsilon(self.accountant.history))
        return self._eps_cache[1]

    def _epsilon(self, history: Sequence[tuple[float, float, int]]) -> float:
        if not history:
            return 0.0
        acc = _accountant(self.kind)
        acc.history = [tuple(h) for h in history]
        return float(acc.get_epsilon(delta=self.delta))

    def epsilon_after(self, epochs: int) -> float:
        """epsilon once `epochs` more local epochs are trained (the budget check before a round)."""
        steps = epochs * steps_per_epoch(self.sample_rate)
        extra = (self.noise_multiplier, self.sample_rate, steps)
        return self._epsilon([*self.accountant.history, extra])

    def _load(self, path: Path) -> None:
        if not path.exists():
            return
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("format") != STATE_FORMAT or raw.get("version") != STATE_VERSION:
                raise ValueError(f"not a {STATE_FORMAT} v{STATE_VERSION} file")
            history = [(float(s), float(q), int(n)) for s, q, n in raw["history"]]
            if any(not (s > 0 and 0 < q <= 1 and n >= 0) for s, q, n in history):
                raise ValueError("history entries out of range")
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"{path} (the privacy accountant's record) is unreadable ({exc}); the epsilon this node already "
                "spent is unknown. Restore the file, or start a fresh node (new data dir) if you accept that"
            ) from None
        self.accountant.history = history
        log.info(
            "privacy: %d DP-SGD steps already taken (epsilon %.3f at delta %.2g)",
            self.steps,
            self.epsilon,
            self.delta,
        )

    def _save(self) -> None:
        if self.state_path is None:
            return
        from p2pfl.checkpoint import _atomic_write

        state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "accountant": self.kind,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "history": [list(h) for h in self.accountant.history],
        }
        data = json.dumps(state, indent=1).encode()
        _atomic_write(self.state_path, lambda fh: fh.write(data))

    # -- training -----------------------------------------------------------------------------------

    def _gsm(self, model: nn.Module) -> nn.Module:
        """The model's GradSampleModule (one per model: it hooks the model's own modules)."""
        from opacus import GradSampleModule

        if self._wrapped is None or self._wrapped.model is not model:
            if self._wrapped is not None:
                self._wrapped.gsm._close()  # type: ignore[operator]
            check_model(model)
            self._wrapped = _Wrapped(model, GradSampleModule(model, loss_reduction="sum"))
        return self._wrapped.gsm

    def check_budget(self, epochs: int) -> None:
        """Raise PrivacyBudgetSpent when `epochs` more would exceed target_epsilon (when one is set)."""
        if self.target_epsilon <= 0:
            return
        after = self.epsilon_after(epochs)
        if after > self.target_epsilon * (1 + BUDGET_TOLERANCE):
            raise PrivacyBudgetSpent(
                f"privacy budget spent: another round would take epsilon from {self.epsilon:.3f} to {after:.3f}, "
                f"past [privacy] target_epsilon = {self.target_epsilon:g} (delta {self.delta:.2g}); this node "
                "stops here. Its model so far is saved; raise target_epsilon only if your privacy policy allows"
            )

    def train(self, task: TensorTask, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """local_epochs of DP-SGD over the task's shard; returns the mean training loss (of the
        sampled batches). The accountant's record is on disk before this returns."""
        from opacus.data_loader import DPDataLoader
        from opacus.optimizers import DPOptimizer

        epochs = task.spec.local_epochs
        self.check_budget(epochs)
        gsm = self._gsm(model)
        gsm.train()
        dp_opt = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch,
            loss_reduction="mean",
            generator=self._gen,
        )
        data = torch.utils.data.TensorDataset(task.x_train, task.y_train)
        loader = DPDataLoader(data, sample_rate=self.sample_rate, generator=self._gen)
        total, count = 0.0, 0
        try:
            for _ in range(epochs):
                for xb, yb in loader:
                    dp_opt.zero_grad(set_to_none=True)
                    out = gsm(xb)
                    # per-example gradients of the summed loss (the GradSampleModule's "sum"); the
                    # DPOptimizer divides the noisy sum by the expected batch size. An empty Poisson
                    # batch gives a zero loss and a noise-only step, as the accountant counts it.
                    loss = F.cross_entropy(out, yb, reduction="sum")
                    with warnings.catch_warnings():  # inputs need no gradient: Opacus' hooks fire anyway
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        loss.backward()
                    dp_opt.step()
                    self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
                    total += float(loss.detach())
                    count += len(yb)
        finally:
            dp_opt.zero_grad(set_to_none=True)  # drop the per-sample gradients (memory) and the flags
            self._save()
        log.info(
            "privacy: epsilon %.3f at delta %.2g after %d DP-SGD steps (noise %.3g, clip %.3g, q %.4f)",
            self.epsilon,
            self.delta,
            self.steps,
            self.noise_multiplier,
            self.max_grad_norm,
            self.sample_rate,
        )
        return total / max(count, 1)


# --------------------------------------------------------------------------------------------------
# the node's one call


def noise_for_target(
    *, target_epsilon: float, delta: float, rate: float, epochs: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier that keeps `epochs` local epochs at sample rate `rate` within
    (target_epsilon, delta) (Opacus' get_noise_multiplier)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=rate,
                steps=epochs * steps_per_epoch(rate),
                accountant=accountant,
            )
        )
    except ValueError as exc:
        raise ConfigError(
            f"[privacy] target_epsilon = {target_epsilon:g} is out of reach for {epochs} local epochs at "
            f"sample rate {rate:.4f} ({exc}); raise target_epsilon or lower epochs"
        ) from None


def attach_privacy(task: Any, cfg: NodeConfig) -> Any:
    """Turn on DP-SGD for the node's task when [privacy] enabled (returns the task, changed in place).

    The noise is [privacy] noise_multiplier, or derived from target_epsilon over `epochs` local
    epochs (0: [training] rounds x [task] local_epochs). The accountant's record lives in the data
    dir (STATE_FILE). Only the built-in tasks' training (TensorTask) is supported.
    """
    section = cfg.privacy
    if not section.enabled:
        return task
    from p2pfl.learning.tasks import TensorTask

    if not isinstance(task, TensorTask):
        raise ConfigError(
            f"[privacy] DP-SGD runs the built-in training (TensorTask); task {cfg.task.name!r} is "
            f"{type(task).__name__}. Return a p2pfl.learning.TensorTask (tensor_task(...)) from your task "
            "function, or set [privacy] enabled = false"
        )
    if task.spec.standardize and not task.spec.feature_stats:
        log.warning(
            "privacy: [task] standardize scales with this site's own statistics, which depend on the records; "
            "the DP guarantee strictly assumes fixed preprocessing (use [task] feature_stats)"
        )
    n = task.num_samples
    rate = sample_rate(n, task.spec.batch_size)
    delta = section.delta or auto_delta(n)
    noise = section.noise_multiplier
    if section.target_epsilon > 0:
        epochs = section.epochs or cfg.training.rounds * task.spec.local_epochs
        noise = noise_for_target(
            target_epsilon=section.target_epsilon,
            delta=delta,
            rate=rate,
            epochs=epochs,
            accountant=section.accountant,
        )
        log.info(
            "privacy: noise multiplier %.3f keeps %d local epochs within epsilon %g at delta %.2g",
            noise,
            epochs,
            section.target_epsilon,
            delta,
        )
    check_model(task.build_model())
    task.privacy = DPTraining(
        num_samples=n,
        batch_size=task.spec.batch_size,
        noise_multiplier=noise,
        max_grad_norm=section.max_grad_norm,
        delta=delta,
        accountant=section.accountant,
        target_epsilon=section.target_epsilon,
        state_path=Path(cfg.node.data_dir) / STATE_FILE,
    )
    return task
