"""Framing: honest parts of every size round-trip; hostile part counts and floods cost bounded work.

Bounded work is asserted on what the reassembler reports and buffers, never on wall time.
"""

from __future__ import annotations

import os
import struct

import pytest

from p2pfl.errors import Reason, Rejected
from p2pfl.transport import framing as F
from p2pfl.transport.framing import (
    DEFAULT_CHUNK_BYTES,
    MAX_PARTS,
    MIN_PART_BYTES,
    PART_HEADER_BYTES,
    Reassembler,
    max_parts,
    split_message,
)

MAX = 64 << 20


class Clock:
    """A hand-driven monotonic clock for the byte budget."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _forge(mid: bytes, index: int, count: int, total: int, body: bytes | int) -> bytes:
    """A part with any numbering; `body` as bytes or as a length of filler."""
    payload = body if isinstance(body, bytes) else b"x" * body
    return struct.pack(">4s16sIIQ", b"P2U1", mid, index, count, total) + payload


def _feed(r: Reassembler, publisher: str, parts: list[bytes]) -> tuple[list[bytes], list[Reason]]:
    """Deliver parts in order; (messages handed out, reasons refused)."""
    out: list[bytes] = []
    reasons: list[Reason] = []
    for i, part in enumerate(parts):
        try:
            got = r.add(publisher, part, i)
        except Rejected as exc:
            reasons.append(exc.reason)
        else:
            if got is not None:
                out.append(got)
    return out, reasons


def _sizes_around(n: int) -> list[int]:
    return [s for s in (n - 1, n, n + 1) if s >= 1]


# ---------------------------------------------------------------- honest round trips


def test_part_size_floor_matches_the_senders_smallest_chunk() -> None:
    from p2pfl.transport.outbox import MIN_CHUNK_BYTES

    assert MIN_PART_BYTES == MIN_CHUNK_BYTES  # an Outbox may be configured down to this
    assert max_parts(MAX_PARTS * DEFAULT_CHUNK_BYTES) == MAX_PARTS  # the largest update still fits


@pytest.mark.parametrize("chunk", [MIN_PART_BYTES, MIN_PART_BYTES + 1, 4096, 64 << 10])
@pytest.mark.parametrize(
    "total",
    [
        1,
        2,
        *_sizes_around(1024),
        *_sizes_around(2048),
        *_sizes_around(4096),
        *_sizes_around(64 << 10),
        100_003,
    ],
)
def test_round_trip_of_every_size_in_any_order(total: int, chunk: int) -> None:
    message = os.urandom(total)
    parts = split_message(message, chunk)
    assert len(parts) == -(-total // chunk) <= max_parts(total)
    assert all(len(p) - PART_HEADER_BYTES <= chunk for p in parts)
    r = Reassembler(MAX)
    out = None
    for i in reversed(range(len(parts))):  # order must not matter
        out = r.add("a", parts[i], i)
        if i:
            assert out is None
    assert out == message
    assert r.pending() == 0 and r.pending_bytes() == 0


def test_one_byte_message_with_any_chunk() -> None:
    for chunk in (1, 2, MIN_PART_BYTES, DEFAULT_CHUNK_BYTES):
        parts = split_message(b"z", chunk)
        assert len(parts) == 1 and len(parts[0]) == PART_HEADER_BYTES + 1
        assert Reassembler(1).add("a", parts[0], 0) == b"z"


def test_default_chunk_round_trip_of_a_large_message() -> None:
    message = os.urandom(DEFAULT_CHUNK_BYTES * 2 + 7)
    parts = split_message(message)
    assert len(parts) == 3
    out, reasons = _feed(Reassembler(MAX), "a", parts)
    assert out == [message] and reasons == []


def test_split_never_makes_parts_a_receiver_refuses() -> None:
    for chunk in (MIN_PART_BYTES, MIN_PART_BYTES + 3, 1500, 4096):
        for total in range(1, 12 * MIN_PART_BYTES, 97):
            assert len(split_message(bytes(total), chunk)) <= max_parts(total)
    # smaller chunks are fine while the message is small enough to stay within the part count...
    assert len(split_message(b"hello", 100)) == 1
    assert len(split_message(os.urandom(5000), 1000)) == 5 <= max_parts(5000)
    # ...and refused by the sender itself otherwise
    with pytest.raises(ValueError, match="at most"):
        split_message(os.urandom(2048), 1000)  # 3 parts, receivers accept 2
    with pytest.raises(ValueError):
        split_message(os.urandom(6000), 1)


def test_max_parts_is_size_derived_and_capped() -> None:
    assert max_parts(1) == 1
    assert max_parts(MIN_PART_BYTES) == 1
    assert max_parts(MIN_PART_BYTES + 1) == 2
    assert max_parts(6_000_000) == 5860
    assert max_parts(1 << 40) == MAX_PARTS


# ---------------------------------------------------------------- hostile part counts


def test_six_megabytes_in_120000_parts_is_refused_at_the_first_part_and_reported_once() -> None:
    """The measured attack: each part is a packet to handle; refused from the first header, nothing
    is buffered, and the other 119,999 parts are dropped without another report."""
    total, count = 6_000_000, 120_000
    size = total // count  # 50 bytes a part: near-equal, the canonical layout
    mid = b"A" * 16
    r = Reassembler(MAX, clock=Clock())
    with pytest.raises(Rejected) as first:
        r.add("mallory", _forge(mid, 0, count, total, size), 0)
    assert first.value.reason is Reason.TOO_MANY_PARTS
    assert r.pending() == 0 and r.pending_bytes() == 0
    refused = 0
    for i in range(1, count):
        try:
            assert r.add("mallory", _forge(mid, i, count, total, size), i) is None
        except Rejected:
            refused += 1
    assert refused == 0  # one report for the whole message
    assert r.pending() == 0 and r.pending_bytes() == 0
    # the dropped parts still count against mallory's budget (each as a minimum part)...
    assert r.budget_left("mallory") == r.max_bytes_per_window - count * MIN_PART_BYTES
    # ...and only against mallory's
    assert r.budget_left("alice") == r.max_bytes_per_window


@pytest.mark.parametrize(
    "count,total,body",
    [
        (120_000, 120_000, 1),  # one-byte parts
        (2, 10, 5),  # a 10-byte message in two parts
        (2, MIN_PART_BYTES, MIN_PART_BYTES // 2),  # one part's worth in two
        (4, 3 * MIN_PART_BYTES, 3 * MIN_PART_BYTES // 4),  # one part too many
        (MAX_PARTS + 1, 1 << 30, (1 << 30) // (MAX_PARTS + 1) + 1),  # beyond the protocol's cap
    ],
)
def test_parts_finer_than_the_size_allows_are_too_many_parts(count: int, total: int, body: int) -> None:
    r = Reassembler(2 << 30, max_bytes_per_window=4 << 30)
    for index in (0, count - 1):
        with pytest.raises(Rejected) as e:
            r.add("a", _forge(os.urandom(16), index, count, total, body), index)
        assert e.value.reason is Reason.TOO_MANY_PARTS
    assert r.pending() == 0 and r.pending_bytes() == 0


def test_the_part_count_boundary_is_exact() -> None:
    total = 2 * MIN_PART_BYTES + 1  # three parts allowed
    assert max_parts(total) == 3
    message = os.urandom(total)
    parts = split_message(message, MIN_PART_BYTES)
    assert len(parts) == 3
    assert _feed(Reassembler(MAX), "a", parts) == ([message], [])
    size = -(-total // 4)
    with pytest.raises(Rejected) as e:
        Reassembler(MAX).add("a", _forge(b"m" * 16, 0, 4, total, size), 0)
    assert e.value.reason is Reason.TOO_MANY_PARTS


@pytest.mark.parametrize(
    "index,count,total,body_len",
    [
        (0, 0, 10, 10),  # zero parts
        (0, 11, 10, 1),  # more parts than bytes
        (0, 1, 0, 0),  # empty message
        (0, 1, 10, 9),  # wrong length of a single part
        (2, 2, 4000, 2000),  # index beyond count
        (0, 2, 4000, 1999),  # wrong part length (expected 2000)
        (1, 3, 3000, 999),  # wrong part length (expected 1000)
        (2, 3, 2999, 1000),  # wrong last part length (expected 999)
    ],
)
def test_inconsistent_numbering_is_malformed(index: int, count: int, total: int, body_len: int) -> None:
    r = Reassembler(MAX)
    with pytest.raises(Rejected) as e:
        r.add("a", _forge(b"m" * 16, index, count, total, body_len))
    assert e.value.reason is Reason.MALFORMED
    assert r.pending_bytes() == 0


def test_oversize_is_refused_before_buffering() -> None:
    r = Reassembler(4000)
    with pytest.raises(Rejected) as e:
        r.add("a", _forge(b"m" * 16, 0, 2, 4001, 2001))
    assert e.value.reason is Reason.OVERSIZE
    with pytest.raises(Rejected) as e:  # a real split of an oversize message
        r.add("a", split_message(os.urandom(8000), 4000)[0])
    assert e.value.reason is Reason.OVERSIZE
    assert r.pending() == 0 and r.pending_bytes() == 0


def test_short_and_bad_magic_parts_are_malformed() -> None:
    r = Reassembler(MAX)
    with pytest.raises(Rejected) as e:
        r.add("a", b"\x00" * (PART_HEADER_BYTES - 1))
    assert e.value.reason is Reason.MALFORMED
    part = bytearray(split_message(b"hello", 100)[0])
    part[0] ^= 0xFF
    with pytest.raises(Rejected) as e:
        r.add("a", bytes(part))
    assert e.value.reason is Reason.MALFORMED


def test_a_bad_part_does_not_kill_its_message_but_a_bad_message_is_reported_once() -> None:
    r = Reassembler(MAX)
    mid = b"k" * 16
    assert r.add("a", _forge(mid, 0, 2, 4000, b"x" * 2000), 0) is None
    with pytest.raises(Rejected) as e:  # same id, other numbering: this part only
        r.add("a", _forge(mid, 1, 3, 4500, 1500))
    assert e.value.reason is Reason.MALFORMED
    with pytest.raises(Rejected) as e:  # header says part 1, topic said part 0
        r.add("a", _forge(mid, 1, 2, 4000, 2000), index=0)
    assert e.value.reason is Reason.MALFORMED
    assert r.add("a", _forge(mid, 1, 2, 4000, b"y" * 2000), index=1) == b"x" * 2000 + b"y" * 2000
    # a message refused as a whole: its other parts are dropped quietly
    big = b"o" * 16
    with pytest.raises(Rejected) as e:
        r.add("a", _forge(big, 0, 5, 4000, 800), 0)
    assert e.value.reason is Reason.TOO_MANY_PARTS
    assert all(r.add("a", _forge(big, i, 5, 4000, 800), i) is None for i in range(1, 5))


def test_duplicates_and_completed_replays_are_ignored() -> None:
    message = os.urandom(5000)
    parts = split_message(message, 1024)
    r = Reassembler(MAX)
    assert r.add("a", parts[0]) is None
    assert r.add("a", parts[0]) is None  # duplicate part
    assert r.pending_bytes("a") == len(parts[0]) - PART_HEADER_BYTES  # held once
    outs = [r.add("a", p) for p in parts[1:]]
    assert outs[-1] == message
    assert all(r.add("a", p) is None for p in parts)  # retained + live: not re-emitted
    assert r.pending() == 0
    single = split_message(b"xyz", 1024)
    assert r.add("a", single[0]) == b"xyz"
    assert r.add("a", single[0]) is None


# ---------------------------------------------------------------- per-publisher bounds


def test_buffered_bytes_per_publisher_are_bounded() -> None:
    limit = 10_000
    r = Reassembler(limit, max_pending=3)
    assert r.max_buffered_bytes == limit
    first, second = os.urandom(9_000), os.urandom(9_001)
    p1, p2 = split_message(first, 1024), split_message(second, 1024)  # 9 parts each
    for i in range(8):  # all but the last part of the first message
        assert r.add("a", p1[i], i) is None
    assert r.pending_bytes("a") == 8_000
    for i in range(8):  # then of the second: the first makes room
        assert r.add("a", p2[i], i) is None
        assert r.pending_bytes("a") <= limit
    assert r.pending("a") == 1 and r.pending_bytes("a") == 8 * 1001
    other = os.urandom(3000)
    assert _feed(r, "b", split_message(other, 1024)) == ([other], [])  # other publishers unaffected
    assert r.add("a", p1[8], 8) is None  # the first was let go
    assert r.add("a", p2[8], 8) == second


def test_at_most_two_incomplete_messages_per_publisher() -> None:
    msgs = [os.urandom(3000) for _ in range(3)]
    parts = [split_message(m, 1024) for m in msgs]
    r = Reassembler(MAX)
    for p in parts:
        assert r.add("a", p[0]) is None
    assert r.pending("a") == 2  # the oldest was dropped
    assert r.add("a", parts[2][1]) is None
    assert r.add("a", parts[2][2]) == msgs[2]


def test_publishers_are_bounded() -> None:
    r = Reassembler(MAX, max_publishers=3)
    for i in range(10):
        r.add(f"p{i}", split_message(os.urandom(2000), 1024)[0])
    assert r.pending() == 3


def test_byte_budget_refuses_a_flooding_publisher_and_isolates_the_others() -> None:
    clock = Clock()
    r = Reassembler(10_000, max_bytes_per_window=50_000, window_s=10.0, clock=clock)
    message = os.urandom(9_000)
    charge = sum(len(p) for p in split_message(message, 1024))  # 9 parts of 1,040 bytes
    accepted = 0
    while True:  # mallory re-sends fresh copies until refused
        out, reasons = _feed(r, "mallory", split_message(message, 1024))
        if reasons:
            break
        assert out == [message]
        accepted += 1
    assert accepted == 50_000 // charge
    assert reasons == [Reason.NEIGHBOUR_BUDGET]  # its later parts are not reported again
    assert r.pending_bytes("mallory") == 0  # the refused message's parts were let go
    # another publisher, at the same time, is not affected
    honest = os.urandom(9_000)
    assert _feed(r, "alice", split_message(honest, 1024)) == ([honest], [])
    # mallory's budget refills with time, and only with time
    r.drop_incomplete()  # e.g. a reconnect: must not refill it
    with pytest.raises(Rejected) as e:
        r.add("mallory", split_message(message, 1024)[0], 0)
    assert e.value.reason is Reason.NEIGHBOUR_BUDGET
    clock.t += 10.0
    assert r.budget_left("mallory") == 50_000
    assert _feed(r, "mallory", split_message(message, 1024)) == ([message], [])


def test_every_part_costs_at_least_a_minimum_part() -> None:
    """Tiny single-part messages cannot be sent at a higher packet rate than normal parts."""
    r = Reassembler(10_000, max_bytes_per_window=64 * MIN_PART_BYTES, clock=Clock())
    accepted = 0
    with pytest.raises(Rejected) as e:
        for _ in range(1000):
            assert r.add("a", split_message(os.urandom(1), 1024)[0]) is not None
            accepted += 1
    assert e.value.reason is Reason.NEIGHBOUR_BUDGET
    assert accepted == 64


def test_budgets_outlive_publisher_eviction_and_are_bounded() -> None:
    clock = Clock()
    r = Reassembler(2000, max_publishers=1, max_bytes_per_window=4000, clock=clock)
    tracked = 4  # 4 x max_publishers buckets
    for i in range(tracked):  # each drains its bucket
        for _ in range(3):
            r.add(f"p{i}", split_message(os.urandom(10), 1024)[0])
    with pytest.raises(Rejected) as e:  # evicting p0's state did not refill its bucket
        r.add("p0", split_message(os.urandom(10), 1024)[0])
    assert e.value.reason is Reason.NEIGHBOUR_BUDGET
    with pytest.raises(Rejected) as e:  # no room for a fresh bucket while all are drained
        r.add("new", split_message(os.urandom(10), 1024)[0])
    assert e.value.reason is Reason.NEIGHBOUR_BUDGET
    assert len(r._budgets) == tracked
    clock.t += r.window_s  # full buckets are forgotten first: forgetting them changes nothing
    assert r.add("new", split_message(b"hi", 1024)[0]) == b"hi"
    assert len(r._budgets) == tracked


def test_default_budget_is_a_few_max_size_updates() -> None:
    assert Reassembler(1 << 30).max_bytes_per_window == F.BUDGET_UPDATES * (1 << 30)
    assert Reassembler(1000).max_bytes_per_window == F.MIN_BUDGET_BYTES
    with pytest.raises(ValueError):
        Reassembler(1000, max_bytes_per_window=999)
    with pytest.raises(ValueError):
        Reassembler(1000, max_buffered_bytes=999)
    with pytest.raises(ValueError):
        Reassembler(1000, window_s=0)


def test_flooding_a_refused_message_spends_the_budget_quietly() -> None:
    clock = Clock()
    r = Reassembler(10_000, max_bytes_per_window=64 * MIN_PART_BYTES, clock=clock)
    mid = b"f" * 16
    with pytest.raises(Rejected) as e:
        r.add("mallory", _forge(mid, 0, 1000, 5000, 5), 0)
    assert e.value.reason is Reason.TOO_MANY_PARTS
    for i in range(1, 1000):  # no further report, however many parts follow
        assert r.add("mallory", _forge(mid, i, 1000, 5000, 5), i) is None
    assert r.budget_left("mallory") == 0
    with pytest.raises(Rejected) as e:  # so mallory's next message waits for the budget to refill
        r.add("mallory", split_message(b"next", 1024)[0])
    assert e.value.reason is Reason.NEIGHBOUR_BUDGET
    assert r.add("alice", split_message(b"fine", 1024)[0]) == b"fine"
    clock.t += r.window_s
    assert r.add("mallory", split_message(b"later", 1024)[0]) == b"later"
