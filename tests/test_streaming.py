"""The streaming update path (seal from codec.frame, in-place open, zero-copy vectors, chunked
mixing, part views) gives exactly what the whole-buffer path gave, and refuses what it refused."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import members_of, round_cores

from p2pfl import codec
from p2pfl import envelope as E
from p2pfl.aggregation import Neighbour, mechanics, mix
from p2pfl.envelope import Owned, ReplayGuard, UpdateMeta, open_envelope, seal
from p2pfl.errors import Reason, Rejected
from p2pfl.round import RoundCore
from p2pfl.transport.framing import Reassembler, part_views, split_message

# 5 x 3 float32 tensors: no padding, so a received vector can be a view of the message
EVEN = {"w": ((40, 30), np.dtype(np.float32)), "b": ((40,), np.dtype(np.float32))}
# an odd-sized tensor first: its padding breaks the single float32 run (the vector is a copy)
ODD = {"b": ((3,), np.dtype(np.float32)), "w": ((40, 30), np.dtype(np.float32))}


def tensors(spec: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(dtype) for name, (shape, dtype) in spec.items()}


def make_cores(tmp_path: Path, spec: dict, n: int = 3) -> list[RoundCore]:
    return round_cores(tmp_path, spec, n, topology="full")


def old_mix(own: np.ndarray, vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """The whole-vector step the node ran before: out = x; out += c_j (x_j - x), in order."""
    out = own.copy()
    tmp = np.empty_like(own)
    for v, w in zip(vectors, weights, strict=True):
        np.subtract(v, own, out=tmp)
        tmp *= np.float32(w)
        out += tmp
    return out


# --------------------------------------------------------------------------------------------------
# codec.frame


def test_frame_reads_every_range_of_the_encoded_bytes() -> None:
    params = {
        "a": np.arange(5, dtype=np.float32),
        "b": np.ones((3, 3)),
        "empty": np.zeros(0, np.int8),
        "c": np.arange(7, dtype=np.int8),
        "flag": np.array([True, False]),
    }
    frame, whole = codec.frame(params), codec.encode(params)
    assert frame.nbytes == len(whole) and frame.tobytes() == whole
    rng = random.Random(0)
    for _ in range(500):
        lo = rng.randint(0, len(whole))
        hi = rng.randint(lo, len(whole))
        out = bytearray(hi - lo)
        frame.read_into(lo, memoryview(out))
        assert bytes(out) == whole[lo:hi]
    with pytest.raises(ValueError):
        frame.read_into(len(whole) - 1, memoryview(bytearray(2)))


# --------------------------------------------------------------------------------------------------
# seal / open


@pytest.fixture
def pair(tmp_path: Path):
    cores = make_cores(tmp_path, EVEN, 2)
    return cores[0], cores[1]


def meta_of(core: RoundCore, seq: int) -> UpdateMeta:
    return UpdateMeta(
        sender=core.node_id,
        federation=core.root.federation_id,
        round=1,
        seq=seq,
        timestamp=time.time(),
        samples=1,
        degree=1,
    )


@pytest.mark.parametrize("size", [0, 1, E.CHUNK_BYTES - 1, E.CHUNK_BYTES, 2 * E.CHUNK_BYTES + 12_345])
def test_seal_from_a_frame_opens_to_the_encoded_bytes_copied_or_in_place(pair, size: int) -> None:
    sender, reader = pair
    params = {
        "x": np.frombuffer(os.urandom(size - size % 4), np.float32),
        "tail": np.arange(size % 4, dtype=np.int8),
    }
    whole = codec.encode(params)
    keys = {reader.node_id: reader.cert.box_key}
    certs = {sender.node_id: sender.cert}.get
    from_frame = seal(codec.frame(params), meta_of(sender, 1), sender.identity, keys)
    from_bytes = seal(whole, meta_of(sender, 2), sender.identity, keys)
    assert len(from_frame) == len(from_bytes)
    guard = ReplayGuard()
    _, copied = open_envelope(bytes(from_frame), reader.identity, reader.root, certs, guard, 1 << 30)
    _, in_place = open_envelope(
        from_bytes, reader.identity, reader.root, certs, guard, 1 << 30, in_place=True
    )
    assert bytes(copied) == whole and bytes(in_place) == whole
    assert in_place.obj is from_bytes  # the plaintext lies in the message's own memory


def test_in_place_open_refuses_what_the_copying_open_refuses(pair) -> None:
    sender, reader = pair
    keys = {reader.node_id: reader.cert.box_key}
    certs = {sender.node_id: sender.cert}.get
    payload = os.urandom(2 * E.CHUNK_BYTES + 99)
    good = seal(payload, meta_of(sender, 10), sender.identity, keys)

    def refusal(message: bytearray, guard: ReplayGuard | None = None, max_bytes: int = 1 << 30) -> Reason:
        with pytest.raises(Rejected) as err:
            open_envelope(
                message, reader.identity, reader.root, certs, guard or ReplayGuard(), max_bytes, in_place=True
            )
        return err.value.reason

    tampered = Owned.of(good)
    tampered[-5] ^= 1  # last chunk: the first ones are decrypted in place before it is found
    guard = ReplayGuard()
    assert refusal(tampered, guard) is Reason.DIGEST_MISMATCH
    assert guard.last_seq(sender.node_id) is None  # a refused update is not recorded
    assert refusal(Owned.of(good[:-1])) is Reason.MALFORMED  # truncated
    assert refusal(Owned.of(good[: len(good) // 2])) is Reason.MALFORMED
    assert refusal(Owned.of(good), max_bytes=len(good) - 1) is Reason.OVERSIZE
    with pytest.raises(ValueError):  # in place needs a buffer it may overwrite
        open_envelope(bytes(good), reader.identity, reader.root, certs, ReplayGuard(), 1 << 30, in_place=True)
    # the same message, untouched, still opens (and then replays are refused as before)
    guard = ReplayGuard()
    _, plain = open_envelope(
        Owned.of(good), reader.identity, reader.root, certs, guard, 1 << 30, in_place=True
    )
    assert bytes(plain) == payload
    assert refusal(Owned.of(good), guard) is Reason.REPLAY


# --------------------------------------------------------------------------------------------------
# admit: in place, zero-copy vectors


@pytest.mark.parametrize("spec", [EVEN, ODD], ids=["even", "odd"])
def test_admit_of_an_owned_message_gives_the_same_vector(tmp_path: Path, spec: dict) -> None:
    a, b, c = make_cores(tmp_path, spec)
    who = members_of([a, b, c])
    plan = a.plan(1, who)
    b.plan(1, who)
    sent = tensors(spec, 7)
    message = a.pack(sent, a.flatten(sent), plan)
    assert message is not None
    _, as_bytes = b.admit(a.node_id, bytes(message), who)  # the whole-buffer path
    owned = Owned.of(message)
    _, in_place = c.admit(a.node_id, owned, who)  # decrypted in place, flattened without a copy
    expected = a.flatten(sent)
    assert as_bytes.vector.tobytes() == expected.tobytes() == in_place.vector.tobytes()
    assert np.shares_memory(in_place.vector, np.frombuffer(owned, np.uint8)) == (spec is EVEN)
    assert in_place.vector.dtype == np.float32 and in_place.vector.shape == expected.shape


def test_admit_still_refuses_non_finite_and_misfit_updates_in_place(tmp_path: Path) -> None:
    a, b, _ = make_cores(tmp_path, EVEN)
    who = members_of([a, b])
    plan = a.plan(1, who)
    b.plan(1, who)
    bad = tensors(EVEN, 1)
    bad["w"][3, 4] = np.nan
    message = a.pack(bad, a.flatten(bad), plan)
    with pytest.raises(Rejected) as err:
        b.admit(a.node_id, Owned.of(message), who)
    assert err.value.reason is Reason.NON_FINITE
    odd = tensors({"w": ((40, 30), np.dtype(np.float32)), "b": ((41,), np.dtype(np.float32))}, 2)
    message = a.pack(odd, np.zeros(1, np.float32), plan)
    with pytest.raises(Rejected) as err:
        b.admit(a.node_id, Owned.of(message), who)
    assert err.value.reason is Reason.SHAPE_MISMATCH


def test_a_streamed_round_mixes_to_the_old_whole_vector_result(tmp_path: Path) -> None:
    cores = make_cores(tmp_path, EVEN)
    who = members_of(cores)
    plans = {c.node_id: c.plan(1, who) for c in cores}
    models = {c.node_id: tensors(EVEN, i) for i, c in enumerate(cores)}
    messages = {
        c.node_id: c.pack(models[c.node_id], c.flatten(models[c.node_id]), plans[c.node_id]) for c in cores
    }
    me = cores[0]
    received = {other.node_id: Owned.of(messages[other.node_id]) for other in cores[1:]}
    for other in cores[1:]:
        round_, nb = me.admit(other.node_id, received[other.node_id], who)
        me.accept(round_, nb, time.monotonic())
    own = me.flatten(models[me.node_id])
    result, staleness = me.mix(own, plans[me.node_id])
    assert sorted(staleness) == sorted(c.node_id for c in cores[1:])
    others = [cores[1].flatten(models[cores[1].node_id]), cores[2].flatten(models[cores[2].node_id])]
    others_by_id = dict(zip([c.node_id for c in cores[1:]], others, strict=True))
    order = [n for n in plans[me.node_id].neighbours]
    expected = old_mix(own, [others_by_id[n] for n in order], [result.weights[n] for n in order])
    assert result.vector.tobytes() == expected.tobytes()
    # the result was written over a received update's own memory, not into a new buffer
    assert any(np.shares_memory(result.vector, np.frombuffer(received[n], np.uint8)) for n in order)


# --------------------------------------------------------------------------------------------------
# chunked mixing


@pytest.mark.parametrize("rule", ["mean", "clipped"])
def test_chunked_step_equals_the_whole_vector_step(monkeypatch, rule: str) -> None:
    monkeypatch.setattr(mechanics, "STEP_CHUNK", 7)  # many chunks and a ragged last one
    rng = np.random.default_rng(3)
    own = rng.standard_normal(100).astype(np.float32)
    nbs = [Neighbour(f"n{i}", rng.standard_normal(100).astype(np.float32), 2, 10) for i in range(3)]
    import p2pfl.aggregation.mixing as mixing

    monkeypatch.setattr(mixing, "STEP_CHUNK", 7)
    result = mix(own, 3, nbs, rule, radius=None if rule == "mean" else 5.0)
    for nb in nbs:
        assert result.distances[nb.node_id] == pytest.approx(float(np.linalg.norm(nb.vector - own)), rel=1e-6)
    tau = result.radius
    coefs = [
        result.weights[nb.node_id]
        * (min(1.0, tau / result.distances[nb.node_id]) if tau is not None else 1.0)
        for nb in nbs
    ]
    assert result.vector.tobytes() == old_mix(own, [nb.vector for nb in nbs], coefs).tobytes()


@pytest.mark.parametrize("rule", ["mean", "robust", "median"])
def test_an_owned_neighbour_buffer_takes_the_result_and_nothing_else_changes(rule: str) -> None:
    from p2pfl.aggregation import Reputation

    rng = np.random.default_rng(5)
    own = rng.standard_normal(50).astype(np.float32)
    vectors = [rng.standard_normal(50).astype(np.float32) for _ in range(3)]

    def run(owned: bool):
        nbs = [Neighbour(f"n{i}", v.copy(), 3, 10, owned=owned) for i, v in enumerate(vectors)]
        return nbs, mix(own, 3, nbs, rule, reputation=Reputation())

    _, fresh = run(False)
    nbs, reused = run(True)
    assert reused.vector.tobytes() == fresh.vector.tobytes()
    assert reused.distances == fresh.distances and reused.weights == fresh.weights
    if rule == "median":  # a coordinate-wise rule allocates its own result
        assert not any(np.shares_memory(reused.vector, nb.vector) for nb in nbs)
    else:
        assert np.shares_memory(reused.vector, nbs[0].vector)


def test_a_non_finite_neighbour_is_still_left_out(monkeypatch) -> None:
    import p2pfl.aggregation.mixing as mixing

    monkeypatch.setattr(mechanics, "STEP_CHUNK", 5)
    monkeypatch.setattr(mixing, "STEP_CHUNK", 5)
    own = np.ones(23, np.float32)
    own[12] = 3e38
    broken = np.ones(23, np.float32)
    broken[21] = np.inf
    overflowing = np.ones(23, np.float32)
    overflowing[12] = -3e38  # its difference from own overflows float32, in the third chunk
    far = np.full(23, 1e30, np.float32)  # finite: the float32 sum of squares overflows, not the norm
    got = [Neighbour("bad", broken, 3, 1), Neighbour("over", overflowing, 3, 1), Neighbour("far", far, 3, 1)]
    result = mix(own, 3, got, "mean")
    assert result.weights["bad"] == result.weights["over"] == 0.0 and result.weights["far"] == 0.25
    assert result.distances["bad"] == result.distances["over"] == np.inf
    assert result.distances["far"] == pytest.approx(float(np.linalg.norm((far - own).astype(np.float64))))
    assert result.vector.tobytes() == old_mix(own, [far], [0.25]).tobytes()


# --------------------------------------------------------------------------------------------------
# framing: part views and the releasing join


def test_part_views_are_the_split_parts_without_copies() -> None:
    message = bytearray(os.urandom(10_000))
    views = part_views(message, 3000, message_id=b"m" * 16)
    parts = split_message(message, 3000, message_id=b"m" * 16)
    assert [bytes(v) for v in views] == parts and [len(v) for v in views] == [len(p) for p in parts]
    assert all(
        np.shares_memory(np.frombuffer(v.body, np.uint8), np.frombuffer(message, np.uint8)) for v in views
    )


def test_reassembly_returns_an_owned_message_and_still_refuses_bad_parts() -> None:
    message = os.urandom(9_001)
    parts = split_message(message, 2048)
    r = Reassembler(max_message_bytes=20_000)
    got = None
    for i, part in reversed(list(enumerate(parts))):
        got = r.add("p", part, i)
    assert isinstance(got, Owned) and got == message
    assert r.pending_bytes() == 0
    fresh = split_message(message, 2048)
    with pytest.raises(Rejected) as err:
        Reassembler(max_message_bytes=20_000).add("p", fresh[0][:-1], 0)  # truncated part
    assert err.value.reason is Reason.MALFORMED
    with pytest.raises(Rejected) as err:
        Reassembler(max_message_bytes=9_000).add("p", fresh[0], 0)  # the message is too large
    assert err.value.reason is Reason.OVERSIZE
    with pytest.raises(Rejected) as err:
        Reassembler(max_message_bytes=20_000).add("p", fresh[1], 0)  # index differs from the topic's
    assert err.value.reason is Reason.MALFORMED


# --------------------------------------------------------------------------------------------------
# parameters read without a copy


def test_param_views_show_the_model_without_copying_it() -> None:
    import torch

    from p2pfl.learning.params import flatten, get_params, param_views

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    views, copies = param_views(model), get_params(model)
    assert list(views) == list(copies)
    assert flatten(views).tobytes() == flatten(copies).tobytes()
    weight = views["0.weight"]
    assert not weight.flags.writeable and np.shares_memory(weight, model[0].weight.detach().numpy())
    assert views["1.num_batches_tracked"].dtype == np.float32  # an int64 buffer: a float32 copy
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert np.array_equal(weight, copies["0.weight"] + 1.0)  # a view follows the model


def test_a_message_the_os_cannot_map_is_refused_as_oversize(monkeypatch) -> None:
    def no_memory(size: int) -> Owned:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(Owned, "empty", staticmethod(no_memory))
    parts = split_message(os.urandom(9_000), 2048)
    r = Reassembler(max_message_bytes=20_000)
    with pytest.raises(Rejected) as err:
        r.add("p", parts[0], 0)
    assert err.value.reason is Reason.OVERSIZE
    assert all(r.add("p", p, i) is None for i, p in enumerate(parts[1:], start=1))  # refused once
    assert r.pending_bytes() == 0
