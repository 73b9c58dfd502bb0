"""``python -m metaopt.bench``: see :mod:`metaopt.bench`."""

import sys

from metaopt.bench import main

sys.exit(main())
