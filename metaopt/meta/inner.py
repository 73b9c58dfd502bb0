"""The inner-loop engine: one optimizer training one task instance, the loop that serves meta-training's validation
(:meth:`metaopt.meta.trainer.MetaTrainer.validate`), evaluation (:mod:`metaopt.evaluate.runner`) and golden runs
(:mod:`metaopt.cards`).

* :func:`train` — one seed through the optimizer's ``torch.optim`` face, exactly as users run it (closures and a
  validation closure where its step takes them), returning a :class:`Run`;
* :func:`train_batched` — every seed of a ``LearnedOptimizer`` in one ``torch.func.vmap`` call per step over stacked
  parameters and states (``functional_call`` gradients and the optimizer's functional ``update``), equal to the
  per-seed loop through its frozen face (tested); :func:`can_batch` says when it applies (no oracles, no BatchNorm
  buffers, no dropout);
* :func:`seeded_generators` / :func:`validation_generator` — the seed's streams: the initial weights come from
  ``Generator(seed)``, the training minibatches from a second generator seeded from it, on the task's device, and the
  validation minibatches of methods with a validation objective (MARTHE, RTHO, HD-val) from a third, so every
  optimizer sees identical initial weights and identical training minibatches per seed;
* :func:`final_batches_loss` — the papers' "final loss", replaying the seed's training minibatches.

It sits below :mod:`metaopt.evaluate` (which re-exports these names) so that meta-training can validate θ without
importing the evaluation (``../shared/DESIGN.md``, "Architecture": imports flow one way).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_map

import metaopt
from meta_tasks.base import Batch, Task
from metaopt.core import step_needs
from metaopt.external import evaluation_mode
from metaopt.learned import LearnedOptimizer
from metaopt.tree import stack, unstack

__all__ = ["Run", "can_batch", "final_batches_loss", "seeded_generators", "train", "train_batched",
           "validation_generator"]


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
