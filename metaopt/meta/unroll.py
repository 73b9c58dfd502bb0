"""Truncated unrolls: K inner steps of a learned optimizer on a meta-batch of task instances.

A *slot* of the meta-batch holds one task instance (a task configuration plus its per-instance draws), its learner
parameters, its optimizer state, its own batch generator and its position in the horizon T. Slots whose instances
share a configuration (``task.base()``) run as one vectorized unroll: their parameters, optimizer states and draws are
stacked and every inner step is one ``torch.func.vmap`` call of the task's loss and of the optimizer's update.

The meta-loss of one truncation (HyperAdam eq. 8) is the mean over its steps t = 1..K of L_t(w_t), the training loss
after each update; ``meta_loss="last"`` keeps only L_K(w_K), and ``"val"`` evaluates each w_t on a validation batch
instead. The loss computed at w_t is also where step t+1's gradient comes from, so a truncation costs K + 1 forward
passes. ``second_order=False`` (default, as learning-to-learn) treats the inner gradients as constants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils._pytree import tree_map

from meta_tasks.base import Batch, Task
from metaopt.learned.base import LearnedOptimizer

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


def stack(trees: list[Any]) -> Any:
    """Stack a list of identically structured pytrees of tensors along a new leading dimension."""
    return tree_map(lambda *xs: torch.stack(xs), *trees) if len(trees) > 1 else tree_map(lambda x: x.unsqueeze(0), trees[0])


def unstack(tree: Any, k: int) -> list[Any]:
    """Inverse of :func:`stack`."""
    return [tree_map(lambda x, i=i: x[i], tree) for i in range(k)]


def _batches(slots: list[Slot], split: str, batch_size: int | None) -> Batch:
    batches = [s.task.sample_batch(s.batch_gen, split, batch_size) for s in slots]
    if any(b.seed is not None for b in batches):
        raise ValueError(f"{slots[0].task.name}: learners with dropout cannot be meta-trained in a vectorized "
                         "unroll (their masks come from a per-batch seed); use a task without dropout")
    return Batch(torch.stack([b.x for b in batches]), torch.stack([b.y for b in batches]))


def unroll(lopt: LearnedOptimizer, slots: list[Slot], steps: int, *, lr: float | None = None,
           batch_size: int | None = None, meta_loss: str = "mean", second_order: bool = False,
           loss_clip: float | None = None, vectorized: bool = True) -> UnrollResult:
    """Run ``steps`` inner steps on ``slots`` (instances of one task configuration) and return their meta-losses.

    ``vectorized=False`` runs the same maths instance by instance in a Python loop (the reference that the vmapped
    path is tested against). The slots are not modified; the caller stores the returned parameters and states.
    """
    if meta_loss not in META_LOSSES:
        raise ValueError(f"Invalid meta_loss: {meta_loss!r} (expected one of {META_LOSSES})")
    base = slots[0].task.base()
    if any(s.task.base() is not base for s in slots):
        raise ValueError("unroll() needs instances of one task configuration; group slots by task.base()")
    if not vectorized:
        results = [unroll(lopt, [s], steps, lr=lr, batch_size=batch_size, meta_loss=meta_loss,
                          second_order=second_order, loss_clip=loss_clip, vectorized=True) for s in slots]
        return UnrollResult(torch.cat([r.meta_losses for r in results]),
                            sum(r.inner_loss for r in results) / len(results),
                            [p for r in results for p in r.params], [o for r in results for o in r.opt_states])

    task = slots[0].task
    k = len(slots)
    params = {n: p.requires_grad_() if not p.requires_grad else p for n, p in stack([s.params for s in slots]).items()}
    opt_state = stack([s.opt_state for s in slots])
    draws = stack([s.task.draws() for s in slots]) if task.draws() else {}
    batch_dims = Batch(0, 0, None)

    loss_fn: Callable[..., Tensor] = vmap(lambda p, b, d: task.loss_with(p, b, d), in_dims=(0, batch_dims, 0))
    update_fn = vmap(lambda g, s, p: lopt.update(g, s, p, lr=lr))

    terms, inner_losses = [], []
    loss = loss_fn(params, _batches(slots, "train", batch_size), draws)
    for _ in range(steps):
        names = list(params)
        grads = torch.autograd.grad(loss.sum(), [params[n] for n in names], retain_graph=True,
                                    create_graph=second_order)
        updates, opt_state = update_fn(dict(zip(names, grads)), opt_state, params)
        params = {n: params[n] + updates[n] for n in names}
        loss = loss_fn(params, _batches(slots, "train", batch_size), draws)  # L_{t+1}(w_{t+1})
        inner_losses.append(loss.detach())
        term = loss_fn(params, _batches(slots, "val", batch_size), draws) if meta_loss == "val" else loss
        terms.append(term.clamp(max=loss_clip) if loss_clip is not None else term)
    stacked = torch.stack(terms)  # (steps, K)
    meta_losses = stacked[-1] if meta_loss == "last" else stacked.mean(0)
    return UnrollResult(meta_losses, float(torch.stack(inner_losses).mean()), unstack(params, k), unstack(opt_state, k))
