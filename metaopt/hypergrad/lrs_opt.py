"""LRS-OPT: the exact hypergradient of a final validation loss with respect to a whole learning-rate schedule, and
projected gradient descent on the schedule (MARTHE paper ``papers/marthe.txt``, Sec. 2 eqs. 1–4 and Sec. 5).

This module owns the *offline* reference that the online methods of :mod:`metaopt.hypergrad.marthe` (HD, RTHO,
MARTHE) approximate. For a schedule η = (η_0, …, η_{T−1}) and T steps of a base optimizer Φ_t,

    f_T(η) = E(w_T(η)),   w_0 = w̄,   w_{t+1} = Φ_t(w_t, η_t)                                     (eq. 1)
    ∇f_T(η) = ẇ_Tᵀ ∇E(w_T),  ẇ_T = dw_T/dη                                                         (eq. 2)

is computed exactly by reverse-mode differentiation through the unrolled loop, using the ``higher`` library
(``higher.innerloop_ctx``): the base optimizer's learning rate at step t is passed as a tensor through higher's
``override`` — one entry per parameter group — so the unrolled weights are differentiable functions of η.

:func:`schedule_hypergradient` returns (f_T(η), ∇f_T(η)); :func:`optimize_schedule` runs K outer iterations of
projected gradient descent η ← max(η − γ·∇f_T(η), 0) (the feasible set is ℝ_+^T, eq. 1) and returns the history.

Cost: one forward unroll of T steps plus one backward through it per hypergradient; memory O(T) copies of the
weights and of the activations the losses save (the whole trajectory is kept, paper Sec. 2). The paper's LRS-OPT
run (T = 512, 5000 outer iterations) took over two hours on a GPU; this is an analysis tool for small problems.

Notes. The base optimizer is any optimizer ``higher`` can differentiate (``torch.optim.SGD``, ``Adam``, …); its
hyper-parameters (momentum, weight decay, …) and its current state are the initial ones, only ``lr`` is overridden.
``higher``'s differentiable Adam uses the older ε placement ``m/(√v + ε)·√bc2/bc1``, not torch's current
``m̂/(√v̂ + ε)``. The model's weights are the initial point w̄ and are never modified.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import higher
import torch
from torch import Tensor, nn

from metaopt.core import check_range

TrainLoss = Callable[[nn.Module, int], Tensor]
ValLoss = Callable[[nn.Module], Tensor]


class ScheduleHypergradient(NamedTuple):
    val_loss: Tensor   # f_T(η) = E(w_T(η)), a detached 0-dim tensor
    hypergrad: Tensor  # ∇f_T(η), the schedule's shape


class ScheduleHistory(NamedTuple):
    schedules: Tensor   # (K + 1, *schedule.shape): η^(0) (the initial schedule), …, η^(K)
    val_losses: Tensor  # (K,): f_T(η^(k)) for k = 0 … K − 1
    hypergrads: Tensor  # (K, *schedule.shape): ∇f_T(η^(k)) for k = 0 … K − 1


def _check_schedule(schedule: Tensor, num_groups: int) -> None:
    if not isinstance(schedule, Tensor) or not schedule.is_floating_point():
        raise ValueError(f"Invalid schedule: expected a floating-point tensor, got {type(schedule).__name__}")
    if schedule.dim() not in (1, 2) or schedule.shape[0] == 0 or (
            schedule.dim() == 2 and schedule.shape[1] != num_groups):
        raise ValueError(f"Invalid schedule: shape {tuple(schedule.shape)} (expected (T,) shared by all param groups "
                         f"or (T, {num_groups}), one column per param group, with T ≥ 1)")
    if not bool(torch.isfinite(schedule).all()) or bool((schedule < 0).any()):
        raise ValueError("Invalid schedule: learning rates must be finite and non-negative (η ∈ ℝ_+^T)")


def schedule_hypergradient(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Tensor,
                           train_loss: TrainLoss, val_loss: ValLoss) -> ScheduleHypergradient:
    """f_T(η) and its exact gradient ∇f_T(η) through T unrolled steps of ``optimizer`` (MARTHE eqs. 1–2).

    Args:
        model: the learner; its current weights are w_0 (copied, never modified).
        optimizer: a ``torch.optim`` optimizer over ``model``'s parameters giving the base dynamics Φ (its ``lr`` is
            replaced by the schedule; its other hyper-parameters and current state are used as they are).
        schedule: η, shape (T,) (one rate per step, shared by every param group) or (T, G) with G =
            ``len(optimizer.param_groups)`` (one rate per step and group). Finite and non-negative.
        train_loss: ``train_loss(fmodel, t)``, the training loss L_t of step t computed with ``fmodel`` (higher's
            functional copy of ``model``, called like it). It decides the minibatch of each step; one that draws a
            fresh batch from a generator it owns randomizes the progression at every outer iteration (paper fn. 7).
        val_loss: ``val_loss(fmodel)``, the objective E at the final weights w_T.

    Returns:
        ``ScheduleHypergradient(val_loss, hypergrad)``; ``hypergrad`` has the schedule's shape, dtype and device.
    """
    num_groups = len(optimizer.param_groups)
    _check_schedule(schedule, num_groups)
    eta = schedule.detach().clone().requires_grad_(True)  # the caller's tensor is neither modified nor tracked
    with higher.innerloop_ctx(model, optimizer, copy_initial_weights=True) as (fmodel, diffopt):
        for t in range(eta.shape[0]):
            # higher's override wants one entry per parameter group.
            rates = [eta[t]] * num_groups if eta.dim() == 1 else [eta[t, i] for i in range(num_groups)]
            diffopt.step(train_loss(fmodel, t), override={"lr": rates})
        objective = val_loss(fmodel)
        (hypergrad,) = torch.autograd.grad(objective, eta, allow_unused=True)
    if hypergrad is None:  # E does not depend on the schedule (e.g. T steps that never touch E's weights)
        hypergrad = torch.zeros_like(eta)
    return ScheduleHypergradient(objective.detach(), hypergrad.detach())


def optimize_schedule(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Tensor, train_loss: TrainLoss,
                      val_loss: ValLoss, outer_steps: int, outer_lr: float, *,
                      callback: Callable[[int, ScheduleHypergradient, Tensor], None] | None = None
                      ) -> ScheduleHistory:
    """LRS-OPT: K = ``outer_steps`` iterations of projected gradient descent on the schedule (MARTHE Sec. 5).

    η^(k+1) = max(η^(k) − γ·∇f_T(η^(k)), 0) with γ = ``outer_lr``: the projection onto the feasible set ℝ_+^T of
    eq. 1 (the paper: "could be solved by projected gradient descent"). The paper initializes η = 0.01·1 and runs
    5000 iterations with T = 512; the other arguments are as :func:`schedule_hypergradient`.
    ``callback(k, result, new_schedule)``, if given, is called after each iteration (for logging).

    Returns:
        ``ScheduleHistory(schedules, val_losses, hypergrads)`` — every iterate including the initial and final
        schedules, and f_T and ∇f_T at iterates 0 … K − 1.
    """
    if isinstance(outer_steps, bool) or not isinstance(outer_steps, int) or outer_steps < 0:
        raise ValueError(f"Invalid outer_steps: {outer_steps!r} (expected an integer ≥ 0)")
    check_range("outer_lr", outer_lr)
    _check_schedule(schedule, len(optimizer.param_groups))
    eta = schedule.detach().clone()
    schedules, losses, grads = [eta.clone()], [], []
    for k in range(outer_steps):
        result = schedule_hypergradient(model, optimizer, eta, train_loss, val_loss)
        eta = (eta - outer_lr * result.hypergrad).clamp(min=0.0)
        if not bool(torch.isfinite(eta).all()):
            raise FloatingPointError(f"LRS-OPT: the schedule became non-finite at outer iteration {k}; lower outer_lr")
        schedules.append(eta.clone())
        losses.append(result.val_loss)
        grads.append(result.hypergrad)
        if callback is not None:
            callback(k, result, eta)
    empty = schedule.new_zeros((0,) + tuple(schedule.shape))
    return ScheduleHistory(torch.stack(schedules), torch.stack(losses) if losses else schedule.new_zeros(0),
                           torch.stack(grads) if grads else empty)
