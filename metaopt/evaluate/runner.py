"""Running optimizers on a suite's tasks: a grid of tasks × optimizers × seeds, learning-rate tuning on separate
seeds, and LRS-OPT.

The runs themselves are the inner-loop engine's (:mod:`metaopt.meta.inner`, re-exported here: :class:`Run`,
:func:`train`, :func:`train_batched`, :func:`can_batch`, :func:`seeded_generators`, :func:`validation_generator`,
:func:`final_batches_loss`): every optimizer sees identical initial weights and identical training minibatches per
seed, and a ``LearnedOptimizer`` runs every seed of a task in one vmapped loop where :func:`can_batch` allows
(equal to the per-seed loop through its ``torch.optim`` face, tested); hand-designed optimizers, learners with
BatchNorm buffers or dropout, and learned rules that need oracles run per seed. Tuning uses seeds
``TUNE_SEED_OFFSET + i``, disjoint from the evaluation seeds 0, 1, ….
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import meta_tasks
from meta_tasks.base import Batch, Task
from meta_tasks.datasets import Split
from meta_tasks.tasks import SineRegressionTask, SupervisedTask
from metaopt.checkpoint import learned_optimizer
from metaopt.environment import time_left
from metaopt.evaluate.suites import LrsOpt, Suite, TaskSpec, as_spec
from metaopt.hypergrad.lrs_opt import optimize_schedule
from metaopt.learned import CoordinatewiseOptimizer, LearnedOptimizer
from metaopt.meta.inner import (Run, can_batch, final_batches_loss, seeded_generators, train, train_batched,
                                validation_generator)

__all__ = ["LRS_BATCH_SEED_OFFSET", "SUBSET_SEED", "TUNE_SEED_OFFSET", "Run", "RunConfig", "Stopped", "build_task",
           "build_tasks", "can_batch", "evaluate_suite", "final_batches_loss", "run_grid",
           "run_lrs_opt", "seeded_generators", "task_hparams", "train", "train_batched", "tune_learning_rates",
           "validation_generator"]

TUNE_SEED_OFFSET = 10_000     # tuning seeds: 10_000, 10_001, … (never an evaluation seed)
LRS_BATCH_SEED_OFFSET = 20_000  # LRS-OPT's fresh minibatches per outer iteration
SUBSET_SEED = 0               # the fixed random training subset of TaskSpec.train_size


# ----------------------------------------------------------------------------------------------------------------------
# Tasks


def build_task(spec: str | TaskSpec, dataset: str = "fashion-mnist", device: str | torch.device = "cpu",
               eval_size: int | None = None) -> Task:
    """The task of ``spec`` on ``device``; ``eval_size`` keeps the first that many examples of each held-out split
    (a faster, noisier evaluation for smoke runs)."""
    spec = as_spec(spec)
    task = meta_tasks.get_task(spec.name, dataset=dataset, device=device, **dict(spec.options))
    if isinstance(task, SupervisedTask) and (spec.train_size is not None or eval_size is not None):
        data = task.data
        train = data.train
        if spec.train_size is not None:
            if not 0 < spec.train_size <= len(train):
                raise ValueError(f"{spec.label}: train_size {spec.train_size} not in [1, {len(train)}]")
            keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(SUBSET_SEED))
            keep = keep[:spec.train_size].sort().values.to(train.x.device)
            train = Split(train.x[keep], train.y[keep])
        held_out = {s: Split(getattr(data, s).x[:eval_size], getattr(data, s).y[:eval_size])
                    for s in ("val", "test") if eval_size is not None}
        data = dataclasses.replace(data, train=train, **held_out)
        task = SupervisedTask(task.name, task.learner, data, batch_size=task.batch_size, init_std=task.init_std)
    elif isinstance(task, SineRegressionTask) and eval_size is not None:
        task.eval_size = min(task.eval_size, eval_size)
    return task


def task_hparams(hparams: Mapping[str, Any], source: Any, spec: TaskSpec, task: Task) -> dict[str, Any]:
    """An optimizer's hyper-parameters on one task: the suite's, then the task's for that registered name. TLR's
    fractional ``window`` (a fraction p of an epoch, TLR App. D.1) gets this task's ``steps_per_epoch``."""
    merged = dict(hparams)
    if isinstance(source, str):
        merged.update(spec.hparams.get(source, {}))
    window = merged.get("window")
    if isinstance(window, float) and merged.get("steps_per_epoch") is None and isinstance(task, SupervisedTask):
        merged["steps_per_epoch"] = math.ceil(len(task.data.train) / task.batch_size)
    return merged


# ----------------------------------------------------------------------------------------------------------------------
# A grid of tasks × optimizers × seeds


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every run of a grid shares (``papers_measure``: :attr:`Suite.papers_measure`; ``compile_learned``: the
    coordinatewise learned optimizers run seed by seed step through their compiled face, ``compile=True``, else
    eagerly, ``compile=False``)."""

    steps: int
    splits: tuple[str, ...] = ("test",)
    eval_every: int = 0
    record_lr: bool = False
    batched: bool = True
    progress: bool = True
    papers_measure: bool = False
    compile_learned: bool = False


class Stopped(Exception):
    """:func:`run_grid` stopped before its last run group because ``stop()`` said so (a time limit); the groups it
    finished went to ``on_group``."""

    def __init__(self, done: int, total: int):
        super().__init__(f"stopped after {done} of {total} run groups")
        self.done, self.total = done, total


def run_grid(tasks: Mapping[str, tuple[TaskSpec, Task]], optimizers: Mapping[str, Mapping[str, Any]],
             sources: Mapping[str, Any], seeds: Sequence[int], config: RunConfig,
             tuned: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None, *,
             finished: Mapping[tuple[str, str], Sequence[Run]] | None = None,
             on_group: Callable[[list[Run]], None] | None = None, stop: Callable[[], bool] | None = None
             ) -> list[Run]:
    """Every optimizer label on every task for every seed. ``sources[label]`` builds the label (default: the label);
    ``tuned[task][label]`` overrides hyper-parameters per task. Runs carry the task *label*.

    ``finished[(task, label)]``: groups already run (a resumed suite, :mod:`metaopt.evaluate.journal`), taken as they
    are; ``on_group`` receives each group run here when it finishes; ``stop()`` is asked before each group, and
    :class:`Stopped` is raised when it answers True."""
    runs: list[Run] = []
    learned: dict[str, LearnedOptimizer | None] = {}
    finished = finished or {}
    total, started = len(tasks) * len(optimizers), time.monotonic()
    done = skipped = sum((t, label) in finished for t in tasks for label in optimizers)
    bar = None
    if config.progress and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total, initial=done, desc="evaluating", unit="run group", dynamic_ncols=True, leave=False)
    for task_label, (spec, task) in tasks.items():
        for label, base in optimizers.items():
            if (task_label, label) in finished:
                runs.extend(finished[(task_label, label)])
                continue
            if stop is not None and stop():
                if bar is not None:
                    bar.close()
                raise Stopped(done, total)
            source = sources.get(label, label)
            if label not in learned:
                learned[label] = learned_optimizer(source, task.device)
            lopt = learned[label]
            hparams = task_hparams({**base, **(tuned or {}).get(task_label, {}).get(label, {})}, source, spec, task)
            options = dict(splits=config.splits, eval_every=config.eval_every, record_lr=config.record_lr,
                           papers_measure=config.papers_measure)
            if config.batched and can_batch(task, lopt, hparams):
                group = train_batched(task, label, lopt, hparams, seeds, config.steps, **options)
            else:
                # compile_learned: the compiled face (else the default face's eager step, not its "auto"), compiled
                # for this task's shapes before the timed runs by a one-step run, dropped
                face = {"compile": config.compile_learned} if isinstance(lopt, CoordinatewiseOptimizer) else {}
                if config.compile_learned and face:
                    train(task, label, hparams, 0, 1, lopt, splits=(), face_options=face)
                group = [train(task, label, hparams, seed, config.steps, lopt if lopt is not None else source,
                               face_options=face, **options) for seed in seeds]
            for run in group:
                run.task = task_label
            runs.extend(group)
            if on_group is not None:
                on_group(group)
            done += 1
            if config.progress:
                finals = [r.losses[-1] for r in group if r.losses]
                mean = sum(finals) / len(finals) if finals else float("nan")
                line = f"  {task_label:16s} {label:28s} final loss {mean:.4f}"
                if bar is not None:
                    bar.write(line, file=sys.stderr)
                    bar.update(1)
                else:
                    left = time_left(time.monotonic() - started, done - skipped, total - skipped)
                    print(f"{line}  [{done}/{total}{', ' + left if left != 'done' else ''}]", file=sys.stderr)
    if bar is not None:
        bar.close()
    return runs


def build_tasks(specs: Sequence[str | TaskSpec], dataset: str, device: str | torch.device,
                eval_size: int | None = None) -> dict[str, tuple[TaskSpec, Task]]:
    return {as_spec(s).label: (as_spec(s), build_task(s, dataset, device, eval_size)) for s in specs}


def evaluate_suite(suite: Suite, optimizers: Mapping[str, Mapping[str, Any]], seeds: Sequence[int],
                   steps: int | None = None, device: str = "cpu", dataset: str = "fashion-mnist",
                   progress: bool = True, sources: Mapping[str, Any] | None = None, *,
                   tasks: Sequence[str | TaskSpec] | None = None,
                   tuned: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None, batched: bool = True,
                   eval_every: int | None = None, eval_size: int | None = None,
                   compile_learned: bool = False) -> list[Run]:
    """Every optimizer (label -> hyper-parameters) on every task of ``suite`` (or ``tasks``) for every seed, with
    identical initial weights and batches per seed. ``sources`` maps a label to what builds it when it is not the
    suite's registered name for it (a checkpoint directory or a ``LearnedOptimizer``); ``tuned[task][label]``
    overrides hyper-parameters per task; ``batched=False`` runs learned optimizers per seed too, through their
    compiled face with ``compile_learned`` (:class:`RunConfig`)."""
    built = build_tasks(suite.task_specs if tasks is None else tasks, dataset, device, eval_size)
    config = RunConfig(steps or suite.steps, suite.splits, suite.eval_every if eval_every is None else eval_every,
                       suite.record_lr, batched, progress, papers_measure=suite.papers_measure,
                       compile_learned=compile_learned)
    return run_grid(built, optimizers, {label: suite.source_of(label) for label in optimizers} | dict(sources or {}),
                    seeds, config, tuned)


# ----------------------------------------------------------------------------------------------------------------------
# Learning-rate tuning on separate seeds


def tune_learning_rates(tasks: Mapping[str, tuple[TaskSpec, Task]], optimizers: Mapping[str, Mapping[str, Any]],
                        sources: Mapping[str, Any], grids: Mapping[str, Sequence[float]], seeds: Sequence[int],
                        steps: int, progress: bool = True, refine: bool = True) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task and label in ``grids``: the learning rate with the lowest mean final training loss over ``seeds`` (a
    non-finite run counts as +inf; ties go to the smaller rate). With ``refine`` the grid's best rate is then flanked
    by its neighbours a factor √2 away (HyperAdam's authors tuned on a √2-spaced grid,
    ``../shared/specs/hyperadam-official.md``), so the chosen rate is within √2 of the grid's optimum rather than of
    a factor-3 step. Returns ``{task: {label: {"lr": chosen, "grid": [...], "objective": [...]}}}`` (every rate
    tried, sorted)."""
    chosen: dict[str, dict[str, dict[str, Any]]] = {}
    config = RunConfig(steps, splits=(), progress=False)

    def objective_of(task_label: str, label: str, lr: float) -> float:
        runs = run_grid({task_label: tasks[task_label]}, {label: {**optimizers[label], "lr": lr}}, sources, seeds,
                        config)
        finals = [r.losses[-1] for r in runs]
        return sum(finals) / len(finals) if all(map(math.isfinite, finals)) else math.inf

    for task_label in tasks:
        for label, grid in grids.items():
            tried = {lr: objective_of(task_label, label, lr) for lr in grid}
            if refine:
                best = min(tried, key=lambda lr: (tried[lr], lr))
                for lr in (best / math.sqrt(2), best * math.sqrt(2)):
                    if not any(math.isclose(lr, t, rel_tol=1e-9) for t in tried):
                        tried[lr] = objective_of(task_label, label, lr)
            rates = sorted(tried)
            best = min(rates, key=lambda lr: (tried[lr], lr))
            chosen.setdefault(task_label, {})[label] = {"lr": best, "grid": rates,
                                                        "objective": [tried[lr] for lr in rates]}
            if progress:
                print(f"  tuned {task_label:16s} {label:20s} lr = {best:g}", file=sys.stderr)
    return chosen


# ----------------------------------------------------------------------------------------------------------------------
# LRS-OPT (MARTHE Sec. 5)


def run_lrs_opt(task_label: str, spec: TaskSpec, task: Task, config: LrsOpt, seeds: Sequence[int], steps: int,
                splits: Sequence[str] = ("val", "test"), progress: bool = True, *,
                finished: Mapping[tuple[str, int], tuple[Run, dict]] | None = None,
                on_seed: Callable[[Run, dict], None] | None = None,
                stop: Callable[[], bool] | None = None) -> tuple[list[Run], list[dict]]:
    """LRS-OPT on ``task`` for the first ``config.seeds`` of ``seeds``: from each seed's initial weights (those of
    the online methods), ``config.outer_steps`` iterations of projected gradient descent on the T = ``steps`` rates of
    SGD (:func:`metaopt.hypergrad.lrs_opt.optimize_schedule`), with E the loss on the whole validation split and
    fresh minibatches at every outer iteration (paper fn. 7). The optimized schedule is then run like any optimizer
    (the seed's batch stream) and returned as a Run labelled ``lrs-opt``, with the outer iterations' E values.

    One seed takes tens of minutes on a CPU, so seeds are the unit a long run resumes by, as run groups are for
    :func:`run_grid`: ``finished[(task_label, seed)]`` is a seed's (run, record) already computed (a resumed suite),
    taken as it is; ``on_seed`` receives each seed's (run, record) when it finishes; ``stop()`` is asked before each
    seed, and :class:`Stopped` (counting seeds) is raised when it answers True."""
    if not isinstance(task, SupervisedTask):
        raise ValueError(f"LRS-OPT needs a classification task with a validation split, got {task_label}")
    val_batch = Batch(*task.data.full("val"))
    runs, records = [], []
    chosen = list(seeds)[:config.seeds]
    for done, seed in enumerate(chosen):
        if finished and (task_label, seed) in finished:
            run, record = finished[(task_label, seed)]
            runs.append(run)
            records.append(record)
            continue
        if stop is not None and stop():
            raise Stopped(done, len(chosen))
        init_gen, _ = seeded_generators(seed, task.device)
        model = copy.deepcopy(task.learner)  # w_0: the seed's initial weights, as every online method starts from
        initial = task.init(init_gen)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(initial[name])
        outer_gen = torch.Generator(device=task.device).manual_seed(LRS_BATCH_SEED_OFFSET + seed)

        # The losses go through the task (functional_call on its learner) at the unrolled weights.
        def train_loss(fmodel: Any, t: int) -> Tensor:
            return task.loss(fmodel.params, task.sample_batch(outer_gen))

        def val_loss(fmodel: Any) -> Tensor:
            return task.loss(fmodel.params, val_batch)

        base = torch.optim.SGD(model.parameters(), lr=config.init_lr)
        start = time.perf_counter()
        history = optimize_schedule(model, base, torch.full((steps,), config.init_lr), train_loss, val_loss,
                                    config.outer_steps, config.outer_lr, outer=config.outer)
        seconds = time.perf_counter() - start
        schedule = history.schedules[-1].tolist()
        run = train(task, "lrs-opt", {"lr": config.init_lr}, seed, steps, "sgd", splits=splits, record_lr=True,
                    schedule=schedule)
        run.task = task_label
        runs.append(run)
        records.append({"task": task_label, "seed": seed, "outer_steps": config.outer_steps,
                        "outer_lr": config.outer_lr, "outer": config.outer,
                        "val_losses": history.val_losses.tolist(),
                        "schedule": schedule, "seconds": seconds})
        if on_seed is not None:
            on_seed(run, records[-1])
        if progress:
            print(f"  {task_label:16s} lrs-opt seed {seed}: {config.outer_steps} iterations in {seconds:.0f} s, "
                  f"final val top-1 {run.val.get('top1', float('nan')):.4f}", file=sys.stderr)
    return runs, records
