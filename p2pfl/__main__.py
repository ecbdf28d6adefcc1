"""`python -m p2pfl ...`: the same as the `p2pfl` command."""

import sys

from p2pfl.cli import main

if __name__ == "__main__":
    sys.exit(main())
