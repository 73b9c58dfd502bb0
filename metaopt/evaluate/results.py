"""The README's Results section, generated from the committed evaluation results, so that every number it shows
traces to a file::

    python -m metaopt.evaluate.results                       # print the Markdown
    python -m metaopt.evaluate.results --write README.md     # replace the block between the results markers
    python -m metaopt.evaluate.results --check README.md     # exit 1 with a diff when the block is stale
    python -m metaopt.evaluate.results --aggregate --write README.md   # recompute the aggregates first
    python -m metaopt.evaluate.results --compact             # gzip results.json, drop steps.csv (for committing)

The results live in ``checkpoints/results/<run-name>/``, each an ``--out`` directory of ``python -m
metaopt.evaluate`` (``results.json``, ``table.md``, ``curves.png``, …). :func:`render_results` gives each directory a
heading (suite, device, date, seeds, steps, the command that made it), a table of the suite's compare metric (one
row per optimizer, one column per task, mean ± s.e. over seeds with the Wilcoxon p-value against the reference
recorded in ``results.json``), the HyperAdam paper's numbers where the suite reproduces one of its tables, the
verdict on the quality targets that apply (computed from the per-seed values, see :func:`beat_verdict` and
:func:`match_verdict`) and links to its figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import gzip
import lzma
import math
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import metaopt.evaluate.aggregate as aggregate
import metaopt.evaluate.claims as claims
import metaopt.evaluate.report as report
from metaopt.evaluate.runner import Run
from metaopt.evaluate.suites import PARAMETER_FREE, SUITES
from metaopt.learned.base import CHECKPOINT_ROOT

REPO_ROOT = CHECKPOINT_ROOT.parent
RESULTS_ROOT = CHECKPOINT_ROOT / "results"
RESULTS_FILE = report.RESULTS_FILE
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
FIGURES = ("curves.png", "sweep.png", "heatmap.png", "schedules.png")
ALPHA = 0.05  # significance level of every verdict
AGGREGATE_CAPTION = ("metaopt.evaluate.aggregate: rliable's interquartile mean over runs x tasks with a 95% "
                     "stratified bootstrap interval; loss normalized by Adam's mean final loss per task, speedup = "
                     "steps / the step where the run's trailing mean first reaches Adam's final one on the same seed")

DATASET_NAMES, METRIC_NAMES = report.DATASET_NAMES, report.METRIC_NAMES


# ----------------------------------------------------------------------------------------------------------------------
# The paper's numbers


@dataclasses.dataclass(frozen=True)
class PaperTable:
    """A table of a paper that a suite reproduces: ``values[optimizer label][task label]`` is the paper's mean final
    training loss; ``dataset`` is the paper's image dataset (None where the data are generated, as the sines)."""

    source: str
    row_label: str
    dataset: str | None
    values: Mapping[str, Mapping[str, float]]


def _columns(tasks: Sequence[str], **by_optimizer: Sequence[float]) -> dict[str, dict[str, float]]:
    return {label: dict(zip(tasks, values, strict=True)) for label, values in by_optimizer.items()}


_TABLE1_TASKS = ("mlp-sigmoid", "mlp-relu", "mlp-elu", "mlp-tanh")
_TABLE2_TASKS = ("lstm-sine", "lstm-sine-small-noise", "lstm-sine-2layer")
PAPER_TABLES: dict[str, PaperTable] = {
    # HyperAdam (Wang, Sun & Xu, AAAI 2019), Table 1: "the average final loss for optimizing networks in 100 times",
    # basic MLP on MNIST after 100 steps; ../shared/papers/hyperadam.txt lines 248-253 (columns Adam, DMoptimizer,
    # RNNprop, HyperAdam; rows sigmoid, ReLU, ELU, tanh).
    "hyperadam-table1": PaperTable(
        "HyperAdam paper, Table 1: mean final training loss over 100 runs after 100 steps, on MNIST",
        "paper (MNIST)", "mnist",
        _columns(_TABLE1_TASKS, adam=(0.35, 0.32, 0.31, 0.34), dm=(0.38, 1.42, 2.02, 0.83),
                 rnnprop=(0.34, 0.31, 0.31, 0.33), hyperadam=(0.33, 0.29, 0.28, 0.36))),
    # Table 2: LSTM sequence prediction, rows Baseline (noise N(0, 0.1)), Small noise (N(0, 0.01)), 2-layer;
    # ../shared/papers/hyperadam.txt lines 277-281 (same columns).
    "hyperadam-table2": PaperTable(
        "HyperAdam paper, Table 2: mean final training loss over 100 runs after 100 steps, on generated noisy sine "
        "sequences as here", "paper", None,
        _columns(_TABLE2_TASKS, adam=(0.65, 0.39, 0.51), dm=(3.10, 3.06, 2.05), rnnprop=(0.49, 0.32, 0.27),
                 hyperadam=(0.42, 0.19, 0.26))),
}


# ----------------------------------------------------------------------------------------------------------------------
# Quality targets


@dataclasses.dataclass(frozen=True)
class BeatTarget:
    """``learned`` below (better than) ``baseline`` at p < 0.05 on at least ``count`` tasks (None: every task)."""

    learned: str
    baseline: str
    learned_name: str
    baseline_name: str
    tasks_name: str
    count: int | None = None
    optional: bool = False  # judged only in the result sets that ran ``learned`` (a checkpoint added later)


BEAT_TARGETS: dict[str, tuple[BeatTarget, ...]] = {
    "hyperadam-table1": (BeatTarget("hyperadam", "adam", "HyperAdam", "Adam", "activations", 3),
                         BeatTarget("hyperadam-general", "adam", "hyperadam-general", "Adam", "activations", 3,
                                    optional=True)),
    "hyperadam-table2": (BeatTarget("hyperadam", "adam", "HyperAdam", "Adam", "LSTM tasks"),
                         BeatTarget("hyperadam-general", "adam", "hyperadam-general", "Adam", "LSTM tasks",
                                    optional=True)),
}
# Each learned rule of metaopt.learned.rules against the hand-designed optimizer it extends: it should at least match
# it on every held-out task.
MATCH_TARGETS: dict[str, tuple[tuple[str, str], ...]] = {
    "learned-rules": (("cam-hd-learned-gamma", "cam-hd-adam"), ("marthe-learned-mu", "marthe")),
}


@dataclasses.dataclass(frozen=True)
class Paired:
    """``label`` against ``baseline`` on one task over the seeds both ran: the means of the final ``metric``
    (:func:`report.metric`) and the two-sided Wilcoxon signed-rank p-value, paired by seed."""

    task: str
    metric: str
    mean: float
    baseline_mean: float
    p: float
    n: int
    diverged: bool  # a seed of ``label`` ended non-finite
    diverged_alone: bool = False  # ... on a seed where ``baseline`` did not

    def _key(self, value: float) -> float:
        """Lower is better; a mean that is not finite ranks last."""
        if not math.isfinite(value):
            return math.inf
        return -value if report.higher_is_better(self.metric) else value

    @property
    def better(self) -> bool:
        return not self.diverged and self._key(self.mean) < self._key(self.baseline_mean)

    @property
    def significantly_better(self) -> bool:
        """Better mean and p < :data:`ALPHA`."""
        return self.better and self.p < ALPHA

    @property
    def at_least_matches(self) -> bool:
        """Mean not worse, or no significant difference (p ≥ :data:`ALPHA`), over the seeds where both ended
        finite; a seed where ``label`` diverged and the baseline did not never matches (where both diverged, neither
        is worse there)."""
        if self.diverged_alone or self.n == 0:
            return False
        return self._key(self.mean) <= self._key(self.baseline_mean) or self.p >= ALPHA


def paired(runs: Sequence[Run], task: str, label: str, baseline: str, metric: str) -> Paired:
    """The per-seed comparison of ``label`` with ``baseline`` on ``task`` (seeds both ran)."""
    ours = {r.seed: report.metric(r, metric) for r in runs if r.task == task and r.optimizer == label}
    theirs = {r.seed: report.metric(r, metric) for r in runs if r.task == task and r.optimizer == baseline}
    seeds = sorted(ours.keys() & theirs.keys())
    a, b = [ours[s] for s in seeds], [theirs[s] for s in seeds]
    return Paired(task, metric, report.mean_se(a)[0], report.mean_se(b)[0], report.paired_wilcoxon(a, b),
                  len(seeds), not all(math.isfinite(v) for v in a),
                  any(not math.isfinite(x) and math.isfinite(y) for x, y in zip(a, b)))


def _digits(metric: str) -> int:
    return 3 if report.higher_is_better(metric) else 4


def _p(p: float) -> str:
    return f"{p:.2g}" if math.isfinite(p) else "n/a"


def _detail(c: Paired, verdict: bool) -> str:
    d = _digits(c.metric)
    return f"{c.task}: {'yes' if verdict else 'no'} ({c.mean:.{d}f} vs {c.baseline_mean:.{d}f}, p = {_p(c.p)})"


def _tasks_of(results: Mapping[str, Any], runs: Sequence[Run], *labels: str) -> list[str]:
    """The result's tasks (in its order) on which every one of ``labels`` ran."""
    ran = {(r.task, r.optimizer) for r in runs}
    return [t for t in results["meta"]["tasks"] if all((t, label) in ran for label in labels)]


def _not_run(results: Mapping[str, Any], labels: Sequence[str], runs: Sequence[Run]) -> str | None:
    present = {r.optimizer for r in runs}
    absent = [label for label in labels if label not in present]
    if not absent:
        return None
    skipped = results.get("skipped", {})
    return "; ".join(f"no runs of {label}" + (f" ({skipped[label]})" if label in skipped else "")
                     for label in absent)


def beat_verdict(results: Mapping[str, Any], target: BeatTarget) -> str:
    """One line: on how many tasks ``target.learned`` is below ``target.baseline`` at p < 0.05 (per-seed values of
    the suite's compare metric; a task where it diverged on a seed does not count), against the target count."""
    runs = load_runs(results)
    metric = results["meta"]["compare"]
    tuned = results.get("tuned", {})
    total = len(results["meta"]["tasks"])
    goal = total if target.count is None else target.count
    missing = _not_run(results, (target.learned, target.baseline), runs)
    tasks = _tasks_of(results, runs, target.learned, target.baseline)
    baseline = (f"tuned {target.baseline_name}" if tasks and all(target.baseline in tuned.get(t, {}) for t in tasks)
                else f"{target.baseline_name} (learning rate not tuned)")
    head = f"**Target**: {target.learned_name} below {baseline} at p < {ALPHA:g}"
    wanted = f"target: {'all' if target.count is None else goal}"
    if missing:
        return f"{head} on {goal} of {total} {target.tasks_name} ({wanted}): not evaluated ({missing})."
    comparisons = [paired(runs, t, target.learned, target.baseline, metric) for t in tasks]
    k = sum(c.significantly_better for c in comparisons)
    details = "; ".join(_detail(c, c.significantly_better) for c in comparisons)
    return (f"{head} on {k} of {total} {target.tasks_name} ({wanted}) — {'met' if k >= goal else 'not met'}. "
            f"{details}.")


def match_verdict(results: Mapping[str, Any], label: str, baseline: str) -> str:
    """One line: on how many tasks ``label`` at least matches ``baseline`` (:attr:`Paired.at_least_matches`)."""
    runs = load_runs(results)
    metric = results["meta"]["compare"]
    total = len(results["meta"]["tasks"])
    direction = "higher" if report.higher_is_better(metric) else "lower"
    rule = (f"target: all; at least matches = mean {METRIC_NAMES.get(metric, metric)} not worse ({direction} is "
            f"better) or Wilcoxon p ≥ {ALPHA:g} over the seeds both ended finite, and no seed diverged where the "
            "baseline did not")
    head = f"**Target**: {label} at least matches {baseline}"
    missing = _not_run(results, (label, baseline), runs)
    if missing:
        return f"{head} on every task ({rule}): not evaluated ({missing})."
    comparisons = [paired(runs, t, label, baseline, metric) for t in _tasks_of(results, runs, label, baseline)]
    k = sum(c.at_least_matches for c in comparisons)
    details = "; ".join(_detail(c, c.at_least_matches) for c in comparisons)
    return f"{head} on {k} of {total} tasks ({rule}) — {'met' if k == total else 'not met'}. {details}."


# Issue 12: "no seed of any hyperadam-* task stuck at its initial loss or diverged", for the shipped HyperAdams
HEALTH_SUITES, HEALTH_LABELS = "hyperadam-", ("hyperadam", "hyperadam-general")
STUCK_FRACTION = 0.99  # a run is stuck when its final training loss is not below this fraction of its first


def run_health(run: Run) -> str | None:
    """``"diverged"`` (a non-finite training loss at some step), ``"stuck"`` (the final loss not below
    :data:`STUCK_FRACTION` of the first step's: it never left its initial loss, or ended above it), else None."""
    if not run.losses or not all(math.isfinite(v) for v in run.losses):
        return "diverged"
    return "stuck" if run.losses[-1] >= STUCK_FRACTION * run.losses[0] else None


def health_verdict(results: Mapping[str, Any], label: str) -> str:
    """One line: how many of ``label``'s runs were stuck at their initial loss or diverged, by task."""
    runs = [r for r in load_runs(results) if r.optimizer == label]
    bad: dict[str, dict[str, int]] = {}
    for r in runs:
        state = run_health(r)
        if state is not None:
            bad.setdefault(r.task, {}).setdefault(state, 0)
            bad[r.task][state] += 1
    head = (f"**Target**: no seed of {label} stuck at its initial loss (final training loss ≥ {STUCK_FRACTION:g} × "
            f"the first step's) or diverged (a non-finite loss)")
    total = sum(sum(by.values()) for by in bad.values())
    if not total:
        return f"{head} — met (none of {len(runs)} runs)."
    details = "; ".join(f"{task}: " + ", ".join(f"{n} {state}" for state, n in by.items())
                        for task, by in bad.items())
    return f"{head} — not met: {total} of {len(runs)} runs ({details})."


def verdicts(results: Mapping[str, Any]) -> list[str]:
    """The verdict lines of the quality targets that apply to the result's suite (none for most suites)."""
    suite = results["meta"]["suite"]
    ran = {r["optimizer"] for r in results["runs"]}
    lines = [beat_verdict(results, target) for target in BEAT_TARGETS.get(suite, ())
             if not target.optional or target.learned in ran]
    lines += [match_verdict(results, label, baseline) for label, baseline in MATCH_TARGETS.get(suite, ())]
    if suite.startswith(HEALTH_SUITES):
        lines += [health_verdict(results, label) for label in HEALTH_LABELS if label in ran]
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# The checkpoints a result evaluated

STATE_NOTES = {"current": "the weights committed there now",
               "stale": "**stale**: the weights there have been replaced since; rerun the suite",
               "missing": "**missing**: no checkpoint is committed there any more",
               "uncommitted": "not committed"}


def checkpoints_line(results: Mapping[str, Any]) -> str | None:
    """The learned optimizers' checkpoints a result evaluated, each with its fingerprint and its state."""
    states = report.checkpoint_states(results)
    if not states:
        return None
    items = []
    for label, record, state in states:
        golden = record.get("golden_loss")
        golden = f", golden loss {golden:.6g}" if golden is not None else ""
        name = f"`{label}` = `{record['path']}`" if label != record["path"] else f"`{label}`"
        items.append(f"{name} (weights sha256 `{record['weights_sha256'][:12]}`{golden}; "
                     f"{STATE_NOTES[state]})")
    return "Checkpoints evaluated: " + "; ".join(items) + "."


# ----------------------------------------------------------------------------------------------------------------------
# Rendering


def load_runs(results: Mapping[str, Any]) -> list[Run]:
    """The :class:`Run` records of a results.json payload (its ``runs``)."""
    return report.runs_from_json(results["runs"])


def result_dirs(root: str | os.PathLike[str]) -> list[Path]:
    """The directories under ``root`` holding a results.json (or results.json.gz), in the order of :data:`SUITES`,
    then by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    order = {name: i for i, name in enumerate(SUITES)}
    found = [(report.read_results(d)["meta"]["suite"], d) for d in sorted(root.iterdir())
             if report.results_file(d) is not None]
    return [d for _, d in sorted(found, key=lambda item: (order.get(item[0], len(order)), item[1].name))]


def _link(path: Path, relative_to: Path) -> str:
    return Path(os.path.relpath(path.resolve(), relative_to.resolve())).as_posix()


def _seeds(seeds: Sequence[int]) -> str:
    n = f"{len(seeds)} seed{'s' * (len(seeds) != 1)}"
    if len(seeds) > 2 and list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{n} ({seeds[0]}–{seeds[-1]})"
    return f"{n} ({', '.join(map(str, seeds))})"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def results_table(results: Mapping[str, Any]) -> str:
    """One row per optimizer, one column per task: the compare metric's mean ± s.e. over seeds, with the Wilcoxon
    p-value against the row's reference as ``results.json`` records it; the paper's rows where the suite has them."""
    meta = results["meta"]
    runs = load_runs(results)
    metric, reference = meta["compare"], meta["reference"]
    references = meta.get("references", {})
    tasks = list(meta["tasks"])
    p_values = {(s["task"], s["optimizer"]): s["p"] for s in results.get("significance", [])}
    paper = PAPER_TABLES.get(meta["suite"]) if metric == "train_loss" else None
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.optimizer, r.task), []).append(r)

    def paper_row(label: str) -> str:
        return _row([f"{label}, {paper.row_label}"] + [f"{paper.values[label][t]:.2f}" if t in paper.values[label]
                                                       else "–" for t in tasks])

    rows = [_row(["optimizer", *tasks]), "|" + "---|" * (len(tasks) + 1)]
    labels = list(dict.fromkeys(r.optimizer for r in runs))
    for label in labels:
        ref = references.get(label, reference)
        tested = any((t, label) in p_values for t in tasks)
        name = label if ref in (label, reference) or not tested else f"{label} (p vs {ref})"
        cells = []
        for t in tasks:
            group = groups.get((label, t), [])
            cell = report._cell([report.metric(r, metric) for r in group], _digits(metric))
            if (t, label) in p_values:
                cell += f" (p = {_p(p_values[(t, label)])})"
            cells.append(cell)
        rows.append(_row([name, *cells]))
        if paper is not None and label in paper.values:
            rows.append(paper_row(label))
    if paper is not None:
        rows += [paper_row(label) for label in paper.values if label not in labels]
    return "\n".join(rows)


NOTE_FILE = "NOTE.md"  # optional, beside results.json: a paragraph shown under the section's heading


def render_one(directory: Path, relative_to: Path) -> str:
    """The section of one results directory (see the module docstring)."""
    results = report.read_results(directory)
    meta = results["meta"]
    device = meta["device_name"] if meta["device_name"] == meta["device"] else \
        f"{meta['device_name']} ({meta['device']})"
    dataset = DATASET_NAMES.get(meta["dataset"], meta["dataset"])
    link = _link(directory, relative_to)
    generated = all(t.get("name", label).startswith(claims.GENERATED_TASKS) for label, t in meta["tasks"].items())
    facts = [f"{_seeds(meta['seeds'])} × {meta['steps']} steps"] + ([] if generated else [f"image dataset {dataset}"])
    facts.append(f"torch {meta['torch']}, metaopt {meta['metaopt']}")
    if meta.get("quick"):
        facts.append("--quick (the suite's reduced lists)")
    if meta.get("eval_size"):
        facts.append(f"held-out subsets of {meta['eval_size']}")
    command = shlex.join(meta["command"]) if meta.get("command") else "not recorded"
    earlier = [f"`{shlex.join(c)}`" for c in meta.get("earlier_commands", []) if c]
    parts = [f"### {meta['suite']} — {device}, {meta['date']}",
             f"{'; '.join(facts)}; files: [`{link}/`]({link}/). Command: `{command}`"
             + (f", merged into the runs of {', '.join(earlier)}" if earlier else "")]
    if (directory / NOTE_FILE).is_file():  # what the files cannot say themselves (e.g. weights since replaced)
        parts.append((directory / NOTE_FILE).read_text().strip())

    metric, reference = meta["compare"], meta["reference"]
    named = any(ref not in (label, reference) for label, ref in meta.get("references", {}).items())
    caption = (f"Cells: {METRIC_NAMES.get(metric, metric)} after the last step, mean ± s.e. over seeds; p: two-sided "
               f"Wilcoxon signed-rank test against {reference}{' (or the reference a row names)' if named else ''}, "
               "paired by seed.")
    tuned_labels = list(dict.fromkeys(label for per_task in results.get("tuned", {}).values() for label in per_task))
    if tuned_labels:
        seeds = meta.get("tuned_on_seeds", [])
        if seeds and seeds == meta["seeds"]:
            caption += (f" Learning rates of {', '.join(tuned_labels)} chosen per task in hindsight, on the "
                        "evaluation seeds themselves (grid and choice in `table.md`).")
        else:
            caption += (f" Learning rates of {', '.join(tuned_labels)} tuned per task on separate seeds "
                        f"({', '.join(map(str, seeds))}; grid and choice in `table.md`).")
    paper = PAPER_TABLES.get(meta["suite"])
    if paper is not None and metric == "train_loss":
        caption += f" Rows \"{paper.row_label}\": {paper.source} (a mean only)."
        if paper.dataset is not None and meta["dataset"] != paper.dataset:
            caption += (f" **Dataset difference**: these runs used {dataset}, the paper "
                        f"{DATASET_NAMES.get(paper.dataset, paper.dataset)}; the losses are not directly comparable.")
    parts += [caption, results_table(results)]
    parts += verdicts(results)
    line = checkpoints_line(results)
    if line is not None:
        parts.append(line)
    skipped = results.get("skipped", {})
    if skipped:
        parts.append("Not run: " + "; ".join(f"{label} ({why})" for label, why in skipped.items()) + ".")
    agg = aggregate.load(directory)
    if agg is not None:
        parts += [f"Aggregate over the {len(agg['tasks'])} tasks and {len(agg['seeds'])} seeds "
                  f"({AGGREGATE_CAPTION}):", aggregate.markdown(agg)]
    figures = [f"![{meta['suite']}: {name[:-4]}]({link}/{name})" for name in (*FIGURES, aggregate.AGGREGATE_PLOT)
               if (directory / name).is_file()]
    if figures:
        parts.append("\n".join(figures))
    return "\n\n".join(parts)


def render_results(root: str | os.PathLike[str] = RESULTS_ROOT, *, relative_to: str | os.PathLike[str] = REPO_ROOT
                   ) -> str:
    """The Markdown of the README's Results section for every results directory under ``root``; links are relative
    to ``relative_to`` (the directory of the Markdown file that shows them)."""
    root, relative_to = Path(root), Path(relative_to)
    directories = result_dirs(root)
    if not directories:
        return (f"No evaluation results are committed yet: `{_link(root, relative_to)}/` holds no directory with a "
                f"{RESULTS_FILE}.")
    sections = [render_one(d, relative_to) for d in directories]
    summary = aggregate.load(root / aggregate.SUMMARY_DIR)
    if summary is not None:
        link = _link(root / aggregate.SUMMARY_DIR, relative_to)
        sections.insert(0, "\n\n".join([
            "### Across suites",
            f"The optimizers that ran in each of {', '.join(f'`{d}`' for d in summary['directories'])} (of each "
            f"suite, the newest result set with Adam and the parameter-free baselines), their "
            f"{len(summary['tasks'])} tasks pooled, the first {len(summary['seeds'])} seeds of each "
            f"({AGGREGATE_CAPTION}); files: [`{link}/`]({link}/).",
            aggregate.markdown(summary), f"![aggregate across suites]({link}/{aggregate.AGGREGATE_PLOT})"]))
    sections.insert(0, "\n\n".join([
        "### The papers' claims",
        "One verdict per claim, from the committed result sets below (metaopt.evaluate.claims: each comparison from "
        "the newest set that ran both optimizers on the task with the checkpoints shipped now; p < 0.05 in the "
        "paired Wilcoxon test where the claim is about one optimizer beating another).",
        claims.claims_table(directories)]))
    return "\n\n".join(sections)


MAX_COMMITTED_BYTES = 3 * 2**20  # a committed results directory, every file in it (issue "Every paper experiment")


def compact(directory: str | os.PathLike[str]) -> list[Path]:
    """Shrink a results directory for committing (issue: ≤ :data:`MAX_COMMITTED_BYTES` per suite): ``steps.csv``
    removed (its per-step losses are the runs' ``losses`` in ``results.json``), the per-run tables ``finals.csv`` /
    ``evals.csv`` gzipped (``pandas.read_csv`` and ``zcat`` read them as they are), and ``results.json`` rewritten
    with the runs re-encoded by :func:`report.runs_to_json` (float32 losses in their shortest decimal, lossless) as
    ``results.json.gz`` — or as ``results.json.xz`` (LZMA, ~20 % smaller; every reader here takes either, ``xzcat``
    prints it) where the gzipped file would not fit the budget beside the directory's other files (tlr-robustness:
    720,000 losses, 3.20 MB gzipped, 2.66 MB in xz). Deterministic: the same payload gives the same bytes, so an
    unchanged set stays unchanged in git. Returns the files removed or rewritten."""
    directory = Path(directory)
    changed, tables = [], []  # the results file first, then the tables, in the order they are named above
    for name in ("steps.csv", "steps.csv.gz"):
        if (directory / name).is_file():
            (directory / name).unlink()
            tables.append(directory / name)
    for name in ("finals.csv", "evals.csv"):
        table = directory / name
        if table.is_file():
            (directory / (name + ".gz")).write_bytes(gzip.compress(table.read_bytes(), compresslevel=9, mtime=0))
            table.unlink()
            tables.append(table)
    source = report.results_file(directory)
    if source is not None:
        payload = report.read_results(directory)
        payload["runs"] = report.runs_to_json(report.runs_from_json(payload["runs"]))
        data = report.json_text(payload).encode()
        others = sum(p.stat().st_size for p in directory.iterdir()
                     if p.is_file() and not p.name.startswith(RESULTS_FILE))
        # mtime=0: no timestamp in the gzip header (an xz stream has none)
        packed = gzip.compress(data, compresslevel=9, mtime=0)
        target = directory / (RESULTS_FILE + ".gz")
        if others + len(packed) > MAX_COMMITTED_BYTES:
            packed = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
            target = directory / (RESULTS_FILE + ".xz")
        if not target.is_file() or target.read_bytes() != packed:
            target.write_bytes(packed)
            changed.append(source)
        for name in (RESULTS_FILE, RESULTS_FILE + ".gz", RESULTS_FILE + ".xz"):
            if directory / name != target and (directory / name).is_file():
                (directory / name).unlink()
    return changed + tables


def write_aggregates(root: str | os.PathLike[str] = RESULTS_ROOT) -> list[Path]:
    """Write every results directory's aggregate (where Adam ran) and the summary across suites into
    ``root/aggregate``: the newest directory (by its date) of each suite among those that ran Adam and every
    parameter-free baseline (:data:`PARAMETER_FREE`, the yardstick every suite can share), over the optimizers that
    ran in all of them. Returns the directories written."""
    root = Path(root)
    written, newest = [], {}
    for d in result_dirs(root):
        payload = report.read_results(d)
        result = aggregate.write_suite(d, payload)
        if result is None:
            continue
        written.append(d)
        meta = payload["meta"]
        if not set(PARAMETER_FREE) <= set(meta["optimizers"]):
            continue
        date = meta["date"]
        if result["suite"] not in newest or date > newest[result["suite"]][0]:
            newest[result["suite"]] = (date, d)
    if aggregate.write_summary([d for _, d in newest.values()], root / aggregate.SUMMARY_DIR) is not None:
        written.append(root / aggregate.SUMMARY_DIR)
    return written


# ----------------------------------------------------------------------------------------------------------------------
# The README block


def _split(text: str, where: str) -> tuple[str, str, str]:
    """``text`` before the begin marker (inclusive), between the markers, and from the end marker on."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"{where} has no results block: add a line {BEGIN} and, after it, a line {END} where the "
                         "Results section should go")
    begin += len(BEGIN)
    return text[:begin], text[begin:end], text[end:]


def readme_block(text: str, where: str = "the file") -> str:
    """The Markdown between the results markers of ``text`` (without the newlines next to the markers)."""
    return _split(text, where)[1].strip("\n")


def replace_block(text: str, block: str, where: str = "the file") -> str:
    """``text`` with the Markdown between its results markers replaced by ``block``."""
    head, _, tail = _split(text, where)
    return f"{head}\n{block}\n{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metaopt.evaluate.results",
                                     description="Render the README's Results section from the committed evaluation "
                                                 "results (each an --out directory of python -m metaopt.evaluate).")
    parser.add_argument("--root", default=str(RESULTS_ROOT), metavar="DIR",
                        help="where the results directories are (default: the repository's checkpoints/results)")
    parser.add_argument("--aggregate", action="store_true",
                        help="first write aggregate.json / aggregate.png into every results directory where Adam ran "
                             "and the summary across suites into ROOT/aggregate (metaopt.evaluate.aggregate)")
    parser.add_argument("--compact", action="store_true",
                        help="first gzip every results.json under ROOT to results.json.gz, remove steps.csv (its "
                             "losses are in results.json) and gzip finals.csv / evals.csv: how result sets are "
                             "committed (each within 3 MiB)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", metavar="README", help=f"replace the lines between {BEGIN} and {END} in README")
    mode.add_argument("--check", metavar="README",
                      help="exit 1 with a diff when README's results block differs from the render")
    args = parser.parse_args(argv)
    if args.compact:
        for d in result_dirs(args.root):
            for path in compact(d):
                print(f"compacted {path}", file=sys.stderr)
    if args.aggregate:
        for d in write_aggregates(args.root):
            print(f"wrote {d}/{aggregate.AGGREGATE_FILE}, {aggregate.AGGREGATE_PLOT}", file=sys.stderr)
    path = Path(args.write or args.check or REPO_ROOT / "README.md")
    block = render_results(args.root, relative_to=path.resolve().parent)
    if args.write is None and args.check is None:
        print(block)
        return 0
    text = path.read_text()
    try:
        if args.write is not None:
            path.write_text(replace_block(text, block, str(path)))
            return 0
        current = readme_block(text, str(path))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if current == block:
        return 0
    sys.stdout.writelines(difflib.unified_diff((current + "\n").splitlines(True), (block + "\n").splitlines(True),
                                               f"{path} (results block)", "render_results()"))
    print(f"\n{path}: the results block is stale; run python -m metaopt.evaluate.results --write {path}",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
