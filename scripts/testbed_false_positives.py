#!/usr/bin/env python
"""Rule robust's false positives and detection on real nodes, from testbed run directories.

The simulator reports both rates (scripts/robustness_experiment.py); this reads what real node
processes wrote, so the same figures can be checked against real timing, real staleness and real
crypto. Per run directory (`python scripts/testbed.py ... --out DIR`):

- warnings: "down-weighting" lines in the honest nodes' `node.log`, against honest / Byzantine
  neighbours (the log names the neighbour);
- edge-rounds: every (honest node, neighbour, round) entry of the honest nodes' `metrics.jsonl` where
  the neighbour's update arrived; down-weighted = its reputation was below 1. False positives: the
  share of those with an honest neighbour, detection: with a Byzantine one (a node is Byzantine when
  its own metrics carry an `attack`).

    python scripts/testbed_false_positives.py runs/testbed-A runs/testbed-B
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_WARNING = re.compile(r"round (\d+): down-weighting (\S+) \(reputation [0-9.]+\): (.*)$")


@dataclass
class RunFigures:
    """One run's counts (honest receivers only)."""

    name: str
    nodes: int = 0
    rounds: int = 0  # the most rounds any node completed
    judged: Counter[str] = field(default_factory=Counter)  # "honest" / "byzantine" neighbour edge-rounds
    downweighted: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    reasons: list[str] = field(default_factory=list)  # first few warnings against honest neighbours
    accuracy: float | None = None

    def rate(self, kind: str) -> float | None:
        return self.downweighted[kind] / self.judged[kind] if self.judged[kind] else None


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill: not evidence
    return out


def read_run(run: Path) -> RunFigures:
    """Count one run directory's edge-rounds and warnings."""
    metrics = {
        d.name: _records(d / "metrics.jsonl")
        for d in sorted(run.glob("node-*"))
        if (d / "metrics.jsonl").exists()
    }
    if not metrics:
        raise SystemExit(f"{run}: no node-*/metrics.jsonl; is it a testbed run directory?")
    byzantine = {name for name, recs in metrics.items() if any(r.get("attack") for r in recs)}
    fig = RunFigures(run.name, nodes=len(metrics))
    last_acc = []
    for name, recs in metrics.items():
        fig.rounds = max(fig.rounds, max((int(r.get("round", 0)) for r in recs), default=0))
        if name in byzantine:
            continue
        for r in recs:
            for peer, info in (r.get("neighbours") or {}).items():
                rep = info.get("reputation")
                if info.get("staleness") is None or rep is None:
                    continue  # did not arrive: no evidence that round
                kind = "byzantine" if peer in byzantine else "honest"
                fig.judged[kind] += 1
                fig.downweighted[kind] += int(rep < 1.0)
        accs = [r["accuracy"] for r in recs if r.get("accuracy") is not None]
        if accs:
            last_acc.append(accs[-1])
        log = run / name / "node.log"
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                m = _WARNING.search(line)
                if m:
                    kind = "byzantine" if m.group(2) in byzantine else "honest"
                    fig.warnings[kind] += 1
                    if kind == "honest" and len(fig.reasons) < 5:
                        fig.reasons.append(f"{name} round {m.group(1)} -> {m.group(2)}: {m.group(3)}")
    fig.accuracy = sum(last_acc) / len(last_acc) if last_acc else None
    return fig


def _pct(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}"


def table(figs: list[RunFigures]) -> str:
    lines = [
        "| run | nodes x rounds | warnings vs honest | FP edge-rounds (%) | warnings vs Byzantine | "
        "detection (%) | honest mean accuracy (%) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for f in figs:
        lines.append(
            f"| {f.name} | {f.nodes} x {f.rounds} | {f.warnings['honest']} | "
            f"{_pct(f.rate('honest'))} ({f.downweighted['honest']}/{f.judged['honest']}) | "
            f"{f.warnings['byzantine'] if f.judged['byzantine'] else '-'} | {_pct(f.rate('byzantine'), 1)} | "
            f"{_pct(f.accuracy, 1)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="testbed run directories")
    a = p.parse_args(argv)
    figs = [read_run(r) for r in a.runs]
    print(table(figs))
    for f in figs:
        for reason in f.reasons:
            print(f"  {f.name}: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
