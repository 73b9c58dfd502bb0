"""Meta-training campaigns: one run continued in pieces, each possibly on a fresh machine.

A campaign directory (committed, small) holds what a piece needs to continue and what a model card reports:

* ``campaign.pt`` — :meth:`MetaTrainer.campaign_state`: θ, the outer optimizer's state, the counters and validation
  scores, each slot's instance generation (no inner instances: a new piece restarts them at their next generation);
* ``best/`` — the campaign's validation-selected θ so far (what ``--export best`` exports);
* ``pieces.json`` — one record per piece: meta-steps from/to, inner steps, wall and CPU seconds, threads, machine,
  start and end time, the command line;
* ``log.jsonl`` — every validation line and every 10th meta-step's metrics of every piece (the curves of the card);
* ``README.md`` and ``validation.png`` — the campaign's card (:func:`write_card`): totals, the pieces, the validation
  score and the meta-loss against the meta-step. ``python -m metaopt.meta.campaign DIR`` writes them again.

``train_meta.py --campaign DIR`` resumes from the run directory's full state when that exists (the same machine),
else from ``DIR/campaign.pt``, else starts the campaign; at the end of the piece it writes all three.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from metaopt.environment import cpu_name, device_name
from metaopt.meta.trainer import STATE_FILE, MetaTrainer

CAMPAIGN_FILE, PIECES_FILE, LOG_FILE, CARD_FILE, PLOT_FILE = ("campaign.pt", "pieces.json", "log.jsonl", "README.md",
                                                              "validation.png")
BEST_DIR = "best"  # the validation-selected θ of the whole campaign (config.json + model.safetensors)
LOG_EVERY = 10  # meta-steps between the campaign log's plain lines (validation lines are all kept)


def pieces(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The piece records of the campaign in ``directory`` (empty for a new campaign)."""
    path = Path(directory) / PIECES_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def totals(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Meta-steps, inner steps, CPU-hours and wall-hours over all pieces."""
    records = pieces(directory)
    return {"pieces": len(records), "meta_steps": records[-1]["meta_step_to"] if records else 0,
            "inner_steps": sum(r["inner_steps"] for r in records),
            "cpu_hours": sum(r["cpu_seconds"] for r in records) / 3600,
            "wall_hours": sum(r["wall_seconds"] for r in records) / 3600}


# Issue 12's rule for a campaign: it runs at least REAL_CPU_HOURS, or stops earlier only once its validation score
# has not improved for its last FLAT_CPU_HOURS.
REAL_CPU_HOURS, FLAT_CPU_HOURS = 10.0, 3.0


def cpu_hours_since(directory: str | os.PathLike[str], meta_step: int) -> float:
    """The CPU-hours the campaign spent after ``meta_step`` (its best validation's, for the stopping rule): each
    piece's CPU time shared evenly over its meta-steps, those after ``meta_step`` counted."""
    total = 0.0
    for r in pieces(directory):
        span = r["meta_step_to"] - r["meta_step_from"]
        after = min(max(r["meta_step_to"] - meta_step, 0), span)
        total += r["cpu_seconds"] * (after / span if span else 0.0)
    return total / 3600


def stopping_rule(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Where the campaign stands against issue 12's rule: its CPU-hours, those since its best validation (None for a
    campaign without one), and whether it may stop (``done``: REAL_CPU_HOURS in all, or FLAT_CPU_HOURS without an
    improvement)."""
    vals = [(m["meta_step"], m["val_score"]) for m in log(directory) if "val_score" in m]
    if not vals:
        return None
    best_step = min(vals, key=lambda v: (v[1], v[0]))[0]
    total, flat = totals(directory)["cpu_hours"], cpu_hours_since(directory, best_step)
    return {"cpu_hours": total, "best_meta_step": best_step, "flat_cpu_hours": flat,
            "done": total >= REAL_CPU_HOURS or flat >= FLAT_CPU_HOURS}


class Piece:
    """One piece of a campaign around :meth:`MetaTrainer.run`: ``begin`` before, ``end`` after."""

    def __init__(self, trainer: MetaTrainer, directory: str | os.PathLike[str]):
        self.trainer, self.directory = trainer, Path(directory)

    def begin(self) -> str:
        """Continue the campaign unless the run directory's own full state was resumed; returns how it started."""
        trainer = self.trainer
        campaign = self.directory / CAMPAIGN_FILE
        if (trainer.run_dir / STATE_FILE).is_file() and trainer.meta_step > 0:
            how = f"resumed the full training state in {trainer.run_dir}"
        elif campaign.is_file():
            trainer.load_campaign(campaign)
            how = f"continued the campaign in {self.directory} at meta-step {trainer.meta_step}"
        else:
            how = f"started the campaign {self.directory}"
        self.meta_step_from = trainer.meta_step
        self.log_offset = _size(trainer.run_dir / "log.jsonl")
        self.started, self.wall, self.cpu = _now(), time.perf_counter(), time.process_time()
        return how

    def end(self) -> dict[str, Any]:
        """Write the campaign state, this piece's record and its log lines; returns the record."""
        trainer = self.trainer
        self.directory.mkdir(parents=True, exist_ok=True)
        trainer.save_campaign(self.directory / CAMPAIGN_FILE)
        if (trainer.run_dir / "best").is_dir():  # the campaign's best θ so far travels with it
            shutil.copytree(trainer.run_dir / "best", self.directory / BEST_DIR, dirs_exist_ok=True)
        config = trainer.config
        record = {"piece": len(pieces(self.directory)) + 1, "meta_step_from": self.meta_step_from,
                  "meta_step_to": trainer.meta_step,
                  "inner_steps": (trainer.meta_step - self.meta_step_from) * config.truncation * config.meta_batch,
                  "wall_seconds": round(time.perf_counter() - self.wall, 1),
                  "cpu_seconds": round(time.process_time() - self.cpu, 1), "threads": torch.get_num_threads(),
                  "machine": device_name(trainer.device) if trainer.device.type == "cuda" else cpu_name(),
                  "started": self.started, "ended": _now(), "best_val_score": trainer.best_score,
                  "initial_val_score": trainer.initial_score, "command": " ".join(sys.argv)}
        path = self.directory / PIECES_FILE
        _atomic_text(path, json.dumps([*pieces(self.directory), record], indent=1) + "\n")
        lines = _read_from(trainer.run_dir / "log.jsonl", self.log_offset)
        kept = [line for line in lines
                if "val_score" in (m := json.loads(line)) or m.get("meta_step", 0) % LOG_EVERY == 0]
        with open(self.directory / LOG_FILE, "a") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
        write_card(self.directory)
        return record


def log(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The campaign log's metrics, in order."""
    path = Path(directory) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_card(directory: str | os.PathLike[str]) -> Path:
    """Write the campaign's ``README.md`` (totals, pieces, validation scores) and ``validation.png``."""
    directory = Path(directory)
    records, metrics, total = pieces(directory), log(directory), totals(directory)
    vals = [(m["meta_step"], m["val_score"]) for m in metrics if "val_score" in m]
    initial = records[0]["initial_val_score"] if records else float("nan")
    best = min(vals, key=lambda v: v[1]) if vals else None
    config = torch.load(directory / CAMPAIGN_FILE, map_location="cpu", weights_only=True)["config"] \
        if (directory / CAMPAIGN_FILE).is_file() else {}
    lines = [f"# Campaign: {config.get('optimizer', '?')} on {config.get('family', '?')}", "",
             f"{total['pieces']} piece(s), {total['meta_steps']:,} meta-steps, {total['inner_steps']:,} inner steps, "
             f"{total['cpu_hours']:.2f} CPU-hours ({total['wall_hours']:.2f} wall-clock hours). "
             f"Validation score ({'mean log' if config.get('val_score') == 'log-mean' else 'mean'} final training "
             f"loss of θ frozen on {config.get('val_tasks', '?')} held-out "
             f"instances after {config.get('horizon', '?')} steps; lower is better): {initial:.4f} at meta-step 0"
             + (f", best {best[1]:.4f} at meta-step {best[0]:,}" if best else "") + ".", "",
             "Continue it with the command of the last piece (`train_meta.py ... --campaign DIR`); a fresh machine "
             "starts from `campaign.pt` with every task instance restarted.", ""]
    rule = stopping_rule(directory)
    if rule is not None:
        lines += [f"Stopping rule (issue 12: {REAL_CPU_HOURS:g} CPU-hours in all, or stop once the validation score has "
                  f"not improved for the last {FLAT_CPU_HOURS:g}): {rule['cpu_hours']:.2f} CPU-hours in all, "
                  f"{rule['flat_cpu_hours']:.2f} since the best validation (meta-step {rule['best_meta_step']:,}): "
                  + ("**may stop**." if rule["done"] else "continue."), ""]
    lines += ["| piece | meta-steps | inner steps | CPU-hours | threads | machine | ended | best validation |",
              "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['piece']} | {r['meta_step_from']:,}–{r['meta_step_to']:,} | {r['inner_steps']:,} | "
                     f"{r['cpu_seconds'] / 3600:.2f} | {r['threads']} | {r['machine']} | {r['ended']} | "
                     f"{r['best_val_score']:.4f} |")
    notes = [f"- piece {r['piece']}: {r['note']}" for r in records if r.get("note")]
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines += ["", "Configuration (`MetaConfig`):", "", "```json", json.dumps(config, indent=1), "```", "",
              "Commands:", ""] + [f"    {r['command']}" for r in records] + [""]
    if vals:
        lines.insert(4, f"![validation score and meta-loss against the meta-step]({PLOT_FILE})\n")
        plot(directory / PLOT_FILE, metrics, initial)
    (directory / CARD_FILE).write_text("\n".join(lines))
    return directory / CARD_FILE


def plot(path: Path, metrics: list[dict[str, Any]], initial: float, mark: int | None = None) -> None:
    """The validation score (``initial`` at meta-step 0) and the meta-loss against the meta-step, as ``path``;
    ``mark``: a meta-step whose validation point is circled (the θ a checkpoint was taken at)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    vals = [(0, initial)] + [(m["meta_step"], m["val_score"]) for m in metrics if "val_score" in m]
    top.plot(*zip(*vals), marker="o", ms=3)
    marked = [(step, score) for step, score in vals if step == mark]
    if marked:
        top.plot(*marked[-1], marker="o", ms=11, mfc="none", mec="C3", mew=2, ls="none",
                 label=f"these weights (meta-step {mark:,})")
        top.legend(loc="upper right")
    top.set_ylabel("validation score")
    steps = [(m["meta_step"], m["meta_loss"]) for m in metrics if "meta_loss" in m]
    if steps:
        bottom.plot(*zip(*steps), lw=0.7)
    bottom.set_ylabel("meta-loss")
    bottom.set_xlabel("meta-step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["--help"]:
        if arg in ("-h", "--help"):
            print("python -m metaopt.meta.campaign DIR [DIR ...]: write each campaign's README.md and validation.png")
            raise SystemExit(0)
        print(write_card(arg))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _read_from(path: Path, offset: int) -> list[str]:
    if not path.is_file():
        return []
    with open(path) as f:
        f.seek(offset)
        return [line for line in f if line.strip()]


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
