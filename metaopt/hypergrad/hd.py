"""Hypergradient descent on a global learning rate: SGD-HD, SGDN-HD (and heavy ball) and Adam-HD (Baydin et al. 2018).

This module owns the HD family of ``specs/hypergradient.md`` §1–§4 and the pieces other rules reuse:

- :func:`global_hypergradient` — ``h_t = −Σ_p ⟨g_t^p, d_{t−1}^p⟩`` over every tensor of a group, in float64;
- :func:`adam_previous_direction` / :func:`adam_hypergradient` — Adam's ``d_{t−1}`` recomputed from ``(m, v)``
  (no extra buffer) and the resulting global ``h_t``;
- :func:`update_learning_rate` — ``α_t = α_{t−1} − β·h_t`` with the optional clip at zero and the negative-α flag;
- the functional rules :class:`SGDHDRule` and :class:`AdamHDRule` (differentiable in a tensor ``α`` and ``β``), and
  their ``torch.optim`` faces :class:`SGDHD` and :class:`AdamHD`, registered as ``sgd-hd``, ``sgdn-hd`` and
  ``adam-hd``.

Indexing is Baydin's (spec §1): ``θ_t`` is the parameter after step t, ``g_t = ∇f_t(θ_{t−1})`` includes coupled L2
weight decay, ``d_t`` is the step's direction and ``θ_t = θ_{t−1} − α_t·d_t``. Since ``d_0 = 0``, ``h_1 = 0`` and
``α_1 = α_0``. The learning rate is ONE scalar per parameter group, updated once per step from ``h`` summed over all
of the group's tensors before any parameter moves, so the result does not depend on how the coordinates are split into
tensors or in which order they were registered (spec §4, oracle SGDHD-5).

With ``hypergrad_lr = 0`` the faces are ``torch.optim.SGD`` / ``SGD(nesterov=True)`` / ``Adam`` (``foreach=False``)
bit for bit: the directions and the final update are the shared helpers of :mod:`metaopt.baselines`, and a Python-float
``α`` is updated in Python float arithmetic (``h`` converted with ``float()``), so ``α − 0·h`` is exactly ``α``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metaopt.baselines import (ForeachFace, adam_apply, adam_direction, adam_foreach_denominator, adam_foreach_update,
                                adam_moments, apply_update, decayed, sgd_direction, with_weight_decay)
from metaopt.compiling import check_compile, compiled_step
from metaopt.core import FunctionalOptimizer, Params, check_betas, check_range
from metaopt.numerics import dot64
from metaopt.registry import MemoryModel, register_optimizer

logger = logging.getLogger(__name__)

Scalar = float | Tensor


class NonFiniteLearningRate(FloatingPointError):
    """The hypergradient step produced a NaN or infinite learning rate (Python-float mode only)."""


# ----------------------------------------------------------------------------------------------------------------------
# The shared pieces


def negated_dot_sum(pairs: Iterable[tuple[Tensor, Tensor]]) -> Tensor | None:
    """``−Σ ⟨a, b⟩`` over the pairs in their order, each term :func:`~metaopt.numerics.dot64` (None for no pairs):
    the one summation every HD hypergradient uses, so that the rules and the in-place faces agree bit for bit."""
    h = None
    for a, b in pairs:
        term = dot64(a, b)
        h = -term if h is None else h - term
    return h


def global_hypergradient(grads: Mapping[str, Tensor], prev_directions: Mapping[str, Tensor]) -> Tensor:
    """The global hypergradient ``h_t = ∂f_t(θ_{t−1})/∂α_{t−1} = −Σ_p ⟨g_t^p, d_{t−1}^p⟩`` (spec §1).

    Args:
        grads: ``g_t`` per parameter name (already including weight decay). Parameters without a gradient are simply
            absent and contribute 0.
        prev_directions: ``d_{t−1}`` per parameter name (same shapes); a missing name contributes 0.

    Returns:
        A 0-dim float64 tensor on the gradients' device, summed over every tensor (float64 accumulation whatever the
        parameters' dtype). Differentiable in both arguments.
    """
    h = negated_dot_sum((g, prev_directions[name]) for name, g in grads.items() if name in prev_directions)
    if h is None:
        device = next(iter(grads.values())).device if grads else None
        return torch.zeros((), dtype=torch.float64, device=device)
    return h


def adam_previous_direction(exp_avg: Tensor, exp_avg_sq: Tensor, step: int, beta1: float, beta2: float, eps: float,
                            gbaydin_compat: bool = False) -> Tensor:
    """Adam's direction ``d_step`` recomputed from its moments ``(m, v)`` after ``step`` steps (spec §4 step 2).

    Default: the paper / modern torch form ``m̂/(√v̂ + ε)``. ``gbaydin_compat``: the reference code's
    ``m/(√v + ε)·√(1−β2^k)/(1−β1^k)``, whose effective ε is ``ε/√(1−β2^k)`` (A-HD2, oracle ADAM-3).
    """
    if gbaydin_compat:
        return exp_avg / exp_avg_sq.sqrt().add(eps) * (math.sqrt(1 - beta2**step) / (1 - beta1**step))
    return adam_direction(exp_avg, exp_avg_sq, step, beta1, beta2, eps)


def adam_hypergradient(grads: Mapping[str, Tensor], exp_avg: Mapping[str, Tensor], exp_avg_sq: Mapping[str, Tensor],
                       step: int, beta1: float, beta2: float, eps: float, gbaydin_compat: bool = False) -> Tensor:
    """Adam-HD's global ``h_t = −Σ_p ⟨g_t^p, d_{t−1}^p⟩`` with ``d_{t−1}`` recomputed from the moments *before* they
    are updated (``step = t − 1`` steps taken so far; ``h_1 = 0``). One tensor's direction is alive at a time, so the
    transient memory is the largest tensor, not n. Returns a 0-dim float64 tensor."""
    if step == 0:
        return global_hypergradient(grads, {})
    h = negated_dot_sum((g, adam_previous_direction(exp_avg[name], exp_avg_sq[name], step, beta1, beta2, eps,
                                                    gbaydin_compat)) for name, g in grads.items())
    return h if h is not None else global_hypergradient(grads, {})


def update_learning_rate(lr: Scalar, hypergrad_lr: Scalar, h: Tensor | float,
                         clip_lr_at_zero: bool = False) -> tuple[Scalar, bool | Tensor]:
    """One hypergradient-descent step on the learning rate: ``α_t = α_{t−1} − β·h_t`` (spec §2 step 3).

    Python floats ``lr`` and ``hypergrad_lr`` give a Python float (``h`` converted with ``float()``, one host
    synchronisation, none where the caller passes ``h`` as a float it has read already; ``β = 0`` leaves ``α``
    bit-identical). If either is a tensor the result is a tensor,
    differentiable in ``lr``, ``hypergrad_lr`` and ``h`` (cast to ``lr``'s dtype when ``lr`` is a tensor, so the
    state's dtype is stable); pass tensors under ``torch.func`` transforms, where ``float()`` is not allowed.

    ``clip_lr_at_zero`` applies ``α_t ← max(α_t, 0)`` (A-HD3; off by default, as in the reference code).

    Returns:
        ``(α_t, negative)``: ``negative`` says whether the unclipped ``α_t`` was below zero (a bool, or a 0-dim bool
        tensor in tensor mode, to avoid a device synchronisation).

    Raises:
        NonFiniteLearningRate: in Python-float mode, when ``α_t`` is NaN or infinite (e.g. ``h`` overflowed float64).
    """
    if isinstance(lr, Tensor) or isinstance(hypergrad_lr, Tensor):
        new_lr = lr - hypergrad_lr * h
        if isinstance(lr, Tensor):
            new_lr = new_lr.to(lr.dtype)
        negative = new_lr < 0
        if clip_lr_at_zero:
            new_lr = new_lr.clamp(min=0.0)
        return new_lr, negative
    new_lr = lr - hypergrad_lr * float(h)
    if not math.isfinite(new_lr):
        raise NonFiniteLearningRate(
            f"hypergradient step gave a non-finite learning rate ({new_lr!r} from lr={lr!r}, "
            f"hypergrad_lr={hypergrad_lr!r}, h={float(h)!r}); the step was not applied. Lower hypergrad_lr.")
    negative = new_lr < 0
    if clip_lr_at_zero and negative:
        new_lr = 0.0
    return new_lr, negative


def warn_negative_rate_once(optimizer: Any, group: dict[str, Any], negative_before: int, action: str,
                            now: str = "") -> None:
    """After a step of ``group``: if ``group["negative_lr_steps"]`` grew past ``negative_before``, log the first such
    step of ``optimizer`` as a warning (what happened, ``action`` taken, ``now``: the rate's new value, if given);
    later ones are only counted. The HD, CAM-HD and TLR faces share it; the flag is ``optimizer._logged_negative_lr``."""
    if group["negative_lr_steps"] > negative_before and not getattr(optimizer, "_logged_negative_lr", False):
        logger.warning("%s: a hypergradient step drove the learning rate negative at step %d; %s%s. Further "
                       "occurrences are counted in param_groups[i]['negative_lr_steps'].", type(optimizer).__name__,
                       group["step"], action, f" ({now})" if now else "")
        optimizer._logged_negative_lr = True


def _count(counter: int | Tensor, negative: bool | Tensor) -> int | Tensor:
    if isinstance(negative, Tensor):
        return counter + negative.to(torch.int64)
    return counter + int(negative)


# ----------------------------------------------------------------------------------------------------------------------
# SGD-HD, heavy ball, SGDN-HD


class SGDHDState(NamedTuple):
    step: int
    lr: Scalar                    # α_t, the learning rate the last step used (α_0 before the first step)
    negative_lr_steps: int | Tensor  # steps whose unclipped α_t was negative
    momentum_buffer: dict[str, Tensor]  # v_t; an empty tensor until momentum first runs (torch's "None")
    prev_direction: dict[str, Tensor]   # d_{t−1}; zeros initially (so h_1 = 0)


class SGDHDRule(FunctionalOptimizer):
    """SGD-HD / heavy-ball-HD / SGDN-HD as a pure, differentiable rule (Baydin et al. 2018, Algs. 4–5; spec §2–§3).

    Per step: ``g = grad + λθ``; ``h = −Σ⟨g, d_prev⟩``; ``α ← α − β·h``; ``d = g`` (SGD), ``v`` (heavy ball) or
    ``g + μ·v`` (Nesterov) with torch's buffer ``v = μ·v + (1−τ_d)·g`` (``v_1 = g``); ``θ ← θ − α·d``; ``d_prev ← d``.

    ``lr`` is ``α_0`` (used by :meth:`init`); the running ``α`` lives in the state. ``lr`` and ``hypergrad_lr`` may be
    tensors, and the whole trajectory is then differentiable in them.
    """

    def __init__(self, lr: Scalar = 1e-3, hypergrad_lr: Scalar = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, clip_lr_at_zero: bool = False):
        self.lr, self.hypergrad_lr = lr, hypergrad_lr
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov
        self.weight_decay, self.clip_lr_at_zero = weight_decay, clip_lr_at_zero

    def init(self, params: Params) -> SGDHDState:
        # The momentum buffer starts as an empty placeholder, so plain SGD-HD holds only d_prev (+n, spec §2(d)).
        return SGDHDState(0, self.lr, 0, {n: p.new_zeros(0) for n, p in params.items()},
                          {n: torch.zeros_like(p) for n, p in params.items()})

    def step(self, params: Params, grads: Params, state: SGDHDState) -> tuple[Params, SGDHDState]:
        effective = {n: with_weight_decay(grads[n], p, self.weight_decay) for n, p in params.items()}
        # The whole group's h before any parameter moves: one global α (spec §1 "Meaning of global").
        h = global_hypergradient(effective, state.prev_direction)
        lr, negative = update_learning_rate(state.lr, self.hypergrad_lr, h, self.clip_lr_at_zero)
        new_params, bufs, directions = {}, {}, {}
        for n, p in params.items():
            g, buf = effective[n], state.momentum_buffer[n]
            d, bufs[n] = sgd_direction(g, buf, buf.shape != g.shape, self.momentum, self.dampening, self.nesterov)
            if d is grads[n]:
                d = d.clone()  # d_prev must not alias the caller's gradient (zero_grad / accumulation mutate it)
            # Heavy ball: d is the buffer itself, so d_prev costs no extra memory there.
            directions[n] = d
            new_params[n] = apply_update(p, d, lr)
        return new_params, SGDHDState(state.step + 1, lr, _count(state.negative_lr_steps, negative), bufs,
                                      directions)


# ----------------------------------------------------------------------------------------------------------------------
# Adam-HD


class AdamHDState(NamedTuple):
    step: int
    lr: Scalar
    negative_lr_steps: int | Tensor
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]


def _gbaydin_adam_apply(param: Tensor, m: Tensor, v: Tensor, step: int, lr: Scalar, beta1: float, beta2: float,
                        eps: float) -> Tensor:
    """The reference code's (old torch) Adam update ``θ − α·√(1−β2^t)/(1−β1^t) · m/(√v + ε)``."""
    denom = v.sqrt().add(eps)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    if isinstance(step_size, Tensor):
        return param - step_size * m / denom
    return param.addcdiv(m, denom, value=-step_size)


class AdamHDRule(FunctionalOptimizer):
    """Adam-HD as a pure, differentiable rule (Baydin et al. 2018, Alg. 6; spec §4).

    Per step t: ``g = grad + λθ``; if t > 1, ``d_{t−1} = m̂_{t−1}/(√v̂_{t−1} + ε)`` recomputed from the moments
    before they are updated and ``h = −Σ⟨g, d_{t−1}⟩`` (else ``h = 0``); ``α ← α − β·h`` once for the group; then
    torch's Adam step with ``α``.

    ``gbaydin_compat=True`` reproduces the reference implementation (for replication only): ``α`` is updated tensor by
    tensor inside the parameter loop, each tensor stepping with the partly-updated ``α`` (gbaydin issue #9; only the
    last tensor uses the true global ``α_t``), and ε sits where old torch put it, ``m/(√v + ε)·√bc2/bc1``, in both the
    hypergradient and the update (A-HD1, A-HD2; oracles ADAM-3, ADAM-4).
    """

    def __init__(self, lr: Scalar = 1e-3, hypergrad_lr: Scalar = 1e-7, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, clip_lr_at_zero: bool = False,
                 gbaydin_compat: bool = False):
        self.lr, self.hypergrad_lr = lr, hypergrad_lr
        (self.beta1, self.beta2), self.eps, self.weight_decay = betas, eps, weight_decay
        self.clip_lr_at_zero, self.gbaydin_compat = clip_lr_at_zero, gbaydin_compat

    def init(self, params: Params) -> AdamHDState:
        return AdamHDState(0, self.lr, 0, {n: torch.zeros_like(p) for n, p in params.items()},
                           {n: torch.zeros_like(p) for n, p in params.items()})

    def step(self, params: Params, grads: Params, state: AdamHDState) -> tuple[Params, AdamHDState]:
        if self.gbaydin_compat:
            return self._step_sequential(params, grads, state)
        prev_step, step = state.step, state.step + 1
        effective = {n: with_weight_decay(grads[n], p, self.weight_decay) for n, p in params.items()}
        h = adam_hypergradient(effective, state.exp_avg, state.exp_avg_sq, prev_step, self.beta1, self.beta2,
                               self.eps)
        lr, negative = update_learning_rate(state.lr, self.hypergrad_lr, h, self.clip_lr_at_zero)
        new_params, ms, vs = {}, {}, {}
        for n, p in params.items():
            ms[n], vs[n] = adam_moments(effective[n], state.exp_avg[n], state.exp_avg_sq[n], self.beta1, self.beta2)
            new_params[n] = adam_apply(p, ms[n], vs[n], step, lr, self.beta1, self.beta2, self.eps)
        return new_params, AdamHDState(step, lr, _count(state.negative_lr_steps, negative), ms, vs)

    def _step_sequential(self, params: Params, grads: Params, state: AdamHDState) -> tuple[Params, AdamHDState]:
        """gbaydin ``AdamHD.step``: per-tensor h and α update, each tensor stepped at once (spec §4)."""
        prev_step, step = state.step, state.step + 1
        lr, any_negative = state.lr, False
        new_params, ms, vs = {}, {}, {}
        for n, p in params.items():
            g = with_weight_decay(grads[n], p, self.weight_decay)
            if prev_step > 0:
                h = adam_hypergradient({n: g}, state.exp_avg, state.exp_avg_sq, prev_step, self.beta1, self.beta2,
                                       self.eps, gbaydin_compat=True)
                lr, negative = update_learning_rate(lr, self.hypergrad_lr, h, self.clip_lr_at_zero)
                any_negative = any_negative | negative
            ms[n], vs[n] = adam_moments(g, state.exp_avg[n], state.exp_avg_sq[n], self.beta1, self.beta2)
            new_params[n] = _gbaydin_adam_apply(p, ms[n], vs[n], step, lr, self.beta1, self.beta2, self.eps)
        return new_params, AdamHDState(step, lr, _count(state.negative_lr_steps, any_negative), ms, vs)


# ----------------------------------------------------------------------------------------------------------------------
# The compiled steps (compile=True): the faces' arithmetic as two functions of tensors each, the reduction h and the
# update, which inductor fuses into a few loops per tensor (on a CPU its C++ backend). Equal to the rule within float32
# rounding (fused loops reorder the dot products' sums), not bit for bit. The learning rate and the bias corrections
# are 0-dim tensors, so that their changing values need no recompilation; the configuration (weight decay, momentum,
# betas) is part of the graph.


def _sgd_hd_hypergradient(params: list[Tensor], grads: list[Tensor], prev: list[Tensor],
                          weight_decay: float) -> Tensor:
    """SGD-HD's ``h = −Σ⟨g + λθ, d_prev⟩``."""
    return negated_dot_sum((g + weight_decay * p if weight_decay else g, d) for p, g, d in zip(params, grads, prev))


def _sgd_hd_update(params: list[Tensor], grads: list[Tensor], prev: list[Tensor], bufs: list[Tensor], lr: Tensor,
                   weight_decay: float, momentum: float, dampening: float, nesterov: bool) -> None:
    """The SGD / heavy-ball / Nesterov step at rate ``lr`` once the buffers exist, in place; ``d_prev ← d`` except
    for heavy ball, whose ``d_prev`` is the buffer itself (the caller makes it so)."""
    for p, g, d_prev, buf in zip(params, grads, prev, bufs):
        g = g + weight_decay * p if weight_decay else g
        d = g
        if momentum:
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
            d = g + momentum * buf if nesterov else buf
        p.sub_(lr * d)
        if not momentum or nesterov:
            d_prev.copy_(d)


def _adam_hd_hypergradient(params: list[Tensor], grads: list[Tensor], ms: list[Tensor], vs: list[Tensor],
                           weight_decay: float, bias_correction1: Tensor, bias_correction2_sqrt: Tensor,
                           eps: float) -> Tensor:
    """Adam-HD's ``h = −Σ⟨g + λθ, m̂/(√v̂ + ε)⟩`` from the moments before they move."""
    return negated_dot_sum((g + weight_decay * p if weight_decay else g,
                            m / bias_correction1 / (v.sqrt() / bias_correction2_sqrt + eps))
                           for p, g, m, v in zip(params, grads, ms, vs))


def _adam_update(params: list[Tensor], grads: list[Tensor], ms: list[Tensor], vs: list[Tensor], weight_decay: float,
                 step_size: Tensor, bias_correction2_sqrt: Tensor, beta1: float, beta2: float, eps: float) -> None:
    """Adam's step in place, ``step_size`` being ``α/(1 − β1^t)``."""
    for p, g, m, v in zip(params, grads, ms, vs):
        g = g + weight_decay * p if weight_decay else g
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.sub_(step_size * m / (v.sqrt() / bias_correction2_sqrt + eps))


def _scalar(value: float, like: Tensor) -> Tensor:
    return torch.tensor(value, dtype=torch.float64, device=like.device)


# ----------------------------------------------------------------------------------------------------------------------
# torch.optim faces


class _HypergradientFace(ForeachFace):
    """Shared by the HD faces: negative-α accounting and logging, skipping a step whose new α is not finite, and the
    in-place step's learning-rate update.

    The in-place step (``fast=True``, the default, with Python-float ``lr`` and ``hypergrad_lr``) is the rule's
    arithmetic on the group's tensors with ``torch._foreach_*`` ops, bit for bit (tested), and it screens non-finite
    gradients through ``h`` itself: a NaN or inf in any gradient makes ``h`` NaN or infinite (0·inf is NaN), so the
    separate finiteness pass over the gradients is saved."""

    screens_nonfinite = True

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, nonfinite: str, fast: bool,
                 compile: bool | str):
        check_compile(compile, fast)
        self.fast, self.compile = fast, compile
        super().__init__(params, dict(defaults, negative_lr_steps=0), nonfinite=nonfinite)

    def use_rule(self, group: dict[str, Any]) -> bool:
        return super().use_rule(group) or isinstance(group["hypergrad_lr"], Tensor)

    def hypergradient_step(self, group: dict[str, Any], grads: list[Tensor], h: Tensor) -> bool:
        """``α_t = α_{t−1} − β·h_t`` into ``group["lr"]`` (negative steps counted), or False (nothing written) when
        ``h`` is not finite because a gradient is not (``grads``: the step's gradients as given)."""
        value = float(h)  # the step's one host read: the finiteness screen and the Python-float rate update share it
        if not math.isfinite(value) and not self.check_finite(group, grads):
            return False
        group["lr"], negative = update_learning_rate(group["lr"], group["hypergrad_lr"], value,
                                                     group["clip_lr_at_zero"])
        group["negative_lr_steps"] = _count(group["negative_lr_steps"], negative)
        return True

    def step_group(self, group: dict[str, Any], grads: Params | None = None) -> bool:
        negative_before = group.get("negative_lr_steps", 0)
        try:
            stepped = super().step_group(group, grads)
        except NonFiniteLearningRate as err:
            # Raised by the rule before it produced anything: parameters and state are untouched.
            return self.skip_nonfinite(group, "learning rate from the hypergradient", err)
        if stepped:
            logger.debug("%s: step %d lr %r", type(self).__name__, group["step"], group["lr"])
            warn_negative_rate_once(self, group, negative_before, "clipped to 0" if group["clip_lr_at_zero"]
                                    else "kept (clip_lr_at_zero=False)", f"lr is now {group['lr']!r}")
        return stepped


class SGDHD(_HypergradientFace):
    r"""SGD with hypergradient descent on one global learning rate per group: SGD-HD, heavy-ball HD and SGDN-HD.

    Baydin, Cornish, Martínez Rubio, Schmidt & Wood, *Online learning rate adaptation with hypergradient descent*,
    ICLR 2018, Algs. 4 (SGD-HD) and 5 (SGDN-HD); spec ``specs/hypergradient.md`` §2–§3. Per step t, over all tensors
    of a group::

        g_t = ∇f(θ_{t−1}) + λ·θ_{t−1}
        h_t = −⟨g_t, d_{t−1}⟩                    (d_0 = 0, so α_1 = α_0)
        α_t = α_{t−1} − β·h_t                    (optionally max(α_t, 0))
        v_t = μ·v_{t−1} + (1−τ_d)·g_t            (v_1 = g_1, torch's buffer)
        d_t = g_t | v_t (heavy ball) | g_t + μ·v_t (Nesterov)
        θ_t = θ_{t−1} − α_t·d_t

    ``param_groups[i]["lr"]`` is a Python float: after each step, the ``α_t`` that step used. With
    ``hypergrad_lr = 0`` this is ``torch.optim.SGD(foreach=False)`` bit for bit.

    Args:
        lr: initial learning rate α_0 (paper 1e-3; README: α_0 = 0 also works).
        hypergrad_lr: β (paper experiments 1e-3 for SGD-HD and SGDN-HD; the reference class default 1e-6 is not the
            paper value, A-HD5).
        momentum, dampening, nesterov, weight_decay: as ``torch.optim.SGD``; ``sgdn-hd`` uses momentum 0.9, Nesterov.
            Weight decay is coupled and part of ``h`` (A-HD4).
        clip_lr_at_zero: clip α at 0 (A-HD3: off by default, as the paper's code; α may go negative). Either way
            negative-α steps are counted in ``param_groups[i]["negative_lr_steps"]`` and logged once.
        gbaydin_compat: accepted for a uniform HD signature; it changes nothing here, because the reference
            ``SGDHD`` is already global (it flattens every gradient) and its ``d_prev`` is the direction.
        nonfinite: ``"skip"`` or ``"raise"`` on non-finite gradients (see :class:`~metaopt.core.CoreOptimizer`).
        fast: step in place with ``torch._foreach_*`` ops (default); ``False`` steps through :class:`SGDHDRule`
            (the same numbers).
        compile: ``True`` (or a torch.compile mode) runs the in-place step through ``torch.compile``: the reduction
            and the update each fuse into a few loops per tensor. Equal to the rule within float32 rounding; the first
            step of each shape compiles (seconds; inductor caches the code on disk).

    Memory per parameter: d_prev (+n) for SGD-HD; heavy ball +n (d_prev *is* the momentum buffer); Nesterov +2n.
    """

    def __init__(self, params, lr: float = 1e-3, hypergrad_lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0, *,
                 clip_lr_at_zero: bool = False, gbaydin_compat: bool = False, nonfinite: str = "skip",
                 fast: bool = True, compile: bool | str = False):
        check_range("learning rate", lr)
        check_range("hypergrad_lr", hypergrad_lr)
        check_range("momentum value", momentum)
        check_range("dampening", dampening, 0.0, 1.0)
        check_range("weight_decay value", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Invalid nesterov: Nesterov momentum requires a momentum > 0 and zero dampening")
        super().__init__(params, dict(lr=lr, hypergrad_lr=hypergrad_lr, momentum=momentum, dampening=dampening,
                                      nesterov=nesterov, weight_decay=weight_decay, clip_lr_at_zero=clip_lr_at_zero,
                                      gbaydin_compat=gbaydin_compat), nonfinite=nonfinite, fast=fast,
                         compile=compile)

    def rule(self, group: dict[str, Any]) -> SGDHDRule:
        return SGDHDRule(group["lr"], group["hypergrad_lr"], group["momentum"], group["dampening"], group["nesterov"],
                         group["weight_decay"], group["clip_lr_at_zero"])

    def foreach_step(self, group, params, grads, state) -> bool:
        momentum = group["momentum"]
        if self.compile is not False and (not momentum or all(s["momentum_buffer"].shape == p.shape
                                                                 for s, p in zip(state, params))):
            return self._compiled_step(group, params, grads, state)
        effective = decayed(grads, params, group["weight_decay"])
        h = negated_dot_sum(zip(effective, (s["prev_direction"] for s in state)))
        if not self.hypergradient_step(group, grads, h):
            return False
        directions = effective
        if momentum != 0:
            bufs = [s["momentum_buffer"] for s in state]
            running = [i for i, (b, g) in enumerate(zip(bufs, effective)) if b.shape == g.shape]
            for i in set(range(len(bufs))) - set(running):  # torch starts a buffer at the gradient
                state[i]["momentum_buffer"] = bufs[i] = effective[i].clone()
            if running:
                torch._foreach_mul_([bufs[i] for i in running], momentum)
                torch._foreach_add_([bufs[i] for i in running], [effective[i] for i in running],
                                    alpha=1 - group["dampening"])
            directions = torch._foreach_add(effective, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, directions, alpha=-group["lr"])
        if directions is grads:  # d_prev must not alias the caller's gradients: copy into the stored buffers
            torch._foreach_copy_([s["prev_direction"] for s in state], directions)
        else:  # new tensors, or the momentum buffers themselves (heavy ball: d_prev costs no memory, as the rule)
            for s, d in zip(state, directions):
                s["prev_direction"] = d
        group["step"] += 1
        return True

    def _compiled_step(self, group, params, grads, state) -> bool:
        """:meth:`foreach_step` through the compiled functions (every momentum buffer exists)."""
        weight_decay, momentum = group["weight_decay"], group["momentum"]
        prev = [s["prev_direction"] for s in state]
        h = compiled_step(_sgd_hd_hypergradient, self.compile)(params, grads, prev, weight_decay)
        if not self.hypergradient_step(group, grads, h):
            return False
        bufs = [s["momentum_buffer"] for s in state]
        compiled_step(_sgd_hd_update, self.compile)(params, grads, prev, bufs, _scalar(group["lr"], params[0]),
                                                      weight_decay, momentum, group["dampening"], group["nesterov"])
        if momentum and not group["nesterov"]:  # heavy ball: d_prev is the buffer
            for s in state:
                s["prev_direction"] = s["momentum_buffer"]
        group["step"] += 1
        return True


class AdamHD(_HypergradientFace):
    r"""Adam with hypergradient descent on one global learning rate per group (Adam-HD).

    Baydin et al., ICLR 2018, Alg. 6; spec ``specs/hypergradient.md`` §4. Per step t, over all tensors of a group::

        g_t = ∇f(θ_{t−1}) + λ·θ_{t−1}
        d_{t−1} = m̂_{t−1} / (√v̂_{t−1} + ε)     (recomputed from m, v before they are updated; d_0 = 0)
        h_t = −⟨g_t, d_{t−1}⟩,   α_t = α_{t−1} − β·h_t   (once per group, after summing over all tensors)
        m_t = β1·m + (1−β1)·g_t,   v_t = β2·v + (1−β2)·g_t²
        θ_t = θ_{t−1} − α_t · m̂_t / (√v̂_t + ε)  (torch's arithmetic)

    ``param_groups[i]["lr"]`` is a Python float: after each step, the ``α_t`` that step used. With
    ``hypergrad_lr = 0`` this is ``torch.optim.Adam(foreach=False)`` bit for bit.

    Args:
        lr: initial learning rate α_0 (paper 1e-3).
        hypergrad_lr: β (paper 1e-7 for logistic regression and the MLP, 1e-8 for VGG; A-HD5 picks 1e-7).
        betas, eps, weight_decay: as ``torch.optim.Adam`` (defaults (0.9, 0.999), 1e-8, 0); weight decay is coupled and
            part of ``h``.
        clip_lr_at_zero: clip α at 0 (off by default, A-HD3); negative-α steps are counted in
            ``param_groups[i]["negative_lr_steps"]`` and logged once either way.
        gbaydin_compat: FOR REPLICATION ONLY. Reproduces the reference code's per-tensor sequential α (each tensor, in
            registration order, steps with α updated from the hypergradients of the tensors before it and itself; the
            result depends on the tensor order, gbaydin issue #9) and its ε placement ``m/(√v + ε)·√bc2/bc1``. Not
            global, and not equal to ``torch.optim.Adam`` at ``hypergrad_lr = 0`` (ε placement). Steps through the
            rule.
        nonfinite: ``"skip"`` or ``"raise"`` on non-finite gradients.
        fast: step in place with ``torch._foreach_*`` ops (default); ``False`` steps through :class:`AdamHDRule`
            (the same numbers).
        compile: ``True`` (or a torch.compile mode) runs the in-place step through ``torch.compile``, as
            :class:`SGDHD`'s (not with ``gbaydin_compat``).

    Memory per parameter: m and v (+2n, as Adam); the hypergradient adds none (d_{t−1} is recomputed).
    """

    def __init__(self, params, lr: float = 1e-3, hypergrad_lr: float = 1e-7, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, clip_lr_at_zero: bool = False,
                 gbaydin_compat: bool = False, nonfinite: str = "skip", fast: bool = True,
                 compile: bool | str = False):
        check_range("learning rate", lr)
        check_range("hypergrad_lr", hypergrad_lr)
        check_range("epsilon value", eps)
        check_betas(betas)
        check_range("weight_decay value", weight_decay)
        if compile is not False and gbaydin_compat:
            raise ValueError("Invalid compile: gbaydin_compat=True steps through the rule and is not compiled")
        super().__init__(params, dict(lr=lr, hypergrad_lr=hypergrad_lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, clip_lr_at_zero=clip_lr_at_zero,
                                      gbaydin_compat=gbaydin_compat), nonfinite=nonfinite, fast=fast,
                         compile=compile)

    def rule(self, group: dict[str, Any]) -> AdamHDRule:
        return AdamHDRule(group["lr"], group["hypergrad_lr"], tuple(group["betas"]), group["eps"],
                          group["weight_decay"], group["clip_lr_at_zero"], group["gbaydin_compat"])

    def use_rule(self, group: dict[str, Any]) -> bool:
        return super().use_rule(group) or group["gbaydin_compat"]

    def foreach_step(self, group, params, grads, state) -> bool:
        (beta1, beta2), eps, prev_step = group["betas"], group["eps"], group["step"]
        effective = decayed(grads, params, group["weight_decay"])
        ms, vs = [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state]
        if prev_step == 0:  # h_1 = 0: no reduction to screen the gradients with
            if not self.check_finite(group, grads):
                return False
            h = torch.zeros((), dtype=torch.float64, device=params[0].device)
        elif self.compile is not False:
            return self._compiled_step(group, params, grads, ms, vs)
        else:  # d_{t−1} = m̂/(√v̂ + ε) recomputed from the moments before they move (adam_previous_direction)
            directions = torch._foreach_div(ms, 1 - beta1**prev_step)
            torch._foreach_div_(directions, adam_foreach_denominator(vs, prev_step, beta2, eps))
            h = negated_dot_sum(zip(effective, directions))
            del directions
        if not self.hypergradient_step(group, grads, h):
            return False
        adam_foreach_update(params, effective, ms, vs, prev_step + 1, group["lr"], beta1, beta2, eps)
        group["step"] = prev_step + 1
        return True

    def _compiled_step(self, group, params, grads, ms, vs) -> bool:
        """:meth:`foreach_step` through the compiled functions (after the first step)."""
        (beta1, beta2), eps, weight_decay, prev_step = group["betas"], group["eps"], group["weight_decay"], group["step"]
        h = compiled_step(_adam_hd_hypergradient, self.compile)(
            params, grads, ms, vs, weight_decay, _scalar(1 - beta1**prev_step, params[0]),
            _scalar((1 - beta2**prev_step) ** 0.5, params[0]), eps)
        if not self.hypergradient_step(group, grads, h):
            return False
        step = prev_step + 1
        compiled_step(_adam_update, self.compile)(
            params, grads, ms, vs, weight_decay, _scalar(group["lr"] / (1 - beta1**step), params[0]),
            _scalar((1 - beta2**step) ** 0.5, params[0]), beta1, beta2, eps)
        group["step"] = step
        return True


# The registrations' records (metaopt.registry): test_hparams for the contract tests' least-squares problem,
# memory models at the registered defaults.
register_optimizer("sgd-hd", kind="hypergradient", test_hparams=dict(lr=0.05, hypergrad_lr=1e-3),
                   memory=MemoryModel(1, 2, "previous direction; reads g, d_prev for <g, d_prev> before the update")
                   )(SGDHD)


@register_optimizer("sgdn-hd", kind="hypergradient", builds=SGDHD, test_hparams=dict(lr=0.05, hypergrad_lr=1e-3),
                    memory=MemoryModel(2, 2, "momentum buffer, previous direction; reads g, d_prev for <g, d_prev>"))
def _make_sgdn_hd(params, lr: float = 1e-3, hypergrad_lr: float = 1e-3, momentum: float = 0.9, nesterov: bool = True,
                  **kw) -> SGDHD:
    """SGDN-HD (Baydin et al. 2018, Alg. 5): :class:`SGDHD` with Nesterov momentum 0.9 (the paper's setting)."""
    return SGDHD(params, lr=lr, hypergrad_lr=hypergrad_lr, momentum=momentum, nesterov=nesterov, **kw)


register_optimizer("adam-hd", kind="hypergradient", test_hparams=dict(lr=0.05, hypergrad_lr=1e-4),
                   memory=MemoryModel(2, 3, "m, v; reads g, m, v for <g, d_prev> (d_prev recomputed from m, v)")
                   )(AdamHD)
