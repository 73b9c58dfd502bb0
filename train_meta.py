"""Meta-train a learned optimizer: ``python train_meta.py --help``. The logic lives in :mod:`metaopt.meta.cli`."""

import sys

from metaopt.meta.cli import main

if __name__ == "__main__":
    sys.exit(main())
