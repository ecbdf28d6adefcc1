"""Local testbed and fault lab: N real node processes with real discovery, brokers and crypto.

It creates a throwaway federation, certifies every node, starts one `p2pfl node` process per node
(on 127.0.0.1, or with --netns each in its own network namespace behind one private bridge, optionally
shaped with tc netem), applies a --fault schedule (kill, restart, freeze, partition, join), shows live
progress, and ends with a summary table, `summary.json` and `accuracy.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from p2pfl import aggregation, reporting
from p2pfl import config as config_mod
from p2pfl.attacks import ATTACKS
from p2pfl.errors import ConfigError
from p2pfl.faultlab import (
    PARENT_PID_ENV,
    FaultRunner,
    LabError,
    NetLab,
    child_setup,
    cleanup_stale,
    netns_unavailable,
    signal_group,
)
from p2pfl.faults import (
    FaultError,
    Scheduler,
    check_schedule,
    frontier,
    join_indices,
    last_round,
    parse_netem,
    parse_schedule,
)
from p2pfl.federation import FederationAuthority
from p2pfl.identity import load_or_create
from p2pfl.learning.data import read_table
from p2pfl.learning.spec import OPTIMIZERS, PARTITION_SCHEMES, TaskSpec
from p2pfl.memory import MemoryWatch
from p2pfl.metrics import read_jsonl
from p2pfl.topology import parse_topology
from p2pfl.zygote import Zygote, ZygoteError

__all__ = [
    "HOST",
    "PARENT_PID_ENV",
    "MetricsTail",
    "NodeProcess",
    "build_parser",
    "byzantine_indices",
    "consensus_distances",
    "launch",
    "launch_node",
    "main",
    "node_config",
    "parse_args",
    "prepare",
    "progress_table",
    "read_metrics",
    "stop_all",
    "summarize",
    "summary_table",
]

HOST = "127.0.0.1"
ADAM_LR = 0.01  # --optimizer adam without --lr: the task's default (0.3, for SGD) would diverge
DATA_SUFFIXES = (".csv", ".npz")
YEAR = 365 * 86400.0
STOP_GRACE_S = 10.0
POLL_S = 0.1


# the scripts and tests that read a run's metrics files import it from here
read_metrics = read_jsonl


def _parse_line(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


@dataclass
class MetricsTail:
    """A metrics file read incrementally: the live loop polls it twice a second for a run that may last
    thousands of rounds, so each poll reads only the new complete lines."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    _offset: int = 0

    def refresh(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except OSError:
            size = 0
        if size < self._offset:  # the node started a fresh file (restart)
            self.records, self._offset = [], 0
        if size == self._offset:
            return self.records
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read(size - self._offset)
        complete = data[: data.rfind(b"\n") + 1]  # a half-written last line waits for the next poll
        self._offset += len(complete)
        lines = complete.decode("utf-8", errors="replace").splitlines()
        self.records.extend(r for r in (_parse_line(line) for line in lines) if r is not None)
        return self.records


@dataclass
class NodeProcess:
    name: str
    directory: Path
    proc: subprocess.Popen[bytes]
    tail: MetricsTail | None = None

    @property
    def metrics(self) -> list[dict[str, Any]]:
        if self.tail is None:
            self.tail = MetricsTail(self.directory / "metrics.jsonl")
        return self.tail.refresh()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


def total_nodes(args: argparse.Namespace) -> int:
    """Nodes launched at start plus those a `join` event launches later."""
    return int(args.nodes + len(getattr(args, "joiners", [])))


def node_config(
    args: argparse.Namespace, index: int, directory: Path, host: str = HOST
) -> config_mod.NodeConfig:
    """One node's config; a late joiner waits for the nodes before it, the others only for each other.

    Port 0: each broker binds a free port itself and advertises the one it got (no reserve-then-bind
    race between nodes, and a restarted node simply advertises its new port)."""
    cfg = config_mod.NodeConfig()
    cfg.node.name, cfg.node.data_dir, cfg.node.host, cfg.node.port = (
        f"node-{index}",
        str(directory),
        host,
        0,
    )
    cfg.discovery.interfaces = [host]
    cfg.discovery.expect_peers = args.nodes - 1 if index < args.nodes else index
    cfg.discovery.wait_s = args.wait
    per_node_files = len(getattr(args, "data_files", [])) > 1  # a folder: each node's file is whole
    cfg.task = TaskSpec(
        name=args.task,
        shard=0 if per_node_files else index,
        num_shards=1 if per_node_files else total_nodes(args),
        **_training_knobs(args, index),
    )
    cfg.training.rounds = args.rounds
    cfg.gossip.topology, cfg.gossip.rule, cfg.gossip.round_timeout_s = (
        args.topology,
        args.rule,
        args.round_timeout,
    )
    cfg.gossip.compression = getattr(args, "compression", "none")
    cfg.metrics.save_models = True
    if getattr(args, "min_wait", None) is not None:
        cfg.gossip.min_wait_s = args.min_wait
    if index in byzantine_indices(args.nodes, args.byzantine):
        cfg.attack.kind, cfg.attack.seed = args.attack, args.seed + index
    cfg.attack.silent = args.nodes - getattr(args, "silent", 0) <= index < args.nodes
    return config_mod.validate(cfg)


def _training_knobs(args: argparse.Namespace, index: int) -> dict[str, Any]:
    """The [task] keys the testbed's options set. --data FILE is split among the nodes like a built-in
    data set; --data FOLDER gives node i the i-th file (sorted by name) whole, as its own site data."""
    knobs: dict[str, Any] = {
        "partition": args.partition,
        "alpha": args.alpha,
        "seed": args.seed,
        "local_epochs": getattr(args, "local_epochs", 1),
        "batch_size": getattr(args, "batch_size", 32),
        "optimizer": getattr(args, "optimizer", "sgd"),
    }
    lr = getattr(args, "lr", None)
    if lr is not None:
        knobs["lr"] = lr
    elif knobs["optimizer"] == "adam":
        knobs["lr"] = ADAM_LR
    files: list[str] = getattr(args, "data_files", [])
    if len(files) == 1:
        knobs["data"] = files[0]
    elif files:
        knobs["data"] = files[index]
    return knobs


def byzantine_indices(nodes: int, count: int) -> list[int]:
    """Which nodes attack: spread evenly over the node numbers, so no two sit together on a ring."""
    return sorted({(i * nodes) // count for i in range(count)}) if count else []


def prepare(args: argparse.Namespace, out: Path, hosts: list[str] | None = None) -> list[Path]:
    """Create the federation and one certified, configured data directory per node (joiners included:
    a late joiner is a member certified at setup whose process starts later)."""
    authority = FederationAuthority.create(out / "federation")
    configs = []
    count = total_nodes(args)
    for i in range(count):
        directory = out / f"node-{i}"
        identity = load_or_create(directory)
        # certificate, federation.pub and the TLS files (node.crt, ca.crt) into the node's data dir
        authority.issue(
            f"node-{i}", identity.verify_key_bytes, identity.box_public_bytes, YEAR, node_dir=directory
        )
        path = directory / "node.toml"
        host = hosts[i] if hosts else HOST
        path.write_text(config_mod.to_toml(node_config(args, i, directory, host)))
        configs.append(path)
    return configs


def launch_node(path: Path, prefix: list[str] | None = None, zygote: Zygote | None = None) -> NodeProcess:
    """Start one node in its own session (so it can be signalled as a group), told who its parent is:
    the kernel sends it SIGTERM when the testbed dies (PR_SET_PDEATHSIG), and $P2PFL_PARENT_PID lets
    the node notice that portably. `prefix` runs it elsewhere (`ip netns exec NS`); `zygote` forks it
    from a fork server that has torch and p2pfl loaded already (shared pages, no import per node)."""
    child_env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    argv = ["node", "--config", str(path)]
    if zygote is not None and not prefix:
        forked = zygote.spawn(argv, path.parent / "node.log", child_env)
        return NodeProcess(path.parent.name, path.parent, forked)
    env = {**os.environ, **child_env, PARENT_PID_ENV: str(os.getpid())}
    cmd = [*(prefix or []), sys.executable, "-m", "p2pfl", *argv]
    with (path.parent / "node.log").open("ab") as log:  # append: a restarted node keeps its history
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=child_setup(os.getpid()),
        )
    return NodeProcess(path.parent.name, path.parent, proc)


def launch(
    configs: list[Path], procs: list[NodeProcess] | None = None, prefixes: list[list[str]] | None = None
) -> list[NodeProcess]:
    """Start one node process per config; appends to `procs` as it goes, so a failure halfway still
    leaves the caller a list of every child to stop."""
    procs = [] if procs is None else procs
    for i, path in enumerate(configs):
        procs.append(launch_node(path, prefixes[i] if prefixes else None))
    return procs


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Ignore Ctrl-C, SIGTERM and SIGHUP while cleaning up, so cleanup always finishes."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_all(procs: list[NodeProcess], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every node's process group (and SIGCONT, in case it is frozen), then SIGKILL the groups
    still there after `grace_s`. SIGINT would not do: a non-interactive shell's children ignore it."""
    with _shielded():
        for p in procs:
            if p.running:
                signal_group(p.proc.pid, signal.SIGTERM)
                signal_group(p.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + grace_s
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for p in procs:
            if p.running:  # not yet reaped, so its group id cannot have been reused
                signal_group(p.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.proc.wait(timeout=10)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _state(p: NodeProcess, frozen: set[str]) -> str:
    code = p.proc.poll()
    if code is None:
        return "frozen" if p.name in frozen else "running"
    return "done" if code == 0 else f"exit {code}"


def progress_table(
    procs: list[NodeProcess], rounds: int, started: float, frozen: set[str] | None = None
) -> Table:
    table = Table(title=f"p2pfl testbed - {time.monotonic() - started:.0f} s")
    for col in ("node", "round", "accuracy", "train loss", "neighbours", "rejected", "state"):
        table.add_column(col)
    for p in procs:
        m = p.metrics
        last = m[-1] if m else {}
        neighbours, missing = last.get("neighbours") or {}, last.get("missing") or []
        got = sum(1 for n in neighbours if n not in missing)
        table.add_row(
            p.name,
            f"{last_round(m)}/{rounds or 'inf'}",
            f"{last.get('accuracy') or 0:.3f}",
            f"{last.get('train_loss') or 0:.3f}",
            f"{got}/{len(neighbours)}",
            str(sum((last.get("rejected") or {}).values())),
            _state(p, frozen or set()),
        )
    return table


def consensus_distances(procs: list[NodeProcess], rounds: int) -> list[float | None]:
    """Mean squared distance of the node models from their average, per round (None if a model is missing)."""
    distances, counts = reporting.consensus_by_round([p.directory for p in procs], rounds)
    return [d if c == len(procs) else None for d, c in zip(distances, counts, strict=True)]


def summarize(
    procs: list[NodeProcess],
    rounds: int,
    wall_s: float,
    byzantine: list[int],
    alive: set[str] | None = None,
    faults: list[dict[str, Any]] | None = None,
    memory: MemoryWatch | None = None,
) -> dict[str, Any]:
    """`reporting.summarize` of the node processes, whose exit codes and roles only the testbed knows
    (accuracy and consensus are over the honest nodes alive at the end), plus each node's peak memory
    when `memory` sampled it and the round-1 against steady round times."""
    alive = {p.name for p in procs if p.proc.returncode in (None, 0)} if alive is None else alive
    runs = [
        reporting.NodeRun.load(
            p.directory,
            name=p.name,
            exit_code=p.proc.returncode,
            byzantine=i in byzantine,
            alive=p.name in alive,
        )
        for i, p in enumerate(procs)
    ]
    summary = reporting.summarize(runs, rounds=rounds, wall_s=wall_s, faults=faults)
    for n in summary["nodes"]:
        n["memory"] = memory.peaks.get(n["name"]) if memory is not None else None
    summary["memory"] = memory.summary(p.name for p in procs) if memory is not None else None
    summary["round_times"] = _round_times(procs)
    return summary


def _round_times(procs: list[NodeProcess]) -> dict[str, float | None]:
    """Round 1 against the steady rounds, from the nodes' own `round_s` (a round starts once the node
    has its expected peers): the median over nodes of round 1, of rounds >= 3, and their ratio."""
    first: list[float] = []
    steady: list[float] = []
    for p in procs:
        for r in read_metrics(p.directory / "metrics.jsonl"):
            value, round_ = reporting._number(r.get("round_s")), r.get("round")
            if value is None or not isinstance(round_, int) or "caught_up_from" in r:
                continue
            (first if round_ == 1 else steady if round_ >= 3 else []).append(value)
    f = float(np.median(first)) if first else None
    st = float(np.median(steady)) if steady else None
    return {"round1_s": f, "steady_s": st, "ratio": f / st if f is not None and st else None}


def summary_table(summary: dict[str, Any]) -> Table:
    """`reporting.summary_table`, with the testbed's memory and round-1 lines in the caption."""
    table = reporting.summary_table(summary, title="testbed summary")
    table.caption = (
        str(table.caption or "")
        + _memory_caption(summary.get("memory"))
        + _rounds_caption(summary.get("round_times"))
    )
    return table


def _memory_caption(memory: dict[str, Any] | None) -> str:
    if not memory or memory.get("pss_mb_median") is None:
        return ""
    others = sum(v.get("pss_mb", 0.0) for v in memory.get("others", {}).values())
    # a run stopped early (interrupted, out of memory) may have per-node peaks but no summed sample
    sums = [
        f"{label} {memory[key] / 1e3:.2f} GB"
        for label, key in (("RSS", "rss_mb_sum_peak"), ("PSS", "pss_mb_sum_peak"))
        if memory.get(key) is not None
    ]
    return (
        f"\nmemory per node (peak): RSS median {memory['rss_mb_median']:.0f} MB, max {memory['rss_mb_max']:.0f} MB; "
        f"PSS median {memory['pss_mb_median']:.0f} MB, max {memory['pss_mb_max']:.0f} MB"
        + (f"; summed: {', '.join(sums)}" if sums else "")
        + (f" (fork server PSS {others:.0f} MB included)" if sums and others else "")
    )


def _rounds_caption(times: dict[str, Any] | None) -> str:
    if not times or times.get("round1_s") is None or times.get("steady_s") is None:
        return ""
    return (
        f"\nround 1 {times['round1_s']:.3f} s, steady round {times['steady_s']:.3f} s (medians over nodes): "
        f"ratio {times['ratio']:.2f}"
    )


# -- command line ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Bad input ends with one line and exit status 2 (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _float_above(low: float, inclusive: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'>=' if inclusive else '>'} {low:g}, got {text}"
            )
        return value

    return parse


def _topology(text: str) -> str:
    try:
        parse_topology(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser(prog: str = "testbed") -> argparse.ArgumentParser:
    """The testbed's options; `p2pfl testbed` and scripts/testbed.py both parse with it."""
    p = _Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=_int_at_least(2), default=4, help="nodes launched at start (>= 2)")
    p.add_argument(
        "--topology", type=_topology, default="ring", help="ring, full, exponential, ... or a file"
    )
    p.add_argument("--rounds", type=_int_at_least(0), default=20, help="rounds per node (0: until stopped)")
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--partition", default="iid", choices=PARTITION_SCHEMES)
    p.add_argument(
        "--alpha",
        type=_float_above(0.0),
        default=0.5,
        help="Dirichlet concentration for --partition dirichlet",
    )
    p.add_argument("--rule", default="robust", choices=aggregation.node_rules())
    p.add_argument(
        "--compression",
        default="none",
        help="[gossip] compression of every node: none, fp16, bf16, int8[:CHUNK], topk:FRACTION",
    )
    p.add_argument(
        "--lr",
        type=_float_above(0.0),
        default=None,
        help=f"local learning rate (default: the task's, {TaskSpec.lr:g}; {ADAM_LR:g} with --optimizer adam)",
    )
    p.add_argument("--local-epochs", type=_int_at_least(1), default=1, help="local passes per round")
    p.add_argument("--batch-size", type=_int_at_least(1), default=32, help="local minibatch size")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help="local optimizer")
    p.add_argument(
        "--data",
        default="",
        help="own data instead of the built-in set: a .csv (header row, 'label' column) or .npz file, "
        "split among the nodes, or a folder with one such file per node (docs/own_data.md)",
    )
    p.add_argument(
        "--launch",
        default="fork",
        choices=("fork", "exec"),
        help="fork: nodes are forked from one process that loaded torch and p2pfl once (shared memory); "
        "exec: each node starts its own Python (always so with --netns)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--byzantine", type=_int_at_least(0), default=0, help="how many nodes attack (spread evenly)"
    )
    p.add_argument("--attack", default="sign-flip", choices=ATTACKS, help="what the Byzantine nodes send")
    p.add_argument(
        "--silent",
        type=_int_at_least(0),
        default=0,
        help="how many members (the last ones) stay connected but never send an update",
    )
    p.add_argument("--round-timeout", type=_float_above(0.0), default=30.0)
    p.add_argument(
        "--min-wait",
        type=_float_above(0.0, inclusive=True),
        default=None,
        help="[gossip] min_wait_s: the least a round waits for a missing neighbour (at most "
        "--round-timeout); large values make the first round wait for nodes still starting",
    )
    p.add_argument(
        "--wait",
        type=_float_above(0.0, inclusive=True),
        default=30.0,
        help="seconds to wait for all peers before round 1",
    )
    p.add_argument(
        "--timeout", type=_float_above(0.0), default=900.0, help="stop everything after this many seconds"
    )
    p.add_argument("--out", default=None, help="output directory (default runs/testbed-TIMESTAMP)")
    p.add_argument(
        "--fault",
        default="",
        help="fault schedule, e.g. 'kill node-2@r20; restart node-2@r30; freeze node-3@r40 for 60s; "
        "partition 0-2|3-5@r60 for 60s; join node-6@r80' (@rN: once the most advanced live node "
        "finished round N; join node-K with --nodes K prepares K+1 nodes and holds the last back)",
    )
    p.add_argument(
        "--netns", action="store_true", help="one network namespace per node on a private bridge (root)"
    )
    p.add_argument(
        "--netem",
        action="append",
        default=[],
        help="with --netns: tc netem on every node's link, e.g. 'delay=20ms,loss=1%%,rate=10mbit', "
        "or one node's: 'node-2:delay=100ms' (repeatable)",
    )
    return p


def parse_args(argv: list[str] | None, prog: str = "testbed") -> argparse.Namespace:
    p = build_parser(prog)
    args = p.parse_args(argv)
    if not 0 <= args.byzantine < args.nodes:
        p.error("--byzantine must be in 0..nodes-1")
    try:
        args.events = parse_schedule(args.fault)
        check_schedule(args.events, args.nodes, netns=args.netns)
        args.joiners = join_indices(args.events)
        if args.netem and not args.netns:
            raise FaultError("--netem needs --netns (it shapes each node's own link)")
        args.netem_by_node = parse_netem(args.netem, total_nodes(args))
    except FaultError as exc:
        p.error(str(exc))
    if args.netns and (why := netns_unavailable()):
        p.error(why)
    try:
        args.data_files = data_files(args.data, total_nodes(args))
    except ConfigError as exc:
        p.error(str(exc))
    return args


def data_files(data: str, nodes: int) -> list[str]:
    """--data as absolute paths: [] (built-in data), [FILE] (split among the nodes), or one file per
    node from a folder (its .csv / .npz files, sorted by name)."""
    if not data:
        return []
    path = Path(data).expanduser().absolute()
    if path.is_dir():
        files = sorted(str(f) for f in path.iterdir() if f.suffix.lower() in DATA_SUFFIXES and f.is_file())
        if len(files) != nodes:
            raise ConfigError(
                f"--data {data}: the folder holds {len(files)} .csv/.npz file(s) but {nodes} nodes need one "
                "each; add or remove files, or pass one file to split among the nodes"
            )
        return files
    if not path.is_file():
        raise ConfigError(f"--data {data}: no such file or folder")
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise ConfigError(f"--data {data}: must be a .csv (header row) or .npz file, or a folder of them")
    return [str(path)]


def check_config(args: argparse.Namespace) -> None:
    """Build and validate one node's config before anything is created, so that a value the nodes
    refuse (e.g. --rounds 0 while they need rounds >= 1) fails here with the nodes' own message."""
    try:
        node_config(args, 0, Path("node-0"))
        for path in getattr(args, "data_files", []):  # a file the nodes cannot read fails here, once
            read_table(path, what="--data")
    except ConfigError as exc:
        if args.rounds == 0:
            raise ConfigError(f"--rounds 0 (run until stopped) is not supported by the nodes: {exc}") from exc
        raise


# -- running -----------------------------------------------------------------------------------------


@dataclass
class Run:
    """One testbed run's moving parts, so cleanup can reach whatever had been started."""

    args: argparse.Namespace
    out: Path
    console: Console
    procs: list[NodeProcess] = field(default_factory=list)
    lab: NetLab | None = None
    runner: FaultRunner | None = None
    alive: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    zygote: Zygote | None = None
    memory: MemoryWatch = field(default_factory=MemoryWatch)

    def log(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)

    def setup_lab(self) -> list[str] | None:
        """With --netns: remove stale labs, build ours, shape links; returns each node's address."""
        if not self.args.netns:
            return None
        for name in cleanup_stale():
            self.log(f"removed stale namespace {name}")
        self.lab = NetLab(total_nodes(self.args))
        self.lab.setup()
        for index, netem in self.args.netem_by_node.items():
            self.lab.netem(index, netem)
            self.log(f"netem on node-{index}: {' '.join(netem)}")
        return [self.lab.address(i) for i in range(total_nodes(self.args))]

    def start_zygote(self, config: Path) -> None:
        """The fork server (--launch fork, not with --netns); if it cannot start, nodes are exec'd."""
        if self.args.launch != "fork" or self.lab is not None:
            return
        self.log("loading torch and p2pfl once in the fork server ...")
        try:
            self.zygote = Zygote(config, self.out / "zygote.log")
        except (ZygoteError, OSError) as exc:
            self.log(
                f"fork server unavailable ({exc}; see {self.out / 'zygote.log'}); starting each node with exec"
            )

    def start(self) -> None:
        configs = prepare(self.args, self.out, self.setup_lab())
        self.start_zygote(configs[0])

        def start_node(index: int) -> NodeProcess:
            prefix = self.lab.exec_prefix(index) if self.lab else None
            return launch_node(configs[index], prefix, self.zygote)

        for i in range(self.args.nodes):
            self.procs.append(start_node(i))
        scheduler = Scheduler(self.args.events)
        self.runner = FaultRunner(scheduler, self.procs, start_node, self.lab, self.log, self.started)

    def finished(self) -> bool:
        """Every node has exited or is frozen for good, and no freeze or partition is still to end."""
        assert self.runner is not None
        idle = all(not p.running or p.name in self.runner.frozen for p in self.procs)
        return idle and not self.runner.scheduler.ends_pending()

    def watch(self) -> None:
        assert self.runner is not None
        runner = self.runner
        table = progress_table(self.procs, self.args.rounds, self.started, runner.frozen)
        shown = time.monotonic()
        with Live(table, console=self.console, refresh_per_second=2) as live:
            while True:
                rounds = {p.name: last_round(p.metrics) for p in self.procs}
                runner.step(frontier(rounds, {p.name for p in self.procs if p.running}))
                self.sample_memory()
                if self.finished():
                    break
                if time.monotonic() - self.started > self.args.timeout:
                    self.log(f"timeout after {self.args.timeout:.0f} s; stopping nodes")
                    break
                time.sleep(POLL_S)  # short, so an event fires close to its round; reads are incremental
                if time.monotonic() - shown >= 0.5:
                    shown = time.monotonic()
                    live.update(progress_table(self.procs, self.args.rounds, self.started, runner.frozen))

    def sample_memory(self) -> None:
        """Peak memory per node (and of the fork server, which holds the pages they share)."""
        nodes = [(p.name, p.proc.pid) for p in self.procs if p.running]
        extra = [("fork-server", self.zygote.proc.pid)] if self.zygote is not None else []
        self.memory.poll(nodes, extra)

    def note_alive(self) -> None:
        """Which nodes count as alive at the end: still running and not frozen, or finished cleanly."""
        frozen = self.runner.frozen if self.runner else set()
        self.alive = {
            p.name for p in self.procs if (p.running and p.name not in frozen) or p.proc.returncode == 0
        }

    def cleanup(self) -> None:
        with _shielded():
            if self.runner is not None:
                self.runner.release()
            stop_all(self.procs)
            if self.zygote is not None:
                self.zygote.close()
            if self.lab is not None:
                self.lab.teardown()

    def report(self) -> int:
        """Write summary.json (always), the plot and the table; non-zero if a node failed that no
        fault took down."""
        args, faults = self.args, self.runner.records if self.runner else []
        summary = summarize(
            self.procs, args.rounds, time.monotonic() - self.started, byzantine_indices(args.nodes, args.byzantine),
            alive=self.alive, faults=faults, memory=self.memory,
        )  # fmt: skip
        launched = {p.name for p in self.procs}
        summary["nodes"] += [  # joiners whose join never fired: listed, never counted
            reporting.node_summary(
                reporting.NodeRun.load(self.out / f"node-{i}", name=f"node-{i}", byzantine=False, alive=False)
            )
            for i in args.joiners
            if f"node-{i}" not in launched
        ]
        summary["faults_not_fired"] = (
            [e.clause for e in self.runner.scheduler.unfired()] if self.runner else []
        )
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        try:
            reporting.plot_report(summary, self.out)
        except Exception as exc:  # a plot must never cost the summary
            self.log(f"could not draw the plots: {exc}")
        self.console.print(summary_table(summary))
        self.log(
            f"wrote {self.out / 'summary.json'}, accuracy.png (and the other plots), per-node logs and metrics in {self.out}"
        )
        down = _expected_down(faults) | ((self.runner.frozen if self.runner else set()) - self.alive)
        failed = [
            n["name"]
            for n in summary["nodes"]
            if n["name"] not in down
            and (n["exit_code"] != 0 or (args.rounds and n["rounds_completed"] < args.rounds))
        ]
        if failed:
            self.console.print(f"[red]failed nodes: {failed} (see their node.log)")
        return 1 if failed else 0


def _expected_down(faults: list[dict[str, Any]]) -> set[str]:
    """Nodes whose last fault left them dead (killed and not restarted)."""
    last: dict[str, str] = {}
    for f in faults:
        last[f["node"]] = f["action"]
    return {name for name, action in last.items() if action == "kill"}


def main(argv: list[str] | None = None, prog: str = "testbed") -> int:
    args = parse_args(argv, prog)
    try:
        check_config(args)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/testbed-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    if out.exists() and any(out.iterdir()):
        print(f"{prog}: error: {out} is not empty; choose another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    run = Run(args, out, Console())
    # a killed testbed must not orphan its nodes: SIGTERM/SIGHUP stop them like Ctrl-C does
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    status = 0
    try:
        run.start()
        run.watch()
    except KeyboardInterrupt:
        run.log("interrupted; stopping nodes")
    except (LabError, ConfigError, OSError) as exc:
        run.log(f"error: {exc}")
        status = 2
    finally:
        run.note_alive()
        run.cleanup()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return max(status, run.report())
