"""Pay a node's one-time costs before the federation waits on it, not in round 1.

The first optimizer step imports torch's compiler stack (`torch.optim` calls into `torch._dynamo`:
~800 modules, seconds of CPU), the first forward and backward set up kernels, and the first seal
starts the crypto thread pool. Done in round 1, that time looks like this node's usual pace to its
neighbours, and on a loaded machine every node pays it at once. `warm_up` runs each of these once on
throwaway copies, so the model, its optimizer state, the shuffling generator and the global RNG
stream that training uses stay exactly as they were.
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from p2pfl import codec
from p2pfl.envelope import ReplayGuard, UpdateMeta, open_envelope, seal
from p2pfl.federation import Certificate, FederationRoot
from p2pfl.identity import Identity
from p2pfl.learning import get_params
from p2pfl.learning.tasks import Task

__all__ = ["warm_crypto", "warm_training", "warm_up"]

log = logging.getLogger("p2pfl.warmup")


def warm_training(task: Task, model: torch.nn.Module) -> None:
    """One step of the configured optimizer and one evaluation on a copy of `model`.

    A task with `warm_up(model)` (every built-in) runs a real step on a batch of its own shape; any
    other task gets at least the optimizer machinery (an SGD step without gradients) and an
    evaluation of the copy. The global RNG is restored afterwards (dropout would draw from it).
    """
    with torch.random.fork_rng(devices=[]):
        scratch = copy.deepcopy(model)
        warm = getattr(task, "warm_up", None)
        if callable(warm):
            warm(scratch)
            return
        opt = torch.optim.SGD(scratch.parameters(), lr=0.0)
        opt.step()
        task.evaluate(scratch)


def warm_crypto(model: torch.nn.Module, identity: Identity, cert: Certificate, root: FederationRoot) -> None:
    """Encode, seal to ourselves, open and decode the model once (codec, NaCl, AEAD, thread pool).

    A fresh ReplayGuard: the node's own guard must not remember this rehearsal."""
    params = get_params(model)
    meta = UpdateMeta(
        sender=identity.node_id,
        federation=root.federation_id,
        round=1,
        seq=1,
        timestamp=time.time(),
        samples=1,
        degree=1,
    )
    message = seal(codec.encode(params), meta, identity, {identity.node_id: identity.box_public_bytes})
    _, payload = open_envelope(
        message, identity, root, {identity.node_id: cert}.get, ReplayGuard(), max_bytes=len(message)
    )
    codec.check_against(codec.decode(payload, expected_tensors=len(params)), codec.spec_of(params))


def warm_up(
    task: Task, model: torch.nn.Module, identity: Identity, cert: Certificate, root: FederationRoot
) -> float:
    """Everything round 1 needs, once; returns the seconds it took (logged, never fatal: a step
    that cannot be rehearsed here will simply be paid in round 1)."""
    started = time.monotonic()
    for step in (lambda: warm_training(task, model), lambda: warm_crypto(model, identity, cert, root)):
        try:
            step()
        except Exception as exc:  # a rehearsal must never stop a node that would otherwise run
            log.warning("warm-up step failed (%s: %s); round 1 will pay for it", type(exc).__name__, exc)
    took = time.monotonic() - started
    log.info("warmed up in %.2f s", took)
    return took
