"""Tensors <-> bytes: a small msgpack header plus one contiguous raw blob.

Frame layout (all integers and tensor data little-endian):

    b"P2T1" | u32 header length | msgpack header | zero padding to 8 | blob

The header is a list of [name, dtype, shape, offset, nbytes], offsets relative to the blob start.
Each tensor starts on an 8-byte boundary (zero padding between tensors), so decode can hand out
aligned, zero-copy, read-only np.frombuffer views. Packing costs one copy of the data (no per-tensor
msgpack bin fields, which cost several times more), and `frame` packs nothing at all: it describes the
frame and copies any byte range of it on demand, so a sealer can encrypt it chunk by chunk without the
frame ever existing whole in memory (`encode` is `frame(...).tobytes()`). decode trusts nothing: any inconsistency is
Rejected(MALFORMED), and the layout must be exactly the canonical one encode produces.

Bounded work: decoding costs a few microseconds per tensor (msgpack objects, checks, one numpy view)
whatever the tensor's size, so a header of 100,000 empty tensors cost ~0.9 s. decode reads the
declared tensor count from the header's first bytes and refuses, before unpacking anything, a count
above `max_tensors` (MAX_TENSORS, far above any real model's few hundred) or other than the local
model's (`expected_tensors`), and a header longer than that many entries can be.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Mapping

import msgpack
import numpy as np

from p2pfl.errors import Reason, Rejected

__all__ = [
    "ALLOWED_DTYPES",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "MAX_NAME_CHARS",
    "MAX_NDIM",
    "MAX_TENSORS",
    "check_against",
    "decode",
    "encode",
    "frame",
    "spec_of",
]

MAGIC = b"P2T1"
_PREFIX = struct.Struct("<4sI")
ALIGN = 8
MAX_TENSORS = 4096  # a ResNet-50 has ~320 tensors, a large transformer a few thousand at most
MAX_HEADER_BYTES = 16 << 20
MAX_NDIM = 32
MAX_NAME_CHARS = 1024
# Bytes one header entry [name, dtype, shape, offset, nbytes] can take in msgpack, at least (a
# fixarray, an empty name, "int8", an empty shape, two fixints) and at most (32-bit container
# headers, a name of MAX_NAME_CHARS 4-byte characters, "float16", MAX_NDIM uint64s, two uint64s).
_MIN_ENTRY_BYTES = 1 + 1 + 5 + 1 + 1 + 1
_MAX_ENTRY_BYTES = 5 + (5 + 4 * MAX_NAME_CHARS) + (5 + 7) + (5 + 9 * MAX_NDIM) + 9 + 9

ALLOWED_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
}
_FINITE_BLOCK = 1 << 16  # elements per np.isfinite block: keeps the temporary in cache


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def _dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {name} is not allowed on the wire (allowed: {', '.join(ALLOWED_DTYPES)})")
    return name


class Frame:
    """An encoded frame that is not written out: its length and its bytes, range by range.

    `pieces` are the frame's consecutive buffers (prefix + header, zero padding, each tensor's bytes),
    `starts` their offsets; the tensors are referenced, not copied, so they must not change while
    the frame is in use."""

    def __init__(self, pieces: list[memoryview]) -> None:
        self.pieces = pieces
        self.starts: list[int] = []
        offset = 0
        for piece in pieces:
            self.starts.append(offset)
            offset += piece.nbytes
        self.nbytes = offset

    def read_into(self, start: int, out: memoryview) -> None:
        """Copy frame bytes [start, start + len(out)) into `out` (a writable byte buffer)."""
        end = start + out.nbytes
        if start < 0 or end > self.nbytes:
            raise ValueError(f"bytes {start}..{end} lie outside the {self.nbytes}-byte frame")
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        pos = start
        while pos < end:
            piece, first = self.pieces[i], self.starts[i]
            take = min(end, first + piece.nbytes) - pos
            if take > 0:
                out[pos - start : pos - start + take] = piece[pos - first : pos - first + take]
                pos += take
            i += 1

    def tobytes(self) -> bytes:
        # One allocation, one copy of every tensor: bytes.join accepts any contiguous buffer.
        return b"".join(self.pieces)


def encode(params: Mapping[str, np.ndarray], *, max_tensors: int = MAX_TENSORS) -> bytes:
    """Pack named tensors into one frame with a single copy of the data.

    Refuses more than `max_tensors` tensors: receivers refuse them too (see decode)."""
    return frame(params, max_tensors=max_tensors).tobytes()


def frame(params: Mapping[str, np.ndarray], *, max_tensors: int = MAX_TENSORS) -> Frame:
    """The frame `encode` would write, without writing it (see Frame); same checks as encode."""
    if len(params) > max_tensors:
        raise ValueError(f"{len(params)} tensors; at most {max_tensors} per frame")
    arrays: list[np.ndarray] = []
    entries: list[list] = []
    offset = 0
    for name, value in params.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}")
        if len(name) > MAX_NAME_CHARS:
            raise ValueError(f"tensor name longer than {MAX_NAME_CHARS} characters: {name[:40]!r}...")
        arr = np.asarray(value)
        dname = _dtype_name(arr.dtype)
        wire = ALLOWED_DTYPES[dname]
        if arr.dtype != wire or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=wire)  # byte swap / compaction only when needed
        entries.append([name, dname, list(arr.shape), offset, arr.nbytes])
        arrays.append(arr)
        offset = _align(offset + arr.nbytes)
    header = msgpack.packb(entries, use_bin_type=True)
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError("codec header too large")
    head_end = _PREFIX.size + len(header)
    parts: list[memoryview] = [memoryview(_PREFIX.pack(MAGIC, len(header)) + header)]
    pad = _align(head_end) - head_end
    if pad:
        parts.append(memoryview(bytes(pad)))
    for arr, entry in zip(arrays, entries, strict=True):
        nbytes = entry[4]
        if nbytes:
            parts.append(memoryview(arr.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
        tail = _align(nbytes) - nbytes
        if tail:
            parts.append(memoryview(bytes(tail)))
    return Frame(parts)


def _bad(detail: str) -> Rejected:
    return Rejected(Reason.MALFORMED, detail)


def decode(
    buf: bytes | bytearray | memoryview,
    *,
    max_tensors: int = MAX_TENSORS,
    expected_tensors: int | None = None,
) -> dict[str, np.ndarray]:
    """Unpack a frame into read-only zero-copy views; Rejected(MALFORMED) on anything malformed.

    Before any per-tensor work: more than `max_tensors` tensors is Rejected(TOO_MANY_TENSORS), and
    so is more than `expected_tensors` (the local model's count, when the caller knows it); fewer
    is Rejected(SHAPE_MISMATCH), which check_against would say after decoding them all.
    """
    try:
        return _decode(buf, max_tensors, expected_tensors)
    except Rejected:
        raise
    except Exception as exc:  # any surprise while parsing peer bytes is still just malformed input
        raise _bad(f"codec frame does not parse ({type(exc).__name__})") from None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _declared_count(mv: memoryview, start: int, end: int) -> tuple[int, int]:
    """(entries, bytes of the array header) from the msgpack array header at mv[start:end]: O(1)."""
    if start >= end:
        raise _bad("codec header is empty")
    first = mv[start]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F, 1
    if first == 0xDC and end - start >= 3:
        return int.from_bytes(mv[start + 1 : start + 3], "big"), 3
    if first == 0xDD and end - start >= 5:
        return int.from_bytes(mv[start + 1 : start + 5], "big"), 5
    raise _bad("codec header is not a list")


def _check_count(n: int, body: int, max_tensors: int, expected: int | None) -> None:
    """Refuse a declared tensor count from its value and the header length alone."""
    if n * _MIN_ENTRY_BYTES > body:
        raise _bad(f"codec header declares {n} tensors in {body} bytes")
    if body > n * _MAX_ENTRY_BYTES:
        raise _bad(f"codec header of {body} bytes is longer than {n} tensor entries can be")
    if n > max_tensors:
        raise Rejected(Reason.TOO_MANY_TENSORS, f"{n} tensors in one frame; at most {max_tensors}")
    if expected is not None and n > expected:
        raise Rejected(Reason.TOO_MANY_TENSORS, f"{n} tensors; the local model has {expected}")
    if expected is not None and n < expected:
        raise Rejected(Reason.SHAPE_MISMATCH, f"{n} tensors; the local model has {expected}")


def _decode(
    buf: bytes | bytearray | memoryview, max_tensors: int, expected: int | None
) -> dict[str, np.ndarray]:
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    mv = mv.toreadonly()  # numpy views of it are read-only, whatever the caller passed
    total = mv.nbytes
    if total < _PREFIX.size:
        raise _bad("codec frame shorter than its prefix")
    magic, hlen = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise _bad("codec frame has the wrong magic")
    if hlen > MAX_HEADER_BYTES:
        raise _bad(f"codec header length {hlen} exceeds {MAX_HEADER_BYTES}")
    head_end = _PREFIX.size + hlen
    if head_end > total:
        raise _bad("codec frame truncated inside the header")
    blob_start = _align(head_end)
    if blob_start > total:
        raise _bad("codec frame truncated before the blob")
    if any(mv[head_end:blob_start]):
        raise _bad("codec header padding is not zero")
    n, array_header = _declared_count(mv, _PREFIX.size, head_end)
    _check_count(n, hlen - array_header, max_tensors, expected)
    header = msgpack.unpackb(
        mv[_PREFIX.size : head_end],
        raw=False,
        use_list=True,
        strict_map_key=True,
        max_array_len=max(n, MAX_NDIM + 1, 5),
        max_map_len=0,
        max_ext_len=0,
        max_str_len=MAX_NAME_CHARS * 4,
        max_bin_len=0,
    )
    if not isinstance(header, list) or len(header) != n:
        raise _bad("codec header is not a list")
    blob_len = total - blob_start
    out: dict[str, np.ndarray] = {}
    expected_offset = 0
    for i, entry in enumerate(header):
        if not (isinstance(entry, list) and len(entry) == 5):
            raise _bad(f"tensor entry {i} is not [name, dtype, shape, offset, nbytes]")
        name, dname, shape, offset, nbytes = entry
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            raise _bad(f"tensor entry {i}: name must be a string of at most {MAX_NAME_CHARS} chars")
        if name in out:
            raise _bad(f"tensor {name[:80]!r} appears twice")
        if not isinstance(dname, str) or dname not in ALLOWED_DTYPES:
            raise _bad(f"tensor {name[:80]!r}: dtype {str(dname)[:20]!r} is not allowed")
        if not (
            isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_is_int(d) and d >= 0 for d in shape)
        ):
            raise _bad(f"tensor {name[:80]!r}: shape must be a list of at most {MAX_NDIM} non-negative ints")
        if not (_is_int(offset) and _is_int(nbytes)):
            raise _bad(f"tensor {name[:80]!r}: offset and nbytes must be ints")
        dtype = ALLOWED_DTYPES[dname]
        count = 1
        for d in shape:
            count *= d
        if count * dtype.itemsize != nbytes:
            raise _bad(f"tensor {name[:80]!r}: shape {shape[:8]} x {dname} != {nbytes} bytes")
        if offset != expected_offset:
            # The canonical layout rules out overlaps, gaps and misalignment in one check.
            raise _bad(f"tensor {name[:80]!r}: offset {offset} is not the expected {expected_offset}")
        if offset + nbytes > blob_len:
            raise _bad(f"tensor {name[:80]!r}: bytes {offset}..{offset + nbytes} lie outside the blob")
        # np.ndarray over the read-only view: a zero-copy, read-only, aligned view (cheaper than
        # np.frombuffer + reshape + clearing the writeable flag, which mattered per tensor).
        out[name] = np.ndarray(tuple(shape), dtype, mv, blob_start + offset)
        expected_offset = _align(offset + nbytes)
    if expected_offset != blob_len:
        raise _bad(f"codec blob is {blob_len} bytes, header accounts for {expected_offset}")
    return out


def spec_of(params: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Names -> (shape, dtype): what check_against compares incoming tensors with."""
    return {name: (tuple(int(d) for d in np.shape(a)), np.asarray(a).dtype) for name, a in params.items()}


def _all_finite(arr: np.ndarray) -> bool:
    flat = arr.reshape(-1)
    n = flat.size
    if n <= _FINITE_BLOCK:
        return bool(np.isfinite(flat).all())
    scratch = np.empty(_FINITE_BLOCK, dtype=bool)
    for start in range(0, n, _FINITE_BLOCK):
        block = flat[start : start + _FINITE_BLOCK]
        mask = scratch[: block.size]
        np.isfinite(block, out=mask)
        if not mask.all():
            return False
    return True


def check_against(
    params: Mapping[str, np.ndarray], spec: Mapping[str, tuple[tuple[int, ...], np.dtype]]
) -> None:
    """Refuse tensors that do not fit the local model: names/shapes, dtypes, then NaN/Inf."""
    if set(params) != set(spec):
        missing = sorted(set(spec) - set(params))
        extra = sorted(set(params) - set(spec))
        raise Rejected(
            Reason.SHAPE_MISMATCH, f"tensor names differ: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, (shape, dtype) in spec.items():
        arr = params[name]
        if tuple(arr.shape) != tuple(shape):
            raise Rejected(
                Reason.SHAPE_MISMATCH, f"{name}: shape {tuple(arr.shape)} != expected {tuple(shape)}"
            )
        if np.dtype(arr.dtype) != np.dtype(dtype):
            raise Rejected(Reason.DTYPE_MISMATCH, f"{name}: dtype {arr.dtype} != expected {np.dtype(dtype)}")
    for name, arr in params.items():
        if arr.dtype.kind == "f" and not _all_finite(np.asarray(arr)):
            raise Rejected(Reason.NON_FINITE, f"{name}: contains NaN or Inf")
