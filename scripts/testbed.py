"""Run N real p2pfl nodes on 127.0.0.1: `python scripts/testbed.py` (4 nodes, ring, digits MLP, 20 rounds)."""

import sys

from p2pfl.testbed import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
