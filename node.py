"""Run one p2pfl node: `python node.py --config node.toml` (same as `p2pfl node --config node.toml`)."""

import sys

from p2pfl.cli import main

if __name__ == "__main__":
    sys.exit(main(["node", *sys.argv[1:]]))
