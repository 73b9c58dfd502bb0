"""LRS-OPT: the exact hypergradient of a final validation loss with respect to a whole learning-rate schedule, and
projected gradient descent on the schedule (MARTHE paper ``papers/marthe.txt``, Sec. 2 eqs. 1–4 and Sec. 5).

This module owns the *offline* reference that the online methods of :mod:`metaopt.hypergrad.marthe` (HD, RTHO,
MARTHE) approximate. For a schedule η = (η_0, …, η_{T−1}) and T steps of a base optimizer Φ_t,

    f_T(η) = E(w_T(η)),   w_0 = w̄,   w_{t+1} = Φ_t(w_t, η_t)                                     (eq. 1)
    ∇f_T(η) = ẇ_Tᵀ ∇E(w_T),  ẇ_T = dw_T/dη                                                         (eq. 2)

is computed exactly by reverse-mode differentiation through the unrolled loop: the base optimizer's functional rule
(:mod:`metaopt.core`; the rule behind a metaopt face, or :class:`~metaopt.baselines.SGDRule` / ``AdamRule`` for a
``torch.optim.SGD`` / ``Adam``) steps the weights out of place with the learning rate η_t as a tensor, one per param
group, and the model is evaluated at the unrolled weights with ``torch.func.functional_call``, so the weights at every
step are differentiable functions of η. The same update code as the online methods, no second implementation.

:func:`schedule_hypergradient` returns (f_T(η), ∇f_T(η)); :func:`optimize_schedule` runs K outer iterations of
projected gradient descent η ← max(η − γ·∇f_T(η), 0) (the feasible set is ℝ_+^T, eq. 1) and returns the history.

Cost: one forward unroll of T steps plus one backward through it per hypergradient; memory O(T) copies of the
weights and of the activations the losses save (the whole trajectory is kept, paper Sec. 2). The paper's LRS-OPT
run (T = 512, 5000 outer iterations) took over two hours on a GPU; this is an analysis tool for small problems.

Notes. The base optimizer's other hyper-parameters (momentum, weight decay, …) and its current state are the initial
ones; only ``lr`` is replaced by the schedule. Adam steps in torch's current arithmetic ``m̂/(√v̂ + ε)``. Parameters
without a gradient at a step are left untouched, as ``torch.optim`` leaves them. The model's weights and buffers are
the initial point w̄ and are never modified.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaopt.baselines import AdamRule, SGDRule
from metaopt.core import CoreOptimizer, FunctionalOptimizer, Params, check_range


class FunctionalModel:
    """``model`` at the unrolled weights: call it like the model (``functional_call`` with ``params``, name → tensor,
    and copies of the model's buffers, so that the model itself is never modified). ``params`` is public: a loss can
    also be computed from it directly (``task.loss(fmodel.params, batch)``)."""

    def __init__(self, model: nn.Module, params: Params, buffers: Params):
        self.model, self.params, self.buffers = model, params, buffers

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, {**self.params, **self.buffers}, args, kwargs)


TrainLoss = Callable[[FunctionalModel, int], Tensor]
ValLoss = Callable[[FunctionalModel], Tensor]


class _Group(NamedTuple):
    names: list[str]           # the optimizer's names of the group's parameters (what its rule is keyed by)
    model_names: list[str]     # the same parameters' names in the model
    rule: Callable[[Tensor], FunctionalOptimizer]  # η_t -> the group's rule at that rate


def _groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[_Group], list[Any]]:
    """Each param group's rule at a given rate and its initial state (the optimizer's current one)."""
    model_name = {id(p): n for n, p in model.named_parameters()}
    groups, states = [], []
    for group in optimizer.param_groups:
        if isinstance(optimizer, CoreOptimizer):
            names, params = optimizer.named_params(group)
        else:
            params = list(group["params"])
            names = [str(i) for i in range(len(params))]
        if any(id(p) not in model_name for p in params):
            raise ValueError("Invalid optimizer: it holds parameters that are not the model's")
        by_name = dict(zip(names, params))
        rule, state = _rule_and_state(optimizer, group, by_name)
        groups.append(_Group(names, [model_name[id(p)] for p in params], rule))
        states.append(state)
    return groups, states


def _rule_and_state(optimizer: torch.optim.Optimizer, group: dict[str, Any],
                    params: dict[str, Tensor]) -> tuple[Callable[[Tensor], FunctionalOptimizer], Any]:
    if isinstance(optimizer, CoreOptimizer):
        def rule(lr: Tensor) -> FunctionalOptimizer:
            return optimizer.rule({**group, "lr": lr})

        return rule, optimizer.load_rule_state(group, optimizer.rule(group), params)
    for flag in ("maximize", "amsgrad"):
        if group.get(flag):
            raise ValueError(f"Invalid optimizer: LRS-OPT does not unroll {type(optimizer).__name__}({flag}=True)")
    torch_state = [optimizer.state.get(p, {}) for p in params.values()]
    if type(optimizer) is torch.optim.SGD:
        def rule(lr: Tensor) -> FunctionalOptimizer:
            return SGDRule(lr, group["momentum"], group["dampening"], group["nesterov"], group["weight_decay"])

        state = rule(group["lr"]).init(params)
        if all(s.get("momentum_buffer") is not None for s in torch_state):  # a step was taken: torch's buffers
            state = state._replace(step=1, momentum_buffer={n: s["momentum_buffer"].detach()
                                                            for n, s in zip(params, torch_state)})
        return rule, state
    if type(optimizer) is torch.optim.Adam:
        def rule(lr: Tensor) -> FunctionalOptimizer:
            return AdamRule(lr, tuple(group["betas"]), group["eps"], group["weight_decay"])

        state = rule(group["lr"]).init(params)
        if all("step" in s for s in torch_state) and torch_state:
            state = state._replace(step=int(torch_state[0]["step"]),
                                   exp_avg={n: s["exp_avg"].detach() for n, s in zip(params, torch_state)},
                                   exp_avg_sq={n: s["exp_avg_sq"].detach() for n, s in zip(params, torch_state)})
        return rule, state
    raise ValueError(f"Invalid optimizer: LRS-OPT unrolls metaopt optimizers (metaopt.make_optimizer) and "
                     f"torch.optim.SGD / Adam, not {type(optimizer).__name__}")


def _merged(old: NamedTuple, new: NamedTuple) -> NamedTuple:
    """``new`` with the per-parameter entries of ``old`` that ``new`` lacks (parameters that did not step)."""
    return type(new)(*({**a, **b} if isinstance(b, dict) else b for a, b in zip(old, new)))


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
        train_loss: ``train_loss(fmodel, t)``, the training loss L_t of step t computed with ``fmodel`` (a
            :class:`FunctionalModel`: ``model`` at the unrolled weights, called like it). It decides the minibatch of each step; one that draws a
            fresh batch from a generator it owns randomizes the progression at every outer iteration (paper fn. 7).
        val_loss: ``val_loss(fmodel)``, the objective E at the final weights w_T.

    Returns:
        ``ScheduleHypergradient(val_loss, hypergrad)``; ``hypergrad`` has the schedule's shape, dtype and device.
    """
    num_groups = len(optimizer.param_groups)
    _check_schedule(schedule, num_groups)
    eta = schedule.detach().clone().requires_grad_(True)  # the caller's tensor is neither modified nor tracked
    groups, states = _groups(model, optimizer)
    weights = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    for t in range(eta.shape[0]):
        loss = train_loss(FunctionalModel(model, weights, buffers), t)
        grads = dict(zip(weights, torch.autograd.grad(loss, list(weights.values()), create_graph=True,
                                                      allow_unused=True)))
        new = dict(weights)
        for i, group in enumerate(groups):
            live = [(n, m) for n, m in zip(group.names, group.model_names) if grads[m] is not None]
            if not live:
                continue
            rate = eta[t] if eta.dim() == 1 else eta[t, i]
            stepped, state = group.rule(rate).step({n: weights[m] for n, m in live}, {n: grads[m] for n, m in live},
                                                  states[i])
            states[i] = _merged(states[i], state)
            new.update({m: stepped[n] for n, m in live})
        weights = new
    objective = val_loss(FunctionalModel(model, weights, buffers))
    (hypergrad,) = torch.autograd.grad(objective, eta, allow_unused=True)
    if hypergrad is None:  # E does not depend on the schedule (e.g. T steps that never touch E's weights)
        hypergrad = torch.zeros_like(eta)
    return ScheduleHypergradient(objective.detach(), hypergrad.detach())


OUTER_METHODS = ("gd", "adam")


def optimize_schedule(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Tensor, train_loss: TrainLoss,
                      val_loss: ValLoss, outer_steps: int, outer_lr: float, *, outer: str = "gd",
                      callback: Callable[[int, ScheduleHypergradient, Tensor], None] | None = None
                      ) -> ScheduleHistory:
    """LRS-OPT: K = ``outer_steps`` iterations of projected gradient descent on the schedule (MARTHE Sec. 5).

    ``outer="gd"`` (default): η^(k+1) = max(η^(k) − γ·∇f_T(η^(k)), 0) with γ = ``outer_lr``: the projection onto the
    feasible set ℝ_+^T of eq. 1 (the paper: "could be solved by projected gradient descent"). The paper initializes
    η = 0.01·1 and runs 5000 iterations with T = 512, without stating γ.

    ``outer="adam"``: the same projection after each step of ``torch.optim.Adam`` (step ``outer_lr``, its default
    β's) on η instead of the plain gradient step. The hypergradient's entries differ in scale by orders of magnitude
    along the schedule (measured on MARTHE's FFNN at η = 0.01: about −0.4 to −0.8 for the first rates, −200 for the
    last ones, which act on the final weights directly), so a plain step small enough for the last rates barely moves
    the first ones, and one that moves the first ones throws the last ones far out (γ = 0.1: the last rate at 21
    after one iteration, and training diverged). Adam's per-rate normalization moves every rate by about
    ``outer_lr`` per iteration whatever its gradient's scale: the choice for budgets of tens of iterations instead of
    the paper's 5000. Deterministic, like the plain step.

    The other arguments are as :func:`schedule_hypergradient`. ``callback(k, result, new_schedule)``, if given, is
    called after each iteration (for logging).

    Returns:
        ``ScheduleHistory(schedules, val_losses, hypergrads)`` — every iterate including the initial and final
        schedules, and f_T and ∇f_T at iterates 0 … K − 1.
    """
    if isinstance(outer_steps, bool) or not isinstance(outer_steps, int) or outer_steps < 0:
        raise ValueError(f"Invalid outer_steps: {outer_steps!r} (expected an integer ≥ 0)")
    check_range("outer_lr", outer_lr)
    if outer not in OUTER_METHODS:
        raise ValueError(f"Invalid outer: {outer!r} (expected one of {OUTER_METHODS})")
    _check_schedule(schedule, len(optimizer.param_groups))
    eta = schedule.detach().clone()
    adam = torch.optim.Adam([eta], lr=outer_lr) if outer == "adam" else None
    schedules, losses, grads = [eta.clone()], [], []
    for k in range(outer_steps):
        result = schedule_hypergradient(model, optimizer, eta, train_loss, val_loss)
        if adam is None:
            eta = (eta - outer_lr * result.hypergrad).clamp(min=0.0)
        else:
            eta.grad = result.hypergrad.detach().clone()
            adam.step()
            eta.grad = None
            with torch.no_grad():
                eta.clamp_(min=0.0)
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
