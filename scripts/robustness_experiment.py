#!/usr/bin/env python
"""Robustness experiment: attacks x aggregation rules x number of Byzantine nodes, in the simulator.

Every run is `p2pfl.sim` (the node's task, topology, aggregation and attack code on N virtual nodes):
16 nodes, digits MLP (`digits-mlp`, 64 hidden units; batched training makes a 40-round run take
about 0.3 s), IID shards, 1 local epoch per round. Byzantine nodes are placed deterministically and
independently of the topology: `p2pfl.sim.spread(16, b)` = node indices floor(k * 16 / b), i.e.
(0,), (0, 8), (0, 5, 10). They train and mix honestly and send crafted vectors (p2pfl.attacks);
accuracy is that of the honest nodes only, on the shared test split, after the last round,
averaged over the seeds.

Grid (default): topologies random 4-regular and 2-D torus; seeds 0, 1, 2 (the seed also draws the
random graph); rules mean, clipped, trimmed-mean, median, robust x every attack with 3 Byzantine
nodes, plus the no-attack baseline, plus the extra attacks (--extra, default ALIE with z = 3 and
z = 10); and the sweep: 1 and 2 Byzantine nodes for sign-flip, alie, label-flip and replay under
mean, clipped and robust (--sweep-attacks, --sweep-rules).
Writes to --out (default runs/robustness):

  runs.csv       one row per run (topology, partition, rule, attack, byzantine, seed, honest mean / min
                 accuracy, down-weighted edges from Byzantine / honest senders at the end, rule robust's
                 detection and false-positive rates over all rounds, seconds)
  rounds.csv     honest mean / min accuracy per round of every run
  summary.md     markdown tables (3 Byzantine of 16; the 0..3 sweep) and the target checks
  robustness_byz3.png, robustness_sweep.png, robustness_rounds.png

    python scripts/robustness_experiment.py             # the default grid (~5 min on 2 cores)
    python scripts/robustness_experiment.py --quick     # a smoke test (seconds)
    python scripts/robustness_experiment.py --seeds 0 --byzantine 0,3 --rules mean,robust

Rule robust's two error rates, over every round of a run: detection = share of the (honest node,
Byzantine neighbour, round) triples in which the attacker's reputation was below 1; false positives =
share of the (honest node, honest neighbour, round) triples in which the honest neighbour's was. The
grid reports both; --false-positives runs only rule robust without attack, long, on every topology x
partition given (--partitions), which is where honest neighbours used to be excluded by chance:

    python scripts/robustness_experiment.py --false-positives --rounds 1000 \
        --topologies ring,torus --partitions iid,dirichlet:0.5,dirichlet:0.1 --seeds 0
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from p2pfl import reporting  # noqa: E402
from p2pfl.aggregation import rule_names  # noqa: E402
from p2pfl.attacks import ATTACKS, make_attack  # noqa: E402
from p2pfl.grid import add_arguments as grid_options  # noqa: E402
from p2pfl.grid import run_grid_from_args, timed_run  # noqa: E402
from p2pfl.learning.spec import PARTITION_SCHEMES  # noqa: E402
from p2pfl.sim import SimConfig, config_from_args, set_torch_threads, spread  # noqa: E402
from p2pfl.topology import parse_topology  # noqa: E402

DEFAULT_TOPOLOGIES = ("random-regular:4", "torus")
DEFAULT_RULES = ("mean", "clipped", "trimmed-mean", "median", "robust")
DEFAULT_EXTRA = ("alie:z=3", "alie:z=10")
DEFAULT_SWEEP_ATTACKS = ("sign-flip", "alie", "label-flip", "replay")
DEFAULT_SWEEP_RULES = ("mean", "clipped", "robust")
NO_ATTACK = "none"
TARGET_NO_ATTACK_COST = 0.01  # robust may cost at most 1 point against mean without attack
TARGET_HOLD = 0.03  # robust within 3 points of its no-attack value under every attack (b = max)
TARGET_COLLAPSE = 0.20  # mean must lose at least 20 points under these attacks (b = max)
TARGET_FALSE_POSITIVES = 0.005  # robust without attack: at most 0.5% of honest edge-rounds down-weighted
COLLAPSE_ATTACKS = ("sign-flip", "alie")


@dataclass(frozen=True)
class Run:
    topology: str
    rule: str
    attack: str
    byzantine: int
    seed: int
    partition: str = "iid"  # "iid" or "dirichlet:ALPHA"

    @property
    def key(self) -> str:
        part = "" if self.partition == "iid" else f" {self.partition}"
        return f"{self.topology}{part} {self.rule} {self.attack} b={self.byzantine} seed={self.seed}"


def parse_partition(text: str) -> tuple[str, float | None]:
    """ "iid" -> ("iid", None); "dirichlet:0.1" -> ("dirichlet", 0.1); "dirichlet" -> alpha None."""
    name, _, alpha = text.partition(":")
    if name not in PARTITION_SCHEMES:
        raise SystemExit(f"unknown partition {text!r}; known: {', '.join(PARTITION_SCHEMES)}")
    return name, (float(alpha) if alpha else None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = reporting.experiment_parser(__doc__)
    p.add_argument("--topologies", default=",".join(DEFAULT_TOPOLOGIES))
    p.add_argument("--rules", default=",".join(DEFAULT_RULES), help=f"of {', '.join(rule_names())}")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="attack names (name:key=value allowed)")
    p.add_argument(
        "--extra",
        default=",".join(DEFAULT_EXTRA),
        help="further attack variants, run only with the largest number of Byzantine nodes ('' for none)",
    )
    p.add_argument(
        "--byzantine",
        default="1,2,3",
        help="numbers of Byzantine nodes: the largest for the full grid, the others for the sweep "
        "(0 = the no-attack baseline, always run)",
    )
    p.add_argument("--sweep-attacks", default=",".join(DEFAULT_SWEEP_ATTACKS), help="'all': every attack")
    p.add_argument("--sweep-rules", default=",".join(DEFAULT_SWEEP_RULES), help="'all': every rule")
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--rounds", type=int, default=None, help="default 40 (--false-positives: 1000)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--task", default="digits-mlp")
    p.add_argument("--partition", default="iid")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument(
        "--partitions",
        default=None,
        help="comma list for --false-positives, e.g. iid,dirichlet:0.1 (default: --partition / --alpha)",
    )
    p.add_argument(
        "--reputation",
        default="",
        help="rule robust's Reputation options, e.g. accept=4,step_cap=8 (default: the defaults)",
    )
    p.add_argument(
        "--false-positives",
        action="store_true",
        help="only rule robust without attack, on every topology x partition: its false-positive rate",
    )
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    grid_options(p)
    p.add_argument("--out", default="runs/robustness")
    p.add_argument(
        "--quick", action="store_true", help="torus, mean/robust, 3 attacks, b in {0, 3}, 15 rounds"
    )
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.topologies, a.rules, a.attacks, a.extra = "torus", "mean,robust", "sign-flip,alie,label-flip", ""
        a.byzantine, a.seeds = "3", "0"
        a.rounds = 15 if a.rounds is None else a.rounds
        a.sweep_attacks = a.sweep_rules = ""
    if a.rounds is None:
        a.rounds = 1000 if a.false_positives else 40
    if a.partitions is None:
        a.partitions = a.partition if a.partition != "dirichlet" else f"dirichlet:{a.alpha}"
    return a


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def grid(a: argparse.Namespace) -> list[Run]:
    tops, rules, attacks, extra = _split(a.topologies), _split(a.rules), _split(a.attacks), _split(a.extra)
    for t in tops:
        parse_topology(t)  # fail before the first run on a typo
    bad = [r for r in rules if r not in rule_names()]
    if bad:
        raise SystemExit(f"unknown rule(s) {bad}; known: {', '.join(rule_names())}")
    for name in attacks + extra:
        make_attack(name)  # ConfigError on a typo
    counts = sorted({int(b) for b in _split(a.byzantine)} - {0})
    for b in counts:
        spread(a.nodes, b)
    seeds = [int(s) for s in _split(a.seeds)]
    if a.false_positives:
        parts = _split(a.partitions)
        for part in parts:
            parse_partition(part)
        return [
            Run(top, "robust", NO_ATTACK, 0, seed, part) for top in tops for part in parts for seed in seeds
        ]
    sweep_attacks, sweep_rules = _split(a.sweep_attacks), _split(a.sweep_rules)
    part = _split(a.partitions)[0]
    runs = []
    for top in tops:
        for rule in rules:
            for seed in seeds:
                runs.append(Run(top, rule, NO_ATTACK, 0, seed, part))
                for attack in attacks:
                    for b in counts:
                        if b == counts[-1] or (
                            (a.sweep_attacks == "all" or attack in sweep_attacks)
                            and (a.sweep_rules == "all" or rule in sweep_rules)
                        ):
                            runs.append(Run(top, rule, attack, b, seed, part))
                if counts:
                    for attack in extra:
                        runs.append(Run(top, rule, attack, counts[-1], seed, part))
    return runs


def reputation_options(text: str) -> tuple[tuple[str, float], ...]:
    """ "accept=4,step_cap=8" -> (("accept", 4.0), ("step_cap", 8.0)); integers stay integers."""
    out = []
    for item in _split(text):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--reputation: expected key=value, got {item!r}")
        number = float(value)
        out.append((key.strip(), int(number) if number.is_integer() and "." not in value else number))
    return tuple(out)


def config(run: Run, a: argparse.Namespace) -> SimConfig:
    partition, alpha = parse_partition(run.partition)
    return config_from_args(
        a,
        reputation=reputation_options(a.reputation),
        topology=run.topology,
        rule=run.rule,
        seed=run.seed,
        attack="" if run.attack == NO_ATTACK else run.attack,
        byzantine=run.byzantine,
        partition=partition,
        alpha=a.alpha if alpha is None else alpha,
        eval_every=max(1, a.rounds // 100),  # long runs: evaluate 100 times, not every round
    )


# --------------------------------------------------------------------------------------------------
# aggregation over seeds and the tables


def aggregate(rows: list[dict]) -> dict[tuple, dict]:
    """(topology, rule, attack, byzantine) -> mean over seeds of honest mean / min accuracy."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["topology"], r["rule"], r["attack"], r["byzantine"]), []).append(r)
    return {
        k: {
            "mean": float(np.mean([r["honest_mean_accuracy"] for r in v])),
            "min": float(np.mean([r["honest_min_accuracy"] for r in v])),
            "worst_min": float(np.min([r["honest_min_accuracy"] for r in v])),
            "flag_byz": float(np.mean([r["downweighted_byzantine"] or 0 for r in v])),
            "flag_honest": float(np.mean([r["downweighted_honest"] or 0 for r in v])),
            "detection": _mean_of(r["detection_rate"] for r in v),
            "false_positives": _mean_of(r["fp_rate"] for r in v),
            "seeds": len(v),
        }
        for k, v in groups.items()
    }


def _mean_of(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None (None when all are)."""
    got = [v for v in values if v is not None]
    return float(np.mean(got)) if got else None


def aggregate_false_positives(rows: list[dict]) -> dict[tuple, dict]:
    """(topology, partition) -> rule robust's false-positive rate and honest accuracy, mean over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["topology"], r["partition"]), []).append(r)
    return {
        k: {
            "false_positives": _mean_of(r["fp_rate"] for r in v),
            "worst": max((r["fp_rate"] or 0.0) for r in v),
            "flagged_rounds": float(np.mean([r["fp_rounds"] for r in v])),
            "mean": float(np.mean([r["honest_mean_accuracy"] for r in v])),
            "min": float(np.mean([r["honest_min_accuracy"] for r in v])),
            "consensus": float(np.mean([r["consensus"] for r in v])),
            "seeds": len(v),
        }
        for k, v in groups.items()
    }


def _rate(v: float | None) -> str:
    """A rate in percent with enough digits for small false-positive rates."""
    return reporting.fmt(None if v is None else 100 * v, ".2f")


def _pct(v: float | None) -> str:
    return reporting.fmt(None if v is None else 100 * v, ".1f")


def tables(agg: dict[tuple, dict], a: argparse.Namespace, wall: float, runs: int) -> str:
    tops = list(dict.fromkeys(k[0] for k in agg))
    rules = list(dict.fromkeys(k[1] for k in agg))
    attacks = list(dict.fromkeys(k[2] for k in agg if k[2] != NO_ATTACK))
    counts = sorted({k[3] for k in agg if k[3] > 0})
    b_max = counts[-1] if counts else 0
    seeds = _split(a.seeds)
    lines = [
        f"Simulator, `{a.task}`, {a.nodes} nodes, {a.partition} shards, {a.rounds} rounds (1 local epoch, lr {a.lr}, "
        f"batch {a.batch_size}), seeds {', '.join(seeds)} (figures are means over the seeds). Byzantine nodes at "
        f"indices `spread({a.nodes}, b)` = floor(k*{a.nodes}/b): "
        + ", ".join(f"b={b}: {spread(a.nodes, b)}" for b in counts)
        + f". Cells: honest nodes' final mean accuracy / minimum accuracy (%). {runs} runs in {wall:.0f} s.",
        "",
    ]
    for top in tops:
        lines += [
            f"**{top}, {b_max} Byzantine of {a.nodes}** (row `none`: no attack, 0 Byzantine)",
            "",
            "| attack | " + " | ".join(rules) + " |",
            "|---|" + "---:|" * len(rules),
        ]
        for attack in [NO_ATTACK, *attacks]:
            b = 0 if attack == NO_ATTACK else b_max
            cells = []
            for rule in rules:
                g = agg.get((top, rule, attack, b))
                cells.append("" if g is None else f"{_pct(g['mean'])} / {_pct(g['min'])}")
            lines.append(f"| {attack} | " + " | ".join(cells) + " |")
        lines.append("")
    if len(counts) > 1:
        shown = [r for r in ("mean", "clipped", "robust") if r in rules] or rules[:3]
        lines += [
            "**Honest mean accuracy (%) against the number of Byzantine nodes** (0 = no attack)",
            "",
            "| topology | attack | " + " | ".join(f"{r} b={b}" for r in shown for b in [0, *counts]) + " |",
            "|---|---|" + "---:|" * (len(shown) * (len(counts) + 1)),
        ]
        for top in tops:
            for attack in attacks:
                if not all((top, shown[0], attack, b) in agg for b in counts):
                    continue
                cells = []
                for r in shown:
                    for b in [0, *counts]:
                        g = agg.get((top, r, NO_ATTACK if b == 0 else attack, b))
                        cells.append("" if g is None else _pct(g["mean"]))
                lines.append(f"| {top} | {attack} | " + " | ".join(cells) + " |")
        lines.append("")
    if "robust" in rules:
        lines += [
            f"Rule robust, {b_max} Byzantine: edges (honest receiver, sender) with reputation < 1 after the "
            "last round, from Byzantine senders / from honest senders (mean over seeds):",
            "",
            "| topology | " + " | ".join(attacks) + " |",
            "|---|" + "---:|" * len(attacks),
        ]
        for top in tops:
            cells = []
            for attack in attacks:
                g = agg.get((top, "robust", attack, b_max))
                cells.append("" if g is None else f"{g['flag_byz']:.1f} / {g['flag_honest']:.1f}")
            lines.append(f"| {top} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Rule robust, per round over all {a.rounds} rounds: detection / false positives (%): the share of "
            "(honest node, Byzantine neighbour, round) triples in which the attacker was down-weighted / of "
            "(honest node, honest neighbour, round) triples in which an honest neighbour was (column `none`: "
            "no attack; mean over seeds):",
            "",
            "| topology | none | " + " | ".join(attacks) + " |",
            "|---|---:|" + "---:|" * len(attacks),
        ]
        for top in tops:
            g0 = agg.get((top, "robust", NO_ATTACK, 0))
            cells = ["" if g0 is None else f"- / {_rate(g0['false_positives'])}"]
            for attack in attacks:
                g = agg.get((top, "robust", attack, b_max))
                cells.append("" if g is None else f"{_pct(g['detection'])} / {_rate(g['false_positives'])}")
            lines.append(f"| {top} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def false_positive_table(agg: dict[tuple, dict], a: argparse.Namespace, wall: float, runs: int) -> str:
    """--false-positives: rule robust without attack, per topology and partition."""
    seeds = _split(a.seeds)
    lines = [
        f"Simulator, `{a.task}`, {a.nodes} nodes, rule robust, no attack, {a.rounds} rounds (1 local epoch, "
        f"lr {a.lr}, batch {a.batch_size}), seeds {', '.join(seeds)} (means over the seeds). False positives: "
        "the share of (honest node, honest neighbour, round) triples in which the neighbour's reputation was "
        f"below 1 (every neighbour is honest here). {runs} runs in {wall:.0f} s.",
        "",
        "| topology | partition | false positives (%) | worst seed (%) | rounds with any | honest mean / min "
        "accuracy (%) | consensus distance |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (top, part), g in agg.items():
        lines.append(
            f"| {top} | {part} | {_rate(g['false_positives'])} | {_rate(g['worst'])} | "
            f"{g['flagged_rounds']:.0f} | {_pct(g['mean'])} / {_pct(g['min'])} | {g['consensus']:.4f} |"
        )
    lines.append("")
    return "\n".join(lines)


def false_positive_checks(agg: dict[tuple, dict]) -> list[tuple[bool, str]]:
    """Rule robust without attack: the false-positive rate under TARGET_FALSE_POSITIVES everywhere."""
    return [
        (
            (g["false_positives"] or 0.0) <= TARGET_FALSE_POSITIVES,
            f"{top}, {part}, no attack: robust down-weighted {_rate(g['false_positives'])}% of honest "
            f"edge-rounds (target <= {100 * TARGET_FALSE_POSITIVES:.1f}%)",
        )
        for (top, part), g in agg.items()
    ]


def _attack_checks(
    agg: dict[tuple, dict],
    top: str,
    rule: str,
    attacks: Sequence[str],
    b_max: int,
    met: Callable[[float], bool],
    target: str,
) -> list[tuple[bool, str]]:
    """One (met, text) per attack that ran: the honest mean accuracy `rule` lost under the attack
    with b_max Byzantine nodes, against its own no-attack run. The "robust holds" and "mean
    collapses" targets are this same comparison with opposite conditions."""
    base = agg.get((top, rule, NO_ATTACK, 0))
    if not base:
        return []
    out: list[tuple[bool, str]] = []
    for attack in attacks:
        g = agg.get((top, rule, attack, b_max))
        if g is None:
            continue
        drop = base["mean"] - g["mean"]
        out.append(
            (
                met(drop),
                f"{top}, {attack}, {b_max} Byzantine: {rule} {_pct(g['mean'])}% "
                f"({-100 * drop:+.1f} points vs no attack; target {target})",
            )
        )
    return out


def checks(agg: dict[tuple, dict], a: argparse.Namespace) -> list[tuple[bool, str]]:
    """The issue's targets, per topology: (met, text)."""
    out: list[tuple[bool, str]] = []
    tops = list(dict.fromkeys(k[0] for k in agg))
    counts = sorted({k[3] for k in agg if k[3] > 0})
    b_max = counts[-1] if counts else 0
    attacks = list(dict.fromkeys(k[2] for k in agg if k[2] != NO_ATTACK and k[3] == b_max))
    for top in tops:
        mean0 = agg.get((top, "mean", NO_ATTACK, 0))
        rob0 = agg.get((top, "robust", NO_ATTACK, 0))
        if mean0 and rob0:
            cost = mean0["mean"] - rob0["mean"]
            out.append(
                (
                    cost <= TARGET_NO_ATTACK_COST,
                    f"{top}, no attack: robust {_pct(rob0['mean'])}% vs mean {_pct(mean0['mean'])}% "
                    f"(cost {100 * cost:+.1f} points; target <= {100 * TARGET_NO_ATTACK_COST:.0f})",
                )
            )
        if rob0 and rob0["false_positives"] is not None:
            out.append(
                (
                    rob0["false_positives"] <= TARGET_FALSE_POSITIVES,
                    f"{top}, no attack: robust down-weighted {_rate(rob0['false_positives'])}% of honest "
                    f"edge-rounds (target <= {100 * TARGET_FALSE_POSITIVES:.1f}%)",
                )
            )
        out += _attack_checks(
            agg, top, "robust", attacks, b_max, lambda d: d <= TARGET_HOLD, f">= -{100 * TARGET_HOLD:.0f}"
        )
        out += _attack_checks(
            agg,
            top,
            "mean",
            COLLAPSE_ATTACKS,
            b_max,
            lambda d: d >= TARGET_COLLAPSE,
            f"<= -{100 * TARGET_COLLAPSE:.0f}",
        )
    return out


# --------------------------------------------------------------------------------------------------
# plots


def plots(out: Path, agg: dict[tuple, dict], curves: dict[tuple, list], a: argparse.Namespace) -> list[Path]:
    plt = reporting.pyplot()
    written: list[Path] = []
    tops = list(dict.fromkeys(k[0] for k in agg))
    rules = list(dict.fromkeys(k[1] for k in agg))
    attacks = list(dict.fromkeys(k[2] for k in agg if k[2] != NO_ATTACK))
    counts = sorted({k[3] for k in agg if k[3] > 0})
    if not counts:
        return written
    b_max = counts[-1]
    colors = {r: plt.cm.tab10(i % 10) for i, r in enumerate(rules)}

    # 1. grouped bars: honest mean accuracy with b_max Byzantine, per attack and rule
    fig, axes = plt.subplots(
        len(tops), 1, figsize=(max(8, 1.1 * (len(attacks) + 1) + 2), 3.4 * len(tops)), squeeze=False
    )
    for ti, top in enumerate(tops):
        ax = axes[ti][0]
        labels = [NO_ATTACK, *attacks]
        width = 0.8 / len(rules)
        for ri, rule in enumerate(rules):
            vals = [
                agg.get((top, rule, lab, 0 if lab == NO_ATTACK else b_max), {}).get("mean", np.nan)
                for lab in labels
            ]
            ax.bar(
                np.arange(len(labels)) + (ri - (len(rules) - 1) / 2) * width,
                vals,
                width,
                color=colors[rule],
                label=rule,
            )
        ax.set_xticks(np.arange(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("honest mean accuracy")
        ax.set_title(f"{top}: {b_max} Byzantine of {a.nodes} (none: no attack)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    reporting.bottom_legend(fig, axes[0][0], fontsize=9, ncol=len(rules))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    written.append(reporting.save_figure(fig, out / "robustness_byz3.png"))

    # 2. honest mean accuracy against the number of Byzantine nodes
    swept = [att for att in attacks if all((tops[0], rules[0], att, b) in agg for b in counts)]
    if len(counts) > 1 and swept:
        fig, axes = plt.subplots(
            len(tops), len(swept), figsize=(2.6 * len(swept), 2.6 * len(tops)), squeeze=False, sharey=True
        )
        for ti, top in enumerate(tops):
            for ai, att in enumerate(swept):
                ax = axes[ti][ai]
                for rule in rules:
                    xs = [0, *counts]
                    ys = [
                        agg.get((top, rule, NO_ATTACK if b == 0 else att, b), {}).get("mean", np.nan)
                        for b in xs
                    ]
                    if not np.isnan(ys).any():  # only the rules run at every count
                        ax.plot(xs, ys, marker="o", ms=3, color=colors[rule], label=rule, lw=1.3)
                ax.set_ylim(0, 1)
                ax.set_xticks([0, *counts])
                ax.grid(alpha=0.3)
                if ti == 0:
                    ax.set_title(att, fontsize=9)
                if ti == len(tops) - 1:
                    ax.set_xlabel("Byzantine nodes")
                if ai == 0:
                    ax.set_ylabel(f"{top}\nhonest mean acc", fontsize=8)
        reporting.bottom_legend(fig, axes[0][0], fontsize=9, ncol=len(rules))
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        written.append(reporting.save_figure(fig, out / "robustness_sweep.png"))

    # 3. honest mean accuracy per round, mean vs robust, b_max Byzantine, first topology
    shown = [r for r in ("mean", "robust") if r in rules]
    if shown and curves:
        top = tops[0]
        fig, axes = plt.subplots(1, len(shown), figsize=(5.2 * len(shown), 3.6), squeeze=False, sharey=True)
        att_colors = {att: plt.cm.tab20(i % 20) for i, att in enumerate(attacks)}
        att_colors[NO_ATTACK] = "black"
        for ri, rule in enumerate(shown):
            ax = axes[0][ri]
            for att in [NO_ATTACK, *attacks]:
                c = curves.get((top, rule, att, 0 if att == NO_ATTACK else b_max))
                if c:
                    lw = 2.0 if att == NO_ATTACK else 1.2
                    ax.plot(np.arange(1, len(c) + 1), c, color=att_colors[att], lw=lw, label=att)
            ax.set_title(f"{top}, rule {rule}, {b_max} Byzantine", fontsize=10)
            ax.set_xlabel("round")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("honest mean accuracy")
        reporting.bottom_legend(fig, axes[0][0], fontsize=8, max_cols=6)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        written.append(reporting.save_figure(fig, out / "robustness_rounds.png"))
    return written


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    runs = grid(a)
    set_torch_threads(a.threads)
    console, out = reporting.start_grid(a.out, len(runs), a.rounds)
    rows: list[dict] = []
    per_round: dict[tuple, list[list[float]]] = {}
    started = time.perf_counter()
    with (
        open(out / "rounds.csv", "w", newline="") as fh_rounds,
        reporting.progress_bar(console, remaining=True) as progress,
    ):
        rw = csv.writer(fh_rounds)
        rw.writerow(
            [
                "topology",
                "rule",
                "attack",
                "byzantine",
                "seed",
                "round",
                "honest_mean_accuracy",
                "honest_min_accuracy",
            ]
        )
        overall = progress.add_task("grid", total=len(runs))
        done = run_grid_from_args(
            timed_run,
            [config(run, a) for run in runs],
            a,
            on_result=lambda i, _: progress.update(overall, description=f"{runs[i].key:<52}", advance=1),
        )
        for run, (res, seconds) in zip(runs, done, strict=True):
            final = res.final
            assert final is not None
            row = {
                "topology": run.topology,
                "partition": run.partition,
                "rule": run.rule,
                "attack": run.attack,
                "byzantine": run.byzantine,
                "byzantine_nodes": " ".join(map(str, res.byzantine)),
                "seed": run.seed,
                "honest_mean_accuracy": final.honest_mean_accuracy,
                "honest_min_accuracy": final.honest_min_accuracy,
                "downweighted_byzantine": None if final.downweighted is None else final.downweighted[0],
                "downweighted_honest": None if final.downweighted is None else final.downweighted[1],
                "detection_rate": res.detection_rate,
                "fp_rate": res.false_positive_rate,
                "fp_rounds": sum(1 for r in res.rounds if r.downweighted is not None and r.downweighted[1]),
                "consensus": final.consensus,
                "seconds": round(seconds, 3),
            }
            rows.append(row)
            curve: list[float] = []
            for r in res.rounds:
                if r.accuracy is not None and r.honest_mean_accuracy is not None:
                    rw.writerow(
                        [run.topology, run.rule, run.attack, run.byzantine, run.seed, r.round,
                         r.honest_mean_accuracy, r.honest_min_accuracy]
                    )  # fmt: skip
                    curve.append(r.honest_mean_accuracy)
            per_round.setdefault((run.topology, run.rule, run.attack, run.byzantine), []).append(curve)
    wall = time.perf_counter() - started
    reporting.write_rows(out / "runs.csv", rows)
    if a.false_positives:
        fp_agg = aggregate_false_positives(rows)
        results = false_positive_checks(fp_agg)
        text = false_positive_table(fp_agg, a, wall, len(rows))
        figures = None
    else:
        agg = aggregate(rows)
        curves = {k: list(np.mean(np.array(v, dtype=float), axis=0)) for k, v in per_round.items()}
        results = checks(agg, a)
        text = tables(agg, a, wall, len(rows))
        figures = None if a.no_plots else lambda: plots(out, agg, curves, a)
    reporting.finish_grid(
        console,
        out,
        wall=wall,
        runs=len(rows),
        tables=text,
        checks=[f"{'met' if ok else 'MISSED'}: {text}" for ok, text in results],
        checks_heading="Targets:",
        printed=[("[green]met[/] " if ok else "[red]MISSED[/] ") + text for ok, text in results],
        data_files=[out / "runs.csv", out / "rounds.csv"],
        figures=figures,
        result={"missed": [text for ok, text in results if not ok]},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
