"""Metrics: every refusal is counted, its log line is rate-limited, and no failure of the log is fatal."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from p2pfl import config
from p2pfl.config import NodeConfig, validate
from p2pfl.errors import ConfigError, Reason
from p2pfl.metrics import LogLimiter, Metrics, read_jsonl, tensorboard_dir


class Clock:
    """A hand-driven monotonic clock: the rate limit is tested without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "p2pfl.metrics"]


def test_a_flood_of_refusals_is_counted_but_logs_one_line_per_reason_and_peer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    metrics = Metrics(tmp_path / "m.jsonl", clock=clock)
    caplog.set_level(logging.WARNING, logger="p2pfl.metrics")
    for _ in range(10_000):
        metrics.reject(Reason.CONN_LIMIT, "over max_per_source 8", peer="10.0.0.9")
    metrics.reject(Reason.HANDSHAKE, "timed out", peer="10.0.0.9")  # another reason: its own line
    assert metrics.rejected["conn_limit"] == 10_000 and metrics.rejected["handshake"] == 1
    assert lines(caplog) == [
        "rejected from 10.0.0.9: conn_limit (over max_per_source 8)",
        "rejected from 10.0.0.9: handshake (timed out)",
    ]
    caplog.clear()
    clock.now += 10.0  # the next line, one interval later, says how many were held back
    metrics.reject(Reason.CONN_LIMIT, "over max_per_source 8", peer="10.0.0.9")
    assert lines(caplog) == [
        "rejected from 10.0.0.9: conn_limit (over max_per_source 8) (9999 more suppressed)"
    ]


def test_held_back_lines_are_summarised_once_the_peer_goes_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    metrics = Metrics(tmp_path / "m.jsonl", clock=clock)
    caplog.set_level(logging.WARNING, logger="p2pfl.metrics")
    for _ in range(4):
        metrics.reject(Reason.REPLAY, "seq 3 <= 7", peer="node-b")
    clock.now += 12.0
    metrics.write({"round": 1})  # the round record flushes the summary
    assert lines(caplog)[-1] == "rejected replay from node-b: 3 more suppressed in the last 12 s"
    caplog.clear()
    metrics.write({"round": 2})  # said once
    clock.now += 12.0
    metrics.write({"round": 3})
    assert lines(caplog) == []


def test_many_peer_names_share_one_line_per_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Peer names can be chosen by the sender: varying them must not buy more log lines."""
    clock = Clock()
    metrics = Metrics(tmp_path / "m.jsonl", clock=clock)
    caplog.set_level(logging.WARNING, logger="p2pfl.metrics")
    for i in range(5_000):
        metrics.reject(Reason.BAD_SIGNATURE, "x" * 10_000, peer=f"spoofed-{i}-" + "y" * 1_000)
    assert metrics.rejected["bad_signature"] == 5_000
    logged = lines(caplog)
    assert len(logged) == 6  # five peers on their own, then one line for all the others
    assert all(len(line) < 600 for line in logged)  # attacker-sized fields are clipped
    clock.now += 10.0
    metrics.write({"round": 1})
    assert lines(caplog)[-1].startswith("rejected bad_signature from other peers: 4994 more suppressed")


def test_the_limiter_keeps_its_memory_bounded() -> None:
    clock = Clock()
    limiter = LogLimiter(logging.getLogger("p2pfl.metrics.test"), 10.0, max_keys=100, clock=clock)
    for i in range(10_000):
        limiter.log(logging.INFO, f"group-{i}", f"key-{i}", "x")
    assert len(limiter._windows) <= 100 + 64


class RaisingHandler(logging.Handler):
    """A handler whose emit (and filter) raise: logging's own guard does not cover every path."""

    def filter(self, record: logging.LogRecord) -> bool:
        raise RuntimeError("handler broken")

    def emit(self, record: logging.LogRecord) -> None:
        raise OSError(28, "No space left on device")


def test_neither_a_failed_write_nor_a_failing_log_handler_is_fatal(tmp_path: Path) -> None:
    target = tmp_path / "metrics.jsonl"
    metrics = Metrics(target)
    logger = logging.getLogger("p2pfl.metrics")
    handler = RaisingHandler()
    logger.addHandler(handler)
    try:
        metrics.reject(Reason.MALFORMED, "bad bytes", peer="node-x")  # the warning's handler raises
        target.mkdir()  # the file cannot be opened for appending: an OSError, logged
        metrics.write({"round": 1})
        target.rmdir()
        metrics.write({"round": 2, "value": object()})  # json cannot hold it: a TypeError, logged
        metrics.write({"round": 3})
    finally:
        logger.removeHandler(handler)
    assert [r["round"] for r in read_jsonl(target)] == [3]
    assert json.loads(target.read_text())["rejected"] == {"malformed": 1}


# -- sinks: the embedding program's callback, TensorBoard --------------------------------------------


def node_cfg(tmp_path: Path, **metrics: object) -> NodeConfig:
    cfg = NodeConfig()
    cfg.node.data_dir = str(tmp_path / "node")
    for key, value in metrics.items():
        setattr(cfg.metrics, key, value)
    return validate(cfg)


def test_each_record_reaches_the_sinks_and_the_first_carries_the_run_settings(tmp_path: Path) -> None:
    seen: list[dict] = []
    metrics = Metrics.for_node(node_cfg(tmp_path), on_round=seen.append)
    metrics.bytes_out = 10
    metrics.write({"round": 1})
    metrics.write({"round": 2})
    assert [r["round"] for r in seen] == [1, 2] and seen[0]["bytes_out"] == 10
    assert seen[0]["settings"]["topology"] == "ring" and "settings" not in seen[1]
    assert read_jsonl(metrics.path) == seen  # the callback gets exactly the line on disk


def test_a_failing_sink_is_logged_and_the_others_still_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[int] = []

    def broken(record: dict) -> None:
        record["round"] = -1  # a sink edits its copy only
        raise ValueError("callback bug")

    metrics = Metrics(tmp_path / "m.jsonl", sinks=[broken, lambda r: seen.append(r["round"])])
    caplog.set_level(logging.ERROR, logger="p2pfl.metrics")
    metrics.write({"round": 1})
    assert seen == [1] and "callback bug" in caplog.text
    assert read_jsonl(tmp_path / "m.jsonl")[0]["round"] == 1


def test_tensorboard_on_without_the_package_stops_at_start_with_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r'pip install "p2pfl-mesh\[tensorboard\]"'):
        Metrics.for_node(node_cfg(tmp_path, tensorboard=True))
    Metrics.for_node(node_cfg(tmp_path))  # off: the package is not needed


def test_tensorboard_gets_a_scalar_per_round(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    metrics = Metrics.for_node(node_cfg(tmp_path, tensorboard=True, tensorboard_dir=str(log_dir)))
    for r in (1, 2, 3):
        metrics.write(
            {
                "round": r,
                "accuracy": 0.5 + r / 10,
                "round_s": 1.5,
                "epsilon": None,
                "train_loss": float("nan"),
            }
        )
    events = EventAccumulator(str(log_dir))
    events.Reload()  # flushed every round: readable while the node runs
    assert [(e.step, round(e.value, 3)) for e in events.Scalars("accuracy/test")] == [
        (1, 0.6),
        (2, 0.7),
        (3, 0.8),
    ]
    tags = set(events.Tags()["scalars"])
    assert {"time/round_s", "bytes/sent_total", "mesh/rejected_total"} <= tags
    assert "privacy/epsilon" not in tags and "loss/train" not in tags  # None and NaN are left out


def test_tensorboard_dir_defaults_to_the_data_dir_and_resolves_beside_the_config(tmp_path: Path) -> None:
    assert tensorboard_dir(node_cfg(tmp_path)) == tmp_path / "node" / "tensorboard"
    path = tmp_path / "site" / "node.toml"
    path.parent.mkdir()
    path.write_text('[node]\ndata_dir = "data"\n[metrics]\ntensorboard_dir = "tb"\n')
    assert tensorboard_dir(config.load(path)) == tmp_path / "site" / "tb"
