"""Tensor frames: round trips, zero-copy views, strict refusal of malformed frames, model checks."""

from __future__ import annotations

import random
import struct

import msgpack
import numpy as np
import pytest

from p2pfl import codec
from p2pfl.errors import Reason, Rejected

DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"]


def _sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def _frame(header: object, blob: bytes = b"", pad: bytes | None = None) -> bytes:
    """Build a frame by hand, to feed decode things encode would never produce."""
    h = msgpack.packb(header, use_bin_type=True)
    head_end = 8 + len(h)
    if pad is None:
        pad = bytes(-head_end % 8)
    return b"P2T1" + struct.pack("<I", len(h)) + h + pad + blob


def _malformed(buf) -> str:
    with pytest.raises(Rejected) as err:
        codec.decode(buf)
    assert err.value.reason is Reason.MALFORMED
    return err.value.detail


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (7,), (5, 3), (2, 3, 4, 5)])
def test_round_trip_dtypes_and_shapes(dtype: str, shape: tuple[int, ...]) -> None:
    params = {"w": _sample(dtype, shape), "b": _sample(dtype, (3,), seed=1)}
    out = codec.decode(codec.encode(params))
    assert list(out) == ["w", "b"]
    for name, arr in params.items():
        assert out[name].dtype == np.dtype(dtype)
        assert out[name].shape == arr.shape
        np.testing.assert_array_equal(out[name], arr)
        assert not out[name].flags.writeable


def test_decode_is_zero_copy_and_aligned() -> None:
    params = {
        "a": np.arange(3, dtype=np.int8),
        "b": np.ones((4, 5), np.float64),
        "c": np.zeros(3, np.float16),
    }
    buf = codec.encode(params)
    base = np.frombuffer(buf, np.uint8).ctypes.data
    out = codec.decode(buf)
    for arr in out.values():
        start = arr.ctypes.data - base
        assert 0 <= start and start + arr.nbytes <= len(buf)  # a view into buf, no copy
        assert start % 8 == 0
        assert not arr.flags.owndata


def test_large_round_trip() -> None:
    rng = np.random.default_rng(3)
    params = {f"layer{i}.weight": rng.standard_normal((1000, 1250), dtype=np.float32) for i in range(4)}
    params["odd"] = np.arange(13, dtype=np.int16)
    buf = codec.encode(params)
    assert len(buf) > 20_000_000
    out = codec.decode(memoryview(buf))
    for name, arr in params.items():
        np.testing.assert_array_equal(out[name], arr)


def test_writable_inputs_give_read_only_views() -> None:
    buf = bytearray(codec.encode({"x": np.arange(4.0)}))
    out = codec.decode(buf)
    assert not out["x"].flags.writeable
    with pytest.raises(ValueError):
        out["x"][0] = 5


def test_non_native_and_non_contiguous_inputs() -> None:
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    strided = np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]
    fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    out = codec.decode(codec.encode({"be": big_endian, "st": strided, "f": fortran}))
    np.testing.assert_array_equal(out["be"], big_endian)
    assert out["be"].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(out["st"], strided)
    np.testing.assert_array_equal(out["f"], fortran)


def test_empty_mapping_round_trip() -> None:
    assert codec.decode(codec.encode({})) == {}


@pytest.mark.parametrize(
    "value", [np.zeros(3, np.complex64), np.array(["a"]), np.array([object()]), np.zeros(2, np.uint16)]
)
def test_encode_refuses_other_dtypes(value: np.ndarray) -> None:
    with pytest.raises(ValueError):
        codec.encode({"x": value})


def test_truncations_and_extensions_are_malformed() -> None:
    buf = codec.encode({"a": np.arange(5, dtype=np.int32), "b": np.ones(3, np.float64)})
    for n in range(len(buf)):
        _malformed(buf[:n])
    _malformed(buf + b"\x00")
    _malformed(buf + bytes(8))


def _nonzero_pad_frame(blob: bytes) -> bytes:
    for name in ("w", "ww", "www", "wwww"):
        header = [[name, "float32", [4], 0, 16]]
        pad = -(8 + len(msgpack.packb(header))) % 8
        if pad:
            codec.decode(_frame(header, blob))  # zero padding is fine
            return _frame(header, blob, pad=b"\x01" + bytes(pad - 1))
    raise AssertionError("no name gives padding")


def test_handcrafted_bad_frames() -> None:
    good_blob = np.arange(4, dtype=np.float32).tobytes()
    ok = [["w", "float32", [4], 0, 16]]
    assert codec.decode(_frame(ok, good_blob))["w"].tolist() == [0, 1, 2, 3]
    cases = {
        "magic": b"P2T0" + _frame(ok, good_blob)[4:],
        "hlen huge": b"P2T1" + struct.pack("<I", 0xFFFFFFFF) + bytes(16),
        "hlen past end": b"P2T1" + struct.pack("<I", 1000) + bytes(16),
        "header not list": _frame({"w": 1}, good_blob),
        "header garbage": b"P2T1" + struct.pack("<I", 1) + b"\xc1" + bytes(7),
        "header trailing": b"P2T1" + struct.pack("<I", 2) + b"\x90\x90" + bytes(6),
        "entry short": _frame([["w", "float32", [4], 0]], good_blob),
        "entry not list": _frame(["w"], good_blob),
        "name not str": _frame([[b"w", "float32", [4], 0, 16]], good_blob),
        "dtype unknown": _frame([["w", "complex64", [2], 0, 16]], good_blob),
        "dtype object": _frame([["w", "object", [2], 0, 16]], good_blob),
        "dtype big endian": _frame([["w", ">f4", [4], 0, 16]], good_blob),
        "shape negative": _frame([["w", "float32", [-4], 0, 16]], good_blob),
        "shape not list": _frame([["w", "float32", 4, 0, 16]], good_blob),
        "shape float": _frame([["w", "float32", [4.0], 0, 16]], good_blob),
        "shape bool": _frame([["w", "float32", [True, 4], 0, 16]], good_blob),
        "shape too deep": _frame([["w", "float32", [1] * 40, 0, 4]], good_blob[:4] + bytes(4)),
        "shape vs nbytes": _frame([["w", "float32", [3], 0, 16]], good_blob),
        "huge shape": _frame([["w", "float32", [1 << 40, 1 << 40], 0, 16]], good_blob),
        "offset oob": _frame([["w", "float32", [4], 1 << 40, 16]], good_blob),
        "offset negative": _frame([["w", "float32", [4], -8, 16]], good_blob),
        "offset misaligned": _frame([["w", "float32", [2], 4, 8]], good_blob),
        "offset float": _frame([["w", "float32", [4], 0.0, 16]], good_blob),
        "nbytes past blob": _frame([["w", "float32", [8], 0, 32]], good_blob),
        "overlap": _frame([["w", "float32", [4], 0, 16], ["v", "float32", [2], 8, 8]], good_blob),
        "duplicate name": _frame([["w", "float32", [2], 0, 8], ["w", "float32", [2], 8, 8]], good_blob),
        "gap": _frame([["w", "float32", [2], 8, 8]], good_blob),
        "trailing blob": _frame([["w", "float32", [2], 0, 8]], good_blob),
        "nonzero pad": _nonzero_pad_frame(good_blob),
        "declares more entries than fit": b"P2T1" + struct.pack("<I", 5) + b"\xdd\xff\xff\xff\xff" + bytes(3),
        "longer than its entries": b"P2T1" + struct.pack("<I", 5000) + b"\x91" + bytes(4999),
        "map in header": _frame([["w", "float32", {"a": 1}, 0, 16]], good_blob),
        "bin in header": _frame([["w", "float32", [4], 0, 16, b"x"]], good_blob),
    }
    for what, frame in cases.items():
        try:
            detail = _malformed(frame)
        except BaseException:
            print("case:", what)
            raise
        assert detail, what


def test_bad_types_are_malformed() -> None:
    for thing in (None, 5, "P2T1", [1, 2], object()):
        _malformed(thing)


def test_fuzz_random_bytes_only_raise_malformed() -> None:
    rng = random.Random(42)
    good = codec.encode({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros(2, np.int64)})
    samples = [rng.randbytes(rng.randrange(0, 200)) for _ in range(500)]
    samples += [b"P2T1" + rng.randbytes(rng.randrange(0, 100)) for _ in range(500)]
    for _ in range(1000):
        mutated = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        samples.append(bytes(mutated))
    decoded = 0
    for data in samples:
        try:
            out = codec.decode(data)
        except Rejected as exc:
            assert exc.reason is Reason.MALFORMED
        except Exception as exc:  # pragma: no cover
            pytest.fail(f"decode raised {type(exc).__name__} on {data!r:.80}")
        else:
            decoded += 1
            assert all(isinstance(a, np.ndarray) for a in out.values())
    assert decoded > 0  # flips inside the tensor data still decode


# ---------------------------------------------------------------- bounded work per frame


def _empty_tensors(n: int) -> bytes:
    """The measured attack: n empty tensors, a valid frame of ~20 header bytes each."""
    return _frame([[f"t{i}", "float32", [0], 0, 0] for i in range(n)])


@pytest.fixture()
def unpacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts msgpack header unpacks (the first per-tensor work decode does)."""
    calls: list[int] = []
    real = codec.msgpack.unpackb

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(codec.msgpack, "unpackb", counting)
    return calls


def test_many_empty_tensors_are_refused_before_any_per_tensor_work(unpacks: list[int]) -> None:
    frame = _empty_tensors(100_000)
    with pytest.raises(Rejected) as err:
        codec.decode(frame)
    assert err.value.reason is Reason.TOO_MANY_TENSORS
    assert "100000" in err.value.detail
    assert unpacks == []  # refused from the header's first bytes
    with pytest.raises(Rejected) as err:
        codec.decode(_empty_tensors(codec.MAX_TENSORS + 1))
    assert err.value.reason is Reason.TOO_MANY_TENSORS
    assert unpacks == []


def test_max_tensors_still_decodes_and_is_configurable(unpacks: list[int]) -> None:
    params = {f"t{i}": np.zeros(0, np.float32) for i in range(codec.MAX_TENSORS)}
    assert len(codec.decode(codec.encode(params))) == codec.MAX_TENSORS
    with pytest.raises(ValueError):
        codec.encode(params | {"one more": np.zeros(1)})
    three = codec.encode(_model())
    with pytest.raises(Rejected) as err:
        codec.decode(three, max_tensors=2)
    assert err.value.reason is Reason.TOO_MANY_TENSORS
    with pytest.raises(ValueError):
        codec.encode(_model(), max_tensors=2)
    assert len(unpacks) == 1  # only the frame that was decoded was unpacked


def test_expected_tensor_count_refuses_in_constant_time(unpacks: list[int]) -> None:
    spec = codec.spec_of(_model())
    frame = _empty_tensors(codec.MAX_TENSORS)  # within the global cap, far above the model
    with pytest.raises(Rejected) as err:
        codec.decode(frame, expected_tensors=len(spec))
    assert err.value.reason is Reason.TOO_MANY_TENSORS
    with pytest.raises(Rejected) as err:  # fewer: what check_against would say, but before decoding
        codec.decode(codec.encode({"w": np.ones((3, 4), np.float32)}), expected_tensors=len(spec))
    assert err.value.reason is Reason.SHAPE_MISMATCH
    assert unpacks == []
    out = codec.decode(codec.encode(_model()), expected_tensors=len(spec))
    codec.check_against(out, spec)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 65_535, 65_536])
def test_every_msgpack_array_header_size_is_read(n: int) -> None:
    """fixarray (< 16 entries), array16 (< 65,536) and array32 headers give the same count."""
    frame = _empty_tensors(n)
    if n <= codec.MAX_TENSORS:
        assert len(codec.decode(frame)) == n
    else:
        with pytest.raises(Rejected) as err:
            codec.decode(frame)
        assert err.value.reason is Reason.TOO_MANY_TENSORS and str(n) in err.value.detail


def test_header_length_is_bounded_by_its_entry_count(unpacks: list[int]) -> None:
    one = _frame([["w", "float32", [4], 0, 16]], np.arange(4, dtype=np.float32).tobytes())
    assert codec.decode(one)["w"].shape == (4,)
    hlen = struct.unpack_from("<I", one, 4)[0]
    # the same single entry, followed by 64 KB that no single entry can need
    bloated = b"P2T1" + struct.pack("<I", hlen + 65_536) + one[8 : 8 + hlen] + bytes(65_536)
    bloated += bytes(-len(bloated) % 8) + one[-16:]
    assert "longer than" in _malformed(bloated)
    assert len(unpacks) == 1


# ---------------------------------------------------------------- check_against / spec_of


def _model() -> dict[str, np.ndarray]:
    return {"w": np.ones((3, 4), np.float32), "b": np.zeros(4, np.float32), "steps": np.array(3, np.int64)}


def _reason(params, spec) -> Reason:
    with pytest.raises(Rejected) as err:
        codec.check_against(params, spec)
    return err.value.reason


def test_spec_of_and_check_against_accepts_matching() -> None:
    spec = codec.spec_of(_model())
    assert spec == {
        "w": ((3, 4), np.dtype(np.float32)),
        "b": ((4,), np.dtype(np.float32)),
        "steps": ((), np.dtype(np.int64)),
    }
    codec.check_against(codec.decode(codec.encode(_model())), spec)


def test_check_against_mismatches() -> None:
    spec = codec.spec_of(_model())
    m = _model()
    del m["b"]
    assert _reason(m, spec) is Reason.SHAPE_MISMATCH
    m = _model() | {"extra": np.zeros(1, np.float32)}
    assert _reason(m, spec) is Reason.SHAPE_MISMATCH
    m = _model() | {"w": np.ones((4, 3), np.float32)}
    assert _reason(m, spec) is Reason.SHAPE_MISMATCH
    m = _model() | {"w": np.ones((3, 4), np.float64)}
    assert _reason(m, spec) is Reason.DTYPE_MISMATCH
    m = _model() | {"steps": np.array(3, np.int32)}
    assert _reason(m, spec) is Reason.DTYPE_MISMATCH


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_check_against_non_finite(bad: float, dtype: str) -> None:
    small = {"x": np.ones(5, dtype)}
    small["x"][2] = bad
    assert _reason(small, codec.spec_of(small)) is Reason.NON_FINITE
    big = {"x": np.ones(300_001, dtype)}  # spans several blocks; the bad value is in the last one
    big["x"][-1] = bad
    assert _reason(big, codec.spec_of(big)) is Reason.NON_FINITE
    decoded = codec.decode(codec.encode(big))
    assert _reason(decoded, codec.spec_of(big)) is Reason.NON_FINITE


def test_check_against_ignores_integers_and_empty() -> None:
    params = {
        "i": np.full(4, np.iinfo(np.int64).max),
        "e": np.zeros((0, 3), np.float32),
        "s": np.float32(1.5),
    }
    codec.check_against(params, codec.spec_of(params))
