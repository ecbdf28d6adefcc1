"""TensorTask.train and TensorTask.evaluate for many tasks at once (the simulator's fast path).

All models are the rows of one N x P float32 matrix (learning.flatten of each node's state_dict).
BatchedTrainer trains them all at once with torch.func (vmap of the gradient of the task's own
model and loss), drawing each node's minibatch order from that node's own task generator, so it
takes the same SGD steps as task.train; evaluation runs every model on the shared test split in one
batched call. `batchable` says whether a list of tasks qualifies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeGuard

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p2pfl.learning.tasks import Task, TensorTask

EVAL_FLOATS_PER_CHUNK = 1 << 24  # activations (float32) of one batched evaluation call: 64 MiB
TRAIN_FLOATS_PER_CHUNK = 1 << 24  # inputs (float32) of one batched minibatch: 64 MiB
# MT19937 (torch's CPU generator): state words, N - M, masks and the twist matrix
MT_WORDS, MT_SHIFT = 624, 227
MT_UPPER, MT_LOWER, MT_MATRIX_A = np.uint32(0x80000000), np.uint32(0x7FFFFFFF), np.uint32(0x9908B0DF)


class GeneratorShuffles:
    """Each node's permutation from its own torch.Generator (the tasks' own generators, advanced
    as task.train advances them): one torch.randperm call per node."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)

    def __len__(self) -> int:
        return len(self.generators)

    def permutations(self, a: int, sizes: list[int]) -> torch.Tensor:
        """Nodes a, a+1, ...: randperm(sizes[k]) of node a+k, concatenated."""
        gens = self.generators[a : a + len(sizes)]
        return torch.cat([torch.randperm(k, generator=g) for k, g in zip(sizes, gens, strict=True)])


class SeededShuffles:
    """What GeneratorShuffles gives for generators torch.Generator().manual_seed(seeds[i]), for
    100,000 nodes without 100,000 torch calls per epoch.

    torch's CPU generator is MT19937 seeded with init_genrand(seed mod 2^32), and randperm(k) (k
    below 2^32 / 20) is a Fisher-Yates pass: for i < k - 1, swap i with i + (next 32-bit output
    % (k - i)). Here every node's MT19937 state is a column of one (624, N) array, so a draw, a
    swap or a state refill is one numpy operation over all nodes. A test checks it against
    torch.randperm draw for draw, refills included.
    """

    def __init__(self, seeds: Sequence[int] | np.ndarray) -> None:
        low = np.asarray(seeds, dtype=np.int64) & 0xFFFFFFFF
        state = np.empty((MT_WORDS, len(low)), dtype=np.uint32)
        state[0] = low.astype(np.uint32)
        for j in range(1, MT_WORDS):  # init_genrand, for every node at once
            prev = state[j - 1]
            state[j] = np.uint32(1812433253) * (prev ^ (prev >> np.uint32(30))) + np.uint32(j)
        self.state = state
        self.used = np.full(len(low), MT_WORDS, dtype=np.int64)  # all used: refill before a draw

    def __len__(self) -> int:
        return len(self.used)

    def _refill(self, nodes: np.ndarray) -> None:
        """MT19937's twist of these nodes' states (in place, in three blocks that read only words
        the sequential loop would have read: old words ahead, new words behind)."""
        cols: slice | np.ndarray = nodes
        if nodes[-1] - nodes[0] + 1 == len(nodes):  # a run of nodes: a view, no copy
            cols = slice(int(nodes[0]), int(nodes[-1]) + 1)
        s = self.state[:, cols]
        n, m = MT_WORDS, MT_WORDS - MT_SHIFT

        def twist(k0: int, k1: int, nxt: np.ndarray, src: np.ndarray) -> None:
            y = (s[k0:k1] & MT_UPPER) | (nxt & MT_LOWER)
            s[k0:k1] = src ^ (y >> np.uint32(1)) ^ ((y & np.uint32(1)) * MT_MATRIX_A)

        twist(0, n - m, s[1 : n - m + 1], s[m:].copy())
        twist(n - m, 2 * (n - m), s[n - m + 1 : 2 * (n - m) + 1], s[: n - m].copy())
        twist(2 * (n - m), n - 1, s[2 * (n - m) + 1 :], s[n - m : n - 1 - (n - m)].copy())
        twist(n - 1, n, s[:1], s[m - 1 : m].copy())
        if isinstance(cols, np.ndarray):
            self.state[:, cols] = s
        self.used[nodes] = 0

    def _draw(self, nodes: np.ndarray) -> np.ndarray:
        """The next 32-bit output of each node's generator (as int64)."""
        due = nodes[self.used[nodes] >= MT_WORDS]
        if len(due):
            self._refill(due)
        y = self.state[self.used[nodes], nodes]
        self.used[nodes] += 1
        y ^= y >> np.uint32(11)
        y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
        y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
        y ^= y >> np.uint32(18)
        return y.astype(np.int64)

    def permutations(self, a: int, sizes: list[int]) -> torch.Tensor:
        """Nodes a, a+1, ...: randperm(sizes[k]) of node a+k, concatenated."""
        k = np.asarray(sizes, dtype=np.int64)
        longest = int(k.max())
        perm = np.tile(np.arange(longest, dtype=np.int64), (len(k), 1))
        for i in range(longest - 1):
            rows = np.flatnonzero(k - 1 > i)  # the nodes that still draw
            j = i + self._draw(a + rows) % (k[rows] - i)
            held = perm[rows, i]
            perm[rows, i] = perm[rows, j]
            perm[rows, j] = held
        return torch.from_numpy(perm[np.arange(longest) < k[:, None]])


def share_test_split(task: Task, first: Sequence[Task]) -> Task:
    """Point a TensorTask's test tensors at the first task's when they are equal (the built-ins'
    test split is the same on every node): one copy instead of N (120 MB at N = 1024 on digits).
    Returns `task` itself; other kinds of task are left alone."""
    if first and type(task) is TensorTask and type(first[0]) is TensorTask:
        task.share_test_split(first[0])
    return task


def _exactly_tensor_tasks(tasks: Sequence[object]) -> TypeGuard[Sequence[TensorTask]]:
    return all(type(t) is TensorTask for t in tasks)


def batchable(tasks: Sequence[object], model: nn.Module) -> TypeGuard[Sequence[TensorTask]]:
    """True when every task is a TensorTask with the same hyper-parameters and test split, trains
    with constant-rate SGD without momentum or weight decay (the only optimizer vmapped here; the
    others fall back to each task's own train), and the model's state is exactly its trainable
    parameters (no buffers such as batch-norm statistics)."""
    if not tasks or not _exactly_tensor_tasks(tasks):
        return False
    state, params = model.state_dict(), dict(model.named_parameters())
    if list(state) != list(params) or not all(p.requires_grad for p in params.values()):
        return False
    first = tasks[0]
    key = (first.spec.lr, first.spec.batch_size, first.spec.local_epochs)
    for t in tasks:
        if not t.spec.plain_sgd or (t.spec.lr, t.spec.batch_size, t.spec.local_epochs) != key:
            return False
        if not t.same_test_split(first):
            return False
    return True


class BatchedTrainer:
    """task.train and task.evaluate for N TensorTasks at once, on the rows of an N x P matrix.

    Same SGD as TensorTask.train: per epoch each node draws torch.randperm(n_i) from its own task
    generator and steps through minibatches of batch_size with the mean cross-entropy; nodes with
    fewer batches simply stop stepping. The gradient of the task's own model is vmapped over nodes.

    The training data is one shared array plus, optionally, every node's row indices into it
    (`from_shards`: no per-node copies, for 100,000 virtual nodes); nodes train in chunks sized so
    one minibatch of a chunk stays within TRAIN_FLOATS_PER_CHUNK (nodes are independent while
    training, so chunking changes nothing but the memory).
    """

    def __init__(self, tasks: Sequence[TensorTask], model: nn.Module) -> None:
        spec = tasks[0].spec
        self._setup(
            model,
            x=torch.cat([t.x_train for t in tasks]),
            y=torch.cat([t.y_train for t in tasks]),
            index=None,
            sizes=torch.tensor([t.num_samples for t in tasks], dtype=torch.int64),
            shuffles=GeneratorShuffles([t.generator for t in tasks]),
            test=(tasks[0].x_test, tasks[0].y_test),
            hyper=(float(spec.lr), int(spec.batch_size), int(spec.local_epochs)),
        )

    @classmethod
    def from_shards(
        cls,
        model: nn.Module,
        *,
        x: torch.Tensor,
        y: torch.Tensor,
        flat: np.ndarray,
        offsets: np.ndarray,
        seeds: Sequence[int] | np.ndarray,
        test: tuple[torch.Tensor, torch.Tensor],
        lr: float,
        batch_size: int,
        local_epochs: int,
    ) -> BatchedTrainer:
        """Node i trains on rows x[flat[offsets[i]:offsets[i+1]]] with a generator seeded seeds[i], as
        the TensorTask holding those rows (and that generator) would; the rows are looked up per
        minibatch."""
        self = cls.__new__(cls)
        self._setup(
            model,
            x=x,
            y=y,
            index=torch.from_numpy(np.array(flat, dtype=np.int64)),  # a writable copy
            sizes=torch.from_numpy(np.diff(np.asarray(offsets, dtype=np.int64))),
            shuffles=SeededShuffles(seeds),
            test=test,
            hyper=(float(lr), int(batch_size), int(local_epochs)),
        )
        return self

    def _setup(
        self,
        model: nn.Module,
        *,
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor | None,
        sizes: torch.Tensor,
        shuffles: GeneratorShuffles | SeededShuffles,
        test: tuple[torch.Tensor, torch.Tensor],
        hyper: tuple[float, int, int],
    ) -> None:
        from torch.func import functional_call, grad_and_value, vmap

        if len(shuffles) != len(sizes) or not len(sizes) or int(sizes.min()) < 1:
            raise ValueError("every node needs a generator and at least one training sample")
        self.model = model
        self.layout = [(name, tuple(p.shape), p.numel()) for name, p in model.named_parameters()]
        self.sizes = sizes
        self.offsets = torch.cumsum(sizes, 0) - sizes
        self.x, self.y, self.index = x, y, index
        self.shuffles = shuffles
        self.x_test, self.y_test = test
        self.lr, self.bs, self.epochs = hyper
        features = max(1, int(x[0].numel())) if len(x) else 1
        self.chunk = max(1, TRAIN_FLOATS_PER_CHUNK // (self.bs * features))

        def loss(params, xb, yb, mask):
            out = functional_call(model, params, (xb,))
            ce = F.cross_entropy(out, yb, reduction="none")
            return (ce * mask).sum() / mask.sum().clamp(min=1.0)

        self._step = vmap(grad_and_value(loss))

        def forward(params, xb):
            return functional_call(model, params, (xb,))

        self._forward = vmap(forward, in_dims=(0, None))
        self._chunk: int | None = None

    def _params(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        out, off = {}, 0
        for name, shape, size in self.layout:
            out[name] = rows[:, off : off + size].reshape(rows.shape[0], *shape)
            off += size
        return out

    def _flat(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([grads[name].reshape(grads[name].shape[0], -1) for name, _, _ in self.layout], 1)

    def train(self, x: np.ndarray) -> np.ndarray:
        """Train every row of x in place (x is N x P float32); returns each node's mean training loss."""
        xt = torch.from_numpy(x)
        n = len(self.sizes)
        total = torch.zeros(n, dtype=torch.float64)
        count = torch.zeros(n, dtype=torch.float64)
        self.model.train()
        for a in range(0, n, self.chunk):
            b = min(n, a + self.chunk)
            self._train_rows(xt[a:b], a, b, total[a:b], count[a:b])
        return (total / count.clamp(min=1)).numpy()

    def _train_rows(self, xt: torch.Tensor, a: int, b: int, total: torch.Tensor, count: torch.Tensor) -> None:
        """Nodes a..b-1 (xt: their rows, a view updated in place; total / count: views too)."""
        n = b - a
        sizes_t = self.sizes[a:b]
        sizes = sizes_t.tolist()
        longest = max(sizes)
        steps = -(-longest // self.bs)
        # where each node's permuted sample positions go in an (n, longest) matrix, padded with -1
        rows_of = torch.repeat_interleave(torch.arange(n), sizes_t)
        starts = torch.cumsum(sizes_t, 0) - sizes_t
        flat_pos = rows_of * longest + (torch.arange(len(rows_of)) - torch.repeat_interleave(starts, sizes_t))
        base = torch.repeat_interleave(self.offsets[a:b], sizes_t)
        for _ in range(self.epochs):
            # each node shuffles with its own task generator, exactly as task.train does
            perm = self.shuffles.permutations(a, sizes)
            idx = torch.full((n * longest,), -1, dtype=torch.int64)
            pos = perm + base
            idx[flat_pos] = pos if self.index is None else self.index[pos]
            idx = idx.view(n, longest)
            for s in range(steps):
                cols = idx[:, s * self.bs : min((s + 1) * self.bs, longest)]  # no wider than the data
                mask = cols >= 0
                active = mask[:, 0]
                everyone = bool(active.all())
                sel = None if everyone else torch.nonzero(active).squeeze(1)
                if not everyone:
                    cols, mask = cols[sel], mask[sel]
                    width = int(mask.sum(1).max())
                    cols, mask = cols[:, :width], mask[:, :width]
                rows = xt if everyone else xt[sel]
                safe = cols.clamp(min=0)
                xb, yb = self.x[safe], self.y[safe]
                m = mask.to(torch.float32)
                with torch.no_grad():
                    grads, losses = self._step(self._params(rows), xb, yb, m)
                    g = self._flat(grads)
                    k = m.sum(1).to(torch.float64)
                    if everyone:
                        xt.sub_(g, alpha=self.lr)
                        total += losses.detach().to(torch.float64) * k
                        count += k
                    else:
                        xt[sel] = xt[sel] - self.lr * g
                        total[sel] += losses.detach().to(torch.float64) * k
                        count[sel] += k

    @torch.no_grad()
    def _activations_per_sample(self) -> int:
        """Floats every module outputs for one sample (sizes the evaluation chunks)."""
        total = 0

        def hook(_module, _inputs, output):
            nonlocal total
            if isinstance(output, torch.Tensor):
                total += output.numel()

        handles = [m.register_forward_hook(hook) for m in self.model.modules()]
        try:
            self.model(self.x_test[:1])
        finally:
            for h in handles:
                h.remove()
        return max(total, 1) + self.x_test[0].numel()  # vmap broadcasts the shared inputs too

    def _logits(self, rows: torch.Tensor) -> torch.Tensor:
        """The models' outputs on the test split, classes first: (C, nodes, T)."""
        if type(self.model) is nn.Linear:  # logistic regression: one GEMM straight into that layout
            c, (classes, features) = rows.shape[0], self.model.weight.shape
            w = rows[:, : classes * features].reshape(c, classes, features).transpose(0, 1)
            out = (w.reshape(classes * c, features) @ self.x_test.T).view(classes, c, -1)
            if self.model.bias is not None:
                out += rows[:, classes * features :].T.reshape(classes, c, 1)
            return out
        return self._forward(self._params(rows), self.x_test).permute(2, 0, 1).contiguous()

    @torch.no_grad()
    def evaluate(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(accuracy, mean test loss) of every row of x on the shared test split (as task.evaluate)."""
        xt = torch.from_numpy(x)
        n, t = xt.shape[0], len(self.y_test)
        if self._chunk is None:
            self._chunk = max(1, EVAL_FLOATS_PER_CHUNK // (t * self._activations_per_sample()))
        self.model.eval()
        acc, loss = np.empty(n), np.empty(n)
        target = self.y_test.view(1, 1, -1)
        for a in range(0, n, self._chunk):
            out = self._logits(xt[a : a + self._chunk])  # (C, c, T): reductions over classes run ~4x
            c = out.shape[1]  # faster along the outer dimension than along a short inner one
            picked = out.gather(0, target.expand(1, c, -1)).squeeze(0)
            ce = torch.logsumexp(out, 0) - picked  # = cross_entropy(reduction="none")
            loss[a : a + c] = ce.to(torch.float64).mean(1).numpy()
            acc[a : a + c] = (out.max(0).indices == self.y_test).to(torch.float64).mean(1).numpy()
        self.model.train()
        return acc, loss
