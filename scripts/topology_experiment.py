#!/usr/bin/env python
"""Topology experiment: a grid of simulated federations (topologies x sizes x partitions x rules).

Every run is `p2pfl.sim` (the node's task, topology and aggregation code on N virtual nodes). Writes
to --out (default runs/topology):

  rounds.csv        one row per run and round (mean / min accuracy, consensus distance, bytes per node)
  summary.csv       one row per run
  summary.md        the markdown table: spectral gap, rounds to the target accuracy, final mean and
                    minimum accuracy across nodes, final consensus distance, bytes sent per node
  accuracy_vs_round.png, consensus_vs_round.png (log scale), accuracy_vs_bytes.png, rules.png

The rules other than "mean" (sample-weighted gossip, push-sum) run only on the partitions named
by --compare-on (default: dirichlet, where shard sizes differ).

    python scripts/topology_experiment.py                      # the default grid (a few minutes)
    python scripts/topology_experiment.py --quick              # a smoke test (seconds)
    python scripts/topology_experiment.py --topologies ring,exponential --sizes 64 --rounds 50
    python scripts/topology_experiment.py --backend process     # the grid on a local process pool

--backend process | ray (--ray-address, pip install ray) runs the grid's simulations elsewhere than
in this process (p2pfl.grid); the results are those of the default serial run.

Compression comparison (--compression, a comma list of [gossip] compression settings, ";" between
settings that carry options): every setting on every topology and size of the grid (mean rule, the
first partition), against uncompressed updates, into compression.md / compression.csv: bytes per
node-round, rounds and bytes until EVERY node reaches --target, final mean / min accuracy.

    python scripts/topology_experiment.py --compression none,fp16,bf16,int8,topk:0.1,topk:0.01 \
        --topologies ring,exponential --sizes 16 --task digits-mlp --lr 0.5 --rounds 60 --target 0.9
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from p2pfl import reporting  # noqa: E402
from p2pfl.aggregation import rule_names  # noqa: E402
from p2pfl.compression import Compression  # noqa: E402
from p2pfl.grid import add_arguments as grid_options  # noqa: E402
from p2pfl.grid import run_grid_from_args, timed_run  # noqa: E402
from p2pfl.reporting import fmt  # noqa: E402
from p2pfl.sim import SimConfig, SimResult, config_from_args, set_torch_threads  # noqa: E402
from p2pfl.topology import parse_topology  # noqa: E402

DEFAULT_TOPOLOGIES = (
    "ring",
    "torus",
    "exponential",
    "one-peer-exponential",
    "random-regular",
    "erdos-renyi",
    "small-world",
    "star",
    "full",
)
DEFAULT_SIZES = (16, 64, 256)
DEFAULT_PARTITIONS = ("iid", "dirichlet")
DEFAULT_RULES = ("mean", "weighted", "push-sum")


@dataclass
class Run:
    topology: str
    nodes: int
    partition: str
    rule: str

    @property
    def key(self) -> str:
        return f"{self.topology} n={self.nodes} {self.partition} {self.rule}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = reporting.experiment_parser(__doc__)
    p.add_argument(
        "--topologies",
        default=",".join(DEFAULT_TOPOLOGIES),
        help="comma-separated built-in names (with :params) or topology files",
    )
    p.add_argument(
        "--topology", default=None, help="a single topology (name or file); overrides --topologies"
    )
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    p.add_argument("--partitions", default=",".join(DEFAULT_PARTITIONS))
    p.add_argument(
        "--rules",
        default=",".join(DEFAULT_RULES),
        help=f"comma-separated, of {', '.join(rule_names())}",
    )
    p.add_argument(
        "--compare-on",
        default="dirichlet",
        help="partitions on which rules other than 'mean' run ('all' for every partition)",
    )
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--target", type=float, default=0.85, help="target mean accuracy across nodes")
    p.add_argument("--task", default="digits-logreg")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more skew)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--drop", type=float, default=0.0, help="probability that one update is lost")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the batched steps are small, and extra threads only spin "
        "when other work shares the cores)",
    )
    p.add_argument(
        "--compression",
        dest="compressions",
        default="",
        help="compare these [gossip] compression settings (comma list; ';' when one has options) "
        "instead of the rules: writes compression.md",
    )
    p.add_argument("--keyframe-every", type=int, default=10, help="compression: rounds between keyframes")
    grid_options(p)
    p.add_argument("--out", default="runs/topology")
    p.add_argument("--quick", action="store_true", help="ring/exponential/full, n=16, 20 rounds")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.topologies, a.sizes, a.rounds = "ring,exponential,full", "16", 20
    if a.topology:
        a.topologies = a.topology
    return a


def grid(a: argparse.Namespace) -> list[Run]:
    tops = [t.strip() for t in a.topologies.split(",") if t.strip()]
    for t in tops:
        parse_topology(t)  # fail before the first run on a typo
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    parts = [s.strip() for s in a.partitions.split(",") if s.strip()]
    rules = [s.strip() for s in a.rules.split(",") if s.strip()]
    bad = [r for r in rules if r not in rule_names()]
    if bad:
        raise SystemExit(f"unknown rule(s) {bad}; known: {', '.join(rule_names())}")
    compare = parts if a.compare_on == "all" else [s.strip() for s in a.compare_on.split(",")]
    runs = []
    for part in parts:
        for rule in rules:
            if rule != "mean" and part not in compare:
                continue
            for n in sizes:
                for top in tops:
                    runs.append(Run(top, n, part, rule))
    return runs


def config(run: Run, a: argparse.Namespace) -> SimConfig:
    return config_from_args(a, nodes=run.nodes, topology=run.topology, rule=run.rule, partition=run.partition)


def summarise(run: Run, res: SimResult, target: float, seconds: float) -> dict:
    final = res.final
    hit = res.rounds_to(target)
    bytes_at = {r.round: r.bytes_per_node for r in res.rounds}
    return {
        "topology": run.topology,
        "nodes": run.nodes,
        "partition": run.partition,
        "rule": run.rule,
        "spectral_gap": res.spectral_gap,
        "rounds_to_target": hit,
        "final_mean_accuracy": final.mean_accuracy if final else None,
        "final_min_accuracy": final.min_accuracy if final else None,
        "final_consensus": res.rounds[-1].consensus if res.rounds else None,
        "bytes_per_node": res.rounds[-1].bytes_per_node if res.rounds else 0.0,
        "bytes_to_target": bytes_at.get(hit) if hit else None,
        "mean_degree": float(np.mean(_degrees(res))),
        "params": res.params,
        "min_samples": int(res.samples.min()),
        "max_samples": int(res.samples.max()),
        "seconds": seconds,
    }


def _degrees(res: SimResult) -> np.ndarray:
    top = parse_topology(res.config.topology)
    n = res.config.nodes
    if top.time_varying:
        return np.array(
            [sum(dict(top.graph(n, res.config.seed, t).degree).values()) / n for t in range(1, 9)]
        )
    return np.array([d for _, d in top.graph(n, res.config.seed).degree])


def _mb(v) -> str:
    return "-" if v is None else f"{v / 1e6:.2f}"


def markdown(rows: list[dict], a: argparse.Namespace, wall: float) -> str:
    lines = [
        f"Task `{a.task}`, {a.rounds} rounds, 1 local epoch per round (lr {a.lr}, batch {a.batch_size}), "
        f"Dirichlet alpha {a.alpha}, seed {a.seed}; target = mean accuracy across nodes >= {a.target}. "
        f"Gap = spectral gap of the mixing matrix (per-round rate over one period for one-peer "
        f"exponential; of the sample-weighted matrix for rule `weighted`). Consensus = mean over nodes "
        f"of ||x_i - mean||^2 after the last round. MB/node = bytes each node sent in all rounds "
        f"(sealed update x degree). Wall time {wall:.0f} s.",
        "",
        "| topology | n | partition | rule | gap | rounds to target | MB/node to target | final mean acc "
        "| final min acc | consensus | MB/node |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['topology']} | {r['nodes']} | {r['partition']} | {r['rule']} | {fmt(r['spectral_gap'], '.4f')} "
            f"| {fmt(r['rounds_to_target'], 'd', f'>{a.rounds}')} | {_mb(r['bytes_to_target'])} "
            f"| {fmt(r['final_mean_accuracy'])} | {fmt(r['final_min_accuracy'])} "
            f"| {fmt(r['final_consensus'], '.2e')} | {_mb(r['bytes_per_node'])} |"
        )
    return "\n".join(lines) + "\n"


def pivot(rows: list[dict], a: argparse.Namespace) -> str:
    """Rounds to the target per topology (rows) and partition / size / rule (columns)."""
    cols = list(dict.fromkeys((r["partition"], r["nodes"], r["rule"]) for r in rows))
    tops = list(dict.fromkeys(r["topology"] for r in rows))
    cell = {(r["topology"], r["partition"], r["nodes"], r["rule"]): r for r in rows}
    head = "| topology | " + " | ".join(
        f"{p} n={n}" + ("" if rule == "mean" else f" {rule}") for p, n, rule in cols
    )
    lines = [
        f"Rounds to mean accuracy >= {a.target} (>{a.rounds}: not reached; gap in brackets for rule mean):",
        "",
        head + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for t in tops:
        vals = []
        for p, n, rule in cols:
            r = cell.get((t, p, n, rule))
            if r is None:
                vals.append("")
                continue
            v = fmt(r["rounds_to_target"], "d", f">{a.rounds}")
            vals.append(
                v + (f" ({fmt(r['spectral_gap'], '.3f')})" if rule == "mean" and p == cols[0][0] else "")
            )
        lines.append(f"| {t} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def checks(rows: list[dict], a: argparse.Namespace) -> list[str]:
    """The issue's acceptance check: at n=64 the exponential graph needs fewer rounds than the ring."""
    out = []
    for part in sorted({r["partition"] for r in rows}):
        pick = {
            r["topology"]: r
            for r in rows
            if r["nodes"] == 64 and r["partition"] == part and r["rule"] == "mean"
        }
        if "exponential" in pick and "ring" in pick:
            e, g = pick["exponential"]["rounds_to_target"], pick["ring"]["rounds_to_target"]
            ok = e is not None and (g is None or e < g)
            out.append(
                f"n=64 {part}: exponential reaches {a.target} in {fmt(e, 'd', f'>{a.rounds}')} rounds, "
                f"ring in {fmt(g, 'd', f'>{a.rounds}')}: {'OK' if ok else 'NOT MET'}"
            )
    return out


def plots(out: Path, results: dict[str, tuple[Run, SimResult]], a: argparse.Namespace) -> list[Path]:
    plt = reporting.pyplot()
    mean_runs = [(run, res) for run, res in results.values() if run.rule == "mean"]
    parts = sorted({run.partition for run, _ in mean_runs}, key=lambda p: (p != "iid", p))
    sizes = sorted({run.nodes for run, _ in mean_runs})
    tops = list(dict.fromkeys(run.topology for run, _ in mean_runs))
    colors = {t: plt.cm.tab10(i % 10) for i, t in enumerate(tops)}
    written = []

    def panel_grid(title: str, ylabel: str, xlabel: str, draw, name: str, logy=False, logx=False):
        if not parts or not sizes:
            return
        fig, axes = plt.subplots(
            len(parts), len(sizes), figsize=(4.2 * len(sizes), 3.3 * len(parts)), squeeze=False, sharey=True
        )
        for i, part in enumerate(parts):
            for j, n in enumerate(sizes):
                ax = axes[i][j]
                for run, res in mean_runs:
                    if run.partition == part and run.nodes == n:
                        draw(ax, run, res, colors[run.topology])
                ax.set_title(f"n = {n}, {part}", fontsize=10)
                if logy:
                    ax.set_yscale("log")
                if logx:
                    ax.set_xscale("log")
                ax.grid(alpha=0.3)
                if i == len(parts) - 1:
                    ax.set_xlabel(xlabel)
                if j == 0:
                    ax.set_ylabel(ylabel)
        labels = reporting.bottom_legend(fig, axes[0][0], fontsize=9, max_cols=5)
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.07 if len(labels) > 5 else 0.04, 1, 1))
        written.append(reporting.save_figure(fig, out / name))

    def acc_round(ax, run, res, c):
        rs = [r for r in res.rounds if r.accuracy is not None]
        ax.plot([r.round for r in rs], [r.mean_accuracy for r in rs], color=c, label=run.topology, lw=1.4)
        ax.axhline(a.target, color="gray", ls=":", lw=0.8)

    def cons_round(ax, run, res, c):
        # exact consensus (full graph: W = J/n) is 0, which a log axis cannot show: leave it out
        ax.plot(
            [r.round for r in res.rounds],
            [r.consensus if r.consensus > 1e-9 else np.nan for r in res.rounds],
            color=c,
            label=run.topology,
            lw=1.4,
        )

    def acc_bytes(ax, run, res, c):
        rs = [r for r in res.rounds if r.accuracy is not None]
        ax.plot(
            [r.bytes_per_node / 1e6 for r in rs],
            [r.mean_accuracy for r in rs],
            color=c,
            label=run.topology,
            lw=1.4,
        )
        ax.axhline(a.target, color="gray", ls=":", lw=0.8)

    panel_grid(
        "Mean test accuracy across nodes (rule mean)", "accuracy", "round", acc_round, "accuracy_vs_round.png"
    )
    panel_grid(
        "Consensus distance: mean ||x_i - mean||^2 (full graph: exactly 0, not drawn)",
        "consensus distance",
        "round",
        cons_round,
        "consensus_vs_round.png",
        logy=True,
    )
    panel_grid(
        "Accuracy vs megabytes sent per node",
        "accuracy",
        "MB sent per node",
        acc_bytes,
        "accuracy_vs_bytes.png",
        logx=True,
    )

    compared = {r.partition for r, _ in results.values() if r.rule != "mean"}
    rule_runs = [(run, res) for run, res in results.values() if run.partition in compared]
    rules = list(dict.fromkeys(run.rule for run, _ in rule_runs))
    if len(rules) > 1:
        styles = dict(zip(rules, ["-", "--", ":", "-."], strict=False))
        present = list(dict.fromkeys(run.topology for run, _ in rule_runs))
        shown = [t for t in ("ring", "torus", "exponential", "erdos-renyi") if t in present] or present[:4]
        rsizes = sorted({run.nodes for run, _ in rule_runs})
        fig, axes = plt.subplots(1, len(rsizes), figsize=(4.6 * len(rsizes), 3.8), squeeze=False, sharey=True)
        for j, n in enumerate(rsizes):
            ax = axes[0][j]
            for run, res in rule_runs:
                if run.nodes == n and run.topology in shown:
                    rs = [r for r in res.rounds if r.accuracy is not None]
                    ax.plot(
                        [r.round for r in rs],
                        [r.mean_accuracy for r in rs],
                        ls=styles[run.rule],
                        color=colors.get(run.topology, "k"),
                        lw=1.3,
                        label=f"{run.topology}, {run.rule}",
                    )
            ax.axhline(a.target, color="gray", ls=":", lw=0.8)
            ax.set_title(f"n = {n}, {sorted(compared)[0]}", fontsize=10)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("mean accuracy")
        labels = reporting.bottom_legend(fig, axes[0][0], fontsize=8, ncol=len(rules))
        fig.suptitle(
            "Aggregation rules on a skewed partition (solid: mean, dashed: weighted, dotted: push-sum)"
        )
        fig.tight_layout(rect=(0, 0.05 + 0.035 * math.ceil(len(labels) / len(rules)), 1, 1))
        written.append(reporting.save_figure(fig, out / "rules.png"))
    return written


def compression_settings(text: str) -> list[str]:
    """The --compression list: split at ';' if present (settings with options), else at ','."""
    parts = text.split(";") if ";" in text else text.split(",")
    settings = [p.strip() for p in parts if p.strip()]
    for setting in settings:
        Compression.parse(setting)  # fail before the first run on a typo
    return settings if "none" in settings else ["none", *settings]


def compression_row(top: str, n: int, setting: str, res: SimResult, target: float, seconds: float) -> dict:
    final = res.final
    rounds = len(res.rounds)
    sent = res.rounds[-1].bytes_per_node if res.rounds else 0.0
    return {
        "topology": top,
        "nodes": n,
        "compression": setting,
        "gamma": Compression.parse(setting).gamma,
        "bytes_per_node_round": sent / max(rounds, 1),
        "rounds_to_target": res.rounds_to(target, "min"),
        "bytes_to_target": res.bytes_to(target, "min"),
        "final_mean_accuracy": final.mean_accuracy if final else None,
        "final_min_accuracy": final.min_accuracy if final else None,
        "final_consensus": res.rounds[-1].consensus if res.rounds else None,
        "seconds": seconds,
    }


def compression_markdown(rows: list[dict], a: argparse.Namespace) -> str:
    """One table: each setting beside the uncompressed run of the same topology and size (ratios)."""
    base = {(r["topology"], r["nodes"]): r for r in rows if r["compression"] == "none"}
    lines = [
        f"Task {a.task} (lr {a.lr}), partition {a.partitions.split(',')[0]}, rule mean, {a.rounds} rounds, "
        f"keyframe every {a.keyframe_every} rounds (diff form); target: every node >= {a.target}.",
        "",
        "| topology | N | compression | gamma | KB / node-round | x smaller | rounds to target | "
        "MB to target | x fewer bytes | final mean | final min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base.get((r["topology"], r["nodes"]))
        smaller = (
            b["bytes_per_node_round"] / r["bytes_per_node_round"] if b and r["bytes_per_node_round"] else None
        )
        fewer = (
            b["bytes_to_target"] / r["bytes_to_target"]
            if b and b["bytes_to_target"] and r["bytes_to_target"]
            else None
        )
        lines.append(
            f"| {r['topology']} | {r['nodes']} | {r['compression']} | {r['gamma']:g} | "
            f"{r['bytes_per_node_round'] / 1e3:.1f} | {fmt(smaller, '.1f')} | "
            f"{fmt(r['rounds_to_target'], 'd', '-')} | {_mb(r['bytes_to_target'])} | {fmt(fewer, '.1f')} | "
            f"{fmt(r['final_mean_accuracy'])} | {fmt(r['final_min_accuracy'])} |"
        )
    return "\n".join(lines) + "\n"


def run_compression(a: argparse.Namespace) -> int:
    """The compression comparison (--compression): compression.csv and compression.md in --out."""
    settings = compression_settings(a.compressions)
    tops = [t.strip() for t in a.topologies.split(",") if t.strip()]
    sizes = [int(v) for v in a.sizes.split(",") if v.strip()]
    partition = a.partitions.split(",")[0].strip()
    set_torch_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(n, top, setting) for n in sizes for top in tops for setting in settings]
    configs = [
        config_from_args(a, nodes=n, topology=top, rule="mean", partition=partition, compression=setting)
        for n, top, setting in jobs
    ]

    rows: dict[int, dict] = {}

    def show(i: int, done: tuple[SimResult, float]) -> None:
        (n, top, setting), (res, seconds) = jobs[i], done
        row = rows[i] = compression_row(top, n, setting, res, a.target, seconds)
        print(
            f"{top} n={n} {setting:<22} {row['bytes_per_node_round'] / 1e3:8.1f} KB/node-round  "
            f"target@{fmt(row['rounds_to_target'], 'd', '-'):>4} ({_mb(row['bytes_to_target'])} MB)  "
            f"acc {fmt(row['final_mean_accuracy'])} (min {fmt(row['final_min_accuracy'])})  "
            f"{row['seconds']:.1f} s",
            flush=True,
        )

    started = time.perf_counter()
    run_grid_from_args(timed_run, configs, a, on_result=show)
    ordered = [rows[i] for i in range(len(jobs))]
    reporting.write_rows(out / "compression.csv", ordered)
    table = compression_markdown(ordered, a)
    (out / "compression.md").write_text(table)
    print(table)
    print(f"{len(ordered)} runs in {time.perf_counter() - started:.0f} s; wrote {out / 'compression.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.compressions:
        return run_compression(a)
    runs = grid(a)
    set_torch_threads(a.threads)
    console, out = reporting.start_grid(a.out, len(runs), a.rounds)
    summaries: dict[int, dict] = {}
    started = time.perf_counter()
    with reporting.progress_bar(console) as progress:
        overall = progress.add_task("grid", total=len(runs))

        def show(i: int, done: tuple[SimResult, float]) -> None:
            run, (res, seconds) = runs[i], done
            row = summaries[i] = summarise(run, res, a.target, seconds)
            progress.console.print(
                f"{run.key:<48} gap {fmt(row['spectral_gap'], '.4f'):>7}  "
                f"target@{fmt(row['rounds_to_target'], 'd', '-'):>4}  acc {fmt(row['final_mean_accuracy'])} "
                f"(min {fmt(row['final_min_accuracy'])})  {seconds:.1f} s"
            )
            progress.advance(overall)

        done = run_grid_from_args(
            functools.partial(timed_run, gap=True), [config(run, a) for run in runs], a, on_result=show
        )
    with open(out / "rounds.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "topology",
                "nodes",
                "partition",
                "rule",
                "round",
                "mean_accuracy",
                "min_accuracy",
                "mean_train_loss",
                "consensus",
                "bytes_per_node",
            ]
        )
        for run, (res, _) in zip(runs, done, strict=True):
            for r in res.rounds:
                d = r.row()
                writer.writerow(
                    [
                        run.topology,
                        run.nodes,
                        run.partition,
                        run.rule,
                        r.round,
                        d["mean_accuracy"],
                        d["min_accuracy"],
                        d["mean_train_loss"],
                        d["consensus"],
                        d["bytes_per_node"],
                    ]
                )
    wall = time.perf_counter() - started
    results = {run.key: (run, res) for run, (res, _) in zip(runs, done, strict=True)}
    rows = [summaries[i] for i in range(len(runs))]
    reporting.write_rows(out / "summary.csv", rows)
    lines = checks(rows, a)
    reporting.finish_grid(
        console,
        out,
        wall=wall,
        runs=len(rows),
        tables=pivot(rows, a) + "\n" + markdown(rows, a, wall),
        checks=lines,
        printed=lines,
        data_files=[out / "rounds.csv", out / "summary.csv"],
        figures=None if a.no_plots else lambda: plots(out, results, a),
        result={"checks": lines},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
