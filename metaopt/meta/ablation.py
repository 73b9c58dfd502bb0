"""The variant checkpoints of HyperAdam's ablation (Sec. 5.4, Fig. 8; the ``hyperadam-ablation`` suite), each
meta-trained with one shared, stated budget as a campaign, so that the variants are comparable and the work survives
the end of a session::

    python -m metaopt.meta.ablation --meta-steps 1000 --max-minutes 100      # run again to continue
    python -m metaopt.evaluate --suite hyperadam-ablation --checkpoints checkpoints/hyperadam-ablation

Every variant is ``hyperadam-paper`` (the full model and both training tricks, as the paper's Fig. 8 compares them)
with one change (:data:`VARIANTS`), the same seed and the same number of meta-steps; the full model is trained here
too (``hyperadam``), so the comparison is not against the shipped checkpoint of another budget. Variants are taken in
order: each runs as a campaign in ``ROOT/<label>/campaign`` (:mod:`metaopt.meta.campaign`, resumable on a fresh
machine) until it reaches the budget; then its validation-best θ is exported to ``ROOT/<label>`` with a golden test and
a card. ``--max-minutes`` bounds the whole call; the campaign that is cut continues next time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import metaopt.meta.campaign as campaigns
import metaopt.meta.cli as cli
from metaopt.cards import write_campaign_card, write_golden
from metaopt.learned.base import CHECKPOINT_ROOT, CONFIG_FILE, WEIGHTS_FILE

ROOT = CHECKPOINT_ROOT / "hyperadam-ablation"
BASE = ("--preset", "hyperadam-paper")
MIN_MINUTES = 2.0  # a piece shorter than this is not started (compiling the cell alone takes about a minute)


def _kwargs(**changes: object) -> tuple[str, str]:
    return "--optimizer-kwargs", json.dumps({"num_candidates": 20, "normalize_state": True, **changes})


# label -> what differs from hyperadam-paper (the labels are the suite's ABLATION_CHECKPOINTS)
VARIANTS: dict[str, tuple[str, ...]] = {
    "hyperadam": (),
    **{f"hyperadam-J{j}": _kwargs(num_candidates=j) for j in (1, 5, 10, 15, 25, 35)},
    "hyperadam-no-rs": ("--rs-learner", "0", "--rs-convex", "0"),
    "hyperadam-no-cc": ("--convex-k", "0"),
    "hyperadam-no-tricks": ("--rs-learner", "0", "--rs-convex", "0", "--convex-k", "0"),
    "hyperadam-no-lstm": _kwargs(use_lstm=False),
    "hyperadam-no-preprocess": _kwargs(preprocess=False),
    "hyperadam-no-lstm-no-preprocess": _kwargs(use_lstm=False, preprocess=False),
}


def command(label: str, meta_steps: int, root: Path, run_root: Path, extra: Sequence[str] = ()) -> list[str]:
    """``train_meta.py``'s arguments for one piece of ``label``'s campaign (without ``--max-minutes``)."""
    return [*BASE, *VARIANTS[label], "--meta-steps", str(meta_steps), "--run-dir", str(run_root / label),
            "--campaign", str(root / label / "campaign"), *extra]


def export(label: str, meta_steps: int, root: Path, run_root: Path, extra: Sequence[str] = ()) -> Path:
    """Copy the finished campaign's validation-best θ to ``root/label`` and write its golden test and card."""
    directory, camp = root / label, root / label / "campaign"
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(camp / campaigns.BEST_DIR / name, directory / name)
    write_golden(directory)
    change = " ".join(VARIANTS[label]) or "none (the full model)"
    notes = (f"A variant of HyperAdam's ablation (Sec. 5.4, Fig. 8): `hyperadam-paper` with one change — `{change}` — "
             f"meta-trained for the budget every variant shares ({meta_steps:,} meta-steps, seed 0) by "
             "`python -m metaopt.meta.ablation`; evaluated by the `hyperadam-ablation` suite "
             "(`--checkpoints checkpoints/hyperadam-ablation`).")
    train = "python train_meta.py " + " ".join(command(label, meta_steps, root, run_root, extra))
    write_campaign_card(directory, camp, command=train + "   # in pieces, by python -m metaopt.meta.ablation",
                        notes=notes, title=f"{label} — HyperAdam ablation variant")
    return directory


def run(meta_steps: int, *, max_minutes: float | None = None, root: Path = ROOT, run_root: Path = Path("runs/ablation"),
        labels: Sequence[str] | None = None, extra: Sequence[str] = ()) -> dict[str, str]:
    """Advance the variants' campaigns in order until each has ``meta_steps`` meta-steps or the time is up; export
    each finished one. Returns label → its state ("exported", "at meta-step k", "not started")."""
    labels = list(VARIANTS) if labels is None else list(labels)
    unknown = [label for label in labels if label not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    states = {}
    for label in labels:
        camp = root / label / "campaign"
        done = campaigns.totals(camp)["meta_steps"]
        left = None if deadline is None else (deadline - time.monotonic()) / 60
        if done < meta_steps and (left is None or left >= MIN_MINUTES):
            argv = command(label, meta_steps, root, run_root, extra)
            if left is not None:
                argv += ["--max-minutes", f"{left:.1f}"]
            print(f"ablation: {label} from meta-step {done:,} of {meta_steps:,}", file=sys.stderr)
            if cli.main(argv) != 0:
                raise RuntimeError(f"ablation: meta-training {label} failed (train_meta.py {' '.join(argv)})")
            done = campaigns.totals(camp)["meta_steps"]
        if done >= meta_steps:
            if not (root / label / WEIGHTS_FILE).is_file() or (root / label / WEIGHTS_FILE).read_bytes() != \
                    (camp / campaigns.BEST_DIR / WEIGHTS_FILE).read_bytes():
                export(label, meta_steps, root, run_root, extra)
            states[label] = "exported"
        else:
            states[label] = f"at meta-step {done:,}" if done else "not started"
    return states


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metaopt.meta.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--meta-steps", type=int, required=True,
                        help="the budget every variant gets (meta-steps of hyperadam-paper, the same for all)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after about this many minutes")
    parser.add_argument("--variants", default=None, metavar="A,B", help=f"a subset, in order (default: all: "
                        f"{', '.join(VARIANTS)})")
    parser.add_argument("--root", default=str(ROOT), help="where the variants' checkpoints and campaigns go")
    parser.add_argument("--run-root", default="runs/ablation", help="the run directories (not committed)")
    args, extra = parser.parse_known_args(argv)
    labels = args.variants.split(",") if args.variants else None
    states = run(args.meta_steps, max_minutes=args.max_minutes, root=Path(args.root), run_root=Path(args.run_root),
                 labels=labels, extra=extra)
    for label, state in states.items():
        print(f"{label}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
