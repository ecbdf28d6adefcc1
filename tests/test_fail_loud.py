"""Runtime failures a user used to meet as a silent exit 0 now stop `p2pfl node` with exit 2 and one
`error:` line that says what to do (each case runs the real CLI in a subprocess)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from test_bad_input import assert_one_line_error, certified_dir, run_cli, write_config


def test_expected_peers_missing_stops_instead_of_training_alone(tmp_path: Path) -> None:
    node_dir = certified_dir(tmp_path)
    path = write_config(
        tmp_path / "node.toml",
        node_dir,
        discovery={"mdns": True, "interfaces": ["127.0.0.1"], "expect_peers": 2, "wait_s": 1.0},
    )
    out = run_cli("node", "--config", str(path), cwd=tmp_path)
    assert_one_line_error(out, "found 0 of the 2 peers", "wait_s", "start_alone = true")
    assert not (node_dir / "model.npz").exists(), "no round ran: no model may be saved as if trained"


def test_diverging_training_stops_with_the_reason(tmp_path: Path) -> None:
    data = tmp_path / "wild.csv"
    rng = np.random.default_rng(0)
    with data.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["a", "b", "label"])
        for i in range(120):  # raw features of 1e18: an unscaled model blows up in its first step
            out.writerow([rng.normal() * 1e18, rng.normal() * 1e18, i % 2])
    node_dir = certified_dir(tmp_path)
    path = write_config(
        tmp_path / "node.toml", node_dir, task={"name": "mlp", "data": str(data), "num_classes": 2, "lr": 0.1}
    )
    out = run_cli("node", "--config", str(path), cwd=tmp_path)
    assert_one_line_error(out, "diverged in round 1", "[task] lr", "extreme values")


def test_a_restarted_node_appends_to_its_metrics(tmp_path: Path) -> None:
    node_dir = certified_dir(tmp_path)
    path = write_config(tmp_path / "node.toml", node_dir, training={"rounds": 2})
    assert run_cli("node", "--config", str(path), cwd=tmp_path).returncode == 0
    path = write_config(tmp_path / "node.toml", node_dir, training={"rounds": 4})
    assert run_cli("node", "--config", str(path), cwd=tmp_path).returncode == 0
    rounds = [json.loads(line)["round"] for line in (node_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4], rounds


def test_relative_paths_and_name_come_from_the_config_and_certificate(tmp_path: Path) -> None:
    """Run from another directory: the data dir resolves beside the config file (no new identity is
    created elsewhere) and the node is called what its certificate says."""
    site = tmp_path / "site"
    node_dir = certified_dir(site, name="hospital-a")
    path = write_config(site / "node.toml", Path("hospital-a"), node={"name": "node"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_cli("node", "--config", str(path), cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert list(elsewhere.iterdir()) == [], "nothing may be created in the working directory"
    record = json.loads((node_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["node"] == "hospital-a"
