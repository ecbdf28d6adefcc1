"""Seal one model update for several neighbours; open and authenticate a received one.

Message layout (integers little-endian):

    b"P2E1" | u32 header length | msgpack header | 64-byte Ed25519 signature | ciphertext chunks

The payload is encrypted once with a fresh 32-byte content key, in chunks (AES-256-GCM where the
CPU has it, else XChaCha20-Poly1305), each chunk's nonce = random message prefix + chunk index and
its associated data binds the index and the chunk count (no reordering, truncation or splicing).
The content key is wrapped for each recipient with an X25519 sealed box. The header carries the
update metadata, the AEAD parameters, a BLAKE2b-256 digest of every ciphertext chunk and the wrapped
keys, and only the header is signed: signing 45 MB directly costs ~6x more than digest-then-sign.

Bounded work: a certified sender chooses the chunk size and the recipient list, and each chunk
(a digest, a decryption, a pool task) and each wrapped key (msgpack objects, checks) costs the
receiver a fixed amount. So a chunk count above what MIN_CHUNK_BYTES chunks need is refused
(TOO_MANY_PARTS), more than MAX_RECIPIENTS wrapped keys is refused (OVERSIZE), and the header length
is bounded from the message size before it is unpacked (OVERSIZE), all before any per-item work.

Encryption, decryption and hashing run chunk-wise in a small shared thread pool; libsodium and
hashlib release the GIL, so two cores work at once.

Memory: a model update may be hundreds of MB, so neither side holds a second whole copy. `seal`
allocates the message once and encrypts each chunk straight into its place, reading the plaintext
chunk by chunk (from a buffer, or from a codec.Frame that copies each chunk out of the tensors, so
the encoded frame never exists whole). `open_envelope` decrypts into one plaintext buffer; with
`in_place=True` it decrypts the caller's message buffer in place instead (each chunk after its
digest and tag are checked) and closes the gaps the tags leave, so the plaintext ends up at the
front of the message's own memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import mmap
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

import msgpack
import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing

from p2pfl.errors import Reason, Rejected
from p2pfl.federation import Certificate, FederationRoot
from p2pfl.identity import Identity, signed_by

try:  # pynacl's cffi module: lets libsodium read/write our buffers in place (no copies, GIL released)
    from nacl._sodium import ffi as _ffi
    from nacl._sodium import lib as _lib
except ImportError:  # pragma: no cover - other pynacl builds: fall back to the public bindings
    _ffi = _lib = None

MAGIC = b"P2E1"
VERSION = 2  # 2: no membership epoch in the header (it was never checked; see p2pfl.round)
_PREFIX = struct.Struct("<4sI")
SIG_BYTES = 64
KEY_BYTES = 32
DIGEST_BYTES = 32
TAG_BYTES = 16
WRAPPED_KEY_BYTES = KEY_BYTES + 48  # X25519 sealed box overhead
SIGN_DOMAIN = b"p2pfl-envelope-v1\x00"
CHUNK_AAD = b"p2pfl-chunk-v1\x00"

# 1-2 MiB measured fastest: the chunk stays in cache between encrypting and hashing, and buffers stay
# under numpy's 4 MiB hugepage-madvise threshold (synchronous compaction made 4 MiB chunks ~25% slower).
CHUNK_BYTES = 2 << 20
MAX_CHUNK_BYTES = 64 << 20
# Smallest average chunk open_envelope accepts: per-chunk overhead (~tens of microseconds) stays
# small next to decrypting 64 KiB. seal's CHUNK_BYTES must not be smaller.
MIN_CHUNK_BYTES = 64 << 10
MAX_HEADER_BYTES = 4 << 20
MAX_RECIPIENTS = 1024  # a node's neighbours: topologies give a handful, a full mesh of 1,025 nodes 1,024
_MAX_ID = 64
# msgpack bytes of the header's fixed fields (two ids of _MAX_ID 4-byte characters, field names,
# numbers, nonce), of one chunk digest (bin8) and of one wrapped key (str16 id + bin8 key), at most.
_HEADER_FIXED_BYTES = 4096
_DIGEST_ENTRY_BYTES = 2 + DIGEST_BYTES
_KEY_ENTRY_BYTES = (3 + 4 * _MAX_ID) + (2 + WRAPPED_KEY_BYTES)

AES = "aes256gcm"
XCHACHA = "xchacha20poly1305"
_NONCE_BYTES = {AES: 12, XCHACHA: 24}
_INDEX_BYTES = 4  # the last 4 nonce bytes are the chunk index


def aes_available() -> bool:
    """True when libsodium can run AES-256-GCM here (it needs AES-NI / ARM crypto extensions)."""
    probe = getattr(nacl.bindings, "crypto_aead_aes256gcm_is_available", None)
    if probe is not None:
        return bool(probe())
    if _lib is not None and hasattr(_lib, "crypto_aead_aes256gcm_is_available"):
        return _lib.crypto_aead_aes256gcm_is_available() == 1
    try:
        nacl.bindings.crypto_aead_aes256gcm_encrypt(b"", None, bytes(12), bytes(32))
        return True
    except Exception:
        return False


# AES-256-GCM is ~7x faster than XChaCha20-Poly1305 with AES-NI; tests may override this.
DEFAULT_AEAD = AES if aes_available() else XCHACHA

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The shared crypto pool (2-4 workers): enough to keep two cores busy."""
    global _POOL
    if _POOL is None:
        with _POOL_LOCK:
            if _POOL is None:
                workers = min(4, max(2, os.cpu_count() or 2))
                _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="p2pfl-crypto")
    return _POOL


def _map(fn: Callable[[int], Any], count: int) -> list[Any]:
    if count == 1:
        return [fn(0)]
    return list(_pool().map(fn, range(count)))


@dataclass(frozen=True, kw_only=True)
class UpdateMeta:
    """Who sent which update when; signed as part of the envelope header."""

    sender: str
    federation: str
    round: int
    seq: int
    timestamp: float
    samples: int
    degree: int


# ---------------------------------------------------------------- AEAD primitives


def _aad(index: int, count: int) -> bytes:
    return CHUNK_AAD + struct.pack("<II", index, count)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def _encrypt_chunk(aead: str, src: memoryview, dst: memoryview, aad: bytes, nonce: bytes, key: bytes) -> None:
    """Write ciphertext + tag of one chunk into `dst` (src.nbytes + TAG_BYTES bytes)."""
    if dst.nbytes != src.nbytes + TAG_BYTES:
        raise ValueError("ciphertext buffer has the wrong size")
    if _ffi is not None:
        fn = (
            _lib.crypto_aead_aes256gcm_encrypt
            if aead == AES
            else _lib.crypto_aead_xchacha20poly1305_ietf_encrypt
        )
        clen = _ffi.new("unsigned long long *")
        rc = fn(
            _ffi.from_buffer(dst, require_writable=True),
            clen,
            _ffi.from_buffer(src),
            src.nbytes,
            aad,
            len(aad),
            _ffi.NULL,
            nonce,
            key,
        )
        if rc != 0 or clen[0] != dst.nbytes:
            raise RuntimeError(f"{aead} encryption failed")
        return
    if aead == AES:
        dst[:] = nacl.bindings.crypto_aead_aes256gcm_encrypt(bytes(src), aad, nonce, key)
    else:
        dst[:] = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(bytes(src), aad, nonce, key)


def _decrypt_chunk(aead: str, src: memoryview, dst: memoryview, aad: bytes, nonce: bytes, key: bytes) -> bool:
    """Decrypt one chunk (ciphertext + tag) into `dst` (src.nbytes - TAG_BYTES bytes; `dst` may be
    the front of `src` itself: in place); False when the tag does not verify."""
    n = src.nbytes - TAG_BYTES
    if n < 0 or dst.nbytes != n:
        return False
    if _ffi is not None:
        fn = (
            _lib.crypto_aead_aes256gcm_decrypt
            if aead == AES
            else _lib.crypto_aead_xchacha20poly1305_ietf_decrypt
        )
        mlen = _ffi.new("unsigned long long *")
        rc = fn(
            _ffi.from_buffer(dst, require_writable=True),
            mlen,
            _ffi.NULL,
            _ffi.from_buffer(src),
            src.nbytes,
            aad,
            len(aad),
            nonce,
            key,
        )
        return rc == 0 and mlen[0] == n
    try:
        if aead == AES:
            plain = nacl.bindings.crypto_aead_aes256gcm_decrypt(bytes(src), aad, nonce, key)
        else:
            plain = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(bytes(src), aad, nonce, key)
    except nacl.exceptions.CryptoError:
        return False
    dst[:] = plain
    return True


class Owned(mmap.mmap):
    """A received message that nobody else holds (the link reassembles parts into it): whoever
    opens it may overwrite it, so RoundCore.admit decrypts it in place (open_envelope in_place).

    An anonymous private mapping of its own: a page is backed only once written (a message that
    is still arriving holds what arrived, not its announced size) and goes back to the OS as soon
    as the last view of it is gone. Compares equal to any buffer with the same bytes."""

    @classmethod
    def empty(cls, size: int) -> Owned:
        """`size` bytes (at least 1), none of them backed yet; no huge pages, so a page written
        backs 4 KiB, never 2 MiB (a sender's first part cannot make us hold its announced size)."""
        out = cls(-1, size, flags=mmap.MAP_PRIVATE)
        with contextlib.suppress(AttributeError, OSError):  # Linux only
            out.madvise(mmap.MADV_NOHUGEPAGE)
        return out

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> Owned:
        out = cls.empty(memoryview(data).nbytes)
        out[:] = data
        return out

    def __eq__(self, other: object) -> bool:
        try:
            return memoryview(self) == memoryview(other)  # type: ignore[arg-type]
        except TypeError:
            return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def _digest(buf: Any) -> bytes:
    return hashlib.blake2b(buf, digest_size=DIGEST_BYTES).digest()


def _chunk_count(length: int, chunk: int) -> int:
    return max(1, -(-length // chunk))


def max_chunks(length: int) -> int:
    """The most ciphertext chunks open_envelope accepts for a payload of `length` bytes."""
    return max(1, -(-length // MIN_CHUNK_BYTES))


def max_header_bytes(total: int) -> int:
    """The longest header an honest message of `total` bytes can have (MAX_HEADER_BYTES at most)."""
    digests = max_chunks(total) * _DIGEST_ENTRY_BYTES
    return min(MAX_HEADER_BYTES, _HEADER_FIXED_BYTES + digests + MAX_RECIPIENTS * _KEY_ENTRY_BYTES)


# ---------------------------------------------------------------- seal


class ChunkSource(Protocol):
    """A plaintext too large to copy whole (codec.Frame): its length and its bytes, range by range."""

    nbytes: int

    def read_into(self, start: int, out: memoryview) -> None: ...


_SCRATCH = threading.local()  # per pool thread: one chunk of plaintext read from a ChunkSource


def _scratch(n: int) -> memoryview:
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.nbytes < n:
        buf = memoryview(bytearray(max(n, CHUNK_BYTES)))
        _SCRATCH.buf = buf
    return buf[:n]


def seal(
    payload: bytes | bytearray | memoryview | ChunkSource,
    meta: UpdateMeta,
    identity: Identity,
    recipients: Mapping[str, bytes],
) -> bytearray:
    """Encrypt `payload` once for all `recipients` (node_id -> X25519 public key) and sign the header.

    `payload` is a byte buffer or a ChunkSource (codec.frame(...)), read one chunk at a time. The
    message is allocated once and each chunk is encrypted straight into its place."""
    if meta.sender != identity.node_id:
        raise ValueError(f"meta.sender {meta.sender!r} is not this identity ({identity.node_id!r})")
    problem = _meta_problem(meta)
    if problem:
        raise ValueError(f"invalid UpdateMeta: {problem}")
    if len(recipients) > MAX_RECIPIENTS:
        raise ValueError(f"at most {MAX_RECIPIENTS} recipients")
    boxes: dict[str, nacl.public.SealedBox] = {}
    for node_id, public in recipients.items():  # validate before any work starts
        if not isinstance(node_id, str) or not 0 < len(node_id) <= _MAX_ID:
            raise ValueError(f"recipient id {node_id!r} must be a short string")
        boxes[node_id] = nacl.public.SealedBox(nacl.public.PublicKey(bytes(public)))
    aead = DEFAULT_AEAD
    source: ChunkSource | None = None
    if isinstance(payload, (bytes, bytearray, memoryview)):
        src = memoryview(payload)
        if src.ndim != 1 or src.itemsize != 1:
            src = src.cast("B")
        length = src.nbytes
    else:
        source, length = payload, payload.nbytes
    chunk = CHUNK_BYTES
    count = _chunk_count(length, chunk)
    if count > max_chunks(length):
        raise ValueError(
            f"CHUNK_BYTES {chunk} is below MIN_CHUNK_BYTES {MIN_CHUNK_BYTES}: receivers refuse it"
        )
    key = os.urandom(KEY_BYTES)
    prefix = os.urandom(_NONCE_BYTES[aead] - _INDEX_BYTES)
    fields = {
        "v": VERSION,
        "sender": meta.sender,
        "federation": meta.federation,
        "round": meta.round,
        "seq": meta.seq,
        "timestamp": float(meta.timestamp),
        "samples": meta.samples,
        "degree": meta.degree,
        "aead": aead,
        "chunk": chunk,
        "nonce": prefix,
        "length": length,
        "digests": [bytes(DIGEST_BYTES)] * count,  # placeholders of the final size
        "keys": {node_id: box.encrypt(key) for node_id, box in boxes.items()},
    }
    hlen = len(msgpack.packb(fields, use_bin_type=True))
    body_start = _PREFIX.size + hlen + SIG_BYTES
    message = bytearray(body_start + length + count * TAG_BYTES)
    out = memoryview(message)

    def work(i: int) -> bytes:
        lo, hi = i * chunk, min(length, (i + 1) * chunk)
        if source is None:
            plain = src[lo:hi]
        else:
            plain = _scratch(hi - lo)
            source.read_into(lo, plain)
        ct = out[body_start + lo + i * TAG_BYTES : body_start + hi + (i + 1) * TAG_BYTES]
        _encrypt_chunk(aead, plain, ct, _aad(i, count), _nonce(prefix, i), key)
        return _digest(ct)

    fields["digests"] = _map(work, count)
    header = msgpack.packb(fields, use_bin_type=True)
    if len(header) != hlen:  # digests are fixed-size bin fields: cannot happen
        raise RuntimeError("envelope header changed size")
    out[: _PREFIX.size] = _PREFIX.pack(MAGIC, hlen)
    out[_PREFIX.size : _PREFIX.size + hlen] = header
    out[_PREFIX.size + hlen : body_start] = identity.sign(SIGN_DOMAIN + header)
    return message


# ---------------------------------------------------------------- open


@dataclass(frozen=True)
class _Parsed:
    meta: UpdateMeta
    header: memoryview
    signature: bytes
    aead: str
    chunk: int
    prefix: bytes
    length: int
    digests: list[bytes]
    keys: dict[str, bytes]
    body: memoryview  # all ciphertext chunks
    whole: memoryview  # the message, as bytes


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _meta_problem(meta: UpdateMeta) -> str | None:
    """What is wrong with `meta`'s field types or ranges, or None."""
    if not (isinstance(meta.sender, str) and 0 < len(meta.sender) <= _MAX_ID):
        return "sender must be a short string"
    if not (isinstance(meta.federation, str) and 0 < len(meta.federation) <= _MAX_ID):
        return "federation must be a short string"
    for field in ("round", "seq", "samples", "degree"):
        value = getattr(meta, field)
        if not (_is_int(value) and 0 <= value < 1 << 63):
            return f"{field} must be a non-negative int"
    ts = meta.timestamp
    if not ((isinstance(ts, float) or _is_int(ts)) and math.isfinite(ts)):
        return "timestamp must be a finite number"
    return None


_HEADER_KEYS = frozenset(
    {
        "v",
        "sender",
        "federation",
        "round",
        "seq",
        "timestamp",
        "samples",
        "degree",
        "aead",
        "chunk",
        "nonce",
        "length",
        "digests",
        "keys",
    }
)


def _bad(detail: str) -> Rejected:
    return Rejected(Reason.MALFORMED, detail)


def _parse(message: Any) -> _Parsed:
    mv = memoryview(message)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    total = mv.nbytes
    if total < _PREFIX.size + SIG_BYTES:
        raise _bad("envelope shorter than its fixed parts")
    magic, hlen = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise _bad("envelope has the wrong magic")
    if hlen > MAX_HEADER_BYTES:
        raise _bad(f"envelope header length {hlen} exceeds {MAX_HEADER_BYTES}")
    head_end = _PREFIX.size + hlen
    body_start = head_end + SIG_BYTES
    if body_start > total:
        raise _bad("envelope truncated inside header or signature")
    limit = max_header_bytes(total)
    if hlen > limit:  # before unpacking: the header's items cost per item, the bytes alone do not
        raise Rejected(
            Reason.OVERSIZE,
            f"envelope header of {hlen} bytes; a {total}-byte message with at most {MAX_RECIPIENTS} "
            f"recipients needs at most {limit}",
        )
    header_mv = mv[_PREFIX.size : head_end]
    h = msgpack.unpackb(
        header_mv,
        raw=False,
        use_list=True,
        strict_map_key=True,
        max_ext_len=0,
        max_str_len=1 << 12,
        max_bin_len=1 << 10,
        max_map_len=8 * MAX_RECIPIENTS,  # more than MAX_RECIPIENTS is refused below, with its reason
        max_array_len=MAX_HEADER_BYTES // DIGEST_BYTES,
    )
    if not isinstance(h, dict) or set(h) != _HEADER_KEYS:
        raise _bad("envelope header has the wrong fields")
    if h["v"] != VERSION or not _is_int(h["v"]):
        raise _bad(f"unsupported envelope version {h['v']!r}")
    meta = UpdateMeta(
        sender=h["sender"],
        federation=h["federation"],
        round=h["round"],
        seq=h["seq"],
        timestamp=h["timestamp"],
        samples=h["samples"],
        degree=h["degree"],
    )
    problem = _meta_problem(meta)
    if problem:
        raise _bad(f"envelope header: {problem}")
    meta = replace(meta, timestamp=float(meta.timestamp))
    aead, chunk, prefix, length = h["aead"], h["chunk"], h["nonce"], h["length"]
    if aead not in _NONCE_BYTES:
        raise _bad(f"unknown AEAD {str(aead)[:32]!r}")
    if not (_is_int(chunk) and 0 < chunk <= MAX_CHUNK_BYTES):
        raise _bad("chunk size out of range")
    if not (isinstance(prefix, bytes) and len(prefix) == _NONCE_BYTES[aead] - _INDEX_BYTES):
        raise _bad("nonce prefix has the wrong size")
    if not (_is_int(length) and length >= 0):
        raise _bad("payload length must be a non-negative int")
    count = _chunk_count(length, chunk)
    if count > max_chunks(length):
        raise Rejected(
            Reason.TOO_MANY_PARTS,
            f"{length} bytes in {count} chunks of {chunk}; at most {max_chunks(length)} "
            f"(chunks of at least {MIN_CHUNK_BYTES} bytes)",
        )
    if total - body_start != length + count * TAG_BYTES:
        raise _bad(f"ciphertext is {total - body_start} bytes, header says {length + count * TAG_BYTES}")
    digests = h["digests"]
    if not (isinstance(digests, list) and len(digests) == count):
        raise _bad(f"expected {count} chunk digests")
    if not all(isinstance(d, bytes) and len(d) == DIGEST_BYTES for d in digests):
        raise _bad("chunk digests must be 32 bytes each")
    keys = h["keys"]
    if not isinstance(keys, dict):
        raise _bad("wrapped keys must be a map")
    if len(keys) > MAX_RECIPIENTS:
        raise Rejected(Reason.OVERSIZE, f"{len(keys)} wrapped keys; at most {MAX_RECIPIENTS} recipients")
    for node_id, wrapped in keys.items():
        if not (isinstance(node_id, str) and 0 < len(node_id) <= _MAX_ID):
            raise _bad("recipient ids must be short strings")
        if not (isinstance(wrapped, bytes) and len(wrapped) == WRAPPED_KEY_BYTES):
            raise _bad("wrapped keys must be 80 bytes each")
    return _Parsed(
        meta=meta,
        header=header_mv,
        signature=bytes(mv[head_end:body_start]),
        aead=aead,
        chunk=chunk,
        prefix=prefix,
        length=length,
        digests=digests,
        keys=keys,
        body=mv[body_start:],
        whole=mv,
    )


def open_envelope(
    message: bytes | bytearray | memoryview,
    identity: Identity,
    root: FederationRoot,
    certificates: Callable[[str], Certificate | None],
    replay: ReplayGuard,
    max_bytes: int,
    now: float | None = None,
    *,
    in_place: bool = False,
) -> tuple[UpdateMeta, bytearray | memoryview]:
    """Authenticate and decrypt one update; every refusal is a Rejected with its reason.

    Order: size -> parse -> federation -> certificate -> signature -> replay -> recipient ->
    digest -> decrypt; cheap checks first, nothing is decrypted before the sender is proven.
    Returns the plaintext in a new buffer, or with `in_place` (a writable `message`, which the
    caller gives up: its bytes are overwritten, whether or not the update is accepted) as a view
    of the front of `message` itself, so opening needs no second copy of the update.
    """
    try:
        size = memoryview(message).nbytes
    except TypeError:
        raise _bad("envelope is not a bytes-like object") from None
    if size > max_bytes:
        raise Rejected(Reason.OVERSIZE, f"envelope of {size} bytes exceeds the limit of {max_bytes}")
    try:
        p = _parse(message)
    except Rejected:
        raise
    except Exception as exc:  # any surprise while parsing peer bytes is still just malformed input
        raise _bad(f"envelope does not parse ({type(exc).__name__})") from None
    meta = p.meta
    if meta.federation != root.federation_id:
        raise Rejected(Reason.WRONG_FEDERATION, f"update for federation {meta.federation!r}")
    cert = certificates(meta.sender)
    if cert is None:
        raise Rejected(Reason.UNKNOWN_SENDER, f"no certificate for sender {meta.sender!r}")
    if cert.node_id != meta.sender:
        raise Rejected(Reason.UNCERTIFIED, f"certificate of {cert.node_id!r} offered for {meta.sender!r}")
    root.verify(cert, now=now)
    if not signed_by(cert.sign_key, SIGN_DOMAIN + bytes(p.header), p.signature):
        raise Rejected(Reason.BAD_SIGNATURE, f"header signature of {meta.sender!r} does not verify")
    replay.check(meta, now=now)
    wrapped = p.keys.get(identity.node_id)
    if wrapped is None:
        raise Rejected(Reason.NOT_RECIPIENT, f"update from {meta.sender!r} is not addressed to us")
    try:
        key = nacl.public.SealedBox(identity.box_key).decrypt(wrapped)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        raise Rejected(Reason.DECRYPT_FAILED, "content key does not unwrap with our box key") from None
    if len(key) != KEY_BYTES:
        raise Rejected(Reason.DECRYPT_FAILED, "unwrapped content key has the wrong size")
    if p.aead == AES and not aes_available():
        raise Rejected(Reason.DECRYPT_FAILED, "sender used AES-256-GCM, which this CPU cannot run")

    plaintext = _decrypt_body(p, key, in_place)
    replay.record(meta)
    return meta, plaintext


def _decrypt_body(p: _Parsed, key: bytes, in_place: bool) -> bytearray | memoryview:
    """Check every chunk's digest, then decrypt it (into a new buffer, or where it lies); Rejected
    with the first failing chunk otherwise."""
    count = len(p.digests)
    step = p.chunk + TAG_BYTES
    body = p.body
    if in_place:
        if body.readonly:
            raise ValueError("in_place needs a writable message buffer")
        out: bytearray | None = None
    else:
        out = bytearray(p.length)
    dst = memoryview(out) if out is not None else body

    def work(i: int) -> Reason | None:
        ct = body[i * step : (i + 1) * step]
        if not hmac.compare_digest(_digest(ct), p.digests[i]):
            return Reason.DIGEST_MISMATCH
        n = ct.nbytes - TAG_BYTES
        target = dst[i * p.chunk : i * p.chunk + n] if out is not None else ct[:n]
        ok = _decrypt_chunk(p.aead, ct, target, _aad(i, count), _nonce(p.prefix, i), key)
        return None if ok else Reason.DECRYPT_FAILED

    results = _map(work, count)
    for reason, what in (
        (Reason.DIGEST_MISMATCH, "does not match its digest"),
        (Reason.DECRYPT_FAILED, "fails authentication"),
    ):
        bad = [i for i, r in enumerate(results) if r is reason]
        if bad:
            raise Rejected(reason, f"ciphertext chunk {bad[0]} of {count} {what}")
    if out is not None:
        return out
    # In place: chunk i's plaintext sits at body[i * step]; move each to the message's front, in
    # order (each destination ends before the next chunk's source; overlaps are memmoves).
    front = p.whole
    base = front.nbytes - body.nbytes  # where the body starts in the message
    for i in range(count):
        n = min(p.chunk, p.length - i * p.chunk)
        src = base + i * step
        front[i * p.chunk : i * p.chunk + n] = front[src : src + n]
    return front[: p.length]


# ---------------------------------------------------------------- replay protection


class ReplayGuard:
    """Remembers the newest sequence number per sender; refuses old, repeated or far-off updates."""

    def __init__(self, max_skew_s: float = 300.0, max_senders: int = 10_000) -> None:
        self.max_skew_s = float(max_skew_s)
        self.max_senders = int(max_senders)
        self._last: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, meta: UpdateMeta, now: float | None = None) -> None:
        """Rejected(STALE) outside the freshness window, Rejected(REPLAY) unless seq is new."""
        t = time.time() if now is None else now
        skew = t - meta.timestamp
        if not abs(skew) <= self.max_skew_s:  # also catches NaN
            raise Rejected(
                Reason.STALE,
                f"update from {meta.sender!r} is {skew:.0f} s off our clock (limit {self.max_skew_s:.0f} s)",
            )
        with self._lock:
            last = self._last.get(meta.sender)
        if last is not None and meta.seq <= last:
            raise Rejected(Reason.REPLAY, f"seq {meta.seq} from {meta.sender!r} is not newer than {last}")

    def record(self, meta: UpdateMeta) -> None:
        """Note a fully verified update; the oldest sender is forgotten beyond max_senders.

        Re-checks under the lock: two copies opened concurrently both pass check(), only one records."""
        with self._lock:
            last = self._last.get(meta.sender)
            if last is not None and meta.seq <= last:
                raise Rejected(Reason.REPLAY, f"seq {meta.seq} from {meta.sender!r} is not newer than {last}")
            self._last[meta.sender] = meta.seq
            self._last.move_to_end(meta.sender)
            while len(self._last) > self.max_senders:
                self._last.popitem(last=False)

    def state(self) -> dict[str, int]:
        """Last sequence number per sender, for a checkpoint (a restarted node must not accept replays)."""
        with self._lock:
            return dict(self._last)

    def restore(self, last: Mapping[str, int]) -> None:
        with self._lock:
            self._last = OrderedDict((str(k), int(v)) for k, v in last.items())

    def last_seq(self, sender: str) -> int | None:
        with self._lock:
            return self._last.get(sender)
