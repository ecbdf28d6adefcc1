"""Local testbed: N real node processes on 127.0.0.1 with real discovery, brokers and crypto.

It creates a throwaway federation, certifies every node, starts one `p2pfl node` process per node,
shows live progress, and ends with a summary table, `summary.json` and `accuracy.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from p2pfl import aggregation
from p2pfl import config as config_mod
from p2pfl.attacks import ATTACKS
from p2pfl.federation import FederationAuthority
from p2pfl.identity import load_or_create
from p2pfl.learning.spec import PARTITION_SCHEMES, TaskSpec
from p2pfl.metrics import read_jsonl

__all__ = [
    "HOST",
    "NodeProcess",
    "build_parser",
    "byzantine_indices",
    "consensus_distances",
    "free_ports",
    "launch",
    "main",
    "node_config",
    "parse_args",
    "plot",
    "prepare",
    "progress_table",
    "stop_all",
    "summarize",
    "summary_table",
]

HOST = "127.0.0.1"
YEAR = 365 * 86400.0


@dataclass
class NodeProcess:
    name: str
    directory: Path
    proc: subprocess.Popen[bytes]

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.directory / "metrics.jsonl")


def free_ports(count: int) -> list[int]:
    """Distinct free ports: every socket stays bound until all are chosen, so none is handed out twice."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def node_config(args: argparse.Namespace, index: int, directory: Path, port: int) -> config_mod.NodeConfig:
    cfg = config_mod.NodeConfig()
    cfg.node.name, cfg.node.data_dir, cfg.node.host, cfg.node.port = (
        f"node-{index}",
        str(directory),
        HOST,
        port,
    )
    cfg.discovery.interfaces, cfg.discovery.expect_peers = [HOST], args.nodes - 1
    cfg.discovery.wait_s = args.wait
    cfg.task = TaskSpec(
        name=args.task,
        shard=index,
        num_shards=args.nodes,
        partition=args.partition,
        alpha=args.alpha,
        seed=args.seed,
    )
    cfg.training.rounds = args.rounds
    cfg.gossip.topology, cfg.gossip.rule, cfg.gossip.round_timeout_s = (
        args.topology,
        args.rule,
        args.round_timeout,
    )
    cfg.metrics.save_models = True
    if index in byzantine_indices(args.nodes, args.byzantine):
        cfg.attack.kind, cfg.attack.seed = args.attack, args.seed + index
    return config_mod.validate(cfg)


def byzantine_indices(nodes: int, count: int) -> list[int]:
    """Which nodes attack: spread evenly over the node numbers, so no two sit together on a ring."""
    return sorted({(i * nodes) // count for i in range(count)}) if count else []


def prepare(args: argparse.Namespace, out: Path) -> list[Path]:
    """Create the federation and one certified, configured data directory per node."""
    authority = FederationAuthority.create(out / "federation")
    configs = []
    ports = free_ports(args.nodes)
    for i in range(args.nodes):
        directory = out / f"node-{i}"
        identity = load_or_create(directory)
        cert = authority.issue(f"node-{i}", identity.verify_key_bytes, identity.box_public_bytes, YEAR)
        (directory / "certificate").write_bytes(cert.to_bytes())
        authority.root.save(directory / "federation.pub")
        path = directory / "node.toml"
        path.write_text(config_mod.to_toml(node_config(args, i, directory, ports[i])))
        configs.append(path)
    return configs


def launch(configs: list[Path], procs: list[NodeProcess] | None = None) -> list[NodeProcess]:
    """Start one node process per config; appends to `procs` as it goes, so a failure halfway still
    leaves the caller a list of every child to stop."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [] if procs is None else procs
    for path in configs:
        log = (path.parent / "node.log").open("wb")
        cmd = [sys.executable, "-m", "p2pfl", "node", "--config", str(path)]
        procs.append(
            NodeProcess(
                path.parent.name,
                path.parent,
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True),
            )
        )
    return procs


def stop_all(procs: list[NodeProcess], grace_s: float = 5.0) -> None:
    """Terminate every child that is still running; kill those that ignore it. A second Ctrl-C while
    this runs is ignored, so cleanup always finishes."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _stop(procs, grace_s)
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(procs: list[NodeProcess], grace_s: float) -> None:
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def progress_table(procs: list[NodeProcess], rounds: int, started: float) -> Table:
    table = Table(title=f"p2pfl testbed - {time.monotonic() - started:.0f} s")
    for col in ("node", "round", "accuracy", "train loss", "neighbours", "rejected", "state"):
        table.add_column(col)
    for p in procs:
        m = p.metrics
        last = m[-1] if m else {}
        code = p.proc.poll()
        state = "running" if code is None else ("done" if code == 0 else f"exit {code}")
        got = sum(1 for n in last.get("neighbours", {}) if n not in last.get("missing", []))
        table.add_row(
            p.name,
            f"{len(m)}/{rounds}",
            f"{last.get('accuracy', 0):.3f}",
            f"{last.get('train_loss', 0):.3f}",
            f"{got}/{len(last.get('neighbours', {}))}",
            str(sum(last.get("rejected", {}).values())),
            state,
        )
    return table


def consensus_distances(procs: list[NodeProcess], rounds: int) -> list[float | None]:
    """Mean squared distance of the node models from their average, per round (None if a model is missing)."""
    out: list[float | None] = []
    for r in range(1, rounds + 1):
        files = [p.directory / "models" / f"round_{r:04d}.npy" for p in procs]
        if not all(f.exists() for f in files):
            out.append(None)
            continue
        models = np.stack([np.load(f, allow_pickle=False) for f in files])
        out.append(float(np.mean(np.sum((models - models.mean(axis=0)) ** 2, axis=1))))
    return out


def summarize(procs: list[NodeProcess], rounds: int, wall_s: float, byzantine: list[int]) -> dict[str, Any]:
    """Accuracy and consensus are over the honest nodes; Byzantine ones are listed but not averaged."""
    nodes = []
    for i, p in enumerate(procs):
        m = p.metrics
        last = m[-1] if m else {}
        nodes.append(
            {
                "name": p.name,
                "byzantine": i in byzantine,
                "final_accuracy": last.get("accuracy"),
                "rounds_completed": len(m),
                "rejected": sum(last.get("rejected", {}).values()),
                "rejected_by_reason": last.get("rejected", {}),
                "bytes_sent": last.get("bytes_out", 0),
                "bytes_received": last.get("bytes_in", 0),
                "exit_code": p.proc.returncode,
                "accuracy_by_round": [r["accuracy"] for r in m],
            }
        )
    accs = [n["final_accuracy"] for n in nodes if n["final_accuracy"] is not None and not n["byzantine"]]
    cd = consensus_distances([p for i, p in enumerate(procs) if i not in byzantine], rounds)
    known = [d for d in cd if d is not None]
    return {
        "nodes": nodes,
        "mean_accuracy": float(np.mean(accs)) if accs else None,
        "min_accuracy": float(np.min(accs)) if accs else None,
        "accuracy_spread": float(np.max(accs) - np.min(accs)) if accs else None,
        "consensus_distance": {
            "first": known[0] if known else None,
            "last": known[-1] if known else None,
            "by_round": cd,
        },
        "wall_s": wall_s,
        "bytes_sent_total": int(sum(n["bytes_sent"] for n in nodes)),
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for n in summary["nodes"]:
        ax1.plot(range(1, len(n["accuracy_by_round"]) + 1), n["accuracy_by_round"], label=n["name"])
    ax1.set(xlabel="round", ylabel="test accuracy", title="accuracy per node")
    ax1.legend(fontsize="small")
    cd = [(i + 1, d) for i, d in enumerate(summary["consensus_distance"]["by_round"]) if d]
    if cd:
        ax2.semilogy(*zip(*cd, strict=True), marker=".")
    ax2.set(xlabel="round", ylabel="consensus distance", title="mean squared distance from average model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="testbed summary")
    for col in ("node", "final accuracy", "rounds", "rejected", "bytes sent", "exit"):
        table.add_column(col)
    for n in summary["nodes"]:
        acc = n["final_accuracy"]
        table.add_row(
            n["name"] + (" (byzantine)" if n["byzantine"] else ""),
            "-" if acc is None else f"{acc:.4f}",
            str(n["rounds_completed"]),
            str(n["rejected"]),
            f"{n['bytes_sent'] / 1e6:.2f} MB",
            str(n["exit_code"]),
        )
    cd = summary["consensus_distance"]
    table.caption = (
        f"honest nodes: mean acc {summary['mean_accuracy'] or 0:.4f}, min {summary['min_accuracy'] or 0:.4f}, "
        f"spread {summary['accuracy_spread'] or 0:.4f}; consensus distance first {cd['first'] or 0:.3g} "
        f"-> last {cd['last'] or 0:.3g}; wall {summary['wall_s']:.1f} s; "
        f"sent {summary['bytes_sent_total'] / 1e6:.1f} MB"
    )
    return table


def build_parser(prog: str = "testbed") -> argparse.ArgumentParser:
    """The testbed's options; `p2pfl testbed` and scripts/testbed.py both parse with it."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--topology", default="ring", help="ring, full, or a topology file path")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--partition", default="iid", choices=PARTITION_SCHEMES)
    p.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet concentration for --partition dirichlet"
    )
    p.add_argument("--rule", default="robust", choices=aggregation.node_rules())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--byzantine", type=int, default=0, help="how many nodes attack (spread evenly)")
    p.add_argument("--attack", default="sign-flip", choices=ATTACKS, help="what the Byzantine nodes send")
    p.add_argument("--round-timeout", type=float, default=30.0)
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for all peers before round 1")
    p.add_argument("--timeout", type=float, default=900.0, help="stop everything after this many seconds")
    p.add_argument("--out", default=None, help="output directory (default runs/testbed-TIMESTAMP)")
    return p


def parse_args(argv: list[str] | None, prog: str = "testbed") -> argparse.Namespace:
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.nodes < 2:
        p.error("--nodes must be >= 2")
    if not 0 <= args.byzantine < args.nodes:
        p.error("--byzantine must be in 0..nodes-1")
    return args


def main(argv: list[str] | None = None, prog: str = "testbed") -> int:
    args = parse_args(argv, prog)
    out = Path(args.out or f"runs/testbed-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; choose another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    # a killed testbed must not orphan its nodes
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    procs: list[NodeProcess] = []
    started = time.monotonic()
    try:
        procs = launch(prepare(args, out), procs)
        with Live(progress_table(procs, args.rounds, started), console=console, refresh_per_second=2) as live:
            while any(p.proc.poll() is None for p in procs):
                if time.monotonic() - started > args.timeout:
                    console.print(f"[red]timeout after {args.timeout:.0f} s; stopping nodes")
                    break
                time.sleep(0.5)
                live.update(progress_table(procs, args.rounds, started))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; stopping nodes")
    finally:
        stop_all(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    wall = time.monotonic() - started
    summary = summarize(procs, args.rounds, wall, byzantine_indices(args.nodes, args.byzantine))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "accuracy.png")
    console.print(summary_table(summary))
    console.print(f"wrote {out / 'summary.json'}, {out / 'accuracy.png'}, per-node logs and metrics in {out}")
    failed = [
        n["name"] for n in summary["nodes"] if n["exit_code"] != 0 or n["rounds_completed"] < args.rounds
    ]
    if failed:
        console.print(f"[red]failed nodes: {failed} (see their node.log)")
        return 1
    return 0
