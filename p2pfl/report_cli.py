"""`p2pfl report RUN_DIR`: the summary table, summary.json and plots of any set of node metrics.

RUN_DIR is any folder tree holding the `metrics.jsonl` files nodes write: a testbed run, one
node's data_dir, or the data dirs of a hand-run federation copied from several machines into one
folder. The work is p2pfl.reporting's (the testbed reports with the same code); this module only
parses the command line and writes the files. torch is never imported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from p2pfl import reporting

__all__ = ["REPORT_DIR", "add_commands", "report_command"]

REPORT_DIR = "report"  # default output folder, inside RUN_DIR (a testbed's own summary.json stays)
LAUNCHER_SUMMARY = "summary.json"  # a testbed's: exit codes, roles and faults the records do not hold


def add_commands(subparsers: Any) -> None:
    """Register `report` on `subparsers` (argparse's add_subparsers result)."""
    report = subparsers.add_parser(
        "report",
        help="summary table, summary.json and plots of node metrics (a testbed run or copied data dirs)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    report.add_argument(
        "run_dir", metavar="RUN_DIR", help="folder searched for metrics.jsonl files (or one file)"
    )
    report.add_argument("--out", help=f"where summary.json and the plots go (default RUN_DIR/{REPORT_DIR})")
    report.add_argument(
        "--pattern",
        default=reporting.METRICS_FILE,
        help="metrics file names to collect, a glob (default metrics.jsonl; for a custom [metrics] path)",
    )
    report.add_argument("--no-plots", action="store_true", help="only the table and summary.json")
    report.set_defaults(func=report_command)


def _launcher_facts(root: Path, runs: list[reporting.NodeRun]) -> list[dict[str, Any]]:
    """From a testbed's summary.json in RUN_DIR: each node's exit code, role and state at the end
    (only the launcher saw them), and the fault events. Nothing when there is none."""
    try:
        previous = json.loads((root / LAUNCHER_SUMMARY).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(previous, dict) or not isinstance(previous.get("nodes"), list):
        return []
    known = {n.get("name"): n for n in previous["nodes"] if isinstance(n, dict)}
    for run in runs:
        facts = known.get(run.name) or known.get(run.directory.name)
        if facts is None:
            continue
        if isinstance(facts.get("exit_code"), int):
            run.exit_code = facts["exit_code"]
        if isinstance(facts.get("byzantine"), bool):
            run.byzantine = facts["byzantine"]
        if isinstance(facts.get("alive_at_end"), bool):
            run.alive = facts["alive_at_end"]
    faults = previous.get("faults")
    return [f for f in faults if isinstance(f, dict)] if isinstance(faults, list) else []


def report_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    root = Path(args.run_dir)
    runs = reporting.find_node_runs(root, args.pattern)
    faults = _launcher_facts(root, runs) if root.is_dir() else []
    out = Path(args.out) if args.out else (root if root.is_dir() else root.parent) / REPORT_DIR
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise reporting.ReportError(f"cannot create {out}: {exc.strerror or exc}; pass --out DIR") from exc
    summary = reporting.summarize(runs, faults=faults)
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    console = Console()
    if not console.is_terminal:  # piped or logged: one line per node, not 80 wrapped columns
        console = Console(width=reporting.PIPED_CONSOLE_WIDTH)
    console.print(reporting.summary_table(summary))
    written = [] if args.no_plots else reporting.plot_report(summary, out)
    console.print("wrote " + ", ".join(str(p) for p in [path, *written]), highlight=False)
    return 0
