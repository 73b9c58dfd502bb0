"""``python -m metaopt.evaluate``: see :mod:`metaopt.evaluate.cli`."""

import sys

from metaopt.evaluate.cli import main

sys.exit(main())
