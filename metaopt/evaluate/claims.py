"""The papers' claims that the suites test, one verdict each, computed from the committed results.

Each :class:`Claim` names its suite, the paper's statement and numbers, and a check. :func:`judge` runs the check on
every committed result set of the suite (:func:`metaopt.evaluate.results.result_dirs`), taking each comparison from
the newest set that ran both optimizers on the task, so a suite run in pieces (by task or by optimizer) is judged
whole. A learned optimizer counts only where the set evaluated the checkpoint shipped under its label now
(``checkpoints/<label>``, same weights: :func:`metaopt.evaluate.report.checkpoint_states`); sets made with
``--quick`` never count. The verdict is one of:

* **holds** — every comparison the claim needs was run and went the paper's way (p < 0.05 where it says so);
* **does not hold** — a comparison that was run went the other way, with the size of the gap;
* **not testable here** — what the paper measured has no numeric counterpart here (the reason is given);
* **not run** — the comparisons the claim needs have no committed results yet (or only with replaced weights).

Every verdict says which result sets it used and how their protocol differs from the paper's (dataset, seeds).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import metaopt.evaluate.report as report
from metaopt.evaluate.runner import Run
from metaopt.evaluate.suites import SUITES, TLR_HD_BETAS

ALPHA = 0.05
# The two-sided exact Wilcoxon signed-rank test's smallest p-value with n pairs is 2 / 2^n: below 0.05 from n = 6 on
MIN_TEST_SEEDS = 6
GENERATED_TASKS = ("lstm-sine", "quadratic")  # task names whose data are generated: no image dataset to differ
HOLDS, FAILS, UNTESTABLE, NOT_RUN = "holds", "does not hold", "not testable here", "not run"


@dataclasses.dataclass
class ResultSet:
    """One committed result set: its directory, payload and runs grouped by (task, label)."""

    directory: Path
    results: Mapping[str, Any]
    groups: dict[tuple[str, str], dict[int, Run]]
    current: frozenset[str]  # labels whose recorded checkpoint is checkpoints/<label> with the weights there now

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.results["meta"]


@dataclasses.dataclass(frozen=True)
class Verdict:
    word: str            # HOLDS, FAILS, UNTESTABLE or NOT_RUN
    ours: str            # what we measured, in a few words
    used: tuple[str, ...] = ()  # the result sets the comparisons came from


Check = Callable[["Claim", Sequence[ResultSet]], Verdict]


@dataclasses.dataclass(frozen=True)
class Claim:
    """``text``: the paper's statement (``source``: where); ``paper``: its numbers; ``difference``: what differs
    here beyond the dataset and seeds, which :func:`protocol` reads from the result sets."""

    suite: str
    source: str
    text: str
    paper: str
    check: Check
    difference: str = ""
    paper_dataset: str | None = "mnist"  # the paper's image dataset (None: this project's own claim)


# ----------------------------------------------------------------------------------------------------------------------
# Reading the result sets


@functools.lru_cache(maxsize=64)
def _parsed(path: str, mtime_ns: int, size: int) -> tuple[Mapping[str, Any], dict[tuple[str, str], dict[int, Run]]]:
    """The payload of the results file at ``path`` and its runs grouped by (task, label) and seed, parsed once per
    version of the file (``mtime_ns`` and ``size`` are the key's part that changes when it is rewritten): the claims
    table judges every claim over the same directories, and parsing the committed sets is most of its time. Shared:
    callers must not modify what it returns."""
    results = report.read_results(Path(path).parent)
    groups: dict[tuple[str, str], dict[int, Run]] = {}
    for r in report.runs_from_json(results["runs"]):
        groups.setdefault((r.task, r.optimizer), {})[r.seed] = r
    return results, groups


def _read(directory: Path) -> tuple[Mapping[str, Any], dict[tuple[str, str], dict[int, Run]]]:
    path = report.results_file(directory)
    if path is None:
        report.read_results(directory)  # raises the FileNotFoundError that says what is missing
    stat = path.stat()
    return _parsed(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def load_sets(directories: Sequence[Path]) -> list[ResultSet]:
    """The result sets of ``directories``, newest first (by date, then name), without ``--quick`` ones."""
    sets = []
    for d in directories:
        results, groups = _read(Path(d))
        if results["meta"].get("quick"):
            continue
        suite = SUITES.get(results["meta"]["suite"])  # a set of a suite built in code has the default home
        home = "/".join(filter(None, ("checkpoints", suite.checkpoint_subdir if suite is not None else "")))
        current = frozenset(label for label, record, state in report.checkpoint_states(results)
                            if record["path"] == f"{home}/{label}" and state == "current")
        sets.append(ResultSet(Path(d), results, groups, current))
    return sorted(sets, key=lambda s: (s.meta["date"], s.name), reverse=True)


def shipped(result: ResultSet, label: str) -> bool:
    """Whether ``label`` in ``result`` is what its name promises: a hand-designed optimizer, or a learned one whose
    recorded checkpoint is ``checkpoints/<label>`` (``checkpoints/<suite's checkpoint_subdir>/<label>``) with the
    weights committed there now."""
    return label not in SUITES[result.meta["suite"]].learned or label in result.current


def pair(sets: Sequence[ResultSet], task: str, label: str, baseline: str, metric: str
         ) -> tuple[ResultSet, list[float], list[float]] | None:
    """From the newest set that ran both on ``task`` (each as :func:`shipped`), the final ``metric`` of each,
    paired by seed; None where no set did."""
    for s in sets:
        a, b = s.groups.get((task, label)), s.groups.get((task, baseline))
        if a and b and shipped(s, label) and shipped(s, baseline):
            seeds = sorted(a.keys() & b.keys())
            return s, [report.metric(a[k], metric) for k in seeds], [report.metric(b[k], metric) for k in seeds]
    return None


def _mean(values: Sequence[float]) -> float:
    return report.mean_se(values)[0]


def _better(a: float, b: float, metric: str) -> bool:
    if not math.isfinite(a):
        return False
    if not math.isfinite(b):
        return True
    return a > b if report.higher_is_better(metric) else a < b


def _gap(a: float, b: float, metric: str) -> str:
    """How far ``a`` is from ``b``: points for accuracies, percent for losses."""
    if report.higher_is_better(metric):
        return f"{100 * (a - b):+.2f} points"
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return "diverged" if not math.isfinite(a) else "n/a"
    return f"{100 * (a / b - 1):+.1f} %"


def _tasks(claim: Claim) -> list[str]:
    return [spec.label for spec in SUITES[claim.suite].task_specs]


def _metric(claim: Claim, metric: str | None) -> str:
    return metric or SUITES[claim.suite].compare


# ----------------------------------------------------------------------------------------------------------------------
# Checks


def beats(label: str, baselines: Sequence[str], *, need: int | None = None, metric: str | None = None,
          significance: bool = True) -> Check:
    """``label`` better than each of ``baselines`` (its mean final ``metric``, and p < 0.05 in the paired Wilcoxon
    test unless ``significance`` is off) on at least ``need`` of the suite's tasks (None: all)."""

    def check(claim: Claim, sets: Sequence[ResultSet]) -> Verdict:
        m, tasks = _metric(claim, metric), _tasks(claim)
        goal = len(tasks) if need is None else need
        parts, used, worst, underpowered = [], set(), None, []
        met, failed = True, False
        for b in baselines:
            wins, ran = 0, 0
            for t in tasks:
                found = pair(sets, t, label, b, m)
                if found is None:
                    continue
                s, ours, theirs = found
                used.add(s.name)
                if significance and len(ours) < MIN_TEST_SEEDS:  # no outcome could reach p < 0.05: not a test
                    underpowered.append(f"{b} on {t} ({len(ours)} seeds)")
                    continue
                ran += 1
                a_mean, b_mean = _mean(ours), _mean(theirs)
                win = _better(a_mean, b_mean, m) and all(math.isfinite(v) for v in ours) and (
                    not significance or report.paired_wilcoxon(ours, theirs) < ALPHA)
                wins += win
                if not win:
                    gap = (t, b, a_mean, b_mean)
                    if worst is None or _severity(gap, m) > _severity(worst, m):
                        worst = gap
            untested = any(u.startswith(f"{b} on ") for u in underpowered)
            parts.append(f"{b} {wins}/{ran}" if ran else f"{b} {'not tested' if untested else 'not run'}")
            met = met and wins >= goal
            failed = failed or (ran - wins) > len(tasks) - goal  # the goal is out of reach
        if not used:
            return Verdict(NOT_RUN, f"no committed run of {label} beside {', '.join(baselines)}")
        test = "p < 0.05" if significance else "mean only"
        ours = f"{label} better than " + ", ".join(parts) + f" tasks ({test})"
        if underpowered:
            ours += (f"; not tested, fewer than {MIN_TEST_SEEDS} paired seeds (no outcome reaches p < 0.05): "
                     + ", ".join(underpowered))
        if worst is not None:
            t, b, a_mean, b_mean = worst
            d = 3 if report.higher_is_better(m) else 4
            ours += f"; largest gap: {t}, {a_mean:.{d}f} vs {b} {b_mean:.{d}f} ({_gap(a_mean, b_mean, m)})"
        word = FAILS if failed else (HOLDS if met else NOT_RUN)
        return Verdict(word, ours, tuple(sorted(used)))

    return check


def _severity(gap: tuple[str, str, float, float], metric: str) -> float:
    _, _, a, b = gap
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return (b - a) if report.higher_is_better(metric) else (a / b if b else math.inf)


def matches(pairs: Sequence[tuple[str, str]], *, metric: str | None = None) -> Check:
    """Each ``(label, baseline)``: ``label`` at least matches ``baseline`` on every task (mean not worse, or no
    significant difference, over the seeds both ended finite; and no seed where ``label`` diverged and ``baseline``
    did not)."""

    def check(claim: Claim, sets: Sequence[ResultSet]) -> Verdict:
        m, tasks = _metric(claim, metric), _tasks(claim)
        parts, used, ok, complete, misses = [], set(), True, True, []
        for label, baseline in pairs:
            good, ran = 0, 0
            for t in tasks:
                found = pair(sets, t, label, baseline, m)
                if found is None:
                    complete = False
                    continue
                s, ours, theirs = found
                used.add(s.name)
                ran += 1
                a, b = _mean(ours), _mean(theirs)
                match = all(math.isfinite(x) or not math.isfinite(y) for x, y in zip(ours, theirs)) and (
                    not _better(b, a, m) or report.paired_wilcoxon(ours, theirs) >= ALPHA)
                good += match
                if not match:
                    misses.append(f"{label} on {t} ({_gap(a, b, m)} vs {baseline})")
            ok = ok and good == ran
            parts.append(f"{label} matches {baseline} on {good}/{ran} tasks run (of {len(tasks)})")
        if not used:
            return Verdict(NOT_RUN, "no committed run of " + ", ".join(f"{a} beside {b}" for a, b in pairs))
        ours = "; ".join(parts) + (f"; worse: {', '.join(misses)}" if misses else "")
        word = FAILS if not ok else (HOLDS if complete else NOT_RUN)
        return Verdict(word, ours, tuple(sorted(used)))

    return check


def interior_best(*, metric: str | None = None) -> Check:
    """The best point of the suite's sweep (mean final ``metric`` over seeds) lies strictly inside its range on
    every task (CAM-HD Fig. 2: the best fixed γ is neither 0 nor 1)."""

    def check(claim: Claim, sets: Sequence[ResultSet]) -> Verdict:
        suite = SUITES[claim.suite]
        m = _metric(claim, metric)
        xs = sorted({x for _, x in suite.sweep.points.values()})
        found, used = [], set()
        for t in _tasks(claim):
            for s in sets:
                means = {x: _mean([report.metric(r, m) for r in s.groups.get((t, label), {}).values()])
                         for label, (_, x) in suite.sweep.points.items()}
                if all(math.isfinite(v) for v in means.values()):
                    best = max(means, key=means.get) if report.higher_is_better(m) else min(means, key=means.get)
                    found.append((t, best, means))
                    used.add(s.name)
                    break
        if not found:
            return Verdict(NOT_RUN, f"no committed run of the whole {suite.sweep.axis} sweep")
        d = 3 if report.higher_is_better(m) else 4
        ours = "; ".join(f"{t}: best {suite.sweep.axis} {best:g} ({means[best]:.{d}f}; {xs[0]:g}: "
                         f"{means[xs[0]]:.{d}f}, {xs[-1]:g}: {means[xs[-1]]:.{d}f})" for t, best, means in found)
        interior = all(xs[0] < best < xs[-1] for _, best, _ in found)
        word = FAILS if not interior else (HOLDS if len(found) == len(_tasks(claim)) else NOT_RUN)
        return Verdict(word, ours, tuple(sorted(used)))

    return check


def least_sensitive(series: str, others: Sequence[str], *, metric: str = "train_loss") -> Check:
    """Across the suite's grid (initial learning rate × task, e.g. batch size), ``series``' mean final ``metric``
    spreads least: its max / min over the grid's cells is below each of ``others``' (TLR Figs. 1-2)."""

    def check(claim: Claim, sets: Sequence[ResultSet]) -> Verdict:
        suite = SUITES[claim.suite]
        spreads, used = {}, set()
        for name in (series, *others):
            labels = [label for label, (s, _) in suite.sweep.points.items() if s == name]
            cells = []
            for t in _tasks(claim):
                for label in labels:
                    for s in sets:
                        runs = s.groups.get((t, label))
                        if runs:
                            cells.append(_mean([report.metric(r, metric) for r in runs.values()]))
                            used.add(s.name)
                            break
            if len(cells) < len(labels) * len(_tasks(claim)):
                return Verdict(NOT_RUN, f"the {name} grid is incomplete ({len(cells)} of "
                                        f"{len(labels) * len(_tasks(claim))} cells)", tuple(sorted(used)))
            finite = [c for c in cells if math.isfinite(c)]
            spreads[name] = max(finite) / min(finite) if len(finite) == len(cells) and min(finite) > 0 else math.inf
        ours = f"max / min of the mean {report_name(metric)} over the grid: " + ", ".join(
            f"{name} {v:.2f}x" if math.isfinite(v) else f"{name} diverged" for name, v in spreads.items())
        ok = all(spreads[series] < spreads[o] for o in others)
        return Verdict(HOLDS if ok else FAILS, ours, tuple(sorted(used)))

    return check


def keeps_decreasing(label: str, *, tail: float = 0.1) -> Check:
    """No seed of ``label`` diverges, and its mean training loss over the last ``tail`` of the steps is below that
    over the ``tail`` before the midpoint, on every task (HyperAdam Figs. 6-7: 100x the meta-training horizon)."""

    def check(claim: Claim, sets: Sequence[ResultSet]) -> Verdict:
        parts, used, ok, complete = [], set(), True, True
        for t in _tasks(claim):
            s = next((s for s in sets if s.groups.get((t, label)) and shipped(s, label)), None)
            if s is None:
                complete = False
                continue
            used.add(s.name)
            runs = list(s.groups[(t, label)].values())
            diverged = sum(not all(math.isfinite(v) for v in r.losses) for r in runs)
            steps = len(runs[0].losses)
            w = max(1, int(tail * steps))
            mid = _mean([_mean(r.losses[steps // 2 - w:steps // 2]) for r in runs])
            end = _mean([_mean(r.losses[-w:]) for r in runs])
            ok = ok and diverged == 0 and end < mid
            parts.append(f"{t}: {diverged} of {len(runs)} seeds diverged, last-{w}-step loss {end:.4f} vs "
                         f"{mid:.4f} before the midpoint")
        if not used:
            return Verdict(NOT_RUN, f"no committed run of {label}")
        word = FAILS if not ok else (HOLDS if complete else NOT_RUN)
        return Verdict(word, "; ".join(parts), tuple(sorted(used)))

    return check


def all_of(*checks: Check) -> Check:
    """Every check's comparisons together: does not hold if one does not, else not run if one is not run."""

    def check(claim: Claim, sets: Sequence[ResultSet]) -> Verdict:
        verdicts = [c(claim, sets) for c in checks]
        word = next((w for w in (FAILS, NOT_RUN) if any(v.word == w for v in verdicts)), HOLDS)
        return Verdict(word, "; ".join(v.ours for v in verdicts),
                       tuple(sorted({u for v in verdicts for u in v.used})))

    return check


def untestable(why: str) -> Check:
    def check(claim: Claim, sets: Sequence[ResultSet]) -> Verdict:
        return Verdict(UNTESTABLE, why, tuple(s.name for s in sets))

    return check


def report_name(metric: str) -> str:
    return report.METRIC_NAMES.get(metric, metric)


# ----------------------------------------------------------------------------------------------------------------------
# The claims

_HYPERADAM_RIVALS = ("adam", "dm", "rnnprop")
_ABLATION_VARIANTS = tuple(label for label in SUITES["hyperadam-ablation"].optimizers if label != "hyperadam")

CLAIMS: tuple[Claim, ...] = (
    Claim("hyperadam-table1", "HyperAdam, Table 1",
          "HyperAdam below each of Adam, DMoptimizer and RNNprop on at least 3 of 4 activations (all but tanh)",
          "HyperAdam 0.33 / 0.29 / 0.28 / 0.36 vs Adam 0.35 / 0.32 / 0.31 / 0.34 (sigmoid / ReLU / ELU / tanh)",
          beats("hyperadam", _HYPERADAM_RIVALS, need=3), "Adam's rate tuned on a √2 grid here"),
    Claim("hyperadam-depth", "HyperAdam, Fig. 5d",
          "HyperAdam below Adam, DMoptimizer and RNNprop for 1 to 10 hidden layers",
          "a curve (no table)", beats("hyperadam", _HYPERADAM_RIVALS), "Adam's rate tuned on a √2 grid here"),
    Claim("hyperadam-table2", "HyperAdam, Table 2",
          "HyperAdam below Adam, DMoptimizer and RNNprop on the three LSTM tasks",
          "HyperAdam 0.42 / 0.19 / 0.26 vs Adam 0.65 / 0.39 / 0.51", beats("hyperadam", _HYPERADAM_RIVALS),
          "Adam's rate tuned on a √2 grid here"),
    Claim("hyperadam-cnn", "HyperAdam, Fig. 6a/b/e/f",
          "HyperAdam below Adam, DMoptimizer and RNNprop on CNN-1, CNN-2, CNN-1 with batch norm, CNN-2 with dropout",
          "curves (no table)", beats("hyperadam", _HYPERADAM_RIVALS),
          "the paper trained the batch-norm and dropout nets on CIFAR-10"),
    Claim("hyperadam-long", "HyperAdam, Figs. 6c/d, 7",
          "over 10,000 steps (100x the training horizon) HyperAdam does not diverge and keeps decreasing the loss",
          "curves (no table)", keeps_decreasing("hyperadam")),
    Claim("hyperadam-table3", "HyperAdam, Table 3",
          "HyperAdam's test loss after 10,000 steps below Adam's on CNN-1 and CNN-2",
          "test error (%) and loss per net (Table 3)", beats("hyperadam", ("adam",)),
          "top-1 / top-2 are in the suite's table"),
    Claim("hyperadam-ablation", "HyperAdam, Fig. 8",
          "the full HyperAdam (J = 20, LSTM, preprocessing, both tricks) beats every variant",
          "curves (no table)", beats("hyperadam", _ABLATION_VARIANTS),
          "each variant is meta-trained with one shared budget"),
    Claim("hypergrad-ffnn", "CAM-HD, Sec. 4.2 / Fig. 3",
          "CAM-HD-Adam reaches a higher held-out accuracy than Adam and Adam-HD on the three FFNNs",
          "curves (no table)", beats("cam-hd-adam", ("adam", "adam-hd"))),
    Claim("hypergrad-combination", "CAM-HD, Fig. 2",
          "the best fixed combination weight γ of global and layer / filter rates is interior, not 0 or 1",
          "best γ ≈ 0.5 (FFNN), 0.8 (LeNet-5), 0.6 (ResNet-18)", interior_best(),
          "ResNet-18 on CIFAR-10 is not in the CPU run"),
    Claim("hypergrad-lenet", "CAM-HD, Sec. 4.3 / Fig. 4",
          "CAM-HD above its base optimizer and its HD version in held-out accuracy on LeNet-5 (SGD and Adam)",
          "curves (no table)",
          all_of(beats("cam-hd-adam", ("adam", "adam-hd")), beats("cam-hd-sgd", ("sgd", "sgd-hd"))),
          "30 epochs and 10 trials are our choices"),
    Claim("tlr-robustness", "TLR, Figs. 1-2",
          "TLR's final loss is insensitive to the initial rate and batch size; SGD's and HD's are not",
          "heatmaps (no table)",
          least_sensitive("tlr", ("sgd", *(f"sgd-hd beta={b:g}" for b in TLR_HD_BETAS))),
          difference="4,000 updates at every batch size (our choice)"),
    Claim("marthe-schedules", "MARTHE, Fig. 2",
          "LRS-OPT's optimized schedule reaches a higher validation accuracy than the constant rate",
          "96.2 % vs 87.5 % on MNIST", beats("lrs-opt", ("sgd",), significance=False),
          "too few LRS-OPT seeds for a test: means only"),
    Claim("marthe-schedules", "MARTHE, Fig. 2",
          "MARTHE's online schedules resemble LRS-OPT's",
          "a plot", untestable("a likeness of curves; compare them in the suite's schedules.png")),
    Claim("learned-heldout", "this project (issue 12)",
          "the shipped HyperAdam, DMoptimizer and RNNprop at their own step size at least match Adam with its rate "
          "chosen in hindsight, on tasks no suite or meta-training family contains",
          "—", matches((("hyperadam", "adam"), ("dm", "adam"), ("rnnprop", "adam"))), paper_dataset=None),
    # issue 12's targets for the HyperAdam meta-trained on the broad `general` family (checkpoints/hyperadam-general)
    Claim("hyperadam-table1", "this project (issue 12), `hyperadam-general`",
          "the HyperAdam meta-trained on the broad family below tuned Adam on at least 3 of Table 1's 4 activations",
          "—", beats("hyperadam-general", ("adam",), need=3),
          "its meta-training family contains these four MLPs (as the paper's contained the sigmoid one)",
          paper_dataset=None),
    Claim("hyperadam-table2", "this project (issue 12), `hyperadam-general`",
          "the HyperAdam meta-trained on the broad family below tuned Adam on the three LSTM tasks",
          "—", beats("hyperadam-general", ("adam",)),
          "its meta-training family contains the one-layer LSTM sine task with 10 units (these have 20)",
          paper_dataset=None),
    Claim("learned-heldout", "this project (issue 12), `hyperadam-general`",
          "the HyperAdam meta-trained on the broad family at its own step size at least matches Adam with its rate "
          "chosen in hindsight, on tasks no suite or meta-training family contains",
          "—", matches((("hyperadam-general", "adam"),)), paper_dataset=None),
    Claim("learned-rules", "this project",
          "the learned γ and μ rules at least match CAM-HD-Adam and MARTHE on held-out tasks",
          "—", matches((("cam-hd-learned-gamma", "cam-hd-adam"), ("marthe-learned-mu", "marthe"))),
          paper_dataset=None),
)


# ----------------------------------------------------------------------------------------------------------------------
# Verdicts


def judge(claim: Claim, directories: Sequence[Path]) -> Verdict:
    """The claim's verdict from the suite's result sets among ``directories``."""
    return claim.check(claim, [s for s in load_sets(directories) if s.meta["suite"] == claim.suite])


def protocol(claim: Claim, verdict: Verdict, directories: Sequence[Path]) -> str:
    """How the result sets the verdict used differ from the paper's protocol: dataset, seeds, steps, LRS-OPT's seeds
    and iterations, plus the claim's note."""
    suite = SUITES[claim.suite]
    facts = []
    metas = [_read(Path(d))[0]["meta"] for d in directories if d.name in verdict.used]
    generated = all(spec.name.startswith(GENERATED_TASKS) for spec in suite.task_specs)
    datasets = sorted({m["dataset"] for m in metas if m["dataset"] != claim.paper_dataset})
    if datasets and not generated and claim.paper_dataset is not None:
        theirs = report.DATASET_NAMES.get(claim.paper_dataset, claim.paper_dataset)
        facts.append(", ".join(report.DATASET_NAMES.get(d, d) for d in datasets) + f" for {theirs}")
    seeds = sorted({len(m["seeds"]) for m in metas})
    if seeds and seeds != [suite.seeds]:
        facts.append(f"{'–'.join(map(str, seeds))} seeds (suite: {suite.seeds})")
    steps = sorted({m["steps"] for m in metas if m.get("steps") is not None})
    if steps and steps != [suite.steps]:
        facts.append(f"{'–'.join(f'{k:,}' for k in steps)} steps (suite: {suite.steps:,})")
    lrs = [r for d in directories if d.name in verdict.used for r in _read(Path(d))[0].get("lrs_opt", [])]
    if lrs and suite.lrs_opt is not None:
        iterations = sorted({r["outer_steps"] for r in lrs})
        facts.append(f"LRS-OPT: {len({(r['task'], r['seed']) for r in lrs})} seeds × "
                     f"{'–'.join(f'{k:,}' for k in iterations)} iterations (suite: {suite.lrs_opt.seeds} × "
                     f"{suite.lrs_opt.outer_steps:,})")
    if claim.difference:
        facts.append(claim.difference)
    return "; ".join(facts) or ("as the paper" if claim.paper_dataset is not None else "as the claim states")


def claims_table(directories: Sequence[Path]) -> str:
    """The Markdown table of every claim: the paper's statement and numbers, ours, the protocol here, the verdict."""
    rows = ["| claim | paper | ours | protocol here | verdict |", "|---|---|---|---|---|"]
    for claim in CLAIMS:
        verdict = judge(claim, directories)
        used = f" ({', '.join(f'`{u}`' for u in verdict.used)})" if verdict.used else ""
        rows.append(f"| {claim.source} (`{claim.suite}`): {claim.text} | {claim.paper} | {verdict.ours}{used} | "
                    f"{protocol(claim, verdict, directories) if verdict.used else '—'} | **{verdict.word}** |")
    return "\n".join(rows)
