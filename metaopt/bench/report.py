"""The report of a run: its environment, the run itself, and the Markdown table the README shows."""

from __future__ import annotations

import datetime
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import metaopt
from meta_tasks.datasets import DatasetNotFoundError
from metaopt.bench.config import SECTIONS, BenchConfig
from metaopt.bench.faces import faces_markdown, faces_section
from metaopt.bench.sections import Bench
from metaopt.bench.targets import ANCHORS, judge_targets
from metaopt.bench.timing import format_seconds
from metaopt.environment import device_name
from metaopt.meta.trainer import resolve_device


FORMAT_VERSION = 1


REPO_ROOT = Path(__file__).resolve().parents[2]

# Numbers in a report that may legitimately be 0 (a spread, a count of floats, a seed, a warm-up count); every other
# number in a report is finite and positive.
NONNEGATIVE_FIELDS = frozenset({"iqr_s", "state_floats", "reduction_floats", "stored_state_floats", "seed", "warmup",
                                "max_abs_diff_params", "max_abs_diff_state", "max_rel_diff"})


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it (None outside a git checkout).
    ``--no-optional-locks`` keeps ``git status`` from writing the index."""
    commit = _git("rev-parse", "HEAD")
    status = _git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def environment(device: torch.device) -> dict[str, Any]:
    git = git_commit()
    return {"device": device.type,
            "device_name": device_name(device),
            "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
            "python": platform.python_version(), "metaopt": metaopt.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git["commit"], "git_dirty": git["dirty"], "cpu_threads": torch.get_num_threads()}


def run_benchmarks(config: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the sections ``config`` names and return the report (the JSON ``python -m metaopt.bench`` writes)."""
    device = resolve_device(config.device)
    bench = Bench(config, device, log)
    report: dict[str, Any] = {"format_version": FORMAT_VERSION, "environment": environment(device),
                              "settings": config.settings(), "bandwidth": bench.measure_bandwidth(),
                              "skipped_optimizers": bench.skipped, "sections": {}}
    runners = {"faces": lambda: faces_section(device, bench.repeats, bench.warmup, config.quick, config.seed, log),
               "step": bench.step_section, "iteration": bench.iteration_section, "meta": bench.meta_section,
               "table1": bench.table1_section}
    for section in (s for s in SECTIONS if s in config.sections):  # in this order, whatever the order of --only
        begin = time.perf_counter()
        try:
            report["sections"][section] = runners[section]()
        except DatasetNotFoundError as err:  # the real data is not on this machine: say so, measure the rest
            report["sections"][section] = {"skipped": str(err), "rows": []}
        report["sections"][section]["wall_s"] = time.perf_counter() - begin  # to plan runs on a lent GPU
    report["targets"] = judge_targets(report)
    report["anchors"] = ANCHORS
    return report


# ----------------------------------------------------------------------------------------------------------------------
# Markdown


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def _format(metric: str, value: float) -> str:
    if metric == "inner_steps_per_s":
        return f"{value:,.0f} inner steps/s"
    if metric.endswith("bytes"):
        return _gb(value)
    if metric.startswith("ratio") or metric == "last_over_first":
        return f"{value:.3g}×"
    return format_seconds(value)


def _target_cell(targets: list[dict[str, Any]], key: str, family: str | None = None) -> str:
    """The targets of the row ``key``: a judged target shows on the row it was measured on (the best variant of a
    learned optimizer), an unmeasured one on the row of its key or on every row of its family."""
    cells = []
    for t in targets:
        if t.get("row", key) == key and t["key"] in (key, family):
            status = {True: ": pass", False: ": FAIL", None: ""}[t["passed"]]
            cells.append(f"{t['text']}{status}")
    return "; ".join(cells) or "–"


def _anchor_cell(anchors: dict[str, Any], key: str) -> str:
    cells = [f"{_format(a['metric'], a['value'])} ({a['text']})" for a in anchors.get("values", []) if a["key"] == key]
    return "; ".join(cells) or "–"


def markdown_report(report: dict[str, Any]) -> str:
    """The report as Markdown for the README: a header line, then per section a table with the columns
    measurement | measured | roofline | ratio | target | anchor (targets marked pass / FAIL when judged on CUDA)."""
    env, targets, anchors = report["environment"], report.get("targets", []), report.get("anchors", {})
    commit = (env.get("git_commit") or "unknown")[:12] + (" (modified)" if env.get("git_dirty") else "")
    lines = [f"Measured on {env['device_name']} ({env['device']}), torch {env['torch']}, {env['date']}, "
             f"commit {commit}."]
    bandwidth = report.get("bandwidth")
    if bandwidth:
        lines.append(f"Copy bandwidth (read + write): {bandwidth['bytes_per_s'] / 1e9:,.0f} GB/s.")
    header = ["", "| measurement | measured | roofline | ratio | target | anchor |", "|---|---|---|---|---|---|"]

    def row(key: str, label: str, measured: str, roofline: str = "–", ratio: str = "–",
            family: str | None = None) -> str:
        return (f"| {label} | {measured} | {roofline} | {ratio} | {_target_cell(targets, key, family)} | "
                f"{_anchor_cell(anchors, key)} |")

    def checked(r: dict[str, Any]) -> str:  # a fast variant's agreement with the reference path
        return f" (Δ vs reference {r['check']['max_rel_diff']:.2g})" if "check" in r else ""

    titles = {"faces": "Optimizer step against torch.optim (ratio = step / baseline's step, or / compute floor)",
              "step": "Optimizer step (median; ratio = measured / memory roofline)",
              "iteration": "Training iteration: forward + backward + step",
              "meta": "Meta-training, hyperadam-paper preset",
              "table1": "hyperadam-table1 suite, end to end"}
    for name, section in report.get("sections", {}).items():
        lines += ["", f"**{titles.get(name, name)}**"]
        if section.get("skipped"):
            lines.append(f"Skipped: {section['skipped'].splitlines()[0]}")
            continue
        if name == "faces":
            lines += faces_markdown(section)
            continue
        lines += header
        for r in section.get("rows", []):
            key = r["key"]
            family = r.get("family")
            if "error" in r:
                lines.append(row(key, key, r["error"], family=family))
            elif name == "step":
                label = (f"{r['optimizer']} step on {r['learner']}" + (" (with closure)" if r.get("includes_closure")
                                                                       else "") + checked(r))
                roofline = format_seconds(r["roofline_s"]) if "roofline_s" in r else "–"
                ratio = f"{r['ratio_to_roofline']:.3g}×" if "ratio_to_roofline" in r else "–"
                lines.append(row(key, label, format_seconds(r["time_s"]["median_s"]), roofline, ratio, family))
            elif name == "iteration":
                ratios = []
                if "ratio_to_adam" in r:
                    ratios.append(f"{r['ratio_to_adam']:.3g}× Adam")
                if "ratio_to_base" in r:
                    ratios.append(f"{r['ratio_to_base']:.3g}× {r['base']}")
                lines.append(row(key, f"{r['optimizer']} on {r['model']}{checked(r)}", format_seconds(r["time_s"]["median_s"]),
                                 ratio="; ".join(ratios) or "–", family=family))
            elif name == "meta" and "truncations" in r:
                lines.append(row(key, f"peak memory, truncation 1 vs {r['truncations']} (K = {r['meta_batch']})",
                                 f"{_gb(r['first_peak_bytes'])} → {_gb(r['last_peak_bytes'])}",
                                 ratio=f"{r['last_over_first']:.3g}× (last / first)"))
            elif name == "meta":
                over = (f" ({_gb(r['peak_over_task_bytes'])} above the task)" if "peak_over_task_bytes" in r else "")
                what = r.get("preset", "hyperadam-paper") + ("" if r.get("fused", True) else ", reference path")
                lines.append(row(key, f"{what}, K = {r['meta_batch']} tasks",
                                 f"{r['inner_steps_per_s']:,.0f} inner steps/s, peak {_gb(r['peak_memory_bytes'])}"
                                 f"{over}"))
            else:
                lines.append(row(key, f"{r['seeds']} seeds × {r['steps']} steps", format_seconds(r["time_s"]["median_s"])))
    return "\n".join(lines) + "\n"

