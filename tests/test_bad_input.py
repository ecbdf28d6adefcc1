"""What a user can type wrong ends in one `error: ...` line and exit code 2, never a traceback.

Each CLI case runs `python -m p2pfl ...` in a subprocess, as a user would from a shell.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from amqtt.broker import Broker
from amqtt.contexts import BrokerConfig
from amqtt.session import Session

from p2pfl import config
from p2pfl.errors import ConfigError
from p2pfl.federation import FederationAuthority
from p2pfl.identity import load_or_create
from p2pfl.transport.amqtt_patches import PatchedBroker

HOST = "127.0.0.1"


def run_cli(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", *argv],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(out: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 2, no traceback, and the `error:` line names the problem."""
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def write_config(path: Path, data_dir: Path, **sections: dict[str, object]) -> Path:
    """A node config for one isolated node on 127.0.0.1 (no mDNS), plus `sections` overrides; written
    unvalidated, the way a user's editor leaves it."""
    cfg = config.NodeConfig()
    cfg.node.name, cfg.node.data_dir, cfg.node.port = "node-0", str(data_dir), free_port()
    cfg.discovery.mdns = False
    cfg.training.rounds = 1
    cfg.gossip.linger_s = 0.0
    for section, values in sections.items():
        if section == "task":
            cfg.task = dataclasses.replace(cfg.task, **values)  # type: ignore[arg-type]
        else:
            for key, value in values.items():
                setattr(getattr(cfg, section), key, value)
    path.write_text(config.to_toml(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def certified_dir(tmp: Path, name: str = "node-0") -> Path:
    """A data dir with keys, a certificate and federation.pub, as `p2pfl federation issue` leaves it."""
    authority = FederationAuthority.create(tmp / "federation")
    node_dir = tmp / name
    identity = load_or_create(node_dir)
    authority.issue(name, identity.verify_key_bytes, identity.box_public_bytes, 86400.0, node_dir=node_dir)
    return node_dir


# --------------------------------------------------------------------------------------------------
# 1. the config file itself


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: (d / "conf").mkdir() or d / "conf", ("is a directory", "--config")),
        (lambda d: (d / "x.toml").write_bytes(b"\xff\xfe[node]\n") and d / "x.toml", ("not UTF-8",)),
        (lambda d: (d / "x.toml").write_text("[node\nname =") and d / "x.toml", ("not valid TOML",)),
        (lambda d: d / "absent.toml", ("not found", "--config")),
    ],
    ids=["directory", "not-utf8", "invalid-toml", "missing"],
)
def test_a_bad_config_file_is_one_line(tmp_path: Path, make, words: tuple[str, ...]) -> None:
    out = run_cli("node", "--config", str(make(tmp_path)), cwd=tmp_path)
    assert_one_line_error(out, *words)


def test_node_py_wrapper_reports_the_same_way(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "node.py"), "--config", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(out, "is a directory")


# --------------------------------------------------------------------------------------------------
# 2. data_dir that cannot be created


def test_uncreatable_data_dir_names_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = write_config(tmp_path / "node.toml", blocker / "sub")
    line = assert_one_line_error(run_cli("node", "--config", str(path), cwd=tmp_path), str(blocker / "sub"))
    assert "data_dir" in line


def test_keys_command_refuses_an_uncreatable_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = run_cli("keys", "--data-dir", str(blocker / "sub"), cwd=tmp_path)
    assert_one_line_error(out, "cannot create data dir", "--data-dir")


# --------------------------------------------------------------------------------------------------
# 3. broker port in use; 4. a custom task that fails; 5. a bad .npz (these start a real node)


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    node_dir = certified_dir(tmp_path)
    path = write_config(tmp_path / "node.toml", node_dir)
    port = config.load(path).node.port
    with socket.socket() as busy:
        busy.bind((HOST, port))
        busy.listen()
        out = run_cli("node", "--config", str(path), cwd=tmp_path)
    assert_one_line_error(out, f"port {port} on {HOST} is in use", "[node] port")
    assert "Broker startup failed" not in out.stderr


TASKS = """
def boom(spec):
    raise ValueError("no data for shard")

def not_a_task(spec):
    return 42

def wrong_samples(spec):
    class T:
        num_samples = -3
        def build_model(self): ...
        def train(self, model): ...
        def evaluate(self, model): ...
    return T()
"""


@pytest.mark.parametrize(
    ("func", "words"),
    [
        ("boom", ("boom(spec) raised ValueError: no data for shard",)),
        ("not_a_task", ("not_a_task(spec) returned int, not a Task",)),
        ("wrong_samples", ("num_samples must be an integer >= 1",)),
    ],
)
def test_a_failing_custom_task_is_one_line(tmp_path: Path, func: str, words: tuple[str, ...]) -> None:
    (tmp_path / "user_tasks.py").write_text(TASKS)
    path = write_config(tmp_path / "node.toml", certified_dir(tmp_path), task={"name": f"user_tasks:{func}"})
    out = run_cli("node", "--config", str(path), cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert_one_line_error(out, f"user_tasks:{func}", *words)


def test_a_module_that_raises_on_import_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken_tasks.py").write_text("raise RuntimeError('half-written module')\n")
    path = write_config(tmp_path / "node.toml", certified_dir(tmp_path), task={"name": "broken_tasks:make"})
    out = run_cli("node", "--config", str(path), cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert_one_line_error(out, "cannot import module 'broken_tasks'", "RuntimeError: half-written module")


def test_a_huge_label_is_refused_not_allocated(tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    y = np.arange(40) % 3
    y[0] = 10**9
    np.savez(data, X=np.random.default_rng(0).random((40, 4)), y=y)
    path = write_config(tmp_path / "node.toml", certified_dir(tmp_path), task={"data": str(data)})
    out = run_cli("node", "--config", str(path), cwd=tmp_path)
    assert_one_line_error(out, "label 1000000000 is too large", "0..9999")


# --------------------------------------------------------------------------------------------------
# 6. edge-list topologies; 7. absurd values (refused by config validation, before anything starts)


def test_an_edge_list_without_this_node_is_refused_at_start(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "node.toml",
        tmp_path / "n",
        node={"name": "hospital-z"},
        gossip={"topology": "edges_4.toml"},
    )
    out = run_cli("node", "--config", str(path), cwd=tmp_path)
    assert_one_line_error(out, "'hospital-z'", "no neighbour", "node-0")


def test_an_absurd_learning_rate_is_refused_at_start(tmp_path: Path) -> None:
    path = write_config(tmp_path / "node.toml", tmp_path / "n", task={"lr": 1e30})
    assert_one_line_error(run_cli("node", "--config", str(path), cwd=tmp_path), "[task] lr")


def write_topology(tmp: Path, edges: list[tuple[str, str]]) -> str:
    path = tmp / "topo.toml"
    path.write_text(
        '[topology]\nkind = "edges"\nedges = [' + ", ".join(f'["{a}", "{b}"]' for a, b in edges) + "]\n"
    )
    return str(path)


@pytest.mark.parametrize(
    ("name", "edges", "message"),
    [
        ("a", [("b", "c")], "no neighbour"),
        ("a", [("a", "a"), ("b", "c")], "no neighbour"),
        ("a", [("a", "b"), ("c", "d")], r"disconnected \(2 groups.*a, b \| c, d"),
        ("0", [("0", "1"), ("2", "3")], "disconnected"),
    ],
    ids=["not-mentioned", "only-a-self-loop", "two-islands", "indices-two-islands"],
)
def test_bad_edge_lists_are_refused(
    tmp_path: Path, name: str, edges: list[tuple[str, str]], message: str
) -> None:
    cfg = config.NodeConfig()
    cfg.node.name, cfg.gossip.topology = name, write_topology(tmp_path, edges)
    with pytest.raises(ConfigError, match=message):
        config.validate(cfg)


def test_good_edge_lists_and_families_pass(tmp_path: Path) -> None:
    cfg = config.NodeConfig()
    cfg.node.name, cfg.gossip.topology = "c", write_topology(tmp_path, [("a", "b"), ("b", "c")])
    config.validate(cfg)
    cfg.gossip.topology = "ring"  # a family fits whoever joins: nothing to check at start
    config.validate(cfg)


# --------------------------------------------------------------------------------------------------
# 8. amqtt's broadcast loop and a subscription table that changes while it awaits


def _race(broker_cls: type[Broker]) -> None:
    """Deterministically subscribe a new client while the broadcast loop awaits the topic check of
    an existing subscriber (what a client connecting mid-broadcast does)."""

    async def main() -> None:
        broker = broker_cls(BrokerConfig(plugins={}))
        first, second = Session(), Session()
        first.client_id, second.client_id = "first", "second"
        broker._subscriptions["t/#"] = [(first, 0)]

        async def topic_filtering(session: Session, topic: str, action: object) -> bool:
            await asyncio.sleep(0)  # the await the stock loop iterates across
            broker._subscriptions.setdefault("u/#", []).append((second, 0))
            return True

        broker._topic_filtering = topic_filtering  # type: ignore[method-assign]
        await broker._broadcast_queue.put({"session": None, "topic": "t/x", "data": b"1"})
        await broker._run_broadcast(deque())

    asyncio.run(main())


def test_stock_broadcast_loop_dies_when_a_client_subscribes_meanwhile() -> None:
    with pytest.raises(RuntimeError, match="dictionary changed size during iteration"):
        _race(Broker)  # the bug the patch fixes: if amqtt fixes it, drop _SnapshotDict


def test_patched_broadcast_loop_survives_a_client_subscribing_meanwhile() -> None:
    _race(PatchedBroker)
