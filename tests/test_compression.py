"""Compressed updates (p2pfl.compression): settings, error bounds, error feedback, hostile frames, the
round core's compressed path, and the same numbers on real round cores as in the simulator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from helpers import certify, round_cores
from memory_mesh import Hub
from test_round import node_config, run_until_crash, until

from p2pfl import codec, compression
from p2pfl.compression import (
    DIFF,
    HEAD,
    INDEX,
    KEYFRAME,
    MODEL,
    SCALES,
    VALUES,
    Compression,
    CompressionError,
    Estimates,
    OwnEstimate,
    chunk_starts,
    decode_rows,
    encode_rows,
    read_wire,
)
from p2pfl.config import NodeConfig, validate
from p2pfl.errors import ConfigError, Reason, Rejected
from p2pfl.federation import FederationAuthority
from p2pfl.metrics import read_jsonl
from p2pfl.node import Node
from p2pfl.round import RoundCore
from p2pfl.sim import SimConfig, Simulation, consensus_distance, gossip

D = 1000


def rng_rows(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def roundtrip(setting: str, v: np.ndarray, round_: int = 1) -> np.ndarray:
    c = Compression.parse(setting)
    starts = chunk_starts(c, v.shape[1])
    keys = np.arange(v.shape[0], dtype=np.uint64)
    packed = encode_rows(c, v, keys=keys, round_=round_, starts=starts, kind=MODEL)
    return decode_rows(c, packed, v.shape[1], starts)


# -- settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scheme", "diff", "gamma"),
    [
        ("none", "none", False, 1.0),
        ("fp16", "fp16", False, 1.0),
        ("BF16", "bf16", False, 1.0),
        ("int8", "int8", False, 1.0),
        ("int8:512,form=diff", "int8", True, 1.0),
        ("topk:0.01", "topk", True, 0.02),
        ("topk:0.7", "topk", True, 1.0),
        ("topk:0.05, gamma=0.7", "topk", True, 0.7),
    ],
)
def test_settings_parse(text: str, scheme: str, diff: bool, gamma: float) -> None:
    c = Compression.parse(text)
    assert (c.scheme, c.diff, c.gamma) == (scheme, diff, gamma)
    assert c.enabled == (scheme != "none")


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("gzip", "use one of none, fp16"),
        ("topk", "topk needs a fraction in \\(0, 1\\]"),
        ("topk:1.5", "e.g. topk:0.01"),
        ("int8:3", "int8:CHUNK needs 8"),
        ("fp16:2", "takes no parameter"),
        ("topk:0.1,gamma=0", "gamma .* must be in \\(0, 1\\]"),
        ("topk:0.1,form=model", "topk: form must be diff"),
        ("int8,colour=red", "unknown compression option"),
    ],
)
def test_bad_settings_say_what_to_write(text: str, hint: str) -> None:
    with pytest.raises(CompressionError, match=hint):
        Compression.parse(text)
    assert issubclass(CompressionError, ConfigError)


def test_node_config_validates_compression() -> None:
    cfg = NodeConfig()
    cfg.gossip.compression = "topk:0.02"
    validate(cfg)
    cfg.gossip.compression = "topk:0"
    with pytest.raises(ConfigError, match=r"\[gossip\] compression: topk needs a fraction"):
        validate(cfg)
    cfg.gossip.compression, cfg.gossip.topology = "topk:0.1", "one-peer-exponential"
    with pytest.raises(ConfigError, match="use a static topology"):
        validate(cfg)
    cfg.gossip.compression = "int8"  # the model form needs no chain: fine on any topology
    validate(cfg)
    cfg.gossip.keyframe_every = 0
    with pytest.raises(ConfigError, match="keyframe_every must be 1..100000"):
        validate(cfg)


def test_simulator_refuses_what_a_node_would() -> None:
    with pytest.raises(ConfigError, match="push-sum"):
        SimConfig(rule="push-sum", compression="fp16")
    with pytest.raises(ConfigError, match="static topology"):
        SimConfig(topology="one-peer-exponential", compression="topk:0.1")


# -- error bounds -----------------------------------------------------------------------------------


def test_fp16_and_bf16_round_to_their_precision() -> None:
    v = rng_rows(3)
    assert np.all(np.abs(roundtrip("fp16", v) - v) <= np.abs(v) * 2.0**-11 + 1e-7)
    assert np.all(np.abs(roundtrip("bf16", v) - v) <= np.abs(v) * 2.0**-8)


def test_int8_error_is_below_one_level_and_unbiased() -> None:
    v = rng_rows(2)
    c = Compression.parse("int8:100")
    starts = chunk_starts(c, D)
    scales = np.maximum.reduceat(np.abs(v), starts, axis=1)
    level = np.repeat(scales / 127, 100, axis=1)
    draws = np.stack([roundtrip("int8:100", v, round_=r) for r in range(200)])
    assert np.all(np.abs(draws - v) <= level * 1.0001)
    bias = np.abs(draws.mean(axis=0) - v)  # 200 independent roundings: the mean closes in
    assert float(bias.mean()) < 0.1 * float(level.mean())


def test_int8_per_tensor_scales_follow_the_tensors() -> None:
    c = Compression.parse("int8:tensor")
    assert chunk_starts(c, 10, [4, 0, 6]).tolist() == [0, 4]
    v = np.concatenate([np.full(4, 100.0), np.full(6, 0.01)]).astype(np.float32)[None]
    out = decode_rows(
        c,
        encode_rows(c, v, keys=np.zeros(1, np.uint64), round_=1, starts=np.array([0, 4]), kind=MODEL),
        10,
        np.array([0, 4]),
    )
    np.testing.assert_allclose(out, v, rtol=1e-6)  # each tensor's own scale: 0.01 is not lost


def test_topk_keeps_exactly_the_largest_entries() -> None:
    v = rng_rows(4)
    out = roundtrip("topk:0.05", v)
    k = Compression.parse("topk:0.05").k(D)
    assert k == 50
    for row, got in zip(v, out, strict=True):
        kept = np.flatnonzero(got)
        assert len(kept) == k
        assert set(kept) == set(np.argsort(-np.abs(row))[:k])
        np.testing.assert_array_equal(got[kept], row[kept])


def test_rows_at_once_equal_rows_one_by_one() -> None:
    """The simulator encodes N rows in one call, a node one row: the numbers must be the same."""
    v = rng_rows(5)
    keys = np.array([compression.node_key(f"node-{i}", 3) for i in range(5)], dtype=np.uint64)
    for setting in ("fp16", "bf16", "int8", "int8:64", "topk:0.03"):
        c = Compression.parse(setting)
        starts = chunk_starts(c, D)
        all_rows = decode_rows(
            c, encode_rows(c, v, keys=keys, round_=7, starts=starts, kind=MODEL), D, starts
        )
        for i in range(5):
            one = encode_rows(c, v[i : i + 1], keys=keys[i : i + 1], round_=7, starts=starts, kind=MODEL)
            np.testing.assert_array_equal(decode_rows(c, one, D, starts)[0], all_rows[i])


# -- error feedback ---------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["topk:0.05", "int8,form=diff", "int8", "fp16"])
def test_compressed_gossip_reaches_consensus_and_keeps_the_mean(setting: str) -> None:
    x0 = rng_rows(8, 200, seed=1)
    x, dist, _ = gossip(x0, "ring", 300, compress=setting, keyframe_every=1000)
    assert dist[-1] < 1e-3 * dist[0]
    np.testing.assert_allclose(x.mean(axis=0), x0.mean(axis=0), atol=2e-3)


def test_topk_without_error_feedback_memory_would_not_converge() -> None:
    """The estimate is the memory: each diff carries what earlier ones left out."""
    c = Compression.parse("topk:0.05")
    own = OwnEstimate(c, 1, chunk_starts(c, 200), keyframe_every=1000)
    target = rng_rows(1, 200)[0]
    for r in range(1, 60):
        own.pack(target, r)
    assert own.estimate is not None
    assert float(np.abs(own.estimate - target).max()) < 1e-2  # 59 diffs of 10 entries chased it down


# -- the diff chain: keyframes, bases, out of sync --------------------------------------------------


def wire(own: OwnEstimate, v: np.ndarray, round_: int) -> dict[str, np.ndarray]:
    return codec.decode(codec.encode(own.pack(v, round_)))


def test_a_receiver_that_missed_a_diff_waits_for_the_next_keyframe() -> None:
    c = Compression.parse("topk:0.1")
    starts = chunk_starts(c, 50)
    own, theirs = OwnEstimate(c, 9, starts, keyframe_every=3), Estimates(c)
    v = rng_rows(6, 50)
    frames = [wire(own, v[r - 1], r) for r in range(1, 7)]
    kinds = [int(f[HEAD][2]) for f in frames]
    assert kinds == [KEYFRAME, DIFF, DIFF, KEYFRAME, DIFF, DIFF]
    theirs.apply("a", 1, read_wire(c, frames[0], 50, starts))
    # round 2 is lost; round 3's diff extends round 2
    with pytest.raises(Rejected) as info:
        theirs.apply("a", 3, read_wire(c, frames[2], 50, starts))
    assert info.value.reason is Reason.OUT_OF_SYNC and "next keyframe" in info.value.detail
    got = theirs.apply("a", 4, read_wire(c, frames[3], 50, starts))  # the keyframe: in sync again
    got = theirs.apply("a", 5, read_wire(c, frames[4], 50, starts))
    np.testing.assert_array_equal(got, own_estimate_after(c, starts, v, 5))


def own_estimate_after(c: Compression, starts: np.ndarray, v: np.ndarray, rounds: int) -> np.ndarray:
    own = OwnEstimate(c, 9, starts, keyframe_every=3)
    for r in range(1, rounds + 1):
        own.pack(v[r - 1], r)
    assert own.estimate is not None
    return own.estimate


# -- hostile frames ---------------------------------------------------------------------------------


def good_frame(setting: str, kind: int = DIFF) -> tuple[Compression, dict[str, np.ndarray], np.ndarray]:
    c = Compression.parse(setting)
    starts = chunk_starts(c, D)
    own = OwnEstimate(c, 5, starts)
    v = rng_rows(2)
    frame = own.pack(v[0], 1)
    if kind == DIFF:
        frame = own.pack(v[1], 2)
    return c, {k: np.array(a) for k, a in frame.items()}, starts


def rejected(c: Compression, frame: dict[str, np.ndarray], starts: np.ndarray) -> Reason:
    with pytest.raises(Rejected) as info:
        read_wire(c, codec.decode(codec.encode(frame)), D, starts)
    return info.value.reason


def test_hostile_topk_frames_are_refused() -> None:
    c, frame, starts = good_frame("topk:0.01")
    read_wire(c, frame, D, starts)  # the honest one passes
    for index in ([D] + list(range(9)), [-1] + list(range(1, 10)), [3, 3] + list(range(4, 12))):
        bad = {**frame, INDEX: np.array(sorted(index), dtype=np.int32)}
        assert rejected(c, bad, starts) is Reason.MALFORMED
    unsorted = {**frame, INDEX: frame[INDEX][::-1].copy()}
    assert rejected(c, unsorted, starts) is Reason.MALFORMED
    longer = {**frame, INDEX: np.arange(11, dtype=np.int32), VALUES: np.zeros(11, np.float32)}
    assert rejected(c, longer, starts) is Reason.MALFORMED  # the head says k = 10: a count over the bound
    longer[HEAD] = frame[HEAD].copy()
    longer[HEAD][5] = 11
    assert rejected(c, longer, starts) is Reason.COMPRESSION
    wide = {**frame, INDEX: frame[INDEX].astype(np.int64)}
    assert rejected(c, wide, starts) is Reason.MALFORMED
    nan = {**frame, VALUES: np.full(10, np.nan, np.float32)}
    assert rejected(c, nan, starts) is Reason.NON_FINITE


def test_hostile_int8_frames_are_refused() -> None:
    c, frame, starts = good_frame("int8")
    read_wire(c, frame, D, starts)
    for scales in (np.full(len(starts), np.inf), np.full(len(starts), -1.0), np.full(len(starts), np.nan)):
        assert rejected(c, {**frame, SCALES: scales.astype(np.float32)}, starts) is Reason.MALFORMED
    assert rejected(c, {**frame, SCALES: frame[SCALES][:-1].copy()}, starts) is Reason.MALFORMED
    codes = frame[VALUES].copy()
    codes[0] = -128
    assert rejected(c, {**frame, VALUES: codes}, starts) is Reason.MALFORMED
    huge = {**frame, SCALES: np.full(len(starts), 3e38, np.float32)}
    read_wire(c, huge, D, starts)  # finite: decoded values stay below the scale


def test_frames_of_another_setting_or_shape_are_refused_with_what_to_change() -> None:
    c, frame, starts = good_frame("topk:0.01")
    other = Compression.parse("topk:0.02")
    with pytest.raises(Rejected, match="same \\[gossip\\] compression") as info:
        read_wire(other, frame, D, starts)
    assert info.value.reason is Reason.COMPRESSION
    int8 = Compression.parse("int8")
    assert rejected(int8, frame, chunk_starts(int8, D)) is Reason.COMPRESSION
    assert rejected(c, {"w": np.zeros(3, np.float32)}, starts) is Reason.COMPRESSION
    frame[HEAD][4] = D + 1
    assert rejected(c, frame, starts) is Reason.SHAPE_MISMATCH
    frame[HEAD][4], frame[HEAD][0] = D, 99
    assert rejected(c, frame, starts) is Reason.MALFORMED
    _, keyframe, _ = good_frame("topk:0.01", kind=KEYFRAME)
    keyframe[VALUES] = keyframe[VALUES].astype(np.float64)
    assert rejected(c, keyframe, starts) is Reason.MALFORMED
    extra = {**frame, "z:more": np.zeros(1, np.int8)}
    extra[HEAD][0] = 1
    assert rejected(c, extra, starts) is Reason.MALFORMED


def test_a_diff_that_overflows_the_estimate_is_refused_and_forgotten() -> None:
    c = Compression.parse("int8,form=diff")
    starts = chunk_starts(c, 20)
    est = Estimates(c)
    est.table["a"] = (np.full(20, 3e38, np.float32), 1)
    msg = compression.Message(DIFF, 1, np.full(20, 3e38, np.float32))
    with pytest.raises(Rejected) as info:
        est.apply("a", 2, msg)
    assert info.value.reason is Reason.NON_FINITE and "a" not in est.table
    del starts


# -- the round core: real envelopes, and the simulator's numbers ------------------------------------

LOGREG_SPEC = {"weight": ((10, 64), np.dtype(np.float32)), "bias": ((10,), np.dtype(np.float32))}


def make_cores(tmp: Path, settings: list[str], seed: int = 5) -> list[RoundCore]:
    each = [{"compression": setting} for setting in settings]
    return round_cores(tmp, LOGREG_SPEC, len(settings), each=each, seed=seed, keyframe_every=3)


def play_round(
    cores: list[RoundCore], x: np.ndarray, round_: int, lose: tuple[int, int] | None = None
) -> np.ndarray:
    """One round at every core: pack, deliver to the neighbours (all but `lose` = (receiver, sender)),
    admit, mix. Returns the new N x D models."""
    members = {c.node_id: c.cert for c in cores}
    index = {c.node_id: i for i, c in enumerate(cores)}
    plans = [c.plan(round_, members) for c in cores]
    for i, (c, plan) in enumerate(zip(cores, plans, strict=True)):
        message = c.pack({}, x[i], plan)
        assert message is not None
        for n in plan.neighbours:
            j = index[n]
            if lose == (j, i):
                continue
            try:
                r, nb = cores[j].admit(c.node_id, message, members)
            except Rejected as exc:
                assert exc.reason is Reason.OUT_OF_SYNC
                continue
            cores[j].accept(r, nb, 0.0)
    return np.stack([c.mix(x[i], plans[i])[0].vector for i, c in enumerate(cores)])


@pytest.mark.parametrize("setting", ["topk:0.1", "int8", "bf16", "int8:32,form=diff"])
def test_round_cores_compute_what_the_simulator_computes(tmp_path: Path, setting: str) -> None:
    """Same ids, seed, models and lost update: real envelopes between round cores and the simulator's
    row-wise path give the same models, round after round (keyframes every 3 rounds included)."""
    cores = make_cores(tmp_path, [setting] * 4)
    x0 = rng_rows(4, 650, seed=2) * 0.1
    sim = Simulation(
        SimConfig(
            task="digits-logreg",
            nodes=4,
            rounds=6,
            topology="ring",
            rule="mean",
            seed=5,
            train=False,
            vectorised=False,  # the per-node loop: aggregation.mix, as on the node
            ids=tuple(c.node_id for c in cores),
            compression=setting,
            keyframe_every=3,
        ),
        x0=x0,
    )
    x = x0.copy()
    for r in range(1, 7):
        x = play_round(cores, x, r)
        sim._mix(r)
        np.testing.assert_array_equal(x, sim.x)
    assert consensus_distance(x) < consensus_distance(x0)


def test_vectorised_simulator_matches_its_per_node_loop() -> None:
    x0 = rng_rows(6, 650, seed=4) * 0.1
    runs = []
    for vectorised in (True, False):
        cfg = SimConfig(
            task="digits-logreg",
            nodes=6,
            rounds=4,
            rule="mean",
            train=False,
            vectorised=vectorised,
            compression="topk:0.1",
            drop=0.2,
            seed=1,
        )
        sim = Simulation(cfg, x0=x0)
        for r in range(1, 5):
            sim._mix(r)
        runs.append(sim.x)
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-6)


def test_a_lost_diff_makes_the_neighbour_missing_until_its_keyframe(tmp_path: Path) -> None:
    cores = make_cores(tmp_path, ["topk:0.2"] * 4)
    x = rng_rows(4, 650, seed=3)
    members = {c.node_id: c.cert for c in cores}
    a = cores[0]
    b = next(c for c in cores if c.node_id == a.plan(1, members).neighbours[0])
    ia, ib = cores.index(a), cores.index(b)
    x = play_round(cores, x, 1)
    x = play_round(cores, x, 2, lose=(ia, ib))  # a misses b's diff of round 2
    plan = a.plan(3, members)
    message = b.pack({}, x[ib], b.plan(3, members))
    assert message is not None
    with pytest.raises(Rejected) as info:
        a.admit(b.node_id, message, members)
    assert info.value.reason is Reason.OUT_OF_SYNC
    del plan
    for c in cores:
        c.inbox.pending.clear()
    cores_round4 = [c.plan(4, members) for c in cores]
    keyframe = b.pack({}, x[ib], cores_round4[ib])  # round 4: 3 rounds after the first keyframe
    assert keyframe is not None
    r, nb = a.admit(b.node_id, keyframe, members)
    assert r == 4 and b.own_estimate.estimate is not None
    np.testing.assert_array_equal(nb.vector, b.own_estimate.estimate)


def test_cores_of_different_settings_refuse_each_other_with_the_reason(tmp_path: Path) -> None:
    cores = make_cores(tmp_path, ["none", "int8", "topk:0.1", "topk:0.1"])
    members = {c.node_id: c.cert for c in cores}
    x = rng_rows(4, 650)
    for sender in cores:
        message = sender.pack(
            {"weight": x[0, :640].reshape(10, 64), "bias": x[0, 640:]}, x[0], sender.plan(1, members)
        )
        assert message is not None
        for receiver in cores:
            if receiver is sender or receiver.node_id not in sender.plan(1, members).neighbours:
                continue
            if receiver.compression == sender.compression:
                receiver.admit(sender.node_id, message, members)
                continue
            with pytest.raises(Rejected) as info:
                receiver.admit(sender.node_id, message, members)
            assert info.value.reason is Reason.COMPRESSION, (sender.compression, receiver.compression)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("setting", ["topk:0.1", "int8"])
def test_nodes_learn_together_with_compressed_updates(tmp_path: Path, setting: str) -> None:
    """Real Nodes ([gossip] compression, training, envelopes, round core) over the in-memory mesh."""
    hub = Hub()
    authority = FederationAuthority.create(tmp_path / "federation")
    nodes = []
    for i in range(4):
        cfg = node_config(tmp_path, i, 4, 8)
        cfg.gossip.compression, cfg.gossip.keyframe_every = setting, 3
        _, cert = certify(authority, cfg.node.name, cfg.data_dir)
        nodes.append(Node(validate(cfg), mesh=hub.mesh(cert)))
    assert all(node.core.compression == Compression.parse(setting) for node in nodes)

    async def main() -> None:
        await asyncio.gather(*(node.run() for node in nodes))

    asyncio.run(main())
    for node in nodes:
        records = read_jsonl(node.cfg.metrics_path)
        assert [r["round"] for r in records] == list(range(1, 9))
        assert records[-1]["accuracy"] > 0.5
        assert not node.metrics.rejected.get("compression")


@pytest.mark.timeout(300)
def test_a_restarted_node_with_compressed_updates_rejoins_from_keyframes(tmp_path: Path) -> None:
    """Nothing of the estimates is checkpointed: the restarted node's first update is a keyframe, and
    it mixes its neighbours again from their next keyframes (every 3 rounds here)."""
    hub = Hub()
    authority = FederationAuthority.create(tmp_path / "federation")
    nodes = []
    for i in range(4):
        cfg = node_config(tmp_path, i, 4, 12)
        cfg.gossip.compression, cfg.gossip.keyframe_every = "topk:0.2", 3
        _, cert = certify(authority, cfg.node.name, cfg.data_dir)
        nodes.append(Node(validate(cfg), mesh=hub.mesh(cert)))
    victim = nodes[3]

    async def main() -> None:
        survivors = [asyncio.ensure_future(node.run()) for node in nodes[:3]]
        await run_until_crash(victim, 4)
        await until(lambda: nodes[0].core.round >= 7)
        restarted = Node(victim.cfg, mesh=hub.mesh(victim.cert))
        assert restarted.core.round == 4 and restarted.core.own_estimate.estimate is None
        await asyncio.gather(*survivors, restarted.run())

    asyncio.run(main())
    records = read_jsonl(victim.cfg.metrics_path)
    assert records[-1]["round"] == 12
    assert any(r.get("neighbours") and len(r["missing"]) < 2 for r in records[4:]), "never mixed again"
    for node in nodes[:3]:
        assert read_jsonl(node.cfg.metrics_path)[-1]["round"] == 12
        assert not node.metrics.rejected.get("compression")


@pytest.mark.parametrize("setting", ["topk:0.01", "int8", "int8:64,form=diff", "bf16", "fp16"])
def test_mutated_frames_are_refused_or_read_never_crash(setting: str) -> None:
    """Random byte flips in honest frames (keyframes and diffs): every outcome is a checked message
    or a Rejected, and an accepted one decodes to finite values of the local length."""
    c = Compression.parse(setting)
    starts = chunk_starts(c, D)
    own = OwnEstimate(c, 5, starts)
    v = rng_rows(2)
    frames = [codec.encode(own.pack(v[0], 1)), codec.encode(own.pack(v[1], 2))]
    rng = np.random.default_rng(11)
    for k in range(400):
        buf = bytearray(frames[k % 2])
        for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 4))):
            buf[pos] = int(rng.integers(0, 256))
        try:
            msg = read_wire(c, codec.decode(bytes(buf), max_tensors=4), D, starts)
        except Rejected:
            continue
        assert msg.values.shape == (D,) and np.isfinite(msg.values).all()
