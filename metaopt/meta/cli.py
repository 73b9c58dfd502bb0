"""The ``train_meta.py`` command line: flags -> MetaConfig -> MetaTrainer.run() -> exported checkpoint.

``python train_meta.py`` with no arguments runs the README's main job: meta-train HyperAdam on its default preset for
a budget of about ten minutes on a 2-core CPU (:data:`MAIN_JOB`), export it, evaluate it frozen against Adam and the
hypergradient baselines on held-out tasks, and print the table.
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
from collections.abc import Sequence
from pathlib import Path


import torch
import torch.distributed as dist

from metaopt.meta.config import PRESETS, MetaConfig, preset
from metaopt.meta.campaign import BEST_DIR, Piece
from metaopt.meta.trainer import STATE_FILE, MetaTrainer, resolve_device

# The main job's budget: the hyperadam-paper preset, shortened to finish in about ten minutes on 2 CPU cores
# (one instance: ~0.7 s per meta-step of 20 inner steps there), then a 10-seed Table-1 evaluation.
MAIN_JOB = dict(preset="hyperadam-paper", meta_steps=600, meta_batch=1, val_every=100, val_tasks=4,
                run_dir="runs/main-job")
MAIN_JOB_BASELINES = {"adam": dict(lr=0.005), "adam-hd": dict(lr=0.005, hypergrad_lr=1e-7),
                      "sgd-hd": dict(lr=0.1, hypergrad_lr=1e-3), "cam-hd-adam": dict(lr=0.005, hypergrad_lr=1e-7)}


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
    run.add_argument("--evaluate", action="store_true", help="after training, evaluate the export on Table-1 tasks")
    run.add_argument("--campaign", default=None, metavar="DIR",
                     help="continue the campaign in DIR (campaign.pt, pieces.json, log.jsonl; small, to commit): "
                          "from the run directory's full state when there is one, else from DIR/campaign.pt, and "
                          "write DIR at the end of this piece (metaopt.meta.campaign)")
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


def evaluate_export(checkpoint: Path, seeds: int = 10, device: str = "cpu") -> str:
    """Frozen evaluation of ``checkpoint`` against the baselines on HyperAdam's Table-1 tasks; returns the table."""
    from metaopt import evaluate

    suite = evaluate.SUITES["hyperadam-table1"]
    optimizers = {"hyperadam (this run)": {}, **MAIN_JOB_BASELINES}
    runs = evaluate.evaluate_suite(suite, optimizers, range(seeds), device=device,
                                   sources={"hyperadam (this run)": str(checkpoint)})
    return evaluate.markdown_table(runs)


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
        print(evaluate_export(checkpoint, device=device))
    return 0
