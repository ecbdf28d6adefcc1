"""Reporting: the experiment scripts' shared output, and the summary and plots of node metrics.

The experiments (scripts/*_experiment.py) run a grid of simulations and report it the same way:
--help from the script's docstring, a rich progress bar on stderr, CSV files of rows, markdown
tables with numbers formatted the same, and matplotlib figures written as PNG files. Keeping those
pieces here means every experiment's output looks alike and a fix to, say, the piped-console width
applies to all of them.

The second half reads what real nodes wrote (`metrics.jsonl`, and `models/round_NNNN.npy` when
[metrics] save_models is on) from any folder tree: a testbed run, or the data dirs of a hand-run
federation copied from several machines into one folder. `p2pfl report` and the testbed build the
same summary, table and plots from it. rich and matplotlib are imported lazily, so importing this
module costs nothing for code that only formats numbers; torch is never imported.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from p2pfl.errors import P2PFLError
from p2pfl.metrics import read_jsonl

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

__all__ = [
    "FIGURE_DPI",
    "METRICS_FILE",
    "PIPED_CONSOLE_WIDTH",
    "NodeRun",
    "ReportError",
    "bottom_legend",
    "consensus_by_round",
    "find_node_runs",
    "node_summary",
    "plot_report",
    "run_title",
    "summarize",
    "summary_table",
    "experiment_parser",
    "finish_grid",
    "fmt",
    "progress_bar",
    "pyplot",
    "save_figure",
    "start_grid",
    "stderr_console",
    "write_rows",
    "wrote",
]

PIPED_CONSOLE_WIDTH = 150  # wide enough for one line per run when stderr goes to a log file
FIGURE_DPI = 110


def stderr_console() -> Console:
    """A rich console on stderr (stdout is kept for the final JSON line).

    When stderr is not a terminal (a log file, CI), rich would fall back to 80 columns and wrap
    each per-run line; a fixed wider width keeps one line per run in the log.
    """
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=PIPED_CONSOLE_WIDTH)
    return console


def progress_bar(console: Console, remaining: bool = False) -> Progress:
    """The experiments' progress bar: description, bar, done / total, elapsed (and, for grids whose
    runs take about the same time, an estimate of the time remaining)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[ProgressColumn] = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    if remaining:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console)


def experiment_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose --help is the script's docstring: its first paragraph as the
    description and the whole text, kept verbatim, as the epilog (the docstrings list the output
    files and example command lines, which a re-wrapped help would scramble)."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc,
    )


def start_grid(out: str | Path, runs: int, rounds: int) -> tuple[Console, Path]:
    """The stderr console and the created output folder, the grid announced before the first
    (possibly slow) run so that a typo in --out or a huge grid shows at once."""
    console = stderr_console()
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]{runs} runs[/] x {rounds} rounds -> {path}")
    return console, path


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write dict rows as CSV, the columns being the first row's keys (all rows share them)."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def fmt(value: Any, spec: str = ".3f", none: str = "-") -> str:
    """Format a table cell; None and NaN (a quantity that was not measured) become `none`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def wrote(paths: Iterable[Path], wall: float) -> str:
    """The closing line of an experiment: every file written and the wall time."""
    return "wrote " + ", ".join(str(p) for p in paths) + f" in {wall:.0f} s"


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (the scripts only write files, and
    must work on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bottom_legend(
    fig: Figure, ax: Axes, fontsize: float, ncol: int | None = None, max_cols: int = 1
) -> list[str]:
    """One legend for the whole figure, below the panels, built from `ax`'s labelled artists
    (every panel draws the same series, so one panel's handles stand for all).

    `ncol` columns, or when None one per label up to `max_cols`. Returns the labels: their count
    decides how much room the caller leaves at the bottom.
    """
    handles, labels = ax.get_legend_handles_labels()
    if ncol is None:
        ncol = min(len(labels), max_cols)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=fontsize, frameon=False)
    return labels


def save_figure(fig: Figure, path: Path) -> Path:
    """Write a figure at the reports' resolution and close it (a grid makes many figures; open
    ones would keep their memory until the process ends)."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path


def finish_grid(
    console: Console,
    out: Path,
    *,
    wall: float,
    runs: int,
    tables: str,
    checks: Sequence[str] = (),
    checks_heading: str = "",
    printed: Sequence[str] = (),
    data_files: Sequence[Path] = (),
    figures: Callable[[], list[Path]] | None = None,
    result: Mapping[str, Any] | None = None,
) -> Path:
    """The common end of an experiment: `out`/summary.md (the markdown `tables`, then the `checks`
    as a bullet list under an optional heading), the figures (`figures()`, None to skip them), the
    `printed` lines and every file written on the console, and one JSON line on stdout: runs, wall
    time, output folder and the experiment's own `result` fields. Returns the summary.md path."""
    md = tables
    if checks:
        heading = f"{checks_heading}\n\n" if checks_heading else ""
        md += "\n" + heading + "\n".join(f"- {line}" for line in checks) + "\n"
    summary = out / "summary.md"
    summary.write_text(md)
    drawn = figures() if figures is not None else []
    for line in printed:
        console.print(line)
    console.print(wrote([*data_files, summary, *drawn], wall))
    print(json.dumps({"runs": runs, "wall_s": round(wall, 1), "out": str(out), **(result or {})}))
    return summary


# -- node metrics: summary, table and plots (`p2pfl report`, the testbed) ----------------------------

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "node.toml"  # read, when it lies beside a metrics file, for the run settings
MAX_LEGEND = 12  # more nodes than this: no per-node legend (it would cover the plot)
SETTING_KEYS = ("task", "partition", "topology", "rule", "rounds")


class ReportError(P2PFLError):
    """Nothing to report on: the message says what to point the report at."""


@dataclass
class NodeRun:
    """One node's metrics as found on disk, and what only a launcher knows (exit code, role)."""

    name: str
    directory: Path  # the metrics file's folder: models/round_NNNN.npy lies here when saved
    records: list[dict[str, Any]]
    config: dict[str, Any]  # the node.toml beside the metrics, parsed; {} when there is none
    exit_code: int | None = None  # None: not known (a hand-run node)
    byzantine: bool | None = None  # None: from the records' `attack` field
    alive: bool = True  # counted in the accuracy and consensus figures

    @classmethod
    def load(
        cls, directory: Path, name: str | None = None, metrics: Path | None = None, **known: Any
    ) -> NodeRun:
        """Read `directory`/metrics.jsonl (or `metrics`) and the node.toml beside it; the name is
        `name`, else the one the node wrote in its records, else the folder's."""
        records = read_jsonl(metrics or directory / METRICS_FILE)
        written = next((r["node"] for r in reversed(records) if isinstance(r.get("node"), str)), None)
        return cls(name or written or directory.name, directory, records, _read_config(directory), **known)

    @property
    def is_byzantine(self) -> bool:
        if self.byzantine is not None:
            return self.byzantine
        return any(r.get("attack") for r in self.records)


def _read_config(directory: Path) -> dict[str, Any]:
    """The node.toml beside a metrics file, or {} (absent, unreadable: the records may say enough)."""
    try:
        return tomllib.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}


def _natural_key(name: str) -> list[Any]:
    """node-2 before node-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def find_node_runs(root: Path, pattern: str = METRICS_FILE) -> list[NodeRun]:
    """Every node's metrics under `root` (a folder tree, or one metrics file), sorted by name; two
    files that name the same node keep apart as name (folder). Raises ReportError when there is none."""
    hint = (
        "point it at a testbed run (runs/testbed-...), at one node's data_dir, or at a folder holding "
        f"several nodes' data dirs (each node writes <data_dir>/{METRICS_FILE})"
    )
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = [
            Path(folder) / f
            for folder, dirs, names in sorted(os.walk(root))  # symlinked folders are not followed
            for f in sorted(names)
            if fnmatch.fnmatch(f, pattern)
        ]
    else:
        raise ReportError(f"{root} does not exist; {hint}")
    if not files:
        raise ReportError(f"no {pattern} under {root}; {hint}")
    runs = [NodeRun.load(f.parent, metrics=f) for f in files]
    if not any(r.records for r in runs):
        listed = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise ReportError(f"{listed}: no round record yet (a node writes one per finished round)")
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({run.directory.relative_to(root) if root.is_dir() else run.directory})"
    return sorted(runs, key=lambda r: _natural_key(r.name))


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _growth(records: list[dict[str, Any]], value: Callable[[dict[str, Any]], float]) -> list[float]:
    """Per record, what a counter (`value` of the record) grew by since the previous record. The
    counters start at 0 in every node process: a record with `settings` (a process's first) or a
    drop starts afresh, so a restarted node's totals add up over its lifetimes."""
    grown: list[float] = []
    previous = 0.0
    for r in records:
        current = value(r)
        grown.append(current if "settings" in r or current < previous else current - previous)
        previous = current
    return grown


def _counter(key: str) -> Callable[[dict[str, Any]], float]:
    return lambda r: _number(r.get(key)) or 0.0


def _rejected_total(records: list[dict[str, Any]]) -> dict[str, int]:
    """Refusals per reason over every process lifetime."""

    def table(r: dict[str, Any]) -> dict[str, Any]:
        rejected = r.get("rejected")
        return rejected if isinstance(rejected, dict) else {}

    def count(reason: str) -> Callable[[dict[str, Any]], float]:
        return lambda r: _number(table(r).get(reason)) or 0.0

    reasons = sorted({k for r in records for k in table(r)})
    return {reason: int(sum(_growth(records, count(reason)))) for reason in reasons}


def _by_round(records: list[dict[str, Any]], values: list[Any]) -> dict[int, Any]:
    """`values` (one per record) keyed by round; a round written twice keeps its last value."""
    out: dict[int, Any] = {}
    for r, v in zip(records, values, strict=True):
        round_ = r.get("round")
        if isinstance(round_, int) and not isinstance(round_, bool):
            out[round_] = v
    return dict(sorted(out.items()))


def node_summary(run: NodeRun) -> dict[str, Any]:
    """One node's figures: final and best accuracy, rounds, refusals and bytes (summed over
    restarts), and per-round series for the plots."""
    m = run.records
    last = m[-1] if m else {}
    rejected = _rejected_total(m)
    sent, received = _growth(m, _counter("bytes_out")), _growth(m, _counter("bytes_in"))
    accuracy = _by_round(m, [_number(r.get("accuracy")) for r in m])
    round_s = _by_round(m, [_number(r.get("round_s")) for r in m])
    sent_by_round: dict[int, float] = {}
    for r, grown in zip(m, sent, strict=True):
        if isinstance(r.get("round"), int):
            sent_by_round[r["round"]] = sent_by_round.get(r["round"], 0.0) + grown
    epsilon = _by_round(m, [_number(r.get("epsilon")) for r in m])
    accs = [a for a in accuracy.values() if a is not None]
    times = [t for t in round_s.values() if t is not None]
    return {
        "name": run.name,
        "directory": str(run.directory),
        "byzantine": run.is_byzantine,
        "alive_at_end": run.alive,
        "final_accuracy": _number(last.get("accuracy")),
        "best_accuracy": max(accs) if accs else None,
        "rounds_completed": max(accuracy, default=0),
        "mean_round_s": float(np.mean(times)) if times else None,
        "rejected": int(sum(rejected.values())),
        "rejected_by_reason": rejected,
        "bytes_sent": int(sum(sent)),
        "bytes_received": int(sum(received)),
        "epsilon": _number(last.get("epsilon")),
        "exit_code": run.exit_code,
        "rounds": list(accuracy),
        "accuracy_by_round": list(accuracy.values()),
        "round_s_by_round": [round_s.get(r) for r in accuracy],
        "bytes_sent_by_round": [int(sent_by_round.get(r, 0.0)) for r in accuracy],
        "epsilon_by_round": [epsilon.get(r) for r in accuracy] if any(epsilon.values()) else [],
    }


def _load_model(path: Path) -> np.ndarray | None:
    """A saved model (flat .npy, never unpickled), or None if missing or cut short by a kill."""
    try:
        return np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
    except (OSError, ValueError, EOFError):
        return None


def consensus_by_round(directories: Sequence[Path], rounds: int) -> tuple[list[float | None], list[int]]:
    """Per round: mean squared distance of the nodes' saved models from their average, over the
    nodes that saved a readable model for that round (None when fewer than 2 did), and how many did."""
    distances: list[float | None] = []
    counts: list[int] = []
    for r in range(1, rounds + 1):
        loaded = [_load_model(d / "models" / f"round_{r:04d}.npy") for d in directories]
        models = [m for m in loaded if m is not None]
        if len({m.shape for m in models}) > 1:
            models = []
        counts.append(len(models))
        if len(models) < 2:
            distances.append(None)
            continue
        stack = np.stack(models)
        distances.append(float(np.mean(np.sum((stack - stack.mean(axis=0)) ** 2, axis=1))))
    return distances, counts


def _settings(runs: Sequence[NodeRun]) -> dict[str, Any]:
    """The run settings the nodes agree on (from the records' `settings`, else node.toml); a
    setting the nodes differ on lists every value, "a / b"."""
    values: dict[str, list[Any]] = {k: [] for k in SETTING_KEYS}
    for run in runs:
        written: dict[str, Any] = next(
            (r["settings"] for r in reversed(run.records) if isinstance(r.get("settings"), dict)), {}
        )
        cfg = run.config
        from_toml = {
            "task": cfg.get("task", {}).get("name"),
            "partition": cfg.get("task", {}).get("partition"),
            "topology": cfg.get("gossip", {}).get("topology"),
            "rule": cfg.get("gossip", {}).get("rule"),
            "rounds": cfg.get("training", {}).get("rounds"),
        }
        for key in SETTING_KEYS:
            value = written.get(key, from_toml[key])
            if value is not None and value not in values[key]:
                values[key].append(value)
    settings: dict[str, Any] = {"nodes": len(runs)}
    for key, seen in values.items():
        settings[key] = None if not seen else seen[0] if len(seen) == 1 else " / ".join(map(str, seen))
    return settings


def run_title(settings: Mapping[str, Any]) -> str:
    """One line for plot titles and the table caption: '4 nodes, topology ring, rule robust, ...'."""
    parts = [f"{settings.get('nodes', '?')} nodes"]
    for key in ("topology", "rule", "task", "partition"):
        if settings.get(key) is not None:
            parts.append(f"{key} {settings[key]}")
    rounds = settings.get("rounds")
    if rounds is not None:
        parts.append("rounds until stopped" if rounds == 0 else f"{rounds} rounds")
    return ", ".join(parts)


def _wall_s(runs: Sequence[NodeRun]) -> float | None:
    """From the records' wall-clock stamps: first round's start to the last round's end."""
    ends = [t for run in runs for r in run.records if (t := _number(r.get("time"))) is not None]
    starts = [
        t - (_number(r.get("round_s")) or 0.0)
        for run in runs
        for r in run.records
        if (t := _number(r.get("time"))) is not None
    ]
    return max(ends) - min(starts) if ends else None


def summarize(
    runs: Sequence[NodeRun],
    *,
    rounds: int = 0,
    wall_s: float | None = None,
    faults: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The run's summary (summary.json). Accuracy and consensus are over the honest nodes alive at
    the end: a killed or silent node's stale last round must not enter them; every node is listed.
    Consensus runs to `rounds` or the furthest round a counted node reached."""
    nodes = [node_summary(run) for run in runs]
    counted = [n for n in nodes if n["alive_at_end"] and not n["byzantine"]]
    accs = [n["final_accuracy"] for n in counted if n["final_accuracy"] is not None]
    horizon = max([rounds] + [n["rounds_completed"] for n in counted])
    members = [run.directory for run, n in zip(runs, nodes, strict=True) if n in counted]
    cd, counts = consensus_by_round(members, horizon)
    full = [d for d, c in zip(cd, counts, strict=True) if d is not None and c == len(members)]
    known = full or [d for d in cd if d is not None]
    return {
        "settings": _settings(runs),
        "nodes": nodes,
        "alive_at_end": sorted(n["name"] for n in nodes if n["alive_at_end"]),
        "mean_accuracy": float(np.mean(accs)) if accs else None,
        "min_accuracy": float(np.min(accs)) if accs else None,
        "accuracy_spread": float(np.max(accs) - np.min(accs)) if accs else None,
        "consensus_distance": {
            "first": known[0] if known else None,
            "last": known[-1] if known else None,
            "by_round": cd,
            "nodes_by_round": counts,
        },
        "faults": faults or [],
        "wall_s": wall_s if wall_s is not None else _wall_s(runs),
        "bytes_sent_total": int(sum(n["bytes_sent"] for n in nodes)),
    }


def _size(count: float) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1e5 else f"{count / 1e3:.1f} kB"


def summary_table(summary: Mapping[str, Any], title: str = "p2pfl report") -> Table:
    """The summary as a rich table: one row per node, the run's figures in the caption."""
    from rich.table import Table

    nodes = summary["nodes"]
    dp = any(n.get("epsilon") is not None for n in nodes)
    exits = any(n.get("exit_code") is not None for n in nodes)
    table = Table(title=f"{title}: {run_title(summary.get('settings') or {'nodes': len(nodes)})}")
    columns = ["node", "final acc", "best acc", "rounds", "s/round", "rejected", "MB sent", "MB recv"]
    for col in columns + (["epsilon"] if dp else []) + (["exit"] if exits else []):
        table.add_column(col, justify="left" if col == "node" else "right")
    for n in nodes:
        tags = (" (byzantine)" if n["byzantine"] else "") + ("" if n["alive_at_end"] else " (down)")
        row = [
            n["name"] + tags,
            fmt(n["final_accuracy"], ".4f"),
            fmt(n.get("best_accuracy"), ".4f"),
            str(n["rounds_completed"]),
            fmt(n.get("mean_round_s"), ".2f"),
            str(n["rejected"]),
            f"{n['bytes_sent'] / 1e6:.2f}",
            f"{n.get('bytes_received', 0) / 1e6:.2f}",
        ]
        row += [fmt(n.get("epsilon"), ".2f")] if dp else []
        row += [fmt(n.get("exit_code"), "d")] if exits else []
        table.add_row(*row)
    cd = summary["consensus_distance"]
    wall = summary.get("wall_s")
    table.caption = (
        f"honest live nodes: mean acc {fmt(summary['mean_accuracy'], '.4f')}, min {fmt(summary['min_accuracy'], '.4f')}, "
        f"spread {fmt(summary['accuracy_spread'], '.4f')}; consensus distance "
        + (
            f"first {cd['first']:.3g} -> last {cd['last']:.3g}"
            if cd["last"] is not None
            else "- (no saved models)"
        )
        + f"; wall {fmt(wall, '.1f')} s; sent {_size(summary['bytes_sent_total'])}"
        + (f"; faults {len(summary['faults'])}" if summary.get("faults") else "")
    )
    return table


def _node_lines(ax: Axes, nodes: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0) -> None:
    """One line per node over its rounds; Byzantine nodes dashed, nodes down at the end dotted."""
    for n in nodes:
        points = [(r, v * scale) for r, v in zip(n["rounds"], n[key], strict=False) if v is not None]
        if not points:
            continue
        style = "--" if n["byzantine"] else ":" if not n["alive_at_end"] else "-"
        ax.plot(*zip(*points, strict=True), ls=style, lw=1.0, alpha=0.85, label=n["name"])


def _figure(summary: Mapping[str, Any], heading: str) -> tuple[Figure, Axes]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    fig.suptitle(heading, fontsize=12)
    ax.set_title(run_title(summary.get("settings") or {}), fontsize=9)
    return fig, ax


def _finish(
    fig: Figure, ax: Axes, nodes: Sequence[Mapping[str, Any]], path: Path, xlabel: str = "round"
) -> Path:
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False)
    if 0 < len(nodes) <= MAX_LEGEND and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", ncol=2 if len(nodes) > 6 else 1)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_report(summary: Mapping[str, Any], out: Path) -> list[Path]:
    """accuracy.png, consensus.png (when models were saved), round_time.png and bytes.png in `out`,
    each titled with the run settings; fault events are grey dotted lines on the accuracy plot."""
    nodes = summary["nodes"]
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    fig, ax = _figure(summary, "Test accuracy per node")
    _node_lines(ax, nodes, "accuracy_by_round")
    for f in summary.get("faults") or []:
        if isinstance(f.get("at_round"), int | float):
            ax.axvline(f["at_round"], color="grey", lw=0.8, ls=":")
    ax.set_ylabel("test accuracy (local test split)")
    written.append(_finish(fig, ax, nodes, out / "accuracy.png"))

    cd = [(i + 1, d) for i, d in enumerate(summary["consensus_distance"]["by_round"]) if d]
    if cd:
        fig, ax = _figure(summary, "Consensus distance (honest live nodes)")
        ax.semilogy(*zip(*cd, strict=True), marker=".", color="C0")
        ax.set_ylabel("mean squared distance from the average model")
        written.append(_finish(fig, ax, [], out / "consensus.png"))

    fig, ax = _figure(summary, "Round time per node")
    _node_lines(ax, nodes, "round_s_by_round")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("seconds (train, exchange, wait, mix, evaluate)")
    written.append(_finish(fig, ax, nodes, out / "round_time.png"))

    fig, ax = _figure(summary, "Bytes sent per round per node")
    most = max((b for n in nodes for b in n["bytes_sent_by_round"]), default=0)
    unit, scale = ("MB", 1e-6) if most >= 1e6 else ("kB", 1e-3)
    _node_lines(ax, nodes, "bytes_sent_by_round", scale=scale)
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"{unit} sent (updates to all neighbours)")
    written.append(_finish(fig, ax, nodes, out / "bytes.png"))
    return written
