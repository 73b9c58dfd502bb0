"""Aggregate metrics across the tasks of a suite and across suites, with stratified bootstrap confidence intervals
(``rliable``, Agarwal et al. 2021), against Adam as each suite runs it (tuned on separate seeds where the suite tunes
it, the paper's fixed rate otherwise). ``python -m metaopt.evaluate`` writes a suite's aggregate with its results
(when Adam ran); ``python -m metaopt.evaluate.results --aggregate`` writes them for every committed results directory
and the summary across suites.

Two scores per run (one optimizer, one task, one seed):

* **normalized final loss** — the run's final training loss (the suites' ``train_loss``, the minibatch loss before the
  last step) divided by Adam's mean final training loss on that task (over the seeds). Lower is better; 1 is Adam.
* **speedup** — how much sooner the run reaches Adam's final loss: ``steps / t`` where ``t`` is the first step at
  which the run's trailing mean loss (window :func:`window`: a tenth of the run) is at or below the trailing mean of
  Adam's run on the same seed (same initial weights, same minibatches) at its last step; 0 when the run never gets
  there. Higher is better; Adam itself scores >= 1 by construction (1 where its curve is still falling at the end).

Per optimizer: the interquartile mean (IQM: the mean of the middle 50 % of all runs × tasks) of each score, with a
95 % percentile interval from 2,000 stratified bootstrap resamples of the seeds within each task (``rliable``'s
``get_interval_estimates``; seeded, so the files are reproducible). Across suites the tasks of all suites are pooled,
each suite contributing its first ``k`` seeds, ``k`` the smallest seed count among them (the stratified bootstrap
needs one run count). Only optimizers that ran every task of a suite on Adam's seeds are aggregated.

Each results directory gets ``aggregate.json`` and ``aggregate.png`` (IQM and interval per optimizer); the summary
across suites is ``checkpoints/results/aggregate/``. The README's Results section shows both
(:mod:`metaopt.evaluate.results`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import metaopt.evaluate.report as report
from metaopt.evaluate.runner import Run

BASELINE = "adam"
AGGREGATE_FILE, AGGREGATE_PLOT = "aggregate.json", "aggregate.png"
SUMMARY_DIR = "aggregate"  # under checkpoints/results: the aggregate across suites
REPS = 2000  # bootstrap resamples
SEED = 0  # of the bootstrap
CONFIDENCE = 0.95
SCORES = {"normalized_loss": "IQM of the final training loss / Adam's (lower is better)",
          "speedup": "IQM of the speedup to Adam's final loss (higher is better)"}


def window(steps: int) -> int:
    """The trailing-mean window of the speedup: a tenth of the run (at least 1 step)."""
    return max(1, steps // 10)


def trailing_mean(losses: Sequence[float], width: int) -> np.ndarray:
    """``out[t]`` = mean of ``losses[max(0, t - width + 1) : t + 1]``."""
    x = np.asarray(losses, dtype=np.float64)
    csum = np.concatenate([[0.0], np.cumsum(x)])
    t = np.arange(len(x))
    lo = np.maximum(0, t - width + 1)
    return (csum[t + 1] - csum[lo]) / (t + 1 - lo)


def speedup(losses: Sequence[float], target: float, width: int) -> float:
    """``len(losses) / t`` for the first 1-based step ``t`` whose trailing mean is <= ``target``; 0 if none (a
    diverged run, NaN losses, never gets there)."""
    smooth = trailing_mean(losses, width)
    hit = np.flatnonzero(np.nan_to_num(smooth, nan=np.inf) <= target)
    return float(len(losses) / (hit[0] + 1)) if hit.size else 0.0


def scores(runs: Sequence[Run], tasks: Sequence[str], baseline: str = BASELINE
           ) -> tuple[dict[str, dict[str, np.ndarray]], list[int]]:
    """``{score: {label: array (seeds, tasks)}}`` of every optimizer with a run on every task for each of the
    baseline's seeds, and those seeds. Raises ``ValueError`` when the baseline did not run every task."""
    by_key = {(r.optimizer, r.task, r.seed): r for r in runs}
    base_seeds = sorted({r.seed for r in runs if r.optimizer == baseline})
    missing = [t for t in tasks if not any((baseline, t, s) in by_key for s in base_seeds)]
    if not base_seeds or missing:
        raise ValueError(f"no {baseline!r} runs on {missing or list(tasks)}: the aggregate normalizes by {baseline}; "
                         f"rerun the suite with {baseline} among --optimizers")
    seeds = [s for s in base_seeds if all((baseline, t, s) in by_key for t in tasks)]
    final = {t: float(np.mean([by_key[(baseline, t, s)].losses[-1] for s in seeds])) for t in tasks}
    target = {(t, s): float(trailing_mean(by_key[(baseline, t, s)].losses,
                                          window(len(by_key[(baseline, t, s)].losses)))[-1])
              for t in tasks for s in seeds}
    labels = list(dict.fromkeys(r.optimizer for r in runs))
    out: dict[str, dict[str, np.ndarray]] = {name: {} for name in SCORES}
    for label in labels:
        if not all((label, t, s) in by_key for t in tasks for s in seeds):
            continue
        grid = [[by_key[(label, t, s)] for t in tasks] for s in seeds]
        loss = np.array([[r.losses[-1] / final[t] for r, t in zip(row, tasks)] for row in grid], dtype=np.float64)
        out["normalized_loss"][label] = np.where(np.isfinite(loss), loss, np.inf)
        out["speedup"][label] = np.array([[speedup(r.losses, target[(t, s)], window(len(r.losses)))
                                           for r, t in zip(row, tasks)] for row, s in zip(grid, seeds)],
                                         dtype=np.float64)
    return out, seeds


def iqm(scores: np.ndarray) -> np.ndarray:
    """The interquartile mean of all of ``scores`` as a 1-element array: rliable's ``metrics.aggregate_iqm``
    (``scipy.stats.trim_mean(scores, 0.25, axis=None)``) bit for bit, the same partition and the same mean, without
    scipy's per-call argument handling, which was ~90 % of the 2,000-resample bootstrap's time.

    An infinite loss (a diverged run) sorts above every finite one; IQM trims it unless it is in the middle half, where
    it makes the IQM infinite, as it should. A NaN makes it NaN (scipy's default ``nan_policy="propagate"``)."""
    a = np.ravel(np.asarray(scores, dtype=np.float64))
    if a.size == 0 or np.isnan(a).any():
        return np.array([math.nan])
    low = int(0.25 * a.size)
    high = a.size - low
    return np.array([np.mean(np.partition(a, (low, high - 1))[low:high])])


def interval_estimates(score: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """``{label: {"iqm", "low", "high"}}``: the IQM (:func:`iqm`) and rliable's stratified bootstrap percentile
    interval of it."""
    from rliable import library as rly

    out = {}
    saved = np.random.get_state()
    for label, values in score.items():  # one seeded bootstrap per label: its interval does not depend on the others
        # rliable 1.2's StratifiedBootstrap draws its indices from numpy's global generator (np.random.choice) and
        # not from the random_state it is given, so the global generator is seeded here and restored afterwards
        np.random.seed(SEED)
        with warnings.catch_warnings():
            # rliable 1.2 seeds arch's bootstrap with a RandomState, which arch deprecates; infinite scores (diverged
            # runs) make inf - inf in the percentile interpolation
            warnings.filterwarnings("ignore", "random_state is deprecated", FutureWarning)
            warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
            point, interval = rly.get_interval_estimates({label: values}, iqm, reps=REPS,
                                                         confidence_interval_size=CONFIDENCE,
                                                         random_state=np.random.RandomState(SEED))
        # a bound between two infinite resample IQMs comes out of numpy's interpolation as inf - inf = NaN; scores
        # are never -inf, so that bound is +inf
        low, high = (math.inf if math.isnan(b) else float(b) for b in interval[label][:, 0])
        out[label] = {"iqm": float(point[label][0]), "low": low, "high": high}
    np.random.set_state(saved)
    return out


def aggregate(runs: Sequence[Run], tasks: Sequence[str], baseline: str = BASELINE) -> dict[str, Any]:
    """The aggregate of one suite's (or pooled suites') runs: seeds, tasks, and per score and optimizer the IQM with
    its interval."""
    table, seeds = scores(runs, tasks, baseline)
    return {"baseline": baseline, "tasks": list(tasks), "seeds": seeds, "reps": REPS, "confidence": CONFIDENCE,
            "window": "steps // 10", **{name: interval_estimates(table[name]) for name in SCORES}}


def plot(result: Mapping[str, Any], path: Path, title: str) -> None:
    """Per optimizer, each score's IQM with its interval (rliable's interval plot), one panel per score."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from rliable import plot_utils

    labels = list(result["normalized_loss"])
    point = {k: np.array([min(result[s][k]["iqm"], 1e6) for s in SCORES]) for k in labels}
    interval = {k: np.array([[min(result[s][k]["low"], 1e6) for s in SCORES],
                             [min(result[s][k]["high"], 1e6) for s in SCORES]]) for k in labels}
    fig, _ = plot_utils.plot_interval_estimates(point, interval, metric_names=["final loss / Adam's", "speedup"],
                                                algorithms=labels, xlabel="IQM (95% stratified bootstrap CI)",
                                                subfigure_width=4.0)
    fig.suptitle(title, y=1.1, fontsize="medium")
    fig.savefig(path, bbox_inches="tight", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# Files


def _load(directory: Path) -> tuple[dict[str, Any], list[Run]]:
    results = report.read_results(directory)
    return results, report.runs_from_json(results["runs"])


def write_suite(directory: str | os.PathLike[str], results: Mapping[str, Any] | None = None
                ) -> dict[str, Any] | None:
    """Write ``aggregate.json`` / ``aggregate.png`` into a results directory; None (nothing written) when Adam did
    not run there. ``results``: the directory's payload where the caller has read it already."""
    directory = Path(directory)
    results = report.read_results(directory) if results is None else results
    runs = report.runs_from_json(results["runs"])
    tasks = list(results["meta"]["tasks"])
    try:
        result = aggregate(runs, tasks)
    except ValueError:
        return None
    result = {"suite": results["meta"]["suite"], "device_name": results["meta"].get("device_name"), **result}
    report.write_json(directory / AGGREGATE_FILE, result)
    plot(result, directory / AGGREGATE_PLOT, f"{result['suite']} ({directory.name}), {len(result['seeds'])} seeds")
    return result


def write_summary(directories: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The aggregate across the given results directories (tasks pooled, labelled ``<directory>/<task>``), over the
    optimizers that ran in all of them, into ``out``; None when fewer than two directories have Adam."""
    pooled: list[Run] = []
    tasks: list[str] = []
    used: list[str] = []
    per_dir: list[tuple[Path, list[Run], list[str], list[int]]] = []
    for d in map(Path, directories):
        results, runs = _load(d)
        names = list(results["meta"]["tasks"])
        try:
            _, seeds = scores(runs, names)
        except ValueError:
            continue
        per_dir.append((d, runs, names, seeds))
    if len(per_dir) < 2:
        return None
    k = min(len(seeds) for *_, seeds in per_dir)
    common = set.intersection(*({r.optimizer for r in runs} for _, runs, _, _ in per_dir))
    for d, runs, names, seeds in per_dir:
        keep = dict(zip(seeds[:k], range(k)))  # renumber each directory's first k seeds 0..k-1
        for r in runs:
            if r.optimizer in common and r.seed in keep:
                pooled.append(Run(r.optimizer, f"{d.name}/{r.task}", keep[r.seed], r.losses, r.seconds_per_step,
                                  r.test))
        tasks += [f"{d.name}/{t}" for t in names]
        used.append(d.name)
    result = {"suite": "all", "directories": used, **aggregate(pooled, tasks)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / AGGREGATE_FILE, result)
    plot(result, out / AGGREGATE_PLOT, f"across {len(used)} result sets, {k} seeds each, {len(tasks)} tasks")
    return result


def load(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A directory's ``aggregate.json`` (an infinite IQM, of diverged runs, reads back as ``inf``), or None."""
    path = Path(directory) / AGGREGATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def markdown(result: Mapping[str, Any]) -> str:
    """A table: one row per optimizer, the IQM [interval] of each score."""
    def cell(e: Mapping[str, float]) -> str:
        return f"{e['iqm']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"

    rows = ["| optimizer | final loss / Adam's (IQM [95% CI], lower is better) | speedup to Adam's final loss "
            "(IQM [95% CI]) |", "|---|---|---|"]
    order = sorted(result["normalized_loss"], key=lambda k: result["normalized_loss"][k]["iqm"])
    rows += [f"| {k} | {cell(result['normalized_loss'][k])} | {cell(result['speedup'][k])} |" for k in order]
    return "\n".join(rows)
