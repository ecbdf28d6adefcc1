#!/usr/bin/env python
"""Benchmark the simulator: N virtual nodes x R rounds, against a plain per-node loop.

The vectorised run is p2pfl.sim as the experiments use it (all models one N x P matrix, batched
training of the task's model, sparse mixing via aggregation.mix_many, batched evaluation). The
baseline is the same work done node by node: task.train, aggregation.mix and task.evaluate per node,
for --baseline-rounds rounds (its throughput does not depend on the round count). Both start from
the same setup (load_task per node, build_model per node), and the script checks that the two
agree on those first rounds.

    python scripts/bench_sim.py                       # 1,024 nodes x 100 rounds, logistic regression on digits

Prints node-rounds per second, where the time goes, peak memory, and the speed-up over the
baseline; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from p2pfl.aggregation import rule_names  # noqa: E402
from p2pfl.sim import Simulation, config_from_args, set_torch_threads  # noqa: E402

GOAL_S = 60.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


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
    p.add_argument("--baseline-rounds", type=int, default=3, help="rounds of the per-node loop (0: skip)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    set_torch_threads(a.threads)
    import_rss = peak_rss_mb()

    # -- the vectorised simulator: setup + all rounds ------------------------------------------------
    t0 = time.perf_counter()
    sim = Simulation(config_from_args(a))
    res = sim.run(gap=False)
    wall = time.perf_counter() - t0
    sim_rss = peak_rss_mb()
    t = res.timings
    rounds_s = t["train"] + t["mix"] + t["eval"]
    node_rounds = a.nodes * a.rounds
    final = res.final
    print(
        f"simulator: {a.nodes} nodes x {a.rounds} rounds ({a.task}, {a.topology}, rule {a.rule}, "
        f"{res.params} params, {torch.get_num_threads()} torch threads, batched={sim.trainer is not None})"
    )
    print(
        f"  wall {wall:.1f} s = setup {t['setup']:.1f} s (load_task + build_model per node) + rounds "
        f"{rounds_s:.1f} s [train {t['train']:.1f} s, mix {t['mix']:.1f} s, evaluate {t['eval']:.1f} s]"
    )
    print(
        f"  {node_rounds / rounds_s:,.0f} node-rounds/s in the rounds, {node_rounds / wall:,.0f} including setup; "
        f"peak RSS {sim_rss:.0f} MB ({import_rss:.0f} MB after imports)"
    )
    if final is not None:
        print(f"  final accuracy: mean {final.mean_accuracy:.4f}, min {final.min_accuracy:.4f}")

    # -- the per-node loop, and a check that both compute the same thing ----------------------------
    baseline = None
    agree = None
    if a.baseline_rounds > 0:
        loop = Simulation(config_from_args(a, rounds=a.baseline_rounds, vectorised=False))
        loop_res = loop.run(gap=False)
        lt = loop_res.timings
        loop_s = lt["train"] + lt["mix"] + lt["eval"]
        baseline = a.nodes * a.baseline_rounds / loop_s
        fast = Simulation(config_from_args(a, rounds=a.baseline_rounds)).run(gap=False)
        agree = bool(np.allclose(fast.vectors, loop_res.vectors, atol=1e-4))
        print(
            f"baseline (per-node loop: task.train, aggregation.mix, task.evaluate), {a.baseline_rounds} rounds: "
            f"{baseline:,.0f} node-rounds/s [train {lt['train']:.1f} s, mix {lt['mix']:.1f} s, "
            f"evaluate {lt['eval']:.1f} s]; {a.rounds} rounds would take ~{node_rounds / baseline:.0f} s"
        )
        print(
            f"  speed-up {node_rounds / rounds_s / baseline:.1f}x in the rounds; same models after "
            f"{a.baseline_rounds} rounds: {agree}"
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
        "wall_s": round(wall, 2),
        "setup_s": round(t["setup"], 2),
        "train_s": round(t["train"], 2),
        "mix_s": round(t["mix"], 2),
        "eval_s": round(t["eval"], 2),
        "node_rounds_per_s": round(node_rounds / rounds_s, 1),
        "node_rounds_per_s_with_setup": round(node_rounds / wall, 1),
        "baseline_node_rounds_per_s": None if baseline is None else round(baseline, 1),
        "speedup": None if baseline is None else round(node_rounds / rounds_s / baseline, 2),
        "baseline_agrees": agree,
        "peak_rss_mb": round(sim_rss, 1),
        "rss_after_imports_mb": round(import_rss, 1),
        "final_mean_accuracy": None
        if final is None or final.mean_accuracy is None
        else round(final.mean_accuracy, 4),
        "goal_s": GOAL_S,
        "meets_goal": wall < GOAL_S,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
