"""Node configuration: one TOML file, validated up front so a typo fails at start, not mid-round."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from p2pfl import aggregation, topology
from p2pfl.errors import ConfigError
from p2pfl.learning.spec import TaskSpec

__all__ = [
    "AttackSection",
    "DiscoverySection",
    "GossipSection",
    "MetricsSection",
    "NodeConfig",
    "NodeSection",
    "SecuritySection",
    "TrainingSection",
    "from_dict",
    "load",
    "to_toml",
    "validate",
]


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
    wait_s: float = 20.0  # ...or after this long, whichever comes first


@dataclass
class TrainingSection:
    rounds: int = 20
    threads: int = 1  # torch intra-op threads; several nodes often share one machine


@dataclass
class GossipSection:
    topology: str = "ring"
    rule: str = "robust"
    clip_radius: float = 0.0  # 0 = adaptive
    round_timeout_s: float = 30.0
    max_update_mb: float = 1024.0
    linger_s: float = 3.0  # keep the broker up after the last round so slower neighbours can fetch it


@dataclass
class SecuritySection:
    max_skew_s: float = 300.0  # accepted clock difference for update timestamps


@dataclass
class MetricsSection:
    path: str = ""  # default: <data_dir>/metrics.jsonl
    save_models: bool = False  # write <data_dir>/models/round_NNNN.npy (flat float32) every round


@dataclass
class AttackSection:
    """Experiments only: make this node Byzantine (it trains honestly but sends crafted updates)."""

    kind: str = ""  # "" = honest; else one of p2pfl.attacks.ATTACKS
    seed: int = 0


@dataclass
class NodeConfig:
    node: NodeSection = field(default_factory=NodeSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    task: TaskSpec = field(default_factory=TaskSpec)  # what to learn; validated by TaskSpec itself
    training: TrainingSection = field(default_factory=TrainingSection)
    gossip: GossipSection = field(default_factory=GossipSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    attack: AttackSection = field(default_factory=AttackSection)

    @property
    def data_dir(self) -> Path:
        return Path(self.node.data_dir)

    @property
    def metrics_path(self) -> Path:
        return Path(self.metrics.path) if self.metrics.path else self.data_dir / "metrics.jsonl"


def _coerce(section: str, key: str, value: Any, expected: Any) -> Any:
    """Check one value against its annotated type; ints are accepted where floats are expected."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected == list[str]:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
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
    """Range checks that types alone cannot express."""
    finite = {
        "[discovery] wait_s": cfg.discovery.wait_s,
        "[gossip] round_timeout_s": cfg.gossip.round_timeout_s,
        "[gossip] max_update_mb": cfg.gossip.max_update_mb,
        "[gossip] linger_s": cfg.gossip.linger_s,
        "[gossip] clip_radius": cfg.gossip.clip_radius,
        "[security] max_skew_s": cfg.security.max_skew_s,
    }
    for key, value in finite.items():
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
    rules = aggregation.node_rules()
    checks = [
        (1 <= cfg.node.port <= 65535, "[node] port must be 1..65535"),
        (
            cfg.node.host not in ("", "0.0.0.0", "::"),
            "[node] host must be this device's own address, not a wildcard",
        ),
        (
            bool(cfg.discovery.interfaces) or not cfg.discovery.mdns,
            "[discovery] interfaces must not be empty",
        ),
        (cfg.discovery.wait_s >= 0, "[discovery] wait_s must be >= 0"),
        (cfg.discovery.expect_peers >= 0, "[discovery] expect_peers must be >= 0"),
        (cfg.gossip.linger_s >= 0, "[gossip] linger_s must be >= 0"),
        (cfg.gossip.max_update_mb >= 0.001, "[gossip] max_update_mb must be >= 0.001"),
        (cfg.security.max_skew_s > 0, "[security] max_skew_s must be > 0"),
        (cfg.training.rounds >= 1, "[training] rounds must be >= 1"),
        (cfg.training.threads >= 1, "[training] threads must be >= 1"),
        # the registry's node rules: simulator-only ones (push-sum: its mass is conserved only if no
        # update is ever lost, and a real round mixes without a neighbour that timed out) are refused
        (cfg.gossip.rule in rules, f"[gossip] rule must be one of {', '.join(rules)}"),
        (cfg.gossip.round_timeout_s > 0, "[gossip] round_timeout_s must be > 0"),
        (cfg.gossip.clip_radius >= 0, "[gossip] clip_radius must be >= 0 (0 = adaptive)"),
        (
            cfg.discovery.mdns or bool(cfg.discovery.static_peers) or cfg.discovery.expect_peers == 0,
            "[discovery] with mdns = false, list static_peers",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.attack.kind:  # only experiments set it; p2pfl.attacks imports torch, so only then
        from p2pfl.attacks import ATTACKS

        if cfg.attack.kind not in ATTACKS:
            raise ConfigError(f"[attack] kind must be empty (honest) or one of {ATTACKS}")
    for peer in cfg.discovery.static_peers:
        host, _, port = peer.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"[discovery] static_peers entry {peer!r} must look like 'host:port'")
    try:
        topology.parse_topology(cfg.gossip.topology)
    except ConfigError as exc:
        raise ConfigError(f"[gossip] topology: {exc}") from exc
    return cfg


def from_dict(raw: dict[str, Any]) -> NodeConfig:
    sections = {f.name: f for f in dataclasses.fields(NodeConfig)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; known sections: {sorted(sections)}")
    hints = get_type_hints(NodeConfig)
    return validate(NodeConfig(**{k: _section(k, hints[k], v) for k, v in raw.items()}))


def load(path: Path | str | None) -> NodeConfig:
    """Read and validate a TOML file; None gives the built-in defaults."""
    if path is None:
        return validate(NodeConfig())
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(
            f"config file {path} not found; pass --config PATH to an existing TOML file"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return from_dict(raw)


def to_toml(cfg: NodeConfig) -> str:
    """Render a config as TOML (the testbed writes one per node; users get a commented starting point)."""
    lines: list[str] = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
