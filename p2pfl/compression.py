"""Compressed updates: one setting per federation, the same numbers on a real node and in the simulator.

Schemes (the `[gossip] compression` string, `Compression.parse`):

  none            float32 model, as without this module (the default)
  fp16 / bf16     the model rounded to 16 bits (bf16 travels as its int16 bit pattern)
  int8[:CHUNK]    stochastic rounding to 127 levels of a float32 scale per CHUNK values (default 256;
                  `int8:tensor` = one scale per model tensor); unbiased; model form unless
                  `form=diff` (both converge alike; the model form needs no keyframes and no state)
  topk:FRACTION   the FRACTION largest-magnitude entries (int32 indices + float32 values)

Options after a comma: `gamma=G` (consensus step in (0, 1]; default 1, for topk 2 x FRACTION) and, for int8,
`form=model|diff`.

CHOCO-style gossip (Koloskova et al. 2019). Every node i keeps a public estimate x̂_i of its model that
all its neighbours hold too. In the "model" form (fp16, bf16, int8) a message carries
Q(x_i) and x̂_i = Q(x_i), no state. In the "diff" form (topk, int8,form=diff) it carries
q = Q(x_i - x̂_i) and sender and receivers both do x̂_i += q: the error left out of one message is
sent in later ones (error feedback). Mixing runs the federation's rule on the estimates only,
y_i = rule(x̂_i, {x̂_j}), and the private model takes the step x_i += gamma (y_i - x̂_i); with the
MH weights this keeps the average of the models, however lossy Q is.

A receiver's x̂_j is only right if it saw every message since the last full one, and networks lose
messages and nodes restart. So in the diff form a sender's first message, and every `keyframe_every`
rounds one after it, is a keyframe (the model in fp16, float32 where fp16 would overflow), and every
diff names the round of the message it extends; a receiver holding another base refuses the diff
(Reason.OUT_OF_SYNC) and the neighbour counts as missing until its next keyframe. A diff chain needs
the same neighbours round after round: a time-varying topology takes the model form.

All maths is row-wise on an N x D float32 matrix (`encode_rows` / `decode_rows`): a node calls it
with one row, the simulator with every node at once, so both compute identical numbers. Stochastic
rounding draws from a counter-based hash of (node key, round, index), not from a generator's state.
Wire: a few named arrays inside the codec frame (`to_wire` / `read_wire`); `read_wire` trusts nothing
(names, dtypes, shapes, index range and order, finite values and scales, the scheme and its parameter).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from p2pfl.errors import ConfigError, Reason, Rejected

__all__ = [
    "DIFF",
    "KEYFRAME",
    "MODEL",
    "SCHEMES",
    "Compression",
    "CompressionError",
    "Estimates",
    "OwnEstimate",
    "Packed",
    "chunk_starts",
    "decode_rows",
    "encode_rows",
    "is_compressed_frame",
    "keyframe_rows",
    "node_key",
    "read_wire",
    "step",
    "to_wire",
    "wire_template",
]

SCHEMES = ("none", "fp16", "bf16", "int8", "topk")
MODEL, KEYFRAME, DIFF = 0, 1, 2  # message kinds
KIND_NAMES = {MODEL: "model", KEYFRAME: "keyframe", DIFF: "diff"}
WIRE_VERSION = 1
HEAD = "z:head"  # int64 [version, scheme, kind, base round, length, parameter]
VALUES, SCALES, INDEX = "z:values", "z:scales", "z:index"
MAX_WIRE_TENSORS = 4
DEFAULT_CHUNK = 256
FP16_MAX = float(np.finfo(np.float16).max)
# topk's default consensus step is TOPK_GAMMA_PER_FRACTION x the fraction (at most 1): top-k diffs lag
# the model, and too long a step lets the estimates' errors grow without bound (pure averaging on an
# 8-node ring, tests/test_compression.py: topk:0.05 diverges at gamma 0.4, converges at 0.1 and 0.2;
# topk:0.2 converges at 0.4; with training, topk:0.01 at gamma 1 reached a consensus distance of 9e3).
# The other schemes are unbiased or nearly exact and keep gamma = 1.
TOPK_GAMMA_PER_FRACTION = 2.0
_SCHEME_CODE = {name: i for i, name in enumerate(SCHEMES)}
_LEVELS = 127  # int8 codes lie in -127..127 (symmetric: -128 is never sent, and refused)


class CompressionError(ConfigError):
    """The compression setting is invalid; the message says what to write instead."""


@dataclass(frozen=True)
class Compression:
    """A parsed `[gossip] compression` setting (`Compression.parse("topk:0.01")`)."""

    scheme: str = "none"
    fraction: float = 0.0  # topk
    chunk: int = DEFAULT_CHUNK  # int8: values per scale; 0 = one scale per tensor
    gamma: float = 1.0  # consensus step: x += gamma (y - x̂)
    diff: bool = False  # send Q(x - x̂) with error feedback (keyframes) instead of Q(x)
    text: str = "none"

    @property
    def enabled(self) -> bool:
        return self.scheme != "none"

    @classmethod
    def parse(cls, text: str) -> Compression:
        """`none`, `fp16`, `bf16`, `int8[:CHUNK|:tensor]`, `topk:FRACTION`, then `,gamma=G`, `,form=...`."""
        if not isinstance(text, str):
            raise CompressionError(f'compression must be a string such as "topk:0.01", got {text!r}')
        head, *options = [p.strip() for p in text.strip().split(",")]
        name, _, arg = head.partition(":")
        name = name.lower()
        if name not in SCHEMES:
            raise CompressionError(
                f"unknown compression {name!r}; use one of none, fp16, bf16, int8, int8:CHUNK, int8:tensor, "
                "topk:FRACTION (e.g. topk:0.01)"
            )
        fraction, chunk = 0.0, DEFAULT_CHUNK
        if name == "topk":
            fraction = _parse_fraction(arg)
        elif name == "int8" and arg:
            chunk = _parse_chunk(arg)
        elif arg:
            raise CompressionError(f"compression {name!r} takes no parameter (got {head!r})")
        gamma = min(1.0, TOPK_GAMMA_PER_FRACTION * fraction) if name == "topk" else 1.0
        diff = name == "topk"
        for option in options:
            key, _, value = option.partition("=")
            key = key.strip().lower()
            if key == "gamma":
                gamma = _parse_gamma(value)
            elif key == "form" and name == "int8" and value.strip() in ("model", "diff"):
                diff = value.strip() == "diff"
            elif key == "form":
                allowed = "model or diff" if name == "int8" else ("diff" if name == "topk" else "model")
                raise CompressionError(f"{name}: form must be {allowed} (got {option!r})")
            else:
                raise CompressionError(
                    f"unknown compression option {option!r}; options are gamma=G and form=..."
                )
        if name == "none" and (gamma != 1.0 or options):
            raise CompressionError("compression none takes no options")
        return cls(name, fraction, chunk, gamma, diff, text.strip())

    @property
    def parameter_name(self) -> str:
        return {"topk": "k", "int8": "chunk"}.get(self.scheme, "-")

    def k(self, d: int) -> int:
        """topk: entries per message for a model of d values (at least 1)."""
        return min(d, max(1, math.ceil(self.fraction * d)))

    def wire_parameter(self, d: int) -> int:
        """The number the wire head carries for the receiver to compare: k, the chunk, or 0."""
        if self.scheme == "topk":
            return self.k(d)
        return self.chunk if self.scheme == "int8" else 0

    def describe(self) -> str:
        form = "diff" if self.diff else "model"
        return f"{self.text} ({form} form, gamma {self.gamma:g})"


def _parse_unit(text: str, error: str) -> float:
    """A number in (0, 1]; anything else raises CompressionError(`error`)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise CompressionError(error)
    return value


def _parse_fraction(arg: str) -> float:
    return _parse_unit(arg, f"topk needs a fraction in (0, 1], e.g. topk:0.01 (got {arg!r})")


def _parse_chunk(arg: str) -> int:
    if arg.strip().lower() == "tensor":
        return 0
    try:
        chunk = int(arg)
    except ValueError:
        chunk = 0
    if not 8 <= chunk <= 1 << 24:
        raise CompressionError(f"int8:CHUNK needs 8..16777216 values per scale, or int8:tensor (got {arg!r})")
    return chunk


def _parse_gamma(value: str) -> float:
    return _parse_unit(value, f"gamma (the consensus step) must be in (0, 1], got {value!r}")


def chunk_starts(c: Compression, d: int, tensor_sizes: Sequence[int] = ()) -> np.ndarray:
    """int8: where each scale's values begin in a flat vector of d values (empty tensors skipped)."""
    if c.chunk:
        return np.arange(0, d, c.chunk, dtype=np.int64)
    sizes = list(tensor_sizes) or [d]
    if sum(sizes) != d:
        raise ValueError(f"tensor sizes add up to {sum(sizes)}, not {d}")
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return offsets[np.asarray(sizes) > 0]


def node_key(node_id: str, seed: int) -> int:
    """The stochastic-rounding stream of one node in one federation (a 64-bit hash)."""
    digest = hashlib.blake2b(f"{seed}:{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


# --------------------------------------------------------------------------------------------------
# row-wise maths (one row on a node, N rows in the simulator)


@dataclass(frozen=True)
class Packed:
    """Encoded rows: `arrays` (name -> array with a leading row axis) and the kind of each row."""

    kind: np.ndarray  # (N,) int: MODEL, KEYFRAME or DIFF
    arrays: dict[str, np.ndarray]


_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _uniform(keys: np.ndarray, round_: int, d: int) -> np.ndarray:
    """N x d uniforms in [0, 1): splitmix64 of (key, round, index), the same on any machine."""
    k = np.asarray(keys, dtype=np.uint64).reshape(-1, 1)
    r = np.uint64(round_ & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        z = (k ^ (r * _GOLD)) + np.arange(1, d + 1, dtype=np.uint64) * _GOLD
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


def _expand(per_chunk: np.ndarray, starts: np.ndarray, d: int) -> np.ndarray:
    lengths = np.diff(np.append(starts, d))
    return np.repeat(per_chunk, lengths, axis=1)


def _bf16_bits(v: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even) as int16."""
    bits = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype(np.uint16).view(np.int16)


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode_rows(
    c: Compression, v: np.ndarray, *, keys: np.ndarray, round_: int, starts: np.ndarray, kind: int
) -> Packed:
    """Compress each row of v (N x D float32; the model, or its difference from the estimate)."""
    v = np.asarray(v, dtype=np.float32)
    n, d = v.shape
    kinds = np.full(n, kind, dtype=np.int64)
    if c.scheme == "fp16":
        return Packed(kinds, {VALUES: np.clip(v, -FP16_MAX, FP16_MAX).astype(np.float16)})
    if c.scheme == "bf16":
        return Packed(kinds, {VALUES: _bf16_bits(v)})
    if c.scheme == "int8":
        scales = np.maximum.reduceat(np.abs(v), starts, axis=1) if d else np.zeros((n, 0), np.float32)
        inv = np.divide(np.float32(_LEVELS), scales, out=np.zeros_like(scales), where=scales > 0)
        t = v * _expand(inv, starts, d) + _uniform(keys, round_, d)
        codes = np.clip(np.floor(t), -_LEVELS, _LEVELS).astype(np.int8)
        return Packed(kinds, {VALUES: codes, SCALES: scales.astype(np.float32)})
    if c.scheme == "topk":
        k = c.k(d)
        index = np.argpartition(-np.abs(v), k - 1, axis=1)[:, :k] if k < d else np.tile(np.arange(d), (n, 1))
        index = np.sort(index, axis=1).astype(np.int32)
        return Packed(kinds, {INDEX: index, VALUES: np.take_along_axis(v, index.astype(np.int64), axis=1)})
    raise ValueError(f"nothing to encode for compression {c.scheme!r}")


def keyframe_rows(v: np.ndarray) -> Packed:
    """Full rows: fp16 where every value fits, else float32 (one dtype per message)."""
    v = np.asarray(v, dtype=np.float32)
    kinds = np.full(v.shape[0], KEYFRAME, dtype=np.int64)
    if v.size == 0 or float(np.abs(v).max()) <= FP16_MAX:
        return Packed(kinds, {VALUES: v.astype(np.float16)})
    return Packed(kinds, {VALUES: v.copy()})


def decode_rows(c: Compression, packed: Packed, d: int, starts: np.ndarray) -> np.ndarray:
    """The N x D float32 values the packed rows stand for (for topk: a dense delta, zeros elsewhere)."""
    values = packed.arrays[VALUES]
    n = values.shape[0]
    if (packed.kind == KEYFRAME).all() or c.scheme == "fp16":
        return values.astype(np.float32)
    if c.scheme == "bf16":
        return _bf16_values(values)
    if c.scheme == "int8":
        step_ = packed.arrays[SCALES] / np.float32(_LEVELS)
        return values.astype(np.float32) * _expand(step_.astype(np.float32), starts, d)
    if c.scheme == "topk":
        dense = np.zeros((n, d), dtype=np.float32)
        np.put_along_axis(dense, packed.arrays[INDEX].astype(np.int64), values.astype(np.float32), axis=1)
        return dense
    raise ValueError(f"nothing to decode for compression {c.scheme!r}")


def step(x: np.ndarray, estimate: np.ndarray, mixed: np.ndarray, gamma: float) -> np.ndarray:
    """The private model's move: x + gamma (y - x̂), where y is the rule's output on the estimates."""
    delta = np.subtract(mixed, estimate, dtype=np.float32)
    if gamma != 1.0:
        delta *= np.float32(gamma)
    return np.add(x, delta, dtype=np.float32)


def payload_bytes(packed: Packed, row: int = 0) -> int:
    """Raw bytes of one row's arrays (before the codec frame and envelope)."""
    return sum(int(a[row].nbytes) for a in packed.arrays.values())


# --------------------------------------------------------------------------------------------------
# wire: one row <-> the named arrays the codec carries


def to_wire(c: Compression, packed: Packed, row: int, base_round: int, d: int) -> dict[str, np.ndarray]:
    """One row as codec arrays: a head naming scheme, kind, base round, length and parameter."""
    kind = int(packed.kind[row])
    head = np.array(
        [WIRE_VERSION, _SCHEME_CODE[c.scheme], kind, base_round, d, c.wire_parameter(d)], dtype=np.int64
    )
    return {HEAD: head, **{name: np.ascontiguousarray(a[row]) for name, a in packed.arrays.items()}}


def wire_template(c: Compression, d: int, kind: int, n_starts: int) -> dict[str, np.ndarray]:
    """Zero arrays shaped like one message of `kind`: what a message costs (the simulator's bytes)."""
    head = np.zeros(6, dtype=np.int64)
    if kind == KEYFRAME:
        return {HEAD: head, VALUES: np.zeros(d, np.float16)}
    if c.scheme == "fp16":
        return {HEAD: head, VALUES: np.zeros(d, np.float16)}
    if c.scheme == "bf16":
        return {HEAD: head, VALUES: np.zeros(d, np.int16)}
    if c.scheme == "int8":
        return {HEAD: head, VALUES: np.zeros(d, np.int8), SCALES: np.zeros(n_starts, np.float32)}
    k = c.k(d)
    return {HEAD: head, INDEX: np.zeros(k, np.int32), VALUES: np.zeros(k, np.float32)}


def is_compressed_frame(arrays: Mapping[str, np.ndarray]) -> bool:
    return HEAD in arrays


def _mismatch(detail: str) -> Rejected:
    return Rejected(
        Reason.COMPRESSION,
        f"{detail}; every node of a federation needs the same [gossip] compression",
    )


def _bad(detail: str) -> Rejected:
    return Rejected(Reason.MALFORMED, f"compressed update: {detail}")


def _exact(arrays: Mapping[str, np.ndarray], name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    a = arrays[name]
    if a.dtype != np.dtype(dtype) or tuple(a.shape) != shape:
        raise _bad(f"{name} is {a.dtype}{tuple(a.shape)}, expected {np.dtype(dtype)}{shape}")
    return a


@dataclass(frozen=True)
class Message:
    """One checked incoming compressed message: its kind, the round it extends, its decoded values."""

    kind: int
    base_round: int
    values: np.ndarray  # D float32 (topk diff: dense, zeros outside the index)
    index: np.ndarray | None = None  # topk: the entries that changed


def read_wire(c: Compression, arrays: Mapping[str, np.ndarray], d: int, starts: np.ndarray) -> Message:
    """Check one incoming frame against the local setting and decode it; Rejected on anything off."""
    if HEAD not in arrays:
        raise _mismatch(f"update is not compressed, this node uses compression {c.text!r}")
    head = arrays[HEAD]
    if head.dtype != np.int64 or head.shape != (6,):
        raise _bad("head must be 6 int64")
    version, scheme, kind, base_round, length, param = (int(v) for v in head)
    if version != WIRE_VERSION:
        raise _bad(f"wire version {version}, this node reads {WIRE_VERSION}")
    if scheme != _SCHEME_CODE[c.scheme] or param != c.wire_parameter(d):
        name = SCHEMES[scheme] if 0 <= scheme < len(SCHEMES) else f"#{scheme}"
        raise _mismatch(
            f"update compressed as {name} ({c.parameter_name if name == c.scheme else 'parameter'} {param}), "
            f"this node uses {c.text!r} ({c.parameter_name} {c.wire_parameter(d)})"
        )
    allowed = (KEYFRAME, DIFF) if c.diff else (MODEL,)
    if kind not in allowed:
        raise _mismatch(
            f"{KIND_NAMES.get(kind, f'kind #{kind}')} message, this node's form expects {allowed}"
        )
    if length != d:
        raise Rejected(
            Reason.SHAPE_MISMATCH, f"compressed update of {length} values, the local model has {d}"
        )
    if kind == DIFF and base_round < 0:
        raise _bad(f"base round {base_round}")
    expected = _expected_names(c, kind)
    if set(arrays) != expected:
        raise _bad(f"arrays {sorted(arrays)[:6]}, expected {sorted(expected)}")
    packed, index = _checked(c, kind, arrays, d, starts)
    values = decode_rows(c, packed, d, starts)[0]
    if not _finite(values):
        raise Rejected(Reason.NON_FINITE, "compressed update decodes to NaN or Inf")
    return Message(kind, base_round, values, index)


def _expected_names(c: Compression, kind: int) -> set[str]:
    if kind == KEYFRAME or c.scheme in ("fp16", "bf16"):
        return {HEAD, VALUES}
    return {HEAD, VALUES, SCALES} if c.scheme == "int8" else {HEAD, VALUES, INDEX}


def _finite(a: np.ndarray) -> bool:
    return bool(np.isfinite(a).all())


def _checked(
    c: Compression, kind: int, arrays: Mapping[str, np.ndarray], d: int, starts: np.ndarray
) -> tuple[Packed, np.ndarray | None]:
    kinds = np.array([kind], dtype=np.int64)
    values = arrays[VALUES]
    if kind == KEYFRAME:
        if values.dtype not in (np.float16, np.float32) or values.shape != (d,):
            raise _bad(f"keyframe is {values.dtype}{values.shape}, expected float16 or float32 ({d},)")
        return Packed(kinds, {VALUES: values[None]}), None
    if c.scheme == "fp16":
        return Packed(kinds, {VALUES: _exact(arrays, VALUES, np.float16, (d,))[None]}), None
    if c.scheme == "bf16":
        return Packed(kinds, {VALUES: _exact(arrays, VALUES, np.int16, (d,))[None]}), None
    if c.scheme == "int8":
        codes = _exact(arrays, VALUES, np.int8, (d,))
        scales = _exact(arrays, SCALES, np.float32, (len(starts),))
        if not _finite(scales) or (scales < 0).any():
            raise _bad("int8 scales must be finite and >= 0")
        if d and int(codes.min()) < -_LEVELS:
            raise _bad(f"int8 code below -{_LEVELS}")
        return Packed(kinds, {VALUES: codes[None], SCALES: scales[None]}), None
    k = c.k(d)
    index = _exact(arrays, INDEX, np.int32, (k,))
    vals = _exact(arrays, VALUES, np.float32, (k,))
    if k and (int(index[0]) < 0 or int(index[-1]) >= d or (k > 1 and not (np.diff(index) > 0).all())):
        raise _bad(f"topk indices must be strictly increasing within 0..{d - 1}")
    return Packed(kinds, {INDEX: index[None], VALUES: vals[None]}), index


# --------------------------------------------------------------------------------------------------
# the estimates a node keeps: its own (sender) and its neighbours' (receiver)


@dataclass
class OwnEstimate:
    """The sender's side: its public estimate x̂, the round of its last message and of its last keyframe.

    A fresh process starts with none, so its first message is a keyframe (nothing of the estimate
    needs to survive a restart: receivers resynchronise on that keyframe).
    """

    c: Compression
    key: int
    starts: np.ndarray
    keyframe_every: int = 10
    estimate: np.ndarray | None = None
    last_round: int | None = None
    keyframe_round: int | None = None
    force_keyframe: bool = False

    def keyframe_due(self, round_: int) -> bool:
        if not self.c.diff:
            return False
        return (
            self.force_keyframe
            or self.estimate is None
            or self.keyframe_round is None
            or round_ - self.keyframe_round >= self.keyframe_every
        )

    def pack(self, sent: np.ndarray, round_: int) -> dict[str, np.ndarray]:
        """The wire arrays for this round's message of `sent`; updates x̂ exactly as receivers will."""
        d = sent.shape[0]
        v = np.asarray(sent, dtype=np.float32)[None]
        if self.keyframe_due(round_):
            packed = keyframe_rows(v)
            self.estimate = decode_rows(self.c, packed, d, self.starts)[0]
            self.keyframe_round, self.force_keyframe = round_, False
            base = round_
        elif self.c.diff:
            assert self.estimate is not None and self.last_round is not None
            packed = encode_rows(
                self.c,
                v - self.estimate,
                keys=np.array([self.key]),
                round_=round_,
                starts=self.starts,
                kind=DIFF,
            )
            self.estimate = self.estimate + decode_rows(self.c, packed, d, self.starts)[0]
            base = self.last_round
        else:
            packed = encode_rows(
                self.c, v, keys=np.array([self.key]), round_=round_, starts=self.starts, kind=MODEL
            )
            self.estimate = decode_rows(self.c, packed, d, self.starts)[0]
            base = round_
        self.last_round = round_
        return to_wire(self.c, packed, 0, base, d)


@dataclass
class Estimates:
    """The receiver's side: each neighbour's public estimate and the round of the message it came from.

    `apply` may run in worker threads for several senders at once (one lock for the table).
    """

    c: Compression
    table: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def apply(self, sender: str, round_: int, msg: Message) -> np.ndarray:
        """Fold one checked message into `sender`'s estimate; the estimate after it (a copy to keep)."""
        if msg.kind == MODEL:
            return msg.values
        with self.lock:
            if msg.kind == KEYFRAME:
                self.table[sender] = (msg.values.copy(), round_)
                return msg.values
            held = self.table.get(sender)
            if held is None or held[1] != msg.base_round:
                have = "no estimate" if held is None else f"the estimate of round {held[1]}"
                raise Rejected(
                    Reason.OUT_OF_SYNC,
                    f"diff of round {round_} extends round {msg.base_round}, we hold {have}: "
                    "missing until its next keyframe",
                )
            estimate = held[0]
            with np.errstate(over="ignore", invalid="ignore"):
                if msg.index is not None:
                    estimate[msg.index] += msg.values[msg.index]
                else:
                    estimate += msg.values
            if not _finite(estimate if msg.index is None else estimate[msg.index]):
                del self.table[sender]
                raise Rejected(Reason.NON_FINITE, "a diff made the estimate overflow")
            self.table[sender] = (estimate, round_)
            return estimate.copy()

    def forget(self, sender: str) -> None:
        with self.lock:
            self.table.pop(sender, None)


def keyframe_estimates(v: np.ndarray) -> np.ndarray:
    """What keyframes of rows v decode to (row by row: fp16 where it fits, else float32 as is)."""
    v = np.asarray(v, dtype=np.float32)
    out = v.copy()
    if v.size:
        fits = np.abs(v).max(axis=1) <= FP16_MAX
        out[fits] = v[fits].astype(np.float16).astype(np.float32)
    return out


@dataclass
class RowGossip:
    """The simulator's side: every node's public estimate as one N x D matrix, sent all at once.

    Row i is what node i's OwnEstimate holds and, while in sync, what each neighbour's Estimates
    hold for i. A lost message leaves that receiver out of sync with that sender (`stale` edges)
    until the sender's next keyframe reaches it, as on real nodes.
    """

    c: Compression
    keys: np.ndarray  # (N,) uint64, node_key of every node
    starts: np.ndarray
    estimates: np.ndarray  # N x D
    keyframe_every: int = 10
    keyframe_round: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    stale: set[tuple[int, int]] = field(default_factory=set)  # (receiver, sender) out of sync

    @classmethod
    def start(
        cls, c: Compression, keys: np.ndarray, d: int, starts: np.ndarray, keyframe_every: int
    ) -> RowGossip:
        n = len(keys)
        return cls(
            c,
            np.asarray(keys, dtype=np.uint64),
            starts,
            np.zeros((n, d), dtype=np.float32),
            keyframe_every,
            np.full(n, -1, dtype=np.int64),
        )

    def send(self, v: np.ndarray, senders: np.ndarray, round_: int) -> np.ndarray:
        """Rows `senders` (bool mask) send their message of v this round; returns each row's kind
        (-1 for rows that sent nothing) and updates the estimates as OwnEstimate.pack does."""
        n, d = self.estimates.shape
        kinds = np.full(n, -1, dtype=np.int64)
        if not self.c.diff:
            rows = np.flatnonzero(senders)
            if len(rows):
                packed = encode_rows(
                    self.c, v[rows], keys=self.keys[rows], round_=round_, starts=self.starts, kind=MODEL
                )
                self.estimates[rows] = decode_rows(self.c, packed, d, self.starts)
                kinds[rows] = MODEL
            return kinds
        due = senders & ((self.keyframe_round < 0) | (round_ - self.keyframe_round >= self.keyframe_every))
        key_rows, diff_rows = np.flatnonzero(due), np.flatnonzero(senders & ~due)
        if len(key_rows):
            self.estimates[key_rows] = keyframe_estimates(v[key_rows])
            self.keyframe_round[key_rows] = round_
            kinds[key_rows] = KEYFRAME
        if len(diff_rows):
            est = self.estimates[diff_rows]
            packed = encode_rows(
                self.c,
                v[diff_rows] - est,
                keys=self.keys[diff_rows],
                round_=round_,
                starts=self.starts,
                kind=DIFF,
            )
            self.estimates[diff_rows] = est + decode_rows(self.c, packed, d, self.starts)
            kinds[diff_rows] = DIFF
        return kinds

    def deliver(
        self,
        rows: np.ndarray,
        cols: np.ndarray,
        lost_rows: np.ndarray,
        lost_cols: np.ndarray,
        kinds: np.ndarray,
    ) -> np.ndarray:
        """Which delivered edges (rows[k] got cols[k]'s message) a receiver can use: a keyframe puts it
        in sync, a lost message out of sync, and a diff is usable only in sync."""
        if not self.c.diff or (not self.stale and not len(lost_rows)):
            return np.ones(len(rows), dtype=bool)
        for i, j in zip(lost_rows.tolist(), lost_cols.tolist(), strict=True):
            if kinds[j] >= 0:
                self.stale.add((i, j))
        keep = np.ones(len(rows), dtype=bool)
        for k, (i, j) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            if kinds[j] == KEYFRAME:
                self.stale.discard((i, j))
            elif (i, j) in self.stale:
                keep[k] = False
        return keep
