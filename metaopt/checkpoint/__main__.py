"""``python -m metaopt.checkpoint``: (re)write checkpoints' golden fingerprints and model cards
(:func:`metaopt.cards.main`; ``--help`` for the flags). A command line, so in the last layer with the cards."""

import sys

from metaopt.cards import main

if __name__ == "__main__":
    sys.exit(main())
