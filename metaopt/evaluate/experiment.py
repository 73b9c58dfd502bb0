"""One suite end to end: choose its optimizers and tasks, find the learned optimizers' checkpoints, tune the
hand-designed baselines' learning rates on separate seeds, run every optimizer × task × seed, run LRS-OPT where the
suite asks for it, and write the results::

    from metaopt import evaluate
    from metaopt.learned import HyperAdam
    result = evaluate.run_suite("hyperadam-table1", seeds=10, sources={"hyperadam": HyperAdam()}, out="runs/eval")
    print(result.report)

A learned label (:attr:`Suite.learned`, or any label whose registered name is a learned optimizer) is built from
``sources[label]`` (a ``LearnedOptimizer`` instance or a checkpoint directory) or else from ``<checkpoints>/<label>/``
(default ``checkpoints/``, or ``$METAOPT_CHECKPOINTS``); a label with neither is reported with every other missing
one in a single :class:`MissingCheckpoints` error, or dropped and recorded with ``skip_missing=True``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import meta_tasks
import metaopt
import metaopt.evaluate.aggregate as aggregate
import metaopt.evaluate.report as report
from metaopt.environment import device_name
from metaopt.evaluate.journal import Journal, JournalMismatch
from metaopt.evaluate.runner import (TUNE_SEED_OFFSET, Run, RunConfig, Stopped, build_tasks, run_grid, run_lrs_opt,
                                     tune_learning_rates)
from metaopt.evaluate.suites import SUITES, Suite, TaskSpec
from metaopt.learned import LEARNED_NAMES
from metaopt.learned.base import CHECKPOINT_ROOT, CONFIG_FILE, WEIGHTS_FILE, checkpoint_root, fingerprint

QUICK_LRS_OUTER_STEPS = 2


class SelectionError(ValueError):
    """An optimizer, task or reference that the suite cannot resolve; the message lists the valid choices."""


class TimeLimitReached(RuntimeError):
    """``run_suite(max_minutes=...)`` stopped at its time limit; the finished run groups are journaled in ``out``
    (:mod:`metaopt.evaluate.journal`) and the same call continues them."""


class MissingCheckpoints(SelectionError):
    """Learned optimizers without a checkpoint or instance; ``missing`` maps each label to the directory looked at."""

    def __init__(self, suite: Suite, missing: Mapping[str, Path]):
        self.missing = dict(missing)
        lines = "\n".join(f"  {label}: no {CONFIG_FILE} + {WEIGHTS_FILE} in {path}" for label, path in missing.items())
        super().__init__(
            f"Suite {suite.name!r} needs checkpoints for {len(missing)} learned optimizer(s):\n{lines}\n"
            "Each label is loaded from <checkpoints>/<label>/ (--checkpoints DIR, default checkpoints/ or "
            "$METAOPT_CHECKPOINTS" + (f", under its {suite.checkpoint_subdir}/ subdirectory, which python -m "
                                      "metaopt.meta.ablation fills" if suite.checkpoint_subdir else "")
            + "); meta-train them with train_meta.py and save_pretrained there, pass instances "
            "through the API (run_suite(..., sources={label: LearnedOptimizer})), leave them out with --optimizers, "
            "or run the rest with --skip-missing.")


@dataclasses.dataclass
class SuiteResult:
    """Everything a suite run produced; ``report`` is the Markdown printed and written to ``table.md``."""

    suite: Suite
    runs: list[Run]
    meta: dict[str, Any]
    tuned: dict[str, dict[str, dict[str, Any]]]
    significance: list[dict[str, Any]]
    sweep: list[dict[str, Any]]
    lrs_opt: list[dict[str, Any]]
    skipped: dict[str, str]
    report: str
    files: list[Path] = dataclasses.field(default_factory=list)


def _is_checkpoint(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


# ----------------------------------------------------------------------------------------------------------------------
# Selection


def select_optimizers(suite: Suite, names: Sequence[str] | Mapping[str, Mapping[str, Any]] | None, quick: bool = False
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The labels to run with their hyper-parameters, and the sources they imply. ``names``: None (the suite's,
    thinned to ``quick_optimizers`` with ``quick``), a mapping label → hyper-parameters (used as given), or labels:
    the suite's, registered names (with the suite's hyper-parameters where it has them) or checkpoint directories."""
    if names is None:
        keep = suite.quick_optimizers if quick and suite.quick_optimizers else tuple(suite.optimizers)
        return {label: dict(suite.optimizers[label]) for label in keep}, {}
    if isinstance(names, Mapping):
        return {label: dict(h) for label, h in names.items()}, {}
    optimizers, sources, unknown = {}, {}, []
    for name in names:
        if name in suite.optimizers:
            optimizers[name] = dict(suite.optimizers[name])
        elif name in metaopt.OPTIMIZERS:
            optimizers[name] = {}
        elif Path(name).is_dir():
            optimizers[name], sources[name] = {}, name
        else:
            unknown.append(name)
    if unknown:
        raise SelectionError(f"Unknown optimizer(s) {unknown} for suite {suite.name!r}. Valid names: the suite's "
                             f"{', '.join(suite.optimizers)}; any of {', '.join(metaopt.OPTIMIZERS)}; or a checkpoint "
                             "directory")
    return optimizers, sources


def select_tasks(suite: Suite, names: Sequence[str] | None, quick: bool = False) -> list[TaskSpec]:
    """The suite's tasks (thinned to ``quick_tasks`` with ``quick``), or ``names``: suite task labels or any
    ``meta_tasks`` task name with its default options."""
    specs = {spec.label: spec for spec in suite.task_specs}
    if names is None:
        keep = suite.quick_tasks if quick and suite.quick_tasks else tuple(specs)
        return [specs[label] for label in keep]
    unknown = [n for n in names if n not in specs and n not in meta_tasks.TASKS]
    if unknown:
        raise SelectionError(f"Unknown task(s) {unknown} for suite {suite.name!r}. Valid names: the suite's "
                             f"{', '.join(specs)}; any of {', '.join(meta_tasks.TASKS)}")
    return [specs.get(n, TaskSpec(n, n)) for n in names]


def resolve_learned(suite: Suite, labels: Sequence[str], sources: Mapping[str, Any], checkpoints: Path | None,
                    skip_missing: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """Sources for the learned labels (``<checkpoints>/<label>``, or ``<checkpoints>/<source>`` for a label the suite
    maps to a learned name, where no source is given) and the skipped ones."""
    root = checkpoint_root() / suite.checkpoint_subdir if checkpoints is None else Path(checkpoints)
    resolved, missing = dict(sources), {}
    for label in labels:
        if label in resolved or not (label in suite.learned or suite.source_of(label) in LEARNED_NAMES):
            continue
        path = root / label
        if not _is_checkpoint(path) and suite.source_of(label) != label:  # "hyperadam tuned-lr": its source's weights
            path = root / suite.source_of(label)
        if _is_checkpoint(path):
            resolved[label] = str(path)
        else:
            missing[label] = path
    if missing and not skip_missing:
        raise MissingCheckpoints(suite, missing)
    return resolved, {label: f"no checkpoint in {path}" for label, path in missing.items()}


def reference_map(suite: Suite, labels: Sequence[str], reference: str | None) -> tuple[str, dict[str, str]]:
    """The global reference (``reference``, else the suite's, else the first label present) and each label's (its
    suite pair where present, else the global one)."""
    labels = list(labels)
    if reference is not None and reference not in labels:
        raise SelectionError(f"Reference {reference!r} is not among the optimizers run: {', '.join(labels)}")
    default = reference or (suite.reference if suite.reference in labels else labels[0])
    pairs = {label: (suite.references[label] if reference is None and suite.references.get(label) in labels
                     else default) for label in labels}
    return default, pairs


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__} instance>"


def repository_path(path: str | os.PathLike[str]) -> str:
    """``path`` relative to the repository when it lies inside it (how results name committed checkpoints, so that
    a clone elsewhere finds them), else absolute."""
    path = Path(path).resolve()
    root = CHECKPOINT_ROOT.parent.resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def checkpoint_fingerprints(sources: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """label → the path and :func:`metaopt.learned.base.fingerprint` of each source that is a checkpoint
    directory."""
    return {label: {"path": repository_path(source), **fingerprint(source)} for label, source in sources.items()
            if isinstance(source, (str, os.PathLike)) and _is_checkpoint(Path(source))}


# ----------------------------------------------------------------------------------------------------------------------
# The run


def run_suite(suite: Suite | str, *, optimizers: Sequence[str] | Mapping[str, Mapping[str, Any]] | None = None,
              tasks: Sequence[str] | None = None, seeds: int | Sequence[int] | None = None, steps: int | None = None,
              device: str = "cpu", dataset: str = "fashion-mnist", sources: Mapping[str, Any] | None = None,
              checkpoints: str | Path | None = None, skip_missing: bool = False, tune: bool | None = None,
              tune_seeds: int = 3, quick: bool = False, reference: str | None = None, batched: bool | None = None,
              eval_every: int | None = None, eval_size: int | None = None, lrs_outer_steps: int | None = None,
              lrs_outer_lr: float | None = None, lrs_seeds: int | None = None, out: str | Path | None = None,
              merge: bool = False, compile_learned: bool = False,
              max_minutes: float | None = None, progress: bool = True, command: Sequence[str] | None = None
              ) -> SuiteResult:
    """Run ``suite`` (a :class:`Suite` or a name in :data:`SUITES`) and, with ``out``, write its files.

    Args:
        optimizers, tasks: see :func:`select_optimizers` and :func:`select_tasks`.
        seeds: a count (seeds 0 … N−1; default the suite's) or the seeds themselves.
        steps: steps per run (default the suite's; also LRS-OPT's horizon T and the tuning runs' length).
        sources: label → ``LearnedOptimizer`` instance, checkpoint directory or registered name.
        checkpoints, skip_missing: where learned labels are looked for, and whether missing ones are dropped.
        tune: tune the suite's baselines' learning rates (default: where the suite has a grid) on ``tune_seeds``
            seeds ``10_000 …`` (on the evaluation seeds where the suite tunes in hindsight); the chosen rates are
            used for every evaluation seed of that task.
        quick: the suite's reduced optimizer and task lists, two rates per tuning grid, two LRS-OPT iterations.
        reference: the optimizer every other is tested against (default: the suite's pairs and reference).
        batched: run all seeds of a learned optimizer in one vmapped loop where possible (default: on CUDA only; on a
            2-core CPU the vmapped loop over 30 seeds was 3.6× slower than seed by seed, with the same results).
        compile_learned: step the coordinatewise learned optimizers (HyperAdam, DMoptimizer, RNNprop) that run seed by
            seed through their compiled face (``compile=True``: equal to the eager step within float32 rounding,
            one compilation per learner and parameter count, shared by its seeds, before the timed runs); otherwise
            their eager step (``compile=False``, not the face's ``"auto"``). Off by default here, where compiling
            (~20-40 s per learner and shape on a 2-core CPU) would outweigh a short run; the command line turns it
            on on a CPU (``--compile-learned``).
        eval_every, eval_size: periodic held-out evaluation (default the suite's) and held-out subset size.
        lrs_outer_steps, lrs_outer_lr, lrs_seeds: override LRS-OPT's iterations, step size and number of seeds
            (0: no LRS-OPT in this piece).
        out: directory for results.json, table.md, steps.csv, finals.csv, evals.csv and the PNG figures.
        merge: where ``out`` already holds results of this suite (same steps, dataset, held-out size), add these
            runs to them (:func:`merge_results`): a suite run in pieces, by task, optimizer or seed.
        max_minutes: stop after the run group (or LRS-OPT seed) that crosses this many minutes (raising
            :class:`TimeLimitReached`); with ``out``, the tuned rates, finished groups and LRS-OPT seeds are journaled
            there (:mod:`metaopt.evaluate.journal`) and the same call continues them, interrupted or stopped.
        command: the command line, recorded in the results.
    """
    started = time.monotonic()
    suite = SUITES[suite] if isinstance(suite, str) else suite
    previous = None
    if merge:
        if out is None:
            raise SelectionError("merge needs out: the results directory to add the runs to")
        if report.results_file(out) is not None:
            previous = report.read_results(out)
    seed_list = list(range(suite.seeds if seeds is None else seeds)) if not isinstance(seeds, Sequence) \
        else list(seeds)
    if not seed_list:
        raise SelectionError("at least one seed is needed")
    steps = steps or suite.steps
    batched = str(device).startswith("cuda") if batched is None else batched
    chosen, implied = select_optimizers(suite, optimizers, quick)
    specs = select_tasks(suite, tasks, quick)
    explicit = implied | dict(sources or {})
    learned_sources, skipped = resolve_learned(suite, list(chosen), explicit, checkpoints, skip_missing)
    chosen = {label: h for label, h in chosen.items() if label not in skipped}
    if not chosen:
        raise SelectionError(f"No optimizer left to run in suite {suite.name!r} (skipped: {sorted(skipped)})")
    all_sources = {label: suite.source_of(label) for label in chosen} | learned_sources
    default_ref, pairs = reference_map(suite, list(chosen), reference)

    if previous is not None:
        check_mergeable(previous["meta"], {"suite": suite.name, "steps": steps, "dataset": dataset,
                                           "eval_size": eval_size, "quick": quick, **_measure_key(suite)})
    tuned: dict[str, dict[str, dict[str, Any]]] = {}
    tune_seed_list = seed_list if suite.tune_in_hindsight else [TUNE_SEED_OFFSET + i for i in range(tune_seeds)]
    grids = {label: (grid[1::2] if quick else grid) for label, grid in suite.tune.items() if label in chosen}
    tuning = (bool(suite.tune) if tune is None else tune) and bool(grids)
    every = suite.eval_every if eval_every is None else eval_every
    lrs = None
    if suite.lrs_opt is not None:
        overrides = {"outer_steps": QUICK_LRS_OUTER_STEPS} if quick else {}
        overrides.update({k: v for k, v in (("outer_steps", lrs_outer_steps), ("outer_lr", lrs_outer_lr),
                                            ("seeds", lrs_seeds)) if v is not None})
        lrs = dataclasses.replace(suite.lrs_opt, **overrides)
    journal = None
    fingerprints = checkpoint_fingerprints({label: all_sources[label] for label in chosen})
    if out is not None:
        protocol = {"suite": suite.name, "steps": steps, "seeds": seed_list, "device": str(device),
                    "dataset": dataset, "tasks": [dataclasses.asdict(s) for s in specs], "optimizers": chosen,
                    "sources": {label: _describe(all_sources[label]) for label in chosen},
                    "checkpoints": fingerprints,
                    "tune": {"grids": grids, "seeds": tune_seed_list} if tuning else None, "quick": quick,
                    "batched": batched, "eval_every": every, "eval_size": eval_size, "merge": merge,
                    **_measure_key(suite),
                    **({"lrs_opt": dataclasses.asdict(lrs)} if lrs is not None else {})}
        try:
            journal = Journal(out, protocol)
        except JournalMismatch as err:
            raise SelectionError(str(err)) from None
        if journal.resumed and progress:
            print(f"resuming from {journal.path}: {len(journal.groups)} finished run group(s)"
                  + (", tuned rates" if journal.tuned else ""), file=sys.stderr)
    built = build_tasks(specs, dataset, device, eval_size)
    if tuning and journal is not None and journal.tuned is not None:
        tuned = journal.tuned
    elif tuning:
        tuned = tune_learning_rates(built, chosen, all_sources, grids, tune_seed_list, steps, progress,
                                    refine=not quick)
    if previous is not None:  # before the runs: a piece that cannot be merged is refused before it is computed
        check_tuned_rates(previous, tuned, seed_list)
    if journal is not None and journal.tuned is None:
        journal.record_tuned(tuned)
    config = RunConfig(steps, suite.splits, every, suite.record_lr, batched, progress,
                       papers_measure=suite.papers_measure, compile_learned=compile_learned)
    deadline = None if max_minutes is None else started + 60 * max_minutes
    stop = None if deadline is None else lambda: time.monotonic() > deadline

    def stopped_by_the_limit(stopped: Stopped, what: str) -> TimeLimitReached:
        kept = f"; the finished ones are journaled in {journal.path}" if journal is not None else \
            " (without --out nothing is kept)"
        return TimeLimitReached(f"{suite.name}: the time limit of {max_minutes:g} minutes stopped the suite after "
                                f"{stopped.done} of {stopped.total} {what}{kept}. Run the same command again to "
                                "continue.")

    try:
        runs = run_grid(built, chosen, all_sources, seed_list, config,
                        {t: {label: {"lr": v["lr"]} for label, v in labels.items()} for t, labels in tuned.items()},
                        finished=journal.groups if journal is not None else None,
                        on_group=journal.record_group if journal is not None else None, stop=stop)
    except Stopped as stopped:
        raise stopped_by_the_limit(stopped, "run groups") from None

    lrs_records: list[dict[str, Any]] = []
    if lrs is not None:
        for label, (spec, task) in built.items():
            try:
                lrs_runs, records = run_lrs_opt(label, spec, task, lrs, seed_list, steps, suite.splits, progress,
                                                finished=journal.lrs if journal is not None else None,
                                                on_seed=journal.record_lrs if journal is not None else None,
                                                stop=stop)
            except Stopped as stopped:
                raise stopped_by_the_limit(stopped, f"LRS-OPT seeds of {label}") from None
            runs.extend(lrs_runs)
            lrs_records.extend(records)
        if lrs_records:  # none with lrs_seeds=0
            pairs["lrs-opt"] = default_ref

    sweep = report.sweep_points(runs, suite.sweep, {s.label: s.x for s in specs}) if suite.sweep else []
    meta = {"suite": suite.name, "description": suite.description, "steps": steps, "seeds": seed_list,
            "device": device, "device_name": device_name(device),
            "torch": torch.__version__, "metaopt": metaopt.__version__, "dataset": dataset,
            "tasks": {s.label: {"name": s.name, "options": dict(s.options), "train_size": s.train_size}
                      for s in specs},
            "optimizers": chosen, "sources": {label: _describe(all_sources[label]) for label in chosen},
            "checkpoints": fingerprints,
            "reference": default_ref, "references": pairs, "compare": suite.compare,
            "tuned_on_seeds": tune_seed_list if tuned else [],
            "quick": quick, "eval_size": eval_size, "batched": batched, **_compile_key(compile_learned),
            "date": time.strftime("%Y-%m-%d"),
            "command": list(command) if command is not None else None, **_measure_key(suite)}
    if previous is not None:
        try:
            runs, meta, tuned, lrs_records, skipped = merge_results(previous, runs, meta, tuned, lrs_records,
                                                                    skipped)
        except SelectionError:
            if journal is not None:  # the same command would be refused again: its runs are of no use
                journal.remove()
            raise
        labels = [label for label in meta["optimizers"] if label != "lrs-opt"]
        meta["reference"], pairs = reference_map(suite, labels, reference)
        if any(r.optimizer == "lrs-opt" for r in runs):
            pairs["lrs-opt"] = meta["reference"]
        meta["references"] = pairs
        seed_list = meta["seeds"]
        task_x = {spec.label: spec.x for spec in suite.task_specs}
        sweep = report.sweep_points(runs, suite.sweep, task_x) if suite.sweep else []
        meta["tuned_on_seeds"] = tune_seed_list if tuned else []
    text = _report(suite, runs, meta["reference"], pairs, sweep, tuned, lrs_records, skipped, seed_list, steps)
    result = SuiteResult(suite, runs, meta, tuned, report.significance(runs, pairs.get, suite.compare), sweep,
                         lrs_records, skipped, text)
    if out is not None:
        result.files = write_outputs(result, Path(out))
        journal.remove()
    return result


# What a merged result set must share: runs of one suite with one protocol, so that every seed's weights and
# minibatches are the same whichever piece ran them (and every run has the papers' measure or none has).
MERGE_KEYS = ("suite", "steps", "dataset", "eval_size", "quick", "papers_measure")


def _measure_key(suite: Suite) -> dict[str, bool]:
    """``{"papers_measure": True}`` for a suite that computes the papers' measure, else nothing: a journal's protocol
    and a result's meta of every other suite stay as they were written before the measure existed (journals of
    interrupted runs continue, results read back unchanged)."""
    return {"papers_measure": True} if suite.papers_measure else {}


def _compile_key(compile_learned: bool) -> dict[str, bool]:
    """``{"compile_learned": True}`` in the meta of a result set whose learned optimizers ran compiled, else nothing
    (results written before the option existed read as before). Not part of a journal's protocol: the two faces
    differ by float32 rounding only, each run records its own (``Run.compiled``), so a suite begun on one face may be
    continued, or merged, on the other."""
    return {"compile_learned": True} if compile_learned else {}


def check_mergeable(previous: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Raise :class:`SelectionError` naming every protocol difference between two result sets' ``meta``."""
    differ = [f"{key} {previous.get(key)!r} there, {meta.get(key)!r} here" for key in MERGE_KEYS
              if previous.get(key) != meta.get(key)]
    if differ:
        raise SelectionError("Cannot merge into the results already in --out: " + "; ".join(differ) + ". Write to "
                             "another directory, or run with the same suite, --steps, --dataset, --eval-size and "
                             "--quick" + (" (a papers_measure difference: results written before the suite computed "
                                          "the papers' measure cannot be merged with runs that have it)"
                                          if any(d.startswith("papers_measure") for d in differ) else "") + ".")


def check_tuned_rates(previous: Mapping[str, Any], tuned: Mapping[str, Mapping[str, Any]], seeds: Sequence[int]
                      ) -> None:
    """Raise :class:`SelectionError` where a rate tuned now differs from the one tuned for runs that the merge would
    keep (those on other seeds)."""
    kept = {(r["task"], r["optimizer"]) for r in previous["runs"] if r["seed"] not in set(seeds)}
    clash = [f"{label} on {task} ({before[label]['lr']:g} there, {now['lr']:g} now)"
             for task, labels in tuned.items() for label, now in labels.items()
             if (task, label) in kept and label in (before := previous.get("tuned", {}).get(task, {}))
             and before[label]["lr"] != now["lr"]]
    if clash:
        raise SelectionError("Cannot merge: the learning rate differs from the kept runs' for " + ", ".join(clash)
                             + "; rerun those pairs for every seed, or write to another directory.")


def merge_results(previous: Mapping[str, Any], runs: Sequence[Run], meta: dict[str, Any],
                  tuned: Mapping[str, Any], lrs_records: Sequence[Mapping[str, Any]], skipped: Mapping[str, str]
                  ) -> tuple[list[Run], dict[str, Any], dict, list, dict]:
    """The runs of a results payload ``previous`` and the new ones as one set: a new run replaces the old one of the
    same (task, optimizer, seed); tasks, optimizers, seeds, sources, checkpoints and tuned rates are united (the
    new ones win), and the earlier commands are kept in ``meta["earlier_commands"]``. The caller recomputes the
    references over the united optimizers.

    A rate tuned anew must equal the one the kept runs used (tuning is on the same separate seeds, so it does
    unless the grid or the code changed): otherwise the set would mix two rates under one label, and the merge is
    refused."""
    old_meta = previous["meta"]
    new_keys = {(r.task, r.optimizer, r.seed) for r in runs}
    kept = [r for r in report.runs_from_json(previous["runs"]) if (r.task, r.optimizer, r.seed) not in new_keys]
    new_lr = {(r.task, r.optimizer): r.hparams.get("lr") for r in runs}
    clash = sorted({(r.task, r.optimizer) for r in kept
                    if (r.task, r.optimizer) in new_lr and r.hparams.get("lr") != new_lr[(r.task, r.optimizer)]})
    if clash:
        raise SelectionError("Cannot merge: the learning rate differs from the kept runs' for " + ", ".join(
            f"{o} on {t}" for t, o in clash) + " (retuned to another value); rerun those pairs for every seed, or "
            "write to another directory.")
    merged_tuned = {t: dict(v) for t, v in previous.get("tuned", {}).items()}
    for t, labels in tuned.items():
        merged_tuned.setdefault(t, {}).update(labels)
    all_runs = kept + list(runs)
    ran = {r.optimizer for r in all_runs}
    lrs_new = {(rec.get("task"), rec.get("seed")) for rec in lrs_records}
    merged = dict(meta)
    merged.update(
        seeds=sorted(set(old_meta["seeds"]) | set(meta["seeds"])),
        tasks=dict(old_meta["tasks"]) | meta["tasks"],
        optimizers=dict(old_meta["optimizers"]) | meta["optimizers"],
        sources=dict(old_meta.get("sources", {})) | meta["sources"],
        checkpoints=dict(old_meta.get("checkpoints", {})) | meta["checkpoints"],
        earlier_commands=[*old_meta.get("earlier_commands", []), old_meta.get("command")],
        date=max(old_meta["date"], meta["date"]))
    old_lrs = [rec for rec in previous.get("lrs_opt", []) if (rec.get("task"), rec.get("seed")) not in lrs_new]
    old_skipped = {label: why for label, why in previous.get("skipped", {}).items() if label not in ran}
    return all_runs, merged, merged_tuned, old_lrs + list(lrs_records), old_skipped | dict(skipped)


def _report(suite: Suite, runs: Sequence[Run], reference: str, pairs: Mapping[str, str],
            sweep: Sequence[Mapping[str, Any]], tuned: Mapping[str, Any], lrs_records: Sequence[Mapping[str, Any]],
            skipped: Mapping[str, str], seeds: Sequence[int], steps: int) -> str:
    parts = [f"## {suite.name}: {len(seeds)} seed{'s' * (len(seeds) != 1)}, {steps} steps (mean ± standard error "
             f"over seeds; Wilcoxon signed-rank test of the final {suite.compare} against the reference, paired by "
             "seed)",
             report.markdown_table(runs, reference, pairs, suite.compare)]
    if sweep:
        parts += [f"### Sweep over {suite.sweep.axis}: {suite.sweep.metric}", report.sweep_table(sweep, suite.sweep)]
    if tuned:
        where = "in hindsight, on the evaluation seeds" if suite.tune_in_hindsight else "on separate seeds"
        parts += [f"### Learning rates tuned {where}", report.tuned_table(tuned)]
    if lrs_records:
        parts += ["### LRS-OPT", report.lrs_opt_table(lrs_records, runs)]
    if skipped:
        parts += ["### Skipped", "\n".join(f"- {label}: {why}" for label, why in skipped.items())]
    return "\n\n".join(parts)


def write_outputs(result: SuiteResult, out: Path) -> list[Path]:
    """results.json, table.md, the CSV files and the figures (curves.png; sweep.png, heatmap.png and schedules.png
    where the suite has them), and aggregate.json / aggregate.png where Adam ran (:mod:`metaopt.evaluate.aggregate`)."""
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / report.RESULTS_FILE, {
        "meta": result.meta, "runs": report.runs_to_json(result.runs), "significance": result.significance,
        "tuned": result.tuned, "sweep": result.sweep, "lrs_opt": result.lrs_opt, "skipped": result.skipped})
    (out / "table.md").write_text(result.report + "\n")
    files = [out / report.RESULTS_FILE, out / "table.md", *report.write_csvs(out, result.runs)]
    files.append(report.plot_curves(result.runs, out / "curves.png", result.suite.name))
    if result.sweep:
        files.append(report.plot_sweep(result.sweep, result.suite.sweep, out / "sweep.png"))
        if result.suite.sweep.heatmap:
            files.append(report.plot_heatmaps(result.sweep, result.suite.sweep, out / "heatmap.png"))
    if any(r.lrs is not None for r in result.runs):
        files.append(report.plot_schedules(result.runs, _schedule_labels(result), out / "schedules.png"))
    if aggregate.write_suite(out) is not None:  # where Adam ran: IQM of normalized loss and speedup
        files += [out / aggregate.AGGREGATE_FILE, out / aggregate.AGGREGATE_PLOT]
    return files


def _schedule_labels(result: SuiteResult) -> list[str]:
    """Per sweep series, the label with the best sweep metric (MARTHE Fig. 2: "the value of β that achieves the best
    average final validation accuracy"), plus the runs outside the sweep and LRS-OPT."""
    labels = {r.optimizer for r in result.runs if r.lrs is not None}
    sweep = result.suite.sweep
    if not result.sweep or sweep is None:
        return sorted(labels)
    best: dict[str, tuple[float, str]] = {}
    sign = -1.0 if report.higher_is_better(sweep.metric) else 1.0
    for p in result.sweep:
        score = sign * p["mean"] if p["mean"] == p["mean"] else float("inf")
        if p["series"] not in best or score < best[p["series"]][0]:
            best[p["series"]] = (score, p["optimizer"])
    in_sweep = {p["optimizer"] for p in result.sweep}
    return sorted({label for _, label in best.values()} | (labels - in_sweep))
