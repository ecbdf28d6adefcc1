"""How the real testbed scales: N real node processes (exponential topology, digits) for N = 8..128.

Per N it runs `p2pfl testbed` (fork server by default) and prints, from the nodes' own metrics:

- steady round: median over nodes and rounds >= 3 of `round_s` (a round starts once the node has its
  expected peers, and ends after mixing, evaluation and the checkpoint);
- round 1: median over nodes of round 1's `round_s`, and its ratio to the steady round (target <= 2);
- memory per node: peak RSS and PSS (median over nodes) and their peak sums over all nodes (PSS divides
  shared pages among the processes that map them, so it sums to what the machine holds);
- links per node: the `links` field of the metrics and the degree (neighbours), median over nodes of
  each node's last record with the full membership (nodes that finish first leave, and the last
  rounds of the others re-plan their topology for fewer members);
- accuracy: min and mean over nodes after the last round (and whether every node reached --target);
- work floor: per steady round, the CPU the round's work needs, summed over all nodes
  (train + seal + open + mix, from the metrics' *_cpu_s fields) divided by the cores; the round time
  divided by the floor is how far the federation is from being CPU-bound on its real work.

A run stops early (and says so) if the machine's available memory falls below --min-free-gb.

    python scripts/bench_scale.py --nodes 8,16,32 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from p2pfl.testbed import read_metrics

CPU_FIELDS = ("train_cpu_s", "seal_cpu_s", "open_cpu_s", "mix_cpu_s")
STEADY_FROM = 3  # rounds before this are start-up (round 1 is reported on its own)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", default="8,16,32,64,128", help="comma-separated node counts")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--topology", default="exponential")
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--launch", default="fork", choices=("fork", "exec"))
    p.add_argument("--target", type=float, default=0.90, help="accuracy every node should reach")
    p.add_argument("--wait", type=float, default=900.0, help="testbed --wait: seconds to find all peers")
    p.add_argument("--timeout", type=float, default=3000.0, help="seconds per N before the testbed stops")
    p.add_argument("--round-timeout", type=float, default=60.0)
    p.add_argument("--min-free-gb", type=float, default=1.5, help="stop a run below this available memory")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=None, help="default runs/bench-scale-TIMESTAMP")
    p.add_argument("--extra", default="", help="more testbed options, e.g. '--rule mean'")
    args = p.parse_args(argv)
    try:
        args.counts = [int(n) for n in args.nodes.split(",") if n.strip()]
    except ValueError:
        p.error(f"--nodes must be comma-separated integers, got {args.nodes!r}")
    if not args.counts or min(args.counts) < 2:
        p.error("--nodes: every count must be >= 2")
    return args


def run_testbed(args: argparse.Namespace, n: int, out: Path) -> tuple[int, float, float, str]:
    """One testbed run; (exit status, wall seconds, lowest available memory GB seen, note)."""
    cmd = [sys.executable, "-m", "p2pfl", "testbed", "--nodes", str(n), "--topology", args.topology,
           "--task", args.task, "--rounds", str(args.rounds), "--wait", str(args.wait),
           "--timeout", str(args.timeout), "--round-timeout", str(args.round_timeout),
           "--launch", args.launch, "--out", str(out), *args.extra.split()]  # fmt: skip
    started = time.monotonic()
    low, note = float("inf"), ""
    with (out.parent / f"testbed-{n}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            free = psutil.virtual_memory().available / 2**30
            low = min(low, free)
            if free < args.min_free_gb and not note:
                note = f"stopped: {free:.1f} GB available"
                proc.terminate()  # the testbed stops its nodes and still writes its summary
            time.sleep(1.0)
    return proc.returncode, time.monotonic() - started, low, note


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _last_full(records: Sequence[dict[str, Any]], nodes: int) -> dict[str, Any]:
    """The last record whose round had every node as a member (else the last record)."""
    return next((r for r in reversed(records) if r.get("members") == nodes), records[-1])


def figures(out: Path, cores: int, target: float) -> dict[str, Any]:
    """The per-N figures from summary.json and the nodes' metrics."""
    summary = json.loads((out / "summary.json").read_text())
    rows = {n["name"]: read_metrics(out / n["name"] / "metrics.jsonl") for n in summary["nodes"]}
    rows = {k: [r for r in v if "caught_up_from" not in r] for k, v in rows.items()}
    first = [r["round_s"] for v in rows.values() for r in v if r.get("round") == 1]
    steady = [r["round_s"] for v in rows.values() for r in v if r.get("round", 0) >= STEADY_FROM]
    full = [_last_full(v, len(rows)) for v in rows.values() if v]
    links = [r["links"] for r in full if isinstance(r.get("links"), int | float)]
    degree = [len(r.get("neighbours") or {}) for r in full]
    by_round: dict[int, float] = {}
    for v in rows.values():
        for r in v:
            if r.get("round", 0) >= STEADY_FROM and all(
                isinstance(r.get(f), int | float) for f in CPU_FIELDS
            ):
                by_round[r["round"]] = by_round.get(r["round"], 0.0) + sum(r[f] for f in CPU_FIELDS)
    floor = _median([cpu / cores for cpu in by_round.values()])
    step = _median(steady)
    accs = [n["final_accuracy"] for n in summary["nodes"] if n["final_accuracy"] is not None]
    memory = summary.get("memory") or {}
    return {
        "nodes": len(rows),
        "steady_round_s": step,
        "round1_s": _median(first),
        "round1_max_s": max(first) if first else None,
        "round1_ratio": (_median(first) or 0) / step if step and first else None,
        "rss_mb_median": memory.get("rss_mb_median"),
        "pss_mb_median": memory.get("pss_mb_median"),
        "uss_mb_median": memory.get("uss_mb_median"),
        "rss_gb_sum": (memory.get("rss_mb_sum_peak") or 0) / 1e3,
        "pss_gb_sum": (memory.get("pss_mb_sum_peak") or 0) / 1e3,
        "links_median": _median(links),
        "degree_median": _median(degree),
        "acc_min": min(accs) if accs else None,
        "acc_mean": statistics.fmean(accs) if accs else None,
        "all_at_target": bool(accs) and len(accs) == len(rows) and min(accs) >= target,
        "rounds_done_min": min((n["rounds_completed"] for n in summary["nodes"]), default=0),
        "floor_s": floor,
        "round_over_floor": step / floor if step and floor else None,
        "wall_s": summary.get("wall_s"),
    }


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict[int, dict[str, Any]]) -> str:
    head = ("N", "steady s", "round1 s", "r1/steady", "RSS/node", "PSS/node", "PSS sum", "links", "deg",
            "acc min", "acc mean", "floor s", "round/floor", "wall s")  # fmt: skip
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for n, f in results.items():
        if "error" in f:
            lines.append(f"{n} | {f['error']}")
            continue
        lines.append(" | ".join([
            str(n), _fmt(f["steady_round_s"], ".3f"), _fmt(f["round1_s"], ".3f"), _fmt(f["round1_ratio"], ".2f"),
            _fmt(f["rss_mb_median"], ".0f") + " MB", _fmt(f["pss_mb_median"], ".0f") + " MB",
            _fmt(f["pss_gb_sum"], ".2f") + " GB", _fmt(f["links_median"], ".0f"), _fmt(f["degree_median"], ".0f"),
            _fmt(f["acc_min"], ".3f"), _fmt(f["acc_mean"], ".3f"), _fmt(f["floor_s"], ".4f"),
            _fmt(f["round_over_floor"], ".1f"), _fmt(f["wall_s"], ".0f"),
        ]))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = Path(args.out or f"runs/bench-scale-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    base.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[str, Any]] = {}
    for n in args.counts:
        load = os.getloadavg()
        print(f"N={n}: starting ({args.launch}, load {load[0]:.1f}, "
              f"{psutil.virtual_memory().available / 2**30:.1f} GB available)", flush=True)  # fmt: skip
        status, wall, low, note = run_testbed(args, n, base / f"n{n}")
        try:
            f = figures(base / f"n{n}", args.cores, args.target)
        except (OSError, ValueError, KeyError) as exc:
            f = {"error": f"no figures ({type(exc).__name__}: {exc}); exit {status}"}
        f.update(exit=status, bench_wall_s=wall, min_available_gb=low, note=note, load_before=load[0])
        results[n] = f
        print(table({n: f}).splitlines()[-1] + (f"   [{note}]" if note else "") + f"   exit {status}",
              flush=True)  # fmt: skip
        (base / "bench_scale.json").write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    print(f"\nsteady/round 1: medians over nodes of the metrics' round_s; floor = sum over nodes of "
          f"train+seal+open+mix CPU per steady round / {args.cores} cores; load after: "
          f"{os.getloadavg()[0]:.1f}; results in {base / 'bench_scale.json'}")  # fmt: skip
    return 0 if all(r.get("all_at_target") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
