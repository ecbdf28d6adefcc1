"""Embed one p2pfl node in a host program: the node runs as an asyncio task beside the host's own
work, the host gets every round's metrics record through a callback, and stops the node cleanly.

Nodes are separate processes by design (each has its own broker, keys and data dir); this program
is one of them. Try it on 127.0.0.1 with a federation the testbed's code prepares:

    python examples/embed_node.py --prepare /tmp/p2pfl-demo     # 3 certified nodes, node.toml each
    p2pfl node --config /tmp/p2pfl-demo/node-0/node.toml &       # two ordinary node processes
    p2pfl node --config /tmp/p2pfl-demo/node-1/node.toml &
    python examples/embed_node.py /tmp/p2pfl-demo/node-2/node.toml --stop-after 5

The third node runs here: it prints one line per round from its callback, asks the node to stop
after round 5 (or on Ctrl-C / SIGTERM), and exits 0 once the node has saved its model and left the
mesh. The two others then finish their rounds without it (it is not waited for once it is gone).
`--prepare DIR` takes the testbed's options after DIR (e.g. `--rounds 20 --task synthetic-logreg`).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from p2pfl import config
from p2pfl.cli import setup_logging
from p2pfl.errors import P2PFLError
from p2pfl.node import Node


async def report_rounds(queue: asyncio.Queue[dict[str, Any]]) -> None:
    """The host's own consumer of round records (a dashboard, a database, an alert would go here)."""
    while True:
        record = await queue.get()
        accuracy, loss = record.get("accuracy"), record.get("train_loss")
        print(
            f"host: round {record['round']} accuracy {accuracy:.4f} train loss {loss:.4f} "
            f"in {record.get('round_s', 0):.2f} s, {len(record.get('neighbours') or {})} neighbour(s)",
            flush=True,
        )


async def run(config_path: Path, stop_after: int) -> int:
    cfg = config.load(config_path)  # the same TOML a `p2pfl node` reads; or build config.NodeConfig()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    node: Node | None = None

    def on_round(record: dict[str, Any]) -> None:
        """Called in the event loop after each round's record is written: keep it quick."""
        queue.put_nowait(record)
        if stop_after and record["round"] >= stop_after and node is not None:
            node.request_stop()  # the node finishes at its next wait, saves its model, leaves

    # Building a node loads the data and warms up torch (seconds): off the loop, so the host stays live.
    node = await asyncio.to_thread(Node, cfg, on_round=on_round)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.request_stop)
    consumer = asyncio.create_task(report_rounds(queue))
    try:
        await node.run()  # returns after the last round, or soon after request_stop()
    finally:
        while not queue.empty():  # let the consumer print the last records
            await asyncio.sleep(0)
        consumer.cancel()
    print(
        f"host: node stopped after round {node.core.round}; model in {cfg.data_dir / 'model.npz'}", flush=True
    )
    return 0


def prepare(out: Path, testbed_args: list[str]) -> int:
    """A 3-node federation on 127.0.0.1 in `out`, exactly as the testbed makes one (not started)."""
    from p2pfl.testbed import parse_args
    from p2pfl.testbed import prepare as testbed_prepare

    args = parse_args(["--nodes", "3", *testbed_args], prog="embed_node.py --prepare")
    for path in testbed_prepare(args, out):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--prepare"] and len(argv) >= 2:  # the rest are the testbed's options
        return prepare(Path(argv[1]), argv[2:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path, help="the node's TOML file")
    parser.add_argument(
        "--stop-after", type=int, default=0, help="ask the node to stop after this round (0: never)"
    )
    args = parser.parse_args(argv)
    setup_logging("WARNING")  # the host program decides how much of p2pfl's log it wants
    try:
        return asyncio.run(run(args.config, args.stop_after))
    except P2PFLError as exc:  # a bad config, missing peers, diverged training: one line, non-zero
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
