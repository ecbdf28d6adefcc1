"""Links per node vs degree, and round time, from testbed runs: before (full mesh) against after.

    python scripts/links_figure.py BEFORE_DIR AFTER_DIR [MORE_DIRS...]

Each DIR is a `scripts/testbed.py --out DIR` run. Per run it prints, over every node's metrics.jsonl:
members, degree (neighbours per round), links held (the `links` field; a run made before that field
existed linked every advertised peer, so members - 1 is printed with a '*'), the median round time
of rounds >= 2 and of round 1, and, for every run after the first, the ratios to the first.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from p2pfl.metrics import read_jsonl


def _rows(run: Path) -> list[list[dict[str, Any]]]:
    summary = json.loads((run / "summary.json").read_text())
    return [read_jsonl(run / node["name"] / "metrics.jsonl") for node in summary["nodes"]]


def figures(run: Path) -> dict[str, Any]:
    """What one run shows: medians over nodes of the last round's counts, and round times."""
    nodes = [rows for rows in _rows(run) if rows]
    last = [rows[-1] for rows in nodes]
    measured = all("links" in row for row in last)
    links = [row["links"] if measured else row["members"] - 1 for row in last]
    steady = [r["round_s"] for rows in nodes for r in rows if r["round"] >= 2]
    first = [r["round_s"] for rows in nodes for r in rows if r["round"] == 1]
    return {
        "run": str(run),
        "nodes": len(nodes),
        "members": statistics.median(row["members"] for row in last),
        "degree": statistics.median(len(row["neighbours"]) for row in last),
        "links": statistics.median(links),
        "links_max": max(links),
        "links_measured": measured,
        "round_s": statistics.median(steady) if steady else float("nan"),
        "round1_s": statistics.median(first) if first else float("nan"),
        "accuracy_min": min(row["accuracy"] for row in last),
        "accuracy_mean": statistics.fmean(row["accuracy"] for row in last),
    }


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    runs = [figures(Path(a)) for a in argv]
    base = runs[0]
    print(
        "| run | nodes | members | degree | links/node (max) | median round s | round 1 s | acc min/mean | vs first |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for f in runs:
        star = "" if f["links_measured"] else "*"
        ratio = (
            ""
            if f is base
            else (f"links x{f['links'] / base['links']:.2f}, round x{f['round_s'] / base['round_s']:.2f}")
        )
        print(
            f"| {f['run']} | {f['nodes']} | {f['members']:g} | {f['degree']:g} | {f['links']:g}{star} "
            f"({f['links_max']}{star}) | {f['round_s']:.3f} | {f['round1_s']:.1f} | "
            f"{f['accuracy_min']:.3f}/{f['accuracy_mean']:.3f} | {ratio} |"
        )
    print("* members - 1: that run linked every advertised peer (no `links` field yet)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
