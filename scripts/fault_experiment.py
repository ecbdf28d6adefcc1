"""Fault experiment: how a 6-node federation of real processes rides out restarts, freezes,
partitions, late joins and a silent member, against a fault-free baseline.

Each scenario is one testbed run (`scripts/testbed.py --fault ...`, digits-mlp, ring or exponential);
they run one after another. Per scenario it reports the median round time before / during / after
the fault, how many rounds after the fault it takes until the round time is back within 2x of before,
how many until the consensus distance (from the nodes' saved models, over the nodes alive at the end)
is back at or below its pre-fault level, and the final accuracy of the affected node(s) and of the
others. A scenario that does not get there within its run says "not recovered"; every run is bounded
by --scenario-timeout, so a stalled federation (one round per round timeout) cannot hang the script.

Scenarios: baseline; restart (kill node-2 at the fault round, restart it --restart-after rounds later);
freeze (SIGSTOP node-2 for --freeze-s); partition (split the bridge into two halves for --partition-s;
needs --netns, so root and iproute2); join (N-1 nodes start, the N-th joins at --join-round); silent
(a certified member that stays connected but never sends an update, testbed --silent 1, for the
whole run; its "before" is the baseline's).

Writes OUT/fault_experiment.csv, OUT/fault_experiment.md and one testbed run folder per scenario.

    python scripts/fault_experiment.py --quick          # small smoke run (a few minutes)
    python scripts/fault_experiment.py                   # full: 2000 rounds, faults at 100, join at 500
    python scripts/fault_experiment.py --scenarios baseline,freeze --freeze-s 30 --topology exponential
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pfl.faultlab import netns_unavailable
from p2pfl.reporting import fmt, write_rows
from p2pfl.testbed import read_metrics

TESTBED = Path(__file__).resolve().parent / "testbed.py"
SCENARIOS = ("baseline", "restart", "freeze", "partition", "join", "silent")
# A round takes ~0.07 s on this task: the federation must still be running when a 60 s fault ends
# (~850 rounds) and a restarted node is back (~15 s of start-up), with rounds left to recover.
FULL = {"rounds": 2000, "fault_round": 100, "join_round": 500, "restart_after": 10, "freeze_s": 60.0,
        "partition_s": 60.0, "round_timeout": 30.0, "wait": 120.0, "scenario_timeout": 3600.0}  # fmt: skip
QUICK = {"rounds": 500, "fault_round": 100, "join_round": 250, "restart_after": 5, "freeze_s": 10.0,
         "partition_s": 10.0, "round_timeout": 8.0, "wait": 90.0, "scenario_timeout": 420.0}  # fmt: skip
SLOWDOWN = 2.0  # "recovered" = round time back within this factor of before


@dataclass
class Scenario:
    """One run: its testbed options and which nodes the fault hits."""

    name: str
    fault: str
    nodes: int
    affected: list[str]
    netns: bool = False
    options: tuple[str, ...] = ()  # more testbed options


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    n, k = args.nodes, args.fault_round
    half = n // 2
    table = {
        "baseline": Scenario("baseline", "", n, []),
        "restart": Scenario(
            "restart", f"kill node-2@r{k}; restart node-2@r{k + args.restart_after}", n, ["node-2"]
        ),
        "freeze": Scenario("freeze", f"freeze node-2@r{k} for {args.freeze_s:g}s", n, ["node-2"]),
        "partition": Scenario(
            "partition",
            f"partition 0-{half - 1}|{half}-{n - 1}@r{k} for {args.partition_s:g}s",
            n,
            [f"node-{i}" for i in range(half, n)],
            netns=True,
        ),
        "join": Scenario("join", f"join node-{n - 1}@r{args.join_round}", n - 1, [f"node-{n - 1}"]),
        "silent": Scenario("silent", "", n, [f"node-{n - 1}"], options=("--silent", "1")),
    }
    return [table[name] for name in args.scenarios]


def run_testbed(args: argparse.Namespace, sc: Scenario, out: Path) -> int | None:
    """One bounded testbed run; None if it had to be stopped from outside."""
    cmd = [sys.executable, str(TESTBED), "--nodes", str(sc.nodes), "--rounds", str(args.rounds),
           "--topology", args.topology, "--rule", args.rule, "--task", "digits-mlp",
           "--round-timeout", str(args.round_timeout),
           "--wait", str(args.wait), "--timeout", str(args.scenario_timeout), "--seed", str(args.seed),
           "--out", str(out)]  # fmt: skip
    if sc.fault:
        cmd += ["--fault", sc.fault]
    cmd += sc.options
    if sc.netns or args.netns:
        cmd.append("--netns")
    with (out.parent / f"{sc.name}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:  # the testbed stops itself at --timeout; this margin covers setup and cleanup
            return proc.wait(timeout=args.scenario_timeout + 180)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the testbed stops its nodes and tears down its lab
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()  # its nodes get SIGTERM from the kernel (PR_SET_PDEATHSIG)
                proc.wait()
            return None


# -- analysis ------------------------------------------------------------------------------------------


@dataclass
class Rounds:
    """Per round, over the reference nodes (alive at the end, not affected): median round time and
    median wall-clock time the round ended."""

    seconds: dict[int, float]
    ended: dict[int, float]


def reference_rounds(run: Path, names: list[str]) -> Rounds:
    by_round: dict[int, list[dict[str, Any]]] = {}
    for name in names:
        for r in read_metrics(run / name / "metrics.jsonl"):
            if isinstance(r.get("round"), int) and isinstance(r.get("round_s"), int | float):
                by_round.setdefault(r["round"], []).append(r)
    seconds = {k: statistics.median(x["round_s"] for x in v) for k, v in by_round.items()}
    ended = {k: statistics.median(float(x.get("time") or 0.0) for x in v) for k, v in by_round.items()}
    return Rounds(dict(sorted(seconds.items())), ended)


def fault_window(summary: dict[str, Any], sc: Scenario) -> tuple[float, float] | None:
    """Wall-clock start and end of the fault: kill..restart, freeze..thaw, partition..heal, the join
    itself; a silent member spans the whole run. None: no fault (baseline) or it never fired."""
    faults = summary.get("faults") or []
    if sc.name == "silent":
        return (0.0, 0.0)  # silent from the start
    starts = [f["time"] for f in faults if f["action"] in ("kill", "freeze", "partition", "join")]
    ends = [f["time"] for f in faults if f["action"] in ("restart", "thaw", "heal", "join")]
    if not starts:
        return None
    return min(starts), max(ends) if ends else float("inf")


SETTLED = 10  # a recovery counts once this many rounds in a row pass


def rounds_until(values: list[tuple[int, float]], ok: Any) -> int | None:
    """How many rounds (after the fault) pass before SETTLED rounds in a row pass `ok` (fewer at the
    end of the run); None: never. One good round right after a heal or restart says little: its
    model set may lack the nodes that skipped that round number."""
    for i in range(len(values)):
        window = values[i : i + SETTLED]
        if all(ok(v) for _, v in window):
            return i
    return None


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def analyze(run: Path, sc: Scenario, baseline: dict[str, Any] | None) -> dict[str, Any]:
    """One table row from a finished run folder (and the baseline's row, for the silent member)."""
    row: dict[str, Any] = {"scenario": sc.name, "fault": sc.fault or "-"}
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {**row, "status": "no summary"}
    alive = set(summary.get("alive_at_end") or [])
    others = sorted(alive - set(sc.affected))
    rounds = reference_rounds(run, others)
    window = fault_window(summary, sc)
    cd = {i + 1: d for i, d in enumerate(summary["consensus_distance"]["by_round"]) if d is not None}
    if window is None and sc.fault:
        row["status"] = "fault never fired"
    start, end = window or (float("inf"), float("inf"))
    before = [s for r, s in rounds.seconds.items() if rounds.ended[r] <= start]
    during = [s for r, s in rounds.seconds.items() if start < rounds.ended[r] <= end]
    after = [(r, s) for r, s in rounds.seconds.items() if rounds.ended[r] > max(end, start)]
    if (
        sc.name == "silent"
    ):  # frozen from the start: no "before"; compare with the baseline, adapt from round 1
        after = list(rounds.seconds.items())
    before_s = median(before) if before else (baseline or {}).get("before_s")
    cd_before = [d for r, d in cd.items() if r in rounds.ended and rounds.ended[r] <= start][-3:]
    cd_level = median(cd_before) if cd_before else (baseline or {}).get("cd_pre")
    cd_after = [(r, cd[r]) for r, _ in after if r in cd]
    row.update(
        before_s=before_s,
        during_s=median(during),
        after_s=median([s for _, s in after]),
        rounds_to_time=_recovery(
            after, lambda s: before_s is not None and s <= SLOWDOWN * before_s, before_s
        ),
        cd_pre=cd_level,
        rounds_to_consensus=_recovery(cd_after, lambda d: cd_level is not None and d <= cd_level, cd_level),
        affected_acc=_mean_acc(summary, sc.affected),
        others_acc=_mean_acc(summary, others),
        rounds_done=max(rounds.seconds, default=0),
    )
    if not sc.fault:  # nothing to recover from
        row.update(rounds_to_time="-", rounds_to_consensus="-")
    row.setdefault("status", "ok")
    return row


def _recovery(values: list[tuple[int, float]], ok: Any, reference: float | None) -> int | str:
    if reference is None:
        return "n/a"
    if not values:
        return "not recovered"
    got = rounds_until(values, ok)
    return "not recovered" if got is None else got


def _mean_acc(summary: dict[str, Any], names: list[str]) -> float | None:
    accs = [
        n["final_accuracy"]
        for n in summary["nodes"]
        if n["name"] in names and n["final_accuracy"] is not None
    ]
    return sum(accs) / len(accs) if accs else None


# -- report --------------------------------------------------------------------------------------------

COLUMNS = [
    ("scenario", "scenario", None),
    ("status", "status", None),
    ("before_s", "round s before", ".2f"),
    ("during_s", "during", ".2f"),
    ("after_s", "after", ".2f"),
    ("rounds_to_time", "rounds to <=2x", None),
    ("cd_pre", "consensus pre", ".3g"),
    ("rounds_to_consensus", "rounds to consensus", None),
    ("affected_acc", "affected acc", ".3f"),
    ("others_acc", "others acc", ".3f"),
    ("rounds_done", "rounds", None),
]


def cell(row: dict[str, Any], key: str, spec: str | None) -> str:
    value = row.get(key)
    if spec is None or not isinstance(value, int | float):
        return "-" if value is None else str(value)
    return fmt(value, spec)


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"## {title}", "", "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    lines += ["| " + " | ".join(cell(r, k, s) for k, _, s in COLUMNS) + " |" for r in rows]
    lines += ["", "Faults: " + "; ".join(f"{r['scenario']}: `{r['fault']}`" for r in rows), ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help="small rounds, short faults and timeouts")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--nodes", type=int, default=6)
    p.add_argument("--topology", default="ring", help="ring or exponential (any testbed topology works)")
    p.add_argument(
        "--rule", default="robust", help="aggregation rule of every node (the node's default: robust)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--netns", action="store_true", help="run every scenario in network namespaces")
    p.add_argument("--out", default=None, help="default runs/faults-TIMESTAMP")
    for key, value in FULL.items():
        kind = int if isinstance(value, int) else float
        p.add_argument(
            f"--{key.replace('_', '-')}", type=kind, default=None, help=f"full {value}, quick {QUICK[key]}"
        )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    if args.nodes < 4:
        p.error("--nodes must be >= 4 (a partition needs two sides of two, the join scenario N-1 >= 3)")
    if args.join_round >= args.rounds or args.fault_round >= args.rounds:
        p.error("--fault-round and --join-round must be below --rounds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out or f"runs/faults-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    baseline: dict[str, Any] | None = None
    started = time.monotonic()
    for sc in scenarios(args):
        why = netns_unavailable() if (sc.netns or args.netns) else None
        if why:
            rows.append({"scenario": sc.name, "fault": sc.fault, "status": f"skipped: {why}"})
            print(f"[{sc.name}] skipped: {why}", flush=True)
            continue
        print(f"[{sc.name}] {sc.fault or 'no fault'} ...", flush=True)
        t0 = time.monotonic()
        code = run_testbed(args, sc, out / sc.name)
        row = analyze(out / sc.name, sc, baseline)
        if code is None:
            row["status"] = "stopped from outside"
        row["wall_s"] = round(time.monotonic() - t0, 1)
        rows.append(row)
        baseline = row if sc.name == "baseline" else baseline
        print(markdown([row], sc.name), flush=True)
    keys = ["scenario", "fault", "status", *[k for k, _, _ in COLUMNS[2:]], "wall_s"]
    write_rows(out / "fault_experiment.csv", [{k: r.get(k) for k in keys} for r in rows])
    title = (
        f"{args.nodes} nodes, {args.topology}, {args.rounds} rounds, round timeout {args.round_timeout:g} s"
    )
    (out / "fault_experiment.md").write_text(markdown(rows, title))
    print(markdown(rows, title))
    print(
        f"wrote {out / 'fault_experiment.csv'}, {out / 'fault_experiment.md'} in {time.monotonic() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
