"""Evaluation: train a task with several optimizers from identical initial weights and identical batches.

For every seed, the initial parameters come from ``Generator(seed)`` and the minibatches from a second generator
seeded from it, so each optimizer sees exactly the same starting point and the same data stream::

    python -m metaopt.evaluate --suite hyperadam-table1 --optimizers adam,sgd-hd,adam-hd --seeds 10 --steps 100

prints a Markdown table of the final training loss (mean ± standard error over seeds), the held-out top-1 accuracy
for classification, and the seconds per update, and writes the per-step losses as JSON with ``--out``.
Optimizers that differentiate the loss themselves (MARTHE, RTHO, HD-val, TLR-naive: ``requires_closure = True``)
get a closure returning the training loss, and a validation-batch closure where they take one.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import meta_tasks
import metaopt
from meta_tasks.base import Task


@dataclasses.dataclass(frozen=True)
class Suite:
    """A set of tasks evaluated for ``steps`` optimizer steps, with default optimizers and their hyper-parameters."""

    name: str
    tasks: tuple[str, ...]
    steps: int
    optimizers: dict[str, dict[str, Any]]
    description: str = ""


SUITES: dict[str, Suite] = {
    "hyperadam-table1": Suite(
        name="hyperadam-table1",
        tasks=("mlp-sigmoid", "mlp-relu", "mlp-elu", "mlp-tanh"),
        steps=100,
        optimizers={"adam": dict(lr=0.005), "sgd-hd": dict(lr=0.1, hypergrad_lr=1e-3),
                    "adam-hd": dict(lr=0.005, hypergrad_lr=1e-7), "cam-hd-adam": dict(lr=0.005, hypergrad_lr=1e-7)},
        description="HyperAdam Table 1: MLP 784-20-10 with four activations, 100 steps, batch 128 (training loss).",
    ),
}


@dataclasses.dataclass
class Run:
    """One optimizer on one task from one seed."""

    optimizer: str
    task: str
    seed: int
    losses: list[float]
    seconds_per_step: float
    test: dict[str, float]


def _seeded_generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    init_gen = torch.Generator(device=device).manual_seed(seed)
    batch_gen = torch.Generator(device=device).manual_seed(10_000_019 * (seed + 1))
    return init_gen, batch_gen


def train(task: Task, optimizer: str, hparams: dict[str, Any], seed: int, steps: int, source: Any = None) -> Run:
    """Train ``task`` with ``optimizer`` for ``steps`` steps from seed ``seed``; returns the per-step losses.

    ``optimizer`` labels the run; ``source`` (default: the label) is what ``metaopt.make_optimizer`` builds — a
    registered name, a checkpoint directory or a ``LearnedOptimizer``."""
    init_gen, batch_gen = _seeded_generators(seed, task.device)
    params = {n: p.requires_grad_() for n, p in task.init(init_gen).items()}
    buffers = task.init_buffers()
    opt = metaopt.make_optimizer(optimizer if source is None else source, list(params.items()), **hparams)
    takes_closure = getattr(opt, "requires_closure", False)
    takes_val = takes_closure and "val_closure" in inspect.signature(opt.step).parameters
    losses: list[float] = []
    step_seconds = 0.0
    for _ in range(steps):
        batch = task.sample_batch(batch_gen)
        val_batch = task.sample_batch(batch_gen, split="val") if takes_val else None
        start = time.perf_counter()
        if takes_closure:
            def closure() -> torch.Tensor:
                return task.loss(params, batch, buffers)

            kwargs = {"val_closure": lambda: task.loss(params, val_batch, buffers)} if takes_val else {}
            loss = opt.step(closure, **kwargs)
        else:
            opt.zero_grad(set_to_none=True)
            loss = task.loss(params, batch, buffers)
            loss.backward()
            opt.step()
        if task.device.type == "cuda":
            torch.cuda.synchronize(task.device)
        step_seconds += time.perf_counter() - start
        losses.append(float(loss.detach()))
    with torch.no_grad():
        test = task.evaluate({n: p.detach() for n, p in params.items()}, "test", buffers)
    return Run(optimizer, task.name, seed, losses, step_seconds / max(steps, 1), test)


def evaluate_suite(suite: Suite, optimizers: dict[str, dict[str, Any]], seeds: Sequence[int], steps: int | None = None,
                   device: str = "cpu", dataset: str = "fashion-mnist", progress: bool = True,
                   sources: dict[str, Any] | None = None) -> list[Run]:
    """Every optimizer (label -> hyper-parameters) on every task of ``suite`` for every seed, with identical initial
    weights and batches per seed. ``sources`` maps a label to what builds it when the label is not a registered
    name (a checkpoint directory or a ``LearnedOptimizer``)."""
    runs = []
    sources = sources or {}
    for task_name in suite.tasks:
        task = meta_tasks.get_task(task_name, dataset=dataset, device=device)
        for name, hparams in optimizers.items():
            for seed in seeds:
                runs.append(train(task, name, hparams, seed, steps or suite.steps, sources.get(name)))
            if progress:
                finals = [r.losses[-1] for r in runs[-len(seeds):]]
                print(f"  {task_name:14s} {name:14s} final loss {sum(finals) / len(finals):.4f}", file=sys.stderr)
    return runs


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def markdown_table(runs: Sequence[Run]) -> str:
    """Final training loss (mean ± s.e.), held-out top-1 accuracy and seconds per update, per task × optimizer."""
    rows = ["| task | optimizer | final train loss | test top-1 | s / update |", "|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r.task, r.optimizer) for r in runs))
    for task, opt in keys:
        group = [r for r in runs if (r.task, r.optimizer) == (task, opt)]
        loss_mean, loss_se = _mean_se([r.losses[-1] for r in group])
        top1 = [r.test["top1"] for r in group if "top1" in r.test]
        top1_text = f"{_mean_se(top1)[0]:.3f}" if top1 else "–"
        seconds = sum(r.seconds_per_step for r in group) / len(group)
        rows.append(f"| {task} | {opt} | {loss_mean:.4f} ± {loss_se:.4f} | {top1_text} | {seconds:.2e} |")
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m metaopt.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--suite", default="hyperadam-table1", choices=sorted(SUITES), help="which suite of tasks")
    parser.add_argument("--optimizers", default=None,
                        help="comma-separated optimizer names (default: the suite's own list, with its hyper-parameters)")
    parser.add_argument("--seeds", type=int, default=10, help="number of random initializations (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the suite's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--dataset", default="fashion-mnist", choices=meta_tasks.datasets.DATASETS,
                        help="dataset for image tasks")
    parser.add_argument("--out", default=None, help="directory to write results.json and table.md into")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    suite = SUITES[args.suite]
    if args.optimizers:
        names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
        unknown = [n for n in names if n not in metaopt.OPTIMIZERS]
        if unknown:
            raise SystemExit(f"Unknown optimizer(s) {unknown}. Valid names: {', '.join(metaopt.OPTIMIZERS)}")
        optimizers = {n: suite.optimizers.get(n, {}) for n in names}
    else:
        optimizers = suite.optimizers
    print(f"{suite.name}: {suite.description} ({args.seeds} seeds, {device})", file=sys.stderr)
    runs = evaluate_suite(suite, optimizers, range(args.seeds), args.steps, device, args.dataset)
    table = markdown_table(runs)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"suite": suite.name, "steps": args.steps or suite.steps, "seeds": args.seeds, "device": device,
                "device_name": torch.cuda.get_device_name(device) if device == "cuda" else platform.processor() or "cpu",
                "torch": torch.__version__, "dataset": args.dataset, "optimizers": optimizers,
                "date": time.strftime("%Y-%m-%d")}
        (out / "results.json").write_text(json.dumps({"meta": meta, "runs": [dataclasses.asdict(r) for r in runs]}))
        (out / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
