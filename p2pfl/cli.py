"""`p2pfl node | keys | federation | config | testbed`: the command line a user and the testbed share.

Only `node` and `testbed` load PyTorch: every other command, `--help` and `--version` import
nothing heavier than the key and config modules, so they answer at once. Keep heavy imports inside
the command functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from p2pfl import federation_cli, model_cli, report_cli
from p2pfl.errors import P2PFLError
from p2pfl.federation_cli import DAY, PUBLIC_KEYS

__all__ = ["DAY", "PUBLIC_KEYS", "build_parser", "main", "package_version", "setup_logging"]

DISTRIBUTION = "p2pfl-mesh"


def package_version() -> str:
    """The installed distribution's version; the source tree's when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        from p2pfl import __version__

        return __version__


def _node(args: argparse.Namespace) -> int:
    from p2pfl import config as config_mod

    cfg = config_mod.load(args.config)  # a bad config is refused before torch is even imported
    from p2pfl.node import run_node  # torch is imported only when a node really starts

    _exit_now(run_node(cfg))
    return 0  # not reached


def _exit_now(status: int) -> None:
    """End a node process without interpreter teardown: collecting torch's module graph at exit
    takes seconds, and a stopped node must be gone promptly. Everything is saved and closed by now."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _keys(args: argparse.Namespace) -> int:
    from p2pfl.identity import load_or_create

    identity = load_or_create(Path(args.data_dir))
    path = Path(args.data_dir) / PUBLIC_KEYS
    keys = {
        "node_id": identity.node_id,
        "sign_key": identity.verify_key_bytes.hex(),
        "box_key": identity.box_public_bytes.hex(),
    }
    path.write_text(json.dumps(keys, indent=1))
    print(f"node {identity.node_id}: public keys in {path}; send that file (only) to the federation admin")
    return 0


def _config(args: argparse.Namespace) -> int:
    from p2pfl import config as config_mod

    print(config_mod.to_toml(config_mod.load(None)))
    return 0


def _testbed(args: argparse.Namespace) -> int:
    from p2pfl.testbed import main as testbed_main  # imports torch: only for this command

    # every argument after `testbed` (--help included) belongs to the testbed's own parser
    return testbed_main(args.testbed_args, prog="p2pfl testbed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pfl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run one node")
    node.add_argument("--config", help="node TOML file (defaults if omitted; see `p2pfl config`)")
    node.set_defaults(func=_node)

    federation_cli.add_commands(sub)

    keys = sub.add_parser("keys", help="create this node's keys (if missing) and export its public keys")
    keys.add_argument("--data-dir", required=True, help="the node's data_dir")
    keys.set_defaults(func=_keys)

    cfg = sub.add_parser("config", help="print the default node configuration as TOML")
    cfg.set_defaults(func=_config)

    # add_help=False: `p2pfl testbed --help` reaches the testbed's parser, which lists its options
    testbed = sub.add_parser(
        "testbed", help="run N local nodes (`p2pfl testbed --help` lists the options)", add_help=False
    )
    testbed.set_defaults(func=_testbed)
    model_cli.add_commands(sub)
    report_cli.add_commands(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; the arguments after `testbed` are kept whole for the testbed's parser."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "testbed":
        args.testbed_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def setup_logging(level: str, name: str = "") -> None:
    prefix = f"[{name}] " if name else ""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("amqtt", "transitions", "zeroconf"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    command: Callable[[argparse.Namespace], int] = args.func
    try:
        return command(args)
    except P2PFLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
