#!/usr/bin/env python
"""Benchmark the simulator: N virtual nodes x R rounds, against a plain per-node loop and dense mixing.

The vectorised run is p2pfl.sim as the experiments use it (all models one N x P float32 matrix,
batched training of the task's model, sparse mixing via aggregation.mix_many, batched evaluation).
Two baselines are measured in the same run:

* the per-node loop: the same work node by node (task.train, aggregation.mix, task.evaluate per
  node) on --baseline-nodes nodes for --baseline-rounds rounds (its node-rounds per second hardly
  depend on N), checked to give the same models as the vectorised path on those nodes;
* dense mixing: one round of averaging as a dense N x N matrix times the models (what a textbook
  simulator does), at --dense-nodes nodes, against the sparse exchange at the same size; at the
  benchmark's N the dense matrix alone would take N^2 x 4 bytes (printed).

    python scripts/bench_sim.py                                   # 1,024 nodes x 100 rounds, digits
    python scripts/bench_sim.py --nodes 10000 --task digits-resampled --eval-nodes 1000
    python scripts/bench_sim.py --nodes 100000 --task digits-resampled --eval-nodes 1000

Past the 1,348 training samples of digits, use task digits-resampled (every node draws its own
samples with replacement). Prints where the time goes, peak memory (ru_maxrss) and the ratios; the
last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from p2pfl.aggregation import mix_many, rule_names  # noqa: E402
from p2pfl.sim import Network, RoundStats, Simulation, config_from_args, set_torch_threads  # noqa: E402
from p2pfl.topology import mixing_matrix_sparse  # noqa: E402

GOAL_S = {10_000: 300.0, 100_000: 900.0}  # issue 10: 10k x 100 rounds < 5 min, 100k x 100 < 15 min


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def dense_baseline(topology: str, n: int, params: int, seed: int) -> dict[str, float]:
    """Seconds of one averaging round at n nodes: dense W @ X against the sparse exchange."""
    net = Network(topology, n, seed=seed)
    rows, cols, deg = net.edges(1)
    x = np.random.default_rng(seed).standard_normal((n, params), dtype=np.float32)
    w = np.asarray(
        mixing_matrix_sparse(net.topology.graph(n, seed=seed, round=1)).todense(), dtype=np.float32
    )
    t0 = time.perf_counter()
    dense = w @ x
    t1 = time.perf_counter()
    sparse = mix_many(x, rows, cols, deg, "mean").vectors
    t2 = time.perf_counter()
    return {
        "nodes": n,
        "dense_s": t1 - t0,
        "sparse_s": t2 - t1,
        "agree": bool(np.allclose(dense, sparse, atol=1e-4)),
    }


def progress(stats: RoundStats, rounds: int, t0: float, c0: float) -> None:
    """Every tenth round on stderr: wall and CPU seconds so far (a loaded machine shows in the gap)."""
    if stats.round % 10 == 0 or stats.round == rounds:
        print(
            f"  round {stats.round}/{rounds}: wall {time.perf_counter() - t0:.1f} s, "
            f"CPU {time.process_time() - c0:.1f} s, load {os.getloadavg()[0]:.1f}",
            file=sys.stderr,
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--topology", default="exponential")
    p.add_argument("--rule", default="mean", choices=rule_names())
    p.add_argument("--task", default="digits-logreg")
    p.add_argument("--partition", default="iid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--eval-nodes", type=int, default=0, help="evaluate a sample of this many nodes (0: all)")
    p.add_argument("--gossip-steps", type=int, default=1)
    p.add_argument("--baseline-rounds", type=int, default=3, help="rounds of the per-node loop (0: skip)")
    p.add_argument("--baseline-nodes", type=int, default=512, help="nodes of the per-node loop (at most N)")
    p.add_argument(
        "--dense-nodes", type=int, default=4096, help="nodes of the dense-mixing baseline (0: skip)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    set_torch_threads(a.threads)
    import_rss = peak_rss_mb()
    load_before = os.getloadavg()

    # -- the vectorised simulator: setup + all rounds ------------------------------------------------
    t0, c0 = time.perf_counter(), time.process_time()
    sim = Simulation(config_from_args(a))
    res = sim.run(lambda s: progress(s, a.rounds, t0, c0), gap=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    sim_rss = peak_rss_mb()
    t = res.timings
    rounds_s = t["train"] + t["mix"] + t["eval"]
    node_rounds = a.nodes * a.rounds
    final = res.final
    sample = f"a sample of {a.eval_nodes} nodes" if 0 < a.eval_nodes < a.nodes else "every node"
    print(
        f"simulator: {a.nodes:,} nodes x {a.rounds} rounds ({a.task}, {a.topology}, rule {a.rule}, "
        f"{res.params} params, {int(res.samples.sum()):,} training samples in all, "
        f"{torch.get_num_threads()} torch threads, batched={sim.trainer is not None}, "
        f"population={sim.population is not None})"
    )
    print(
        f"  wall {wall:.1f} s = setup {t['setup']:.1f} s + rounds {rounds_s:.1f} s "
        f"[train {t['train']:.1f} s, mix {t['mix']:.1f} s, evaluate {t['eval']:.1f} s "
        f"({sample} per round, every node in the last)]"
    )
    print(
        f"  CPU time of this process {cpu:.1f} s (wall / CPU {wall / cpu:.2f}: > 1 when other work shares "
        f"the cores; on an idle core wall ~ CPU)"
    )
    print(
        f"  {node_rounds / rounds_s:,.0f} node-rounds/s in the rounds, {node_rounds / wall:,.0f} including setup; "
        f"peak RSS {sim_rss:,.0f} MB ({import_rss:.0f} MB after imports; the models alone "
        f"{res.vectors.nbytes / 2**20:,.0f} MB)"
    )
    if final is not None:
        print(
            f"  final accuracy (every node): mean {final.mean_accuracy:.4f}, min {final.min_accuracy:.4f}; "
            f"consensus distance {res.rounds[-1].consensus:.3g}"
        )
    goal = GOAL_S.get(a.nodes)
    if goal is not None and a.rounds == 100:
        print(
            f"  goal: {a.nodes:,} x 100 rounds in < {goal:.0f} s: wall {'met' if wall < goal else 'MISSED'}, "
            f"CPU {'met' if cpu < goal else 'MISSED'}"
        )

    # -- the per-node loop on a few nodes, and a check that both compute the same thing --------------
    baseline = agree = None
    loop_nodes = min(a.nodes, a.baseline_nodes)
    if a.baseline_rounds > 0 and loop_nodes > 0:
        small = {"nodes": loop_nodes, "rounds": a.baseline_rounds, "eval_nodes": 0}
        loop = Simulation(config_from_args(a, vectorised=False, **small))
        loop_res = loop.run(gap=False)
        lt = loop_res.timings
        loop_s = lt["train"] + lt["mix"] + lt["eval"]
        baseline = loop_nodes * a.baseline_rounds / loop_s
        fast = Simulation(config_from_args(a, **small)).run(gap=False)
        agree = bool(np.allclose(fast.vectors, loop_res.vectors, atol=1e-4))
        print(
            f"baseline 1 (per-node loop: task.train, aggregation.mix, task.evaluate), {loop_nodes} nodes x "
            f"{a.baseline_rounds} rounds: {baseline:,.0f} node-rounds/s [train {lt['train']:.1f} s, "
            f"mix {lt['mix']:.1f} s, evaluate {lt['eval']:.1f} s]; {a.nodes:,} x {a.rounds} would take "
            f"~{node_rounds / baseline:,.0f} s"
        )
        print(
            f"  speed-up {node_rounds / rounds_s / baseline:.1f}x in the rounds "
            f"({node_rounds / wall / baseline:.1f}x with setup); same models after {a.baseline_rounds} "
            f"rounds at {loop_nodes} nodes: {agree}"
        )

    dense = None
    if a.dense_nodes > 0:
        dense = dense_baseline(a.topology, min(a.nodes, a.dense_nodes), res.params, a.seed)
        print(
            f"baseline 2 (dense mixing W @ X, float32) at {dense['nodes']:,} nodes: {dense['dense_s']:.3f} s "
            f"per round against {dense['sparse_s']:.3f} s sparse ({dense['dense_s'] / dense['sparse_s']:.1f}x), "
            f"same result: {dense['agree']}; at {a.nodes:,} nodes a dense W alone is "
            f"{a.nodes**2 * 4 / 2**30:,.1f} GiB"
        )

    load_after = os.getloadavg()
    print(
        f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} cores"
    )
    out = {
        "nodes": a.nodes,
        "rounds": a.rounds,
        "task": a.task,
        "topology": a.topology,
        "rule": a.rule,
        "params": res.params,
        "threads": torch.get_num_threads(),
        "batched": sim.trainer is not None,
        "population": sim.population is not None,
        "eval_nodes": a.eval_nodes,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "setup_s": round(t["setup"], 2),
        "train_s": round(t["train"], 2),
        "mix_s": round(t["mix"], 2),
        "eval_s": round(t["eval"], 2),
        "node_rounds_per_s": round(node_rounds / rounds_s, 1),
        "node_rounds_per_s_with_setup": round(node_rounds / wall, 1),
        "baseline_nodes": loop_nodes,
        "baseline_node_rounds_per_s": None if baseline is None else round(baseline, 1),
        "speedup": None if baseline is None else round(node_rounds / rounds_s / baseline, 2),
        "baseline_agrees": agree,
        "dense": dense,
        "peak_rss_mb": round(sim_rss, 1),
        "rss_after_imports_mb": round(import_rss, 1),
        "final_mean_accuracy": None
        if final is None or final.mean_accuracy is None
        else round(final.mean_accuracy, 4),
        "final_min_accuracy": None
        if final is None or final.min_accuracy is None
        else round(final.min_accuracy, 4),
        "goal_s": goal,
        "meets_goal": None if goal is None else wall < goal,
        "meets_goal_cpu": None if goal is None else cpu < goal,
        "load_before": round(load_before[0], 2),
        "load_after": round(load_after[0], 2),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
