"""The inner-loop engine: one optimizer training one task instance, the loop that serves meta-training's validation
(:meth:`metaopt.meta.trainer.MetaTrainer.validate`), evaluation (:mod:`metaopt.evaluate.runner`) and golden runs
(:mod:`metaopt.cards`).

* :func:`train` — one seed through the optimizer's ``torch.optim`` face, exactly as users run it (closures and a
  validation closure where its step takes them), returning a :class:`Run`;
* :class:`VmappedLoop` — K instances of a learned optimizer at once, their parameters and states stacked, one
  ``torch.func.vmap`` call of the optimizer's ``step`` per inner step (with the oracles, the grouping by step count of
  :func:`step_groups`, the fused cells and the non-finite skip): the loop of meta-training's unroll
  (:mod:`metaopt.meta.unroll`) and of
* :func:`train_batched` — every seed of a ``LearnedOptimizer`` in that loop, equal to the per-seed loop through its
  frozen face (tested); :func:`can_batch` says when it applies (no oracles, no BatchNorm buffers, no dropout);
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import checkpoint

import metaopt
from meta_tasks.base import Batch, Task
from metaopt.core import step_needs
from metaopt.external import evaluation_mode
from metaopt.learned import LearnedOptimizer
from metaopt.learned.base import CoordinatewiseOptimizer, FrozenLearnedOptimizer
from metaopt.learned.fused import flatten_coordinates, from_meta_layout, to_meta_layout
from metaopt.tree import stack, unstack

Params = dict[str, Tensor]

__all__ = ["Run", "VmappedLoop", "can_batch", "final_batches_loss", "seeded_generators", "step_groups", "train",
           "train_batched", "validation_generator"]


@dataclasses.dataclass
class Run:
    """One optimizer on one task from one seed.

    ``losses[t]`` is the training loss on step t's minibatch *before* update t (so ``losses[0]`` is the same for every
    optimizer); ``test`` / ``val`` hold the held-out metrics after the last step (``loss``, and ``top1`` / ``top2``
    for classification); ``curve`` the periodic held-out evaluations (``{"step": t, "test_top1": …}``); ``lrs`` the
    learning rate each step used when recorded; ``hparams`` what the optimizer was built with; ``batches`` the
    papers' measure where the suite asks for it (``{"loss": …}``, :func:`final_batches_loss`: the loss of the final
    weights averaged over the run's training minibatches; empty otherwise, and in results written before it existed);
    ``batched`` / ``compiled`` say which path stepped a learned optimizer (the vmapped loop of all seeds; the compiled
    face), both equal to the default face within float32 rounding.
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
    compiled: bool = False


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
          schedule: Sequence[float] | None = None, papers_measure: bool = False,
          face_options: Mapping[str, Any] | None = None) -> Run:
    """Train ``task`` with ``optimizer`` for ``steps`` steps from seed ``seed``; returns the per-step losses.

    ``optimizer`` labels the run; ``source`` (default: the label) is what ``metaopt.make_optimizer`` builds — a
    registered name, a checkpoint directory or a ``LearnedOptimizer``. Optimizers that differentiate the loss
    themselves (``requires_closure``: MARTHE, RTHO, HD-val, TLR-naive) get a closure returning the training loss, and
    one on a validation minibatch where their ``step`` takes ``val_closure``. ``splits`` are evaluated at the end (and
    the first of them every ``eval_every`` steps); ``schedule[t]`` overrides every group's learning rate at step t
    (LRS-OPT); ``record_lr`` keeps the rate each step used; ``papers_measure`` adds :func:`final_batches_loss` as
    ``Run.batches["loss"]``; ``face_options`` go to ``make_optimizer`` besides ``hparams`` without being recorded as
    the run's hyper-parameters (``compile=`` for a learned optimizer: the same optimizer, another face; the run
    records whether a compiled step ran, ``Run.compiled``). Seconds per step time the update only (loss, backward, step), not batch sampling or
    evaluation. Held-out metrics and the papers' measure are taken in the optimizer's evaluation mode
    (:func:`metaopt.external.evaluation_mode`: Schedule-Free's x, DoG's average: the weights it returns), the
    per-step training losses in its train mode.
    """
    init_gen, batch_gen = seeded_generators(seed, task.device)
    params = {n: p.requires_grad_() for n, p in task.init(init_gen).items()}
    buffers = task.init_buffers()
    opt = metaopt.make_optimizer(optimizer if source is None else source, list(params.items()),
                                 **{**hparams, **(face_options or {})})
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
               metrics.get("val", {}), curve, lrs, dict(hparams), batches=batches,
               compiled=isinstance(opt, FrozenLearnedOptimizer) and opt.compiled)



# ----------------------------------------------------------------------------------------------------------------------
# Many instances at once: the vmapped loop of meta-training's unroll and of the evaluation's batched seeds


def step_groups(lopt: LearnedOptimizer, states: Sequence[Any]) -> dict[int | None, list[int]]:
    """The indices of ``states`` (one per instance) grouped by ``lopt.static_step``: instances whose update needs the
    step count as a Python int run one :class:`VmappedLoop` per count (a single group, keyed ``None``, for an
    optimizer whose arithmetic does not depend on it)."""
    groups: dict[int | None, list[int]] = {}
    for i, state in enumerate(states):
        groups.setdefault(lopt.static_step(state), []).append(i)
    return groups


def _where(keep: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(keep.view(-1, *([1] * (new.dim() - 1))), new, old)


@dataclasses.dataclass
class VmappedLoop:
    """Inner steps of a learned optimizer on K instances at once: their parameters and optimizer states stacked along
    a leading dimension, every step one call of the stacked loss, one gradient and one ``torch.func.vmap`` call of
    ``lopt.step`` (the update protocol). The one vmapped loop of the code base: meta-training's truncated unroll
    (:func:`metaopt.meta.unroll.unroll`) and the evaluation's batched seeds (:func:`train_batched`) are this loop with
    their own options and per-step hook.

    ``loss_fn(params, batch)`` is the (K,) stacked training loss; ``sample(split)`` the next stacked batch of a split
    (``"train"``; ``"val"`` for the oracles, drawn before the step's training batch). The gradient of instance k is
    that of ``loss_fn(...).sum()`` with respect to its slice (the instances are independent). ``lr`` is the step size
    (default ``lopt.lr``); ``count`` the instances' common :meth:`~LearnedOptimizer.static_step` at the first step
    (:func:`step_groups`), passed on as ``step=count + i``.

    ``differentiable=True`` (meta-training) keeps the graph through every update: ``second_order`` differentiates
    through the inner gradients too (they are constants otherwise, as in learning-to-learn), ``recompute`` wraps each
    update in an activation checkpoint (its intermediates recomputed in the backward), ``fused`` steps a coordinatewise
    optimizer with a fused cell (:meth:`~metaopt.learned.base.CoordinatewiseOptimizer.fused_step`) on its state kept
    in the meta layout for the whole loop (``compile``: through ``torch.compile``), and optimizers that declare
    :attr:`~LearnedOptimizer.needs_oracles` get ``hvp=`` and ``val_grads=``. ``differentiable=False`` (evaluation)
    steps detached weights under ``no_grad`` and, like the ``torch.optim`` face, leaves an instance whose gradient is
    not finite where it was for that step (parameters and state).
    """

    lopt: LearnedOptimizer
    loss_fn: Callable[[Params, Batch], Tensor]
    sample: Callable[[str], Batch]
    lr: float | Tensor | None = None
    count: int | None = None
    differentiable: bool = True
    second_order: bool = False
    recompute: bool = False
    fused: bool = False
    compile: bool = False

    def run(self, params: Params, state: Any, steps: int,
            after_step: Callable[[int, Params, Tensor | None], None] | None = None,
            last_loss: bool = True) -> tuple[Params, Any, list[Tensor], float]:
        """``steps`` steps from the stacked ``params`` and ``state``. Returns the new parameters and state, the (K,)
        training loss before each update (instance k's loss at its weights before update t, on step t's batch), and
        the seconds the loop took without its batch sampling and ``after_step`` calls.

        ``after_step(i, params, loss)`` runs after update i with the new weights and their training loss on the next
        step's batch (the loss that step i + 1 differentiates; with ``last_loss=False`` None after the last update,
        whose loss is then not computed)."""
        lopt = self.lopt
        oracles = lopt.needs_oracles
        if oracles and not self.differentiable:
            raise ValueError(f"{type(lopt).__name__} needs oracles, which the no-graph loop does not compute")
        names = list(params)
        fused = (self.fused and self.differentiable and self.count is None and not oracles
                 and isinstance(lopt, CoordinatewiseOptimizer) and lopt.has_fused_step)
        if fused:  # the state of all instances as one (K, n, width) tensor per field, for the whole loop
            state_type, fields = type(state), to_meta_layout(state, names, lead=1)
            sizes = [params[n][0].numel() for n in names]
            alpha = lopt.lr if self.lr is None else self.lr
        if not self.differentiable:
            params = {n: p.detach().requires_grad_() for n, p in params.items()}
        aside = 0.0  # seconds spent sampling batches and in after_step

        def sample(split: str) -> Batch:
            nonlocal aside
            start = time.perf_counter()
            batch = self.sample(split)
            aside += time.perf_counter() - start
            return batch

        losses: list[Tensor] = []
        begin = time.perf_counter()
        loss: Tensor | None = self.loss_fn(params, sample("train"))
        for i in range(steps):
            leaves = [params[n] for n in names]
            keep_graph = self.differentiable
            grads = torch.autograd.grad(loss.sum(), leaves, retain_graph=keep_graph,
                                        create_graph=keep_graph and (self.second_order or oracles))
            losses.append(loss.detach())
            if fused:
                direction, fields = lopt.fused_step(flatten_coordinates(grads, lead=1), fields, compiled=self.compile)
                moves = (-alpha * direction).split(sizes, dim=-1)
                params = {n: params[n] + d.view_as(params[n]) for n, d in zip(names, moves)}
            elif self.differentiable:
                batched: dict[str, Params] = {}
                if oracles:
                    batched = _oracles(lopt, self.loss_fn, params, grads, state, sample("val"), self.second_order)
                    if not self.second_order:
                        grads = tuple(g.detach() for g in grads)
                params, state = self._update(params, dict(zip(names, grads)), state, batched, i)
            else:
                with torch.no_grad():
                    new_params, new_state = self._update(params, dict(zip(names, grads)), state, {}, i)
                    k = loss.shape[0]
                    finite = torch.stack([torch.isfinite(g).reshape(k, -1).all(1) for g in grads]).all(0)
                    params = {n: _where(finite, new_params[n], p).requires_grad_() for n, p in params.items()}
                    state = tree_map(lambda new, old: _where(finite, new, old), new_state, state)
            loss = self.loss_fn(params, sample("train")) if last_loss or i + 1 < steps else None
            if after_step is not None:
                start = time.perf_counter()
                after_step(i, params, loss)
                aside += time.perf_counter() - start
        if fused:
            state = from_meta_layout(fields, state_type, params, names, lead=1)
        if not self.differentiable:
            params = {n: p.detach() for n, p in params.items()}
        return params, state, losses, time.perf_counter() - begin - aside

    def _update(self, params: Params, grads: Params, state: Any, oracles: dict[str, Params],
                i: int) -> tuple[Params, Any]:
        """One vmapped call of ``lopt.step`` on every instance (with ``recompute``, inside an activation
        checkpoint)."""
        extra = {} if self.count is None else {"step": self.count + i}
        lopt, lr = self.lopt, self.lr
        # ``extra`` is bound now: with recompute=True the function runs again during the backward, after the loop
        step = vmap(lambda p, g, s, o, extra=extra: lopt.step(p, g, s, lr=lr, **extra, **o))
        if self.recompute and self.differentiable:
            return checkpoint(step, params, grads, state, oracles, use_reentrant=False)
        return step(params, grads, state, oracles)


def _oracles(lopt: LearnedOptimizer, loss_fn: Callable[[Params, Batch], Tensor], params: Params,
             grads: tuple[Tensor, ...], opt_state: Any, val_batch: Batch, second_order: bool) -> dict[str, Params]:
    """``hvp`` (H_t·v for v = ``lopt.hvp_vectors(opt_state)``) and ``val_grads`` (∇E(w_t)) for every stacked instance,
    from the training gradient ``grads`` (taken with ``create_graph=True``) and one validation forward/backward.
    Instances are independent, so the Hessian of their summed loss is block diagonal and one double backward gives
    every instance's product."""
    names = list(params)
    leaves = [params[n] for n in names]
    vectors = lopt.hvp_vectors(opt_state)
    # A gradient that does not depend on the parameters (a loss linear in them) has a zero Hessian block.
    pairs = [(g, vectors[n]) for n, g in zip(names, grads) if g.requires_grad]
    hv: tuple[Tensor | None, ...] = (None,) * len(names)
    if pairs:
        hv = torch.autograd.grad([g for g, _ in pairs], leaves, grad_outputs=[v for _, v in pairs], retain_graph=True,
                                 create_graph=second_order, allow_unused=True)
    val_loss = loss_fn(params, val_batch)
    val_grads = torch.autograd.grad(val_loss.sum(), leaves, create_graph=second_order)
    return {"hvp": {n: torch.zeros_like(p) if h is None else h for n, p, h in zip(names, leaves, hv)},
            "val_grads": dict(zip(names, val_grads))}


def can_batch(task: Task, lopt: LearnedOptimizer | None, hparams: Mapping[str, Any]) -> bool:
    """Whether ``lopt`` can run all seeds of ``task`` in one vmapped loop: a learned optimizer built only with
    ``lr``, that needs no oracles, on a learner without buffers (BatchNorm) or per-batch randomness (dropout)."""
    if lopt is None or lopt.needs_oracles or not set(hparams) <= {"lr"}:
        return False
    if task.init_buffers():
        return False
    return task.sample_batch(torch.Generator(device=task.device).manual_seed(0)).seed is None


def train_batched(task: Task, optimizer: str, lopt: LearnedOptimizer, hparams: Mapping[str, Any],
                  seeds: Sequence[int], steps: int, *, splits: Sequence[str] = ("test",), eval_every: int = 0,
                  record_lr: bool = False, papers_measure: bool = False) -> list[Run]:
    """:func:`train` for every seed at once: the same runs as the per-seed loop through the frozen ``torch.optim``
    face (same initial weights, batches, arithmetic; a seed whose gradient is not finite skips that step, as the face
    does), through :class:`VmappedLoop` without a graph. Needs :func:`can_batch`. ``seconds_per_step`` is the
    loop's wall time (without batch sampling and held-out evaluation) divided by the steps and seeds;
    ``papers_measure`` is :func:`final_batches_loss` of each seed's final weights, as :func:`train` computes it."""
    lr = hparams.get("lr")
    lopt = lopt.to(task.device)
    generators = [seeded_generators(seed, task.device) for seed in seeds]
    inits = [task.init(init_gen) for init_gen, _ in generators]
    states = [lopt.init(p) for p in inits]
    (count, _), = step_groups(lopt, states).items()  # every seed starts at step 0
    k = len(seeds)

    def sample(split: str) -> Batch:
        batches = [task.sample_batch(batch_gen) for _, batch_gen in generators]
        return Batch(torch.stack([b.x for b in batches]), torch.stack([b.y for b in batches]))

    curves: list[list[dict[str, float]]] = [[] for _ in seeds]

    def after_step(i: int, params: Params, loss: Tensor | None) -> None:
        if eval_every and (i + 1) % eval_every == 0:
            for curve, p in zip(curves, unstack({n: q.detach() for n, q in params.items()}, k)):
                curve.append(_curve_point(i + 1, splits[0], _held_out(task, p, {}, splits[:1])[splits[0]]))

    loop = VmappedLoop(lopt, vmap(lambda p, b: task.loss(p, b), in_dims=(0, Batch(0, 0, None))), sample, lr=lr,
                       count=count, differentiable=False)
    params, _, losses, seconds = loop.run(stack(inits), stack(states), steps, after_step, last_loss=False)
    per_seed = torch.stack(losses, 1).tolist() if losses else [[] for _ in seeds]
    rate = float(lopt.lr if lr is None else lr)
    runs = []
    for i, (seed, p) in enumerate(zip(seeds, unstack(params, k))):
        metrics = _held_out(task, p, {}, splits)
        batches = {"loss": final_batches_loss(task, p, {}, seed, steps)} if papers_measure else {}
        runs.append(Run(optimizer, task.name, seed, per_seed[i], seconds / max(steps, 1) / k,
                        metrics.get("test", {}), metrics.get("val", {}), curves[i],
                        [rate] * steps if record_lr else None, dict(hparams), batched=True, batches=batches))
    return runs
