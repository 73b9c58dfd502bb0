"""The command line: ``python -m metaopt.evaluate --help``. Flags map 1:1 to :func:`~metaopt.evaluate.run_suite`."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

import torch

import meta_tasks
from metaopt.evaluate.experiment import SelectionError, TimeLimitReached, run_suite
from metaopt.evaluate.suites import SUITES

DESCRIPTION = """Evaluate optimizers on a suite of tasks from identical initial weights and identical minibatches per
seed. Prints a Markdown table (final training loss, held-out loss / top-1 / top-2, seconds per update, Wilcoxon
p-value against the reference) and, with --out, writes results.json, table.md, steps.csv, finals.csv, evals.csv,
curves.png (mean ± s.e. per task), sweep.png and schedules.png where the suite has them."""

EPILOG = "suites:\n" + "\n".join(textwrap.fill(f"{name}: {suite.description}", 116, initial_indent="  ",
                                                 subsequent_indent="      ") for name, suite in SUITES.items())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m metaopt.evaluate", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--suite", default="hyperadam-table1", choices=sorted(SUITES), metavar="NAME",
        help="which suite to run (listed below; default hyperadam-table1)")
    add("--optimizers", type=_names, default=None, metavar="A,B,C",
        help="comma-separated optimizer labels: the suite's (with its hyper-parameters), any registered name, or a "
             "checkpoint directory (default: the suite's list)")
    add("--tasks", type=_names, default=None, metavar="T,U",
        help="comma-separated task labels of the suite or meta_tasks names (default: the suite's)")
    add("--seeds", type=_positive, default=None, metavar="N",
        help="evaluation seeds 0..N-1 (default: the suite's, the paper's number of repetitions)")
    add("--steps", type=_positive, default=None, metavar="T", help="optimizer steps per run (default: the suite's)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available, else cpu")
    add("--dataset", default="fashion-mnist", choices=meta_tasks.datasets.DATASETS,
        help="dataset of the image tasks (Fashion-MNIST stands in for the papers' MNIST)")
    add("--out", default=None, metavar="DIR", help="directory to write results, tables and figures into")
    add("--reference", default=None, metavar="LABEL",
        help="optimizer every other one is tested against (Wilcoxon, paired by seed); default: the suite's")
    add("--tune", action=argparse.BooleanOptionalAction, default=None,
        help="tune the hand-designed baselines' learning rates on separate seeds (10000, 10001, ...) first; default: "
             "on where the suite has a grid")
    add("--tune-seeds", type=_positive, default=3, metavar="K", help="number of tuning seeds (default 3)")
    add("--quick", action="store_true",
        help="reduced form: the suite's short optimizer and task lists, two rates per tuning grid, two LRS-OPT "
             "iterations (combine with small --seeds and --steps for a smoke run)")
    add("--checkpoints", default=None, metavar="DIR",
        help="where learned optimizers are loaded from, as DIR/<label>/ (default: checkpoints/ or "
             "$METAOPT_CHECKPOINTS; hyperadam-ablation: its hyperadam-ablation/ subdirectory)")
    add("--skip-missing", action="store_true",
        help="run without the learned optimizers that have no checkpoint (listed in the results) instead of failing")
    add("--eval-every", type=_non_negative, default=None, metavar="K",
        help="evaluate the held-out split every K steps (0: only at the end; default: the suite's)")
    add("--eval-size", type=_positive, default=None, metavar="N",
        help="evaluate on the first N held-out examples only (default: the whole split)")
    add("--batch", action=argparse.BooleanOptionalAction, default=None,
        help="run all seeds of a learned optimizer in one vmapped loop (--batch) or seed by seed (--no-batch); "
             "default: batched on CUDA, seed by seed on a CPU, where the vmapped loop measured slower")
    add("--compile-learned", action=argparse.BooleanOptionalAction, default=None,
        help="step HyperAdam, DMoptimizer and RNNprop run seed by seed through their compiled face (compile=True; "
             "equal to the eager step within float32 rounding, compiled once per learner and shape before the "
             "timed runs); default: on a CPU, where it measured 1.6-2.0x faster steps on CNN-2 and 1.25x on Table "
             "1's MLP (checkpoints/runs/2026-12-08-cpu-probe), off on CUDA, not measured there yet")
    add("--lrs-outer-steps", type=_non_negative, default=None, metavar="K",
        help="LRS-OPT iterations (marthe-schedules; default the paper's 5000)")
    add("--lrs-outer-lr", type=float, default=None, metavar="LR",
        help="LRS-OPT step size (default 1e-3, of Adam on the schedule; see metaopt.evaluate.suites.LrsOpt)")
    add("--lrs-seeds", type=_non_negative, default=None, metavar="N",
        help="run LRS-OPT on the first N evaluation seeds (default the paper's 4; 0 skips it: a piece of the suite "
             "with the online methods only, merged later with one that runs LRS-OPT)")
    add("--merge", action="store_true",
        help="add the runs to the results already in --out (same suite, --steps, --dataset, --eval-size): a suite "
             "run in pieces by task, optimizer or seed; a rerun (task, optimizer, seed) replaces the old run")
    add("--max-minutes", type=float, default=None, metavar="M",
        help="stop after the run group (or LRS-OPT seed) that crosses M minutes (exit status 3); with --out the "
             "finished groups, LRS-OPT seeds and tuned rates are journaled there (journal.jsonl) and the same command "
             "continues them, as it does after any interruption")
    add("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    compile_learned = not device.startswith("cuda") if args.compile_learned is None else args.compile_learned
    suite = SUITES[args.suite]
    if not args.quiet:
        print(f"{suite.name}: {suite.description} ({device})", file=sys.stderr)
    try:
        result = run_suite(suite, optimizers=args.optimizers, tasks=args.tasks, seeds=args.seeds, steps=args.steps,
                           device=device, dataset=args.dataset, checkpoints=args.checkpoints,
                           skip_missing=args.skip_missing, tune=args.tune, tune_seeds=args.tune_seeds,
                           quick=args.quick, reference=args.reference, batched=args.batch,
                           eval_every=args.eval_every, eval_size=args.eval_size,
                           lrs_outer_steps=args.lrs_outer_steps, lrs_outer_lr=args.lrs_outer_lr,
                           lrs_seeds=args.lrs_seeds, out=args.out,
                           merge=args.merge, compile_learned=compile_learned, max_minutes=args.max_minutes,
                           progress=not args.quiet,
                           command=["python", "-m", "metaopt.evaluate", *argv])
    except SelectionError as err:
        raise SystemExit(str(err)) from None
    except TimeLimitReached as err:
        print(err, file=sys.stderr)
        return 3
    print(result.report)
    if args.out and not args.quiet:
        names = ", ".join(path.name for path in result.files)
        print(f"wrote {args.out}: {names}", file=sys.stderr)
    return 0
