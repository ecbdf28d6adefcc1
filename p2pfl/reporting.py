"""Reporting helpers shared by the experiment scripts (scripts/*_experiment.py).

The experiments run a grid of simulations and report it the same way: --help from the script's
docstring, a rich progress bar on stderr, CSV files of rows, markdown tables with numbers formatted
the same, and matplotlib figures written as PNG files. Keeping those pieces here means every experiment's output looks alike and a fix to,
say, the piped-console width applies to all of them. rich and matplotlib are imported lazily, so
importing this module costs nothing for code that only formats numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from rich.console import Console
    from rich.progress import Progress

__all__ = [
    "FIGURE_DPI",
    "PIPED_CONSOLE_WIDTH",
    "bottom_legend",
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
