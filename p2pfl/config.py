"""Node configuration: one TOML file, validated up front so a typo fails at start, not mid-round."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import networkx as nx

from p2pfl import aggregation, topology
from p2pfl.compression import Compression
from p2pfl.errors import ConfigError
from p2pfl.learning.spec import TaskSpec

__all__ = [
    "AttackSection",
    "DiscoverySection",
    "GossipSection",
    "MetricsSection",
    "NodeConfig",
    "NodeSection",
    "PrivacySection",
    "SecuritySection",
    "TrainingSection",
    "from_dict",
    "load",
    "to_toml",
    "validate",
]

MAX_DURATION_S = 7 * 86400.0  # a wait, timeout or linger longer than a week is a typo, not a plan
MAX_NAME_BYTES = 64  # discovery's limit on an advertised name (p2pfl.discovery.MAX_NAME_BYTES)
# The largest update framing can carry: MAX_PARTS (65536) parts of DEFAULT_CHUNK_BYTES (4 MiB).
# Not imported: p2pfl.transport pulls in the MQTT stack, and config must stay light.
MAX_UPDATE_MB = 65536 * 4.0
MAX_LR = 100.0  # plain SGD with a step this large diverges on any model we train


@dataclass
class NodeSection:
    name: str = "node"
    data_dir: str = "p2pfl-node"
    host: str = "127.0.0.1"  # the broker binds here and discovery advertises it
    port: int = 18830


@dataclass
class DiscoverySection:
    mdns: bool = True
    interfaces: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    static_peers: list[str] = field(default_factory=list)  # "host:port" where multicast is absent
    expect_peers: int = 0  # start round 1 once this many certified peers are known...
    wait_s: float = 20.0  # ...or after this long; fewer than expect_peers then stops the node...
    start_alone: bool = False  # ...unless this is true (then it starts with whoever it found)


@dataclass
class TrainingSection:
    rounds: int = 20  # 0 = run until stopped (a device's service); checkpoints are written every round
    threads: int = 1  # torch intra-op threads; several nodes often share one machine


@dataclass
class GossipSection:
    topology: str = "ring"
    rule: str = "robust"
    clip_radius: float = 0.0  # 0 = adaptive
    round_timeout_s: float = 30.0
    max_update_mb: float = 1024.0
    linger_s: float = 3.0  # keep the broker up after the last round so slower neighbours can fetch it
    staleness: int = 4  # an update at most this many rounds old is still mixed (once)
    wait_factor: float = 4.0  # a round waits up to this x the usual neighbour delay (90th percentile) ...
    min_wait_s: float = 1.0  # ... but at least this long, and never longer than round_timeout_s
    miss_limit: int = 2  # a neighbour that missed this many rounds in a row is not waited for until heard
    compression: str = "none"  # none, fp16, bf16, int8[:CHUNK], topk:FRACTION (same on every node)
    keyframe_every: int = 10  # diff-form compression (topk): a full fp16 model every this many rounds
    steps_per_round: int = 1  # gossip exchanges per local training step: train only in every k-th round


@dataclass
class SecuritySection:
    max_skew_s: float = 300.0  # accepted clock difference for update timestamps


@dataclass
class MetricsSection:
    path: str = ""  # default: <data_dir>/metrics.jsonl
    save_models: bool = False  # write <data_dir>/models/round_NNNN.npy (flat float32) every round
    tensorboard: bool = False  # also write scalars per round for TensorBoard (needs the tensorboard extra)
    tensorboard_dir: str = ""  # default: <data_dir>/tensorboard


@dataclass
class PrivacySection:
    """Differential privacy of this node's updates: DP-SGD local training (p2pfl.learning.privacy)."""

    enabled: bool = False
    noise_multiplier: float = 0.0  # Gaussian noise std / max_grad_norm; or 0 with target_epsilon
    max_grad_norm: float = 1.0  # each example's gradient is clipped to this L2 norm
    delta: float = 0.0  # 0 = min(1e-5, 1 / (2 x local training examples))
    target_epsilon: float = 0.0  # > 0: derive the noise for this budget, and stop before exceeding it
    epochs: int = 0  # local epochs the target covers; 0 = [training] rounds x [task] local_epochs
    accountant: str = "rdp"  # rdp or prv (Opacus' accountants)


@dataclass
class AttackSection:
    """Experiments only: make this node Byzantine (it trains honestly but sends crafted updates)."""

    kind: str = ""  # "" = honest; else one of p2pfl.attacks.ATTACKS
    seed: int = 0
    silent: bool = False  # a certified member that stays connected but never sends an update


@dataclass
class NodeConfig:
    node: NodeSection = field(default_factory=NodeSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    task: TaskSpec = field(default_factory=TaskSpec)  # what to learn; validated by TaskSpec itself
    training: TrainingSection = field(default_factory=TrainingSection)
    gossip: GossipSection = field(default_factory=GossipSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    attack: AttackSection = field(default_factory=AttackSection)

    @property
    def data_dir(self) -> Path:
        return Path(self.node.data_dir)

    @property
    def metrics_path(self) -> Path:
        return Path(self.metrics.path) if self.metrics.path else self.data_dir / "metrics.jsonl"


def _coerce(section: str, key: str, value: Any, expected: Any) -> Any:
    """Check one value against its annotated type; ints are accepted where floats are expected.
    TOML arrays become tuples where the field is a tuple (TaskSpec is frozen and hashable)."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected == list[str]:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif expected == tuple[str, ...]:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f'[{section}] {key} must be a list of strings, e.g. ["a", "b"], got {value!r}')
    elif expected == tuple[int, ...]:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        raise ConfigError(f"[{section}] {key} must be a list of integers, e.g. [64], got {value!r}")
    elif isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    name = getattr(expected, "__name__", str(expected))
    raise ConfigError(f"[{section}] {key} must be {name}, got {value!r}")


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{name}]; known keys: {sorted(known)}")
    return cls(**{k: _coerce(name, k, v, hints[k]) for k, v in raw.items()})


def validate(cfg: NodeConfig) -> NodeConfig:
    """Range checks that types alone cannot express; the first problem found is raised."""
    _check_finite(cfg)
    rules = aggregation.node_rules()
    checks = [
        (0 <= cfg.node.port <= 65535, "[node] port must be 0..65535 (0: any free port, advertised by mDNS)"),
        (
            cfg.node.host not in ("", "0.0.0.0", "::"),
            "[node] host must be this device's own address, not a wildcard",
        ),
        (bool(cfg.node.data_dir), "[node] data_dir must not be empty (it holds the node's keys)"),
        (
            bool(cfg.discovery.interfaces) or not cfg.discovery.mdns,
            "[discovery] interfaces must not be empty",
        ),
        (cfg.discovery.wait_s >= 0, "[discovery] wait_s must be >= 0"),
        (cfg.discovery.expect_peers >= 0, "[discovery] expect_peers must be >= 0"),
        (cfg.gossip.linger_s >= 0, "[gossip] linger_s must be >= 0"),
        (
            0.001 <= cfg.gossip.max_update_mb <= MAX_UPDATE_MB,
            f"[gossip] max_update_mb must be 0.001..{MAX_UPDATE_MB:g} (the most one update can carry)",
        ),
        (cfg.security.max_skew_s > 0, "[security] max_skew_s must be > 0"),
        (cfg.training.rounds >= 0, "[training] rounds must be >= 0 (0: run until stopped)"),
        (cfg.training.threads >= 1, "[training] threads must be >= 1"),
        # the registry's node rules: simulator-only ones (push-sum: its mass is conserved only if no
        # update is ever lost, and a real round mixes without a neighbour that timed out) are refused
        (cfg.gossip.rule in rules, f"[gossip] rule must be one of {', '.join(rules)}"),
        (cfg.gossip.round_timeout_s > 0, "[gossip] round_timeout_s must be > 0"),
        (cfg.gossip.clip_radius >= 0, "[gossip] clip_radius must be >= 0 (0 = adaptive)"),
        (0 <= cfg.gossip.staleness <= 1000, "[gossip] staleness must be 0..1000 rounds"),
        (1.0 <= cfg.gossip.wait_factor <= 100.0, "[gossip] wait_factor must be 1..100"),
        (cfg.gossip.min_wait_s >= 0, "[gossip] min_wait_s must be >= 0"),
        (1 <= cfg.gossip.miss_limit <= 1000, "[gossip] miss_limit must be 1..1000 rounds"),
        (1 <= cfg.gossip.steps_per_round <= 1000, "[gossip] steps_per_round must be 1..1000"),
        (
            cfg.node.port != 0 or cfg.discovery.mdns,
            "[node] port = 0 needs mdns = true (peers learn the port from the advertisement)",
        ),
        (
            cfg.discovery.mdns or bool(cfg.discovery.static_peers) or cfg.discovery.expect_peers == 0,
            "[discovery] with mdns = false, list static_peers",
        ),
        (cfg.attack.seed >= 0, "[attack] seed must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _check_threads(cfg.training.threads)
    _check_name(cfg.node.name)
    _check_task(cfg.task)
    cfg.task = _resolve_task(cfg.task, cfg.training)
    _check_metrics_path(cfg)
    _check_privacy(cfg)
    if cfg.discovery.mdns:
        _check_mdns_addresses(cfg)
    if cfg.attack.kind:  # only experiments set it; p2pfl.attacks imports torch, so only then
        from p2pfl.attacks import ATTACKS

        if cfg.attack.kind not in ATTACKS:
            raise ConfigError(f"[attack] kind must be empty (honest) or one of {ATTACKS}")
    for peer in cfg.discovery.static_peers:
        host, _, port = peer.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"[discovery] static_peers entry {peer!r} must look like 'host:port'")
    _check_topology(cfg)
    return cfg


def _check_finite(cfg: NodeConfig) -> None:
    """NaN and inf pass every comparison below (or pass them all wrongly): refuse them first, and
    durations past MAX_DURATION_S, which would make a node wait or linger practically forever."""
    durations = {
        "[discovery] wait_s": cfg.discovery.wait_s,
        "[gossip] round_timeout_s": cfg.gossip.round_timeout_s,
        "[gossip] linger_s": cfg.gossip.linger_s,
        "[gossip] min_wait_s": cfg.gossip.min_wait_s,
        "[security] max_skew_s": cfg.security.max_skew_s,
    }
    others = {
        "[gossip] max_update_mb": cfg.gossip.max_update_mb,
        "[gossip] clip_radius": cfg.gossip.clip_radius,
        "[gossip] wait_factor": cfg.gossip.wait_factor,
    }
    for key, value in {**durations, **others}.items():
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
    for key, value in durations.items():
        if value > MAX_DURATION_S:
            raise ConfigError(f"{key} = {value:g} is longer than a week; use at most {MAX_DURATION_S:g} s")


def _check_threads(threads: int) -> None:
    """More torch threads than CPUs only spin; far more cannot even be started."""
    cpus = os.cpu_count() or 1
    if threads > cpus:
        raise ConfigError(f"[training] threads = {threads} but this machine has {cpus} CPU(s); use 1..{cpus}")


def _check_name(name: str) -> None:
    """The name is advertised by mDNS and matched by edge-list topologies: it must be usable there."""
    if not name or not name.isprintable() or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ConfigError(f"[node] name must be printable text of 1..{MAX_NAME_BYTES} bytes, got {name!r}")


def _check_task(task: TaskSpec) -> None:
    """What TaskSpec itself leaves open but the data and model code cannot take."""
    if task.seed < 0:
        raise ConfigError(f"[task] seed must be >= 0, got {task.seed}")
    if task.lr > MAX_LR:
        raise ConfigError(f"[task] lr = {task.lr:g} is far too large for SGD; use 0 < lr <= {MAX_LR:g}")
    module, colon, func = task.name.partition(":")
    if colon and not (module.strip() and func.strip()):
        raise ConfigError(f"[task] name {task.name!r} must look like 'module:function'")
    if task.features and not task.data.lower().endswith(".csv"):
        raise ConfigError("[task] features selects CSV columns: it needs [task] data = a .csv file")
    if task.feature_stats and not task.feature_stats.lower().endswith(".json"):
        raise ConfigError(
            f"[task] feature_stats = {task.feature_stats!r} must be a .json file from `p2pfl stats`"
        )
    for key in ("data", "test_data"):
        path = getattr(task, key)
        if path and not path.lower().endswith((".csv", ".npz")):
            raise ConfigError(f"[task] {key} = {path!r} must be a .csv (header row) or .npz file")


def _resolve_task(task: TaskSpec, training: TrainingSection) -> TaskSpec:
    """Fill in what the [task] section leaves to [training]: a cosine schedule with lr_rounds = 0
    anneals over [training] rounds (which must then be finite)."""
    if task.lr_schedule != "cosine" or task.lr_rounds > 0:
        return task
    if training.rounds == 0:
        raise ConfigError(
            "[task] lr_schedule = cosine with [training] rounds = 0 (run until stopped) needs [task] lr_rounds: "
            "the number of rounds to anneal over (the rate then stays at lr_min)"
        )
    return dataclasses.replace(task, lr_rounds=training.rounds)


PRIVACY_ACCOUNTANTS = ("rdp", "prv")  # p2pfl.learning.privacy.ACCOUNTANTS (not imported: it needs torch)


def _check_privacy(cfg: NodeConfig) -> None:
    """[privacy]: the noise is given or derived (exactly one), and what the guarantee cannot cover is
    refused rather than silently sent."""
    p = cfg.privacy
    for key in ("noise_multiplier", "max_grad_norm", "delta", "target_epsilon"):
        value = getattr(p, key)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"[privacy] {key} must be a finite number >= 0, got {value!r}")
    if p.accountant not in PRIVACY_ACCOUNTANTS:
        raise ConfigError(
            f"[privacy] accountant must be one of {', '.join(PRIVACY_ACCOUNTANTS)}, got {p.accountant!r}"
        )
    if p.epochs < 0:
        raise ConfigError(
            f"[privacy] epochs must be >= 0 (0: [training] rounds x [task] local_epochs), got {p.epochs}"
        )
    if not p.delta < 1:
        raise ConfigError(f"[privacy] delta must be below 1 (e.g. 1e-5; 0: automatic), got {p.delta!r}")
    if not p.enabled:
        return
    if (p.noise_multiplier > 0) == (p.target_epsilon > 0):
        raise ConfigError(
            "[privacy] enabled = true needs exactly one of noise_multiplier (e.g. 1.0) or target_epsilon "
            "(e.g. 8.0, the noise is then derived for the run)"
        )
    if p.max_grad_norm <= 0:
        raise ConfigError("[privacy] max_grad_norm must be > 0 (e.g. 1.0)")
    if p.target_epsilon > 0 and p.epochs == 0 and cfg.training.rounds == 0:
        raise ConfigError(
            "[privacy] target_epsilon with [training] rounds = 0 (run until stopped) needs [privacy] epochs: "
            "the number of local epochs the budget is spread over"
        )
    if cfg.task.standardize_federated:
        raise ConfigError(
            "[privacy] enabled = true with [task] standardize_federated = true: the gossiped statistics start "
            "as this site's own means, which DP-SGD does not protect. Use [task] feature_stats (a shared "
            "`p2pfl stats` file) instead, or turn one of them off"
        )


def _check_metrics_path(cfg: NodeConfig) -> None:
    """An explicit metrics path must be a file whose directory can exist (the default lives in
    data_dir, which key creation checks)."""
    if not cfg.metrics.path:
        return
    path = cfg.metrics_path
    if path.is_dir():
        raise ConfigError(f"[metrics] path {str(path)!r} is a directory; name a file in it")
    existing = next((a for a in path.parents if a.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(
            f"[metrics] path {str(path)!r} is under {str(existing)!r}, which is a file, not a directory"
        )


def _check_mdns_addresses(cfg: NodeConfig) -> None:
    """mDNS advertises and binds IPv4 addresses only: a host name or IPv6 would fail after start."""
    for key, address in [("[node] host", cfg.node.host)] + [
        ("[discovery] interfaces entry", a) for a in cfg.discovery.interfaces
    ]:
        try:
            ok = ipaddress.ip_address(address).version == 4
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(
                f"{key} {address!r} must be an IPv4 address with mdns = true "
                "(or set [discovery] mdns = false and list static_peers)"
            )


def _check_topology(cfg: NodeConfig) -> None:
    try:
        topo = topology.parse_topology(cfg.gossip.topology)
    except ConfigError as exc:
        raise ConfigError(f"[gossip] topology: {exc}") from exc
    _check_compression(cfg.gossip, topo)
    if topo.kind == "edges":
        _check_edge_list(topo, cfg.node.name, cfg.task.seed)


def _check_compression(gossip: GossipSection, topo: topology.Topology) -> None:
    """[gossip] compression parses, and a diff form (topk) has a static topology to run on."""
    try:
        c = Compression.parse(gossip.compression)
    except ConfigError as exc:
        raise ConfigError(f"[gossip] compression: {exc}") from exc
    if not 1 <= gossip.keyframe_every <= 100_000:
        raise ConfigError("[gossip] keyframe_every must be 1..100000 rounds")
    if c.diff and topo.time_varying:
        raise ConfigError(
            f"[gossip] compression {gossip.compression!r} sends differences every neighbour must see, and "
            f"topology {gossip.topology!r} changes neighbours each round: use a static topology, or "
            "compression fp16, bf16 or int8"
        )


def _check_edge_list(topo: topology.Topology, name: str, seed: int) -> None:
    """An edge list is fixed before any peer is known: refuse one that leaves this node alone every
    round or splits the federation into groups that never mix. Families are built for whoever joins."""
    ends = {v for edge in topo.edges for v in edge}
    where = f"[gossip] topology {topo.source or 'edge list'!r}"
    if not ends:
        raise ConfigError(f"{where} has no edges; every node would train alone")
    numeric = [isinstance(v, int) or str(v).isdigit() for v in ends]
    if any(numeric) and not all(numeric):
        return  # names and indices mixed: resolvable only once the members are known
    if all(numeric):  # members are numbered by node id at run time: our own index is not known yet
        labels = [str(i) for i in range(max(int(v) for v in ends) + 1)]
        graph = topo.graph(len(labels), seed=seed)
    else:
        labels = sorted(str(v) for v in ends)
        graph = topo.graph(len(labels), seed=seed, labels=labels)
        if name not in labels or graph.degree(labels.index(name)) == 0:
            raise ConfigError(
                f"{where} gives this node ([node] name = {name!r}) no neighbour, so it would train alone "
                f"every round; add an edge for it or set [node] name to one of {_shorten(labels)}"
            )
    parts = [sorted(labels[i] for i in c) for c in nx.connected_components(graph)]
    if len(parts) > 1:
        groups = " | ".join(_shorten(p) for p in parts)
        raise ConfigError(
            f"{where} is disconnected ({len(parts)} groups that never exchange models: {groups}); "
            "add edges that join them"
        )


def _shorten(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def from_dict(raw: dict[str, Any]) -> NodeConfig:
    sections = {f.name: f for f in dataclasses.fields(NodeConfig)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; known sections: {sorted(sections)}")
    hints = get_type_hints(NodeConfig)
    return validate(NodeConfig(**{k: _section(k, hints[k], v) for k, v in raw.items()}))


def load(path: Path | str | None) -> NodeConfig:
    """Read and validate a TOML file; None gives the built-in defaults. Relative paths in the file
    mean relative to the file (a node started from another directory keeps its identity and data)."""
    if path is None:
        return validate(NodeConfig())
    cfg = from_dict(_read_toml(Path(path)))
    base = Path(path).absolute().parent
    cfg.node.data_dir = _beside(base, cfg.node.data_dir)
    cfg.metrics.path = _beside(base, cfg.metrics.path)
    cfg.metrics.tensorboard_dir = _beside(base, cfg.metrics.tensorboard_dir)
    task = cfg.task
    cfg.task = dataclasses.replace(
        task,
        data=_beside(base, task.data),
        test_data=_beside(base, task.test_data),
        feature_stats=_beside(base, task.feature_stats),
    )
    return cfg


def _beside(base: Path, value: str) -> str:
    """`value` resolved against the config file's folder ('' stays '': not set)."""
    if not value or Path(value).expanduser().is_absolute():
        return str(Path(value).expanduser()) if value else value
    return str(base / value)


def _read_toml(path: Path) -> dict[str, Any]:
    """The parsed file, or a ConfigError that says what is wrong with it and what to pass instead."""
    hint = "pass --config PATH to a TOML file (`p2pfl config > node.toml` writes one)"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; {hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; {hint}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}); {hint}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}; {hint}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


# one-line reminders `p2pfl config` prints beside the keys (the README's configuration table has more)
KEY_NOTES: dict[str, dict[str, str]] = {
    "task": {
        "name": "digits-mlp, digits-cnn, synthetic-logreg, mlp, logreg, or module:function",
        "shard": "which part of a built-in data set this node holds (own data: leave 0 / 1)",
        "data": "own data: a .csv (header row) or .npz (X, y) file",
        "test_data": "a separate test file; empty: hold out test_fraction of data",
        "test_fraction": "share of data held out for testing when test_data is empty",
        "label_column": "CSV column holding the class",
        "features": "CSV feature columns in model order; empty: every column but the label",
        "num_classes": "classes of the federation's model; 0: max label + 1 (declare it with own data)",
        "class_names": "text labels in the CSV, in class order (sets num_classes)",
        "standardize": "scale features to mean 0, std 1 with this site's training statistics ...",
        "feature_stats": "... or with these shared ones (`p2pfl stats`): the same scaling on every site",
        "hidden": "hidden layer widths of the mlp tasks",
        "optimizer": "sgd or adam (adam: lr 0.001..0.01)",
        "momentum": "sgd momentum, 0 <= m < 1",
        "optimizer_state": "keep (momentum / Adam moments survive mixing) or reset every round",
        "lr_schedule": "constant, step (x lr_gamma every lr_step_rounds) or cosine (to lr_min)",
        "lr_rounds": "cosine: rounds to anneal over; 0: [training] rounds",
    },
    "training": {"rounds": "0: run until stopped"},
    "metrics": {"tensorboard": 'scalars per round for TensorBoard (pip install "p2pfl-mesh[tensorboard]")'},
    "privacy": {
        "enabled": "DP-SGD local training (needs Opacus: pip install 'p2pfl-mesh[privacy]')",
        "noise_multiplier": "noise std / max_grad_norm; set this or target_epsilon",
        "delta": "0: min(1e-5, 1 / (2 x local training examples))",
        "target_epsilon": "derive the noise for this budget and stop before exceeding it",
        "epochs": "local epochs the target covers; 0: [training] rounds x [task] local_epochs",
        "accountant": "rdp or prv",
    },
}


def to_toml(cfg: NodeConfig) -> str:
    """Render a config as TOML (the testbed writes one per node; users get a commented starting point)."""
    lines: list[str] = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        notes = KEY_NOTES.get(section.name, {})
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            note = f"  # {notes[key]}" if key in notes else ""
            lines.append(f"{key} = {_toml_value(value)}{note}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
