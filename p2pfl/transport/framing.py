"""Framing: one sealed message is cut into numbered parts, and rebuilt from them on the other side.

Why parts: no single MQTT packet is huge, and a receiver can bound what it buffers. Every part
carries a fixed header, so each part is checked on its own before anything is kept.

Bounded work per message: every part costs the receiver a fixed amount (an MQTT packet, a topic, a
header) whatever its size, so the number of parts a message may have is derived from its size
(`max_parts`: parts of at least MIN_PART_BYTES on average, and never more than MAX_PARTS). The
header of any part, the first one included, says (count, total), so a message cut too finely is
refused before anything of it is buffered. Each publisher also has a byte budget per time window
(a token bucket), and a cap on the bytes it may have buffered, so one neighbour cannot make the
receiver do or hold more than a few updates' worth of work without being refused.

Memory (models of hundreds of MB): neither side copies a message. A sender's parts are views of
the sealed message (`part_views`; the broker writes each part's header and body), and a receiver
writes each part straight into its place in one buffer of the message's size (envelope.Owned),
which it then hands on to be decrypted in place.
"""

from __future__ import annotations

import os
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pfl.envelope import Owned
from p2pfl.errors import Reason, Rejected

DEFAULT_CHUNK_BYTES = 4 << 20
# Part header: magic, 16-byte message id, u32 index, u32 count, u64 total length (big endian).
PART_MAGIC = b"P2U1"
_PART = struct.Struct(">4s16sIIQ")
PART_HEADER_BYTES = _PART.size
MAX_PARTS = 1 << 16  # bounds per-message bookkeeping even for tiny parts
MESSAGE_ID_BYTES = 16
# Smallest average part a receiver accepts. Equal to outbox.MIN_CHUNK_BYTES (the smallest chunk a
# node may be configured to send; not imported: outbox imports this module), so no honest sender
# is refused.
MIN_PART_BYTES = 1024
# Per-publisher byte budget: a token bucket holding BUDGET_UPDATES max-size messages (at least
# MIN_BUDGET_BYTES), refilled over BUDGET_WINDOW_S. An honest neighbour sends one update per round,
# delivered once or twice (retained + live) and again after a reconnect; the floor keeps small
# `max_message_bytes` settings from throttling fast rounds (0.8 MB updates every 0.09 s measured).
BUDGET_UPDATES = 4
MIN_BUDGET_BYTES = 256 << 20
BUDGET_WINDOW_S = 10.0


def max_parts(total: int) -> int:
    """The most parts a receiver accepts for a message of `total` bytes (at least 1)."""
    return min(MAX_PARTS, max(1, -(-total // MIN_PART_BYTES)))


class PartView:
    """One part as its header and a view of the message's bytes, so the parts of a message share
    its memory instead of copying it; the broker writes the two pieces (amqtt_patches), and
    bytes(part) is the part as one buffer. The message must not change while its parts are out."""

    __slots__ = ("body", "header")

    def __init__(self, header: bytes, body: memoryview) -> None:
        self.header = header
        self.body = body

    def __len__(self) -> int:
        return len(self.header) + self.body.nbytes

    def __bytes__(self) -> bytes:
        return b"".join((self.header, self.body))


def split_message(
    message: bytes | bytearray | memoryview,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    message_id: bytes | None = None,
) -> list[bytes]:
    """Cut one sealed message into parts of at most `chunk_bytes` payload, each with a part header.

    Parts are near-equal in size (count = ceil(total / chunk), size = ceil(total / count)), so a
    receiver can check every part's length from (count, total) alone. Refuses (ValueError) to cut
    more finely than a receiver accepts (`max_parts`), so a sender never publishes refused parts.
    """
    return [bytes(part) for part in part_views(message, chunk_bytes, message_id)]


def part_views(
    message: bytes | bytearray | memoryview,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    message_id: bytes | None = None,
) -> list[PartView]:
    """split_message's parts as PartViews of `message` (no copy of its bytes)."""
    total = len(message)
    if total == 0:
        raise ValueError("cannot publish an empty message")
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    count = -(-total // chunk_bytes)
    allowed = max_parts(total)
    if count > allowed:
        raise ValueError(
            f"{total} bytes in parts of {chunk_bytes} make {count} parts; receivers accept at most "
            f"{allowed} (parts of at least {MIN_PART_BYTES} bytes, at most {MAX_PARTS} parts)"
        )
    size = -(-total // count)
    mid = message_id if message_id is not None else os.urandom(MESSAGE_ID_BYTES)
    if len(mid) != MESSAGE_ID_BYTES:
        raise ValueError(f"message_id must be {MESSAGE_ID_BYTES} bytes")
    view = memoryview(message).cast("B")
    return [
        PartView(
            _PART.pack(PART_MAGIC, mid, index, count, total),
            view[index * size : min(total, (index + 1) * size)],
        )
        for index in range(count)
    ]


@dataclass
class _Partial:
    """A message still arriving: each part is copied into its place in `buffer` as it comes, so
    no part is kept and nothing is joined; only the pages written so far are backed."""

    count: int
    total: int
    buffer: Owned
    got: set[int] = field(default_factory=set)  # part indices written
    held: int = 0  # body bytes written


@dataclass
class _Publisher:
    """What the reassembler keeps for one publisher: incomplete messages and recent message ids."""

    messages: OrderedDict[bytes, _Partial]
    done: deque[bytes]  # completed: later deliveries (retained + live) are ignored
    refused: deque[bytes]  # refused as a whole: its other parts are dropped without another report
    held: int = 0  # body bytes buffered over all of `messages`


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class Reassembler:
    """Rebuilds whole messages from update parts, per publisher, with strict bounds.

    Holds at most `max_pending` incomplete messages and `max_buffered_bytes` of parts per publisher
    (oldest messages dropped) and at most `max_publishers` publishers (least recently active
    dropped); remembers the last few completed message ids so duplicate deliveries (retained + live)
    do not start a new message, and the last few refused ones so their remaining parts cost no
    further report. Each publisher may send at most `max_bytes_per_window` bytes per `window_s`
    (token bucket; every part counts as at least MIN_PART_BYTES); beyond that its parts are refused
    as NEIGHBOUR_BUDGET, and other publishers are not affected.

    Memory: each incomplete message is one mapping of its announced size (envelope.Owned) whose
    pages are backed only as parts are written, so what it holds is about its parts' bytes, as
    counted above: a part of b bytes backs at most b + 2 pages (4 KiB each, huge pages off), and
    parts are at least MIN_PART_BYTES and total / MAX_PARTS on average.
    """

    def __init__(
        self,
        max_message_bytes: int,
        *,
        max_pending: int = 2,
        max_publishers: int = 8,
        remember: int = 4,
        max_buffered_bytes: int | None = None,
        max_bytes_per_window: int | None = None,
        window_s: float = BUDGET_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        self.max_message_bytes = max_message_bytes
        self.max_pending = max(1, max_pending)
        self.max_publishers = max(1, max_publishers)
        self.max_buffered_bytes = max_message_bytes if max_buffered_bytes is None else max_buffered_bytes
        if self.max_buffered_bytes < max_message_bytes:
            raise ValueError("max_buffered_bytes must hold at least one message of max_message_bytes")
        if max_bytes_per_window is None:
            max_bytes_per_window = max(BUDGET_UPDATES * max_message_bytes, MIN_BUDGET_BYTES)
        if max_bytes_per_window < max_message_bytes:
            raise ValueError("max_bytes_per_window must allow at least one message of max_message_bytes")
        if not window_s > 0:
            raise ValueError("window_s must be positive")
        self.max_bytes_per_window = max_bytes_per_window
        self.window_s = float(window_s)
        self._cap = float(max_bytes_per_window)
        self._rate = max_bytes_per_window / self.window_s  # bytes per second refilled
        self._clock = clock
        self._remember = max(1, remember)
        self._publishers: OrderedDict[str, _Publisher] = OrderedDict()
        # Budgets outlive reassembly state (a reconnect or an evicted publisher must not refill them);
        # a full bucket is forgotten first, as forgetting it changes nothing.
        self._budgets: OrderedDict[str, _Bucket] = OrderedDict()
        self._max_budgets = 4 * self.max_publishers

    def add(
        self, publisher: str, part: bytes | bytearray | memoryview, index: int | None = None
    ) -> Owned | None:
        """Take one part; return the whole message once complete, else None. Raises Rejected.

        O(1) per part: the header is checked against itself, the topic index, our size bounds and
        the publisher's budget before anything is kept, then the body is copied into its place in
        the message's own buffer (envelope.Owned, returned whole), so a message is held once.
        """
        # bytes (what the link hands in) are read in place: this path runs once per received packet
        view = part if isinstance(part, bytes) else memoryview(part).cast("B")
        size = len(view)
        if size < PART_HEADER_BYTES:
            raise Rejected(Reason.MALFORMED, f"update part of {size} bytes is shorter than its header")
        magic, mid, idx, count, total = _PART.unpack_from(view)
        if magic != PART_MAGIC:
            raise Rejected(Reason.MALFORMED, "update part has a bad magic")
        charge = size if size > MIN_PART_BYTES else MIN_PART_BYTES
        state = self._publishers.get(publisher)
        if state is not None and (mid in state.done or mid in state.refused):
            # A message already handed out, or already refused and reported: dropped, but its bytes
            # still count against the budget, so flooding a refused message delays the next one.
            self._spend(publisher, charge, quiet=True)
            return None
        try:
            self._spend(publisher, charge)
            self._check_message(count, total)
        except Rejected:
            self._refuse(publisher, mid)
            raise
        self._check_part(size, idx, count, total, index)
        body = memoryview(view)[PART_HEADER_BYTES:]
        if count == 1:
            if state is not None:
                self._drop(state, mid)
            self._mark_done(publisher, mid)
            return Owned.of(body)
        return self._collect(publisher, mid, idx, count, total, body)

    # -- checks ------------------------------------------------------------------------------------

    def _check_message(self, count: int, total: int) -> None:
        """Refusals that follow from (count, total) alone, so they hold for every part of a message."""
        if total == 0 or count == 0 or count > total:
            raise Rejected(Reason.MALFORMED, f"bad part numbering (count {count}, total {total})")
        if total > self.max_message_bytes:
            raise Rejected(Reason.OVERSIZE, f"message of {total} bytes exceeds {self.max_message_bytes}")
        allowed = max_parts(total)
        if count > allowed:
            raise Rejected(
                Reason.TOO_MANY_PARTS,
                f"message of {total} bytes in {count} parts; at most {allowed} "
                f"(parts of at least {MIN_PART_BYTES} bytes, at most {MAX_PARTS} parts)",
            )
        size = -(-total // count)
        if total - (count - 1) * size <= 0:
            raise Rejected(Reason.MALFORMED, f"count {count} inconsistent with total {total}")

    @staticmethod
    def _check_part(size: int, idx: int, count: int, total: int, index: int | None) -> None:
        """Refusals of this one part: its index (against the topic's) and its length."""
        if index is not None and index != idx:
            raise Rejected(Reason.MALFORMED, f"part index {idx} does not match its topic index {index}")
        if idx >= count:
            raise Rejected(Reason.MALFORMED, f"bad part numbering (index {idx}, count {count})")
        even = -(-total // count)
        expected = even if idx < count - 1 else total - (count - 1) * even
        body_len = size - PART_HEADER_BYTES
        if body_len != expected:
            raise Rejected(Reason.MALFORMED, f"part {idx}/{count} has {body_len} bytes, expected {expected}")

    def _spend(self, publisher: str, charge: int, quiet: bool = False) -> None:
        """Take `charge` bytes from the publisher's token bucket, or refuse as NEIGHBOUR_BUDGET.

        `quiet`: for parts dropped anyway; take what is left, never refuse."""
        now = self._clock()
        cap = self.max_bytes_per_window
        bucket = self._budgets.get(publisher)
        if bucket is not None:
            self._refill(bucket, now)
        else:
            self._forget_full_budgets(now)
            if len(self._budgets) >= self._max_budgets:
                if quiet:
                    return
                raise Rejected(
                    Reason.NEIGHBOUR_BUDGET, f"{len(self._budgets)} other publishers are over their budget"
                )
            bucket = _Bucket(float(cap), now)
            self._budgets[publisher] = bucket
        if quiet:
            bucket.tokens = bucket.tokens - charge if bucket.tokens > charge else 0.0
            return
        if charge > bucket.tokens:
            raise Rejected(
                Reason.NEIGHBOUR_BUDGET,
                f"more than {cap} bytes within {self.window_s:g} s (part of {charge} bytes, "
                f"{int(bucket.tokens)} left)",
            )
        bucket.tokens -= charge

    def _refill(self, bucket: _Bucket, now: float) -> None:
        if now > bucket.stamp:
            tokens = bucket.tokens + (now - bucket.stamp) * self._rate
            bucket.tokens = tokens if tokens < self._cap else self._cap
            bucket.stamp = now

    def _forget_full_budgets(self, now: float) -> None:
        """Make room for a new publisher's bucket by forgetting buckets that have refilled."""
        if len(self._budgets) < self._max_budgets:
            return
        for name in list(self._budgets):
            bucket = self._budgets[name]
            self._refill(bucket, now)
            if bucket.tokens >= self.max_bytes_per_window:
                del self._budgets[name]
                return

    def budget_left(self, publisher: str) -> int:
        """Bytes the publisher may still send now (the full budget for one not seen yet)."""
        bucket = self._budgets.get(publisher)
        if bucket is None:
            return self.max_bytes_per_window
        self._refill(bucket, self._clock())
        return int(bucket.tokens)

    # -- buffering ---------------------------------------------------------------------------------

    def _collect(
        self, publisher: str, mid: bytes, idx: int, count: int, total: int, body: memoryview
    ) -> Owned | None:
        """Keep one part of a multi-part message; return the message once all parts are in."""
        state = self._state(publisher)
        messages = state.messages
        partial = messages.get(mid)
        if partial is None:
            try:
                buffer = Owned.empty(total)
            except (OSError, ValueError, OverflowError) as exc:  # the OS will not map that much now
                self._refuse(publisher, mid)
                raise Rejected(
                    Reason.OVERSIZE, f"cannot reserve {total} bytes for a message ({exc})"
                ) from None
            partial = _Partial(count, total, buffer)
            messages[mid] = partial
            while len(messages) > self.max_pending:
                self._drop(state, next(iter(messages)))
        else:
            if partial.count != count or partial.total != total:
                raise Rejected(Reason.MALFORMED, "parts of one message disagree on count or length")
            messages.move_to_end(mid)
        if idx in partial.got:
            return None  # a duplicate part
        start = idx * -(-total // count)  # parts are near-equal: see split_message
        partial.buffer[start : start + len(body)] = body
        partial.got.add(idx)
        partial.held += len(body)
        state.held += len(body)
        # Older incomplete messages make room; this one alone always fits (total <= the bound).
        while state.held > self.max_buffered_bytes and len(messages) > 1:
            self._drop(state, next(iter(messages)))
        if len(partial.got) < count:
            return None
        self._drop(state, mid)
        self._mark_done(publisher, mid)
        return partial.buffer

    def _state(self, publisher: str) -> _Publisher:
        """This publisher's state, marked most recently active (evicting the least)."""
        state = self._publishers.get(publisher)
        if state is not None:
            self._publishers.move_to_end(publisher)
            return state
        state = _Publisher(OrderedDict(), deque(maxlen=self._remember), deque(maxlen=self._remember))
        self._publishers[publisher] = state
        while len(self._publishers) > self.max_publishers:
            self._publishers.popitem(last=False)
        return state

    @staticmethod
    def _drop(state: _Publisher, mid: bytes) -> None:
        partial = state.messages.pop(mid, None)
        if partial is not None:
            state.held -= partial.held

    def _mark_done(self, publisher: str, mid: bytes) -> None:
        self._state(publisher).done.append(mid)

    def _refuse(self, publisher: str, mid: bytes) -> None:
        """Forget a refused message's parts and its id's future parts (one report per message)."""
        state = self._state(publisher)
        self._drop(state, mid)
        state.refused.append(mid)

    # -- introspection -----------------------------------------------------------------------------

    def pending(self, publisher: str | None = None) -> int:
        """Number of incomplete messages held (for one publisher, or in all)."""
        if publisher is not None:
            state = self._publishers.get(publisher)
            return 0 if state is None else len(state.messages)
        return sum(len(s.messages) for s in self._publishers.values())

    def pending_bytes(self, publisher: str | None = None) -> int:
        """Part bytes buffered in incomplete messages (for one publisher, or in all)."""
        if publisher is not None:
            state = self._publishers.get(publisher)
            return 0 if state is None else state.held
        return sum(s.held for s in self._publishers.values())

    def drop_incomplete(self) -> None:
        """Drop held parts but remember completed ids, so a replayed retained message is not re-emitted.

        Budgets are kept: a reconnect must not refill them."""
        for state in self._publishers.values():
            state.messages.clear()
            state.held = 0
