"""The classic hand-designed optimizers as functional rules with ``torch.optim`` faces.

``sgd momentum nesterov adam rmsprop adagrad adadelta``: each rule reproduces torch's single-tensor
(``foreach=False``) arithmetic operation for operation, out of place, so that the face is bit-for-bit
``torch.optim`` (tested in float32 and float64) while the rule stays differentiable for meta-training.
The direction helpers (:func:`sgd_direction`, :func:`adam_direction`, :func:`apply_update`) are shared with the
hypergradient optimizers in :mod:`metaopt.hypergrad`, which add learning-rate adaptation on top of them.

The faces step in place with ``torch._foreach_*`` ops (:class:`ForeachFace`): the same operations in the same order
as the rule, on all of a group's tensors per call and without the rule's fresh tensors, so a step costs what
``torch.optim``'s ``foreach`` step costs and equals the rule (``fast=False``) bit for bit (tested). A tensor-valued
``lr`` takes the rule.

One difference from torch, by design: the step counter is group-level (one per param group, stored in
``param_groups[i]["step"]``) rather than per parameter, so every parameter of a group must receive gradients
together for the bias corrections to match torch (the usual case).
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metaopt.core import CoreOptimizer, FunctionalOptimizer, Params, check_betas, check_range
from metaopt.registry import MemoryModel, register_optimizer


def apply_update(param: Tensor, direction: Tensor, lr: float | Tensor) -> Tensor:
    """``param - lr * direction``; a Python-float ``lr`` uses torch's fused ``torch.add(..., alpha=-lr)``
    (bit-identical to ``torch.optim``), a tensor ``lr`` stays differentiable."""
    if isinstance(lr, Tensor):
        return param - lr * direction
    return torch.add(param, direction, alpha=-lr)


def with_weight_decay(grad: Tensor, param: Tensor, weight_decay: float) -> Tensor:
    """Coupled L2 weight decay, as torch: ``grad + weight_decay * param`` (out of place)."""
    return grad.add(param, alpha=weight_decay) if weight_decay != 0 else grad


# ----------------------------------------------------------------------------------------------------------------------
# The in-place face


class ForeachFace(CoreOptimizer):
    """A :class:`CoreOptimizer` whose step is :meth:`foreach_step`: the rule's arithmetic in place, with
    ``torch._foreach_*`` ops over the group's tensors (``fast=True``, the default), else the rule (``fast=False``,
    the reference the tests hold it to). The state lives where the rule's does (per-parameter fields in
    ``self.state[p]``, the step counter in the group), so either path resumes the other's ``state_dict()``.

    ``screens_nonfinite``: the face's :meth:`foreach_step` notices non-finite gradients itself, from a reduction it
    computes anyway (the hypergradient ``⟨g, d⟩`` is NaN or infinite whenever g is, as 0·inf is NaN), and then calls
    :meth:`~metaopt.core.NonfiniteGuard.check_finite` on the gradients (a reduction can also overflow from finite
    values); the separate finiteness pass over the gradients is saved. A group's first step (no
    state yet) is always checked first, so that a skipped first step leaves no state, as on the rule's path."""

    fast: bool = True
    screens_nonfinite: bool = False

    @abc.abstractmethod
    def foreach_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                     state: list[dict[str, Tensor]]) -> bool | None:
        """One step of the group in place: ``params``, their ``grads`` and per-parameter ``state`` dicts (in the
        same order); the step counter is ``group["step"]`` (the number of steps taken so far), advanced here.
        Returns False where it skipped the step (only faces that screen non-finite gradients themselves)."""

    def use_rule(self, group: dict[str, Any]) -> bool:
        """Whether this group steps through the rule: ``fast=False``, or a tensor-valued learning rate."""
        return not self.fast or isinstance(group["lr"], Tensor)

    def step_group(self, group: dict[str, Any], grads: Params | None = None) -> bool:
        if self.use_rule(group):
            return super().step_group(group, grads)
        if grads is None and "step" in group:  # the hot path: lists straight from p.grad, no names needed
            params = [p for p in group["params"] if p.grad is not None]
            state = [self.state[p] for p in params]
            if params and all(state):
                grad_list = [p.grad for p in params]
                if any(g.is_sparse for g in grad_list):
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if not self.screens_nonfinite and not self.check_finite(group, grad_list):
                    return False
                return self.foreach_step(group, params, grad_list, state) is not False
        gathered = self.gather(group, grads, check=not self.screens_nonfinite)
        if gathered is None:
            return False
        names, params, grads = gathered
        live = {n: p for n, p in zip(names, params) if n in grads}
        if any(not self.state[p] for p in live.values()) or "step" not in group:  # first step: the rule's init
            if self.screens_nonfinite and not self.check_finite(group, grads.values()):
                return False
            self.store_rule_state(group, live, self.load_rule_state(group, self.rule(group), live))
        stepped = self.foreach_step(group, list(live.values()), [grads[n] for n in live],
                                    [self.state[p] for p in live.values()])
        return stepped is not False


def decayed(grads: list[Tensor], params: list[Tensor], weight_decay: float) -> list[Tensor]:
    """:func:`with_weight_decay` over lists."""
    return torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay != 0 else grads


def _fields(state: list[dict[str, Tensor]], name: str) -> list[Tensor]:
    return [s[name] for s in state]


# ----------------------------------------------------------------------------------------------------------------------
# SGD, heavy-ball momentum, Nesterov


def sgd_direction(grad: Tensor, buf: Tensor, first: bool, momentum: float, dampening: float,
                  nesterov: bool) -> tuple[Tensor, Tensor]:
    """torch.optim.SGD's direction and new momentum buffer (``buf`` is ignored on the first step, where torch
    starts the buffer at the gradient). Returns ``(direction, buf)``."""
    if momentum == 0:
        return grad, buf
    buf = grad.clone() if first else buf.mul(momentum).add(grad, alpha=1 - dampening)
    direction = grad.add(buf, alpha=momentum) if nesterov else buf
    return direction, buf


class SGDState(NamedTuple):
    step: int
    momentum_buffer: dict[str, Tensor]


class SGDRule(FunctionalOptimizer):
    """SGD with optional heavy-ball or Nesterov momentum and coupled weight decay (torch.optim.SGD)."""

    def __init__(self, lr: float | Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.nesterov, self.weight_decay = nesterov, weight_decay

    def init(self, params: Params) -> SGDState:
        return SGDState(0, {n: torch.zeros_like(p) for n, p in params.items()})

    def step(self, params: Params, grads: Params, state: SGDState) -> tuple[Params, SGDState]:
        new_params, bufs = {}, {}
        for n, p in params.items():
            g = with_weight_decay(grads[n], p, self.weight_decay)
            d, bufs[n] = sgd_direction(g, state.momentum_buffer[n], state.step == 0, self.momentum,
                                       self.dampening, self.nesterov)
            new_params[n] = apply_update(p, d, self.lr)
        return new_params, SGDState(state.step + 1, bufs)


class SGD(ForeachFace):
    """SGD (Robbins & Monro 1951), with momentum (Polyak 1964) or Nesterov momentum (Sutskever et al. 2013).

    Identical to ``torch.optim.SGD`` step for step. State: one momentum buffer per parameter when momentum > 0
    (+n floats). ``fast=False`` steps through the functional rule instead of in place (same numbers).
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, *, nonfinite: str = "skip", fast: bool = True):
        self.fast = fast
        check_range("learning rate", lr)
        check_range("momentum value", momentum)
        check_range("weight_decay value", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Invalid nesterov: Nesterov momentum requires a momentum > 0 and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                                      weight_decay=weight_decay), nonfinite=nonfinite)

    def rule(self, group: dict[str, Any]) -> SGDRule:
        return SGDRule(group["lr"], group["momentum"], group["dampening"], group["nesterov"], group["weight_decay"])

    def foreach_step(self, group, params, grads, state) -> None:
        grads = decayed(grads, params, group["weight_decay"])
        momentum, direction = group["momentum"], grads
        if momentum != 0:
            bufs = _fields(state, "momentum_buffer")
            if group["step"] == 0:  # torch starts the buffer at the gradient
                torch._foreach_copy_(bufs, grads)
            else:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads, alpha=1 - group["dampening"])
            direction = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, direction, alpha=-group["lr"])
        group["step"] += 1


# The registrations' records (metaopt.registry): the hyper-parameters of the contract tests suit their least-squares
# problem (tests/test_contract.py: well conditioned, 40 steps); the memory models are at the registered defaults (no
# weight decay; RMSprop not centered, no momentum).
@register_optimizer("sgd", kind="classic", builds=SGD, test_hparams=dict(lr=0.1), memory=MemoryModel(0, 0, "no state"))
def _make_sgd(params, lr: float = 1e-3, weight_decay: float = 0.0, **kw) -> SGD:
    return SGD(params, lr=lr, weight_decay=weight_decay, **kw)


@register_optimizer("momentum", kind="classic", builds=SGD, test_hparams=dict(lr=0.05),
                    memory=MemoryModel(1, 0, "momentum buffer"))
def _make_momentum(params, lr: float = 1e-3, momentum: float = 0.9, **kw) -> SGD:
    return SGD(params, lr=lr, momentum=momentum, **kw)


@register_optimizer("nesterov", fixed={"nesterov": True}, kind="classic", builds=SGD, test_hparams=dict(lr=0.05),
                    memory=MemoryModel(1, 0, "momentum buffer"))
def _make_nesterov(params, lr: float = 1e-3, momentum: float = 0.9, **kw) -> SGD:
    return SGD(params, lr=lr, momentum=momentum, nesterov=True, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# Adam


def adam_moments(grad: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """torch.optim.Adam's moment updates (``lerp`` for m, ``mul``/``addcmul`` for v), out of place."""
    return m.lerp(grad, 1 - beta1), v.mul(beta2).addcmul(grad, grad, value=1 - beta2)


def adam_denominator(v: Tensor, step: int, beta2: float, eps: float) -> Tensor:
    """``sqrt(v) / sqrt(1 - beta2**step) + eps``: Adam's denominator in torch's (modern, paper) form."""
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    return (v.sqrt() / bias_correction2_sqrt).add(eps)


def adam_direction(m: Tensor, v: Tensor, step: int, beta1: float, beta2: float, eps: float) -> Tensor:
    """Adam's update direction ``m_hat / (sqrt(v_hat) + eps)`` in torch's ε placement (spec §4 step 5)."""
    return m / (1 - beta1**step) / adam_denominator(v, step, beta2, eps)


def adam_apply(param: Tensor, m: Tensor, v: Tensor, step: int, lr: float | Tensor, beta1: float, beta2: float,
               eps: float) -> Tensor:
    """Adam's parameter update with torch's exact operation sequence for a float ``lr``."""
    denom = adam_denominator(v, step, beta2, eps)
    if isinstance(lr, Tensor):
        return param - (lr / (1 - beta1**step)) * m / denom
    return param.addcdiv(m, denom, value=-(lr / (1 - beta1**step)))


def adam_foreach_denominator(vs: list[Tensor], step: int, beta2: float, eps: float) -> list[Tensor]:
    """:func:`adam_denominator` over lists (new tensors)."""
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, (1 - beta2**step) ** 0.5)
    torch._foreach_add_(denom, eps)
    return denom


def adam_foreach_update(params: list[Tensor], grads: list[Tensor], ms: list[Tensor], vs: list[Tensor], step: int,
                        lr: float, beta1: float, beta2: float, eps: float) -> None:
    """Adam's step ``step`` in place over lists, in :func:`adam_moments` / :func:`adam_apply`'s arithmetic (a
    Python-float ``lr``)."""
    torch._foreach_lerp_(ms, grads, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    denom = adam_foreach_denominator(vs, step, beta2, eps)
    torch._foreach_addcdiv_(params, ms, denom, value=-(lr / (1 - beta1**step)))


class AdamState(NamedTuple):
    step: int
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]


class AdamRule(FunctionalOptimizer):
    """Adam (Kingma & Ba 2015) with coupled L2 weight decay, in torch.optim.Adam's arithmetic."""

    def __init__(self, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.lr, (self.beta1, self.beta2), self.eps, self.weight_decay = lr, betas, eps, weight_decay

    def init(self, params: Params) -> AdamState:
        zeros = {n: torch.zeros_like(p) for n, p in params.items()}
        return AdamState(0, zeros, {n: torch.zeros_like(p) for n, p in params.items()})

    def step(self, params: Params, grads: Params, state: AdamState) -> tuple[Params, AdamState]:
        step = state.step + 1
        new_params, ms, vs = {}, {}, {}
        for n, p in params.items():
            g = with_weight_decay(grads[n], p, self.weight_decay)
            ms[n], vs[n] = adam_moments(g, state.exp_avg[n], state.exp_avg_sq[n], self.beta1, self.beta2)
            new_params[n] = adam_apply(p, ms[n], vs[n], step, self.lr, self.beta1, self.beta2, self.eps)
        return new_params, AdamState(step, ms, vs)


class Adam(ForeachFace):
    """Adam (Kingma & Ba 2015). Identical to ``torch.optim.Adam(foreach=False)`` step for step.

    Defaults are the paper's: lr 1e-3, betas (0.9, 0.999), eps 1e-8. State: m and v (+2n floats). ``fast=False``
    steps through the functional rule instead of in place (same numbers).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, nonfinite: str = "skip", fast: bool = True):
        self.fast = fast
        check_range("learning rate", lr)
        check_range("epsilon value", eps)
        check_betas(betas)
        check_range("weight_decay value", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                         nonfinite=nonfinite)

    def rule(self, group: dict[str, Any]) -> AdamRule:
        return AdamRule(group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"])

    def foreach_step(self, group, params, grads, state) -> None:
        (beta1, beta2), step = group["betas"], group["step"] + 1
        grads = decayed(grads, params, group["weight_decay"])
        adam_foreach_update(params, grads, _fields(state, "exp_avg"), _fields(state, "exp_avg_sq"), step, group["lr"],
                            beta1, beta2, group["eps"])
        group["step"] = step


register_optimizer("adam", kind="classic", test_hparams=dict(lr=0.05), memory=MemoryModel(2, 0, "m, v"))(Adam)


# ----------------------------------------------------------------------------------------------------------------------
# RMSprop, Adagrad, Adadelta


class RMSpropState(NamedTuple):
    step: int
    square_avg: dict[str, Tensor]
    grad_avg: dict[str, Tensor]
    momentum_buffer: dict[str, Tensor]


class RMSpropRule(FunctionalOptimizer):
    """RMSprop (Tieleman & Hinton 2012) in torch.optim.RMSprop's arithmetic (optionally centered, with momentum)."""

    def __init__(self, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.0, centered: bool = False):
        self.lr, self.alpha, self.eps, self.weight_decay = lr, alpha, eps, weight_decay
        self.momentum, self.centered = momentum, centered

    def init(self, params: Params) -> RMSpropState:
        def zeros() -> Params:
            return {n: torch.zeros_like(p) for n, p in params.items()}

        return RMSpropState(0, zeros(), zeros(), zeros())

    def step(self, params: Params, grads: Params, state: RMSpropState) -> tuple[Params, RMSpropState]:
        new_params, sq, ga, bufs = {}, {}, {}, {}
        for n, p in params.items():
            g = with_weight_decay(grads[n], p, self.weight_decay)
            sq[n] = state.square_avg[n].mul(self.alpha).addcmul(g, g, value=1 - self.alpha)
            ga[n] = state.grad_avg[n]
            if self.centered:
                ga[n] = ga[n].lerp(g, 1 - self.alpha)
                avg = sq[n].addcmul(ga[n], ga[n], value=-1).sqrt()
            else:
                avg = sq[n].sqrt()
            avg = avg.add(self.eps)
            bufs[n] = state.momentum_buffer[n]
            if self.momentum > 0:
                bufs[n] = bufs[n].mul(self.momentum).addcdiv(g, avg)
                new_params[n] = apply_update(p, bufs[n], self.lr)
            elif isinstance(self.lr, Tensor):
                new_params[n] = p - self.lr * g / avg
            else:
                new_params[n] = p.addcdiv(g, avg, value=-self.lr)
        return new_params, RMSpropState(state.step + 1, sq, ga, bufs)


class RMSprop(ForeachFace):
    """RMSprop (Tieleman & Hinton 2012). Identical to ``torch.optim.RMSprop`` step for step.

    Defaults are torch's: lr 1e-2, alpha 0.99, eps 1e-8. State: square average, plus the gradient average when
    centered and a momentum buffer when momentum > 0 (stored as zeros otherwise: +3n floats).
    """

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.0, centered: bool = False, *, nonfinite: str = "skip", fast: bool = True):
        self.fast = fast
        check_range("learning rate", lr)
        check_range("epsilon value", eps)
        check_range("alpha value", alpha)
        check_range("momentum value", momentum)
        check_range("weight_decay value", weight_decay)
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      centered=centered), nonfinite=nonfinite)

    def rule(self, group: dict[str, Any]) -> RMSpropRule:
        return RMSpropRule(group["lr"], group["alpha"], group["eps"], group["weight_decay"], group["momentum"],
                           group["centered"])

    def foreach_step(self, group, params, grads, state) -> None:
        alpha, momentum, lr = group["alpha"], group["momentum"], group["lr"]
        grads = decayed(grads, params, group["weight_decay"])
        sq = _fields(state, "square_avg")
        torch._foreach_mul_(sq, alpha)
        torch._foreach_addcmul_(sq, grads, grads, value=1 - alpha)
        if group["centered"]:
            ga = _fields(state, "grad_avg")
            torch._foreach_lerp_(ga, grads, 1 - alpha)
            avg = torch._foreach_addcmul(sq, ga, ga, value=-1)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(sq)
        torch._foreach_add_(avg, group["eps"])
        if momentum > 0:
            bufs = _fields(state, "momentum_buffer")
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_addcdiv_(bufs, grads, avg)
            torch._foreach_add_(params, bufs, alpha=-lr)
        else:
            torch._foreach_addcdiv_(params, grads, avg, value=-lr)
        group["step"] += 1


register_optimizer("rmsprop", kind="classic", test_hparams=dict(lr=0.01),
                   memory=MemoryModel(1, 0, "square average"))(RMSprop)


class AdagradState(NamedTuple):
    step: int
    sum: dict[str, Tensor]


class AdagradRule(FunctionalOptimizer):
    """Adagrad (Duchi et al. 2011) in torch.optim.Adagrad's arithmetic (dense gradients)."""

    def __init__(self, lr: float | Tensor = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10):
        self.lr, self.lr_decay, self.weight_decay = lr, lr_decay, weight_decay
        self.initial_accumulator_value, self.eps = initial_accumulator_value, eps

    def init(self, params: Params) -> AdagradState:
        return AdagradState(0, {n: torch.full_like(p, self.initial_accumulator_value) for n, p in params.items()})

    def step(self, params: Params, grads: Params, state: AdagradState) -> tuple[Params, AdagradState]:
        step = state.step + 1
        clr = self.lr / (1 + (step - 1) * self.lr_decay)
        new_params, sums = {}, {}
        for n, p in params.items():
            g = with_weight_decay(grads[n], p, self.weight_decay)
            sums[n] = state.sum[n].addcmul(g, g, value=1)
            std = sums[n].sqrt().add(self.eps)
            new_params[n] = p - clr * g / std if isinstance(clr, Tensor) else p.addcdiv(g, std, value=-clr)
        return new_params, AdagradState(step, sums)


class Adagrad(ForeachFace):
    """Adagrad (Duchi, Hazan & Singer 2011). Identical to ``torch.optim.Adagrad`` step for step (dense gradients).

    Defaults are torch's: lr 1e-2, eps 1e-10. State: the sum of squared gradients (+n floats).
    """

    def __init__(self, params, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, *, nonfinite: str = "skip",
                 fast: bool = True):
        self.fast = fast
        check_range("learning rate", lr)
        check_range("lr_decay", lr_decay)
        check_range("weight_decay value", weight_decay)
        check_range("initial_accumulator_value", initial_accumulator_value)
        check_range("epsilon value", eps)
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value, eps=eps),
                         nonfinite=nonfinite)

    def rule(self, group: dict[str, Any]) -> AdagradRule:
        return AdagradRule(group["lr"], group["lr_decay"], group["weight_decay"], group["initial_accumulator_value"],
                           group["eps"])

    def foreach_step(self, group, params, grads, state) -> None:
        step = group["step"] + 1
        clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
        grads = decayed(grads, params, group["weight_decay"])
        sums = _fields(state, "sum")
        torch._foreach_addcmul_(sums, grads, grads, value=1)
        std = torch._foreach_sqrt(sums)
        torch._foreach_add_(std, group["eps"])
        torch._foreach_addcdiv_(params, grads, std, value=-clr)
        group["step"] = step


register_optimizer("adagrad", kind="classic", test_hparams=dict(lr=0.1),
                   memory=MemoryModel(1, 0, "sum of squares"))(Adagrad)


class AdadeltaState(NamedTuple):
    step: int
    square_avg: dict[str, Tensor]
    acc_delta: dict[str, Tensor]


class AdadeltaRule(FunctionalOptimizer):
    """Adadelta (Zeiler 2012) in torch.optim.Adadelta's arithmetic."""

    def __init__(self, lr: float | Tensor = 1.0, rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0.0):
        self.lr, self.rho, self.eps, self.weight_decay = lr, rho, eps, weight_decay

    def init(self, params: Params) -> AdadeltaState:
        return AdadeltaState(0, {n: torch.zeros_like(p) for n, p in params.items()},
                             {n: torch.zeros_like(p) for n, p in params.items()})

    def step(self, params: Params, grads: Params, state: AdadeltaState) -> tuple[Params, AdadeltaState]:
        new_params, sq, acc = {}, {}, {}
        for n, p in params.items():
            g = with_weight_decay(grads[n], p, self.weight_decay)
            sq[n] = state.square_avg[n].mul(self.rho).addcmul(g, g, value=1 - self.rho)
            std = sq[n].add(self.eps).sqrt()
            delta = state.acc_delta[n].add(self.eps).sqrt().div(std).mul(g)
            acc[n] = state.acc_delta[n].mul(self.rho).addcmul(delta, delta, value=1 - self.rho)
            new_params[n] = apply_update(p, delta, self.lr)
        return new_params, AdadeltaState(state.step + 1, sq, acc)


class Adadelta(ForeachFace):
    """Adadelta (Zeiler 2012). Identical to ``torch.optim.Adadelta`` step for step.

    Defaults are torch's: lr 1.0, rho 0.9, eps 1e-6. State: square average and accumulated delta (+2n floats).
    """

    def __init__(self, params, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0.0,
                 *, nonfinite: str = "skip", fast: bool = True):
        self.fast = fast
        check_range("learning rate", lr)
        check_range("rho value", rho, 0.0, 1.0)
        check_range("epsilon value", eps)
        check_range("weight_decay value", weight_decay)
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay), nonfinite=nonfinite)

    def rule(self, group: dict[str, Any]) -> AdadeltaRule:
        return AdadeltaRule(group["lr"], group["rho"], group["eps"], group["weight_decay"])

    def foreach_step(self, group, params, grads, state) -> None:
        rho, eps = group["rho"], group["eps"]
        grads = decayed(grads, params, group["weight_decay"])
        sq, acc = _fields(state, "square_avg"), _fields(state, "acc_delta")
        torch._foreach_mul_(sq, rho)
        torch._foreach_addcmul_(sq, grads, grads, value=1 - rho)
        std = torch._foreach_add(sq, eps)
        torch._foreach_sqrt_(std)
        delta = torch._foreach_add(acc, eps)
        torch._foreach_sqrt_(delta)
        torch._foreach_div_(delta, std)
        torch._foreach_mul_(delta, grads)
        torch._foreach_mul_(acc, rho)
        torch._foreach_addcmul_(acc, delta, delta, value=1 - rho)
        torch._foreach_add_(params, delta, alpha=-group["lr"])
        group["step"] += 1


register_optimizer("adadelta", kind="classic", test_hparams=dict(lr=1.0),
                   memory=MemoryModel(2, 0, "square average, accumulated delta"))(Adadelta)
