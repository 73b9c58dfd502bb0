"""Truncated unrolls: K inner steps of a learned optimizer on a meta-batch of task instances.

A *slot* of the meta-batch holds one task instance (a task configuration plus its per-instance draws), its learner
parameters, its optimizer state, its own batch generator and its position in the horizon T. Slots whose instances
share a configuration (``task.base()``) run as one vectorized unroll: their parameters, optimizer states and draws are
stacked and every inner step is one ``torch.func.vmap`` call of the task's loss and of the optimizer's ``step`` —
the engine's :class:`~metaopt.meta.inner.VmappedLoop`, which the evaluation's batched seeds run too. This module adds
the slots, the grouping of slots by configuration and step count, and the meta-loss.

The meta-loss of one truncation (HyperAdam eq. 8) is the mean over its steps t = 1..K of L_t(w_t), the training loss
after each update; ``meta_loss="last"`` keeps only L_K(w_K), and ``"val"`` evaluates each w_t on a validation batch
instead. The loss computed at w_t is also where step t+1's gradient comes from, so a truncation costs K + 1 forward
passes. ``second_order=False`` (default, as learning-to-learn) treats the inner gradients as constants.

Memory. Backpropagating through a truncation keeps, per inner step, everything the optimizer's update computed on the
way (for HyperAdam J = 20: some thirty (n, J) tensors per instance, about 26 GB for 32 instances of the paper's MLP
over 20 steps). ``recompute=True`` wraps each step's update in a non-reentrant activation checkpoint
(``torch.utils.checkpoint``): the forward keeps only the update's inputs (gradient, state, parameters: the carried
state is stored anyway, as the next step's input) and the backward recomputes the cell's intermediates one step at a
time. The update is deterministic, so the meta-gradient is the same (tested); the price is one more cell forward per
inner step, which is cheap next to the learner's forward and backward.

**What a learned optimizer's step needs beyond gradients**, as its class declares it (``LearnedOptimizer``'s
defaults: nothing). It serves the learned hypergradient rules of :mod:`metaopt.learned.rules`:

* ``static_step(state) -> int | None`` — the instance's step count when the update's arithmetic needs it as a Python
  int (Adam's bias corrections inside a hand-designed rule): a vmapped call cannot read a per-instance tensor, so the
  unroll groups the slots by this value (:func:`~metaopt.meta.inner.step_groups`: one vmapped unroll per group;
  instances restarted at different times fall in different groups) and calls ``step(..., step=count + i)`` at inner
  step i. ``None``: no grouping, no ``step=``.
* ``needs_oracles = True`` with ``hvp_vectors(state) -> dict[str, Tensor]`` — every ``step`` also receives, as
  keyword arguments, ``hvp=`` H_t·v (v = ``hvp_vectors(state)``, H_t the Hessian of the unregularized training loss at
  the parameters w_t being updated, on this step's training batch) and ``val_grads=`` ∇E(w_t), the gradient of the
  loss on a validation batch (``task.sample_batch(gen, "val")``) at w_t. Both are computed outside vmap on the stacked
  loss (instances are independent, so the Hessian of their summed loss is block diagonal and one double backward gives
  every instance's product). The training gradient is then taken with ``create_graph=True`` (the double backward
  needs it); with ``second_order=False`` the gradient, H·v and ∇E reach ``step`` as constants (the first-order
  approximation applied to every oracle), with ``second_order=True`` all three stay differentiable (exact).
  Per inner step such an optimizer costs one more forward/backward (validation) and one double backward; the
  validation batch is drawn before the step's training batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import vmap

from meta_tasks.base import Batch, Task
from metaopt.learned.base import LearnedOptimizer
from metaopt.meta.inner import VmappedLoop, step_groups
from metaopt.tree import stack, unstack

Params = dict[str, Tensor]
META_LOSSES = ("mean", "last", "val")


@dataclasses.dataclass
class Slot:
    """One task instance of the meta-batch and where it stands in its horizon."""

    instance_seed: int          # rebuilds the instance (configuration, draws, initialization) exactly
    task: Task
    params: Params
    opt_state: Any              # the learned optimizer's NamedTuple state
    step: int                   # inner steps taken in the current horizon
    batch_gen: torch.Generator  # this instance's minibatches
    generation: int = 0         # how many times this slot has been reset to a fresh instance


class UnrollResult(NamedTuple):
    meta_losses: Tensor         # (K,) one meta-loss per instance, differentiable w.r.t. θ
    inner_loss: float           # mean training loss over the truncation (for logging)
    params: list[Params]        # per instance, still attached to the graph
    opt_states: list[Any]


def _batches(slots: list[Slot], split: str, batch_size: int | None) -> Batch:
    batches = [s.task.sample_batch(s.batch_gen, split, batch_size) for s in slots]
    if any(b.seed is not None for b in batches):
        raise ValueError(f"{slots[0].task.name}: learners with dropout cannot be meta-trained in a vectorized "
                         "unroll (their masks come from a per-batch seed); use a task without dropout")
    return Batch(torch.stack([b.x for b in batches]), torch.stack([b.y for b in batches]))


def _merge(results: list[tuple[list[int], UnrollResult]], k: int) -> UnrollResult:
    """Reassemble per-group results in slot order (``results``: the slot indices of each group and its result)."""
    meta_losses: list[Tensor | None] = [None] * k
    params: list[Params | None] = [None] * k
    states: list[Any] = [None] * k
    for indices, result in results:
        for j, i in enumerate(indices):
            meta_losses[i], params[i], states[i] = result.meta_losses[j], result.params[j], result.opt_states[j]
    inner = sum(r.inner_loss * len(indices) for indices, r in results) / k
    return UnrollResult(torch.stack(meta_losses), inner, params, states)


def unroll(lopt: LearnedOptimizer, slots: list[Slot], steps: int, *, lr: float | None = None,
           batch_size: int | None = None, meta_loss: str = "mean", second_order: bool = False,
           loss_clip: float | None = None, recompute: bool = False, vectorized: bool = True,
           fused: bool = True, compile: bool = False) -> UnrollResult:
    """Run ``steps`` inner steps on ``slots`` (instances of one task configuration) and return their meta-losses.

    ``vectorized=False`` runs the same maths instance by instance in a Python loop (the reference that the vmapped
    path is tested against). The slots are not modified; the caller stores the returned parameters and states.
    ``recompute=True`` trades one more update forward per inner step for not storing the update's intermediates
    (module docstring). ``fused=True`` (default) steps a coordinatewise optimizer that has a fused cell
    (``has_fused_step``) through it, all instances in one call, its state kept in one flat tensor per field for the
    whole truncation (:mod:`metaopt.learned.fused`: it keeps only each update's inputs and recomputes, so
    ``recompute`` does not apply); ``False``
    forces the reference path (vmapped ``step``), which the fused one is tested equal to. ``compile=True`` runs
    the fused cell through ``torch.compile`` (:func:`metaopt.learned.fused.bodies`).
    Optimizers with the protocol of the module docstring get their static step count and oracles.
    """
    if meta_loss not in META_LOSSES:
        raise ValueError(f"Invalid meta_loss: {meta_loss!r} (expected one of {META_LOSSES})")
    base = slots[0].task.base()
    if any(s.task.base() is not base for s in slots):
        raise ValueError("unroll() needs instances of one task configuration; group slots by task.base()")
    options = dict(lr=lr, batch_size=batch_size, meta_loss=meta_loss, second_order=second_order, loss_clip=loss_clip,
                   recompute=recompute, fused=fused, compile=compile)
    if not vectorized:
        results = [unroll(lopt, [s], steps, **options, vectorized=True) for s in slots]
        return UnrollResult(torch.cat([r.meta_losses for r in results]),
                            sum(r.inner_loss for r in results) / len(results),
                            [p for r in results for p in r.params], [o for r in results for o in r.opt_states])

    groups = step_groups(lopt, [s.opt_state for s in slots])
    if len(groups) > 1:  # instances at different step counts: one vmapped unroll per count
        return _merge([(indices, unroll(lopt, [slots[i] for i in indices], steps, **options))
                       for indices in groups.values()], len(slots))
    (count, _), = groups.items()

    task = slots[0].task
    k = len(slots)
    params = {n: p.requires_grad_() if not p.requires_grad else p for n, p in stack([s.params for s in slots]).items()}
    draws = stack([s.task.draws() for s in slots]) if task.draws() else {}
    stacked_loss = vmap(lambda p, b, d: task.loss_with(p, b, d), in_dims=(0, Batch(0, 0, None), 0))
    loop = VmappedLoop(lopt, lambda p, b: stacked_loss(p, b, draws), lambda split: _batches(slots, split, batch_size),
                       lr=lr, count=count, second_order=second_order, recompute=recompute, fused=fused,
                       compile=compile)
    terms, inner_losses = [], []

    def after_step(i: int, params: Params, loss: Tensor) -> None:  # loss = L_{t+1}(w_{t+1})
        inner_losses.append(loss.detach())
        term = loop.loss_fn(params, _batches(slots, "val", batch_size)) if meta_loss == "val" else loss
        terms.append(term.clamp(max=loss_clip) if loss_clip is not None else term)

    params, opt_state, _, _ = loop.run(params, stack([s.opt_state for s in slots]), steps, after_step)
    stacked = torch.stack(terms)  # (steps, K)
    meta_losses = stacked[-1] if meta_loss == "last" else stacked.mean(0)
    return UnrollResult(meta_losses, float(torch.stack(inner_losses).mean()), unstack(params, k), unstack(opt_state, k))
