"""Accuracy vs differential privacy: DP-SGD local training at a few noise multipliers, beside the
non-DP baseline of the same run.

Grid (in-process): N nodes, each a TensorTask on its shard (the node's own training code, DP-SGD
from p2pfl.learning.privacy included), mixing by plain gossip averaging on a ring (Metropolis-
Hastings weights 1/3: self and two neighbours) after every round, as the `mean` rule does on a
ring. Prints per task and noise multiplier: the final epsilon (at delta, the largest over nodes),
the final test accuracy min / mean over nodes, and mean accuracy / the non-DP baseline's.

Check (--testbed-check NOISE): one run of real node processes (the testbed's federation, brokers,
TLS and crypto; [privacy] written into each node.toml) on digits at that noise, with the epsilon
each node recorded in metrics.jsonl.

    python scripts/dp_experiment.py                                  # digits + breast cancer, noise 0 0.5 1 2
    python scripts/dp_experiment.py --tasks digits --noise 0,1 --rounds 10 --testbed-check 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pfl.learning import TaskSpec, get_params, load_task, set_params
from p2pfl.learning.data import combine_feature_stats, feature_stats, split_test
from p2pfl.learning.privacy import DPTraining, auto_delta
from p2pfl.learning.tasks import TensorTask

CLIP = 1.0


@dataclass
class Cell:
    task: str
    noise: float
    epsilon: float | None
    delta: float | None
    acc_min: float
    acc_mean: float
    seconds: float


def cancer_data(out: Path) -> tuple[Path, Path]:
    """Breast cancer (scikit-learn) as an .npz, and the pooled feature statistics of its training
    split (what `p2pfl stats` combines from the sites' summaries): fixed preprocessing, no site-local
    statistics inside the DP guarantee."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    path = out / "breast_cancer.npz"
    np.savez(path, X=x, y=y, num_classes=np.int64(2))
    train, _ = split_test(len(y), 0.25)
    stats = combine_feature_stats([feature_stats(x[train])])
    stats_path = out / "breast_cancer_stats.json"
    stats_path.write_text(json.dumps(stats))
    return path, stats_path


def spec_for(task: str, shard: int, nodes: int, seed: int, data: tuple[Path, Path] | None) -> TaskSpec:
    if task == "digits":
        return TaskSpec("digits-mlp", shard, nodes, seed=seed, lr=0.3, batch_size=32)
    assert data is not None
    npz, stats = data
    return TaskSpec(
        "mlp", shard, nodes, seed=seed, lr=0.1, batch_size=16, data=str(npz), num_classes=2,
        standardize=True, feature_stats=str(stats),
    )  # fmt: skip


def run_cell(args: argparse.Namespace, task: str, noise: float, seed: int, data: Any) -> Cell:
    started = time.monotonic()
    tasks: list[TensorTask] = []
    for i in range(args.nodes):
        t = load_task(spec_for(task, i, args.nodes, seed, data))
        assert isinstance(t, TensorTask)
        if noise > 0:
            t.privacy = DPTraining(
                num_samples=t.num_samples,
                batch_size=t.spec.batch_size,
                noise_multiplier=noise,
                max_grad_norm=CLIP,
                seed=seed * 1000 + i,  # reproducible runs; a node seeds from the OS
            )
        tasks.append(t)
    models = [t.build_model() for t in tasks]
    n = args.nodes
    for _ in range(args.rounds):
        for t, m in zip(tasks, models, strict=True):
            t.train(m)
        params = [get_params(m) for m in models]
        for i, m in enumerate(models):
            ring = [params[i], params[(i - 1) % n], params[(i + 1) % n]] if n > 2 else params
            set_params(m, {k: np.mean([p[k] for p in ring], axis=0) for k in params[i]})
    accs = [t.evaluate(m)[0] for t, m in zip(tasks, models, strict=True)]
    eps = [t.epsilon for t in tasks]
    return Cell(
        task,
        noise,
        max(e for e in eps if e is not None) if noise > 0 else None,
        max(auto_delta(t.num_samples) for t in tasks) if noise > 0 else None,
        min(accs),
        float(np.mean(accs)),
        time.monotonic() - started,
    )


def testbed_check(args: argparse.Namespace, noise: float, out: Path) -> dict[str, Any]:
    """4 (--nodes) real node processes on digits with [privacy] noise_multiplier = noise."""
    from p2pfl import config as config_mod
    from p2pfl import testbed

    tb_args = testbed.parse_args(
        ["--nodes", str(args.nodes), "--rounds", str(args.rounds), "--rule", "mean", "--task", "digits-mlp"]
    )
    run_dir = out / f"testbed-noise-{noise:g}"
    configs = testbed.prepare(tb_args, run_dir)
    for path in configs:
        cfg = config_mod.load(path)
        cfg.privacy.enabled, cfg.privacy.noise_multiplier, cfg.privacy.max_grad_norm = True, noise, CLIP
        cfg.gossip.round_timeout_s = 120.0
        path.write_text(config_mod.to_toml(config_mod.validate(cfg)))
    started = time.monotonic()
    procs = testbed.launch(configs)
    try:
        deadline = started + args.testbed_timeout
        while any(p.proc.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(1.0)
    finally:
        testbed.stop_all(procs)
    finals = []
    for p in procs:
        records = testbed.read_metrics(p.directory / "metrics.jsonl")
        finals.append(records[-1] if records else {})
    accs = [float(r["accuracy"]) for r in finals if r.get("accuracy") is not None]
    eps = [float(r["epsilon"]) for r in finals if r.get("epsilon") is not None]
    return {
        "rounds": [r.get("round") for r in finals],
        "exit": [p.proc.returncode for p in procs],
        "acc_min": min(accs) if accs else None,
        "acc_mean": float(np.mean(accs)) if accs else None,
        "epsilon": max(eps) if eps else None,
        "seconds": time.monotonic() - started,
        "dir": str(run_dir),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="digits,cancer", help="comma list of digits, cancer")
    p.add_argument("--noise", default="0,0.5,1,2", help="noise multipliers; 0 = no DP (the baseline)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--seeds", type=int, default=1, help="repeat each cell over this many seeds")
    p.add_argument("--testbed-check", type=float, default=None, metavar="NOISE")
    p.add_argument("--testbed-timeout", type=float, default=600.0)
    p.add_argument("--jobs", type=int, default=1, help="grid cells run in parallel (processes)")
    p.add_argument("--out", default="runs/dp-experiment")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    noises = [float(v) for v in args.noise.split(",")]
    if 0.0 not in noises:
        noises.insert(0, 0.0)  # the baseline is always measured in the same run
    print(f"load: {os.getloadavg()[0]:.1f} (1 min), {os.cpu_count()} CPUs, {args.jobs} jobs; nodes {args.nodes}, "
          f"rounds {args.rounds}, seeds {args.seeds}, clip {CLIP}, ring gossip averaging in-process")  # fmt: skip
    rows: list[dict[str, Any]] = []
    tasks = args.tasks.split(",")
    datas = {task: cancer_data(out) if task == "cancer" else None for task in tasks}
    keys = [(task, noise, seed) for task in tasks for noise in noises for seed in range(args.seeds)]
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = {k: pool.submit(run_cell, args, k[0], k[1], k[2], datas[k[0]]) for k in keys}
        done = {k: f.result() for k, f in futures.items()}
    for task in tasks:
        base: float | None = None
        for noise in noises:
            cells = [done[(task, noise, seed)] for seed in range(args.seeds)]
            acc_mean = float(np.mean([c.acc_mean for c in cells]))
            acc_min = min(c.acc_min for c in cells)
            eps = cells[0].epsilon
            if noise == 0:
                base = acc_mean
            assert base is not None
            row = {
                "task": task,
                "noise": noise,
                "epsilon": eps,
                "delta": cells[0].delta,
                "acc_min": acc_min,
                "acc_mean": acc_mean,
                "ratio": acc_mean / base,
                "seconds": sum(c.seconds for c in cells),
            }
            rows.append(row)
            eps_s = "inf (no DP)" if eps is None else f"{eps:.2f}"
            print(
                f"{task:7s} noise {noise:4.2f}  epsilon {eps_s:>11s}  delta {row['delta'] or 0:.1e}  "
                f"acc min {acc_min:.3f} mean {acc_mean:.3f}  ratio to no-DP {row['ratio']:.3f}  "
                f"({row['seconds']:.0f} s in {args.seeds} run(s))",
                flush=True,
            )
    result: dict[str, Any] = {"rows": rows, "args": vars(args)}
    if args.testbed_check is not None:
        check = testbed_check(args, args.testbed_check, out)
        result["testbed"] = check
        print(
            f"testbed (real processes, digits, noise {args.testbed_check:g}): {json.dumps(check)}", flush=True
        )
    (out / "dp_experiment.json").write_text(json.dumps(result, indent=1))
    print(f"load after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
