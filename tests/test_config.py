"""Config: defaults load, TOML round-trips, and every mistake names the key to fix."""

from pathlib import Path

import pytest

from p2pfl import config
from p2pfl.errors import ConfigError


def test_defaults_are_valid_and_round_trip(tmp_path: Path) -> None:
    cfg = config.load(None)
    path = tmp_path / "node.toml"
    path.write_text(config.to_toml(cfg))
    assert config.load(path) == cfg


def test_values_are_read(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nname = "a"\nport = 2000\n[gossip]\nround_timeout_s = 5\nrule = "mean"\n')
    cfg = config.load(path)
    assert (cfg.node.name, cfg.node.port, cfg.gossip.round_timeout_s, cfg.gossip.rule) == ("a", 2000, 5.0, "mean")
    assert cfg.metrics_path == Path("p2pfl-node/metrics.jsonl")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\nprot = 1\n", "unknown key"),
        ("[nodes]\n", "unknown section"),
        ('[node]\nport = "x"\n', "port must be int"),
        ("[node]\nport = 70000\n", "port must be 1..65535"),
        ('[gossip]\nrule = "median-ish"\n', "rule must be one of"),
        ("[task]\nshard = 3\nnum_shards = 2\n", "shard must be in"),
        ('[task]\npartition = "by-hospital"\n', "partition must be one of"),
        ("[task]\nlr = -1\n", "lr must be"),
        ('[discovery]\nstatic_peers = ["nohost"]\n', "host:port"),
        ("[discovery]\nmdns = false\nexpect_peers = 2\n", "static_peers"),
        ("[training]\nrounds = true\n", "rounds must be int"),
        ("not toml at all [", "not valid TOML"),
        ("[gossip]\nlinger_s = nan\n", "linger_s must be a finite number"),
        ("[gossip]\nround_timeout_s = inf\n", "round_timeout_s must be a finite number"),
        ("[gossip]\nmax_update_mb = 1e-9\n", "max_update_mb must be >= 0.001"),
        ("[security]\nmax_skew_s = 0\n", "max_skew_s must be > 0"),
        ('[node]\nhost = "0.0.0.0"\n', "not a wildcard"),
        ('[discovery]\nstatic_peers = ["h:0"]\n', "host:port"),
        ('[gossip]\ntopology = "hypercube-ish"\n', "unknown topology"),
    ],
)
def test_mistakes_are_explained(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load(path)


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config"):
        config.load(tmp_path / "absent.toml")
