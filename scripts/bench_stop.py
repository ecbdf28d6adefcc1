#!/usr/bin/env python3
"""How fast real node processes stop on SIGTERM, over many trials (a federation must never ignore it).

Each trial starts a small federation with the testbed's own helpers (real processes, mDNS, MQTT,
crypto on 127.0.0.1), waits until every node has finished at least two rounds, waits a random extra
moment (so the signal lands in every phase of a round: training, sealing, waiting, mixing), sends
SIGTERM to every node at once, and times each node's exit. The baseline in the same run is a plain
`python -c` process that sleeps and exits on SIGTERM: what stopping costs without a node.

    python scripts/bench_stop.py [--trials 25] [--nodes 4] [--limit-s 5]

Prints one line per trial and a summary, then one JSON line (last).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from p2pfl import testbed

SETUP_CEILING_S = 180.0  # a trial's federation must have run 2 rounds by then (loaded 2-core machine)
EXIT_CEILING_S = 30.0  # after this a node counts as not stopped (then SIGKILLed)


def wait_for_rounds(procs: list[testbed.NodeProcess], rounds: int) -> None:
    deadline = time.monotonic() + SETUP_CEILING_S
    while not all(len(p.metrics) >= rounds for p in procs):
        if time.monotonic() > deadline or any(p.proc.poll() is not None for p in procs):
            raise RuntimeError("the federation did not run its first rounds")
        time.sleep(0.1)


def time_exits(procs: list[testbed.NodeProcess]) -> list[tuple[float, int | None]]:
    """SIGTERM every node at once; (seconds to exit, exit status) per node."""
    sent = time.monotonic()
    for p in procs:
        p.proc.send_signal(signal.SIGTERM)
    out = []
    for p in procs:
        try:
            code: int | None = p.proc.wait(timeout=max(0.0, sent + EXIT_CEILING_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        out.append((time.monotonic() - sent, code))
    return out


def baseline_stop_s() -> float:
    """A bare Python process that exits on SIGTERM: the floor of what a stop costs."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.readline()
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    return time.monotonic() - sent


def trial(index: int, nodes: int, rng: random.Random) -> list[tuple[float, int | None]]:
    with tempfile.TemporaryDirectory(prefix=f"bench_stop-{index}-") as tmp:
        out = Path(tmp)
        args = testbed.parse_args(["--nodes", str(nodes), "--rounds", "100000", "--out", str(out)])
        procs = testbed.launch(testbed.prepare(args, out))
        try:
            wait_for_rounds(procs, 2)
            time.sleep(rng.uniform(0.0, 1.0))
            return time_exits(procs)
        finally:
            testbed.stop_all(procs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=25)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--limit-s", type=float, default=5.0, help="a node must exit within this")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not (1 <= a.trials <= 500 and 2 <= a.nodes <= 16):
        ap.error("--trials must be 1..500 and --nodes 2..16")
    rng = random.Random(a.seed)
    base = statistics.median(baseline_stop_s() for _ in range(5))
    stops: list[float] = []
    failed = 0
    began = time.monotonic()
    for i in range(a.trials):
        result = trial(i, a.nodes, rng)
        stops += [s for s, code in result if code is not None]
        late = [(s, code) for s, code in result if code is None or s > a.limit_s]
        failed += len(late)
        print(
            f"trial {i + 1:3d}: exits {' '.join(f'{s:.2f}s/{code}' for s, code in result)}", file=sys.stderr
        )
    total = a.trials * a.nodes
    print(f"\n{total} node stops: {total - failed} within {a.limit_s:g} s; median {statistics.median(stops):.2f} s, "
          f"max {max(stops):.2f} s; bare python process {base:.3f} s")  # fmt: skip
    print(json.dumps({
        "node_stops": total, "within_limit": total - failed, "limit_s": a.limit_s,
        "median_s": round(statistics.median(stops), 3), "max_s": round(max(stops), 3),
        "baseline_bare_process_s": round(base, 4), "ratio_median_to_baseline": round(statistics.median(stops) / base, 1),
        "wall_s": round(time.monotonic() - began, 1),
    }))  # fmt: skip
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
