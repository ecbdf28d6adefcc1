"""Framing: one sealed message is cut into numbered parts, and rebuilt from them on the other side.

Why parts: no single MQTT packet is huge, and a receiver can bound what it buffers. Every part
carries a fixed header, so each part is checked on its own before anything is kept.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from p2pfl.errors import Reason, Rejected

DEFAULT_CHUNK_BYTES = 4 << 20
# Part header: magic, 16-byte message id, u32 index, u32 count, u64 total length (big endian).
PART_MAGIC = b"P2U1"
_PART = struct.Struct(">4s16sIIQ")
PART_HEADER_BYTES = _PART.size
MAX_PARTS = 1 << 16  # bounds per-message bookkeeping even for tiny parts
MESSAGE_ID_BYTES = 16


def split_message(
    message: bytes | bytearray | memoryview,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    message_id: bytes | None = None,
) -> list[bytes]:
    """Cut one sealed message into parts of at most `chunk_bytes` payload, each with a part header.

    Parts are near-equal in size (count = ceil(total / chunk), size = ceil(total / count)), so a
    receiver can check every part's length from (count, total) alone.
    """
    total = len(message)
    if total == 0:
        raise ValueError("cannot publish an empty message")
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    count = -(-total // chunk_bytes)
    if count > MAX_PARTS:
        raise ValueError(f"{total} bytes in parts of {chunk_bytes} exceeds {MAX_PARTS} parts")
    size = -(-total // count)
    mid = message_id if message_id is not None else os.urandom(MESSAGE_ID_BYTES)
    if len(mid) != MESSAGE_ID_BYTES:
        raise ValueError(f"message_id must be {MESSAGE_ID_BYTES} bytes")
    view = memoryview(message).cast("B")
    parts = []
    for index in range(count):
        header = _PART.pack(PART_MAGIC, mid, index, count, total)
        parts.append(b"".join((header, view[index * size : min(total, (index + 1) * size)])))
    return parts


@dataclass(frozen=True)
class _Header:
    mid: bytes
    index: int
    count: int
    total: int


@dataclass
class _Partial:
    count: int
    total: int
    parts: dict[int, memoryview] = field(default_factory=dict)


class Reassembler:
    """Rebuilds whole messages from update parts, per publisher, with strict bounds.

    Holds at most `max_pending` incomplete messages per publisher (oldest dropped) and at most
    `max_publishers` publishers (least recently active dropped); remembers the last few completed
    message ids so duplicate deliveries (retained + live) do not start a new message.
    """

    def __init__(
        self, max_message_bytes: int, *, max_pending: int = 2, max_publishers: int = 8, remember: int = 4
    ) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        self.max_message_bytes = max_message_bytes
        self.max_pending = max(1, max_pending)
        self.max_publishers = max(1, max_publishers)
        self._pending: OrderedDict[str, OrderedDict[bytes, _Partial]] = OrderedDict()
        self._done: OrderedDict[str, deque[bytes]] = OrderedDict()
        self._remember = max(1, remember)

    def add(
        self, publisher: str, part: bytes | bytearray | memoryview, index: int | None = None
    ) -> bytes | None:
        """Take one part; return the whole message once complete, else None. Raises Rejected."""
        view = memoryview(part).cast("B")
        header = self._check(view, index)
        body = view[PART_HEADER_BYTES:]
        done = self._done.get(publisher)
        if done is not None and header.mid in done:
            return None  # duplicate delivery of a message already handed out
        if header.count == 1:
            messages = self._pending.get(publisher)
            if messages is not None:
                messages.pop(header.mid, None)
            self._mark_done(publisher, header.mid)
            return bytes(body)
        return self._collect(publisher, header, body)

    def _check(self, view: memoryview, index: int | None) -> _Header:
        """Validate one part's header and length against itself, the topic index and our bounds."""
        if len(view) < PART_HEADER_BYTES:
            raise Rejected(Reason.MALFORMED, f"update part of {len(view)} bytes is shorter than its header")
        magic, mid, idx, count, total = _PART.unpack_from(view)
        if magic != PART_MAGIC:
            raise Rejected(Reason.MALFORMED, "update part has a bad magic")
        if index is not None and index != idx:
            raise Rejected(Reason.MALFORMED, f"part index {idx} does not match its topic index {index}")
        if total > self.max_message_bytes:
            raise Rejected(Reason.OVERSIZE, f"message of {total} bytes exceeds {self.max_message_bytes}")
        if total == 0 or count == 0 or count > MAX_PARTS or count > total or idx >= count:
            raise Rejected(
                Reason.MALFORMED, f"bad part numbering (index {idx}, count {count}, total {total})"
            )
        size = -(-total // count)
        last = total - (count - 1) * size
        if last <= 0:
            raise Rejected(Reason.MALFORMED, f"count {count} inconsistent with total {total}")
        expected = size if idx < count - 1 else last
        body_len = len(view) - PART_HEADER_BYTES
        if body_len != expected:
            raise Rejected(Reason.MALFORMED, f"part {idx}/{count} has {body_len} bytes, expected {expected}")
        return _Header(mid, idx, count, total)

    def _collect(self, publisher: str, header: _Header, body: memoryview) -> bytes | None:
        """Keep one part of a multi-part message; return the message once all parts are in."""
        messages = self._pending_for(publisher)
        partial = messages.get(header.mid)
        if partial is None:
            partial = _Partial(header.count, header.total)
            messages[header.mid] = partial
            while len(messages) > self.max_pending:
                messages.popitem(last=False)
        else:
            if partial.count != header.count or partial.total != header.total:
                raise Rejected(Reason.MALFORMED, "parts of one message disagree on count or length")
            messages.move_to_end(header.mid)
        partial.parts[header.index] = body
        if len(partial.parts) < header.count:
            return None
        del messages[header.mid]
        if not messages:
            del self._pending[publisher]
        self._mark_done(publisher, header.mid)
        parts = partial.parts
        return b"".join([parts[i] for i in range(header.count)])

    def _pending_for(self, publisher: str) -> OrderedDict[bytes, _Partial]:
        """This publisher's incomplete messages, marked most recently active (evicting the least)."""
        messages = self._pending.get(publisher)
        if messages is not None:
            self._pending.move_to_end(publisher)
            return messages
        messages = OrderedDict()
        self._pending[publisher] = messages
        while len(self._pending) > self.max_publishers:
            old, _ = self._pending.popitem(last=False)
            self._done.pop(old, None)
        return messages

    def _mark_done(self, publisher: str, mid: bytes) -> None:
        done = self._done.get(publisher)
        if done is None:
            done = deque(maxlen=self._remember)
            self._done[publisher] = done
            while len(self._done) > self.max_publishers:
                self._done.popitem(last=False)
        else:
            self._done.move_to_end(publisher)
        done.append(mid)

    def pending(self, publisher: str | None = None) -> int:
        """Number of incomplete messages held (for one publisher, or in all)."""
        if publisher is not None:
            return len(self._pending.get(publisher, ()))
        return sum(len(m) for m in self._pending.values())

    def pending_bytes(self) -> int:
        return sum(len(v) for m in self._pending.values() for p in m.values() for v in p.parts.values())

    def drop_incomplete(self) -> None:
        """Drop held parts but remember completed ids, so a replayed retained message is not re-emitted."""
        self._pending.clear()
