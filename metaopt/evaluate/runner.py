"""Running optimizers on tasks: one seed at a time, all seeds of a learned optimizer at once, learning-rate tuning on
separate seeds, and LRS-OPT.

Every optimizer sees identical initial weights and identical training minibatches per seed: the weights come from
``Generator(seed)`` and the batches from a second generator seeded from it (:func:`seeded_generators`), on the task's
device; methods with a validation objective (MARTHE, RTHO, HD-val) draw their validation minibatches from a third
(:func:`validation_generator`). Tuning uses seeds ``TUNE_SEED_OFFSET + i``, disjoint from the evaluation seeds
0, 1, ….

A ``LearnedOptimizer`` runs every seed of a task in one ``torch.func.vmap`` call per step over stacked parameters and
states (``functional_call`` gradients and the optimizer's functional ``update``; :func:`train_batched`), which equals
the per-seed loop through its ``torch.optim`` face (tested). Hand-designed optimizers, learners with BatchNorm buffers
or dropout, and learned rules that need oracles (``needs_oracles``: a Hessian-vector product and a validation
gradient) run per seed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_map

import meta_tasks
import metaopt
from meta_tasks.base import Batch, Task
from meta_tasks.datasets import Split
from meta_tasks.tasks import SineRegressionTask, SupervisedTask
from metaopt.core import step_needs
from metaopt.environment import time_left
from metaopt.evaluate.suites import LrsOpt, Suite, TaskSpec, as_spec
from metaopt.external import evaluation_mode
from metaopt.hypergrad.lrs_opt import optimize_schedule
from metaopt.learned import LEARNED_NAMES, LearnedOptimizer, from_pretrained
from metaopt.tree import stack, unstack

TUNE_SEED_OFFSET = 10_000     # tuning seeds: 10_000, 10_001, … (never an evaluation seed)
LRS_BATCH_SEED_OFFSET = 20_000  # LRS-OPT's fresh minibatches per outer iteration
SUBSET_SEED = 0               # the fixed random training subset of TaskSpec.train_size


@dataclasses.dataclass
class Run:
    """One optimizer on one task from one seed.

    ``losses[t]`` is the training loss on step t's minibatch *before* update t (so ``losses[0]`` is the same for every
    optimizer); ``test`` / ``val`` hold the held-out metrics after the last step (``loss``, and ``top1`` / ``top2``
    for classification); ``curve`` the periodic held-out evaluations (``{"step": t, "test_top1": …}``); ``lrs`` the
    learning rate each step used when recorded; ``hparams`` what the optimizer was built with; ``batches`` the
    papers' measure where the suite asks for it (``{"loss": …}``, :func:`final_batches_loss`: the loss of the final
    weights averaged over the run's training minibatches; empty otherwise, and in results written before it existed).
    """

    optimizer: str
    task: str
    seed: int
    losses: list[float]
    seconds_per_step: float
    test: dict[str, float]
    val: dict[str, float] = dataclasses.field(default_factory=dict)
    curve: list[dict[str, float]] = dataclasses.field(default_factory=list)
    lrs: list[float] | None = None
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    batched: bool = False
    batches: dict[str, float] = dataclasses.field(default_factory=dict)


def seeded_generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """The generators of the initial weights and of the training minibatches for ``seed``."""
    init_gen = torch.Generator(device=device).manual_seed(seed)
    batch_gen = torch.Generator(device=device).manual_seed(10_000_019 * (seed + 1))
    return init_gen, batch_gen


def validation_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator of the validation minibatches for ``seed`` (MARTHE's hypergradient objective): a stream of its
    own, so that optimizers that take one see the same training minibatches as every other optimizer."""
    return torch.Generator(device=device).manual_seed(10_000_019 * (seed + 1) + 7)


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


def learned_instance(source: Any, device: torch.device | str) -> LearnedOptimizer | None:
    """The ``LearnedOptimizer`` behind ``source`` (an instance, a checkpoint directory or a learned name), else None."""
    if isinstance(source, LearnedOptimizer):
        return source
    if isinstance(source, os.PathLike) or (isinstance(source, str) and source not in metaopt.OPTIMIZERS
                                             and Path(source).is_dir()) or source in LEARNED_NAMES:
        return from_pretrained(source, map_location=device)
    return None


# ----------------------------------------------------------------------------------------------------------------------
# One seed


def _held_out(task: Task, params: dict[str, Tensor], buffers: dict[str, Tensor], splits: Sequence[str]
              ) -> dict[str, dict[str, float]]:
    with torch.no_grad():
        return {split: task.evaluate(params, split, buffers) for split in splits}


def final_batches_loss(task: Task, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], seed: int,
                       steps: int) -> float:
    """The papers' "final loss" of one run: the training loss of the final weights ``params`` averaged over the
    run's ``steps`` training minibatches, (1/T) Σ_t L(w_T; batch_t) — HyperAdam Table 1's measure in the authors'
    code (``../shared/specs/hyperadam-official.md``, Evaluation), beside :attr:`Run.losses` [-1], one minibatch's
    loss before the last update.

    The minibatches are replayed from the seed's training-batch generator (:func:`seeded_generators`), which the run
    drew only its training batches from, so they are the run's batches in order. Under ``no_grad``; the losses are
    summed on the task's device and read once. The loss is the training loss, in the learner's training mode:
    with BatchNorm each batch is normalized by its own statistics, as in training, and the running statistics that
    replay advances are a copy's (``buffers`` and the held-out metrics taken with them are unchanged); with dropout
    each replayed batch carries its seed, so the loss on batch t is taken under the same dropout mask as step t's
    training loss (the measure is then the dropout-on training loss of w_T, not a deterministic one).
    """
    _, batch_gen = seeded_generators(seed, task.device)
    scratch = {n: b.clone() for n, b in buffers.items()}
    with torch.no_grad():
        total = torch.zeros((), device=task.device)
        for _ in range(steps):
            total = total + task.loss(dict(params), task.sample_batch(batch_gen), scratch)
    return float(total / steps) if steps else float("nan")


def _curve_point(step: int, split: str, metrics: Mapping[str, float]) -> dict[str, float]:
    return {"step": step, **{f"{split}_{k}": v for k, v in metrics.items()}}


def train(task: Task, optimizer: str, hparams: Mapping[str, Any], seed: int, steps: int, source: Any = None, *,
          splits: Sequence[str] = ("test",), eval_every: int = 0, record_lr: bool = False,
          schedule: Sequence[float] | None = None, papers_measure: bool = False) -> Run:
    """Train ``task`` with ``optimizer`` for ``steps`` steps from seed ``seed``; returns the per-step losses.

    ``optimizer`` labels the run; ``source`` (default: the label) is what ``metaopt.make_optimizer`` builds — a
    registered name, a checkpoint directory or a ``LearnedOptimizer``. Optimizers that differentiate the loss
    themselves (``requires_closure``: MARTHE, RTHO, HD-val, TLR-naive) get a closure returning the training loss, and
    one on a validation minibatch where their ``step`` takes ``val_closure``. ``splits`` are evaluated at the end (and
    the first of them every ``eval_every`` steps); ``schedule[t]`` overrides every group's learning rate at step t
    (LRS-OPT); ``record_lr`` keeps the rate each step used; ``papers_measure`` adds :func:`final_batches_loss` as
    ``Run.batches["loss"]``. Seconds per step time the update only (loss, backward, step), not batch sampling or
    evaluation. Held-out metrics and the papers' measure are taken in the optimizer's evaluation mode
    (:func:`metaopt.external.evaluation_mode`: Schedule-Free's x, DoG's average: the weights it returns), the
    per-step training losses in its train mode.
    """
    init_gen, batch_gen = seeded_generators(seed, task.device)
    params = {n: p.requires_grad_() for n, p in task.init(init_gen).items()}
    buffers = task.init_buffers()
    opt = metaopt.make_optimizer(optimizer if source is None else source, list(params.items()), **hparams)
    takes_closure, takes_val = step_needs(opt)
    val_gen = validation_generator(seed, task.device) if takes_val else None
    losses: list[float] = []
    lrs: list[float] | None = [] if record_lr else None
    curve: list[dict[str, float]] = []
    step_seconds = 0.0
    for t in range(steps):
        batch = task.sample_batch(batch_gen)
        val_batch = task.sample_batch(val_gen, split="val") if takes_val else None
        if schedule is not None:
            for group in opt.param_groups:
                group["lr"] = float(schedule[t])
        if lrs is not None:
            lrs.append(float(opt.param_groups[0]["lr"]))
        start = time.perf_counter()
        if takes_closure:
            def closure() -> Tensor:
                return task.loss(params, batch, buffers)

            kwargs = {"val_closure": lambda: task.loss(params, val_batch, buffers)} if takes_val else {}
            loss = opt.step(closure, **kwargs)
        else:
            opt.zero_grad(set_to_none=True)
            loss = task.loss(params, batch, buffers)
            loss.backward()
            opt.step()
        if task.device.type == "cuda":
            torch.cuda.synchronize(task.device)
        step_seconds += time.perf_counter() - start
        losses.append(float(loss.detach()))
        if eval_every and (t + 1) % eval_every == 0:
            detached = {n: p.detach() for n, p in params.items()}
            with evaluation_mode(opt):
                point = _held_out(task, detached, buffers, splits[:1])[splits[0]]
            curve.append(_curve_point(t + 1, splits[0], point))
    with evaluation_mode(opt):  # Schedule-Free's average x, DoG's averaged iterate: held out in eval mode
        final = {n: p.detach() for n, p in params.items()}
        metrics = _held_out(task, final, buffers, splits)
        batches = {"loss": final_batches_loss(task, final, buffers, seed, steps)} if papers_measure else {}
    return Run(optimizer, task.name, seed, losses, step_seconds / max(steps, 1), metrics.get("test", {}),
               metrics.get("val", {}), curve, lrs, dict(hparams), batches=batches)


# ----------------------------------------------------------------------------------------------------------------------
# All seeds at once (learned optimizers)


def can_batch(task: Task, lopt: LearnedOptimizer | None, hparams: Mapping[str, Any]) -> bool:
    """Whether ``lopt`` can run all seeds of ``task`` in one vmapped loop: a learned optimizer built only with
    ``lr``, that needs no oracles, on a learner without buffers (BatchNorm) or per-batch randomness (dropout)."""
    if lopt is None or getattr(lopt, "needs_oracles", False) or not set(hparams) <= {"lr"}:
        return False
    if task.init_buffers():
        return False
    return task.sample_batch(torch.Generator(device=task.device).manual_seed(0)).seed is None


def _where(keep: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(keep.view(-1, *([1] * (new.dim() - 1))), new, old)


def train_batched(task: Task, optimizer: str, lopt: LearnedOptimizer, hparams: Mapping[str, Any],
                  seeds: Sequence[int], steps: int, *, splits: Sequence[str] = ("test",), eval_every: int = 0,
                  record_lr: bool = False, papers_measure: bool = False) -> list[Run]:
    """:func:`train` for every seed at once: the same runs as the per-seed loop through the frozen ``torch.optim``
    face (same initial weights, batches, arithmetic; a seed whose gradient is not finite skips that step, as the face
    does), one ``vmap`` call of the loss gradient and of ``lopt.update`` per step. Needs :func:`can_batch`.
    ``seconds_per_step`` is the batched step's wall time divided by the number of seeds; ``papers_measure`` is
    :func:`final_batches_loss` of each seed's final weights, as :func:`train` computes it."""
    lr = hparams.get("lr")
    lopt = lopt.to(task.device)
    generators = [seeded_generators(seed, task.device) for seed in seeds]
    inits = [task.init(init_gen) for init_gen, _ in generators]
    params = stack(inits)
    state = stack([lopt.init(p) for p in inits])
    static_step = getattr(lopt, "static_step", None)  # Adam-based learned rules need the step count as an int
    first_step = None if static_step is None else static_step(state)
    loss_and_grad = vmap(grad_and_value(lambda p, b: task.loss(p, b)), in_dims=(0, Batch(0, 0, None)))
    k = len(seeds)
    losses: list[Tensor] = []
    curves: list[list[dict[str, float]]] = [[] for _ in seeds]
    step_seconds = 0.0
    for t in range(steps):
        batches = [task.sample_batch(batch_gen) for _, batch_gen in generators]
        batch = Batch(torch.stack([b.x for b in batches]), torch.stack([b.y for b in batches]))
        extra = {} if first_step is None else {"step": first_step + t}
        start = time.perf_counter()
        grads, loss = loss_and_grad(params, batch)
        with torch.no_grad():
            updates, new_state = vmap(lambda g, s, p: lopt.update(g, s, p, lr=lr, **extra))(grads, state, params)
            finite = torch.stack([torch.isfinite(g).reshape(k, -1).all(1) for g in grads.values()]).all(0)
            params = {n: _where(finite, p + updates[n], p) for n, p in params.items()}
            state = tree_map(lambda new, old: _where(finite, new, old), new_state, state)
        if task.device.type == "cuda":
            torch.cuda.synchronize(task.device)
        step_seconds += time.perf_counter() - start
        losses.append(loss.detach())
        if eval_every and (t + 1) % eval_every == 0:
            for curve, p in zip(curves, unstack(params, k)):
                curve.append(_curve_point(t + 1, splits[0], _held_out(task, p, {}, splits[:1])[splits[0]]))
    per_seed = torch.stack(losses, 1).tolist() if losses else [[] for _ in seeds]
    rate = float(lopt.lr if lr is None else lr)
    runs = []
    for i, (seed, p) in enumerate(zip(seeds, unstack(params, k))):
        metrics = _held_out(task, p, {}, splits)
        batches = {"loss": final_batches_loss(task, p, {}, seed, steps)} if papers_measure else {}
        runs.append(Run(optimizer, task.name, seed, per_seed[i], step_seconds / max(steps, 1) / k,
                        metrics.get("test", {}), metrics.get("val", {}), curves[i],
                        [rate] * steps if record_lr else None, dict(hparams), batched=True, batches=batches))
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# A grid of tasks × optimizers × seeds


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every run of a grid shares (``papers_measure``: :attr:`Suite.papers_measure`)."""

    steps: int
    splits: tuple[str, ...] = ("test",)
    eval_every: int = 0
    record_lr: bool = False
    batched: bool = True
    progress: bool = True
    papers_measure: bool = False


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
                learned[label] = learned_instance(source, task.device)
            lopt = learned[label]
            hparams = task_hparams({**base, **(tuned or {}).get(task_label, {}).get(label, {})}, source, spec, task)
            options = dict(splits=config.splits, eval_every=config.eval_every, record_lr=config.record_lr,
                           papers_measure=config.papers_measure)
            if config.batched and can_batch(task, lopt, hparams):
                group = train_batched(task, label, lopt, hparams, seeds, config.steps, **options)
            else:
                group = [train(task, label, hparams, seed, config.steps, lopt if lopt is not None else source,
                               **options) for seed in seeds]
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
                   eval_every: int | None = None, eval_size: int | None = None) -> list[Run]:
    """Every optimizer (label -> hyper-parameters) on every task of ``suite`` (or ``tasks``) for every seed, with
    identical initial weights and batches per seed. ``sources`` maps a label to what builds it when it is not the
    suite's registered name for it (a checkpoint directory or a ``LearnedOptimizer``); ``tuned[task][label]``
    overrides hyper-parameters per task; ``batched=False`` runs learned optimizers per seed too."""
    built = build_tasks(suite.task_specs if tasks is None else tasks, dataset, device, eval_size)
    config = RunConfig(steps or suite.steps, suite.splits, suite.eval_every if eval_every is None else eval_every,
                       suite.record_lr, batched, progress, papers_measure=suite.papers_measure)
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
                splits: Sequence[str] = ("val", "test"), progress: bool = True) -> tuple[list[Run], list[dict]]:
    """LRS-OPT on ``task`` for the first ``config.seeds`` of ``seeds``: from each seed's initial weights (those of
    the online methods), ``config.outer_steps`` iterations of projected gradient descent on the T = ``steps`` rates of
    SGD (:func:`metaopt.hypergrad.lrs_opt.optimize_schedule`), with E the loss on the whole validation split and
    fresh minibatches at every outer iteration (paper fn. 7). The optimized schedule is then run like any optimizer
    (the seed's batch stream) and returned as a Run labelled ``lrs-opt``, with the outer iterations' E values."""
    if not isinstance(task, SupervisedTask):
        raise ValueError(f"LRS-OPT needs a classification task with a validation split, got {task_label}")
    val_batch = Batch(*task.data.full("val"))
    runs, records = [], []
    for seed in list(seeds)[:config.seeds]:
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
                                    config.outer_steps, config.outer_lr)
        seconds = time.perf_counter() - start
        schedule = history.schedules[-1].tolist()
        run = train(task, "lrs-opt", {"lr": config.init_lr}, seed, steps, "sgd", splits=splits, record_lr=True,
                    schedule=schedule)
        run.task = task_label
        runs.append(run)
        records.append({"task": task_label, "seed": seed, "outer_steps": config.outer_steps,
                        "outer_lr": config.outer_lr, "val_losses": history.val_losses.tolist(),
                        "schedule": schedule, "seconds": seconds})
        if progress:
            print(f"  {task_label:16s} lrs-opt seed {seed}: {config.outer_steps} iterations in {seconds:.0f} s, "
                  f"final val top-1 {run.val.get('top1', float('nan')):.4f}", file=sys.stderr)
    return runs, records
