"""Sealed updates: round trips and every refusal reason, in the order open_envelope checks them."""

from __future__ import annotations

import os
import random
import struct
import time
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from p2pfl import envelope as E
from p2pfl.envelope import ReplayGuard, UpdateMeta, open_envelope, seal
from p2pfl.errors import Reason, Rejected
from p2pfl.federation import Certificate, FederationAuthority
from p2pfl.identity import Identity

NOW = 1_750_000_000.0


class Fed:
    """A federation of four members with certificates valid around NOW."""

    def __init__(self, directory: Path) -> None:
        self.auth = FederationAuthority.create(directory)
        self.members = [Identity.generate() for _ in range(4)]
        self.certs: dict[str, Certificate] = {}
        for i, ident in enumerate(self.members):
            cert = self.auth.issue(f"n{i}", ident.verify_key_bytes, ident.box_public_bytes, ttl_s=3600)
            # Pin validity around NOW so the tests do not depend on the wall clock.
            unsigned = replace(cert, issued=NOW - 60, expires=NOW + 3600, signature=b"")
            self.certs[ident.node_id] = replace(
                unsigned, signature=self.auth._key.sign(unsigned.signed_bytes()).signature
            )

    @property
    def root(self):
        return self.auth.root

    def meta(self, sender: Identity, seq: int = 1, ts: float = NOW, **kw) -> UpdateMeta:
        fields = dict(
            sender=sender.node_id,
            federation=self.root.federation_id,
            round=3,
            seq=seq,
            timestamp=ts,
            samples=120,
            degree=3,
        )
        fields.update(kw)
        return UpdateMeta(**fields)

    def recipients(self, *idents: Identity) -> dict[str, bytes]:
        return {i.node_id: i.box_public_bytes for i in idents}

    def open(
        self,
        message,
        reader: Identity,
        replay: ReplayGuard | None = None,
        max_bytes: int = 1 << 30,
        now: float = NOW,
        certs=None,
        root=None,
        in_place: bool = False,
    ):
        return open_envelope(
            message,
            reader,
            root or self.root,
            certs or self.certs.get,
            replay or ReplayGuard(),
            max_bytes,
            now=now,
            in_place=in_place,
        )


@pytest.fixture()
def fed(tmp_path: Path) -> Fed:
    return Fed(tmp_path / "fed")


@pytest.fixture()
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Chunks of 1000 bytes on both sides, so a few KB exercise the multi-chunk paths."""
    monkeypatch.setattr(E, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(E, "MIN_CHUNK_BYTES", 1000)
    return 1000


def _reason(fn, *args, **kw) -> Reason:
    with pytest.raises(Rejected) as err:
        fn(*args, **kw)
    return err.value.reason


def _header_len(message: bytes) -> int:
    return struct.unpack_from("<I", message, 4)[0]


@pytest.mark.parametrize("aead", [E.AES, E.XCHACHA])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 7_777])
def test_round_trip_three_recipients(
    fed: Fed, small_chunks, monkeypatch, aead: str, fast: bool, size: int
) -> None:
    if aead == E.AES and not E.aes_available():
        pytest.skip("no AES-NI")
    monkeypatch.setattr(E, "DEFAULT_AEAD", aead)
    if not fast:
        monkeypatch.setattr(E, "_ffi", None)  # the public pynacl bindings path
    sender, *readers = fed.members
    payload = random.Random(size).randbytes(size)
    meta = fed.meta(sender)
    message = seal(payload, meta, sender, fed.recipients(*readers))
    assert isinstance(message, bytearray) and message[:4] == b"P2E1"
    for reader in readers:
        got_meta, got = fed.open(message, reader)
        assert got_meta == meta
        assert got == payload and isinstance(got, bytearray)
        # in place: the plaintext ends up at the front of (a copy of) the message itself
        owned = bytearray(message)
        got_meta, got = fed.open(owned, reader, in_place=True)
        assert got_meta == meta and got == payload
        assert isinstance(got, memoryview) and got.obj is owned


def test_round_trip_default_chunking(fed: Fed) -> None:
    sender, *readers = fed.members
    payload = os.urandom(3 * E.CHUNK_BYTES + 12345)
    message = seal(memoryview(payload), fed.meta(sender), sender, fed.recipients(*readers))
    assert len(message) < len(payload) + 2000  # encrypted once, not per recipient
    assert fed.open(message, readers[0])[1] == payload


def test_tampered_header_is_refused(fed: Fed) -> None:
    sender, reader = fed.members[:2]
    message = seal(b"x" * 100, fed.meta(sender), sender, fed.recipients(reader))
    end = 8 + _header_len(message) + 64
    seen = set()
    for pos in range(end):
        for bit in (0, 7):
            bad = bytearray(message)
            bad[pos] ^= 1 << bit
            try:
                fed.open(bytes(bad), reader)
            except Rejected as exc:
                seen.add(exc.reason)
            else:  # pragma: no cover
                pytest.fail(f"flipping bit {bit} of byte {pos} went unnoticed")
    # Flips hit the structure (malformed), the header fields (mostly caught by the signature) or the
    # signature itself; a flipped sender / federation byte changes who we think sent it.
    assert Reason.BAD_SIGNATURE in seen and Reason.MALFORMED in seen
    assert seen <= {Reason.BAD_SIGNATURE, Reason.MALFORMED, Reason.WRONG_FEDERATION, Reason.UNKNOWN_SENDER}


def test_tampered_signature_is_bad_signature(fed: Fed) -> None:
    sender, reader = fed.members[:2]
    message = bytearray(seal(b"abc", fed.meta(sender), sender, fed.recipients(reader)))
    message[8 + _header_len(message) + 5] ^= 0x40
    assert _reason(fed.open, bytes(message), reader) is Reason.BAD_SIGNATURE


def test_tampered_ciphertext_is_digest_mismatch(fed: Fed, small_chunks) -> None:
    sender, reader = fed.members[:2]
    message = seal(os.urandom(5000), fed.meta(sender), sender, fed.recipients(reader))
    start = 8 + _header_len(message) + 64
    for pos in (start, start + 2500, len(message) - 1):
        bad = bytearray(message)
        bad[pos] ^= 1
        assert _reason(fed.open, bytes(bad), reader) is Reason.DIGEST_MISMATCH


def test_forged_signature_is_bad_signature(fed: Fed) -> None:
    victim, reader = fed.members[:2]
    mallory = Identity.generate()
    message = seal(b"update", fed.meta(victim), victim, fed.recipients(reader))
    hlen = _header_len(message)
    header = message[8 : 8 + hlen]
    forged = message[: 8 + hlen] + mallory.sign(E.SIGN_DOMAIN + header) + message[8 + hlen + 64 :]
    assert _reason(fed.open, forged, reader) is Reason.BAD_SIGNATURE
    # Mallory's own, self-made "certificate" for the victim's id does not chain to the root.
    fake = replace(fed.certs[victim.node_id], sign_key=mallory.verify_key_bytes)
    assert _reason(fed.open, forged, reader, certs={victim.node_id: fake}.get) is Reason.UNCERTIFIED


def test_certificate_for_another_node_is_uncertified(fed: Fed) -> None:
    sender, reader, other = fed.members[:3]
    message = seal(b"u", fed.meta(sender), sender, fed.recipients(reader))
    assert (
        _reason(fed.open, message, reader, certs=lambda _id: fed.certs[other.node_id]) is Reason.UNCERTIFIED
    )


def test_not_recipient(fed: Fed) -> None:
    sender, reader, outsider = fed.members[:3]
    message = seal(b"u", fed.meta(sender), sender, fed.recipients(reader))
    assert _reason(fed.open, message, outsider) is Reason.NOT_RECIPIENT


def test_key_wrapped_for_someone_else_is_decrypt_failed(fed: Fed) -> None:
    sender, reader, other = fed.members[:3]
    message = seal(b"u", fed.meta(sender), sender, {reader.node_id: other.box_public_bytes})
    assert _reason(fed.open, message, reader) is Reason.DECRYPT_FAILED


def test_signed_but_corrupt_ciphertext_is_decrypt_failed(fed: Fed, small_chunks, monkeypatch) -> None:
    sender, reader = fed.members[:2]
    original = E._encrypt_chunk

    def corrupt(aead, src, dst, aad, nonce, key):
        original(aead, src, dst, aad, nonce, key)
        dst[0] ^= 1  # the sender hashes (and signs) the corrupted bytes

    monkeypatch.setattr(E, "_encrypt_chunk", corrupt)
    message = seal(os.urandom(2500), fed.meta(sender), sender, fed.recipients(reader))
    assert _reason(fed.open, message, reader) is Reason.DECRYPT_FAILED


def test_replay_and_stale(fed: Fed) -> None:
    sender, reader = fed.members[:2]
    guard = ReplayGuard(max_skew_s=300)
    first = seal(b"1", fed.meta(sender, seq=5), sender, fed.recipients(reader))
    fed.open(first, reader, replay=guard)
    assert guard.last_seq(sender.node_id) == 5
    assert _reason(fed.open, first, reader, replay=guard) is Reason.REPLAY
    older = seal(b"0", fed.meta(sender, seq=4), sender, fed.recipients(reader))
    assert _reason(fed.open, older, reader, replay=guard) is Reason.REPLAY
    newer = seal(b"2", fed.meta(sender, seq=6), sender, fed.recipients(reader))
    assert fed.open(newer, reader, replay=guard)[1] == b"2"
    old = seal(b"3", fed.meta(sender, seq=7, ts=NOW - 301), sender, fed.recipients(reader))
    assert _reason(fed.open, old, reader, replay=guard) is Reason.STALE
    future = seal(b"4", fed.meta(sender, seq=8, ts=NOW + 301), sender, fed.recipients(reader))
    assert _reason(fed.open, future, reader, replay=guard) is Reason.STALE
    assert guard.last_seq(sender.node_id) == 6  # refused updates are not recorded


def test_failed_open_does_not_record(fed: Fed) -> None:
    sender, reader = fed.members[:2]
    guard = ReplayGuard()
    message = bytearray(seal(b"x" * 50, fed.meta(sender, seq=9), sender, fed.recipients(reader)))
    message[-1] ^= 1
    assert _reason(fed.open, bytes(message), reader, replay=guard) is Reason.DIGEST_MISMATCH
    assert guard.last_seq(sender.node_id) is None


def test_replay_guard_is_bounded() -> None:
    guard = ReplayGuard(max_senders=3)
    for i in range(5):
        guard.record(
            UpdateMeta(sender=f"s{i}", federation="f", round=0, seq=1, timestamp=NOW, samples=1, degree=1)
        )
    assert guard.last_seq("s0") is None and guard.last_seq("s1") is None
    assert [guard.last_seq(f"s{i}") for i in (2, 3, 4)] == [1, 1, 1]


def test_other_federation(fed: Fed, tmp_path: Path) -> None:
    sender, reader = fed.members[:2]
    other = FederationAuthority.create(tmp_path / "other").root
    message = seal(b"u", fed.meta(sender, federation=other.federation_id), sender, fed.recipients(reader))
    assert _reason(fed.open, message, reader) is Reason.WRONG_FEDERATION
    ours = seal(b"u", fed.meta(sender), sender, fed.recipients(reader))
    assert _reason(fed.open, ours, reader, root=other) is Reason.WRONG_FEDERATION


def test_expired_unknown_revoked(fed: Fed) -> None:
    sender, reader = fed.members[:2]
    cert = fed.certs[sender.node_id]
    late = cert.expires + 10
    message = seal(b"u", fed.meta(sender, ts=late), sender, fed.recipients(reader))
    assert _reason(fed.open, message, reader, now=late) is Reason.EXPIRED
    message = seal(b"u", fed.meta(sender), sender, fed.recipients(reader))
    assert _reason(fed.open, message, reader, certs=lambda _id: None) is Reason.UNKNOWN_SENDER
    revoked_root = fed.root.with_revoked(sender.node_id)
    assert _reason(fed.open, message, reader, root=revoked_root) is Reason.REVOKED


def test_oversize(fed: Fed) -> None:
    sender, reader = fed.members[:2]
    message = seal(b"u" * 1000, fed.meta(sender), sender, fed.recipients(reader))
    assert _reason(fed.open, message, reader, max_bytes=len(message) - 1) is Reason.OVERSIZE
    assert fed.open(message, reader, max_bytes=len(message))[1] == b"u" * 1000


def _repack(message: bytes, signer: Identity, /, **changes) -> bytes:
    """Re-sign a message with edited header fields: a correctly signed but malformed message."""
    hlen = _header_len(message)
    header = msgpack.unpackb(message[8 : 8 + hlen], raw=False)
    for key, value in changes.items():
        if value is KeyError:
            del header[key]
        else:
            header[key] = value
    packed = msgpack.packb(header, use_bin_type=True)
    return (
        b"P2E1"
        + struct.pack("<I", len(packed))
        + packed
        + signer.sign(E.SIGN_DOMAIN + packed)
        + message[8 + hlen + 64 :]
    )


def test_signed_but_malformed_headers(fed: Fed, small_chunks) -> None:
    sender, reader = fed.members[:2]
    message = seal(os.urandom(2500), fed.meta(sender), sender, fed.recipients(reader))
    assert fed.open(_repack(message, sender), reader)[0].seq == 1  # the re-signing helper is faithful
    cases = {
        "missing field": {"degree": KeyError},
        "extra field": {"x": 1},
        "version": {"v": E.VERSION + 1},
        "old version": {"v": 1},
        "bool version": {"v": True},
        "round type": {"round": "3"},
        "negative seq": {"seq": -1},
        "bool samples": {"samples": True},
        "nan timestamp": {"timestamp": float("nan")},
        "aead": {"aead": "rot13"},
        "chunk zero": {"chunk": 0},
        "chunk huge": {"chunk": 1 << 40},
        "chunk differs": {"chunk": 2000},
        "nonce size": {"nonce": b"123"},
        "length": {"length": 2501},
        "negative length": {"length": -1},
        "digest count": {"digests": []},
        "digest size": {"digests": [b"x"] * 3},
        "keys type": {"keys": [1]},
        "wrapped size": {"keys": {reader.node_id: b"short"}},
        "sender type": {"sender": 5},
        "empty sender": {"sender": ""},
    }
    for what, change in cases.items():
        reason = _reason(fed.open, _repack(message, sender, **change), reader)
        assert reason is Reason.MALFORMED, what


def test_seal_refuses_bad_input(fed: Fed) -> None:
    sender, reader = fed.members[:2]
    with pytest.raises(ValueError):
        seal(b"u", fed.meta(reader), sender, fed.recipients(reader))  # meta names someone else
    with pytest.raises(ValueError):
        seal(b"u", fed.meta(sender, round=-1), sender, fed.recipients(reader))


def test_fuzz_only_rejected(fed: Fed, small_chunks) -> None:
    sender, reader = fed.members[:2]
    rng = random.Random(5)
    message = seal(os.urandom(3000), fed.meta(sender), sender, fed.recipients(reader))
    samples: list = [
        b"",
        b"P2E1",
        b"P2E1" + bytes(200),
        bytearray(message),
        memoryview(message),
        "text",
        None,
        7,
    ]
    samples += [message[:n] for n in range(0, len(message), 37)]
    samples += [rng.randbytes(rng.randrange(0, 400)) for _ in range(300)]
    samples += [
        b"P2E1" + struct.pack("<I", rng.randrange(0, 300)) + rng.randbytes(rng.randrange(0, 400))
        for _ in range(300)
    ]
    for _ in range(300):
        bad = bytearray(message)
        for _ in range(rng.randrange(1, 4)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        samples.append(bytes(bad))
    opened = 0
    for data in samples:
        try:
            fed.open(data, reader)
        except Rejected:
            pass
        except Exception as exc:  # pragma: no cover
            pytest.fail(f"open_envelope raised {type(exc).__name__} on {data!r:.60}")
        else:
            assert bytes(data) == message  # only unmodified copies open (a "mutation" may be a no-op)
            opened += 1
    assert opened >= 2  # the bytearray and memoryview copies


def test_real_clock_defaults(fed: Fed) -> None:
    sender, reader = fed.members[:2]
    auth = fed.auth
    cert = auth.issue("live", sender.verify_key_bytes, sender.box_public_bytes, ttl_s=60)
    message = seal(b"now", fed.meta(sender, ts=time.time()), sender, fed.recipients(reader))
    meta, payload = open_envelope(
        message, reader, fed.root, {sender.node_id: cert}.get, ReplayGuard(), 1 << 20
    )
    assert payload == b"now" and meta.sender == sender.node_id


# ---------------------------------------------------------------- bounded work per update


class Counter:
    """Counts calls of a wrapped function (how much per-item work a refusal cost)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def test_tiny_chunks_are_too_many_parts_before_any_chunk_work(fed: Fed, monkeypatch) -> None:
    """A certified sender seals a valid, signed update in 1-byte chunks: refused from the header,
    with no digest, decryption or certificate lookup done."""
    sender, reader = fed.members[:2]
    payload = os.urandom(5000)
    with monkeypatch.context() as m:  # the attacker's own, patched sealer
        m.setattr(E, "CHUNK_BYTES", 1)
        m.setattr(E, "MIN_CHUNK_BYTES", 1)
        message = seal(payload, fed.meta(sender), sender, fed.recipients(reader))
    digests, decrypts = Counter(E._digest), Counter(E._decrypt_chunk)
    monkeypatch.setattr(E, "_digest", digests)
    monkeypatch.setattr(E, "_decrypt_chunk", decrypts)
    certs = Counter(fed.certs.get)
    with pytest.raises(Rejected) as err:
        fed.open(message, reader, certs=certs)
    assert err.value.reason is Reason.TOO_MANY_PARTS
    assert "5000 chunks" in err.value.detail
    assert (digests.calls, decrypts.calls, certs.calls) == (0, 0, 0)


def test_chunk_count_boundary(fed: Fed, small_chunks) -> None:
    sender, reader = fed.members[:2]
    message = seal(os.urandom(2500), fed.meta(sender), sender, fed.recipients(reader))
    assert fed.open(message, reader)[1]  # 3 chunks of 1000: the most 2,500 bytes may have
    assert E.max_chunks(2500) == 3
    assert _reason(fed.open, _repack(message, sender, chunk=833), reader) is Reason.TOO_MANY_PARTS  # 4


def test_seal_never_produces_what_open_refuses(fed: Fed, monkeypatch) -> None:
    sender, reader = fed.members[:2]
    assert E.CHUNK_BYTES >= E.MIN_CHUNK_BYTES
    monkeypatch.setattr(E, "CHUNK_BYTES", E.MIN_CHUNK_BYTES // 2)
    assert fed.open(seal(b"s" * 100, fed.meta(sender), sender, fed.recipients(reader)), reader)[1]
    with pytest.raises(ValueError, match="MIN_CHUNK_BYTES"):
        seal(os.urandom(E.MIN_CHUNK_BYTES + 1), fed.meta(sender), sender, fed.recipients(reader))
    too_many = {f"r{i}": reader.box_public_bytes for i in range(E.MAX_RECIPIENTS + 1)}
    with pytest.raises(ValueError, match="recipients"):
        seal(b"u", fed.meta(sender), sender, too_many)


def _crowd(reader: Identity, n: int, id_chars: int = 16) -> dict[str, bytes]:
    """`reader` plus n - 1 made-up recipients with ids of `id_chars` characters."""
    crowd = {f"{i:0{id_chars}d}": os.urandom(32) for i in range(n - 1)}
    return crowd | {reader.node_id: reader.box_public_bytes}


@pytest.mark.parametrize("size", [0, 1, 5000, E.MIN_CHUNK_BYTES * 3 + 1])
def test_max_recipients_with_the_longest_ids_still_opens(fed: Fed, size: int) -> None:
    sender, reader = fed.members[:2]
    recipients = _crowd(reader, E.MAX_RECIPIENTS, id_chars=64)
    message = seal(os.urandom(size), fed.meta(sender), sender, recipients)
    assert _header_len(message) <= E.max_header_bytes(len(message))
    assert len(fed.open(message, reader)[1]) == size


def test_too_many_recipients_is_oversize_before_the_signature(fed: Fed) -> None:
    sender, reader = fed.members[:2]
    message = seal(b"p" * 100, fed.meta(sender), sender, fed.recipients(reader))
    wrapped = msgpack.unpackb(message[8 : 8 + _header_len(message)], raw=False)["keys"][reader.node_id]
    keys = {f"{i:x}": wrapped for i in range(E.MAX_RECIPIENTS)} | {reader.node_id: wrapped}
    hostile = _repack(message, sender, keys=keys)  # short ids: the header itself is short enough
    assert _header_len(hostile) <= E.max_header_bytes(len(hostile))
    certs = Counter(fed.certs.get)
    with pytest.raises(Rejected) as err:
        fed.open(hostile, reader, certs=certs)
    assert err.value.reason is Reason.OVERSIZE
    assert str(E.MAX_RECIPIENTS + 1) in err.value.detail
    assert certs.calls == 0


def test_a_header_longer_than_the_message_needs_is_refused_before_unpacking(fed: Fed, monkeypatch) -> None:
    sender, reader = fed.members[:2]
    message = seal(b"p" * 100, fed.meta(sender), sender, fed.recipients(reader))
    wrapped = msgpack.unpackb(message[8 : 8 + _header_len(message)], raw=False)["keys"][reader.node_id]
    keys = {f"{i:016x}": wrapped for i in range(10_000)} | {reader.node_id: wrapped}
    hostile = _repack(message, sender, keys=keys)
    unpacks = Counter(E.msgpack.unpackb)
    monkeypatch.setattr(E.msgpack, "unpackb", unpacks)
    with pytest.raises(Rejected) as err:
        fed.open(hostile, reader)
    assert err.value.reason is Reason.OVERSIZE
    assert unpacks.calls == 0
    assert E.max_header_bytes(len(hostile)) < _header_len(hostile) <= E.MAX_HEADER_BYTES
