"""What an evaluation writes: statistics over seeds, the paired significance test, Markdown tables, JSON / CSV files
and PNG figures.

Conventions. A run's *final* values are its last training loss and its held-out metrics after the last step, and,
where its suite computes it, the papers' measure (``batches_loss``: the loss of the final weights averaged over the
run's training minibatches, shown beside the final training loss). Means and standard errors (sample standard
deviation / √n) are over the seeds whose value is finite; runs that diverged are counted in the table instead. The
significance test is the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided) on a final value (the
suite's ``compare``: the training loss by default) of an optimizer and its reference, paired by seed.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import lzma
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy

from metaopt.evaluate.runner import Run
from metaopt.evaluate.suites import Sweep
from metaopt.learned.base import CHECKPOINT_ROOT, WEIGHTS_FILE, fingerprint

RESULTS_FILE = "results.json"  # an --out directory's record of every run (write_outputs in metaopt.evaluate.experiment)


def results_file(directory: str | os.PathLike[str]) -> Path | None:
    """The directory's ``results.json``, or its compressed ``results.json.gz`` / ``results.json.xz`` (how committed
    result sets are kept: :func:`metaopt.evaluate.results.compact`), or None."""
    for name in (RESULTS_FILE, RESULTS_FILE + ".gz", RESULTS_FILE + ".xz"):
        path = Path(directory) / name
        if path.is_file():
            return path
    return None


def read_results(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The payload of the directory's ``results.json`` (plain, gzipped or xz-compressed); ``FileNotFoundError`` if
    none."""
    path = results_file(directory)
    if path is None:
        raise FileNotFoundError(f"{directory}: no {RESULTS_FILE} (or {RESULTS_FILE}.gz / .xz); is it an --out "
                                "directory of python -m metaopt.evaluate?")
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix)
    if opener is not None:
        with opener(path, "rt") as f:
            return json.load(f)
    return json.loads(path.read_text())

DATASET_NAMES = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10"}
METRIC_NAMES = {"train_loss": "final training loss", "test_loss": "test loss", "test_top1": "test top-1",
                "test_top2": "test top-2", "val_loss": "validation loss", "val_top1": "validation top-1",
                "val_top2": "validation top-2",
                "batches_loss": "loss of the final weights on the run's batches (the papers' measure)"}
BATCHES_LOSS = "batches_loss"  # Run.batches["loss"], runner.final_batches_loss: where a suite has papers_measure
BATCHES_HEADER = "final weights' loss on the run's batches"


SCRATCH_DIR = "runs"  # the repository's git-ignored directory of run outputs: never committed


def checkpoint_states(results: Mapping[str, Any], repo_root: str | os.PathLike[str] | None = None
                      ) -> list[tuple[str, Mapping[str, Any], str]]:
    """(label, record, state) for each checkpoint the result recorded (``meta["checkpoints"]``, written by
    ``run_suite``), where state is ``"current"`` (the weights at the recorded path are the ones evaluated),
    ``"stale"`` (they have been replaced since: rerun the suite), ``"missing"`` (a path in the repository that no
    longer holds a checkpoint) or ``"uncommitted"`` (under ``runs/`` or outside the repository: not checkable)."""
    repo_root = CHECKPOINT_ROOT.parent if repo_root is None else repo_root
    states = []
    for label, record in results["meta"].get("checkpoints", {}).items():
        path = Path(record["path"])
        if path.is_absolute() or path.parts[:1] == (SCRATCH_DIR,):
            state = "uncommitted"
        elif not (Path(repo_root) / path / WEIGHTS_FILE).is_file():
            state = "missing"
        else:
            now = fingerprint(Path(repo_root) / path)["weights_sha256"]
            state = "current" if now == record["weights_sha256"] else "stale"
        states.append((label, record, state))
    return states


SPLITS = ("test", "val")
METRIC_KEYS = ("loss", "top1", "top2")


# ----------------------------------------------------------------------------------------------------------------------
# Statistics


def mean_se(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, standard error (sample std / √n; nan for n < 2) and n over the finite ``values``."""
    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(finite) / n
    if n < 2:
        return mean, float("nan"), n
    var = sum((v - mean) ** 2 for v in finite) / (n - 1)
    return mean, math.sqrt(var / n), n


def metric(run: Run, name: str) -> float:
    """A final value of ``run``: ``train_loss`` or ``<split>_<key>`` (``test_top1``; ``batches_loss``: the papers'
    measure, ``Run.batches``); nan where it does not apply."""
    if name == "train_loss":
        return run.losses[-1] if run.losses else float("nan")
    split, _, key = name.partition("_")
    return float(getattr(run, split, {}).get(key, float("nan")))


def paired_wilcoxon(values: Sequence[float], reference: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of ``values`` against ``reference`` (paired, same order). Pairs with a
    non-finite member are dropped; identical samples give p = 1; fewer than one pair gives nan."""
    from scipy.stats import wilcoxon

    pairs = [(a, b) for a, b in zip(values, reference) if math.isfinite(a) and math.isfinite(b)]
    if not pairs:
        return float("nan")
    if all(a == b for a, b in pairs):
        return 1.0
    return float(wilcoxon([a for a, _ in pairs], [b for _, b in pairs]).pvalue)


def _groups(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.task, run.optimizer), []).append(run)
    return groups


def significance(runs: Sequence[Run], reference_of: Callable[[str], str | None], compare: str = "train_loss"
                 ) -> list[dict[str, Any]]:
    """For every task and optimizer with a reference present on that task: the Wilcoxon p-value of the final
    ``compare`` values (:func:`metric`) against the reference's, paired by seed, and the mean paired difference
    (optimizer − reference)."""
    groups = _groups(runs)
    results = []
    for (task, label), group in groups.items():
        reference = reference_of(label)
        if reference is None or reference == label or (task, reference) not in groups:
            continue
        by_seed = {r.seed: metric(r, compare) for r in groups[(task, reference)]}
        paired = [(metric(r, compare), by_seed[r.seed]) for r in group if r.seed in by_seed]
        ours, theirs = [a for a, _ in paired], [b for _, b in paired]
        diffs = [a - b for a, b in paired if math.isfinite(a - b)]
        results.append({"task": task, "optimizer": label, "reference": reference, "metric": compare,
                        "n": len(diffs), "p": paired_wilcoxon(ours, theirs),
                        "mean_difference": sum(diffs) / len(diffs) if diffs else float("nan")})
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Markdown


def _cell(values: Sequence[float], digits: int) -> str:
    """mean ± s.e. over the finite values; non-finite ones (diverged runs) are counted; "–" where nothing applies."""
    if not values:
        return "–"
    mean, se, n = mean_se(values)
    if n == 0:
        return f"diverged ({len(values)}/{len(values)})"
    text = f"{mean:.{digits}f} ± {se:.{digits}f}"
    if n < len(values):
        text += f" ({len(values) - n}/{len(values)} diverged)"
    return text


def markdown_table(runs: Sequence[Run], reference: str | None = None,
                   references: Mapping[str, str] | None = None, compare: str = "train_loss") -> str:
    """Per task × optimizer: final training loss, beside it the papers' measure where runs have it
    (``batches_loss``), the held-out loss / top-1 / top-2 of each evaluated split (mean ± s.e. over seeds), seconds
    per update and, when a ``reference`` (or per-label ``references``) is given, the Wilcoxon p-value of the final
    ``compare`` values against it."""
    splits = [s for s in SPLITS if any(getattr(r, s) for r in runs)]
    keys = {s: [k for k in METRIC_KEYS if any(k in getattr(r, s) for r in runs)] for s in splits}
    measured = any("loss" in r.batches for r in runs)
    header = ["task", "optimizer", "final train loss"] + ([BATCHES_HEADER] if measured else [])
    header += [f"{s} {k.replace('top', 'top-')}" for s in splits for k in keys[s]]
    header += ["s / update"]
    tested = reference is not None or bool(references)
    p_values = {}
    if tested:
        header.append(f"Wilcoxon p, {compare} (reference)")
        p_values = {(row["task"], row["optimizer"]): row for row in
                    significance(runs, lambda label: (references or {}).get(label, reference), compare)}
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (task, label), group in _groups(runs).items():
        cells = [task, label, _cell([metric(r, "train_loss") for r in group if r.losses], 4)]
        if measured:
            cells.append(_cell([metric(r, BATCHES_LOSS) for r in group if "loss" in r.batches], 4))
        for s in splits:
            for k in keys[s]:
                cells.append(_cell([metric(r, f"{s}_{k}") for r in group if k in getattr(r, s)],
                                   4 if k == "loss" else 3))
        cells.append(f"{sum(r.seconds_per_step for r in group) / len(group):.2e}")
        if tested:
            row = p_values.get((task, label))
            cells.append("reference" if row is None and label == (references or {}).get(label, reference)
                         else "–" if row is None else f"{row['p']:.3g} ({row['reference']})")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def higher_is_better(metric_name: str) -> bool:
    return metric_name.endswith(("top1", "top2"))


def sweep_points(runs: Sequence[Run], sweep: Sweep, task_x: Mapping[str, float | None]
                 ) -> list[dict[str, Any]]:
    """The sweep's points: panel, series, x, and the metric's mean ± s.e. over seeds (one per task × label)."""
    points = []
    for (task, label), group in _groups(runs).items():
        if sweep.over == "tasks":
            if task_x.get(task) is None:
                continue
            panel, series, x = sweep.metric, label, task_x[task]
        elif label in sweep.points:
            panel, (series, x) = task, sweep.points[label]
        else:
            continue
        mean, se, n = mean_se(metric(r, sweep.metric) for r in group)
        points.append({"panel": panel, "series": series, "x": x, "optimizer": label, "task": task, "mean": mean,
                       "se": se, "n": n, "runs": len(group)})
    return points


def sweep_table(points: Sequence[Mapping[str, Any]], sweep: Sweep) -> str:
    rows = [f"| panel | series | {sweep.axis} | {sweep.metric} (mean ± s.e.) | finite runs |", "|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["panel"], p["series"], p["x"])):
        rows.append(f"| {p['panel']} | {p['series']} | {p['x']:g} | {p['mean']:.4f} ± {p['se']:.4f} | "
                    f"{p['n']}/{p['runs']} |")
    return "\n".join(rows)


def tuned_table(tuned: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    rows = ["| task | optimizer | chosen lr | grid: mean final train loss on the tuning seeds |", "|---|---|---|---|"]
    for task, labels in tuned.items():
        for label, t in labels.items():
            grid = ", ".join(f"{lr:g}: {obj:.4f}" for lr, obj in zip(t["grid"], t["objective"]))
            rows.append(f"| {task} | {label} | {t['lr']:g} | {grid} |")
    return "\n".join(rows)


def lrs_opt_table(records: Sequence[Mapping[str, Any]], runs: Sequence[Run]) -> str:
    """Per LRS-OPT seed: its iterations, the objective E at the first and last, and its schedule's val top-1."""
    rows = ["| task | seed | outer iterations | E first → last | val top-1 of the schedule |",
            "|---|---|---|---|---|"]
    schedules = {(r.task, r.seed): r for r in runs if r.optimizer == "lrs-opt"}
    for rec in records:
        e = rec["val_losses"]
        span = f"{e[0]:.4f} → {e[-1]:.4f}" if e else "–"
        top1 = schedules[(rec["task"], rec["seed"])].val.get("top1", float("nan"))
        rows.append(f"| {rec['task']} | {rec['seed']} | {rec['outer_steps']} | {span} | {top1:.4f} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------------------
# Files


FLOAT32_KEY = "float32"       # a run record's list of its per-step fields written as float32 (see runs_to_json)
PER_STEP_FIELDS = ("losses", "lrs")


def _is_float32(values: Sequence[float]) -> bool:
    return all(not math.isfinite(v) or float(numpy.float32(v)) == v for v in values)


def _float32_text(values: Sequence[float]) -> list[float]:
    """The shortest decimal that reads back to the same float32 (numpy's repr), as a float: ``16.3377`` instead of
    ``16.33769989013672``. Non-finite values stay as they are."""
    return [float(str(numpy.float32(v))) if math.isfinite(v) else v for v in values]


def runs_to_json(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """JSON records of ``runs``. A per-step field (losses, lrs) whose every finite value is a float32 (the
    training losses and rates of float32 models) is written in float32's shortest decimal and named in the record's
    ``"float32"`` list; :func:`runs_from_json` restores the exact values. Lossless, and half the gzipped size of
    float64's 17 digits (hyperadam-table2-cpu: 3.7 → 2.0 MB). An empty ``batches`` (no papers' measure) and
    ``compiled=False`` are left out, so records are written as before those fields existed."""
    records = []
    for r in runs:
        record = dataclasses.asdict(r)
        if not record["batches"]:
            del record["batches"]
        if not record["compiled"]:
            del record["compiled"]
        narrow = [k for k in PER_STEP_FIELDS if record[k] and _is_float32(record[k])]
        for k in narrow:
            record[k] = _float32_text(record[k])
        if narrow:
            record[FLOAT32_KEY] = narrow
        records.append(record)
    return records


def runs_from_json(records: Sequence[Mapping[str, Any]]) -> list[Run]:
    """The :class:`Run` records of :func:`runs_to_json`'s output (keys that are not fields are ignored, fields
    that are not keys take their defaults: ``batches`` is empty in records written without it)."""
    fields = {f.name for f in dataclasses.fields(Run)}
    runs = []
    for r in records:
        values = {k: v for k, v in r.items() if k in fields}
        for k in r.get(FLOAT32_KEY, ()):
            values[k] = [float(numpy.float32(v)) for v in values[k]]
        runs.append(Run(**values))
    return runs


def json_text(payload: Mapping[str, Any]) -> str:
    """How results are written. Python's json writes non-finite losses of diverged runs as NaN / Infinity, which
    json.loads reads back."""
    return json.dumps(payload, indent=1, default=str) + "\n"


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json_text(payload))


def write_csvs(out: Path, runs: Sequence[Run]) -> list[Path]:
    """``steps.csv`` (one row per run and step: loss, and lr where recorded), ``finals.csv`` (one row per run: final
    training loss, beside it ``batches_loss`` where runs have the papers' measure, seconds per update, held-out
    metrics) and, where periodic evaluations exist, ``evals.csv``."""
    written = []
    with open(out / "steps.csv", "w", newline="") as f:
        writer = csv.writer(f)
        with_lr = any(r.lrs is not None for r in runs)
        writer.writerow(["task", "optimizer", "seed", "step", "loss"] + (["lr"] if with_lr else []))
        for r in runs:
            for t, loss in enumerate(r.losses):
                lr = [r.lrs[t] if r.lrs is not None else ""] if with_lr else []
                writer.writerow([r.task, r.optimizer, r.seed, t, repr(loss)] + [repr(x) if x != "" else x for x in lr])
    written.append(out / "steps.csv")
    columns = [f"{s}_{k}" for s in SPLITS for k in METRIC_KEYS if any(k in getattr(r, s) for r in runs)]
    beside = [BATCHES_LOSS] if any("loss" in r.batches for r in runs) else []
    with open(out / "finals.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "optimizer", "seed", "final_train_loss", *beside, "seconds_per_step", *columns])
        for r in runs:
            measure = [metric(r, c) for c in beside]
            values = [metric(r, c) for c in columns]
            writer.writerow([r.task, r.optimizer, r.seed, repr(metric(r, "train_loss")),
                             *("" if math.isnan(v) else repr(v) for v in measure), repr(r.seconds_per_step),
                             *("" if math.isnan(v) else repr(v) for v in values)])
    written.append(out / "finals.csv")
    if any(r.curve for r in runs):
        keys = sorted({k for r in runs for point in r.curve for k in point if k != "step"})
        with open(out / "evals.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["task", "optimizer", "seed", "step", *keys])
            for r in runs:
                for point in r.curve:
                    writer.writerow([r.task, r.optimizer, r.seed, point["step"], *(repr(point[k]) if k in point
                                                                                    else "" for k in keys)])
        written.append(out / "evals.csv")
    return written


# ----------------------------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg)

MAX_POINTS = 2000  # curves longer than this are drawn at every k-th step


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(n: int):
    plt = _pyplot()
    cols = 2 if n == 4 else min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG of at most 256 colours (rendered at 110 dpi, then quantized by Pillow, matplotlib's own
    image library): a third of the size of the full-colour file and the same to the eye, since a plot has few colours
    (measured on tlr-robustness's: 421 → 143 kB for the curves, 101 → 33 kB for the heatmaps), which keeps a committed
    results directory within its budget (:data:`metaopt.evaluate.results.MAX_COMMITTED_BYTES`)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    buffer.seek(0)
    with Image.open(buffer) as image:
        quantized = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                  dither=Image.Dither.NONE)
        quantized.save(path, format="PNG", optimize=True)
    return path


def _finish(plt, fig, axes, path: Path) -> Path:
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", frameon=False)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def _styles(labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A distinct look per label: matplotlib's ten default colours where they suffice; beyond ten (a full lineup
    has 14), tab20's colours with a marker and line style cycling apart, so no two labels share a look."""
    labels = list(dict.fromkeys(labels))
    if len(labels) <= 10:
        return {label: {"color": f"C{i}"} for i, label in enumerate(labels)}
    cmap = _pyplot().get_cmap("tab20")
    return {label: {"color": cmap(i % 20), "marker": "osD^v<>p*h"[i % 10], "linestyle": ("-", "--", ":")[i % 3]}
            for i, label in enumerate(labels)}


def plot_curves(runs: Sequence[Run], path: Path, title: str = "") -> Path:
    """Training loss per step: the mean over seeds with a ± standard-error band, log scale, one panel per task."""
    import numpy as np

    tasks = list(dict.fromkeys(r.task for r in runs))
    plt, fig, axes = _panels(len(tasks))
    groups = _groups(runs)
    styles = _styles([label for _, label in groups])
    for ax, task in zip(axes, tasks):
        for (t, label), group in groups.items():
            if t != task or not group[0].losses:
                continue
            losses = np.array([r.losses for r in group], dtype=float)
            losses[~np.isfinite(losses)] = np.nan
            stride = max(1, math.ceil(losses.shape[1] / MAX_POINTS))
            steps = np.arange(losses.shape[1])[::stride]
            losses = losses[:, ::stride]
            counts = np.sum(np.isfinite(losses), 0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.nanmean(np.where(counts > 0, losses, 0.0), 0)
                se = np.where(counts > 1, np.nanstd(losses, 0, ddof=1) / np.sqrt(np.maximum(counts, 1)), 0.0)
            style = {**styles[label], "marker": None}  # markers would hide the curve; colour and dash suffice
            line, = ax.plot(steps, mean, label=label, linewidth=1.2, **style)
            ax.fill_between(steps, np.maximum(mean - se, 1e-12), mean + se, color=line.get_color(), alpha=0.2,
                            linewidth=0)
        ax.set_yscale("log")
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
    if title:
        fig.suptitle(title)
    return _finish(plt, fig, axes, path)


def plot_sweep(points: Sequence[Mapping[str, Any]], sweep: Sweep, path: Path) -> Path:
    """The sweep's metric (mean ± s.e.) against its axis, one line per series, one panel per task."""
    panels = list(dict.fromkeys(p["panel"] for p in points)) or [sweep.metric]
    plt, fig, axes = _panels(len(panels))
    styles = _styles([p["series"] for p in points])
    for ax, panel in zip(axes, panels):
        series = list(dict.fromkeys(p["series"] for p in points if p["panel"] == panel))
        for name in series:
            pts = sorted((p for p in points if p["panel"] == panel and p["series"] == name), key=lambda p: p["x"])
            pts = [p for p in pts if math.isfinite(p["mean"])]
            if pts:
                ax.errorbar([p["x"] for p in pts], [p["mean"] for p in pts],
                            yerr=[0.0 if math.isnan(p["se"]) else p["se"] for p in pts], capsize=3, label=name,
                            **{"marker": "o", **styles[name]})
        if sweep.log_x:
            ax.set_xscale("log")
        ax.set_title(panel)
        ax.set_xlabel(sweep.axis)
        ax.set_ylabel(sweep.metric)
    return _finish(plt, fig, axes, path)


def heatmap_grids(points: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[str], list[float], list[list[float]]]]:
    """Per series of the sweep's points: its panels (rows: the tasks), its x values (columns) and the mean of each
    cell (nan where the series has no finite mean there)."""
    grids = {}
    for series in dict.fromkeys(p["series"] for p in points):
        mine = [p for p in points if p["series"] == series]
        rows = list(dict.fromkeys(p["panel"] for p in mine))
        cols = sorted({p["x"] for p in mine})
        cell = {(p["panel"], p["x"]): p["mean"] for p in mine}
        grids[series] = (rows, cols, [[cell.get((r, c), math.nan) for c in cols] for r in rows])
    return grids


def plot_heatmaps(points: Sequence[Mapping[str, Any]], sweep: Sweep, path: Path) -> Path:
    """One heatmap per series (TLR Figs. 1-2): tasks down, the sweep's axis across, the cell's mean metric written in
    it and coloured on one scale shared by every panel (logarithmic for losses), so that a method whose result does
    not depend on the grid shows one colour; cells without a finite mean (diverged) are grey."""
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    grids = heatmap_grids(points)
    plt, fig, axes = _panels(max(len(grids), 1))
    values = np.array([v for _, _, cells in grids.values() for row in cells for v in row], dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size and not higher_is_better(sweep.metric) and finite.min() > 0:
        norm = LogNorm(finite.min(), max(finite.max(), finite.min() * 1.0001))
    else:
        norm = Normalize(*(finite.min(), finite.max()) if finite.size else (0.0, 1.0))
    cmap = plt.get_cmap("viridis_r" if not higher_is_better(sweep.metric) else "viridis").with_extremes(bad="0.8")
    image, first_rows = None, None
    columns = 2 if len(grids) == 4 else min(len(grids), 3)  # as _panels lays them out
    for k, (ax, (series, (rows, cols, cells))) in enumerate(zip(axes, grids.items())):
        grid = np.ma.masked_invalid(np.array(cells, dtype=float))
        image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto")
        for i, row in enumerate(cells):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.3g}" if math.isfinite(v) else "–", ha="center", va="center", fontsize="small",
                        color="white" if math.isfinite(v) and norm(v) > 0.6 else "black")
        ax.set_xticks(range(len(cols)), [f"{c:g}" for c in cols])
        first_rows = rows if k == 0 else first_rows
        # the task names once per row of panels where every panel has the same tasks
        ax.set_yticks(range(len(rows)), rows if k % columns == 0 or rows != first_rows else [])
        ax.set_xlabel(sweep.axis)
        ax.set_title(series)
    fig.subplots_adjust(hspace=0.45, wspace=0.25)  # room for each row's axis label below it and the titles above
    if image is not None:
        fig.colorbar(image, ax=axes, label=sweep.metric, shrink=0.8)
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_schedules(runs: Sequence[Run], labels: Sequence[str], path: Path) -> Path:
    """The learning rate each step used (MARTHE Fig. 2 centre): ``labels`` on the smallest seed present, and every
    seed of ``lrs-opt`` (dashed, Fig. 2 left), one panel per task."""
    tasks = list(dict.fromkeys(r.task for r in runs if r.lrs is not None and r.optimizer in labels))
    plt, fig, axes = _panels(max(len(tasks), 1))
    for ax, task in zip(axes, tasks):
        chosen = [r for r in runs if r.task == task and r.optimizer in labels and r.lrs is not None]
        first = min(r.seed for r in chosen)
        for r in chosen:
            if r.optimizer == "lrs-opt":
                ax.plot(range(len(r.lrs)), r.lrs, label=f"lrs-opt seed {r.seed}", linewidth=1.0, linestyle="--")
            elif r.seed == first:
                ax.plot(range(len(r.lrs)), r.lrs, label=r.optimizer, linewidth=1.0)
        ax.set_title(f"{task} (seed {first})")
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
    return _finish(plt, fig, axes, path)
