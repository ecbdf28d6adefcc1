"""The fault lab: schedule parser, trigger logic, summary robustness, and the testbed's process handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from p2pfl import testbed
from p2pfl.faultlab import LAB_PREFIX, netns_unavailable
from p2pfl.faults import (
    FaultError,
    FaultEvent,
    Scheduler,
    check_schedule,
    frontier,
    last_round,
    parse_duration,
    parse_netem,
    parse_schedule,
)

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 180  # node processes import torch and find each other by mDNS on a loaded 2-core machine

# -- the parser ---------------------------------------------------------------------------------------


def test_parses_every_action_of_the_issue_example() -> None:
    events = parse_schedule(
        "kill node-2@r20; restart node-2@r30; freeze node-3@r40 for 60s; "
        "partition 0-2|3-5@r60 for 60s; join node-6@r80"
    )
    assert [(e.action, e.at_round, e.node, e.duration_s) for e in events] == [
        ("kill", 20, 2, None),
        ("restart", 30, 2, None),
        ("freeze", 40, 3, 60.0),
        ("partition", 60, None, 60.0),
        ("join", 80, 6, None),
    ]
    assert events[3].sides == ((0, 1, 2), (3, 4, 5))
    assert events[3].target == "0,1,2|3,4,5"
    assert events[2].clause == "freeze node-3@r40 for 60s"


def test_parser_is_lenient_about_spacing_and_forms() -> None:
    events = parse_schedule("  freeze   3 @ r0 ;partition node-0,4|1-3 @r5 for 1.5m;; ")
    assert events[0] == FaultEvent("freeze", 0, node=3, clause="freeze 3 @ r0")
    assert events[1].sides == ((0, 4), (1, 2, 3)) and events[1].duration_s == 90.0
    assert parse_schedule("") == []


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("kil node-2@r3", "unknown action 'kil'"),
        ("kill node-2", "expected 'ACTION TARGET@rN"),
        ("kill node-2@20", "expected 'ACTION TARGET@rN"),
        ("kill node-x@r2", "'node-x' is not a node"),
        ("kill node-2@r2 for 5s", "only freeze and partition take"),
        ("freeze node-2@r2 for soon", "duration 'soon'"),
        ("freeze node-2@r2 for 0s", "duration '0s'"),
        ("partition 0-2@r2", "at least two sides"),
        ("partition 0-2|2-3@r2", "more than one side"),
        ("partition 3-1|4@r2", "runs backwards"),
        ("partition 0,|1@r2", "empty node"),
    ],
)
def test_a_bad_clause_gives_one_line_naming_it(text: str, needle: str) -> None:
    with pytest.raises(FaultError) as info:
        parse_schedule(f"kill node-0@r1; {text}")
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
    assert "node-0@r1" not in message  # the good clause is not blamed


def test_durations() -> None:
    assert parse_duration("60s") == 60.0
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2m") == 120.0
    assert parse_duration("3") == 3.0
    for bad in ("", "-1s", "1d", "s"):
        with pytest.raises(FaultError):
            parse_duration(bad)


def test_schedule_is_checked_against_the_run() -> None:
    check_schedule(parse_schedule("join node-4@r3; join node-5@r4; kill node-5@r6"), 4, netns=False)
    bad = {
        "join node-5@r3": "node-4 onwards without gaps",
        "kill node-7@r3": "node-7 does not exist",
        "partition 0|1@r3": "needs --netns",
        "join node-4@r3; join node-4@r5": "joins twice",
        "kill node-4@r2; join node-4@r5": "has not joined by round 2",
    }
    for text, needle in bad.items():
        with pytest.raises(FaultError, match=needle):
            check_schedule(parse_schedule(text), 4, netns=False)
    check_schedule(parse_schedule("partition 0|1@r3"), 4, netns=True)


def test_netem_specs_become_tc_arguments() -> None:
    got = parse_netem(["delay=20ms/5ms,loss=1%,rate=10mbit", "node-2:delay=100ms"], 3)
    assert got == {
        0: ["delay", "20ms", "5ms", "loss", "1%", "rate", "10mbit"],
        1: ["delay", "20ms", "5ms", "loss", "1%", "rate", "10mbit"],
        2: ["delay", "100ms"],
    }
    assert parse_netem(["node-1:loss=5%"], 3) == {1: ["loss", "5%"]}
    for bad, needle in [
        ("delay=fast", "bad value"),
        ("jitter=1ms", "KEY=VALUE"),
        ("node-9:loss=1%", "node-9"),
    ]:
        with pytest.raises(FaultError, match=needle):
            parse_netem([bad], 3)


# -- when events fire -----------------------------------------------------------------------------------


def rows(*rounds: int) -> list[dict[str, Any]]:
    return [{"round": r, "accuracy": 0.5} for r in rounds]


def test_frontier_is_the_most_advanced_live_node() -> None:
    metrics = {"node-0": rows(1, 2, 3), "node-1": rows(1, 2, 3, 4, 5), "node-2": rows(1, 2)}
    finished = {name: last_round(r) for name, r in metrics.items()}
    assert frontier(finished, {"node-0", "node-1", "node-2"}) == 5
    assert frontier(finished, {"node-0", "node-2"}) == 3  # node-1 is dead: its round does not count
    assert frontier(finished, set()) == 0
    assert last_round([{"round": 3}, {"round": "4"}, {"x": 1}, {"round": True}]) == 3


def test_scheduler_fires_starts_by_round_and_ends_by_time() -> None:
    events = parse_schedule(
        "kill node-2@r20; freeze node-3@r10 for 60s; restart node-2@r30; freeze node-1@r0; join node-4@r20"
    )
    s = Scheduler(events)
    started = [(x.event.action, x.event.node, x.phase) for x in s.due(0, now=0.0)]
    assert started == [("freeze", 1, "start")]  # @r0: right away; no duration: never thawed
    assert s.due(9, now=5.0) == []
    assert [(x.event.node, x.phase) for x in s.due(12, now=100.0)] == [(3, "start")]
    assert s.ends_pending()
    # round 25 reached (the frontier may jump several rounds between polls): both @r20 events, written order
    assert [(x.event.action, x.phase) for x in s.due(25, now=130.0)] == [("kill", "start"), ("join", "start")]
    assert [(x.event.action, x.phase) for x in s.due(25, now=160.0)] == [("freeze", "end")]
    assert not s.ends_pending()
    assert [e.clause for e in s.unfired()] == ["restart node-2@r30"]
    assert [(x.event.action, x.phase) for x in s.due(31, now=170.0)] == [("restart", "start")]
    assert s.unfired() == [] and s.due(99, now=999.0) == []


def test_scheduler_on_synthetic_metrics_files(tmp_path: Path) -> None:
    """The testbed's incremental reader feeds the trigger: a half-written line waits, a restart resets."""
    path = tmp_path / "metrics.jsonl"
    tail = testbed.MetricsTail(path)
    assert tail.refresh() == []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(1, 2)) + '{"round": 3, "acc')
    s = Scheduler(parse_schedule("kill node-0@r3"))
    assert last_round(tail.refresh()) == 2 and s.due(last_round(tail.records), 0.0) == []
    with path.open("a") as fh:
        fh.write('uracy": 0.5}\n')
    assert last_round(tail.refresh()) == 3
    assert [x.event.action for x in s.due(last_round(tail.records), 0.0)] == ["kill"]
    path.write_text(json.dumps({"round": 1}) + "\n")  # a restarted node starts a fresh file
    assert last_round(tail.refresh()) == 1


# -- the summary --------------------------------------------------------------------------------------


def fake_node(out: Path, name: str, models: list[np.ndarray], exit_code: int | None, tail: str = "") -> Any:
    directory = out / name
    (directory / "models").mkdir(parents=True)
    lines = [
        json.dumps({"round": r + 1, "accuracy": 0.5 + 0.1 * r, "bytes_out": 10}) for r in range(len(models))
    ]
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)
    for r, m in enumerate(models, start=1):
        np.save(directory / "models" / f"round_{r:04d}.npy", m.astype(np.float32))
    return SimpleNamespace(name=name, directory=directory, proc=SimpleNamespace(returncode=exit_code))


def test_summary_leaves_out_a_dead_node_and_skips_a_truncated_line(tmp_path: Path) -> None:
    a = [np.zeros(4), np.ones(4), np.full(4, 2.0)]
    b = [np.ones(4), np.full(4, 3.0), np.full(4, 2.0)]
    procs = [
        fake_node(tmp_path, "node-0", a, 0),
        fake_node(tmp_path, "node-1", b, 0, tail='{"round": 4, "accuracy": 0.9'),  # kill -9 mid-write
        fake_node(tmp_path, "node-2", [np.full(4, 100.0)], -9),  # killed after round 1: stale model
    ]
    (tmp_path / "node-0" / "models" / "round_0004.npy").write_bytes(b"\x93NUMPY trunc")  # cut short
    summary = testbed.summarize(procs, 3, 1.0, [], alive={"node-0", "node-1"}, faults=[{"action": "kill"}])
    by_name = {n["name"]: n for n in summary["nodes"]}
    assert by_name["node-1"]["rounds_completed"] == 3  # the truncated 4th line is skipped
    assert by_name["node-2"]["alive_at_end"] is False and by_name["node-2"]["exit_code"] == -9
    assert summary["alive_at_end"] == ["node-0", "node-1"]
    assert summary["mean_accuracy"] == pytest.approx(0.7)  # node-2's 0.5 does not enter
    cd = summary["consensus_distance"]
    assert cd["by_round"] == pytest.approx([1.0, 4.0, 0.0])  # node-2's stale round 1 does not enter
    assert cd["nodes_by_round"] == [2, 2, 2]
    assert cd["first"] == pytest.approx(1.0) and cd["last"] == pytest.approx(0.0)
    assert summary["faults"] == [{"action": "kill"}]
    json.dumps(summary)


def test_summary_with_no_metrics_at_all(tmp_path: Path) -> None:
    (tmp_path / "node-0").mkdir()
    proc = SimpleNamespace(name="node-0", directory=tmp_path / "node-0", proc=SimpleNamespace(returncode=1))
    summary = testbed.summarize([proc], 5, 1.0, [])  # type: ignore[list-item]
    assert summary["nodes"][0]["rounds_completed"] == 0 and summary["mean_accuracy"] is None
    assert summary["consensus_distance"]["last"] is None


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--rounds", "-1"], "--rounds: must be >= 0"),
        (["--round-timeout", "0"], "--round-timeout: must be a finite number > 0"),
        (["--topology", "rign"], "unknown topology 'rign'; known: ring"),
        (["--alpha", "-1"], "--alpha"),
        (["--nodes", "0"], "--nodes: must be >= 2"),
        (["--nodes", "1"], "--nodes: must be >= 2"),
        (["--nodes", "x"], "'x' is not an integer"),
        (["--fault", "kill node-2@r5 for 3s"], "only freeze and partition"),
        (["--fault", "partition 0|1@r3"], "needs --netns"),
    ],
)
def test_bad_input_ends_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        testbed.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


# -- real processes -----------------------------------------------------------------------------------


def processes_mentioning(text: str, exclude: int = -1) -> list[int]:
    """Pids whose command line contains `text` (our unique out dir), read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (exclude, os.getpid()):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_sigkilled_testbed_leaves_no_node_running(tmp_path: Path) -> None:
    out = tmp_path / "orphans"
    cmd = [sys.executable, str(ROOT / "scripts" / "testbed.py"), "--nodes", "3", "--rounds", "1000",
           "--wait", str(WAIT_S), "--out", str(out)]  # fmt: skip
    bed = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(processes_mentioning(str(out), exclude=bed.pid)) >= 3, 120, "3 node processes")
        bed.kill()
        bed.wait(timeout=30)
        wait_until(
            lambda: not processes_mentioning(str(out)), 30, "every node gone after the testbed was killed"
        )
    finally:
        if bed.poll() is None:
            bed.kill()
        for pid in processes_mentioning(str(out), exclude=bed.pid):  # only if the test failed: ours only
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_and_freeze_fire_at_their_rounds_and_are_recorded(tmp_path: Path) -> None:
    """Events fire once the frontier reaches their round and land in summary.json; recovery is not
    asserted here (that is the node's business)."""
    out = tmp_path / "faults"
    testbed.main(
        ["--nodes", "4", "--rounds", "8", "--round-timeout", "5", "--wait", str(WAIT_S), "--out", str(out),
         "--timeout", "400", "--fault", "freeze node-1@r2 for 5s; kill node-3@r3"]
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    faults = summary["faults"]
    # the kill and the thaw race (the frozen node stalls its neighbours' round 3 until the timeout)
    assert sorted((f["action"], f["node"]) for f in faults) == [
        ("freeze", "node-1"),
        ("kill", "node-3"),
        ("thaw", "node-1"),
    ]
    freeze, kill, thaw = (next(f for f in faults if f["action"] == a) for a in ("freeze", "kill", "thaw"))
    assert faults[0] is freeze
    assert freeze["at_round"] >= 2 and kill["at_round"] >= 3
    assert thaw["elapsed_s"] - freeze["elapsed_s"] >= 4.9  # elapsed_s: monotonic clock, rounded to ms
    assert all(f["clause"] for f in faults) and summary["faults_not_fired"] == []
    nodes = {n["name"]: n for n in summary["nodes"]}
    assert nodes["node-3"]["exit_code"] == -signal.SIGKILL and not nodes["node-3"]["alive_at_end"]
    assert "node-3" not in summary["alive_at_end"]


def netns_reason() -> str | None:
    why = netns_unavailable()
    if why:
        return why
    name = f"{LAB_PREFIX}{os.getpid()}-probe"
    done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`ip netns add` fails here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_netns_nodes_find_each_other_and_train(tmp_path: Path) -> None:
    why = netns_reason()
    if why:
        pytest.skip(why)
    out = tmp_path / "netns"
    rc = testbed.main(
        [
            "--nodes",
            "3",
            "--rounds",
            "4",
            "--wait",
            str(WAIT_S),
            "--round-timeout",
            "20",
            "--netns",
            "--out",
            str(out),
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0, summary
    for n in summary["nodes"]:
        assert n["rounds_completed"] == 4
        rows_ = testbed.read_metrics(out / n["name"] / "metrics.jsonl")
        assert rows_[-1]["members"] == 3  # mDNS worked across namespaces
    config = (out / "node-1" / "node.toml").read_text()
    assert 'host = "10.213.' in config
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if n.startswith(f"{LAB_PREFIX}{os.getpid()}-")]  # fmt: skip
