#!/usr/bin/env python3
"""Receiver CPU per hostile update from a certified member, against one honest update of the same size.

Each hostile update is built the way an attacker holding a valid federation certificate can build it
(signed, sealed for us, published in parts) and is taken through the receiver's path: Reassembler ->
open_envelope -> codec.decode(expected_tensors=local model's count) -> check_against, until refused.
The reference, measured in the same run, is one honest update of the same byte size through the
same path (parts of the default 4 MiB, a model of 62 tensors). CPU is process time (all threads),
median of --reps after a warm-up. What is not measured: the MQTT packet handling per part (broker,
paho, the link's topic parsing), which comes on top for every part that is sent at all.

The figures of the code before the bounds cannot be produced by this code; the header of the
output recalls them (measured by the attacker: ~4 CPU-s for 120,000 parts, ~0.9 s for 100,000
empty tensors).

    python scripts/bench_hostile_update.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from p2pfl import codec
from p2pfl import envelope as E
from p2pfl.errors import Rejected
from p2pfl.federation import Certificate, FederationAuthority, FederationRoot
from p2pfl.identity import Identity
from p2pfl.transport.framing import (
    MIN_PART_BYTES,
    PART_HEADER_BYTES,
    Reassembler,
    max_parts,
    split_message,
)

MAX_MESSAGE = 64 << 20
MODEL_TENSORS = 62  # a ResNet-18 has 62 parameter tensors


@dataclass
class World:
    """A federation with a certified sender (honest or not: same credentials) and one reader."""

    sender: Identity
    reader: Identity
    others: dict[str, bytes]
    root: FederationRoot
    certs: dict[str, Certificate]
    seq: int = 0

    def meta(self) -> E.UpdateMeta:
        self.seq += 1
        return E.UpdateMeta(
            sender=self.sender.node_id,
            federation=self.root.federation_id,
            round=1,
            seq=self.seq,
            timestamp=time.time(),
            samples=100,
            degree=4,
        )

    def recipients(self) -> dict[str, bytes]:
        return {self.reader.node_id: self.reader.box_public_bytes, **self.others}

    def seal(self, payload: bytes, **patch: int) -> bytes:
        """Seal as the sender; `patch` sets envelope constants for this call (the attacker's sealer)."""
        saved = {name: getattr(E, name) for name in patch}
        try:
            for name, value in patch.items():
                setattr(E, name, value)
            return E.seal(payload, self.meta(), self.sender, self.recipients())
        finally:
            for name, value in saved.items():
                setattr(E, name, value)

    def resign(self, message: bytes, **changes: Any) -> bytes:
        """The sender's message with edited header fields, signed again: valid signature, hostile header."""
        hlen = struct.unpack_from("<I", message, 4)[0]
        header = msgpack.unpackb(message[8 : 8 + hlen], raw=False)
        header.update(changes)
        packed = msgpack.packb(header, use_bin_type=True)
        signature = self.sender.sign(E.SIGN_DOMAIN + packed)
        return b"P2E1" + struct.pack("<I", len(packed)) + packed + signature + message[8 + hlen + 64 :]


def make_world() -> World:
    sender, reader = Identity.generate(), Identity.generate()
    with tempfile.TemporaryDirectory() as tmp:
        auth = FederationAuthority.create(Path(tmp) / "fed")
        certs = {
            i.node_id: auth.issue(f"n{k}", i.verify_key_bytes, i.box_public_bytes, ttl_s=3600)
            for k, i in enumerate((sender, reader))
        }
        root = auth.root
    others = {Identity.generate().node_id: Identity.generate().box_public_bytes for _ in range(3)}
    return World(sender, reader, others, root, certs)


def model_of(nbytes: int) -> dict[str, np.ndarray]:
    """MODEL_TENSORS float32 tensors of `nbytes` in all (the honest reference's payload)."""
    rng = np.random.default_rng(0)
    per = max(1, nbytes // 4 // MODEL_TENSORS)
    return {f"layer{i}.weight": rng.standard_normal(per, dtype=np.float32) for i in range(MODEL_TENSORS)}


def receive(world: World, parts: list[bytes], spec: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> str:
    """The receiver's path for one update; returns "accepted" or the first refusal's reason."""
    reassembler = Reassembler(MAX_MESSAGE)
    first: str | None = None
    message = None
    for i, part in enumerate(parts):
        try:
            got = reassembler.add("sender", part, i)
        except Rejected as exc:
            first = first or exc.reason.value
            continue
        if got is not None:
            message = got
    if message is None:
        return first or "incomplete"
    try:
        _, payload = E.open_envelope(
            message, world.reader, world.root, world.certs.get, E.ReplayGuard(), MAX_MESSAGE
        )
        params = codec.decode(payload, expected_tensors=len(spec))
        codec.check_against(params, spec)
    except Rejected as exc:
        return exc.reason.value
    return "accepted"


def cpu_s(fn: Callable[[], object], reps: int) -> float:
    """Median process CPU seconds (all threads) of one call, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def forged_parts(total: int, count: int, sent: int | None = None) -> list[bytes]:
    """The first `sent` of a `total`-byte message's `count` near-equal parts (what no honest sender
    makes)."""
    size = -(-total // count)
    mid = b"M" * 16
    out = []
    for index in range(count if sent is None else min(sent, count)):
        body = size if index < count - 1 else total - (count - 1) * size
        out.append(struct.pack(">4s16sIIQ", b"P2U1", mid, index, count, total) + bytes(body))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    world = make_world()
    spec = codec.spec_of(model_of(1 << 20))  # the receiver's local model: MODEL_TENSORS tensors

    honest_cache: dict[int, tuple[float, str]] = {}

    def honest(nbytes: int) -> tuple[float, str]:
        """CPU of one honest update whose sealed message is about `nbytes` long."""
        key = round(nbytes, -4)
        if key not in honest_cache:
            params = model_of(max(4 * MODEL_TENSORS, nbytes - 4096))
            message = world.seal(codec.encode(params))
            parts = split_message(message)
            local = codec.spec_of(params)
            honest_cache[key] = (
                cpu_s(lambda: receive(world, parts, local), args.reps),
                f"{len(message) / 1e6:.2f} MB, {len(parts)} part(s)",
            )
        return honest_cache[key]

    rows: list[dict[str, Any]] = []

    def case(
        name: str,
        parts: list[bytes],
        note: str = "",
        local: Mapping[str, tuple[tuple[int, ...], np.dtype]] = spec,
        size: int | None = None,
    ) -> None:
        """`size`: the update's size (what the parts announce), by default what they carry."""
        if size is None:
            size = sum(len(p) for p in parts) - PART_HEADER_BYTES * len(parts)
        outcome = receive(world, parts, local)
        hostile_s = cpu_s(lambda: receive(world, parts, local), args.reps)
        honest_s, honest_what = honest(size)
        rows.append(
            {
                "case": name,
                "bytes": size,
                "parts": len(parts),
                "outcome": outcome,
                "hostile_ms": hostile_s * 1e3,
                "honest_ms": honest_s * 1e3,
                "honest": honest_what,
                "ratio": hostile_s / honest_s if honest_s > 0 else float("inf"),
                "note": note,
            }
        )

    # -- framing: one 6 MB update in tiny parts
    six = 6_000_000
    case(
        "6 MB in 120,000 parts of 50 B",
        forged_parts(six, 120_000),
        "refused at part 0, rest dropped",
        size=six,
    )
    case(
        "6 MB in 1 B parts (120,000 of them sent)",
        forged_parts(six, six, sent=120_000),
        "count > MAX_PARTS; refused at part 0, rest dropped",
        size=six,
    )
    six_model = model_of(six - 4096)
    honest_six = world.seal(codec.encode(six_model))
    finest = -(-len(honest_six) // max_parts(len(honest_six)))
    case(
        f"6 MB cut as finely as accepted ({max_parts(len(honest_six)):,} parts)",
        split_message(honest_six, max(finest, MIN_PART_BYTES)),
        "accepted: the worst cut a receiver takes",
        codec.spec_of(six_model),
    )

    # -- codec: many empty tensors inside a valid, signed, sealed update
    header = msgpack.packb([[f"t{i}", "float32", [0], 0, 0] for i in range(100_000)], use_bin_type=True)
    frame = bytearray(b"P2T1" + struct.pack("<I", len(header)) + header)
    frame += bytes(-len(frame) % 8)
    case(
        "100,000 empty tensors",
        split_message(world.seal(bytes(frame))),
        "refused from the header's first bytes",
    )
    cap = codec.encode({f"t{i}": np.zeros(0, np.float32) for i in range(codec.MAX_TENSORS)})
    case(f"{codec.MAX_TENSORS:,} empty tensors (the cap)", split_message(world.seal(cap)), "expected_tensors")

    # -- envelope: recipients and chunks
    base = world.seal(b"p" * 200_000)
    hlen = struct.unpack_from("<I", base, 4)[0]
    wrapped = next(iter(msgpack.unpackb(base[8 : 8 + hlen], raw=False)["keys"].values()))
    keys = {f"{i:x}": wrapped for i in range(E.MAX_RECIPIENTS)} | {world.reader.node_id: wrapped}
    case(
        f"{E.MAX_RECIPIENTS + 1:,} recipients",
        split_message(world.resign(base, keys=keys)),
        "parsed, refused before the signature",
    )
    keys = {f"{i:016x}": wrapped for i in range(10_000)} | {world.reader.node_id: wrapped}
    case("10,000 recipients", split_message(world.resign(base, keys=keys)), "refused before unpacking")
    payload = bytes(2_000_000)
    case(
        "2 MB in 1 KiB envelope chunks",
        split_message(world.seal(payload, CHUNK_BYTES=1024, MIN_CHUNK_BYTES=1)),
        "refused after parsing the header",
    )
    case(
        "2 MB in 64 B envelope chunks",
        split_message(world.seal(payload, CHUNK_BYTES=64, MIN_CHUNK_BYTES=1)),
        "refused before unpacking",
    )

    print("Receiver CPU per hostile update vs one honest update of the same size (same run).")
    print("Before these bounds (attacker's measurement): ~4 CPU-s for 6 MB in 120,000 parts,")
    print("~0.9 s for 100,000 empty tensors.")
    print(f"CPU process time, median of {args.reps}; MQTT per-packet work not included.")
    print("MB: the update's size; honest: one update of that size, 4 MiB parts, 62 tensors.\n")
    print(
        f"{'case':<44}{'MB':>7}{'parts':>9}  {'outcome':<17}{'hostile ms':>11}{'honest ms':>11}{'ratio':>8}"
    )
    for r in rows:
        print(
            f"{r['case']:<44}{r['bytes'] / 1e6:>7.2f}{r['parts']:>9,}  {r['outcome']:<17}"
            f"{r['hostile_ms']:>11.2f}{r['honest_ms']:>11.2f}{r['ratio']:>8.2f}"
        )
    print()
    for r in rows:
        print(f"  {r['case']}: {r['note']}; honest reference {r['honest']}")
    print(json.dumps({"reps": args.reps, "rows": rows}), file=sys.stdout)


if __name__ == "__main__":
    main()
