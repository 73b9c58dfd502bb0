"""Truncated unrolls: K inner steps of a learned optimizer on a meta-batch of task instances.

A *slot* of the meta-batch holds one task instance (a task configuration plus its per-instance draws), its learner
parameters, its optimizer state, its own batch generator and its position in the horizon T. Slots whose instances
share a configuration (``task.base()``) run as one vectorized unroll: their parameters, optimizer states and draws are
stacked and every inner step is one ``torch.func.vmap`` call of the task's loss and of the optimizer's update.

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

**Optional protocol for learned optimizers that need more than gradients** (all attributes are looked up with
``getattr``; an optimizer that defines none of them is unrolled exactly as before). It serves the learned
hypergradient rules of :mod:`metaopt.learned.rules`:

* ``static_step(state) -> int | None`` — the instance's step count when the update's arithmetic needs it as a Python
  int (Adam's bias corrections inside a hand-designed rule): a vmapped call cannot read a per-instance tensor, so the
  unroll groups the slots by this value (one vmapped unroll per group; instances restarted at different times fall in
  different groups) and calls ``update(..., step=count + i)`` at inner step i. ``None``: no grouping, no ``step=``.
* ``needs_oracles = True`` with ``hvp_vectors(state) -> dict[str, Tensor]`` — every ``update`` also receives, as
  keyword arguments, ``hvp=`` H_t·v (v = ``hvp_vectors(state)``, H_t the Hessian of the unregularized training loss at
  the parameters w_t being updated, on this step's training batch) and ``val_grads=`` ∇E(w_t), the gradient of the
  loss on a validation batch (``task.sample_batch(gen, "val")``) at w_t. Both are computed outside vmap on the stacked
  loss (instances are independent, so the Hessian of their summed loss is block diagonal and one double backward gives
  every instance's product). The training gradient is then taken with ``create_graph=True`` (the double backward
  needs it); with ``second_order=False`` the gradient, H·v and ∇E reach ``update`` as constants (the first-order
  approximation applied to every oracle), with ``second_order=True`` all three stay differentiable (exact).
  Per inner step such an optimizer costs one more forward/backward (validation) and one double backward; the
  validation batch is drawn before the step's training batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils.checkpoint import checkpoint

from meta_tasks.base import Batch, Task
from metaopt.learned.base import CoordinatewiseOptimizer, LearnedOptimizer
from metaopt.learned.fused import flatten_coordinates, from_meta_layout, to_meta_layout
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


def _static_step(lopt: LearnedOptimizer, state: Any) -> int | None:
    static_step = getattr(lopt, "static_step", None)
    return None if static_step is None else static_step(state)


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
    forces the reference path (vmapped ``update``), which the fused one is tested equal to. ``compile=True`` runs
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

    counts = [_static_step(lopt, s.opt_state) for s in slots]
    if len(set(counts)) > 1:  # instances at different step counts: one vmapped unroll per count
        groups: dict[int | None, list[int]] = {}
        for i, count in enumerate(counts):
            groups.setdefault(count, []).append(i)
        return _merge([(indices, unroll(lopt, [slots[i] for i in indices], steps, **options))
                       for indices in groups.values()], len(slots))
    count = counts[0]
    oracles = bool(getattr(lopt, "needs_oracles", False))

    task = slots[0].task
    k = len(slots)
    params = {n: p.requires_grad_() if not p.requires_grad else p for n, p in stack([s.params for s in slots]).items()}
    opt_state = stack([s.opt_state for s in slots])
    draws = stack([s.task.draws() for s in slots]) if task.draws() else {}
    batch_dims = Batch(0, 0, None)

    loss_fn: Callable[..., Tensor] = vmap(lambda p, b, d: task.loss_with(p, b, d), in_dims=(0, batch_dims, 0))
    names = list(params)
    use_fused = (fused and count is None and not oracles and isinstance(lopt, CoordinatewiseOptimizer)
                 and lopt.has_fused_step)
    if use_fused:  # the state of all instances as one (K, n, width) tensor per field, for the whole truncation
        state_type, fields = type(opt_state), to_meta_layout(opt_state, names, lead=1)
        sizes = [params[n][0].numel() for n in names]
        alpha = lopt.lr if lr is None else lr

    terms, inner_losses = [], []
    loss = loss_fn(params, _batches(slots, "train", batch_size), draws)
    for i in range(steps):
        leaves = [params[n] for n in names]
        grads = torch.autograd.grad(loss.sum(), leaves, retain_graph=True, create_graph=second_order or oracles)
        if use_fused:
            direction, fields = lopt.fused_step(flatten_coordinates(grads, lead=1), fields, compiled=compile)
            moves = (-alpha * direction).split(sizes, dim=-1)
            params = {n: params[n] + d.view_as(params[n]) for n, d in zip(names, moves)}
        else:
            extra: dict[str, Any] = {} if count is None else {"step": count + i}
            batched: dict[str, Params] = {}
            if oracles:
                batched = _oracles(lopt, loss_fn, params, grads, opt_state, _batches(slots, "val", batch_size),
                                   draws, second_order)
                if not second_order:
                    grads = tuple(g.detach() for g in grads)
            # ``extra`` is bound now: with recompute=True the function runs again during the backward, after the loop
            update_fn = vmap(lambda g, s, p, o, extra=extra: lopt.update(g, s, p, lr=lr, **extra, **o))
            inputs = (dict(zip(names, grads)), opt_state, params, batched)
            updates, opt_state = (checkpoint(update_fn, *inputs, use_reentrant=False) if recompute
                                  else update_fn(*inputs))
            params = {n: params[n] + updates[n] for n in names}
        loss = loss_fn(params, _batches(slots, "train", batch_size), draws)  # L_{t+1}(w_{t+1})
        inner_losses.append(loss.detach())
        term = loss_fn(params, _batches(slots, "val", batch_size), draws) if meta_loss == "val" else loss
        terms.append(term.clamp(max=loss_clip) if loss_clip is not None else term)
    if use_fused:
        opt_state = from_meta_layout(fields, state_type, params, names, lead=1)
    stacked = torch.stack(terms)  # (steps, K)
    meta_losses = stacked[-1] if meta_loss == "last" else stacked.mean(0)
    return UnrollResult(meta_losses, float(torch.stack(inner_losses).mean()), unstack(params, k), unstack(opt_state, k))


def _oracles(lopt: LearnedOptimizer, loss_fn: Callable[..., Tensor], params: Params, grads: tuple[Tensor, ...],
             opt_state: Any, val_batch: Batch, draws: Params, second_order: bool) -> dict[str, Params]:
    """``hvp`` (H_t·v for v = ``lopt.hvp_vectors(opt_state)``) and ``val_grads`` (∇E(w_t)) for every stacked instance,
    from the training gradient ``grads`` (taken with ``create_graph=True``) and one validation forward/backward."""
    names = list(params)
    leaves = [params[n] for n in names]
    vectors = lopt.hvp_vectors(opt_state)
    # A gradient that does not depend on the parameters (a loss linear in them) has a zero Hessian block.
    pairs = [(g, vectors[n]) for n, g in zip(names, grads) if g.requires_grad]
    hv: tuple[Tensor | None, ...] = (None,) * len(names)
    if pairs:
        hv = torch.autograd.grad([g for g, _ in pairs], leaves, grad_outputs=[v for _, v in pairs], retain_graph=True,
                                 create_graph=second_order, allow_unused=True)
    val_loss = loss_fn(params, val_batch, draws)
    val_grads = torch.autograd.grad(val_loss.sum(), leaves, create_graph=second_order)
    return {"hvp": {n: torch.zeros_like(p) if h is None else h for n, p, h in zip(names, leaves, hv)},
            "val_grads": dict(zip(names, val_grads))}
