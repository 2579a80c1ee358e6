"""``python -m misq``: the command line, also as ``torchrun --nproc-per-node K -m misq compress ...``."""

import sys

from misq.cli import main

if __name__ == "__main__":
    sys.exit(main())
