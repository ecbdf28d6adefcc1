"""Config: defaults load, TOML round-trips, and every mistake names the key to fix."""

from pathlib import Path

import pytest

from p2pfl import config
from p2pfl.errors import ConfigError


def test_defaults_are_valid_and_round_trip(tmp_path: Path) -> None:
    cfg = config.load(None)
    path = tmp_path / "node.toml"
    path.write_text(config.to_toml(cfg))
    cfg.node.data_dir = str(tmp_path / cfg.node.data_dir)  # relative paths: beside the file
    assert config.load(path) == cfg


def test_values_are_read(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nname = "a"\nport = 2000\n[gossip]\nround_timeout_s = 5\nrule = "mean"\n')
    cfg = config.load(path)
    assert (cfg.node.name, cfg.node.port, cfg.gossip.round_timeout_s, cfg.gossip.rule) == (
        "a",
        2000,
        5.0,
        "mean",
    )
    assert cfg.metrics_path == tmp_path / "p2pfl-node" / "metrics.jsonl"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\nprot = 1\n", "unknown key"),
        ("[nodes]\n", "unknown section"),
        ('[node]\nport = "x"\n', "port must be int"),
        ("[node]\nport = 70000\n", "port must be 0..65535"),
        ("[training]\nrounds = -1\n", "rounds must be >= 0"),
        ("[gossip]\nstaleness = -1\n", "staleness must be 0..1000"),
        ("[discovery]\nmdns = false\n[node]\nport = 0\n", "port = 0 needs mdns = true"),
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
        ("[gossip]\nmax_update_mb = 1e-9\n", "max_update_mb must be 0.001.."),
        ("[security]\nmax_skew_s = 0\n", "max_skew_s must be > 0"),
        ('[node]\nhost = "0.0.0.0"\n', "not a wildcard"),
        ('[discovery]\nstatic_peers = ["h:0"]\n', "host:port"),
        ('[gossip]\ntopology = "hypercube-ish"\n', "unknown topology"),
        ("[task]\nlr = 1e30\n", r"lr = 1e\+30 is far too large"),
        ("[task]\nseed = -1\n", "seed must be >= 0"),
        ("[attack]\nseed = -1\n", "seed must be >= 0"),
        ("[gossip]\nmax_update_mb = 1e300\n", "max_update_mb must be 0.001.."),
        ("[gossip]\nlinger_s = 1e9\n", "linger_s = 1e\\+09 is longer than a week"),
        ("[discovery]\nwait_s = 1e9\n", "wait_s .* longer than a week"),
        ("[training]\nthreads = 100000\n", "threads = 100000 but this machine has"),
        ('[node]\nname = ""\n', "name must be printable"),
        ('[node]\ndata_dir = ""\n', "data_dir must not be empty"),
        ('[node]\nhost = "localhost"\n', "IPv4 address with mdns = true"),
        ('[discovery]\ninterfaces = ["eth0"]\n', "interfaces entry 'eth0' must be an IPv4"),
        ('[task]\nname = ":make"\n', "must look like 'module:function'"),
        ('[gossip]\ntopology = "edges_4.toml"\n', "no neighbour"),
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


def test_an_unknown_attack_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[attack]\nkind = "bit-rot"\n')
    with pytest.raises(ConfigError, match="kind must be empty"):
        config.load(path)


# ---------------------------------------------------------------- the command line

LIGHT_COMMANDS = [
    ["--help"],
    ["--version"],
    ["config"],
    ["keys", "--help"],
    ["federation", "issue", "--help"],
]

_PROBE = """
import json, sys
from p2pfl.cli import main
try:
    main(json.loads(sys.argv[1]))
except SystemExit:
    pass
print("TORCH" if "torch" in sys.modules else "LIGHT")
"""


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=" ".join)
def test_light_commands_do_not_import_torch(argv: list[str]) -> None:
    """Everything but `node` and `testbed` answers without loading torch (seconds on a small device)."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argv)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.splitlines()[-1] == "LIGHT", out


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    from p2pfl.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"p2pfl {version('p2pfl-mesh')}"


def test_testbed_help_shows_the_testbed_options(capsys: pytest.CaptureFixture[str]) -> None:
    from p2pfl.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["testbed", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: p2pfl testbed")
    for option in ("--nodes", "--rounds", "--topology", "--byzantine", "--out"):
        assert option in text


def test_other_commands_still_refuse_unknown_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from p2pfl.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["config", "--nodes", "3"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --nodes 3" in capsys.readouterr().err


def test_metrics_path_that_cannot_be_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for target, message in ((tmp_path, "is a directory"), (blocker / "sub" / "m.jsonl", "which is a file")):
        path = tmp_path / "node.toml"
        path.write_text(f"[metrics]\npath = {str(target)!r}\n")
        with pytest.raises(ConfigError, match=message):
            config.load(path)


def test_update_cap_matches_what_framing_can_carry() -> None:
    from p2pfl.transport.framing import DEFAULT_CHUNK_BYTES, MAX_PARTS

    assert config.MAX_UPDATE_MB == MAX_PARTS * DEFAULT_CHUNK_BYTES / (1 << 20)


# ------------------------------------------------------------------ own data and training (issue 11)


def test_own_data_and_optimizer_keys_are_read(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        "[task]\n"
        'name = "mlp"\n'
        'data = "site.csv"\n'
        'test_data = "test.csv"\n'
        'label_column = "diagnosis"\n'
        'features = ["age", "bp"]\n'
        'class_names = ["benign", "malignant"]\n'
        "standardize = true\n"
        "hidden = [32, 16]\n"
        'optimizer = "sgd"\n'
        "momentum = 0.9\n"
        "lr = 0.05\n"
        'lr_schedule = "cosine"\n'
        "[training]\n"
        "rounds = 40\n"
    )
    cfg = config.load(path)
    task = cfg.task
    assert task.features == ("age", "bp") and task.class_names == ("benign", "malignant")
    assert task.hidden == (32, 16) and task.standardize and task.momentum == 0.9
    assert task.lr_rounds == 40  # cosine anneals over [training] rounds unless lr_rounds says otherwise
    assert hash(task) is not None
    again = tmp_path / "again.toml"
    again.write_text(config.to_toml(cfg))
    assert config.load(again) == cfg


def test_default_config_lists_the_new_keys_with_notes() -> None:
    text = config.to_toml(config.load(None))
    for key in ("test_fraction = 0.25", 'label_column = "label"', "num_classes = 0", 'optimizer = "sgd"'):
        assert key in text
    assert 'lr_schedule = "constant"  # constant, step' in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[task]\noptimizer = "adamw"\n', r"\[task\] optimizer must be one of sgd, adam"),
        ('[task]\noptimizer = "adam"\n', r"too large for optimizer = adam; set \[task\] lr"),
        ("[task]\nmomentum = 1.5\n", r"\[task\] momentum must be"),
        ('[task]\nlr_schedule = "exp"\n', r"\[task\] lr_schedule must be one of"),
        ('[task]\nlr_schedule = "cosine"\n[training]\nrounds = 0\n', r"needs \[task\] lr_rounds"),
        ("[task]\ntest_fraction = 0\n", r"\[task\] test_fraction must be a number between 0 and 1"),
        ("[task]\nnum_classes = 1\n", r"\[task\] num_classes must be 0"),
        ('[task]\nfeatures = "age"\n', r"\[task\] features must be a list of strings"),
        ("[task]\nhidden = 64\n", r"\[task\] hidden must be a list of integers, e.g. \[64\]"),
        ("[task]\nhidden = [0]\n", r"\[task\] hidden must list"),
        ('[task]\nfeatures = ["a"]\ndata = "x.npz"\n', r"features selects CSV columns"),
        ('[task]\ndata = "patients.xlsx"\n', r"\[task\] data = 'patients.xlsx' must be a .csv"),
        ('[task]\ntest_data = "t.csv"\n', r"test_data needs \[task\] data"),
        ('[task]\nstandardize = "yes"\n', "standardize must be bool"),
        ('[task]\nclass_names = ["a", "b"]\nnum_classes = 3\n', "num_classes = 3 but class_names lists 2"),
    ],
)
def test_own_data_mistakes_are_explained(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load(path)


def test_relative_paths_in_a_config_file_mean_beside_the_file(tmp_path: Path) -> None:
    """A node started from another directory must find its own keys, not create a new identity."""
    (tmp_path / "site").mkdir()
    path = tmp_path / "site" / "node.toml"
    path.write_text('[node]\ndata_dir = "state"\n[task]\nname = "mlp"\ndata = "data/site.csv"\n')
    cfg = config.load(path)
    assert cfg.node.data_dir == str(tmp_path / "site" / "state")
    assert cfg.task.data == str(tmp_path / "site" / "data" / "site.csv")
    assert cfg.metrics.path == ""  # not set stays not set
