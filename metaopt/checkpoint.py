"""Golden fingerprints of committed checkpoints: a seeded short run whose final loss is stored beside the weights.

``checkpoints/<name>/golden.json`` records the final loss of :func:`golden_loss` when the checkpoint was made; the
test suite reruns it, so a silently changed checkpoint, update rule or task fails CI::

    python -m metaopt.checkpoint checkpoints/hyperadam      # (re)write golden.json after a deliberate change
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

GOLDEN_FILE = "golden.json"
# A 10-dimensional random quadratic (no data files needed, so CI always runs it), 20 frozen steps from seed 0.
GOLDEN_RUN = {"task": "quadratic", "dim": 10, "task_seed": 0, "seed": 0, "steps": 20}


def golden_loss(source: Any, run: dict[str, Any] | None = None) -> float:
    """Final training loss of the frozen optimizer ``source`` (a checkpoint directory, a registered name or a
    LearnedOptimizer) on :data:`GOLDEN_RUN`, through its ``torch.optim`` face exactly as users run it."""
    import meta_tasks
    from metaopt.evaluate import train

    run = dict(GOLDEN_RUN if run is None else run)
    task = meta_tasks.get_task(run["task"], dim=run["dim"], seed=run["task_seed"])
    with torch.random.fork_rng(devices=[]):
        return train(task, "golden", {}, run["seed"], run["steps"], source=source, splits=()).losses[-1]


def write_golden(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Compute and store ``golden.json`` for the checkpoint in ``directory``."""
    directory = Path(directory)
    record = {**GOLDEN_RUN, "final_loss": golden_loss(str(directory)), "torch": torch.__version__}
    (directory / GOLDEN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    for path in sys.argv[1:] or ["--help"]:
        if path in ("-h", "--help"):
            print(__doc__)
            break
        print(path, write_golden(path))
