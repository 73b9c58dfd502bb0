"""The issue's targets and anchors, and how a report is judged against them."""

from __future__ import annotations

import dataclasses
from typing import Any

from metaopt.bench.config import FRESH_LEARNED


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal from an issue: ``metric`` (a dotted path into the row ``key``) compared with ``limit``, judged on
    reports from ``device`` ("cuda" or "cpu")."""

    key: str
    metric: str
    comparison: str  # "<=" or ">="
    limit: float
    text: str
    device: str = "cuda"


def _learned_step_targets() -> list[Target]:
    targets = []
    for name in FRESH_LEARNED:
        targets.append(Target(f"step:{name}:resnet18", "ratio_to_roofline", "<=", 2.0, "≤ 2× roofline"))
        targets.append(Target(f"step:{name}:mlp-9x20", "time_s.median_s", "<=", 1e-4, "≤ 0.1 ms"))
    return targets


TARGETS: tuple[Target, ...] = (
    *_learned_step_targets(),
    Target("iteration:hyperadam:resnet18", "ratio_to_adam", "<=", 1.8, "≤ 1.8× Adam"),
    *(Target(f"iteration:{name}:resnet18", "ratio_to_base", "<=", 1.05, "≤ 1.05× base")
      for name in ("sgd-hd", "sgdn-hd", "adam-hd", "cam-hd-sgd", "cam-hd-sgdn", "cam-hd-adam", "tlr", "tlr-pl")),
    *(Target(f"iteration:{name}:resnet18", "ratio_to_base", "<=", 3.0, "≤ 3× base") for name in ("marthe", "rtho")),
    Target("meta:K=128", "inner_steps_per_s", ">=", 20_000, "≥ 20,000 inner steps/s"),
    Target("meta:K=128", "peak_memory_bytes", "<=", 16e9, "≤ 16 GB"),
    # issue "Learned optimizers that have actually learned", on the 2-core CPU
    Target("meta:K=2", "inner_steps_per_s", ">=", 150, "≥ 150 inner steps/s (CPU)", device="cpu"),
    Target("meta:K=2", "peak_over_task_bytes", "<=", 0.5e9, "≤ 0.5 GB above the task (CPU)", device="cpu"),
    Target("table1:100-seeds", "time_s.median_s", "<=", 60.0, "≤ 60 s"),
)

ANCHORS: dict[str, Any] = {
    "source": "issue 'Performance': the eager implementation on one NVIDIA H100",
    "values": [
        {"key": "step:hyperadam[reference]:resnet18", "metric": "time_s.median_s", "value": 59e-3,
         "text": "eager HyperAdam"},
        {"key": "step:hyperadam[reference]:mlp-9x20", "metric": "time_s.median_s", "value": 16.4e-3,
         "text": "eager HyperAdam"},
        {"key": "step:torch-adam-fused:resnet18", "metric": "time_s.median_s", "value": 0.40e-3, "text": "Adam fused"},
        {"key": "step:torch-adam-fused:mlp-9x20", "metric": "time_s.median_s", "value": 0.16e-3, "text": "Adam fused"},
        {"key": "meta:K=1", "metric": "inner_steps_per_s", "value": 76, "text": "meta-training, 1 task"},
        {"key": "meta:K=32", "metric": "inner_steps_per_s", "value": 1641, "text": "meta-training, 32 tasks"},
    ],
}


def _lookup(row: dict[str, Any], metric: str) -> Any:
    value: Any = row
    for part in metric.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _rows_by_key(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = {}
    for section in report.get("sections", {}).values():
        for row in section.get("rows", []):
            rows[row["key"]] = row
    return rows


def judge_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every :data:`TARGETS` entry with its measured value (None when not measured) and ``passed`` (None on a report
    from another device than the target's, and on ``--quick`` reports, whose toy sizes are other configurations).

    A target whose key names a learned optimizer (``step:hyperadam:resnet18``) is met by its best variant: the rows
    of that ``family`` (``step:hyperadam[flat]:resnet18``, ...) compete, and the judged entry names the winner's
    ``row`` and ``variant``."""
    rows = _rows_by_key(report)
    device = report["environment"]["device"]
    judged_here = not report.get("settings", {}).get("quick", False)  # toy sizes measure other configurations
    judged = []
    for target in TARGETS:
        candidates = [rows[target.key]] if target.key in rows else [r for r in rows.values()
                                                                     if r.get("family") == target.key]
        measured = [(value, row) for row in candidates if (value := _lookup(row, target.metric)) is not None]
        entry: dict[str, Any] = {**dataclasses.asdict(target), "measured": None, "passed": None}
        if measured:
            pick = min if target.comparison == "<=" else max
            value, row = pick(measured, key=lambda pair: pair[0])
            entry.update(measured=value, row=row["key"])
            if "variant" in row:
                entry["variant"] = row["variant"]
            if judged_here and device == target.device:
                entry["passed"] = value <= target.limit if target.comparison == "<=" else value >= target.limit
        judged.append(entry)
    return judged

