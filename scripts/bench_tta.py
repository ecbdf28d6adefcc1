#!/usr/bin/env python
"""Time to accuracy: seconds (rounds, bytes) until EVERY node of a real 8-node ring reaches 0.93 on digits.

Runs the testbed (real node processes over mutual TLS on 127.0.0.1) once per --steps value k, each
node with [gossip] steps_per_round = k: k gossip exchanges per local training step (a node's rounds
count exchanges and only every k-th one trains), for --epochs local training steps (rounds = epochs
x k). From the nodes' metrics.jsonl it reads the first round in which every node's accuracy is >=
--target, and when that round ended on the slowest node, counted from the start of the first round
(after start-up: warm-up and peer discovery are not counted; they are printed apart).

The baseline, measured in the same run: centralized training of the same model with the same SGD
on the pooled training data (every node's shard together: the whole digits training split), one
process, evaluated after every epoch, until the test accuracy is >= --target. The ratio is
(decentralized time to target) / (centralized time to target).

    python scripts/bench_tta.py                   # 8 nodes, ring, digits MLP 64-32-10, SGD lr 0.5, k = 1, 2, 4

The last line is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from p2pfl import config as config_mod  # noqa: E402
from p2pfl import testbed  # noqa: E402
from p2pfl.learning import TaskSpec, load_task  # noqa: E402
from p2pfl.metrics import read_jsonl  # noqa: E402


def central_time_to(args: argparse.Namespace) -> dict[str, Any]:
    """Train one model on all the training data (shard 0 of 1) epoch by epoch until the target."""
    torch.set_num_threads(1)
    task = load_task(
        TaskSpec(
            args.task, 0, 1, seed=args.seed, lr=args.lr, batch_size=args.batch_size, hidden=tuple(args.hidden)
        )
    )
    model = task.build_model()
    task.train(model)  # warm-up epoch (torch's first optimizer step imports its compiler stack) ...
    model = task.build_model()  # ... then start over from the initial model, timed
    task = load_task(
        TaskSpec(
            args.task, 0, 1, seed=args.seed, lr=args.lr, batch_size=args.batch_size, hidden=tuple(args.hidden)
        )
    )
    started = time.perf_counter()
    accuracy = 0.0
    for epoch in range(1, args.central_epochs + 1):
        task.train(model)
        accuracy, _ = task.evaluate(model)
        if accuracy >= args.target:
            return {"epochs": epoch, "seconds": time.perf_counter() - started, "accuracy": accuracy}
    return {"epochs": None, "seconds": None, "accuracy": accuracy}


def run_testbed(args: argparse.Namespace, k: int, out: Path) -> dict[str, Any]:
    """One testbed run with [gossip] steps_per_round = k; the time, rounds and bytes to the target."""
    original = testbed.node_config
    hidden = tuple(args.hidden)

    def with_steps(
        args: argparse.Namespace, index: int, directory: Path, host: str = testbed.HOST
    ) -> config_mod.NodeConfig:
        cfg = original(args, index, directory, host)
        cfg.gossip.steps_per_round = k
        cfg.task = dataclasses.replace(cfg.task, hidden=hidden)
        return config_mod.validate(cfg)

    rounds = args.epochs * k
    argv = [
        "--nodes", str(args.nodes), "--topology", args.topology, "--rounds", str(rounds),
        "--task", args.task, "--rule", args.rule, "--lr", str(args.lr), "--batch-size", str(args.batch_size),
        "--seed", str(args.seed), "--timeout", str(args.timeout), "--out", str(out),
    ]  # fmt: skip
    testbed.node_config = with_steps
    launched = time.time()
    try:
        status = testbed.main(argv)
    finally:
        testbed.node_config = original
    records = [read_jsonl(out / f"node-{i}" / "metrics.jsonl") for i in range(args.nodes)]
    by_round: list[dict[int, dict[str, Any]]] = [
        {r["round"]: r for r in recs if "round" in r and "accuracy" in r} for recs in records
    ]
    first = [d[1] for d in by_round if 1 in d]
    t0 = min(r["time"] - r["round_s"] for r in first) if first else None
    reached = None
    for r in range(1, rounds + 1):
        if all(r in d and d[r]["accuracy"] is not None and d[r]["accuracy"] >= args.target for d in by_round):
            reached = r
            break
    last = max((max(d) for d in by_round if d), default=0)
    result: dict[str, Any] = {
        "k": k,
        "rounds_run": rounds,
        "status": status,
        "startup_s": None if t0 is None else t0 - launched,
        "rounds_completed_min": min((max(d) if d else 0) for d in by_round),
        "final_min_accuracy": min((d[last]["accuracy"] for d in by_round if last in d), default=None),
    }
    if reached is None or t0 is None:
        return {**result, "round": None, "epochs": None, "seconds": None, "bytes_per_node": None}
    at = [d[reached] for d in by_round]
    return {
        **result,
        "round": reached,
        "epochs": (reached - 1) // k + 1,
        "seconds": max(r["time"] for r in at) - t0,
        "bytes_per_node": sum(r.get("bytes_out", 0) for r in at) / len(at),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--topology", default="ring")
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--hidden", type=int, nargs="+", default=[32], help="hidden layer widths (64-32-10)")
    p.add_argument("--rule", default="mean", help="aggregation rule of the nodes")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.93)
    p.add_argument("--steps", default="1,2,4", help="gossip steps per local training step to try")
    p.add_argument(
        "--epochs", type=int, default=40, help="local training steps per run (rounds = epochs x k)"
    )
    p.add_argument("--central-epochs", type=int, default=200)
    p.add_argument("--timeout", type=float, default=600.0, help="ceiling per testbed run (s)")
    p.add_argument("--out", default="", help="keep the testbed runs here (default: a temporary folder)")
    a = p.parse_args(argv)
    load_before = os.getloadavg()

    central = central_time_to(a)
    print(
        f"centralized (pooled data, one process): {central['seconds'] and round(central['seconds'], 3)} s, "
        f"{central['epochs']} epochs to {a.target}"
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-tta-") as tmp:
        base = Path(a.out) if a.out else Path(tmp)
        for k in [int(v) for v in a.steps.split(",")]:
            res = run_testbed(a, k, base / f"k{k}")
            runs.append(res)
            ratio = (
                res["seconds"] / central["seconds"]
                if res["seconds"] is not None and central["seconds"]
                else None
            )
            res["ratio_to_central"] = ratio
            print(
                f"steps_per_round {k}: every node >= {a.target} at round {res['round']} "
                f"({res['epochs']} local epochs) after {res['seconds'] and round(res['seconds'], 2)} s, "
                f"{res['bytes_per_node'] and round(res['bytes_per_node'] / 1e6, 3)} MB sent per node"
                + (f"; {ratio:.1f}x the centralized time" if ratio is not None else "")
                + f" (start-up {res['startup_s'] and round(res['startup_s'], 1)} s not counted; "
                f"final min accuracy {res['final_min_accuracy']})"
            )
    timed = [r for r in runs if r["seconds"] is not None]
    best = min(timed, key=lambda r: r["seconds"]) if timed else None
    one = next((r for r in runs if r["k"] == 1), None)
    if best is not None:
        print(
            f"best: steps_per_round {best['k']}: {best['seconds']:.2f} s"
            + (
                f" ({one['seconds'] / best['seconds']:.2f}x faster than k = 1)"
                if one is not None and one["seconds"]
                else ""
            )
        )
    load_after = os.getloadavg()
    print(
        f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        json.dumps(
            {
                "nodes": a.nodes,
                "topology": a.topology,
                "task": a.task,
                "hidden": a.hidden,
                "rule": a.rule,
                "lr": a.lr,
                "target": a.target,
                "central": central,
                "runs": runs,
                "best_k": None if best is None else best["k"],
                "load_before": round(load_before[0], 2),
                "load_after": round(load_after[0], 2),
            }
        )
    )
    return 0 if best is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
