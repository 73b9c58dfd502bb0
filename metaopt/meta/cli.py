"""The ``train_meta.py`` command line: flags -> MetaConfig -> MetaTrainer.run() -> exported checkpoint.

``python train_meta.py`` with no arguments runs the README's main job: meta-train HyperAdam on its default preset for
a budget of about ten minutes on a 2-core CPU (:data:`MAIN_JOB`), export it, evaluate it frozen against the shipped
HyperAdam, Adam tuned on separate seeds and the hypergradient baselines on held-out tasks (:data:`MAIN_JOB_EVAL`), and
print the table with every row's learning rate and tuning, paired tests and a verdict per task.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import typing
from typing import Any
from collections.abc import Mapping, Sequence
from pathlib import Path


import torch
import torch.distributed as dist

from metaopt.evaluate.experiment import run_suite
from metaopt.evaluate.report import BATCHES_HEADER, BATCHES_LOSS, mean_se, metric
from metaopt.evaluate.results import ALPHA, paired
from metaopt.evaluate.suites import SUITES
from metaopt.learned.base import checkpoint_root, from_pretrained
from metaopt.meta.config import PRESETS, MetaConfig, preset
from metaopt.meta.campaign import BEST_DIR, Piece
from metaopt.meta.trainer import STATE_FILE, MetaTrainer, resolve_device

# The main job's budget: the hyperadam-paper preset, shortened to finish in about ten minutes on 2 CPU cores
# (one instance: ~0.7 s per meta-step of 20 inner steps there), then a 10-seed Table-1 evaluation.
MAIN_JOB = dict(preset="hyperadam-paper", meta_steps=600, meta_batch=1, val_every=100, val_tasks=4,
                run_dir="runs/main-job")
# The evaluation's lineup. Every row states its learning rate and whether it was tuned:
# - "this run" and the shipped checkpoints/hyperadam, frozen, at their checkpoints' α;
# - Adam tuned per task on seeds disjoint from the evaluation seeds: the Table-1 suite's grid reduced to its three
#   rates around Table 1's choice (0.01 on every activation at 100 seeds), then refined by the √2 neighbours of the
#   best (runner.tune_learning_rates), so the 2-core budget holds while the rate is within √2 of the grid optimum;
# - the hypergradient baselines at fixed rates, not tuned: α₀ = 0.005 (HyperAdam's α) for the Adam-based ones,
#   α₀ = 0.1 for SGD-HD, with the hypergradient rates of Baydin et al. (β = 1e-7 on Adam, 1e-3 on SGD).
MAIN_JOB_EVAL = dict(seeds=10, tune_seeds=3, adam_grid=(3e-3, 1e-2, 3e-2), out="eval")
MAIN_JOB_THIS, MAIN_JOB_SHIPPED, MAIN_JOB_ADAM = "this run", "hyperadam (shipped)", "adam (tuned)"
MAIN_JOB_BASELINES = {"adam-hd": dict(lr=0.005, hypergrad_lr=1e-7), "sgd-hd": dict(lr=0.1, hypergrad_lr=1e-3),
                      "cam-hd-adam": dict(lr=0.005, hypergrad_lr=1e-7)}


def _field_type(field: dataclasses.Field) -> type:
    hints = typing.get_type_hints(MetaConfig)
    return hints[field.name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python train_meta.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Meta-train a learned optimizer by truncated BPTT over a task family, then export it. With no "
                    "arguments: the README's main job (meta-train HyperAdam briefly, evaluate it, print the table).")
    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default="hyperadam-paper", help="starting configuration")
    run.add_argument("--run-dir", default=None, help="directory for config.json, state.pt, log.jsonl, best/, last/ "
                                                     "(default runs/<preset>)")
    run.add_argument("--resume", action="store_true", help="continue the run found in --run-dir exactly")
    run.add_argument("--out", default=None, help="export the final (or --export best) optimizer here")
    run.add_argument("--export", choices=("last", "best"), default="last", help="which checkpoint --out receives")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    run.add_argument("--wandb", choices=("off", "offline", "online"), default="off", help="Weights & Biases logging")
    run.add_argument("--evaluate", action="store_true",
                     help="after training, evaluate the export on HyperAdam's Table-1 tasks against the shipped "
                          "HyperAdam, Adam tuned on separate seeds and the hypergradient baselines (the main job's "
                          "comparison; files in RUN_DIR/eval)")
    run.add_argument("--campaign", default=None, metavar="DIR",
                     help="continue the campaign in DIR (campaign.pt, pieces.json, log.jsonl; small, to commit): "
                          "from the run directory's full state when there is one, else from DIR/campaign.pt, and "
                          "write DIR at the end of this piece (metaopt.meta.campaign)")
    run.add_argument("--quiet", action="store_true", help="no progress bar or progress lines (errors and the "
                                                          "closing messages still show)")
    run.add_argument("--max-minutes", type=float, default=None,
                     help="stop cleanly after this much wall time (state saved; continue with --resume)")
    fields = parser.add_argument_group("configuration (override the preset; see metaopt.meta.MetaConfig)")
    for field in dataclasses.fields(MetaConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = _field_type(field)
        help_text = field.metadata.get("help", "")
        if kind is bool:
            fields.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            fields.add_argument(flag, type=kind, default=None, help=f"{help_text} (preset: see --preset)")
    return parser


def wandb_logger(mode: str, run_dir: Path, config: MetaConfig):
    """A metrics callback writing to Weights & Biases (``offline`` keeps the files in run_dir/wandb)."""
    if mode == "off":
        return None, None
    import wandb

    run = wandb.init(project="metaopt", dir=str(run_dir), mode=mode, config=config.to_dict(),
                     name=run_dir.name, resume="allow")
    return (lambda metrics: run.log(metrics, step=metrics["meta_step"])), run


def train(args: argparse.Namespace) -> tuple[MetaTrainer, Path]:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(MetaConfig)
                 if getattr(args, f.name) is not None}
    config = preset(args.preset, **overrides)
    run_dir = Path(args.run_dir or f"runs/{args.preset}")
    device = resolve_device(args.device)
    if dist.is_available() and "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
    log, wandb_run = wandb_logger(args.wandb, run_dir, config) if rank0 else (None, None)
    resume = args.resume or (args.campaign is not None and (run_dir / STATE_FILE).is_file())
    trainer = MetaTrainer(config, run_dir, device=device, resume=resume, logger=log)
    trainer.quiet = args.quiet
    piece = Piece(trainer, args.campaign) if args.campaign else None
    if piece is not None:
        print(f"campaign: {piece.begin()}", file=sys.stderr)
    started = time.time()
    try:
        metrics = trainer.run(max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    except KeyboardInterrupt:  # SIGINT / SIGTERM: the training state is saved; record the piece too
        if piece is not None and rank0:
            piece.end()
        raise
    export = run_dir / args.export
    if rank0:
        summary = {**metrics, "wall_seconds": time.time() - started, "device": str(device)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if piece is not None:
            record = piece.end()
            print(f"campaign: piece {record['piece']} wrote {args.campaign} (meta-steps {record['meta_step_from']}"
                  f"-{record['meta_step_to']}, best validation score {record['best_val_score']:.4f})",
                  file=sys.stderr)
        if args.out:
            if piece is not None and args.export == "best" and not export.is_dir():
                export = Path(args.campaign) / BEST_DIR  # no better θ in this piece: the campaign's best
            _export(trainer, export, Path(args.out), args.export, campaign=piece is not None)
        if wandb_run is not None:
            if args.wandb == "online":
                import wandb

                artifact = wandb.Artifact(f"{config.optimizer}-{run_dir.name}", type="learned-optimizer")
                artifact.add_dir(str(export))
                wandb_run.log_artifact(artifact)
            wandb_run.finish()
    return trainer, Path(args.out) if args.out else export


def _export(trainer: MetaTrainer, export: Path, out: Path, which: str, campaign: bool) -> None:
    """Copy ``export`` (the run's best/ or last/) to ``out``, refusing weights that validate worse than θ did before
    its first meta-step (best/ never does: the initial θ is its first candidate)."""
    if which == "best" and not export.is_dir():
        if campaign and trainer.meta_step > 0 and math.isfinite(trainer.best_score):
            print(f"no better validation score in this piece: {out} keeps the campaign's best "
                  f"({trainer.best_score:.4f})", file=sys.stderr)
            return
        raise SystemExit(f"--export best: no best/ checkpoint in {trainer.run_dir} (validation never ran; "
                         "set --val-every)")
    if which == "last" and math.isfinite(trainer.initial_score):
        score = trainer.validate()
        if score > trainer.initial_score:
            raise SystemExit(f"--export last: refusing to export {export}: it validates at {score:.4f}, worse than "
                             f"its initialization ({trainer.initial_score:.4f}); export best instead "
                             f"(--export best) or train further")
    shutil.copytree(export, out, dirs_exist_ok=True)
    print(f"exported {export} to {out}", file=sys.stderr)


def main_job_suite(seeds: int = MAIN_JOB_EVAL["seeds"], adam_grid: Sequence[float] = MAIN_JOB_EVAL["adam_grid"]):
    """The main job's comparison as a suite: HyperAdam's Table-1 tasks with :data:`MAIN_JOB_EVAL`'s lineup."""
    table1 = SUITES["hyperadam-table1"]
    optimizers = {MAIN_JOB_THIS: {}, MAIN_JOB_SHIPPED: {}, MAIN_JOB_ADAM: {"lr": adam_grid[len(adam_grid) // 2]},
                  **MAIN_JOB_BASELINES}
    return dataclasses.replace(
        table1, name="main-job", seeds=seeds, optimizers=optimizers, reference=MAIN_JOB_THIS, references={},
        sources={MAIN_JOB_ADAM: "adam"}, learned=(MAIN_JOB_THIS, MAIN_JOB_SHIPPED),
        tune={MAIN_JOB_ADAM: tuple(adam_grid)}, quick_optimizers=None, quick_tasks=None,
        description="the main job: this run's HyperAdam against the shipped one, Adam tuned on separate seeds and the "
                    "hypergradient baselines at fixed rates, on " + table1.name + "'s tasks")


def evaluate_export(checkpoint: Path, out: Path, *, seeds: int = MAIN_JOB_EVAL["seeds"],
                    tune_seeds: int = MAIN_JOB_EVAL["tune_seeds"],
                    adam_grid: Sequence[float] = MAIN_JOB_EVAL["adam_grid"], shipped: str | Path | None = None, tasks: Sequence[str] | None = None, steps: int | None = None,
                    device: str = "cpu", progress: bool = True) -> str:
    """Frozen evaluation of ``checkpoint`` in the main job's comparison (:func:`main_job_suite`); writes results.json,
    table.md, the CSVs and curves.png to ``out`` and returns the text to print: the table with every row's learning
    rate and how it was set, the paired test of every row against this run, one verdict per task, and where the files
    are. ``shipped`` defaults to the committed checkpoints/hyperadam."""
    suite = main_job_suite(seeds, adam_grid)
    shipped = checkpoint_root() / "hyperadam" if shipped is None else Path(shipped)
    result = run_suite(suite, seeds=seeds, tasks=tasks, steps=steps, device=device, tune=True, tune_seeds=tune_seeds,
                       sources={MAIN_JOB_THIS: str(checkpoint), MAIN_JOB_SHIPPED: str(shipped)}, out=out,
                       progress=progress, command=["python", "train_meta.py"])
    return main_job_report(result, checkpoint, shipped, out)


def _learned_rate(source: Path) -> float:
    return float(from_pretrained(source).lr)


def same_weights(a: Path, b: Path) -> bool:
    """Whether the checkpoints ``a`` and ``b`` hold the same optimizer with bit-identical weights and step size.

    The main job is deterministic (seed 0 for θ, instances and minibatches), and checkpoints/hyperadam was exported by
    it, so an unchanged recipe reproduces the shipped weights exactly; the report says so instead of leaving an
    identical row and p = 1 to be puzzled over."""
    first, second = from_pretrained(a), from_pretrained(b)
    if type(first) is not type(second) or float(first.lr) != float(second.lr):
        return False
    x, y = first.state_dict(), second.state_dict()
    return x.keys() == y.keys() and all(x[k].shape == y[k].shape and torch.equal(x[k], y[k]) for k in x)


def _rate_cell(result: Any, task: str, label: str, learned: Mapping[str, float]) -> str:
    """How ``label``'s learning rate was set on ``task``, in words."""
    if label in learned:
        return f"α = {learned[label]:g}, its checkpoint's (meta-trained)"
    tuned = result.tuned.get(task, {}).get(label)
    if tuned is not None:
        return (f"{tuned['lr']:.3g}, tuned on seeds {_span(result.meta['tuned_on_seeds'])} over "
                f"{', '.join(f'{lr:.3g}' for lr in tuned['grid'])}")
    hparams = result.meta["optimizers"][label]
    extra = ", ".join(f"{k} = {v:g}" for k, v in hparams.items() if k != "lr")
    return f"{hparams['lr']:g}, fixed, not tuned" + (f" ({extra})" if extra else "")


def _span(seeds: Sequence[int]) -> str:
    return str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"


def _loss_cell(values: Sequence[float]) -> str:
    mean, se, n = mean_se(values)
    return f"{mean:.4f} ± {se:.4f}" + (f" ({len(values) - n} diverged)" if n < len(values) else "")


def main_job_report(result: Any, checkpoint: Path, shipped: Path, out: Path) -> str:
    """The main job's printed report (see :func:`evaluate_export`). Where the runs have the papers' measure (the
    loss of the final weights averaged over the run's batches, which the suite computes), it stands beside the final
    training loss; the p-values and verdicts stay on the final training loss."""
    learned = {MAIN_JOB_THIS: _learned_rate(checkpoint), MAIN_JOB_SHIPPED: _learned_rate(shipped)}
    tests = {(row["task"], row["optimizer"]): row for row in result.significance}
    finals: dict[tuple[str, str], list[float]] = {}
    measure: dict[tuple[str, str], list[float]] = {}
    for run in result.runs:
        finals.setdefault((run.task, run.optimizer), []).append(metric(run, "train_loss"))
        if "loss" in run.batches:
            measure.setdefault((run.task, run.optimizer), []).append(metric(run, BATCHES_LOSS))
    seeds, steps = result.meta["seeds"], result.meta["steps"]
    beside = f" | {BATCHES_HEADER}" if measure else ""
    lines = [f"## Main job: final training loss after {steps} steps, mean ± s.e. over {len(seeds)} seeds "
             f"({_span(seeds)}); p: two-sided Wilcoxon signed-rank test against {MAIN_JOB_THIS}, paired by "
             "seed (identical initial weights and minibatches)", "",
             f"| task | optimizer | learning rate | final train loss{beside} | p vs this run |",
             "|---|---|---|---|" + "---|" * bool(measure) + "---|"]
    verdicts = []
    tasks = list(dict.fromkeys(task for task, _ in finals))
    for task in tasks:
        for label in result.meta["optimizers"]:
            values = finals.get((task, label))
            if values is None:
                continue
            loss = _loss_cell(values)
            if measure:
                loss += " | " + (_loss_cell(measure[(task, label)]) if (task, label) in measure else "–")
            row = tests.get((task, label))
            p = "reference" if label == MAIN_JOB_THIS else ("–" if row is None else f"{row['p']:.2g}")
            lines.append(f"| {task} | {label} | {_rate_cell(result, task, label, learned)} | {loss} | {p} |")
        verdicts.append(_verdict(task, result.runs, len(seeds)))
    lines += ["", "Verdicts (at p < " + f"{ALPHA:g}" + "):", *verdicts, ""]
    if same_weights(checkpoint, shipped):
        lines += [f"{MAIN_JOB_THIS}'s weights equal {shipped}'s bit for bit: the shipped checkpoint is this main "
                  "job's output, and meta-training reproduced it exactly (its rows are identical by construction).", ""]
    lines += [
              f"curves: {out / 'curves.png'}",
              f"run: {checkpoint.parent} (running the main job again reuses it) · export: "
              f"{checkpoint} · results: {out} (results.json, table.md, CSVs)",
              "the full Table-1 suite (100 seeds, every baseline tuned on the full grids): python -m metaopt.evaluate "
              f"--suite hyperadam-table1 --optimizers {checkpoint},adam,momentum,rmsprop --reference {checkpoint} "
              "--out runs/table1-main-job"]
    return "\n".join(lines)


def _verdict(task: str, runs: Sequence[Any], seeds: int) -> str:
    """One line in words: this run against tuned Adam (the claim that matters) and against the shipped weights."""
    parts = []
    for label, name in ((MAIN_JOB_ADAM, "tuned Adam"), (MAIN_JOB_SHIPPED, "the shipped HyperAdam")):
        c = paired(runs, task, MAIN_JOB_THIS, label, "train_loss")
        if c.n == 0:
            continue
        means = f"{c.mean:.4f} vs {c.baseline_mean:.4f}, p = {c.p:.2g}"
        if not (math.isfinite(c.p) and c.p < ALPHA):
            parts.append(f"is not distinguishable from {name} at {seeds} seeds ({means})")
        else:
            parts.append(f"{'beats' if c.better else 'loses to'} {name} ({means})")
    return f"- {task}: this run " + "; ".join(parts) + "."


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    main_job = not argv
    if main_job:
        argv = ["--preset", MAIN_JOB["preset"], "--meta-steps", str(MAIN_JOB["meta_steps"]), "--meta-batch",
                str(MAIN_JOB["meta_batch"]), "--val-every", str(MAIN_JOB["val_every"]), "--val-tasks",
                str(MAIN_JOB["val_tasks"]), "--run-dir",
                MAIN_JOB["run_dir"], "--evaluate"]
        if (Path(MAIN_JOB["run_dir"]) / "state.pt").is_file():
            argv.append("--resume")  # idempotent: a finished main job is not trained again
        print("main job: meta-training HyperAdam (hyperadam-paper preset, shortened), then evaluating it",
              file=sys.stderr)
    args = parser.parse_args(argv)
    try:
        trainer, checkpoint = train(args)
    except KeyboardInterrupt as stop:
        print(f"\n{stop}", file=sys.stderr)
        return 130
    if args.evaluate and trainer.rank == 0:
        device = "cuda" if trainer.device.type == "cuda" else "cpu"
        print(evaluate_export(checkpoint, trainer.run_dir / MAIN_JOB_EVAL["out"], device=device,
                              progress=not args.quiet))
    return 0
